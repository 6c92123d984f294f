//! What the bot does with one customer message, decided without I/O: hand-over keywords
//! first (SPEC L4, at any point, in a flow too), then keyword rules in priority order, then the
//! knowledge base, then the fallback. Business hours change what a hand-over says and whether
//! it queues, and what the fallback says.

use chrono::{DateTime, Utc};
use firstline_shared::db::BotSays;
use firstline_shared::domain::{ChannelId, SkillSet};
use firstline_shared::hours::{AfterHours, Schedule};

use crate::kb::KnowledgeBase;
use crate::keywords::KeywordMatcher;
use crate::text::normalize;

/// A tenant's compiled bot content (rebuilt when its configuration version moves).
pub struct TenantBot {
    pub version: i64,
    pub keywords: KeywordMatcher,
    pub kb: KnowledgeBase,
}

/// The settings that decide one message.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub channel: &'a ChannelId,
    pub handover_keywords: &'a [String],
    /// What the bot says when nothing matches (the tenant's `bot_reply`).
    pub fallback_reply: &'a str,
    pub handover_reply: &'a str,
    pub kb_min_score: f64,
    /// The channel's business hours (營業時間); `None`: always open.
    pub hours: Option<&'a Schedule>,
    pub after_hours: AfterHours,
    pub now: DateTime<Utc>,
}

/// What the bot does in state `bot`.
#[derive(Clone, Debug, PartialEq)]
pub enum BotAction {
    /// Answer and stay with the bot.
    Reply { says: BotSays, source: Source },
    /// A keyword rule starts a flow (after saying `says`, if any).
    StartFlow {
        says: Option<BotSays>,
        flow: String,
        rule: String,
    },
    /// A hand-over keyword.
    Handover,
}

/// Where a reply came from (logged, counted).
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Keyword(String),
    Article { id: String, score: f64 },
    Fallback,
    Closed,
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Keyword(_) => "keyword",
            Self::Article { .. } => "article",
            Self::Fallback => "fallback",
            Self::Closed => "closed",
        }
    }
}

/// SPEC L4: the whole message (trimmed, any case or width) is a hand-over keyword.
pub fn is_handover(text: &str, keywords: &[String]) -> bool {
    let text = normalize(text);
    !text.is_empty() && keywords.iter().any(|k| normalize(k) == text)
}

/// The message as the bot reads it: a button's payload, else the typed text.
pub fn input<'a>(text: &'a str, postback: Option<&'a str>) -> &'a str {
    postback.unwrap_or(text)
}

/// Decides a message of a conversation in state `bot`.
pub fn decide_bot(
    ctx: &Context<'_>,
    bot: &TenantBot,
    text: &str,
    postback: Option<&str>,
) -> BotAction {
    let input = input(text, postback);
    if is_handover(input, ctx.handover_keywords) {
        return BotAction::Handover;
    }
    if let Some(rule) = bot.keywords.find(ctx.channel, input) {
        return match &rule.reply.flow {
            Some(flow) => BotAction::StartFlow {
                says: rule.reply.says(),
                flow: flow.clone(),
                rule: rule.id.clone(),
            },
            None => BotAction::Reply {
                says: rule.reply.says().unwrap_or_default(),
                source: Source::Keyword(rule.id.clone()),
            },
        };
    }
    if let Some((article, score)) = bot.kb.best(text) {
        if score >= ctx.kb_min_score {
            return BotAction::Reply {
                says: BotSays::text(format!("{}\n\n{}", article.title, article.body)),
                source: Source::Article {
                    id: article.id.clone(),
                    score,
                },
            };
        }
    }
    match closed_message(ctx) {
        Some(closed) => BotAction::Reply {
            says: BotSays::text(closed),
            source: Source::Closed,
        },
        None => BotAction::Reply {
            says: BotSays::text(ctx.fallback_reply),
            source: Source::Fallback,
        },
    }
}

/// The channel's closed message, when it is outside its business hours now.
pub fn closed_message(ctx: &Context<'_>) -> Option<String> {
    ctx.hours
        .filter(|h| !h.is_open(ctx.now))
        .map(|h| h.closed_message(ctx.now))
}

/// A hand-over, decided: what to say and whether the conversation goes to `waiting`.
#[derive(Clone, Debug, PartialEq)]
pub struct Handover {
    pub says: Option<BotSays>,
    /// `false`: outside business hours with `after_hours_handover: stay`, it stays with the bot.
    pub queue: bool,
    pub reason: &'static str,
}

/// SPEC L4 with business hours: inside them, the hand-over reply (unless the flow step
/// already said something, `said`) and `waiting`; outside them, the closed message and
/// `waiting` or not as the channel says.
pub fn handover(ctx: &Context<'_>, said: bool) -> Handover {
    match closed_message(ctx) {
        Some(closed) => Handover {
            says: Some(BotSays::text(closed)),
            queue: ctx.after_hours == AfterHours::Queue,
            reason: "handover_after_hours",
        },
        None => Handover {
            says: (!said).then(|| BotSays::text(ctx.handover_reply)),
            queue: true,
            reason: "handover",
        },
    }
}

