//! The streaming processor: consume, batch per partition, write each batch to the output
//! exactly once (its `ticket_commit::Committer`), then commit the Kafka offsets.
//!
//! Who owns what:
//! - this file: the consumer's loop, one task that does nothing slow. It copies each message
//!   into its partition's open batch, hands due batches to the partition's writer, commits
//!   offsets when a writer reports a batch durable, and follows rebalances. Everything else
//!   reaches it as an [`Event`] on one channel;
//! - [`owner`]: [`owner::PartitionOwner`], the one owner of a partition's state: loading,
//!   open, closed (revoked, rewound, stopped);
//! - [`partition`]: an open partition's batches (handled offsets, the open batch, batches in
//!   flight, a committed range being rebuilt), no I/O in it;
//! - [`writer`]: a partition's writer, two tasks: decode, validate, route, dead letters,
//!   counts and encode; then the exactly-once commit;
//! - [`dead_letter`]: the dead-letter producer;
//! - [`drain`]: `--drain`, all of it: the assignment and end offsets at start, the idle rule
//!   and the end test (never with a committed batch left unwritten);
//! - [`counts`]: `counts_by_request_type/latest.jsonl`, refreshed by a task of its own;
//! - [`kafka`]: the consumer seam, what the loop asks of Kafka, and librdkafka behind it (the
//!   loop is generic over it: `tests_loop` runs it on a scripted Kafka, without a broker).
//!
//! Back-pressure without leaving the group: when a partition's due batch finds its writer
//! full (`MAX_IN_FLIGHT` batches in flight, as during an S3 outage), that partition is paused
//! in librdkafka and the loop goes on polling, so `max.poll.interval.ms`, rebalances, the stop
//! signal and the other partitions are served however long S3 stays away. Messages librdkafka
//! had already fetched for the paused partition are dropped (its pause is a version barrier;
//! one that still reaches the loop is dropped here), and the resume, when the writer reports a
//! batch written, fetches again from the partition's next offset to handle (a seek first if
//! anything was dropped here): nothing skipped, nothing read twice. A paused partition that
//! is revoked or rewound is resumed as it is closed; if it comes back, it is a new ownership
//! that seeks to its plan's offset. Nothing on this loop waits on S3 or on the broker: seeks
//! are asynchronous and `--drain`'s end-offset reads run on a blocking thread.
//!
//! S3 is the source of truth for progress: when a partition is first seen its committer
//! recovers it (by a task; the partition's messages are dropped meanwhile) and the consumer
//! seeks to the plan's offset (the checkpoint's, or a committed batch's first to rebuild it),
//! so nothing already written is written again.

pub mod counts;
pub mod dead_letter;
pub mod drain;
pub mod health;
pub mod kafka;
pub mod owner;
pub mod partition;
pub mod writer;

#[cfg(test)]
mod scripted;
#[cfg(test)]
mod tests_loop;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::CommitMode;
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use ticket_core::Routing;
use ticket_core::batch::BatchPolicy;
use ticket_core::keys::Layout;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::counts::CountsPublisher;
use self::dead_letter::DeadLetters;
use self::drain::Drain;
use self::health::Health;
use self::kafka::Kafka;
pub use self::kafka::{CONSUMER_DEFAULTS, with_consumer_defaults};
use self::owner::{Close, HandOver, PartitionOwner};
use self::partition::Written;
use self::writer::{Report, WriterContext};
use crate::Shutdown;
use crate::metrics::Metrics;
use ticket_commit::{Committer, Failure, Plan, Retrier};
use ticket_engine::aggregate::Aggregator;
use ticket_engine::output::OutputFormat;
use ticket_output::Output;
use ticket_s3::store::SharedStore;

/// How often the loop ticks when no message comes: age-due batches are handed over, `--drain`
/// checks for the end, and `/health/live` is told the loop turns (see [`health::STUCK_AFTER`]).
pub const TICK: Duration = Duration::from_millis(200);

/// Messages taken from the consumer's queue in one turn of the loop, when they are there
/// already (the loop's other work, timers and reports, waits for at most this many).
pub const BURST: usize = 256;

