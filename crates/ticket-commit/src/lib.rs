//! `ticket-commit`: what every output shares, and nothing of any one output. An output (the
//! object layout in `ticket-objects`, the Delta table in `ticket-delta`) is a [`Destination`]:
//! it hands out a [`Committer`] per partition, its [`Totals`] and the [`retry::Check`] that
//! judges its failures; `ticket-output` picks one at start; the stream and the backfills drive
//! it the same way.
//!
//! - [`Committer`]: the exactly-once commit protocol of one partition, in the spirit of
//!   Arroyo's `TwoPhaseCommitter`: recover (say where to start: a [`Plan`]), commit a
//!   [`Batch`], complete a recorded batch read again from Kafka. Kafka stays outside it: the
//!   caller does the reading, and commits Kafka offsets only once a commit returned `Ok`;
//! - [`drive`]: the driver, how a batch goes through a committer (a stream's writer, a
//!   backfill's parts);
//! - [`Failure`]: the one outcome type, from the store's answers up to the consumer's loop;
//! - [`retry`]: when to try an S3 request again (jitter, a cap, the stop deadline) and how a
//!   failure that is not plainly transient is judged ([`retry::Check`]);
//! - [`failpoint`]: the reliability tests' fault points, in debug builds only.

pub mod drive;
pub mod failpoint;
pub mod retry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use ticket_core::counts::Counts;
use ticket_core::keys::Hour;

pub use retry::Retrier;

/// One partition's micro-batch (or one part of a backfill), ready to be written.
#[derive(Debug, Default)]
pub struct Batch {
    /// First and last offsets the batch covers (valid or not).
    pub first: i64,
    pub last: i64,
    /// The valid tickets with their team, one object per hour of their Kafka timestamps, in
    /// the order of the hours (a batch is split by hour, not cut, so that tickets whose
    /// timestamps are out of order near an hour's end do not make many small objects).
    pub objects: Vec<Object>,
    /// The objects' file extension (their format).
    pub extension: &'static str,
    pub valid: u64,
    pub dead_letters: u64,
    pub counts: Counts,
    /// How long its commit's steps took, set by the committer (the stream's stage timings).
    pub steps: Steps,
}

/// How long a commit's two steps took: writing the data (the objects, the table's data files)
/// and recording the batch (the checkpoint, the table commit). The committer sets them on the
/// batch it is given; the caller keeps a clone and reads them once the commit returned. Both
/// stay zero for a step the commit did not take.
#[derive(Debug, Default, Clone)]
pub struct Steps(Arc<[AtomicU64; 2]>);

impl Steps {
    /// Adds to the time spent writing the batch's data.
    pub fn data(&self, took: Duration) {
        self.add(0, took);
    }

    /// Adds to the time spent recording the batch.
    pub fn record(&self, took: Duration) {
        self.add(1, took);
    }

    /// (data, record).
    pub fn taken(&self) -> (Duration, Duration) {
        let get = |i: usize| Duration::from_micros(self.0[i].load(Ordering::Relaxed));
        (get(0), get(1))
    }

    fn add(&self, i: usize, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.0[i].fetch_add(micros, Ordering::Relaxed);
    }
}

/// One object of a batch: the tickets of one hour.
#[derive(Debug)]
pub struct Object {
    pub hour: Hour,
    /// Offsets of the first and last ticket in it.
    pub first: i64,
    pub last: i64,
    pub tickets: u64,
    pub body: Bytes,
}

/// Why a batch (or a partition's recovery) did not become durable.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The output changed under us: another owner took the partition. Recover again and
    /// resume from there.
    #[error("another writer committed partition {0} first")]
    Fenced(i32),
    /// Something that may pass (a dead letter not delivered): recover and process again.
    #[error("{0}")]
    Rewind(String),
    /// The processor is stopping and gave up retrying: processed again on restart.
    #[error("stopped while retrying")]
    Aborted,
    /// Will not get better by retrying: stop the processor with this message.
    #[error(transparent)]
    Fatal(#[from] anyhow::Error),
}

/// Where a partition's processing starts, as its committer recovered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Everything below `at` is durable: process from `at` on.
    Resume { at: i64 },
    /// The batch `first..=last` is committed but some of its objects are missing: read
    /// exactly that range again, as one batch, hand it to [`Committer::complete`], then go on
    /// at `last + 1`.
    Rebuild { first: i64, last: i64 },
}

impl Plan {
    /// The first offset to read.
    pub fn start(self) -> i64 {
        match self {
            Plan::Resume { at } => at,
            Plan::Rebuild { first, .. } => first,
        }
    }
}

/// The commit protocol of one output for one partition: what its owner calls, in this order.
/// Object-safe: the output chosen at start hands out `Box<dyn Committer>`.
pub trait Committer: Send + 'static {
    /// Reads what the store holds for the partition, finishes what needs no Kafka (an
    /// earlier version's staged copies), and says where to start.
    fn recover(&mut self) -> BoxFuture<'_, Result<Plan, Failure>>;

    /// Makes the batch durable; on `Ok`, its offsets may be committed to Kafka.
    fn commit(&mut self, batch: Batch) -> BoxFuture<'_, Result<(), Failure>>;

    /// After [`Plan::Rebuild`]: checks the range read again from Kafka against what was
    /// recorded, and writes what is missing.
    fn complete(&mut self, rebuilt: Batch) -> BoxFuture<'_, Result<(), Failure>>;
}

/// An output, opened: what the stream takes from it.
pub trait Destination: Send + Sync + 'static {
    /// Partition `partition`'s committer, retrying with `retry`.
    fn committer(&self, partition: i32, retry: Retrier) -> Box<dyn Committer>;
    /// Where the counts come from.
    fn totals(&self) -> Box<dyn Totals>;
    /// What judges a failed request that is not plainly transient (the bucket, the table).
    fn check(&self) -> std::sync::Arc<dyn retry::Check>;
    /// Adds the output's own figures to the processor's `/metrics` (the table's upkeep).
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}
}

/// Where an output's running totals (`counts_by_request_type/latest.jsonl`) come from: what
/// it holds, summed; refreshed by the stream's counts task.
pub trait Totals: Send + 'static {
    fn total<'a>(&'a mut self, retry: &'a Retrier) -> BoxFuture<'a, Result<Counts, Failure>>;
}
