//! How customer text is compared: the bot's keywords, flow buttons, hand-over keywords and
//! survey answers all match on [`normalize`]d text.

use unicode_normalization::UnicodeNormalization;

/// The text in the form keyword rules match on: Unicode NFKC (full-width `ＡＧＥＮＴ` becomes
/// `AGENT`, full-width digits and punctuation become ASCII), lowercase, every run of whitespace
/// one space, trimmed.
pub fn normalize(text: &str) -> String {
    let lower = text.nfkc().collect::<String>().to_lowercase();
    lower.split_whitespace().collect::<Vec<_>>().join(" ")
}
