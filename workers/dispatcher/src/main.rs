//! `firstline-dispatcher`: see the crate documentation.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    firstline_shared::worker::main("firstline-dispatcher", firstline_dispatcher::run).await
}
