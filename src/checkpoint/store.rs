//! Durable progress: where each source shard resumes after a restart.
//!
//! The backend sits behind [`CheckpointStore`] so that the DynamoDB lease table can replace the
//! file without touching the pipeline. The file backend writes atomically (temporary file, fsync,
//! rename, fsync of the directory) and refuses a corrupt file rather than silently starting over.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use crate::position::{Checkpoints, DestinationPositions, Position, Snapshot};
use crate::record::SequenceNumber;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoint file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "checkpoint file {path} is corrupt: {reason}; refusing to guess where to resume \
         (move the file away to start from source.initial_position)"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint file {path} belongs to source stream `{found}`, not `{expected}`")]
    WrongStream { path: PathBuf, found: String, expected: String },
    #[error("lease table {table}: {message}")]
    Lease { table: String, message: String },
    #[error("the checkpoint store did not answer within {waited:?}")]
    TimedOut { waited: std::time::Duration },
    #[error("cannot write checkpoint file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A durable home for checkpoints.
pub trait CheckpointStore: Send + Sync {
    /// Everything stored for the source stream: shard checkpoints and destination positions.
    fn load_snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CheckpointError>>;
    /// Stores shard checkpoints and destination positions, one write per shard (shards not named
    /// keep what they had). `as_of` is when they were taken: a shard this worker took (again)
    /// after that is not theirs to move, since a snapshot of an earlier reading could move it
    /// backwards.
    fn save_snapshot<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        as_of: tokio::time::Instant,
    ) -> BoxFuture<'a, Result<(), CheckpointError>>;
    /// Records that `shard` was read to its end, naming its `children`: from then on they may be
    /// read, here or by another worker.
    fn finish<'a>(&'a self, shard: &'a str, children: &'a [String]) -> BoxFuture<'a, Result<(), CheckpointError>>;

    /// Every shard checkpoint stored.
    fn load(&self) -> BoxFuture<'_, Result<Checkpoints, CheckpointError>> {
        Box::pin(async { self.load_snapshot().await.map(|stored| stored.shards) })
    }

    /// Stores shard checkpoints alone.
    fn save<'a>(
        &'a self,
        checkpoints: &'a Checkpoints,
        as_of: tokio::time::Instant,
    ) -> BoxFuture<'a, Result<(), CheckpointError>> {
        Box::pin(async move {
            let snapshot = Snapshot { shards: checkpoints.clone(), destinations: DestinationPositions::new() };
            self.save_snapshot(&snapshot, as_of).await
        })
    }
}

/// Checkpoints in one JSON file, for a single worker.
#[derive(Debug)]
pub struct FileCheckpointStore {
    path: PathBuf,
    stream_name: String,
    /// Serialises writers: the periodic checkpointer and shard-end writes share the file.
    write_lock: tokio::sync::Mutex<Snapshot>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    version: u32,
    source_stream: String,
    shards: BTreeMap<String, String>,
    /// Shard → destination stream ARN → sequence number.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    destination_checkpoints: BTreeMap<String, BTreeMap<String, String>>,
}

const FILE_VERSION: u32 = 1;

