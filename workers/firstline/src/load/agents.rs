//! The simulated agents of a load run: ready at the start, they accept offers after a delay,
//! reply and close; and the reader of what the system sends the simulated gateways.

use super::*;

/// Publishes every simulated agent's presence (ready) and starts the agents; they act until
/// `stop`.
pub(super) async fn start_agents(
    client: &async_nats::Client,
    js: &jetstream::Context,
    opts: &LoadOptions,
    counters: Arc<Counters>,
    owed: Arc<Mutex<Owed>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    for t in 0..opts.tenants {
        let tenant = opts.tenant(t);
        let mut notes = client.subscribe(format!("fl.{tenant}.notify.*")).await?;
        let (js2, counters, owed, stop2) =
            (js.clone(), counters.clone(), owed.clone(), stop.clone());
        let (accept_delay, close_after) = (opts.accept_delay, opts.close_after);
        let tenant2 = tenant.clone();
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = stop2.cancelled() => return,
                    m = notes.next() => match m { Some(m) => m, None => return },
                };
                let now = Instant::now();
                let Some(agent) = m
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|a| AgentId::parse(a).ok())
                else {
                    continue;
                };
                let Ok(note) = wire::decode::<AgentNotification>(&m.payload) else {
                    continue;
                };
                let conversation_id = note.conversation_id;
                match note.kind {
                    NotificationKind::Offer { customer, .. } => {
                        counters.offers.fetch_add(1, Ordering::Relaxed);
                        {
                            let mut o = owed.lock().unwrap();
                            if let Some(since) =
                                o.offers.remove(&format!("{tenant2}/{}", customer.id))
                            {
                                // Direct customers' ids start with `d`, hand-overs' with `h`.
                                let first = customer.id.starts_with('d');
                                o.record(Kind::Direct, since, now, first);
                            }
                        }
                        let (js, tenant, counters) =
                            (js2.clone(), tenant2.clone(), counters.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(accept_delay).await;
                            if crate::demo::act(
                                &js,
                                &tenant,
                                &agent,
                                AgentActionKind::Accept { conversation_id },
                            )
                            .await
                            .is_ok()
                            {
                                counters.accepts.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                    NotificationKind::Assigned { .. } => {
                        let (js, tenant, counters) =
                            (js2.clone(), tenant2.clone(), counters.clone());
                        tokio::spawn(async move {
                            let text = format!("您好，我是 {agent}，很高興為您服務！");
                            if crate::demo::act(
                                &js,
                                &tenant,
                                &agent,
                                AgentActionKind::Reply {
                                    conversation_id,
                                    text,
                                },
                            )
                            .await
                            .is_ok()
                            {
                                counters.agent_replies.fetch_add(1, Ordering::Relaxed);
                            }
                            tokio::time::sleep(close_after).await;
                            if crate::demo::act(
                                &js,
                                &tenant,
                                &agent,
                                AgentActionKind::Close { conversation_id },
                            )
                            .await
                            .is_ok()
                            {
                                counters.closes.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                    _ => {}
                }
            }
        });
        for a in 0..opts.agents {
            let agent = opts.agent(a);
            let presence = AgentPresence {
                version: Version,
                status: AgentStatus::Ready,
                reason: None,
                capacity: Some(opts.capacity.max(0) as u32),
                skills: None,
                display_name: None,
            };
            bus::publish(
                js,
                subjects::presence(&tenant, &agent),
                &Uuid::now_v7().to_string(),
                Default::default(),
                wire::encode(&AgentPresenceMessage::from(presence)),
            )
            .await?;
        }
    }
    Ok(())
}

/// Reads the bot's replies (and the agents') on every load tenant's `outbound` subjects.
pub(super) async fn read_outbound(
    client: &async_nats::Client,
    opts: &LoadOptions,
    counters: Arc<Counters>,
    owed: Arc<Mutex<Owed>>,
    handovers: Arc<Mutex<HashMap<String, ()>>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    for t in 0..opts.tenants {
        let tenant = opts.tenant(t);
        let mut sub = client.subscribe(format!("fl.{tenant}.outbound.*")).await?;
        let (counters, owed, handovers) = (counters.clone(), owed.clone(), handovers.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = sub.next() => match m { Some(m) => m, None => return },
                };
                let now = Instant::now();
                let Ok(o) = wire::decode::<OutboundMessage>(&m.payload) else {
                    continue;
                };
                if o.author != Author::Bot || o.text.starts_with(PLACE_MARK) {
                    continue;
                }
                counters.replies.fetch_add(1, Ordering::Relaxed);
                let channel = m.subject.rsplit('.').next().unwrap_or_default();
                let key = format!("{tenant}/{channel}/{}", o.customer_id);
                let kind = if handovers.lock().unwrap().remove(&key).is_some() {
                    Kind::Handover
                } else {
                    Kind::Bot
                };
                let mut owed = owed.lock().unwrap();
                let since = owed.replies.get_mut(&key).and_then(|q| q.pop_front());
                if let Some(since) = since {
                    owed.record(kind, since, now, true);
                }
            }
        });
    }
    Ok(())
}
