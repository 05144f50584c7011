//! `ticket-lake`: the reading side of the processor, and the same processing on a local file.
//! It needs no Kafka, and compiles apart from the streaming side (`ticket-stream`).
//!
//! - [`query`]: `query`, SQL over the results in the bucket or a directory;
//! - [`report`]: `report`, the lake's figures as a self-contained HTML page;
//! - [`file`]: `process-file`, a local JSON Lines file into the S3 layout in a directory, or
//!   into the bucket's Delta table.

pub mod compact;
mod delta;
pub mod file;
pub mod query;
pub mod report;

use std::path::PathBuf;

use ticket_engine::RoutingArgs;
use ticket_engine::output::OutputFormat;
use ticket_s3::S3Args;

#[derive(clap::Args, Debug)]
pub struct FileArgs {
    /// JSON Lines input, one ticket per line.
    pub input: PathBuf,
    /// Directory to write tickets_with_team/, counts_by_request_type/ and dead_letters/ into.
    /// Tickets go under tickets_with_team/date=YYYY-MM-DD/hour=HH/ by the UTC hour of their
    /// created_at (a time without an offset is UTC): a file has no Kafka timestamps. A file
    /// in time order gets one file per hour; sort one that is not, for fewer, larger files.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Format of the ticket files: jsonl or parquet in --output-dir, or delta: also appended
    /// to the bucket's Delta table (the S3 settings below; where OUTPUT_FORMAT=delta streams
    /// go), once per file: a rerun of the same file adds nothing.
    #[arg(long, env = "OUTPUT_FORMAT", value_enum, default_value_t = FileOutput::Jsonl)]
    pub output_format: FileOutput,
    #[command(flatten)]
    pub routing: RoutingArgs,
    #[command(flatten)]
    pub s3: S3Args,
}

/// Where `process-file` puts the tickets.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileOutput {
    Jsonl,
    Parquet,
    Delta,
}

impl FileOutput {
    /// The format of the files in `--output-dir` (the table's are Parquet).
    pub fn files(self) -> OutputFormat {
        match self {
            FileOutput::Jsonl => OutputFormat::Jsonl,
            FileOutput::Parquet | FileOutput::Delta => OutputFormat::Parquet,
        }
    }
}