/// The skills a hand-over asks for: the flow's (or step's), else `None` (the channel's).
pub fn handover_skills(skills: Option<SkillSet>) -> Option<SkillSet> {
    skills.filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kb::Article;
    use crate::keywords::{KeywordRule, MatchKind, RuleReply};
    use firstline_shared::hours::BusinessHours;

    fn bot() -> TenantBot {
        TenantBot {
            version: 1,
            keywords: KeywordMatcher::new(vec![
                KeywordRule {
                    id: "hours".into(),
                    priority: 0,
                    kind: MatchKind::Contains,
                    pattern: "營業時間".into(),
                    channels: vec![],
                    reply: RuleReply {
                        text: Some("每天 9:00-18:00".into()),
                        ..RuleReply::default()
                    },
                },
                KeywordRule {
                    id: "order".into(),
                    priority: 0,
                    kind: MatchKind::Contains,
                    pattern: "訂單小幫手".into(),
                    channels: vec![],
                    reply: RuleReply {
                        flow: Some("orders".into()),
                        ..RuleReply::default()
                    },
                },
            ])
            .unwrap(),
            kb: KnowledgeBase::new(vec![Article {
                id: "refund".into(),
                title: "退貨與退款政策".into(),
                body: "商品到貨 7 天內可申請退貨，退款於 5-7 個工作天退回原付款方式。".into(),
                tags: vec!["退貨".into(), "退款".into()],
            }]),
        }
    }

    fn ctx<'a>(channel: &'a ChannelId, keywords: &'a [String]) -> Context<'a> {
        Context {
            channel,
            handover_keywords: keywords,
            fallback_reply: "我不太懂",
            handover_reply: "轉接中",
            kb_min_score: crate::kb::DEFAULT_MIN_SCORE,
            hours: None,
            after_hours: AfterHours::Queue,
            now: Utc::now(),
        }
    }

    #[test]
    fn keywords_then_articles_then_the_fallback() {
        let channel = ChannelId::parse("line").unwrap();
        let keywords = vec!["轉真人".to_owned(), "agent".to_owned()];
        let c = ctx(&channel, &keywords);
        let b = bot();
        assert_eq!(decide_bot(&c, &b, "ＡＧＥＮＴ", None), BotAction::Handover);
        assert_eq!(decide_bot(&c, &b, "", Some("轉真人")), BotAction::Handover);
        assert!(matches!(
            decide_bot(&c, &b, "請問營業時間？", None),
            BotAction::Reply { source: Source::Keyword(id), .. } if id == "hours"
        ));
        assert!(matches!(
            decide_bot(&c, &b, "開啟訂單小幫手", None),
            BotAction::StartFlow { flow, .. } if flow == "orders"
        ));
        assert!(matches!(
            decide_bot(&c, &b, "我想退貨，退款要多久？", None),
            BotAction::Reply { source: Source::Article { id, .. }, .. } if id == "refund"
        ));
        assert_eq!(
            decide_bot(&c, &b, "今天天氣如何", None),
            BotAction::Reply {
                says: BotSays::text("我不太懂"),
                source: Source::Fallback
            }
        );
    }

    #[test]
    fn outside_business_hours_the_closed_message_answers_and_handover_follows_the_setting() {
        let channel = ChannelId::parse("line").unwrap();
        let keywords = vec!["轉真人".to_owned()];
        let hours: BusinessHours = serde_json::from_value(serde_json::json!({
            "timezone": "Asia/Taipei",
            "weekly": {"mon": [["09:00", "18:00"]]},
            "closed_message": "目前非營業時間，{{opens_at}} 開始服務。",
            "after_hours_handover": "stay"
        }))
        .unwrap();
        let schedule = hours.compile().unwrap();
        // Monday 2026-11-23 08:59 and 09:00 in Taipei (UTC+8).
        let before = "2026-11-23T00:59:00Z".parse().unwrap();
        let after = "2026-11-23T01:00:00Z".parse().unwrap();
        let mut c = ctx(&channel, &keywords);
        c.hours = Some(&schedule);
        c.after_hours = AfterHours::Stay;
        c.now = before;
        let h = handover(&c, false);
        assert!(!h.queue);
        assert!(h.says.unwrap().text.starts_with("目前非營業時間"));
        assert!(matches!(
            decide_bot(&c, &bot(), "隨便問問", None),
            BotAction::Reply {
                source: Source::Closed,
                ..
            }
        ));
        c.after_hours = AfterHours::Queue;
        assert!(handover(&c, false).queue);
        c.now = after;
        let h = handover(&c, false);
        assert_eq!((h.queue, h.reason), (true, "handover"));
        assert_eq!(h.says.unwrap().text, "轉接中");
        assert_eq!(handover(&c, true).says, None);
    }

    #[test]
    fn handover_keywords_match_whole_trimmed_text_in_any_case_and_width() {
        let keywords = vec!["轉真人".to_owned(), "Agent".to_owned()];
        assert!(is_handover("轉真人", &keywords));
        assert!(is_handover("  轉真人\n", &keywords));
        assert!(is_handover("AGENT", &keywords));
        assert!(is_handover("ａｇｅｎｔ", &keywords));
        assert!(!is_handover("我想轉真人嗎", &keywords));
        assert!(!is_handover("", &keywords));
        assert!(!is_handover("agents", &keywords));
    }
}
