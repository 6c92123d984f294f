//! Business hours (營業時間) per channel, in the channel's time zone.
//!
//! SPEC leaves business hours open ("outside them the bot answers and the conversation waits,
//! or is told when the service opens"). Our reading: outside the hours the bot still answers
//! (SPEC S, L3); a hand-over (SPEC L4) either queues the conversation anyway
//! ([`AfterHours::Queue`], agents take it when they come) or keeps it with the bot
//! ([`AfterHours::Stay`]); either way the customer is told when the service opens, with
//! [`Schedule::closed_message`].
//!
//! Times are wall-clock times of the channel's zone. Across a daylight-saving change an instant
//! is open when its local time falls in an interval; an opening time that the clock skips
//! (02:30 on the day New York springs forward) opens when the clock jumps past it, one that
//! repeats opens at its first occurrence.
//!
//! It lives in the shared crate because two workers use it: the API checks the hours when a
//! channel is written, the bot-router applies them (workers talk over NATS only, and share
//! code only through this crate).

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono::{LocalResult, Weekday};
use chrono_tz::Tz;
use std::collections::{BTreeMap, BTreeSet};

/// The placeholder of [`BusinessHours::closed_message`].
const OPENS_AT: &str = "{{opens_at}}";

/// How far ahead [`Schedule::next_opening`] looks.
const HORIZON_DAYS: i64 = 14;

const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A channel's business hours, as configured.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusinessHours {
    /// IANA zone, e.g. "Asia/Taipei".
    pub timezone: String,
    /// Opening intervals per weekday: keys "mon".."sun"; values like
    /// [["09:00","12:00"],["13:00","18:00"]]; a missing day is closed. "24:00" allowed as an end.
    pub weekly: BTreeMap<String, Vec<[String; 2]>>,
    /// Whole days closed (holidays), "YYYY-MM-DD" in the channel's zone.
    #[serde(default)]
    pub closed_dates: Vec<NaiveDate>,
    /// What the bot answers outside the hours; may contain {{opens_at}} (next opening,
    /// "%Y-%m-%d %H:%M" local time).
    pub closed_message: String,
    /// What a hand-over (SPEC L4) does outside the hours.
    #[serde(default)]
    pub after_hours_handover: AfterHours,
}

/// What a hand-over (SPEC L4) does outside the business hours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterHours {
    /// Queue the conversation anyway (`waiting`, SPEC L4); agents take it when they come.
    #[default]
    Queue,
    /// Keep it with the bot; the customer may ask again when open.
    Stay,
}

impl BusinessHours {
    /// Checks and compiles; the error names the problem, e.g.
    /// `business_hours: unknown time zone "Asia/Taipie"`,
    /// `business_hours.weekly.mon: 18:00 is not after 19:00`.
    pub fn compile(&self) -> Result<Schedule, String> {
        let zone: Tz = self
            .timezone
            .parse()
            .map_err(|_| format!("business_hours: unknown time zone {:?}", self.timezone))?;
        let mut weekly: [Vec<(u32, u32)>; 7] = Default::default();
        for (day, intervals) in &self.weekly {
            let index = WEEKDAYS.iter().position(|d| d == day).ok_or_else(|| {
                format!("business_hours.weekly: unknown weekday {day:?} (use mon..sun)")
            })?;
            let at = |e: String| format!("business_hours.weekly.{day}: {e}");
            let mut parsed = Vec::new();
            for [start, end] in intervals {
                let (from, to) = (minutes(start).map_err(at)?, minutes(end).map_err(at)?);
                if to <= from {
                    return Err(at(format!("{end} is not after {start}")));
                }
                parsed.push((from, to));
            }
            parsed.sort_unstable();
            for pair in parsed.windows(2) {
                if pair[1].0 < pair[0].1 {
                    let [a, b] = [pair[0], pair[1]].map(|(f, t)| format!("{}-{}", hm(f), hm(t)));
                    return Err(at(format!("{a} overlaps {b}")));
                }
            }
            weekly[index] = parsed;
        }
        let rest = self.closed_message.replace(OPENS_AT, "");
        if let Some(start) = rest.find("{{") {
            let end = rest[start..]
                .find("}}")
                .map_or(rest.len(), |e| start + e + 2);
            return Err(format!(
                "business_hours.closed_message: unknown placeholder {:?} (only {OPENS_AT})",
                &rest[start..end]
            ));
        }
        Ok(Schedule {
            zone,
            weekly,
            closed_dates: self.closed_dates.iter().copied().collect(),
            closed_message: self.closed_message.clone(),
            after_hours_handover: self.after_hours_handover,
        })
    }
}

