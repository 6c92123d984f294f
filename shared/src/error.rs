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

impl HandleError {
    pub fn poison(reason: impl Into<String>) -> Self {
        Self::Poison(reason.into())
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
