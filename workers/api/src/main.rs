//! `firstline-api`: see the crate documentation.

fn main() -> anyhow::Result<()> {
    firstline_shared::worker::main("firstline-api", firstline_api::run)
}
