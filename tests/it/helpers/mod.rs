//! Helpers of the end-to-end tests, in one place: what the benchmarks share lives in the
//! `firstline-tests` library (`tests/src/`: a NATS server, a database, worker processes,
//! waiting for state) and is re-exported here; what only the tests use is beside this file.

pub mod api;
mod app;
pub mod browser;
pub mod desk;
pub mod desk_page;
pub mod marks;
mod order;
mod postgres;
pub mod webchat;

pub use app::TestApp;
pub use browser::{Browser, Page};
pub use firstline_tests::db::{count, TestDb};
pub use firstline_tests::nats::TestNats;
pub use firstline_tests::wait::{eventually, holds_for, next_json, next_matching, wait_for_count};
pub use firstline_tests::workers::WorkerProcess;
pub use order::assert_each_customer_in_order;
pub use postgres::TestPostgres;
