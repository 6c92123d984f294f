//! One trace per message (DESIGN.md): the W3C trace context that a gateway puts on its
//! inbound publish travels through ingest, the dispatcher and the notifier, to the offer on
//! the agent's notify subject; the spans reach a real OTLP/HTTP receiver with the right parents.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::helpers::{eventually, next_matching, TestApp};
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

type Spans = Arc<Mutex<Vec<Span>>>;

/// A minimal OTLP/HTTP trace receiver: POST /v1/traces with a protobuf body.
async fn otlp_receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            post(|State(spans): State<Spans>, body: Bytes| async move {
                let request =
                    ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
                let mut all = spans.lock().unwrap();
                for rs in request.resource_spans {
                    for ss in rs.scope_spans {
                        all.extend(ss.spans);
                    }
                }
                ExportTraceServiceResponse::default().encode_to_vec()
            }),
        )
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_gateway_to_the_agents_notification() {
    let (url, spans) = otlp_receiver().await;
    let telemetry =
        firstline_shared::telemetry::init_with("firstline-test", Some(url)).expect("telemetry");
    let app = TestApp::spawn(
        r#"{"tenants":[{"id":"t1","channels":[{"id":"mail","bot_enabled":false}]}]}"#,
    )
    .await;
    let mut notify = app.client.subscribe("fl.t1.notify.amy").await.unwrap();
    app.presence("t1", "amy", "ready", 5, &[]).await;
    // Amy is ready before the message arrives, so the pass that offers it is the one the
    // message's queue signal starts (and not a presence pass, in another trace).
    eventually("amy ready", Duration::from_secs(20), || async {
        let ready = crate::helpers::count(
            &app.pg,
            "SELECT count(*) FROM agents WHERE status = 'ready'",
            &[],
        )
        .await;
        (ready == 1).then_some(())
    })
    .await;

    // The gateway's own span: trace 4bf9…, span 00f0….
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let gateway_span = "00f067aa0ba902b7";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace_id}-{gateway_span}-01").as_str(),
    );
    headers.insert("Nats-Msg-Id", "mail:traced-1");
    app.js
        .publish_with_headers(
            "fl.t1.inbound.mail",
            headers,
            r#"{"version":1,"message_id":"traced-1","customer":{"id":"U9"},"text":"hi"}"#.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    // The offer reaches the agent carrying the same trace.
    let offer = next_matching(&mut notify, "the offer", |v| v["type"] == "offer").await;
    assert_eq!(offer["customer"]["id"], "U9");
    let stored = app.js.get_stream("FL_NOTIFY").await.unwrap();
    let last = stored
        .get_last_raw_message_by_subject("fl.t1.notify.amy")
        .await
        .unwrap();
    let traceparent = last
        .headers
        .get("traceparent")
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(
        traceparent.contains(trace_id),
        "the offer's traceparent {traceparent:?}"
    );

    // The spans: ingest's is the gateway's child, the dispatcher's is ingest's child, the
    // notifier's is the dispatcher's child.
    let chain = eventually("the spans exported", Duration::from_secs(20), || {
        telemetry.flush();
        let spans = spans.lock().unwrap().clone();
        async move {
            let of_trace: Vec<Span> = spans
                .into_iter()
                .filter(|s| hex(&s.trace_id) == trace_id)
                .collect();
            let find = |prefix: &str| {
                of_trace
                    .iter()
                    .find(|s| s.name.starts_with(prefix))
                    .cloned()
            };
            let (ingest, dispatcher) = (find("ingest-p")?, find("dispatcher-queue ")?);
            // The notifier delivers the offer (the dispatcher's child) and the place in line
            // told when queued (ingest's child).
            let parents: Vec<Vec<u8>> = of_trace
                .iter()
                .filter(|s| s.name.starts_with("notifier "))
                .map(|s| s.parent_span_id.clone())
                .collect();
            (parents.contains(&dispatcher.span_id) && parents.contains(&ingest.span_id))
                .then_some((ingest, dispatcher))
        }
    })
    .await;
    let (ingest, dispatcher) = chain;
    assert_eq!(hex(&ingest.parent_span_id), gateway_span);
    assert_eq!(dispatcher.parent_span_id, ingest.span_id);
    telemetry.shutdown();
}
