//! The `cxfed` binary: parse the command line, start logging, run.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cxfed::cli::Cli::parse();
    let default = match cli.command {
        cxfed::cli::Command::Serve { .. } => "info",
        #[cfg(feature = "ballista")]
        cxfed::cli::Command::Scheduler { .. } | cxfed::cli::Command::Executor { .. } => "info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_env("CXFED_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(cxfed::cli::run(cli))
}
