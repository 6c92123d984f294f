//! The one decision that turns a handler's outcome into what happens to its message (STYLE:
//! the error decides the ack), shared by the unordered loops ([`super::consume`]) and the
//! ordered partitions ([`super::ordered`]).

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};

use super::{dead_letter::dead_letter, ConsumerSpec, Delivered, JetStream};
use crate::HandleError;

/// What becomes of a delivered message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Handled: `Ack`.
    Ack,
    /// Can never succeed, or its deliveries are used up: a dead letter with this reason, then `Term`.
    DeadLetter(String),
    /// Worth another try after this delay: a `Nak` with it on an unordered consumer; kept in
    /// hand and handed to the handler again on an ordered partition, where a `Nak` would let
    /// newer messages overtake it.
    Retry(Duration),
    /// Ordered partitions: the message at this stream sequence comes first. Left
    /// unacknowledged, not counted as a try.
    Wait(u64),
}

/// How `outcome` settles a message on its `tries`-th attempt, `max_deliver` attempts allowed.
pub fn settle(outcome: &Result<(), HandleError>, tries: i64, max_deliver: i64) -> Settle {
    match outcome {
        Ok(()) => Settle::Ack,
        Err(HandleError::Poison(reason)) => Settle::DeadLetter(reason.clone()),
        Err(HandleError::OutOfOrder { expected }) => Settle::Wait(*expected),
        Err(HandleError::Transient(e)) if tries >= max_deliver => {
            Settle::DeadLetter(format!("gave up after {tries} attempts: {e:#}"))
        }
        Err(HandleError::Transient(_)) => Settle::Retry(backoff(tries)),
    }
}

/// The delay before the next try of a message that failed on its `tries`-th attempt: 0.5 s,
/// 1 s, 2 s… up to 30 s.
pub fn backoff(tries: i64) -> Duration {
    Duration::from_millis(250 << tries.clamp(1, 7) as u32).min(Duration::from_secs(30))
}

/// Settles `message` as [`settle`] says, as far as both kinds of loop do it alike: acks what
/// is handled, dead-letters and `Term`s what never will be, counts the outcome in
/// `fl_messages_total` and logs it. Returns the decision: a [`Settle::Retry`] or
/// [`Settle::Wait`] is left to the caller, whose loop knows how to try again.
pub(super) async fn settle_one(
    js: &JetStream,
    spec: &ConsumerSpec,
    (message, d): (&jetstream::Message, &Delivered),
    tries: i64,
    max_deliver: i64,
    outcome: &Result<(), HandleError>,
    span: &tracing::Span,
) -> anyhow::Result<Settle> {
    let decision = settle(outcome, tries, max_deliver);
    match &decision {
        Settle::Ack => {
            crate::metrics::message_handled(spec.durable, "ok");
            if let Err(e) = message.ack_with(AckKind::Ack).await {
                // The message comes again after ack_wait; handlers are idempotent.
                tracing::warn!("ack failed: {e}");
            }
        }
        Settle::DeadLetter(reason) => {
            crate::metrics::message_handled(spec.durable, "dead_letter");
            span.in_scope(|| tracing::warn!(%reason, consumer = spec.durable, "dead-lettering"));
            dead_letter(js, spec, message, d.stream_sequence, tries, reason).await?;
            let _ = message.ack_with(AckKind::Term).await;
        }
        Settle::Retry(delay) => {
            crate::metrics::message_handled(spec.durable, "retry");
            if let Err(e) = outcome {
                span.in_scope(|| tracing::warn!(retry_in = ?delay, "transient failure: {e:#}"));
            }
        }
        Settle::Wait(_) => {}
    }
    Ok(decision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_settles_its_own_way() {
        let ok: Result<(), HandleError> = Ok(());
        assert_eq!(settle(&ok, 1, 5), Settle::Ack);
        assert_eq!(
            settle(&Err(HandleError::poison("bad json")), 1, 5),
            Settle::DeadLetter("bad json".into())
        );
        assert_eq!(
            settle(&Err(HandleError::out_of_order(41)), 9, 5),
            Settle::Wait(41)
        );
        let down = Err(HandleError::transient("database down"));
        assert_eq!(
            settle(&down, 1, 5),
            Settle::Retry(Duration::from_millis(500))
        );
        assert_eq!(settle(&down, 4, 5), Settle::Retry(Duration::from_secs(4)));
        match settle(&down, 5, 5) {
            Settle::DeadLetter(reason) => {
                assert!(reason.contains("gave up after 5 attempts"), "{reason}");
                assert!(reason.contains("database down"), "{reason}");
            }
            other => panic!("the last try dead-letters, not {other:?}"),
        }
    }

    #[test]
    fn the_backoff_grows_to_thirty_seconds() {
        let delays: Vec<u64> = (0..10).map(|t| backoff(t).as_millis() as u64).collect();
        assert_eq!(
            delays,
            [500, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }
}
