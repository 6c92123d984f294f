//! Tests of [`super`]: flows run from their start and answers, checks refused at publishing,
//! condition steps (SPEC D10).

use super::*;
use crate::condition::Said;
use firstline_shared::wire::EmailHeaders;

fn said(text: &str) -> Said<'_> {
    Said { text, email: None }
}

/// The product's 緊急信件轉派 example (SPEC D10): mail whose subject or body says "urgent"
/// or "warning" gets weight 1000; then every mail is handed over.
fn urgent_mail_flow() -> FlowDef {
    serde_json::from_value(serde_json::json!({
        "start": "triage",
        "steps": {
            "triage": {"type": "condition",
                "when": [{"field": "any", "match": "regex", "pattern": "urgent|warning|緊急"}],
                "set_weight": 1000, "then": "agent"},
            "agent": {"type": "handover"}
        }
    }))
    .unwrap()
}

#[test]
fn a_condition_step_sets_the_weight_of_urgent_mail() {
    let flow = urgent_mail_flow();
    flow.check().unwrap();
    let mail = |subject: &str, body: &'static str| {
        let email = EmailHeaders {
            subject: subject.into(),
            from: "ada@example.com".into(),
            to: vec!["support@shop.example".into()],
        };
        let outcome = start(
            &flow,
            Said {
                text: body,
                email: Some(&email),
            },
        );
        assert_eq!(outcome.next, FlowNext::Handover(None));
        outcome.weight
    };
    assert_eq!(mail("URGENT: card stolen", "please block it"), Some(1000));
    assert_eq!(mail("Question", "Warning: my order is late"), Some(1000));
    assert_eq!(mail("緊急：帳號被盜", "請協助"), Some(1000));
    assert_eq!(mail("Question", "when do you open?"), None);
    // A chat message has only a text.
    assert_eq!(start(&flow, said("this is urgent")).weight, Some(1000));
}

#[test]
fn conditions_on_the_sender_and_recipients_branch() {
    let flow: FlowDef = serde_json::from_value(serde_json::json!({
        "start": "who",
        "steps": {
            "who": {"type": "condition",
                "when": [{"field": "from", "match": "contains", "pattern": "@vip.example"},
                         {"field": "to", "match": "contains", "pattern": "vip@shop.example"}],
                "set_weight": 50, "then": "vip", "else": "others"},
            "vip": {"type": "handover", "skills": ["vip"]},
            "others": {"type": "handover"}
        }
    }))
    .unwrap();
    flow.check().unwrap();
    let from = |from: &str, to: &str| {
        let email = EmailHeaders {
            subject: String::new(),
            from: from.into(),
            to: vec![to.into()],
        };
        let o = start(
            &flow,
            Said {
                text: "hi",
                email: Some(&email),
            },
        );
        (o.weight, o.next)
    };
    let vip = FlowNext::Handover(Some(SkillSet::new(["vip"])));
    assert_eq!(
        from("Bo <bo@VIP.example>", "help@shop.example"),
        (Some(50), vip.clone())
    );
    assert_eq!(from("ada@example.com", "vip@shop.example"), (Some(50), vip));
    assert_eq!(
        from("ada@example.com", "help@shop.example"),
        (None, FlowNext::Handover(None))
    );
    // No e-mail parts in a chat message: nothing matches.
    assert_eq!(start(&flow, said("vip@shop.example")).weight, None);
}

#[test]
fn publishing_refuses_a_bad_condition() {
    let bad = |step: serde_json::Value| {
        let flow: FlowDef = serde_json::from_value(serde_json::json!({
            "start": "c", "steps": {"c": step, "end": {"type": "end"}}
        }))
        .unwrap();
        flow.check().unwrap_err()
    };
    assert!(
        bad(serde_json::json!({"type": "condition", "when": [], "then": "end"}))
            .contains("at least one")
    );
    assert!(bad(serde_json::json!({"type": "condition", "when": [{"match": "regex", "pattern": "("}], "then": "end"})).contains("regular expression"));
    assert!(bad(serde_json::json!({"type": "condition", "when": [{"match": "contains", "pattern": "x"}], "set_weight": 0, "then": "end"})).contains("set_weight"));
    assert!(bad(serde_json::json!({"type": "condition", "when": [{"match": "contains", "pattern": "x"}], "then": "end", "else": "nowhere"})).contains("dangling"));
}

fn order_flow() -> FlowDef {
    serde_json::from_value(serde_json::json!({
        "start": "welcome",
        "handover_skills": ["billing"],
        "steps": {
            "welcome": {"type": "message", "text": "您好，這裡是訂單小幫手。", "next": "menu"},
            "menu": {"type": "buttons", "text": "請選擇服務項目", "buttons": [
                {"label": "查訂單", "next": "ask_order"},
                {"label": "退貨", "next": "refund"},
                {"label": "找專員", "next": "agent"}
            ]},
            "ask_order": {"type": "question", "text": "請輸入訂單編號", "save_as": "order_no", "next": "found"},
            "found": {"type": "message", "text": "訂單 {{order_no}} 已出貨。", "next": "bye"},
            "refund": {"type": "handover", "text": "轉接退貨專員", "skills": ["returns"]},
            "agent": {"type": "handover"},
            "bye": {"type": "end", "text": "謝謝，再見！"}
        }
    }))
    .unwrap()
}

