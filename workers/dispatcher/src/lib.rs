//! The dispatcher worker: offers queued conversations to agents (SPEC D) and applies the
//! agents' actions in the order they sent them: accept, decline, reply, close (SPEC L7, L8)
//! and transfer.
//!
//! It consumes the waiting-queue stream (`fl.<tenant>.queue.*`), the agent-presence stream
//! (`fl.<tenant>.presence.<agent>`) and the agent actions (`fl.<tenant>.agent.<agent>.action`),
//! in batches of what is already delivered. For each tenant of a batch, one transaction holds
//! the tenant's advisory lock (one writer per tenant across all instances), applies the
//! batch's events in order, and runs one dispatch pass ([`pass()`]): expire offers past their
//! dispatch cycle (D8), load the ready agents and the heads of the queue they can serve, decide
//! with [`plan::plan`] (pure), write the offers. What the consumers and the timer hand in for
//! a tenant while its transaction runs is combined into the next one (one lock wait, one pass).
//! Offer deadlines are kept by a timer, not by polling; a slow backstop sweep catches tenants a
//! dead instance left behind.
//!
//! Where each part is:
//! - `events`: the messages of the three streams, parsed into a tenant's events;
//! - `dispatcher`: [`Dispatcher`], a batch grouped by tenant, and the tenant's transaction;
//! - `combiner`: what a tenant's consumers and timers hand in, combined into its transactions;
//! - `actions`: accept (SPEC L7), decline, close (SPEC L8) and transfer;
//! - `reply`: an agent's reply, stored and sent to the customer in the actions' order;
//! - `pass`: the dispatch pass (SPEC D1-D9) around the pure [`plan`];
//! - `timers`: the offer-deadline timer (SPEC D8), the backstop, the conversation-count sampler;
//! - [`db`]: the SQL.

mod actions;
mod combiner;
pub mod db;
mod dispatcher;
mod events;
mod pass;
pub mod plan;
pub mod queue;
mod reply;
mod timers;

pub use dispatcher::Dispatcher;
pub use pass::{pass, PassReport};

use std::time::Duration;

use firstline_shared::bus::{self, ConsumerSpec};
use firstline_shared::config::CommonConfig;
use firstline_shared::subjects;
use firstline_shared::worker::Services;
use tokio_util::sync::CancellationToken;

use crate::events::Source;
use crate::timers::sample_conversations;

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "firstline-dispatcher",
    about = "Offers queued conversations to agents"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
    /// Most messages of one stream handled in one batch (one pass per tenant per batch).
    #[arg(long, env = "FL_DISPATCH_BATCH", default_value_t = 256)]
    pub batch: usize,
    /// Seconds between backstop sweeps for tenants left with due offers or an idle queue.
    #[arg(long, env = "FL_DISPATCH_BACKSTOP_SECS", default_value_t = 10)]
    pub backstop_secs: u64,
}

impl Config {
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            batch: 256,
            backstop_secs: 10,
        }
    }
}

/// Consumes the waiting-queue, presence and action streams until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let services = Services::start(&config.common, &shutdown).await?;
    let dispatcher = Dispatcher::new(services.clone());
    let consumer = ConsumerSpec::new;
    let js = &services.js;
    let common = &config.common;
    let batch = config.batch;
    let consume = |source: Source, stream, durable| {
        let dispatcher = dispatcher.clone();
        bus::consume_batched(
            js,
            common,
            consumer(stream, durable),
            batch,
            shutdown.clone(),
            move |msgs| {
                let dispatcher = dispatcher.clone();
                async move { dispatcher.on_batch(source, msgs).await }
            },
        )
    };
    let queue = consume(Source::Queue, subjects::QUEUE, "dispatcher-queue");
    let presence = consume(Source::Presence, subjects::PRESENCE, "dispatcher-presence");
    let actions = consume(Source::Actions, subjects::ACTIONS, "dispatcher-actions");
    let timers = dispatcher.deadline_timer(shutdown.clone());
    // The sampler has its own token, a child of `shutdown`, so that it also stops when a
    // consumer fails to start; it is awaited before the pool closes.
    let sampling = shutdown.child_token();
    let sampler = tokio::spawn(sample_conversations(
        services.pool.clone(),
        sampling.clone(),
    ));
    let backstop = dispatcher.backstop(Duration::from_secs(config.backstop_secs), shutdown);
    let result = tokio::try_join!(queue, presence, actions, async {
        tokio::join!(timers, backstop);
        Ok(())
    })
    .map(|_| ());
    sampling.cancel();
    if let Err(e) = sampler.await {
        tracing::warn!("conversation sampler: {e}");
    }
    services.close().await;
    result
}

impl firstline_shared::worker::WorkerConfig for Config {
    fn common(&self) -> &CommonConfig {
        &self.common
    }
}
