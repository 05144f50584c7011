//! `OUTPUT_FORMAT=delta`: the valid tickets with their team as a Delta Lake table in the
//! bucket, `{S3_PREFIX}tables/tickets_with_team/`, partitioned by `topic`, `date`, `hour` (of
//! the Kafka timestamp, as the object layout) and Kafka `partition`.
//!
//! The table's log is the commit point. Each commit carries, per Kafka partition it covers, a
//! transaction action: app id `{topic}-{partition}` (not the consumer group: any group that
//! writes the table takes part in the same exactly-once), version = the last offset the
//! commit covers, dead letters included. A partition's new owner reads its version from the
//! table and resumes after it. [`Table::commit`] checks, on every attempt and against the
//! snapshot it commits on, that each partition's version is still the one its owner expects
//! (the crate's own conflict checker only looks at commits after the snapshot a commit
//! started from): a stale owner is fenced, never adds rows twice; a commit whose answer was
//! lost is recognised because its versions are in the table when it is tried again.
//!
//! Data files are written before the commit under unique names; a file no commit refers to
//! (its writer crashed or was fenced) is never read, and `VACUUM` removes it.
//!
//! Everything Delta is in this crate, behind `ticket-output`'s `delta` feature (on by default):
//! - [`table`]: the log, the group commit, compaction and vacuum; no Kafka, no batches;
//! - [`maintain`]: a processor's background compaction of its partitions' closed hours, and
//!   the deletion of the files compactions replaced; [`metrics`]: its figures;
//! - [`committer`]: a partition's [`Committer`](ticket_commit::Committer), which turns
//!   batches into [`Part`]s, and the check that judges its failures;
//! - [`totals`]: the counts, a GROUP BY over the snapshot's files;
//! - [`read`]: the snapshot as a DataFusion table, for `query` and `report`;
//! - [`backfill`]: `process-file --output-format delta`, through the same committer;
//! - [`compact`]: the `compact` command.

pub mod backfill;
pub mod committer;
pub mod compact;
pub mod maintain;
pub mod metrics;
pub mod read;
pub mod table;
pub mod totals;
mod upkeep;

use std::sync::Arc;

use anyhow::Context;
use ticket_commit::retry::{BucketCheck, Check};
use ticket_commit::{Committer, Destination, Retrier, Totals};
use ticket_core::keys::Layout;
use ticket_s3::store::SharedStore;

pub use committer::{TableCheck, TableCommitter, TableSink};
pub use maintain::{Maintainer, MaintenanceArgs, Replaced};
pub use table::*;

/// The Delta table as an output: what it gives the stream (committers, totals, the check that
/// judges a failed request), opened (or created) once at start.
#[derive(Clone)]
pub struct Delta {
    pub sink: TableSink,
    pub store: SharedStore,
    pub prefix: String,
}

impl Delta {
    /// Opens the table of the bucket under `layout`'s prefix, created if there is none, with
    /// the processor's group commit. Its log is read and written without retries of its own:
    /// the committers' [`Retrier`] retries.
    pub async fn open(
        s3: &ticket_s3::S3Args,
        layout: &Layout,
        store: SharedStore,
        creation: &Creation,
        maintenance: &MaintenanceArgs,
    ) -> anyhow::Result<Delta> {
        let table = Table::open_or_create(
            ticket_s3::object_store(s3, ticket_s3::Retries::Caller).await?,
            &s3.bucket,
            layout.prefix(),
            creation,
            maintenance.table_maintenance,
        )
        .await
        .context("opening the Delta table (OUTPUT_FORMAT=delta)")?;
        tracing::info!(table = %table.location(), version = table.version().await, "Writing to the Delta table.");
        let table = Arc::new(table);
        let replaced = Replaced::default();
        let maintainer = maintenance.table_maintenance.then(|| {
            Maintainer::spawn(
                table.clone(),
                layout.topic().to_string(),
                maintenance,
                replaced.clone(),
            )
        });
        Ok(Delta {
            sink: TableSink {
                group: GroupCommit::spawn(table.clone()),
                table,
                root: format!("{}{TABLE_DIR}", layout.prefix()),
                topic: layout.topic().to_string(),
                counted: Default::default(),
                replaced,
                maintainer,
            },
            store,
            prefix: layout.prefix().to_string(),
        })
    }
}

impl Destination for Delta {
    /// Partition `partition`'s [`TableCommitter`].
    fn committer(&self, partition: i32, retry: Retrier) -> Box<dyn Committer> {
        Box::new(TableCommitter::new(
            self.sink.clone(),
            self.store.clone(),
            partition,
            retry,
        ))
    }

    /// A GROUP BY over the snapshot's files.
    fn totals(&self) -> Box<dyn Totals> {
        Box::new(totals::TableTotals::new(self.sink.clone()))
    }

    /// The table's maintenance figures.
    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.sink.table.metrics.register(registry);
    }

    /// The bucket, then the table read again from its log.
    fn check(&self) -> Arc<dyn Check> {
        Arc::new(TableCheck {
            bucket: BucketCheck::new(self.store.clone(), &self.prefix),
            table: self.sink.table.clone(),
        })
    }
}
