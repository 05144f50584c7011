//! The bucket through `object_store` (DataFusion's reads, the Delta table's log), with the
//! same endpoint, region, CA bundle and credentials chain as the AWS SDK client.

use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use object_store::aws::{AmazonS3Builder, AwsCredential};
use object_store::{CredentialProvider, ObjectStore};
use tokio::sync::Mutex;

use crate::S3Args;

/// Who retries a failed request of the client [`object_store`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retries {
    /// `object_store`'s own policy (10 retries, backoff up to 15 s, within 3 minutes): for the
    /// commands that have no retry loop of their own (`query`, `report`, `compact`).
    Client,
    /// None: every request is made once and the caller's retry loop decides (the streaming
    /// processor's and `process-file`'s Delta backfill's `ticket_commit::retry`), so that the two layers do not stack and an outage
    /// is seen, logged and waited out in one place.
    Caller,
}

/// The bucket through `object_store`, with the processor's endpoint, region and credentials.
pub async fn object_store(args: &S3Args, retries: Retries) -> anyhow::Result<Arc<dyn ObjectStore>> {
    if args.bucket.trim().is_empty() {
        anyhow::bail!(
            "S3_BUCKET_NAME is empty: set it to the bucket the results are in (or use --dir)"
        );
    }
    let sdk = crate::sdk_config(args).await?;
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&args.bucket)
        .with_region(&args.region);
    if retries == Retries::Caller {
        builder = builder.with_retry(object_store::RetryConfig {
            max_retries: 0,
            ..Default::default()
        });
    }
    if let Some(pem) = args.ca_pem()? {
        let mut options = object_store::ClientOptions::new();
        for cert in object_store::Certificate::from_pem_bundle(&pem)
            .context("AWS_CA_BUNDLE: not a PEM certificate bundle")?
        {
            options = options.with_root_certificate(cert);
        }
        builder = builder.with_client_options(options);
    }
    if let Some(ep) = args.endpoint() {
        builder = builder
            .with_endpoint(ep)
            .with_allow_http(ep.starts_with("http://"))
            .with_virtual_hosted_style_request(false);
    }
    match sdk.credentials_provider() {
        Some(provider) => {
            builder = builder.with_credentials(Arc::new(SdkCredentials {
                provider,
                cached: Mutex::new(None),
            }));
        }
        None => builder = builder.with_skip_signature(true),
    }
    Ok(Arc::new(builder.build().context("S3 settings")?))
}

/// The AWS SDK's credentials chain (environment, profile, role), for `object_store`: the
/// same credentials the processor writes with. Cached until five minutes before they expire.
#[derive(Debug)]
struct SdkCredentials {
    provider: aws_sdk_s3::config::SharedCredentialsProvider,
    cached: Mutex<Option<(Arc<AwsCredential>, Option<SystemTime>)>>,
}

#[async_trait::async_trait]
impl CredentialProvider for SdkCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        use aws_sdk_s3::config::ProvideCredentials;
        let mut cached = self.cached.lock().await;
        let fresh = |expiry: &Option<SystemTime>| {
            expiry.is_none_or(|at| SystemTime::now() + std::time::Duration::from_secs(300) < at)
        };
        if let Some((c, expiry)) = cached.as_ref()
            && fresh(expiry)
        {
            return Ok(c.clone());
        }
        let c = self
            .provider
            .provide_credentials()
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: format!("no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a role): {e}").into(),
            })?;
        let credential = Arc::new(AwsCredential {
            key_id: c.access_key_id().to_string(),
            secret_key: c.secret_access_key().to_string(),
            token: c.session_token().map(str::to_string),
        });
        *cached = Some((credential.clone(), c.expiry()));
        Ok(credential)
    }
}
