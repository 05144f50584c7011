//! The [`Committer`] of a partition whose batches go into the Delta table (the crate's
//! documentation says how the table's log makes them exactly once), and the [`Check`] that
//! judges its failures.
//!
//! A batch's Parquet files are written first, under unique names; then the partition's part
//! joins the processor's next table commit ([`GroupCommit`]) with the partition's version
//! (the batch's last offset; for a backfill, the number of the part). Recovery reads the version back: everything up to it is in the
//! table, so a new owner resumes after it. Nothing is ever rebuilt from Kafka: a batch is
//! either in the table with all its files or not in it at all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::anyhow;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use ticket_commit::failpoint::failpoint;
use ticket_commit::retry::{BucketCheck, Check};
use ticket_commit::{Batch, Committer, Failure, Plan, Retrier, Steps};
use ticket_core::counts::Counts;
use ticket_s3::store::{Expect, SharedStore, StoreError};

use crate::maintain::{Maintainer, Replaced};
use crate::{DataFile, GroupCommit, Outcome, Part, Table};

/// Data files a commit uploads at once.
pub const UPLOADS: usize = 16;

/// What the partitions' committers share: the table, its group commit, and where its files go.
#[derive(Clone)]
pub struct TableSink {
    pub table: Arc<Table>,
    pub group: GroupCommit,
    /// The table's root as a key prefix of the bucket (`{S3_PREFIX}tables/tickets_with_team/`).
    pub root: String,
    pub topic: String,
    /// The counts of data files this process committed, as their batches counted them, until
    /// the totals take them ([`crate::totals`]): the totals need not read them back.
    pub counted: Counted,
    /// The files this process's compactions replaced, by the file that replaced them, until
    /// the totals take them (the same: no file read back).
    pub replaced: Replaced,
    /// The table's upkeep (a processor's; `None` for a backfill), told of what the partitions'
    /// committers own and commit.
    pub maintainer: Option<Maintainer>,
}

/// Data file path -> its tickets counted, shared by a process's committers and its totals.
pub type Counted = Arc<std::sync::Mutex<HashMap<String, Counts>>>;

/// One partition's committer to the table.
pub struct TableCommitter {
    sink: TableSink,
    store: SharedStore,
    partition: i32,
    retry: Retrier,
    /// The partition's version in the table as this owner knows it: the last offset in it.
    expected: Option<i64>,
    /// Told the maintainer it owns the partition (to be untold when dropped).
    owning: bool,
}

impl Drop for TableCommitter {
    fn drop(&mut self) {
        if let (true, Some(m)) = (self.owning, &self.sink.maintainer) {
            m.left(self.partition);
        }
    }
}

/// A batch's files, named, not written yet.
pub struct PreparedFiles {
    last: i64,
    files: Vec<(DataFile, Bytes)>,
    /// The batch's counts, when they are its one file's (they count every ticket in it).
    counts: Option<Counts>,
    steps: Steps,
}

impl TableCommitter {
    pub fn new(sink: TableSink, store: SharedStore, partition: i32, retry: Retrier) -> Self {
        TableCommitter {
            sink,
            store,
            partition,
            retry,
            expected: None,
            owning: false,
        }
    }
}

impl TableCommitter {
    /// [`Committer::recover`].
    pub async fn recover(&mut self) -> Result<Plan, Failure> {
        let (table, topic, partition) = (&self.sink.table, &self.sink.topic, self.partition);
        self.expected = self
            .retry
            .run("read the Delta table", || {
                table.version_of(topic, partition)
            })
            .await?;
        if let (false, Some(m)) = (self.owning, &self.sink.maintainer) {
            m.owns(partition);
            self.owning = true;
        }
        Ok(Plan::Resume {
            at: self.expected.map_or(0, |v| v + 1),
        })
    }

