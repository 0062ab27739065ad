//! One source shard's reader: SubscribeToShard sessions, one after another, from where the last
//! one stopped, until the shard ends or the service stops.
//!
//! A record is handed on only if its sequence number is greater than the last one handed on, so
//! a resubscription can never replay into the destinations.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_kinesis::types::SubscribeToShardEvent;
use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::SourceError;
use super::metered::EventMeter;
use crate::aws::{ErrorKind, kinesis};
use crate::checkpoint::Checkpointer;
use crate::fanout::Fanout;
use crate::metrics::{Metrics, ResubscribeReason};
use crate::position::Position;
use crate::progress::{Checkpoints, ShardProgress};
use crate::record::{SequenceNumber, SourceRecord};
use crate::shutdown::Stopped;
use crate::sink::retry::Backoff;

/// A subscription that delivers no event for this long is assumed dead and restarted
/// (Kinesis sends an event at least every 5 seconds, even when there are no records).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// AWS rejects a second subscription to the same shard within 5 s of the previous one.
const IN_USE_MIN_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub enum ReaderExit {
    /// The shard was closed by a reshard, read to its end, and every record acknowledged.
    Ended,
    /// The service is stopping.
    Stopped(Stopped),
    /// The source is gone, or access to it was lost: the service cannot go on.
    Fatal(SourceError),
}

pub struct ShardReader {
    pub stream_name: String,
    pub consumer_arn: String,
    pub shard_id: String,
    pub start: Position,
    pub subscriber: aws_sdk_kinesis::Client,
    pub control: aws_sdk_kinesis::Client,
    pub fanout: Fanout,
    pub progress: Arc<ShardProgress>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<crate::health::Health>,
    pub last_malformed_warning: Option<tokio::time::Instant>,
    /// Where a reading started at LATEST or AT_TIMESTAMP keeps its place as soon as it has one.
    pub checkpointer: Checkpointer,
    /// When this reading was set up: what it stores belongs to this reading only.
    pub started_at: tokio::time::Instant,
}

/// Where a reading stands: where the next session starts, and which records are new.
#[derive(Debug)]
struct Cursor {
    position: Position,
    /// The last record handed on: a resubscription resumes after it and drops anything not newer.
    last_handed: Option<SequenceNumber>,
    /// Nothing handed on yet, but the reading is anchored here (a stored or just-taken starting
    /// point): records below it were written before the reading began and are not new.
    floor: Option<SequenceNumber>,
    /// A reading started at a timestamp hands on nothing that arrived before it (Kinesis never
    /// sends such records; an emulator asked for a timestamp past its last record may).
    not_before: Option<SystemTime>,
}

impl Cursor {
    fn new(start: &Position) -> Self {
        let (last_handed, floor) = match start {
            Position::Sequence(seq) => (Some(seq.clone()), None),
            Position::At(seq) => (None, Some(seq.clone())),
            _ => (None, None),
        };
        let not_before = match start {
            Position::AtTimestamp(at) => Some(*at),
            _ => None,
        };
        Cursor { position: start.clone(), last_handed, floor, not_before }
    }

    /// A start that moves with time (LATEST, a timestamp) has no place of its own yet.
    fn unanchored(&self) -> bool {
        matches!(self.position, Position::Latest | Position::AtTimestamp(_))
    }

    fn anchor(&mut self, at: SequenceNumber) {
        self.position = Position::At(at.clone());
        self.floor = Some(at);
    }

    /// Whether a record was not handed on before (a replay after a resubscription is not).
    fn is_new(&self, seq: &SequenceNumber) -> bool {
        match (&self.last_handed, &self.floor) {
            (Some(last), _) => seq > last,
            (None, Some(floor)) => seq >= floor,
            (None, None) => true,
        }
    }

    /// Whether a record arrived before the timestamp this reading started at.
    fn before_start(&self, arrival: Option<SystemTime>) -> bool {
        matches!((self.not_before, arrival), (Some(start), Some(arrived)) if arrived < start)
    }

    /// Where the next session starts: after the last record handed on, else where it was.
    fn resume(&mut self) {
        if let Some(seq) = &self.last_handed {
            self.position = Position::Sequence(seq.clone());
        }
    }
}

/// How a session ended.
enum SessionEnd {
    Stopped(Stopped),
    ShardEnd,
    Resubscribe(ResubscribeReason),
    Failed(ResubscribeReason, ErrorKind, String),
}

/// Counts an open subscription for as long as it lives.
struct Active(prometheus::IntGauge);

