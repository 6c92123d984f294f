//! The load generator (`firstline load`, and `scripts/bench e2e`): simulated gateways publish
//! inbound customer messages at a target rate over many tenants, channels and customers, and
//! simulated agents go ready, accept offers after a delay, reply and close. It measures, for
//! every message, the time from its publish to the first thing the system sends because of it:
//!
//! | kind | the customer | measured until |
//! |---|---|---|
//! | `bot` | a returning customer asks a question on a bot channel | the bot's reply on `outbound` |
//! | `handover` | a new customer types the hand-over keyword (SPEC L4) | the bot's hand-over reply on `outbound`; then the offer to an agent is measured too |
//! | `direct` | a new customer writes on a channel without bot (SPEC L2) | the offer on `notify` (SPEC L6) |
//!
//! Replies and notifications are read with plain subscriptions (as a gateway or desktop that
//! subscribes would). A conversation's messages are answered in order, so each customer's
//! sends are matched first in, first out with what comes back for that customer.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use firstline_shared::bus;
use firstline_shared::domain::{AgentId, AgentStatus, TenantId};
use firstline_shared::subjects;
use firstline_shared::wire::{
    self, AgentActionKind, AgentNotification, AgentPresence, AgentPresenceMessage, Author,
    CustomerRef, InboundMessage, NotificationKind, OutboundMessage, Version,
};
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::setup::SetupFile;
use agents::{read_outbound, start_agents};
pub use report::print_report;
use report::progress;

mod agents;
mod mix;
mod report;
pub use mix::Mix;

/// What to send, how fast, and how the simulated agents behave.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Inbound messages per second, offered.
    pub rate: f64,
    pub duration: Duration,
    /// Tenants `<prefix>0`, `<prefix>1`…
    pub tenants: usize,
    /// Per tenant: this many channels with a bot (`b0`…) and as many without (`d0`…).
    pub channels: usize,
    /// Returning customers who talk to the bot (spread over tenants and bot channels).
    pub customers: usize,
    /// Share of messages that are questions to the bot.
    pub bot_share: f64,
    /// Share of messages that ask for a human (hand-over keyword); the rest are new customers
    /// on channels without bot, queued at once.
    pub handover_share: f64,
    /// Simulated agents per tenant, each ready with `capacity`.
    pub agents: usize,
    pub capacity: i32,
    /// An agent accepts an offer after this long.
    pub accept_delay: Duration,
    /// An agent replies at once on assignment and closes the conversation after this long.
    pub close_after: Duration,
    /// Bytes of text in each customer message (the message size of the raw ceiling).
    pub text_bytes: usize,
    /// Print a progress line this often (None: quiet).
    pub progress: Option<Duration>,
    /// After the last send, wait at most this long for what is still owed.
    pub drain: Duration,
    /// Tenant id prefix.
    pub prefix: String,
    /// Publish on `fl.<t>.inbound.<channel>` (ordered per channel, the slower form) instead of
    /// `fl.<t>.inbound.<channel>.<customer key>` (ordered per customer).
    pub per_channel: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            rate: 1000.0,
            duration: Duration::from_secs(10),
            tenants: 3,
            channels: 2,
            customers: 10_000,
            bot_share: 0.8,
            handover_share: 0.1,
            agents: 50,
            capacity: 10,
            accept_delay: Duration::from_millis(500),
            close_after: Duration::from_millis(1000),
            text_bytes: 120,
            progress: Some(Duration::from_secs(5)),
            drain: Duration::from_secs(15),
            prefix: "load".into(),
            per_channel: false,
        }
    }
}

/// The handover keyword the load tenants are configured with.
/// How the load tenants' place-in-line messages begin ([`agents::read_outbound`] skips them).
const PLACE_MARK: &str = "[place]";
pub const HANDOVER: &str = "轉真人";

impl LoadOptions {
    pub fn tenant(&self, i: usize) -> TenantId {
        TenantId::parse(format!("{}{i}", self.prefix)).expect("valid tenant id")
    }

    fn agent(&self, i: usize) -> AgentId {
        AgentId::parse(format!("a{i}")).expect("valid agent id")
    }