    /// Pure: the batch's data files, named, not written.
    pub fn prepare(&self, batch: Batch) -> PreparedFiles {
        let files = batch
            .objects
            .into_iter()
            .map(|o| {
                let file = DataFile {
                    path: DataFile::path_for(&self.sink.topic, self.partition, o.hour),
                    hour: o.hour,
                    first: o.first,
                    last: o.last,
                    size: o.body.len() as u64,
                    tickets: o.tickets,
                };
                (file, o.body)
            })
            .collect::<Vec<_>>();
        let counts = match files.as_slice() {
            [(file, _)] if batch.counts.total() == file.tickets => Some(batch.counts),
            _ => None,
        };
        PreparedFiles {
            last: batch.last,
            files,
            counts,
            steps: batch.steps,
        }
    }

    /// [`Committer::commit`] of a prepared batch: its files, then its part of a table commit.
    pub async fn commit_prepared(&mut self, batch: PreparedFiles) -> Result<(), Failure> {
        // Side by side (a backfill's part has hundreds), UPLOADS at a time.
        let writing = Instant::now();
        let (store, retry, root) = (&self.store, &self.retry, &self.sink.root);
        let uploads: Vec<_> = batch
            .files
            .iter()
            .map(|(file, body)| {
                let key = format!("{root}{}", file.path);
                let body = body.clone();
                async move {
                    retry
                        .run("write a Delta data file", || {
                            store.put(&key, body.clone(), Expect::Any)
                        })
                        .await
                }
            })
            .collect();
        futures::stream::iter(uploads)
            .buffer_unordered(UPLOADS)
            .try_collect::<Vec<_>>()
            .await?;
        batch.steps.data(writing.elapsed());
        let part = Part {
            topic: self.sink.topic.clone(),
            partition: self.partition,
            expected: self.expected,
            version: batch.last,
            files: batch.files.into_iter().map(|(f, _)| f).collect(),
        };
        let counted = batch.counts.map(|c| (part.files[0].path.clone(), c));
        failpoint("before-table-commit", self.partition).await;
        let recording = Instant::now();
        let group = &self.sink.group;
        let mut outcome = self
            .retry
            .run("commit to the Delta table", || group.commit(part.clone()))
            .await?;
        if failpoint("after-table-commit", self.partition).await {
            // The answer lost (`after-table-commit:lose:<n>`): asked again, as after a
            // timeout on the log write.
            outcome = self
                .retry
                .run("commit to the Delta table", || group.commit(part.clone()))
                .await?;
        }
        batch.steps.record(recording.elapsed());
        match outcome {
            Outcome::Committed => {
                self.expected = Some(batch.last);
                let newest = part.files.iter().map(|f| f.hour).max();
                if let (Some(m), Some(hour)) = (&self.sink.maintainer, newest) {
                    m.saw(self.partition, hour);
                }
                if let Some((path, counts)) = counted {
                    self.sink
                        .counted
                        .lock()
                        .expect("counted")
                        .insert(path, counts);
                }
            }
            Outcome::Fenced { found } => {
                tracing::debug!(
                    partition = self.partition,
                    expected = ?self.expected,
                    ?found,
                    "The table holds another owner's version of the partition."
                );
                return Err(Failure::Fenced(self.partition));
            }
        }
        Ok(())
    }
}

impl Committer for TableCommitter {
    fn recover(&mut self) -> BoxFuture<'_, Result<Plan, Failure>> {
        Box::pin(TableCommitter::recover(self))
    }

    fn commit(&mut self, batch: Batch) -> BoxFuture<'_, Result<(), Failure>> {
        let prepared = self.prepare(batch);
        Box::pin(self.commit_prepared(prepared))
    }

    fn complete(&mut self, _rebuilt: Batch) -> BoxFuture<'_, Result<(), Failure>> {
        Box::pin(async {
            Err(Failure::Fatal(anyhow!(
                "the Delta table's committer never asks for a range to be read again"
            )))
        })
    }
}

/// The bucket, then the Delta table read again from its log: it is there and this processor
/// can write it.
pub struct TableCheck {
    pub bucket: BucketCheck,
    pub table: Arc<Table>,
}

