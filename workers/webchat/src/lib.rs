//! `firstline-webchat`: a reference web-chat gateway, a process of its own that talks to FIRST
//! LINE over NATS only, as a tenant's fenced gateway user (`firstline nats-config --gateway
//! <tenant>:<password>`), exactly as a third-party gateway would. It serves:
//!
//! - `/widget.js` (and `/widget.css`): the chat widget, plain JavaScript; a script tag mounts it
//!   on any page (docs/webchat.md). Buttons and images of the bot's replies are shown; zh-TW
//!   and English.
//! - `/`: a demo page with the widget.
//! - `/ws`: the widget's WebSocket ([`socket`]).
//!
//! Customer messages are published to `fl.<tenant>.inbound.<channel>.<customer key>`
//! (`FL_INBOUND_KEYED`, ordered per customer) with `Nats-Msg-Id: <tenant>:<channel>:<message
//! id>` ([`inbound`]); replies are read from `FL_OUTBOUND` with the
//! gateway's durable consumer ([`outbound`]) and delivered to the customer's open widgets;
//! each customer's recent transcript is kept so that a reconnecting widget gets exactly what it
//! missed ([`transcript`]); returning customers are identified with a signed token
//! ([`identity`]).

pub mod identity;
pub mod inbound;
pub mod outbound;
mod socket;
pub mod transcript;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use firstline_shared::bus::JetStream;
use firstline_shared::domain::{ChannelId, TenantId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::transcript::{Hub, Transcript};

/// Settings of the gateway: flags, else environment variables, else defaults.
#[derive(Clone, clap::Parser)]
#[command(
    name = "firstline-webchat",
    about = "A reference web-chat gateway: the chat widget over WebSocket, FIRST LINE over NATS"
)]
pub struct Config {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "FL_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// The tenant's gateway user (`gateway-<tenant>` in `firstline nats-config`).
    #[arg(long, env = "FL_NATS_USER")]
    pub nats_user: Option<String>,
    /// Its password (never logged).
    #[arg(long, env = "FL_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS credentials file (JWT and nkey seed), instead of a password.
    #[arg(long, env = "FL_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) to verify the NATS server with; implies TLS.
    #[arg(long, env = "FL_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// The tenant whose customers this gateway serves.
    #[arg(long, env = "FL_WEBCHAT_TENANT")]
    pub tenant: String,
    /// The tenant's channel of this gateway.
    #[arg(long, env = "FL_WEBCHAT_CHANNEL", default_value = "webchat")]
    pub channel: String,
    /// Where the widget, the demo page and the WebSocket are served.
    #[arg(long, env = "FL_WEBCHAT_ADDR", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// The tenant's customer-identity secret: a returning customer's token is
    /// hex(HMAC-SHA256(secret, customer_id)). Unset: anonymous visitors only (never logged).
    #[arg(long, env = "FL_WEBCHAT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// The client's inbox prefix (default `_INBOX_<tenant>`, the one the fenced user may read).
    #[arg(long, env = "FL_WEBCHAT_INBOX_PREFIX")]
    pub inbox_prefix: Option<String>,
    /// The durable consumer on FL_OUTBOUND (default `gateway-<tenant>`, the one the fenced
    /// user may use).
    #[arg(long, env = "FL_WEBCHAT_CONSUMER")]
    pub consumer: Option<String>,
    /// The consumer that re-reads recent replies at start (default `replay-<tenant>`).
    #[arg(long, env = "FL_WEBCHAT_REPLAY_CONSUMER")]
    pub replay_consumer: Option<String>,
    /// At start, the replies of this many seconds back are read again from the stream into
    /// the transcripts (which live in memory): a restart then loses none of them. 0: none.
    #[arg(long, env = "FL_WEBCHAT_REPLAY_SECS", default_value_t = 3600)]
    pub replay_secs: u64,
    /// Transcript entries kept per customer for reconnecting widgets.
    #[arg(long, env = "FL_WEBCHAT_KEEP", default_value_t = 200)]
    pub keep: usize,
    /// Customers whose transcripts are kept (the least recently active are forgotten first).
    #[arg(long, env = "FL_WEBCHAT_CUSTOMERS", default_value_t = 10_000)]
    pub customers: usize,
}

impl Config {
    /// Defaults for `tenant` on `nats_url`, listening on `listen`: for tests and scripts.
    pub fn new(nats_url: impl Into<String>, tenant: &str, listen: SocketAddr) -> Self {
        Self {
            nats_url: nats_url.into(),
            nats_user: None,
            nats_password: None,
            nats_creds: None,
            nats_tls_ca: None,
            tenant: tenant.to_owned(),
            channel: "webchat".into(),
            listen,
            secret: None,
            inbox_prefix: None,
            consumer: None,
            replay_consumer: None,
            replay_secs: 3600,
            keep: 200,
            customers: 10_000,
        }
    }

