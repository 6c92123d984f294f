//! The streams of [`ALL_STREAMS`], created or updated to this build's configuration.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::stream;

use super::JetStream;
use crate::subjects::{StreamSpec, ALL_STREAMS, INBOUND};

/// How long a stream remembers a `Nats-Msg-Id` to drop a second publish of it: JetStream's
/// usual two minutes.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// `FL_INBOUND`'s window: the shortest JetStream keeps (it treats 0 as "the default").
/// The window is keyed by the header alone, across the whole stream, before ingest sees
/// anything; a gateway that still sends the old `<channel>:<message id>` (without the tenant)
/// would have one tenant's message dropped as a "duplicate" of another's. So the stream does
/// not de-duplicate inbound messages and ingest does, by the unique key (tenant, channel,
/// message id) in Postgres: a retry is stored once, two tenants' same ids are two messages
/// (docs/operations.md).
const INBOUND_DUPLICATE_WINDOW: Duration = Duration::from_millis(100);

/// Creates every stream of [`ALL_STREAMS`], or updates it to this build's configuration.
/// Safe to run from every instance at every start ([`crate::worker::Services::start`] does).
pub async fn ensure_streams(js: &JetStream) -> anyhow::Result<()> {
    for spec in ALL_STREAMS {
        ensure_stream(js, spec).await?;
    }
    Ok(())
}

/// Creates the stream, or updates it to this configuration (a new version may change it).
async fn ensure_stream(js: &JetStream, spec: StreamSpec) -> anyhow::Result<()> {
    let config = stream::Config {
        name: spec.name.to_owned(),
        subjects: vec![spec.subjects.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_secs(spec.max_age_hours * 3600),
        duplicate_window: if spec.name == INBOUND.name {
            INBOUND_DUPLICATE_WINDOW
        } else {
            DUPLICATE_WINDOW
        },
        // Direct gets answer the partition mark's question (`partition_sequences`).
        allow_direct: true,
        subject_transform: spec
            .transform
            .map(|(source, destination)| stream::SubjectTransform {
                source: source.to_owned(),
                destination: destination.to_owned(),
            }),
        ..Default::default()
    };
    js.create_or_update_stream(config)
        .await
        .with_context(|| format!("creating stream {}", spec.name))?;
    Ok(())
}
