//! A Postgres server of the test's own (not the shared one of `FL_TEST_PG_URL`), which a
//! test can crash and start again.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use firstline_tests::nats::free_port;
use firstline_tests::wait::eventually;
use uuid::Uuid;

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
