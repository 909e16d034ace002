use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = projections::Config::parse();
    let _telemetry = platform::telemetry::init(projections::SERVICE, &config.telemetry)?;
    let listener = tokio::net::TcpListener::bind(&config.addr).await?;
    projections::run(config, listener, platform::shutdown::signal()).await
}
