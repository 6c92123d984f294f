//! Keyword replies (關鍵字回應): rules matching a customer's message exactly, by containment or
//! by a regular expression, tried in priority order (higher first, then by id). Matching is
//! on the normalized text ([`crate::text::normalize`]): full-width and half-width forms and
//! letter case do not matter, and Chinese needs no spaces between words.

use firstline_shared::db::BotSays;
use firstline_shared::domain::ChannelId;
use firstline_shared::wire::QuickReply;
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::text::normalize;

/// One rule as configured (file, database).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeywordRule {
    pub id: String,
    /// Higher first; equal priorities by id.
    #[serde(default)]
    pub priority: i32,
    #[serde(rename = "match")]
    pub kind: MatchKind,
    pub pattern: String,
    /// The channels it applies to; empty: all of the tenant's.
    #[serde(default)]
    pub channels: Vec<ChannelId>,
    pub reply: RuleReply,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchKind {
    /// The whole message equals the pattern.
    Exact,
    /// The message contains the pattern.
    Contains,
    /// The regular expression (Rust `regex` syntax, case-insensitive) matches somewhere.
    Regex,
}

impl MatchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Contains => "contains",
            Self::Regex => "regex",
        }
    }
}

/// What a rule answers: a text, with quick-reply buttons and/or an image; or the start of a
/// scripted flow (with an optional text before it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buttons: Vec<Button>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    /// Starts this flow's latest published version (the conversation goes to `script`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
}

/// A quick-reply button; pressing it sends `payload` (by default the label) back as a
/// postback, which is matched like typed text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Button {
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

impl RuleReply {
    /// The message part of the reply, if it has one.
    pub fn says(&self) -> Option<BotSays> {
        if self.text.is_none() && self.image_url.is_none() {
            return None;
        }
        Some(BotSays {
            text: self.text.clone().unwrap_or_default(),
            buttons: self
                .buttons
                .iter()
                .map(|b| QuickReply {
                    label: b.label.clone(),
                    payload: b.payload.clone().unwrap_or_else(|| b.label.clone()),
                })
                .collect(),
            image_url: self.image_url.clone(),
        })
    }
}

/// Checks an image link: an absolute http(s) URL.
pub fn check_url(url: &str) -> Result<(), String> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() > "https://".len()
        && !url.chars().any(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(format!("image_url {url:?} is not an http(s) URL"))
    }
}

impl KeywordRule {
    /// Checks the rule on its own (ids unique across rules are checked by [`KeywordMatcher::new`]).
    pub fn check(&self) -> Result<(), String> {
        let fail = |why: String| Err(format!("keyword rule {:?}: {why}", self.id));
        if self.id.trim().is_empty() || self.id.len() > 64 {
            return Err("a keyword rule has an empty (or over 64 characters) id".into());
        }
        if normalize(&self.pattern).is_empty() {
            return fail("pattern is empty".into());
        }
        if self.kind == MatchKind::Regex {
            if let Err(e) = compile_regex(&self.pattern) {
                return fail(format!("pattern is not a valid regular expression: {e}"));
            }
        }
        let r = &self.reply;
        if r.text.is_none() && r.image_url.is_none() && r.flow.is_none() {
            return fail("reply needs a text, an image_url or a flow".into());
        }
        if r.text.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return fail("reply text is empty".into());
        }
        if !r.buttons.is_empty() && r.text.is_none() {
            return fail("buttons need a reply text to go under".into());
        }
        if r.buttons.len() > 13 {
            return fail("at most 13 buttons".into());
        }
        if let Some(b) = r.buttons.iter().find(|b| b.label.trim().is_empty()) {
            return fail(format!("a button has an empty label ({b:?})"));
        }
        if let Some(url) = &r.image_url {
            check_url(url).or_else(fail)?;
        }
        Ok(())
    }
}

pub(crate) fn compile_regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern)
        .case_insensitive(true)
        .size_limit(1 << 20)
        .build()
}

enum Pattern {
    Exact(String),
    Contains(String),
    Regex(Regex),
}

/// A tenant's rules, compiled and in the order they are tried.
pub struct KeywordMatcher {
    rules: Vec<(KeywordRule, Pattern)>,
}

