//! Knowledge-base answers (知識庫, SPEC S: in the `bot` state the bot answers with keyword
//! replies and knowledge-base answers): finds the article that best answers a customer's
//! question, with a score in 0..=1 that the bot compares with the tenant's threshold; below it
//! the bot says it does not know (and the customer may ask for a human, SPEC L4).
//!
//! The score is the idf-weighted share of the question's tokens (see [`crate::text::tokens`])
//! that the article contains:
//! - a token in the article's title or tags counts fully, one only in its body counts
//!   [`BODY_WEIGHT`]; an article that matches only in its body is further scaled by
//!   [`BODY_ONLY_FACTOR`], so that it stays below [`DEFAULT_MIN_SCORE`];
//! - a token no article contains still counts in the denominator, with the largest idf, so an
//!   off-topic question that shares one common word with the knowledge base scores low;
//! - Chinese has no word boundaries, so a run 「訂單運費」 gives the bigram 單運 that straddles
//!   two words. An unknown bigram whose two characters are both covered by known bigrams of the
//!   question is such a seam and is left out. Other unknown bigrams count
//!   [`UNKNOWN_CJK_WEIGHT`]: about every other bigram of a run is a seam, so a run of n
//!   unknown characters counts like n/2 words. A lone character (a one-character run) counts
//!   [`UNIGRAM_WEIGHT`], as it says less than a word.
//!
//! The index is built once per configuration change and only read afterwards; a question
//! touches only the postings of its own tokens.

use crate::text::{self, Piece};
use std::collections::HashMap;

/// The score from which the bot answers with the article; a per-tenant setting may override it.
/// It is also the database's default for `tenants.kb_min_score` (migration V7; the test
/// `docs::kb_min_score_has_one_default` keeps them equal).
/// With the scoring above, questions worded differently from a relevant article typically
/// score 0.5..1 and off-topic questions 0..0.3 (see the tests).
pub const DEFAULT_MIN_SCORE: f64 = 0.45;

/// What a token found only in an article's body is worth, against 1 in its title or tags.
pub const BODY_WEIGHT: f64 = 0.5;

/// Applied to an article that matches only in its body, so that it scores at most
/// `BODY_WEIGHT * BODY_ONLY_FACTOR` = 0.4, below [`DEFAULT_MIN_SCORE`]: the bot does not answer
/// from a passing mention alone.
pub const BODY_ONLY_FACTOR: f64 = 0.8;

/// What a lone CJK character of the question is worth, against 1 for a word or a bigram.
pub const UNIGRAM_WEIGHT: f64 = 0.5;

/// One knowledge-base article.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Article {
    pub id: String,
    pub title: String,
    pub body: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// One article that contains a token, and how (1 title/tags, [`BODY_WEIGHT`] body only).
#[derive(Clone, Copy)]
struct Posting {
    article: u32,
    weight: f32,
}

struct Term {
    idf: f64,
    postings: Vec<Posting>,
}

/// What an unknown CJK bigram of the question is worth, against 1 for a word or known bigram.
pub const UNKNOWN_CJK_WEIGHT: f64 = 0.5;

/// An immutable in-memory index of the articles, built once per configuration change.
pub struct KnowledgeBase {
    /// Sorted by id, so that the lower index wins a tie.
    articles: Vec<Article>,
    terms: HashMap<String, Term>,
    /// The idf an unknown token counts with: that of a token in one article.
    max_idf: f64,
}

impl std::fmt::Debug for KnowledgeBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnowledgeBase")
            .field("articles", &self.articles.len())
            .field("terms", &self.terms.len())
            .finish()
    }
}

impl KnowledgeBase {
    /// Indexes `articles`: token -> the articles that contain it, in their title/tags or body.
    pub fn new(mut articles: Vec<Article>) -> Self {
        articles.sort_by(|a, b| a.id.cmp(&b.id));
        let mut postings: HashMap<String, Vec<Posting>> = HashMap::new();
        // Per article: its tokens, heading ones (weight 1) sorted before body ones, deduplicated.
        let mut tokens: Vec<(String, f32)> = Vec::new();
        for (i, article) in articles.iter().enumerate() {
            let heading = std::iter::once(&article.title).chain(&article.tags);
            tokens.extend(heading.flat_map(|t| text::tokens(t)).map(|t| (t, 1.0)));
            let body = text::tokens(&article.body);
            tokens.extend(body.into_iter().map(|t| (t, BODY_WEIGHT as f32)));
            tokens.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
            tokens.dedup_by(|a, b| a.0 == b.0);
            for (token, weight) in tokens.drain(..) {
                let article = i as u32;
                postings
                    .entry(token)
                    .or_default()
                    .push(Posting { article, weight });
            }
        }
        let n = articles.len() as f64;
        let idf = |df: usize| ((n + 1.0) / df as f64).ln() + 1.0;
        let terms = postings
            .into_iter()
            .map(|(token, postings)| {
                let idf = idf(postings.len());
                (token, Term { idf, postings })
            })
            .collect();
        KnowledgeBase {
            articles,
            terms,
            max_idf: idf(1),
        }
    }

