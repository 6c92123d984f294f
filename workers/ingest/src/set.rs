//! A partition's batch handled with set-based statements: a handful of statements for the
//! whole batch (its customers found or created and locked, their open conversations locked,
//! the missing ones opened with their history rows, every message stored) instead of four
//! to seven per message. It decides exactly what handling the messages one by one decides
//! (`crate::handle`); it declines a batch that needs what only that path does (a survey
//! answer), and fails (so the batch is handled again one message at a time, with savepoints)
//! on anything else it does not expect: a message that does not decode, an unknown channel,
//! a message stored already.

use std::collections::HashMap;

use anyhow::Context as _;
use deadpool_postgres::Transaction;
use firstline_shared::batch::Whole;
use firstline_shared::bus::{self, Delivered};
use firstline_shared::db::{self as shared_db, Conversation, Transition};
use firstline_shared::domain::{ChannelId, ConversationState, TenantId};
use firstline_shared::outbox::Outbox;
use firstline_shared::telemetry;
use firstline_shared::wire::{CustomerRef, InboundMessage};
use uuid::Uuid;

use crate::db::{self, CustomerKey, NewConversation, NewMessage};
use crate::{route_output, Channels, Route};

/// One decoded message of the batch.
struct Parsed<'a> {
    m: &'a Delivered,
    tenant: TenantId,
    channel: ChannelId,
    inbound: InboundMessage,
}

/// [`firstline_shared::batch::WholeFn`] of ingest.
pub fn handle_whole<'a>(
    channels: &'a Channels,
    tx: &'a Transaction<'a>,
    batch: &'a [Delivered],
) -> Whole<'a, ()> {
    Box::pin(handle(channels, tx, batch))
}

async fn handle(
    channels: &Channels,
    tx: &Transaction<'_>,
    batch: &[Delivered],
) -> anyhow::Result<Option<Vec<(Outbox, ())>>> {
    let parsed = batch
        .iter()
        .map(parse)
        .collect::<anyhow::Result<Vec<_>>>()?;

    // The channels' settings (read, nothing written yet: declining is still possible).
    let mut settings = HashMap::new();
    for p in &parsed {
        let key = (p.tenant.clone(), p.channel.clone());
        if settings.contains_key(&key) {
            continue;
        }
        let read = channels
            .get(key.clone(), || async {
                Ok::<_, tokio_postgres::Error>(
                    db::channel(tx, &p.tenant, &p.channel)
                        .await?
                        .map(std::sync::Arc::new),
                )
            })
            .await?
            .with_context(|| format!("unknown channel {:?} of tenant {:?}", p.channel, p.tenant))?;
        settings.insert(key, read);
    }
    let survey_answer = parsed.iter().any(|p| {
        settings[&(p.tenant.clone(), p.channel.clone())]
            .survey
            .as_ref()
            .is_some_and(|s| {
                s.rating(&p.inbound.text, p.inbound.postback.as_deref())
                    .is_some()
            })
    });
    if survey_answer {
        return Ok(None);
    }

    // The batch's customers, each once, in the order of their first message.
    let (keys, customer_of) = customers(
        parsed
            .iter()
            .map(|p| (&p.tenant, &p.channel, &p.inbound.customer)),
    );
    let stored = db::upsert_customers(tx, &keys).await?;

    // Their open conversations; the others' opened, one statement pair per channel.
    let ids: Vec<Uuid> = stored.iter().map(|c| c.id).collect();
    let mut open: HashMap<Uuid, Conversation> = db::open_conversations(tx, &ids)
        .await?
        .into_iter()
        .map(|c| (c.customer_id, c))
        .collect();
    let mut opening: HashMap<(TenantId, ChannelId), Vec<usize>> = HashMap::new();
    for (k, c) in stored.iter().enumerate() {
        if !open.contains_key(&c.id) {
            let key = (keys[k].tenant.clone(), keys[k].channel.clone());
            opening.entry(key).or_default().push(k);
        }
    }
    // The history row of each conversation opened here, by customer.
    let mut opened: HashMap<Uuid, (i64, chrono::DateTime<chrono::Utc>)> = HashMap::new();
    for ((tenant, channel), ks) in &opening {
        let channel_settings = &settings[&(tenant.clone(), channel.clone())];
        let state = initial_state(channel_settings);
        let new: Vec<NewConversation> = ks
            .iter()
            .map(|&k| NewConversation {
                id: Uuid::now_v7(),
                customer_id: stored[k].id,
            })
            .collect();
        let written =
            db::insert_conversations(tx, tenant, channel, state, channel_settings, &new).await?;
        for ((n, &k), (queued_at, transition, at)) in new.iter().zip(ks).zip(written) {
            opened.insert(stored[k].id, (transition, at));
            open.insert(
                stored[k].id,
                Conversation {
                    id: n.id,
                    tenant: tenant.clone(),
                    channel: channel.clone(),
                    customer_id: stored[k].id,
                    customer_external_id: keys[k].external_id.to_owned(),
                    customer_name: stored[k].name.clone(),
                    state,
                    agent_id: None,
                    required_skills: channel_settings.required_skills.clone(),
                    queued_at,
                },
            );
        }
    }

    // Every message, in the batch's order.
    let conversation_of = |i: usize| -> anyhow::Result<&Conversation> {
        open.get(&stored[customer_of[i]].id)
            .context("a customer of the batch has no conversation")
    };
    let mut messages = Vec::with_capacity(parsed.len());
    for (i, p) in parsed.iter().enumerate() {
        let conversation = conversation_of(i)?;
        messages.push(NewMessage {
            id: Uuid::now_v7(),
            conversation,
            inbound: &p.inbound,
            routed_to: Route::for_state(conversation.state).as_str(),
        });
    }
    let stored_messages = db::insert_customer_messages(tx, &messages).await?;
    anyhow::ensure!(
        stored_messages == messages.len() as u64,
        "{} of the batch's {} messages are stored already",
        messages.len() as u64 - stored_messages,
        messages.len()
    );

    // What each message publishes, staged in its own trace.
    let mut announced = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(parsed.len());
    for (p, new) in parsed.iter().zip(&messages) {
        let conversation = new.conversation;
        let span = bus::message_span("ingest", p.m);
        let outbox = span.in_scope(|| -> anyhow::Result<Outbox> {
            telemetry::record_ids(
                Some(&p.tenant),
                Some(&p.channel),
                Some(&conversation.id),
                conversation.agent_id.as_ref().map(|a| a as _),
            );
            let mut outbox = Outbox::new();
            if let Some(&(transition, at)) = opened.get(&conversation.customer_id) {
                // The first message of a conversation opened here announces it.
                if announced.insert(conversation.id) {
                    shared_db::stage_event(
                        &mut outbox,
                        conversation,
                        None,
                        Transition {
                            to: conversation.state,
                            agent: None,
                            reason: "new_conversation",
                        },
                        transition,
                        at,
                    );
                }
            }
            let route = Route::for_state(conversation.state);
            route_output(&mut outbox, conversation, route, new.id, &p.inbound)?;
            tracing::debug!(conversation = %conversation.id, route = route.as_str(), "inbound stored");
            Ok(outbox)
        })?;
        out.push((outbox, ()));
    }
    Ok(Some(out))
}

