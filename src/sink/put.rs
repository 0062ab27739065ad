//! The put edge: one PutRecords call as the writers see it, behind a small trait so the send loop
//! and the dead-letter writer are tested with a fake, and the SDK is called from here only.

use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use futures::future::BoxFuture;

use crate::aws::{ErrorKind, chain, classify, error_code};

/// One entry's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryAnswer {
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// The shard the record went to (accepted entries).
    pub shard_id: Option<String>,
}

/// A request that failed as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFailure {
    pub kind: ErrorKind,
    pub code: String,
    /// The whole cause chain, for logs and dead letters.
    pub cause: String,
}

/// Where writers put records.
pub trait PutEdge: Send + Sync + std::fmt::Debug {
    /// One PutRecords call: an answer per entry, in order, or the failure of the whole request.
    fn put_records<'a>(
        &'a self,
        stream: &'a str,
        entries: Vec<PutRecordsRequestEntry>,
    ) -> BoxFuture<'a, Result<Vec<EntryAnswer>, RequestFailure>>;

    /// Whether the stream is deleted or being deleted (a failed check says it is not).
    fn deleted<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, bool>;
}

impl PutEdge for aws_sdk_kinesis::Client {
    fn put_records<'a>(
        &'a self,
        stream: &'a str,
        entries: Vec<PutRecordsRequestEntry>,
    ) -> BoxFuture<'a, Result<Vec<EntryAnswer>, RequestFailure>> {
        Box::pin(async move {
            match self.put_records().stream_name(stream).set_records(Some(entries)).send().await {
                Ok(output) => Ok(output
                    .records()
                    .iter()
                    .map(|e| EntryAnswer {
                        error_code: e.error_code().map(str::to_string),
                        error_message: e.error_message().map(str::to_string),
                        shard_id: e.shard_id().map(str::to_string),
                    })
                    .collect()),
                Err(err) => Err(RequestFailure { kind: classify(&err), code: error_code(&err), cause: chain(&err) }),
            }
        })
    }

    fn deleted<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match self.describe_stream_summary().stream_name(stream).send().await {
                Err(err) => classify(&err) == ErrorKind::NotFound,
                Ok(out) => {
                    out.stream_description_summary().is_some_and(|s| *s.stream_status() == StreamStatus::Deleting)
                }
            }
        })
    }
}
