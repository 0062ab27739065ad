//! Every metric the service exports, defined in one place.
//!
//! Labels stay low-cardinality (`shard`, `destination`, `outcome`, `reason`; never a partition
//! key), and the pipeline updates them per batch or per event, never per record.

mod labels;

pub use labels::{Outcome, ResubscribeReason};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    // Source.
    pub records_read: IntCounterVec,
    pub bytes_read: IntCounterVec,
    pub millis_behind_latest: IntGaugeVec,
    pub active_subscriptions: IntGauge,
    pub resubscribes: IntCounterVec,
    pub replayed_records_dropped: IntCounterVec,
    pub kpl_malformed_records: IntCounterVec,
    pub source_retention_seconds: IntGauge,
    // Destinations.
    pub destinations: IntGauge,
    pub records_written: IntCounterVec,
    pub bytes_written: IntCounterVec,
    pub put_records_seconds: HistogramVec,
    pub rate_limiter_wait_seconds: prometheus::CounterVec,
    pub buffered_records: IntGaugeVec,
    pub buffered_bytes: IntGaugeVec,
    pub destination_stalled: IntGaugeVec,
    pub dead_letters_unwrapped: IntCounterVec,
    pub misrouted_records: IntCounterVec,
    pub destination_detached: IntGaugeVec,
    pub destination_lag_seconds: GaugeVec,
    pub catch_up_records: IntCounterVec,
    pub records_expired: IntCounterVec,
    pub catch_up_errors: IntCounterVec,
    pub destination_shed: IntCounterVec,
    pub destination_records_too_large: IntCounterVec,
    pub destination_records_filtered: IntCounterVec,
    pub records_not_json: prometheus::IntCounter,
    pub credential_refresh_errors: IntCounterVec,
    /// SIGHUP reloads of the configuration file, by result.
    pub config_reloads: IntCounterVec,
    // Progress.
    pub checkpoint_writes: IntCounterVec,
    pub lease_items_unreadable: prometheus::IntCounter,
    pub oldest_unacknowledged_age_seconds: GaugeVec,
    pub end_to_end_seconds: Histogram,
    pub delivery_seconds: Histogram,
    // Process.
    pub memory_limit_bytes: IntGauge,
    pub memory_used_bytes: IntGauge,
    pub memory_budget_bytes: IntGauge,
    /// The budget `memory_used_bytes` reads at scrape time.
    pub memory: std::sync::Arc<std::sync::OnceLock<crate::memory::MemoryBudget>>,
    pub idle: IntGauge,
    pub build_info: IntGaugeVec,
    pub start_time_seconds: Gauge,
    /// Every metric name defined here, for documentation checks.
    names: Vec<String>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(format!("kinesis_fanout_{name}"), help)
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        // Every registration goes through here, so `names` cannot miss one.
        let names = std::cell::RefCell::new(Vec::new());
        let register = |collector: Box<dyn prometheus::core::Collector>| {
            names.borrow_mut().extend(collector.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(collector).expect("unique metric");
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(opts(name, help), labels).expect("valid metric");
            register(Box::new(c.clone()));
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(opts(name, help), labels).expect("valid metric");
            register(Box::new(g.clone()));
            g
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(opts(name, help)).expect("valid metric");
            register(Box::new(g.clone()));
            g
        };
        let latency_buckets = vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let put_records_seconds = HistogramVec::new(
            HistogramOpts::from(opts("put_records_duration_seconds", "PutRecords call latency."))
                .buckets(latency_buckets.clone()),
            &["destination"],
        )
        .expect("valid metric");
        register(Box::new(put_records_seconds.clone()));
        let end_to_end_seconds = Histogram::with_opts(
            HistogramOpts::from(opts(
                "end_to_end_latency_seconds",
                "Time from a record's arrival in the source stream to its acceptance by every destination.",
            ))
            .buckets(latency_buckets),
        )
        .expect("valid metric");
        register(Box::new(end_to_end_seconds.clone()));
        let delivery_seconds = Histogram::with_opts(
            HistogramOpts::from(opts(
                "delivery_latency_seconds",
                "Time from reading a chunk of records from the source to its acceptance by every destination.",
            ))
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        register(Box::new(delivery_seconds.clone()));
        let rate_limiter_wait_seconds = prometheus::CounterVec::new(
            opts("rate_limiter_wait_seconds_total", "Time spent waiting on a destination's rate limiter."),
            &["destination"],
        )
        .expect("valid metric");
        register(Box::new(rate_limiter_wait_seconds.clone()));
        let oldest_unacknowledged_age_seconds = GaugeVec::new(
            opts(
                "oldest_unacknowledged_record_age_seconds",
                "Age of the oldest record read from a shard and not yet accepted by every destination.",
            ),
            &["shard"],
        )
        .expect("valid metric");
        register(Box::new(oldest_unacknowledged_age_seconds.clone()));
        let destination_lag_seconds = GaugeVec::new(
            opts(
                "destination_lag_seconds",
                "For a detached destination: age of the oldest record its catch-up read last (about the oldest it still owes); 0 while it follows the live feed.",
            ),
            &["destination"],
        )
        .expect("valid metric");
        register(Box::new(destination_lag_seconds.clone()));
        let start_time_seconds =
            Gauge::with_opts(opts("start_time_seconds", "Process start time, seconds since the Unix epoch."))
                .expect("valid metric");
        register(Box::new(start_time_seconds.clone()));
        start_time_seconds.set(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        );

        let mut metrics = Metrics {
            records_read: counter("source_records_read_total", "Records read from the source, per shard.", &["shard"]),
            bytes_read: counter(
                "source_bytes_read_total",
                "Bytes (data and partition key) read from the source, per shard.",
                &["shard"],
            ),
            millis_behind_latest: gauge_vec(
                "source_millis_behind_latest",
                "MillisBehindLatest of the last event, per shard.",
                &["shard"],
            ),
            active_subscriptions: gauge("source_active_subscriptions", "SubscribeToShard sessions open now."),
            resubscribes: counter(
                "source_resubscribes_total",
                "SubscribeToShard sessions started again, by reason.",
                &["reason"],
            ),
            replayed_records_dropped: counter(
                "source_replayed_records_dropped_total",
                "Records delivered again by a resubscription and dropped before reaching destinations.",
                &["shard"],
            ),
            kpl_malformed_records: counter(
                "source_kpl_malformed_records_total",
                "Records with the KPL magic bytes but a bad MD5 or protobuf, copied unchanged as plain records.",
                &["shard"],
            ),
            source_retention_seconds: gauge(
                "source_retention_seconds",
                "The source stream's retention period: a detached destination further behind than this loses records.",
            ),
            destinations: gauge("destinations", "Destination streams currently written to."),
            records_written: counter(
                "destination_records_total",
                "Records sent to a destination, by outcome (see Outcome::ALL).",
                &["destination", "outcome"],
            ),
            bytes_written: counter(
                "destination_bytes_total",
                "Bytes sent to a destination, by outcome.",
                &["destination", "outcome"],
            ),
            put_records_seconds,
            rate_limiter_wait_seconds,
            buffered_records: gauge_vec(
                "destination_buffered_records",
                "Records queued for a destination.",
                &["destination"],
            ),
            buffered_bytes: gauge_vec(
                "destination_buffered_bytes",
                "Bytes queued for a destination.",
                &["destination"],
            ),
            destination_stalled: gauge_vec(
                "destination_stalled",
                "1 while a destination rejects records that cannot succeed and has no dead-letter stream.",
                &["destination"],
            ),
            dead_letters_unwrapped: counter(
                "dead_letter_unwrapped_records_total",
                "Rejected records too large for a dead-letter envelope, written unchanged to the dead-letter stream with their origin (shard/sequence number) as partition key.",
                &["destination"],
            ),
            misrouted_records: counter(
                "destination_misrouted_records_total",
                "Re-aggregated records that landed in another destination shard than they were built for (a stale shard map, read again at once).",
                &["destination"],
            ),
            destination_detached: gauge_vec(
                "destination_detached",
                "Source shards on which a destination is detached from the live feed and catching up on its own (0: it follows the live feed everywhere).",
                &["destination"],
            ),
            destination_lag_seconds,
            catch_up_records: counter(
                "destination_catch_up_records_total",
                "Records a detached destination's catch-up read again with GetRecords and queued for it.",
                &["destination"],
            ),
            records_expired: counter(
                "destination_records_expired_total",
                "Records that left the source's retention before a detached destination's catch-up could read them (counted when it rejoins the live feed; logged as an error).",
                &["destination"],
            ),
            catch_up_errors: counter(
                "destination_catch_up_errors_total",
                "Pages a catch-up could not hand on for an error in what GetRecords returned (reason malformed_sequence_number: a record whose sequence number is none). The catch-up never moves past it: it reads the page again after a backoff, the destination stays detached on that shard and the shard's checkpoint behind it (logged as an error, once a minute).",
                &["destination", "reason"],
            ),
            destination_records_filtered: counter(
                "destination_records_filtered_total",
                "Records (user records of aggregates, when de- or re-aggregated) the destination's group filter refused: they count as accepted by it, its position moves past them.",
                &["destination"],
            ),
            records_not_json: {
                let c = prometheus::IntCounter::with_opts(opts(
                    "records_not_json_total",
                    "Records whose data is not JSON where a group's filter asks JSON of them: they match no json condition (counted once per record).",
                ))
                .expect("valid metric");
                register(Box::new(c.clone()));
                c
            },
            destination_records_too_large: counter(
                "destination_records_too_large_total",
                "Records larger than the destination takes (its MaxRecordSizeInKiB): each goes to the group's dead-letter stream with the reason too_large_for_destination, or is held without one.",
                &["destination"],
            ),
            destination_shed: counter(
                "destination_shed_total",
                "Times a destination was shed because the memory budget ran short: it let go of everything it held (what the others were done with) and catches up from its own position.",
                &["destination"],
            ),
            credential_refresh_errors: counter(
                "credential_refresh_errors_total",
                "Failed attempts to assume a group's role (source, checkpoint, destinations[N]); the group's calls wait and try again.",
                &["group"],
            ),
            config_reloads: counter(
                "config_reloads_total",
                "Reloads of the configuration file (SIGHUP), by result: applied, unchanged, invalid (an error in the file; nothing changed), restart_required (a key only a restart changes; nothing changed), failed (the service was not running).",
                &["result"],
            ),
            lease_items_unreadable: {
                let c = prometheus::IntCounter::with_opts(opts(
                    "lease_items_unreadable_total",
                    "Lease table items that cannot be read as leases (each counted once, logged once with its key): skipped, so no worker takes or steals them.",
                ))
                .expect("valid metric");
                register(Box::new(c.clone()));
                c
            },
            checkpoint_writes: counter(
                "checkpoint_writes_total",
                "Checkpoint writes, by outcome (ok, error).",
                &["outcome"],
            ),
            oldest_unacknowledged_age_seconds,
            end_to_end_seconds,
            delivery_seconds,
            memory_limit_bytes: gauge("memory_limit_bytes", "[memory] limit: bytes the process may buffer."),
            memory_used_bytes: gauge(
                "memory_used_bytes",
                "Bytes buffered now against the buffer budget (memory_budget_bytes): source events being fanned out, queued chunks, catch-up reads.",
            ),
            memory_budget_bytes: gauge(
                "memory_budget_bytes",
                "The buffer budget memory_used_bytes counts against: [memory] limit less the process's headroom (readers wait when it is spent).",
            ),
            memory: Default::default(),
            idle: gauge(
                "idle",
                "1 when every shard is caught up, every destination accepted everything read, and nothing new arrived for idle.after.",
            ),
            build_info: gauge_vec(
                "build_info",
                "Always 1; labels carry the version and git commit.",
                &["version", "git_sha"],
            ),
            start_time_seconds,
            names: Vec::new(),
            registry,
        };
        metrics.names = names.take();
        // Series that alerts use exist from the start, at zero.
        for outcome in ["ok", "error"] {
            metrics.checkpoint_writes.with_label_values(&[outcome]);
        }
        for reason in ResubscribeReason::ALL {
            metrics.resubscribes.with_label_values(&[reason.as_str()]);
        }
        metrics.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), env!("KINESIS_FANOUT_GIT_SHA")]).set(1);
        metrics
    }

    /// Refreshes the gauges derived from acknowledgement state (called at scrape time).
    pub fn observe_progress(&self, progress: &crate::progress::Progress) {
        if let Some(memory) = self.memory.get() {
            self.memory_used_bytes.set(memory.used() as i64);
        }
        // Shards no longer read here (lease lost, shard ended elsewhere) leave no stale series.
        self.oldest_unacknowledged_age_seconds.reset();
        for shard in progress.all() {
            let age = shard
                .oldest_unacknowledged_arrival()
                .and_then(|t| t.elapsed().ok())
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.oldest_unacknowledged_age_seconds.with_label_values(&[&*shard.shard_id]).set(age);
        }
    }

    /// Names of every metric this service exports.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
