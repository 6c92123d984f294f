//! Whether every partition of the partitioned streams has been read to its end: each
//! partition's mark (`partition_marks`) against the stream's last sequence of the partition's
//! subjects (docs/ordering.md). A mark behind its partition's last message once the load is
//! over is a stalled partition.

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use firstline_shared::subjects::{self, StreamSpec};

/// The partitions of ingest (`ingest-p<n>` on `FL_INBOUND`, `ingest-k<n>` on
/// `FL_INBOUND_KEYED`) and of the bot-router (`bot-router-p<n>` on `FL_BOT`).
const SETS: [(&str, StreamSpec); 3] = [
    ("ingest-p", subjects::INBOUND),
    ("ingest-k", subjects::INBOUND_KEYED),
    ("bot-router-p", subjects::BOT),
];

/// How far the partitions are read.
#[derive(Debug, Default)]
pub struct Ends {
    /// The partitions whose mark is behind the partition's last message, as
    /// `name: mark < last`.
    pub behind: Vec<String>,
    /// How many partitions hold messages at all (so that an empty `behind` means something).
    pub with_messages: usize,
}

/// Every partition's mark against its last message; `None` if a stream did not answer
/// (asked again by the caller).
pub async fn ends(
    js: &async_nats::jetstream::Context,
    pg: &tokio_postgres::Client,
    partitions: u32,
) -> Option<Ends> {
    let marks: std::collections::HashMap<String, i64> = pg
        .query("SELECT consumer, stream_sequence FROM partition_marks", &[])
        .await
        .ok()?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut ends = Ends::default();
    for (prefix, spec) in SETS {
        let stream = js.get_stream_no_info(spec.name).await.ok()?;
        for n in 0..partitions {
            let filter = subjects::partition_filter(&spec, n);
            let last = match stream.get_last_raw_message_by_subject(&filter).await {
                Ok(m) => m.sequence,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => 0,
                Err(_) => return None,
            };
            ends.with_messages += usize::from(last > 0);
            let name = format!("{prefix}{n}");
            let mark = marks.get(&name).copied().unwrap_or(0) as u64;
            if mark < last {
                ends.behind
                    .push(format!("{name}: mark {mark} < last {last}"));
            }
        }
    }
    Some(ends)
}
