//! `ticket-s3`: the S3 adapter, the handful of object operations the committers need, with
//! errors that say what was being done, where, and what to do about it; the settings and HTTP
//! client every S3 caller shares (the reading side's `object_store` takes the same settings);
//! and [`store`], the interface the committers are written against, with an in-memory store for
//! tests.

pub mod memory_objects;
mod objects;
pub mod store;

pub use objects::{Retries, object_store};

use std::time::Duration;

use anyhow::{Context, bail};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::primitives::ByteStream;
use futures::future::BoxFuture;

use crate::store::{Expect, Object, ObjectStore, StoreError, StoreResult};

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

    /// PEM file of certificate authorities to trust for S3 over HTTPS, besides the system's:
    /// a private CA that signed MinIO's certificate, say (the variable the AWS CLI reads).
    /// Empty: unset.
    #[arg(long = "s3-ca-bundle", env = "AWS_CA_BUNDLE")]
    pub ca_bundle: Option<String>,
}

impl S3Args {
    /// `S3_ENDPOINT`, unless it is unset or blank (AWS S3).
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref().filter(|s| !s.trim().is_empty())
    }

    /// The certificates of `AWS_CA_BUNDLE` (PEM), if it is set: an error that names the
    /// setting if the file cannot be read or holds no certificate.
    pub fn ca_pem(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(path) = self.ca_bundle.as_deref().filter(|p| !p.trim().is_empty()) else {
            return Ok(None);
        };
        let pem = std::fs::read(path)
            .with_context(|| format!("AWS_CA_BUNDLE={path}: cannot read the file"))?;
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            bail!(
                "AWS_CA_BUNDLE={path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)"
            );
        }
        Ok(Some(pem))
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    client: Client,
    bucket: String,
    /// For messages: where the bucket lives.
    endpoint: String,
    /// Over TLS the body is not hashed for the signature (SHA-256 of every batch was the
    /// largest CPU cost of a write); TLS and the CRC32C checksum sent with each PUT still
    /// protect it.
    /// Over plain HTTP the signed hash is the only integrity check, so it stays.
    unsigned_payload: bool,
    /// `S3_PREFIX`, for the permissions a refusal names.
    prefix_hint: String,
}

/// The HTTP client of every AWS call (S3 and the credentials chain): hyper 1 with rustls on
/// ring, the crypto provider `object_store` already uses (the SDK's default client would add
/// aws-lc, a C build, to the tree), the system's root certificates, and HTTP(S)_PROXY/NO_PROXY
/// from the environment as the SDK's default client reads them. `ca_pem`: certificate
/// authorities to trust besides the system's (`AWS_CA_BUNDLE`).
pub fn http_client(ca_pem: Option<&[u8]>) -> anyhow::Result<aws_sdk_s3::config::SharedHttpClient> {
    use aws_smithy_http_client::tls::{
        Provider, TlsContext, TrustStore, rustls_provider::CryptoMode,
    };
    use aws_smithy_http_client::{Builder, ConnectorBuilder, proxy::ProxyConfig};
    let mut trust = TrustStore::default();
    if let Some(pem) = ca_pem {
        trust.add_pem_certificate(pem);
    }
    let tls = TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| anyhow::anyhow!("the TLS settings for S3 (AWS_CA_BUNDLE): {e}"))?;
    Ok(
        Builder::new().build_with_connector_fn(move |settings, components| {
            let mut conn =
                ConnectorBuilder::default().tls_provider(Provider::Rustls(CryptoMode::Ring));
            conn.set_tls_context(tls.clone());
            conn.set_connector_settings(settings.cloned());
            if let Some(components) = components {
                conn.set_sleep_impl(components.sleep_impl());
            }
            conn.set_proxy_config(Some(ProxyConfig::from_env()));
            conn.build()
        }),
    )
}

