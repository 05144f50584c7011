//! The table's upkeep of its data, with no scheduler: the processor that owns a Kafka
//! partition compacts that partition's closed hours in the background.
//!
//! - Closed: a partition-hour whose end is at least `COMPACT_CLOSED_AFTER` before the newest
//!   hour of the partition in the table (Kafka timestamps, so a backlog's hours close as the
//!   stream passes them, and a stopped stream closes none). A ticket that arrives later for a
//!   closed hour is an ordinary append; the next round compacts it in.
//! - Each rewrite is streamed (a row group in memory, a multipart upload) and committed on its
//!   own, holding the table's snapshot (which the stream's commits wait for) only for that
//!   commit; a rewrite whose files another compaction took first is given up.
//! - A round runs when a partition is taken over and when one of its commits reaches a newer
//!   hour; a failed round is tried again a minute later.
//! - The files a compaction replaced are deleted by the log's upkeep (crate::upkeep), before
//!   the log checkpoint that drops their removal, once `delta.deletedFileRetentionDuration`
//!   has passed: only files a commit removed, never one no commit refers to yet (a processor
//!   that wrote a file before an outage commits it after). The full vacuum (orphans of killed
//!   writers) stays the `compact` command's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ticket_core::keys::Hour;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::table::{PartitionHour, Rewritten, Table, plan};

/// `ticket-processor`'s settings of the table's upkeep (`OUTPUT_FORMAT=delta`).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Delta table (OUTPUT_FORMAT=delta)")]
pub struct MaintenanceArgs {
    /// Compact the owned Kafka partitions' closed hours in the background, and delete the
    /// files compactions replaced after delta.deletedFileRetentionDuration
    /// (OUTPUT_FORMAT=delta). `false`: leave it to the `compact` command.
    #[arg(long, env = "TABLE_MAINTENANCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub table_maintenance: bool,

    /// A partition-hour is closed, and compacted, once the partition has tickets this long
    /// after the hour's end (Kafka timestamps). E.g. 2h, 30min.
    #[arg(long, env = "COMPACT_CLOSED_AFTER", default_value = "2h", value_parser = humantime::parse_duration)]
    pub compact_closed_after: Duration,

    /// A compaction's file size: a partition-hour's files are made one, or files of about
    /// this size when they add up to more (shared by the `compact` command).
    #[arg(long, env = "COMPACT_TARGET_MB", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub compact_target_mb: u64,
}

impl Default for MaintenanceArgs {
    fn default() -> Self {
        MaintenanceArgs {
            table_maintenance: true,
            compact_closed_after: Duration::from_secs(2 * 3600),
            compact_target_mb: 128,
        }
    }
}

/// New data file path -> the files it replaced, set by a compaction before its commit: the
/// totals add up the replaced files' counts instead of reading the new file back.
pub type Replaced = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// The handle the partitions' committers tell of what they own and commit.
#[derive(Clone)]
pub struct Maintainer {
    shared: Arc<Shared>,
}

struct Shared {
    owned: Mutex<HashMap<i32, Owned>>,
    wake: Notify,
    /// Rounds asked for, and the last one a finished round answered (for tests).
    asked: std::sync::atomic::AtomicU64,
    answered: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Owned {
    /// Committers of this process holding it (a new one may recover before the old is gone).
    holders: usize,
    /// The newest hour a commit of it reached.
    newest: Option<Hour>,
}

/// A failed round is tried again after this.
const AGAIN: Duration = Duration::from_secs(60);

impl Maintainer {
    /// Starts the upkeep of `topic`'s partitions in `table`.
    pub fn spawn(
        table: Arc<Table>,
        topic: String,
        args: &MaintenanceArgs,
        replaced: Replaced,
    ) -> Maintainer {
        let shared = Arc::new(Shared {
            owned: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            asked: Default::default(),
            answered: tokio::sync::watch::channel(0).0,
        });
        let m = Maintainer {
            shared: shared.clone(),
        };
        let round = Round {
            table,
            topic,
            closed_after: chrono::Duration::from_std(args.compact_closed_after)
                .unwrap_or(chrono::Duration::MAX),
            target: args.compact_target_mb.saturating_mul(1024 * 1024),
            replaced,
        };
        tokio::spawn(async move {
            let mut again: Option<Instant> = None;
            loop {
                match again {
                    Some(at) => tokio::select! {
                        _ = shared.wake.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    },
                    None => shared.wake.notified().await,
                }
                let asked = shared.asked.load(std::sync::atomic::Ordering::SeqCst);
                let owned = shared.owned();
                let ran = round.run(&owned, &shared).await;
                shared.answered.send_replace(asked);
                again = match ran {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot compact the Delta table now; trying again in a minute.");
                        Some(Instant::now() + AGAIN)
                    }
                };
            }
        });
        m
    }

