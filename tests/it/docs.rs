//! Values the README and the schemas state, checked against what the code does (issue 20:
//! docs that disagreed with the code): the hand-over event's reason, the knowledge-base
//! threshold's default, the dispatch cycle's range; the lines "Try it" shows and its pictures.

use std::time::Duration;

use crate::helpers::{next_matching, TestApp};
use firstline_tests::db::TestDb;

const README: &str = include_str!("../../README.md");
const CONVERSATION_EVENT_SCHEMA: &str =
    include_str!("../../schemas/conversation-event.schema.json");

/// The README's settings-table cell `column` (0-based) of the row of `setting`.
fn readme_setting(setting: &str, column: usize) -> String {
    let row = README
        .lines()
        .find(|l| l.starts_with(&format!("| `{setting}` |")))
        .unwrap_or_else(|| panic!("the README's settings table has no row for {setting}"));
    row.split('|').nth(column + 1).unwrap().trim().to_owned()
}

/// The hand-over keyword's event carries a reason the `conversation-event` schema lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hand_over_reason_is_the_one_the_schema_describes() {
    let app = TestApp::spawn(
        r#"{"tenants":[{"id": "t1",
            "channels": [{"id": "line", "kind": "line", "bot_enabled": true}]}]}"#,
    )
    .await;
    let mut events = app
        .client
        .subscribe("fl.t1.events.conversation")
        .await
        .unwrap();
    app.customer_says("t1", "line", "U1", "你好").await;
    app.customer_says("t1", "line", "U1", "轉真人").await;
    let handed_over = tokio::time::timeout(
        Duration::from_secs(20),
        next_matching(&mut events, "the hand-over event", |v| {
            v["from"] == "bot" && v["to"] == "waiting"
        }),
    )
    .await
    .expect("a hand-over event");
    let reason = handed_over["reason"].as_str().unwrap().to_owned();
    let schema: serde_json::Value = serde_json::from_str(CONVERSATION_EVENT_SCHEMA).unwrap();
    let described = schema["properties"]["reason"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(
        described.contains(&format!("`{reason}`")),
        "the hand-over event's reason is {reason:?}; the schema says: {described}"
    );
}

/// One default for `kb_min_score`: the database's (a tenant that sets none), the bot's
/// [`DEFAULT_MIN_SCORE`](firstline_bot_router::kb::DEFAULT_MIN_SCORE) (what its scoring is
/// tuned and tested against) and the README's settings table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kb_min_score_has_one_default() {
    let db = TestDb::create().await;
    let file = firstline::setup::SetupFile::parse(r#"{"tenants":[{"id": "t1", "channels": []}]}"#)
        .unwrap();
    firstline::setup::configure(&db.url, &file).await.unwrap();
    let pg = db.connect().await;
    let stored: f32 = pg
        .query_one("SELECT kb_min_score FROM tenants WHERE id = 't1'", &[])
        .await
        .unwrap()
        .get(0);
    let code = firstline_bot_router::kb::DEFAULT_MIN_SCORE;
    assert!(
        (f64::from(stored) - code).abs() < 1e-6,
        "a new tenant's kb_min_score is {stored}, the bot's DEFAULT_MIN_SCORE {code}"
    );
    let readme = readme_setting("kb_min_score", 2);
    assert_eq!(readme.parse::<f64>().ok(), Some(code), "README: {readme}");
}

/// The README states the range `PATCH /api/v1/settings` and the database accept.
#[test]
fn the_readme_states_the_dispatch_cycle_range() {
    let range = firstline_shared::db::DISPATCH_CYCLE_SECONDS;
    let thousands = |n: i32| {
        let s = n.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    };
    let cell = readme_setting("dispatch_cycle_seconds", 2);
    let stated = format!(
        "{} to {}",
        thousands(*range.start()),
        thousands(*range.end())
    );
    assert!(
        cell.contains(&stated),
        "README says {cell:?}, the code {stated}"
    );
}

/// The README's "Try it" section.
fn try_it_section() -> &'static str {
    README
        .split("\n## Try it\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the README has a Try it section")
}

/// The README's "Try it": the two lines it shows are those `scripts/up` and the demo print (at
/// the default addresses), and its pictures are small PNGs that the test it names writes.
#[test]
fn try_it_shows_what_scripts_up_prints_and_the_pictures_of_the_test_it_names() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let section = try_it_section();

    // scripts/up says the web chat's address itself (`say` prints `==> `), with its default.
    let up = std::fs::read_to_string(root.join("scripts/up")).unwrap();
    let default_addr = up
        .split("FL_WEBCHAT_ADDR:-")
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .expect("scripts/up's default FL_WEBCHAT_ADDR");
    let said = up
        .lines()
        .find_map(|l| l.strip_prefix("say \"web chat"))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("scripts/up says the web chat's address");
    let webchat_line = format!("==> web chat{said}").replace("$FL_WEBCHAT_ADDR", default_addr);
    // The demo prints the desk's, on the API's default address (README: Configuration).
    assert!(README.contains("| `FL_API_ADDR` | `127.0.0.1:8080` |"));
    let desk_line = firstline::demo::desk_line("127.0.0.1:8080".parse().unwrap(), "fl_…");
    for line in [&webchat_line, &desk_line] {
        assert!(
            section.lines().any(|l| l == line.as_str()),
            "Try it does not show the line {line:?}:\n{section}"
        );
    }

    // Each picture: a PNG of at most 200 kB, written by the test the section names.
    let test_file = section
        .split('`')
        .find(|s| s.starts_with("tests/it/") && s.ends_with(".rs"))
        .expect("Try it names the test that takes its pictures");
    let test = std::fs::read_to_string(root.join(test_file)).unwrap();
    let pictures: Vec<&str> = section
        .split("src=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert_eq!(pictures.len(), 2, "one picture of each page: {pictures:?}");
    for picture in pictures {
        let bytes = std::fs::read(root.join(picture)).unwrap_or_else(|e| panic!("{picture}: {e}"));
        assert!(bytes.starts_with(b"\x89PNG\r\n"), "{picture} is a PNG");
        assert!(bytes.len() <= 200_000, "{picture} is {} bytes", bytes.len());
        let name = picture.rsplit('/').next().unwrap();
        assert!(
            test.contains(&format!("\"{name}\"")),
            "{test_file} does not write {name}"
        );
    }
}

/// The switch Try it names to leave the simulation out is one `scripts/up --help` lists (its
/// help starts nothing), and `scripts/up` hands it to `firstline demo`, which takes it.
#[test]
fn try_it_s_switch_is_one_scripts_up_and_the_demo_take() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let section = try_it_section();
    let switch = section
        .split('`')
        .find_map(|s| s.strip_prefix("scripts/up --"))
        .map(|s| format!("--{s}"))
        .expect("Try it names a switch of scripts/up");
    let help = std::process::Command::new(root.join("scripts/up"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains(&format!("scripts/up {switch}")),
        "scripts/up --help does not list {switch}:\n{help}"
    );
    let up = std::fs::read_to_string(root.join("scripts/up")).unwrap();
    assert!(up.contains("exec ./target/debug/firstline demo \"$@\""));
    let demo =
        std::process::Command::new(firstline_tests::workers::WorkerProcess::binary("firstline"))
            .args(["demo", "--help"])
            .output()
            .unwrap();
    assert!(
        String::from_utf8_lossy(&demo.stdout).contains(&switch),
        "firstline demo does not take {switch}"
    );
}
