//! FIRST LINE routing in one process, and the commands around it: run every worker
//! together ([`run_all`]), load tenants, channels and agents from a file ([`setup`]), and the
//! demo ([`demo`]): a simulated gateway and simulated agents driving the real workers, and the
//! load generator ([`load`]).

pub mod dead_letters;
pub mod demo;
pub mod history;
pub mod load;
pub mod nats_config;
pub mod setup;

use firstline_shared::config::CommonConfig;
use tokio_util::sync::CancellationToken;

/// Runs ingest, bot-router, dispatcher and notifier in this process until `shutdown`.
/// Each keeps its own connections, exactly as when they run as separate processes.
pub async fn run_all(common: CommonConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Create the streams and schema once before four workers race to do it.
    firstline_shared::db::migrate(&common.database_url).await?;
    let ingest = firstline_ingest::run(
        firstline_ingest::Config {
            common: common.clone(),
        },
        shutdown.clone(),
    );
    let bot = firstline_bot_router::run(
        firstline_bot_router::Config::new(common.clone()),
        shutdown.clone(),
    );
    let dispatcher = firstline_dispatcher::run(
        firstline_dispatcher::Config::new(common.clone()),
        shutdown.clone(),
    );
    let notifier = firstline_notifier::run(firstline_notifier::Config { common }, shutdown.clone());
    let result = tokio::try_join!(ingest, bot, dispatcher, notifier).map(|_| ());
    if result.is_err() {
        shutdown.cancel();
    }
    result
}

/// [`run_all`] and, when `api` is set, the HTTP API (with the dashboard, agents' WebSockets
/// and webhooks) on that address.
pub async fn run_all_with_api(
    common: CommonConfig,
    api: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(listen) = api else {
        return run_all(common, shutdown).await;
    };
    let mut config = firstline_api::Config::new(common.clone());
    config.listen = listen;
    let workers = run_all(common, shutdown.clone());
    let api = firstline_api::run(config, shutdown.clone());
    let result = tokio::try_join!(workers, api).map(|_| ());
    if result.is_err() {
        shutdown.cancel();
    }
    result
}
