//! `query`: DataFusion SQL over the results, in the bucket (with the processor's own S3
//! settings) or in a local directory (`process-file`'s output, or a copy of the bucket).
//!
//! Two tables:
//!
//! - `tickets`: every ticket object under `tickets_with_team/`, JSON Lines and Parquet alike,
//!   with the columns of [`ticket_engine::output::ticket_schema`] and the partition columns `topic`,
//!   `date` (DATE), `hour` (INT) and `partition` (INT) read from the keys. Objects written
//!   before time partitions (`topic=…/partition=…/`) have NULL `date` and `hour`; a
//!   `process-file` directory has NULL `topic` and `partition`, and the hour of each ticket's
//!   `created_at` (an earlier version's flat directory: NULL in all four).
//!   With `OUTPUT_FORMAT=delta`, the Delta table's rows are in it too: the data files of the
//!   table's snapshot as the query starts (`ticket_delta::read`, through
//!   `ticket_output::register_readers`), never a file of a commit not made.
//! - `counts`: `counts_by_request_type/latest.jsonl` (empty when it does not exist yet).
//!
//! The S3 side goes through DataFusion's own object store (`object_store`'s S3 client), given
//! the region, endpoint and credentials the processor resolves (the AWS default chain).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::ValueEnum;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::prelude::{JsonReadOptions, SQLOptions, SessionContext};
use object_store::{ObjectStore, ObjectStoreExt};

use ticket_engine::output::{OutputFormat, ticket_schema};
use ticket_s3::S3Args;

#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// The SQL to run, e.g. "SELECT request_type, count(*) FROM tickets GROUP BY 1".
    pub sql: String,

    /// Read a local directory (a process-file --output-dir, or a copy of the bucket's prefix)
    /// instead of the bucket.
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// How to print the result: an aligned table, JSON Lines (one object per row) or CSV.
    #[arg(long, value_enum, default_value_t = Print::Table)]
    pub format: Print,

    #[command(flatten)]
    pub s3: S3Args,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Print {
    Table,
    Json,
    Csv,
}

/// A query DataFusion rejected or could not run: its message, for exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadQuery(pub DataFusionError);

