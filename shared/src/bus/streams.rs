//! The streams of [`ALL_STREAMS`], created or updated to this build's configuration.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::stream;

use super::JetStream;
use crate::subjects::{StreamSpec, ALL_STREAMS};

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
        duplicate_window: Duration::from_secs(120),
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
