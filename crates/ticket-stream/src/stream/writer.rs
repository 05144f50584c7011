//! A partition's writer: two tasks that turn the partition's sealed batches, in order, into
//! results in S3. The first decodes, validates, sends dead letters, counts and encodes
//! (`encode`); the second commits exactly once (`commit`) while the first works on the next
//! batch. All of it is off the consumer's task, and the writers of different partitions run in
//! parallel. Each batch's outcome is reported back to the consumer's loop as an [`Event`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ticket_core::keys::{Hour, Layout};
use ticket_core::{Routing, decode_ref};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Event;
use super::dead_letter::{DeadLetter, DeadLetterError, DeadLetters};
use super::partition::{Buffer, Open};
use crate::metrics::Metrics;
use ticket_commit::{Batch, Committer, Failure, Object, Retrier, Steps, drive};
use ticket_engine::aggregate::Aggregator;
use ticket_engine::enrich::BatchBuilder;
use ticket_engine::output::{OutputFormat, recycle_body};
use ticket_engine::recycle::{Pool, Reusable};
use ticket_output::Output;
use ticket_s3::store::SharedStore;

/// Messages as read, copied into one buffer (no allocation per message).
#[derive(Default)]
pub struct RawBatch {
    data: Vec<u8>,
    messages: Vec<RawMessage>,
}

struct RawMessage {
    offset: i64,
    /// The Kafka timestamp (ms), if the message has one.
    timestamp: Option<i64>,
    key: Option<(usize, usize)>,
    payload: (usize, usize),
}

/// A message of a [`RawBatch`], as read.
#[derive(Debug, PartialEq)]
struct Message<'a> {
    offset: i64,
    timestamp: Option<i64>,
    key: Option<&'a [u8]>,
    payload: &'a [u8],
}

impl RawBatch {
    pub fn push(
        &mut self,
        offset: i64,
        timestamp: Option<i64>,
        key: Option<&[u8]>,
        payload: &[u8],
    ) {
        let mut append = |bytes: &[u8]| {
            let start = self.data.len();
            self.data.extend_from_slice(bytes);
            (start, self.data.len())
        };
        let key = key.map(&mut append);
        let payload = append(payload);
        self.messages.push(RawMessage {
            offset,
            timestamp,
            key,
            payload,
        });
    }

    /// Each message as read.
    fn iter(&self) -> impl Iterator<Item = Message<'_>> {
        self.messages.iter().map(|m| Message {
            offset: m.offset,
            timestamp: m.timestamp,
            key: m.key.map(|(a, b)| &self.data[a..b]),
            payload: &self.data[m.payload.0..m.payload.1],
        })
    }
}

impl Buffer for RawBatch {
    fn bytes(&self) -> usize {
        self.data.len()
    }

    fn with_room_for(records: usize, bytes: usize) -> Self {
        let mut b = RAW_BATCHES.take().unwrap_or_default();
        b.data.reserve_exact(bytes);
        b.messages.reserve_exact(records);
        b
    }
}

/// Raw batches given back once decoded, for [`Buffer::with_room_for`] (see [`ticket_engine::recycle`]).
static RAW_BATCHES: Pool<RawBatch> = Pool::new(8);

impl Reusable for RawBatch {
    fn empty(&mut self) {
        self.data.clear();
        self.messages.clear();
    }
}

/// What every writer shares.
pub struct WriterContext {
    pub store: SharedStore,
    pub layout: Layout,
    pub routing: Routing,
    pub format: OutputFormat,
    /// Where the batches go: it gives each partition its committer.
    pub output: Output,
    pub retry: Retrier,
    pub aggregator: Aggregator,
    pub metrics: Metrics,
    pub dead_letters: DeadLetters,
    pub events: UnboundedSender<Event>,
}

/// A batch's outcome, as reported to the consumer's loop.
pub struct Report {
    pub partition: i32,
    pub epoch: u64,
    pub first: i64,
    pub last: i64,
    pub valid: u64,
    pub dead: u64,
    pub started: Instant,
    /// How long the commit itself took.
    pub commit_time: std::time::Duration,
    pub outcome: Result<(), Failure>,
}

