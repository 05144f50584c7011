//! [`Table`]: the table's log, read and committed (the crate's documentation says how a commit
//! is exactly once), its group commit, compaction and vacuum.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::DataType as ArrowType;
/// The `object_store` interface the table is read and written through.
pub use deltalake_core::ObjectStore;
use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake_core::kernel::{Action, Add, DataType, Remove, StructField, Transaction};
use deltalake_core::logstore::{LogStoreRef, StorageConfig, default_logstore};
use deltalake_core::operations::create::CreateBuilder;
use deltalake_core::protocol::{DeltaOperation, SaveMode};
use deltalake_core::table::config::TablePropertiesExt as _;
use deltalake_core::table::state::DeltaTableState;
use deltalake_core::{DeltaTableError, TableProperty};
use object_store::ObjectStoreExt as _;
use object_store::prefix::PrefixStore;
use ticket_core::keys::Hour;
use ticket_engine::output::ticket_schema;
use ticket_s3::store::StoreError;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::metrics::TableMetrics;
use crate::upkeep::Upkeep;

/// Where the table lives under `S3_PREFIX`.
pub const TABLE_DIR: &str = "tables/tickets_with_team/";

/// The table's partition columns, in the order of its directories.
pub const PARTITION_COLUMNS: [&str; 4] = ["topic", "date", "hour", "partition"];

/// The table's columns: the Parquet output's ([`ticket_schema`], the one definition), then
/// the partition columns, as `query` shows them for the object layout.
fn columns() -> Vec<StructField> {
    ticket_schema(true)
        .fields()
        .iter()
        .map(|f| (f.name().as_str(), f.data_type()))
        .chain(
            crate::read::partition_fields()
                .iter()
                .map(|f| (f.name().as_str(), f.data_type())),
        )
        .map(|(name, t)| StructField::new(name, delta_type(t), true))
        .collect()
}

/// The Delta type of an Arrow type of [`columns`].
fn delta_type(t: &ArrowType) -> DataType {
    match t {
        ArrowType::Int64 => DataType::LONG,
        ArrowType::Int32 => DataType::INTEGER,
        ArrowType::Date32 => DataType::DATE,
        ArrowType::Timestamp(_, Some(_)) => DataType::TIMESTAMP,
        ArrowType::Timestamp(_, None) => DataType::TIMESTAMP_NTZ,
        ArrowType::Utf8 | ArrowType::Utf8View | ArrowType::LargeUtf8 => DataType::STRING,
        other => unreachable!("no ticket column is of type {other}"),
    }
}

/// The transaction app id of a Kafka partition.
pub fn app_id(topic: &str, partition: i32) -> String {
    format!("{topic}-{partition}")
}

/// A Parquet file of one Kafka partition's tickets of one hour, written before its commit.
#[derive(Debug, Clone)]
pub struct DataFile {
    /// Relative to the table's root; unique (see [`DataFile::path_for`]).
    pub path: String,
    pub hour: Hour,
    /// Offsets of the first and last ticket in it.
    pub first: i64,
    pub last: i64,
    pub size: u64,
    pub tickets: u64,
}

impl DataFile {
    /// A unique name for a partition's tickets of one hour (a stale owner's file never takes
    /// the place of the committed one): a UUIDv7, so names sort by the time they were made.
    /// The offsets the file holds are in its `add` action's tags (`first_offset`,
    /// `last_offset`), not in the name, which stays short.
    pub fn path_for(topic: &str, partition: i32, hour: Hour) -> String {
        format!(
            "topic={topic}/{}/partition={partition}/{}.parquet",
            hour.path(),
            uuid::Uuid::now_v7().simple()
        )
    }
}

/// A data file of a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    /// Relative to the table's root.
    pub path: String,
    pub size: u64,
    /// By [`PARTITION_COLUMNS`] name, as the log writes them (`hour` without a leading 0).
    pub partition_values: HashMap<String, Option<String>>,
}

/// One Kafka partition's share of a commit.
#[derive(Debug, Clone)]
pub struct Part {
    pub topic: String,
    pub partition: i32,
    /// The version this owner resumed from or last committed (`None`: the table has none).
    pub expected: Option<i64>,
    /// The last offset the part covers (a backfill's: the number of the part, from 0).
    pub version: i64,
    pub files: Vec<DataFile>,
}

/// What became of a [`Part`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// In the table now.
    Committed,
    /// Another owner moved the partition's version (to `found`): not committed.
    Fenced { found: Option<i64> },
}

/// The table: its log store and the latest snapshot this process has read.
pub struct Table {
    log: LogStoreRef,
    location: url::Url,
    state: Mutex<Known>,
    /// A writer's log upkeep (checkpoints, expired entries), told of each commit; `None` for
    /// a reader.
    upkeep: Option<Upkeep>,
    /// The maintenance's figures, for the processor's /metrics.
    pub metrics: TableMetrics,
}

/// The table properties a processor or a backfill sets when it creates the table. A table that
/// exists keeps its own: change them with any Delta tool (`ALTER TABLE ... SET TBLPROPERTIES`);
/// the processors read them at start.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Delta table (OUTPUT_FORMAT=delta)")]
pub struct Creation {
    /// When this creates the Delta table: how long its log keeps its entries
    /// (delta.logRetentionDuration), so how far back time travel reaches. Older entries are
    /// removed after each log checkpoint. E.g. 30days, 12h.
    #[arg(long, env = "DELTA_LOG_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub log_retention: Duration,

    /// When this creates the Delta table: how long a data file a compaction replaced stays
    /// for readers of older snapshots (delta.deletedFileRetentionDuration); then the
    /// processors' maintenance deletes it.
    #[arg(long, env = "DELTA_DELETED_FILE_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub deleted_file_retention: Duration,
}

