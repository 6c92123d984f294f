//! Scripted flows (交談腳本, SPEC state `script`): a graph of steps. A `message` step says
//! something and goes on; `buttons` offers choices that branch; `question` asks and keeps the
//! answer on the conversation; `condition` looks at the customer's message (its text, and an
//! e-mail's subject, sender and recipients), may set the conversation's assignment weight
//! (SPEC D10, the product's 緊急信件轉派 example) and branches; `handover` sends the customer
//! to an agent with the skills the flow needs (SPEC L4, D4); `end` completes the conversation
//! (SPEC L3).
//!
//! A flow is edited as a draft and published as a numbered version (草稿與發佈); publishing
//! refuses a graph with a dangling branch, a step that cannot be reached, or a step from which
//! no end can be reached (messages looping among themselves included). A conversation
//! keeps the version it started with.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use firstline_shared::db::BotSays;
use firstline_shared::domain::{self, SkillSet};
use firstline_shared::wire::QuickReply;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::condition::{MessageCondition, Said};
use crate::keywords::check_url;
use crate::text::normalize;

/// A flow's definition (a draft, or a published version).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowDef {
    /// The first step.
    pub start: String,
    /// Skills a hand-over from inside the flow asks for (a hand-over keyword typed mid-flow,
    /// or a `handover` step without its own); empty: the channel's.
    #[serde(default, skip_serializing_if = "SkillSet::is_empty")]
    pub handover_skills: SkillSet,
    pub steps: BTreeMap<String, Step>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Says `text` (with an optional image) and goes on to `next` at once.
    Message {
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_url: Option<String>,
        next: String,
    },
    /// Says `text` with one quick-reply button per branch and waits for a press (or the label
    /// typed, or its number).
    Buttons {
        text: String,
        buttons: Vec<Branch>,
        /// Said, with the buttons again, when the answer is none of them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_text: Option<String>,
    },
    /// Says `text`, waits for the answer and keeps it as `save_as` (`{{save_as}}` in later texts).
    Question {
        text: String,
        save_as: String,
        next: String,
    },
    /// Hands the conversation to an agent (`waiting`) who has `skills` (else the flow's
    /// `handover_skills`, else the channel's).
    Handover {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        skills: Option<SkillSet>,
    },
    /// Completes the conversation.
    End {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
    },
    /// Looks at the customer's message that reached this step: when any of `when` matches,
    /// sets the conversation's assignment weight to `set_weight` (SPEC D10; kept for when it
    /// is queued) and goes on to `then`; else to `else` (by default `then` too). Goes on at
    /// once, like a message step.
    Condition {
        when: Vec<MessageCondition>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        set_weight: Option<i32>,
        then: String,
        #[serde(default, rename = "else", skip_serializing_if = "Option::is_none")]
        otherwise: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Branch {
    pub label: String,
    pub next: String,
}

impl Step {
    /// The steps this one can go to.
    fn targets(&self) -> Vec<&str> {
        match self {
            Self::Message { next, .. } | Self::Question { next, .. } => vec![next],
            Self::Condition {
                then, otherwise, ..
            } => std::iter::once(then.as_str())
                .chain(otherwise.as_deref())
                .collect(),
            Self::Buttons { buttons, .. } => buttons.iter().map(|b| b.next.as_str()).collect(),
            Self::Handover { .. } | Self::End { .. } => vec![],
        }
    }

    fn is_terminal(&self) -> bool {
        matches!(self, Self::Handover { .. } | Self::End { .. })
    }
}

/// A flow that passed [`FlowDef::check`] (publishing stores only those).
impl FlowDef {
    /// Checks the graph before it is published; the error names the flow's problem.
    pub fn check(&self) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err("has no steps".into());
        }
        for (id, step) in &self.steps {
            if id.is_empty() || id.len() > 64 || id.contains(':') {
                return Err(format!(
                    "step id {id:?} must be 1 to 64 characters without ':'"
                ));
            }
            check_step(id, step)?;
            for (i, target) in step.targets().into_iter().enumerate() {
                if !self.steps.contains_key(target) {
                    let what = match step {
                        Step::Buttons { buttons, .. } => {
                            format!("button {} ({:?})", i + 1, buttons[i].label)
                        }
                        _ => "next".to_owned(),
                    };
                    return Err(format!(
                        "step {id:?} {what} goes to {target:?}, which is not a step (a dangling branch)"
                    ));
                }
            }
        }
        if !self.steps.contains_key(&self.start) {
            return Err(format!("start step {:?} is not a step", self.start));
        }
        // Every step reachable from the start...
        let reachable = self.reachable_from(&self.start);
        if let Some(lost) = self
            .steps
            .keys()
            .find(|id| !reachable.contains(id.as_str()))
        {
            return Err(format!(
                "step {lost:?} cannot be reached from the start step {:?}",
                self.start
            ));
        }
        // ...and from every step, an end (or a hand-over) can be reached.
        for id in self.steps.keys() {
            let from_here = self.reachable_from(id);
            if !from_here.iter().any(|s| self.steps[*s].is_terminal()) {
                return Err(format!(
                    "no end or handover step can be reached from step {id:?} (the flow would never finish)"
                ));
            }
        }
        // (A loop of message steps, which would never wait for the customer, has no way out:
        // the check above refuses it.)
        Ok(())
    }

    fn reachable_from<'a>(&'a self, from: &'a str) -> BTreeSet<&'a str> {
        let mut seen = BTreeSet::from([from]);
        let mut todo = VecDeque::from([from]);
        while let Some(id) = todo.pop_front() {
            for t in self.steps[id].targets() {
                if self.steps.contains_key(t) && seen.insert(t) {
                    todo.push_back(t);
                }
            }
        }
        seen
    }
}

