//! The source stream and its Enhanced Fan-Out consumer: resolved, registered when missing, and
//! waited on until ACTIVE. Every worker shares one consumer per `consumer_name`.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::SourceError;
use crate::aws::{ErrorKind, kinesis};
use crate::shutdown::Stopped;

/// The resolved source stream.
#[derive(Debug, Clone)]
pub struct SourceStream {
    pub name: String,
    pub arn: String,
    pub open_shards: u32,
    /// How long the source keeps records: a destination further behind loses records.
    pub retention: std::time::Duration,
    /// The largest record it takes (and so may hold).
    pub limits: crate::record::StreamLimits,
}

/// Looks the source stream up; a missing stream is a clear error.
pub async fn resolve_stream(client: &aws_sdk_kinesis::Client, name: &str) -> Result<SourceStream, SourceError> {
    let summary = kinesis::describe_stream(client, name)
        .await
        .map_err(|err| SourceError::Describe { stream: name.to_string(), source: Box::new(err) })?
        .ok_or_else(|| SourceError::StreamNotFound { stream: name.to_string() })?;
    if summary.deleting {
        return Err(SourceError::StreamDeleted { stream: name.to_string() });
    }
    Ok(SourceStream {
        name: name.to_string(),
        arn: summary.arn,
        open_shards: summary.open_shards,
        retention: summary.retention,
        limits: summary.limits,
    })
}

/// How long registration may take before we give up (AWS usually needs a few seconds).
const CONSUMER_WAIT: Duration = Duration::from_secs(120);

/// Describes the consumer, registers it when missing, and waits until it is ACTIVE.
/// Returns its ARN.
pub async fn ensure_consumer(
    client: &aws_sdk_kinesis::Client,
    stream: &SourceStream,
    consumer_name: &str,
    cancel: &CancellationToken,
) -> Result<String, SourceError> {
    let deadline = Instant::now() + CONSUMER_WAIT;
    let failed = |err: Box<dyn std::error::Error + Send + Sync>| SourceError::Consumer {
        consumer: consumer_name.to_string(),
        stream: stream.name.clone(),
        source: err,
    };
    let mut announced = false;
    loop {
        match kinesis::describe_consumer(client, &stream.arn, consumer_name).await {
            Ok(Some(consumer)) if consumer.active => {
                tracing::info!(consumer = consumer_name, stream = %stream.name, "Enhanced Fan-Out consumer is ACTIVE.");
                return Ok(consumer.arn);
            }
            Ok(Some(consumer)) => {
                if !announced {
                    tracing::info!(consumer = consumer_name, status = %consumer.status, "Waiting for the Enhanced Fan-Out consumer to become ACTIVE.");
                    announced = true;
                }
            }
            Ok(None) => {
                tracing::info!(consumer = consumer_name, stream = %stream.name, "Registering the Enhanced Fan-Out consumer.");
                match kinesis::register_consumer(client, &stream.arn, consumer_name).await {
                    Ok(()) => {}
                    // Another worker registered it first, or it is still being deleted: poll on.
                    Err(err) if err.kind == ErrorKind::InUse => {}
                    Err(err) if err.kind == ErrorKind::Transient => {
                        tracing::warn!(error = %err, "RegisterStreamConsumer failed; retrying.");
                    }
                    Err(err) => return Err(failed(Box::new(err))),
                }
            }
            Err(err) if err.kind == ErrorKind::Transient => {
                tracing::warn!(error = %err, "DescribeStreamConsumer failed; retrying.");
            }
            Err(err) => return Err(failed(Box::new(err))),
        }
        if Instant::now() >= deadline {
            return Err(SourceError::ConsumerNotActive { consumer: consumer_name.to_string(), waited: CONSUMER_WAIT });
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(SourceError::Stopped(Stopped)),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
