//! The common crate of FIRST LINE routing: what every worker shares.
//!
//! - [`domain`]: typed ids, skill sets and the conversation states of SPEC S.
//! - [`wire`]: the versioned JSON messages on NATS and their decoding rules.
//! - [`subjects`]: the subject names (tenant first, DESIGN.md) and streams.
//! - [`config`]: the settings every worker reads (flags or `FL_*` variables).
//! - [`telemetry`]: tracing and OpenTelemetry set-up, trace context in NATS headers.
//! - [`bus`]: NATS JetStream set-up, publishing, and the consume loop that decides acks and dead letters.
//! - [`db`]: the Postgres pool, migrations and the queries shared by several workers (the one
//!   writer of tenant settings among them).
//! - [`hours`]: a channel's business hours (營業時間): the configured form, its checks, and
//!   whether the channel is open (the API checks them, the bot-router applies them).
//! - [`metrics`]: the Prometheus metrics every worker reports.
//! - [`outbox`]: messages written in the same transaction as the state change, published after commit.
//! - [`shutdown`]: one cancellation token for SIGINT/SIGTERM; a second signal exits at once.
//! - [`worker`]: start-up, the background tasks waited for at the end, and the `main` shared
//!   by the worker binaries.

pub mod batch;
pub mod bus;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod hours;
pub mod metrics;
pub mod outbox;
pub mod partitions;
pub mod place_in_line;
pub mod service_level;
pub mod shutdown;
pub mod subjects;
pub mod survey;
pub mod telemetry;
pub mod text;
pub mod wire;
pub mod worker;

pub use error::HandleError;

/// Makes ring the process's TLS provider: the NATS client uses it, and the HTTP clients
/// (OTLP export, webhooks) are built without a default one. Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
