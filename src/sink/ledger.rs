//! One destination's acknowledgement ledger: which chunks it still owes records of, and the budget
//! each holds. A chunk is done here when its last record was accepted or dead-lettered; then its
//! budget returns to the source and the chunk is acknowledged once (see `progress`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::fanout::Share;
use crate::metrics::Metrics;
use crate::progress::Chunk;

/// What this destination still owes a chunk.
struct Ticket {
    remaining: usize,
    chunk: Arc<Chunk>,
    /// Returned to the source's budget for this destination when the ticket goes.
    _permit: Share,
}

pub struct Ledger {
    /// The destination's id, as chunks know it.
    id: Arc<str>,
    tickets: HashMap<u64, Ticket>,
    /// Bytes of the entries still owed (the `destination_buffered_bytes` gauge).
    buffered_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Ledger {
    pub fn new(id: Arc<str>, metrics: Arc<Metrics>) -> Self {
        Ledger { id, tickets: HashMap::new(), buffered_bytes: 0, metrics }
    }

    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// `entries` entries of `bytes` bytes were queued for `chunk`.
    pub fn open(&mut self, chunk: Arc<Chunk>, permit: Share, entries: usize, bytes: usize) {
        self.buffered_bytes += bytes;
        if entries == 0 {
            // Only empty aggregates: nothing to write, nothing owed.
            self.complete(&chunk);
            return;
        }
        self.tickets.insert(chunk.id, Ticket { remaining: entries, chunk, _permit: permit });
    }

    /// One entry of a chunk, of `size` bytes, is done here (accepted or dead-lettered).
    pub fn done(&mut self, chunk_id: u64, size: usize) {
        self.buffered_bytes = self.buffered_bytes.saturating_sub(size);
        let finished = match self.tickets.get_mut(&chunk_id) {
            Some(ticket) => {
                ticket.remaining -= 1;
                ticket.remaining == 0
            }
            None => false,
        };
        if finished && let Some(ticket) = self.tickets.remove(&chunk_id) {
            self.complete(&ticket.chunk);
        }
    }

    fn complete(&self, chunk: &Chunk) {
        if !chunk.acknowledge(&self.id) {
            return;
        }
        self.metrics.delivery_seconds.observe(chunk.read_at.elapsed().as_secs_f64());
        if let Some(age) = chunk.records.first().and_then(|r| r.arrival).and_then(|a| a.elapsed().ok()) {
            self.metrics.end_to_end_seconds.observe(age.as_secs_f64());
        }
    }

    /// The destination is gone: it owes nothing any more (and no latency is sampled for records
    /// it never got).
    pub fn release_all(&mut self) {
        for (_, ticket) in self.tickets.drain() {
            ticket.chunk.acknowledge(&self.id);
        }
        self.buffered_bytes = 0;
    }

    /// Forgets the chunks this destination no longer owes (their reading's lease was lost, or
    /// it was shed from them; `bytes` of their entries were still queued): their budgets go back
    /// to the source, and nothing is acknowledged for them.
    pub fn forget_released(&mut self, bytes: usize) {
        let id = Arc::clone(&self.id);
        self.tickets.retain(|_, t| t.chunk.owed_by(&id));
        self.buffered_bytes = self.buffered_bytes.saturating_sub(bytes);
    }
}