/// The AWS settings of the processor: region, the default credentials chain, timeouts.
pub async fn sdk_config(args: &S3Args) -> anyhow::Result<aws_config::SdkConfig> {
    let http = http_client(args.ca_pem()?.as_deref())?;
    Ok(aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .region(aws_config::Region::new(args.region.clone()))
        // One retry layer only: the streaming side's own (`ticket_commit::Retrier`)
        // decides what is worth retrying and for how long, so the SDK makes each request once.
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        )
        .load()
        .await)
}

impl Store {
    pub async fn connect(args: &S3Args) -> anyhow::Result<Store> {
        if args.bucket.trim().is_empty() {
            bail!("S3_BUCKET_NAME is empty: set it to the bucket the results go to");
        }
        let endpoint = args.endpoint();
        if let Some(ep) = endpoint
            && !(ep.starts_with("http://") || ep.starts_with("https://"))
        {
            bail!("S3_ENDPOINT must be a URL such as http://minio:9000, got {ep:?}");
        }
        let shared = sdk_config(args).await?;
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
            prefix_hint: args.prefix.trim_start_matches('/').to_string(),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Checks that the bucket exists and answers us (HEAD bucket), and says what to fix when
    /// not: a wrong endpoint, region, credentials, or a TLS certificate not trusted.
    pub async fn check_reachable(&self) -> anyhow::Result<()> {
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
        Ok(())
    }

    /// Checks at start that the bucket exists and that we may write and delete in it, and
    /// says what to fix when not.
    pub async fn check_writable(&self, prefix: &str) -> anyhow::Result<()> {
        self.check_reachable().await?;
        let where_ = format!("bucket {:?} at {}", self.bucket, self.endpoint);
        let probe = format!("{prefix}_checkpoints/.write-check-{}", uuid::Uuid::new_v4());
        self.put(&probe, bytes::Bytes::from_static(b"ok"), Expect::Any)
            .await
            .with_context(|| {
                format!("{where_} is not writable (grant s3:PutObject on {prefix}*)")
            })?;
        self.delete(&probe).await.with_context(|| {
            format!("{where_}: cannot delete (grant s3:DeleteObject on {prefix}*)")
        })?;
        Ok(())
    }

    fn location_of(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// Sorts an SDK error into what the retry loop needs: transient, permanent (with what to
    /// fix), or a lost conditional write.
    fn classify<E>(&self, op: &'static str, key: &str, e: &SdkError<E, HttpResponse>) -> StoreError
    where
        E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + 'static,
    {
        let location = self.location_of(key);
        let message = describe(e);
        let status = e.raw_response().map(|r| r.status().as_u16());
        let code = match e {
            SdkError::ServiceError(s) => s.err().code().map(str::to_string),
            _ => None,
        };
        let permanent = |hint: String| StoreError::Permanent {
            op,
            location: location.clone(),
            message: message.clone(),
            hint,
        };
        let permission = match op {
            "GET" | "HEAD" => "s3:GetObject",
            "LIST" => "s3:ListBucket",
            "DELETE" => "s3:DeleteObject",
            "COPY" => "s3:GetObject and s3:PutObject",
            _ => "s3:PutObject",
        };
        match (status, code.as_deref()) {
            (Some(409 | 412), _) if op == "PUT" => StoreError::Conflict {
                key: key.to_string(),
            },
            (Some(401 | 403), _) => permanent(format!(
                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or grant {permission} on {}/{}*",
                self.bucket, self.prefix_hint
            )),
            (Some(404), Some("NoSuchBucket")) => permanent(format!(
                "create bucket {:?} or set S3_BUCKET_NAME",
                self.bucket
            )),
            (Some(301), _) => permanent("set AWS_REGION to the bucket's region".to_string()),
            // A body damaged on the way (its checksum or length does not match what was
            // sent): S3 stored nothing; the same body sent again is the cure.
            (
                Some(400),
                Some(
                    "BadDigest"
                    | "InvalidDigest"
                    | "XAmzContentChecksumMismatch"
                    | "XAmzContentSHA256Mismatch"
                    | "IncompleteBody",
                ),
            ) => StoreError::Transient {
                op,
                location,
                message,
            },
            (Some(400), Some("RequestTimeout" | "ExpiredToken" | "TokenRefreshRequired")) => {
                StoreError::Transient {
                    op,
                    location,
                    message,
                }
            }
            (Some(400 | 404 | 405 | 411 | 413 | 501), _) => {
                permanent("the S3 server rejects this request; see its message".to_string())
            }
            _ if matches!(e, SdkError::ConstructionFailure(_)) => {
                permanent("the request could not be built; check the S3 settings".to_string())
            }
            // Network failures, timeouts, throttling (429, 503 SlowDown) and other 5xx.
            _ => StoreError::Transient {
                op,
                location,
                message,
            },
        }
    }
}

impl ObjectStore for Store {
    fn location(&self) -> String {
        format!("bucket {:?} at {}", self.bucket, self.endpoint)
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<Option<Object>>> {
        Box::pin(async move {
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(out) => out,
                // A missing object, not a missing bucket (which is a permanent error).
                Err(e)
                    if e.raw_response().is_some_and(|r| r.status().as_u16() == 404)
                        && e.as_service_error()
                            .and_then(|s| aws_sdk_s3::error::ProvideErrorMetadata::code(s))
                            != Some("NoSuchBucket") =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(self.classify("GET", key, &e)),
            };
            let etag = out.e_tag().unwrap_or_default().to_string();
            let body = out
                .body
                .collect()
                .await
                .map_err(|e| StoreError::Transient {
                    op: "GET",
                    location: self.location_of(key),
                    message: e.to_string(),
                })?;
            Ok(Some((body.into_bytes().to_vec(), etag)))
        })
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(async move {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(_) => Ok(true),
                // HEAD has no body, so no error code: a 404 is the object's.
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(false),
                Err(e) => Err(self.classify("HEAD", key, &e)),
            }
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        body: bytes::Bytes,
        expect: Expect,
    ) -> BoxFuture<'a, StoreResult<String>> {
        Box::pin(async move {
            let mut req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_type(content_type(key))
                // The server checks the body against it whether or not the payload is signed.
                .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32C)
                .checksum_crc32_c(aws_smithy_types::base64::encode(
                    crc32c::crc32c(&body).to_be_bytes(),
                ))
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
                Err(e) => Err(self.classify("PUT", key, &e)),
            }
        })
    }

    fn copy<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            self.client
                .copy_object()
                .bucket(&self.bucket)
                .copy_source(format!("{}/{}", self.bucket, encode_key(from)))
                .key(to)
                .content_type(content_type(to))
                .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.classify("COPY", to, &e))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(async move {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.classify("DELETE", key, &e))
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, StoreResult<Vec<String>>> {
        Box::pin(async move {
            let mut keys = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| self.classify("LIST", prefix, &e))?;
                keys.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key().map(str::to_string)),
                );
            }
            Ok(keys)
        })
    }
}

fn content_type(key: &str) -> &'static str {
    if key.ends_with(".json") {
        "application/json"
    } else if key.ends_with(".parquet") {
        "application/vnd.apache.parquet"
    } else {
        "application/x-ndjson"
    }
}

/// A key as the `x-amz-copy-source` header wants it: URL-encoded, `/` kept.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
            let mut chain = String::new();
            let mut src: Option<&(dyn std::error::Error + 'static)> =
                d.as_connector_error().map(|c| c as _);
            while let Some(cause) = src {
                let text = cause.to_string();
                if !chain.contains(&text) {
                    chain.push_str(": ");
                    chain.push_str(&text);
                }
                src = cause.source();
            }
            let mut msg = format!("{kind}{chain}");
            if msg.contains("certificate") || msg.contains("UnknownIssuer") {
                msg.push_str(
                    " (the server's TLS certificate is not trusted: if a private certificate authority signed it, set AWS_CA_BUNDLE to that CA's PEM file; if it names another host, S3_ENDPOINT must use a name the certificate lists)",
                );
            }
            msg
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
