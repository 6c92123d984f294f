//! `firstline-webchat`: see the crate documentation.

use clap::Parser as _;
use firstline_shared::{shutdown, telemetry, worker};

fn main() -> anyhow::Result<()> {
    let config = firstline_webchat::Config::parse();
    worker::runtime(1)?.block_on(async move {
        let telemetry = telemetry::init("firstline-webchat")?;
        let result = firstline_webchat::run(config, shutdown::on_signals()).await;
        if let Err(e) = &result {
            tracing::error!("firstline-webchat failed: {e:#}");
        }
        telemetry.shutdown_async().await;
        result
    })
}