/// The handle the consumer's loop keeps for a partition's writer: two tasks in a pipeline,
/// so that one batch is decoded and encoded (CPU) while the one before it is committed to S3
/// (round trips). Librdkafka hands over long runs of one partition's messages, so without the
/// overlap that partition's writer alone set the pace, one step after the other.
pub struct Writer {
    /// Each batch with the moment it was handed over.
    jobs: UnboundedSender<(Open<RawBatch>, Instant)>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// A batch between the two stages: ready to commit, or what went wrong encoding it.
struct Encoded {
    first: i64,
    last: i64,
    started: Instant,
    valid: u64,
    dead: u64,
    /// A committed range read again ([`ticket_commit::Plan::Rebuild`]).
    rebuild: bool,
    /// Its stages so far.
    timeline: Timeline,
    /// When its encoding ended.
    encoded: Instant,
    batch: Result<Batch, Failure>,
}

impl Writer {
    pub fn spawn(
        ctx: Arc<WriterContext>,
        partition: i32,
        epoch: u64,
        mut committer: Box<dyn Committer>,
    ) -> Writer {
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Open<RawBatch>, Instant)>();
        // One encoded batch waits while the one before it is committed.
        let (encoded_tx, mut encoded) = tokio::sync::mpsc::channel::<Encoded>(1);
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let encoder_ctx = ctx.clone();
        tokio::spawn(async move {
            let ctx = encoder_ctx;
            loop {
                let (job, sealed) = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    job = rx.recv() => match job { Some(j) => j, None => break },
                };
                let (first, last, started, rebuild) =
                    (job.first, job.last, job.started, job.rebuild);
                let mut timeline = Timeline::before_encoding(&job, sealed);
                let encoding = Instant::now();
                let work = encode(&ctx, partition, job);
                // A panic must still report, or the partition would wait for this batch forever.
                let (valid, dead, batch) =
                    futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(work))
                        .await
                        .unwrap_or_else(|_| (0, 0, Err(panicked(partition, first))));
                timeline.encode = secs(encoding.elapsed());
                let failed = batch.is_err();
                let e = Encoded {
                    first,
                    last,
                    started,
                    valid,
                    dead,
                    rebuild,
                    timeline,
                    encoded: Instant::now(),
                    batch,
                };
                // The committer is gone after a failure: what is queued is rebuilt anyway.
                if encoded_tx.send(e).await.is_err() || failed {
                    break;
                }
            }
        });
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            loop {
                let e = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    e = encoded.recv() => match e { Some(e) => e, None => break },
                };
                let commit_started = Instant::now();
                let mut e = e;
                e.timeline.wait = secs(commit_started - e.encoded);
                let outcome = match e.batch {
                    Ok(batch) => {
                        let bodies: Vec<Bytes> =
                            batch.objects.iter().map(|o| o.body.clone()).collect();
                        let steps = batch.steps.clone();
                        let work = commit(&ctx, committer.as_mut(), partition, batch, e.rebuild);
                        let outcome =
                            futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(work))
                                .await
                                .unwrap_or_else(|_| Err(panicked(partition, e.first)));
                        for body in bodies {
                            recycle_body(ctx.format, body);
                        }
                        if outcome.is_ok() {
                            e.timeline
                                .observe(&ctx.metrics, &steps, partition, e.first, e.last);
                        }
                        outcome
                    }
                    Err(failure) => Err(failure),
                };
                let failed = outcome.is_err();
                // The receiver lives as long as the processor; if it is gone, so is the result.
                let _ = ctx.events.send(Event::Written(Report {
                    partition,
                    epoch,
                    first: e.first,
                    last: e.last,
                    valid: e.valid,
                    dead: e.dead,
                    started: e.started,
                    commit_time: commit_started.elapsed(),
                    outcome,
                }));
                if failed {
                    // What is queued after a failed batch is rebuilt from the checkpoint.
                    break;
                }
            }
        });
        Writer { jobs, cancel, task }
    }

    pub fn send(&self, batch: Open<RawBatch>) {
        // The tasks only end after a failure (reported) or a cancel: then the batch is moot.
        let _ = self.jobs.send((batch, Instant::now()));
    }

    /// The partition is not ours any more: stop between batches (a batch being committed is
    /// fenced by the checkpoint if the new owner got there first; one being encoded still
    /// sends its dead letters, which the dead-letter topic may then hold twice).
    pub fn cancel(self) {
        self.cancel.cancel();
    }

    /// No more batches: the returned task ends once the queued ones are written.
    pub fn close(self) -> JoinHandle<()> {
        self.task
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Milliseconds since the Unix epoch, as Kafka timestamps are.
fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A batch's stages as measured so far, in seconds ([`Metrics::stages`] says what each is).
#[derive(Debug, Default, Clone, Copy)]
struct Timeline {
    /// The Kafka timestamp (ms) of its oldest message, if any has one.
    oldest: Option<i64>,
    fetch: Option<f64>,
    seal: f64,
    queue: f64,
    encode: f64,
    wait: f64,
}

impl Timeline {
    /// The stages before encoding, of a batch handed over at `sealed`.
    fn before_encoding(job: &Open<RawBatch>, sealed: Instant) -> Timeline {
        let now = Instant::now();
        let messages = &job.buf.messages;
        let fetch = messages.first().and_then(|m| m.timestamp).map(|ts| {
            // The first message arrived at `started`: its age then, on the wall clock.
            let arrived = now_millis().saturating_sub((now - job.started).as_millis() as i64);
            arrived.saturating_sub(ts).max(0) as f64 / 1000.0
        });
        Timeline {
            oldest: messages.iter().filter_map(|m| m.timestamp).min(),
            fetch,
            seal: secs(sealed - job.started),
            queue: secs(now - sealed),
            ..Timeline::default()
        }
    }

    /// Once the batch is readable: every stage into its histogram, and one debug line.
    fn observe(&self, metrics: &Metrics, steps: &Steps, partition: i32, first: i64, last: i64) {
        let (data, record) = steps.taken();
        let (data, record) = (secs(data), secs(record));
        let visible = self
            .oldest
            .map(|ts| now_millis().saturating_sub(ts).max(0) as f64 / 1000.0);
        let s = &metrics.stages;
        for (h, v) in [
            (&s.fetch, self.fetch),
            (&s.seal, Some(self.seal)),
            (&s.queue, Some(self.queue)),
            (&s.encode, Some(self.encode)),
            (&s.wait, Some(self.wait)),
            // Zero: a step the commit did not take (a committed batch rebuilt and completed).
            (&s.data_write, (data > 0.0).then_some(data)),
            (&s.record, (record > 0.0).then_some(record)),
            (&s.visible, visible),
        ] {
            if let Some(v) = v {
                h.observe(v);
            }
        }
        let ms = |v: f64| (v * 1000.0 * 10.0).round() / 10.0;
        tracing::debug!(
            partition,
            first,
            last,
            fetch_ms = self.fetch.map(ms),
            seal_ms = ms(self.seal),
            queue_ms = ms(self.queue),
            encode_ms = ms(self.encode),
            wait_ms = ms(self.wait),
            data_write_ms = ms(data),
            record_ms = ms(record),
            visible_ms = visible.map(ms),
            "Batch stages."
        );
    }
}

fn panicked(partition: i32, first: i64) -> Failure {
    Failure::Fatal(anyhow::anyhow!(
        "writing the batch of partition {partition} from offset {first} panicked"
    ))
}

/// A batch's tickets of one hour, as they are added.
struct HourPart {
    first: i64,
    last: i64,
    builder: BatchBuilder,
}

/// A batch's first stage: decode and route, dead letters durable, counts, the objects'
/// bodies. Returns the valid and dead-letter counts with the batch to commit.
async fn encode(
    ctx: &WriterContext,
    partition: i32,
    job: Open<RawBatch>,
) -> (u64, u64, Result<Batch, Failure>) {
    // By hour, in the hours' order: the same tickets always make the same objects.
    let mut hours: BTreeMap<Hour, HourPart> = BTreeMap::new();
    let mut queued = Vec::new();
    let mut queued_again = 0u64;
    // Room for the whole batch in one hour's object, its usual case.
    let room = (job.buf.messages.len(), job.buf.data.len());
    let mut first_hour = true;
    for m in job.buf.iter() {
        let ticket = match decode_ref(m.payload) {
            Ok(t) => t,
            Err(reason) => {
                let reason = reason.to_string();
                tracing::debug!(
                    partition,
                    offset = m.offset,
                    reason,
                    "Invalid ticket sent to the dead-letter topic."
                );
                if job.rebuild {
                    // Sent when the range was first processed, before its commit.
                    queued_again += 1;
                    continue;
                }
                let letter = DeadLetter {
                    partition,
                    offset: m.offset,
                    key: m.key,
                    payload: m.payload,
                    reason: &reason,
                };
                match ctx.dead_letters.enqueue(&letter, &ctx.retry.abort).await {
                    Ok(f) => queued.push(f),
                    Err(e) => return (0, 0, Err(dead_letter_failure(e))),
                }
                continue;
            }
        };
        // A message without a timestamp (a producer older than Kafka 0.10), or with one that
        // is not a date, goes by the ticket's own time.
        let hour = m
            .timestamp
            .and_then(Hour::of_timestamp)
            .unwrap_or_else(|| Hour::of(&ticket.created_at()));
        let part = hours.entry(hour).or_insert_with(|| HourPart {
            first: m.offset,
            last: m.offset,
            // Only the first hour gets the room: a batch rarely spans two.
            builder: if first_hour {
                first_hour = false;
                BatchBuilder::with_room_for(ctx.format, room.0, room.1)
            } else {
                BatchBuilder::new(ctx.format)
            },
        });
        part.last = m.offset;
        part.builder.push_ticket(&ctx.routing, &ticket);
    }
    // The messages as read are not needed any more: give them back before waiting for the
    // dead letters and encoding.
    RAW_BATCHES.give(job.buf);
    let dead = queued.len() as u64 + queued_again;
    let valid: u64 = hours.values().map(|p| p.builder.valid).sum();
    // Dead letters must be durable before the batch's offsets count as done.
    for f in queued {
        if let Err(e) = ctx.dead_letters.delivered(f).await {
            return (valid, dead, Err(dead_letter_failure(e)));
        }
        ctx.metrics.dead_lettered.inc();
    }
    let mut columns = Vec::with_capacity(hours.len());
    let mut objects = Vec::with_capacity(hours.len());
    for (hour, part) in hours {
        columns.push(part.builder.columns.finish());
        match part.builder.rows.into_object() {
            Ok(body) => objects.push(Object {
                hour,
                first: part.first,
                last: part.last,
                tickets: part.builder.valid,
                body: Bytes::from(body),
            }),
            Err(e) => return (valid, dead, Err(Failure::Fatal(e))),
        }
    }
    let counts = match ctx.aggregator.count(columns).await {
        Ok(c) => c,
        Err(e) => return (valid, dead, Err(Failure::Fatal(e))),
    };
    let batch = Batch {
        first: job.first,
        last: job.last,
        objects,
        extension: ctx.format.extension(),
        valid,
        dead_letters: dead,
        counts,
        steps: Steps::default(),
    };
    (valid, dead, Ok(batch))
}

/// A batch's second stage: into S3 exactly once (or, for a committed range read again,
/// checked against its record and completed).
async fn commit(
    ctx: &WriterContext,
    committer: &mut dyn Committer,
    partition: i32,
    batch: Batch,
    rebuild: bool,
) -> Result<(), Failure> {
    let (first, last) = (batch.first, batch.last);
    let outcome = drive::write(committer, batch, rebuild).await;
    if let Err(Failure::Fenced(_)) = &outcome {
        ctx.metrics.fenced.inc();
        tracing::warn!(
            partition,
            first,
            last,
            "Another writer committed this partition first; dropped our batch."
        );
    }
    outcome
}

fn dead_letter_failure(e: DeadLetterError) -> Failure {
    match e {
        DeadLetterError::Transient { .. } => Failure::Rewind(e.to_string()),
        DeadLetterError::Permanent { .. } => Failure::Fatal(e.into()),
        DeadLetterError::Aborted => Failure::Aborted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_batch_gives_back_each_message_as_read() {
        let mut b = RawBatch::default();
        b.push(7, Some(1_000), Some(b"k1"), b"first");
        b.push(8, None, None, b"");
        b.push(9, Some(-1), Some(b""), b"third");
        let got: Vec<_> = b
            .iter()
            .map(|m| (m.offset, m.timestamp, m.key, m.payload))
            .collect();
        assert_eq!(
            got,
            vec![
                (7, Some(1_000), Some(&b"k1"[..]), &b"first"[..]),
                (8, None, None, &b""[..]),
                (9, Some(-1), Some(&b""[..]), &b"third"[..]),
            ]
        );
        assert_eq!(b.bytes(), 12);
    }
}
