//! A worker's Prometheus endpoint (`FL_METRICS_ADDR`), read as Prometheus would.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The text of `GET /metrics` at `addr`; empty if nothing answers (a killed worker).
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    if stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .is_err()
    {
        return String::new();
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body).await;
    body
}

/// The sum of the series whose line starts with `prefix` (ingest's consumers are one per
/// partition: `consumer="ingest-p0"`…), or `None` when there is none.
pub fn value(body: &str, prefix: &str) -> Option<f64> {
    let values: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Messages a worker instance handled (`fl_messages_total{outcome="ok"}` of the consumers
/// whose name starts with `consumer`, e.g. `ingest-`), 0 when it reports none.
pub fn handled(body: &str, consumer: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("fl_messages_total{{consumer=\"{consumer}")))
        .filter(|l| l.contains("outcome=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A free address on loopback for a worker's metrics.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], crate::nats::free_port()))
}
