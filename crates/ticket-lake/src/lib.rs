//! `ticket-lake`: the reading side of the processor, and the same processing on a local file.
//! It needs no Kafka, and compiles apart from the streaming side (`ticket-stream`).
//!
//! - [`query`]: `query`, SQL over the results in the bucket or a directory;
//! - [`report`]: `report`, the lake's figures as a self-contained HTML page;
//! - [`file`]: `process-file`, a local JSON Lines file into the S3 layout in a directory.

pub mod compact;
mod delta;
pub mod file;
pub mod query;
pub mod report;

use std::path::PathBuf;

use ticket_engine::RoutingArgs;
use ticket_engine::output::OutputFormat;

#[derive(clap::Args, Debug)]
pub struct FileArgs {
    /// JSON Lines input, one ticket per line.
    pub input: PathBuf,
    /// Directory to write tickets_with_team/, counts_by_request_type/ and dead_letters/ into.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Format of the ticket files.
    #[arg(long, env = "OUTPUT_FORMAT", value_enum, default_value_t = OutputFormat::Jsonl)]
    pub output_format: OutputFormat,
    #[command(flatten)]
    pub routing: RoutingArgs,
}
