//! `ticket-producer`: generates tickets and publishes them to the tickets topic.
//!
//! Sends are asynchronous and batched by librdkafka (idempotent, `acks=all`); every delivery
//! report is awaited before the program says how it went, and any ticket not delivered makes
//! it exit non-zero.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use ticket_core::generate::Generator;
use ticket_kafka::KafkaArgs;
use tokio_util::sync::CancellationToken;

#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "ticket-producer",
    version,
    about = "Publish generated support tickets to Kafka/Redpanda."
)]
pub struct Args {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// How many tickets to send before exiting (0 only makes sure the topic exists).
    #[arg(long, env = "NB_TICKETS", default_value_t = 100)]
    pub count: u64,

    /// Tickets per second; 0 sends as fast as the broker takes them.
    #[arg(long, env = "TICKET_RATE", default_value_t = 0.0)]
    pub rate: f64,

    /// Keep sending until stopped (SIGINT/SIGTERM), ignoring --count.
    #[arg(long, env = "PRODUCE_FOREVER", default_value_t = false)]
    pub forever: bool,

    /// Partitions of the topic when this program creates it.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..))]
    pub partitions: i32,

    /// Replication factor of the topic when this program creates it.
    #[arg(long, env = "TOPIC_REPLICATION", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub replication: i32,

    /// Seed for the ticket content (ids stay unique across runs).
    #[arg(long, env = "PRODUCER_SEED")]
    pub seed: Option<u64>,

    /// Write the tickets as JSON Lines to this file instead of Kafka (test data for
    /// `ticket-processor process-file`, benchmarks); no broker is contacted.
    #[arg(long)]
    pub output_file: Option<std::path::PathBuf>,

    /// Seconds between progress lines on long runs.
    #[arg(long, env = "PROGRESS_INTERVAL_SECS", default_value_t = 5)]
    pub progress_interval_secs: u64,
}

/// What a run did, printed at the end.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub sent: u64,
    pub delivered: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "delivered {} of {} tickets in {:.2} s ({:.0} tickets/s), {} failed",
            self.delivered,
            self.sent,
            secs,
            self.delivered as f64 / secs,
            self.failed
        )
    }
}

/// Sends are allowed this far ahead of their delivery reports before we wait for some.
const MAX_IN_FLIGHT: usize = 200_000;

pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<Report> {
    if let Some(path) = &args.output_file {
        return write_file(&args, path);
    }
    args.kafka.validate()?;
    if !(args.rate.is_finite() && args.rate >= 0.0) {
        bail!(
            "TICKET_RATE must be a number >= 0 (0 = as fast as possible), got {}",
            args.rate
        );
    }
    let topic = args.kafka.topic.clone();
    let kafka = args.kafka.clone();
    let (partitions, replication) = (args.partitions, args.replication);
    tokio::task::spawn_blocking(move || {
        futures::executor::block_on(kafka.ensure_topic(&topic, partitions, replication))
    })
    .await??;

    let producer: FutureProducer = args
        .kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "10")
        .set("queue.buffering.max.messages", "500000")
        .create()
        .context("creating the Kafka producer (check KAFKA_OPTIONS)")?;

    tracing::info!(topic = %args.kafka.topic, count = args.count, forever = args.forever, rate = args.rate, "Producing tickets.");
    let mut generator = generator(&args);

    let start = Instant::now();
    let mut report = Report {
        sent: 0,
        delivered: 0,
        failed: 0,
        elapsed: Duration::ZERO,
    };
    let mut first_error: Option<String> = None;
    let mut in_flight = FuturesUnordered::new();
    let mut next_progress = start + Duration::from_secs(args.progress_interval_secs.max(1));

    let mut settle = |result: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
                      report: &mut Report| {
        match result {
            Ok(Ok(_)) => report.delivered += 1,
            Ok(Err((e, _))) => {
                report.failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            Err(_) => {
                report.failed += 1;
                first_error
                    .get_or_insert_with(|| "producer closed before the delivery report".into());
            }
        }
    };

    while (args.forever || report.sent < args.count) && !shutdown.is_cancelled() {
        if args.rate > 0.0 {
            let due = start + Duration::from_secs_f64(report.sent as f64 / args.rate);
            let now = Instant::now();
            if due > now {
                // Drain delivery reports while waiting, so memory stays flat at low rates.
                tokio::select! {
                    _ = tokio::time::sleep(due - now) => {}
                    Some(r) = in_flight.next() => { settle(r, &mut report); continue; }
                    _ = shutdown.cancelled() => break,
                }
            }
        }
        let ticket = generator.next_ticket();
        let payload = ticket.to_json();
        let mut record = FutureRecord::to(&args.kafka.topic)
            .key(&ticket.ticket_id)
            .payload(&payload);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    in_flight.push(delivery);
                    report.sent += 1;
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    // The local queue is full: wait for a delivery report (or a moment) and retry.
                    match tokio::time::timeout(Duration::from_millis(100), in_flight.next()).await {
                        Ok(Some(r)) => settle(r, &mut report),
                        _ => producer.poll(Duration::ZERO),
                    }
                }
                Err((e, _)) => return Err(e).context("cannot enqueue a ticket"),
            }
        }
        while in_flight.len() > MAX_IN_FLIGHT {
            if let Some(r) = in_flight.next().await {
                settle(r, &mut report);
            }
        }
        if Instant::now() >= next_progress {
            next_progress += Duration::from_secs(args.progress_interval_secs.max(1));
            let secs = start.elapsed().as_secs_f64();
            tracing::info!(
                sent = report.sent,
                delivered = report.delivered,
                failed = report.failed,
                rate = format!("{:.0}", report.sent as f64 / secs),
                "Progress."
            );
        }
    }

    // Every send gets its delivery report (success, or failure after message.timeout.ms).
    producer.poll(Duration::ZERO);
    while let Some(r) = in_flight.next().await {
        settle(r, &mut report);
    }
    let _ = producer.flush(Duration::from_secs(30));
    report.elapsed = start.elapsed();
    tracing::info!(
        sent = report.sent,
        delivered = report.delivered,
        failed = report.failed,
        "Done."
    );
    if report.failed > 0 {
        bail!(
            "{} of {} tickets were not delivered to {:?} at {}: {} ({report})",
            report.failed,
            report.sent,
            args.kafka.topic,
            args.kafka.brokers,
            first_error.unwrap_or_default()
        );
    }
    Ok(report)
}

fn generator(args: &Args) -> Generator<StdRng> {
    let rng = match args.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    Generator::new(rng, chrono::Utc::now(), run_id)
}

/// `--output-file`: the same tickets, one JSON object per line, to a file.
fn write_file(args: &Args, path: &std::path::Path) -> anyhow::Result<Report> {
    use std::io::Write;
    let start = Instant::now();
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut generator = generator(args);
    for _ in 0..args.count {
        out.write_all(&generator.next_ticket().to_json())?;
        out.write_all(b"\n")?;
    }
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Report {
        sent: args.count,
        delivered: args.count,
        failed: 0,
        elapsed: start.elapsed(),
    })
}
