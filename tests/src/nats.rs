//! A NATS JetStream server of the test's own: the pinned `nats-server` binary
//! (`NATS_SERVER_BIN`, 2.10 or later) on a free port with a temporary store, which the test
//! can kill and start again.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use uuid::Uuid;

use crate::wait::eventually;

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

/// A port nobody listens on now (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A JetStream cluster of `nats-server` processes on loopback, each routed to the others, each
/// with a store of its own; killed when dropped.
pub struct TestCluster {
    pub nodes: Vec<TestNats>,
    /// Every node's client URL, comma-separated, as `FL_NATS_URL` takes them.
    pub url: String,
}

impl TestCluster {
    /// `size` nodes (3 for R3 streams), started and JetStream answering.
    pub async fn start(size: usize) -> Self {
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let mut nodes = Vec::with_capacity(size);
        for (i, port) in cluster_ports.iter().enumerate() {
            let routes: Vec<String> = cluster_ports
                .iter()
                .filter(|p| *p != port)
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            let config = format!(
                "server_name: n{i}\ncluster {{\n  name: fl\n  listen: 127.0.0.1:{port}\n  routes: [{}]\n}}\n",
                routes.join(", ")
            );
            nodes.push(TestNats::start_with_config(&config, None).await);
        }
        let url = nodes
            .iter()
            .map(|n| n.url.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let cluster = Self { nodes, url };
        // Up once the JetStream meta group has a leader: the account info answers.
        eventually(
            "the cluster's JetStream answers",
            Duration::from_secs(60),
            || async {
                let client = async_nats::connect(cluster.urls()).await.ok()?;
                async_nats::jetstream::new(client)
                    .query_account()
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        cluster
    }

    /// The nodes' client URLs, one each.
    pub fn urls(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.url.as_str()).collect()
    }

    /// The node (its index: nodes are named `n0`, `n1`...) that leads `stream` now, if it has
    /// a leader and it answers.
    pub async fn leader_of(
        &self,
        js: &async_nats::jetstream::Context,
        stream: &str,
    ) -> Option<usize> {
        let mut stream = js.get_stream(stream).await.ok()?;
        let info = stream.info().await.ok()?;
        let leader = info.cluster.as_ref()?.leader.as_deref()?;
        leader.strip_prefix('n')?.parse().ok()
    }

    /// SIGKILLs node `i`, keeping its store.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again (after [`TestCluster::kill`]) on its ports with its store, and
    /// waits until it listens; it rejoins the cluster by its routes.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
        let port = self.nodes[i].port;
        eventually(
            "the restarted node listens",
            Duration::from_secs(20),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }

    /// Whether every replica of `stream` is current (none offline or behind).
    pub async fn all_current(&self, js: &async_nats::jetstream::Context, stream: &str) -> bool {
        let Ok(mut stream) = js.get_stream(stream).await else {
            return false;
        };
        let Ok(info) = stream.info().await else {
            return false;
        };
        info.cluster.as_ref().is_some_and(|c| {
            c.leader.is_some()
                && c.replicas.len() + 1 == self.nodes.len()
                && c.replicas.iter().all(|r| r.current && !r.offline)
        })
    }
}
