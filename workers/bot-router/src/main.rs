//! `firstline-bot-router`: see the crate documentation.

fn main() -> anyhow::Result<()> {
    firstline_shared::worker::main("firstline-bot-router", firstline_bot_router::run)
}
