//! Interoperability of the KPL aggregate format with the reference implementation
//! (the Python `aws-kinesis-agg` library):
//! - aggregates it produced (tests/fixtures/kpl, made by generate.py) decode here to exactly the
//!   user records it was given;
//! - aggregates produced here are written to `target/tmp/rust-aggregates.json`, which .ci/run
//!   hands to `check_rust_aggregates.py` to decode with the Python library.

use base64::Engine as _;
use bytes::Bytes;
use kinesis_fanout::kpl::{self, Packed, UserRecord};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Case {
    name: String,
    aggregate: String,
    records: Vec<Expected>,
}

#[derive(Serialize, Deserialize)]
struct Expected {
    partition_key: String,
    explicit_hash_key: Option<String>,
    data: String,
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
}

#[test]
fn aggregates_from_the_python_library_decode_exactly() {
    let text = include_str!("fixtures/kpl/python-aggregates.json");
    let cases: Vec<Case> = serde_json::from_str(text).unwrap();
    assert!(cases.len() >= 4);
    let mut total = 0;
    for case in cases {
        let decoded = kpl::decode(&Bytes::from(unb64(&case.aggregate)))
            .unwrap_or_else(|e| panic!("{}: {e}", case.name))
            .expect("has the magic bytes");
        let expected: Vec<UserRecord> = case
            .records
            .iter()
            .map(|r| UserRecord {
                partition_key: r.partition_key.clone(),
                explicit_hash_key: r.explicit_hash_key.clone(),
                data: Bytes::from(unb64(&r.data)),
            })
            .collect();
        assert_eq!(decoded, expected, "{}", case.name);
        total += decoded.len();
    }
    assert_eq!(total, 83);
}

#[test]
fn aggregates_from_here_are_written_for_the_python_check() {
    let mut cases = Vec::new();
    let sets: Vec<(&str, Vec<UserRecord>)> = vec![
        (
            "plain keys",
            (0..50)
                .map(|i| UserRecord {
                    partition_key: format!("key-{}", i % 7),
                    explicit_hash_key: None,
                    data: Bytes::from(vec![i as u8; i * 3]),
                })
                .collect(),
        ),
        (
            "explicit hash keys",
            (0..30)
                .map(|i| UserRecord {
                    partition_key: format!("k{i}"),
                    explicit_hash_key: (i % 2 == 0).then(|| (u128::MAX / 30 * i as u128).to_string()),
                    data: Bytes::from(format!("payload {i}")),
                })
                .collect(),
        ),
    ];
    for (name, records) in sets {
        // Small aggregates, so that the set spans several of them.
        for (packed, chunk) in split(&records, 600) {
            cases.push(Case {
                name: name.to_string(),
                aggregate: b64(&packed),
                records: chunk
                    .iter()
                    .map(|r| Expected {
                        partition_key: r.partition_key.clone(),
                        explicit_hash_key: r.explicit_hash_key.clone(),
                        data: b64(&r.data),
                    })
                    .collect(),
            });
        }
    }
    assert!(cases.len() > 2);
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("rust-aggregates.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&cases).unwrap()).unwrap();
}

/// Aggregates of at most `max` bytes, each with the records it holds.
fn split(records: &[UserRecord], max: usize) -> Vec<(Bytes, Vec<UserRecord>)> {
    let mut out = Vec::new();
    let mut rest = records;
    for packed in kpl::aggregate(records, max) {
        let Packed::Aggregate { data, count, .. } = packed else { panic!("records are small") };
        out.push((data, rest[..count].to_vec()));
        rest = &rest[count..];
    }
    out
}
