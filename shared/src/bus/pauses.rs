//! Why an ordered partition stops pulling for a while, and for how long: deliveries that
//! never arrived, an older delivery still out with another client, or a batch that does not
//! continue the partition's mark (docs/ordering.md).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::ordered::{ack_floor, partition_sequences, Partition};
use super::{ConsumerSpec, JetStream};

/// Watches a pull consumer's delivery sequence for deliveries that never arrived.
#[derive(Debug, Default)]
pub(super) struct DeliveryGaps {
    last: Option<u64>,
}

/// What one delivery's consumer sequence says, next to the ones seen before it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Seen {
    /// The one after the last seen.
    Next,
    /// The first seen, or one that went back (a server that restarted from a consumer state
    /// older than what it sent, and now sends again everything after that point): nothing
    /// before it was seen, so the deliveries it follows must be asked about.
    Fresh,
    /// This many deliveries before it never arrived.
    Missed(u64),
}

impl DeliveryGaps {
    fn see(&mut self, seq: u64) -> Seen {
        match self.last {
            Some(last) if seq > last + 1 => Seen::Missed(seq - last - 1),
            Some(last) if seq == last + 1 => {
                self.last = Some(seq);
                Seen::Next
            }
            _ => {
                self.last = Some(seq);
                Seen::Fresh
            }
        }
    }
}

/// Why a partition stops pulling for a while.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pause {
    /// Deliveries to this instance that never arrived.
    Missed(u64),
    /// An older message of the partition, at this stream sequence, is still delivered to
    /// another client and not acknowledged: the pin moved while it held it (a server restart
    /// forgets pins, say), and it comes again only after `ack_wait`. `None`: the server could
    /// not be asked, which is taken as a yes.
    Outstanding(Option<u64>),
    /// The batch's transaction found that it does not continue the partition's mark: the
    /// message at this stream sequence is not handled yet ([`crate::batch`]).
    Fenced(u64),
}

/// The partition's first message not yet acknowledged, if it comes before `stream_sequence`
/// (a fresh delivery of this instance's): an older delivery is then still out with another
/// client. The next message of the partition after its ack floor is the oldest one that is
/// not acknowledged. Asked once per fresh pull, so it costs two requests per partition and
/// start.
async fn older_delivery_outstanding(
    js: &JetStream,
    partition: &Partition,
    stream_sequence: u64,
) -> anyhow::Result<Option<u64>> {
    let floor = ack_floor(js, partition).await?;
    let oldest = partition_sequences(&js.client(), partition, floor, 1)
        .await?
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no message of {} after {floor}", partition.filter))?;
    Ok((oldest < stream_sequence).then_some(oldest))
}

/// Whether a delivery (`seen` against the ones before it) must wait: a pause, or `None` to
/// handle it. A fresh one asks the server, unless the partition has just paused.
async fn pause_before(
    seen: Seen,
    just_paused: bool,
    js: &JetStream,
    partition: &Partition,
    stream_sequence: u64,
) -> Option<Pause> {
    match seen {
        Seen::Next => None,
        Seen::Missed(n) => Some(Pause::Missed(n)),
        Seen::Fresh if just_paused => None,
        Seen::Fresh => match older_delivery_outstanding(js, partition, stream_sequence).await {
            Ok(older) => older.map(|seq| Pause::Outstanding(Some(seq))),
            Err(e) => {
                tracing::warn!(
                    consumer = partition.consumer,
                    "asking for the ack floor failed: {e:#}"
                );
                Some(Pause::Outstanding(None))
            }
        },
    }
}

/// What a partition has seen of its deliveries since it last started pulling.
///
/// Every delivery of a consumer, redeliveries too, takes the next consumer sequence: a jump
/// from the last one this instance saw is a delivery that never arrived (lost in transit while
/// the server restarted, say). It comes again only after `ack_wait`, and newer messages must
/// not be handled before it (a conversation's order: docs/ordering.md). A fresh start has no
/// last one to compare with: there the consumer's ack floor tells whether an older delivery is
/// still out with another client.
#[derive(Debug, Default)]
pub(super) struct Watch {
    gaps: DeliveryGaps,
    /// Right after a pause everything sent before it has come back for redelivery and comes
    /// first: the fresh start needs no question then (nor could an answer that stays wrong,
    /// such as a floor that a server does not move, stall the partition twice).
    just_paused: bool,
}

impl Watch {
    /// Whether the delivery with these sequences must wait (the pause it calls), or is to be
    /// handled (`None`).
    pub(super) async fn admit(
        &mut self,
        js: &JetStream,
        partition: &Partition,
        consumer_sequence: u64,
        stream_sequence: u64,
    ) -> Option<Pause> {
        let seen = self.gaps.see(consumer_sequence);
        let pause = pause_before(seen, self.just_paused, js, partition, stream_sequence).await;
        if pause.is_none() {
            self.just_paused = false;
        }
        pause
    }

    /// After a pause: what comes next is a fresh start.
    pub(super) fn paused(&mut self) {
        *self = Self {
            gaps: DeliveryGaps::default(),
            just_paused: true,
        };
    }
}

/// Stops the partition for `pause_for` (see [`super::ordered`]), saying why.
pub(super) async fn pause_partition(
    spec: &ConsumerSpec,
    pause: Pause,
    pause_for: Duration,
    shutdown: &CancellationToken,
) {
    let pause_secs = pause_for.as_secs();
    let reason = match pause {
        Pause::Missed(missed) => {
            tracing::warn!(
                consumer = spec.durable,
                missed,
                pause_secs,
                "deliveries missed: pausing this partition so that they come again first"
            );
            "missed"
        }
        Pause::Outstanding(older) => {
            tracing::warn!(
                consumer = spec.durable,
                stream_sequence = ?older,
                pause_secs,
                "an older delivery is still out with another client: pausing this \
                 partition so that it comes again first"
            );
            "outstanding"
        }
        Pause::Fenced(expected) => {
            tracing::warn!(
                consumer = spec.durable,
                stream_sequence = expected,
                pause_secs,
                "a batch does not continue the partition's mark: pausing this partition \
                 until the older message comes again"
            );
            "fenced"
        }
    };
    crate::metrics::delivery_gap(spec.durable, reason);
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(pause_for) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::{DeliveryGaps, Seen};

    #[test]
    fn consecutive_deliveries_are_no_gap() {
        let mut g = DeliveryGaps::default();
        assert_eq!(g.see(7), Seen::Fresh);
        for seq in 8..20 {
            assert_eq!(g.see(seq), Seen::Next);
        }
    }

    #[test]
    fn a_jump_counts_the_missed_deliveries_and_keeps_watching_from_before_it() {
        let mut g = DeliveryGaps::default();
        assert_eq!(g.see(1), Seen::Fresh);
        assert_eq!(g.see(2), Seen::Next);
        // 3 and 4 never arrived.
        assert_eq!(g.see(5), Seen::Missed(2));
        // Until the consume loop starts again, everything later is a gap too.
        assert_eq!(g.see(6), Seen::Missed(3));
    }

    #[test]
    fn going_back_starts_the_count_again() {
        // A server restarted from an older consumer state sends again from there: what came
        // before that point has to be asked about, as at a start.
        let mut g = DeliveryGaps::default();
        assert_eq!(g.see(10), Seen::Fresh);
        assert_eq!(g.see(8), Seen::Fresh);
        assert_eq!(g.see(9), Seen::Next);
        assert_eq!(g.see(11), Seen::Missed(1));
        let mut g = DeliveryGaps::default();
        g.see(4);
        assert_eq!(g.see(4), Seen::Fresh, "the same one again");
    }
}
