//! One memory budget for the process: `[memory] limit` bytes for the whole process, of which
//! everything buffered gets all but a headroom for the process itself: source events being
//! decoded (counted from their first bytes, `source::metered`) and fanned out, queued chunks
//! and their queue entries, and catch-up reads alike. A chunk holds its share of the budget until
//! every destination is done with it (a chunk shared by several destinations counts once). When
//! the budget is spent, readers wait before they take in the next event; HTTP/2 and Enhanced
//! Fan-Out flow control hold the rest at the sender. An event larger than the whole budget is
//! let through alone.
//!
//! `max_in_flight_bytes` stays a per-destination cap inside the budget.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Used when there is no container limit to take 80% of.
const FALLBACK_LIMIT: u64 = 512 << 20;
/// What the process needs beside its buffers: code, runtime, connections and metrics (about
/// 20 MiB with nothing buffered), the request each destination is building, and the allocator's
/// own slack, which grows with what is buffered. Buffers get the rest of the limit, and at least
/// half of it (measured with the benchmark's `big-events` scenario: see docs/performance.md).
const PROCESS_HEADROOM: u64 = 32 << 20;
/// The allocator's slack: this share of the limit is kept beside the fixed headroom.
const SLACK_DIVISOR: u64 = 8;

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

/// A reservation that cannot be met at once asks for relief after this long, and again as often
/// while it waits.
const SHORT_AFTER: Duration = Duration::from_millis(200);
/// Catch-ups take memory only while this share of the budget stays free for the live feed.
const LIVE_RESERVE_DIVISOR: u64 = 4;

/// What the budget calls, with the bytes in use, when readers wait for it (see `fanout::relief`).
pub type OnShort = Arc<dyn Fn(u64) + Send + Sync>;

/// The process's budget of buffered bytes.
#[derive(Clone)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    limit: u64,
    on_short: Arc<OnceLock<OnShort>>,
}

impl std::fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBudget").field("limit", &self.limit).field("used", &self.used()).finish()
    }
}

impl MemoryBudget {
    /// The budget for buffers in a process whose memory is limited to `limit` bytes.
    pub fn for_process(limit: u64) -> Self {
        MemoryBudget::new(limit - (PROCESS_HEADROOM + limit / SLACK_DIVISOR).min(limit / 2))
    }

    /// A budget of `limit` bytes of buffers.
    pub fn new(limit: u64) -> Self {
        let permits = usize::try_from(limit).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        MemoryBudget { permits: Arc::new(Semaphore::new(permits)), limit: permits as u64, on_short: Arc::default() }
    }

    /// Calls `on_short` while a reservation waits (set once, when the service is wired).
    pub fn on_short(&self, on_short: OnShort) {
        let _ = self.on_short.set(on_short);
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.limit.saturating_sub(self.permits.available_permits() as u64)
    }

    fn permits_for(&self, bytes: usize) -> u32 {
        (bytes as u64).clamp(1, self.limit.min(u64::from(u32::MAX))) as u32
    }

    /// Waits until `bytes` are free (the whole budget at most, so that one huge event passes).
    /// While it waits, it asks for relief now and then: the budget ran short.
    pub async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        let wanted = self.permits_for(bytes);
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_many_owned(wanted) {
            return permit;
        }
        let acquire = Arc::clone(&self.permits).acquire_many_owned(wanted);
        tokio::pin!(acquire);
        loop {
            tokio::select! {
                permit = &mut acquire => return permit.expect("the budget is never closed"),
                _ = tokio::time::sleep(SHORT_AFTER) => {
                    if let Some(on_short) = self.on_short.get() {
                        on_short(self.used());
                    }
                }
            }
        }
    }

    /// `bytes` if they can be taken while a quarter of the budget stays free for the live feed,
    /// never waiting: catch-ups read only then, so they never hold the live feed back.
    pub fn try_reserve_spare(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let wanted = self.permits_for(bytes);
        let free = self.permits.available_permits() as u64;
        if free < u64::from(wanted) + self.limit / LIVE_RESERVE_DIVISOR {
            return None;
        }
        Arc::clone(&self.permits).try_acquire_many_owned(wanted).ok()
    }

    /// What is free now of `bytes`, never waiting (possibly nothing): for records already read
    /// (a catch-up's page read when there was spare).
    pub fn reserve_now(&self, bytes: usize) -> OwnedSemaphorePermit {
        let free = u32::try_from(self.permits.available_permits()).unwrap_or(u32::MAX);
        Arc::clone(&self.permits)
            .try_acquire_many_owned(self.permits_for(bytes).min(free))
            .expect("the budget is never closed, and no more than is free is asked")
    }
}

impl Default for MemoryBudget {
    fn default() -> Self {
        MemoryBudget::for_process(FALLBACK_LIMIT)
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

    #[test]
    fn the_process_keeps_headroom_beside_its_buffers() {
        assert_eq!(MemoryBudget::for_process(96 << 20).limit(), 52 << 20);
        assert_eq!(MemoryBudget::for_process(512 << 20).limit(), 416 << 20);
        assert_eq!(MemoryBudget::for_process(4 << 20).limit(), 2 << 20, "a small limit keeps half for buffers");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_that_waits_asks_for_relief_and_catch_ups_leave_a_quarter_free() {
        let budget = MemoryBudget::new(1_000);
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        budget.on_short({
            let asked = Arc::clone(&asked);
            Arc::new(move |used| {
                assert!(used >= 700, "what is in use is passed on");
                asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        });
        let held = budget.reserve(700).await;
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0, "met at once: no relief asked");
        assert!(budget.try_reserve_spare(100).is_none(), "100 would eat into the live feed's quarter");
        assert_eq!(budget.try_reserve_spare(50).map(|p| p.num_permits()), Some(50), "50 leaves a quarter free");
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(600).await }
        });
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 5, "asked every 200 ms while it waits");
        drop(held);
        let got = waiting.await.unwrap();
        assert_eq!(got.num_permits(), 600);
        let now = budget.reserve_now(600);
        assert_eq!(now.num_permits(), 400, "what is free, never more");
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
