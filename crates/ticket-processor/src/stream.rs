//! The streaming processor: consume, validate, route, batch per partition, commit to S3
//! exactly once (see [`crate::sink`]), then commit the Kafka offsets.
//!
//! One task owns the consumer and every partition's buffer; a full batch is written by a task
//! of its own while consumption goes on, one batch in flight per partition (so a partition's
//! offsets are still committed in order). S3 is the source of truth for progress: on the first
//! message of a newly assigned partition its checkpoint is loaded and the consumer seeks to
//! the checkpoint's offset, so nothing already written is written again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use ticket_core::Routing;
use ticket_core::batch::BatchPolicy;
use ticket_core::keys::Layout;
use tokio_util::sync::CancellationToken;

use crate::aggregate::Aggregator;
use crate::enrich::BatchBuilder;
use crate::http::Health;
use crate::metrics::Metrics;
use crate::s3::{Expect, Store};
use crate::sink::{Batch, PartitionSink, Retrier, SinkError, total_counts};

/// Everything the streaming processor needs, already validated.
pub struct Settings {
    pub kafka: ticket_kafka::KafkaArgs,
    pub group: String,
    pub dlq_topic: String,
    pub policy: BatchPolicy,
    pub routing: Routing,
    pub layout: Layout,
    /// Process up to the end of the topic as of start, then exit.
    pub drain: bool,
    /// How long a graceful stop may spend writing buffered batches before abandoning them.
    pub shutdown_timeout: Duration,
}

/// Rebalance events and statistics, handed from librdkafka's callbacks to the processing task.
struct Ctx {
    revoked: Mutex<Vec<i32>>,
    metrics: Metrics,
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        let lag: i64 = stats
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.metrics.consumer_lag.set(lag);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // With --drain, reaching the end of a partition is the expected way to finish, and
        // librdkafka also reports it as a client-wide error: not worth an ERROR line.
        if let rdkafka::error::KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF) =
            error
        {
            tracing::debug!(reason, "End of a partition.");
        } else {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for Ctx {
    fn post_rebalance(
        &self,
        _base: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(partitions = ?parts, "Partitions revoked.");
                if let Ok(mut r) = self.revoked.lock() {
                    r.extend(parts);
                }
            }
            Rebalance::Assign(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(partitions = ?parts, "Partitions assigned.");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance error."),
        }
    }
}

type Kafka = StreamConsumer<Ctx>;

/// In `--drain`, a partition past its end offset as of start with no message for this long is done.
const DRAIN_IDLE: Duration = Duration::from_secs(3);

/// A partition this instance owns and has loaded the checkpoint of.
struct Owned {
    /// `None` while a batch is in flight: its writer task holds the sink.
    sink: Option<PartitionSink>,
    /// Tells this ownership from an earlier one of the same partition (revoked, then assigned
    /// again) when a writer task reports back.
    epoch: u64,
    /// Offsets below this were already handled (written, in flight, or in `building`).
    expected: i64,
    building: Option<Building>,
}

/// What a writer task reports when its batch is done.
struct Done {
    partition: i32,
    epoch: u64,
    first: i64,
    last: i64,
    valid: u64,
    dead: u64,
    started: Instant,
    sink: PartitionSink,
    outcome: Result<(), Failure>,
}

enum Failure {
    /// A dead letter was not delivered: the batch must be processed again.
    DeadLetter(String),
    Sink(SinkError),
}

struct Building {
    first: i64,
    last: i64,
    builder: BatchBuilder,
    dead_letters: Vec<DeliveryFuture>,
    started: Instant,
}

struct Processor {
    settings: Settings,
    consumer: Kafka,
    dlq: FutureProducer,
    store: Store,
    retry: Retrier,
    metrics: Metrics,
    aggregator: Aggregator,
    parts: HashMap<i32, Owned>,
    next_epoch: u64,
    /// Writer tasks report here; `in_flight` of them have not yet.
    done_tx: tokio::sync::mpsc::UnboundedSender<Done>,
    done_rx: tokio::sync::mpsc::UnboundedReceiver<Done>,
    in_flight: usize,
    /// Partitions sent back to an earlier offset since the main loop last looked (drain mode
    /// must not count them as finished).
    rewound: Vec<i32>,
    counts_dirty: bool,
    counts_written_at: Instant,
}

