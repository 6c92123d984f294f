//! The shutdown of a worker binary (`firstline_shared::shutdown`, as every worker binary's
//! `main` sets it up): the first SIGTERM starts the orderly stop, a second one exits at once
//! with `EXIT_ON_SECOND_SIGNAL`, even when the orderly stop cannot finish.
//!
//! The worker is started against a NATS that is not there, so it stays in its start-up
//! (waiting for the server) and the first signal cannot end it; no services are needed.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use firstline_shared::shutdown::EXIT_ON_SECOND_SIGNAL;

/// Kills the worker if the test fails before it exits.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM failed");
}

/// Waits for a log line containing `text`.
fn wait_for_line(lines: &mpsc::Receiver<String>, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(text) => return,
            Ok(_) => {}
            Err(e) => panic!("no log line with {text:?}: {e}"),
        }
    }
}

#[test]
fn a_second_sigterm_exits_at_once() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_firstline-bot-router"))
        .env("FL_NATS_URL", format!("nats://127.0.0.1:{port}"))
        .env(
            "FL_DATABASE_URL",
            format!("postgres://nobody@127.0.0.1:{port}/none"),
        )
        .env("RUST_LOG", "info")
        .env_remove("FL_METRICS_ADDR")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the worker binary");
    let mut worker = Worker(child);
    let stdout = worker.0.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // The handlers are installed before the worker starts (and logs "starting").
    wait_for_line(&lines, "starting");
    sigterm(&worker.0);
    wait_for_line(&lines, "shutdown signal received");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker should still be waiting for NATS after the first signal"
    );

    sigterm(&worker.0);
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = worker.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "the worker did not exit after the second signal"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(EXIT_ON_SECOND_SIGNAL), "{status}");
}
