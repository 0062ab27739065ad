//! A reloaded configuration, applied to the destinations while records flow (SIGHUP).
//!
//! The source is not touched: its subscriptions, and every record read, go on. The supervisor
//! takes the new groups, runs a discovery round at once, and then:
//! - a destination no group selects any more is removed, as discovery removes a deleted stream;
//! - a stream a group now selects starts as any destination discovered while running does, at
//!   its group's `start_position`;
//! - a destination that stays follows its (possibly other) group's settings and filter from the
//!   next record its writer takes: rates, backoff, linger, dead-letter stream, KPL mode, filter,
//!   `detach_after`, and `ordering` from its next request. Its byte budget
//!   (`max_in_flight_bytes`) is the one it started with.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{PlaceClients, Supervisor, dead_letter_limits};
use crate::config::{AwsSettings, Settings};
use crate::discovery::Discovery;
use crate::record::StreamLimits;
use crate::sink::Assignment;

/// Builds the clients of a place (region, endpoint, role) no running group used.
pub trait MakePlace: Send + Sync {
    /// `group`: the configuration key that first names the place, for credential errors.
    fn make<'a>(
        &'a self,
        aws: &'a AwsSettings,
        group: String,
    ) -> Pin<Box<dyn Future<Output = PlaceClients> + Send + 'a>>;
}

/// A new configuration to apply, and who waits for the outcome.
pub struct Reload {
    pub settings: Arc<Settings>,
    pub done: oneshot::Sender<ReloadReport>,
}

/// What a reload changed, by destination label.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Destinations started.
    pub added: Vec<String>,
    /// Destinations removed.
    pub removed: Vec<String>,
    /// Destinations written to before and after.
    pub kept: Vec<String>,
}

impl Supervisor {
    /// What a destination of `group` in `place` follows under the current configuration.
    pub(super) async fn assignment(&self, place: usize, group: usize) -> Assignment {
        let settings = Arc::new(self.settings.destinations[group].clone());
        let dead_letter_limits = match &settings.dead_letter_stream {
            Some(stream) => dead_letter_limits(&self.places[place].control, stream).await,
            None => StreamLimits::default(),
        };
        Assignment { group: settings, index: group, filters: self.filters.clone(), dead_letter_limits }
    }

    /// A running destination follows the current configuration's `group`.
    pub(super) async fn reassign(&mut self, id: &str, group: usize) {
        let Some(place) = self.running.get(id).map(|r| r.place) else { return };
        let assignment = self.assignment(place, group).await;
        let generation = self.generation;
        let Some(running) = self.running.get_mut(id) else { return };
        running.handle.detach_after = assignment.group.detach_after;
        running.generation = generation;
        let budget = running.assignment.borrow().group.max_in_flight_bytes;
        if budget != assignment.group.max_in_flight_bytes {
            tracing::warn!(destination = %running.handle.name, max_in_flight_bytes = budget, "A destination keeps the byte budget it started with; the reloaded max_in_flight_bytes applies to destinations that start from now on.");
        }
        running.assignment.send_replace(assignment);
        self.publish_set();
    }

    /// Destinations the reload's discovery round did not reach (a place that could not be listed,
    /// a describe that failed): each follows the group its name selects now, and one no group
    /// could select by its name goes. One whose group needs tags waits for the next round.
    async fn settle_stragglers(&mut self) {
        let stale: Vec<(Arc<str>, usize, String)> = self
            .running
            .iter()
            .filter(|(_, r)| r.generation != self.generation && r.place != usize::MAX)
            .map(|(id, r)| (Arc::clone(id), r.place, r.stream.clone()))
            .collect();
        let places = self.settings.destination_places();
        for (id, place, stream) in stale {
            let aws = &places[place];
            match crate::discovery::explain(&self.settings, aws, &stream, None) {
                crate::discovery::Verdict::Destination(group) => self.reassign(&id, group).await,
                crate::discovery::Verdict::Not(why) if !self.settings.needs_tags(aws, &stream) => {
                    tracing::info!(destination = %stream, why, "Not a destination under the reloaded configuration.");
                    self.remove(&id, "no group of the reloaded configuration selects it");
                }
                crate::discovery::Verdict::Not(_) => {
                    tracing::warn!(destination = %stream, "Its group needs its tags, which the reload's discovery round could not read; it follows its old group until a round reads them.")
                }
            }
        }
    }

    /// Applies a new configuration's groups: new places get clients, destinations of places
    /// no group names any more go, and a discovery round at once starts, removes and reassigns
    /// the rest. Returns the discovery to follow from now on.
    pub(super) async fn reload(&mut self, reload: Reload) -> Discovery {
        let Reload { settings, done } = reload;
        let before: BTreeSet<String> = self.current().into_iter().collect();
        let known = self.settings.destination_places();
        let places = settings.destination_places();
        let mut clients = Vec::with_capacity(places.len());
        for aws in &places {
            match known.iter().position(|k| k == aws) {
                Some(known) => clients.push(self.places[known].clone()),
                None => {
                    let maker = self.make_place.clone().expect("reloads come with a place maker");
                    clients.push(maker.make(aws, settings.place_label(aws)).await);
                }
            }
        }
        // Places keep their clients; their index may move. A destination whose place no group
        // names any more is out of every place's view for the round: if a group of another place
        // selects its stream (a changed role or endpoint), it is kept and re-pointed; else it goes
        // after the round.
        let mut homeless: Vec<Arc<str>> = Vec::new();
        for (id, running) in self.running.iter_mut() {
            let aws = &known[running.place];
            match places.iter().position(|p| p == aws) {
                Some(index) => running.place = index,
                None => {
                    running.place = usize::MAX;
                    homeless.push(Arc::clone(id));
                }
            }
        }
        self.filters = crate::fanout::filter::Filters::new(&settings).map(Arc::new);
        self.settings = Arc::clone(&settings);
        self.places = clients;
        self.generation += 1;
        let discovery = Discovery::new(settings, self.places.iter().map(|p| p.control.clone()).collect());
        self.follow(&discovery).await;
        for id in homeless {
            if self.running.get(&id).is_some_and(|r| r.place == usize::MAX) {
                self.remove(&id, "no group of the reloaded configuration selects it");
            }
        }
        self.settle_stragglers().await;
        let after: BTreeSet<String> = self.current().into_iter().collect();
        let report = ReloadReport {
            added: after.difference(&before).cloned().collect(),
            removed: before.difference(&after).cloned().collect(),
            kept: before.intersection(&after).cloned().collect(),
        };
        tracing::info!(added = ?report.added, removed = ?report.removed, kept = report.kept.len(), "Reloaded configuration applied to the destinations.");
        let _ = done.send(report);
        discovery
    }
}
