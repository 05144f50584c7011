//! Prometheus metrics, served at `/metrics` by the HTTP endpoint.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use ticket_commit::retry::RetryMetrics;

/// Cheap to clone: every field is a shared handle.
#[derive(Clone)]
pub struct Metrics {
    pub tickets_in: Counter,
    pub tickets_written: Counter,
    pub dead_lettered: Counter,
    pub batches_written: Counter,
    pub fenced: Counter,
    /// From a batch's first message to the moment it is durable in S3 (what a ticket waits).
    pub batch_age: Histogram,
    /// From the start of a batch's commit to the moment it is durable (the S3 requests).
    pub batch_commit: Histogram,
    /// Messages behind the end of the assigned partitions, as of the last check.
    pub consumer_lag: Gauge<i64, AtomicI64>,
    pub assigned_partitions: Gauge,
    /// Where a batch's time goes, stage by stage ([`Stages`]).
    pub stages: Stages,
    /// S3 errors, and since when S3 has failed every request the processor made (0 while it
    /// answers): set and cleared by the retries ([`ticket_commit::retry`]).
    pub retry: RetryMetrics,
    registry: Arc<Registry>,
    /// The output's own figures, added once it is open ([`Metrics::add_output`]).
    output: Arc<std::sync::OnceLock<Registry>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ticket_processor");
        let m = Metrics {
            tickets_in: Counter::default(),
            tickets_written: Counter::default(),
            dead_lettered: Counter::default(),
            batches_written: Counter::default(),
            fenced: Counter::default(),
            batch_age: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            batch_commit: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            consumer_lag: Gauge::default(),
            assigned_partitions: Gauge::default(),
            retry: RetryMetrics::default(),
            stages: Stages::default(),
            registry: Arc::new(Registry::default()),
            output: Default::default(),
        };
        registry.register(
            "messages_in",
            "Messages consumed from the tickets topic",
            m.tickets_in.clone(),
        );
        registry.register(
            "tickets_written",
            "Valid tickets committed to S3",
            m.tickets_written.clone(),
        );
        registry.register(
            "dead_lettered",
            "Invalid messages sent to the dead-letter topic",
            m.dead_lettered.clone(),
        );
        registry.register(
            "batches_written",
            "Micro-batches committed to S3",
            m.batches_written.clone(),
        );
        registry.register(
            "s3_errors",
            "Failed S3 requests (each is retried)",
            m.retry.s3_errors.clone(),
        );
        registry.register(
            "fenced",
            "Batches dropped because another owner took the partition",
            m.fenced.clone(),
        );
        registry.register(
            "batch_age_seconds",
            "Time from a micro-batch's first message to its commit in S3",
            m.batch_age.clone(),
        );
        registry.register(
            "batch_commit_seconds",
            "Time to commit one micro-batch to S3 (its conditional checkpoint write and objects)",
            m.batch_commit.clone(),
        );
        registry.register(
            "consumer_lag",
            "Messages not yet processed on the assigned partitions",
            m.consumer_lag.clone(),
        );
        registry.register(
            "assigned_partitions",
            "Partitions this instance owns",
            m.assigned_partitions.clone(),
        );
        registry.register(
            "s3_unreachable_since_seconds",
            "Unix time since which S3 has failed every request (an outage being waited out); 0 while S3 answers",
            m.retry.s3_unreachable_since.clone(),
        );
        registry.register(
            "stage_seconds",
            "Where a micro-batch's time goes, by stage: fetch (its first message's Kafka timestamp to its arrival), seal (arrival to the batch handed to its writer), queue (waiting for the encoder), encode, wait (encoded, waiting behind the commit before it), data_write, record (checkpoint or table commit), visible (its oldest message's Kafka timestamp to the batch readable)",
            m.stages.family.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// Adds the output's figures (once; a second call is ignored).
    pub fn add_output(&self, register: impl FnOnce(&mut Registry)) {
        let mut registry = Registry::with_prefix("ticket_processor");
        register(&mut registry);
        let _ = self.output.set(registry);
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        let written = encode_registry(&mut out, &self.registry)
            .and_then(|()| match self.output.get() {
                Some(output) => encode_registry(&mut out, output),
                None => Ok(()),
            })
            .and_then(|()| encode_eof(&mut out));
        if written.is_err() {
            out.clear();
        }
        out
    }
}

/// The stage histograms' upper bounds, in seconds.
const STAGE_BUCKETS: [f64; 32] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6,
    0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
];

/// The stage histograms, one per value of the `stage` label, each a handle into one family
/// (`stage_seconds`): a batch observes each stage once, with no label lookup.
#[derive(Clone)]
pub struct Stages {
    family: Family<[(&'static str, &'static str); 1], Histogram>,
    /// Its first message's Kafka timestamp to its arrival at the consumer's loop.
    pub fetch: Histogram,
    /// Its first message's arrival to the batch handed to its writer (its age when sealed).
    pub seal: Histogram,
    /// Handed over to the encoder taking it (behind the batch before it).
    pub queue: Histogram,
    /// Decode, validate, route, dead letters, counts, the objects' bodies.
    pub encode: Histogram,
    /// Encoded to its commit's start (behind the commit before it).
    pub wait: Histogram,
    /// The data: objects, or the table's data files.
    pub data_write: Histogram,
    /// The record: the checkpoint, or the table commit (with its wait for the group).
    pub record: Histogram,
    /// Its oldest message's Kafka timestamp to the batch readable (freshness).
    pub visible: Histogram,
}

impl Default for Stages {
    fn default() -> Self {
        // 1 ms to 60 s, closer where batch ages are usually set (the benchmark reads exact
        // figures from the debug log's "Batch stages." lines instead).
        let buckets: fn() -> Histogram = || Histogram::new(STAGE_BUCKETS.iter().copied());
        let family = Family::new_with_constructor(buckets);
        let stage = |name: &'static str| family.get_or_create(&[("stage", name)]).clone();
        Stages {
            fetch: stage("fetch"),
            seal: stage("seal"),
            queue: stage("queue"),
            encode: stage("encode"),
            wait: stage("wait"),
            data_write: stage("data_write"),
            record: stage("record"),
            visible: stage("visible"),
            family,
        }
    }
}
