use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = seckill_edge::Config::parse();
    let _telemetry = platform::telemetry::init(seckill_edge::SERVICE, &config.telemetry)?;
    let listener = tokio::net::TcpListener::bind(&config.addr).await?;
    seckill_edge::run(config, listener, platform::shutdown::signal()).await
}
