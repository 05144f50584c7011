use clap::Parser;
use ticket_producer::Args;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // A missing .env is normal (Docker, CI); a malformed one is not silently ignored.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("error: cannot read .env: {e}");
        return std::process::ExitCode::from(2);
    }
    let args = Args::parse();
    ticket_kafka::init_logging();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(ticket_producer::cancel_on_signal(shutdown.clone()));
    match ticket_producer::run(args, shutdown).await {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