/// After SIGTERM/SIGINT, how much longer than `SHUTDOWN_TIMEOUT_SECS` the process may take
/// (closing the Kafka clients) before `main` exits regardless.
pub const EXIT_GRACE: Duration = Duration::from_secs(5);

/// A paused partition (see [`Processor::pause`]).
#[derive(Debug, Default)]
struct Paused {
    /// A message of it reached the loop while paused and was dropped: seek before resuming.
    dropped: bool,
}

/// Everything the streaming processor needs, already validated.
pub struct Settings {
    pub kafka: ticket_kafka::KafkaArgs,
    pub group: String,
    pub dlq_topic: String,
    pub policy: BatchPolicy,
    pub routing: Routing,
    pub layout: Layout,
    pub format: OutputFormat,
    /// Where the batches go (`OUTPUT_FORMAT`), opened at start.
    pub output: Output,
    /// Process up to the end of the topic as of start, then exit.
    pub drain: bool,
}

/// What reaches the consumer's loop from elsewhere.
pub enum Event {
    /// A writer finished a batch (or failed on it).
    Written(Report),
    /// A partition's committer recovered it (or could not).
    Loaded {
        partition: i32,
        epoch: u64,
        result: Result<(Box<dyn Committer>, Plan), Failure>,
    },
    /// librdkafka's rebalance callback took partitions away.
    Revoked(Vec<i32>),
    /// A background task hit an error that stops the processor.
    Fatal(anyhow::Error),
    /// `--drain`'s end test read a partition's end offset (`None`: it could not).
    EndOffset { partition: i32, end: Option<i64> },
}

struct Processor<K: Kafka> {
    settings: Settings,
    /// Shared with the loop's message stream (one for the whole run, not one per message).
    consumer: Arc<K>,
    writers: Arc<WriterContext>,
    /// `None` once finished.
    counts: Option<CountsPublisher>,
    metrics: Metrics,
    /// The partitions this instance is responsible for, each the one owner of its state.
    owners: HashMap<i32, PartitionOwner>,
    /// Numbers ownerships, so a late report of an earlier one is recognised.
    next_epoch: u64,
    events_tx: UnboundedSender<Event>,
    events: UnboundedReceiver<Event>,
    /// Partitions whose due batch waits for room at their writer (back-pressure, as during an
    /// S3 outage), paused in librdkafka: the loop goes on polling, so the group, rebalances,
    /// the stop signal and the other partitions are served. See [`Processor::pause`].
    paused: BTreeMap<i32, Paused>,
    drain: Option<Drain>,
    /// The last offset committed per partition, for the final synchronous commit.
    committed: BTreeMap<i32, i64>,
    /// Set once stopping: a partition that must be rewound is let go instead.
    stopping: bool,
}

/// Runs until `shutdown.stop` fires (or, with `drain`, until the topic's end as of start);
/// then writes what is buffered until `shutdown.abort` fires.
pub async fn run(
    settings: Settings,
    store: SharedStore,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: Shutdown,
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
    // Created (if need be) while the consumer starts; awaited before processing begins.
    let kafka = settings.kafka.clone();
    let dlq_topic = settings.dlq_topic.clone();
    let dlq_ready = tokio::task::spawn_blocking(move || {
        futures::executor::block_on(kafka.ensure_topic(&dlq_topic, partitions as i32, 1))
    });

    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let consumer = kafka::consumer(&settings, events_tx.clone(), metrics.clone())?;
    let dead_letters = DeadLetters::new(
        settings.kafka.client_config(),
        &settings.dlq_topic,
        &settings.kafka.topic,
    )?;
    let ready = async move {
        dlq_ready.await??;
        anyhow::Ok(())
    };
    let parts = Parts {
        settings,
        consumer: Arc::new(consumer),
        dead_letters,
        store,
        metrics,
        events: (events_tx, events),
    };
    serve(parts, partitions as i32, ready, health, shutdown).await
}

