//! Checkpointing: where a reading resumes after a restart, a crash or a handover.
//!
//! - [`store`]: the [`CheckpointStore`] trait, what a checkpoint holds ([`Snapshot`]: each shard's
//!   position and each destination's own), and the file backend ([`FileCheckpointStore`]). The
//!   lease table implements the trait where it lives ([`crate::lease::LeaseManager`], through
//!   `lease::checkpoint`), each shard's checkpoint on its lease.
//! - [`checkpointer`]: writes what [`crate::progress`] says every destination accepted, every
//!   `checkpoint.interval` and at shutdown, never behind what it wrote before.
//! - [`reset_checkpoints`]: `run --reset-checkpoints` (file backend).
//!
//! On a record's path this is the last room: source -> fanout -> sink -> progress -> checkpoint.

pub mod checkpointer;
pub mod store;

pub use checkpointer::Checkpointer;
pub use store::{CheckpointError, CheckpointStore, Checkpoints, FileCheckpointStore, Snapshot};

/// Moves the checkpoint file aside, keeping it for inspection.
pub fn reset_checkpoints(settings: &crate::Settings) -> Result<(), String> {
    match &settings.checkpoint.backend {
        crate::config::CheckpointBackend::File { path } => {
            if !path.exists() {
                return Ok(());
            }
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            let kept = path.with_file_name(format!(
                "{}.reset-{stamp}",
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            ));
            std::fs::rename(path, &kept)
                .map_err(|e| format!("cannot move checkpoint file {} aside: {e}", path.display()))?;
            tracing::warn!(old = %kept.display(), "Checkpoints reset: starting from source.initial_position.");
            Ok(())
        }
        crate::config::CheckpointBackend::DynamoDb(_) => {
            Err("--reset-checkpoints works with the file backend; reset a lease table by deleting its items".into())
        }
    }
}
