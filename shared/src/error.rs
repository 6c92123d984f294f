//! The error of a message handler, which decides the ack (STYLE: the error decides the ack).

/// What went wrong while handling one message.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Worth retrying (database or NATS unavailable, a lock timeout...): the message is
    /// `Nak`ed with a delay, and dead-lettered once its deliveries are used up.
    #[error("transient: {0:#}")]
    Transient(#[from] anyhow::Error),
    /// Can never succeed (bad JSON, unknown tenant...): `Term` and dead-letter at once.
    #[error("{0}")]
    Poison(String),
}

/// A batched partition's batch that does not continue the partition right after its mark:
/// an older message, at stream sequence `expected`, is not handled yet (README: Scaling out).
/// Not retried in hand: the partition pauses until that message comes again.
#[derive(Debug, thiserror::Error)]
#[error("stream sequence {expected} of this partition is not handled yet: this one waits for it")]
pub struct OutOfOrder {
    pub expected: u64,
}

impl HandleError {
    pub fn poison(reason: impl Into<String>) -> Self {
        Self::Poison(reason.into())
    }

    pub fn out_of_order(expected: u64) -> Self {
        Self::Transient(OutOfOrder { expected }.into())
    }

    /// The stream sequence this message waits for, if it failed as [`OutOfOrder`].
    pub fn waits_for(&self) -> Option<u64> {
        match self {
            Self::Transient(e) => e.downcast_ref::<OutOfOrder>().map(|o| o.expected),
            Self::Poison(_) => None,
        }
    }

    /// The same outcome for another message of a batch that shared this one's fate.
    pub fn for_another(&self) -> Self {
        match self {
            Self::Transient(e) => Self::Transient(anyhow::anyhow!("{e:#}")),
            Self::Poison(reason) => Self::Poison(reason.clone()),
        }
    }
}

impl From<crate::wire::DecodeError> for HandleError {
    fn from(e: crate::wire::DecodeError) -> Self {
        Self::Poison(e.to_string())
    }
}

impl From<tokio_postgres::Error> for HandleError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Transient(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for HandleError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Transient(e.into())
    }
}
