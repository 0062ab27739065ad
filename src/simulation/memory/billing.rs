//! What DynamoDB charges: an item's size as it counts it, and the write units of a write.

use crate::lease::table::{Lease, Position};

/// DynamoDB's size of a lease item: attribute names plus values (numbers about half their digits).
pub fn item_bytes(lease: &Lease) -> usize {
    let number = |n: u64| 1 + n.to_string().len().div_ceil(2);
    let set = |name: &str, values: &[String]| {
        if values.is_empty() { 0 } else { name.len() + values.iter().map(|v| v.len()).sum::<usize>() }
    };
    let text = |name: &str, value: Option<&String>| value.map_or(0, |v| name.len() + v.len());
    "leaseKey".len()
        + lease.key.len()
        + text("leaseOwner", lease.owner.as_ref())
        + "leaseCounter".len()
        + number(lease.counter)
        + "checkpoint".len()
        + checkpoint_len(&lease.checkpoint)
        + "checkpointSubSequenceNumber".len()
        + 2
        + "ownerSwitchesSinceCheckpoint".len()
        + number(lease.owner_switches)
        + set("parentShardId", &lease.parents)
        + set("childShardIds", &lease.children)
        + text("startingHashKey", lease.starting_hash_key.as_ref())
        + text("endingHashKey", lease.ending_hash_key.as_ref())
        + if lease.destination_checkpoints.is_empty() {
            0
        } else {
            "destinationCheckpoints".len()
                + lease.destination_checkpoints.iter().map(|(k, v)| k.len() + v.as_str().len() + 3).sum::<usize>()
        }
}

/// How long the checkpoint is as text (without writing it out).
pub(super) fn checkpoint_len(position: &Position) -> usize {
    match position {
        Position::Sequence(seq) => seq.as_str().len(),
        Position::At(seq) => seq.as_str().len() + 3,
        _ => 12,
    }
}

pub(super) fn write_units(bytes: usize) -> f64 {
    bytes.div_ceil(1024).max(1) as f64
}
