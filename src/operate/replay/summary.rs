//! What a replay did, per destination, and how it reads on a terminal.

use std::collections::BTreeMap;

use serde::Serialize;

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub replayed: u64,
    pub rejected_again: u64,
    /// Filtered out by `--destination`.
    pub skipped: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// Dead-letter records read.
    pub read: u64,
    pub destinations: BTreeMap<String, Counts>,
    /// Records that are not envelopes, or name no destination there is: `shard/sequence: why`.
    pub unreadable: Vec<String>,
    /// Records refused again: `shard/sequence -> destination: code: message`.
    pub refused: Vec<String>,
}

impl Summary {
    /// One line of progress: what was read, replayed, refused and unreadable so far.
    pub fn progress_line(&self) -> String {
        let replayed: u64 = self.destinations.values().map(|c| c.replayed).sum();
        format!(
            "{} read, {replayed} replayed, {} refused again, {} unreadable",
            self.read,
            self.refused.len(),
            self.unreadable.len()
        )
    }

    /// The summary as text: per destination, then every refused and unreadable record.
    pub fn render(&self, stream: &str, dry_run: bool) -> String {
        use std::fmt::Write;
        let verb = if dry_run { "would replay" } else { "replayed" };
        let mut out = format!("{} dead-letter records read from {stream}\n", self.read);
        for (destination, counts) in &self.destinations {
            let _ = writeln!(
                out,
                "  {destination}: {verb} {}, refused again {}, skipped (filtered) {}",
                counts.replayed, counts.rejected_again, counts.skipped
            );
        }
        for line in &self.refused {
            let _ = writeln!(out, "  refused again: {line}");
        }
        for line in &self.unreadable {
            let _ = writeln!(out, "  unreadable: {line}");
        }
        out
    }
}
