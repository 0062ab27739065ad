//! The lease table in DynamoDB: the items and conditional writes [`super::table`] describes, with
//! the Kinesis Client Library's attribute names.

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
};
use futures::future::BoxFuture;

use super::table::{
    CheckpointWrite, Lease, LeaseError, LeaseStore, LeaseTable, NOTE_PREFIX, Position, Scanned, Unreadable,
    next_counter,
};
use crate::aws::{ErrorKind, classify};

use super::item::Item;

/// The lease table `name` in DynamoDB.
#[derive(Debug, Clone)]
pub struct DynamoDbLeases {
    client: aws_sdk_dynamodb::Client,
    name: String,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

impl LeaseTable {
    /// The table `name` in DynamoDB.
    pub fn new(client: aws_sdk_dynamodb::Client, name: impl Into<String>) -> Self {
        Self::with_store(std::sync::Arc::new(DynamoDbLeases::new(client, name)))
    }
}

impl DynamoDbLeases {
    pub fn new(client: aws_sdk_dynamodb::Client, name: impl Into<String>) -> Self {
        DynamoDbLeases { client, name: name.into() }
    }

    fn client(&self) -> &aws_sdk_dynamodb::Client {
        &self.client
    }

    fn failed<E, R>(&self, operation: &'static str, err: aws_sdk_dynamodb::error::SdkError<E, R>) -> LeaseError
    where
        E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + 'static,
    {
        let transient = match &err {
            // Throttling and internal errors are transient there too.
            aws_sdk_dynamodb::error::SdkError::ServiceError(e) => {
                crate::aws::classify_code(e.err().code()) == ErrorKind::Transient
            }
            // Timeouts, connection failures, unreadable answers, and requests that could not be built.
            _ => true,
        };
        LeaseError::DynamoDb { table: self.name.clone(), operation, message: crate::aws::chain(&err), transient }
    }

    /// Creates the table (on-demand, hash key `leaseKey`) when `create` and it is missing, then
    /// waits until it is ACTIVE.
    async fn ensure(&self, create: bool) -> Result<(), LeaseError> {
        let waited = Duration::from_secs(120);
        let deadline = tokio::time::Instant::now() + waited;
        loop {
            match self.client().describe_table().table_name(&self.name).send().await {
                Ok(out) => {
                    if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                        return Ok(());
                    }
                }
                Err(err) if classify(&err) == ErrorKind::NotFound && create => {
                    tracing::info!(table = %self.name, "Creating the lease table (on-demand, hash key leaseKey).");
                    let created = self
                        .client()
                        .create_table()
                        .table_name(&self.name)
                        .billing_mode(BillingMode::PayPerRequest)
                        .attribute_definitions(
                            AttributeDefinition::builder()
                                .attribute_name("leaseKey")
                                .attribute_type(ScalarAttributeType::S)
                                .build()
                                .expect("complete"),
                        )
                        .key_schema(
                            KeySchemaElement::builder()
                                .attribute_name("leaseKey")
                                .key_type(KeyType::Hash)
                                .build()
                                .expect("complete"),
                        )
                        .send()
                        .await;
                    match created {
                        Ok(_) => {}
                        // Another worker created it first.
                        Err(err) if classify(&err) == ErrorKind::InUse => {}
                        Err(err) => return Err(self.failed("CreateTable", err)),
                    }
                }
                Err(err) => {
                    let failure = self.failed("DescribeTable", err);
                    if !matches!(failure, LeaseError::DynamoDb { transient: true, .. }) {
                        return Err(failure);
                    }
                    tracing::warn!(error = %failure, "Lease table not reachable yet; retrying.");
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LeaseError::NotActive { table: self.name.clone(), waited });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A note kept in the table under `key` (which must start with [`NOTE_PREFIX`]).
    async fn note(&self, key: &str) -> Result<Option<String>, LeaseError> {
        let item = self
            .client()
            .get_item()
            .table_name(&self.name)
            .key("leaseKey", s(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.failed("GetItem", e))?;
        Ok(item.item().and_then(|i| i.get("checkpoint")).and_then(|v| v.as_s().ok()).cloned())
    }

    /// Keeps a note under `key` (which must start with [`NOTE_PREFIX`]: never a shard's lease).
    async fn set_note(&self, key: &str, value: &str) -> Result<(), LeaseError> {
        self.client()
            .put_item()
            .table_name(&self.name)
            .item("leaseKey", s(key))
            .item("checkpoint", s(value))
            .send()
            .await
            .map_err(|e| self.failed("PutItem", e))?;
        Ok(())
    }

    async fn scan_all(&self, consistent: bool) -> Result<Scanned, LeaseError> {
        let (mut leases, mut unreadable) = (Vec::new(), Vec::new());
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client()
                .scan()
                .table_name(&self.name)
                .consistent_read(consistent)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.failed("Scan", e))?;
            for item in page.items() {
                // Other tools' notes (a dead-letter replay's position) are not leases, nor are
                // rows of other kinds (KCL 3's single-table mode marks them with `entityType`).
                let key = item.get("leaseKey").and_then(|v| v.as_s().ok());
                if key.is_some_and(|k| k.starts_with(NOTE_PREFIX)) || super::item::other_kind(item) {
                    continue;
                }
                match super::item::parse(&self.name, item) {
                    Ok(lease) => leases.push(lease),
                    Err(err) => {
                        unreadable.push(Unreadable { key: key.cloned(), reason: err.to_string() });
                    }
                }
            }
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        Ok((leases, unreadable))
    }

    /// Creates a lease unless one exists for the shard.
    async fn create_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let mut request = self
            .client()
            .put_item()
            .table_name(&self.name)
            .item("leaseKey", s(&lease.key))
            .item("leaseCounter", n(0))
            .item("checkpoint", s(lease.checkpoint.to_string()))
            .item("checkpointSubSequenceNumber", n(0))
            .item("ownerSwitchesSinceCheckpoint", n(0))
            .condition_expression("attribute_not_exists(leaseKey)");
        if !lease.parents.is_empty() {
            request = request.item("parentShardId", AttributeValue::Ss(lease.parents.clone()));
        }
        if let Some(start) = &lease.starting_hash_key {
            request = request.item("startingHashKey", s(start));
        }
        if let Some(end) = &lease.ending_hash_key {
            request = request.item("endingHashKey", s(end));
        }
        match request.send().await {
            Ok(_) => Ok(true),
            Err(err) if is_condition_failure(&err) => Ok(false),
            Err(err) => Err(self.failed("PutItem", err)),
        }
    }

    /// The counter after `counter`. An item at the top of the range (hostile or corrupt) is
    /// refused with its key: never wrapped, never a panic.
    fn next_counter(&self, key: &str, counter: u64) -> Result<u64, LeaseError> {
        next_counter(&self.name, key, counter)
    }

    /// Takes a lease whose counter is `expected` (free, expired, or stolen). Returns the new counter.
    async fn take(&self, key: &str, expected: u64, me: &str) -> Result<u64, LeaseError> {
        let next = self.next_counter(key, expected)?;
        self.conditional(
            key,
            "SET leaseOwner = :me, leaseCounter = :next ADD ownerSwitchesSinceCheckpoint :one",
            "leaseCounter = :expected",
            &[(":me", s(me)), (":next", n(next)), (":one", n(1)), (":expected", n(expected))],
        )
        .await?;
        Ok(next)
    }

    /// Proves this worker is alive: bumps the counter it holds.
    async fn renew(&self, key: &str, counter: u64, me: &str) -> Result<u64, LeaseError> {
        let next = self.next_counter(key, counter)?;
        self.conditional(
            key,
            "SET leaseCounter = :next",
            "leaseCounter = :expected AND leaseOwner = :me",
            &[(":next", n(next)), (":expected", n(counter)), (":me", s(me))],
        )
        .await?;
        Ok(next)
    }

    /// A checkpoint, destination positions, or both, on a held lease.
    async fn write_checkpoint(
        &self,
        key: &str,
        counter: u64,
        me: &str,
        write: &CheckpointWrite<'_>,
    ) -> Result<u64, LeaseError> {
        let next = self.next_counter(key, counter)?;
        let mut values = vec![(":next", n(next)), (":expected", n(counter)), (":me", s(me))];
        let mut update = "SET leaseCounter = :next".to_string();
        if let Some(position) = write.position {
            update.push_str(
                ", checkpoint = :cp, checkpointSubSequenceNumber = :zero, ownerSwitchesSinceCheckpoint = :zero",
            );
            values.push((":cp", s(position.to_string())));
            values.push((":zero", n(0)));
        }
        if !write.children.is_empty() {
            update.push_str(", childShardIds = :children");
            values.push((":children", AttributeValue::Ss(write.children.to_vec())));
        }
        if let Some(destinations) = write.destinations {
            update.push_str(", destinationCheckpoints = :destinations");
            let map = destinations.iter().map(|(arn, seq)| (arn.clone(), s(seq.as_str()))).collect();
            values.push((":destinations", AttributeValue::M(map)));
        }
        self.conditional(key, &update, "leaseCounter = :expected AND leaseOwner = :me", &values).await?;
        Ok(next)
    }

    /// Gives a lease up so that another worker takes it at once.
    async fn release(&self, key: &str, counter: u64, me: &str) -> Result<(), LeaseError> {
        let next = self.next_counter(key, counter)?;
        self.conditional(
            key,
            "REMOVE leaseOwner SET leaseCounter = :next",
            "leaseCounter = :expected AND leaseOwner = :me",
            &[(":next", n(next)), (":expected", n(counter)), (":me", s(me))],
        )
        .await
    }

    /// Deletes a lease read to its end (conditional on `SHARD_END`, so nothing else is ever
    /// deleted). Returns false when it was gone or changed already.
    async fn delete_finished(&self, key: &str) -> Result<bool, LeaseError> {
        let deleted = self
            .client()
            .delete_item()
            .table_name(&self.name)
            .key("leaseKey", s(key))
            .condition_expression("checkpoint = :end")
            .expression_attribute_values(":end", s(Position::ShardEnd.to_string()))
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(true),
            Err(err) if is_condition_failure(&err) => Ok(false),
            Err(err) => Err(self.failed("DeleteItem", err)),
        }
    }

    async fn conditional(
        &self,
        key: &str,
        update: &str,
        condition: &str,
        values: &[(&str, AttributeValue)],
    ) -> Result<(), LeaseError> {
        let mut request = self
            .client()
            .update_item()
            .table_name(&self.name)
            .key("leaseKey", s(key))
            .update_expression(update)
            .condition_expression(condition);
        for (name, value) in values {
            request = request.expression_attribute_values(*name, value.clone());
        }
        match request.send().await {
            Ok(_) => Ok(()),
            Err(err) if is_condition_failure(&err) => Err(LeaseError::Lost { shard: key.to_string() }),
            Err(err) => Err(self.failed("UpdateItem", err)),
        }
    }
}

fn is_condition_failure<E: aws_sdk_dynamodb::error::ProvideErrorMetadata, R>(
    err: &aws_sdk_dynamodb::error::SdkError<E, R>,
) -> bool {
    crate::aws::error_code(err) == "ConditionalCheckFailedException"
}

impl LeaseStore for DynamoDbLeases {
    fn name(&self) -> &str {
        &self.name
    }

