//! A real browser for the pages' tests: headless Chromium (Debian's `chromium`, or
//! `CHROMIUM_BIN`), driven over the DevTools protocol; screenshots go to
//! `target/test-output/`. Used by the dashboard's, the agent desk's, the widget's and the
//! end-to-end (`try_it::`) tests.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use super::eventually;

/// Debian's chromium (or CHROMIUM_BIN); scripts/test installs it.
pub fn chromium_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("CHROMIUM_BIN") {
        return bin.into();
    }
    for candidate in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!("no Chromium found: install Debian's `chromium` package (scripts/test does) or set CHROMIUM_BIN");
}

pub struct Browser {
    child: Child,
    profile: PathBuf,
    port: u16,
}

impl Browser {
    pub fn start() -> Self {
        // The DevTools calls below go through reqwest, whose rustls needs a crypto provider; a
        // test that starts no worker in its own process (webchat::) would have none.
        firstline_shared::install_crypto_provider();
        let profile = std::env::temp_dir().join(format!("fl-chromium-{}", Uuid::new_v4().simple()));
        let mut child = Command::new(chromium_binary())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1440,1100",
                "--lang=en-US",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        // "DevTools listening on ws://127.0.0.1:<port>/devtools/browser/<id>"
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("chromium exited before it listened")
                .unwrap();
            if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                break rest.split('/').next().unwrap().parse().unwrap();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            profile,
            port,
        }
    }

    /// A DevTools session on a new page (a tab of its own, beside the first), showing `about:blank`.
    pub async fn new_page(&self) -> Page {
        // `PUT /json/new` (Chromium refuses a GET there) opens the tab and describes it.
        let body = reqwest::Client::new()
            .put(format!(
                "http://127.0.0.1:{}/json/new?about:blank",
                self.port
            ))
            .send()
            .await
            .expect("a new tab")
            .bytes()
            .await
            .expect("the new tab's description");
        let target: Value = serde_json::from_slice(&body).expect("the new tab's description");
        Page::attach(&target).await
    }

    /// A DevTools session on the browser's first page.
    pub async fn page(&self) -> Page {
        let targets: Value = eventually("the page target", Duration::from_secs(20), || async {
            let r = reqwest::get(format!("http://127.0.0.1:{}/json/list", self.port))
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
            v.as_array()?
                .iter()
                .any(|t| t["type"] == "page")
                .then_some(v)
        })
        .await;
        let target = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .unwrap();
        Page::attach(target).await
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The few DevTools commands the test needs.
pub struct Page {
    socket: Socket,
    next_id: u64,
}

impl Page {
    /// A session on the page `target` describes (an entry of `/json/list`).
    async fn attach(target: &Value) -> Self {
        let url = target["webSocketDebuggerUrl"]
            .as_str()
            .unwrap_or_else(|| panic!("no DevTools address in {target}"));
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("devtools");
        Page { socket, next_id: 0 }
    }

    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::Text(request.to_string().into()))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .unwrap()
                .unwrap();
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page; its value, as JSON.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Navigates to `url` (with the page domain enabled).
    pub async fn navigate(&mut self, url: &str) {
        self.call("Page.enable", json!({})).await;
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    /// Evaluates `expression`, a JSON string built in the page (`JSON.stringify(...)`, or
    /// `{"loading": ...}` while the page is not ready), until `ok` holds for it, within 30 s;
    /// the last value. The timeout's message names `what` and shows what the page last had.
    pub async fn wait_json(
        &mut self,
        what: &str,
        expression: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.json(expression).await;
            if ok(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; the page shows {v}"
            );
            // The poll interval of this wait, which reports what the page last showed.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `expression`'s value, a JSON string, parsed.
    pub async fn json(&mut self, expression: &str) -> Value {
        self.eval(expression)
            .await
            .as_str()
            .map(|s| serde_json::from_str(s).unwrap())
            .unwrap_or(Value::Null)
    }

    /// Clicks the element `selector` finds (it must find one).
    pub async fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let found = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return false; e.click(); return true; }})()"
            ))
            .await;
        assert_eq!(found, true, "no element {selector} to click");
    }

    /// Types `text` into the field `selector` finds, as a keyboard would (focus, then
    /// `Input.insertText`), after clearing it.
    pub async fn type_into(&mut self, selector: &str, text: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let found = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return false; e.value = ''; e.focus(); return true; }})()"
            ))
            .await;
        assert_eq!(found, true, "no field {selector} to type into");
        self.call("Input.insertText", json!({ "text": text })).await;
    }

    /// Saves a PNG of the whole page as `target/test-output/<name>` (`name` may name a
    /// folder, `try-it/01-x.png`); its path.
    pub async fn screenshot(&mut self, name: &str) -> PathBuf {
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join("test-output");
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, png).unwrap();
        println!("screenshot: {}", path.display());
        path
    }
}
