//! Settings every worker reads: command-line flags, else `FL_*` environment variables, else
//! defaults. The database URL may hold a password: it is never logged ([`CommonConfig::redacted`]).

use clap::Args;

#[derive(Clone, Debug, Args)]
pub struct CommonConfig {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "FL_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Postgres connection string (URL or key=value form).
    #[arg(
        long,
        env = "FL_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/firstline"
    )]
    pub database_url: String,
    /// NATS user (with --nats-password); or put `user:password@` in the URL.
    #[arg(long, env = "FL_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password (never logged).
    #[arg(long, env = "FL_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS credentials file (JWT and nkey seed, for operator/account set-ups).
    #[arg(long, env = "FL_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// NATS nkey seed (`SU…`; never logged).
    #[arg(long, env = "FL_NATS_NKEY_SEED", hide_env_values = true)]
    pub nats_nkey_seed: Option<String>,
    /// CA certificate (PEM) to verify the NATS server with; implies TLS.
    #[arg(long, env = "FL_NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,
    /// Require TLS to NATS.
    #[arg(long, env = "FL_NATS_TLS_REQUIRED", default_value_t = false)]
    pub nats_tls_required: bool,
    /// Serve Prometheus metrics on this address (`/metrics`), e.g. 0.0.0.0:9464. Off when unset.
    #[arg(long, env = "FL_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Largest number of Postgres connections this process opens.
    #[arg(long, env = "FL_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: usize,
    /// How Postgres plans the workers' prepared statements (`plan_cache_mode` of every pooled
    /// connection). `force_generic_plan`, the default, plans each once per connection: with
    /// `auto` (Postgres's own default) most of the hot statements, those taking arrays
    /// (`= ANY($1)`, `unnest($1)`), were planned again on every execution, a fifth of the
    /// time Postgres spent in statements (docs/benchmarks.md, issue 22).
    #[arg(long, env = "FL_DB_PLAN_CACHE_MODE", default_value = "force_generic_plan",
          value_parser = ["force_generic_plan", "auto", "force_custom_plan"])]
    pub db_plan_cache_mode: String,
    /// How long a consumer waits for an ack before redelivering (seconds).
    #[arg(long, env = "FL_ACK_WAIT_SECS", default_value_t = 30)]
    pub ack_wait_secs: u64,
    /// Deliveries of one message before it is dead-lettered. Retries back off from 0.5 s to
    /// 30 s, so 20 rides out several minutes of a database outage.
    #[arg(long, env = "FL_MAX_DELIVER", default_value_t = 20)]
    pub max_deliver: i64,
    /// Messages of one partition (`FL_INBOUND`, `FL_INBOUND_KEYED`, `FL_BOT`) handled together
    /// in one Postgres transaction, in the stream's order (docs/ordering.md). 1 handles them
    /// one at a time (about 2.5 times slower).
    #[arg(long, env = "FL_PARTITION_BATCH", default_value_t = 64)]
    pub partition_batch: usize,
    /// Transactions an instance runs at once for the batches of its partitions; the batches
    /// that become ready meanwhile wait and are handled together in the next one (group
    /// commit: one commit, one outbox insert and one move of the marks for many partitions).
    /// 0 gives every partition's batch a transaction of its own, as many at once as come.
    #[arg(long, env = "FL_PARTITION_TRANSACTIONS", default_value_t = 2)]
    pub partition_transactions: usize,
    /// Partitions of each partitioned stream (1 to 1024). The unit of order and of sharing:
    /// each is read by one instance at a time, and the partitions are dealt evenly over the
    /// live instances. The same on every instance; a change applies to new messages (change
    /// it with the gateways paused and the streams drained, docs/ordering.md).
    #[arg(long, env = "FL_PARTITIONS", default_value_t = crate::subjects::DEFAULT_PARTITIONS)]
    pub partitions: u32,
    /// How long an instance's hold on its partitions lasts without renewal (renewed every
    /// quarter of it): a dead instance's partitions are taken over within about this, plus a
    /// quarter (docs/ordering.md).
    #[arg(long, env = "FL_PARTITION_LEASE_SECS", default_value_t = 5.0)]
    pub partition_lease_secs: f64,
    /// Threads of the process's async runtime. 1 (the default) runs everything on the main
    /// thread, with no wake-ups handed between threads: a worker spends most of its time
    /// waiting on NATS and Postgres round trips, and on a small machine the cross-thread
    /// wake-ups of a multi-threaded runtime cost more than they give (README: Configuration).
    /// 0 is one thread per core; scale out with more instances first.
    #[arg(long, env = "FL_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// Replicas of every stream the workers create (1, or 3 on a 3-node JetStream cluster:
    /// each message is then stored on three nodes, and the loss of any one node loses
    /// nothing). Existing streams are updated to it where the server allows.
    #[arg(long, env = "FL_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
}

impl CommonConfig {
    /// The settings with the database password replaced, for logs.
    pub fn redacted(&self) -> String {
        format!(
            "nats_url={} nats_user={} database_url={} db_pool_size={} db_plan_cache_mode={} ack_wait_secs={} max_deliver={} partition_batch={} partition_transactions={} worker_threads={} stream_replicas={}",
            redact_url(&self.nats_url),
            self.nats_user.as_deref().unwrap_or("-"),
            redact_url(&self.database_url),
            self.db_pool_size,
            self.db_plan_cache_mode,
            self.ack_wait_secs,
            self.max_deliver,
            self.partition_batch,
            self.partition_transactions,
            self.worker_threads,
            self.stream_replicas,
        )
    }

    /// Defaults with the given servers: for tests and the all-in-one binary.
    pub fn new(nats_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            database_url: database_url.into(),
            nats_user: None,
            nats_password: None,
            nats_creds: None,
            nats_nkey_seed: None,
            nats_tls_ca: None,
            nats_tls_required: false,
            metrics_addr: None,
            db_pool_size: 8,
            db_plan_cache_mode: "force_generic_plan".into(),
            ack_wait_secs: 30,
            max_deliver: 20,
            partition_batch: 64,
            partition_transactions: 2,
            partitions: crate::subjects::DEFAULT_PARTITIONS,
            partition_lease_secs: 5.0,
            worker_threads: 1,
            stream_replicas: 1,
        }
    }
}

/// `url` (or a comma-separated list of URLs, as `FL_NATS_URL` takes) with every password
/// replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    if url.contains("://") && url.contains(',') {
        return url.split(',').map(redact_url).collect::<Vec<_>>().join(",");
    }
    // postgres://user:secret@host -> postgres://user:***@host
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_log() {
        assert_eq!(redact_url("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("nats://u:a@h1:4222, nats://u:b@h2:4222,nats://h3:4222"),
            "nats://u:***@h1:4222, nats://u:***@h2:4222,nats://h3:4222"
        );
        assert_eq!(
            redact_url("host=h user=u password=pw"),
            "host=h user=u password=***"
        );
    }
}