    /// The settings without secrets, for the log.
    pub fn redacted(&self) -> String {
        format!(
            "nats_url={} nats_user={} tenant={} channel={} listen={} secret={} consumer={} keep={}",
            redact_url(&self.nats_url),
            self.nats_user.as_deref().unwrap_or("-"),
            self.tenant,
            self.channel,
            self.listen,
            if self.secret.is_some() {
                "set"
            } else {
                "unset"
            },
            self.consumer_name(),
            self.keep,
        )
    }

    pub fn consumer_name(&self) -> String {
        self.consumer
            .clone()
            .unwrap_or_else(|| format!("gateway-{}", self.tenant))
    }

    pub fn replay_consumer_name(&self) -> String {
        self.replay_consumer
            .clone()
            .unwrap_or_else(|| format!("replay-{}", self.tenant))
    }

    fn inbox(&self) -> String {
        self.inbox_prefix
            .clone()
            .unwrap_or_else(|| format!("_INBOX_{}", self.tenant))
    }
}

fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| {
            match u
                .split_once("://")
                .and_then(|(s, rest)| Some((s, rest.split_once('@')?)))
            {
                Some((scheme, (userinfo, host))) => {
                    let user = userinfo.split(':').next().unwrap_or("");
                    format!("{scheme}://{user}:***@{host}")
                }
                None => u.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct Gateway {
    pub tenant: TenantId,
    pub channel: ChannelId,
    pub js: JetStream,
    pub hub: Hub,
    secret: Option<String>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Connects as the gateway user: its credentials, its inbox prefix, reconnecting forever.
pub async fn connect(config: &Config) -> anyhow::Result<async_nats::Client> {
    let login = firstline_shared::bus::connect::Login {
        url: &config.nats_url,
        user: config.nats_user.as_deref(),
        password: config.nats_password.as_deref(),
        creds: config.nats_creds.as_deref(),
        tls_ca: config.nats_tls_ca.as_deref(),
        ..Default::default()
    };
    let options = async_nats::ConnectOptions::new().custom_inbox_prefix(config.inbox());
    firstline_shared::bus::connect::connect_as(&login, options).await
}

const WIDGET_JS: &str = include_str!("../static/widget.js");
const WIDGET_CSS: &str = include_str!("../static/widget.css");
const DEMO_PAGE: &str = include_str!("../static/index.html");

/// The gateway's HTTP routes.
pub fn app(gateway: Gateway) -> axum::Router {
    axum::Router::new()
        .route("/", get(|| async { Html(DEMO_PAGE) }))
        .route(
            "/widget.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    WIDGET_JS,
                )
                    .into_response()
            }),
        )
        .route(
            "/widget.css",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
                    WIDGET_CSS,
                )
                    .into_response()
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/ws", get(socket::widget_socket))
        .with_state(gateway)
}

/// Runs the gateway until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    serve(config, listener, shutdown).await
}

/// Serves on `listener` (tests bind port 0 first) until `shutdown`: the widget, its
/// WebSocket and the outbound consumer; then waits for the open sessions.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tenant = TenantId::parse(config.tenant.clone()).context("FL_WEBCHAT_TENANT")?;
    let channel = ChannelId::parse(config.channel.clone()).context("FL_WEBCHAT_CHANNEL")?;
    tracing::info!(config = %config.redacted(), "starting");
    let nats = connect(&config).await?;
    let js = async_nats::jetstream::new(nats.clone());
    // Entry numbers start from the clock, so they keep growing across restarts.
    let first_seq = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0);
    let hub = Hub::new(Transcript::new(config.keep, config.customers, first_seq));
    let tasks = TaskTracker::new();
    let gateway = Gateway {
        tenant: tenant.clone(),
        channel: channel.clone(),
        js: js.clone(),
        hub: hub.clone(),
        secret: config.secret.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    };
    tasks.spawn(outbound::consume(
        js,
        outbound::Consumers {
            name: config.consumer_name(),
            replay_name: config.replay_consumer_name(),
            replay: Duration::from_secs(config.replay_secs),
        },
        tenant,
        channel,
        hub,
        shutdown.clone(),
    ));
    tracing::info!("web chat on http://{}", listener.local_addr()?);
    let stop = shutdown.clone();
    let served = axum::serve(listener, app(gateway))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    if let Err(e) = nats.flush().await {
        tracing::warn!("flushing NATS on shutdown: {e}");
    }
    served.context("serving HTTP")
}