/// Where the results are.
pub enum Lake<'a> {
    Dir(&'a Path),
    Bucket(&'a S3Args),
}

/// Runs `args.sql` and prints the result on stdout.
pub async fn query(args: &QueryArgs) -> anyhow::Result<()> {
    let lake = match &args.dir {
        Some(dir) => Lake::Dir(dir),
        None => Lake::Bucket(&args.s3),
    };
    let lake = open(&lake).await?;
    let batches = run_sql(&lake.ctx, &args.sql).await?;
    print!("{}", render(&batches, args.format)?);
    Ok(())
}

/// Plans and runs a read-only query (no DDL, no `COPY` or `INSERT` into the lake); what
/// DataFusion rejects is a [`BadQuery`], a failure to read the objects is not.
pub async fn run_sql(ctx: &SessionContext, sql: &str) -> anyhow::Result<Vec<RecordBatch>> {
    let read_only = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx
        .sql_with_options(sql, read_only)
        .await
        .map_err(BadQuery)?;
    match df.collect().await {
        Ok(batches) => Ok(batches),
        Err(e) if is_read_failure(&e) => Err(anyhow::Error::from(e).context("reading the results")),
        Err(e) => Err(BadQuery(e).into()),
    }
}

/// The store, the network or an object's content failed, not the SQL.
fn is_read_failure(e: &DataFusionError) -> bool {
    use datafusion::arrow::error::ArrowError;
    match e.find_root() {
        DataFusionError::ObjectStore(_)
        | DataFusionError::ParquetError(_)
        | DataFusionError::IoError(_)
        | DataFusionError::External(_) => true,
        DataFusionError::ArrowError(a, _) => matches!(
            a.as_ref(),
            ArrowError::ExternalError(_)
                | ArrowError::IoError(..)
                | ArrowError::JsonError(_)
                | ArrowError::ParquetError(_)
        ),
        _ => false,
    }
}

/// The result as text in the chosen form.
pub fn render(batches: &[RecordBatch], print: Print) -> anyhow::Result<String> {
    use datafusion::arrow::{csv, json, util::pretty};
    Ok(match print {
        Print::Table => format!("{}\n", pretty::pretty_format_batches(batches)?),
        Print::Json => {
            let mut w = json::LineDelimitedWriter::new(Vec::new());
            w.write_batches(&batches.iter().collect::<Vec<_>>())?;
            w.finish()?;
            String::from_utf8(w.into_inner())?
        }
        Print::Csv => {
            let mut w = csv::Writer::new(Vec::new());
            for b in batches {
                w.write(b)?;
            }
            String::from_utf8(w.into_inner())?
        }
    })
}

/// The lake opened for reading: a DataFusion session with its tables, and its store.
pub struct Opened {
    pub ctx: SessionContext,
    pub store: Arc<dyn ObjectStore>,
    /// Where the layout starts in `store` (the bucket's prefix, or the directory's path).
    pub root: object_store::path::Path,
    /// The same as a URL, for people: `s3://bucket/prefix/` or `file:///dir/`.
    pub url: String,
}

/// A session with the `tickets` and `counts` tables of the lake registered.
pub async fn open(lake: &Lake<'_>) -> anyhow::Result<Opened> {
    let ctx = SessionContext::new();
    let (url, store, root): (String, Arc<dyn ObjectStore>, object_store::path::Path) = match lake {
        Lake::Dir(dir) => {
            let dir = std::fs::canonicalize(dir)
                .with_context(|| format!("no directory {}", dir.display()))?;
            let path = object_store::path::Path::from_filesystem_path(&dir)
                .with_context(|| format!("{} cannot be read as a directory", dir.display()))?;
            // Percent-encoded (a directory name may hold spaces or `%`).
            let url = url::Url::from_directory_path(&dir)
                .map_err(|()| anyhow::anyhow!("{} is not an absolute path", dir.display()))?
                .to_string();
            let store = Arc::new(object_store::local::LocalFileSystem::new());
            (url, store, path)
        }
        Lake::Bucket(args) => {
            // First through the AWS SDK, whose errors say what to fix (endpoint, region,
            // credentials, an untrusted certificate); object_store's retries end in a bare
            // "error sending request".
            ticket_s3::Store::connect(args)
                .await?
                .check_reachable()
                .await?;
            let store = ticket_s3::object_store(args, ticket_s3::Retries::Client).await?;
            let bucket = url::Url::parse(&format!("s3://{}", args.bucket)).with_context(|| {
                format!("S3_BUCKET_NAME {:?} is not a bucket name", args.bucket)
            })?;
            ctx.register_object_store(&bucket, store.clone());
            let prefix = ticket_core::keys::Layout::new(&args.prefix, "")
                .prefix()
                .to_string();
            let root = object_store::path::Path::from(prefix.as_str());
            (format!("s3://{}/{prefix}", args.bucket), store, root)
        }
    };
    let readers = match lake {
        Lake::Bucket(args) => {
            ticket_output::register_readers(&ctx, &store, args, read_schema()).await?
        }
        Lake::Dir(_) => Vec::new(),
    };
    register_tickets(&ctx, &url, lake, &readers).await?;
    register_counts(&ctx, &url, &store).await?;
    Ok(Opened {
        ctx,
        store,
        root,
        url,
    })
}

const PARTITIONED: [(&str, DataType); 4] = [
    ("topic", DataType::Utf8),
    ("date", DataType::Date32),
    ("hour", DataType::Int32),
    ("partition", DataType::Int32),
];
const BEFORE_HOURS: [(&str, DataType); 2] =
    [("topic", DataType::Utf8), ("partition", DataType::Int32)];
/// `process-file`'s layout: no topic or partition, the hour of `created_at`.
const BY_HOUR: [(&str, DataType); 2] = [("date", DataType::Date32), ("hour", DataType::Int32)];

/// What a local directory's `tickets_with_team/` holds.
enum DirLayout {
    /// `date=…/hour=…/part-…`: a `process-file` run.
    Hours,
    /// Part files straight in it: a `process-file` run of an earlier version.
    Flat,
    /// `topic=…/…`: a copy of the bucket.
    Bucket,
}

fn dir_layout(tickets: &Path) -> DirLayout {
    let mut flat = false;
    for e in std::fs::read_dir(tickets).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && e.file_name().to_string_lossy().starts_with("date=") {
            return DirLayout::Hours;
        }
        flat = flat
            || p.is_file()
                && p.extension().is_some_and(|x| {
                    OutputFormat::value_variants()
                        .iter()
                        .any(|f| x == f.extension())
                });
    }
    if flat {
        DirLayout::Flat
    } else {
        DirLayout::Bucket
    }
}

