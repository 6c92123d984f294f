//! The customer's place in line (README decision where the seeds are silent: "how a customer
//! is told their place in the queue"). When a conversation is queued (from a channel without
//! a bot, or by the bot's hand-over), and whenever the customer asks while it waits (a
//! message containing one of the tenant's `queue_position_keywords`, e.g. 排第幾, 還要等多久),
//! the customer gets a bot message with their place and an estimated wait.
//!
//! - **Place**: 1 + the conversations of the tenant with the same required skills that are
//!   ahead: those being offered (`assigning`) and those waiting before it in dispatch order
//!   (SPEC D10: score, weight x seconds waited, now; then time queued). A conversation being
//!   offered is at place 1. A heavier conversation queued later can pass it: the place told
//!   is the place at the time of asking.
//! - **Estimated wait**: place / the recent service rate of those skills, the rate being the
//!   accepts of conversations with the same required skills in the last
//!   [`RATE_WINDOW_SECONDS`] (k accepts in 15 minutes: k/15 per minute), rounded up to whole
//!   minutes. No accept in the window: no estimate (the other text is sent).
//!
//! How good it is (the test `estimates_against_a_known_service_rate`): with a steady service
//! rate the estimate is exact; with accepts as a Poisson process the estimate's error is
//! mostly the wait's own randomness (docs/api.md#the-customers-place-in-line has the figures).

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::Transaction;
use uuid::Uuid;

use crate::db::{self, BotSays, Conversation};
use crate::outbox::Outbox;

/// The window over which the service rate of a set of skills is measured: 15 minutes.
pub const RATE_WINDOW_SECONDS: i64 = 900;

/// Whether `text` asks for the place in line: its normalized form contains a keyword's.
pub fn asks(keywords: &[String], text: &str) -> bool {
    let text = crate::text::normalize(text);
    keywords.iter().any(|k| {
        let k = crate::text::normalize(k);
        !k.is_empty() && text.contains(&k)
    })
}

/// The estimated wait of the conversation at `place` when `accepts` conversations of its
/// skills were accepted in the last `window`: place x window / accepts. `None` without accepts.
pub fn estimate(place: u64, accepts: u64, window: Duration) -> Option<Duration> {
    (accepts > 0).then(|| {
        Duration::milliseconds(
            (window.num_milliseconds() as f64 * place as f64 / accepts as f64).round() as i64,
        )
    })
}

/// Minutes to tell the customer: the wait rounded up, at least 1.
pub fn minutes(wait: Duration) -> i64 {
    ((wait.num_seconds() + 59) / 60).max(1)
}

/// The text told: `with_estimate` with `{position}` and `{minutes}`, or `without` (with
/// `{position}`) when there is no estimate.
pub fn render(with_estimate: &str, without: &str, place: u64, wait: Option<Duration>) -> String {
    match wait {
        Some(w) => with_estimate
            .replace("{position}", &place.to_string())
            .replace("{minutes}", &minutes(w).to_string()),
        None => without.replace("{position}", &place.to_string()),
    }
}

/// The tenant's texts, the conversation's place and its skills' recent accepts:
/// one round trip (the waiting and assigning counts each with its state spelled out, so that
/// they read the queue's partial indexes, not every conversation of the tenant as one count
/// over both states did; the accepts `conversations_recent_accepts` of V14). The accepts are counted up to (window / 1 minute) x
/// place only: from there on the estimate is at most a minute, told as 1 whatever the count
/// ([`minutes`]), and a busy desk's 15 minutes hold tens of thousands of accepts (issue 22:
/// counting them all was a fifth of Postgres's work per inbound message).
const PLACE_SQL: &str = "
    WITH me AS (SELECT id, tenant_id, required_skills, queued_at, state,
                       weight * extract(epoch FROM statement_timestamp() - queued_at) AS score
                FROM conversations WHERE id = $1),
    ahead AS MATERIALIZED (SELECT CASE WHEN me.state = 'waiting' THEN
                  (SELECT count(*) FROM conversations c
                    WHERE c.tenant_id = me.tenant_id AND c.state = 'assigning'
                      AND c.required_skills = me.required_skills)
                  + (SELECT count(*) FROM conversations c
                    WHERE c.tenant_id = me.tenant_id AND c.state = 'waiting'
                      AND c.required_skills = me.required_skills AND c.id <> me.id
                      AND (c.weight * extract(epoch FROM statement_timestamp() - c.queued_at) > me.score
                           OR (c.weight * extract(epoch FROM statement_timestamp() - c.queued_at) = me.score
                               AND (c.queued_at, c.id) < (me.queued_at, me.id))))
                  ELSE 0 END AS n
              FROM me)
    SELECT t.queue_position_reply, t.queue_position_reply_no_estimate,
           me.state,
           ahead.n,
           (SELECT count(*) FROM (SELECT 1 FROM conversations c
             WHERE c.tenant_id = me.tenant_id AND c.required_skills = me.required_skills
               AND c.accepted_at > statement_timestamp() - make_interval(secs => $2)
             LIMIT ceil($2 / 60.0)::bigint * (ahead.n + 1)) recent)
    FROM me JOIN tenants t ON t.id = me.tenant_id CROSS JOIN ahead";

