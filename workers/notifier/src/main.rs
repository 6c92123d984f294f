//! `firstline-notifier`: see the crate documentation.

fn main() -> anyhow::Result<()> {
    firstline_shared::worker::main("firstline-notifier", firstline_notifier::run)
}
