//! Helpers of the end-to-end tests: each test gets its own NATS JetStream server (on a free
//! port, with a temporary store) and its own Postgres database, and runs the real workers
//! over them. Nothing here fakes NATS or Postgres.
//!
//! - `NATS_SERVER_BIN`: the server binary (default `nats-server` on PATH; 2.10 or later).
//! - `FL_TEST_PG_URL`: an admin connection (default `postgres://postgres:postgres@127.0.0.1:5432/postgres`).
//! - `TEST_LOG=1`: show the workers' logs.

pub mod api;

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use firstline_shared::config::CommonConfig;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A NATS server of this test's own, killed when dropped.
pub struct TestNats {
    child: Child,
    dir: PathBuf,
    pub port: u16,
    pub url: String,
}

impl TestNats {
    pub async fn start() -> Self {
        Self::start_with_config("", None).await
    }

    /// A server with this configuration text (users, permissions...) added; `login` is the
    /// user and password put in [`TestNats::url`] for the workers and the test's client.
    pub async fn start_with_config(config: &str, login: Option<(&str, &str)>) -> Self {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {bin}: {e}; run scripts/test, which installs NATS")
            });
        let version = String::from_utf8_lossy(&version.stdout).to_string();
        assert!(
            !version.contains("v2.9.") && !version.contains("v2.8."),
            "{bin} is {version}: the tests need NATS 2.10 or later (scripts/test installs the pinned release)"
        );
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("fl-test-nats-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("nats-server.conf");
        std::fs::write(&conf, config).unwrap();
        let child = Self::spawn_server(&bin, &dir, port);
        let url = match login {
            Some((user, password)) => format!("nats://{user}:{password}@127.0.0.1:{port}"),
            None => format!("nats://127.0.0.1:{port}"),
        };
        let nats = TestNats {
            child,
            dir,
            port,
            url,
        };
        // A TCP check: a server with users refuses anonymous clients.
        eventually("NATS listens", Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", nats.port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        nats
    }

    fn spawn_server(bin: &str, dir: &std::path::Path, port: u16) -> Child {
        Command::new(bin)
            .arg("-c")
            .arg(dir.join("nats-server.conf"))
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server")
    }

    /// The server's process id (for CPU and memory readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the server again on the same port with the same store (after [`TestNats::kill`]).
    pub fn restart(&mut self) {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        self.child = Self::spawn_server(&bin, &self.dir, self.port);
    }

    /// Stops the server (as a crash would: SIGKILL), keeping its store.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh database, dropped with the test.
pub struct TestDb {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> Self {
        let admin_url = std::env::var("FL_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into());
        Self::create_on(&admin_url).await
    }

    /// A fresh database on the server of `admin_url`.
    pub async fn create_on(admin_url: &str) -> Self {
        let admin_url = admin_url.to_owned();
        let name = format!("fl_test_{}", Uuid::new_v4().simple());
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .expect("FL_TEST_PG_URL must be a URL ending in /<database>");
        let url = format!("{base}/{name}");
        firstline_shared::db::create_database_if_missing(&url)
            .await
            .expect("create the test database (is Postgres running? scripts/test starts it)");
        firstline_shared::db::migrate(&url).await.expect("migrate");
        TestDb {
            admin_url,
            name,
            url,
        }
    }

    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// The whole system over a test's own NATS and Postgres, with a client to drive it.
pub struct TestApp {
    pub db: TestDb,
    pub pg: tokio_postgres::Client,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub shutdown: CancellationToken,
    pub config: CommonConfig,
    workers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    // Last, so that the workers stop before the server does.
    pub nats: TestNats,
}

impl TestApp {
    /// Starts NATS, a database configured with `setup` (a `firstline configure` file), and
    /// every worker ([`firstline::run_all`]).
    pub async fn spawn(setup: &str) -> Self {
        Self::spawn_on(TestNats::start().await, setup).await
    }

    /// [`TestApp::spawn`] on a given NATS server; credentials, if it needs any, go in the URL.
    pub async fn spawn_on(nats: TestNats, setup: &str) -> Self {
        Self::spawn_configured(nats, setup, |_| {}).await
    }

    /// [`TestApp::spawn`] with the workers' settings changed by `adjust` (an nkey, a TLS CA...).
    pub async fn spawn_configured(
        nats: TestNats,
        setup: &str,
        adjust: impl FnOnce(&mut CommonConfig),
    ) -> Self {
        let db = TestDb::create().await;
        let mut app = Self::without_workers_configured(nats, db, setup, adjust).await;
        let worker = firstline::run_all(app.config.clone(), app.shutdown.clone());
        app.spawn_worker(worker);
        app
    }

    /// Like [`TestApp::spawn`] but starts no worker: the test starts the ones it wants.
    pub async fn without_workers(setup: &str) -> Self {
        let db = TestDb::create().await;
        Self::without_workers_configured(TestNats::start().await, db, setup, |_| {}).await
    }

    /// Like [`TestApp::without_workers`], on a given NATS server and database, with the
    /// workers' settings changed by `adjust`.
    pub async fn without_workers_configured(
        nats: TestNats,
        db: TestDb,
        setup: &str,
        adjust: impl FnOnce(&mut CommonConfig),
    ) -> Self {
        firstline_shared::telemetry::init_for_tests();
        let file = firstline::setup::SetupFile::parse(setup).expect("test setup file");
        firstline::setup::configure(&db.url, &file)
            .await
            .expect("configure");
        let mut config = CommonConfig::new(&nats.url, &db.url);
        config.ack_wait_secs = 5;
        config.max_deliver = 3;
        adjust(&mut config);
        let client = firstline_shared::bus::connect(&config).await.unwrap();
        let js = jetstream::new(client.clone());
        firstline_shared::bus::ensure_streams(&js).await.unwrap();
        let pg = db.connect().await;
        let shutdown = CancellationToken::new();
        TestApp {
            db,
            pg,
            client,
            js,
            shutdown,
            config,
            workers: Vec::new(),
            nats,
        }
    }

    /// Starts one more instance of a worker, as another process would be.
    pub fn spawn_worker<F>(&mut self, worker: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.workers.push(tokio::spawn(worker));
    }

    /// Publishes a hand-written body, as a gateway or an agent desktop would: plain
    /// async-nats, not our crate. Returns whether JetStream reported a duplicate.
    pub async fn publish_json(&self, subject: &str, msg_id: Option<&str>, body: &str) -> bool {
        let mut headers = HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert("Nats-Msg-Id", id);
        }
        let ack = self
            .js
            .publish_with_headers(subject.to_owned(), headers, body.to_owned().into())
            .await
            .expect("publish")
            .await
            .expect("stream ack");
        ack.duplicate
    }

    /// A customer message on `fl.<tenant>.inbound.<channel>`, hand-written JSON.
    pub async fn customer_says(
        &self,
        tenant: &str,
        channel: &str,
        customer: &str,
        text: &str,
    ) -> String {
        self.customer_sends(tenant, channel, customer, text, None)
            .await
    }

    /// A customer's button press: a postback with the button's `payload`, `label` as text.
    pub async fn customer_presses(
        &self,
        tenant: &str,
        channel: &str,
        customer: &str,
        label: &str,
        payload: &str,
    ) -> String {
        self.customer_sends(tenant, channel, customer, label, Some(payload))
            .await
    }

    async fn customer_sends(
        &self,
        tenant: &str,
        channel: &str,
        customer: &str,
        text: &str,
        postback: Option<&str>,
    ) -> String {
        let message_id = Uuid::new_v4().to_string();
        let mut body = serde_json::json!({
            "version": 1,
            "message_id": message_id,
            "customer": {"id": customer, "name": format!("customer {customer}")},
            "text": text,
        });
        if let Some(p) = postback {
            body["postback"] = p.into();
        }
        let body = body.to_string();
        self.publish_json(
            &format!("fl.{tenant}.inbound.{channel}"),
            Some(&format!("{channel}:{message_id}")),
            &body,
        )
        .await;
        message_id
    }

    /// Agent presence, hand-written JSON.
    pub async fn presence(
        &self,
        tenant: &str,
        agent: &str,
        status: &str,
        capacity: u32,
        skills: &[&str],
    ) {
        let body = serde_json::json!({
            "version": 1, "status": status, "capacity": capacity, "skills": skills,
        })
        .to_string();
        self.publish_json(&format!("fl.{tenant}.presence.{agent}"), None, &body)
            .await;
    }

    /// An agent action (`accept`, `decline`, `close`, `reply` with `extra` fields), hand-written JSON.
    pub async fn agent_does(
        &self,
        tenant: &str,
        agent: &str,
        kind: &str,
        conversation: Uuid,
        extra: serde_json::Value,
    ) {
        let action_id = Uuid::new_v4();
        let mut body = serde_json::json!({
            "version": 1, "action_id": action_id, "type": kind, "conversation_id": conversation,
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        self.publish_json(
            &format!("fl.{tenant}.agent.{agent}.action"),
            Some(&action_id.to_string()),
            &body.to_string(),
        )
        .await;
    }

    /// Loads a bot configuration file (YAML), as `firstline bot load` does.
    pub async fn load_bot(
        &self,
        yaml: &str,
    ) -> anyhow::Result<firstline_bot_router::setup::Applied> {
        let file = firstline_bot_router::setup::BotFile::parse(yaml, false)?;
        let mut client = self.db.connect().await;
        file.apply(&mut client).await
    }

    /// The state of `customer`'s newest conversation on `channel`.
    pub async fn state_of(&self, tenant: &str, channel: &str, customer: &str) -> Option<String> {
        self.pg
            .query_opt(
                "SELECT c.state FROM conversations c JOIN customers cu ON cu.id = c.customer_id
                 WHERE cu.tenant_id = $1 AND cu.channel_id = $2 AND cu.external_id = $3
                 ORDER BY c.created_at DESC LIMIT 1",
                &[&tenant, &channel, &customer],
            )
            .await
            .unwrap()
            .map(|r| r.get(0))
    }

    /// Waits until `customer`'s newest conversation is in `state`.
    pub async fn wait_for_state(&self, tenant: &str, channel: &str, customer: &str, state: &str) {
        eventually(
            &format!("{customer} in {state}"),
            Duration::from_secs(20),
            || async {
                (self.state_of(tenant, channel, customer).await.as_deref() == Some(state))
                    .then_some(())
            },
        )
        .await
    }

    /// Every message stored so far on `subject` in `stream`, as JSON.
    pub async fn stored(&self, stream: &str, subject: &str) -> Vec<serde_json::Value> {
        let stream = self.js.get_stream(stream).await.unwrap();
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
        let pending = consumer.cached_info().num_pending as usize;
        let mut out = Vec::new();
        if pending == 0 {
            return out;
        }
        let mut messages = consumer.messages().await.unwrap();
        while out.len() < pending {
            let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .expect("stored messages arrive")
                .unwrap()
                .unwrap();
            out.push(serde_json::from_slice(&m.payload).unwrap());
        }
        out
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for w in &self.workers {
            w.abort();
        }
    }
}

/// Receives the next message on a subscription as JSON, within `timeout`.
pub async fn next_json(sub: &mut async_nats::Subscriber, what: &str) -> serde_json::Value {
    let m = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("subscription open");
    serde_json::from_slice(&m.payload).unwrap_or_else(|e| panic!("{what} is not JSON: {e}"))
}

/// Receives messages until one satisfies `pred`, within 20 s.
pub async fn next_matching(
    sub: &mut async_nats::Subscriber,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let m = tokio::time::timeout(left, sub.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("subscription open");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        if pred(&v) {
            return v;
        }
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Reads one `i64` (a count) from a query.
pub async fn count(
    pg: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    pg.query_one(sql, params).await.unwrap().get(0)
}

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
            build.args(["build", "--quiet", "--manifest-path", manifest, "--bins"]);
            if dir.ends_with("release") {
                build.arg("--release");
            }
            for package in [
                "firstline-ingest",
                "firstline-bot-router",
                "firstline-dispatcher",
                "firstline-notifier",
            ] {
                build.args(["-p", package]);
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

/// A Postgres server of the test's own (initdb in a temporary directory, run as the
/// `postgres` OS user on a free port), which the test can crash and start again.
pub struct TestPostgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    /// Admin connection URL (database `postgres`, trust auth).
    pub url: String,
}

impl TestPostgres {
    pub async fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("Postgres server binaries in /usr/lib/postgresql (scripts/test installs them)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("pg_ctl").exists())
            .max()
            .expect("a Postgres version with pg_ctl");
        let dir = std::env::temp_dir().join(format!("fl-test-pg-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let pg = TestPostgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            port,
        };
        pg.as_postgres(&format!("chown -R postgres {}", pg.dir.display()), true);
        pg.as_postgres(
            &format!(
                "{}/initdb -D {}/data -A trust -U postgres --no-sync",
                pg.bin.display(),
                pg.dir.display()
            ),
            false,
        );
        pg.restart().await;
        pg
    }

    fn as_postgres(&self, command: &str, as_root: bool) {
        let status = if as_root {
            Command::new("sh")
                .args(["-c", command])
                .stdout(Stdio::null())
                .status()
        } else {
            Command::new("runuser")
                .args(["-u", "postgres", "--", "sh", "-c", command])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        }
        .expect("run a Postgres command");
        assert!(status.success(), "`{command}` failed");
    }

    /// Starts (again) and waits until it accepts connections.
    pub async fn restart(&self) {
        self.as_postgres(
            &format!(
                "{}/pg_ctl -D {d}/data -l {d}/log -w -o '-p {} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off' start",
                self.bin.display(),
                self.port,
                d = self.dir.display()
            ),
            false,
        );
        eventually(
            "Postgres accepts connections",
            Duration::from_secs(20),
            || async {
                tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }

    /// Stops at once, as a crash would (`pg_ctl stop -m immediate`: no checkpoint, clients cut).
    pub fn crash(&self) {
        self.as_postgres(
            &format!(
                "{}/pg_ctl -D {}/data -m immediate -w stop",
                self.bin.display(),
                self.dir.display()
            ),
            false,
        );
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D"])
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until the count `sql` returns equals `expected`, or panics after `timeout` naming `what`.
pub async fn wait_for_count(
    pg: &tokio_postgres::Client,
    what: &str,
    timeout: Duration,
    sql: &str,
    expected: i64,
) {
    eventually(what, timeout, || async {
        (count(pg, sql, &[]).await == expected).then_some(())
    })
    .await
}