impl Check for TableCheck {
    fn check(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.bucket.check().await?;
            match self.table.check_writable().await {
                Err(e) if e.is_transient() => Err(e),
                Err(e @ StoreError::Permanent { op: "check", .. }) => Err(e),
                // The log could not be read, however delta-rs wrapped why, while the bucket
                // answered just before: unexplained, not a verdict.
                Err(e) => {
                    tracing::debug!(error = %e, "Reading the Delta table again failed.");
                    Ok(())
                }
                Ok(()) => Ok(()),
            }
        })
    }

    fn what(&self) -> &'static str {
        "the bucket and the Delta table"
    }
}

/// What the table's tests and the counts' tests share: one in-memory bucket seen through both
/// interfaces, a process's view of the table, and the processor's retries with their check.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::Duration;

    use ticket_commit::retry::RetryMetrics;
    use ticket_s3::memory_objects::MemObjects;
    use ticket_s3::store::memory::MemStore;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::TABLE_DIR;

    pub const TOPIC: &str = "t";

    /// One bucket, seen through both interfaces.
    pub struct Bucket {
        pub mem: Arc<MemStore>,
        pub store: SharedStore,
        pub root: Arc<dyn crate::ObjectStore>,
    }

    pub fn bucket() -> Bucket {
        let mem = Arc::new(MemStore::new());
        Bucket {
            store: mem.clone(),
            root: Arc::new(MemObjects(mem.clone())),
            mem,
        }
    }

    /// A process's view of the table: its own snapshot and group commit.
    pub async fn open(b: &Bucket) -> Result<TableSink, StoreError> {
        open_with(b, &Default::default()).await
    }

    /// The same, the table created with `creation`'s properties if it is new.
    pub async fn open_with(
        b: &Bucket,
        creation: &crate::Creation,
    ) -> Result<TableSink, StoreError> {
        let table =
            Arc::new(Table::open_or_create(b.root.clone(), "bucket", "", creation, true).await?);
        Ok(TableSink {
            group: GroupCommit::spawn(table.clone()),
            table,
            root: TABLE_DIR.to_string(),
            topic: TOPIC.into(),
            counted: Default::default(),
            replaced: Default::default(),
            maintainer: None,
        })
    }

    /// Retries at once, judging failures by a fresh look at the same bucket and table, as
    /// the processor does; `dying`: a process that dies at its first failed request.
    pub fn retrier(b: &Bucket, sink: &TableSink, dying: bool) -> Retrier {
        let r = Retrier::new(CancellationToken::new(), RetryMetrics::default())
            .with_backoff(Duration::from_millis(1), Duration::from_millis(1))
            .with_check(Arc::new(TableCheck {
                bucket: BucketCheck::new(b.store.clone(), ""),
                table: sink.table.clone(),
            }));
        if dying {
            r.abort.cancel();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    //! The table's committer as the object committer is tested: a crash before every request,
    //! a lost answer to every request, an outage at every request. The data files (written
    //! through ticket-s3's store) and the log (through `object_store`, by delta-rs) share one
    //! in-memory store and one fault, as they share a bucket; after each fault a fresh read of
    //! the table must hold every offset exactly once.

    use std::collections::BTreeMap;

    use ticket_commit::testing::batch;
    use ticket_s3::store::memory::Fault;

    use super::testing::{Bucket, TOPIC, bucket, open, retrier};
    use super::*;
    use crate::TABLE_DIR;

    const PARTITION: i32 = 0;

    /// The batches of the run: 0..=9, 10..=19, 20..=29.
    const BATCHES: [(i64, i64); 3] = [(0, 9), (10, 19), (20, 29)];
    const END: i64 = 30;

    /// An owner's life on a table it opened: recover, then commit every batch from where it
    /// resumes.
    async fn run(b: &Bucket, sink: TableSink, dying: bool) -> Result<(), Failure> {
        let retry = retrier(b, &sink, dying);
        let mut c = TableCommitter::new(sink, b.store.clone(), PARTITION, retry);
        let Plan::Resume { at } = c.recover().await? else {
            panic!("the table never asks for a rebuild");
        };
        for (first, last) in BATCHES.into_iter().filter(|(_, last)| *last >= at) {
            Committer::commit(&mut c, batch(first.max(at), last)).await?;
        }
        Ok(())
    }

    /// A fresh read of the table: every valid offset below [`END`] (not a multiple of 7: those
    /// are dead letters) in exactly one file of its snapshot, and the partition's version at
    /// the last offset.
    async fn assert_exactly_once(b: &Bucket, what: &str) {
        b.mem.inject(None);
        let table = Table::open(b.root.clone(), "bucket", "")
            .await
            .expect("read")
            .expect("a table");
        let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
        for f in table.files().await.expect("files") {
            let body = b
                .mem
                .bytes(&format!("{TABLE_DIR}{}", f.path))
                .unwrap_or_else(|| panic!("{what}: the snapshot's {} is not written", f.path));
            for line in String::from_utf8_lossy(&body).lines() {
                *seen.entry(line.parse().expect("offset")).or_default() += 1;
            }
        }
        let expected: BTreeMap<i64, usize> =
            (0..END).filter(|o| o % 7 != 0).map(|o| (o, 1)).collect();
        assert_eq!(seen, expected, "{what}: each offset exactly once");
        assert_eq!(
            table.version_of(TOPIC, PARTITION).await.expect("version"),
            Some(END - 1),
            "{what}"
        );
    }

    /// Requests a whole run makes on a new table (the table's creation not counted).
    async fn requests_of_a_run() -> u64 {
        let b = bucket();
        let sink = open(&b).await.expect("create");
        b.mem.inject(None);
        run(&b, sink, false).await.expect("a run without faults");
        assert_exactly_once(&b, "no fault").await;
        b.mem.requests()
    }

    /// A new table, then one owner's run with `fault` injected from there on.
    async fn run_with(fault: Fault, dying: bool) -> (Bucket, Result<(), Failure>) {
        let b = bucket();
        let sink = open(&b).await.expect("create");
        b.mem.inject(Some(fault));
        let got = run(&b, sink, dying).await;
        (b, got)
    }

    #[tokio::test]
    async fn a_crash_before_any_request_then_a_new_owner_is_exactly_once() {
        let n = requests_of_a_run().await;
        assert!(n > 10, "{n} requests");
        for at in 1..=n {
            let (b, crashed) = run_with(Fault::CrashAt(at), true).await;
            assert!(
                matches!(crashed, Err(Failure::Aborted)),
                "crash at request {at}: {crashed:?}"
            );
            b.mem.inject(None);
            let restarted = open(&b).await.expect("open after the crash");
            run(&b, restarted, false)
                .await
                .unwrap_or_else(|e| panic!("restart after a crash at {at}: {e}"));
            assert_exactly_once(&b, &format!("crash at request {at}")).await;
        }
    }

    #[tokio::test]
    async fn a_lost_answer_to_any_request_is_not_committed_twice() {
        let n = requests_of_a_run().await;
        for at in 1..=n {
            let (b, got) = run_with(Fault::LoseAnswerOf(at), false).await;
            got.unwrap_or_else(|e| panic!("answer of request {at} lost: {e}"));
            assert_exactly_once(&b, &format!("answer of request {at} lost")).await;
        }
    }

    #[tokio::test]
    async fn an_outage_at_any_request_is_waited_out_not_fatal() {
        let n = requests_of_a_run().await;
        for at in 1..=n {
            let fault = Fault::Outage {
                from: at,
                count: 12,
            };
            let (b, got) = run_with(fault, false).await;
            got.unwrap_or_else(|e| panic!("outage from request {at}: {e}"));
            assert_exactly_once(&b, &format!("outage from request {at}")).await;
        }
    }
}
