//! Where a replay keeps what it has read, per dead-letter shard: beside the checkpoint file, or
//! in the lease table under a key no shard id can take.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{POSITION_PREFIX, ReplayError};
use crate::aws::credentials::Identities;
use crate::config::AwsSettings;
use crate::config::{CheckpointBackend, Settings};
use crate::lease::LeaseTable;
use crate::operate::OperateError;

/// The mark of runs over every destination.
pub(super) const ALL: &str = "*";

/// Per dead-letter shard: the last record replayed, by `*` (every destination) or by the
/// destination a run was filtered to.
pub(super) type Marks = BTreeMap<String, String>;

/// Where a replay keeps what it has read, per dead-letter shard.
pub(super) enum Positions {
    /// A JSON file beside the checkpoint file.
    File(PathBuf),
    Table(LeaseTable, String),
}

impl Positions {
    pub(super) async fn open(
        settings: &Settings,
        identities: &Identities,
        sdk: &aws_config::SdkConfig,
        stream: &str,
    ) -> Result<Positions, OperateError> {
        Ok(match &settings.checkpoint.backend {
            CheckpointBackend::File { path } => {
                let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                name.push(format!(".dead-letters-{stream}.json"));
                Positions::File(path.with_file_name(name))
            }
            CheckpointBackend::DynamoDb(lease) => {
                let aws: AwsSettings = lease.aws(&settings.source.aws);
                let credentials = identities.provider(aws.role.as_ref(), aws.region.as_deref(), "checkpoint").await;
                let table =
                    LeaseTable::new(crate::aws::dynamodb_client(sdk, &aws, credentials, lease), &lease.table_name);
                Positions::Table(table, format!("{POSITION_PREFIX}{stream}/"))
            }
        })
    }

    pub(super) async fn get(&self, shard: &str) -> Result<Marks, OperateError> {
        Ok(match self {
            Positions::File(path) => self.file(path)?.remove(shard).unwrap_or_default(),
            Positions::Table(table, prefix) => table
                .note(&format!("{prefix}{shard}"))
                .await?
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default(),
        })
    }

    pub(super) async fn set(&self, shard: &str, marks: &Marks) -> Result<(), OperateError> {
        match self {
            Positions::File(path) => {
                let mut all = self.file(path)?;
                all.insert(shard.to_string(), marks.clone());
                let text = serde_json::to_vec_pretty(&all).expect("a map of strings serialises");
                let partial = path.with_extension("partial");
                std::fs::write(&partial, text)
                    .and_then(|()| std::fs::rename(&partial, path))
                    .map_err(|source| ReplayError::Position { path: path.clone(), source })?;
            }
            Positions::Table(table, prefix) => {
                let text = serde_json::to_string(marks).expect("a map of strings serialises");
                table.set_note(&format!("{prefix}{shard}"), &text).await?
            }
        }
        Ok(())
    }

    pub(super) fn file(&self, path: &PathBuf) -> Result<BTreeMap<String, Marks>, ReplayError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or_default()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(source) => Err(ReplayError::Position { path: path.clone(), source }),
        }
    }
}
