//! An S3-protocol server and a fresh bucket: `S3_ENDPOINT`, or an s3s-fs server in this process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use tokio::net::TcpListener;

use super::{Proxy, unique};

pub const ACCESS_KEY: &str = "test-access-key";
pub const SECRET_KEY: &str = "test-secret-key";

/// An S3-protocol server and a fresh bucket for one test.
pub struct S3 {
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    pub client: Client,
    _dir: Option<tempfile::TempDir>,
    server: Option<tokio::task::JoinHandle<()>>,
    /// Writes (PUT, COPY) to keys under this prefix are refused with 403 AccessDenied, as a
    /// bucket policy would; `None` when the server is an external one.
    denied: Option<Arc<std::sync::Mutex<Option<String>>>>,
    /// PUT bodies the in-process server refused for a wrong CRC32C (400 BadDigest).
    bad_digests: Arc<std::sync::atomic::AtomicUsize>,
}

/// The in-process server's access control: everything allowed but writes under one prefix.
/// It also checks a PUT's body against its CRC32C before s3s-fs sees it, as S3 does: s3s-fs
/// 0.14 stores the body first and compares after, so a body damaged in flight would be
/// stored although the answer is 400 BadDigest. Counts the bodies it refused.
struct DenyWrites(
    Arc<std::sync::Mutex<Option<String>>>,
    Arc<std::sync::atomic::AtomicUsize>,
);

