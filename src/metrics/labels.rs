//! The values of the `outcome` and `reason` labels: closed sets, so that dashboards and alerts
//! can name every series.

/// Outcomes of records written to a destination (`outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the destination.
    Ok,
    /// Failed with a transient error (InternalFailure, a whole request failing) and sent again.
    Retried,
    /// Throttled by the destination's shard and sent again.
    Throttled,
    /// Refused for good and written to the dead-letter stream.
    DeadLettered,
    /// Refused for good with no dead-letter stream: held (counted once per record).
    Rejected,
    /// Dropped because the destination was deleted.
    DestinationDeleted,
    /// Not sent because this worker lost the source shard's lease: the new owner sends it.
    LeaseLost,
    /// Dropped from the queue because the destination was shed under memory pressure: its
    /// catch-up reads it again.
    Shed,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::Retried,
        Outcome::Throttled,
        Outcome::DeadLettered,
        Outcome::Rejected,
        Outcome::DestinationDeleted,
        Outcome::LeaseLost,
        Outcome::Shed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Retried => "retried",
            Outcome::Throttled => "throttled",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Rejected => "rejected",
            Outcome::DestinationDeleted => "destination_deleted",
            Outcome::LeaseLost => "lease_lost",
            Outcome::Shed => "shed",
        }
    }
}

/// Why a SubscribeToShard session was started again (`reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResubscribeReason {
    /// The session ended normally (Kinesis ends every session within 5 minutes).
    SessionEnd,
    /// SubscribeToShard did not answer within a minute.
    SubscribeTimeout,
    /// The session delivered no event for a minute.
    IdleTimeout,
    /// Another session of this consumer was still open on the shard.
    ResourceInUse,
    /// The shard or consumer was not found (checked against the stream before giving up).
    NotFound,
    /// Too many SubscribeToShard calls.
    LimitExceeded,
    /// SubscribeToShard failed otherwise.
    SubscribeError,
    /// The event stream broke mid-session.
    StreamError,
    /// An event carried a record with a malformed sequence number.
    MalformedEvent,
}

impl ResubscribeReason {
    pub const ALL: [ResubscribeReason; 9] = [
        ResubscribeReason::SessionEnd,
        ResubscribeReason::SubscribeTimeout,
        ResubscribeReason::IdleTimeout,
        ResubscribeReason::ResourceInUse,
        ResubscribeReason::NotFound,
        ResubscribeReason::LimitExceeded,
        ResubscribeReason::SubscribeError,
        ResubscribeReason::StreamError,
        ResubscribeReason::MalformedEvent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResubscribeReason::SessionEnd => "session_end",
            ResubscribeReason::SubscribeTimeout => "subscribe_timeout",
            ResubscribeReason::IdleTimeout => "idle_timeout",
            ResubscribeReason::ResourceInUse => "resource_in_use",
            ResubscribeReason::NotFound => "not_found",
            ResubscribeReason::LimitExceeded => "limit_exceeded",
            ResubscribeReason::SubscribeError => "subscribe_error",
            ResubscribeReason::StreamError => "stream_error",
            ResubscribeReason::MalformedEvent => "malformed_event",
        }
    }
}
