//! The API worker: what agents' desktops, supervisors' screens and admins' tools talk to.
//!
//! - A JSON HTTP API under `/api/v1` (its OpenAPI document at `/openapi.json`): tenant settings,
//!   channels, agents, presence, the agent's actions, conversations, the queue snapshot, tokens
//!   and webhooks. Tokens are per tenant with a role ([`auth`]).
//! - Live agent notifications over a WebSocket ([`live`]): offers with their deadline,
//!   revocations, customer messages, from `fl.<tenant>.notify.<agent>`, resumable after a
//!   reconnect.
//! - The queue dashboard page (`/dashboard`, 交談佇列), updated live over server-sent events.
//! - The agent desk (`/desk`, 專員工作台, [`desk`]): offers, transcripts, replies, over the
//!   same public API.
//! - Webhooks ([`webhooks`]): conversation events POSTed to each tenant's URLs, signed with
//!   HMAC-SHA256, retried with backoff, dead-lettered after the last try.
//!
//! Presence and actions are not applied here: the API checks them against the database (so a
//! bad request gets its 4xx at once) and publishes them on the same subjects a desktop on NATS
//! would (`fl.<tenant>.presence.<agent>`, `fl.<tenant>.agent.<agent>.action`); the dispatcher
//! and notifier apply them. Several API instances can run side by side.

pub mod auth;
mod desk;
pub mod error;
mod live;
mod routes;
pub mod signing;
pub mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::response::{Html, IntoResponse, Redirect};
use axum::routing::get;
use axum::Json;
use deadpool_postgres::Pool;
use firstline_shared::bus::JetStream;
use firstline_shared::config::CommonConfig;
use firstline_shared::worker::Services;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

/// Settings of the API worker.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "firstline-api",
    about = "HTTP API, live agent notifications, the queue dashboard and webhooks"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,
    /// Address the HTTP API listens on.
    #[arg(long, env = "FL_API_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub webhooks: webhooks::WebhookConfig,
}

impl Config {
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            webhooks: webhooks::WebhookConfig::default(),
        }
    }
}

impl firstline_shared::worker::WorkerConfig for Config {
    fn common(&self) -> &CommonConfig {
        &self.common
    }
}

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: Pool,
    pub js: JetStream,
    pub nats: async_nats::Client,
    /// Ends WebSocket and event streams when the process stops.
    pub shutdown: CancellationToken,
    /// The worker's background tasks: a live session is one (a token of it) while it runs,
    /// so that the worker waits for it to end before it exits.
    pub tasks: TaskTracker,
    pub doc: Arc<utoipa::openapi::OpenApi>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "FIRST LINE routing API",
        description = "Tenants' settings, channels, agents, presence, the agent's actions, conversations, the queue, tokens and webhooks. Every request sends `Authorization: Bearer <token>`; the token decides the tenant and the role (admin, supervisor, agent). Errors are `{\"error\": {\"status\", \"message\"}}`."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "tenant", description = "The token's tenant and its settings"),
        (name = "channels", description = "Channels: required skills, bot, business hours"),
        (name = "agents", description = "Agents: skills, capacity, presence"),
        (name = "customers", description = "Customers and their responsible agent (SPEC D11), dealt out in turn"),
        (name = "conversations", description = "Conversations and the agent's actions on them"),
        (name = "queue", description = "The queue snapshot (交談佇列) and its live updates"),
        (name = "live", description = "Live notifications for an agent's desktop"),
        (name = "admin", description = "Tokens and webhooks"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A tenant's API token (fl_...)"))
                    .build(),
            ),
        );
    }
}

/// Documents on every operation (applied once the routes are registered) the errors any request may get, all with the error body
/// (`ErrorBody`): 400, 401, 403 and 503 everywhere, 404 where the path names something, and
/// 413, 415 and 422 where there is a request body. Responses an operation documents itself
/// (a 409 with its reason...) are kept.
struct ErrorResponses;

impl utoipa::Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let names_something = path.contains('{');
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let has_body = op.request_body.is_some();
                let mut wanted = vec![
                    (
                        "400",
                        "Malformed JSON, or a bad query parameter, path or header",
                    ),
                    ("401", "No token, or an unknown or revoked one"),
                    ("403", "The token's role may not do this"),
                    ("503", "The database is unavailable; try again"),
                ];
                if names_something {
                    wanted.push(("404", "Nothing with this id in the token's tenant"));
                }
                if has_body {
                    wanted.push(("413", "The body is larger than 65536 bytes"));
                    wanted.push(("415", "The body is not sent as application/json"));
                    wanted.push((
                        "422",
                        "A field is missing, unknown, of the wrong type or out of its limits (the message names it)",
                    ));
                }
                for (status, description) in wanted {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| error(description).into());
                }
            }
        }
    }
}

/// The whole HTTP application over `services`.
pub fn app(services: &Services, shutdown: CancellationToken) -> axum::Router {
    let (router, mut doc) =
        routes::register(OpenApiRouter::with_openapi(ApiDoc::openapi())).split_for_parts();
    // After the routes: their operations are in the document only now.
    utoipa::Modify::modify(&ErrorResponses, &mut doc);
    let state = AppState {
        pool: services.pool.clone(),
        js: services.js.clone(),
        nats: services.nats.clone(),
        shutdown,
        tasks: services.tasks(),
        doc: Arc::new(doc),
    };
    router
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok" }))
        .route("/", get(|| async { Redirect::temporary("/dashboard") }))
        .route("/dashboard", get(dashboard))
        .merge(desk::routes())
        .method_not_allowed_fallback(error::no_method)
        .fallback(error::no_route)
        .layer(axum::extract::DefaultBodyLimit::max(error::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(trace_request))
        .with_state(state)
}

/// A span per request: what the handler publishes carries its trace context, so one trace
/// runs from an agent's click to the dispatcher's decision and the customer's message.
async fn trace_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "http",
        method = %request.method(),
        path = %request.uri().path(),
        status = tracing::field::Empty
    );
    async move {
        let response = next.run(request).await;
        let status = response.status().as_u16();
        tracing::Span::current().record("status", status);
        metrics::counter!("fl_api_requests_total", "status" => status.to_string()).increment(1);
        response
    }
    .instrument(span)
    .await
}

async fn openapi(axum::extract::State(state): axum::extract::State<AppState>) -> impl IntoResponse {
    Json(state.doc.as_ref().clone())
}

/// The queue dashboard (交談佇列): one self-contained page; it asks for a token and reads the
/// API like any other client.
async fn dashboard() -> Html<&'static str> {
    Html(include_str!("../static/dashboard.html"))
}

/// Makes ring the process's TLS provider (reqwest is built without a default one; the NATS
/// client uses ring too). Safe to call more than once.
pub fn install_crypto() {
    firstline_shared::install_crypto_provider();
}

/// Serves on `config.listen` until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", config.listen))?;
    serve(config, listener, shutdown).await
}

/// Serves on `listener` (tests bind port 0 first) until `shutdown`; runs the webhook consumer
/// and sender beside it. Returns when the HTTP connections, the live sessions and the webhook
/// deliveries in flight have ended.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    install_crypto();
    let services = Services::start(&config.common, &shutdown).await?;
    // Live sessions and event streams end at shutdown, or when the worker closes after a failure.
    let app = app(&services, services.stopping());
    tracing::info!(addr = %listener.local_addr()?, "API listening");
    let hooks = webhooks::run(&services, &config.common, config.webhooks, shutdown.clone());
    let http = async {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await
            .map_err(anyhow::Error::from)
    };
    let result = tokio::try_join!(http, hooks).map(|_| ());
    services.close().await;
    result
}
