//! Simulated agent desktops for the load and fault tests: they read every notification of a
//! tenant (`fl.<t>.notify.<agent>`, a plain NATS subscription, as a desktop would), accept each
//! offer a moment later, and for each assignment reply once and close a little after; actions
//! are hand-written JSON on `fl.<t>.agent.<a>.action` with their `action_id` as `Nats-Msg-Id`,
//! published until acknowledged (through a NATS restart or a cluster node's death too).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use firstline_shared::bus;
use futures::StreamExt;
use serde_json::json;
use uuid::Uuid;

/// A small deterministic generator (xorshift), so that a failing run can be replayed.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// In `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// In `from..to` milliseconds.
    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to.saturating_sub(from)))
    }
}

/// The seed in the environment variable `var` (to replay a run), else one from the clock;
/// printed either way.
pub fn seed_from_env(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (replay with {var}={seed})");
    seed
}

/// What the desktops did, counted.
#[derive(Debug, Default)]
pub struct DeskCounts {
    pub offers: AtomicUsize,
    pub accepts: AtomicUsize,
    pub replies: AtomicUsize,
    pub closes: AtomicUsize,
}

impl DeskCounts {
    pub fn summary(&self) -> String {
        format!(
            "{} offers seen, {} accepts, {} replies, {} closes sent",
            self.offers.load(Ordering::Relaxed),
            self.accepts.load(Ordering::Relaxed),
            self.replies.load(Ordering::Relaxed),
            self.closes.load(Ordering::Relaxed)
        )
    }
}

/// The desktops of every agent of `tenant`, running until dropped.
pub struct Desks {
    pub counts: Arc<DeskCounts>,
    task: tokio::task::JoinHandle<()>,
}

impl Desks {
    /// Accepts every offer after 50-300 ms; replies to each assignment after 100-500 ms and
    /// closes it `close_after` (a range in ms) later.
    pub async fn start(
        client: async_nats::Client,
        tenant: &str,
        seed: u64,
        close_after: (u64, u64),
    ) -> Self {
        let mut notes = client
            .subscribe(format!("fl.{tenant}.notify.*"))
            .await
            .expect("subscribe to the notifications");
        // The subscription reaches the server before the first offer can.
        client.flush().await.expect("flush");
        let counts = Arc::new(DeskCounts::default());
        let js = async_nats::jetstream::new(client);
        let tenant = tenant.to_owned();
        let task = {
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut rng = Rng::new(seed);
                while let Some(m) = notes.next().await {
                    let subject = m.subject.to_string();
                    let Some(agent) = subject.split('.').nth(3).map(str::to_owned) else {
                        continue;
                    };
                    let Ok(note) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
                        continue;
                    };
                    let Some(conversation) = note["conversation_id"].as_str().map(str::to_owned)
                    else {
                        continue;
                    };
                    let say = Action {
                        js: js.clone(),
                        tenant: tenant.clone(),
                        agent,
                        conversation,
                        counts: counts.clone(),
                    };
                    match note["type"].as_str() {
                        Some("offer") => {
                            counts.offers.fetch_add(1, Ordering::Relaxed);
                            let think = rng.millis(50, 300);
                            tokio::spawn(async move {
                                // The agent's think time (the scenario), not a wait for state.
                                tokio::time::sleep(think).await;
                                say.send("accept", json!({})).await;
                            });
                        }
                        Some("assigned") => {
                            let (think, close) = (
                                rng.millis(100, 500),
                                rng.millis(close_after.0, close_after.1),
                            );
                            tokio::spawn(async move {
                                // The agent's pace (the scenario), not waits for state.
                                tokio::time::sleep(think).await;
                                say.send("reply", json!({"text": "on it"})).await;
                                tokio::time::sleep(close).await;
                                say.send("close", json!({})).await;
                            });
                        }
                        _ => {}
                    }
                }
            })
        };
        Self { counts, task }
    }
}

impl Drop for Desks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One agent's action on one conversation.
struct Action {
    js: async_nats::jetstream::Context,
    tenant: String,
    agent: String,
    conversation: String,
    counts: Arc<DeskCounts>,
}

impl Action {
    async fn send(&self, kind: &str, extra: serde_json::Value) {
        let action_id = Uuid::new_v4().to_string();
        let mut body = json!({
            "version": 1, "action_id": action_id, "type": kind,
            "conversation_id": self.conversation,
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let subject = format!("fl.{}.agent.{}.action", self.tenant, self.agent);
        // Published again with the same id until acknowledged, as a desktop retries.
        for _ in 0..5 {
            if bus::publish(
                &self.js,
                subject.clone(),
                &action_id,
                HeaderMap::new(),
                body.to_string().into(),
            )
            .await
            .is_ok()
            {
                let counter = match kind {
                    "accept" => &self.counts.accepts,
                    "reply" => &self.counts.replies,
                    _ => &self.counts.closes,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}
