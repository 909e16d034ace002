//! `citypicks-token`: prints a JWT for the local stack (`./dev token`).

use std::{io::Write as _, time::Duration};

use clap::Parser;
use platform::{
    config::AuthConfig,
    http::{JwtKeys, Role},
};

#[derive(Debug, Parser)]
#[command(about = "Print a JWT signed with JWT_SECRET")]
struct Config {
    /// The user id (`sub` claim).
    #[arg(long)]
    sub: String,
    /// customer, merchant or admin.
    #[arg(long)]
    role: Role,
    /// Lifetime of the token.
    #[arg(long, default_value_t = 24 * 3600)]
    ttl_secs: u64,
    #[command(flatten)]
    auth: AuthConfig,
}

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    // A token the services would refuse (401) helps nobody.
    platform::http::validate_sub(&config.sub)?;
    let token =
        JwtKeys::new(&config.auth.jwt_secret).issue(&config.sub, config.role, Duration::from_secs(config.ttl_secs))?;
    writeln!(std::io::stdout(), "{token}")?;
    Ok(())
}
