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

/// Consumers a stream takes (50 with On-demand Advantage): a LimitExceededException from
/// RegisterStreamConsumer with at least this many registered is the limit, not the call rate.
const CONSUMER_LIMIT: usize = 20;

/// How long registration may take before we give up (AWS usually needs a few seconds).
const CONSUMER_WAIT: Duration = Duration::from_secs(120);

/// The consumer the source is read through: the one `source.consumer_arn` names (registered by
/// someone else: only described, waited for, never registered), else `consumer_name`, registered
/// when missing. Waits until it is ACTIVE and returns its ARN.
pub async fn source_consumer(
    client: &aws_sdk_kinesis::Client,
    stream: &SourceStream,
    source: &crate::config::SourceSettings,
    cancel: &CancellationToken,
) -> Result<String, SourceError> {
    match &source.consumer_arn {
        Some(arn) => shared_consumer(client, stream, arn, cancel).await,
        None => ensure_consumer(client, stream, &source.consumer_name, cancel).await,
    }
}

/// Waits until the consumer `consumer_arn` of the source stream is ACTIVE.
async fn shared_consumer(
    client: &aws_sdk_kinesis::Client,
    stream: &SourceStream,
    consumer_arn: &str,
    cancel: &CancellationToken,
) -> Result<String, SourceError> {
    if !consumer_arn.starts_with(&format!("{}/consumer/", stream.arn)) {
        return Err(SourceError::ConsumerOfAnotherStream {
            consumer_arn: consumer_arn.to_string(),
            stream: stream.name.clone(),
        });
    }
    let deadline = Instant::now() + CONSUMER_WAIT;
    let mut announced = false;
    loop {
        match kinesis::describe_consumer_arn(client, consumer_arn).await {
            Ok(Some(consumer)) if consumer.active => {
                tracing::info!(consumer_arn, stream = %stream.name, "Enhanced Fan-Out consumer (source.consumer_arn) is ACTIVE.");
                return Ok(consumer.arn);
            }
            Ok(Some(consumer)) => {
                if !announced {
                    tracing::info!(consumer_arn, status = %consumer.status, "Waiting for the Enhanced Fan-Out consumer to become ACTIVE.");
                    announced = true;
                }
            }
            Ok(None) => {
                return Err(SourceError::ConsumerMissing {
                    consumer_arn: consumer_arn.to_string(),
                    stream: stream.name.clone(),
                });
            }
            Err(err) if err.kind == ErrorKind::Transient => {
                tracing::warn!(error = %err, "DescribeStreamConsumer failed; retrying.");
            }
            Err(err) => {
                return Err(SourceError::Consumer {
                    consumer: consumer_arn.to_string(),
                    stream: stream.name.clone(),
                    source: Box::new(err),
                });
            }
        }
        if Instant::now() >= deadline {
            return Err(SourceError::ConsumerNotActive { consumer: consumer_arn.to_string(), waited: CONSUMER_WAIT });
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(SourceError::Stopped(Stopped)),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

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
                    // The stream's consumer limit, or the call rate: "Rate exceeded" says the
                    // second; otherwise the count tells (20, or 50 with On-demand Advantage).
                    Err(err) if err.code == "LimitExceededException" => {
                        let rate = err.cause.to_ascii_lowercase().contains("rate exceeded");
                        let listed = kinesis::list_consumers(client, &stream.arn).await;
                        let full = match &listed {
                            Ok(names) => names.len() >= CONSUMER_LIMIT,
                            // Not even listed: say what is known rather than retry in the dark.
                            Err(_) => true,
                        };
                        if !rate && full {
                            let (count, names) = match listed {
                                Ok(names) => (names.len().to_string(), names.join(", ")),
                                Err(list) => {
                                    ("an unknown number of".into(), format!("(ListStreamConsumers failed: {list})"))
                                }
                            };
                            return Err(SourceError::ConsumerLimit {
                                consumer: consumer_name.to_string(),
                                stream: stream.name.clone(),
                                count,
                                names,
                            });
                        }
                        tracing::warn!(error = %err, "RegisterStreamConsumer was refused for its call rate; retrying.");
                    }
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