/// What a conversation's place in line is, read from Postgres.
struct Place {
    reply: String,
    no_estimate: String,
    queued: bool,
    place: u64,
    accepts: u64,
}

async fn read(tx: &Transaction<'_>, conversation: Uuid) -> anyhow::Result<Option<Place>> {
    let stmt = tx.prepare_cached(PLACE_SQL).await?;
    let window = RATE_WINDOW_SECONDS as f64;
    Ok(tx
        .query_opt(&stmt, &[&conversation, &window])
        .await?
        .map(|r| {
            let state: String = r.get(2);
            Place {
                reply: r.get(0),
                no_estimate: r.get(1),
                queued: state == "waiting" || state == "assigning",
                place: 1 + r.get::<_, i64>(3).max(0) as u64,
                accepts: r.get::<_, i64>(4).max(0) as u64,
            }
        }))
}

/// Tells the customer of `conversation` their place and estimated wait, when it is queued;
/// when `asked` is a customer's text, only if it asks (a keyword). `external_id` makes the
/// message once-only. Returns whether a message was sent.
pub async fn tell(
    tx: &Transaction<'_>,
    outbox: &mut Outbox,
    conversation: &Conversation,
    asked: Option<&str>,
    external_id: &str,
) -> anyhow::Result<bool> {
    if let Some(text) = asked {
        // Most messages of a waiting customer do not ask: one key lookup decides.
        let stmt = tx
            .prepare_cached("SELECT queue_position_keywords FROM tenants WHERE id = $1")
            .await?;
        let row = tx
            .query_opt(&stmt, &[&conversation.tenant.as_str()])
            .await?;
        if !row.is_some_and(|r| asks(&r.get::<_, Vec<String>>(0), text)) {
            return Ok(false);
        }
    }
    let Some(p) = read(tx, conversation.id).await? else {
        return Ok(false);
    };
    if !p.queued {
        return Ok(false);
    }
    let wait = estimate(p.place, p.accepts, Duration::seconds(RATE_WINDOW_SECONDS));
    let text = render(&p.reply, &p.no_estimate, p.place, wait);
    tracing::debug!(conversation = %conversation.id, place = p.place, ?wait, "place in line told");
    db::send_bot_message(tx, outbox, conversation, external_id, &BotSays::text(text)).await
}

