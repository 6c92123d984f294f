//! SPEC SL, service level (服務水平): from one row per conversation queued in a day (when it
//! was queued, when an agent first accepted it or when it left the queue without one, its
//! channel), the figures of the day and of each hour, in total and per channel. Pure: the SQL
//! that reads the rows is in the API (`routes/service_level.rs`).
//!
//! The figures of a set of conversations, each counted in the hour it was queued in:
//! - `accepted_within_threshold`: accepted by an agent at most T after being queued;
//! - `service_level` = accepted within T / (accepted + left without an agent + still waiting
//!   longer than T): a conversation still waiting for less than T is not decided yet and is
//!   left out; one that left without an agent counts against, whenever it left;
//! - `average_wait_seconds` and `p90_wait_seconds` over the accepted ones (queued to first
//!   accept; p90 by the nearest-rank method: the smallest wait that 90 % of waits do not
//!   exceed);
//! - `left_without_agent`: left the queue before any agent accepted it.
//!
//! A conversation transferred back to the queue later counts once, by its first wait
//! (the customer's wait for a first person).

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

/// How a conversation's wait in the queue ended, if it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueEnd {
    /// An agent accepted it (the first accept).
    Accepted(DateTime<Utc>),
    /// It left the queue without an agent (completed while waiting or assigning).
    Left(DateTime<Utc>),
    /// Still queued.
    Waiting,
}

/// One conversation that was queued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedConversation {
    pub channel: String,
    pub queued_at: DateTime<Utc>,
    pub end: QueueEnd,
}

/// The service-level figures of a set of queued conversations.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Conversations queued.
    pub queued: u64,
    /// Accepted by an agent (at any time so far).
    pub accepted: u64,
    /// Accepted at most the threshold after being queued.
    pub accepted_within_threshold: u64,
    /// Left the queue without an agent.
    pub left_without_agent: u64,
    /// Still in the queue.
    pub waiting: u64,
    /// Accepted within the threshold, as a share (0 to 1) of those decided; none when none is.
    pub service_level: Option<f64>,
    /// Mean wait of the accepted ones, in seconds.
    pub average_wait_seconds: Option<f64>,
    /// 90th-percentile wait of the accepted ones (nearest rank), in seconds.
    pub p90_wait_seconds: Option<f64>,
}

/// Seconds between two instants, to the millisecond.
fn seconds(d: Duration) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}

/// The figures of `rows` with threshold `threshold`, as they stand at `now`.
pub fn figures<'a>(
    rows: impl IntoIterator<Item = &'a QueuedConversation>,
    threshold: Duration,
    now: DateTime<Utc>,
) -> Figures {
    let mut f = Figures::default();
    let mut waits = Vec::new();
    let mut decided = 0u64;
    for row in rows {
        f.queued += 1;
        match row.end {
            QueueEnd::Accepted(at) => {
                let wait = (at - row.queued_at).max(Duration::zero());
                f.accepted += 1;
                decided += 1;
                if wait <= threshold {
                    f.accepted_within_threshold += 1;
                }
                waits.push(seconds(wait));
            }
            QueueEnd::Left(_) => {
                f.left_without_agent += 1;
                decided += 1;
            }
            QueueEnd::Waiting => {
                f.waiting += 1;
                if now - row.queued_at > threshold {
                    decided += 1;
                }
            }
        }
    }
    f.service_level = (decided > 0).then(|| f.accepted_within_threshold as f64 / decided as f64);
    if !waits.is_empty() {
        f.average_wait_seconds = Some(waits.iter().sum::<f64>() / waits.len() as f64);
        waits.sort_by(f64::total_cmp);
        let rank = (waits.len() * 9).div_ceil(10); // ceil(0.9 n), 1-based
        f.p90_wait_seconds = Some(waits[rank.max(1) - 1]);
    }
    f
}

/// The figures of one hour of the day.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HourFigures {
    /// When the hour starts.
    pub start: DateTime<Utc>,
    #[serde(flatten)]
    pub figures: Figures,
}

/// A day's figures and its hours' (from the day's start to its end, or to now for today).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DayFigures {
    pub day: Figures,
    pub hours: Vec<HourFigures>,
}

