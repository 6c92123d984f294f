//! Webhooks: every conversation event (`fl.<tenant>.events.conversation`) POSTed to each of
//! the tenant's registered URLs, signed, retried with backoff, dead-lettered after the last try.
//!
//! Two halves, so that a slow or failing endpoint never slows the pipeline:
//! - the **consumer** (durable `webhooks` on `FL_EVENTS`) only writes one `webhook_deliveries`
//!   row per matching webhook (unique per webhook and event: a redelivered event makes no
//!   second delivery) and acks;
//! - the **sender** claims due deliveries (`FOR UPDATE SKIP LOCKED`, with a lease, so several
//!   instances share the work and a crash mid-send only delays a try), POSTs them concurrently
//!   with a timeout, and records the outcome: delivered, retry at `backoff(attempts)`, or dead
//!   after `max_attempts` (also published to `fl.<tenant>.deadletter.webhooks`).
//!
//! Signatures ([`crate::signing`]): the Standard Webhooks headers (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature`), and `FirstLine-Signature` beside them for one
//! more version.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use chrono::Utc;
use deadpool_postgres::Pool;
use firstline_shared::bus::{self, ConsumerSpec, Delivered, JetStream};
use firstline_shared::config::CommonConfig;
use firstline_shared::domain::TenantId;
use firstline_shared::wire::{self, ConversationEvent, DeadLetter, Version, WebhookDelivery};
use firstline_shared::worker::Services;
use firstline_shared::{subjects, HandleError};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

pub use crate::signing::{new_secret, signature_header, verify, verify_standard};
use crate::signing::{standard_key, standard_signature};

/// Webhook delivery settings.
#[derive(Clone, Debug, clap::Args)]
pub struct WebhookConfig {
    /// Tries of one delivery before it is dead-lettered.
    #[arg(
        long = "webhook-max-attempts",
        env = "FL_WEBHOOK_MAX_ATTEMPTS",
        default_value_t = 12
    )]
    pub max_attempts: i32,
    /// Delay before the first retry (ms); it doubles with every try.
    #[arg(
        long = "webhook-backoff-ms",
        env = "FL_WEBHOOK_BACKOFF_MS",
        default_value_t = 5000
    )]
    pub backoff_ms: u64,
    /// Longest delay between two tries (seconds).
    #[arg(
        long = "webhook-backoff-max-secs",
        env = "FL_WEBHOOK_BACKOFF_MAX_SECS",
        default_value_t = 3600
    )]
    pub backoff_max_secs: u64,
    /// How long an endpoint has to answer (seconds).
    #[arg(
        long = "webhook-timeout-secs",
        env = "FL_WEBHOOK_TIMEOUT_SECS",
        default_value_t = 10
    )]
    pub timeout_secs: u64,
    /// Requests in flight at once (per API instance).
    #[arg(
        long = "webhook-concurrency",
        env = "FL_WEBHOOK_CONCURRENCY",
        default_value_t = 32
    )]
    pub concurrency: usize,
    /// Database connections the sender uses at once, at most (per API instance): the pool is
    /// the API's, shared by every tenant's requests, and one tenant's backlog of deliveries
    /// must not take it. No connection is held while a request is out or a dead letter is
    /// being published.
    #[arg(
        long = "webhook-db-connections",
        env = "FL_WEBHOOK_DB_CONNECTIONS",
        default_value_t = 2
    )]
    pub db_connections: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            max_attempts: 12,
            backoff_ms: 5000,
            backoff_max_secs: 3600,
            timeout_secs: 10,
            concurrency: 32,
            db_connections: 2,
        }
    }
}

/// Delay before try `attempts + 1`, after `attempts` failed ones (1, 2, ...): `base`,
/// doubling, at most `max`.
pub fn backoff(attempts: i32, base: Duration, max: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).clamp(0, 30) as u32;
    base.saturating_mul(1u32 << doublings).min(max)
}

/// The body POSTed for one event.
pub fn body(tenant: &TenantId, event: &ConversationEvent) -> String {
    let delivery = WebhookDelivery {
        version: Version,
        id: event.event_id,
        kind: format!("conversation.{}", event.to.as_str()),
        tenant: tenant.to_string(),
        created_at: event.at,
        data: event.clone(),
    };
    String::from_utf8_lossy(&wire::encode(&delivery)).into_owned()
}

/// Runs the consumer and the sender until `shutdown`.
pub async fn run(
    services: &Services,
    common: &CommonConfig,
    config: WebhookConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let wake = Arc::new(Notify::new());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(config.timeout_secs))
        .user_agent("FirstLine-Webhooks/1")
        .build()?;
    let sender = Sender {
        db: Arc::new(Semaphore::new(config.db_connections.max(1))),
        pool: services.pool.clone(),
        js: services.js.clone(),
        http: client,
        config,
        wake: wake.clone(),
    };
    // The sender stops at shutdown, or when the consumer ends (after a failure too).
    let stop_sending = shutdown.child_token();
    let sending = tokio::spawn(sender.run(stop_sending.clone()));
    let pool = services.pool.clone();
    let consumed = bus::consume(
        &services.js,
        common,
        ConsumerSpec::new(subjects::EVENTS, "webhooks"),
        shutdown,
        |m| enqueue(&pool, &wake, m),
    )
    .await;
    stop_sending.cancel();
    sending.await?;
    consumed
}

