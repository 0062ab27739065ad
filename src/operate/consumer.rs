//! `consumer deregister`: removes the service's Enhanced Fan-Out consumer after a decommission
//! (EFO bills per consumer-shard-hour for as long as a consumer is registered).
//!
//! It refuses while a worker holds a lease in the lease table (a lease of a shard not read to its
//! end whose owner renews it: its counter moves within `checkpoint.failover_time`), unless
//! forced: a running fleet would lose its subscriptions. A lease a crashed or stopped worker left
//! with its name on it holds nothing. With the
//! file backend there is one worker and no table to ask: stop it first. A consumer named by
//! `source.consumer_arn` was registered by someone else and is never removed here.

use std::time::Duration;

use serde::Serialize;

use super::OperateError;
use crate::aws::KinesisClients;
use crate::aws::credentials::Identities;
use crate::aws::kinesis;
use crate::config::{CheckpointBackend, Settings};
use crate::lease::{LeaseTable, Position};

/// How long to wait for the consumer to be gone after DeregisterStreamConsumer.
const GONE_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(
        "{owners} still hold {shards} leases in table {table}: deregistering would cut their subscriptions. Stop the service first, or pass --force"
    )]
    LeasesHeld { table: String, owners: String, shards: usize },
    #[error(
        "source.consumer_arn names a consumer this service did not register ({consumer_arn}); it is not removed here: deregister it where it was registered"
    )]
    Shared { consumer_arn: String },
    #[error("DeregisterStreamConsumer of `{consumer}` on stream `{stream}` failed")]
    Deregister {
        consumer: String,
        stream: String,
        #[source]
        source: crate::aws::CallError,
    },
    #[error("consumer `{consumer}` of stream `{stream}` was still registered {waited:?} after it was deregistered")]
    StillThere { consumer: String, stream: String, waited: Duration },
}

/// What `consumer deregister` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deregistered {
    pub stream: String,
    pub consumer: String,
    /// False when no consumer of that name was registered (nothing to do).
    pub existed: bool,
}

impl Deregistered {
    pub fn render(&self) -> String {
        if self.existed {
            format!("Deregistered Enhanced Fan-Out consumer {} from stream {}.\n", self.consumer, self.stream)
        } else {
            format!(
                "No Enhanced Fan-Out consumer {} is registered on stream {}: nothing to do.\n",
                self.consumer, self.stream
            )
        }
    }
}

/// Deregisters `source.consumer_name` from the source stream (see the module docs).
pub async fn deregister(
    settings: &Settings,
    sdk: &aws_config::SdkConfig,
    force: bool,
) -> Result<Deregistered, OperateError> {
    if let Some(consumer_arn) = &settings.source.consumer_arn {
        return Err(ConsumerError::Shared { consumer_arn: consumer_arn.clone() }.into());
    }
    let identities = Identities {
        sdk: sdk.clone(),
        sts_endpoint_url: settings.sts_endpoint_url.clone(),
        worker: "consumer".into(),
        metrics: Default::default(),
        health: Default::default(),
    };
    let source = &settings.source.aws;
    if let CheckpointBackend::DynamoDb(lease) = &settings.checkpoint.backend {
        let aws = lease.aws(source);
        let credentials = identities.provider(aws.role.as_ref(), aws.region.as_deref(), "checkpoint").await;
        let table = LeaseTable::new(crate::aws::dynamodb_client(sdk, &aws, credentials, lease), &lease.table_name);
        // Held: an owner whose counter moves (it renews), as a worker judges before taking a
        // lease; the owner a crashed or stopped worker left behind holds nothing.
        let owned = |leases: Vec<crate::lease::Lease>| -> Vec<crate::lease::Lease> {
            leases.into_iter().filter(|l| l.owner.is_some() && l.checkpoint != Position::ShardEnd).collect()
        };
        let first = owned(table.scan().await?);
        let held: Vec<_> = if first.is_empty() {
            first
        } else {
            tokio::time::sleep(lease.failover_time).await;
            let counters: std::collections::BTreeMap<String, u64> =
                first.iter().map(|l| (l.key.clone(), l.counter)).collect();
            owned(table.scan().await?).into_iter().filter(|l| counters.get(&l.key) != Some(&l.counter)).collect()
        };
        if !held.is_empty() && !force {
            let mut owners: Vec<&str> = held.iter().filter_map(|l| l.owner.as_deref()).collect();
            owners.sort_unstable();
            owners.dedup();
            return Err(ConsumerError::LeasesHeld {
                table: lease.table_name.clone(),
                owners: format!("workers {}", owners.join(", ")),
                shards: held.len(),
            }
            .into());
        }
        if !held.is_empty() {
            tracing::warn!(leases = held.len(), "Workers hold leases; deregistering anyway (--force).");
        }
    }
    let credentials = identities.provider(source.role.as_ref(), source.region.as_deref(), "source").await;
    let control = KinesisClients::new(sdk, source, credentials, settings.put_attempt_timeout()).control;
    let stream = crate::source::resolve_stream(&control, &settings.source.stream_name).await?;
    let consumer = settings.source.consumer_name.clone();
    let failed = |source| ConsumerError::Deregister { consumer: consumer.clone(), stream: stream.name.clone(), source };
    if kinesis::describe_consumer(&control, &stream.arn, &consumer).await.map_err(failed)?.is_none() {
        return Ok(Deregistered { stream: stream.name, consumer, existed: false });
    }
    kinesis::deregister_consumer(&control, &stream.arn, &consumer).await.map_err(failed)?;
    let deadline = tokio::time::Instant::now() + GONE_WAIT;
    while kinesis::describe_consumer(&control, &stream.arn, &consumer).await.map_err(failed)?.is_some() {
        if tokio::time::Instant::now() >= deadline {
            return Err(ConsumerError::StillThere { consumer, stream: stream.name, waited: GONE_WAIT }.into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(Deregistered { stream: stream.name, consumer, existed: true })
}