impl FileCheckpointStore {
    pub fn new(path: impl Into<PathBuf>, stream_name: impl Into<String>) -> Self {
        FileCheckpointStore {
            path: path.into(),
            stream_name: stream_name.into(),
            write_lock: tokio::sync::Mutex::new(Snapshot::default()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parses the file's text (separate from I/O so that hostile contents can be tested directly).
    pub fn parse(path: &Path, expected_stream: &str, text: &[u8]) -> Result<Checkpoints, CheckpointError> {
        Self::parse_snapshot(path, expected_stream, text).map(|s| s.shards)
    }

    /// As [`Self::parse`], with the destinations' own positions.
    pub fn parse_snapshot(path: &Path, expected_stream: &str, text: &[u8]) -> Result<Snapshot, CheckpointError> {
        let corrupt = |reason: String| CheckpointError::Corrupt { path: path.to_path_buf(), reason };
        let file: FileFormat = serde_json::from_slice(text).map_err(|e| corrupt(e.to_string()))?;
        if file.version != FILE_VERSION {
            return Err(corrupt(format!("unsupported version {}", file.version)));
        }
        let name = crate::aws::kinesis::stream_name_of;
        if file.source_stream != expected_stream && name(&file.source_stream) != name(expected_stream) {
            return Err(CheckpointError::WrongStream {
                path: path.to_path_buf(),
                found: file.source_stream,
                expected: expected_stream.to_string(),
            });
        }
        let shards = file
            .shards
            .into_iter()
            .map(|(shard, value)| {
                Position::parse(&value).map(|c| (shard.clone(), c)).map_err(|e| corrupt(format!("shard {shard}: {e}")))
            })
            .collect::<Result<Checkpoints, _>>()?;
        let mut destinations = DestinationPositions::new();
        for (shard, positions) in file.destination_checkpoints {
            let mut parsed = BTreeMap::new();
            for (destination, value) in positions {
                let seq = SequenceNumber::parse(&value)
                    .map_err(|e| corrupt(format!("shard {shard}, destination {destination}: {e}")))?;
                parsed.insert(destination, seq);
            }
            destinations.insert(shard, parsed);
        }
        Ok(Snapshot { shards, destinations })
    }

    async fn load_file(&self) -> Result<Snapshot, CheckpointError> {
        let text = match tokio::fs::read(&self.path).await {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Snapshot::default()),
            Err(source) => return Err(CheckpointError::Read { path: self.path.clone(), source }),
        };
        let loaded = Self::parse_snapshot(&self.path, &self.stream_name, &text)?;
        *self.write_lock.lock().await = loaded.clone();
        Ok(loaded)
    }

    async fn save_file(&self, snapshot: &Snapshot) -> Result<(), CheckpointError> {
        let mut current = self.write_lock.lock().await;
        let mut next = current.clone();
        // SHARD_END is final: a snapshot taken before the shard ended, written after it, must not
        // put an older position back (a crash would then read the parent's tail after its
        // children).
        let ended = |shard: &String| current.shards.get(shard) == Some(&Position::ShardEnd);
        next.shards.extend(snapshot.shards.iter().filter(|(k, _)| !ended(k)).map(|(k, v)| (k.clone(), v.clone())));
        next.destinations.extend(snapshot.destinations.iter().map(|(k, v)| (k.clone(), v.clone())));
        // A shard read to its end needs no destination positions any more.
        next.destinations.retain(|shard, _| next.shards.get(shard) != Some(&Position::ShardEnd));
        if next == *current && self.path.exists() {
            return Ok(());
        }
        let file = FileFormat {
            version: FILE_VERSION,
            source_stream: self.stream_name.clone(),
            shards: next.shards.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
            destination_checkpoints: next
                .destinations
                .iter()
                .map(|(shard, m)| (shard.clone(), m.iter().map(|(d, s)| (d.clone(), s.to_string())).collect()))
                .collect(),
        };
        let text = serde_json::to_vec_pretty(&file).expect("checkpoint map serialises");
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomically(&path, &text))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|source| CheckpointError::Write { path: self.path.clone(), source })?;
        *current = next;
        Ok(())
    }
}

impl CheckpointStore for FileCheckpointStore {
    fn load_snapshot(&self) -> BoxFuture<'_, Result<Snapshot, CheckpointError>> {
        Box::pin(self.load_file())
    }

    /// One worker owns the whole file: every snapshot is its own.
    fn save_snapshot<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        _as_of: tokio::time::Instant,
    ) -> BoxFuture<'a, Result<(), CheckpointError>> {
        Box::pin(self.save_file(snapshot))
    }

    /// The file keeps no shard graph: the plan reads it from ListShards.
    fn finish<'a>(&'a self, shard: &'a str, _children: &'a [String]) -> BoxFuture<'a, Result<(), CheckpointError>> {
        Box::pin(async move {
            let end = Checkpoints::from([(shard.to_string(), Position::ShardEnd)]);
            self.save_file(&Snapshot { shards: end, destinations: DestinationPositions::new() }).await
        })
    }
}

