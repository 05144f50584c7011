//! `compact`: the Delta table's maintenance (`OUTPUT_FORMAT=delta`). Each processor commit
//! adds one small file per partition and hour; this rewrites the hours that are old enough
//! into one file each and deletes what no snapshot needs any more. Safe beside running
//! processors: see [`crate::Table::compact`] and [`crate::Table::vacuum`].

use std::time::Duration;

use anyhow::Context;
use ticket_s3::S3Args;

#[derive(clap::Args, Debug)]
pub struct CompactArgs {
    /// Rewrite the hours that ended at least this many hours ago (a partition's files of
    /// one hour become one file). Tickets with late Kafka timestamps may still arrive in any
    /// hour: the rewrite is an ordinary commit beside the writers, never a loss.
    #[arg(long, env = "COMPACT_OLDER_THAN_HOURS", default_value_t = 2)]
    pub older_than_hours: u64,

    /// A partition-hour's files are made one, or files of about this size when they add up
    /// to more (the processors' background compaction uses the same setting).
    #[arg(long, env = "COMPACT_TARGET_MB", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub target_mb: u64,

    /// Then delete files that no snapshot of the last this many hours needs: files replaced
    /// by a compaction, and files no commit refers to (a writer killed before its commit).
    /// Keep it longer than any S3 outage a processor may sit out before committing, and than
    /// any query (0 is only safe with every processor stopped).
    #[arg(long, env = "VACUUM_RETAIN_HOURS", default_value_t = 168)]
    pub vacuum_retain_hours: u64,

    /// Compact only; delete nothing.
    #[arg(long)]
    pub no_vacuum: bool,

    #[command(flatten)]
    pub s3: S3Args,
}

pub async fn compact(args: &CompactArgs) -> anyhow::Result<()> {
    ticket_s3::Store::connect(&args.s3)
        .await?
        .check_reachable()
        .await?;
    let store = ticket_s3::object_store(&args.s3, ticket_s3::Retries::Client).await?;
    let prefix = ticket_core::keys::Layout::new(&args.s3.prefix, "")
        .prefix()
        .to_string();
    let Some(table) = crate::Table::open(store, &args.s3.bucket, &prefix).await? else {
        anyhow::bail!(
            "no Delta table at s3://{}/{prefix}{} (the processor creates it with OUTPUT_FORMAT=delta)",
            args.s3.bucket,
            crate::TABLE_DIR
        );
    };
    let before = chrono::Utc::now() - chrono::Duration::hours(args.older_than_hours as i64);
    let done = table
        .compact(before, args.target_mb.saturating_mul(1024 * 1024))
        .await
        .context("compacting the Delta table")?;
    println!(
        "compacted {} files into {} ({} MiB written; {} skipped: compacted by another run meanwhile)",
        done.files_before,
        done.files_after,
        done.bytes >> 20,
        done.skipped
    );
    if !args.no_vacuum {
        let deleted = table
            .vacuum(Duration::from_secs(args.vacuum_retain_hours * 3600))
            .await
            .context("vacuuming the Delta table")?;
        println!(
            "vacuum deleted {deleted} files older than {} hours that no snapshot needs",
            args.vacuum_retain_hours
        );
    }
    Ok(())
}
