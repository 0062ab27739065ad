//! The write side: one task per destination stream that batches, rate-limits, writes with
//! PutRecords, retries exactly the failed records, and dead-letters what can never succeed; and
//! the [`supervisor`] that starts and stops those tasks as destinations come and go.

pub mod batch;
pub mod dead_letter;
pub mod destination;
pub mod entries;
pub mod ledger;
pub mod limiter;
pub mod order;
pub mod put;
pub mod retry;
pub mod send;
pub mod settle;
pub mod supervisor;
pub mod writer;

pub use batch::MAX_RECORD_BYTES;
pub use destination::{Assignment, DestinationTask, Exit};
pub use entries::QUEUED_ENTRY_BYTES;
