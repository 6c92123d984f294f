//! The whole system over a test's own NATS and Postgres ([`TestApp`]), and what a gateway
//! or an agent desktop would publish to it, as hand-written JSON.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use firstline_shared::config::CommonConfig;
use firstline_tests::db::TestDb;
use firstline_tests::nats::TestNats;
use firstline_tests::wait::eventually;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

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
        self.customer_sends(tenant, channel, customer, text, None, false)
            .await
    }

    /// Like [`TestApp::customer_says`], with the customer key in the subject
    /// (`fl.<t>.inbound.<channel>.<key>`: ordered per customer, spread over the partitions).
    pub async fn customer_says_keyed(
        &self,
        tenant: &str,
        channel: &str,
        customer: &str,
        text: &str,
    ) -> String {
        self.customer_sends(tenant, channel, customer, text, None, true)
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
        self.customer_sends(tenant, channel, customer, label, Some(payload), false)
            .await
    }

    async fn customer_sends(
        &self,
        tenant: &str,
        channel: &str,
        customer: &str,
        text: &str,
        postback: Option<&str>,
        keyed: bool,
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
        let subject = match keyed {
            true => format!(
                "fl.{tenant}.inbound.{channel}.{}",
                firstline_shared::subjects::customer_key(customer)
            ),
            false => format!("fl.{tenant}.inbound.{channel}"),
        };
        self.publish_json(
            &subject,
            Some(&format!("{tenant}:{channel}:{message_id}")),
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
        // The names before SPEC S2 go as version 1, the product's as version 2.
        let version = if matches!(status, "not_ready" | "offline") {
            1
        } else {
            2
        };
        let body = serde_json::json!({
            "version": version, "status": status, "capacity": capacity, "skills": skills,
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

    /// The states `conversation` went to, in order (its transitions' `to_state`).
    pub async fn states_of(&self, conversation: Uuid) -> Vec<String> {
        self.pg
            .query(
                "SELECT to_state FROM conversation_transitions WHERE conversation_id = $1 ORDER BY id",
                &[&conversation],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Waits until the dispatcher has stored `agent`'s presence as `status` with `reason`.
    pub async fn wait_for_presence(
        &self,
        tenant: &str,
        agent: &str,
        status: &str,
        reason: Option<&str>,
    ) {
        eventually(
            &format!("{agent} {status} {reason:?} in Postgres"),
            Duration::from_secs(20),
            || async {
                // The agent's first presence creates it: until then, no row.
                let row = self
                    .pg
                    .query_opt(
                        "SELECT status, status_reason FROM agents WHERE tenant_id = $1 AND id = $2",
                        &[&tenant, &agent],
                    )
                    .await
                    .unwrap()?;
                let (s, r): (String, Option<String>) = (row.get(0), row.get(1));
                (s == status && r.as_deref() == reason).then_some(())
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