impl KeywordMatcher {
    /// Checks and compiles `rules`; the error names the first bad rule.
    pub fn new(mut rules: Vec<KeywordRule>) -> Result<Self, String> {
        let mut seen = std::collections::HashSet::new();
        for r in &rules {
            r.check()?;
            if !seen.insert(r.id.as_str()) {
                return Err(format!("keyword rule id {:?} is used twice", r.id));
            }
        }
        rules.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.id.cmp(&b.id)));
        let rules = rules
            .into_iter()
            .map(|r| {
                let p = match r.kind {
                    MatchKind::Exact => Pattern::Exact(normalize(&r.pattern)),
                    MatchKind::Contains => Pattern::Contains(normalize(&r.pattern)),
                    MatchKind::Regex => {
                        Pattern::Regex(compile_regex(&r.pattern).expect("checked above"))
                    }
                };
                (r, p)
            })
            .collect();
        Ok(Self { rules })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule, in priority order, of `channel` that matches `text`.
    pub fn find(&self, channel: &ChannelId, text: &str) -> Option<&KeywordRule> {
        let text = normalize(text);
        if text.is_empty() {
            return None;
        }
        self.rules
            .iter()
            .find(|(rule, pattern)| {
                (rule.channels.is_empty() || rule.channels.contains(channel))
                    && match pattern {
                        Pattern::Exact(p) => text == *p,
                        Pattern::Contains(p) => text.contains(p.as_str()),
                        Pattern::Regex(re) => re.is_match(&text),
                    }
            })
            .map(|(rule, _)| rule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str, priority: i32, kind: MatchKind, pattern: &str) -> KeywordRule {
        KeywordRule {
            id: id.into(),
            priority,
            kind,
            pattern: pattern.into(),
            channels: vec![],
            reply: RuleReply {
                text: Some(format!("reply of {id}")),
                ..RuleReply::default()
            },
        }
    }

    fn line() -> ChannelId {
        ChannelId::parse("line").unwrap()
    }

    #[test]
    fn chinese_text_matches_without_spaces_and_in_priority_order() {
        let m = KeywordMatcher::new(vec![
            rule("hours", 1, MatchKind::Contains, "營業時間"),
            rule("refund", 5, MatchKind::Contains, "退款"),
            rule("hi", 0, MatchKind::Exact, "你好"),
            rule("order", 3, MatchKind::Regex, r"訂單\s*編號\s*[a-z]\d+"),
        ])
        .unwrap();
        let find = |t: &str| m.find(&line(), t).map(|r| r.id.as_str());
        assert_eq!(find("請問你們的營業時間是幾點？"), Some("hours"));
        // Both match: the higher priority wins.
        assert_eq!(find("營業時間內可以退款嗎"), Some("refund"));
        assert_eq!(find(" 你好 "), Some("hi"));
        assert_eq!(find("你好嗎"), None, "exact means the whole message");
        // Full-width letters and digits, any case.
        assert_eq!(find("訂單編號Ａ１２３"), Some("order"));
        assert_eq!(find("訂單 編號 b77"), Some("order"));
        assert_eq!(find("謝謝"), None);
        assert_eq!(find(""), None);
    }

    #[test]
    fn english_is_case_insensitive_and_channels_filter() {
        let mut only_web = rule("price", 0, MatchKind::Contains, "Price");
        only_web.channels = vec![ChannelId::parse("web").unwrap()];
        let m = KeywordMatcher::new(vec![only_web]).unwrap();
        assert!(m
            .find(&ChannelId::parse("web").unwrap(), "what is the PRICE?")
            .is_some());
        assert!(m.find(&line(), "what is the price?").is_none());
    }

    #[test]
    fn bad_rules_are_refused_by_name() {
        let err = |r: KeywordRule| KeywordMatcher::new(vec![r]).err().unwrap();
        assert!(err(rule("x", 0, MatchKind::Regex, "訂單("))
            .contains("keyword rule \"x\": pattern is not a valid regular expression"));
        assert!(err(rule("x", 0, MatchKind::Contains, "  ")).contains("pattern is empty"));
        let mut no_reply = rule("x", 0, MatchKind::Exact, "a");
        no_reply.reply = RuleReply::default();
        assert!(err(no_reply).contains("needs a text, an image_url or a flow"));
        let mut bad_url = rule("x", 0, MatchKind::Exact, "a");
        bad_url.reply.image_url = Some("ftp://x".into());
        assert!(err(bad_url).contains("not an http(s) URL"));
        let twice = KeywordMatcher::new(vec![
            rule("x", 0, MatchKind::Exact, "a"),
            rule("x", 0, MatchKind::Exact, "b"),
        ]);
        assert!(twice.err().unwrap().contains("\"x\" is used twice"));
    }

    #[test]
    fn buttons_default_their_payload_to_the_label() {
        let reply = RuleReply {
            text: Some("選一個".into()),
            buttons: vec![
                Button {
                    label: "轉真人".into(),
                    payload: None,
                },
                Button {
                    label: "看價格".into(),
                    payload: Some("price".into()),
                },
            ],
            image_url: Some("https://example.com/a.png".into()),
            flow: None,
        };
        let says = reply.says().unwrap();
        assert_eq!(says.buttons[0].payload, "轉真人");
        assert_eq!(says.buttons[1].payload, "price");
        assert_eq!(says.image_url.as_deref(), Some("https://example.com/a.png"));
    }
}