    /// A committer of `partition` recovered it: its hours are this process's to compact.
    pub fn owns(&self, partition: i32) {
        self.shared.edit(|owned| {
            owned.entry(partition).or_default().holders += 1;
            true
        });
    }

    /// A committer of `partition` is gone.
    pub fn left(&self, partition: i32) {
        self.shared.edit(|owned| {
            if let Some(o) = owned.get_mut(&partition) {
                o.holders = o.holders.saturating_sub(1);
                if o.holders == 0 {
                    owned.remove(&partition);
                }
            }
            false
        });
    }

    /// Waits until a round has run after everything told so far.
    #[cfg(test)]
    pub(crate) async fn settled(&self) {
        let asked = self.shared.asked.load(std::sync::atomic::Ordering::SeqCst);
        let mut answered = self.shared.answered.subscribe();
        let _ = answered.wait_for(|a| *a >= asked).await;
    }

    /// A commit of `partition` reached `hour`.
    pub fn saw(&self, partition: i32, hour: Hour) {
        self.shared.edit(|owned| match owned.get_mut(&partition) {
            Some(o) if o.newest.is_none_or(|n| n < hour) => {
                o.newest = Some(hour);
                true
            }
            _ => false,
        });
    }
}

impl Shared {
    /// Changes what is owned; a round follows if `f` says so.
    fn edit(&self, f: impl FnOnce(&mut HashMap<i32, Owned>) -> bool) {
        let wake = f(&mut self.owned.lock().expect("owned"));
        if wake {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.wake.notify_one();
        }
    }

    /// The partitions owned, with the newest hour their commits reached.
    fn owned(&self) -> HashMap<i32, Option<Hour>> {
        let owned = self.owned.lock().expect("owned");
        owned.iter().map(|(p, o)| (*p, o.newest)).collect()
    }

    fn still_owns(&self, partition: i32) -> bool {
        self.owned.lock().expect("owned").contains_key(&partition)
    }
}

/// What a round works with.
struct Round {
    table: Arc<Table>,
    topic: String,
    closed_after: chrono::Duration,
    target: u64,
    replaced: Replaced,
}

