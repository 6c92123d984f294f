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

    /// A publish that failed: poison when the message exceeds the server's `max_payload`
    /// (the same bytes never fit), transient otherwise.
    pub fn publish_failed(e: anyhow::Error) -> Self {
        if crate::bus::is_too_large(&e) {
            Self::Poison(format!("{e:#}"))
        } else {
            e.into()
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

/// A database error is transient (the database away, a deadlock, a serialization failure...)
/// unless its SQLSTATE says the same statement on the same data can never succeed
/// ([`never_succeeds`]): then it is poison, with the database's reason.
impl From<tokio_postgres::Error> for HandleError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) if never_succeeds(db.code()) => Self::Poison(format!(
                "the database refuses it (SQLSTATE {}): {}",
                db.code().code(),
                db.message()
            )),
            _ => anyhow::Error::from(e).into(),
        }
    }
}

/// SQLSTATE classes of errors that the data itself causes, so that a retry fails alike:
/// `22` data exception (a NUL character in a text, a value out of range, bad encoding...) and
/// `54` program limit exceeded (a value too large to index...).
pub fn never_succeeds(code: &tokio_postgres::error::SqlState) -> bool {
    matches!(code.code().get(..2), Some("22" | "54"))
}

impl From<deadpool_postgres::PoolError> for HandleError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        anyhow::Error::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use tokio_postgres::error::SqlState;

    use super::never_succeeds;

    #[test]
    fn data_exceptions_never_succeed_and_the_rest_is_retried() {
        // 22021: "invalid byte sequence for encoding "UTF8": 0x00", a NUL in a text.
        assert!(never_succeeds(&SqlState::CHARACTER_NOT_IN_REPERTOIRE));
        assert!(never_succeeds(&SqlState::from_code("22021")));
        assert!(never_succeeds(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE));
        assert!(never_succeeds(&SqlState::PROGRAM_LIMIT_EXCEEDED));
        for transient in [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CONNECTION_FAILURE,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::QUERY_CANCELED,
            SqlState::UNIQUE_VIOLATION,
        ] {
            assert!(!never_succeeds(&transient), "{}", transient.code());
        }
    }
}
