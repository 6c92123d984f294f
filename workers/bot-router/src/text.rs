//! Text normalisation and search tokens for the bot's keyword rules and knowledge-base answers
//! (SPEC S: the `bot` state answers with keyword replies and knowledge-base answers), for
//! Traditional Chinese and English messages.
//!
//! Chinese is not split into words (there are no spaces to split on): runs of ideographs become
//! overlapping character bigrams, the usual dictionary-free way to search Chinese text.

pub use firstline_shared::text::normalize;

/// English words that carry no meaning in a question.
const STOP_WORDS: &[&str] = &[
    "a", "an", "the", "is", "are", "do", "does", "i", "my", "me", "you", "your", "to", "of", "for",
    "in", "on", "and", "or", "how", "what", "can", "please", "it", "this", "that", "with", "be",
    "we", "at", "by", "from", "am", "much", "many", "any", "there", "was", "will", "would",
    "could", "should", "have", "has", "our", "im",
];

/// Chinese words that carry no meaning in a question (question words, pronouns, greetings...).
/// They separate runs like punctuation does, so that 「請問我的訂單」 and 「訂單」 give the same
/// tokens. Matched longest first.
const CJK_STOP_WORDS: &[&str] = &[
    "可不可以",
    "什麼時候",
    "為什麼",
    "能不能",
    "會不會",
    "是不是",
    "有沒有",
    "請問",
    "怎麼",
    "怎樣",
    "什麼",
    "甚麼",
    "如何",
    "為何",
    "可以",
    "是否",
    "一下",
    "我的",
    "你的",
    "您的",
    "我們",
    "你們",
    "您們",
    "他們",
    "現在",
    "目前",
    "已經",
    "哪裡",
    "哪裏",
    "多久",
    "多少",
    "謝謝",
    "你好",
    "您好",
    "想要",
    "需要",
    "還是",
    "還沒",
    "沒有",
];

/// Single characters that never matter in a question here: particles, pronouns, conjunctions.
const CJK_STOP_CHARS: &[char] = &[
    '嗎', '呢', '吧', '啊', '呀', '喔', '哦', '嘛', '啦', '的', '了', '我', '你', '您', '他', '她',
    '與', '及', '或', '和', '很', '也', '都', '想', '要', '是', '在',
];

/// A piece of a tokenised text: a finished Latin word, or a run of CJK characters (stop words
/// already removed) still to be cut into bigrams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    Word(String),
    Cjk(Vec<char>),
}

/// Search tokens of `text` (normalised first, see [`normalize`]):
/// - runs of letters and digits become lowercase words, without English stop words ("the",
///   "how", "my"...) and lightly stemmed ("orders" -> "order", "shipping" -> "ship",
///   "internationally" -> "international");
/// - runs of CJK characters (Han, kana, hangul) become overlapping bigrams (「訂單狀態」 ->
///   訂單, 單狀, 狀態); a run of one character becomes that character. Chinese stop words
///   (請問, 怎麼, 我的, 嗎...) are cut out of the run first;
/// - anything else (spaces, ASCII and CJK punctuation such as ，。？！「」、) separates runs.
///
/// Tokens come in text order and may repeat.
pub fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for piece in pieces(text) {
        match piece {
            Piece::Word(w) => out.push(w),
            Piece::Cjk(run) => out.extend(cjk_grams(&run)),
        }
    }
    out
}

/// Bigrams of a CJK run, or the single character of a one-character run.
pub(crate) fn cjk_grams(run: &[char]) -> Vec<String> {
    if run.len() == 1 {
        return vec![run[0].to_string()];
    }
    run.windows(2).map(|w| w.iter().collect()).collect()
}

