//! What every worker does at start and stop: connect to NATS and Postgres, create the
//! streams, apply migrations, sweep the outbox, and at the end wait for its background tasks;
//! and a `main` shared by the worker binaries (parse settings, set up telemetry, run until
//! SIGINT/SIGTERM, flush telemetry under a timeout).

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{self, JetStream};
use crate::config::CommonConfig;
use crate::{db, outbox, shutdown, telemetry};

/// The connections a worker works with, and its background tasks.
#[derive(Clone)]
pub struct Services {
    pub nats: async_nats::Client,
    pub js: JetStream,
    pub pool: Pool,
    /// The outbox sweeper and what the worker adds ([`Services::spawn`], [`Services::tasks`]);
    /// [`Services::close`] waits for them.
    tasks: TaskTracker,
    /// Cancelled at shutdown or by [`Services::close`]: background tasks stop on it.
    stopping: CancellationToken,
}

impl Services {
    /// Connects, creates the streams and applies the migrations (idempotent, safe from
    /// several instances at once), and starts the outbox sweeper until `shutdown`.
    pub async fn start(
        config: &CommonConfig,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        tracing::info!(config = %config.redacted(), "starting");
        let nats = bus::connect(config).await?;
        let js = async_nats::jetstream::new(nats.clone());
        bus::ensure_streams_with(&js, config.stream_replicas, config.partitions).await?;
        db::migrate(&config.database_url).await?;
        let pool = db::pool(config)?;
        let services = Self {
            nats,
            js,
            pool,
            tasks: TaskTracker::new(),
            stopping: shutdown.child_token(),
        };
        services.spawn(outbox::sweep(
            services.js.clone(),
            services.pool.clone(),
            Duration::from_secs(2),
            services.stopping(),
        ));
        Ok(services)
    }

    /// Runs `task` beside the worker; [`Services::close`] waits for it. It should end when
    /// [`Services::stopping`] is cancelled.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// The tracker [`Services::close`] waits on: a task that something else spawns (an
    /// upgraded WebSocket) holds one of its tokens while it runs.
    pub fn tasks(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// Cancelled at shutdown, or when the worker closes (after a failure too): what
    /// background tasks stop on.
    pub fn stopping(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Stops the background tasks and waits for them, then flushes what the NATS client
    /// still buffers before the process exits.
    pub async fn close(self) {
        self.stopping.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Err(e) = self.nats.flush().await {
            tracing::warn!("flushing NATS on shutdown: {e}");
        }
    }
}

/// A worker's settings: they include the common ones.
pub trait WorkerConfig: clap::Parser {
    fn common(&self) -> &CommonConfig;
}

/// The body of every worker binary's `main`: parses the settings, then runs the worker on a
/// runtime of `FL_WORKER_THREADS` threads ([`runtime`]) until SIGINT/SIGTERM (a second one
/// exits at once, [`shutdown::on_signals`]), then flushes telemetry for at most
/// [`telemetry::FLUSH_TIMEOUT`].
pub fn main<C, F, Fut>(service: &'static str, run: F) -> anyhow::Result<()>
where
    C: WorkerConfig,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = C::parse();
    runtime(config.common().worker_threads)?.block_on(async move {
        let telemetry = telemetry::init(service)?;
        if let Some(addr) = config.common().metrics_addr {
            crate::metrics::serve(addr)?;
        }
        let result = run(config, shutdown::on_signals()).await;
        if let Err(e) = &result {
            tracing::error!("{service} failed: {e:#}");
        }
        telemetry.shutdown_async().await;
        result
    })
}

/// The async runtime of a worker process: `threads` = 1 is Tokio's current-thread runtime
/// (every task on the main thread), 0 one worker thread per core, n that many. A worker mostly
/// waits on round trips to NATS and Postgres; with one thread a reply that wakes a task wakes
/// the thread that polls it, instead of handing the wake-up to another thread (a futex and a
/// context switch each). Measured with the end-to-end benchmark (README: what each change
/// bought).
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build()
}
