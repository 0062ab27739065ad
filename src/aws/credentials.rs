//! Whose credentials sign each place's calls: the service's own (the SDK's default chain: the
//! task role on ECS), or a role assumed through STS with the SDK's own provider, which caches the
//! session and refreshes it before it expires.
//!
//! A failed refresh is counted (`kinesis_fanout_credential_refresh_errors_total{group}`), shown on
//! `/readyz`, and retried by the next call: the calls that needed it fail as retryable errors, so
//! a destination holds its records (and a reader resubscribes) until STS answers again.

use std::sync::Arc;

use aws_config::sts::AssumeRoleProvider;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider, future};

use crate::config::AssumeRole;
use crate::health::Health;
use crate::metrics::Metrics;

/// Where roles are assumed, and who reports on it.
#[derive(Clone)]
pub struct Identities {
    pub sdk: aws_config::SdkConfig,
    /// `[aws] sts_endpoint_url`.
    pub sts_endpoint_url: Option<String>,
    /// The default session name's suffix.
    pub worker: String,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

impl Identities {
    /// The credentials for a place's role (`None`: the SDK's own). `group` names the place in
    /// metrics and on `/readyz` (`source`, `checkpoint`, `destinations[N]`).
    pub async fn provider(
        &self,
        role: Option<&AssumeRole>,
        region: Option<&str>,
        group: &str,
    ) -> Option<SharedCredentialsProvider> {
        let role = role?;
        let mut sts = self.sdk.to_builder();
        if let Some(url) = &self.sts_endpoint_url {
            sts.set_endpoint_url(Some(url.clone()));
        }
        // The provider times its sessions and backs off between attempts: a configuration
        // built by hand (tests, embedders) may lack the clock and the sleep it needs.
        if self.sdk.time_source().is_none() {
            sts.set_time_source(Some(aws_smithy_async::time::SharedTimeSource::default()));
        }
        if self.sdk.sleep_impl().is_none() {
            sts.set_sleep_impl(aws_smithy_async::rt::sleep::default_async_sleep());
        }
        let session = role.session_name.clone().unwrap_or_else(|| session_name(&self.worker));
        let mut builder = AssumeRoleProvider::builder(role.role_arn.clone()).session_name(session);
        if let Some(id) = &role.external_id {
            builder = builder.external_id(id.clone());
        }
        if let Some(region) = region {
            builder = builder.region(aws_config::Region::new(region.to_string()));
        }
        let inner = builder.configure(&sts.build()).build().await;
        tracing::info!(group, role = %role.role_arn, "Calls of this group are signed with an assumed role.");
        Some(SharedCredentialsProvider::new(Watched {
            inner,
            group: group.to_string(),
            metrics: Arc::clone(&self.metrics),
            health: Arc::clone(&self.health),
        }))
    }
}

/// `kinesis-fanout-<worker id>`, cut to the 64 characters STS allows, in its alphabet.
fn session_name(worker: &str) -> String {
    let clean: String =
        worker.chars().map(|c| if c.is_ascii_alphanumeric() || "=,.@-_".contains(c) { c } else { '-' }).collect();
    format!("kinesis-fanout-{clean}").chars().take(64).collect()
}

/// An assumed role's provider whose failures are counted and shown.
#[derive(Debug)]
struct Watched {
    inner: AssumeRoleProvider,
    group: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl ProvideCredentials for Watched {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            match self.inner.provide_credentials().await {
                Ok(credentials) => {
                    self.health.credentials(&self.group, None);
                    Ok(credentials)
                }
                Err(err) => {
                    let cause = super::chain(&err);
                    self.metrics.credential_refresh_errors.with_label_values(&[&self.group]).inc();
                    self.health.credentials(&self.group, Some(cause.clone()));
                    tracing::warn!(group = %self.group, error = %cause, "Could not assume the role; calls of this group wait and try again.");
                    Err(err)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_stay_within_what_sts_accepts() {
        assert_eq!(session_name("task/abc 1"), "kinesis-fanout-task-abc-1");
        assert_eq!(session_name(&"x".repeat(100)).len(), 64);
    }
}
