//! `ticket-output`: the output, chosen once at start from `OUTPUT_FORMAT`. Each destination is
//! a crate of its own (`ticket-objects`, `ticket-delta` behind the `delta` feature) and is
//! reached only through this crate: the stream takes its committers, totals and failure check
//! from [`Output`] (a `ticket_commit::Destination`), `query` and `report` its reader
//! ([`register_readers`]), `process-file` its backfill ([`backfill`]).
//!
//! The encoding ([`OutputFormat`]: JSON Lines, Parquet) is another notion: the object layout
//! writes either; the table writes Parquet.
//!
//! A new destination (Iceberg, say) is a crate beside `ticket-delta` that implements
//! `ticket_commit::Destination` (a `Committer` per partition, its `Totals`, its `Check`), a
//! variant of [`OutputSetting`] and its arm in [`Output::open`]; if it has a reader or takes
//! backfills, a line in [`register_readers`] and an arm in [`backfill`] (README, "Adding an
//! output").

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::prelude::SessionContext;
use ticket_commit::Destination;
use ticket_core::keys::Layout;
pub use ticket_engine::output::OutputFormat;
use ticket_s3::store::SharedStore;

/// `OUTPUT_FORMAT`: where the valid tickets go.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputSetting {
    /// JSON Lines objects (the default; what the MinIO console shows best).
    Jsonl,
    /// Parquet objects (typed columns, compressed).
    Parquet,
    /// A Delta Lake table of Parquet files, committed through the table's log.
    #[cfg(feature = "delta")]
    Delta,
}

impl OutputSetting {
    /// The format the tickets are encoded in.
    pub fn encoding(self) -> OutputFormat {
        match self {
            OutputSetting::Jsonl => OutputFormat::Jsonl,
            OutputSetting::Parquet => OutputFormat::Parquet,
            #[cfg(feature = "delta")]
            OutputSetting::Delta => OutputFormat::Parquet,
        }
    }
}

/// `compact`: the table's maintenance command.
#[cfg(feature = "delta")]
pub use ticket_delta::compact;
/// The table's properties at creation, and the processors' upkeep of it.
#[cfg(feature = "delta")]
pub use ticket_delta::{Creation as TableCreation, MaintenanceArgs as TableMaintenance};

/// Without the table, nothing to set.
#[cfg(not(feature = "delta"))]
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TableCreation {}

/// Without the table, nothing to set.
#[cfg(not(feature = "delta"))]
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TableMaintenance {}

/// The output the processor writes to, opened at start: the stream sees only its
/// [`Destination`] (committers, totals, check).
#[derive(Clone)]
pub struct Output(Arc<dyn Destination>);

/// What the stream's output is made with, as the object layout records it per batch.
pub struct Opening<'a> {
    pub setting: OutputSetting,
    pub s3: &'a ticket_s3::S3Args,
    pub layout: &'a Layout,
    pub store: SharedStore,
    /// [`ticket_core::Routing::digest`] of the routing table in use.
    pub routing: String,
    /// The table's properties if it is created, and its upkeep.
    pub creation: &'a TableCreation,
    pub maintenance: &'a TableMaintenance,
}

impl Output {
    /// An output of a destination opened elsewhere (a test's).
    pub fn new(destination: Arc<dyn Destination>) -> Output {
        Output(destination)
    }

    /// The output `OUTPUT_FORMAT` names, opened (a table is created if there is none). The one
    /// `match` a new destination adds an arm to.
    pub async fn open(o: Opening<'_>) -> anyhow::Result<Output> {
        let encoding = o.setting.encoding();
        let destination: Arc<dyn Destination> = match o.setting {
            OutputSetting::Jsonl | OutputSetting::Parquet => Arc::new(ticket_objects::Objects {
                store: o.store,
                layout: o.layout.clone(),
                made_with: ticket_objects::MadeWith {
                    format: encoding.extension(),
                    routing: o.routing,
                    encoding: ticket_engine::output::ENCODING_VERSION,
                },
            }),
            #[cfg(feature = "delta")]
            OutputSetting::Delta => Arc::new(
                ticket_delta::Delta::open(o.s3, o.layout, o.store, o.creation, o.maintenance)
                    .await?,
            ),
        };
        Ok(Output(destination))
    }
}

impl std::ops::Deref for Output {
    type Target = dyn Destination;

    fn deref(&self) -> &(dyn Destination + 'static) {
        self.0.as_ref()
    }
}

/// The readers of the outputs that hold data of their own beside the objects, for `query` and
/// `report`: each registered under its name (read with `schema`) if the bucket has it. The
/// objects themselves are read by listing (`ticket-lake`'s `query`), as a directory is.
pub async fn register_readers(
    ctx: &SessionContext,
    store: &Arc<dyn object_store::ObjectStore>,
    s3: &ticket_s3::S3Args,
    schema: SchemaRef,
) -> anyhow::Result<Vec<&'static str>> {
    let prefix = Layout::new(&s3.prefix, "").prefix().to_string();
    #[cfg(feature = "delta")]
    let delta =
        ticket_delta::read::register(ctx, "tickets_delta", store, &s3.bucket, &prefix, schema)
            .await?
            .then_some("tickets_delta");
    #[cfg(not(feature = "delta"))]
    let delta = {
        let _ = (ctx, store, prefix, schema);
        None
    };
    Ok(delta.into_iter().collect())
}

/// `process-file`'s last step for outputs that keep a copy of their own: `input`'s hour files
/// (`files()`, Parquet, with their hours) appended to the output `s3` names, through the same
/// committer and retries as the stream. Returns what to tell the user; `None` for the objects
/// (the files written are the result).
pub async fn backfill(
    setting: OutputSetting,
    input: &std::path::Path,
    files: impl FnOnce() -> anyhow::Result<Vec<(std::path::PathBuf, ticket_core::keys::Hour)>>,
    s3: &ticket_s3::S3Args,
    creation: &TableCreation,
) -> anyhow::Result<Option<String>> {
    match setting {
        OutputSetting::Jsonl | OutputSetting::Parquet => {
            let _ = (input, files, s3, creation);
            Ok(None)
        }
        #[cfg(feature = "delta")]
        OutputSetting::Delta => {
            let t = ticket_delta::backfill::into_table(input, files()?, s3, creation).await?;
            Ok(Some(if t.parts == 0 {
                "no valid ticket: nothing to append to the Delta table".to_string()
            } else if t.already() {
                format!(
                    "already in the Delta table as topic {:?}: nothing added (a changed file is another backfill)",
                    t.topic
                )
            } else {
                let resumed = match t.parts - t.committed {
                    0 => String::new(),
                    before => format!(", after {before} committed by an earlier run"),
                };
                let s = if t.committed == 1 { "" } else { "s" };
                format!(
                    "appended to the Delta table as topic {:?}: {} tickets in {} files, {} commit{s}{resumed}",
                    t.topic, t.tickets, t.files, t.committed
                )
            }))
        }
    }
}