/// Runs until `shutdown` fires (or, with `drain`, until the topic's end as of start).
pub async fn run(
    settings: Settings,
    store: Store,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let topic = settings.kafka.topic.clone();
    let kafka = settings.kafka.clone();
    let partitions =
        tokio::task::spawn_blocking(move || kafka.partitions_of(&kafka.topic)).await??;
    let Some(partitions) = partitions else {
        bail!(
            "topic {topic:?} does not exist on {} (start ticket-producer, which creates it, or set TICKETS_TOPIC)",
            settings.kafka.brokers
        );
    };
    let kafka = settings.kafka.clone();
    let dlq_topic = settings.dlq_topic.clone();
    tokio::task::spawn_blocking(move || {
        futures::executor::block_on(kafka.ensure_topic(&dlq_topic, partitions as i32, 1))
    })
    .await??;

    let context = Ctx {
        revoked: Mutex::new(Vec::new()),
        metrics: metrics.clone(),
    };
    let mut config = settings.kafka.client_config();
    // Failover within seconds rather than librdkafka's 45 s; KAFKA_OPTIONS may override.
    if config.get("session.timeout.ms").is_none() {
        config.set("session.timeout.ms", "10000");
    }
    let consumer: Kafka = config
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        // --drain stops at the first end-of-partition at or past the end offset seen at start.
        .set(
            "enable.partition.eof",
            if settings.drain { "true" } else { "false" },
        )
        .create_with_context(context)
        .context("creating the Kafka consumer (check KAFKA_OPTIONS)")?;
    let dlq: FutureProducer = settings
        .kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .context("creating the dead-letter producer")?;

    // The abort token ends S3 retries: at once on a hard stop, after a bounded drain on a graceful one.
    let abort = CancellationToken::new();
    let retry = Retrier {
        abort: abort.clone(),
        metrics: metrics.clone(),
        max_backoff: Duration::from_secs(5),
    };
    let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut p = Processor {
        consumer,
        dlq,
        store,
        retry,
        metrics,
        aggregator: Aggregator::default(),
        parts: HashMap::new(),
        next_epoch: 0,
        done_tx,
        done_rx,
        in_flight: 0,
        rewound: Vec::new(),
        counts_dirty: false,
        counts_written_at: Instant::now(),
        settings,
    };

    let mut targets = BTreeMap::new();
    if p.settings.drain {
        targets = p.assign_all(partitions as i32).await?;
    } else {
        p.consumer
            .subscribe(&[&topic])
            .context("subscribing to the tickets topic")?;
    }
    health.set_ready(true);
    tracing::info!(topic, group = %p.settings.group, drain = p.settings.drain, "Processing.");

    // A stop request bounds how long S3 retries may go on: then buffered batches are abandoned
    // (they are processed again on restart) rather than the stop hanging on an outage.
    let timer = {
        let (abort, shutdown) = (abort.clone(), shutdown.clone());
        let t = p.settings.shutdown_timeout;
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(t).await;
            abort.cancel();
        })
    };
    let result = p.main_loop(&shutdown, &targets, &health).await;
    health.set_ready(false);

    // Graceful stop: write what is buffered, then commit and leave.
    let flushed = if result.is_ok() {
        p.flush_all().await
    } else {
        Ok(())
    };
    if flushed.is_ok() && result.is_ok() {
        p.refresh_counts(true).await.ok();
    }
    timer.abort();
    if let Err(e) = p.consumer.commit_consumer_state(CommitMode::Sync)
        && !matches!(
            e,
            rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)
        )
    {
        tracing::debug!(error = %e, "Final offset commit.");
    }
    p.consumer.unsubscribe();
    result?;
    match flushed {
        Err(SinkError::Aborted) => {
            tracing::warn!(
                "Stopped before buffered batches could be written; they will be processed again on restart."
            );
            Ok(())
        }
        other => other.map_err(anyhow::Error::from),
    }
}

