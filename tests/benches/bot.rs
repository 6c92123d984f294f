//! Bot benchmark (not a test: it prints figures and asserts nothing about speed).
//!
//! A tenant with 1,000 keyword rules (contains, exact and regex) and 10,000 knowledge-base
//! articles (Traditional Chinese and English), loaded with the real loader. Questions are a
//! third keyword hits, a third knowledge-base questions, a third misses (the fallback), over
//! 32 channels (FL_BOT is partitioned by tenant and channel).
//!
//! - decide: the pure decision (rules, then the knowledge base) per second on one core, and
//!   the time to build the matchers after a configuration change;
//! - bot-router: conversations and their customer messages are created in Postgres, their bot
//!   work is published on `fl.<t>.bot.<channel>` as ingest would, and the bot-router (the real
//!   worker) answers them: replies/s until every reply is on the delivery stream, and the
//!   publish-to-reply latency;
//! - end to end: every worker running; customers publish inbound messages as a gateway would;
//!   replies/s until every bot reply is on the outbound subjects.
//!
//! Run: `scripts/bench bot` (or `cargo bench -p firstline-tests --bench bot`; `FL_BENCH_QUICK=1`
//! for a short run; `FL_BENCH_MESSAGES` messages for the worker and end-to-end parts, 20,000,
//! or 3,000 quick, and ten times as many decisions up to 30,000: scripts/test runs 300). The
//! last line is one JSON object with every figure.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use firstline_bot_router::decide::{self, Context, TenantBot};
use firstline_bot_router::hours::AfterHours;
use firstline_bot_router::kb::{Article, KnowledgeBase};
use firstline_bot_router::keywords::{KeywordMatcher, KeywordRule, MatchKind, RuleReply};
use firstline_bot_router::setup::BotFile;
use firstline_shared::config::CommonConfig;
use firstline_shared::domain::ChannelId;
use firstline_tests::db::TestDb;
use firstline_tests::nats::TestNats;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const CHANNELS: usize = 32;
const RULES: usize = 1_000;
const ARTICLES: usize = 10_000;

const ZH: &[&str] = &[
    "訂單",
    "退貨",
    "退款",
    "發票",
    "運費",
    "會員",
    "點數",
    "優惠券",
    "密碼",
    "帳號",
    "地址",
    "付款",
    "信用卡",
    "物流",
    "門市",
    "保固",
    "維修",
    "預購",
    "缺貨",
    "贈品",
    "折扣",
    "訂閱",
    "取消",
    "換貨",
    "商品",
    "尺寸",
    "顏色",
    "包裝",
    "客服",
    "電話",
    "營業",
    "活動",
    "抽獎",
    "禮物卡",
    "分期",
    "紅利",
];
const EN: &[&str] = &[
    "order",
    "refund",
    "invoice",
    "shipping",
    "member",
    "points",
    "coupon",
    "password",
    "account",
    "address",
    "payment",
    "card",
    "delivery",
    "store",
    "warranty",
    "repair",
    "preorder",
    "stock",
    "gift",
    "discount",
    "subscription",
    "cancel",
    "exchange",
    "product",
    "size",
    "color",
    "package",
    "support",
    "phone",
    "hours",
    "campaign",
    "voucher",
    "installment",
    "bonus",
    "tracking",
    "return",
];

/// A small deterministic generator (the figures must not depend on luck).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 as usize
    }
    fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[self.next() % words.len()]
    }
}

fn rules() -> Vec<KeywordRule> {
    (0..RULES)
        .map(|i| {
            let (kind, pattern) = match i % 10 {
                0 => (MatchKind::Regex, format!(r"活動\s*{i:04}\s*號")),
                1..=3 => (MatchKind::Exact, format!("選單{i:04}")),
                _ => (MatchKind::Contains, format!("代碼{i:04}")),
            };
            KeywordRule {
                id: format!("r{i:04}"),
                priority: (i % 7) as i32,
                kind,
                pattern,
                channels: vec![],
                reply: RuleReply {
                    text: Some(format!("規則 {i} 的回覆")),
                    ..RuleReply::default()
                },
            }
        })
        .collect()
}

fn articles() -> Vec<Article> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    (0..ARTICLES)
        .map(|i| {
            let english = i % 3 == 0;
            let words: Vec<&str> = (0..40)
                .map(|_| rng.pick(if english { EN } else { ZH }))
                .collect();
            let (title, body) = if english {
                (
                    format!("{} {} {} guide {i}", words[0], words[1], words[2]),
                    words.join(" "),
                )
            } else {
                (
                    format!("{}{}與{}說明{i}", words[0], words[1], words[2]),
                    words.join("，"),
                )
            };
            Article {
                id: format!("a{i:05}"),
                title,
                body,
                tags: vec![words[0].to_owned(), words[3].to_owned()],
            }
        })
        .collect()
}