    pub fn len(&self) -> usize {
        self.articles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.articles.is_empty()
    }

    /// The best-matching article and its score in 0..=1, if any article shares a token with
    /// the question. Ties go to the higher score, then to the earlier article id.
    pub fn best(&self, question: &str) -> Option<(&Article, f64)> {
        let query = self.query_tokens(question);
        let mut total = 0.0;
        // Per touched article: the weighted sum of its hits, and whether one is in its heading.
        // Dense, so that adding a posting is an index; `touched` lists the articles to rank.
        let mut hits: Vec<(f64, bool)> = Vec::new();
        let mut touched: Vec<u32> = Vec::new();
        for (token, factor) in &query {
            match self.terms.get(token) {
                Some(term) => {
                    let w = term.idf * factor;
                    total += w;
                    if hits.is_empty() {
                        hits = vec![(0.0, false); self.articles.len()];
                    }
                    for p in &term.postings {
                        let hit = &mut hits[p.article as usize];
                        if hit.0 == 0.0 {
                            touched.push(p.article);
                        }
                        hit.0 += w * f64::from(p.weight);
                        hit.1 |= p.weight == 1.0;
                    }
                }
                None => total += self.max_idf * factor,
            }
        }
        let score = |(sum, heading): (f64, bool)| {
            let share = (sum / total).clamp(0.0, 1.0);
            if heading {
                share
            } else {
                share * BODY_ONLY_FACTOR
            }
        };
        let (article, score) = touched
            .into_iter()
            .map(|article| (article, score(hits[article as usize])))
            .max_by(|(a, x), (b, y)| x.total_cmp(y).then(b.cmp(a)))?;
        Some((&self.articles[article as usize], score))
    }