#[test]
fn a_checked_flow_branches_keeps_answers_and_ends() {
    let flow = order_flow();
    flow.check().unwrap();
    let first = start(&flow, Said::default());
    assert_eq!(first.says.len(), 2);
    assert_eq!(first.says[1].buttons[0].payload, "flow:menu:1");
    let FlowNext::Wait(at) = first.next else {
        panic!("waits at the menu")
    };
    assert_eq!(at.step, "menu");
    // Press 查訂單.
    let asked = answer(&flow, at, said("查訂單"), Some("flow:menu:1"));
    assert_eq!(asked.says[0].text, "請輸入訂單編號");
    let FlowNext::Wait(at) = asked.next else {
        panic!()
    };
    let done = answer(&flow, at, said(" A123 "), None);
    assert_eq!(done.says[0].text, "訂單 A123 已出貨。");
    assert_eq!(done.says[1].text, "謝謝，再見！");
    assert_eq!(done.next, FlowNext::End);
}

#[test]
fn handover_steps_ask_for_their_skills_or_the_flows() {
    let flow = order_flow();
    let at = FlowPosition {
        step: "menu".into(),
        vars: Map::new(),
    };
    // The label typed, or its number, counts as the press.
    let refund = answer(&flow, at.clone(), said("退貨"), None);
    assert_eq!(
        refund.next,
        FlowNext::Handover(Some(SkillSet::new(["returns"])))
    );
    let agent = answer(&flow, at.clone(), said("3"), None);
    assert_eq!(
        agent.next,
        FlowNext::Handover(Some(SkillSet::new(["billing"])))
    );
    // Anything else: asked again, with the buttons.
    let again = answer(&flow, at.clone(), said("嗯？"), None);
    assert_eq!(again.next, FlowNext::Wait(at.clone()));
    assert_eq!(again.says[0].buttons.len(), 3);
    // A press of a button of another step is not a choice here.
    let stale = answer(&flow, at.clone(), said(""), Some("flow:other:1"));
    assert_eq!(stale.next, FlowNext::Wait(at));
}

fn broken(edit: impl FnOnce(&mut FlowDef)) -> String {
    let mut flow = order_flow();
    edit(&mut flow);
    flow.check().unwrap_err()
}

#[test]
fn publishing_refuses_broken_graphs_with_the_problem_named() {
    let dangling = broken(|f| {
        if let Some(Step::Buttons { buttons, .. }) = f.steps.get_mut("menu") {
            buttons[1].next = "refnud".into();
        }
    });
    assert!(
        dangling.contains(r#"step "menu" button 2 ("退貨") goes to "refnud", which is not a step"#),
        "{dangling}"
    );
    let unreachable = broken(|f| {
        f.steps.insert(
            "orphan_end".into(),
            Step::End {
                text: Some("never".into()),
            },
        );
    });
    assert!(
        unreachable
            .contains(r#"step "orphan_end" cannot be reached from the start step "welcome""#),
        "{unreachable}"
    );
    let no_end = broken(|f| {
        f.steps.insert(
            "found".into(),
            Step::Question {
                text: "again?".into(),
                save_as: "x".into(),
                next: "found".into(),
            },
        );
        f.steps.remove("bye");
    });
    assert!(
        no_end.contains("no end or handover step can be reached from step"),
        "{no_end}"
    );
    let spin = broken(|f| {
        f.steps.insert(
            "found".into(),
            Step::Message {
                text: "x".into(),
                image_url: None,
                next: "found".into(),
            },
        );
    });
    assert!(spin.contains(r#"step "bye" cannot be reached"#), "{spin}");
    let start = broken(|f| f.start = "nope".into());
    assert!(start.contains(r#"start step "nope" is not a step"#));
    let label = broken(|f| {
        if let Some(Step::Buttons { buttons, .. }) = f.steps.get_mut("menu") {
            buttons[1].label = "查訂單".into();
        }
    });
    assert!(label.contains("two buttons are labelled"), "{label}");
}

#[test]
fn a_message_loop_with_an_exit_elsewhere_is_refused() {
    let flow: FlowDef = serde_json::from_value(serde_json::json!({
        "start": "menu",
        "steps": {
            "menu": {"type": "buttons", "text": "?", "buttons": [
                {"label": "a", "next": "ping"}, {"label": "b", "next": "end"}]},
            "ping": {"type": "message", "text": "ping", "next": "pong"},
            "pong": {"type": "message", "text": "pong", "next": "ping"},
            "end": {"type": "end"}
        }
    }))
    .unwrap();
    let err = flow.check().unwrap_err();
    assert!(
        err.contains(r#"no end or handover step can be reached from step "ping""#),
        "{err}"
    );
}

#[test]
fn unknown_step_types_and_fields_are_refused_when_read() {
    let err = serde_json::from_value::<FlowDef>(serde_json::json!({
        "start": "a", "steps": {"a": {"type": "jump", "to": "b"}}
    }))
    .unwrap_err();
    assert!(err.to_string().contains("unknown variant `jump`"), "{err}");
}

#[test]
fn fill_replaces_known_names() {
    let mut vars = Map::new();
    vars.insert("name".into(), Value::String("小明".into()));
    assert_eq!(fill("你好 {{ name }}，{{missing}}!", &vars), "你好 小明，!");
    assert_eq!(fill("no {{ close", &vars), "no {{ close");
}
