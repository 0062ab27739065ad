//! Deciding *whether* to retry is separate from *how long* to wait.
//!
//! [`classify_batch`] turns a PutRecords answer into what happens to each record; [`Backoff`]
//! says how long to wait before the next attempt (exponential, full jitter, capped).

use std::time::Duration;

use rand::Rng;

use crate::aws::{ErrorKind, classify_code};

/// What happened to one entry of a PutRecords request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryOutcome {
    Accepted,
    /// Throttled by the destination shard: retry, and slow down.
    Throttled,
    /// Another failure that can succeed later (InternalFailure, KMS throttling).
    Retry {
        code: String,
    },
    /// Cannot succeed by retrying: dead-letter, or hold the destination.
    Reject {
        code: String,
        message: String,
    },
}

/// Per-entry outcomes of a PutRecords response, given each entry's `(error_code, error_message)`.
pub fn classify_batch<'a>(entries: impl IntoIterator<Item = (Option<&'a str>, Option<&'a str>)>) -> Vec<EntryOutcome> {
    entries
        .into_iter()
        .map(|(code, message)| match code {
            None | Some("") => EntryOutcome::Accepted,
            Some("ProvisionedThroughputExceededException") => EntryOutcome::Throttled,
            Some(code) => match classify_code(Some(code)) {
                ErrorKind::Permanent => {
                    EntryOutcome::Reject { code: code.to_string(), message: message.unwrap_or_default().to_string() }
                }
                _ => EntryOutcome::Retry { code: code.to_string() },
            },
        })
        .collect()
}

/// Exponential backoff with full jitter: attempt `n` waits a uniform time in
/// `[0, min(max, initial * 2^n)]`. Validated on construction.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("initial backoff {initial:?} must be more than zero and at most the maximum {max:?}")]
pub struct InvalidBackoff {
    initial: Duration,
    max: Duration,
}

impl Backoff {
    pub fn try_new(initial: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if initial.is_zero() || initial > max {
            return Err(InvalidBackoff { initial, max });
        }
        Ok(Backoff { initial, max, attempt: 0 })
    }

    /// A destination group's backoff. Its bounds were checked when the configuration was loaded
    /// (more than zero, initial at most max), so this cannot fail: bounds that were not checked
    /// are raised to the nearest valid ones rather than replaced by other defaults.
    pub fn for_group(group: &crate::config::DestinationGroup) -> Self {
        let initial = if group.initial_backoff.is_zero() { Duration::from_millis(1) } else { group.initial_backoff };
        Backoff { initial, max: group.max_backoff.max(initial), attempt: 0 }
    }

    /// The ceiling of the next wait, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(30)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next wait, with full jitter; each call raises the ceiling until `max`.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// The longest wait, for failures that only a person can fix.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Back to the initial wait after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    #[test]
    fn classifies_entries() {
        let outcomes = classify_batch([
            (None, None),
            (Some("ProvisionedThroughputExceededException"), Some("slow down")),
            (Some("InternalFailure"), None),
            (Some("KMSAccessDeniedException"), Some("no key")),
        ]);
        assert_eq!(outcomes[0], EntryOutcome::Accepted);
        assert_eq!(outcomes[1], EntryOutcome::Throttled);
        assert_eq!(outcomes[2], EntryOutcome::Retry { code: "InternalFailure".into() });
        assert!(matches!(&outcomes[3], EntryOutcome::Reject { code, .. } if code == "KMSAccessDeniedException"));
    }

    #[test]
    fn rejects_inverted_bounds() {
        assert!(Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
        assert!(Backoff::try_new(Duration::ZERO, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn ceiling_doubles_then_caps_and_resets() {
        let mut b = Backoff::try_new(Duration::from_millis(100), Duration::from_secs(1)).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ceilings: Vec<_> = (0..6)
            .map(|_| {
                let c = b.ceiling();
                b.next_delay(&mut rng);
                c.as_millis()
            })
            .collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    proptest! {
        #[test]
        fn delays_stay_within_the_ceiling(seed in any::<u64>(), attempts in 0u32..100) {
            let mut b = Backoff::try_new(Duration::from_millis(1), Duration::from_secs(10)).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for _ in 0..attempts {
                let ceiling = b.ceiling();
                prop_assert!(b.next_delay(&mut rng) <= ceiling);
                prop_assert!(ceiling <= Duration::from_secs(10));
            }
        }
    }
}
