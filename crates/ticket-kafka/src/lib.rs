//! What `ticket-producer` and `ticket-processor` share: the Kafka connection flags (each with
//! an environment variable), the librdkafka configuration they make, the checks run at start so
//! that a wrong address or a missing topic is a clear error, not a hang; and the process
//! plumbing of both binaries (`.env`, logging, SIGINT/SIGTERM).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;

mod start;

#[derive(clap::Args, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(
        long = "brokers",
        env = "KAFKA_BROKERS",
        default_value = "localhost:19092"
    )]
    pub brokers: String,

    /// The topic tickets are published to and consumed from.
    #[arg(
        long = "topic",
        env = "TICKETS_TOPIC",
        default_value = "client_tickets"
    )]
    pub topic: String,

    /// How to talk to the brokers.
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", default_value = "plaintext",
          value_parser = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"])]
    pub security_protocol: String,

    /// PEM file of the certificate authorities to trust for the brokers' TLS certificates (a
    /// private CA), with KAFKA_SECURITY_PROTOCOL=ssl or sasl_ssl. Unset: the system's trust
    /// store. (Same as KAFKA_OPTIONS=ssl.ca.location=FILE, which still works.)
    #[arg(long = "kafka-ssl-ca-location", env = "KAFKA_SSL_CA_LOCATION")]
    pub ssl_ca_location: Option<String>,

    /// SASL mechanism, used with a sasl_* security protocol (Redpanda's default is SCRAM-SHA-256).
    #[arg(long, env = "KAFKA_SASL_MECHANISM", default_value = "SCRAM-SHA-256",
          value_parser = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])]
    pub sasl_mechanism: String,

    /// SASL user name (required with a sasl_* security protocol).
    #[arg(long, env = "KAFKA_USERNAME")]
    pub username: Option<String>,

    /// SASL password (required with a sasl_* security protocol). Never logged.
    #[arg(long, env = "KAFKA_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// Any other librdkafka property as key=value; repeat the flag, or separate with commas
    /// in the environment variable (e.g. KAFKA_OPTIONS=compression.type=lz4,linger.ms=20).
    #[arg(long = "kafka-option", env = "KAFKA_OPTIONS", value_delimiter = ',')]
    pub options: Vec<String>,

    /// How long to wait for the brokers at start before giving up with an error.
    #[arg(long, env = "KAFKA_CONNECT_TIMEOUT_SECS", default_value_t = 20)]
    pub connect_timeout_secs: u64,
}

/// Keeps the password out of logs and panic messages.
impl fmt::Debug for KafkaArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaArgs")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("security_protocol", &self.security_protocol)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("options", &self.options)
            .finish()
    }
}

/// A `key=value` librdkafka property.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

impl FromStr for KeyValue {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok(KeyValue {
                key: k.trim().to_string(),
                value: v.trim().to_string(),
            }),
            _ => Err(format!(
                "expected key=value (a librdkafka property), got {s:?}"
            )),
        }
    }
}

impl KafkaArgs {
    /// Checks the combination of settings; the message says which variable to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        for o in self.options.iter().filter(|o| !o.trim().is_empty()) {
            o.parse::<KeyValue>()
                .map_err(|e| anyhow::anyhow!("KAFKA_OPTIONS: {e}"))?;
        }
        if self.brokers.trim().is_empty() {
            bail!("KAFKA_BROKERS is empty: set it to host:port of at least one broker");
        }
        if self.topic.trim().is_empty() {
            bail!("TICKETS_TOPIC is empty: set it to the topic name");
        }
        if let Some(ca) = non_empty(&self.ssl_ca_location) {
            if !self.security_protocol.ends_with("ssl") {
                bail!(
                    "KAFKA_SSL_CA_LOCATION is set but KAFKA_SECURITY_PROTOCOL={} does not use TLS: set it to ssl or sasl_ssl",
                    self.security_protocol
                );
            }
            let pem = std::fs::read_to_string(ca)
                .with_context(|| format!("KAFKA_SSL_CA_LOCATION={ca}: cannot read the file"))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                bail!(
                    "KAFKA_SSL_CA_LOCATION={ca} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)"
                );
            }
        }
        let sasl = self.security_protocol.starts_with("sasl");
        match (sasl, non_empty(&self.username), non_empty(&self.password)) {
            (true, Some(_), Some(_)) | (false, None, None) => {}
            (true, _, _) => bail!(
                "KAFKA_SECURITY_PROTOCOL={} needs KAFKA_USERNAME and KAFKA_PASSWORD",
                self.security_protocol
            ),
            (false, _, _) => bail!(
                "KAFKA_USERNAME/KAFKA_PASSWORD are set but KAFKA_SECURITY_PROTOCOL={} does not use them: set it to sasl_plaintext or sasl_ssl",
                self.security_protocol
            ),
        }
        Ok(())
    }

    /// The librdkafka configuration every client of ours starts from.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("security.protocol", &self.security_protocol)
            .set("client.dns.lookup", "use_all_dns_ips");
        if let Some(ca) = non_empty(&self.ssl_ca_location) {
            c.set("ssl.ca.location", ca);
        }
        if self.security_protocol.starts_with("sasl") {
            c.set("sasl.mechanism", &self.sasl_mechanism);
            if let (Some(u), Some(p)) = (non_empty(&self.username), non_empty(&self.password)) {
                c.set("sasl.username", u).set("sasl.password", p);
            }
        }
        for kv in self
            .options
            .iter()
            .filter_map(|o| o.parse::<KeyValue>().ok())
        {
            c.set(kv.key, kv.value);
        }
        c
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }

    /// Fetches the cluster's metadata, failing with a clear message if the brokers do not
    /// answer within the connect timeout, and at once if a TLS handshake or a SASL login fails
    /// (librdkafka would retry those for ever): see [`start`].
    pub fn check_brokers(&self) -> anyhow::Result<Metadata> {
        start::check_brokers(self)
    }

    /// The number of partitions of `topic`, or `None` if it does not exist.
    pub fn partitions_of(&self, topic: &str) -> anyhow::Result<Option<usize>> {
        let md = self.check_brokers()?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len()))
    }

    /// Creates `topic` unless it exists. Returns whether it was created.
    pub async fn ensure_topic(
        &self,
        topic: &str,
        partitions: i32,
        replication: i32,
    ) -> anyhow::Result<bool> {
        if self.partitions_of(topic)?.is_some() {
            return Ok(false);
        }
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
        let opts = AdminOptions::new().operation_timeout(Some(self.connect_timeout()));
        let results = admin
            .create_topics([&new], &opts)
            .await
            .with_context(|| format!("creating topic {topic:?} on {}", self.brokers))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => bail!(
                    "cannot create topic {name:?} with {partitions} partitions and replication {replication}: {code} (create it yourself or fix TOPIC_PARTITIONS/TOPIC_REPLICATION)"
                ),
            }
        }
        // Creation is asynchronous on the broker side: wait until the metadata shows it.
        let deadline = std::time::Instant::now() + self.connect_timeout();
        while self.partitions_of(topic)?.is_none() {
            if std::time::Instant::now() > deadline {
                bail!(
                    "topic {topic:?} was created but never appeared in the metadata of {}",
                    self.brokers
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        tracing::info!(topic, partitions, replication, "Created topic.");
        Ok(true)
    }
}

/// An empty environment variable (as docker compose passes an unset `${VAR}`) means unset.
pub fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.trim().is_empty())
}