/// Writes a delivery per webhook of the event's tenant that wants it.
async fn enqueue(pool: &Pool, wake: &Notify, m: Delivered) -> Result<(), HandleError> {
    let tenant =
        TenantId::parse(m.tenant_token()).map_err(|e| HandleError::poison(e.to_string()))?;
    let event: ConversationEvent = wire::decode(&m.payload)?;
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT id FROM webhooks WHERE tenant_id = $1 AND (states = '{}' OR $2 = ANY(states))",
        )
        .await?;
    let hooks = client
        .query(&stmt, &[&tenant.as_str(), &event.to.as_str()])
        .await?;
    if hooks.is_empty() {
        return Ok(());
    }
    let body = body(&tenant, &event);
    let insert = client
        .prepare_cached(
            "INSERT INTO webhook_deliveries (id, webhook_id, tenant_id, event_id, body)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (webhook_id, event_id) DO NOTHING",
        )
        .await?;
    for hook in hooks {
        let webhook: Uuid = hook.get(0);
        client
            .execute(
                &insert,
                &[
                    &Uuid::now_v7(),
                    &webhook,
                    &tenant.as_str(),
                    &event.event_id,
                    &body,
                ],
            )
            .await?;
    }
    wake.notify_one();
    Ok(())
}

struct Sender {
    /// One permit per database connection the sender may hold ([`WebhookConfig::db_connections`]).
    db: Arc<Semaphore>,
    pool: Pool,
    js: JetStream,
    http: reqwest::Client,
    config: WebhookConfig,
    wake: Arc<Notify>,
}

/// A delivery claimed for one try.
struct Claimed {
    id: Uuid,
    tenant: String,
    event_id: Uuid,
    body: String,
    attempts: i32,
    url: String,
    secret: String,
    webhook: Uuid,
}

impl Sender {
    /// Sends due deliveries until `shutdown`, then waits for the tries in flight (each ends
    /// within the request timeout) so that their outcome is recorded.
    async fn run(self, shutdown: CancellationToken) {
        let in_flight = TaskTracker::new();
        self.send_due(&in_flight, shutdown).await;
        in_flight.close();
        in_flight.wait().await;
    }