fn check_step(id: &str, step: &Step) -> Result<(), String> {
    let fail = |why: &str| Err(format!("step {id:?}: {why}"));
    match step {
        Step::Message {
            text, image_url, ..
        } => {
            if text.trim().is_empty() && image_url.is_none() {
                return fail("a message step needs a text or an image_url");
            }
            if let Some(url) = image_url {
                check_url(url).or_else(|e| fail(&e))?;
            }
        }
        Step::Buttons { text, buttons, .. } => {
            if text.trim().is_empty() {
                return fail("the buttons step needs a text");
            }
            if buttons.is_empty() || buttons.len() > 13 {
                return fail("a buttons step has 1 to 13 buttons");
            }
            let mut labels = BTreeSet::new();
            for b in buttons {
                if normalize(&b.label).is_empty() {
                    return fail("a button has an empty label");
                }
                if !labels.insert(normalize(&b.label)) {
                    return fail(&format!("two buttons are labelled {:?}", b.label));
                }
            }
        }
        Step::Question { text, save_as, .. } => {
            if text.trim().is_empty() {
                return fail("the question step needs a text");
            }
            if save_as.is_empty()
                || !save_as
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return fail("save_as must be a name of letters, digits and '_'");
            }
        }
        Step::Condition {
            when, set_weight, ..
        } => {
            if when.is_empty() {
                return fail("a condition step needs at least one test in `when`");
            }
            for c in when {
                c.check().or_else(|e| fail(&e))?;
            }
            if let Some(w) = set_weight {
                if let Err(e) = domain::check_weight(*w) {
                    return fail(&format!("set_weight: {e}"));
                }
            }
        }
        Step::Handover { .. } | Step::End { .. } => {}
    }
    Ok(())
}

/// Where a conversation is in its flow.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowPosition {
    /// The step waiting for the customer's answer.
    pub step: String,
    /// The answers kept so far.
    pub vars: Map<String, Value>,
}

/// What a step left the conversation with.
#[derive(Clone, Debug, PartialEq)]
pub enum FlowNext {
    /// Waiting for the customer at this position.
    Wait(FlowPosition),
    /// A `handover` step: to `waiting`, with these skills (`None`: the channel's).
    Handover(Option<SkillSet>),
    /// An `end` step: `completed`.
    End,
}

/// What the flow says and where it goes.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowOutcome {
    pub says: Vec<BotSays>,
    pub next: FlowNext,
    /// The answers kept, after this step (stored on the conversation, also when it ends).
    pub vars: Map<String, Value>,
    /// SPEC D10: the assignment weight a condition step set, if one did.
    pub weight: Option<i32>,
}

/// The payload of button `index` of `step`: which step it answers travels with it, so a
/// press of an old button is recognized.
fn payload(step: &str, index: usize) -> String {
    format!("flow:{step}:{}", index + 1)
}

/// The steps' output while they run.
#[derive(Default)]
struct Run {
    says: Vec<BotSays>,
    weight: Option<i32>,
}

/// Runs `flow` from its start, on the customer's message `said` that started it.
pub fn start(flow: &FlowDef, said: Said<'_>) -> FlowOutcome {
    let mut run = Run::default();
    let vars = Map::new();
    let next = run_from(flow, &flow.start, &vars, said, &mut run);
    FlowOutcome {
        says: run.says,
        next,
        vars,
        weight: run.weight,
    }
}