/// What [`serve`] runs on: the settings, and the consumer and dead-letter producer made from
/// them (librdkafka's, or a test's), with the loop's event channel the consumer's callbacks
/// send on.
pub(crate) struct Parts<K: Kafka> {
    pub settings: Settings,
    pub consumer: Arc<K>,
    pub dead_letters: DeadLetters,
    pub store: SharedStore,
    pub metrics: Metrics,
    pub events: (UnboundedSender<Event>, UnboundedReceiver<Event>),
}

/// The processor on any [`Kafka`]: joins (or, draining, assigns) `partitions` of the topic,
/// processes until `shutdown.stop` (or the drain's end), then writes what is buffered until
/// `shutdown.abort`. `ready` is awaited before processing begins (the dead-letter topic).
pub(crate) async fn serve<K: Kafka>(
    parts: Parts<K>,
    partitions: i32,
    ready: impl Future<Output = anyhow::Result<()>>,
    health: Arc<Health>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let Parts {
        settings,
        consumer,
        dead_letters,
        store,
        metrics,
        events: (events_tx, events),
    } = parts;
    let topic = settings.kafka.topic.clone();

    // The abort token ends S3 retries and waits: `main` fires it SHUTDOWN_TIMEOUT_SECS after
    // a stop request, and buffered batches are then abandoned (they are processed again on
    // restart) rather than the stop hanging on an outage.
    let Shutdown { stop, abort } = shutdown;
    // A failure that is not plainly transient is judged by a fresh look at the output (the
    // bucket, the table), not by how a library wrapped it (ticket_commit::retry).
    let retry =
        Retrier::new(abort.clone(), metrics.retry.clone()).with_check(settings.output.check());
    let writers = Arc::new(WriterContext {
        store: store.clone(),
        layout: settings.layout.clone(),
        routing: settings.routing.clone(),
        format: settings.format,
        output: settings.output.clone(),
        retry: retry.clone(),
        aggregator: Aggregator::default(),
        metrics: metrics.clone(),
        dead_letters,
        events: events_tx.clone(),
    });
    let counts = CountsPublisher::spawn(
        store,
        settings.layout.clone(),
        settings.routing.clone(),
        retry,
        settings.output.totals(),
        events_tx.clone(),
    );
    let mut p = Processor {
        consumer,
        writers,
        counts: Some(counts),
        metrics,
        owners: HashMap::new(),
        next_epoch: 0,
        events_tx,
        events,
        paused: BTreeMap::new(),
        drain: None,
        committed: BTreeMap::new(),
        stopping: false,
        settings,
    };

    let started = async {
        if p.settings.drain {
            p.start_drain(partitions).await?;
        } else {
            p.consumer
                .subscribe(&topic)
                .context("subscribing to the tickets topic")?;
        }
        ready.await?;
        anyhow::Ok(())
    };
    let result = match started.await {
        Ok(()) => {
            health.set_ready(true);
            tracing::info!(topic, group = %p.settings.group, drain = p.settings.drain, "Processing.");
            p.main_loop(&stop, &health).await
        }
        Err(e) => Err(e),
    };
    health.set_ready(false);

    // Graceful stop: write what is buffered, then commit and leave.
    let finished = match &result {
        Ok(()) => p.finish(&abort).await,
        Err(_) => Ok(()),
    };
    p.commit_sync();
    p.consumer.unsubscribe();
    result?;
    match finished {
        Err(Failure::Aborted) => {
            tracing::warn!(
                "Stopped before buffered batches could be written; they will be processed again on restart."
            );
            Ok(())
        }
        other => other.map_err(anyhow::Error::from),
    }
}