    async fn send_due(self, in_flight: &TaskTracker, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(this.config.concurrency.max(1)));
        loop {
            let free = permits.available_permits();
            let claimed = if free > 0 {
                match this.claim(free as i64).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("claiming webhook deliveries: {e:#}");
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            let full = !claimed.is_empty() && claimed.len() == free;
            for delivery in claimed {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let this = this.clone();
                in_flight.spawn(async move {
                    this.send(delivery).await;
                    drop(permit);
                    this.wake.notify_one();
                });
            }
            if full {
                // More may be due: go again as soon as a request ends.
                tokio::select! {
                    _ = this.wake.notified() => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            }
            tokio::select! {
                _ = this.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Takes up to `limit` due deliveries, leasing each for longer than a try can take.
    async fn claim(&self, limit: i64) -> anyhow::Result<Vec<Claimed>> {
        let _permit = self.db.acquire().await?;
        let client = self.pool.get().await?;
        let lease = (self.config.timeout_secs + 30) as f64;
        let stmt = client
            .prepare_cached(
                "UPDATE webhook_deliveries d
                 SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
                 FROM webhooks w
                 WHERE w.id = d.webhook_id AND d.id IN (
                     SELECT id FROM webhook_deliveries
                     WHERE status = 'pending' AND next_attempt_at <= now()
                     ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING d.id, d.tenant_id, d.event_id, d.body, d.attempts, w.url, w.secret, w.id",
            )
            .await?;
        let rows = client.query(&stmt, &[&limit, &lease]).await?;
        Ok(rows
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                tenant: r.get(1),
                event_id: r.get(2),
                body: r.get(3),
                attempts: r.get(4),
                url: r.get(5),
                secret: r.get(6),
                webhook: r.get(7),
            })
            .collect())
    }

    async fn send(&self, d: Claimed) {
        if d.attempts > self.config.max_attempts {
            // Its last try's outcome was not recorded (the dead letter could not be
            // published, say): it is not sent again, only made dead.
            let error = "its tries are used up".to_owned();
            if let Err(e) = self.record(&d, None, Some(error)).await {
                tracing::warn!(delivery = %d.id, "recording a webhook outcome: {e:#}");
            }
            return;
        }
        let timestamp = Utc::now().timestamp();
        let mut request = self.http.post(&d.url);
        // Standard Webhooks: the delivery's id (the same on every try), the try's time.
        let id = d.id.to_string();
        match standard_key(&d.secret) {
            Some(key) => {
                request = request
                    .header("webhook-id", &id)
                    .header("webhook-timestamp", timestamp.to_string())
                    .header(
                        "webhook-signature",
                        standard_signature(&key, &id, timestamp, d.body.as_bytes()),
                    );
            }
            // Every secret the API made fits; one written into the table by hand may not.
            None => {
                tracing::warn!(webhook = %d.webhook, "the secret is not whsec_<base64>: no webhook-signature")
            }
        }
        let result = request
            .header("content-type", "application/json")
            .header(
                "firstline-signature",
                signature_header(&d.secret, timestamp, d.body.as_bytes()),
            )
            .header("firstline-event-id", d.event_id.to_string())
            .header("firstline-delivery-id", d.id.to_string())
            .header("firstline-attempt", d.attempts.to_string())
            .body(d.body.clone())
            .send()
            .await;
        let (status, error) = match result {
            Ok(r) if r.status().is_success() => (Some(r.status().as_u16() as i32), None),
            Ok(r) => (
                Some(r.status().as_u16() as i32),
                Some(format!("HTTP {}", r.status())),
            ),
            Err(e) if e.is_timeout() => (
                None,
                Some(format!("no answer within {} s", self.config.timeout_secs)),
            ),
            Err(e) => (None, Some(format!("{e}"))),
        };
        if let Err(e) = self.record(&d, status, error).await {
            // The lease runs out and the delivery is tried again.
            tracing::warn!(delivery = %d.id, "recording a webhook outcome: {e:#}");
        }
    }

    async fn record(
        &self,
        d: &Claimed,
        status: Option<i32>,
        error: Option<String>,
    ) -> anyhow::Result<()> {
        let Some(error) = error else {
            let _permit = self.db.acquire().await?;
            let client = self.pool.get().await?;
            client
                .execute(
                    "UPDATE webhook_deliveries SET status = 'delivered', ended_at = now(), last_status = $2, last_error = NULL
                     WHERE id = $1",
                    &[&d.id, &status],
                )
                .await?;
            metrics::counter!("fl_webhook_deliveries_total", "outcome" => "delivered").increment(1);
            return Ok(());
        };
        if d.attempts < self.config.max_attempts {
            let delay = backoff(
                d.attempts,
                Duration::from_millis(self.config.backoff_ms),
                Duration::from_secs(self.config.backoff_max_secs),
            );
            let _permit = self.db.acquire().await?;
            let client = self.pool.get().await?;
            client
                .execute(
                    "UPDATE webhook_deliveries SET next_attempt_at = now() + make_interval(secs => $2),
                         last_status = $3, last_error = $4
                     WHERE id = $1",
                    &[&d.id, &delay.as_secs_f64(), &status, &error],
                )
                .await?;
            metrics::counter!("fl_webhook_deliveries_total", "outcome" => "retry").increment(1);
            tracing::info!(delivery = %d.id, url = %d.url, attempts = d.attempts, retry_in_ms = delay.as_millis() as u64, "webhook failed: {error}");
            return Ok(());
        }
        let mut reason = format!(
            "webhook {} failed {} times; last: {error}",
            d.url, d.attempts
        );
        // The dead letter is published before the row says dead: a crash in between tries
        // once more rather than losing the dead letter.
        let tenant = TenantId::parse(d.tenant.clone())?;
        let letter = DeadLetter {
            version: Version,
            reason: reason.clone(),
            stream: subjects::EVENTS.name.to_string(),
            consumer: "webhooks".to_string(),
            subject: subjects::conversation_events(&tenant),
            stream_sequence: 0,
            deliveries: d.attempts as u64,
            payload: d.body.clone(),
            payload_bytes: None,
            headers: BTreeMap::from([
                ("FirstLine-Webhook-Id".to_string(), d.webhook.to_string()),
                ("FirstLine-Delivery-Id".to_string(), d.id.to_string()),
                ("FirstLine-Webhook-Url".to_string(), d.url.clone()),
            ]),
            at: Utc::now(),
        };
        // Cut to fit the server's max_payload (a huge URL or body): it always goes out.
        let published = bus::publish(
            &self.js,
            subjects::dead_letter(tenant.as_str(), "webhooks"),
            &format!("webhook-dead:{}", d.id),
            HeaderMap::new(),
            letter.fit(bus::dead_letter::max_body(&self.js)),
        )
        .await;
        match published {
            Ok(_) => {}
            // Never sent again: a delivery whose letter cannot go is dead all the same, and
            // says so, rather than claimed on every lease.
            Err(e) if bus::is_too_large(&e) || d.attempts > self.config.max_attempts + 3 => {
                reason = format!("{reason}; its dead letter could not be published: {e:#}");
            }
            Err(e) => return Err(e),
        }
        let _permit = self.db.acquire().await?;
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE webhook_deliveries SET status = 'dead', ended_at = now(), last_status = $2, last_error = $3
                 WHERE id = $1",
                &[&d.id, &status, &reason],
            )
            .await?;
        metrics::counter!("fl_webhook_deliveries_total", "outcome" => "dead").increment(1);
        tracing::warn!(delivery = %d.id, "{reason}; dead-lettered");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(10);
        let delays: Vec<u128> = (1..=8).map(|a| backoff(a, base, max).as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
        assert_eq!(backoff(i32::MAX, base, max), max);
        assert_eq!(backoff(0, base, max), base);
    }
}
