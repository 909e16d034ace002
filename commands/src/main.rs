use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = commands::Config::parse();
    let _telemetry = platform::telemetry::init(commands::SERVICE, &config.telemetry)?;
    let listener = tokio::net::TcpListener::bind(&config.addr).await?;
    commands::run(config, listener, platform::shutdown::signal()).await
}
