use clap::Parser;
use ticket_producer::Args;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    if let Err(e) = ticket_kafka::load_dotenv() {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let args = Args::parse();
    ticket_kafka::init_logging();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(ticket_kafka::cancel_on_signal(shutdown.clone()));
    match ticket_producer::run(args, shutdown).await {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        // Said once, in the log's format when the logs are JSON.
        Err(e) => {
            if ticket_kafka::json_logs() {
                tracing::error!("{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