impl Processor {
    async fn main_loop(
        &mut self,
        shutdown: &CancellationToken,
        targets: &BTreeMap<i32, i64>,
        health: &Health,
    ) -> anyhow::Result<()> {
        let mut at_end = std::collections::BTreeSet::new();
        // When a message of a partition last arrived (drain mode's idle rule, below).
        let mut last_message: HashMap<i32, Instant> =
            targets.keys().map(|p| (*p, Instant::now())).collect();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            for p in std::mem::take(&mut self.rewound) {
                at_end.remove(&p);
                last_message.insert(p, Instant::now());
            }
            if self.settings.drain && targets.keys().all(|p| at_end.contains(p)) {
                tracing::info!("Reached the end of the topic as of start.");
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                // Before the consumer, which is nearly always ready under load.
                Some(done) = self.done_rx.recv() => self.complete(done).await?,
                _ = tick.tick() => {
                    health.tick();
                    // A broker that under-reports its high watermark (Tansu 0.6) may never send
                    // end-of-partition: past the start's end offset, a quiet partition is done.
                    for (p, end) in targets {
                        if !at_end.contains(p)
                            && last_message.get(p).is_some_and(|t| t.elapsed() > DRAIN_IDLE)
                            && self.position(*p).is_some_and(|pos| pos >= *end)
                        {
                            at_end.insert(*p);
                        }
                    }
                    self.take_revocations();
                    self.flush_due().await?;
                    if self.counts_dirty || self.counts_written_at.elapsed() > Duration::from_secs(30) {
                        self.refresh_counts(false).await?;
                    }
                }
                m = self.consumer.recv() => match m {
                    Ok(m) => {
                        let (partition, offset) = (m.partition(), m.offset());
                        let key = m.key().map(<[u8]>::to_vec);
                        let payload = m.payload().unwrap_or_default().to_vec();
                        drop(m);
                        last_message.insert(partition, Instant::now());
                        self.take_revocations();
                        self.handle(partition, offset, key, &payload).await?;
                    }
                    Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                        // Counts once the fetch position (past transaction markers too) is at
                        // or beyond the end offset seen at start.
                        if self.position(p).zip(targets.get(&p)).is_some_and(|(pos, end)| pos >= *end) {
                            at_end.insert(p);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "Kafka error (librdkafka retries by itself)."),
                },
            }
        }
    }

    /// The consumer's fetch position in `partition`: past every message and transaction
    /// marker it has read.
    fn position(&self, partition: i32) -> Option<i64> {
        let tpl = self.consumer.position().ok()?;
        let elem = tpl.find_partition(&self.settings.kafka.topic, partition)?;
        let fetched = match elem.offset() {
            Offset::Offset(o) => o,
            _ => -1,
        };
        let handled = self.parts.get(&partition).map_or(-1, |o| o.expected);
        Some(fetched.max(handled))
    }

    /// Drain mode: own every partition, starting where S3 says each one stopped.
    async fn assign_all(&mut self, partitions: i32) -> anyhow::Result<BTreeMap<i32, i64>> {
        let mut tpl = TopicPartitionList::new();
        let mut targets = BTreeMap::new();
        let topic = self.settings.kafka.topic.clone();
        for partition in 0..partitions {
            let sink = self.load(partition).await?;
            let next = sink.checkpoint.next_offset;
            let (_, high) = tokio::task::block_in_place(|| {
                self.consumer.fetch_watermarks(
                    &topic,
                    partition,
                    self.settings.kafka.connect_timeout(),
                )
            })
            .with_context(|| format!("reading the end offset of {topic}/{partition}"))?;
            targets.insert(partition, high);
            tpl.add_partition_offset(
                &topic,
                partition,
                if next > 0 {
                    Offset::Offset(next)
                } else {
                    Offset::Beginning
                },
            )?;
            let owned = self.own(sink, next);
            self.parts.insert(partition, owned);
        }
        tracing::info!(end_offsets = ?targets, "Draining up to these offsets.");
        self.consumer
            .assign(&tpl)
            .context("assigning the partitions")?;
        Ok(targets)
    }

    fn own(&mut self, sink: PartitionSink, expected: i64) -> Owned {
        self.next_epoch += 1;
        Owned {
            sink: Some(sink),
            epoch: self.next_epoch,
            expected,
            building: None,
        }
    }

    async fn load(&self, partition: i32) -> anyhow::Result<PartitionSink> {
        match PartitionSink::load(&self.store, &self.settings.layout, partition, &self.retry).await
        {
            Ok(s) => Ok(s),
            Err(SinkError::Aborted) => {
                bail!("stopped while loading the checkpoint of partition {partition}")
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Forgets partitions another instance now owns: their buffered messages will be
    /// processed by the new owner from the last committed checkpoint.
    fn take_revocations(&mut self) {
        let revoked: Vec<i32> = match self.consumer.context().revoked.lock() {
            Ok(mut r) => std::mem::take(&mut *r),
            Err(_) => return,
        };
        for partition in revoked {
            if let Some(o) = self.parts.remove(&partition)
                && let Some(b) = o.building
            {
                tracing::info!(
                    partition,
                    first = b.first,
                    last = b.last,
                    "Dropping the unwritten batch of a revoked partition."
                );
            }
        }
        self.metrics
            .assigned_partitions
            .set(self.parts.len() as i64);
    }

    async fn handle(
        &mut self,
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        self.metrics.tickets_in.inc();
        if !self.parts.contains_key(&partition) {
            let sink = self.load(partition).await?;
            let next = sink.checkpoint.next_offset;
            let owned = self.own(sink, offset.max(next));
            self.parts.insert(partition, owned);
            self.metrics
                .assigned_partitions
                .set(self.parts.len() as i64);
            if offset < next {
                tracing::info!(
                    partition,
                    from = offset,
                    to = next,
                    "Skipping offsets already written to S3."
                );
                self.seek(partition, next);
                return Ok(());
            }
        }
        let Some(owned) = self.parts.get_mut(&partition) else {
            return Ok(());
        };
        if offset < owned.expected {
            return Ok(()); // fetched before a seek: already handled
        }
        owned.expected = offset + 1;
        let b = owned.building.get_or_insert_with(|| Building {
            first: offset,
            last: offset,
            builder: BatchBuilder::default(),
            dead_letters: Vec::new(),
            started: Instant::now(),
        });
        b.last = offset;
        if let Err(reason) = b.builder.push(&self.settings.routing, payload) {
            let reason = reason.to_string();
            tracing::debug!(
                partition,
                offset,
                reason,
                "Invalid ticket sent to the dead-letter topic."
            );
            let fut = send_dead_letter(
                &self.dlq,
                &self.settings.dlq_topic,
                &self.settings.kafka.topic,
                partition,
                offset,
                key.as_deref(),
                payload,
                &reason,
            )
            .await;
            b.dead_letters.push(fut);
        }
        let records = (b.last - b.first + 1) as usize;
        if self
            .settings
            .policy
            .due(records, b.builder.body.len(), b.started.elapsed())
            .is_some()
        {
            self.flush(partition).await?;
        }
        Ok(())
    }

    fn seek(&mut self, partition: i32, offset: i64) {
        let topic = self.settings.kafka.topic.clone();
        if let Err(e) = self.consumer.seek(
            &topic,
            partition,
            Offset::Offset(offset),
            Duration::from_secs(10),
        ) {
            // Not assigned any more, most likely: whoever owns it resumes from the checkpoint.
            tracing::warn!(partition, offset, error = %e, "Seek failed; forgetting the partition.");
            self.parts.remove(&partition);
        }
    }

    async fn flush_due(&mut self) -> anyhow::Result<()> {
        let due: Vec<i32> = self
            .parts
            .iter()
            // A partition with a batch in flight waits for its report (the tick does not block
            // on it); a size limit reached meanwhile is back-pressure in `handle`.
            .filter(|(_, o)| o.sink.is_some())
            .filter_map(|(p, o)| {
                let b = o.building.as_ref()?;
                let records = (b.last - b.first + 1) as usize;
                self.settings
                    .policy
                    .due(records, b.builder.body.len(), b.started.elapsed())
                    .map(|_| *p)
            })
            .collect();
        for p in due {
            self.flush(p).await?;
        }
        Ok(())
    }

    /// Writes every buffered batch and waits for every batch in flight.
    async fn flush_all(&mut self) -> Result<(), SinkError> {
        let as_sink_error =
            |e: anyhow::Error| e.downcast::<SinkError>().unwrap_or_else(SinkError::Fatal);
        let all: Vec<i32> = self.parts.keys().copied().collect();
        for p in all {
            self.flush(p).await.map_err(as_sink_error)?;
        }
        while self.in_flight > 0 {
            self.wait_one().await.map_err(as_sink_error)?;
        }
        Ok(())
    }

    async fn wait_one(&mut self) -> anyhow::Result<()> {
        let done = self
            .done_rx
            .recv()
            .await
            .context("the batch writers are gone")?;
        self.complete(done).await
    }

    /// Hands a partition's batch to a writer task (after the partition's previous batch is
    /// done: its offsets must be committed first).
    async fn flush(&mut self, partition: i32) -> anyhow::Result<()> {
        while self.parts.get(&partition).is_some_and(|o| o.sink.is_none()) {
            self.wait_one().await?;
        }
        let Some(owned) = self.parts.get_mut(&partition) else {
            return Ok(());
        };
        let (Some(b), Some(mut sink)) = (owned.building.take(), owned.sink.take()) else {
            return Ok(());
        };
        let epoch = owned.epoch;
        let (store, layout) = (self.store.clone(), self.settings.layout.clone());
        let (retry, aggregator) = (self.retry.clone(), self.aggregator.clone());
        let (metrics, done_tx) = (self.metrics.clone(), self.done_tx.clone());
        self.in_flight += 1;
        tokio::spawn(async move {
            let started = Instant::now();
            let (first, last, valid) = (b.first, b.last, b.builder.valid);
            let dead = b.dead_letters.len() as u64;
            let write = write_batch(b, &mut sink, &store, &layout, &retry, &aggregator, &metrics);
            // A panic must still report, or the partition would wait for this batch forever.
            let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(write))
                .await
                .unwrap_or_else(|_| {
                    Err(Failure::Sink(SinkError::Fatal(anyhow::anyhow!(
                        "writing the batch of partition {partition} from offset {first} panicked"
                    ))))
                });
            // The receiver lives as long as the processor; if it is gone, so is the result.
            let _ = done_tx.send(Done {
                partition,
                epoch,
                first,
                last,
                valid,
                dead,
                started,
                sink,
                outcome,
            });
        });
        Ok(())
    }

    /// Acts on a writer task's report: commits the offsets of a written batch; after a lost
    /// race or a failed dead letter, drops what was read since and resumes from the right offset.
    async fn complete(&mut self, d: Done) -> anyhow::Result<()> {
        self.in_flight -= 1;
        let partition = d.partition;
        let Some(owned) = self
            .parts
            .get_mut(&partition)
            .filter(|o| o.epoch == d.epoch)
        else {
            tracing::debug!(
                partition,
                first = d.first,
                "A batch of a partition no longer owned is done."
            );
            return Ok(());
        };
        owned.sink = Some(d.sink);
        match d.outcome {
            Ok(()) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(
                    &self.settings.kafka.topic,
                    partition,
                    Offset::Offset(d.last + 1),
                )?;
                if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                    tracing::warn!(partition, error = %e, "Offset commit failed; S3 checkpoint still protects against duplicates.");
                }
                self.metrics.tickets_written.inc_by(d.valid);
                self.metrics.batches_written.inc();
                self.metrics
                    .batch_seconds
                    .observe(d.started.elapsed().as_secs_f64());
                self.counts_dirty = true;
                tracing::debug!(
                    partition,
                    first = d.first,
                    last = d.last,
                    valid = d.valid,
                    dead = d.dead,
                    "Batch written."
                );
                Ok(())
            }
            Err(Failure::DeadLetter(error)) => {
                tracing::error!(
                    partition,
                    first = d.first,
                    error,
                    "Could not write to the dead-letter topic; the batch will be processed again."
                );
                owned.building = None;
                owned.expected = d.first;
                self.rewound.push(partition);
                self.seek(partition, d.first);
                Ok(())
            }
            Err(Failure::Sink(SinkError::Fenced(_))) => {
                self.metrics.fenced.inc();
                let sink = self.load(partition).await?;
                let next = sink.checkpoint.next_offset;
                tracing::warn!(
                    partition,
                    first = d.first,
                    last = d.last,
                    resume_at = next,
                    "Another writer committed this partition first; dropped our batch and resuming from its checkpoint."
                );
                if let Some(o) = self.parts.get_mut(&partition) {
                    o.sink = Some(sink);
                    o.expected = next;
                    o.building = None;
                }
                self.rewound.push(partition);
                self.seek(partition, next);
                Ok(())
            }
            Err(Failure::Sink(e)) => Err(e.into()),
        }
    }

    /// Rewrites `counts_by_request_type/latest.jsonl` from every partition's checkpoint when
    /// it differs; run after commits and now and then, so concurrent instances converge.
    async fn refresh_counts(&mut self, force: bool) -> anyhow::Result<()> {
        if !force && self.counts_written_at.elapsed() < Duration::from_secs(1) {
            return Ok(());
        }
        self.counts_written_at = Instant::now();
        self.counts_dirty = false;
        let layout = &self.settings.layout;
        let result: Result<(), SinkError> = async {
            let total = total_counts(&self.store, layout, &self.retry).await?;
            let body = total.to_jsonl(&self.settings.routing);
            let key = layout.counts_key();
            let current = self
                .retry
                .run("read counts", || self.store.get(&key))
                .await?;
            if current.is_none_or(|(b, _)| b != body) {
                self.retry
                    .run("write counts", || {
                        self.store.put(&key, body.clone(), Expect::Any)
                    })
                    .await?;
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) | Err(SinkError::Aborted) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// A writer task's work: dead letters durable, counts, then the batch into S3 exactly once.
async fn write_batch(
    b: Building,
    sink: &mut PartitionSink,
    store: &Store,
    layout: &Layout,
    retry: &Retrier,
    aggregator: &Aggregator,
    metrics: &Metrics,
) -> Result<(), Failure> {
    // Dead letters must be durable before the batch's offsets count as done.
    let dead = b.dead_letters.len() as u64;
    for fut in b.dead_letters {
        match fut.await {
            Ok(Ok(_)) => metrics.dead_lettered.inc(),
            Ok(Err((e, _))) => return Err(Failure::DeadLetter(e.to_string())),
            Err(_) => return Err(Failure::DeadLetter("producer closed".to_string())),
        };
    }
    let counts = aggregator
        .count(vec![b.builder.columns.finish()])
        .await
        .map_err(|e| Failure::Sink(SinkError::Fatal(e)))?;
    let batch = Batch {
        first: b.first,
        last: b.last,
        valid: b.builder.valid,
        body: b.builder.body,
        dead_letters: dead,
        counts,
    };
    sink.commit(store, layout, batch, retry)
        .await
        .map_err(Failure::Sink)
}

/// Sends an invalid message to the dead-letter topic with its key, bytes and the reason.
#[allow(clippy::too_many_arguments)]
async fn send_dead_letter(
    producer: &FutureProducer,
    dlq_topic: &str,
    source_topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    payload: &[u8],
    reason: &str,
) -> DeliveryFuture {
    let (p, o) = (partition.to_string(), offset.to_string());
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "error.message",
            value: Some(reason),
        })
        .insert(Header {
            key: "source.topic",
            value: Some(source_topic),
        })
        .insert(Header {
            key: "source.partition",
            value: Some(&p),
        })
        .insert(Header {
            key: "source.offset",
            value: Some(&o),
        });
    let mut record = FutureRecord::to(dlq_topic)
        .payload(payload)
        .headers(headers);
    if let Some(k) = key {
        record = record.key(k);
    }
    loop {
        match producer.send_result(record) {
            Ok(f) => return f,
            Err((_, back)) => {
                // Local queue full: give librdkafka a moment to deliver.
                record = back;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
