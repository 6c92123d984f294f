//! What a message handler's work came to, which decides the ack (STYLE: the error decides the
//! ack). [`crate::bus::settle`] is the one place that turns it into an ack.

use std::sync::Arc;

/// Why handling one message did not succeed.
///
/// `Clone`: the messages of a batch that share one fate (a transaction that did not commit)
/// each get the same error, not a copy through a string.
#[derive(Clone, Debug, thiserror::Error)]
pub enum HandleError {
    /// Worth retrying (database or NATS unavailable, a lock timeout...): tried again after a
    /// growing delay ([`crate::bus::backoff`]), and dead-lettered once its deliveries are used up.
    #[error("transient: {0:#}")]
    Transient(Arc<anyhow::Error>),
    /// Can never succeed (bad JSON, unknown tenant...): `Term` and dead-letter at once.
    #[error("{0}")]
    Poison(String),
    /// A message of an ordered partition that does not continue the partition right after its
    /// mark: an older message, at stream sequence `expected`, is not handled yet (docs/ordering.md).
    /// Neither retried in hand nor counted as a failure: left unacknowledged, it comes again
    /// after the older one.
    #[error(
        "stream sequence {expected} of this partition is not handled yet: this one waits for it"
    )]
    OutOfOrder { expected: u64 },
}

impl HandleError {
    pub fn poison(reason: impl Into<String>) -> Self {
        Self::Poison(reason.into())
    }

    /// A transient failure with this reason.
    pub fn transient(reason: impl std::fmt::Display) -> Self {
        Self::Transient(Arc::new(anyhow::anyhow!("{reason}")))
    }

    pub fn out_of_order(expected: u64) -> Self {
        Self::OutOfOrder { expected }
    }

    /// The stream sequence this message waits for, if it is [`HandleError::OutOfOrder`].
    pub fn waits_for(&self) -> Option<u64> {
        match self {
            Self::OutOfOrder { expected } => Some(*expected),
            Self::Transient(_) | Self::Poison(_) => None,
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

impl From<anyhow::Error> for HandleError {
    fn from(e: anyhow::Error) -> Self {
        Self::Transient(Arc::new(e))
    }
}

impl From<crate::wire::DecodeError> for HandleError {
    fn from(e: crate::wire::DecodeError) -> Self {
        Self::Poison(e.to_string())
    }
}

impl From<tokio_postgres::Error> for HandleError {
    fn from(e: tokio_postgres::Error) -> Self {
        anyhow::Error::from(e).into()
    }
}

impl From<deadpool_postgres::PoolError> for HandleError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        anyhow::Error::from(e).into()
    }
}
