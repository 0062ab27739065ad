//! The put edge: one PutRecords call as the writers see it, behind a small trait so the send loop
//! and the dead-letter writer are tested with a fake, and the SDK is called from here only.

use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use futures::future::BoxFuture;

pub use crate::aws::CallError;
use crate::aws::kinesis;
pub use crate::aws::kinesis::EntryAnswer;

/// Where writers put records.
pub trait PutEdge: Send + Sync + std::fmt::Debug {
    /// One PutRecords call: an answer per entry, in order, or the failure of the whole request.
    fn put_records<'a>(
        &'a self,
        stream: &'a str,
        entries: Vec<PutRecordsRequestEntry>,
    ) -> BoxFuture<'a, Result<Vec<EntryAnswer>, CallError>>;

    /// Whether the stream is deleted or being deleted (a failed check says it is not).
    fn deleted<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, bool>;
}

impl PutEdge for aws_sdk_kinesis::Client {
    fn put_records<'a>(
        &'a self,
        stream: &'a str,
        entries: Vec<PutRecordsRequestEntry>,
    ) -> BoxFuture<'a, Result<Vec<EntryAnswer>, CallError>> {
        Box::pin(kinesis::put_records(self, stream, entries))
    }

    fn deleted<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move { kinesis::stream_gone(self, stream).await.unwrap_or(false) })
    }
}
