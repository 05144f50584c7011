use clap::Parser;
use ticket_processor::{Cli, Command};

#[tokio::main]
async fn main() {
    ticket_processor::return_large_buffers();
    if let Err(e) = ticket_kafka::load_dotenv() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let cli = Cli::parse();
    ticket_kafka::init_logging();
    let result = match cli.command {
        Some(Command::ProcessFile(args)) => process_file(args).await,
        Some(Command::ReplayDlq(args)) => ticket_stream::replay::replay_dlq(args).await.map(|r| {
            println!(
                "read {} dead letters: {} replayed, {} skipped by --reason-contains, {} duplicates",
                r.read, r.replayed, r.skipped, r.duplicates
            );
        }),
        Some(Command::Query(args)) => ticket_lake::query::query(&args).await,
        #[cfg(feature = "delta")]
        Some(Command::Compact(args)) => ticket_output::compact::compact(&args).await,
        Some(Command::Report(args)) => {
            let shutdown = tokio_util::sync::CancellationToken::new();
            tokio::spawn(ticket_kafka::cancel_on_signal(shutdown.clone()));
            ticket_lake::report::report(&args, shutdown).await
        }
        Some(Command::HealthCheck { http_addr }) => ticket_processor::health_check(http_addr).await,
        None => {
            // The signals and both deadlines live here: writing stops SHUTDOWN_TIMEOUT_SECS
            // after a signal, and the process is gone EXIT_GRACE later.
            let timeout = std::time::Duration::from_secs(cli.run.shutdown_timeout_secs);
            let shutdown = ticket_stream::Shutdown::with_deadline(timeout);
            tokio::spawn(ticket_kafka::cancel_on_signal(shutdown.stop.clone()));
            exit_after(
                shutdown.stop.clone(),
                timeout + ticket_stream::stream::EXIT_GRACE,
            );
            // Health and metrics are served for the life of the process, by it.
            let observed = ticket_stream::Observed::default();
            let http_stop = tokio_util::sync::CancellationToken::new();
            let result = async {
                let bound = ticket_stream::http::serve(
                    cli.run.http_addr,
                    observed.health.clone(),
                    observed.metrics.clone(),
                    http_stop.clone(),
                )
                .await?;
                tracing::info!(%bound, "Serving /health/live, /health/ready and /metrics.");
                ticket_stream::run(cli.run, observed, shutdown).await
            }
            .await;
            http_stop.cancel();
            result
        }
    };
    let code = match result {
        Ok(()) => 0,
        // A query DataFusion rejects is the user's to fix, like a bad flag: exit 2.
        Err(e) if e.is::<ticket_lake::query::BadQuery>() => {
            eprintln!("error: {e:#}");
            2
        }
        // Said once: in the log's format when the logs are JSON (a collector reads them),
        // else as a plain `error:` line.
        Err(e) => {
            if ticket_kafka::json_logs() {
                tracing::error!("{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            1
        }
    };
    // Exits here, with the runtime still up, rather than returning and tearing it down under
    // tasks still in flight: after a fatal error a Delta commit may still run on a blocking
    // thread, waiting on a task of the runtime (the Delta kernel's executor), and a teardown
    // drops that task, which made the kernel panic ("TokioMultiThreadExecutor has crashed").
    // Output is flushed by `exit`.
    std::process::exit(code)
}

/// Once a stop is requested, the process is gone `deadline` later whatever it still waits on
/// (closing the Kafka clients can block): nothing is lost, unwritten batches are processed
/// again on restart.
fn exit_after(shutdown: tokio_util::sync::CancellationToken, deadline: std::time::Duration) {
    tokio::spawn(async move {
        shutdown.cancelled().await;
        std::thread::spawn(move || {
            std::thread::sleep(deadline);
            tracing::error!(
                "Still stopping {} s after the signal; exiting now (nothing is lost: unwritten batches are processed again on restart).",
                deadline.as_secs()
            );
            std::process::exit(1);
        });
    });
}

async fn process_file(args: ticket_processor::FileArgs) -> anyhow::Result<()> {
    let routing = args.routing.load()?;
    let start = std::time::Instant::now();
    let aggregator = ticket_engine::aggregate::Aggregator::default();
    let r = ticket_lake::file::process_file(
        &args.input,
        &args.output_dir,
        &routing,
        &aggregator,
        args.output_format.encoding(),
        (args.memory_mb as usize) << 20,
    )
    .await?;
    println!(
        "{} lines: {} valid, {} invalid (see {}/dead_letters) in {:.2} s",
        r.lines,
        r.valid,
        r.invalid,
        args.output_dir.display(),
        start.elapsed().as_secs_f64()
    );
    let files = || ticket_lake::file::hour_files(&args.output_dir.join("tickets_with_team"));
    if let Some(said) = ticket_output::backfill(
        args.output_format,
        &args.input,
        files,
        &args.s3,
        &args.table,
    )
    .await?
    {
        println!("{said}");
    }
    Ok(())
}
