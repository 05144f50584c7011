//! The consumer's loop without a broker: the whole processor ([`serve`]) on the scripted
//! Kafka ([`Scripted`]) and the object layout on the in-memory store, each test a script
//! against it. What the end-to-end tests show with real processes, in milliseconds here:
//! back-pressure pauses and resumes a partition, a partition revoked in the middle of a write
//! and given back, a commit fenced by another owner, and the drain's end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ticket_core::Routing;
use ticket_core::batch::BatchPolicy;
use ticket_core::keys::Layout;
use ticket_objects::{MadeWith, Objects};
use ticket_output::Output;
use ticket_s3::store::SharedStore;
use ticket_s3::store::memory::{Fault, MemStore};

use super::dead_letter::DeadLetters;
use super::health::Health;
use super::scripted::{Call, Scripted};
use super::{Event, Parts, Settings, serve};
use crate::Shutdown;
use crate::metrics::Metrics;

const TOPIC: &str = "tickets";

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    kafka: ticket_kafka::KafkaArgs,
}

/// One processor on the scripted Kafka and an in-memory bucket.
struct Rig {
    kafka: Arc<Scripted>,
    mem: Arc<MemStore>,
    metrics: Metrics,
    shutdown: Shutdown,
    parts: Option<Parts<Scripted>>,
    partitions: i32,
}

impl Rig {
    /// Batches of `max_records` tickets (or 20 ms old).
    fn new(partitions: i32, max_records: usize, drain: bool) -> Rig {
        // No broker: the dead-letter producer is never used (every ticket is valid).
        let kafka = Flags::parse_from(["test", "--brokers", "127.0.0.1:9", "--topic", TOPIC]).kafka;
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel::<Event>();
        let scripted = Arc::new(Scripted::new(TOPIC, partitions, drain, events_tx.clone()));
        let mem = Arc::new(MemStore::new());
        let store: SharedStore = mem.clone();
        let layout = Layout::new("", TOPIC);
        let routing = Routing::default();
        let output = Output::new(Arc::new(Objects {
            store: store.clone(),
            layout: layout.clone(),
            made_with: MadeWith {
                format: "jsonl",
                routing: routing.digest(),
                encoding: ticket_engine::output::ENCODING_VERSION,
            },
        }));
        let dead_letters =
            DeadLetters::new(kafka.client_config(), "dlq", TOPIC).expect("a producer");
        let metrics = Metrics::new();
        let settings = Settings {
            kafka,
            group: "g".into(),
            dlq_topic: "dlq".into(),
            policy: BatchPolicy {
                max_records,
                max_bytes: 1 << 20,
                max_age: Duration::from_millis(20),
            },
            routing,
            layout,
            format: ticket_engine::output::OutputFormat::Jsonl,
            output,
            drain,
        };
        Rig {
            kafka: scripted.clone(),
            mem,
            metrics: metrics.clone(),
            shutdown: Shutdown::default(),
            parts: Some(Parts {
                settings,
                consumer: scripted,
                dead_letters,
                store,
                metrics,
                events: (events_tx, events),
            }),
            partitions,
        }
    }

    /// Runs the processor beside `script`; when the script is done, stops it, unless it
    /// ended by itself first (as a drain does). Returns how it ended.
    async fn run(&mut self, script: impl Future<Output = ()>) -> anyhow::Result<()> {
        let parts = self.parts.take().expect("run once");
        let shutdown = self.shutdown.clone();
        let processor = serve(
            parts,
            self.partitions,
            async { Ok(()) },
            Arc::new(Health::default()),
            shutdown.clone(),
        );
        let mut processor = std::pin::pin!(processor);
        let run = async {
            tokio::select! {
                ended = &mut processor => return ended,
                () = script => {}
            }
            shutdown.stop.cancel();
            processor.await
        };
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the processor ends within 30 s")
    }

    /// How many times each ticket is in the written objects.
    fn written(&self) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for key in self.mem.keys("tickets_with_team/") {
            let body = self.mem.bytes(&key).unwrap_or_default();
            for line in String::from_utf8_lossy(&body).lines() {
                let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
                let id = v["ticket_id"].as_str().expect("ticket_id").to_string();
                *seen.entry(id).or_default() += 1;
            }
        }
        seen
    }

    /// Every ticket of partitions `0..partitions`, offsets `0..n` but `skip`, written once.
    fn assert_exactly_once(&self, n: i64, skip: std::ops::Range<i64>) {
        let expected: BTreeMap<String, usize> = (0..self.partitions)
            .flat_map(|p| (0..n).filter(|o| !skip.contains(o)).map(move |o| (p, o)))
            .map(|(p, o)| (format!("T-{p}-{o}"), 1))
            .collect();
        assert_eq!(self.written(), expected, "each ticket exactly once");
    }

    fn calls(&self) -> Vec<Call> {
        self.kafka.state().calls.clone()
    }
}

/// Waits (polling every millisecond, 10 s at most) until `done`.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "waited 10 s for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn committed(kafka: &Scripted, p: i32) -> i64 {
    kafka.state().committed.get(&p).copied().unwrap_or(0)
}

