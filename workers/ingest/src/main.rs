//! `firstline-ingest`: see the crate documentation.

fn main() -> anyhow::Result<()> {
    firstline_shared::worker::main("firstline-ingest", firstline_ingest::run)
}