impl<K: Kafka> Processor<K> {
    async fn main_loop(
        &mut self,
        shutdown: &CancellationToken,
        health: &Health,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One timer for the earliest age deadline, reset only when that deadline changes (not
        // a new timer per message).
        let mut deadline_timer = std::pin::pin!(tokio::time::sleep(TICK));
        let mut armed: Option<Instant> = None;
        let consumer = self.consumer.clone();
        let mut messages = consumer.messages();
        loop {
            if self.drain_done()? {
                return Ok(());
            }
            // The earliest moment a batch is due by age: handed over then, not at the next tick.
            let due = self.next_deadline();
            if let Some(at) = due
                && armed != due
            {
                deadline_timer.as_mut().reset(at.into());
            }
            armed = due;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                // Before the consumer, which is nearly always ready under load.
                Some(event) = self.events.recv() => self.on_event(event)?,
                _ = tick.tick() => {
                    health.tick();
                    self.on_tick();
                }
                _ = &mut deadline_timer, if due.is_some() => {
                    self.hand_over_due(Instant::now());
                }
                m = messages.next() => {
                    // One reading of the clock for the burst (a message's arrival matters to
                    // the batch age and the drain's idle rule, in milliseconds); read again
                    // after anything that may take longer (an event handled, a seek).
                    let mut now = Instant::now();
                    self.on_message(m.expect("Kafka message streams never end"), &mut now)?;
                    // Then what is already fetched, without a turn of this loop for each:
                    // until the queue is empty or the drain ends, BURST at most (a stop
                    // request waits for no more than that).
                    for _ in 1..BURST {
                        if self.drain.as_ref().is_some_and(Drain::finished) {
                            break;
                        }
                        match messages.next().now_or_never() {
                            Some(m) => self.on_message(m.expect("Kafka message streams never end"), &mut now)?,
                            None => break,
                        }
                    }
                }
            }
        }
    }