/// Decodes a message as `crate::handle` does (a poison one fails the batch over to it).
fn parse(m: &Delivered) -> anyhow::Result<Parsed<'_>> {
    let (tenant, channel, inbound) = crate::decode(m).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Parsed {
        m,
        tenant,
        channel,
        inbound,
    })
}

/// The state a new conversation of a channel starts in (SPEC L2).
pub fn initial_state(settings: &db::ChannelSettings) -> ConversationState {
    if settings.bot_enabled && settings.welcome_flow {
        ConversationState::Script
    } else if settings.bot_enabled {
        ConversationState::Bot
    } else {
        ConversationState::Waiting
    }
}

/// The batch's customers, each once in the order of their first message, with the name their
/// last message that gives one gives; and, per message, its customer's index.
fn customers<'a>(
    senders: impl Iterator<Item = (&'a TenantId, &'a ChannelId, &'a CustomerRef)>,
) -> (Vec<CustomerKey<'a>>, Vec<usize>) {
    let mut keys: Vec<CustomerKey<'a>> = Vec::new();
    let mut index: HashMap<(&TenantId, &ChannelId, &str), usize> = HashMap::new();
    let mut of = Vec::new();
    for (tenant, channel, customer) in senders {
        let k = *index
            .entry((tenant, channel, customer.id.as_str()))
            .or_insert_with(|| {
                keys.push(CustomerKey {
                    tenant,
                    channel,
                    external_id: &customer.id,
                    name: None,
                });
                keys.len() - 1
            });
        if let Some(name) = &customer.name {
            keys[k].name = Some(name);
        }
        of.push(k);
    }
    (keys, of)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_customer_once_in_first_message_order_with_the_last_name_given() {
        let t = TenantId::parse("t").unwrap();
        let (c, d) = (
            ChannelId::parse("c").unwrap(),
            ChannelId::parse("d").unwrap(),
        );
        let who = |id: &str, name: Option<&str>| CustomerRef {
            id: id.into(),
            name: name.map(Into::into),
        };
        let batch = [
            (&c, who("u2", None)),
            (&c, who("u1", Some("Ann"))),
            (&d, who("u2", None)),
            (&c, who("u2", Some("Bo"))),
            (&c, who("u1", None)),
            (&c, who("u2", Some("Bob"))),
        ];
        let (keys, of) = customers(batch.iter().map(|(ch, cu)| (&t, *ch, cu)));
        let seen: Vec<(&str, &str, Option<&str>)> = keys
            .iter()
            .map(|k| (k.channel.as_str(), k.external_id, k.name))
            .collect();
        // The same customer id on another channel is another customer.
        assert_eq!(
            seen,
            vec![
                ("c", "u2", Some("Bob")),
                ("c", "u1", Some("Ann")),
                ("d", "u2", None)
            ]
        );
        assert_eq!(of, vec![0, 1, 2, 0, 1, 0]);
    }
}