/// Takes the customer's message (`said`, or a button's `postback`) at `at` and runs on.
pub fn answer(
    flow: &FlowDef,
    at: FlowPosition,
    said: Said<'_>,
    postback: Option<&str>,
) -> FlowOutcome {
    let mut run = Run::default();
    let text = said.text;
    let FlowPosition { step, mut vars } = at;
    let Some(current) = flow.steps.get(&step) else {
        // Cannot happen with a published (checked, frozen) version; end cleanly if it does.
        return FlowOutcome {
            says: run.says,
            next: FlowNext::End,
            vars,
            weight: None,
        };
    };
    let next = match current {
        Step::Buttons {
            text: prompt,
            buttons,
            retry_text,
        } => match chosen(&step, buttons, text, postback) {
            Some(i) => run_from(flow, &buttons[i].next, &vars, said, &mut run),
            None => {
                let retry = retry_text.clone().unwrap_or_else(|| {
                    format!("請點選下列選項之一。Please choose one of the options.\n{prompt}")
                });
                run.says
                    .push(buttons_message(&step, &fill(&retry, &vars), buttons));
                FlowNext::Wait(FlowPosition {
                    step,
                    vars: vars.clone(),
                })
            }
        },
        Step::Question { save_as, next, .. } => {
            let answer = postback.unwrap_or(text).trim().to_owned();
            vars.insert(save_as.clone(), Value::String(answer));
            run_from(flow, next, &vars, said, &mut run)
        }
        // The flow only waits at buttons and questions; anything else: run it again.
        _ => run_from(flow, &step, &vars, said, &mut run),
    };
    FlowOutcome {
        says: run.says,
        next,
        vars,
        weight: run.weight,
    }
}

/// Which button the customer chose: a press of this step's button, the label typed, or its
/// number.
fn chosen(step: &str, buttons: &[Branch], text: &str, postback: Option<&str>) -> Option<usize> {
    if let Some(p) = postback {
        if let Some(i) = (0..buttons.len()).find(|&i| payload(step, i) == p) {
            return Some(i);
        }
    }
    let typed = normalize(postback.unwrap_or(text));
    if let Some(i) = buttons.iter().position(|b| normalize(&b.label) == typed) {
        return Some(i);
    }
    typed
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=buttons.len()).contains(n))
        .map(|n| n - 1)
}

fn buttons_message(step: &str, text: &str, buttons: &[Branch]) -> BotSays {
    BotSays {
        text: text.to_owned(),
        buttons: buttons
            .iter()
            .enumerate()
            .map(|(i, b)| QuickReply {
                label: b.label.clone(),
                payload: payload(step, i),
            })
            .collect(),
        image_url: None,
    }
}

/// Runs steps from `id` until one waits for the customer or ends the flow.
fn run_from(
    flow: &FlowDef,
    id: &str,
    vars: &Map<String, Value>,
    said: Said<'_>,
    run: &mut Run,
) -> FlowNext {
    let says = &mut run.says;
    let mut id = id.to_owned();
    // A checked flow cannot loop through message steps; the bound guards an unchecked one.
    for _ in 0..=flow.steps.len() {
        let Some(step) = flow.steps.get(&id) else {
            return FlowNext::End;
        };
        match step {
            Step::Message {
                text,
                image_url,
                next,
            } => {
                says.push(BotSays {
                    text: fill(text, vars),
                    buttons: Vec::new(),
                    image_url: image_url.clone(),
                });
                id = next.clone();
            }
            Step::Buttons { text, buttons, .. } => {
                says.push(buttons_message(&id, &fill(text, vars), buttons));
                return FlowNext::Wait(FlowPosition {
                    step: id,
                    vars: vars.clone(),
                });
            }
            Step::Question { text, .. } => {
                says.push(BotSays::text(fill(text, vars)));
                return FlowNext::Wait(FlowPosition {
                    step: id,
                    vars: vars.clone(),
                });
            }
            Step::Handover { text, skills } => {
                if let Some(t) = text {
                    says.push(BotSays::text(fill(t, vars)));
                }
                let skills = skills.clone().or_else(|| {
                    (!flow.handover_skills.is_empty()).then(|| flow.handover_skills.clone())
                });
                return FlowNext::Handover(skills);
            }
            Step::End { text } => {
                if let Some(t) = text {
                    says.push(BotSays::text(fill(t, vars)));
                }
                return FlowNext::End;
            }
            Step::Condition {
                when,
                set_weight,
                then,
                otherwise,
            } => {
                if when.iter().any(|c| c.matches(said)) {
                    if set_weight.is_some() {
                        run.weight = *set_weight;
                    }
                    id = then.clone();
                } else {
                    id = otherwise.clone().unwrap_or_else(|| then.clone());
                }
            }
        }
    }
    FlowNext::End
}

/// `{{name}}` in `text` replaced by the kept answer `name` (unknown names: left empty).
pub fn fill(text: &str, vars: &Map<String, Value>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        let Some(close) = rest[open + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..open]);
        let name = rest[open + 2..open + 2 + close].trim();
        match vars.get(name) {
            Some(Value::String(s)) => out.push_str(s),
            Some(other) => out.push_str(&other.to_string()),
            None => {}
        }
        rest = &rest[open + 2 + close + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
#[path = "flow_tests.rs"]
mod tests;