impl Round {
    /// Compacts the owned partitions' closed hours, one rewrite at a time.
    async fn run(
        &self,
        owned: &HashMap<i32, Option<Hour>>,
        shared: &Shared,
    ) -> Result<(), ticket_s3::store::StoreError> {
        if owned.is_empty() {
            return Ok(());
        }
        let files = self.table.files().await?;
        // The newest hour of each owned partition: what its commits reached, or the table has.
        let mut newest: HashMap<i32, Hour> = owned
            .iter()
            .filter_map(|(p, h)| Some((*p, (*h)?)))
            .collect();
        for at in files.iter().filter_map(PartitionHour::of) {
            if at.topic == self.topic && owned.contains_key(&at.partition) {
                let n = newest.entry(at.partition).or_insert(at.hour);
                *n = (*n).max(at.hour);
            }
        }
        let closed = |at: &PartitionHour| {
            at.topic == self.topic
                && owned.contains_key(&at.partition)
                && newest
                    .get(&at.partition)
                    .is_some_and(|n| at.end() + self.closed_after <= n.start())
        };
        let metrics = &self.table.metrics;
        for rewrite in plan(files, closed, self.target) {
            if !shared.still_owns(rewrite.at.partition) {
                continue;
            }
            let olds: Vec<String> = rewrite.files.iter().map(|f| f.path.clone()).collect();
            let replaced = &self.replaced;
            let mut written = None;
            let made = self
                .table
                .rewrite_then(&rewrite, |new: &Rewritten| {
                    written = Some(new.path.clone());
                    replaced
                        .lock()
                        .expect("replaced")
                        .insert(new.path.clone(), olds.clone());
                })
                .await;
            if let (Some(path), Ok(None)) = (&written, &made) {
                // Not in the table: the totals will never see it. (After an error the commit
                // may have landed: the entry stays for the totals.)
                replaced.lock().expect("replaced").remove(path);
            }
            if let Some(new) = made? {
                metrics.compactions.inc();
                metrics.files_compacted.inc_by(olds.len() as u64);
                metrics.bytes_rewritten.inc_by(new.size);
            }
        }
        // The partitions' files as the round leaves them.
        let mut hours: HashMap<PartitionHour, usize> = HashMap::new();
        for at in self
            .table
            .files()
            .await?
            .iter()
            .filter_map(PartitionHour::of)
        {
            if at.topic == self.topic && owned.contains_key(&at.partition) {
                *hours.entry(at).or_default() += 1;
            }
        }
        self.observe(&hours, &closed);
        Ok(())
    }

