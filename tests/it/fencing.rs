//! Tenant fencing on NATS: with the configuration `firstline nats-config` writes, a tenant's
//! gateway publishes its own customers' messages, and is refused on another tenant's subjects.

use std::time::Duration;

use crate::helpers::{count, holds_for, TestApp, TestNats};
use firstline::nats_config::{self, Gateway};
use firstline_shared::domain::TenantId;
use tokio::sync::mpsc;

const SETUP: &str = r#"{"tenants":[
    {"id":"ta","channels":[{"id":"mail","bot_enabled":false}]},
    {"id":"tb","channels":[{"id":"mail","bot_enabled":false}]}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_gateway_is_refused_on_another_tenants_subjects() {
    let gateways: Vec<Gateway> = ["ta", "tb"]
        .iter()
        .map(|t| Gateway {
            tenant: TenantId::parse(*t).unwrap(),
            password: format!("{t}-secret"),
        })
        .collect();
    let auth = nats_config::authorization("firstline", "workers-secret", &gateways);
    let nats = TestNats::start_with_config(&auth, Some(("firstline", "workers-secret"))).await;
    let port = nats.port;
    let app = TestApp::spawn_on(nats, SETUP).await;

    // Anonymous clients are refused outright.
    assert!(async_nats::connect(format!("nats://127.0.0.1:{port}"))
        .await
        .is_err());

    // Gateway A, with its inbox prefix, and the server's asynchronous errors collected.
    let (errors_tx, mut errors) = mpsc::unbounded_channel();
    let gateway_a =
        async_nats::ConnectOptions::with_user_and_password("gateway-ta".into(), "ta-secret".into())
            .custom_inbox_prefix(gateways[0].inbox_prefix())
            .event_callback(move |event| {
                let errors_tx = errors_tx.clone();
                async move {
                    let _ = errors_tx.send(event.to_string());
                }
            })
            .connect(format!("nats://127.0.0.1:{port}"))
            .await
            .unwrap();
    let js_a = async_nats::jetstream::new(gateway_a.clone());

    // Its own tenant: published, acknowledged by JetStream, and handled.
    let body = r#"{"version":1,"message_id":"a-1","customer":{"id":"U1"},"text":"hi"}"#;
    js_a.publish("fl.ta.inbound.mail", body.into())
        .await
        .unwrap()
        .await
        .unwrap();
    app.wait_for_state("ta", "mail", "U1", "waiting").await;

    // Tenant B's inbound subject: refused by the server, never stored.
    gateway_a
        .publish("fl.tb.inbound.mail", body.replace("a-1", "a-2").into())
        .await
        .unwrap();
    gateway_a.flush().await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = errors.recv().await.unwrap();
            if e.to_lowercase().contains("permissions violation") {
                return e;
            }
        }
    })
    .await
    .expect("a permissions violation");
    assert!(refused.contains("fl.tb.inbound.mail"), "{refused}");
    // Nor may it read tenant B's outbound messages.
    let _sub = gateway_a.subscribe("fl.tb.outbound.>").await.unwrap();
    gateway_a.flush().await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = errors.recv().await.unwrap();
            if e.contains("fl.tb.outbound") {
                return e;
            }
        }
    })
    .await
    .expect("a subscribe permissions violation");
    assert!(
        refused.to_lowercase().contains("permissions violation"),
        "{refused}"
    );

    holds_for(
        "nothing of tenant A's stored for tenant B",
        Duration::from_millis(300),
        || async {
            app.stored("FL_INBOUND", "fl.tb.inbound.mail")
                .await
                .is_empty()
                && count(
                    &app.pg,
                    "SELECT count(*) FROM conversations WHERE tenant_id = 'tb'",
                    &[],
                )
                .await
                    == 0
        },
    )
    .await;
}

/// The workers authenticate with an nkey (`FL_NATS_NKEY_SEED`) against a server that knows
/// only the public key; the pipeline works end to end over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_authenticate_with_an_nkey() {
    let user = nkeys::KeyPair::new_user();
    let auth = format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}",
        user.public_key()
    );
    let nats = TestNats::start_with_config(&auth, None).await;
    let port = nats.port;
    // Anonymous and password clients are refused.
    assert!(async_nats::connect(format!("nats://127.0.0.1:{port}"))
        .await
        .is_err());
    let mut config =
        firstline_shared::config::CommonConfig::new(format!("nats://127.0.0.1:{port}"), "");
    config.nats_nkey_seed = Some(user.seed().unwrap());
    let client = firstline_shared::bus::connect(&config).await.unwrap();
    client.flush().await.expect("connected with the nkey");
    drop(client);
    let seed = user.seed().unwrap();
    let app = TestApp::spawn_configured(nats, SETUP, |c| c.nats_nkey_seed = Some(seed)).await;
    app.customer_says("ta", "mail", "K1", "hello").await;
    app.wait_for_state("ta", "mail", "K1", "waiting").await;
}

/// NATS over TLS: the server requires it; the workers verify the server with the CA given in
/// `FL_NATS_TLS_CA` and the pipeline works; a client that does not trust the CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_talk_to_nats_over_tls() {
    let dir = std::env::temp_dir().join(format!("fl-test-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let sh = |script: &str| {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success(), "{script}");
    };
    // A CA, and a server certificate it signs for 127.0.0.1 and localhost.
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=test-ca");
    sh("openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost");
    sh("printf 'subjectAltName=IP:127.0.0.1,DNS:localhost' > san.ext && \
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 -extfile san.ext");
    let tls = format!(
        "tls {{ cert_file: \"{0}/server.pem\", key_file: \"{0}/server.key\" }}",
        dir.display()
    );
    let nats = TestNats::start_with_config(&tls, None).await;
    let port = nats.port;

    // Without the CA the server's certificate is not trusted.
    let mut untrusting =
        firstline_shared::config::CommonConfig::new(format!("nats://127.0.0.1:{port}"), "");
    untrusting.nats_tls_required = true;
    let refused = tokio::time::timeout(Duration::from_secs(3), async {
        let client = firstline_shared::bus::connect(&untrusting).await.ok()?;
        client.flush().await.ok()
    })
    .await;
    assert!(
        !matches!(refused, Ok(Some(()))),
        "a client without the CA must not get through"
    );

    let ca = dir.join("ca.pem");
    let app = TestApp::spawn_configured(nats, SETUP, |c| c.nats_tls_ca = Some(ca)).await;
    app.customer_says("ta", "mail", "T1", "over TLS").await;
    app.wait_for_state("ta", "mail", "T1", "waiting").await;
    let _ = std::fs::remove_dir_all(&dir);
}