/// The words and CJK runs of `text`, in order (see [`tokens`]).
pub(crate) fn pieces(text: &str) -> Vec<Piece> {
    let text = normalize(text);
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if is_cjk(c) {
            let start = i;
            while i < chars.len() && is_cjk(chars[i]) {
                i += 1;
            }
            push_cjk_run(&chars[start..i], &mut out);
        } else if c.is_alphanumeric() {
            let mut word = String::new();
            while i < chars.len() {
                let c = chars[i];
                if c.is_alphanumeric() && !is_cjk(c) {
                    word.push(c);
                } else if is_apostrophe(c)
                    && chars
                        .get(i + 1)
                        .is_some_and(|n| n.is_alphanumeric() && !is_cjk(*n))
                {
                    word.push('\'');
                } else {
                    break;
                }
                i += 1;
            }
            if let Some(word) = finish_word(word) {
                out.push(Piece::Word(word));
            }
        } else {
            i += 1;
        }
    }
    out
}

fn is_apostrophe(c: char) -> bool {
    c == '\'' || c == '\u{2019}'
}

/// Drops a possessive "'s" and other apostrophes ("what's" -> "what", "don't" -> "dont"), stop
/// words, and stems what is left.
fn finish_word(word: String) -> Option<String> {
    let word = word.strip_suffix("'s").unwrap_or(&word).replace('\'', "");
    if STOP_WORDS.contains(&word.as_str()) {
        return None;
    }
    let word = stem(&word);
    (!STOP_WORDS.contains(&word.as_str())).then_some(word)
}

/// A light English stemmer, enough for question words to meet article words: plural "s"
/// (words longer than 3 letters; "-ies" -> "-y", "-sses" -> "-ss", "-ss"/"-us"/"-is" kept),
/// "-ing" (with a doubled consonant undone: "shipping" -> "ship") and "-ally" -> "-al".
fn stem(word: &str) -> String {
    let n = word.chars().count();
    if word.chars().any(|c| c.is_ascii_digit()) || n <= 3 {
        return word.to_string();
    }
    if let Some(s) = word.strip_suffix("sses") {
        return format!("{s}ss");
    }
    if let Some(s) = word.strip_suffix("ies").filter(|_| n > 4) {
        return format!("{s}y");
    }
    if word.ends_with('s') && !["ss", "us", "is"].iter().any(|e| word.ends_with(e)) {
        return word[..word.len() - 1].to_string();
    }
    if let Some(s) = word.strip_suffix("ing") {
        if s.chars().count() >= 3 && s.chars().any(|c| "aeiouy".contains(c)) {
            let b = s.as_bytes();
            let doubled = b.len() >= 2
                && b[b.len() - 1] == b[b.len() - 2]
                && !b"aeiouylsz".contains(&b[b.len() - 1]);
            return if doubled { &s[..s.len() - 1] } else { s }.to_string();
        }
    }
    if let Some(s) = word.strip_suffix("ally").filter(|_| n > 5) {
        return format!("{s}al");
    }
    word.to_string()
}

/// Splits a CJK run at its stop words and pushes the remaining parts.
fn push_cjk_run(run: &[char], out: &mut Vec<Piece>) {
    let mut part = Vec::new();
    let mut i = 0;
    while i < run.len() {
        match stop_len(&run[i..]) {
            Some(len) => {
                if !part.is_empty() {
                    out.push(Piece::Cjk(std::mem::take(&mut part)));
                }
                i += len;
            }
            None => {
                part.push(run[i]);
                i += 1;
            }
        }
    }
    if !part.is_empty() {
        out.push(Piece::Cjk(part));
    }
}

/// The length of the stop word that `rest` (not empty) starts with, if any.
fn stop_len(rest: &[char]) -> Option<usize> {
    // The first characters of the stop words, sorted: most characters start none.
    static FIRSTS: std::sync::OnceLock<Vec<char>> = std::sync::OnceLock::new();
    let firsts = FIRSTS.get_or_init(|| {
        let mut firsts: Vec<char> = CJK_STOP_WORDS
            .iter()
            .filter_map(|w| w.chars().next())
            .collect();
        firsts.extend(CJK_STOP_CHARS);
        firsts.sort_unstable();
        firsts
    });
    let first = rest[0];
    if firsts.binary_search(&first).is_err() {
        return None;
    }
    for word in CJK_STOP_WORDS.iter().filter(|w| w.starts_with(first)) {
        let n = word.chars().count();
        if n <= rest.len() && word.chars().eq(rest[..n].iter().copied()) {
            return Some(n);
        }
    }
    CJK_STOP_CHARS.contains(&first).then_some(1)
}