/// The report: the whole tenant, then each channel with a conversation queued that day.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub total: DayFigures,
    pub channels: Vec<ChannelFigures>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChannelFigures {
    pub channel: String,
    #[serde(flatten)]
    pub figures: DayFigures,
}

/// The hours of the day `[day_start, day_end)`, up to the one holding `now` when the day is
/// today (a day with a clock change has 23 or 25).
fn hour_starts(
    day_start: DateTime<Utc>,
    day_end: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Vec<DateTime<Utc>> {
    let last = day_end.min(now.max(day_start + Duration::seconds(1)));
    let mut starts = Vec::new();
    let mut at = day_start;
    while at < last {
        starts.push(at);
        at += Duration::hours(1);
    }
    starts
}

fn day_figures(
    rows: &[&QueuedConversation],
    threshold: Duration,
    now: DateTime<Utc>,
    hours: &[DateTime<Utc>],
) -> DayFigures {
    let hour_of = |r: &QueuedConversation| {
        hours
            .partition_point(|start| *start <= r.queued_at)
            .saturating_sub(1)
    };
    let mut by_hour: Vec<Vec<&QueuedConversation>> = vec![Vec::new(); hours.len()];
    for r in rows {
        if let Some(bucket) = by_hour.get_mut(hour_of(r)) {
            bucket.push(r);
        }
    }
    DayFigures {
        day: figures(rows.iter().copied(), threshold, now),
        hours: hours
            .iter()
            .zip(by_hour)
            .map(|(start, rows)| HourFigures {
                start: *start,
                figures: figures(rows, threshold, now),
            })
            .collect(),
    }
}

/// The report of the conversations queued in `[day_start, day_end)` (others in `rows` are
/// ignored), as it stands at `now`.
pub fn report(
    rows: &[QueuedConversation],
    threshold: Duration,
    day_start: DateTime<Utc>,
    day_end: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Report {
    let hours = hour_starts(day_start, day_end, now);
    let of_day: Vec<&QueuedConversation> = rows
        .iter()
        .filter(|r| r.queued_at >= day_start && r.queued_at < day_end)
        .collect();
    let mut channels: Vec<&str> = of_day.iter().map(|r| r.channel.as_str()).collect();
    channels.sort_unstable();
    channels.dedup();
    Report {
        total: day_figures(&of_day, threshold, now, &hours),
        channels: channels
            .into_iter()
            .map(|channel| {
                let rows: Vec<&QueuedConversation> = of_day
                    .iter()
                    .copied()
                    .filter(|r| r.channel == channel)
                    .collect();
                ChannelFigures {
                    channel: channel.to_owned(),
                    figures: day_figures(&rows, threshold, now, &hours),
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }
    fn row(channel: &str, queued: i64, end: QueueEnd) -> QueuedConversation {
        QueuedConversation {
            channel: channel.into(),
            queued_at: at(queued),
            end,
        }
    }

    /// SPEC SL: the figures of a small hand-computed set.
    #[test]
    fn figures_of_a_hand_computed_set() {
        let rows = [
            row("line", 0, QueueEnd::Accepted(at(5))),   // 5 s, within
            row("line", 10, QueueEnd::Accepted(at(30))), // 20 s, within (T is inclusive)
            row("line", 20, QueueEnd::Accepted(at(61))), // 41 s, late
            row("mail", 30, QueueEnd::Left(at(35))),     // left: against
            row("mail", 90, QueueEnd::Waiting),          // 10 s so far: undecided
            row("mail", 40, QueueEnd::Waiting),          // 60 s so far: late
        ];
        let f = figures(&rows, Duration::seconds(20), at(100));
        assert_eq!(
            (
                f.queued,
                f.accepted,
                f.accepted_within_threshold,
                f.left_without_agent,
                f.waiting
            ),
            (6, 3, 2, 1, 2)
        );
        assert_eq!(f.service_level, Some(2.0 / 5.0));
        assert_eq!(f.average_wait_seconds, Some((5.0 + 20.0 + 41.0) / 3.0));
        assert_eq!(f.p90_wait_seconds, Some(41.0));
        let none = figures(&[], Duration::seconds(20), at(0));
        assert_eq!((none.service_level, none.p90_wait_seconds), (None, None));
    }

    #[test]
    fn p90_is_the_nearest_rank() {
        let rows: Vec<_> = (1..=20)
            .map(|w| row("x", 0, QueueEnd::Accepted(at(w))))
            .collect();
        // ceil(0.9 * 20) = 18th of 1..=20.
        assert_eq!(
            figures(&rows, Duration::seconds(5), at(99)).p90_wait_seconds,
            Some(18.0)
        );
    }

    #[test]
    fn hours_run_to_now_today_and_split_by_channel() {
        let rows = [
            row("line", 100, QueueEnd::Accepted(at(110))),
            row("mail", 3700, QueueEnd::Accepted(at(3800))),
            row("mail", -5, QueueEnd::Accepted(at(1))), // the day before: ignored
        ];
        let r = report(
            &rows,
            Duration::seconds(20),
            at(0),
            at(86_400),
            at(3 * 3600 + 1),
        );
        assert_eq!(r.total.hours.len(), 4, "hours 0..=3");
        assert_eq!(r.total.day.queued, 2);
        assert_eq!(r.total.hours[0].figures.accepted_within_threshold, 1);
        assert_eq!(r.total.hours[1].figures.accepted, 1);
        assert_eq!(r.total.hours[1].figures.service_level, Some(0.0));
        let names: Vec<_> = r.channels.iter().map(|c| c.channel.as_str()).collect();
        assert_eq!(names, ["line", "mail"]);
        assert_eq!(r.channels[1].figures.hours.len(), 4);
        assert_eq!(r.channels[1].figures.day.queued, 1);
        let past = report(
            &rows,
            Duration::seconds(20),
            at(0),
            at(86_400),
            at(10 * 86_400),
        );
        assert_eq!(past.total.hours.len(), 24, "a past day has all its hours");
    }

    fn arb_row() -> impl Strategy<Value = QueuedConversation> {
        (0i64..86_400, 0u8..3, 0i64..600, 0usize..3).prop_map(|(q, end, wait, ch)| {
            let end = match end {
                0 => QueueEnd::Accepted(at(q + wait)),
                1 => QueueEnd::Left(at(q + wait)),
                _ => QueueEnd::Waiting,
            };
            row(["line", "mail", "web"][ch], q, end)
        })
    }

    proptest! {
        /// The parts add up: hours sum to the day and channels to the total; the share is a
        /// share; p90 lies between the mean's bounds (min and max wait), and so does the mean.
        #[test]
        fn figures_add_up(rows in proptest::collection::vec(arb_row(), 0..60), t in 0i64..120) {
            let threshold = Duration::seconds(t);
            let now = at(86_400 + 700);
            let r = report(&rows, threshold, at(0), at(86_400), now);
            let day = &r.total.day;
            prop_assert_eq!(day.queued as usize, rows.len());
            prop_assert_eq!(day.queued, day.accepted + day.left_without_agent + day.waiting);
            let sum = |get: fn(&Figures) -> u64| r.total.hours.iter().map(|h| get(&h.figures)).sum::<u64>();
            prop_assert_eq!(sum(|f| f.queued), day.queued);
            prop_assert_eq!(sum(|f| f.accepted_within_threshold), day.accepted_within_threshold);
            prop_assert_eq!(sum(|f| f.left_without_agent), day.left_without_agent);
            prop_assert_eq!(r.channels.iter().map(|c| c.figures.day.queued).sum::<u64>(), day.queued);
            if let Some(s) = day.service_level {
                prop_assert!((0.0..=1.0).contains(&s));
            }
            let waits: Vec<f64> = rows.iter().filter_map(|r| match r.end {
                QueueEnd::Accepted(a) => Some(seconds(a - r.queued_at)),
                _ => None,
            }).collect();
            if let (Some(avg), Some(p90)) = (day.average_wait_seconds, day.p90_wait_seconds) {
                let lo = waits.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = waits.iter().copied().fold(0.0, f64::max);
                prop_assert!(lo <= avg + 1e-9 && avg <= hi + 1e-9);
                prop_assert!(lo <= p90 && p90 <= hi);
                let within = waits.iter().filter(|w| **w <= p90).count();
                prop_assert!(within * 10 >= waits.len() * 9, "90 % wait at most p90");
            } else {
                prop_assert!(waits.is_empty());
            }
        }
    }
}
