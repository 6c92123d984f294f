//! The mixes of messages the load generator sends (`firstline load --mix`, `FL_BENCH_MIX` of
//! `scripts/bench e2e`), as shares of [`LoadOptions`](super::LoadOptions):
//!
//! | mix | what | conversations opened |
//! |---|---|---|
//! | `cold` | a desk starting: most bot customers write once (30,000 of them over a short run), 10 % hand-overs, 10 % on channels without bot | about 0.8 per message |
//! | `steady` | a running desk: returning customers write about eight messages each to the bot over the run, 2 % hand-overs, 3 % direct | about 0.17 per message |
//! | `one-channel` | one tenant's one channel with the bot (what only the customer key in the subject spreads over instances), 10 % hand-overs | about 0.8 per message |

use super::LoadOptions;

/// A mix of messages (see the module).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    Cold,
    Steady,
    OneChannel,
}

impl Mix {
    /// The mix named `s` as `--mix` takes it (clap's names: `cold`, `steady`, `one-channel`).
    pub fn parse(s: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(s, false).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cold => "cold",
            Self::Steady => "steady",
            Self::OneChannel => "one-channel",
        }
    }

    /// Sets the shares, tenants, channels and customers of `opts` for this mix, at its rate
    /// and duration (a steady mix's customers are counted from them: about eight bot messages
    /// each).
    pub fn apply(self, opts: &mut LoadOptions) {
        let one_channel = self == Self::OneChannel;
        opts.tenants = if one_channel { 1 } else { 3 };
        opts.channels = if one_channel { 1 } else { 2 };
        let messages = opts.rate * opts.duration.as_secs_f64();
        (opts.bot_share, opts.handover_share, opts.customers) = match self {
            Self::Cold => (0.8, 0.1, 30_000),
            Self::OneChannel => (0.9, 0.1, 30_000),
            Self::Steady => (0.95, 0.02, ((messages * 0.95 / 8.0) as usize).max(200)),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_mix_has_about_eight_bot_messages_per_customer() {
        let mut o = LoadOptions {
            rate: 1000.0,
            duration: std::time::Duration::from_secs(20),
            ..LoadOptions::default()
        };
        Mix::Steady.apply(&mut o);
        let per_customer = o.rate * 20.0 * o.bot_share / o.customers as f64;
        assert!((7.9..8.1).contains(&per_customer), "{per_customer}");
        for m in [Mix::Cold, Mix::Steady, Mix::OneChannel] {
            assert_eq!(Mix::parse(m.as_str()), Some(m));
        }
    }
}