    /// A `firstline configure` file with the load's tenants, channels and agents.
    pub fn setup_json(&self) -> String {
        let tenants: Vec<serde_json::Value> = (0..self.tenants)
            .map(|t| {
                let mut channels = Vec::new();
                for c in 0..self.channels {
                    channels.push(serde_json::json!({"id": format!("b{c}"), "kind": "line", "bot_enabled": true}));
                    channels.push(serde_json::json!({"id": format!("d{c}"), "kind": "webchat", "bot_enabled": false}));
                }
                let agents: Vec<_> = (0..self.agents)
                    .map(|a| serde_json::json!({"id": format!("a{a}"), "name": format!("Agent {a}"), "capacity": self.capacity}))
                    .collect();
                serde_json::json!({
                    "id": self.tenant(t).as_str(), "name": format!("Load tenant {t}"),
                    "dispatch_cycle_seconds": 60, "offer_limit": 3,
                    "handover_keywords": [HANDOVER],
                    "bot_reply": "您好，我是客服機器人。輸入「轉真人」由專員為您服務。",
                    "handover_reply": "正在為您轉接專員，請稍候。",
                    // Told when queued; marked so that it is not taken for a reply owed.
                    "queue_position_reply": format!("{PLACE_MARK} {{position}} {{minutes}}"),
                    "queue_position_reply_no_estimate": format!("{PLACE_MARK} {{position}}"),
                    "channels": channels, "agents": agents,
                })
            })
            .collect();
        serde_json::json!({ "tenants": tenants }).to_string()
    }

    /// Creates or updates the tenants, channels and agents (through `firstline configure`'s code).
    pub async fn configure(&self, database_url: &str) -> anyhow::Result<()> {
        let file = SetupFile::parse(&self.setup_json())?;
        crate::setup::configure(database_url, &file).await
    }

    /// The body of a customer message of this size (for the raw ceiling).
    pub fn sample_payload(&self) -> Bytes {
        wire::encode(&InboundMessage {
            version: Version,
            message_id: format!("run0-{:09}", 123_456_789),
            customer: CustomerRef {
                id: "c00001234".into(),
                name: Some("王小明".into()),
            },
            text: question(0, self.text_bytes),
            sent_at: Some(chrono::Utc::now()),
            postback: None,
            email: None,
        })
    }
}

fn question(n: u64, bytes: usize) -> String {
    const Q: [&str; 4] = [
        "請問我的訂單什麼時候會到？",
        "退貨的退款要多久？",
        "How do I change my delivery address?",
        "會員點數可以折抵運費嗎？",
    ];
    let mut text = Q[(n % 4) as usize].to_owned();
    while text.len() < bytes {
        text.push_str(" 謝謝");
    }
    text
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bot,
    Handover,
    Direct,
}

/// Latency histograms in microseconds.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

#[derive(Default)]
struct Owed {
    /// (tenant, channel, customer) -> publish times of messages still waiting for their reply.
    replies: HashMap<String, VecDeque<Instant>>,
    /// (tenant, customer) -> publish time of a message still waiting for its offer.
    offers: HashMap<String, Instant>,
    /// Every answer: publish -> first reply or notification.
    e2e: Option<Histogram<u64>>,
    bot: Option<Histogram<u64>>,
    handover: Option<Histogram<u64>>,
    offer: Option<Histogram<u64>>,
    /// Since the last progress line.
    window: Option<Histogram<u64>>,
    last_answer: Option<Instant>,
}

impl Owed {
    fn new() -> Self {
        Self {
            e2e: Some(histogram()),
            bot: Some(histogram()),
            handover: Some(histogram()),
            offer: Some(histogram()),
            window: Some(histogram()),
            ..Default::default()
        }
    }

    /// `first`: the message's first answer (counted end to end); a hand-over's offer comes
    /// after its reply and counts only as an offer.
    fn record(&mut self, which: Kind, since: Instant, now: Instant, first: bool) {
        let us = (now - since).as_micros().max(1) as u64;
        for h in [
            self.e2e.as_mut().filter(|_| first),
            self.window.as_mut().filter(|_| first),
            match which {
                Kind::Bot => self.bot.as_mut(),
                Kind::Handover => self.handover.as_mut(),
                Kind::Direct => self.offer.as_mut(),
            },
        ]
        .into_iter()
        .flatten()
        {
            let _ = h.record(us.min(600_000_000));
        }
        if first {
            self.last_answer = Some(now);
        }
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    send_errors: AtomicU64,
    bot_sent: AtomicU64,
    handover_sent: AtomicU64,
    direct_sent: AtomicU64,
    replies: AtomicU64,
    offers: AtomicU64,
    accepts: AtomicU64,
    closes: AtomicU64,
    agent_replies: AtomicU64,
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_ms: ms(0.5),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            max_ms: h.max() as f64 / 1000.0,
        }
    }
}

