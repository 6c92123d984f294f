//! The end-to-end tests, as one binary: each module was its own test binary, linking every
//! crate again; here they link once. A test is named `<module>::<function>`, so
//! `cargo nextest run -p firstline-tests -E 'test(/^dispatch::/)'` runs one file's tests.

mod helpers;

mod actions;
mod api;
mod api_fuzz;
mod api_input;
mod bot;
mod bus;
mod chaos;
mod cluster;
mod dashboard;
mod demo;
mod desk;
mod dispatch;
mod docs;
mod faults;
mod fencing;
mod group_commit;
mod house;
mod live;
mod load;
mod lock_order;
mod metrics;
mod multi_instance;
mod observe;
mod pipeline;
mod place_in_line;
mod poison;
mod readme;
mod responsible;
mod scale_out;
mod schemas;
mod service_level;
mod statements;
mod statuses;
mod tracing;
mod transfer;
mod try_it;
mod webchat;
mod webhooks;
mod weight;
