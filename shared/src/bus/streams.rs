//! The streams of [`ALL_STREAMS`], created or updated to this build's configuration.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::stream;

use super::JetStream;
use crate::subjects::{StreamSpec, ALL_STREAMS, INBOUND, INBOUND_KEYED};

/// How long a stream remembers a `Nats-Msg-Id` to drop a second publish of it: JetStream's
/// usual two minutes.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// `FL_INBOUND`'s (and `FL_INBOUND_KEYED`'s) window: the shortest JetStream keeps (it treats 0 as "the default").
/// The window is keyed by the header alone, across the whole stream, before ingest sees
/// anything; a gateway that still sends the old `<channel>:<message id>` (without the tenant)
/// would have one tenant's message dropped as a "duplicate" of another's. So the stream does
/// not de-duplicate inbound messages and ingest does, by the unique key (tenant, channel,
/// message id) in Postgres: a retry is stored once, two tenants' same ids are two messages
/// (docs/operations.md).
const INBOUND_DUPLICATE_WINDOW: Duration = Duration::from_millis(100);

/// Creates every stream of [`ALL_STREAMS`] with one replica, or updates it to this build's
/// configuration. Safe to run from every instance at every start.
pub async fn ensure_streams(js: &JetStream) -> anyhow::Result<()> {
    ensure_streams_with(js, 1, crate::subjects::DEFAULT_PARTITIONS).await
}

/// Creates every stream of [`ALL_STREAMS`] with `replicas` replicas (`FL_STREAM_REPLICAS`)
/// and the partitioned ones with `partitions` partitions (`FL_PARTITIONS`), or updates them
/// to this build's configuration and those numbers. Safe to run from every
/// instance at every start ([`crate::worker::Services::start`] does), at the same moment too:
/// on a cluster, several workers creating the same replicated stream at once can leave a
/// request unanswered (NATS 2.12), so each stream is asked again, after a jittered delay,
/// until it answers.
pub async fn ensure_streams_with(
    js: &JetStream,
    replicas: usize,
    partitions: u32,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=5).contains(&replicas),
        "FL_STREAM_REPLICAS is {replicas}: JetStream keeps 1 to 5 replicas of a stream"
    );
    anyhow::ensure!(
        (1..=1024).contains(&partitions),
        "FL_PARTITIONS is {partitions}: 1 to 1024"
    );
    for spec in ALL_STREAMS {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match ensure_stream(js, spec, replicas, partitions).await {
                Ok(()) => break,
                // A refusal (a single server asked for 3 replicas, say) is final; no answer
                // (a timeout, a leader being elected) is worth asking again.
                Err(e) if attempt < CREATE_ATTEMPTS && !refused(&e) => {
                    let delay = jittered(attempt);
                    tracing::warn!(
                        stream = spec.name,
                        attempt,
                        ?delay,
                        "stream not ready, asking again: {e:#}"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    return Err(e.context(format!(
                        "creating stream {} with {replicas} replica(s) (FL_STREAM_REPLICAS; \
                         more than 1 needs a JetStream cluster of at least that many nodes)",
                        spec.name
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Tries of one stream's creation before giving up (about a minute with the delays).
const CREATE_ATTEMPTS: u32 = 12;

/// Whether the server refused the stream for good (more replicas than it has nodes for),
/// rather than not answering or being busy electing a leader.
fn refused(e: &anyhow::Error) -> bool {
    use async_nats::jetstream::context::{CreateStreamError, CreateStreamErrorKind};
    use async_nats::jetstream::ErrorCode;
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<CreateStreamError>().map(|c| c.kind()),
            Some(CreateStreamErrorKind::JetStream(api))
                if [ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED, ErrorCode::INSUFFICIENT_RESOURCES]
                    .contains(&api.error_code())
        )
    })
}

/// 0.25 s, 0.5 s, 1 s… up to 8 s, each with up to half of it again at random, so that
/// workers started together do not ask together again.
fn jittered(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let base = Duration::from_millis(250 << attempt.min(5)).min(Duration::from_secs(8));
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    base + base.mul_f64((random % 1000) as f64 / 2000.0)
}

/// Creates the stream, or updates it to this configuration (a new version may change it).
async fn ensure_stream(
    js: &JetStream,
    spec: StreamSpec,
    replicas: usize,
    partitions: u32,
) -> anyhow::Result<()> {
    let config = stream::Config {
        name: spec.name.to_owned(),
        subjects: vec![spec.subjects.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_secs(spec.max_age_hours * 3600),
        num_replicas: replicas,
        duplicate_window: if [INBOUND.name, INBOUND_KEYED.name].contains(&spec.name) {
            INBOUND_DUPLICATE_WINDOW
        } else {
            DUPLICATE_WINDOW
        },
        // Direct gets find the strays of a partitioned stream (`bus::strays`).
        allow_direct: true,
        subject_transform: spec.transform(partitions).map(|(source, destination)| {
            stream::SubjectTransform {
                source,
                destination,
            }
        }),
        ..Default::default()
    };
    js.create_or_update_stream(config)
        .await
        .with_context(|| format!("creating stream {}", spec.name))?;
    Ok(())
}
