//! A desk's past for the load generator (`firstline load --history N`, and `scripts/bench e2e`):
//! completed conversations, each with its customer, messages, transitions and accepted offer,
//! spread over the last day, written straight into the database in a few set-based statements.
//!
//! A running desk has tables of that size, analyzed by autovacuum, and the plans Postgres
//! caches for the workers' prepared statements are made on them. A load run on a new
//! database instead has its plans made on tables of a few hundred rows (a sequential scan is
//! the cheapest way to find one row of three pages), kept while the tables grow to tens of
//! thousands of rows within a step shorter than autovacuum's nap: a pessimism no real desk
//! has, and the index sizes a real desk writes into are missing too.

use std::time::Instant;

use uuid::Uuid;

use crate::load::LoadOptions;

/// What [`seed`] wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct Seeded {
    pub conversations: u64,
    pub messages: u64,
    pub offers: u64,
    pub seconds: f64,
}

/// Writes `per_tenant` completed conversations for each of the load's tenants (which must be
/// configured), half on its bot channels, half on those without, over its agents; then
/// analyzes the tables, as autovacuum would have. Customers are new ones (`history-…`), so the
/// load's own customers are untouched. Run twice, it adds as much again.
pub async fn seed(
    database_url: &str,
    options: &LoadOptions,
    per_tenant: usize,
) -> anyhow::Result<Seeded> {
    let started = Instant::now();
    let mut seeded = Seeded::default();
    if per_tenant == 0 {
        return Ok(seeded);
    }
    let (mut client, connection) =
        tokio_postgres::connect(database_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    // Each run its own external ids: the messages' and customers' unique keys.
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let n = per_tenant as i64;
    let channels = options.channels.max(1) as i64;
    let agents = options.agents.max(1) as i64;
    for t in 0..options.tenants {
        let tenant = options.tenant(t);
        let tx = client.transaction().await?;
        // One row per past conversation: channel b<k> for even g, d<k> for odd; agent a<g mod
        // agents>; started t0, evenly over the last day.
        tx.execute(
            "CREATE TEMP TABLE history ON COMMIT DROP AS
             SELECT g, gen_random_uuid() AS customer_id, gen_random_uuid() AS conversation_id,
                    (CASE WHEN g % 2 = 0 THEN 'b' ELSE 'd' END) || ((g / 2) % $2::bigint) AS channel_id,
                    'a' || (g % $3::bigint) AS agent_id,
                    now() - interval '1 day' + make_interval(secs => g * 86000.0 / $1::bigint) AS t0
             FROM generate_series(0::bigint, $1::bigint - 1) AS g",
            &[&n, &channels, &agents],
        )
        .await?;
        let tenant = tenant.as_str();
        tx.execute(
            "INSERT INTO customers (id, tenant_id, channel_id, external_id, created_at)
             SELECT customer_id, $1, channel_id, 'history-' || $2 || '-' || g, t0 FROM history",
            &[&tenant, &tag],
        )
        .await?;
        seeded.conversations += tx
            .execute(
                "INSERT INTO conversations (id, tenant_id, channel_id, customer_id, state, agent_id,
                     closed_by, created_at, bot_at, queued_at, assigning_at, processing_at,
                     completed_at, updated_at, bot_active_at)
                 SELECT conversation_id, $1, channel_id, customer_id, 'completed', agent_id,
                        'closed_by_agent', t0,
                        CASE WHEN channel_id LIKE 'b%' THEN t0 END,
                        t0 + interval '10 s', t0 + interval '11 s', t0 + interval '12 s',
                        t0 + interval '300 s', t0 + interval '300 s', t0
                 FROM history",
                &[&tenant],
            )
            .await?;
        tx.execute(
            "INSERT INTO conversation_transitions (conversation_id, from_state, to_state, agent_id, reason, at)
             SELECT h.conversation_id, s.from_state, s.to_state, s.agent, s.reason, h.t0 + s.after
             FROM history h CROSS JOIN LATERAL (VALUES
                 (NULL, CASE WHEN h.channel_id LIKE 'b%' THEN 'bot' ELSE 'waiting' END, NULL, 'new_conversation', interval '0 s'),
                 ('bot', 'waiting', NULL, 'handover_keyword', interval '10 s'),
                 ('waiting', 'assigning', h.agent_id, 'offered', interval '11 s'),
                 ('assigning', 'processing', h.agent_id, 'accepted', interval '12 s'),
                 ('processing', 'completed', h.agent_id, 'closed_by_agent', interval '300 s')
             ) AS s(from_state, to_state, agent, reason, after)
             WHERE s.from_state IS DISTINCT FROM 'bot' OR h.channel_id LIKE 'b%'",
            &[],
        )
        .await?;
        seeded.messages += tx
            .execute(
                "INSERT INTO messages (id, tenant_id, channel_id, conversation_id, external_id,
                     author, agent_id, body, routed_to, sent_at, created_at, bot_handled_at)
                 SELECT gen_random_uuid(), $1, h.channel_id, h.conversation_id,
                        'history-' || $2 || '-' || h.g || '-' || m.k, m.author, m.agent, m.body,
                        m.routed_to, m.sent, h.t0 + m.after, m.handled
                 FROM history h CROSS JOIN LATERAL (VALUES
                     ('customer', 'customer', NULL, '請問我的訂單什麼時候會到？', CASE WHEN h.channel_id LIKE 'b%' THEN 'bot' ELSE 'queued' END, h.t0, interval '0 s', CASE WHEN h.channel_id LIKE 'b%' THEN h.t0 END),
                     ('bot', 'bot', NULL, '正在為您轉接專員，請稍候。', NULL, NULL, interval '10 s', NULL),
                     ('agent', 'agent', h.agent_id, '您好，我來幫您查詢。', NULL, NULL, interval '13 s', NULL)
                 ) AS m(k, author, agent, body, routed_to, sent, after, handled)
                 WHERE m.author <> 'bot' OR h.channel_id LIKE 'b%'",
                &[&tenant, &tag],
            )
            .await?;
        seeded.offers += tx
            .execute(
                "INSERT INTO offers (id, tenant_id, conversation_id, agent_id, status, created_at,
                     deadline, ended_at, end_reason)
                 SELECT gen_random_uuid(), $1, conversation_id, agent_id, 'accepted',
                        t0 + interval '11 s', t0 + interval '71 s', t0 + interval '12 s', 'accepted'
                 FROM history",
                &[&tenant],
            )
            .await?;
        tx.commit().await?;
    }
    client
        .batch_execute(
            "ANALYZE customers, conversations, conversation_transitions, messages, offers",
        )
        .await?;
    seeded.seconds = started.elapsed().as_secs_f64();
    Ok(seeded)
}
