//! NATS JetStream as the workers use it, one concern a module:
//!
//! - [`connect`]: the client, from `FL_NATS_URL` and the credentials settings.
//! - [`streams`]: every stream of [`crate::subjects::ALL_STREAMS`], created or updated at start.
//! - [`publish`]: publishing with a de-duplication id, one at a time or pipelined.
//! - [`consume`]: the consume loops of unordered consumers (one message or a batch at a time)
//!   and what a handler sees of a message ([`Delivered`]).
//! - [`settle`]: the ONE decision that turns a handler's outcome into the ack (or, on a
//!   partition read in order by [`crate::partitions`], into what its reader does next).
//! - [`dead_letter`]: what cannot be handled goes to `fl.<tenant>.deadletter.<stream>` with the
//!   reason, cut to fit the server's `max_payload` when it must be.
//! - [`strays`]: what a partitioned stream stores under a subject no partition takes (a literal
//!   wildcard token) is found and dead-lettered too: nothing the streams accept vanishes.
//!
//! DESIGN.md facts applied here: publish with `Nats-Msg-Id` and treat an ack timeout as
//! "unknown" (republish with the same id); explicit acks; a message that can never be handled
//! is `Term`-acked and dead-lettered with the reason, and so is one whose deliveries ran out.

pub mod connect;
pub mod consume;
pub mod dead_letter;
pub mod publish;
pub mod settle;
pub mod strays;
pub mod streams;

pub use crate::partitions::Partition;
pub use async_nats::jetstream::Context as JetStream;
pub use connect::connect;
pub use consume::{
    consume, consume_batched, message_span, named_message_span, ConsumerSpec, Delivered,
};
pub use publish::{is_too_large, publish, publish_action, publish_all, Outgoing};
pub use settle::{backoff, settle, Settle};
pub use streams::{ensure_streams, ensure_streams_with};
