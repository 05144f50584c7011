//! `report`: `reports/index.html` in the bucket (or the directory), a self-contained page of
//! the lake's figures, built with the same SQL tables as `query` and rendered by
//! [`page`] (pure). Run once, or with `--every N` to keep it current (the compose stack
//! runs it so); the streaming processor itself does not spend time on it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use futures::TryStreamExt;
use object_store::{
    Attribute, AttributeValue, Attributes, ObjectStore, ObjectStoreExt, PutOptions, PutPayload,
};
use ticket_core::checkpoint::Checkpoint;
pub mod page;

use self::page::{HourTypeCount, ReportData, TeamPriorityCount, render};
use tokio_util::sync::CancellationToken;

use crate::query::{Lake, Opened, open, run_sql};
use ticket_s3::S3Args;

/// Where the page goes, under the lake's root.
pub const REPORT_KEY: &str = "reports/index.html";

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Build the report of a local directory (a process-file --output-dir, or a copy of the
    /// bucket's prefix) instead of the bucket.
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// Write the page to this file instead of reports/index.html in the bucket (or directory).
    #[arg(long)]
    pub output: Option<PathBuf>,

    /// Keep the page current: rebuild it every this many seconds until stopped.
    #[arg(long, env = "REPORT_EVERY_SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub every: Option<u64>,

    #[command(flatten)]
    pub s3: S3Args,
}

/// Builds and writes the page once, or every `--every` seconds until `shutdown`.
pub async fn report(args: &ReportArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let lake = match &args.dir {
        Some(dir) => Lake::Dir(dir),
        None => Lake::Bucket(&args.s3),
    };
    loop {
        // A fresh session each time: DataFusion caches directory listings per session, and a
        // long-lived one would not see the objects written since.
        let written = match open(&lake).await {
            Ok(opened) => write_once(&opened, args).await,
            Err(e) => Err(e),
        };
        match written {
            Ok(target) => tracing::info!(%target, "Report written."),
            // Kept alive through an outage when it runs as a service.
            Err(e) if args.every.is_some() => {
                tracing::warn!(error = format!("{e:#}"), "Report not written; retrying.")
            }
            Err(e) => return Err(e),
        }
        let Some(every) = args.every else {
            return Ok(());
        };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(every)) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

async fn write_once(lake: &Opened, args: &ReportArgs) -> anyhow::Result<String> {
    // A process-file directory always has dead_letters/, empty when none were found.
    let counted_dir = args
        .dir
        .as_ref()
        .is_some_and(|d| d.join("dead_letters").is_dir());
    let data = gather(lake, counted_dir).await?;
    let page = render(&data);
    match &args.output {
        Some(path) => {
            std::fs::write(path, page)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(path.display().to_string())
        }
        None => {
            let key = lake.root.clone().join("reports").join("index.html");
            // Served as a web page (the MinIO console, a presigned URL), not as a download.
            let html = Attributes::from_iter([(
                Attribute::ContentType,
                AttributeValue::from("text/html; charset=utf-8"),
            )]);
            let options = PutOptions {
                // A local directory keeps no content type (its store refuses attributes).
                attributes: if args.dir.is_some() {
                    Attributes::new()
                } else {
                    html
                },
                ..PutOptions::default()
            };
            lake.store
                .put_opts(&key, PutPayload::from(page), options)
                .await
                .with_context(|| format!("writing {REPORT_KEY} in {}", lake.url))?;
            Ok(format!("{}{REPORT_KEY}", lake.url))
        }
    }
}

/// The figures of the page, from the lake's SQL tables and its checkpoints
/// (`dead_letters_dir`: the lake has a `dead_letters/` directory, so none there means 0).
pub async fn gather(lake: &Opened, dead_letters_dir: bool) -> anyhow::Result<ReportData> {
    let per_hour = run_sql(
        &lake.ctx,
        "SELECT CAST(date AS VARCHAR), CAST(hour AS BIGINT), request_type, count(*) \
         FROM tickets WHERE date IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .await?;
    let load = run_sql(
        &lake.ctx,
        "SELECT support_team, priority, count(*) FROM tickets GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .await?;
    let undated = run_sql(&lake.ctx, "SELECT count(*) FROM tickets WHERE date IS NULL").await?;
    let mut data = ReportData {
        title: "Support tickets".to_string(),
        source: lake.url.clone(),
        generated_at: chrono::Utc::now()
            .format("%Y-%m-%d %H:%M:%S UTC")
            .to_string(),
        dead_letters: dead_letters(lake).await?.or(dead_letters_dir.then_some(0)),
        per_hour: Vec::new(),
        load: Vec::new(),
        undated: undated
            .first()
            .and_then(|b| ints(b, 0).ok()?.first().copied())
            .unwrap_or(0) as u64,
    };
    for b in &per_hour {
        let (dates, hours, types, counts) = (text(b, 0)?, ints(b, 1)?, text(b, 2)?, ints(b, 3)?);
        for i in 0..b.num_rows() {
            data.per_hour.push(HourTypeCount {
                hour: format!("{} {:02}:00", dates[i], hours[i]),
                request_type: types[i].clone(),
                count: counts[i] as u64,
            });
        }
    }
    for b in &load {
        let (teams, priorities, counts) = (text(b, 0)?, text(b, 1)?, ints(b, 2)?);
        for i in 0..b.num_rows() {
            data.load.push(TeamPriorityCount {
                team: teams[i].clone(),
                priority: priorities[i].clone(),
                count: counts[i] as u64,
            });
        }
    }
    Ok(data)
}

/// Dead letters so far: the processor's checkpoints count them (a `process-file` directory
/// has them as lines under `dead_letters/`). `None` when neither is there.
async fn dead_letters(lake: &Opened) -> anyhow::Result<Option<u64>> {
    let mut total = None;
    let checkpoints = lake.root.clone().join("_checkpoints");
    let mut listing = lake.store.list(Some(&checkpoints));
    while let Some(meta) = listing.try_next().await.context("listing _checkpoints/")? {
        if meta.location.extension() != Some("json") {
            continue;
        }
        let bytes = lake.store.get(&meta.location).await?.bytes().await?;
        // Only this layout's checkpoints count (the write-check probe is not one).
        if let Ok(cp) = Checkpoint::from_json(&bytes) {
            *total.get_or_insert(0) += cp.dead_letters;
        }
    }
    let files = lake.root.clone().join("dead_letters");
    let mut listing = lake.store.list(Some(&files));
    while let Some(meta) = listing.try_next().await.context("listing dead_letters/")? {
        let bytes = lake.store.get(&meta.location).await?.bytes().await?;
        *total.get_or_insert(0) += bytes.iter().filter(|b| **b == b'\n').count() as u64;
    }
    Ok(total)
}

/// Column `i` as text (NULL as an empty string).
fn text(b: &RecordBatch, i: usize) -> anyhow::Result<Vec<String>> {
    let col = cast(b.column(i), &DataType::Utf8)?;
    let col = col.as_string::<i32>();
    Ok((0..col.len())
        .map(|r| {
            if col.is_null(r) {
                String::new()
            } else {
                col.value(r).to_string()
            }
        })
        .collect())
}

/// Column `i` as integers (NULL as 0).
fn ints(b: &RecordBatch, i: usize) -> anyhow::Result<Vec<i64>> {
    let col = cast(b.column(i), &DataType::Int64)?;
    let col = col.as_primitive::<Int64Type>();
    Ok((0..col.len()).map(|r| col.value(r)).collect())
}