    /// The files and partition-hours gauges.
    fn observe(
        &self,
        hours: &HashMap<PartitionHour, usize>,
        closed: &impl Fn(&PartitionHour) -> bool,
    ) {
        let (mut files, mut count) = ([0i64; 2], [0i64; 2]);
        for (at, n) in hours {
            let i = usize::from(closed(at));
            files[i] += *n as i64;
            count[i] += 1;
        }
        let m = &self.table.metrics;
        for (i, label) in ["open", "closed"].into_iter().enumerate() {
            m.files.get_or_create(&[("hours", label)]).set(files[i]);
            m.partition_hours
                .get_or_create(&[("hours", label)])
                .set(count[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ticket_commit::{Committer, Totals};
    use ticket_core::Routing;

    use super::*;
    use crate::TableCommitter;
    use crate::committer::testing::{bucket, open, open_with, retrier};
    use crate::table::SnapshotFile;
    use crate::totals::TableTotals;
    use crate::totals::tests::batch_at;

    /// Files per partition-hour, as `(partition, hours since the epoch)`.
    fn per_hour(files: &[SnapshotFile]) -> BTreeMap<(i32, i64), usize> {
        let mut n = BTreeMap::new();
        for at in files.iter().filter_map(PartitionHour::of) {
            *n.entry((at.partition, at.hour.start().timestamp() / 3600))
                .or_default() += 1;
        }
        n
    }

    #[tokio::test]
    async fn the_owner_compacts_its_closed_hours_into_one_file_each_and_nothing_else() {
        let routing = Routing::default();
        let b = bucket();
        let mut sink = open(&b).await.expect("create");
        let args = MaintenanceArgs::default(); // closed 2 h after the hour's end
        let m = Maintainer::spawn(
            sink.table.clone(),
            sink.topic.clone(),
            &args,
            sink.replaced.clone(),
        );
        sink.maintainer = Some(m.clone());
        // Partition 1 belongs to another process (no maintainer): never compacted here.
        let other = open(&b).await.expect("open");
        let mut p1 = TableCommitter::new(
            other.clone(),
            b.store.clone(),
            1,
            retrier(&b, &other, false),
        );
        p1.recover().await.expect("recover");
        for k in 0..2 {
            let batch = batch_at(&routing, k * 10, k * 10 + 9, Hour::from_millis(0));
            Committer::commit(&mut p1, batch).await.expect("commit");
        }
        // Partition 0: hours 0..=5, three batches (files) each.
        let mut p0 =
            TableCommitter::new(sink.clone(), b.store.clone(), 0, retrier(&b, &sink, false));
        p0.recover().await.expect("recover");
        let mut offset = 0;
        for hour in 0..=5 {
            for _ in 0..3 {
                let batch = batch_at(
                    &routing,
                    offset,
                    offset + 9,
                    Hour::from_millis(hour * 3_600_000),
                );
                Committer::commit(&mut p0, batch).await.expect("commit");
                offset += 10;
            }
        }
        m.settled().await;

        let files = sink.table.files().await.expect("files");
        let expected: BTreeMap<(i32, i64), usize> = [
            // Closed: ended at least 2 h before hour 5 began.
            ((0, 0), 1),
            ((0, 1), 1),
            ((0, 2), 1),
            // Open.
            ((0, 3), 3),
            ((0, 4), 3),
            ((0, 5), 3),
            // Not this process's partition.
            ((1, 0), 2),
        ]
        .into();
        assert_eq!(per_hour(&files), expected);
        assert_eq!(sink.table.metrics.compactions.get(), 3);
        assert_eq!(sink.table.metrics.files_compacted.get(), 9);
        type Gauges = prometheus_client::metrics::family::Family<
            [(&'static str, &'static str); 1],
            prometheus_client::metrics::gauge::Gauge,
        >;
        let gauge = |f: &Gauges, l: &'static str| f.get_or_create(&[("hours", l)]).get();
        assert_eq!(gauge(&sink.table.metrics.files, "closed"), 3);
        assert_eq!(gauge(&sink.table.metrics.partition_hours, "closed"), 3);
        assert_eq!(gauge(&sink.table.metrics.partition_hours, "open"), 3);

        // Every ticket still there once: another process's totals read every file.
        let fresh = open(&b).await.expect("open");
        let retry = retrier(&b, &fresh, false);
        let all = TableTotals::new(fresh).total(&retry).await.expect("totals");
        assert_eq!(all.total(), 18 * 10 + 2 * 10);
        // The replaced files stay for older snapshots (delta.deletedFileRetentionDuration).
        let keys = b.mem.keys("");
        let data = keys
            .iter()
            .filter(|k| k.ends_with(".parquet") && !k.contains("_delta_log"));
        assert_eq!(data.count(), 18 + 2 + 3);

        // This process's totals add the compacted files up from their batches' counts: with
        // partition 0's files gone from the bucket, they still come out.
        for key in keys.iter().filter(|k| k.contains("/partition=0/")) {
            b.store.delete(key).await.expect("delete");
        }
        let retry = retrier(&b, &sink, false);
        let mut totals = TableTotals::new(sink.clone());
        assert_eq!(totals.total(&retry).await.expect("totals"), all);
        assert!(sink.replaced.lock().expect("replaced").is_empty());
    }

    #[tokio::test]
    async fn a_file_is_counted_the_same_read_whole_or_by_ranges_and_a_missing_one_is_none() {
        let routing = Routing::default();
        let b = bucket();
        let sink = open(&b).await.expect("create");
        let mut p0 =
            TableCommitter::new(sink.clone(), b.store.clone(), 0, retrier(&b, &sink, false));
        p0.recover().await.expect("recover");
        let batch = batch_at(&routing, 0, 29, Hour::from_millis(0));
        let expected = batch.counts.clone();
        Committer::commit(&mut p0, batch).await.expect("commit");
        let file = sink.table.files().await.expect("files").remove(0);
        let aggregator = ticket_engine::aggregate::Aggregator::default();
        for whole in [u64::MAX, 0] {
            let counts = sink
                .table
                .count_file_reading_whole(&file, &aggregator, whole)
                .await
                .expect("count");
            assert_eq!(counts.as_ref(), Some(&expected), "whole up to {whole}");
        }
        b.store
            .delete(&format!("{}{}", sink.root, file.path))
            .await
            .expect("delete");
        for whole in [u64::MAX, 0] {
            let counts = sink
                .table
                .count_file_reading_whole(&file, &aggregator, whole)
                .await
                .expect("no error");
            assert!(counts.is_none(), "whole up to {whole}");
        }
    }

    #[tokio::test]
    async fn vacuum_deletes_only_files_a_commit_removed() {
        let routing = Routing::default();
        let b = bucket();
        let sink = open(&b).await.expect("create");
        let mut p0 =
            TableCommitter::new(sink.clone(), b.store.clone(), 0, retrier(&b, &sink, false));
        p0.recover().await.expect("recover");
        for k in 0..3 {
            let batch = batch_at(&routing, k * 10, k * 10 + 9, Hour::from_millis(0));
            Committer::commit(&mut p0, batch).await.expect("commit");
        }
        // A file written and not committed yet (its writer waits out an outage), older than
        // any retention.
        let pending = format!(
            "{}topic=tickets/date=1970-01-01/hour=00/partition=0/pending.parquet",
            sink.root
        );
        b.store
            .put(
                &pending,
                bytes::Bytes::from_static(b"x"),
                ticket_s3::store::Expect::Any,
            )
            .await
            .expect("put");
        let done = sink
            .table
            .compact(chrono::Utc::now(), 128 << 20)
            .await
            .expect("compact");
        assert_eq!((done.rewrites, done.files_before), (1, 3));
        assert_eq!(
            sink.table
                .vacuum_removed(Duration::from_secs(3600))
                .await
                .expect("vacuum"),
            0,
            "within the retention"
        );
        assert_eq!(
            sink.table
                .vacuum_removed(Duration::ZERO)
                .await
                .expect("vacuum"),
            3
        );
        let keys = b.mem.keys("");
        let data: Vec<&String> = keys
            .iter()
            .filter(|k| k.ends_with(".parquet") && !k.contains("_delta_log"))
            .collect();
        assert_eq!(data.len(), 2, "the new file and the pending one: {data:?}");
        assert!(keys.contains(&pending));
    }

    #[tokio::test]
    async fn replaced_files_are_deleted_before_the_checkpoint_that_drops_their_removal() {
        let routing = Routing::default();
        let b = bucket();
        let creation = crate::Creation {
            deleted_file_retention: Duration::ZERO,
            ..Default::default()
        };
        let sink = open_with(&b, &creation).await.expect("create");
        let mut p0 =
            TableCommitter::new(sink.clone(), b.store.clone(), 0, retrier(&b, &sink, false));
        p0.recover().await.expect("recover");
        let mut offset = 0;
        let mut commit = async |hour: i64| {
            let batch = batch_at(&routing, offset, offset + 9, Hour::from_millis(hour));
            Committer::commit(&mut p0, batch).await.expect("commit");
            offset += 10;
        };
        for _ in 0..3 {
            commit(0).await;
        }
        let done = sink
            .table
            .compact(chrono::Utc::now(), 128 << 20)
            .await
            .expect("compact");
        assert_eq!(done.files_before, 3);
        let data = || {
            b.mem
                .keys("")
                .into_iter()
                .filter(|k| k.ends_with(".parquet") && !k.contains("_delta_log"))
                .count()
        };
        assert_eq!(data(), 4, "no checkpoint yet: the replaced files stay");
        // Version 99 is checkpointed (the crate's interval, 100).
        while sink.table.version().await < 99 {
            commit(3_600_000).await;
        }
        sink.table.settled().await;
        assert_eq!(sink.table.metrics.files_vacuumed.get(), 3);
        let live = sink.table.files().await.expect("files").len();
        assert_eq!(data(), live, "only the live files are left");
    }
}
