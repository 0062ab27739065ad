//! The AWS edge: SDK clients for the roles the service plays, built here only; one place that
//! decides what an SDK error means (retry later, gone, or never going to work); and every Kinesis
//! call in [`kinesis`]. DynamoDB calls live with the lease table (`lease::table`).

pub mod credentials;
pub mod kinesis;

use std::time::Duration;

use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::config::timeout::TimeoutConfig;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};

use crate::config::AwsSettings;

/// Kinesis clients tuned per role.
#[derive(Debug, Clone)]
pub struct KinesisClients {
    /// Describe/List/Register calls: SDK retries on, short timeouts.
    pub control: aws_sdk_kinesis::Client,
    /// PutRecords: one attempt per call, since the sink retries exactly the failed records itself.
    pub writer: aws_sdk_kinesis::Client,
    /// SubscribeToShard: no operation timeout (a session streams for up to five minutes).
    pub subscriber: aws_sdk_kinesis::Client,
}

impl KinesisClients {
    /// Builds the clients from an SDK config (from the default chain, or a test's own).
    /// `put_attempt_timeout` bounds one PutRecords attempt (see `Settings::put_attempt_timeout`).
    /// `credentials`: the place's assumed role ([`credentials::Identities`]); `None`: the SDK's own.
    pub fn new(
        sdk: &aws_config::SdkConfig,
        settings: &AwsSettings,
        credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
        put_attempt_timeout: Duration,
    ) -> Self {
        let mut base = aws_sdk_kinesis::config::Builder::from(sdk);
        if let Some(credentials) = credentials {
            base = base.credentials_provider(credentials);
        }
        if let Some(region) = &settings.region {
            base = base.region(aws_sdk_kinesis::config::Region::new(region.clone()));
        }
        if let Some(url) = &settings.endpoint_url {
            base = base.endpoint_url(url.clone());
        }
        let control = base
            .clone()
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .operation_timeout(Duration::from_secs(30))
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(4))
            .build();
        let writer = base
            .clone()
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(put_attempt_timeout)
                    .build(),
            )
            .retry_config(RetryConfig::disabled())
            .build();
        let subscriber = base
            .timeout_config(TimeoutConfig::builder().connect_timeout(Duration::from_secs(3)).build())
            .retry_config(RetryConfig::disabled())
            .build();
        KinesisClients {
            control: aws_sdk_kinesis::Client::from_conf(control),
            writer: aws_sdk_kinesis::Client::from_conf(writer),
            subscriber: aws_sdk_kinesis::Client::from_conf(subscriber),
        }
    }
}

/// A call that failed: what it means, its error code, and its whole cause chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{cause}")]
pub struct CallError {
    pub kind: ErrorKind,
    /// The service's error code (or `Timeout`, `Dispatch`, ...), for metrics labels and logs.
    pub code: String,
    pub cause: String,
}

impl CallError {
    pub fn from_sdk<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug + 'static>(
        err: &SdkError<E, R>,
    ) -> Self {
        CallError { kind: classify(err), code: error_code(err), cause: chain(err) }
    }
}

/// The DynamoDB client of the lease table. A call must not outlast a renewal period: a stuck
/// table is noticed while leases can still be proven, and the watchdog stops shards whose leases
/// cannot.
pub fn dynamodb_client(
    sdk: &aws_config::SdkConfig,
    aws: &AwsSettings,
    credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
    lease: &crate::config::LeaseSettings,
) -> aws_sdk_dynamodb::Client {
    use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
    let budget = (lease.failover_time / 3).clamp(Duration::from_millis(300), Duration::from_secs(5));
    let mut config = aws_sdk_dynamodb::config::Builder::from(sdk).timeout_config(
        TimeoutConfig::builder()
            .connect_timeout(budget.min(Duration::from_secs(2)))
            .operation_attempt_timeout(budget / 2)
            .operation_timeout(budget)
            .build(),
    );
    if let Some(region) = &aws.region {
        config = config.region(aws_sdk_dynamodb::config::Region::new(region.clone()));
    }
    if let Some(credentials) = credentials {
        config = config.credentials_provider(credentials);
    }
    // The Kinesis endpoint override must not leak into DynamoDB: it has its own.
    config.set_endpoint_url(lease.endpoint_url.clone());
    aws_sdk_dynamodb::Client::from_conf(config.build())
}

/// What an error means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Throttling, a 5xx, a dropped connection, a timeout: the same call can succeed later.
    Transient,
    /// Another subscription is still open for this shard and consumer: wait, then try again.
    InUse,
    /// The stream (or consumer) does not exist.
    NotFound,
    /// Access denied, KMS, validation: retrying the same request cannot succeed.
    Permanent,
}

/// Error codes that no amount of retrying fixes.
const PERMANENT_CODES: &[&str] = &[
    "AccessDeniedException",
    "ValidationException",
    "InvalidArgumentException",
    "KMSDisabledException",
    "KMSInvalidStateException",
    "KMSAccessDeniedException",
    "KMSNotFoundException",
    "KMSOptInRequired",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "MissingAuthenticationTokenException",
    "IncompleteSignature",
];

/// Classifies an error code (a whole request's, or one PutRecords entry's).
/// Unknown codes are transient: retrying an unknown failure is safer than giving up on a record.
pub fn classify_code(code: Option<&str>) -> ErrorKind {
    match code {
        Some("ResourceNotFoundException") => ErrorKind::NotFound,
        Some("ResourceInUseException") => ErrorKind::InUse,
        Some(code) if PERMANENT_CODES.contains(&code) => ErrorKind::Permanent,
        _ => ErrorKind::Transient,
    }
}

/// Classifies any SDK error.
pub fn classify<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug + 'static>(
    err: &SdkError<E, R>,
) -> ErrorKind {
    match err {
        SdkError::ServiceError(service) => classify_code(service.err().code()),
        // Credentials that could not be had (a role STS would not let us assume yet) are a
        // failure to build the request, but the next try can succeed.
        SdkError::ConstructionFailure(_) if about_credentials(err) => ErrorKind::Transient,
        SdkError::ConstructionFailure(_) => ErrorKind::Permanent,
        // Timeouts, connection failures and unparsable responses all deserve another try.
        _ => ErrorKind::Transient,
    }
}

/// Whether an error was caused by credentials that could not be loaded.
fn about_credentials(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if e.downcast_ref::<aws_credential_types::provider::error::CredentialsError>().is_some() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The error code of an SDK error, for metrics labels and logs.
pub fn error_code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> String {
    match err {
        SdkError::ServiceError(service) => service.err().code().unwrap_or("Unknown").to_string(),
        SdkError::TimeoutError(_) => "Timeout".into(),
        SdkError::DispatchFailure(_) => "Dispatch".into(),
        SdkError::ResponseError(_) => "BadResponse".into(),
        _ => "Client".into(),
    }
}

/// Renders an error with its whole cause chain on one line.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        assert_eq!(classify_code(Some("ProvisionedThroughputExceededException")), ErrorKind::Transient);
        assert_eq!(classify_code(Some("InternalFailure")), ErrorKind::Transient);
        assert_eq!(classify_code(Some("KMSThrottlingException")), ErrorKind::Transient);
        assert_eq!(classify_code(Some("KMSAccessDeniedException")), ErrorKind::Permanent);
        assert_eq!(classify_code(Some("AccessDeniedException")), ErrorKind::Permanent);
        assert_eq!(classify_code(Some("ResourceNotFoundException")), ErrorKind::NotFound);
        assert_eq!(classify_code(Some("ResourceInUseException")), ErrorKind::InUse);
        assert_eq!(classify_code(None), ErrorKind::Transient);
    }
}
