//! Relief for a memory budget that runs short: rather than stop the readers for everyone, the
//! destination the others left furthest behind is shed (see `progress::shed`).
//!
//! Chosen is the destination holding the most memory that another destination is already done
//! with (its live chunks another destination acknowledged), among those that may be detached
//! (`detach_after` is not `off`) and are not backfilling there, and only when that is at least a
//! quarter of what is buffered: when every destination is as far behind as the others (a backlog drained by healthy
//! destinations), shedding would help nobody, and the readers wait instead.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{CatchUpStarter, DestinationHandle, DestinationSet};
use crate::metrics::Metrics;
use crate::progress::Progress;
use crate::progress::Shed;

/// At most one destination is shed this often: what a shed destination gives back takes a
/// moment to come back (its writer drops its entries at its next turn).
const AT_MOST_EVERY: Duration = Duration::from_secs(1);
/// A destination is shed only when it alone holds at least this share of what is buffered.
const SHARE_DIVISOR: usize = 4;

/// Sheds destinations when the memory budget runs short.
#[derive(Debug)]
pub struct Relief {
    pub destinations: watch::Receiver<DestinationSet>,
    pub progress: Arc<Progress>,
    pub catch_up: Arc<dyn CatchUpStarter>,
    pub metrics: Arc<Metrics>,
    /// When a destination was last shed.
    last: Mutex<Option<Instant>>,
}

impl Relief {
    pub fn new(
        destinations: watch::Receiver<DestinationSet>,
        progress: Arc<Progress>,
        catch_up: Arc<dyn CatchUpStarter>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Relief { destinations, progress, catch_up, metrics, last: Mutex::new(None) }
    }

    /// Readers wait for memory, `used` bytes of it are buffered: sheds the destination the others
    /// left furthest behind, if one holds enough to matter. Returns its name.
    pub fn relieve(&self, used: u64) -> Option<Arc<str>> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| at.elapsed() < AT_MOST_EVERY) {
            return None;
        }
        let mut held = BTreeMap::new();
        let shards = self.progress.all();
        for shard in &shards {
            shard.lagging(&mut held);
        }
        let used = usize::try_from(used).unwrap_or(usize::MAX);
        let set = self.destinations.borrow().clone();
        let mut candidates: Vec<(&DestinationHandle, usize)> = set
            .iter()
            .filter(|d| d.detach_after.is_some())
            .map(|d| (d, held.get(&d.id).copied().unwrap_or(0)))
            .filter(|(_, bytes)| *bytes > 0 && bytes.saturating_mul(SHARE_DIVISOR) >= used)
            .collect();
        candidates.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
        // The first one that lets go of something (what it held may have been written meanwhile).
        for (destination, bytes) in candidates {
            let mut released = false;
            for shard in &shards {
                match shard.shed(&destination.id) {
                    Shed::Nothing => {}
                    Shed::Restarted => released = true,
                    Shed::CatchUpFrom(start) => {
                        released = true;
                        self.catch_up.start(Arc::clone(shard), destination.clone(), start);
                    }
                }
            }
            if !released {
                continue;
            }
            *last = Some(Instant::now());
            destination.notify_shed();
            self.metrics.destination_shed.with_label_values(&[&*destination.name]).inc();
            tracing::warn!(
                destination = %destination.name,
                held_bytes = bytes,
                buffered_bytes = used,
                "Memory budget ran short: the destination the others left furthest behind lets go of what it holds, and catches up on its own from its own position."
            );
            return Some(Arc::clone(&destination.name));
        }
        None
    }
}