/// "HH:MM" -> minutes since midnight; "24:00" is 1440.
fn minutes(time: &str) -> Result<u32, String> {
    let bad = || format!("bad time {time:?} (use HH:MM, 00:00 to 24:00)");
    let (h, m) = time.split_once(':').ok_or_else(bad)?;
    let two_digits = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
    if !two_digits(h) || !two_digits(m) {
        return Err(bad());
    }
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    match (h, m) {
        (24, 0) => Ok(1440),
        (0..=23, 0..=59) => Ok(h * 60 + m),
        _ => Err(bad()),
    }
}

fn hm(minutes: u32) -> String {
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// Compiled business hours: answers whether a channel is open at an instant.
#[derive(Clone, Debug)]
pub struct Schedule {
    zone: Tz,
    /// Per weekday (Monday first): sorted, non-overlapping [start, end) in minutes of the day.
    weekly: [Vec<(u32, u32)>; 7],
    closed_dates: BTreeSet<NaiveDate>,
    closed_message: String,
    after_hours_handover: AfterHours,
}

impl Schedule {
    /// The channel's time zone.
    pub fn zone(&self) -> Tz {
        self.zone
    }

    /// What a hand-over (SPEC L4) does outside the hours.
    pub fn after_hours_handover(&self) -> AfterHours {
        self.after_hours_handover
    }

    /// Whether the channel is open at `at`: its local time falls in an interval of its
    /// weekday (start inclusive, end exclusive) and its local date is not a closed date.
    pub fn is_open(&self, at: DateTime<Utc>) -> bool {
        let local = at.with_timezone(&self.zone).naive_local();
        if self.closed_dates.contains(&local.date()) {
            return false;
        }
        let minute = local.hour() * 60 + local.minute();
        self.intervals(local.weekday())
            .iter()
            .any(|&(from, to)| from <= minute && minute < to)
    }

    /// The next moment it opens after `at` (within 14 days), if any: an instant when it is open
    /// and was closed just before. Contiguous intervals (["09:00","12:00"],["12:00","18:00"],
    /// or a day ending at "24:00" and the next starting at "00:00") are one opening.
    pub fn next_opening(&self, at: DateTime<Utc>) -> Option<DateTime<Tz>> {
        let today = at.with_timezone(&self.zone).date_naive();
        let horizon = at + Duration::days(HORIZON_DAYS);
        (0..=HORIZON_DAYS)
            .filter_map(|d| today.checked_add_signed(Duration::days(d)))
            .filter(|date| !self.closed_dates.contains(date))
            .flat_map(|date| {
                self.intervals(date.weekday())
                    .iter()
                    .flat_map(move |&(from, _)| self.instants(date, from))
            })
            .filter(|t| *t > at && *t <= horizon)
            .find(|t| self.is_open(*t) && !self.is_open(*t - Duration::seconds(1)))
            .map(|t| t.with_timezone(&self.zone))
    }

    /// The closed message with {{opens_at}} filled in with the next opening (local time,
    /// "%Y-%m-%d %H:%M"), or with "" when it does not open within 14 days.
    pub fn closed_message(&self, at: DateTime<Utc>) -> String {
        let opens_at = self
            .next_opening(at)
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_default();
        self.closed_message.replace(OPENS_AT, &opens_at)
    }

    fn intervals(&self, day: Weekday) -> &[(u32, u32)] {
        &self.weekly[day.num_days_from_monday() as usize]
    }

    /// The instants at which the local clock reads `minute` of `date`, in order: one, two when
    /// the clock falls back over it, or, when it springs forward over it, the instant it jumps.
    fn instants(&self, date: NaiveDate, minute: u32) -> Vec<DateTime<Utc>> {
        let Some(local) = date.and_hms_opt(0, 0, 0) else {
            return Vec::new();
        };
        let local = local + Duration::minutes(i64::from(minute));
        // Skipped local times: the first minute after the gap (gaps last at most a day).
        (0..=24 * 60)
            .map(|m| self.resolve(local + Duration::minutes(m)))
            .find(|r| !r.is_empty())
            .unwrap_or_default()
    }

    fn resolve(&self, local: NaiveDateTime) -> Vec<DateTime<Utc>> {
        match self.zone.from_local_datetime(&local) {
            LocalResult::Single(t) => vec![t.to_utc()],
            LocalResult::Ambiguous(a, b) => vec![a.to_utc(), b.to_utc()],
            LocalResult::None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn hours(json: &str) -> BusinessHours {
        serde_json::from_str(json).unwrap()
    }

    /// Taipei (UTC+8, no DST): weekdays 09:00-12:00 and 13:00-18:00, Saturday morning.
    fn taipei() -> Schedule {
        hours(
            r#"{
                "timezone": "Asia/Taipei",
                "weekly": {
                    "mon": [["09:00","12:00"],["13:00","18:00"]],
                    "tue": [["09:00","12:00"],["13:00","18:00"]],
                    "wed": [["09:00","12:00"],["13:00","18:00"]],
                    "thu": [["09:00","12:00"],["13:00","18:00"]],
                    "fri": [["09:00","12:00"],["13:00","18:00"]]
                },
                "closed_dates": ["2025-10-10"],
                "closed_message": "目前非營業時間，我們將於 {{opens_at}} 開始服務。"
            }"#,
        )
        .compile()
        .unwrap()
    }

    #[test]
    fn open_from_the_start_inclusive_to_the_end_exclusive() {
        let s = taipei();
        // Wednesday 2025-10-08 in Taipei = UTC+8.
        assert!(!s.is_open(utc("2025-10-08T00:59:59Z"))); // 08:59:59
        assert!(s.is_open(utc("2025-10-08T01:00:00Z"))); // 09:00:00
        assert!(s.is_open(utc("2025-10-08T09:59:59Z"))); // 17:59:59
        assert!(!s.is_open(utc("2025-10-08T10:00:00Z"))); // 18:00:00
        assert_eq!(s.after_hours_handover(), AfterHours::Queue);
        assert_eq!(s.zone(), chrono_tz::Asia::Taipei);
    }

    #[test]
    fn closed_over_lunch() {
        let s = taipei();
        assert!(s.is_open(utc("2025-10-08T03:59:59Z"))); // 11:59:59
        assert!(!s.is_open(utc("2025-10-08T04:00:00Z"))); // 12:00
        assert!(!s.is_open(utc("2025-10-08T04:59:59Z"))); // 12:59:59
        assert!(s.is_open(utc("2025-10-08T05:00:00Z"))); // 13:00
        let opens = s.next_opening(utc("2025-10-08T04:30:00Z")).unwrap();
        assert_eq!(opens.to_string(), "2025-10-08 13:00:00 CST");
    }

    #[test]
    fn closed_on_a_closed_date() {
        let s = taipei();
        // Friday 2025-10-10 (National Day) 10:00 in Taipei: closed, opens Monday.
        assert!(!s.is_open(utc("2025-10-10T02:00:00Z")));
        assert!(s.is_open(utc("2025-10-09T02:00:00Z")));
        assert_eq!(
            s.closed_message(utc("2025-10-10T02:00:00Z")),
            "目前非營業時間，我們將於 2025-10-13 09:00 開始服務。"
        );
    }

    #[test]
    fn next_opening_over_a_weekend() {
        let s = taipei();
        // Friday 2025-10-03 18:00 Taipei -> Monday 2025-10-06 09:00 Taipei.
        let opens = s.next_opening(utc("2025-10-03T10:00:00Z")).unwrap();
        assert_eq!(opens.naive_local().to_string(), "2025-10-06 09:00:00");
        assert_eq!(opens.to_utc(), utc("2025-10-06T01:00:00Z"));
        // While open, the next opening is the one after this interval.
        let opens = s.next_opening(utc("2025-10-06T01:00:00Z")).unwrap();
        assert_eq!(opens.naive_local().to_string(), "2025-10-06 13:00:00");
    }

    #[test]
    fn contiguous_intervals_are_one_opening() {
        let s = hours(
            r#"{"timezone":"UTC","weekly":{"mon":[["00:00","24:00"]],
                "tue":[["00:00","12:00"],["12:00","18:00"]]},"closed_message":""}"#,
        )
        .compile()
        .unwrap();
        // Sunday 2025-10-05: the next opening is Monday 00:00, not Tuesday 00:00 or 12:00.
        let sunday = utc("2025-10-05T10:00:00Z");
        assert_eq!(
            s.next_opening(sunday).unwrap().to_utc(),
            utc("2025-10-06T00:00:00Z")
        );
        let monday = utc("2025-10-06T10:00:00Z");
        assert_eq!(
            s.next_opening(monday).unwrap().to_utc(),
            utc("2025-10-13T00:00:00Z")
        );
        assert!(s.is_open(utc("2025-10-06T23:59:59Z")));
        assert!(s.is_open(utc("2025-10-07T17:59:59Z")));
        assert!(!s.is_open(utc("2025-10-07T18:00:00Z")));
    }

    #[test]
    fn never_opens_gives_none_and_an_empty_placeholder() {
        let s = hours(
            r#"{"timezone":"Asia/Taipei","weekly":{},"closed_message":"Back {{opens_at}}.",
                "after_hours_handover":"stay"}"#,
        )
        .compile()
        .unwrap();
        assert_eq!(s.after_hours_handover(), AfterHours::Stay);
        assert!(!s.is_open(utc("2025-10-08T02:00:00Z")));
        assert_eq!(s.next_opening(utc("2025-10-08T02:00:00Z")), None);
        assert_eq!(s.closed_message(utc("2025-10-08T02:00:00Z")), "Back .");
    }

    /// New York springs forward on 2025-03-09 (02:00 EST -> 03:00 EDT; 02:00..03:00 does not
    /// exist) and falls back on 2025-11-02 (02:00 EDT -> 01:00 EST; 01:00..02:00 repeats).
    fn new_york() -> Schedule {
        hours(
            r#"{"timezone":"America/New_York","weekly":{
                "sun":[["02:30","04:00"]], "mon":[["09:00","17:00"]]},
                "closed_message":"Opens {{opens_at}}"}"#,
        )
        .compile()
        .unwrap()
    }

    #[test]
    fn a_skipped_opening_time_opens_when_the_clock_jumps() {
        let s = new_york();
        // 06:59:59Z = 01:59:59 EST: closed; 07:00:00Z = 03:00 EDT: open (past 02:30 local).
        assert!(!s.is_open(utc("2025-03-09T06:59:59Z")));
        assert!(s.is_open(utc("2025-03-09T07:00:00Z")));
        assert!(s.is_open(utc("2025-03-09T07:59:59Z"))); // 03:59:59 EDT
        assert!(!s.is_open(utc("2025-03-09T08:00:00Z"))); // 04:00 EDT
        let opens = s.next_opening(utc("2025-03-09T05:00:00Z")).unwrap();
        assert_eq!(opens.to_utc(), utc("2025-03-09T07:00:00Z"));
        assert_eq!(opens.to_string(), "2025-03-09 03:00:00 EDT");
        assert_eq!(
            s.closed_message(utc("2025-03-09T05:00:00Z")),
            "Opens 2025-03-09 03:00"
        );
        // Monday after the change: 09:00 EDT = 13:00Z.
        let opens = s.next_opening(utc("2025-03-09T08:00:00Z")).unwrap();
        assert_eq!(opens.to_utc(), utc("2025-03-10T13:00:00Z"));
    }

    #[test]
    fn a_repeated_hour_is_open_both_times() {
        let s = hours(
            r#"{"timezone":"America/New_York","weekly":{"sun":[["01:00","01:30"]]},
                "closed_message":""}"#,
        )
        .compile()
        .unwrap();
        // 2025-11-02: 01:00 EDT = 05:00Z, 01:00 EST = 06:00Z.
        assert!(s.is_open(utc("2025-11-02T05:00:00Z")));
        assert!(!s.is_open(utc("2025-11-02T05:30:00Z")));
        assert!(s.is_open(utc("2025-11-02T06:00:00Z")));
        assert!(!s.is_open(utc("2025-11-02T06:30:00Z")));
        let first = s.next_opening(utc("2025-11-02T04:00:00Z")).unwrap();
        assert_eq!(first.to_utc(), utc("2025-11-02T05:00:00Z"));
        let second = s.next_opening(utc("2025-11-02T05:45:00Z")).unwrap();
        assert_eq!(second.to_utc(), utc("2025-11-02T06:00:00Z"));
        assert_eq!(second.to_string(), "2025-11-02 01:00:00 EST");
    }

    #[test]
    fn every_validation_error_names_the_problem() {
        let compile = |timezone: &str, weekly: &str, message: &str| {
            let json = format!(
                r#"{{"timezone":"{timezone}","weekly":{weekly},"closed_message":"{message}"}}"#
            );
            hours(&json).compile().unwrap_err()
        };
        let day =
            |intervals: &str| compile("Asia/Taipei", &format!(r#"{{"mon":{intervals}}}"#), "");
        assert_eq!(
            compile("Asia/Taipie", "{}", ""),
            r#"business_hours: unknown time zone "Asia/Taipie""#
        );
        assert_eq!(
            compile("Asia/Taipei", r#"{"monday":[]}"#, ""),
            r#"business_hours.weekly: unknown weekday "monday" (use mon..sun)"#
        );
        assert_eq!(
            day(r#"[["19:00","18:00"]]"#),
            "business_hours.weekly.mon: 18:00 is not after 19:00"
        );
        assert_eq!(
            day(r#"[["09:00","09:00"]]"#),
            "business_hours.weekly.mon: 09:00 is not after 09:00"
        );
        assert_eq!(
            day(r#"[["24:00","24:00"]]"#),
            "business_hours.weekly.mon: 24:00 is not after 24:00"
        );
        for bad in [
            "9am",
            "9:00",
            "09:60",
            "25:00",
            "24:01",
            "",
            "09:00:00",
            "０９:００",
        ] {
            assert_eq!(
                day(&format!(r#"[["{bad}","18:00"]]"#)),
                format!("business_hours.weekly.mon: bad time {bad:?} (use HH:MM, 00:00 to 24:00)")
            );
        }
        assert_eq!(
            day(r#"[["13:00","18:00"],["09:00","14:00"]]"#),
            "business_hours.weekly.mon: 09:00-14:00 overlaps 13:00-18:00"
        );
        assert_eq!(
            compile("Asia/Taipei", "{}", "Back at {{open_at}}"),
            r#"business_hours.closed_message: unknown placeholder "{{open_at}}" (only {{opens_at}})"#
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<BusinessHours>(
            r#"{"timezone":"UTC","weekly":{},"closed_message":"","holidays":[]}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `holidays`"),
            "{err}"
        );
        let err = serde_json::from_str::<BusinessHours>(
            r#"{"timezone":"UTC","weekly":{},"closed_message":"","after_hours_handover":"drop"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown variant `drop`"), "{err}");
    }
}
