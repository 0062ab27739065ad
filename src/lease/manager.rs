//! The lease loop of one worker: every `failover_time / 3` it renews what it holds; every other
//! round (every round while it has something to take) it reads the table, notes whose counters
//! stopped moving (as seen by this worker: no clock is compared across machines), and takes free,
//! expired or stolen leases (see [`balance::choose`]). Shards come and go as [`Assignment`]s;
//! checkpoints are written through the lease, conditional on its counter.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, stream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Assignment;
use super::balance::{self, Take};
use super::table::{Lease, LeaseError, LeaseTable};

#[derive(Debug)]
pub(super) struct Held {
    pub(super) counter: u64,
    /// When this worker took the lease: snapshots taken before belong to an earlier reading.
    pub(super) since: Instant,
    /// When its reading may start: until then the previous owner's requests may still land.
    pub(super) ready: Instant,
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) held: BTreeMap<String, Held>,
    /// Per lease, the counter last seen and when it was first seen at that value.
    observed: HashMap<String, (u64, Instant)>,
    /// Per lease, the owner last seen and when this worker saw it change (`None`: not since it
    /// started).
    owners: HashMap<String, (Option<String>, Option<Instant>)>,
    /// Rounds so far (each tries free leases in an order of its own).
    rounds: u64,
    /// When the next round reads the whole table; `None`: at once.
    next_scan: Option<Instant>,
}

/// How often a worker reads the whole lease table to see free, expired and unbalanced leases,
/// while it has nothing to take: every other round. A worker that took or stole leases in its last
/// round reads it again in the next. (Renewals and checkpoints are conditional writes on the
/// leases a worker holds; they need no read.)
pub fn scan_interval(failover: Duration) -> Duration {
    2 * (failover / 3)
}

/// A share in `[0, 0.1)` of a renewal period, of `me`'s own for round `n`: the same on every run
/// (a simulated fleet replays from its seed), different per worker and round.
fn round_jitter(me: &str, n: u64) -> f64 {
    let draw = super::balance::order(me, n, "round");
    (draw >> 11) as f64 / (1u64 << 53) as f64 / 10.0
}

/// One worker's side of the lease table.
pub struct LeaseManager {
    pub(super) table: LeaseTable,
    pub(super) me: String,
    pub(super) failover: Duration,
    /// Serialises this worker's writes: renewals and checkpoints of one lease must not race on
    /// its counter.
    pub(super) state: tokio::sync::Mutex<State>,
    events: mpsc::UnboundedSender<Assignment>,
    /// This worker's share of the source's active shards, for fleet-wide rate limits.
    share: watch::Sender<f64>,
    /// When the table last confirmed each hold, outside `state` so that the watchdog can read it
    /// while a slow round holds the state lock.
    confirmed: std::sync::Mutex<BTreeMap<String, Instant>>,
    /// Holds the watchdog gave up on; the next round forgets them.
    revoked: std::sync::Mutex<BTreeSet<String>>,
    /// Set when the worker stops reading: it keeps renewing what it holds through the drain, and
    /// takes nothing more (what it took it could not read, and others could).
    draining: std::sync::atomic::AtomicBool,
    /// The table as of the last scan, and when: shard syncs read it instead of scanning again.
    pub(super) view: std::sync::Mutex<Option<(Instant, Arc<Vec<Lease>>)>>,
    /// The shards the stream listed at the last sync: a parent without a lease that is no longer
    /// listed has aged out, and holds its children back no more.
    pub(super) listed: std::sync::Mutex<Option<Arc<HashSet<String>>>>,
}

impl LeaseManager {
    pub fn new(
        table: LeaseTable,
        me: String,
        failover: Duration,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Assignment>, watch::Receiver<f64>) {
        let (events, receiver) = mpsc::unbounded_channel();
        let (share, share_rx) = watch::channel(0.0);
        let manager = LeaseManager {
            table,
            me,
            failover,
            state: Default::default(),
            events,
            share,
            confirmed: Default::default(),
            revoked: Default::default(),
            draining: Default::default(),
            view: Default::default(),
            listed: Default::default(),
        };
        (Arc::new(manager), receiver, share_rx)
    }

