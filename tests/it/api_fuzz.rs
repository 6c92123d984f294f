//! The OpenAPI document is complete enough for a client generator and a schema-driven fuzzer:
//! the bearer security scheme, every error response with the error body, the limits of every
//! field. And schemathesis, driven by the document alone, with an admin's and an agent's
//! token, finds no server error and no answer that breaks the document (before issue 20's
//! fixes it found `GET /api/v1/conversations?agent=%00` answering 500).
//!
//! schemathesis (PyPI) is installed into `.tools/schemathesis` by `scripts/test`; without it the
//! fuzz test fails saying how to install it, unless `FL_SKIP_SCHEMATHESIS=1`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::api::start;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_has_security_errors_and_limits() {
    let (_app, api, _) = start().await;
    let (status, doc) = api.call("GET", "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["type"],
        "http"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(doc["security"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s.get("bearer").is_some()));
    let error_ref = "#/components/schemas/ErrorBody";
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            let mut wanted = vec!["400", "401", "403"];
            if path.contains('{') {
                wanted.push("404");
            }
            if op.get("requestBody").is_some() {
                wanted.extend(["413", "415", "422"]);
            }
            for status in wanted {
                let schema = &responses
                    .get(status)
                    .unwrap_or_else(|| panic!("{method} {path} documents {status}"))["content"]
                    ["application/json"]["schema"];
                assert_eq!(schema["$ref"], error_ref, "{method} {path} {status}");
            }
        }
    }
    let schemas = &doc["components"]["schemas"];
    let text_limit = |schema: &str, field: &str| -> u64 {
        let prop = &schemas[schema]["properties"][field];
        let resolved = match prop["$ref"].as_str() {
            Some(r) => &schemas[r.rsplit('/').next().unwrap()],
            None => prop
                .get("oneOf")
                .and_then(|o| o.as_array())
                .and_then(|o| o.iter().find_map(|s| s["$ref"].as_str()))
                .map(|r| &schemas[r.rsplit('/').next().unwrap()])
                .unwrap_or(prop),
        };
        resolved["maxLength"]
            .as_u64()
            .unwrap_or_else(|| panic!("{schema}.{field} has a maxLength: {prop}"))
    };
    assert_eq!(text_limit("ReplyInput", "text"), 5000);
    assert_eq!(text_limit("DeclineInput", "reason"), 500);
    assert_eq!(text_limit("PresenceInput", "reason"), 200);
    assert_eq!(text_limit("AgentInput", "display_name"), 200);
    assert_eq!(text_limit("NewWebhook", "url"), 2048);
    assert_eq!(text_limit("NewToken", "name"), 200);
    assert_eq!(text_limit("SettingsPatch", "bot_reply"), 5000);
    assert_eq!(
        schemas["AgentInput"]["properties"]["capacity"]["maximum"],
        1000
    );
    assert_eq!(
        schemas["AgentInput"]["properties"]["capacity"]["minimum"],
        0
    );
    assert_eq!(
        schemas["SettingsPatch"]["properties"]["offer_limit"]["maximum"],
        50
    );
    let status_enum = &schemas["PresenceStatus"]["enum"];
    assert_eq!(
        status_enum,
        &serde_json::json!(["ready", "away", "logged_out", "not_ready", "offline"])
    );
    let params = doc["paths"]["/api/v1/conversations"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let limit = params.iter().find(|p| p["name"] == "limit").unwrap();
    assert_eq!(
        (&limit["schema"]["minimum"], &limit["schema"]["maximum"]),
        (&Value::from(1), &Value::from(500))
    );
}

/// The schemathesis command, or `None` when the developer opted out.
fn schemathesis() -> Option<(PathBuf, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let dir = std::env::var_os("FL_SCHEMATHESIS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".tools/schemathesis"));
    let bin = dir.join("bin/schemathesis");
    if bin.exists() {
        return Some((bin, dir));
    }
    if std::env::var("FL_SKIP_SCHEMATHESIS").is_ok_and(|v| v == "1") {
        eprintln!("FL_SKIP_SCHEMATHESIS=1: the schema-driven fuzz run is skipped");
        return None;
    }
    panic!(
        "schemathesis is not installed at {}: scripts/test installs it, or run \
         `python3 -m pip install --target .tools/schemathesis schemathesis==4.32.5` \
         (or set FL_SKIP_SCHEMATHESIS=1 to skip this test)",
        bin.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_driven_fuzzer_finds_no_server_error() {
    let Some((bin, dir)) = schemathesis() else {
        return;
    };
    let (_app, api, t) = start().await;
    let work = std::env::temp_dir().join(format!("fl-schemathesis-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&work).unwrap();
    // Ids that exist, so that generated bodies get past the path to the checks and the
    // database (random ids are refused first); and, as a fuzzer's dictionary, strings that
    // broke the API before (NUL), drawn for a tenth of the generated strings.
    std::fs::write(
        work.join("schemathesis.toml"),
        r#"
[dictionaries.hostile]
values = ["\u0000", "a\u0000b", "\u0000\u0000\u0000", "ok\u0000"]

[generation.dictionaries]
string = { dictionary = "hostile", probability = 0.1 }

[[operations]]
include-path-regex = "^/api/v1/agents/\\{id\\}"
parameters = { "path.id" = "amy" }

[[operations]]
include-path-regex = "^/api/v1/channels/\\{id\\}"
parameters = { "path.id" = "mail" }
"#,
    )
    .unwrap();
    // Bounded, so that the run takes about half a minute; FL_SCHEMATHESIS_EXAMPLES for more.
    let examples = std::env::var("FL_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "25".into());
    let started = Instant::now();
    for (who, token) in [("admin", &t.admin), ("agent", &t.amy)] {
        let run = tokio::process::Command::new(&bin)
            .env("PYTHONPATH", &dir)
            .current_dir(&work)
            .args([
                "run",
                &format!("{}/openapi.json", api.base),
                "--checks",
                "not_a_server_error,response_schema_conformance",
                "--header",
                &format!("Authorization: Bearer {token}"),
                // Streams that never end: the live tests cover them.
                "--exclude-path",
                "/api/v1/queue/live",
                "--exclude-path",
                "/api/v1/live",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                &examples,
                "--seed",
                "20",
                "--workers",
                "2",
                "--request-timeout",
                "10",
                "--generation-database",
                "none",
                "--no-color",
            ])
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(150), run)
            .await
            .expect("schemathesis ends within 150 s")
            .expect("schemathesis runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "schemathesis with the {who} token found problems:\n{stdout}\n{stderr}"
        );
        eprintln!("schemathesis ({who}):\n{stdout}");
    }
    eprintln!("schemathesis took {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&work);
}
