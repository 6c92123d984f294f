//! `firstline-dispatcher`: see the crate documentation.

fn main() -> anyhow::Result<()> {
    firstline_shared::worker::main("firstline-dispatcher", firstline_dispatcher::run)
}