    pub fn renew_interval(&self) -> Duration {
        self.failover / 3
    }

    /// Runs rounds, and the watchdog beside them, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let rounds = async {
            for n in 0u64.. {
                // Rounds start a renewal period apart, however long the last one took, less a
                // jitter of up to a tenth of it, of this worker's own for each round. Rounds in step
                // with another worker's would otherwise stay in step for good: a steal that loses
                // the race to its victim's renewal (the scan read a counter the renewal then moved)
                // would lose it every round, and the fleet never balance.
                let started = Instant::now();
                self.round().await;
                let jitter = self.renew_interval().mul_f64(round_jitter(&self.me, n));
                tokio::time::sleep_until(started + self.renew_interval() - jitter).await;
            }
        };
        let watchdog = async {
            loop {
                tokio::time::sleep(self.renew_interval() / 4).await;
                self.revoke_unconfirmed();
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => {}
            _ = rounds => {}
            _ = watchdog => {}
        }
    }

    /// A hold the table has not confirmed for most of a failover period may soon be someone
    /// else's: stop its shard before they could start, even while a round is stuck on the table.
    fn revoke_unconfirmed(&self) {
        let confirmed = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        let mut revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        for (shard, at) in confirmed.iter() {
            if at.elapsed() + self.renew_interval() > self.failover && revoked.insert(shard.clone()) {
                tracing::warn!(shard = %shard, worker = %self.me, "The lease table has not confirmed this lease in time; stopping the shard.");
                let _ = self.events.send(Assignment::Lost { shard: shard.clone() });
            }
        }
    }

    pub(super) fn confirm(&self, shard: &str, at: Instant) {
        if !self.revoked.lock().unwrap_or_else(|p| p.into_inner()).contains(shard) {
            self.confirmed.lock().unwrap_or_else(|p| p.into_inner()).insert(shard.to_string(), at);
        }
    }

    /// Nothing more to confirm for this shard: it is no longer held.
    pub(super) fn unconfirm(&self, shard: &str) {
        self.confirmed.lock().unwrap_or_else(|p| p.into_inner()).remove(shard);
    }

    pub(super) fn lose(&self, state: &mut State, shard: &str, why: &str) {
        self.unconfirm(shard);
        let already_told = self.revoked.lock().unwrap_or_else(|p| p.into_inner()).remove(shard);
        if state.held.remove(shard).is_some() && !already_told {
            tracing::warn!(shard, worker = %self.me, reason = why, "Lease lost; stopping the shard.");
            let _ = self.events.send(Assignment::Lost { shard: shard.to_string() });
        }
    }

    /// Whether the table confirmed the hold of `shard` recently enough, by this worker's own
    /// monotonic clock, that no other worker can have taken it: less than a failover time less a
    /// renewal period ago (the watchdog's line). Another worker takes a lease only after seeing
    /// its counter unchanged for a whole failover time, and reads it only a settle time later;
    /// a request started before the line lands within its attempt timeout, the settle time. A
    /// process paused past the line sends nothing when it wakes until the table confirms the hold
    /// again (or the watchdog gives it up).
    fn proves(&self, shard: &str) -> bool {
        if self.revoked.lock().unwrap_or_else(|p| p.into_inner()).contains(shard) {
            return false;
        }
        let confirmed = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        confirmed.get(shard).is_some_and(|at| at.elapsed() + self.renew_interval() <= self.failover)
    }

    /// How long a taken lease waits before its shard is read. A lease given up gracefully was
    /// drained first: no wait. One that expired or was stolen may still have PutRecords of its
    /// previous owner in flight (the owner drops its queue as soon as it learns, but a request
    /// sent lands within its attempt timeout, [`super::settle_time`]); a stolen one also gives its
    /// owner a failover time to learn. (Its next renewal tells it, unless that renewal fails, say
    /// throttled: then its watchdog stops the shard once the lease has gone unconfirmed for a
    /// failover time less a renewal period. Found by the fleet simulation, which read a stolen
    /// shard twice at once when the delay was one and a half renewal periods.)
    fn takeover_delay(&self, stolen: bool, had_owner: bool) -> Duration {
        let settle = super::settle_time(self.failover);
        match (stolen, had_owner) {
            (true, _) => self.failover + settle,
            (false, true) => settle,
            (false, false) => Duration::ZERO,
        }
    }

    /// Stops taking leases: the worker is draining what it read before it stops.
    pub fn drain(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// One round: renew, scan, take (take nothing while draining).
    pub async fn round(&self) {
        let mut state = self.state.lock().await;
        self.revoke_unconfirmed();
        let revoked: Vec<String> = self.revoked.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        for shard in revoked {
            self.lose(&mut state, &shard, "the lease table could not confirm it in time");
        }
        // Renewed side by side (at most 32 at once): one after another, a worker holding many
        // leases would take longer than the steal delay to prove the last of them. A lease whose
        // checkpoint was written in the last half renewal period needs no renewal: that write
        // moved its counter and proved the hold.
        let recent = self.renew_interval() / 2;
        let held: Vec<(String, u64)> = {
            let confirmed = self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
            state
                .held
                .iter()
                .filter(|(k, _)| confirmed.get(*k).is_none_or(|at| at.elapsed() >= recent))
                .map(|(k, h)| (k.clone(), h.counter))
                .collect()
        };
        let renewals: Vec<_> = stream::iter(held)
            .map(|(shard, counter)| async move {
                let attempt = Instant::now();
                let renewed = self.table.renew(&shard, counter, &self.me).await;
                (shard, counter, attempt, renewed)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for (shard, counter, attempt, renewed) in renewals {
            match renewed {
                Ok(next) => {
                    if let Some(h) = state.held.get_mut(&shard).filter(|h| h.counter == counter) {
                        h.counter = next;
                        self.confirm(&shard, attempt);
                    }
                }
                Err(LeaseError::Lost { .. }) => self.lose(&mut state, &shard, "renewal found another owner"),
                Err(err) => tracing::warn!(shard, error = %err, "Lease renewal failed; will retry."),
            }
        }
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        state.rounds += 1;
        if state.next_scan.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let leases = match self.table.scan_eventually().await {
            Ok(leases) => leases,
            Err(err) => {
                tracing::warn!(error = %err, "Cannot read the lease table; keeping current leases.");
                return;
            }
        };
        let now = Instant::now();
        for lease in &leases {
            match state.observed.get_mut(&lease.key) {
                Some(seen) if seen.0 == lease.counter => {}
                Some(seen) => *seen = (lease.counter, now),
                None => {
                    state.observed.insert(lease.key.clone(), (lease.counter, now));
                }
            }
            match state.owners.get_mut(&lease.key) {
                Some(seen) if seen.0 == lease.owner => {}
                Some(seen) => *seen = (lease.owner.clone(), Some(now)),
                None => {
                    state.owners.insert(lease.key.clone(), (lease.owner.clone(), None));
                }
            }
        }
        // A lease that changed hands less than a steal's wait ago may not be read yet by its new
        // owner: stealing it would only restart that wait.
        let settle = self.takeover_delay(true, true);
        let settling: HashSet<String> = state
            .owners
            .iter()
            .filter(|(_, (_, changed))| changed.is_some_and(|at| at.elapsed() < settle))
            .map(|(k, _)| k.clone())
            .collect();
        // Expired: the owner's counter has not moved for a failover time. Leases the table says
        // are ours but this worker dropped (say, after losing the table for a while) are taken back
        // like expired ones.
        let expired: HashSet<String> = leases
            .iter()
            .filter(|l| l.owner.is_some())
            .filter(|l| {
                state.observed.get(&l.key).is_some_and(|(_, since)| since.elapsed() > self.failover)
                    || (l.owner.as_deref() == Some(self.me.as_str()) && !state.held.contains_key(&l.key))
            })
            .map(|l| l.key.clone())
            .collect();
        let listed = self.listed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let takes = balance::choose(&leases, &self.me, &expired, &settling, state.rounds, listed.as_deref());
        // A worker with something to take looks again next round; one without, after a while.
        state.next_scan =
            if takes.is_empty() { Some(now + scan_interval(self.failover) - self.renew_interval() / 2) } else { None };
        let wanted: Vec<(Lease, bool)> = {
            let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.key.as_str(), l)).collect();
            takes
                .into_iter()
                .filter_map(|take| {
                    let (key, stolen) = match take {
                        Take::Free(k) => (k, false),
                        Take::Steal(k) => (k, true),
                    };
                    by_key.get(key.as_str()).map(|l| ((*l).clone(), stolen))
                })
                .collect()
        };
        let attempts: Vec<(Lease, bool, Instant, Result<u64, LeaseError>)> = stream::iter(wanted)
            .map(|(lease, stolen)| async move {
                // The hold is confirmed as of before the request: another worker may time the new
                // counter from the moment it lands, and the proof must not outlast its line.
                let attempt = Instant::now();
                let taken = self.table.take(&lease.key, lease.counter, &self.me).await;
                (lease, stolen, attempt, taken)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for (lease, stolen, attempt, taken) in attempts {
            let key = lease.key.clone();
            match taken {
                Ok(next) => {
                    tracing::info!(shard = %key, worker = %self.me, previous_owner = ?lease.owner, stolen, "Lease taken.");
                    let delay = self.takeover_delay(stolen, lease.owner.is_some());
                    let since = Instant::now();
                    state.held.insert(key.clone(), Held { counter: next, since, ready: since + delay });
                    self.confirm(&key, attempt);
                    state.observed.insert(key.clone(), (next, since));
                    let _ = self.events.send(Assignment::Acquired {
                        shard: key,
                        position: lease.checkpoint.clone(),
                        delay,
                        destinations: lease.destination_checkpoints.clone(),
                    });
                }
                Err(LeaseError::Lost { .. }) => tracing::debug!(shard = %key, "Another worker took the lease first."),
                Err(err) => tracing::warn!(shard = %key, error = %err, "Taking a lease failed."),
            }
        }
        let leases = self.clean_up(leases).await;
        let active = balance::active_in(&leases, listed.as_deref()).len().max(1);
        let share = (state.held.len() as f64 / active as f64).clamp(1.0 / active as f64, 1.0);
        self.share.send_if_modified(|s| std::mem::replace(s, share) != share);
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, Arc::new(leases)));
    }

    /// Shards held now.
    pub async fn held(&self) -> Vec<String> {
        self.state.lock().await.held.keys().cloned().collect()
    }

    /// Gives every held lease up (graceful shutdown), so other workers take them at once. Two
    /// kinds expire instead, because whoever took them next would read at once while requests
    /// may still land: a lease still waiting out its previous owner's requests (taken from a dead
    /// or robbed worker moments ago, not read yet), and the leases of `unsettled` shards (their
    /// records may still be on the wire: the grace period ran out before every destination
    /// accepted them, or a request was given up before its answer).
    pub async fn release_all_except(&self, unsettled: &BTreeSet<String>) {
        let mut state = self.state.lock().await;
        let held: Vec<(String, u64, Instant)> =
            state.held.iter().map(|(k, h)| (k.clone(), h.counter, h.ready)).collect();
        for (shard, counter, ready) in held {
            if ready > Instant::now() {
                tracing::info!(shard, worker = %self.me, "Lease left to expire: its previous owner's requests may still land.");
            } else if unsettled.contains(&shard) {
                tracing::info!(shard, worker = %self.me, "Lease left to expire: records of it were still being sent when the grace period ran out.");
            } else {
                match self.table.release(&shard, counter, &self.me).await {
                    Ok(()) => tracing::info!(shard, worker = %self.me, "Lease released."),
                    Err(err) => {
                        tracing::warn!(shard, error = %err, "Releasing a lease failed; it will expire instead.")
                    }
                }
            }
            state.held.remove(&shard);
            self.unconfirm(&shard);
        }
    }
}

impl crate::progress::LeaseProof for LeaseManager {
    fn proven(&self, shard: &str) -> bool {
        self.proves(shard)
    }
}
