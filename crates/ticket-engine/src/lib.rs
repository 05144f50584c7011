//! `ticket-engine`: the processing both sides of the processor share, and nothing that talks
//! to Kafka or S3.
//!
//! - [`enrich`]: raw ticket bytes to output rows with their team;
//! - [`aggregate`]: the counts by request type, with DataFusion;
//! - [`output`]: the output formats, JSON Lines and Parquet;
//! - [`recycle`]: buffers given back by written batches, reused by the next ones;
//! - [`RoutingArgs`]: the routing table's setting (`ROUTING_FILE`).

pub mod aggregate;
pub mod enrich;
pub mod output;
pub mod recycle;

use std::path::PathBuf;

use anyhow::Context;
use ticket_core::Routing;

#[derive(clap::Args, Debug)]
pub struct RoutingArgs {
    /// JSON file replacing the request type -> team mapping:
    /// {"teams": {"technical": "Tech Support", ...}, "default_team": "General Support"}.
    #[arg(long, env = "ROUTING_FILE")]
    pub routing_file: Option<PathBuf>,
}

impl RoutingArgs {
    pub fn load(&self) -> anyhow::Result<Routing> {
        let Some(path) = &self.routing_file else {
            return Ok(Routing::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read ROUTING_FILE {}", path.display()))?;
        Routing::from_json(&text).with_context(|| format!("ROUTING_FILE {}", path.display()))
    }
}
