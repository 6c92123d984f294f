//! The worker binaries of this build (`firstline-ingest`...) run as their own processes,
//! which a test can SIGTERM, SIGKILL and start again, as an orchestrator or a crash would.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use firstline_shared::config::CommonConfig;

/// A worker binary (`firstline-dispatcher`...) of this build, run as its own process.
pub struct WorkerProcess {
    name: &'static str,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl WorkerProcess {
    /// The binary sits beside the test's own executable's directory (`target/<profile>/`).
    /// Built here once per test process, so that a test never runs a stale binary (`cargo
    /// test -p firstline-tests` rebuilds the worker libraries, not their binaries).
    /// `FL_WORKER_BIN_DIR` names another directory to take them from, as they are (to
    /// benchmark two builds side by side).
    pub fn binary(name: &str) -> PathBuf {
        if let Some(dir) = std::env::var_os("FL_WORKER_BIN_DIR") {
            let path = PathBuf::from(dir).join(name);
            assert!(
                path.exists(),
                "{} is missing (FL_WORKER_BIN_DIR)",
                path.display()
            );
            return path;
        }
        static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
        let exe = std::env::current_exe().expect("test executable");
        let dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target/<profile>");
        BUILT.get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
            let mut build = Command::new(cargo);
            // The whole workspace, as scripts/test builds it: the same features for every
            // crate, so that this is a no-op when that build is fresh (a build of a few
            // packages unifies features differently and relinks every binary).
            build.args([
                "build",
                "--quiet",
                "--manifest-path",
                manifest,
                "--workspace",
                "--bins",
            ]);
            if dir.ends_with("release") {
                build.arg("--release");
            }
            let status = build
                .status()
                .expect("run cargo build for the worker binaries");
            assert!(status.success(), "building the worker binaries failed");
        });
        let path = dir.join(name);
        assert!(
            path.exists(),
            "{} is missing: run `cargo build --workspace --bins` (scripts/test does)",
            path.display()
        );
        path
    }

    /// Starts `name` against the test's NATS and database.
    pub fn start(name: &'static str, config: &CommonConfig) -> Self {
        let env = vec![
            ("FL_NATS_URL".to_owned(), config.nats_url.clone()),
            ("FL_DATABASE_URL".to_owned(), config.database_url.clone()),
            (
                "FL_ACK_WAIT_SECS".to_owned(),
                config.ack_wait_secs.to_string(),
            ),
            ("FL_MAX_DELIVER".to_owned(), config.max_deliver.to_string()),
            (
                "FL_PARTITION_BATCH".to_owned(),
                config.partition_batch.to_string(),
            ),
            (
                "FL_PARTITION_TRANSACTIONS".to_owned(),
                config.partition_transactions.to_string(),
            ),
            ("FL_PARTITIONS".to_owned(), config.partitions.to_string()),
            (
                "FL_PARTITION_LEASE_SECS".to_owned(),
                config.partition_lease_secs.to_string(),
            ),
            ("FL_DISPATCH_BACKSTOP_SECS".to_owned(), "2".to_owned()),
            (
                "RUST_LOG".to_owned(),
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ];
        let mut p = WorkerProcess {
            name,
            env,
            child: None,
        };
        p.restart();
        p
    }

    /// The process id, while it runs (for CPU and memory readings).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts `name` with extra environment variables (settings) added.
    pub fn start_with(name: &'static str, config: &CommonConfig, extra: &[(&str, &str)]) -> Self {
        let mut p = Self::start(name, config);
        p.kill();
        p.env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        p.restart();
        p
    }

    /// Starts the process again (after [`WorkerProcess::kill`]).
    pub fn restart(&mut self) {
        let mut command = Command::new(Self::binary(self.name));
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        if std::env::var_os("TEST_LOG").is_none() {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        self.child = Some(command.spawn().expect("start worker process"));
    }

    /// SIGTERM, as an orchestrator stopping the process would; returns how it exited, or
    /// `None` if it had not exited within `within`.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL: no shutdown, no flush, mid-transaction, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