/// When the customer would be served if accepts kept coming at the times in `accepts`
/// (sorted), for a conversation at `place` asking at `now`: the `place`-th accept after now.
pub fn actual_wait(accepts: &[DateTime<Utc>], place: u64, now: DateTime<Utc>) -> Option<Duration> {
    let first = accepts.partition_point(|a| *a <= now);
    accepts
        .get(first + place as usize - 1)
        .map(|served| *served - now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn keywords_match_anywhere_in_any_width_and_case() {
        let k = vec!["排第幾".to_string(), "還要等多久".into(), "How long".into()];
        assert!(asks(&k, "請問我排第幾？"));
        assert!(asks(&k, "還要等多久"));
        assert!(asks(&k, "ＨＯＷ  LONG is the wait?"));
        assert!(!asks(&k, "我的訂單"));
        assert!(
            !asks(&[String::new()], "anything"),
            "an empty keyword matches nothing"
        );
    }

    #[test]
    fn the_text_has_the_place_and_the_minutes_rounded_up() {
        let with = "第 {position} 位，約 {minutes} 分鐘 / #{position}, about {minutes} min";
        let without = "第 {position} 位 / #{position}";
        let wait = estimate(5, 30, Duration::minutes(15)); // 2 a minute: 2.5 min
        assert_eq!(wait, Some(Duration::seconds(150)));
        assert_eq!(
            render(with, without, 5, wait),
            "第 5 位，約 3 分鐘 / #5, about 3 min"
        );
        assert_eq!(render(with, without, 2, None), "第 2 位 / #2");
        assert_eq!(minutes(Duration::seconds(1)), 1);
        assert_eq!(minutes(Duration::seconds(60)), 1);
        assert_eq!(minutes(Duration::seconds(61)), 2);
        assert_eq!(estimate(1, 0, Duration::minutes(15)), None);
    }

    /// The statement counts accepts up to 15 x place (PLACE_SQL): from there the text is the same.
    #[test]
    fn accepts_beyond_fifteen_per_place_tell_one_minute() {
        let window = Duration::seconds(RATE_WINDOW_SECONDS);
        for place in [1u64, 2, 7, 40] {
            let cap = (RATE_WINDOW_SECONDS as u64 / 60) * place;
            for k in [cap, cap + 1, cap * 3, 50_000] {
                assert_eq!(
                    minutes(estimate(place, k, window).unwrap()),
                    1,
                    "{place} {k}"
                );
            }
        }
    }

    /// A small deterministic random source (xorshift64*), for the simulation below.
    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// How good the estimate is, against a known service rate μ = 2 accepts a minute: a
    /// steady rate gives the exact wait; accepts as a Poisson process (exponential gaps) give
    /// a median relative error of the estimate against the real wait printed here and stated
    /// in docs/api.md (place 1: 67 %, 5: 33 %, 20: 20 %, against 66, 31 and 15 % for an
    /// estimate that knew the true rate: most of the error is the wait's own spread).
    #[test]
    fn estimates_against_a_known_service_rate() {
        let window = Duration::seconds(RATE_WINDOW_SECONDS);
        let t0 = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        // Steady: an accept every 30 s.
        let steady: Vec<_> = (0..200).map(|i| t0 + Duration::seconds(30 * i)).collect();
        let now = t0 + Duration::seconds(3000 + 1);
        let accepts_in_window = steady
            .iter()
            .filter(|a| **a > now - window && **a <= now)
            .count() as u64;
        assert_eq!(accepts_in_window, 30);
        for place in [1, 5, 20] {
            let est = estimate(place, accepts_in_window, window).unwrap();
            let real = actual_wait(&steady, place, now).unwrap();
            let err = (est - real).num_seconds().abs();
            assert!(err <= 30, "place {place}: estimate {est}, real {real}");
        }
        // Poisson: exponential gaps with mean 30 s; the estimate asked at many instants.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut at = t0;
        let mut poisson = Vec::new();
        for _ in 0..20_000 {
            at += Duration::milliseconds((-30_000.0 * (1.0 - rng.uniform()).ln()) as i64);
            poisson.push(at);
        }
        for (place, most) in [(1u64, 0.75), (5, 0.40), (20, 0.25)] {
            let (mut errors, mut oracle) = (Vec::new(), Vec::new());
            let mut now = t0 + window;
            while now < at - Duration::hours(2) {
                let from = poisson.partition_point(|a| *a <= now - window);
                let to = poisson.partition_point(|a| *a <= now);
                let real = actual_wait(&poisson, place, now).unwrap();
                if let Some(est) = estimate(place, (to - from) as u64, window) {
                    let real_s = real.num_milliseconds() as f64;
                    errors.push((est.num_milliseconds() as f64 - real_s).abs() / real_s);
                    // Knowing the true rate: place x 30 s.
                    oracle.push((place as f64 * 30_000.0 - real_s).abs() / real_s);
                }
                now += Duration::seconds(97);
            }
            errors.sort_by(f64::total_cmp);
            oracle.sort_by(f64::total_cmp);
            let median = errors[errors.len() / 2];
            println!(
                "place {place}: median relative error {:.0} % over {} asks (knowing the true rate: {:.0} %)",
                median * 100.0,
                errors.len(),
                oracle[oracle.len() / 2] * 100.0
            );
            assert!(
                median < most,
                "place {place}: median relative error {median}"
            );
        }
    }
}
