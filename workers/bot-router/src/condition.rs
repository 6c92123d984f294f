//! A flow's `condition` step tests the customer's message (SPEC D10: the product's 緊急信件轉派
//! example sets urgent mail's assignment weight): its text, and an e-mail's subject, sender and
//! recipients from the inbound message's optional `email` headers.

use firstline_shared::wire::EmailHeaders;
use serde::{Deserialize, Serialize};

use crate::keywords::compile_regex;
use crate::text::normalize;

/// A test of the customer's message: `pattern` contained in (`contains`, ignoring case and
/// full/half width) or matched by (`regex`, case-insensitive) a part of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageCondition {
    /// Which part: the text (an e-mail's body), or an e-mail's `subject`, `from` or `to` (any
    /// recipient); `any`: the text or the subject. A chat message has no e-mail parts.
    #[serde(default)]
    pub field: MessageField,
    #[serde(rename = "match")]
    pub kind: ConditionMatch,
    pub pattern: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageField {
    #[default]
    Text,
    Subject,
    From,
    To,
    Any,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditionMatch {
    Contains,
    Regex,
}

/// The customer's message a flow step looks at.
#[derive(Clone, Copy, Debug, Default)]
pub struct Said<'a> {
    pub text: &'a str,
    pub email: Option<&'a EmailHeaders>,
}

impl MessageCondition {
    pub(crate) fn check(&self) -> Result<(), String> {
        match self.kind {
            ConditionMatch::Contains if normalize(&self.pattern).is_empty() => {
                Err("a condition's pattern is empty".into())
            }
            ConditionMatch::Regex => compile_regex(&self.pattern).map(|_| ()).map_err(|e| {
                format!(
                    "pattern {:?} is not a valid regular expression: {e}",
                    self.pattern
                )
            }),
            ConditionMatch::Contains => Ok(()),
        }
    }

    /// Whether the message matches (a regex that does not compile matches nothing: publishing
    /// refuses one).
    pub fn matches(&self, said: Said<'_>) -> bool {
        let email = said.email;
        let parts: Vec<&str> = match self.field {
            MessageField::Text => vec![said.text],
            MessageField::Subject => email.map(|e| e.subject.as_str()).into_iter().collect(),
            MessageField::From => email.map(|e| e.from.as_str()).into_iter().collect(),
            MessageField::To => email
                .map(|e| e.to.iter().map(String::as_str).collect())
                .unwrap_or_default(),
            MessageField::Any => std::iter::once(said.text)
                .chain(email.map(|e| e.subject.as_str()))
                .collect(),
        };
        match self.kind {
            ConditionMatch::Contains => {
                let pattern = normalize(&self.pattern);
                parts
                    .iter()
                    .any(|p| normalize(p).contains(pattern.as_str()))
            }
            ConditionMatch::Regex => match compile_regex(&self.pattern) {
                Ok(re) => parts.iter().any(|p| re.is_match(p)),
                Err(_) => false,
            },
        }
    }
}