impl Active {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Active(gauge.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ShardReader {
    pub async fn run(mut self, stop: CancellationToken) -> ReaderExit {
        self.health.reader_started(&self.shard_id);
        let exit = self.read(&stop).await;
        self.health.reader_stopped(&self.shard_id);
        exit
    }

    async fn read(&mut self, stop: &CancellationToken) -> ReaderExit {
        let mut cursor = Cursor::new(&self.start);
        let mut backoff = Backoff::try_new(Duration::from_millis(200), Duration::from_secs(10)).expect("valid bounds");
        tracing::info!(shard = %self.shard_id, start = ?cursor.position, "Reading shard.");
        loop {
            let end = self.session(&mut cursor, &mut backoff, stop).await;
            cursor.resume();
            let (reason, delay) = match end {
                SessionEnd::Stopped(Stopped) => return ReaderExit::Stopped(Stopped),
                SessionEnd::ShardEnd => {
                    tracing::info!(shard = %self.shard_id, "Shard reached its end; waiting until every destination has its records.");
                    tokio::select! {
                        _ = stop.cancelled() => return ReaderExit::Stopped(Stopped),
                        _ = self.progress.complete_everywhere() => {}
                    }
                    self.progress.mark_ended();
                    return ReaderExit::Ended;
                }
                SessionEnd::Resubscribe(reason) => (reason, Duration::ZERO),
                SessionEnd::Failed(reason, kind, cause) => {
                    if (kind == ErrorKind::NotFound || kind == ErrorKind::Permanent)
                        && let Some(fatal) = self.source_gone(kind, &cause).await
                    {
                        return ReaderExit::Fatal(fatal);
                    }
                    let mut delay = backoff.next_delay(&mut rand::rng());
                    if kind == ErrorKind::InUse {
                        delay = delay.max(IN_USE_MIN_WAIT);
                    }
                    tracing::warn!(shard = %self.shard_id, reason = reason.as_str(), error = %cause, delay_ms = delay.as_millis() as u64, "Subscription failed; resubscribing after a backoff.");
                    (reason, delay)
                }
            };
            self.metrics.resubscribes.with_label_values(&[reason.as_str()]).inc();
            if !delay.is_zero() {
                tokio::select! {
                    _ = stop.cancelled() => return ReaderExit::Stopped(Stopped),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    /// Decides whether a NotFound/permanent error means the source is gone for good.
    async fn source_gone(&self, kind: ErrorKind, cause: &str) -> Option<SourceError> {
        match kinesis::stream_gone(&self.control, &self.stream_name).await {
            Ok(true) => Some(SourceError::StreamDeleted { stream: self.stream_name.clone() }),
            _ if kind == ErrorKind::Permanent => {
                Some(SourceError::Subscribe { shard: self.shard_id.clone(), message: cause.to_string() })
            }
            _ => None,
        }
    }

    async fn session(&mut self, cursor: &mut Cursor, backoff: &mut Backoff, stop: &CancellationToken) -> SessionEnd {
        // Each event counts against the memory budget as soon as it starts to arrive. While one
        // waits for budget, the shard is paused (healthy), not silent.
        let health = Arc::clone(&self.health);
        let shard = self.shard_id.clone();
        let meter = EventMeter::new(self.fanout.memory().clone())
            .on_wait(Arc::new(move |waiting| health.paused(&shard, waiting)));
        let request = kinesis::subscribe(
            &self.subscriber,
            &self.consumer_arn,
            &self.shard_id,
            &cursor.position,
            meter.interceptor(),
        );
        let output = tokio::select! {
            biased;
            _ = stop.cancelled() => return SessionEnd::Stopped(Stopped),
            r = tokio::time::timeout(IDLE_TIMEOUT, request) => r,
        };
        let mut events = match output {
            Err(_elapsed) => return SessionEnd::Resubscribe(ResubscribeReason::SubscribeTimeout),
            Ok(Err(err)) => {
                let reason = match err.kind {
                    ErrorKind::InUse => ResubscribeReason::ResourceInUse,
                    ErrorKind::NotFound => ResubscribeReason::NotFound,
                    _ if err.code == "LimitExceededException" => ResubscribeReason::LimitExceeded,
                    _ => ResubscribeReason::SubscribeError,
                };
                return SessionEnd::Failed(reason, err.kind, err.cause);
            }
            Ok(Ok(subscription)) => subscription,
        };
        let _active = Active::new(&self.metrics.active_subscriptions);
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return SessionEnd::Stopped(Stopped),
                next = meter.unless_idle(events.next(), IDLE_TIMEOUT) => next,
            };
            let event = match next {
                None => return SessionEnd::Resubscribe(ResubscribeReason::IdleTimeout),
                Some(Ok(None)) => return SessionEnd::Resubscribe(ResubscribeReason::SessionEnd),
                Some(Err(err)) => return SessionEnd::Failed(ResubscribeReason::StreamError, err.kind, err.cause),
                Some(Ok(Some(event))) => event,
            };
            backoff.reset();
            match self.handle(event, meter.take(), cursor, stop).await {
                Ok(false) => {}
                Ok(true) => return SessionEnd::ShardEnd,
                Err(end) => return end,
            }
        }
    }

    /// Hands the event's new records on. Returns true at the end of the shard.
    async fn handle(
        &mut self,
        event: SubscribeToShardEvent,
        reserved: Option<OwnedSemaphorePermit>,
        cursor: &mut Cursor,
        stop: &CancellationToken,
    ) -> Result<bool, SessionEnd> {
        let shard = self.shard_id.as_str();
        self.metrics.millis_behind_latest.with_label_values(&[shard]).set(event.millis_behind_latest);
        let continuation = event.continuation_sequence_number;
        let child_shards = event.child_shards.as_ref().is_some_and(|c| !c.is_empty());
        let received = event.records.len();
        let mut records = Vec::with_capacity(received);
        let mut replayed = 0u64;
        let mut malformed = 0u64;
        for record in event.records {
            let Ok(seq) = SequenceNumber::parse(&record.sequence_number) else {
                tracing::error!(shard, "Event carried a record with a malformed sequence number; resubscribing.");
                return Err(SessionEnd::Failed(
                    ResubscribeReason::MalformedEvent,
                    ErrorKind::Transient,
                    "malformed sequence number".into(),
                ));
            };
            let arrival = record.approximate_arrival_timestamp.and_then(|t| SystemTime::try_from(t).ok());
            if !cursor.is_new(&seq) || cursor.before_start(arrival) {
                replayed += 1;
                continue;
            }
            cursor.last_handed = Some(seq.clone());
            let (record, bad_aggregate) = source_record(seq, arrival, record);
            if let Some(err) = bad_aggregate {
                malformed += 1;
                warn_malformed(&mut self.last_malformed_warning, shard, &record.sequence_number, &err);
            }
            records.push(record);
        }
        if cursor.unanchored() {
            // The first event of a reading from LATEST or a timestamp says where it stands: the
            // first record it hands on, else its continuation. Kept before anything is handed
            // on, so that a restart copies everything written after the first start.
            let first = records.first().map(|r| r.sequence_number.clone());
            if let Some(at) = first.or_else(|| SequenceNumber::parse(&continuation).ok()) {
                self.keep_starting_point(&at).await;
                cursor.anchor(at);
            }
        }
        self.health.event(shard, event.millis_behind_latest, records.len(), cursor.last_handed.as_ref());
        self.fanout.introduce_new(&self.progress);
        if malformed > 0 {
            self.metrics.kpl_malformed_records.with_label_values(&[shard]).inc_by(malformed);
        }
        if replayed > 0 {
            self.metrics.replayed_records_dropped.with_label_values(&[shard]).inc_by(replayed);
        }
        if !records.is_empty() {
            let bytes: usize = records.iter().map(SourceRecord::size).sum();
            self.metrics.records_read.with_label_values(&[shard]).inc_by(records.len() as u64);
            self.metrics.bytes_read.with_label_values(&[shard]).inc_by(bytes as u64);
            self.health.paused(shard, true);
            let delivered = self.fanout.deliver(&self.progress, records, reserved, stop).await;
            self.health.paused(shard, false);
            if delivered.is_err() {
                return Err(SessionEnd::Stopped(Stopped));
            }
        }
        // Real Kinesis ends a shard with a null continuation; some emulators keep sending one but
        // announce the children on an empty event.
        Ok(continuation.is_empty() || (child_shards && received == 0))
    }
}

impl ShardReader {
    /// Records where this reading starts, in progress (so periodic checkpoints keep it until a
    /// record is acknowledged) and at once in the store. A failed write is retried by the
    /// checkpoint loop.
    async fn keep_starting_point(&self, at: &SequenceNumber) {
        self.progress.anchor(at.clone());
        let mut start = Checkpoints::new();
        start.insert(self.shard_id.clone(), Position::At(at.clone()));
        match self.checkpointer.save(&start, self.started_at).await {
            Ok(()) => {
                tracing::info!(shard = %self.shard_id, sequence_number = %at, "Starting point stored: a restart resumes here.");
            }
            Err(err) => {
                tracing::warn!(shard = %self.shard_id, error = %crate::aws::chain(&err), "Could not store the starting point yet; the checkpoint loop tries again.");
            }
        }
    }
}

/// At most one warning a minute per shard: a producer sending broken aggregates must not flood
/// the logs (the metric counts every one).
fn warn_malformed(
    last: &mut Option<tokio::time::Instant>,
    shard: &str,
    seq: &SequenceNumber,
    err: &crate::kpl::KplError,
) {
    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
        *last = Some(tokio::time::Instant::now());
        tracing::warn!(shard, sequence_number = %seq, error = %err, "A record has the KPL magic bytes but is not a valid aggregate; copying it unchanged as a plain record.");
    }
}

/// A record as the service carries it, its KPL aggregate decoded once. A malformed aggregate
/// travels as a plain record; its error comes back for counting.
pub(super) fn source_record(
    sequence_number: SequenceNumber,
    arrival: Option<SystemTime>,
    record: aws_sdk_kinesis::types::Record,
) -> (SourceRecord, Option<crate::kpl::KplError>) {
    let data = Bytes::from(record.data.into_inner());
    let (user_records, bad) = match crate::kpl::decode(&data) {
        Ok(decoded) => (decoded.map(Into::into), None),
        Err(err) => (None, Some(err)),
    };
    let record = SourceRecord {
        sequence_number,
        // Kinesis always sets one; if not, the destination's validation error sends the record
        // to the dead-letter stream with its origin instead of losing it here.
        partition_key: record.partition_key.unwrap_or_default(),
        data,
        user_records,
        arrival,
    };
    (record, bad)
}
