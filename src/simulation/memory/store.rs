//! The memory table as a lease store: each worker's link, as the service holds its table.

use futures::future::BoxFuture;

use super::MemoryLink;
use crate::lease::table::{CheckpointWrite, Lease, LeaseError, LeaseStore, Scanned};

impl LeaseStore for MemoryLink {
    fn name(&self) -> &str {
        "memory"
    }

    fn ensure(&self, _create: bool) -> BoxFuture<'_, Result<(), LeaseError>> {
        Box::pin(async { Ok(()) })
    }

    fn note<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, LeaseError>> {
        Box::pin(self.note(key))
    }

    fn set_note<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), LeaseError>> {
        Box::pin(self.set_note(key, value))
    }

    fn scan(&self, consistent: bool) -> BoxFuture<'_, Result<Scanned, LeaseError>> {
        Box::pin(self.scan_all(consistent))
    }

    fn create_if_absent<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(self.create_if_absent(lease))
    }

    fn take<'a>(&'a self, key: &'a str, expected: u64, me: &'a str) -> BoxFuture<'a, Result<u64, LeaseError>> {
        Box::pin(self.take(key, expected, me))
    }

    fn renew<'a>(&'a self, key: &'a str, counter: u64, me: &'a str) -> BoxFuture<'a, Result<u64, LeaseError>> {
        Box::pin(self.renew(key, counter, me))
    }

    fn write_checkpoint<'a>(
        &'a self,
        key: &'a str,
        counter: u64,
        me: &'a str,
        write: &'a CheckpointWrite<'a>,
    ) -> BoxFuture<'a, Result<u64, LeaseError>> {
        Box::pin(self.write_checkpoint(key, counter, me, write))
    }

    fn release<'a>(&'a self, key: &'a str, counter: u64, me: &'a str) -> BoxFuture<'a, Result<(), LeaseError>> {
        Box::pin(self.release(key, counter, me))
    }

    fn delete_finished<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(self.delete_finished(key))
    }
}
