//! The S3 adapter: the handful of object operations the sink needs, with errors that say what
//! was being done, where, and what to do about it.

use std::time::Duration;

use anyhow::{Context, bail};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;

/// S3 settings. Credentials come from the AWS default chain (`AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY`, a profile, or an instance/task role): never from a flag.
#[derive(clap::Args, Debug, Clone)]
pub struct S3Args {
    /// Bucket the results are written to (must exist).
    #[arg(long = "bucket", env = "S3_BUCKET_NAME", default_value = "")]
    pub bucket: String,

    /// Key prefix for everything written (a trailing / is added when missing).
    #[arg(long = "s3-prefix", env = "S3_PREFIX", default_value = "")]
    pub prefix: String,

    /// S3-compatible endpoint (MinIO, ...), e.g. http://localhost:9000; unset for AWS S3.
    /// Path-style addressing is used whenever it is set.
    #[arg(long = "s3-endpoint", env = "S3_ENDPOINT")]
    pub endpoint: Option<String>,

    /// AWS region of the bucket.
    #[arg(long = "region", env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
}

/// What went wrong with one object operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional write lost: someone else changed the object first.
    #[error("precondition failed on {key}: the object was changed by another writer")]
    Conflict { key: String },
    /// Anything else (network, throttling, server, permissions): retried by the caller.
    #[error("{op} s3://{bucket}/{key} failed: {message}")]
    Other {
        op: &'static str,
        bucket: String,
        key: String,
        message: String,
    },
}

/// Which version of an object a write expects to replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Overwrite whatever is there.
    Any,
    /// The object must not exist yet.
    Absent,
    /// The object must still have this ETag.
    ETag(String),
}

#[derive(Clone, Debug)]
pub struct Store {
    client: Client,
    bucket: String,
    /// For messages: where the bucket lives.
    endpoint: String,
    /// Over TLS the body is not hashed for the signature (SHA-256 of every batch was the
    /// largest CPU cost of a write); TLS and the CRC32 checksum the SDK sends still protect it.
    /// Over plain HTTP the signed hash is the only integrity check, so it stays.
    unsigned_payload: bool,
}

impl Store {
    pub async fn connect(args: &S3Args) -> anyhow::Result<Store> {
        if args.bucket.trim().is_empty() {
            bail!("S3_BUCKET_NAME is empty: set it to the bucket the results go to");
        }
        let endpoint = ticket_kafka::non_empty(&args.endpoint);
        if let Some(ep) = endpoint
            && !(ep.starts_with("http://") || ep.starts_with("https://"))
        {
            bail!("S3_ENDPOINT must be a URL such as http://minio:9000, got {ep:?}");
        }
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(args.region.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .build(),
            )
            .load()
            .await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared);
        if let Some(ep) = endpoint {
            conf = conf.endpoint_url(ep).force_path_style(true);
        }
        Ok(Store {
            client: Client::from_conf(conf.build()),
            bucket: args.bucket.clone(),
            endpoint: endpoint
                .map(str::to_string)
                .unwrap_or_else(|| format!("AWS S3 ({})", args.region)),
            unsigned_payload: endpoint.is_none_or(|ep| ep.starts_with("https://")),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Checks at start that the bucket exists and that we may write and delete in it, and
    /// says what to fix when not.
    pub async fn check_writable(&self, prefix: &str) -> anyhow::Result<()> {
        let where_ = format!("bucket {:?} at {}", self.bucket, self.endpoint);
        if let Err(e) = self.client.head_bucket().bucket(&self.bucket).send().await {
            let status = e.raw_response().map(|r| r.status().as_u16());
            match status {
                Some(404) => bail!("{where_} does not exist (create it, or set S3_BUCKET_NAME)"),
                Some(301 | 400) => {
                    bail!("{where_} is in another region (set AWS_REGION to the bucket's region)")
                }
                Some(401 | 403) => bail!(
                    "{where_} refused our credentials (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the role's permissions)"
                ),
                _ => bail!(
                    "cannot reach {where_}: {} (check S3_ENDPOINT and that the server is up)",
                    describe(&e)
                ),
            }
        }
        let probe = format!("{prefix}_checkpoints/.write-check-{}", uuid::Uuid::new_v4());
        self.put(&probe, b"ok".to_vec(), Expect::Any)
            .await
            .with_context(|| {
                format!("{where_} is not writable (grant s3:PutObject on {prefix}*)")
            })?;
        self.delete(&probe).await.with_context(|| {
            format!("{where_}: cannot delete (grant s3:DeleteObject on {prefix}*)")
        })?;
        Ok(())
    }

    /// The object's bytes and ETag, or `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, String)>, StoreError> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {
                return Ok(None);
            }
            Err(e) => return Err(self.other("GET", key, describe(&e))),
        };
        let etag = out.e_tag().unwrap_or_default().to_string();
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| self.other("GET", key, e.to_string()))?;
        Ok(Some((body.into_bytes().to_vec(), etag)))
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(false),
            Err(e) => Err(self.other("HEAD", key, describe(&e))),
        }
    }

    /// Writes an object, conditionally; returns its new ETag.
    pub async fn put(
        &self,
        key: &str,
        body: Vec<u8>,
        expect: Expect,
    ) -> Result<String, StoreError> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(if key.ends_with(".json") {
                "application/json"
            } else {
                "application/x-ndjson"
            })
            .body(ByteStream::from(body));
        req = match expect {
            Expect::Any => req,
            Expect::Absent => req.if_none_match("*"),
            Expect::ETag(etag) => req.if_match(etag),
        };
        let mut req = req.customize();
        if self.unsigned_payload {
            req = req.disable_payload_signing();
        }
        match req.send().await {
            Ok(out) => Ok(out.e_tag().unwrap_or_default().to_string()),
            Err(e)
                if e.raw_response()
                    .is_some_and(|r| matches!(r.status().as_u16(), 409 | 412)) =>
            {
                Err(StoreError::Conflict {
                    key: key.to_string(),
                })
            }
            Err(e) => Err(self.other("PUT", key, describe(&e))),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.other("DELETE", key, describe(&e)))
    }

    /// Every key under `prefix`, following pagination.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.other("LIST", prefix, describe(&e)))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
        }
        Ok(keys)
    }

    fn other(&self, op: &'static str, key: &str, message: String) -> StoreError {
        StoreError::Other {
            op,
            bucket: self.bucket.clone(),
            key: key.to_string(),
            message,
        }
    }
}

/// The useful part of an SDK error: the service's code and message, or the transport failure.
fn describe<E: std::error::Error + 'static, R: std::fmt::Debug>(e: &SdkError<E, R>) -> String {
    match e {
        SdkError::ServiceError(s) => {
            let mut msg = s.err().to_string();
            if msg.is_empty() || msg == "unhandled error" {
                msg = format!("{:?}", s.raw());
            }
            msg
        }
        SdkError::DispatchFailure(d) => {
            let kind = if d.is_timeout() {
                "timeout"
            } else if d.is_io() {
                "connection failed"
            } else {
                "dispatch failure"
            };
            format!(
                "{kind}: {:?}",
                d.as_connector_error().map(|c| c.to_string())
            )
        }
        SdkError::TimeoutError(_) => "timed out".to_string(),
        other => {
            let mut s = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(cause) = src {
                s.push_str(": ");
                s.push_str(&cause.to_string());
                src = cause.source();
            }
            s
        }
    }
}