/// `tickets`: the union of one listing table per layout and format that can be present.
async fn register_tickets(
    ctx: &SessionContext,
    root: &str,
    lake: &Lake<'_>,
    readers: &[&str],
) -> anyhow::Result<()> {
    let dir = format!("{root}tickets_with_team/");
    let layouts: Vec<&[(&str, DataType)]> = match lake {
        Lake::Dir(d) => match dir_layout(&d.join("tickets_with_team")) {
            DirLayout::Hours => vec![&BY_HOUR],
            DirLayout::Flat => vec![&[]],
            DirLayout::Bucket => vec![&PARTITIONED, &BEFORE_HOURS],
        },
        Lake::Bucket(_) => vec![&PARTITIONED, &BEFORE_HOURS],
    };
    let mut selects = Vec::new();
    for (i, cols) in layouts.iter().enumerate() {
        for &output in OutputFormat::value_variants() {
            let ext = output.extension();
            let format: Arc<dyn FileFormat> = match output {
                OutputFormat::Jsonl => Arc::new(JsonFormat::default()),
                OutputFormat::Parquet => Arc::new(ParquetFormat::default()),
            };
            let name = format!("tickets_{ext}_{i}");
            let options = ListingOptions::new(format)
                .with_file_extension(format!(".{ext}"))
                .with_table_partition_cols(
                    cols.iter()
                        .map(|(n, t)| (n.to_string(), t.clone()))
                        .collect(),
                );
            let url = ListingTableUrl::parse(&dir)?;
            let config = ListingTableConfig::new(url)
                .with_listing_options(options)
                .with_schema(read_schema());
            ctx.register_table(name.as_str(), Arc::new(ListingTable::try_new(config)?))?;
            let part = |col: &str, t: &DataType| {
                if cols.iter().any(|(n, _)| *n == col) {
                    format!("\"{col}\"")
                } else {
                    format!("CAST(NULL AS {}) AS \"{col}\"", sql_type(t))
                }
            };
            let partition_cols: Vec<String> = PARTITIONED.iter().map(|(n, t)| part(n, t)).collect();
            selects.push(format!(
                "SELECT ticket_id, client_id, created_at, request, request_type, priority, support_team, {} FROM {name}",
                partition_cols.join(", ")
            ));
        }
    }
    for table in readers {
        selects.push(format!(
            "SELECT ticket_id, client_id, created_at, request, request_type, priority, support_team, {} FROM {table}",
            PARTITIONED.iter().map(|(n, _)| format!("\"{n}\"")).collect::<Vec<_>>().join(", ")
        ));
    }
    ctx.sql(&format!(
        "CREATE VIEW tickets AS {}",
        selects.join(" UNION ALL ")
    ))
    .await?;
    Ok(())
}

/// The ticket columns as `query` reads them: [`ticket_schema`] with its strings as views.
/// Parquet's dictionary pages then decode without copying every string, and DataFusion
/// groups and compares strings of up to 12 bytes (request types, priorities) inline
/// (BENCHMARKS.md, "The fetch stall and view-typed strings": what it did to a GROUP BY).
fn read_schema() -> SchemaRef {
    let schema = ticket_schema(true);
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8 => f.as_ref().clone().with_data_type(DataType::Utf8View),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

fn sql_type(t: &DataType) -> &'static str {
    match t {
        DataType::Date32 => "DATE",
        DataType::Int32 => "INT",
        _ => "VARCHAR",
    }
}

/// `counts`: the latest counts, or an empty table of their main columns before there are any.
async fn register_counts(
    ctx: &SessionContext,
    root: &str,
    store: &Arc<dyn ObjectStore>,
) -> anyhow::Result<()> {
    let url = ListingTableUrl::parse(format!("{root}counts_by_request_type/latest.jsonl"))?;
    // Empty (no valid ticket yet) reads as absent: nothing to infer the columns from.
    let exists = match store.head(url.prefix()).await {
        Ok(meta) => meta.size > 0,
        Err(object_store::Error::NotFound { .. }) => false,
        Err(e) => {
            return Err(anyhow::Error::from(e).context(format!(
                "cannot read {url} (check S3_ENDPOINT, S3_BUCKET_NAME, AWS_REGION and the credentials)"
            )));
        }
    };
    if exists {
        let options = JsonReadOptions::default().file_extension(".jsonl");
        ctx.register_json("counts", url.as_str(), options).await?;
    } else {
        let schema = Arc::new(Schema::new(vec![
            Field::new("request_type", DataType::Utf8, true),
            Field::new("count", DataType::Int64, true),
            Field::new("support_team", DataType::Utf8, true),
        ]));
        ctx.register_table("counts", Arc::new(MemTable::try_new(schema, vec![vec![]])?))?;
    }
    Ok(())
}
