//! `ticket-processor`: consumes tickets, adds `support_team`, aggregates with DataFusion and
//! writes JSON Lines or Parquet to S3 exactly once; and reads the results back (`query`, `report`).
//!
//! - [`stream`]: the Kafka consumer loop (continuous, or `--drain`), with its parts:
//!   partition state, writers, dead letters, drain, counts;
//! - [`sink`]: the exactly-once protocol for one partition's batch;
//! - [`store`]: the object store interface the sink needs, and an in-memory one for tests;
//! - [`s3`]: the S3 adapter;
//! - [`enrich`] and [`aggregate`]: bytes to output rows, counts with DataFusion;
//! - [`output`]: the output formats, JSON Lines and Parquet;
//! - [`file`]: `process-file`, the same processing on a local JSON Lines file;
//! - [`query`]: `query`, SQL over the results in the bucket or a directory;
//! - [`report`]: `report`, the lake's figures as a self-contained HTML page;
//! - [`replay`]: `replay-dlq`, dead letters back into the tickets topic, exactly once;
//! - [`http`] and [`metrics`]: health and Prometheus metrics.

pub mod aggregate;
pub mod enrich;
pub mod file;
pub mod http;
pub mod metrics;
pub mod output;
pub mod query;
pub mod recycle;
pub mod replay;
pub mod report;
pub mod s3;
pub mod sink;
pub mod store;
pub mod stream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ticket_core::Routing;
use ticket_core::batch::BatchPolicy;
use ticket_core::keys::Layout;
use tokio_util::sync::CancellationToken;

#[derive(clap::Parser, Debug)]
#[command(
    name = "ticket-processor",
    version,
    about = "Consume support tickets, route them to teams, aggregate with DataFusion, write JSON Lines or Parquet to S3 exactly once; query and report on the results.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Process a JSON Lines file into the S3 layout under a local directory (no services needed).
    ProcessFile(FileArgs),
    /// Re-inject dead letters into the tickets topic after a fix, each exactly once.
    ReplayDlq(replay::ReplayArgs),
    /// Run SQL over the results (tables `tickets` and `counts`) in the bucket or a directory.
    Query(query::QueryArgs),
    /// Write reports/index.html (charts of tickets per hour, load per team) into the bucket or
    /// a directory; once, or every --every seconds.
    Report(report::ReportArgs),
    /// Exit 0 if the processor on this host answers ready at HTTP_ADDR (the image's HEALTHCHECK;
    /// needs no curl or shell in the image).
    HealthCheck {
        /// Address the processor serves health on; an unspecified IP (0.0.0.0) means this host.
        #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9090")]
        http_addr: SocketAddr,
    },
}

/// GETs `/health/ready` from the processor at `addr`; Ok if it answers 200.
pub async fn health_check(mut addr: SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /health/ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).await?;
        anyhow::Ok(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("no answer from {addr} within 5 s"))?
        .with_context(|| format!("cannot reach the processor's health endpoint at {addr}"))?;
    if reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        bail!("not ready: {}", reply.lines().next().unwrap_or_default())
    }
}

#[derive(clap::Args, Debug)]
pub struct RoutingArgs {
    /// JSON file replacing the request type -> team mapping:
    /// {"teams": {"technical": "Tech Support", ...}, "default_team": "General Support"}.
    #[arg(long, env = "ROUTING_FILE")]
    pub routing_file: Option<PathBuf>,
}

impl RoutingArgs {
    pub fn load(&self) -> anyhow::Result<Routing> {
        let Some(path) = &self.routing_file else {
            return Ok(Routing::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read ROUTING_FILE {}", path.display()))?;
        Routing::from_json(&text).with_context(|| format!("ROUTING_FILE {}", path.display()))
    }
}

#[derive(clap::Args, Debug)]
pub struct FileArgs {
    /// JSON Lines input, one ticket per line.
    pub input: PathBuf,
    /// Directory to write tickets_with_team/, counts_by_request_type/ and dead_letters/ into.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Format of the ticket files.
    #[arg(long, env = "OUTPUT_FORMAT", value_enum, default_value_t = output::OutputFormat::Jsonl)]
    pub output_format: output::OutputFormat,
    #[command(flatten)]
    pub routing: RoutingArgs,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub kafka: ticket_kafka::KafkaArgs,

    #[command(flatten)]
    pub s3: s3::S3Args,

    #[command(flatten)]
    pub routing: RoutingArgs,

    /// Kafka consumer group; instances with the same group share the partitions.
    #[arg(long, env = "CONSUMER_GROUP", default_value = "ticket-processor")]
    pub group: String,

    /// Format of the ticket objects: JSON Lines, or Parquet (typed columns, compressed).
    #[arg(long, env = "OUTPUT_FORMAT", value_enum, default_value_t = output::OutputFormat::Jsonl)]
    pub output_format: output::OutputFormat,

    /// Topic that invalid messages are sent to, with the reason in the error.message header.
    #[arg(long, env = "DLQ_TOPIC", default_value = "client_tickets_dlq")]
    pub dlq_topic: String,

    /// Write a partition's batch once it holds this many messages.
    #[arg(long, env = "BATCH_MAX_RECORDS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_max_records: u64,

    /// Write a partition's batch once its messages reach this many bytes.
    #[arg(long, env = "BATCH_MAX_BYTES", default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_max_bytes: u64,

    /// Write a partition's batch once its oldest message has waited this many milliseconds.
    #[arg(long, env = "BATCH_MAX_AGE_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_max_age_ms: u64,

    /// Process everything up to the end of the topic as of start, write it, commit, exit 0.
    #[arg(long, env = "DRAIN", default_value_t = false)]
    pub drain: bool,

    /// Address for /health/live, /health/ready and /metrics.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9090")]
    pub http_addr: SocketAddr,

    /// On SIGTERM/SIGINT, how long to keep trying to write buffered batches before leaving
    /// them to the next run; the process exits 5 s later whatever it still waits on.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SECS", default_value_t = 20)]
    pub shutdown_timeout_secs: u64,
}

/// Runs the streaming processor until `shutdown` fires (or the drain ends).
pub async fn run(args: RunArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    args.kafka.validate()?;
    if args.dlq_topic == args.kafka.topic {
        bail!(
            "DLQ_TOPIC must differ from TICKETS_TOPIC (both are {:?})",
            args.dlq_topic
        );
    }
    let routing = args.routing.load()?;
    let metrics = metrics::Metrics::new();
    let health = Arc::new(http::Health::default());
    let http_stop = CancellationToken::new();
    let bound = http::serve(
        args.http_addr,
        health.clone(),
        metrics.clone(),
        http_stop.clone(),
    )
    .await?;
    tracing::info!(%bound, "Serving /health/live, /health/ready and /metrics.");

    let s3 = s3::Store::connect(&args.s3).await?;
    let layout = Layout::new(&args.s3.prefix, &args.kafka.topic);
    s3.check_writable(layout.prefix()).await?;
    let store: store::SharedStore = Arc::new(s3);
    let kafka = args.kafka.clone();
    tokio::task::spawn_blocking(move || kafka.check_brokers()).await??;

    let settings = stream::Settings {
        kafka: args.kafka,
        group: args.group,
        dlq_topic: args.dlq_topic,
        policy: BatchPolicy {
            max_records: args.batch_max_records as usize,
            max_bytes: args.batch_max_bytes as usize,
            max_age: Duration::from_millis(args.batch_max_age_ms),
        },
        routing,
        layout,
        format: args.output_format,
        drain: args.drain,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout_secs),
    };
    let result = stream::run(settings, store, metrics, health, shutdown).await;
    http_stop.cancel();
    result
}
