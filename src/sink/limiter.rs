//! Per-destination rate limiting (records/s and bytes/s) with governor.
//!
//! Kinesis limits each shard to 1,000 records/s and 1 MiB/s; sending faster only earns throttling
//! errors and retries. The limiter keeps a destination under its configured (or shard-derived)
//! rate, and throttled records add a debt that the next batch pays, so the rate backs off when the
//! estimate was too generous (hot shards, other writers).
//!
//! The limiter keeps time with tokio's clock, as every other wait of the service does: a paused
//! clock (the fleet simulation, tests) pauses it too.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

/// tokio's clock, as governor sees it: the time since the limiter was made.
#[derive(Debug, Clone, Copy)]
struct TokioClock {
    base: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.base.elapsed()
    }
}

/// Per-shard write limits of Kinesis, the base of `auto` rates.
pub const RECORDS_PER_SHARD: u64 = 1_000;
pub const BYTES_PER_SHARD: u64 = 1 << 20;

type Direct = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

fn direct(per_second: NonZeroU32) -> (Direct, TokioClock) {
    let clock = TokioClock { base: Instant::now() };
    (RateLimiter::direct_with_clock(Quota::per_second(per_second), clock), clock)
}

#[derive(Debug)]
pub struct Limiter {
    records: Direct,
    bytes: Direct,
    clock: TokioClock,
    records_burst: NonZeroU32,
    bytes_burst: NonZeroU32,
    /// Records and bytes charged by throttling, paid by the next acquire.
    debt: (u64, u64),
    rates: (u64, u64),
}

fn nonzero(n: u64) -> NonZeroU32 {
    NonZeroU32::new(u32::try_from(n.max(1)).unwrap_or(u32::MAX)).expect("at least one")
}

impl Limiter {
    /// A limiter allowing `records_per_second` and `bytes_per_second`, with one second of burst.
    pub fn new(records_per_second: u64, bytes_per_second: u64) -> Self {
        let records_burst = nonzero(records_per_second);
        let bytes_burst = nonzero(bytes_per_second);
        let (records, clock) = direct(records_burst);
        let (bytes, _) = direct(bytes_burst);
        Limiter {
            records,
            bytes,
            clock,
            records_burst,
            bytes_burst,
            debt: (0, 0),
            rates: (records_per_second, bytes_per_second),
        }
    }

    /// The rates this limiter enforces: (records/s, bytes/s).
    pub fn rates(&self) -> (u64, u64) {
        self.rates
    }

    /// Waits until `records` records of `bytes` bytes may be sent (plus any throttling debt) and
    /// returns how long that took.
    pub async fn acquire(&mut self, records: usize, bytes: usize) -> Duration {
        let start = Instant::now();
        // The debt is settled only once paid: a wait cut short (the destination was shed) pays
        // it again next time rather than lose it.
        let (debt_records, debt_bytes) = self.debt;
        wait_for(&self.records, self.clock, self.records_burst, records as u64 + debt_records).await;
        wait_for(&self.bytes, self.clock, self.bytes_burst, bytes as u64 + debt_bytes).await;
        self.debt = (0, 0);
        start.elapsed()
    }

    /// Throttled records cost their share again on the next acquire.
    pub fn penalize(&mut self, records: usize, bytes: usize) {
        self.debt.0 += records as u64;
        self.debt.1 += bytes as u64;
    }
}

/// Waits for `amount` cells in pieces no larger than the burst (governor refuses larger asks).
async fn wait_for(limiter: &Direct, clock: TokioClock, burst: NonZeroU32, mut amount: u64) {
    while amount > 0 {
        let piece = amount.min(u64::from(burst.get()));
        let n = NonZeroU32::new(piece as u32).expect("piece is positive");
        match limiter.check_n(n) {
            // Never refused for capacity: `n` never exceeds the burst.
            Ok(Ok(())) | Err(_) => amount -= piece,
            Ok(Err(not_until)) => tokio::time::sleep(not_until.wait_time_from(clock.now())).await,
        }
    }
}

/// The limiter of a destination group: its rates (fixed, or `auto` from the open shard count),
/// scaled to this worker's share of the source.
pub(crate) fn limiter_for(group: &crate::config::DestinationGroup, open_shards: u32, share: f64) -> Limiter {
    let share = if share.is_finite() && share > 0.0 { share.min(1.0) } else { 1.0 };
    let scaled = |rate: u64| ((rate as f64 * share).ceil() as u64).max(1);
    Limiter::new(
        scaled(group.records_per_second.resolve(open_shards, RECORDS_PER_SHARD)),
        scaled(group.bytes_per_second.resolve(open_shards, BYTES_PER_SHARD)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_second_is_free_then_it_waits() {
        let mut limiter = Limiter::new(1_000, 1 << 20);
        let waited = limiter.acquire(500, 1000).await;
        assert!(waited < Duration::from_millis(100), "burst allows the first half second: {waited:?}");
        assert_eq!(limiter.rates(), (1_000, 1 << 20));
    }

    #[tokio::test(start_paused = true)]
    async fn asks_beyond_the_burst_are_split() {
        // 5 MiB (and a byte of debt) against a 4 MiB/s limit: governor refuses asks beyond the
        // burst, so the first 4 MiB go at once and the rest waits its quarter second.
        let mut limiter = Limiter::new(1_000_000, 4 << 20);
        limiter.penalize(1, 1);
        let waited = limiter.acquire(10, 5 << 20).await;
        assert!(
            waited >= Duration::from_millis(240) && waited <= Duration::from_millis(270),
            "waited {waited:?} for the mebibyte beyond the burst"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn it_keeps_time_with_tokio_s_clock() {
        // 100 records/s: the first 100 are the burst, the next 300 take three seconds of the
        // paused clock, which passes only as tokio lets it.
        let mut limiter = Limiter::new(100, 1 << 20);
        limiter.acquire(100, 100).await;
        let waited = limiter.acquire(300, 300).await;
        assert!(
            waited >= Duration::from_millis(2_900) && waited <= Duration::from_millis(3_100),
            "waited {waited:?} of tokio's clock"
        );
    }
}