/// The question mix: keyword hits, article questions, misses.
fn questions(n: usize, articles: &[Article]) -> Vec<String> {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    (0..n)
        .map(|i| match i % 3 {
            0 => match rng.next() % 3 {
                0 => format!("我想問活動 {:04} 號", (rng.next() % 100) * 10),
                1 => format!("選單{:04}", (rng.next() % 100) * 10 + 1),
                _ => format!("請問代碼{:04}是什麼", (rng.next() % 100) * 10 + 4),
            },
            1 => {
                let a = &articles[rng.next() % articles.len()];
                format!("請問{}？", a.title)
            }
            _ => format!("今天天氣如何 {}", rng.next() % 1000),
        })
        .collect()
}

fn bot_file() -> String {
    let file = json!({
        "tenant": "bench",
        "keyword_rules": rules(),
        "articles": articles(),
    });
    file.to_string()
}

fn setup_json() -> String {
    let channels: Vec<_> = (0..CHANNELS)
        .map(|c| json!({"id": format!("c{c}"), "bot_enabled": true}))
        .collect();
    json!({"tenants": [{"id": "bench", "channels": channels}]}).to_string()
}

fn percentile(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    firstline_shared::telemetry::init_for_tests();
    let quick = std::env::var_os("FL_BENCH_QUICK").is_some();
    let n: usize = std::env::var("FL_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 3_000 } else { 20_000 });
    let mut figures = serde_json::Map::new();

    // 1. The pure decision.
    let started = Instant::now();
    let bot = TenantBot {
        version: 1,
        keywords: KeywordMatcher::new(rules()).map_err(anyhow::Error::msg)?,
        kb: KnowledgeBase::new(articles()),
    };
    let build_ms = started.elapsed().as_secs_f64() * 1000.0;
    let arts = articles();
    let qs = questions((10 * n).min(30_000), &arts);
    let channel = ChannelId::parse("c0")?;
    let keywords = vec!["轉真人".to_owned()];
    let ctx = Context {
        channel: &channel,
        handover_keywords: &keywords,
        fallback_reply: "?",
        handover_reply: "!",
        kb_min_score: firstline_bot_router::kb::DEFAULT_MIN_SCORE,
        hours: None,
        after_hours: AfterHours::Queue,
        now: chrono::Utc::now(),
    };
    let mut sources: HashMap<&'static str, usize> = HashMap::new();
    let started = Instant::now();
    for q in &qs {
        let kind = match decide::decide_bot(&ctx, &bot, q, None) {
            decide::BotAction::Reply { source, .. } => source.kind(),
            _ => "other",
        };
        *sources.entry(kind).or_default() += 1;
    }
    let decide_per_s = qs.len() as f64 / started.elapsed().as_secs_f64();
    println!(
        "decide: {RULES} rules + {ARTICLES} articles built in {build_ms:.0} ms; {decide_per_s:.0} decisions/s on one core; answers by source {sources:?}"
    );
    figures.insert("build_ms".into(), json!(build_ms.round()));
    figures.insert("decide_per_s".into(), json!(decide_per_s.round()));
    drop(bot);

    // 2. The bot-router worker alone.
    let nats = TestNats::start().await;
    let db = TestDb::create().await;
    let setup = firstline::setup::SetupFile::parse(&setup_json())?;
    firstline::setup::configure(&db.url, &setup).await?;
    let file = BotFile::parse(&bot_file(), true)?;
    let mut pg = db.connect().await;
    let started = Instant::now();
    file.apply(&mut pg).await?;
    println!(
        "load: {RULES} rules and {ARTICLES} articles written in {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let mut config = CommonConfig::new(&nats.url, &db.url);
    config.db_pool_size = 24;
    let client = firstline_shared::bus::connect(&config).await?;
    let js = async_nats::jetstream::new(client.clone());
    firstline_shared::bus::ensure_streams(&js).await?;
    firstline_shared::db::migrate(&db.url).await?;

    let qs = questions(n, &arts);
    // Conversations in `bot`, each with its customer message, as ingest leaves them.
    let ids: Vec<(Uuid, Uuid, usize)> = (0..n)
        .map(|i| (Uuid::now_v7(), Uuid::now_v7(), i % CHANNELS))
        .collect();
    for (k, chunk) in ids.chunks(5_000).enumerate() {
        let conv: Vec<Uuid> = chunk.iter().map(|c| c.0).collect();
        let msg: Vec<Uuid> = chunk.iter().map(|c| c.1).collect();
        let chan: Vec<String> = chunk.iter().map(|c| format!("c{}", c.2)).collect();
        let cust: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
        let text: Vec<&str> = (0..chunk.len())
            .map(|i| qs[k * 5_000 + i].as_str())
            .collect();
        pg.execute(
            "INSERT INTO customers (id, tenant_id, channel_id, external_id)
             SELECT cu, 'bench', ch, cu::text FROM unnest($1::uuid[], $2::text[]) AS t(cu, ch)",
            &[&cust, &chan],
        )
        .await?;
        pg.execute(
            "INSERT INTO conversations (id, tenant_id, channel_id, customer_id, state, bot_at)
             SELECT co, 'bench', ch, cu, 'bot', now() FROM unnest($1::uuid[], $2::text[], $3::uuid[]) AS t(co, ch, cu)",
            &[&conv, &chan, &cust],
        )
        .await?;
        pg.execute(
            "INSERT INTO messages (id, tenant_id, channel_id, conversation_id, external_id, author, body, routed_to)
             SELECT m, 'bench', ch, co, m::text, 'customer', b, 'bot' FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[]) AS t(m, ch, co, b)",
            &[&msg, &chan, &conv, &text],
        )
        .await?;
    }
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(firstline_bot_router::run(
        firstline_bot_router::Config::new(config.clone()),
        shutdown.clone(),
    ));
    // Warm up: the first message of the tenant loads and builds its content.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut deliveries = client.subscribe("fl.bench.delivery.customer").await?;
    let mut sent_at: HashMap<Uuid, Instant> = HashMap::with_capacity(n);
    let started = Instant::now();
    for (i, chunk) in ids.chunks(256).enumerate() {
        let mut acks = Vec::with_capacity(chunk.len());
        for (j, (conv, msg, _channel)) in chunk.iter().enumerate() {
            let body = json!({"version": 1, "conversation_id": conv, "message_id": msg, "text": qs[i * 256 + j]});
            sent_at.insert(*conv, Instant::now());
            acks.push(
                js.publish(format!("fl.bench.bot.{conv}"), body.to_string().into())
                    .await?,
            );
        }
        for a in acks {
            a.await?;
        }
    }
    let mut latency = Histogram::<u64>::new(3)?;
    let mut got = 0;
    while got < n {
        let m = tokio::time::timeout(Duration::from_secs(60), deliveries.next())
            .await?
            .expect("subscription open");
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        if let Some(conv) = v["message"]["conversation_id"]
            .as_str()
            .and_then(|c| c.parse::<Uuid>().ok())
        {
            if let Some(t) = sent_at.get(&conv) {
                latency.record(t.elapsed().as_micros() as u64)?;
            }
        }
        got += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let router_per_s = n as f64 / elapsed;
    println!(
        "bot-router: {n} messages answered in {elapsed:.1} s: {router_per_s:.0} replies/s; publish-to-reply p50 {:.1} ms, p99 {:.1} ms",
        percentile(&latency, 0.5),
        percentile(&latency, 0.99)
    );
    figures.insert(
        "bot_router_replies_per_s".into(),
        json!(router_per_s.round()),
    );
    figures.insert("bot_router_p50_ms".into(), json!(percentile(&latency, 0.5)));
    figures.insert(
        "bot_router_p99_ms".into(),
        json!(percentile(&latency, 0.99)),
    );
    shutdown.cancel();
    let _ = worker.await;

    // 3. End to end: inbound -> ingest -> bot-router -> notifier -> outbound.
    let shutdown = CancellationToken::new();
    let workers = tokio::spawn(firstline::run_all(config.clone(), shutdown.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut outbound = client.subscribe("fl.bench.outbound.*").await?;
    let started = Instant::now();
    let qs = questions(n, &arts);
    for (i, chunk) in qs.chunks(256).enumerate() {
        let mut acks = Vec::with_capacity(chunk.len());
        for (j, q) in chunk.iter().enumerate() {
            let k = i * 256 + j;
            let body = json!({"version": 1, "message_id": format!("e2e-{k}"), "customer": {"id": format!("e2e-{k}")}, "text": q});
            acks.push(
                js.publish(
                    format!("fl.bench.inbound.c{}", k % CHANNELS),
                    body.to_string().into(),
                )
                .await?,
            );
        }
        for a in acks {
            a.await?;
        }
    }
    let mut got = 0;
    while got < n {
        tokio::time::timeout(Duration::from_secs(120), outbound.next())
            .await?
            .expect("subscription open");
        got += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let e2e_per_s = n as f64 / elapsed;
    println!("end to end: {n} inbound messages answered on outbound in {elapsed:.1} s: {e2e_per_s:.0} replies/s");
    figures.insert("end_to_end_replies_per_s".into(), json!(e2e_per_s.round()));
    shutdown.cancel();
    let _ = workers.await;
    figures.insert("messages".into(), json!(n));
    figures.insert("rules".into(), json!(RULES));
    figures.insert("articles".into(), json!(ARTICLES));
    println!("{}", serde_json::Value::Object(figures));
    Ok(())
}
