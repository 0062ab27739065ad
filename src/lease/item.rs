//! A lease item as DynamoDB holds it (the Kinesis Client Library's attribute names), read into a
//! [`Lease`] or refused with why: never a panic on what another tool or a corrupt write left.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

use super::table::{Lease, LeaseError, Position};
use crate::record::SequenceNumber;

pub(super) type Item = HashMap<String, AttributeValue>;

/// One item as a lease.
pub(super) fn parse(table: &str, item: &Item) -> Result<Lease, LeaseError> {
    let malformed = |reason: String| LeaseError::Malformed { table: table.to_string(), reason };
    let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
    let number = |name: &str| -> Result<u64, LeaseError> {
        match item.get(name) {
            None => Ok(0),
            Some(v) => v
                .as_n()
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| malformed(format!("{name} is not a whole number"))),
        }
    };
    let set = |name: &str| -> Vec<String> {
        match item.get(name) {
            Some(AttributeValue::Ss(v)) => v.clone(),
            Some(AttributeValue::S(v)) => vec![v.clone()],
            _ => Vec::new(),
        }
    };
    let key = text("leaseKey").ok_or_else(|| malformed("an item has no leaseKey".into()))?;
    // Every lease has a counter and a checkpoint from its creation on: a row without them is
    // someone else's, never a free lease to take.
    if !item.contains_key("leaseCounter") {
        return Err(malformed(format!("lease {key}: no leaseCounter (not a lease)")));
    }
    let checkpoint = match text("checkpoint") {
        Some(cp) => Position::parse(&cp).map_err(|e| malformed(format!("lease {key}: checkpoint {e}")))?,
        None => return Err(malformed(format!("lease {key}: no checkpoint (not a lease)"))),
    };
    Ok(Lease {
        owner: text("leaseOwner").filter(|o| !o.is_empty()),
        counter: number("leaseCounter")?,
        checkpoint,
        owner_switches: number("ownerSwitchesSinceCheckpoint")?,
        parents: set("parentShardId"),
        children: set("childShardIds"),
        starting_hash_key: text("startingHashKey"),
        ending_hash_key: text("endingHashKey"),
        // An entry that does not parse is left out: that destination resumes from the shard's
        // checkpoint, which is never ahead of it.
        destination_checkpoints: item
            .get("destinationCheckpoints")
            .and_then(|v| v.as_m().ok())
            .map(|m| {
                m.iter()
                    .filter_map(|(arn, v)| Some((arn.clone(), SequenceNumber::parse(v.as_s().ok()?).ok()?)))
                    .collect()
            })
            .unwrap_or_default(),
        key,
    })
}

/// A row of another kind than a lease: one with an `entityType` that does not say lease.
pub(super) fn other_kind(item: &Item) -> bool {
    item.get("entityType").is_some_and(|v| v.as_s().map_or(true, |kind| !kind.eq_ignore_ascii_case("lease")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::table::next_counter;
    use proptest::prelude::*;

    fn s(v: impl Into<String>) -> AttributeValue {
        AttributeValue::S(v.into())
    }

    /// Any attribute value DynamoDB can hold, numbers at and past their extremes included.
    fn attribute() -> impl Strategy<Value = AttributeValue> {
        let number = prop_oneof![
            Just("18446744073709551615".to_string()),
            Just("18446744073709551616".to_string()),
            Just("-1".to_string()),
            Just("1e400".to_string()),
            Just("0.5".to_string()),
            ".{0,24}",
        ];
        let leaf = prop_oneof![
            ".{0,40}".prop_map(AttributeValue::S),
            number.prop_map(AttributeValue::N),
            proptest::collection::vec(".{0,12}", 0..4).prop_map(AttributeValue::Ss),
            proptest::collection::vec("[0-9]{0,25}", 0..3).prop_map(AttributeValue::Ns),
            any::<bool>().prop_map(AttributeValue::Bool),
            Just(AttributeValue::Null(true)),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(|b| AttributeValue::B(b.into())),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(AttributeValue::L),
                proptest::collection::hash_map(".{0,8}", inner, 0..4).prop_map(AttributeValue::M),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_items_never_panic(key in ".{0,20}", counter in ".{0,20}", checkpoint in ".{0,30}") {
            let mut item = Item::new();
            item.insert("leaseKey".into(), s(key));
            item.insert("leaseCounter".into(), AttributeValue::N(counter));
            item.insert("checkpoint".into(), s(checkpoint));
            let _ = parse("t", &item);
        }

        #[test]
        fn items_of_any_shape_parse_or_are_refused_without_a_panic(
            values in proptest::collection::vec(attribute(), 12),
            extra in proptest::collection::hash_map(".{0,12}", attribute(), 0..3),
        ) {
            let names = [
                "leaseKey", "leaseCounter", "leaseOwner", "checkpoint", "checkpointSubSequenceNumber",
                "ownerSwitchesSinceCheckpoint", "parentShardId", "childShardIds", "destinationCheckpoints",
                "hashKeyRange", "entityType", "pendingCheckpoint",
            ];
            let mut item: Item = extra;
            item.extend(names.iter().map(|n| n.to_string()).zip(values));
            if let Ok(lease) = parse("t", &item) {
                let _ = next_counter("t", &lease.key, lease.counter);
            }
        }
    }
}