/// Temporary file in the same directory, fsync, rename over the old file, fsync the directory:
/// a crash leaves either the old or the new file, never a torn one.
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(&dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SequenceNumber;
    use proptest::prelude::*;

    fn seq(n: &str) -> Position {
        Position::Sequence(SequenceNumber::parse(n).unwrap())
    }

    #[tokio::test]
    async fn saves_and_loads_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/checkpoints.json");
        let store = FileCheckpointStore::new(&path, "app-input");
        assert!(store.load().await.unwrap().is_empty());
        let mut cps = Checkpoints::new();
        cps.insert("shardId-000000000000".into(), seq("123"));
        cps.insert("shardId-000000000001".into(), Position::ShardEnd);
        cps.insert("shardId-000000000002".into(), Position::At(SequenceNumber::parse("77").unwrap()));
        store.save(&cps, tokio::time::Instant::now()).await.unwrap();
        let mut more = Checkpoints::new();
        more.insert("shardId-000000000000".into(), seq("456"));
        store.save(&more, tokio::time::Instant::now()).await.unwrap();

        let reopened = FileCheckpointStore::new(&path, "app-input");
        let loaded = reopened.load().await.unwrap();
        assert_eq!(loaded.get("shardId-000000000000"), Some(&seq("456")));
        assert_eq!(loaded.get("shardId-000000000001"), Some(&Position::ShardEnd));
        assert_eq!(loaded.get("shardId-000000000002"), Some(&Position::At(SequenceNumber::parse("77").unwrap())));
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[tokio::test]
    async fn a_snapshot_taken_before_a_shard_ended_never_replaces_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoints.json");
        let store = FileCheckpointStore::new(&path, "app-input");
        let parent = "shardId-000000000000".to_string();
        // The periodic snapshot is taken, the shard ends meanwhile, then the snapshot is written.
        let stale = Snapshot {
            shards: Checkpoints::from([(parent.clone(), seq("100"))]),
            destinations: DestinationPositions::from([(
                parent.clone(),
                BTreeMap::from([("arn:d".to_string(), SequenceNumber::parse("100").unwrap())]),
            )]),
        };
        store.finish(&parent, &[]).await.unwrap();
        store.save_snapshot(&stale, tokio::time::Instant::now()).await.unwrap();
        let loaded = FileCheckpointStore::new(&path, "app-input").load_snapshot().await.unwrap();
        assert_eq!(loaded.shards.get(&parent), Some(&Position::ShardEnd), "SHARD_END stays");
        assert!(loaded.destinations.is_empty(), "no positions come back for an ended shard");
    }

    #[tokio::test]
    async fn refuses_corrupt_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, b"{\"version\":1,\"source_stream\":\"app-in").unwrap();
        let err = FileCheckpointStore::new(&path, "app-input").load().await.unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }));
        assert!(err.to_string().contains("c.json"), "{err}");

        std::fs::write(&path, br#"{"version":1,"source_stream":"other","shards":{}}"#).unwrap();
        let err = FileCheckpointStore::new(&path, "app-input").load().await.unwrap_err();
        assert!(matches!(err, CheckpointError::WrongStream { .. }), "{err}");

        std::fs::write(&path, br#"{"version":1,"source_stream":"app-input","shards":{"s":"12x"}}"#).unwrap();
        let err = FileCheckpointStore::new(&path, "app-input").load().await.unwrap_err();
        assert!(err.to_string().contains("shard s"), "{err}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = FileCheckpointStore::parse(Path::new("x.json"), "s", &bytes);
        }
    }
}
