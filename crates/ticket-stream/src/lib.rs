//! `ticket-stream`: the streaming side of the processor, Kafka in and S3 out, exactly once.
//! It compiles apart from the reading side (`ticket-lake`).
//!
//! - [`stream`]: the Kafka consumer loop (continuous, or `--drain`), with its parts:
//!   partition state, writers, dead letters, drain, counts. What a batch becomes is the
//!   output's (`ticket_output::Output`, chosen at start): the loop sees only its committers
//!   (`ticket_commit::Committer`), the same for every output;
//! - [`replay`]: `replay-dlq`, dead letters back into the tickets topic, exactly once;
//! - [`http`] and [`metrics`]: health and Prometheus metrics;
//! - [`RunArgs`] and [`run`]: the streaming processor's settings, and the processor itself.

pub mod http;
pub mod metrics;
pub mod replay;
pub mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use ticket_core::batch::BatchPolicy;
use ticket_core::keys::Layout;
use ticket_engine::RoutingArgs;
use ticket_output::{Opening, Output, OutputSetting};
use ticket_s3::store;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub kafka: ticket_kafka::KafkaArgs,

    #[command(flatten)]
    pub s3: ticket_s3::S3Args,

    #[command(flatten)]
    pub routing: RoutingArgs,

    /// Kafka consumer group; instances with the same group share the partitions.
    #[arg(long, env = "CONSUMER_GROUP", default_value = "ticket-processor")]
    pub group: String,

    /// Where the valid tickets go: objects of JSON Lines or Parquet under
    /// tickets_with_team/, or a Delta Lake table at tables/tickets_with_team/.
    #[arg(long, env = "OUTPUT_FORMAT", value_enum, default_value_t = OutputSetting::Jsonl)]
    pub output_format: OutputSetting,

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
    /// 200 makes tickets readable within half a second (p99), for more objects or commits
    /// (README, "Freshness").
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

    #[command(flatten)]
    pub table: ticket_output::TableCreation,

    #[command(flatten)]
    pub maintenance: ticket_output::TableMaintenance,
}

/// How a stop reaches the streaming processor from `main`, which owns the signals and the
/// deadlines: `stop` when one is requested (write what is buffered, commit, leave), `abort`
/// when the time to write has run out (give up: unwritten batches are processed again on
/// restart). That the process is gone a little later whatever it waits on is `main`'s too.
#[derive(Clone, Default)]
pub struct Shutdown {
    pub stop: CancellationToken,
    pub abort: CancellationToken,
}

impl Shutdown {
    /// A shutdown whose `abort` fires `timeout` after `stop`.
    pub fn with_deadline(timeout: Duration) -> Shutdown {
        let s = Shutdown::default();
        let (stop, abort) = (s.stop.clone(), s.abort.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            tokio::time::sleep(timeout).await;
            abort.cancel();
        });
        s
    }
}

/// What the HTTP endpoint shows of the processor: its health and its metrics. `main` makes
/// them and serves them ([`http::serve`]) for the life of the process; [`run`] updates them.
#[derive(Clone, Default)]
pub struct Observed {
    pub health: Arc<stream::health::Health>,
    pub metrics: metrics::Metrics,
}

/// Runs the streaming processor until `shutdown.stop` fires (or the drain ends).
pub async fn run(args: RunArgs, observed: Observed, shutdown: Shutdown) -> anyhow::Result<()> {
    args.kafka.validate()?;
    if args.dlq_topic == args.kafka.topic {
        bail!(
            "DLQ_TOPIC must differ from TICKETS_TOPIC (both are {:?})",
            args.dlq_topic
        );
    }
    let routing = args.routing.load()?;
    let Observed { health, metrics } = observed;

    let s3 = ticket_s3::Store::connect(&args.s3).await?;
    let layout = Layout::new(&args.s3.prefix, &args.kafka.topic);
    s3.check_writable(layout.prefix()).await?;
    let store: store::SharedStore = Arc::new(s3);
    let kafka = args.kafka.clone();
    tokio::task::spawn_blocking(move || kafka.check_brokers()).await??;
    let output = Output::open(Opening {
        setting: args.output_format,
        s3: &args.s3,
        layout: &layout,
        store: store.clone(),
        routing: routing.digest(),
        creation: &args.table,
        maintenance: &args.maintenance,
    })
    .await?;
    metrics.add_output(|registry| output.register_metrics(registry));

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
        format: args.output_format.encoding(),
        output,
        drain: args.drain,
    };
    stream::run(settings, store, metrics, health, shutdown).await
}