#[tokio::test]
async fn a_full_writer_pauses_its_partition_and_the_resume_loses_nothing() {
    let mut rig = Rig::new(1, 5, false);
    rig.kafka.publish(0, 5);
    let (kafka, mem) = (rig.kafka.clone(), rig.mem.clone());
    rig.run(async move {
        until("the first batch committed", || committed(&kafka, 0) == 5).await;
        // S3 fails the next requests: the writer's batches pile up behind the first one.
        mem.inject(Some(Fault::Outage { from: 1, count: 3 }));
        kafka.publish(0, 55);
        until("every offset committed", || committed(&kafka, 0) == 60).await;
    })
    .await
    .expect("a clean stop");
    rig.assert_exactly_once(60, 0..0);
    let calls = rig.calls();
    let paused = calls.iter().position(|c| *c == Call::Pause(0));
    let resumed = calls.iter().position(|c| *c == Call::Resume(0));
    assert!(
        matches!((paused, resumed), (Some(a), Some(b)) if a < b),
        "paused, then resumed: {calls:?}"
    );
    assert_eq!(
        rig.metrics.retry.s3_unreachable_since.get(),
        0,
        "S3 reachable again"
    );
}

#[tokio::test]
async fn a_partition_revoked_during_a_write_and_given_back_is_written_once() {
    let mut rig = Rig::new(1, 5, false);
    rig.kafka.publish(0, 10);
    let (kafka, mem) = (rig.kafka.clone(), rig.mem.clone());
    let metrics = rig.metrics.clone();
    rig.run(async move {
        until("the first batches committed", || committed(&kafka, 0) == 10).await;
        // Long enough that the revocation lands while a batch is being written.
        mem.inject(Some(Fault::Outage { from: 1, count: 4 }));
        kafka.publish(0, 30);
        until("a write waiting on S3", || {
            metrics.retry.s3_unreachable_since.get() > 0
        })
        .await;
        kafka.revoke(0);
        kafka.assign_back(0);
        until("every offset committed", || committed(&kafka, 0) == 40).await;
    })
    .await
    .expect("a clean stop");
    rig.assert_exactly_once(40, 0..0);
    let calls = rig.calls();
    assert!(
        calls
            .iter()
            .filter(|c| matches!(c, Call::Seek(0, _)))
            .count()
            >= 2,
        "the new ownership seeks to where S3 says: {calls:?}"
    );
    // Never an offset committed to Kafka past what S3 holds: the commits only grow.
    let commits: Vec<i64> = calls
        .iter()
        .filter_map(|c| match c {
            Call::Commit(0, o) => Some(*o),
            _ => None,
        })
        .collect();
    assert!(commits.is_sorted(), "{commits:?}");
}

#[tokio::test]
async fn a_commit_fenced_by_another_owner_resumes_where_that_owner_is() {
    let mut rig = Rig::new(1, 5, false);
    rig.kafka.publish(0, 20);
    let (kafka, mem) = (rig.kafka.clone(), rig.mem.clone());
    let layout = Layout::new("", TOPIC);
    rig.run(async move {
        until("0..20 committed", || committed(&kafka, 0) == 20).await;
        // Another instance took the partition meanwhile and committed 20..=29 (dead letters
        // only, so they are told apart): our next batch must be fenced, not written.
        let store: SharedStore = mem.clone();
        let retry = ticket_commit::Retrier::new(
            tokio_util::sync::CancellationToken::new(),
            Default::default(),
        );
        let mut other = ticket_objects::ObjectCommitter::new(
            store,
            layout,
            0,
            retry,
            MadeWith {
                format: "jsonl",
                routing: Routing::default().digest(),
                encoding: ticket_engine::output::ENCODING_VERSION,
            },
        );
        use ticket_commit::Committer;
        Committer::recover(&mut other).await.expect("recover");
        let skipped = ticket_commit::Batch {
            first: 20,
            last: 29,
            extension: "jsonl",
            dead_letters: 10,
            ..Default::default()
        };
        Committer::commit(&mut other, skipped)
            .await
            .expect("commit");
        kafka.publish(0, 20);
        until("20..40 committed", || committed(&kafka, 0) == 40).await;
    })
    .await
    .expect("a clean stop");
    rig.assert_exactly_once(40, 20..30);
    assert_eq!(rig.metrics.fenced.get(), 1, "fenced once");
    assert!(
        rig.calls().contains(&Call::Seek(0, 30)),
        "resumed at the other owner's checkpoint: {:?}",
        rig.calls()
    );
}

// The drain's start reads end offsets with block_in_place, as on the processor's runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_by_itself_at_the_end_as_of_start() {
    let mut rig = Rig::new(2, 7, true);
    rig.kafka.publish(0, 25);
    rig.kafka.publish(1, 18);
    // No stop: the drain ends when both partitions reached their end offsets.
    rig.run(std::future::pending()).await.expect("exit 0");
    assert_eq!(committed(&rig.kafka, 0), 25);
    assert_eq!(committed(&rig.kafka, 1), 18);
    let written = rig.written();
    assert_eq!(written.len(), 43, "{written:?}");
    assert!(written.values().all(|n| *n == 1), "{written:?}");
}
