//! `citypicks-dlq`: see the `dlq` crate.

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = dlq::Cli::parse();
    let _telemetry = match platform::telemetry::init(dlq::NAME, &cli.config.telemetry) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let login = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).ok();
    let operator = cli.config.operator(login);
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr());
    match dlq::run(&cli, &operator, &mut out, &mut err).await {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(error) => {
            eprintln!("error: {:#}", anyhow::Error::from(error));
            ExitCode::FAILURE
        }
    }
}
