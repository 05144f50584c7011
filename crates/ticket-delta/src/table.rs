//! [`Table`]: the table's log, read and committed (the crate's documentation says how a commit
//! is exactly once), its group commit, compaction and vacuum.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::DataType as ArrowType;
use deltalake_core::DeltaTableError;
/// The `object_store` interface the table is read and written through.
pub use deltalake_core::ObjectStore;
use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake_core::kernel::{Action, Add, DataType, Remove, StructField, Transaction};
use deltalake_core::logstore::{LogStoreRef, StorageConfig, default_logstore};
use deltalake_core::operations::create::CreateBuilder;
use deltalake_core::protocol::{DeltaOperation, SaveMode};
use deltalake_core::table::config::TablePropertiesExt as _;
use deltalake_core::table::state::DeltaTableState;
use object_store::ObjectStoreExt as _;
use object_store::prefix::PrefixStore;
use ticket_core::keys::Hour;
use ticket_engine::output::ticket_schema;
use ticket_s3::store::StoreError;
use tokio::sync::{Mutex, mpsc, oneshot};

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
        let upkeep = Upkeep::spawn(
            log.clone(),
            state.version(),
            config.checkpoint_interval().get(),
            config
                .enable_expired_log_cleanup()
                .then(|| config.log_retention_duration()),
        );
        Ok(Table {
            log,
            location,
            state: Mutex::new(Known::new(state)),
            upkeep: Some(upkeep),
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

/// What [`Table::compact`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compacted {
    /// Partition-hours rewritten, each in a commit of its own.
    pub hours: usize,
    /// Data files replaced, and the files that replaced them.
    pub files_before: usize,
    pub files_after: usize,
    /// Partition-hours skipped because another compaction changed their files first.
    pub skipped: usize,
}

/// The data files of one Kafka partition's hour.
type HourKey = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

impl Table {
    /// Rewrites every partition-hour whose hour ended before `before` and that has more than
    /// one data file into one file: one commit per partition-hour that removes the old files
    /// and adds the new one, without changing the data. Late Kafka timestamps mean no hour is
    /// ever closed, so this is a normal transaction beside the writers: an append to the same
    /// hour meanwhile does not conflict with it (its new file is simply not part of this
    /// rewrite); a concurrent compaction that removed one of the files first makes this one
    /// give that partition-hour up. The old files stay for readers of older snapshots until
    /// [`Table::vacuum`].
    pub async fn compact(
        &self,
        before: chrono::DateTime<chrono::Utc>,
    ) -> Result<Compacted, StoreError> {
        let mut done = Compacted::default();
        let files = self.files().await?;
        let mut hours: std::collections::BTreeMap<HourKey, Vec<SnapshotFile>> = Default::default();
        for f in files {
            let v = |k: &str| f.partition_values.get(k).cloned().flatten();
            let key = (v("topic"), v("date"), v("hour"), v("partition"));
            hours.entry(key).or_default().push(f);
        }
        let store = self.log.object_store(None);
        for ((topic, date, hour, partition), files) in hours {
            let ended = date.as_deref().zip(hour.as_deref()).and_then(|(d, h)| {
                let start = chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok()?;
                let h: u32 = h.parse().ok()?;
                Some(start.and_hms_opt(h, 0, 0)?.and_utc() + chrono::Duration::hours(1))
            });
            if files.len() < 2 || ended.is_none_or(|end| end > before) {
                continue;
            }
            let (path, size, rows) = self.rewrite(&store, &files).await?;
            let now = chrono::Utc::now().timestamp_millis();
            let values = files[0].partition_values.clone();
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
                partition_values: values,
                size: size as i64,
                modification_time: now,
                data_change: false,
                stats: Some(format!("{{\"numRecords\":{rows}}}")),
                ..Default::default()
            }));
            let gone: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
            let operation = DeltaOperation::Optimize {
                predicate: None,
                target_size: size as i64,
            };
            let committed = self
                .commit_when(actions, operation, |live| {
                    gone.iter().all(|p| live.contains(p.as_str()))
                })
                .await?;
            tracing::info!(
                ?topic,
                ?date,
                ?hour,
                ?partition,
                files = files.len(),
                committed,
                "Compacted a partition-hour."
            );
            if committed {
                done.hours += 1;
                done.files_before += files.len();
                done.files_after += 1;
            } else {
                done.skipped += 1;
            }
        }
        Ok(done)
    }
}

impl Table {
    /// Reads a partition-hour's files and writes their rows as one new file; returns its path,
    /// size and row count.
    async fn rewrite(
        &self,
        store: &Arc<dyn ObjectStore>,
        files: &[SnapshotFile],
    ) -> Result<(String, u64, usize), StoreError> {
        use deltalake_core::parquet::arrow::ArrowWriter;
        use deltalake_core::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        use deltalake_core::parquet::basic::{Compression, ZstdLevel};
        use deltalake_core::parquet::file::properties::WriterProperties;
        let io = |op: &'static str, path: &str, e: &dyn std::fmt::Display| StoreError::Transient {
            op,
            location: format!("{}{path}", self.location),
            message: e.to_string(),
        };
        let bad = |path: &str, e: &dyn std::fmt::Display| StoreError::Permanent {
            op: "compact",
            location: format!("{}{path}", self.location),
            message: e.to_string(),
            hint: "a data file of the table is not the Parquet this processor writes".into(),
        };
        let mut writer: Option<ArrowWriter<Vec<u8>>> = None;
        let mut rows = 0;
        for f in files {
            let path = object_store::path::Path::from(f.path.as_str());
            let body = store
                .get(&path)
                .await
                .map_err(|e| io("GET", &f.path, &e))?
                .bytes()
                .await
                .map_err(|e| io("GET", &f.path, &e))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(body)
                .and_then(|b| b.build())
                .map_err(|e| bad(&f.path, &e))?;
            for batch in reader {
                let batch = batch.map_err(|e| bad(&f.path, &e))?;
                if writer.is_none() {
                    let props = WriterProperties::builder()
                        .set_compression(Compression::ZSTD(ZstdLevel::default()))
                        .build();
                    writer = Some(
                        ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props))
                            .map_err(|e| bad(&f.path, &e))?,
                    );
                }
                rows += batch.num_rows();
                if let Some(w) = writer.as_mut() {
                    w.write(&batch).map_err(|e| bad(&f.path, &e))?;
                }
            }
        }
        let first = &files[0];
        let body = match writer {
            Some(w) => w.into_inner().map_err(|e| bad(&first.path, &e))?,
            None => Vec::new(),
        };
        let dir = first.path.rsplit_once('/').map_or("", |(d, _)| d);
        let path = format!("{dir}/{}.parquet", uuid::Uuid::now_v7().simple());
        let size = body.len() as u64;
        store
            .put(&object_store::path::Path::from(path.as_str()), body.into())
            .await
            .map_err(|e| io("PUT", &path, &e))?;
        Ok((path, size, rows))
    }

    /// Commits `actions` on the latest snapshot if `still` holds for the snapshot's file paths
    /// (checked again after every conflict); false if it no longer does.
    async fn commit_when(
        &self,
        actions: Vec<Action>,
        operation: DeltaOperation,
        still: impl Fn(&std::collections::HashSet<String>) -> bool,
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
            if !still(&live) {
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

    pub(crate) async fn table(root: &Arc<dyn ObjectStore>) -> Table {
        Table::open_or_create(root.clone(), "bucket", "p/")
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
