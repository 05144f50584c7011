//! `ticket-lake`: the reading side of the processor, and the same processing on a local file.
//! It needs no Kafka, and compiles apart from the streaming side (`ticket-stream`).
//!
//! - [`query`]: `query`, SQL over the results in the bucket or a directory;
//! - [`report`]: `report`, the lake's figures as a self-contained HTML page;
//! - [`file`]: `process-file`, a local JSON Lines file into the S3 layout in a directory (and,
//!   with `--output-format delta`, through the output's backfill into the bucket's table).

pub mod file;
pub mod query;
pub mod report;

use std::path::PathBuf;

use ticket_engine::RoutingArgs;
use ticket_output::OutputSetting;
use ticket_s3::S3Args;

#[derive(clap::Args, Debug)]
pub struct FileArgs {
    /// JSON Lines input, one ticket per line.
    pub input: PathBuf,
    /// Directory to write tickets_with_team/, counts_by_request_type/ and dead_letters/ into.
    /// Tickets go under tickets_with_team/date=YYYY-MM-DD/hour=HH/part-00000.* by the UTC hour
    /// of their created_at (a time without an offset is UTC): a file has no Kafka timestamps.
    /// One file per hour, whatever the order of the input.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// MiB of tickets the workers gather by hour, between them, before they spill them to
    /// disk (under --output-dir/.spill/, removed at the end): what bounds the run's memory.
    #[arg(long = "memory-mb", env = "PROCESS_FILE_MEMORY_MB", default_value_t = file::DEFAULT_MEMORY_MB, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub memory_mb: u64,
    /// Format of the ticket files: jsonl or parquet in --output-dir, or delta: also appended
    /// to the bucket's Delta table (the S3 settings below; where OUTPUT_FORMAT=delta streams
    /// go), once per file: a rerun of the same file adds nothing.
    #[arg(long, env = "OUTPUT_FORMAT", value_enum, default_value_t = OutputSetting::Jsonl)]
    pub output_format: OutputSetting,
    #[command(flatten)]
    pub routing: RoutingArgs,
    #[command(flatten)]
    pub s3: S3Args,
    #[command(flatten)]
    pub table: ticket_output::TableCreation,
}