impl Default for Creation {
    fn default() -> Self {
        Creation {
            log_retention: Duration::from_secs(30 * 24 * 3600),
            deleted_file_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// A duration as a Delta table property's interval.
fn interval(d: Duration) -> String {
    format!("interval {} seconds", d.as_secs())
}

/// The snapshot this process read last, and the partitions' versions looked up in it (a
/// lookup replays the log, so each is made once per snapshot read from S3; a commit of ours
/// adds to both).
struct Known {
    snapshot: DeltaTableState,
    versions: HashMap<String, Option<i64>>,
}

impl Known {
    fn new(snapshot: DeltaTableState) -> Known {
        Known {
            snapshot,
            versions: HashMap::new(),
        }
    }
}

impl Table {
    /// The table at `{prefix}tables/tickets_with_team/` of `bucket`, created if there is none
    /// (by whichever instance gets there first).
    pub async fn open_or_create(
        root: Arc<dyn ObjectStore>,
        bucket: &str,
        prefix: &str,
        creation: &Creation,
        vacuum: bool,
    ) -> Result<Table, StoreError> {
        let (log, location) = log_store(root, bucket, prefix)?;
        let state = match DeltaTableState::try_new(log.as_ref(), None).await {
            Ok(s) => s,
            Err(DeltaTableError::NotATable(_)) => {
                let created = CreateBuilder::new()
                    .with_log_store(log.clone())
                    .with_table_name("tickets_with_team")
                    .with_columns(columns())
                    .with_partition_columns(PARTITION_COLUMNS)
                    .with_configuration_property(
                        TableProperty::LogRetentionDuration,
                        Some(interval(creation.log_retention)),
                    )
                    .with_configuration_property(
                        TableProperty::DeletedFileRetentionDuration,
                        Some(interval(creation.deleted_file_retention)),
                    )
                    .with_save_mode(SaveMode::Ignore)
                    .await;
                match created {
                    Ok(_) | Err(DeltaTableError::Transaction { .. }) => {
                        // Ours or another instance's: either way, read what is there.
                        DeltaTableState::try_new(log.as_ref(), None)
                            .await
                            .map_err(|e| store_error("create", &location, e))?
                    }
                    Err(e) => return Err(store_error("create", &location, e)),
                }
            }
            Err(e) => return Err(store_error("read", &location, e)),
        };
        let config = state.table_config();
        let metrics = TableMetrics::default();
        let upkeep = Upkeep::spawn(
            log.clone(),
            state.version(),
            config.checkpoint_interval().get(),
            config
                .enable_expired_log_cleanup()
                .then(|| config.log_retention_duration()),
            metrics.log_entries.clone(),
            vacuum.then(|| metrics.files_vacuumed.clone()),
        );
        Ok(Table {
            log,
            location,
            state: Mutex::new(Known::new(state)),
            upkeep: Some(upkeep),
            metrics,
        })
    }

    /// The table, for readers; `None` when there is none yet.
    pub async fn open(
        root: Arc<dyn ObjectStore>,
        bucket: &str,
        prefix: &str,
    ) -> Result<Option<Table>, StoreError> {
        let (log, location) = log_store(root, bucket, prefix)?;
        match DeltaTableState::try_new(log.as_ref(), None).await {
            Ok(state) => Ok(Some(Table {
                log,
                location,
                state: Mutex::new(Known::new(state)),
                upkeep: None,
                metrics: TableMetrics::default(),
            })),
            Err(DeltaTableError::NotATable(_)) => Ok(None),
            Err(e) => Err(store_error("read", &location, e)),
        }
    }

    /// A fresh look at the table, after a failure: its log read again from S3 (not the
    /// snapshot this process knows) and its protocol one this processor can write. A transient
    /// error if S3 cannot be reached; a permanent one of op `check`, with what to fix, if the
    /// table is gone or needs features this processor does not have. Any other error is a
    /// failed read of the log, as delta-rs wrapped it.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        let refused = |message: String, hint: &str| StoreError::Permanent {
            op: "check",
            location: self.location.to_string(),
            message,
            hint: hint.into(),
        };
        let fresh = match DeltaTableState::try_new(self.log.as_ref(), None).await {
            Ok(s) => s,
            Err(DeltaTableError::NotATable(m)) => {
                return Err(refused(
                    m,
                    "the Delta table's log is gone from the bucket: restore it, or remove the table's directory and restart to make a new one",
                ));
            }
            Err(e) => return Err(store_error("read", &self.location, e)),
        };
        deltalake_core::kernel::transaction::PROTOCOL
            .can_write_to(&fresh)
            .map_err(|e| {
                refused(
                    e.to_string(),
                    "the table needs Delta features this processor cannot write (was it changed by another tool?)",
                )
            })
    }

    /// The table's log store.
    #[cfg(test)]
    pub(crate) fn log(&self) -> &LogStoreRef {
        &self.log
    }

    /// `s3://bucket/prefix/tables/tickets_with_team/`.
    pub fn location(&self) -> &url::Url {
        &self.location
    }

    /// Waits until the log's upkeep has followed every commit this process made (a checkpoint
    /// due is written, expired entries removed).
    pub async fn settled(&self) {
        if let Some(upkeep) = &self.upkeep {
            upkeep.settled().await;
        }
    }

    /// The version of the table this process read last.
    pub async fn version(&self) -> u64 {
        self.state.lock().await.snapshot.version()
    }

    /// A partition's version in the latest snapshot: the last offset committed for it.
    pub async fn version_of(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        let mut known = self.state.lock().await;
        self.refresh(&mut known).await?;
        self.lookup(&mut known, &app_id(topic, partition)).await
    }

    /// The data files of the latest snapshot: what a reader reads, no more (not a file of a
    /// commit not made yet, nor one a commit never referred to).
    ///
    /// The log is read on a copy of the known snapshot, without holding it: a commit of this
    /// process (the stream's, several a second) never waits for a reader (the totals' refresh,
    /// once a second). The newer snapshot is then kept for the next commit.
    pub async fn files(&self) -> Result<Vec<SnapshotFile>, StoreError> {
        let mut snapshot = self.state.lock().await.snapshot.clone();
        snapshot
            .update(self.log.as_ref(), None)
            .await
            .map_err(|e| store_error("read", &self.location, e))?;
        let files = snapshot
            .snapshot()
            .log_data()
            .iter()
            .map(|f| SnapshotFile {
                path: f.path().to_string(),
                size: f.size().max(0) as u64,
                partition_values: f.partition_values_map(),
            })
            .collect();
        let mut known = self.state.lock().await;
        if snapshot.version() > known.snapshot.version() {
            *known = Known::new(snapshot);
        }
        Ok(files)
    }

    /// One commit of every part whose partition is still at the version its owner expects.
    /// Conflicts with other writers are resolved by reading the table again and checking the
    /// versions again; a part already in the table (a lost answer) reads as committed.
    pub async fn commit(&self, parts: &[Part]) -> Result<Vec<Outcome>, StoreError> {
        let mut known = self.state.lock().await;
        // First on the snapshot we know, without reading the log again: the log write is
        // conditional on the next version, so if it lands, nobody committed since that
        // snapshot and the versions checked in it were the latest. Otherwise: read the log
        // again, check again.
        loop {
            let mut outcomes = Vec::with_capacity(parts.len());
            let mut actions = Vec::new();
            for part in parts {
                let found = self
                    .lookup(&mut known, &app_id(&part.topic, part.partition))
                    .await?;
                if found == Some(part.version) {
                    outcomes.push(Some(Outcome::Committed));
                } else if found != part.expected {
                    outcomes.push(Some(Outcome::Fenced { found }));
                } else {
                    outcomes.push(None);
                    actions.extend(part.actions());
                }
            }
            if actions.is_empty() {
                return Ok(outcomes.into_iter().flatten().collect());
            }
            let operation = DeltaOperation::Write {
                mode: SaveMode::Append,
                partition_by: None,
                predicate: None,
            };
            if self.try_commit(&mut known, actions, operation).await? {
                for (part, outcome) in parts.iter().zip(&outcomes) {
                    if outcome.is_none() {
                        known
                            .versions
                            .insert(app_id(&part.topic, part.partition), Some(part.version));
                    }
                }
                return Ok(outcomes
                    .into_iter()
                    .map(|o| o.unwrap_or(Outcome::Committed))
                    .collect());
            }
            tracing::debug!("Another writer committed to the table first; checking again.");
            self.refresh(&mut known).await?;
        }
    }

    /// One attempt at committing `actions` on the known snapshot: true if it landed (the
    /// snapshot is then the new version), false if another writer committed first.
    async fn try_commit(
        &self,
        known: &mut Known,
        actions: Vec<Action>,
        operation: DeltaOperation,
    ) -> Result<bool, StoreError> {
        // The log's checkpoint and cleanup follow the commit, by the upkeep's task, rather
        // than delaying its answer (crate::upkeep).
        let properties = CommitProperties::default()
            .with_create_checkpoint(false)
            .with_cleanup_expired_logs(Some(false));
        let commit = CommitBuilder::from(properties)
            .with_actions(actions)
            // Conflicts come back to the caller, which checks what it depends on again.
            .with_max_retries(0)
            .build(Some(&known.snapshot), self.log.clone(), operation)
            .await;
        match commit {
            Ok(done) => {
                known.snapshot = done.snapshot();
                if let Some(upkeep) = &self.upkeep {
                    upkeep.committed(known.snapshot.version());
                }
                Ok(true)
            }
            Err(DeltaTableError::Transaction {
                source:
                    TransactionError::MaxCommitAttempts(_)
                    | TransactionError::VersionAlreadyExists(_)
                    | TransactionError::CommitConflict(_),
            }) => Ok(false),
            Err(e) => Err(store_error("commit to", &self.location, e)),
        }
    }

    /// A partition's version in the known snapshot.
    async fn lookup(&self, known: &mut Known, app: &str) -> Result<Option<i64>, StoreError> {
        if let Some(v) = known.versions.get(app) {
            return Ok(*v);
        }
        let v = known
            .snapshot
            .transaction_version(self.log.as_ref(), app)
            .await
            .map_err(|e| store_error("read", &self.location, e))?;
        known.versions.insert(app.to_string(), v);
        Ok(v)
    }

    /// Reads the log's new commits, if any; the versions looked up before are then forgotten.
    async fn refresh(&self, known: &mut Known) -> Result<(), StoreError> {
        let before = known.snapshot.version();
        known
            .snapshot
            .update(self.log.as_ref(), None)
            .await
            .map_err(|e| store_error("read", &self.location, e))?;
        if known.snapshot.version() != before {
            known.versions.clear();
        }
        Ok(())
    }
}

impl Part {
    fn actions(&self) -> impl Iterator<Item = Action> + '_ {
        let now = chrono::Utc::now().timestamp_millis();
        let adds = self.files.iter().map(move |f| {
            let start = f.hour.start();
            let values = HashMap::from([
                ("topic".to_string(), Some(self.topic.clone())),
                (
                    "date".to_string(),
                    Some(start.format("%Y-%m-%d").to_string()),
                ),
                ("hour".to_string(), Some(start.format("%-H").to_string())),
                ("partition".to_string(), Some(self.partition.to_string())),
            ]);
            Action::Add(Add {
                path: f.path.clone(),
                partition_values: values,
                size: f.size as i64,
                modification_time: now,
                data_change: true,
                stats: Some(format!("{{\"numRecords\":{}}}", f.tickets)),
                tags: Some(HashMap::from([
                    ("first_offset".to_string(), Some(f.first.to_string())),
                    ("last_offset".to_string(), Some(f.last.to_string())),
                ])),
                ..Default::default()
            })
        });
        let txn = Action::Txn(Transaction::new_with_last_update(
            app_id(&self.topic, self.partition),
            self.version,
            Some(now),
        ));
        adds.chain(std::iter::once(txn))
    }
}