    /// One message (or error) from the consumer.
    fn on_message(
        &mut self,
        m: KafkaResult<impl Message>,
        now: &mut Instant,
    ) -> anyhow::Result<()> {
        match m {
            Ok(m) => {
                let (partition, offset) = (m.partition(), m.offset());
                if let Some(d) = &mut self.drain {
                    d.message(partition, *now);
                }
                if let Some(paused) = self.paused.get_mut(&partition) {
                    // Fetched before the pause took effect: read again after the resume.
                    paused.dropped = true;
                    return Ok(());
                }
                let message = (offset, m.timestamp().to_millis(), m.key(), m.payload());
                let known = match self.owners.get_mut(&partition) {
                    Some(owner) => {
                        owner.accept(message, *now, &self.metrics).map_err(|gone| {
                            range_gone(
                                &self.settings.kafka.topic,
                                &self.settings.layout,
                                partition,
                                &gone.to_string(),
                            )
                        })?;
                        true
                    }
                    None => false,
                };
                drop(m);
                // A revocation seen while the consumer was polled comes first.
                let mut handled = false;
                while let Ok(event) = self.events.try_recv() {
                    self.on_event(event)?;
                    handled = true;
                }
                if handled {
                    *now = Instant::now();
                }
                if !known {
                    self.load(partition);
                } else {
                    self.hand_over(partition, *now, true);
                }
            }
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                let position = self.position(p);
                if let Some(d) = &mut self.drain {
                    d.end_of_partition(p, position);
                }
            }
            Err(e) => tracing::warn!(error = %e, "Kafka error (librdkafka retries by itself)."),
        }
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.owners
            .values()
            .filter_map(|o| o.deadline(&self.settings.policy))
            .min()
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.drain_tick(now);
        self.hand_over_due(now);
    }

    fn hand_over_due(&mut self, now: Instant) {
        let owned: Vec<i32> = self.owners.keys().copied().collect();
        for p in owned {
            self.hand_over(p, now, false);
        }
    }

    /// Hands the partition's batch to its writer if it is due (`hold`: and pauses the
    /// partition if the writer has no room).
    fn hand_over(&mut self, partition: i32, now: Instant, hold: bool) -> HandOver {
        let Some(owner) = self.owners.get_mut(&partition) else {
            return HandOver::NotDue;
        };
        let done = owner.hand_over(&self.settings.policy, now);
        if done == HandOver::NoRoom && hold {
            self.pause(partition);
        }
        done
    }

    /// Stops fetching `partition` while its due batch waits for room at its writer.
    ///
    /// librdkafka drops what it had fetched of the partition and not yet handed over (a
    /// version barrier), and on resume fetches again from the last message it handed over.
    /// A message of the partition that still reaches the loop while it is paused is dropped
    /// here, and the resume first seeks to the partition's next offset to handle, so nothing
    /// is skipped and nothing read twice (an offset already handled is dropped anyway). A
    /// paused partition that is closed (revoked, rewound) is resumed on the way out: a new
    /// ownership starts fetching with its seek to the plan's offset.
    fn pause(&mut self, partition: i32) {
        if self.paused.contains_key(&partition) {
            return;
        }
        if let Err(e) = self.consumer.pause(&self.one(partition)) {
            tracing::warn!(partition, error = %e, "Cannot pause the partition; its messages are dropped until its writer has room.");
        }
        tracing::debug!(partition, "Partition paused: its writer has no room.");
        self.paused.insert(partition, Paused::default());
    }

    /// Fetches `partition` again, from its next offset to handle (see [`Processor::pause`]).
    fn resume(&mut self, partition: i32) {
        let Some(paused) = self.paused.remove(&partition) else {
            return;
        };
        let next = self
            .owners
            .get(&partition)
            .and_then(PartitionOwner::expected);
        if let (true, Some(next)) = (paused.dropped, next) {
            self.seek(partition, next);
        }
        if let Err(e) = self.consumer.resume(&self.one(partition)) {
            tracing::debug!(partition, error = %e, "Resume failed (not assigned any more?).");
        }
        tracing::debug!(partition, "Partition resumed.");
    }

    /// A list of one partition of the tickets topic.
    fn one(&self, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.settings.kafka.topic, partition);
        tpl
    }

    fn on_event(&mut self, event: Event) -> anyhow::Result<()> {
        match event {
            Event::Written(report) => self.on_written(report),
            Event::Loaded {
                partition,
                epoch,
                result,
            } => self.on_loaded(partition, epoch, result),
            Event::Revoked(parts) => {
                for p in parts {
                    self.close(p, Close::Revoked);
                }
                Ok(())
            }
            Event::Fatal(e) => Err(e),
            Event::EndOffset { partition, end } => {
                if let Some(d) = &mut self.drain {
                    d.end_read(partition, end);
                }
                Ok(())
            }
        }
    }

    fn on_written(&mut self, r: Report) -> anyhow::Result<()> {
        let partition = r.partition;
        let Some(owner) = self.owners.get_mut(&partition) else {
            return Ok(());
        };
        if owner.epoch() != r.epoch {
            tracing::debug!(
                partition,
                first = r.first,
                "A batch of an earlier ownership is done."
            );
            return Ok(());
        }
        match r.outcome {
            Ok(()) => {
                let Written::Commit(next) = owner.written(r.epoch, r.first, r.last) else {
                    return Ok(());
                };
                self.commit(partition, next);
                self.metrics.tickets_written.inc_by(r.valid);
                self.metrics.batches_written.inc();
                self.metrics
                    .batch_age
                    .observe(r.started.elapsed().as_secs_f64());
                self.metrics
                    .batch_commit
                    .observe(r.commit_time.as_secs_f64());
                if let Some(c) = &self.counts {
                    c.changed();
                }
                tracing::debug!(
                    partition,
                    first = r.first,
                    last = r.last,
                    valid = r.valid,
                    dead = r.dead,
                    "Batch written."
                );
                if self.paused.contains_key(&partition)
                    && self.hand_over(partition, Instant::now(), true) != HandOver::NoRoom
                {
                    self.resume(partition);
                }
                Ok(())
            }
            Err(e @ (Failure::Fenced(_) | Failure::Rewind(_))) => {
                let why = e.to_string();
                tracing::warn!(
                    partition,
                    first = r.first,
                    last = r.last,
                    why,
                    "Batch not written; processing the partition again from its checkpoint."
                );
                self.close(partition, Close::Rewind);
                if !self.stopping {
                    self.load(partition);
                    if let Some(d) = &mut self.drain {
                        d.rewound(partition, Instant::now());
                    }
                }
                Ok(())
            }
            Err(Failure::Aborted) => {
                let unwritten = self
                    .owners
                    .get(&partition)
                    .and_then(PartitionOwner::unwritten);
                self.log_unwritten(unwritten.map(|u| (partition, u)).into_iter());
                self.close(partition, Close::Rewind);
                Ok(())
            }
            Err(Failure::Fatal(e)) => {
                Err(e.context(format!("writing a batch of partition {partition}")))
            }
        }
    }

    /// Starts recovering a partition, as a new ownership.
    fn load(&mut self, partition: i32) {
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        self.owners
            .insert(partition, PartitionOwner::loading(partition, epoch));
        let (ctx, events) = (self.writers.clone(), self.events_tx.clone());
        let (consumer, kafka) = (self.consumer.clone(), self.settings.kafka.clone());
        tokio::spawn(async move {
            let result = async move {
                let (committer, plan) = recover(&ctx, partition).await?;
                tokio::task::spawn_blocking(move || {
                    still_in_kafka(consumer.as_ref(), &kafka, &ctx.layout, partition, plan)
                })
                .await
                .map_err(anyhow::Error::from)??;
                Ok((committer, plan))
            }
            .await;
            let _ = events.send(Event::Loaded {
                partition,
                epoch,
                result,
            });
        });
    }

    fn on_loaded(
        &mut self,
        partition: i32,
        epoch: u64,
        result: Result<(Box<dyn Committer>, Plan), Failure>,
    ) -> anyhow::Result<()> {
        if !self
            .owners
            .get(&partition)
            .is_some_and(|o| o.is_loading_as(epoch))
        {
            return Ok(()); // revoked (or rewound again) meanwhile
        }
        let (committer, plan) = match result {
            Ok(loaded) => loaded,
            Err(Failure::Aborted) => return Ok(()),
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("loading the checkpoint of partition {partition}")));
            }
        };
        self.own(partition, epoch, committer, plan);
        self.update_gauge();
        tracing::info!(partition, from = plan.start(), plan = ?plan, "Resuming from the S3 checkpoint.");
        self.seek(partition, plan.start());
        Ok(())
    }

    /// Owns a partition as its committer recovered it, with a writer of its own.
    fn own(&mut self, partition: i32, epoch: u64, committer: Box<dyn Committer>, plan: Plan) {
        let owner = PartitionOwner::open(partition, epoch, self.writers.clone(), committer, plan);
        self.owners.insert(partition, owner);
    }

    /// Closes a partition (the one way to, whatever the reason): its unwritten messages will
    /// be processed again by whoever owns it next, from the last committed checkpoint.
    fn close(&mut self, partition: i32, why: Close) {
        if self.paused.remove(&partition).is_some() {
            let _ = self.consumer.resume(&self.one(partition));
        }
        if let Some(owner) = self.owners.remove(&partition) {
            let _ = owner.close(why);
        }
        self.update_gauge();
    }

    fn update_gauge(&self) {
        let owned = self.owners.values().filter(|o| o.is_open()).count();
        self.metrics.assigned_partitions.set(owned as i64);
    }

    fn commit(&mut self, partition: i32, next: i64) {
        self.committed.insert(partition, next);
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(&self.settings.kafka.topic, partition, Offset::Offset(next))
            .is_ok()
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Async)
        {
            tracing::warn!(partition, error = %e, "Offset commit failed; S3 checkpoint still protects against duplicates.");
        }
    }

    /// The offsets of every written batch, committed before leaving (for the lag Console shows).
    fn commit_sync(&self) {
        let mut tpl = TopicPartitionList::new();
        for (p, next) in &self.committed {
            let _ = tpl.add_partition_offset(&self.settings.kafka.topic, *p, Offset::Offset(*next));
        }
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::debug!(error = %e, "Final offset commit.");
        }
    }

    /// Seeks without waiting (librdkafka's asynchronous seek: its version barrier drops what
    /// was fetched before it), so the loop never blocks on the broker.
    fn seek(&mut self, partition: i32, offset: i64) {
        let topic = self.settings.kafka.topic.clone();
        if let Err(e) = self.consumer.seek(&topic, partition, offset) {
            // Not assigned any more, most likely: whoever owns it resumes from the checkpoint.
            tracing::warn!(partition, offset, error = %e, "Seek failed; forgetting the partition.");
            self.close(partition, Close::Revoked);
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
        let handled = self
            .owners
            .get(&partition)
            .and_then(PartitionOwner::expected)
            .unwrap_or(-1);
        if self.paused.get(&partition).is_some_and(|p| p.dropped) {
            // Messages past `handled` were fetched and dropped: they are not read yet.
            return Some(handled);
        }
        Some(fetched.max(handled))
    }

    /// Says which offsets a stop leaves unwritten, per partition.
    fn log_unwritten(&self, unwritten: impl Iterator<Item = (i32, (i64, i64))>) {
        for (partition, (first, last)) in unwritten {
            tracing::warn!(
                partition,
                first,
                last,
                "Stopped before these offsets could be written: left uncommitted, the partition's next owner reads them again."
            );
        }
    }

    /// Writes every buffered batch and waits for every writer, until `abort`.
    async fn finish(&mut self, abort: &CancellationToken) -> Result<(), Failure> {
        self.stopping = true;
        self.owners.retain(|_, o| o.is_open());
        loop {
            let mut busy = false;
            for owner in self.owners.values_mut() {
                busy |= owner.flush_for_stop();
            }
            if !busy {
                break;
            }
            tokio::select! {
                Some(event) = self.events.recv() => {
                    if let Err(e) = self.on_event(event) {
                        return Err(Failure::Fatal(e));
                    }
                }
                _ = abort.cancelled() => {
                    self.log_unwritten(self.owners.values().filter_map(|o| Some((o.id, o.unwritten()?))));
                    return Err(Failure::Aborted);
                }
            }
        }
        let closing: Vec<JoinHandle<()>> = self
            .owners
            .drain()
            .filter_map(|(_, owner)| owner.close(Close::Stop))
            .collect();
        for task in closing {
            tokio::select! {
                _ = task => {}
                _ = abort.cancelled() => return Err(Failure::Aborted),
            }
        }
        let Some(counts) = self.counts.take() else {
            return Ok(());
        };
        tokio::select! {
            _ = counts.finish() => Ok(()),
            _ = abort.cancelled() => Err(Failure::Aborted),
        }
    }
}

