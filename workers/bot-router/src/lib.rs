//! The bot-router worker: answers customer messages of conversations in a bot state
//! (`fl.<tenant>.bot.<channel>`, from ingest; SPEC L2-L5).
//!
//! In `bot`, a message is tried against the hand-over keywords (L4), the tenant's keyword
//! rules in priority order ([`keywords`]), then the knowledge base ([`kb`]); nothing
//! matching gets the fallback reply (or, outside the channel's business hours ([`hours`]), its
//! closed message). A keyword rule may start a scripted flow ([`flow`], state `script`); a
//! channel may start every new conversation in one. A flow ends by completing the conversation
//! (L3) or handing it over with the skills it needs (L4, D4). A conversation idle with the bot
//! past its channel's `bot_idle_seconds` is completed. A message that arrives after the
//! conversation left the bot is not answered (L5). Each customer message is answered once,
//! in the order the customer sent it (the stream is partitioned like `FL_INBOUND`).

pub mod condition;
pub mod decide;
pub mod flow;
pub mod kb;
pub mod keywords;
pub mod setup;
mod store;
pub mod text;

/// Business hours moved to the shared crate (the API checks them too); kept under this path
/// for the benchmarks and tests that import it.
pub use firstline_shared::hours;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Transaction;
use firstline_shared::batch;
use firstline_shared::bus::Delivered;
use firstline_shared::config::CommonConfig;
use firstline_shared::db::{self, BotSays, Conversation, TenantSettings, Transition};
use firstline_shared::domain::{ChannelId, ConversationState, SkillSet, TenantId};
use firstline_shared::outbox::Outbox;
use firstline_shared::partitions::{self, PartitionSet};
use firstline_shared::place_in_line;
use firstline_shared::wire::{self, BotWork};
use firstline_shared::worker::Services;
use firstline_shared::{metrics, subjects, telemetry, HandleError};
use tokio_util::sync::CancellationToken;

use crate::decide::{BotAction, Context};
use crate::flow::{FlowNext, FlowOutcome, FlowPosition};
use crate::store::Caches;

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "firstline-bot-router",
    about = "Answers conversations in a bot state and hands them over"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
    /// How often idle bot conversations are looked for (seconds).
    #[arg(long, env = "FL_BOT_IDLE_SWEEP_SECS", default_value_t = 5.0)]
    pub idle_sweep_secs: f64,
}

impl Config {
    /// The defaults, with these common settings.
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            idle_sweep_secs: 5.0,
        }
    }
}

/// Consumes `FL_BOT` until `shutdown`, and completes idle bot conversations.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let services = Services::start(&config.common, &shutdown).await?;
    let caches = Caches::default();
    // Awaited by `services.close()`; it stops with the worker, after a failure too.
    services.spawn(sweep_idle(
        services.clone(),
        Duration::from_secs_f64(config.idle_sweep_secs.max(0.1)),
        services.stopping(),
    ));
    // A partition's messages in order, up to `partition_batch` at a time in one transaction.
    let result = partitions::consume(
        &services,
        &config.common,
        "bot-router",
        &[PartitionSet {
            stream: subjects::BOT,
            prefix: "bot-router-p",
        }],
        shutdown,
        |batch| handle_batch(&services, &caches, batch),
    )
    .await;
    services.close().await;
    result
}

/// Answers a partition's batch in one transaction ([`batch::in_one_transaction`], as ingest
/// does); the replies are published and counted after the commit.
async fn handle_batch(
    services: &Services,
    caches: &Caches,
    batch: Vec<Delivered>,
) -> Vec<Result<(), HandleError>> {
    let read = Read {
        caches,
        tenants: batch::Memo::default(),
        channels: batch::Memo::default(),
        locked: batch::Memo::default(),
        conversations: batch
            .iter()
            .filter_map(|m| conversation_key(m)?.parse().ok())
            .collect(),
    };
    let (results, answered) = batch::in_one_transaction(
        services,
        "bot-router",
        &batch,
        &read,
        conversation_key,
        |read, tx, outbox, m| Box::pin(async move { handle(tx, read, outbox, m).await.map(Some) }),
    )
    .await;
    for (tenant, source) in answered.into_iter().flatten() {
        metrics::bot_replied(tenant.as_str(), source);
    }
    results
}

