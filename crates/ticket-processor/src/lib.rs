//! `ticket-processor`: consumes tickets, adds `support_team`, aggregates with DataFusion and
//! writes JSON Lines or Parquet to S3 exactly once; and reads the results back (`query`, `report`).
//! This crate is the command line only; the work is in crates that compile apart, so an edit
//! on one side does not recompile the other:
//!
//! - `ticket-stream`: the streaming side (consumer loop, dead letters, replay-dlq, health and
//!   metrics);
//! - `ticket-lake`: the reading side (query, report, process-file);
//! - `ticket-output`: the output, chosen at start (`OUTPUT_FORMAT`), over one crate per
//!   destination: `ticket-objects`, `ticket-delta` (feature `delta`, on by default);
//! - `ticket-commit`: what every output shares (the committer trait, retries, fault points);
//! - `ticket-engine`: enrich, counts with DataFusion, the encodings (JSON Lines, Parquet);
//! - `ticket-s3`: the S3 adapter and the object store interface of the committers.
//!
//! Where each part lives:
//!
//! | part | crate and module |
//! | --- | --- |
//! | consumer loop, partitions, writers, dead letters, drain, counts | `ticket_stream::stream` |
//! | the commit protocol every output implements, its driver, retries | `ticket_commit` |
//! | the choice of output, and each output's place | `ticket_output` |
//! | exactly-once objects: checkpoints, upgrade from 0.1.0 | `ticket_objects` |
//! | the Delta table: log, committer, totals, reader, backfill, `compact` | `ticket_delta` |
//! | `replay-dlq` | `ticket_stream::replay` |
//! | health and Prometheus metrics | `ticket_stream::{http, metrics}` |
//! | object store interface, in-memory store for tests | `ticket_s3::store` |
//! | S3 adapter | `ticket_s3` |
//! | bytes to rows, counts with DataFusion, output formats | `ticket_engine::{enrich, aggregate, output}` |
//! | `process-file`, `query`, `report` | `ticket_lake::{file, query, report}` |

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
pub use ticket_lake::FileArgs;
use ticket_lake::{query, report};
#[cfg(feature = "delta")]
use ticket_output::compact;
pub use ticket_stream::RunArgs;
use ticket_stream::replay;

#[derive(clap::Parser, Debug)]
#[command(
    name = "ticket-processor",
    version,
    about = "Consume support tickets, route them to teams, aggregate with DataFusion, write JSON Lines or Parquet to S3 exactly once; query and report on the results.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Process a JSON Lines file into the S3 layout under a local directory (no services needed).
    ProcessFile(FileArgs),
    /// Re-inject dead letters into the tickets topic after a fix, each exactly once.
    ReplayDlq(replay::ReplayArgs),
    /// Run SQL over the results (tables `tickets` and `counts`) in the bucket or a directory.
    Query(query::QueryArgs),
    /// Write reports/index.html (charts of tickets per hour, load per team) into the bucket or
    /// a directory; once, or every --every seconds.
    Report(report::ReportArgs),
    /// The Delta table's maintenance (OUTPUT_FORMAT=delta): rewrite each old enough hour of a
    /// partition into one file, then delete the files no snapshot needs.
    #[cfg(feature = "delta")]
    Compact(compact::CompactArgs),
    /// Exit 0 if the processor on this host answers ready at HTTP_ADDR (the image's HEALTHCHECK;
    /// needs no curl or shell in the image).
    HealthCheck {
        /// Address the processor serves health on; an unspecified IP (0.0.0.0) means this host.
        #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:9090")]
        http_addr: SocketAddr,
    },
}

/// GETs `/health/ready` from the processor at `addr`; Ok if it answers 200.
pub async fn health_check(mut addr: SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /health/ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).await?;
        anyhow::Ok(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .with_context(|| format!("no answer from {addr} within 5 s"))?
        .with_context(|| format!("cannot reach the processor's health endpoint at {addr}"))?;
    if reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        bail!("not ready: {}", reply.lines().next().unwrap_or_default())
    }
}

/// Buffers of 1 MiB and more (a batch's JSON body, its Arrow columns, an upload's request)
/// are given back to the system when freed, instead of staying in glibc's heaps.
///
/// glibc raises its mmap threshold each time such a buffer is freed (up to 32 MiB), after which
/// batch-sized buffers come from heaps that it returns to the system only from the top, so a
/// drain's peak RSS grew by the buffers of several batches. Fixed at 1 MiB, a 1M-ticket drain
/// peaks 7-8 MiB lower (BENCHMARKS.md, "Backfills by the hour, and peak memory").
/// `MALLOC_MMAP_THRESHOLD_` in the environment, glibc's own setting, is left to win.
#[allow(unsafe_code)]
pub fn return_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets a parameter of the allocator; called before any batch.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
    }
}