impl DenyWrites {
    fn check(&self, key: &str) -> s3s::S3Result<()> {
        let denied = self.0.lock().map(|d| d.clone()).unwrap_or_default();
        match denied {
            Some(prefix) if key.starts_with(&prefix) => Err(s3s::s3_error!(
                AccessDenied,
                "writes under {prefix} are denied"
            )),
            _ => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl s3s::access::S3Access for DenyWrites {
    async fn check(&self, _cx: &mut s3s::access::S3AccessContext<'_>) -> s3s::S3Result<()> {
        Ok(())
    }

    async fn put_object(
        &self,
        req: &mut s3s::S3Request<s3s::dto::PutObjectInput>,
    ) -> s3s::S3Result<()> {
        self.check(&req.input.key)?;
        // Only a body sent with its CRC32C (the processor's PUTs), taken only then.
        let Some(expected) = req.input.checksum_crc32c.clone() else {
            return Ok(());
        };
        let Some(mut body) = req.input.body.take() else {
            return Ok(());
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = futures::StreamExt::next(&mut body).await {
            bytes.extend_from_slice(&chunk.map_err(|e| s3s::s3_error!(IncompleteBody, "{e}"))?);
        }
        let crc = aws_smithy_types::base64::encode(crc32c::crc32c(&bytes).to_be_bytes());
        if crc != expected {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(s3s::s3_error!(
                BadDigest,
                "The CRC32C you specified did not match the calculated checksum."
            ));
        }
        req.input.body = Some(s3s::dto::StreamingBlob::from(s3s::Body::from(bytes)));
        Ok(())
    }

    async fn copy_object(
        &self,
        req: &mut s3s::S3Request<s3s::dto::CopyObjectInput>,
    ) -> s3s::S3Result<()> {
        self.check(&req.input.key)
    }
}

/// s3s-fs checks a write's If-Match / If-None-Match and then writes, with nothing in between:
/// two writers of one key can both pass (a stale owner's checkpoint, a second commit of one
/// Delta log version), and the key's checksum file can end up another write's, failing every
/// read. S3 decides writes to one key one at a time; so does this server: writes to one key
/// wait for each other (a full suite failed once on such a checkpoint before this).
#[derive(Clone, Default)]
struct KeyLocks(Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

impl KeyLocks {
    fn of(&self, path: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(path.to_string()).or_default().clone()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            s.abort();
        }
    }
}

impl S3 {
    pub async fn start() -> S3 {
        let bucket = unique("tickets");
        if let Ok(endpoint) = std::env::var("S3_ENDPOINT") {
            let ak = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_else(|_| "minioadmin".into());
            let sk = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|_| "minioadmin".into());
            let client = client(&endpoint, &ak, &sk).await;
            client
                .create_bucket()
                .bucket(&bucket)
                .send()
                .await
                .expect("create bucket");
            return S3 {
                endpoint,
                bucket,
                access_key: ak,
                secret_key: sk,
                client,
                _dir: None,
                server: None,
                denied: None,
                bad_digests: Arc::default(),
            };
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join(&bucket)).expect("bucket dir");
        let fs = s3s_fs::FileSystem::new(dir.path()).expect("s3s-fs");
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let denied = Arc::new(std::sync::Mutex::new(None));
        let bad_digests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        b.set_access(DenyWrites(denied.clone(), bad_digests.clone()));
        let service = b.build();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let locks = KeyLocks::default();
        let server = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                // As real S3 servers do (Go's net package, so MinIO, sets it by default):
                // without it a small response waits ~40 ms for the client's delayed ACK.
                let _ = socket.set_nodelay(true);
                let service = service.clone();
                let locks = locks.clone();
                let one_writer_per_key = hyper::service::service_fn(move |req| {
                    let service = service.clone();
                    let writes = ![hyper::Method::GET, hyper::Method::HEAD].contains(req.method());
                    let lock = writes.then(|| locks.of(req.uri().path()));
                    async move {
                        let _held = match &lock {
                            Some(l) => Some(l.lock().await),
                            None => None,
                        };
                        hyper::service::Service::call(&service, req).await
                    }
                });
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), one_writer_per_key)
                        .await;
                });
            }
        });
        let endpoint = format!("http://{addr}");
        let client = client(&endpoint, ACCESS_KEY, SECRET_KEY).await;
        S3 {
            endpoint,
            bucket,
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            client,
            _dir: Some(dir),
            server: Some(server),
            denied: Some(denied),
            bad_digests,
        }
    }

    /// The server's `host:port` (its endpoint without the scheme), for a proxy in front of it.
    pub fn host_port(&self) -> String {
        self.endpoint
            .split("://")
            .nth(1)
            .expect("an http:// endpoint")
            .trim_end_matches('/')
            .to_string()
    }

    /// How many PUT bodies the in-process server refused for a wrong CRC32C.
    pub fn bad_digests(&self) -> usize {
        self.bad_digests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A [`Proxy`] in front of the server, to cut it off: see [`super::Env::s3_endpoint`].
    pub async fn proxy(&self) -> Proxy {
        let addr: SocketAddr = self.host_port().parse().expect("s3 addr");
        Proxy::start(addr).await
    }

    /// Makes the server refuse writes under `prefix` (403), or allow them again with `None`.
    /// Returns false when the server is external and cannot be told to.
    pub fn deny_writes_under(&self, prefix: Option<&str>) -> bool {
        let Some(d) = &self.denied else { return false };
        if let Ok(mut d) = d.lock() {
            *d = prefix.map(str::to_string);
        }
        true
    }

    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        self.objects(prefix)
            .await
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    /// When the newest object under `prefix` whose key ends with `suffix` was written (its
    /// LastModified), if there is one.
    pub async fn newest(&self, prefix: &str, suffix: &str) -> Option<std::time::SystemTime> {
        self.objects(prefix)
            .await
            .into_iter()
            .filter(|(k, _)| k.ends_with(suffix))
            .filter_map(|(_, at)| at)
            .max()
    }

    /// Every object under `prefix`: its key and when it was written.
    async fn objects(&self, prefix: &str) -> Vec<(String, Option<std::time::SystemTime>)> {
        let mut objects = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.expect("list");
            objects.extend(page.contents().iter().filter_map(|o| {
                let at = o
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok());
                Some((o.key()?.to_string(), at))
            }));
        }
        objects
    }

    /// Writes an object (to set up a bucket as an earlier version left it).
    pub async fn put(&self, key: &str, body: Vec<u8>) {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .expect("put");
    }

    /// The object's bytes, or `None` if it does not exist. s3s-fs keeps an object's checksum
    /// beside it, so a read racing an overwrite can fail its checksum: such reads, and any
    /// other failed read, are retried (only "no such key" means absent).
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut last_error = String::new();
        // Up to 5 s: three processors may rewrite the counts object back to back.
        for _ in 0..100 {
            let read = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await;
            match read {
                Ok(out) => match out.body.collect().await {
                    Ok(body) => return Some(body.into_bytes().to_vec()),
                    Err(e) => last_error = e.to_string(),
                },
                Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => {
                    return None;
                }
                Err(e) => last_error = aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cannot read {key} consistently: {last_error}")
    }

    /// Every line of every object under `prefix`, parsed.
    pub async fn json_lines(&self, prefix: &str) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for key in self.keys(prefix).await {
            let body = self.get(&key).await.expect("object");
            for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                out.push(
                    serde_json::from_slice(line).unwrap_or_else(|e| panic!("{key}: bad line: {e}")),
                );
            }
        }
        out
    }
}

async fn client(endpoint: &str, ak: &str, sk: &str) -> Client {
    let creds = aws_sdk_s3::config::Credentials::new(ak, sk, None, None, "tests");
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .http_client(ticket_s3::http_client(None).expect("the S3 client"))
        .credentials_provider(creds)
        .build();
    Client::from_conf(conf)
}