/// What a load run measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LoadReport {
    pub offered_rate: f64,
    pub sent: u64,
    pub send_errors: u64,
    pub bot_sent: u64,
    pub handover_sent: u64,
    pub direct_sent: u64,
    /// Seconds spent sending.
    pub send_seconds: f64,
    /// Messages answered (reply or offer), and how many were still owed at the end.
    pub answered: u64,
    pub unanswered_replies: u64,
    pub unanswered_offers: u64,
    /// Answered messages per second, from the first send to the last answer.
    pub answered_per_s: f64,
    pub offers: u64,
    pub offers_per_s: f64,
    pub accepts: u64,
    pub closes: u64,
    /// Publish to the first reply or notification, all kinds.
    pub e2e: Latency,
    pub bot: Latency,
    pub handover: Latency,
    /// Publish to the offer's notification (direct and hand-over customers).
    pub offer: Latency,
    /// When the run started (for database queries about it).
    pub started_at: chrono::DateTime<chrono::Utc>,
}

impl LoadReport {
    /// Whether the pipeline kept up: everything answered, at the rate it was offered.
    pub fn kept_up(&self) -> bool {
        self.unanswered_replies == 0
            && self.unanswered_offers == 0
            && self.send_errors == 0
            && self.answered_per_s >= 0.95 * (self.sent as f64 / self.send_seconds.max(1e-9))
    }
}