/// The table's log store on the workspace's `object_store` client.
fn log_store(
    root: Arc<dyn ObjectStore>,
    bucket: &str,
    prefix: &str,
) -> Result<(LogStoreRef, url::Url), StoreError> {
    let dir = format!("{prefix}{TABLE_DIR}");
    let location =
        url::Url::parse(&format!("s3://{bucket}/{dir}")).map_err(|e| StoreError::Permanent {
            op: "open",
            location: format!("s3://{bucket}/{dir}"),
            message: e.to_string(),
            hint: "S3_BUCKET_NAME and S3_PREFIX must make a URL".into(),
        })?;
    let prefixed: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(
        root.clone(),
        object_store::path::Path::from(dir.as_str()),
    ));
    let log = default_logstore(prefixed, root, &location, &StorageConfig::default());
    Ok((log, location))
}

/// Delta's errors as the store's, a first guess from how delta-rs wrapped them: the object
/// store's failures are worth retrying (bar refused credentials), anything else is reported
/// as permanent. The stream does not take that on trust: before a permanent error stops it,
/// it reads the bucket and the table afresh (`ticket_commit::retry`), since an S3 failure
/// can also arrive wrapped as something else (`DeltaTableError::Generic`).
fn store_error(op: &'static str, location: &url::Url, e: DeltaTableError) -> StoreError {
    let object_store = match &e {
        DeltaTableError::ObjectStore { source } => Some(source),
        DeltaTableError::Transaction {
            source: TransactionError::ObjectStore { source },
        } => Some(source),
        DeltaTableError::KernelError(delta_kernel::Error::ObjectStore(source)) => Some(source),
        DeltaTableError::Kernel {
            source: deltalake_core::kernel::Error::ObjectStore(source),
        } => Some(source),
        _ => None,
    };
    match object_store {
        Some(
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. },
        ) => StoreError::Permanent {
            op,
            location: location.to_string(),
            message: e.to_string(),
            hint: "check the AWS credentials and the bucket's policy".into(),
        },
        Some(_) => StoreError::Transient {
            op,
            location: location.to_string(),
            message: e.to_string(),
        },
        None => StoreError::Permanent {
            op,
            location: location.to_string(),
            message: e.to_string(),
            hint: "the Delta table there is not one this processor can write (was it made by another tool?)".into(),
        },
    }
}

