//! `OUTPUT_FORMAT=delta`: the [`Committer`] of a partition whose batches go into the Delta
//! table ([`ticket_delta`] says how the table's log makes them exactly once).
//!
//! A batch's Parquet files are written first, under unique names; then the partition's part
//! joins the processor's next table commit ([`GroupCommit`]) with the partition's version
//! (the batch's last offset). Recovery reads the version back: everything up to it is in the
//! table, so a new owner resumes after it. Nothing is ever rebuilt from Kafka: a batch is
//! either in the table with all its files or not in it at all.

use std::sync::Arc;

use anyhow::anyhow;
use bytes::Bytes;
use ticket_delta::{DataFile, GroupCommit, Outcome, Part, Table};
use ticket_s3::store::{Expect, SharedStore};

use crate::retry::Retrier;
use crate::sink::{Batch, Committer, Failure, Plan, failpoint};

/// What the partitions' committers share: the table, its group commit, and where its files go.
#[derive(Clone)]
pub struct TableSink {
    pub table: Arc<Table>,
    pub group: GroupCommit,
    /// The table's root as a key prefix of the bucket (`{S3_PREFIX}tables/tickets_with_team/`).
    pub root: String,
    pub topic: String,
}

/// One partition's committer to the table.
pub struct TableCommitter {
    sink: TableSink,
    store: SharedStore,
    partition: i32,
    retry: Retrier,
    /// The partition's version in the table as this owner knows it: the last offset in it.
    expected: Option<i64>,
}

/// A batch's files, named, not written yet.
pub struct PreparedFiles {
    last: i64,
    files: Vec<(DataFile, Bytes)>,
}

impl TableCommitter {
    pub fn new(sink: TableSink, store: SharedStore, partition: i32, retry: Retrier) -> Self {
        TableCommitter {
            sink,
            store,
            partition,
            retry,
            expected: None,
        }
    }
}

impl Committer for TableCommitter {
    type Prepared = PreparedFiles;

    async fn recover(&mut self) -> Result<Plan, Failure> {
        let (table, topic, partition) = (&self.sink.table, &self.sink.topic, self.partition);
        self.expected = self
            .retry
            .run("read the Delta table", || {
                table.version_of(topic, partition)
            })
            .await?;
        Ok(Plan::Resume {
            at: self.expected.map_or(0, |v| v + 1),
        })
    }

    fn prepare(&self, batch: Batch) -> PreparedFiles {
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
            .collect();
        PreparedFiles {
            last: batch.last,
            files,
        }
    }

    async fn commit(&mut self, batches: Vec<PreparedFiles>) -> Result<(), Failure> {
        for batch in batches {
            for (file, body) in &batch.files {
                let key = format!("{}{}", self.sink.root, file.path);
                let store = &self.store;
                self.retry
                    .run("write a Delta data file", || {
                        store.put(&key, body.clone(), Expect::Any)
                    })
                    .await?;
            }
            let part = Part {
                topic: self.sink.topic.clone(),
                partition: self.partition,
                expected: self.expected,
                version: batch.last,
                files: batch.files.into_iter().map(|(f, _)| f).collect(),
            };
            failpoint("before-table-commit", self.partition).await;
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
            match outcome {
                Outcome::Committed => self.expected = Some(batch.last),
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
        }
        Ok(())
    }

    async fn complete(&mut self, _rebuilt: PreparedFiles) -> Result<(), Failure> {
        Err(Failure::Fatal(anyhow!(
            "the Delta table's committer never asks for a range to be read again"
        )))
    }
}

/// The committer `OUTPUT_FORMAT` chose for a partition.
// One per owned partition, moved once: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum AnyCommitter {
    Objects(crate::sink::ObjectCommitter),
    Table(TableCommitter),
}

/// A batch prepared by an [`AnyCommitter`].
pub enum AnyPrepared {
    Objects(crate::sink::PreparedBatch),
    Table(PreparedFiles),
}

impl AnyPrepared {
    fn objects(self) -> Option<crate::sink::PreparedBatch> {
        match self {
            AnyPrepared::Objects(b) => Some(b),
            AnyPrepared::Table(_) => None,
        }
    }

    fn files(self) -> Option<PreparedFiles> {
        match self {
            AnyPrepared::Table(b) => Some(b),
            AnyPrepared::Objects(_) => None,
        }
    }
}

impl Committer for AnyCommitter {
    type Prepared = AnyPrepared;

    async fn recover(&mut self) -> Result<Plan, Failure> {
        match self {
            AnyCommitter::Objects(c) => c.recover().await,
            AnyCommitter::Table(c) => c.recover().await,
        }
    }

    fn prepare(&self, batch: Batch) -> AnyPrepared {
        match self {
            AnyCommitter::Objects(c) => AnyPrepared::Objects(c.prepare(batch)),
            AnyCommitter::Table(c) => AnyPrepared::Table(c.prepare(batch)),
        }
    }

    async fn commit(&mut self, batches: Vec<AnyPrepared>) -> Result<(), Failure> {
        // A committer only ever gets the batches it prepared.
        match self {
            AnyCommitter::Objects(c) => {
                let batches = batches.into_iter().filter_map(AnyPrepared::objects);
                c.commit(batches.collect()).await
            }
            AnyCommitter::Table(c) => {
                let batches = batches.into_iter().filter_map(AnyPrepared::files);
                c.commit(batches.collect()).await
            }
        }
    }

    async fn complete(&mut self, rebuilt: AnyPrepared) -> Result<(), Failure> {
        match (self, rebuilt) {
            (AnyCommitter::Objects(c), AnyPrepared::Objects(b)) => c.complete(b).await,
            (AnyCommitter::Table(c), AnyPrepared::Table(b)) => c.complete(b).await,
            _ => Err(Failure::Fatal(anyhow!(
                "a batch prepared by another committer"
            ))),
        }
    }
}