/// What a batch's messages read: the worker's caches, and the settings of the batch's tenants
/// and channels, read once per batch.
struct Read<'a> {
    caches: &'a Caches,
    tenants: batch::Memo<TenantId, Option<Arc<TenantSettings>>>,
    channels: Channels,
    /// The lock of the batch's conversations, taken once, in their order, before any message
    /// locks its own ([`db::lock_conversations_in_order`]).
    locked: batch::Memo<(), ()>,
    conversations: Vec<uuid::Uuid>,
}

/// The settings of a batch's channels, read once per batch.
type Channels = batch::Memo<(TenantId, ChannelId), Arc<store::ChannelBot>>;

/// The conversation a bot work message is for: one conversation's messages are answered in
/// order, different conversations' side by side.
fn conversation_key(m: &Delivered) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct For {
        conversation_id: uuid::Uuid,
    }
    let work: For = serde_json::from_slice(&m.payload).ok()?;
    Some(work.conversation_id.to_string())
}

/// One bot work message in the batch's transaction (`tx` is its savepoint). Returns what
/// answered, for the metrics, when it was answered.
async fn handle(
    tx: &Transaction<'_>,
    read: &Read<'_>,
    outbox: &mut Outbox,
    m: &Delivered,
) -> Result<Option<(TenantId, &'static str)>, HandleError> {
    let tenant =
        TenantId::parse(m.tenant_token()).map_err(|e| HandleError::poison(e.to_string()))?;
    let work: BotWork = wire::decode(&m.payload)?;
    telemetry::record_ids(Some(&tenant), None, Some(&work.conversation_id), None);
    read.locked
        .get((), || {
            db::lock_conversations_in_order(tx, &read.conversations)
        })
        .await?;
    let settings = read
        .tenants
        .get(tenant.clone(), || async {
            Ok::<_, tokio_postgres::Error>(db::tenant_settings(tx, &tenant).await?.map(Arc::new))
        })
        .await?;
    let Some(settings) = settings else {
        return Err(HandleError::poison(format!("unknown tenant {tenant:?}")));
    };
    let Some(conversation) = db::conversation_for_update(tx, &tenant, work.conversation_id).await?
    else {
        return Err(HandleError::poison(format!(
            "conversation {} of tenant {tenant} does not exist",
            work.conversation_id
        )));
    };
    if !conversation.state.is_bot() {
        // SPEC L5: it left the bot after this message was routed here.
        tracing::debug!(state = %conversation.state, "conversation left the bot; no reply");
        return Ok(None);
    }
    let Some(mark_stale) = store::claim_message(tx, work.message_id, conversation.id).await? else {
        tracing::info!(message = %work.message_id, "already answered");
        return Ok(None);
    };
    let mut turn = Turn {
        tx,
        caches: read.caches,
        channels: &read.channels,
        settings: &settings,
        conversation,
        outbox: Outbox::new(),
        says: Vec::new(),
        source: "fallback",
        mark_stale,
    };
    turn.run(&work).await?;
    let Turn {
        outbox: mut own,
        says,
        conversation,
        source,
        ..
    } = turn;
    for (i, s) in says.iter().enumerate() {
        let external_id = format!("bot-reply:{}:{i}", work.message_id);
        db::send_bot_message(tx, &mut own, &conversation, &external_id, s).await?;
    }
    if conversation.state == ConversationState::Waiting {
        // Handed over in this turn: after the hand-over reply, the place in line (README).
        let external_id = format!("place:{}", work.message_id);
        place_in_line::tell(tx, &mut own, &conversation, None, &external_id).await?;
    }
    outbox.append(own);
    Ok(Some((tenant, source)))
}

/// One customer message being answered, inside its transaction.
struct Turn<'a, 't> {
    tx: &'a Transaction<'t>,
    caches: &'a Caches,
    channels: &'a Channels,
    settings: &'a TenantSettings,
    conversation: Conversation,
    outbox: Outbox,
    says: Vec<BotSays>,
    /// What answered (for the metrics).
    source: &'static str,
    /// The conversation's bot activity mark is a second old or more ([`store::touch`]).
    mark_stale: bool,
}

