//! The source stream and its Enhanced Fan-Out consumer: resolved, registered when missing, and
//! waited on until ACTIVE. Every worker shares one consumer per `consumer_name`.

use std::time::Duration;

use aws_sdk_kinesis::types::{ConsumerStatus, StreamStatus};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::SourceError;
use crate::aws::{ErrorKind, classify};

/// The resolved source stream.
#[derive(Debug, Clone)]
pub struct SourceStream {
    pub name: String,
    pub arn: String,
    pub open_shards: u32,
}

/// Looks the source stream up; a missing stream is a clear error.
pub async fn resolve_stream(client: &aws_sdk_kinesis::Client, name: &str) -> Result<SourceStream, SourceError> {
    let out = client.describe_stream_summary().stream_name(name).send().await.map_err(|err| {
        if classify(&err) == ErrorKind::NotFound {
            SourceError::StreamNotFound { stream: name.to_string() }
        } else {
            SourceError::Describe { stream: name.to_string(), source: Box::new(err) }
        }
    })?;
    let summary = out.stream_description_summary().ok_or_else(|| SourceError::Describe {
        stream: name.to_string(),
        source: "DescribeStreamSummary returned no summary".into(),
    })?;
    if *summary.stream_status() == StreamStatus::Deleting {
        return Err(SourceError::StreamDeleted { stream: name.to_string() });
    }
    Ok(SourceStream {
        name: name.to_string(),
        arn: summary.stream_arn().to_string(),
        open_shards: summary.open_shard_count().max(0) as u32,
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
        let described =
            client.describe_stream_consumer().stream_arn(&stream.arn).consumer_name(consumer_name).send().await;
        match described {
            Ok(out) => {
                if let Some(consumer) = out.consumer_description() {
                    match consumer.consumer_status() {
                        ConsumerStatus::Active => {
                            tracing::info!(consumer = consumer_name, stream = %stream.name, "Enhanced Fan-Out consumer is ACTIVE.");
                            return Ok(consumer.consumer_arn().to_string());
                        }
                        status => {
                            if !announced {
                                tracing::info!(consumer = consumer_name, status = %status.as_str(), "Waiting for the Enhanced Fan-Out consumer to become ACTIVE.");
                                announced = true;
                            }
                        }
                    }
                }
            }
            Err(err) if classify(&err) == ErrorKind::NotFound => {
                tracing::info!(consumer = consumer_name, stream = %stream.name, "Registering the Enhanced Fan-Out consumer.");
                match client
                    .register_stream_consumer()
                    .stream_arn(&stream.arn)
                    .consumer_name(consumer_name)
                    .send()
                    .await
                {
                    Ok(_) => {}
                    // Another worker registered it first, or it is still being deleted: poll on.
                    Err(err) if classify(&err) == ErrorKind::InUse => {}
                    Err(err) if classify(&err) == ErrorKind::Transient => {
                        tracing::warn!(error = %crate::aws::chain(&err), "RegisterStreamConsumer failed; retrying.");
                    }
                    Err(err) => return Err(failed(Box::new(err))),
                }
            }
            Err(err) if classify(&err) == ErrorKind::Transient => {
                tracing::warn!(error = %crate::aws::chain(&err), "DescribeStreamConsumer failed; retrying.");
            }
            Err(err) => return Err(failed(Box::new(err))),
        }
        if Instant::now() >= deadline {
            return Err(SourceError::ConsumerNotActive { consumer: consumer_name.to_string(), waited: CONSUMER_WAIT });
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(SourceError::Cancelled),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