/// A partition's committer, recovered from the store: where to start.
async fn recover(
    ctx: &WriterContext,
    partition: i32,
) -> Result<(Box<dyn Committer>, Plan), Failure> {
    let mut committer = ctx.output.committer(partition, ctx.retry.clone());
    let plan = committer.recover().await?;
    Ok((committer, plan))
}

/// Before a committed range is read again: Kafka must still have its first offset (the
/// consumer's `auto.offset.reset=earliest` would otherwise jump past it without a word).
fn still_in_kafka(
    consumer: &impl Kafka,
    kafka: &ticket_kafka::KafkaArgs,
    layout: &Layout,
    partition: i32,
    plan: Plan,
) -> Result<(), Failure> {
    let Plan::Rebuild { first, last } = plan else {
        return Ok(());
    };
    let (low, _) = consumer
        .fetch_watermarks(&kafka.topic, partition, kafka.connect_timeout())
        .map_err(|e| {
            anyhow::anyhow!(
                "reading where {}/{partition} starts, to read offsets {first}..={last} again: {e}",
                kafka.topic
            )
        })?;
    if low > first {
        return Err(Failure::Fatal(range_gone(
            &kafka.topic,
            layout,
            partition,
            &format!(
                "offsets {first}..={last} are committed in S3 but some of their objects are not written yet, and Kafka no longer has them (the partition starts at offset {low} now: retention removed them)"
            ),
        )));
    }
    Ok(())
}

/// The error for a committed range Kafka no longer has: what is lost, and how to go on.
fn range_gone(topic: &str, layout: &Layout, partition: i32, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "topic {topic:?}, partition {partition}: {what}. Those objects cannot be written. To go on without them (every other ticket stays exactly once), remove the \"batch\" field from {} and restart; to keep this from happening, keep the topic's retention longer than any S3 outage or stop of the processor",
        layout.checkpoint_key(partition)
    )
}
