//! The HTTP API in tests: [`TestApp::start_api`] serves it (the real `firstline_api::serve`)
//! on a free port over the test's NATS and database; [`TestApi`] calls it with plain HTTP.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use super::TestApp;

/// A running API and an HTTP client for it.
pub struct TestApi {
    pub base: String,
    pub http: reqwest::Client,
}

impl TestApp {
    /// Serves the API (with its webhook sender) on a free port; webhooks retry fast:
    /// 3 tries, 100 ms apart, doubling.
    pub async fn start_api(&mut self) -> TestApi {
        self.start_api_with(|_| {}).await
    }

    /// [`TestApp::start_api`] with its settings changed by `adjust`.
    pub async fn start_api_with(
        &mut self,
        adjust: impl FnOnce(&mut firstline_api::Config),
    ) -> TestApi {
        firstline_api::install_crypto();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let mut config = firstline_api::Config::new(self.config.clone());
        config.webhooks.max_attempts = 3;
        config.webhooks.backoff_ms = 100;
        config.webhooks.timeout_secs = 2;
        adjust(&mut config);
        self.spawn_worker(firstline_api::serve(
            config,
            listener,
            self.shutdown.clone(),
        ));
        let api = TestApi {
            base,
            http: reqwest::Client::new(),
        };
        firstline_tests::wait::eventually("the API to answer", Duration::from_secs(20), || async {
            let r = api
                .http
                .get(format!("{}/healthz", api.base))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        api
    }

    /// Makes an API token, as `firstline token create` does.
    pub async fn token(&self, tenant: &str, role: &str, agent: Option<&str>) -> String {
        let tenant = firstline_shared::domain::TenantId::parse(tenant).unwrap();
        let role = firstline_api::auth::Role::parse(role).expect("a role");
        let agent = agent.map(|a| firstline_shared::domain::AgentId::parse(a).unwrap());
        let (_, token) =
            firstline_api::auth::create_token(&self.pg, &tenant, role, agent.as_ref(), "test")
                .await
                .map_err(|e| e.message)
                .expect("token");
        token
    }
}

impl TestApi {
    /// Calls `method path` with an optional token and JSON body; returns the status and the
    /// body as JSON (`null` when empty, a string when not JSON).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        status_and_json(req.send().await.expect("request")).await
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call("GET", path, Some(token), None).await
    }
    pub async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(token), Some(body)).await
    }
    pub async fn put(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.call("PUT", path, Some(token), Some(body)).await
    }

    /// Sets `agent`'s presence (`ready`, `away`, `logged_out`; or the older `not_ready`,
    /// `offline`) and checks the 202.
    pub async fn presence(&self, token: &str, agent: &str, status: &str) {
        let path = format!("/api/v1/agents/{agent}/presence");
        let (code, body) = self
            .put(&path, token, serde_json::json!({"status": status}))
            .await;
        assert_eq!(code, 202, "PUT {path}: {body}");
    }

    /// `GET path` that must answer 200; its body.
    pub async fn ok(&self, path: &str, token: &str) -> Value {
        let (status, body) = self.get(path, token).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }
}

/// A response's status and its body as JSON (`Null` when empty, a string when not JSON).
pub async fn status_and_json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    (status, value)
}
