//! One shutdown mechanism (STYLE, as svix and restate do it): the first SIGINT or SIGTERM
//! cancels a token; workers stop pulling, finish the message in hand, wait for their
//! background tasks and return. A second signal exits the process at once, for when the
//! orderly stop hangs (a server that does not answer, a task that does not end).

use tokio_util::sync::CancellationToken;

pub use tokio_util::sync::CancellationToken as Shutdown;
pub use tokio_util::task::TaskTracker;

/// The exit code after a second signal: 128 + SIGINT, what a shell reports for Ctrl-C.
pub const EXIT_ON_SECOND_SIGNAL: i32 = 130;

/// A token cancelled at the first SIGINT or SIGTERM; at the second the process exits with
/// [`EXIT_ON_SECOND_SIGNAL`]. The handlers are installed before this returns, so a signal
/// sent once the caller has started is never missed. Call it inside the runtime.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    let mut signals = Signals::install();
    tokio::spawn(async move {
        let first = signals.next().await;
        tracing::info!(
            signal = first,
            "shutdown signal received: finishing in-flight messages (a second signal exits at once)"
        );
        cancel.cancel();
        let second = signals.next().await;
        tracing::warn!(
            signal = second,
            code = EXIT_ON_SECOND_SIGNAL,
            "second shutdown signal received: exiting now"
        );
        std::process::exit(EXIT_ON_SECOND_SIGNAL);
    });
    token
}

/// SIGINT and SIGTERM, as a stream of their names.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                interrupt: signal(SignalKind::interrupt()).expect("install SIGINT handler"),
                terminate: signal(SignalKind::terminate()).expect("install SIGTERM handler"),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => "SIGINT",
                _ = self.terminate.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}
