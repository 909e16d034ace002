use clap::Parser as _;

// Every attempt allocates a few dozen small blocks (JWT decoding, the script
// call, the answer); glibc's malloc spent a fifth of the edge's CPU on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = seckill_edge::Config::parse();
    let _telemetry = platform::telemetry::init(seckill_edge::SERVICE, &config.telemetry)?;
    let listener = tokio::net::TcpListener::bind(&config.addr).await?;
    seckill_edge::run(config, listener, platform::shutdown::signal()).await
}
