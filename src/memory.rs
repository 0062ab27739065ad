//! One memory budget for the process: `[memory] limit` bytes for everything buffered, source
//! events being decoded and fanned out, queued chunks and catch-up reads alike. A chunk holds its
//! share of the budget until every destination is done with it (a chunk shared by several
//! destinations counts once). When the budget is spent, readers wait before they take the next
//! event; Enhanced Fan-Out's flow control holds the rest on the wire. An event larger than the
//! whole budget is let through alone.
//!
//! `max_in_flight_bytes` stays a per-destination cap inside the budget.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Used when there is no container limit to take 80% of.
const FALLBACK_LIMIT: u64 = 512 << 20;

/// 80% of the container's cgroup memory limit when there is one, else 512 MiB.
pub fn default_limit() -> u64 {
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
    let v1 = || std::fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes").ok();
    v2.or_else(v1).and_then(|text| cgroup_limit(&text)).map(|limit| limit / 5 * 4).unwrap_or(FALLBACK_LIMIT)
}

/// A cgroup memory limit file's value; `None` for "max" or the v1 "no limit" value.
fn cgroup_limit(text: &str) -> Option<u64> {
    let limit: u64 = text.trim().parse().ok()?;
    // cgroup v1 writes a page-rounded i64::MAX when there is no limit.
    (limit < 1 << 60).then_some(limit)
}

/// The process's budget of buffered bytes.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    limit: u64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Self {
        let permits = usize::try_from(limit).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        MemoryBudget { permits: Arc::new(Semaphore::new(permits)), limit: permits as u64 }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.limit.saturating_sub(self.permits.available_permits() as u64)
    }

    /// Waits until `bytes` are free (the whole budget at most, so that one huge event passes).
    pub async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        let wanted = (bytes as u64).clamp(1, self.limit.min(u64::from(u32::MAX))) as u32;
        Arc::clone(&self.permits).acquire_many_owned(wanted).await.expect("the budget is never closed")
    }
}

impl Default for MemoryBudget {
    fn default() -> Self {
        MemoryBudget::new(FALLBACK_LIMIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_limits_are_read_and_no_limit_is_none() {
        assert_eq!(cgroup_limit("1073741824\n"), Some(1 << 30));
        assert_eq!(cgroup_limit("max\n"), None);
        assert_eq!(cgroup_limit("9223372036854771712\n"), None, "cgroup v1 without a limit");
        assert_eq!(cgroup_limit(""), None);
    }

    #[tokio::test]
    async fn a_spent_budget_waits_and_an_oversized_reservation_passes_alone() {
        let budget = MemoryBudget::new(1_000);
        let first = budget.reserve(600).await;
        assert_eq!(budget.used(), 600);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(600).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "400 bytes free: the second waits");
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        drop(second);
        let huge = budget.reserve(10_000).await;
        assert_eq!(budget.used(), 1_000, "larger than the budget: it takes all of it");
        drop(huge);
        assert_eq!(budget.used(), 0);
    }
}
