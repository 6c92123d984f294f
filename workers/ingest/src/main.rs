//! `firstline-ingest`: see the crate documentation.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    firstline_shared::worker::main("firstline-ingest", firstline_ingest::run).await
}