/// Reads `.env` from the working directory if there is one. A missing file is normal (Docker,
/// CI); a malformed one is an error, not silently ignored.
pub fn load_dotenv() -> Result<(), String> {
    match dotenvy::dotenv() {
        Err(e) if !e.not_found() => Err(format!("cannot read .env: {e}")),
        _ => Ok(()),
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
pub async fn cancel_on_signal(token: tokio_util::sync::CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("Stopping: signal received.");
    token.cancel();
}

/// Logs to stderr as text, or as JSON lines with `LOG_FORMAT=json`; `RUST_LOG` filters.
/// Whether the logs are JSON (`LOG_FORMAT=json`).
pub fn json_logs() -> bool {
    std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json")
}

/// Quiet by default whatever `RUST_LOG` says, unless it names them: the Delta kernel logs
/// every snapshot it builds at info, and as an error a table that does not exist yet (which
/// the processor then creates); what fails reaches our own messages anyway.
const QUIET: &str = "buoyant_kernel=off,deltalake_core=warn";

pub fn init_logging() {
    let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info,rdkafka=warn".into());
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{QUIET},{rust_log}"))
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("{QUIET},info,rdkafka=warn"))
        });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json_logs() {
        builder.json().init();
    } else {
        builder.init();
    }
    exit_on_panic();
}

/// A panic on any thread is logged through tracing (its thread, its location, its message) and
/// ends the process with status 101, Rust's status for a panic: a task that panics must not
/// leave a process that looks alive but has stopped doing part of its work.
fn exit_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        tracing::error!(
            thread = thread.name().unwrap_or("<unnamed>"),
            location = info.location().map(ToString::to_string).unwrap_or_default(),
            "panicked: {message}; exiting with status 101"
        );
        std::process::exit(101);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    pub(crate) fn parse(args: &[&str]) -> KafkaArgs {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .expect("parses")
            .kafka
    }

    #[test]
    fn sasl_needs_credentials_and_credentials_need_sasl() {
        let e = parse(&["--security-protocol", "sasl_plaintext"])
            .validate()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("needs KAFKA_USERNAME and KAFKA_PASSWORD"),
            "{e}"
        );
        let e = parse(&["--username", "u", "--password", "p"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("set it to sasl_plaintext"), "{e}");
        parse(&[
            "--security-protocol",
            "sasl_ssl",
            "--username",
            "u",
            "--password",
            "p",
        ])
        .validate()
        .expect("valid");
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let a = parse(&[
            "--security-protocol",
            "sasl_ssl",
            "--username",
            "u",
            "--password",
            "hunter2",
        ]);
        assert!(!format!("{a:?}").contains("hunter2"));
    }

    #[test]
    fn extra_properties_are_passed_through() {
        let a = parse(&[
            "--kafka-option",
            "linger.ms=20",
            "--kafka-option",
            "compression.type=lz4",
        ]);
        let c = a.client_config();
        assert_eq!(c.get("linger.ms"), Some("20"));
        assert_eq!(c.get("compression.type"), Some("lz4"));
        assert!(parse(&["--kafka-option", "novalue"]).validate().is_err());
        parse(&["--kafka-option", ""])
            .validate()
            .expect("an empty KAFKA_OPTIONS is no option");
    }
}