impl Turn<'_, '_> {
    async fn run(&mut self, work: &BotWork) -> anyhow::Result<()> {
        let (tenant, channel) = (&self.conversation.tenant, &self.conversation.channel);
        let channel = self
            .channels
            .get((tenant.clone(), channel.clone()), || async {
                Ok::<_, anyhow::Error>(Arc::new(store::channel(self.tx, tenant, channel).await?))
            })
            .await?;
        let now = chrono::Utc::now();
        let (settings, channel_id) = (self.settings, self.conversation.channel.clone());
        let ctx = Context {
            channel: &channel_id,
            handover_keywords: &settings.handover_keywords,
            fallback_reply: &settings.bot_reply,
            handover_reply: &settings.handover_reply,
            kb_min_score: settings.kb_min_score,
            hours: channel.hours.as_ref(),
            after_hours: channel.after_hours,
            now,
        };
        let postback = work.postback.as_deref();
        let said = crate::condition::Said {
            text: &work.text,
            email: work.email.as_ref(),
        };
        let id = self.conversation.id;
        if self.conversation.state == ConversationState::Script {
            let state = store::flow_state(self.tx, id).await?;
            match (state.flow, state.step) {
                (Some((flow_id, version)), Some(step)) => {
                    let flow = self
                        .caches
                        .flow(self.tx, &self.conversation.tenant, &flow_id, Some(version))
                        .await?;
                    let Some((_, def)) = flow else {
                        anyhow::bail!("flow {flow_id} version {version} is gone");
                    };
                    if decide::is_handover(
                        decide::input(&work.text, postback),
                        ctx.handover_keywords,
                    ) {
                        // SPEC L4, mid-flow: with the flow's skills.
                        self.source = "handover";
                        let skills = decide::handover_skills(Some(def.handover_skills.clone()));
                        let queued = self.handover(&ctx, skills, false).await?;
                        if !queued {
                            store::save_flow(
                                self.tx,
                                id,
                                Some((&flow_id, version)),
                                Some(&step),
                                &state.vars,
                            )
                            .await?;
                        }
                        return Ok(());
                    }
                    self.source = "flow";
                    let at = FlowPosition {
                        step,
                        vars: state.vars,
                    };
                    let outcome = flow::answer(&def, at, said, postback);
                    return self.follow(&ctx, (&flow_id, version), outcome).await;
                }
                _ => {
                    // A new conversation of a channel with a welcome flow (SPEC L2).
                    if let Some(flow_id) = &channel.welcome_flow {
                        if let Some((version, def)) = self
                            .caches
                            .flow(self.tx, &self.conversation.tenant, flow_id, None)
                            .await?
                        {
                            self.source = "flow";
                            let outcome = flow::start(&def, said);
                            return self.follow(&ctx, (flow_id, version), outcome).await;
                        }
                        tracing::warn!(
                            flow = flow_id,
                            "welcome flow has no published version; the bot answers"
                        );
                    }
                    self.transition(ConversationState::Bot, "no_flow").await?;
                }
            }
        }
        let bot = self
            .caches
            .tenant(
                self.tx,
                &self.conversation.tenant,
                self.settings.bot_config_version,
            )
            .await?;
        match decide::decide_bot(&ctx, &bot, &work.text, postback) {
            BotAction::Reply { says, source } => {
                tracing::debug!(source = ?source, "bot reply");
                self.source = source.kind();
                self.says.push(says);
                self.touch().await?;
            }
            BotAction::Handover => {
                self.source = "handover";
                if !self.handover(&ctx, None, false).await? {
                    self.touch().await?;
                }
            }
            BotAction::StartFlow { says, flow, rule } => {
                self.says.extend(says);
                match self
                    .caches
                    .flow(self.tx, &self.conversation.tenant, &flow, None)
                    .await?
                {
                    Some((version, def)) => {
                        self.source = "flow";
                        let outcome = flow::start(&def, said);
                        self.follow(&ctx, (&flow, version), outcome).await?;
                    }
                    None => {
                        tracing::warn!(
                            rule,
                            flow,
                            "keyword rule starts a flow with no published version"
                        );
                        self.source = "fallback";
                        self.says.push(BotSays::text(ctx.fallback_reply));
                        self.touch().await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Marks the conversation active with the bot, when its mark is stale (a fresh one is
    /// left as it is: [`store::touch`]).
    async fn touch(&mut self) -> anyhow::Result<()> {
        if std::mem::take(&mut self.mark_stale) {
            store::touch(self.tx, self.conversation.id).await?;
        }
        Ok(())
    }

    /// Says what the flow said and goes where it went.
    async fn follow(
        &mut self,
        ctx: &Context<'_>,
        flow: (&str, i32),
        outcome: FlowOutcome,
    ) -> anyhow::Result<()> {
        let said = !outcome.says.is_empty();
        self.says.extend(outcome.says);
        let id = self.conversation.id;
        if let Some(weight) = outcome.weight {
            // SPEC D10: kept on the conversation; the dispatcher scores it when it is queued.
            store::set_weight(self.tx, id, weight).await?;
        }
        let vars = outcome.vars;
        match outcome.next {
            FlowNext::Wait(at) => {
                if self.conversation.state == ConversationState::Bot {
                    self.transition(ConversationState::Script, "flow_started")
                        .await?;
                }
                store::save_flow(self.tx, id, Some(flow), Some(&at.step), &at.vars).await?;
            }
            FlowNext::Handover(skills) => {
                // The answers stay on the conversation for the agent.
                store::save_flow(self.tx, id, Some(flow), None, &vars).await?;
                if !self
                    .handover(ctx, decide::handover_skills(skills), said)
                    .await?
                {
                    // Outside business hours and kept with the bot: the flow is over.
                    if self.conversation.state == ConversationState::Script {
                        self.transition(ConversationState::Bot, "flow_handover_after_hours")
                            .await?;
                    }
                    store::save_flow(self.tx, id, None, None, &vars).await?;
                }
            }
            FlowNext::End => {
                // SPEC L3: the bot finishes the conversation (keeping the answers).
                store::save_flow(self.tx, id, Some(flow), None, &vars).await?;
                self.transition(ConversationState::Completed, "flow_end")
                    .await?;
            }
        }
        Ok(())
    }

    /// SPEC L4 (with business hours): returns whether the conversation went to `waiting`.
    async fn handover(
        &mut self,
        ctx: &Context<'_>,
        skills: Option<SkillSet>,
        said: bool,
    ) -> anyhow::Result<bool> {
        let h = decide::handover(ctx, said);
        self.says.extend(h.says);
        if !h.queue {
            return Ok(false);
        }
        if let Some(skills) = &skills {
            store::require_skills(self.tx, self.conversation.id, skills).await?;
            self.conversation.required_skills = skills.clone();
        }
        self.transition(ConversationState::Waiting, h.reason)
            .await?;
        Ok(true)
    }

    async fn transition(&mut self, to: ConversationState, reason: &str) -> anyhow::Result<()> {
        db::transition(
            self.tx,
            &mut self.outbox,
            &mut self.conversation,
            Transition {
                to,
                agent: None,
                reason,
            },
        )
        .await
    }
}

/// Completes conversations idle with the bot past their channel's `bot_idle_seconds`, every
/// `every`, until `shutdown`. Instances share the work (locked rows are skipped).
async fn sweep_idle(services: Services, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match complete_idle(&services).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(completed = n, "idle bot conversations completed"),
            Err(e) => tracing::warn!("idle sweep failed, retrying: {e:#}"),
        }
    }
}

async fn complete_idle(services: &Services) -> anyhow::Result<usize> {
    let mut client = services.pool.get().await?;
    let tx = client.transaction().await?;
    let idle = store::idle_conversations(&tx, 500).await?;
    let mut outbox = Outbox::new();
    for (tenant, id) in &idle {
        let Some(mut conversation) = db::conversation_for_update(&tx, tenant, *id).await? else {
            continue;
        };
        db::transition(
            &tx,
            &mut outbox,
            &mut conversation,
            Transition {
                to: ConversationState::Completed,
                agent: None,
                reason: "bot_idle",
            },
        )
        .await?;
    }
    let staged = outbox.stage(&tx).await?;
    tx.commit().await?;
    staged.publish(&services.js, &client).await;
    Ok(idle.len())
}

impl firstline_shared::worker::WorkerConfig for Config {
    fn common(&self) -> &CommonConfig {
        &self.common
    }
}
