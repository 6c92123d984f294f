//! 滿意度調查: after an agent closes a conversation, its channel may ask the customer for a
//! rating (buttons 1..scale). The answer is stored on that conversation; it does not open a
//! new one (the one exception to SPEC L9, README). Any other message does (L9).

use deadpool_postgres::Transaction;
use serde::{Deserialize, Serialize};

use crate::db::{self, BotSays, Conversation};
use crate::outbox::Outbox;
use crate::wire::QuickReply;

/// A channel's survey settings (`channels.survey`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Survey {
    /// The rating question, e.g. 「請為本次服務評分（1 最差，5 最好）」.
    pub question: String,
    /// Ratings are 1 to this (2 to 10).
    #[serde(default = "default_scale")]
    pub scale: u8,
    /// Said after an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thanks: Option<String>,
    /// An answer later than this after the question is an ordinary message (a new conversation).
    #[serde(default = "default_window")]
    pub window_minutes: u32,
}

fn default_scale() -> u8 {
    5
}
fn default_window() -> u32 {
    24 * 60
}

/// The postback payload of rating `n`.
fn payload(n: u8) -> String {
    format!("rating:{n}")
}

impl Survey {
    pub fn check(&self) -> Result<(), String> {
        if self.question.trim().is_empty() {
            return Err("survey: question is empty".into());
        }
        if !(2..=10).contains(&self.scale) {
            return Err(format!("survey: scale must be 2 to 10, not {}", self.scale));
        }
        if self.window_minutes == 0 {
            return Err("survey: window_minutes must be at least 1".into());
        }
        Ok(())
    }

    pub fn question_message(&self) -> BotSays {
        BotSays {
            text: self.question.clone(),
            buttons: (1..=self.scale)
                .map(|n| QuickReply {
                    label: n.to_string(),
                    payload: payload(n),
                })
                .collect(),
            image_url: None,
        }
    }

    /// The rating in a customer's message: a press of a rating button, or the number typed
    /// (full-width digits too).
    pub fn rating(&self, text: &str, postback: Option<&str>) -> Option<i16> {
        let n: u8 = match postback {
            Some(p) => p.strip_prefix("rating:")?.parse().ok()?,
            None => crate::text::normalize(text).parse().ok()?,
        };
        (1..=self.scale).contains(&n).then_some(i16::from(n))
    }
}

/// After an agent closed `conversation`: sends its channel's rating question, if it has one.
pub async fn ask(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    conversation: &Conversation,
) -> anyhow::Result<()> {
    let stmt = tx
        .prepare_cached("SELECT survey FROM channels WHERE tenant_id = $1 AND id = $2")
        .await?;
    let row = tx
        .query_opt(
            &stmt,
            &[
                &conversation.tenant.as_str(),
                &conversation.channel.as_str(),
            ],
        )
        .await?;
    let Some(survey) = row
        .and_then(|r| r.get::<_, Option<serde_json::Value>>(0))
        .and_then(|v| serde_json::from_value::<Survey>(v).ok())
    else {
        return Ok(());
    };
    let external_id = format!("survey:{}", conversation.id);
    if db::send_bot_message(
        tx,
        outbox,
        conversation,
        &external_id,
        &survey.question_message(),
    )
    .await?
    {
        tx.execute(
            "UPDATE conversations SET survey_sent_at = statement_timestamp() WHERE id = $1",
            &[&conversation.id],
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratings_come_from_buttons_or_typed_digits_within_the_scale() {
        let s = Survey {
            question: "請評分".into(),
            scale: 5,
            thanks: None,
            window_minutes: 60,
        };
        assert_eq!(s.question_message().buttons[4].payload, "rating:5");
        assert_eq!(s.rating("5", Some("rating:5")), Some(5));
        assert_eq!(s.rating(" 4 ", None), Some(4));
        assert_eq!(s.rating("３", None), Some(3));
        assert_eq!(s.rating("6", None), None);
        assert_eq!(s.rating("0", None), None);
        assert_eq!(s.rating("我還有問題", None), None);
        assert_eq!(s.rating("x", Some("flow:menu:1")), None);
        assert!(Survey {
            scale: 1,
            ..s.clone()
        }
        .check()
        .unwrap_err()
        .contains("scale"));
    }
}
