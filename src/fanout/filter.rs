//! Routing: which records a destination group takes (`destinations[].filter`). Every condition a
//! group gives must hold; a group without a filter takes every record. Each record of a chunk is
//! judged once for every group, by the first destination that asks (a JSON record is parsed once,
//! not once per destination), and the verdicts travel with the chunk ([`crate::record::Routes`]).
//!
//! A record a group's filter refuses counts as accepted by that group's destinations: their
//! positions move on past it, nothing waits for it.

use crate::config::{Filter, JsonMatch, KplMode, Settings};
use crate::kpl::UserRecord;
use crate::record::{Routes, SourceRecord};

/// At most this many groups may have a filter (a record's verdicts are one bit per group).
pub const MAX_FILTERED_GROUPS: usize = 64;

/// Every group's filter, by group index.
#[derive(Debug, Clone)]
pub struct Filters {
    groups: Vec<(Option<Filter>, KplMode)>,
    json: bool,
    /// Told apart from every other configuration's filters, for the verdicts a chunk carries.
    id: u64,
}

/// What a record's data is, read once whatever the number of groups asking.
enum Data {
    Unread,
    Json(serde_json::Value),
    NotJson,
}

impl Filters {
    /// `None` when no group has a filter: every group takes every record.
    pub fn new(settings: &Settings) -> Option<Filters> {
        let groups: Vec<(Option<Filter>, KplMode)> =
            settings.destinations.iter().map(|g| (g.filter.clone(), g.kpl)).collect();
        if groups.iter().all(|(f, _)| f.is_none()) {
            return None;
        }
        let json = groups.iter().any(|(f, _)| f.as_ref().is_some_and(|f| !f.json.is_empty()));
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Some(Filters { groups, json, id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) })
    }

    /// Which filters these are: verdicts a chunk carries are this one's when their `by` says so.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether group `group` takes what `verdicts` says of a record.
    pub fn takes(verdicts: u64, group: usize) -> bool {
        group >= MAX_FILTERED_GROUPS || verdicts & (1 << group) != 0
    }

    /// The verdicts of every group on every record of a chunk. A group that passes aggregates
    /// through whole judges the aggregate by its partition key; the others judge each user record.
    /// Returns them, and how many records were not JSON where a group asked for JSON.
    pub fn route(&self, records: &[SourceRecord]) -> (Routes, u64) {
        let mut routes = Routes { by: self.id, records: Vec::with_capacity(records.len()), users: Vec::new() };
        let mut not_json = 0;
        for record in records {
            let mut data = Data::Unread;
            let whole = self.verdicts(&record.partition_key, &record.data, &mut data, |mode| {
                record.user_records.is_none() || mode == KplMode::Passthrough
            });
            not_json += u64::from(matches!(data, Data::NotJson));
            routes.records.push(whole);
            let users: Vec<u64> = record
                .user_records
                .iter()
                .flat_map(|users| users.iter())
                .map(|user: &UserRecord| {
                    let mut data = Data::Unread;
                    let v =
                        self.verdicts(&user.partition_key, &user.data, &mut data, |mode| mode != KplMode::Passthrough);
                    not_json += u64::from(matches!(data, Data::NotJson));
                    v
                })
                .collect();
            routes.users.push(users);
        }
        (routes, not_json)
    }

    /// One bit per group that takes a record of this key and data; `applies`: whether a group
    /// of that KPL mode judges at this level (whole record, or user record).
    fn verdicts(&self, partition_key: &str, data: &[u8], read: &mut Data, applies: impl Fn(KplMode) -> bool) -> u64 {
        let mut verdicts = 0u64;
        for (group, (filter, mode)) in self.groups.iter().enumerate().take(MAX_FILTERED_GROUPS) {
            let takes = match filter {
                None => true,
                Some(_) if !applies(*mode) => true,
                Some(filter) => self.matches(filter, partition_key, data, read),
            };
            if takes {
                verdicts |= 1 << group;
            }
        }
        verdicts
    }

    fn matches(&self, filter: &Filter, partition_key: &str, data: &[u8], read: &mut Data) -> bool {
        if filter.partition_key.as_ref().is_some_and(|re| !re.is_match(partition_key)) {
            return false;
        }
        if filter.data_prefix.as_ref().is_some_and(|prefix| !data.starts_with(prefix)) {
            return false;
        }
        if filter.json.is_empty() || !self.json {
            return true;
        }
        if matches!(read, Data::Unread) {
            *read = match serde_json::from_slice::<serde_json::Value>(data) {
                Ok(value) => Data::Json(value),
                Err(_) => Data::NotJson,
            };
        }
        let Data::Json(value) = read else { return false };
        filter.json.iter().all(|(pointer, wanted)| {
            let text = match value.pointer(pointer) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                Some(serde_json::Value::Bool(b)) => b.to_string(),
                _ => return false,
            };
            match wanted {
                JsonMatch::OneOf(values) => values.contains(&text),
                JsonMatch::Regex(re) => re.is_match(&text),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(filters: &str) -> Settings {
        Settings::from_toml(&format!(
            "[source]\nstream_name = \"in\"\n[[destinations]]\npattern = \"^all$\"\n{filters}"
        ))
        .unwrap()
    }

    fn record(key: &str, data: &str) -> SourceRecord {
        SourceRecord {
            sequence_number: crate::record::SequenceNumber::parse("1").unwrap(),
            partition_key: key.into(),
            data: bytes::Bytes::copy_from_slice(data.as_bytes()),
            arrival: None,
            user_records: None,
        }
    }

    #[test]
    fn every_condition_must_hold_and_json_is_read_once() {
        let s = settings(
            "[[destinations]]\npattern = \"^eu$\"\n[destinations.filter]\npartition_key = \"^order-\"\n\
             json = { \"/region\" = [\"eu\", \"uk\"], \"/total\" = { regex = \"^[0-9]{3,}$\" } }\n\
             [[destinations]]\npattern = \"^raw$\"\n[destinations.filter]\ndata_prefix = \"base64:eyI=\"\n",
        );
        let filters = Filters::new(&s).expect("filters");
        let records = [
            record("order-1", r#"{"region":"eu","total":250}"#),
            record("order-2", r#"{"region":"us","total":250}"#),
            record("order-3", r#"{"region":"uk","total":25}"#),
            record("refund-4", r#"{"region":"eu","total":250}"#),
            record("order-5", "not json"),
        ];
        let (routes, not_json) = filters.route(&records);
        let takes = |i: usize, g: usize| Filters::takes(routes.records[i], g);
        assert!((0..5).all(|i| takes(i, 0)), "a group without a filter takes everything");
        assert_eq!((0..5).map(|i| takes(i, 1)).collect::<Vec<_>>(), [true, false, false, false, false]);
        assert_eq!((0..5).map(|i| takes(i, 2)).collect::<Vec<_>>(), [true, true, true, true, false]);
        assert_eq!(not_json, 1, "the record that is not JSON is counted once, not per group");
    }

    #[test]
    fn user_records_are_judged_one_by_one_and_a_passed_through_aggregate_by_its_outer_key() {
        let s = settings(concat!(
            "[[destinations]]\npattern = \"^de$\"\nkpl = \"deaggregate\"\n",
            "filter = { partition_key = \"^order-\", json = { \"/region\" = \"eu\" } }\n",
            "[[destinations]]\npattern = \"^pass$\"\nkpl = \"passthrough\"\nfilter = { partition_key = \"^a$\" }\n",
        ));
        let filters = Filters::new(&s).expect("filters");
        let user = |key: &str, data: &str| crate::record::UserRecord {
            partition_key: key.into(),
            explicit_hash_key: None,
            data: bytes::Bytes::copy_from_slice(data.as_bytes()),
        };
        let mut aggregate = record("a", "(aggregate bytes)");
        aggregate.user_records = Some(std::sync::Arc::from(vec![
            user("order-1", r#"{"region":"eu"}"#),
            user("order-2", r#"{"region":"us"}"#),
            user("refund-3", r#"{"region":"eu"}"#),
            user("order-4", "not json"),
            user("order-5", r#"{"region":"eu"}"#),
        ]));
        let (routes, not_json) = filters.route(&[aggregate]);
        let users: Vec<bool> = routes.users[0].iter().map(|v| Filters::takes(*v, 1)).collect();
        assert_eq!(users, [true, false, false, false, true], "a refused user record between accepted ones");
        assert!(Filters::takes(routes.records[0], 2), "passthrough judges the aggregate by its outer key \"a\"");
        assert!(routes.users[0].iter().all(|v| Filters::takes(*v, 0)), "no filter: every user record");
        assert_eq!(not_json, 1);
    }
}
