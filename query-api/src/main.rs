use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = query_api::Config::parse();
    let _telemetry = platform::telemetry::init(query_api::SERVICE, &config.telemetry)?;
    let listener = tokio::net::TcpListener::bind(&config.addr).await?;
    query_api::run(config, listener, platform::shutdown::signal()).await
}
