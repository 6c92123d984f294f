//! What a load run prints: a progress line while it runs, and its report at the end.

use super::*;

/// Prints one progress line; returns the new reference point.
pub(super) fn progress(
    start: Instant,
    (last_at, last_sent, last_replies, last_offers): (Instant, u64, u64, u64),
    counters: &Counters,
    owed: &Mutex<Owed>,
) -> (Instant, u64, u64, u64) {
    let now = Instant::now();
    let dt = (now - last_at).as_secs_f64().max(1e-9);
    let sent = counters.sent.load(Ordering::Relaxed);
    let replies = counters.replies.load(Ordering::Relaxed);
    let offers = counters.offers.load(Ordering::Relaxed);
    let mut o = owed.lock().unwrap();
    let owed_now: usize = o.replies.values().map(|q| q.len()).sum::<usize>() + o.offers.len();
    let window = o.window.replace(histogram()).expect("histogram");
    let total = o.e2e.as_ref().expect("histogram");
    println!(
        "{:>6.1}s  sent {:>9} ({:>7.0}/s)  replies {:>7.0}/s  offers {:>6.0}/s  owed {:>7}  p99 {:>8.2} ms (last {:>8.2} ms)",
        (now - start).as_secs_f64(),
        sent,
        (sent - last_sent) as f64 / dt,
        (replies - last_replies) as f64 / dt,
        (offers - last_offers) as f64 / dt,
        owed_now,
        total.value_at_quantile(0.99) as f64 / 1000.0,
        window.value_at_quantile(0.99) as f64 / 1000.0,
    );
    (now, sent, replies, offers)
}

/// Prints a report as a few lines.
pub fn print_report(r: &LoadReport) {
    println!(
        "sent {} in {:.1} s ({:.0}/s offered {:.0}/s): bot {}, hand-over {}, direct {}; errors {}",
        r.sent,
        r.send_seconds,
        r.sent as f64 / r.send_seconds.max(1e-9),
        r.offered_rate,
        r.bot_sent,
        r.handover_sent,
        r.direct_sent,
        r.send_errors
    );
    println!(
        "answered {} ({:.0}/s), still owed: {} replies, {} offers; offers {} ({:.0}/s), accepts {}, closes {}",
        r.answered,
        r.answered_per_s,
        r.unanswered_replies,
        r.unanswered_offers,
        r.offers,
        r.offers_per_s,
        r.accepts,
        r.closes
    );
    for (name, l) in [
        ("end to end", r.e2e),
        ("bot reply", r.bot),
        ("hand-over reply", r.handover),
        ("offer", r.offer),
    ] {
        println!(
            "{name:>16}: n={:<8} p50 {:>8.2} ms  p95 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
            l.count, l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms
        );
    }
}
