//! Helpers of the end-to-end tests (`tests/it/`) and of the benchmarks (`tests/benches/`):
//! each test gets its own NATS JetStream server (on a free port, with a temporary store) and
//! its own Postgres database, and runs the real workers over them. Nothing here fakes NATS or
//! Postgres. What only the tests use (the whole system in one process, the HTTP API client, a
//! Postgres server to crash) is in `tests/it/helpers/`.
//!
//! - `NATS_SERVER_BIN`: the server binary (default `nats-server` on PATH; 2.10 or later).
//! - `FL_TEST_PG_URL`: an admin connection (default `postgres://postgres:postgres@127.0.0.1:5432/postgres`).
//! - `TEST_LOG=1`: show the workers' logs.

pub mod db;
pub mod metrics;
pub mod nats;
pub mod pgstat;
pub mod wait;
pub mod workers;