/// Commits [`Part`]s of many partitions together: a part waits while a commit is in flight
/// and goes with every other part that arrived meanwhile, so a processor makes about one
/// commit per flush, not one per partition.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<(Part, oneshot::Sender<Result<Outcome, StoreError>>)>,
}

impl GroupCommit {
    pub fn spawn(table: Arc<Table>) -> GroupCommit {
        let (tx, mut rx) =
            mpsc::unbounded_channel::<(Part, oneshot::Sender<Result<Outcome, StoreError>>)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut waiting = vec![first];
                while let Ok(more) = rx.try_recv() {
                    waiting.push(more);
                }
                let parts: Vec<Part> = waiting.iter().map(|(p, _)| p.clone()).collect();
                match table.commit(&parts).await {
                    Ok(outcomes) => {
                        for ((_, reply), outcome) in waiting.into_iter().zip(outcomes) {
                            let _ = reply.send(Ok(outcome));
                        }
                    }
                    Err(e) => {
                        for (_, reply) in waiting {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        GroupCommit { tx }
    }

    /// Commits the part with whatever else is waiting.
    pub async fn commit(&self, part: Part) -> Result<Outcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Transient {
            op: "commit to",
            location: "the Delta table".into(),
            message: "the table's committer stopped".into(),
        };
        self.tx.send((part, reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// What [`Table::compact`] (or a processor's maintenance round) did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compacted {
    /// Rewrites made, each in a commit of its own (one per partition-hour, or per target-size
    /// file of a large one).
    pub rewrites: usize,
    /// Data files replaced, and the files that replaced them.
    pub files_before: usize,
    pub files_after: usize,
    /// Bytes written by the rewrites.
    pub bytes: u64,
    /// Rewrites given up because another compaction changed their files first.
    pub skipped: usize,
}

impl Compacted {
    fn add(&mut self, done: Option<Rewritten>, files: usize) {
        match done {
            Some(r) => {
                self.rewrites += 1;
                self.files_before += files;
                self.files_after += 1;
                self.bytes += r.size;
            }
            None => self.skipped += 1,
        }
    }
}

/// One Kafka partition's hour of the table: where its data files are.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionHour {
    pub topic: String,
    pub partition: i32,
    pub hour: Hour,
}

impl PartitionHour {
    /// The partition-hour a data file is in, from its partition values; `None` for values this
    /// processor does not write.
    pub fn of(file: &SnapshotFile) -> Option<PartitionHour> {
        let v = |k: &str| file.partition_values.get(k).cloned().flatten();
        let date = chrono::NaiveDate::parse_from_str(&v("date")?, "%Y-%m-%d").ok()?;
        let hour: u32 = v("hour")?.parse().ok()?;
        let start = date.and_hms_opt(hour, 0, 0)?.and_utc();
        Some(PartitionHour {
            topic: v("topic")?,
            partition: v("partition")?.parse().ok()?,
            hour: Hour::of(&start),
        })
    }

    /// The end of its hour.
    pub fn end(&self) -> chrono::DateTime<chrono::Utc> {
        self.hour.start() + chrono::Duration::hours(1)
    }
}

/// Files of one partition-hour to be made one.
#[derive(Debug, Clone)]
pub struct Rewrite {
    pub at: PartitionHour,
    pub files: Vec<SnapshotFile>,
}

/// The file a rewrite made.
#[derive(Debug, Clone)]
pub struct Rewritten {
    /// Relative to the table's root.
    pub path: String,
    pub size: u64,
    pub rows: u64,
}

/// Pure: the rewrites that leave each partition-hour that `closed` accepts in one file, or, when its files add up to more than `target` bytes, in files of about `target`
/// (a file of `target` or more is left as it is). Files are taken in the order of their names
/// (the order they were written), so that each new file holds a run of offsets.
pub fn plan(
    files: impl IntoIterator<Item = SnapshotFile>,
    closed: impl Fn(&PartitionHour) -> bool,
    target: u64,
) -> Vec<Rewrite> {
    let mut hours: std::collections::BTreeMap<PartitionHour, Vec<SnapshotFile>> =
        Default::default();
    for f in files {
        if let Some(at) = PartitionHour::of(&f).filter(|at| closed(at)) {
            hours.entry(at).or_default().push(f);
        }
    }
    let mut rewrites = Vec::new();
    for (at, mut files) in hours {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let mut bin: Vec<SnapshotFile> = Vec::new();
        let mut bytes = 0;
        let mut close = |bin: &mut Vec<SnapshotFile>| {
            if bin.len() > 1 {
                rewrites.push(Rewrite {
                    at: at.clone(),
                    files: std::mem::take(bin),
                });
            }
            bin.clear();
        };
        for f in files.into_iter().filter(|f| f.size < target) {
            if !bin.is_empty() && bytes + f.size > target {
                close(&mut bin);
                bytes = 0;
            }
            bytes += f.size;
            bin.push(f);
        }
        close(&mut bin);
    }
    rewrites
}

/// The part size of a rewrite's multipart upload (S3's minimum is 5 MiB).
const PART_BYTES: usize = 8 * 1024 * 1024;

impl Table {
    /// Rewrites every partition-hour whose hour ended before `before` and that has
    /// more than one data file into one file (or files of about `target` bytes): one commit per
    /// rewrite, that removes the old files and adds the new one, without changing the data.
    /// Late Kafka timestamps mean no hour is ever closed, so this is a normal transaction
    /// beside the writers: an append to the same hour meanwhile does not conflict with it (its
    /// new file is simply not part of this rewrite); a concurrent compaction that removed one
    /// of the files first makes this one give that rewrite up. The old files stay for readers
    /// of older snapshots until a vacuum.
    pub async fn compact(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        target: u64,
    ) -> Result<Compacted, StoreError> {
        let mut done = Compacted::default();
        let files = self.files().await?;
        for rewrite in plan(files, |at| at.end() <= before, target) {
            let made = self.rewrite(&rewrite).await?;
            done.add(made, rewrite.files.len());
        }
        Ok(done)
    }

    /// Makes a rewrite's files one: their rows streamed into a new file (a multipart upload,
    /// a row group in memory at a time), then one commit that removes them and adds it, made
    /// only if every one of them is still in the table (checked again on a conflict). `None`
    /// if another compaction got there first (the new file is then deleted).
    pub async fn rewrite(&self, rewrite: &Rewrite) -> Result<Option<Rewritten>, StoreError> {
        self.rewrite_then(rewrite, |_| {}).await
    }

    /// [`Table::rewrite`], calling `before_commit` with the new file once it is written.
    pub async fn rewrite_then(
        &self,
        rewrite: &Rewrite,
        before_commit: impl FnOnce(&Rewritten),
    ) -> Result<Option<Rewritten>, StoreError> {
        let files = &rewrite.files;
        let Some(first) = files.first() else {
            return Ok(None);
        };
        let store = self.log.object_store(None);
        let dir = first.path.rsplit_once('/').map_or("", |(d, _)| d);
        let path = format!("{dir}/{}.parquet", uuid::Uuid::now_v7().simple());
        let (size, rows) = self.stream_into(&store, files, &path).await?;
        let made = Rewritten { path, size, rows };
        before_commit(&made);
        let Rewritten { path, .. } = &made;
        let now = chrono::Utc::now().timestamp_millis();
        let mut actions: Vec<Action> = files
            .iter()
            .map(|f| {
                Action::Remove(Remove {
                    path: f.path.clone(),
                    data_change: false,
                    deletion_timestamp: Some(now),
                    extended_file_metadata: Some(true),
                    partition_values: Some(f.partition_values.clone()),
                    size: Some(f.size as i64),
                    ..Default::default()
                })
            })
            .collect();
        actions.push(Action::Add(Add {
            path: path.clone(),
            partition_values: first.partition_values.clone(),
            size: size as i64,
            modification_time: now,
            data_change: false,
            stats: Some(format!("{{\"numRecords\":{rows}}}")),
            ..Default::default()
        }));
        let gone: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        let operation = DeltaOperation::Optimize {
            predicate: None,
            target_size: size as i64,
        };
        let committed = self
            .commit_when(actions, operation, |live| {
                gone.iter().all(|p| live.contains(*p))
            })
            .await?;
        tracing::info!(
            topic = rewrite.at.topic,
            partition = rewrite.at.partition,
            hour = %rewrite.at.hour.path(),
            files = files.len(),
            bytes = size,
            committed,
            "Compacted a partition-hour."
        );
        if !committed {
            // Never referred to by a commit: no reader can need it.
            let _ = store
                .delete(&object_store::path::Path::from(path.as_str()))
                .await;
            return Ok(None);
        }
        Ok(Some(made))
    }

    /// Streams the rows of `files` into a new file at `path`; returns its size and row count.
    async fn stream_into(
        &self,
        store: &Arc<dyn ObjectStore>,
        files: &[SnapshotFile],
        path: &str,
    ) -> Result<(u64, u64), StoreError> {
        use deltalake_core::parquet::arrow::ParquetRecordBatchStreamBuilder;
        // Deprecated in parquet 59 in favour of a reader of one's own; this one still reads
        // by ranges through object_store, a row group at a time.
        #[allow(deprecated)]
        use deltalake_core::parquet::arrow::async_reader::ParquetObjectReader;
        use deltalake_core::parquet::arrow::async_writer::AsyncArrowWriter;
        use deltalake_core::parquet::errors::ParquetError;
        use futures::StreamExt as _;
        use object_store::buffered::BufWriter;
        // A failed request is worth another try; anything else is a file this processor
        // cannot read or write.
        let failed = |p: &str, e: ParquetError| match e {
            ParquetError::External(e) => StoreError::Transient {
                op: "compact",
                location: format!("{}{p}", self.location),
                message: e.to_string(),
            },
            e => StoreError::Permanent {
                op: "compact",
                location: format!("{}{p}", self.location),
                message: e.to_string(),
                hint: "a data file of the table is not the Parquet this processor writes".into(),
            },
        };
        let mut upload = Some(
            BufWriter::with_capacity(
                store.clone(),
                object_store::path::Path::from(path),
                PART_BYTES,
            )
            .with_max_concurrency(2),
        );
        let mut writer: Option<AsyncArrowWriter<BufWriter>> = None;
        for f in files {
            #[allow(deprecated)]
            let reader = ParquetObjectReader::new(
                store.clone(),
                object_store::path::Path::from(f.path.as_str()),
            )
            .with_file_size(f.size);
            let builder = ParquetRecordBatchStreamBuilder::new(reader)
                .await
                .map_err(|e| failed(&f.path, e))?;
            let w = match (writer.as_mut(), upload.take()) {
                (Some(w), _) => w,
                (None, Some(upload)) => writer.insert(
                    AsyncArrowWriter::try_new(
                        upload,
                        builder.schema().clone(),
                        Some(ticket_engine::output::parquet_properties()),
                    )
                    .map_err(|e| failed(path, e))?,
                ),
                (None, None) => unreachable!("the writer is made with the one upload"),
            };
            let mut batches = builder.build().map_err(|e| failed(&f.path, e))?;
            while let Some(batch) = batches.next().await {
                let batch = batch.map_err(|e| failed(&f.path, e))?;
                w.write(&batch).await.map_err(|e| failed(path, e))?;
            }
        }
        let Some(mut w) = writer else {
            return Err(StoreError::Permanent {
                op: "compact",
                location: format!("{}{path}", self.location),
                message: "no file to rewrite".into(),
                hint: "a rewrite has files".into(),
            });
        };
        let meta = w.finish().await.map_err(|e| failed(path, e))?;
        Ok((
            w.bytes_written() as u64,
            meta.file_metadata().num_rows().max(0) as u64,
        ))
    }

    /// The counts of a data file: read whole in one request if it is small (a batch's), else
    /// a row group at a time and only the three columns counted (a compacted hour's file may
    /// be large); `None` if the file is not there.
    pub async fn count_file(
        &self,
        file: &SnapshotFile,
        aggregator: &ticket_engine::aggregate::Aggregator,
    ) -> Result<Option<ticket_core::counts::Counts>, StoreError> {
        self.count_file_reading_whole(file, aggregator, PART_BYTES as u64)
            .await
    }

    /// [`Table::count_file`], a file of up to `whole` bytes read in one request.
    pub(crate) async fn count_file_reading_whole(
        &self,
        file: &SnapshotFile,
        aggregator: &ticket_engine::aggregate::Aggregator,
        whole: u64,
    ) -> Result<Option<ticket_core::counts::Counts>, StoreError> {
        #[allow(deprecated)]
        use deltalake_core::parquet::arrow::async_reader::ParquetObjectReader;
        use deltalake_core::parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
        use deltalake_core::parquet::errors::ParquetError;
        use futures::StreamExt as _;
        let location = || format!("{}{}", self.location, file.path);
        let failed = |e: ParquetError| match e {
            ParquetError::External(e) => StoreError::Transient {
                op: "read",
                location: location(),
                message: e.to_string(),
            },
            e => StoreError::Permanent {
                op: "read",
                location: location(),
                message: e.to_string(),
                hint: "a data file of the table is not the Parquet this processor writes".into(),
            },
        };
        let store = self.log.object_store(None);
        let at = object_store::path::Path::from(file.path.as_str());
        let unreadable = |e: anyhow::Error| StoreError::Permanent {
            op: "read",
            location: location(),
            message: format!("{e:#}"),
            hint: "a data file of the table is not the Parquet this processor writes".into(),
        };
        let outage = |e: object_store::Error| StoreError::Transient {
            op: "read",
            location: location(),
            message: e.to_string(),
        };
        // A stream's file (a batch's, the usual case): one request, read whole.
        if file.size <= whole {
            let body = match store.get(&at).await {
                Ok(got) => got.bytes().await.map_err(outage)?,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(outage(e)),
            };
            return aggregator
                .count_parquet(body)
                .await
                .map(Some)
                .map_err(unreadable);
        }
        // A compacted hour's: asked first (a file that is gone must not read as an outage to
        // wait out), then read by ranges.
        match store.head(&at).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(outage(e)),
        }
        #[allow(deprecated)]
        let reader = ParquetObjectReader::new(store, at).with_file_size(file.size);
        let builder = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .map_err(failed)?;
        let mask = ProjectionMask::columns(
            builder.parquet_schema(),
            ["request_type", "priority", "support_team"],
        );
        let mut batches = builder.with_projection(mask).build().map_err(failed)?;
        let mut counts = ticket_core::counts::Counts::default();
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(failed)?;
            let some = aggregator.count(vec![batch]).await.map_err(unreadable)?;
            counts.merge(&some);
        }
        Ok(Some(counts))
    }

    /// Commits `actions` on the latest snapshot if `still` holds for the snapshot's file paths
    /// (checked again after every conflict); false if it no longer does. Holds the snapshot,
    /// which the stream's commits wait for, only for the read of the log and the commit.
    async fn commit_when(
        &self,
        actions: Vec<Action>,
        operation: DeltaOperation,
        still: impl Fn(&std::collections::HashSet<&str>) -> bool,
    ) -> Result<bool, StoreError> {
        let mut known = self.state.lock().await;
        loop {
            self.refresh(&mut known).await?;
            let live: std::collections::HashSet<String> = known
                .snapshot
                .snapshot()
                .log_data()
                .iter()
                .map(|f| f.path().to_string())
                .collect();
            if !still(&live.iter().map(String::as_str).collect()) {
                return Ok(false);
            }
            if self
                .try_commit(&mut known, actions.clone(), operation.clone())
                .await?
            {
                return Ok(true);
            }
        }
    }
}

impl Table {
    /// Deletes the data files that a commit removed (a compaction's) longer than `retain` ago,
    /// and nothing else: never a file no commit referred to, which may be one a writer is
    /// about to commit (written before an outage, committed after it). No listing of the
    /// table's directories and no commit: the removals are read from the log. Returns the
    /// number of files deleted. (A writing processor does this before each log checkpoint:
    /// crate::upkeep.)
    pub async fn vacuum_removed(&self, retain: Duration) -> Result<usize, StoreError> {
        let mut snapshot = self.state.lock().await.snapshot.clone();
        snapshot
            .update(self.log.as_ref(), None)
            .await
            .map_err(|e| store_error("read", &self.location, e))?;
        crate::upkeep::delete_removed(&self.log, &snapshot, retain)
            .await
            .map_err(|e| store_error("vacuum", &self.location, e))
    }
}

impl Table {
    /// Deletes the data files no snapshot of the last `retain` needs: those a compaction (or
    /// any removal) replaced before that, and those no commit ever referred to (a writer that
    /// crashed or was fenced between its data files and its commit) older than that. `retain`
    /// must be longer than any write-to-commit delay (an S3 outage stretches it) and than any
    /// query: a shorter one can delete a file a commit is about to refer to.
    pub async fn vacuum(&self, retain: std::time::Duration) -> Result<usize, StoreError> {
        let retain = chrono::Duration::from_std(retain).map_err(|e| StoreError::Permanent {
            op: "vacuum",
            location: self.location.to_string(),
            message: e.to_string(),
            hint: "a shorter retention".into(),
        })?;
        let mut table = deltalake_core::DeltaTable::new(self.log.clone());
        table
            .load()
            .await
            .map_err(|e| store_error("read", &self.location, e))?;
        let (_, metrics) = table
            .vacuum()
            .with_mode(deltalake_core::operations::vacuum::VacuumMode::Full)
            .with_retention_period(retain)
            // The retention is the caller's to choose (README: what a short one risks).
            .with_enforce_retention_duration(false)
            .await
            .map_err(|e| store_error("vacuum", &self.location, e))?;
        Ok(metrics.files_deleted.len())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use object_store::memory::InMemory;

    pub(crate) fn part(partition: i32, expected: Option<i64>, version: i64) -> Part {
        let hour = Hour::from_millis(1_700_000_000_000);
        Part {
            topic: "tickets".into(),
            partition,
            expected,
            version,
            files: vec![DataFile {
                path: DataFile::path_for("tickets", partition, hour),
                hour,
                first: 0,
                last: version,
                size: 10,
                tickets: 3,
            }],
        }
    }

    fn file(path: &str, size: u64) -> SnapshotFile {
        SnapshotFile {
            path: path.into(),
            size,
            partition_values: HashMap::from([
                ("topic".to_string(), Some("tickets".to_string())),
                ("date".to_string(), Some("2026-12-07".to_string())),
                ("hour".to_string(), Some("9".to_string())),
                ("partition".to_string(), Some("0".to_string())),
            ]),
        }
    }

    #[test]
    fn a_closed_hour_becomes_one_file_or_files_of_the_target_size() {
        let files = || {
            [
                ("a", 50),
                ("b", 50),
                ("c", 50),
                ("d", 200),
                ("e", 10),
                ("f", 10),
            ]
            .map(|(p, n)| file(p, n))
        };
        let paths = |rewrites: Vec<Rewrite>| -> Vec<Vec<String>> {
            rewrites
                .into_iter()
                .map(|r| r.files.into_iter().map(|f| f.path).collect())
                .collect()
        };
        // Under the target, in the order written; a file of the target or more stays.
        assert_eq!(
            paths(plan(files(), |_| true, 120)),
            vec![vec!["a", "b"], vec!["c", "e", "f"]]
        );
        assert_eq!(
            paths(plan(files(), |_| true, 1000)),
            vec![vec!["a", "b", "c", "d", "e", "f"]]
        );
        let at = PartitionHour::of(&file("a", 1)).expect("ours");
        assert_eq!(at.end().to_rfc3339(), "2026-12-07T10:00:00+00:00");
        assert!(plan(files(), |_| false, 120).is_empty(), "an open hour");
    }

    pub(crate) async fn table(root: &Arc<dyn ObjectStore>) -> Table {
        Table::open_or_create(root.clone(), "bucket", "p/", &Creation::default(), true)
            .await
            .expect("table")
    }

    #[tokio::test]
    async fn one_commit_covers_every_partition_and_new_owners_read_their_versions() {
        let root: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let t = table(&root).await;
        let created = t.version().await;
        let outcomes = t
            .commit(&[part(0, None, 9), part(1, None, 4)])
            .await
            .expect("commit");
        assert_eq!(outcomes, vec![Outcome::Committed; 2]);
        assert_eq!(
            t.version().await,
            created + 1,
            "one commit for both partitions"
        );

        // Another process (a new owner) reads the versions from the table.
        let other = Table::open(root.clone(), "bucket", "p/")
            .await
            .expect("read")
            .expect("a table");
        assert_eq!(other.version_of("tickets", 0).await.expect("v"), Some(9));
        assert_eq!(other.version_of("tickets", 1).await.expect("v"), Some(4));
        assert_eq!(other.version_of("tickets", 2).await.expect("v"), None);
        assert_eq!(other.files().await.expect("files").len(), 2);
        // The layout a reader relies on: partition values and the table's place.
        let file = &other.files().await.expect("files")[0];
        assert!(
            file.path
                .starts_with("topic=tickets/date=2023-11-14/hour=22/partition="),
            "{file:?}"
        );
        assert_eq!(file.partition_values["hour"].as_deref(), Some("22"));
        assert_eq!(file.partition_values["date"].as_deref(), Some("2023-11-14"));
        assert_eq!(file.size, 10);
        assert_eq!(
            other.location().as_str(),
            "s3://bucket/p/tables/tickets_with_team/"
        );
    }

    #[tokio::test]
    async fn a_stale_owner_is_fenced_and_the_rest_of_its_commit_still_lands() {
        let root: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let old = table(&root).await;
        let new = table(&root).await;
        // Both owned partition 0 from the start; the new owner committed first.
        assert_eq!(
            new.commit(&[part(0, None, 9)]).await.expect("commit"),
            vec![Outcome::Committed]
        );
        // The old one's snapshot is behind: its commit conflicts, it reads the table again,
        // finds partition 0 moved and commits only partition 1.
        let outcomes = old
            .commit(&[part(0, None, 12), part(1, None, 5)])
            .await
            .expect("commit");
        assert_eq!(
            outcomes,
            vec![Outcome::Fenced { found: Some(9) }, Outcome::Committed]
        );
        assert_eq!(new.version_of("tickets", 0).await.expect("v"), Some(9));
        assert_eq!(new.version_of("tickets", 1).await.expect("v"), Some(5));
        assert_eq!(
            new.files().await.expect("files").len(),
            2,
            "no row of the stale owner"
        );
    }

    #[tokio::test]
    async fn a_commit_whose_answer_was_lost_is_not_made_twice() {
        let root: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let t = table(&root).await;
        let p = part(0, None, 9);
        t.commit(std::slice::from_ref(&p)).await.expect("commit");
        let version = t.version().await;
        // The same part tried again, as after a timeout on the log write.
        assert_eq!(
            t.commit(std::slice::from_ref(&p)).await.expect("commit"),
            vec![Outcome::Committed]
        );
        assert_eq!(
            t.version().await,
            version,
            "nothing written the second time"
        );
        assert_eq!(t.files().await.expect("files").len(), 1);
    }

    #[tokio::test]
    async fn concurrent_creators_share_one_table() {
        let root: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let (a, b) = tokio::join!(table(&root), table(&root));
        a.commit(&[part(0, None, 1)]).await.expect("commit");
        b.commit(&[part(1, None, 1)]).await.expect("commit");
        assert_eq!(a.files().await.expect("files").len(), 2);
    }

    #[tokio::test]
    async fn the_log_is_checkpointed_at_the_crates_interval() {
        let root: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let t = table(&root).await;
        // Version 0 made the table; the crate checkpoints the version whose number + 1 is a
        // multiple of the interval (100).
        for v in 1..=100 {
            t.commit(&[part(0, (v > 1).then_some(v - 1), v)])
                .await
                .expect("commit");
        }
        // Made by the upkeep, after the commit.
        t.settled().await;
        let log = object_store::path::Path::from("p/tables/tickets_with_team/_delta_log");
        let names: Vec<String> =
            futures::TryStreamExt::try_collect::<Vec<_>>(root.list(Some(&log)))
                .await
                .expect("list")
                .into_iter()
                .map(|m| m.location.to_string())
                .collect();
        assert!(
            names.iter().any(|n| n.ends_with("0099.checkpoint.parquet")),
            "no log checkpoint after 100 commits: {names:?}"
        );
        // A new reader loads from it and still finds the partition's version.
        let other = Table::open(root.clone(), "bucket", "p/")
            .await
            .expect("read")
            .expect("a table");
        assert_eq!(other.version_of("tickets", 0).await.expect("v"), Some(100));
    }
}
