//! A place in a shard. One type serves every layer: the configured starting point
//! (`source.initial_position`), the plan of which shard starts where, a reader's subscription,
//! checkpoint files and the lease table's `checkpoint` attribute; and what a checkpoint holds
//! ([`Snapshot`]).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::record::SequenceNumber;

/// Checkpoints by shard id.
pub type Checkpoints = std::collections::BTreeMap<String, Position>;

/// Per shard, each destination's own position (destination id → sequence number).
pub type DestinationPositions = std::collections::BTreeMap<String, std::collections::BTreeMap<String, SequenceNumber>>;

/// What is stored for the source stream: each shard's checkpoint (the lowest position over every
/// destination) and, beside it, each destination's own position. Made by `progress`, stored by
/// `checkpoint`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub shards: Checkpoints,
    /// Shard → destination id (stream ARN) → sequence number. A shard named here has its whole
    /// map replaced; shards not named keep theirs.
    pub destinations: DestinationPositions,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{shown}` is not a position (TRIM_HORIZON, LATEST, AT_TIMESTAMP:<ms>, AT_SEQUENCE_NUMBER:<n>, a sequence \
     number of 1 to 128 digits, or SHARD_END)"
)]
pub struct BadPosition {
    shown: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// The oldest record the stream keeps.
    TrimHorizon,
    /// Only what is written from now on.
    Latest,
    /// What arrived at or after this time.
    AtTimestamp(SystemTime),
    /// From this record on: where a reading from LATEST or a timestamp began, kept before
    /// anything was acknowledged, so that a restart resumes there and not at a new LATEST.
    At(SequenceNumber),
    /// Every record up to and including this one was accepted everywhere: resume after it.
    Sequence(SequenceNumber),
    /// The shard was closed by a reshard and read to its end.
    ShardEnd,
}

/// A lease created without a checkpoint reads from the oldest record (as the KCL's do).
impl Default for Position {
    fn default() -> Self {
        Position::TrimHorizon
    }
}

const TRIM_HORIZON: &str = "TRIM_HORIZON";
const LATEST: &str = "LATEST";
const AT_TIMESTAMP: &str = "AT_TIMESTAMP";
const AT: &str = "AT_SEQUENCE_NUMBER:";
const SHARD_END: &str = "SHARD_END";

impl Position {
    /// Parses the stored text (see `Display`). The KCL's bare `AT_TIMESTAMP` sentinel carries no
    /// time: it reads as the epoch, so such a shard is read from its oldest record, losing nothing.
    pub fn parse(text: &str) -> Result<Self, BadPosition> {
        let bad = || BadPosition { shown: text.chars().take(60).collect() };
        Ok(match text {
            TRIM_HORIZON => Position::TrimHorizon,
            LATEST => Position::Latest,
            AT_TIMESTAMP => Position::AtTimestamp(UNIX_EPOCH),
            SHARD_END => Position::ShardEnd,
            other => {
                if let Some(millis) = other.strip_prefix(AT_TIMESTAMP).and_then(|t| t.strip_prefix(':')) {
                    let millis: u64 = millis.parse().map_err(|_| bad())?;
                    Position::AtTimestamp(UNIX_EPOCH + Duration::from_millis(millis))
                } else if let Some(at) = other.strip_prefix(AT) {
                    Position::At(SequenceNumber::parse(at).map_err(|_| bad())?)
                } else {
                    Position::Sequence(SequenceNumber::parse(other).map_err(|_| bad())?)
                }
            }
        })
    }

    /// Whether a checkpoint at this position means the shard was read to its end.
    pub fn is_end(&self) -> bool {
        *self == Position::ShardEnd
    }
}

/// The stored text: `TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP:<milliseconds since the epoch>`,
/// `AT_SEQUENCE_NUMBER:<n>`, the sequence number itself, or `SHARD_END` (the KCL's sentinels
/// where it has them).
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::TrimHorizon => f.write_str(TRIM_HORIZON),
            Position::Latest => f.write_str(LATEST),
            Position::AtTimestamp(at) => {
                write!(f, "{AT_TIMESTAMP}:{}", at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis())
            }
            Position::At(seq) => write!(f, "{AT}{seq}"),
            Position::Sequence(seq) => f.write_str(seq.as_str()),
            Position::ShardEnd => f.write_str(SHARD_END),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn positions_round_trip() {
        for text in [
            "TRIM_HORIZON",
            "LATEST",
            "AT_TIMESTAMP:1763900000123",
            "SHARD_END",
            "4959033827149025660855969",
            "AT_SEQUENCE_NUMBER:42",
        ] {
            assert_eq!(Position::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(Position::parse("AT_TIMESTAMP").unwrap(), Position::AtTimestamp(UNIX_EPOCH));
        for bad in ["garbage", "AT_TIMESTAMP:soon", "AT_SEQUENCE_NUMBER:", ""] {
            assert!(Position::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,60}") {
            let _ = Position::parse(&text);
        }
    }
}