/// Runs the load against running workers: configure the tenants first ([`LoadOptions::configure`]).
pub async fn run(
    client: async_nats::Client,
    opts: &LoadOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<LoadReport> {
    let js = jetstream::new(client.clone());
    let counters = Arc::new(Counters::default());
    let owed = Arc::new(Mutex::new(Owed::new()));
    let handovers = Arc::new(Mutex::new(HashMap::new()));
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    read_outbound(
        &client,
        opts,
        counters.clone(),
        owed.clone(),
        handovers.clone(),
        stop.clone(),
    )
    .await?;
    start_agents(
        &client,
        &js,
        opts,
        counters.clone(),
        owed.clone(),
        stop.clone(),
    )
    .await?;
    client.flush().await?;

    // Acks are awaited off the sending loop, a bounded number at a time.
    let (ack_tx, mut ack_rx) =
        tokio::sync::mpsc::channel::<jetstream::context::PublishAckFuture>(20_000);
    let ack_counters = counters.clone();
    let acks = tokio::spawn(async move {
        let mut inflight = futures::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                next = ack_rx.recv(), if inflight.len() < 20_000 => match next {
                    Some(f) => inflight.push(std::future::IntoFuture::into_future(f)),
                    None => break,
                },
                Some(result) = inflight.next(), if !inflight.is_empty() => {
                    if result.is_err() { ack_counters.send_errors.fetch_add(1, Ordering::Relaxed); }
                }
            }
        }
        while let Some(result) = inflight.next().await {
            if result.is_err() {
                ack_counters.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    let run_tag = &Uuid::new_v4().simple().to_string()[..6];
    let started_at = chrono::Utc::now();
    let start = Instant::now();
    let tick = Duration::from_millis(5);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ start.elapsed().as_nanos() as u64 ^ 1);
    let mut due = 0.0f64;
    let mut n: u64 = 0;
    let mut next_progress = opts.progress.map(|p| start + p);
    let mut last_progress = (start, 0u64, 0u64, 0u64);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut last_tick = start;
    while start.elapsed() < opts.duration && !shutdown.is_cancelled() {
        interval.tick().await;
        let now = Instant::now();
        due += opts.rate * (now - last_tick).as_secs_f64();
        last_tick = now;
        while due >= 1.0 {
            due -= 1.0;
            n += 1;
            let roll = rng.unit();
            let kind = if roll < opts.bot_share {
                Kind::Bot
            } else if roll < opts.bot_share + opts.handover_share {
                Kind::Handover
            } else {
                Kind::Direct
            };
            let (tenant, channel, customer, text) = match kind {
                Kind::Bot => {
                    let c = rng.below(opts.customers.max(1) as u64);
                    (
                        (c % opts.tenants as u64) as usize,
                        format!("b{}", (c / opts.tenants as u64) % opts.channels as u64),
                        format!("c{c:08}"),
                        question(n, opts.text_bytes),
                    )
                }
                Kind::Handover | Kind::Direct => {
                    let t = rng.below(opts.tenants as u64) as usize;
                    let c = rng.below(opts.channels as u64);
                    let (ch, prefix, text) = if kind == Kind::Handover {
                        (format!("b{c}"), "h", HANDOVER.to_owned())
                    } else {
                        (format!("d{c}"), "d", question(n, opts.text_bytes))
                    };
                    (t, ch, format!("{prefix}{run_tag}{n:09}"), text)
                }
            };
            let tenant = opts.tenant(tenant);
            let message_id = format!("{run_tag}-{n:09}");
            let body = InboundMessage {
                version: Version,
                message_id: message_id.clone(),
                customer: CustomerRef {
                    id: customer.clone(),
                    name: None,
                },
                text,
                sent_at: Some(chrono::Utc::now()),
                postback: None,
                email: None,
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!("{tenant}:{channel}:{message_id}").as_str(),
            );
            let key = format!("{tenant}/{channel}/{customer}");
            let sent = Instant::now();
            {
                let mut o = owed.lock().unwrap();
                match kind {
                    Kind::Bot => {
                        counters.bot_sent.fetch_add(1, Ordering::Relaxed);
                        o.replies.entry(key).or_default().push_back(sent);
                    }
                    Kind::Handover => {
                        counters.handover_sent.fetch_add(1, Ordering::Relaxed);
                        handovers.lock().unwrap().insert(key.clone(), ());
                        o.replies.entry(key).or_default().push_back(sent);
                        o.offers.insert(format!("{tenant}/{customer}"), sent);
                    }
                    Kind::Direct => {
                        counters.direct_sent.fetch_add(1, Ordering::Relaxed);
                        o.offers.insert(format!("{tenant}/{customer}"), sent);
                    }
                }
            }
            let subject = if opts.per_channel {
                format!("fl.{tenant}.inbound.{channel}")
            } else {
                format!(
                    "fl.{tenant}.inbound.{channel}.{}",
                    subjects::customer_key(&customer)
                )
            };
            match js
                .publish_with_headers(subject, headers, wire::encode(&body))
                .await
            {
                Ok(ack) => {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    let _ = ack_tx.send(ack).await;
                }
                Err(e) => {
                    counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("publish failed: {e}");
                }
            }
        }
        if let (Some(at), Some(every)) = (next_progress, opts.progress) {
            if Instant::now() >= at {
                next_progress = Some(at + every);
                last_progress = progress(start, last_progress, &counters, &owed);
            }
        }
    }
    let send_seconds = start.elapsed().as_secs_f64();
    drop(ack_tx);
    let _ = acks.await;

    // Drain: wait until nothing is owed, or the drain time is over.
    let drain_until = Instant::now() + opts.drain;
    loop {
        let (replies, offers) = {
            let o = owed.lock().unwrap();
            (
                o.replies.values().map(|q| q.len()).sum::<usize>(),
                o.offers.len(),
            )
        };
        if (replies == 0 && offers == 0) || Instant::now() >= drain_until || shutdown.is_cancelled()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let (Some(at), Some(every)) = (next_progress, opts.progress) {
            if Instant::now() >= at {
                next_progress = Some(at + every);
                last_progress = progress(start, last_progress, &counters, &owed);
            }
        }
    }
    let o = owed.lock().unwrap();
    let unanswered_replies = o.replies.values().map(|q| q.len() as u64).sum();
    let unanswered_offers = o.offers.len() as u64;
    let e2e = Latency::of(o.e2e.as_ref().expect("histogram"));
    let answered_window = o
        .last_answer
        .map(|t| (t - start).as_secs_f64())
        .unwrap_or(send_seconds)
        .max(send_seconds);
    let offers = counters.offers.load(Ordering::Relaxed);
    Ok(LoadReport {
        offered_rate: opts.rate,
        sent: counters.sent.load(Ordering::Relaxed),
        send_errors: counters.send_errors.load(Ordering::Relaxed),
        bot_sent: counters.bot_sent.load(Ordering::Relaxed),
        handover_sent: counters.handover_sent.load(Ordering::Relaxed),
        direct_sent: counters.direct_sent.load(Ordering::Relaxed),
        send_seconds,
        answered: e2e.count,
        unanswered_replies,
        unanswered_offers,
        answered_per_s: e2e.count as f64 / answered_window,
        offers,
        offers_per_s: offers as f64 / answered_window,
        accepts: counters.accepts.load(Ordering::Relaxed),
        closes: counters.closes.load(Ordering::Relaxed),
        e2e,
        bot: Latency::of(o.bot.as_ref().expect("histogram")),
        handover: Latency::of(o.handover.as_ref().expect("histogram")),
        offer: Latency::of(o.offer.as_ref().expect("histogram")),
        started_at,
    })
}

/// A small fast generator (xorshift); the mix needs no cryptography.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