    fn ensure(&self, create: bool) -> BoxFuture<'_, Result<(), LeaseError>> {
        Box::pin(self.ensure(create))
    }

    fn note<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, LeaseError>> {
        Box::pin(self.note(key))
    }

    fn set_note<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), LeaseError>> {
        Box::pin(self.set_note(key, value))
    }

    fn scan(&self, consistent: bool) -> BoxFuture<'_, Result<Scanned, LeaseError>> {
        Box::pin(self.scan_all(consistent))
    }

    fn create_if_absent<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(self.create_if_absent(lease))
    }

    fn take<'a>(&'a self, key: &'a str, expected: u64, me: &'a str) -> BoxFuture<'a, Result<u64, LeaseError>> {
        Box::pin(self.take(key, expected, me))
    }

    fn renew<'a>(&'a self, key: &'a str, counter: u64, me: &'a str) -> BoxFuture<'a, Result<u64, LeaseError>> {
        Box::pin(self.renew(key, counter, me))
    }

    fn write_checkpoint<'a>(
        &'a self,
        key: &'a str,
        counter: u64,
        me: &'a str,
        write: &'a CheckpointWrite<'a>,
    ) -> BoxFuture<'a, Result<u64, LeaseError>> {
        Box::pin(self.write_checkpoint(key, counter, me, write))
    }

    fn release<'a>(&'a self, key: &'a str, counter: u64, me: &'a str) -> BoxFuture<'a, Result<(), LeaseError>> {
        Box::pin(self.release(key, counter, me))
    }

    fn delete_finished<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, LeaseError>> {
        Box::pin(self.delete_finished(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offline_table() -> DynamoDbLeases {
        DynamoDbLeases::new(
            aws_sdk_dynamodb::Client::from_conf(aws_sdk_dynamodb::Config::builder().behavior_version_latest().build()),
            "t",
        )
    }

    #[tokio::test]
    async fn a_counter_at_its_maximum_is_refused_without_a_panic() {
        let table = offline_table();
        for result in [
            table.take("k", u64::MAX, "me").await.map(|_| ()),
            table.renew("k", u64::MAX, "me").await.map(|_| ()),
            table.release("k", u64::MAX, "me").await,
        ] {
            let err = result.expect_err("refused before any call");
            assert!(matches!(err, LeaseError::Malformed { .. }), "{err}");
            assert!(err.to_string().contains("lease k"), "{err}");
        }
    }
}