/// Han ideographs, kana and hangul: scripts written without spaces between words.
pub(crate) fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3005 | 0x3007                 // 々 〇
        | 0x3040..=0x30FF               // hiragana, katakana
        | 0x31F0..=0x31FF               // katakana extensions
        | 0x3400..=0x4DBF               // Han extension A
        | 0x4E00..=0x9FFF               // Han
        | 0xF900..=0xFAFF               // Han compatibility
        | 0x1100..=0x11FF               // hangul jamo
        | 0x3130..=0x318F               // hangul compatibility jamo
        | 0xAC00..=0xD7AF               // hangul syllables
        | 0x20000..=0x3134F // Han extensions B..G
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(text: &str) -> Vec<String> {
        tokens(text)
    }

    #[test]
    fn normalize_folds_width_case_and_spaces() {
        assert_eq!(normalize("ＡＧＥＮＴ"), "agent");
        assert_eq!(normalize("  轉　真人 \t 客服  "), "轉 真人 客服");
        assert_eq!(normalize("訂單１２３？"), "訂單123?");
        assert_eq!(normalize("Ｈｅｌｌｏ，Ｗｏｒｌｄ！"), "hello,world!");
        assert_eq!(normalize(""), "");
        assert_eq!(normalize(" \n "), "");
    }

    #[test]
    fn english_words_drop_stop_words_and_stem() {
        assert_eq!(toks("How do I reset my password?"), ["reset", "password"]);
        assert_eq!(
            toks("Do you ship internationally?"),
            ["ship", "international"]
        );
        assert_eq!(
            toks("Shipping to other countries"),
            ["ship", "other", "country"]
        );
        assert_eq!(toks("What's the status of my ORDERS"), ["status", "order"]);
        assert_eq!(
            toks("don't cancel addresses"),
            ["dont", "cancel", "address"]
        );
        assert_eq!(
            toks("bus gas billing logging"),
            ["bus", "gas", "bill", "log"]
        );
        assert_eq!(toks("refund in 5-7 days"), ["refund", "5", "7", "day"]);
        assert_eq!(
            toks("ＲＥＳＥＴ　ＰＡＳＳＷＯＲＤＳ"),
            ["reset", "password"]
        );
    }

    #[test]
    fn chinese_runs_become_bigrams() {
        assert_eq!(toks("訂單狀態"), ["訂單", "單狀", "狀態"]);
        assert_eq!(toks("退"), ["退"]);
        // Punctuation (full-width and CJK) separates runs.
        assert_eq!(
            toks("訂單，物流。退款？「地址」、電話！"),
            ["訂單", "物流", "退款", "地址", "電話"]
        );
    }

    #[test]
    fn chinese_stop_words_separate_runs() {
        assert_eq!(toks("請問我的訂單現在到哪裡了？"), ["訂單", "到"]);
        assert_eq!(
            toks("如何查詢訂單狀態"),
            ["查詢", "詢訂", "訂單", "單狀", "狀態"]
        );
        assert_eq!(toks("退貨與退款政策"), ["退貨", "退款", "款政", "政策"]);
        assert_eq!(toks("你好"), Vec::<String>::new());
        assert_eq!(toks("可以嗎？"), Vec::<String>::new());
    }

    #[test]
    fn mixed_languages_and_other_scripts() {
        assert_eq!(
            toks("LINE 帳號 login 失敗"),
            ["line", "帳號", "login", "失敗"]
        );
        assert_eq!(toks("iPhone15的保固"), ["iphone15", "保固"]);
        assert_eq!(toks("パスワード"), ["パス", "スワ", "ワー", "ード"]);
        assert_eq!(toks("café crème"), ["café", "crème"]);
        assert!(toks("🙂 ... !!! ———").is_empty());
    }
}