    /// The question's distinct tokens with what each is worth (1, or [`UNIGRAM_WEIGHT`] for a
    /// lone CJK character), without the seams between Chinese words (see the module docs).
    fn query_tokens(&self, question: &str) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = Vec::new();
        let mut add = |token: String, factor: f64| {
            if !out.iter().any(|(t, _)| *t == token) {
                out.push((token, factor));
            }
        };
        for piece in text::pieces(question) {
            match piece {
                Piece::Word(word) => add(word, 1.0),
                Piece::Cjk(run) if run.len() == 1 => {
                    let gram = run[0].to_string();
                    let unknown = if self.terms.contains_key(&gram) {
                        1.0
                    } else {
                        UNKNOWN_CJK_WEIGHT
                    };
                    add(gram, UNIGRAM_WEIGHT * unknown)
                }
                Piece::Cjk(run) => {
                    let grams = text::cjk_grams(&run);
                    let known: Vec<bool> =
                        grams.iter().map(|g| self.terms.contains_key(g)).collect();
                    for (i, gram) in grams.into_iter().enumerate() {
                        let seam = !known[i]
                            && i > 0
                            && known[i - 1]
                            && known.get(i + 1).copied().unwrap_or(false);
                        if !seam {
                            add(gram, if known[i] { 1.0 } else { UNKNOWN_CJK_WEIGHT });
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn article(id: &str, title: &str, body: &str, tags: &[&str]) -> Article {
        Article {
            id: id.into(),
            title: title.into(),
            body: body.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn help_center() -> KnowledgeBase {
        KnowledgeBase::new(vec![
            article(
                "zh-order-status",
                "如何查詢訂單狀態",
                "登入會員中心，點選「我的訂單」即可查看每筆訂單的處理狀態與物流進度。\
                 商品出貨後，系統會以簡訊通知物流單號，您可以到物流公司網站追蹤包裹。",
                &["訂單", "物流", "出貨"],
            ),
            article(
                "zh-returns",
                "退貨與退款政策",
                "商品到貨後享有 7 天鑑賞期，期間內可在會員中心申請退貨，商品須保持完整包裝。\
                 我們收到退回的商品並確認無誤後，退款會在 5-7 個工作天內退回原付款方式。",
                &["退貨", "退款", "鑑賞期"],
            ),
            article(
                "zh-address",
                "修改收件地址",
                "訂單成立後尚未出貨前，可以在會員中心的訂單明細修改收件人與收件地址。\
                 已出貨的訂單無法更改地址，請聯絡客服協助。",
                &["地址", "收件人"],
            ),
            article(
                "zh-hours",
                "營業時間與客服電話",
                "客服營業時間為週一至週五 09:00-18:00，國定假日休息。客服電話 02-2345-6789，\
                 非營業時間可以留言，我們會在下一個工作天回覆。",
                &["客服", "電話", "營業時間"],
            ),
            article(
                "en-password",
                "How do I reset my password",
                "On the login page, click \"Forgot password\" and enter the e-mail address of \
                 your account. We send you an e-mail with a link to choose a new password; the \
                 link expires after 24 hours.",
                &["password", "login", "account"],
            ),
            article(
                "en-shipping",
                "Shipping to other countries",
                "We ship internationally to more than 40 countries. International shipping fees \
                 depend on the weight and the destination and are shown at checkout. Customs \
                 duties and import taxes are paid by the recipient.",
                &["shipping", "international", "customs"],
            ),
            article(
                "en-subscription",
                "Cancel a subscription",
                "Open Account settings, then Subscriptions, and choose Cancel subscription. \
                 You keep access until the end of the current billing period; no further \
                 payments are taken.",
                &["subscription", "billing", "cancel"],
            ),
            article(
                "en-payment",
                "Payment methods",
                "We accept credit cards, Apple Pay, LINE Pay and bank transfer. Orders are \
                 shipped once the payment is confirmed.",
                &["payment", "credit card", "LINE Pay", "Apple Pay"],
            ),
        ])
    }

    const RELEVANT: &[(&str, &str)] = &[
        ("請問我的訂單現在到哪裡了？", "zh-order-status"),
        ("我想退貨，錢多久會退回來", "zh-returns"),
        ("訂單出貨了嗎", "zh-order-status"),
        ("退款要幾天", "zh-returns"),
        ("鑑賞期是幾天？", "zh-returns"),
        ("我要改收件地址", "zh-address"),
        ("你們客服電話幾號", "zh-hours"),
        ("營業時間是什麼時候", "zh-hours"),
        ("I forgot my password", "en-password"),
        ("do you ship internationally?", "en-shipping"),
        (
            "How much are customs fees for international orders",
            "en-shipping",
        ),
        ("how can I cancel my subscription", "en-subscription"),
        ("Can I pay with LINE Pay?", "en-payment"),
        ("ＰＡＳＳＷＯＲＤ ＲＥＳＥＴ", "en-password"),
        ("the password link in the e-mail expired", "en-password"),
        ("stop my subscription billing", "en-subscription"),
        ("出貨後物流單號在哪裡看", "zh-order-status"),
        ("已經出貨了還能改地址嗎", "zh-address"),
    ];

    const OFF_TOPIC: &[&str] = &[
        "今天天氣如何",
        "what's the best pizza recipe",
        "你好",
        "你們老闆是誰",
        "推薦一部好看的電影",
        "what is the meaning of life",
        "tell me a joke about my account manager",
        "can you recommend a good phone",
        "I want to talk to a human",
        "我要找真人",
        "推薦好吃的餐廳地址",
        "我想訂一張去日本的機票",
        "order a pizza to my address",
        "what time is it in tokyo",
        "can you write my homework essay",
        "密碼學是什麼",
        "你們公司在哪裡",
        "電話費怎麼這麼貴",
        "?",
        "",
    ];

    #[test]
    fn relevant_questions_find_their_article_above_the_threshold() {
        let kb = help_center();
        let mut wrong = Vec::new();
        for (question, id) in RELEVANT {
            let (article, score) = kb.best(question).expect(question);
            println!("{score:.3} {question} -> {}", article.id);
            if article.id != *id || score < DEFAULT_MIN_SCORE {
                wrong.push((question, &article.id, score));
            }
        }
        assert!(wrong.is_empty(), "{wrong:?}");
    }

    #[test]
    fn off_topic_questions_stay_below_the_threshold() {
        let kb = help_center();
        for question in OFF_TOPIC {
            let best = kb.best(question);
            println!("{question:?} -> {:?}", best.map(|(a, s)| (&a.id, s)));
            if let Some((_, score)) = best {
                assert!(score < DEFAULT_MIN_SCORE, "{question}: {score}");
            }
        }
        assert!(kb.best("今天天氣如何").is_none());
        assert!(kb.best("你好").is_none());
        assert!(kb.best("what's the best pizza recipe").is_none());
    }

    #[test]
    fn a_question_with_every_token_in_the_title_scores_one() {
        let kb = help_center();
        let (article, score) = kb.best("reset password").unwrap();
        assert_eq!((article.id.as_str(), score), ("en-password", 1.0));
    }

    #[test]
    fn ties_go_to_the_earlier_id_and_an_empty_base_knows_nothing() {
        let kb = KnowledgeBase::new(vec![
            article("b", "Refund", "", &[]),
            article("a", "Refund", "", &[]),
        ]);
        assert_eq!(kb.len(), 2);
        assert_eq!(kb.best("refund").unwrap().0.id, "a");
        let empty = KnowledgeBase::new(vec![]);
        assert!(empty.is_empty());
        assert!(empty.best("refund").is_none());
    }

    #[test]
    fn articles_deserialize_with_default_tags() {
        let a: Article =
            serde_json::from_str(r#"{"id":"x","title":"退款","body":"5-7 個工作天"}"#).unwrap();
        assert!(a.tags.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn best_never_panics_and_scores_stay_in_range(question in "\\PC{0,40}", raw in ".{0,40}") {
            let kb = help_center();
            for q in [&question, &raw] {
                if let Some((_, score)) = kb.best(q) {
                    proptest::prop_assert!((0.0..=1.0).contains(&score), "{q:?}: {score}");
                }
            }
        }
    }

    /// Generated articles of about 300 characters, Chinese and English mixed: help-centre
    /// words, plus (with `variety`) random ideographs and words as in real articles. Without
    /// it every article uses the same ~100 tokens: a worst case where each posting list holds
    /// nearly every article.
    fn generated(n: usize, variety: bool) -> Vec<Article> {
        const ZH: &str = "訂單物流退貨退款地址電話會員中心出貨包裹付款發票優惠折扣商品保固維修帳號密碼\
                          登入註冊門市營業時間客服信用卡分期運費海外配送鑑賞期贈品點數兌換預購缺貨補貨";
        const EN: &[&str] = &[
            "order",
            "refund",
            "shipping",
            "password",
            "account",
            "invoice",
            "discount",
            "warranty",
            "repair",
            "store",
            "payment",
            "delivery",
            "customs",
            "coupon",
            "points",
            "subscription",
            "billing",
            "address",
            "phone",
            "login",
        ];
        let zh: Vec<char> = ZH.chars().collect();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as usize
        };
        let han = |next: &mut dyn FnMut() -> usize| {
            char::from_u32(0x4E00 + (next() % 3000) as u32).unwrap_or('中')
        };
        (0..n)
            .map(|i| {
                let mut body = String::new();
                while body.chars().count() < 300 {
                    let pick = next() % 6;
                    if pick == 0 {
                        body.push_str(EN[next() % EN.len()]);
                    } else if pick == 1 && variety {
                        body.push_str(&format!("term{}", next() % 20_000));
                    } else if pick < 4 || !variety {
                        let start = next() % (zh.len() - 6);
                        body.extend(&zh[start..start + 2 + next() % 4]);
                    } else {
                        for _ in 0..2 + next() % 6 {
                            body.push(han(&mut next));
                        }
                    }
                    body.push(if pick < 2 { ' ' } else { '，' });
                }
                let mut title: String = zh[i % 40..i % 40 + 4].iter().collect();
                if variety {
                    title.extend((0..4).map(|_| han(&mut next)));
                }
                article(&format!("gen-{i:05}"), &title, &body, &[EN[i % EN.len()]])
            })
            .collect()
    }

    /// Speed check: prints the index build time and the average `best` time over 10,000
    /// generated articles. Prints only; run with
    /// `cargo test --release -- --ignored --nocapture speed`.
    #[test]
    #[ignore]
    fn speed() {
        let questions = [
            "請問我的訂單現在到哪裡了？",
            "我想退貨，錢多久會退回來",
            "I forgot my password",
            "do you ship internationally?",
            "今天天氣如何",
            "how do I get a refund for my order and the shipping fee",
            "信用卡分期付款可以用優惠折扣嗎",
            "what's the best pizza recipe",
        ];
        for variety in [true, false] {
            let articles = generated(10_000, variety);
            let chars: usize = articles.iter().map(|a| a.body.chars().count()).sum();
            let started = std::time::Instant::now();
            let kb = KnowledgeBase::new(articles);
            let built = started.elapsed();
            let postings: usize = kb.terms.values().map(|t| t.postings.len()).sum();
            let rounds = 200;
            let started = std::time::Instant::now();
            let mut answers = 0;
            for _ in 0..rounds {
                for q in questions {
                    answers += usize::from(kb.best(q).is_some());
                }
            }
            let per_question = started.elapsed() / (rounds * questions.len()) as u32;
            println!(
                "kb speed ({}): {} articles, {} body chars on average, {} terms, {postings} \
                 postings; built in {built:?}; best() {per_question:?} per question on average \
                 ({answers} answers)",
                if variety {
                    "varied vocabulary"
                } else {
                    "worst case, ~100 terms"
                },
                kb.len(),
                chars / kb.len(),
                kb.terms.len(),
            );
        }
    }
}
