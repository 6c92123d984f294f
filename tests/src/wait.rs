//! Waiting for eventually-consistent state without fixed sleeps: poll a condition under a
//! timeout ([`eventually`], [`wait_for_count`]), receive until a message matches
//! ([`next_matching`]), or check that a condition keeps holding for a while ([`holds_for`]).

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;

use crate::db::count;

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Checks `check` over and over for `window` and panics naming `what` the first time it is
/// false: for what must stay so once a state is reached (nothing more offered, no second copy
/// stored). The window is how long the test watches, not a wait for state; the last check is
/// made at its end.
pub async fn holds_for<F, Fut>(what: &str, window: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    let deadline = start + window;
    loop {
        assert!(
            check().await,
            "{what} no longer held after {:?} of {window:?}",
            start.elapsed()
        );
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return;
        }
        tokio::time::sleep((deadline - now).min(Duration::from_millis(25))).await;
    }
}

/// Waits until the count `sql` returns equals `expected`, or panics after `timeout` naming `what`.
pub async fn wait_for_count(
    pg: &tokio_postgres::Client,
    what: &str,
    timeout: Duration,
    sql: &str,
    expected: i64,
) {
    eventually(what, timeout, || async {
        (count(pg, sql, &[]).await == expected).then_some(())
    })
    .await
}

/// Receives the next message on a subscription as JSON, within 20 s.
pub async fn next_json(sub: &mut async_nats::Subscriber, what: &str) -> serde_json::Value {
    let m = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("subscription open");
    serde_json::from_slice(&m.payload).unwrap_or_else(|e| panic!("{what} is not JSON: {e}"))
}

/// Receives messages until one satisfies `pred`, within 20 s.
pub async fn next_matching(
    sub: &mut async_nats::Subscriber,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let m = tokio::time::timeout(left, sub.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("subscription open");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        if pred(&v) {
            return v;
        }
    }
}
