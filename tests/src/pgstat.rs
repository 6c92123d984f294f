//! What Postgres does for the benchmarks' messages (issue 22): the statements of one
//! database from `pg_stat_statements`, per message, and the CPU of one server's processes.
//!
//! `pg_stat_statements` must be in the server's `shared_preload_libraries` (a server of the
//! benchmark's own: docs/benchmarks.md, "Profiling Postgres"); without it [`Statements::start`]
//! says so and the benchmark runs without the profile.

use std::fmt::Write;

/// One statement's work over a step, per inbound message.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Statement {
    pub query: String,
    pub calls_per_msg: f64,
    pub rows_per_msg: f64,
    pub exec_us_per_msg: f64,
    pub us_per_call: f64,
    pub wal_bytes_per_msg: f64,
}

/// The whole step's statements, per inbound message.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Profile {
    pub calls_per_msg: f64,
    pub rows_per_msg: f64,
    pub exec_ms_per_msg: f64,
    pub wal_bytes_per_msg: f64,
    pub top: Vec<Statement>,
}

/// `pg_stat_statements` of the benchmark's database, reset at the start of each step.
pub struct Statements {
    available: bool,
}

impl Statements {
    /// Creates the extension in the database (once) and resets its counters.
    pub async fn start(pg: &tokio_postgres::Client) -> Self {
        let available = match pg
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
        {
            Ok(()) => pg
                .batch_execute("SELECT pg_stat_statements_reset()")
                .await
                .is_ok(),
            Err(_) => false,
        };
        if !available {
            println!("pg_stat_statements: not available on this server (shared_preload_libraries): no statement profile");
        }
        Self { available }
    }

    /// Forgets what was counted so far (the start of a step).
    pub async fn reset(&self, pg: &tokio_postgres::Client) {
        if self.available {
            let _ = pg.batch_execute("SELECT pg_stat_statements_reset()").await;
        }
    }

    /// The statements of this database since the last reset, the `top` by total time, per
    /// inbound message (`messages`). Statements of the benchmark's own connection (its
    /// queries of figures) are left out.
    pub async fn profile(
        &self,
        pg: &tokio_postgres::Client,
        messages: f64,
        top: usize,
    ) -> Option<Profile> {
        if !self.available || messages <= 0.0 {
            return None;
        }
        let rows = pg
            .query(
                "SELECT query, calls::float8, rows::float8, total_exec_time, wal_bytes::float8
                 FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND query NOT LIKE '%pg_stat_statements%'
                   AND query NOT LIKE '%percentile_cont%'
                 ORDER BY total_exec_time DESC",
                &[],
            )
            .await
            .ok()?;
        let mut p = Profile::default();
        for r in &rows {
            let (calls, n, ms, wal): (f64, f64, f64, f64) =
                (r.get(1), r.get(2), r.get(3), r.get(4));
            p.calls_per_msg += calls / messages;
            p.rows_per_msg += n / messages;
            p.exec_ms_per_msg += ms / messages;
            p.wal_bytes_per_msg += wal / messages;
            if p.top.len() < top {
                let query: String = r.get(0);
                p.top.push(Statement {
                    query: query.split_whitespace().collect::<Vec<_>>().join(" "),
                    calls_per_msg: calls / messages,
                    rows_per_msg: n / messages,
                    exec_us_per_msg: ms * 1000.0 / messages,
                    us_per_call: if calls > 0.0 {
                        ms * 1000.0 / calls
                    } else {
                        0.0
                    },
                    wal_bytes_per_msg: wal / messages,
                });
            }
        }
        Some(p)
    }
}

impl Profile {
    /// The table the benchmark prints.
    pub fn table(&self, width: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "statements per message: {:.1} calls, {:.1} rows, {:.3} ms executing, {:.0} WAL bytes",
            self.calls_per_msg, self.rows_per_msg, self.exec_ms_per_msg, self.wal_bytes_per_msg
        );
        let _ = writeln!(
            s,
            "{:>8} {:>7} {:>7} {:>8} {:>7}  query",
            "us/msg", "calls", "rows", "us/call", "WAL B"
        );
        for t in &self.top {
            let q: String = t.query.chars().take(width).collect();
            let _ = writeln!(
                s,
                "{:>8.1} {:>7.3} {:>7.3} {:>8.1} {:>7.0}  {q}",
                t.exec_us_per_msg,
                t.calls_per_msg,
                t.rows_per_msg,
                t.us_per_call,
                t.wal_bytes_per_msg
            );
        }
        s
    }
}

/// The pid of the server `pg` is connected to (the parent of its backend), when it runs on
/// this machine: so that the CPU counted is this server's, not that of another cluster.
pub async fn postmaster_pid(pg: &tokio_postgres::Client) -> Option<u32> {
    let backend: i32 = pg
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .ok()?
        .get(0);
    let stat = std::fs::read_to_string(format!("/proc/{backend}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    // Field 4 of stat (the parent); `after` starts at field 3.
    after.split_whitespace().nth(1)?.parse().ok()
}

/// The pids of every process of the server whose postmaster is `postmaster` (itself included),
/// or of every `postgres` process when it is not known.
pub fn server_pids(postmaster: Option<u32>) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some((head, after)) = stat.rsplit_once(')') else {
                return false;
            };
            if !head.ends_with("(postgres") {
                return false;
            }
            match postmaster {
                None => true,
                Some(pm) => {
                    *pid == pm
                        || after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) == Some(pm)
                }
            }
        })
        .collect()
}

/// The benchmark database's backends by `application_name` (the worker's program, which
/// `firstline_shared::db::pool` sets): (name, pid).
pub async fn backends(pg: &tokio_postgres::Client) -> Vec<(String, u32)> {
    let Ok(rows) = pg
        .query(
            "SELECT application_name, pid FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await
    else {
        return Vec::new();
    };
    rows.iter()
        .map(|r| {
            let name: String = r.get(0);
            let pid: i32 = r.get(1);
            let name = if name.is_empty() {
                "(unnamed)".into()
            } else {
                name
            };
            (name, pid as u32)
        })
        .collect()
}
