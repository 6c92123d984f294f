//! Each customer's recent transcript, both directions, and the widgets connected to it: what a
//! widget reconnecting with "the last entry I saw was `seq` N" is sent again (every kept entry
//! after N, each once, in order) before it gets new ones.
//!
//! Where it lives: in the gateway process's memory ([`Transcript`], behind the [`Hub`]'s lock),
//! the last [`Transcript::keep`] entries per customer, for the customers seen most recently
//! (docs/webchat.md says why not a NATS KV bucket: a fenced gateway user may not create
//! streams). Entry numbers (`seq`) grow across restarts of the gateway (they start from the
//! clock in microseconds), so a widget's "last seen" of an earlier run never hides a new entry.
//! The same `message_id` is kept once: a redelivered outbound message or a customer's message
//! sent again after a dropped connection makes no second entry.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use firstline_shared::wire::{Author, OutboundMessage, QuickReply};
use serde::Serialize;
use tokio::sync::mpsc;

/// One line of a transcript, as the widget shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    /// The customer's message id (chosen by the widget), or the outbound message's id.
    pub message_id: String,
    pub author: Author,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    pub text: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub buttons: Vec<QuickReply>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    pub at: DateTime<Utc>,
}

impl From<&OutboundMessage> for Entry {
    fn from(m: &OutboundMessage) -> Self {
        Self {
            message_id: m.message_id.to_string(),
            author: m.author,
            agent_id: m.agent_id.as_ref().map(|a| a.to_string()),
            text: m.text.clone(),
            buttons: m.buttons.clone(),
            image_url: m.image_url.clone(),
            at: m.at,
        }
    }
}

#[derive(Default)]
struct Log {
    entries: VecDeque<(u64, Arc<Entry>)>,
    ids: HashSet<String>,
    /// When it last changed or was read, by the transcript's own counter (for eviction).
    touched: u64,
}

/// Every customer's kept entries. Pure: no I/O, no clock but the one given at creation.
pub struct Transcript {
    customers: HashMap<String, Log>,
    next_seq: u64,
    clock: u64,
    keep: usize,
    max_customers: usize,
}

impl Transcript {
    /// Keeps `keep` entries per customer for at most `max_customers` customers; entry
    /// numbers start after `first_seq`.
    pub fn new(keep: usize, max_customers: usize, first_seq: u64) -> Self {
        Self {
            customers: HashMap::new(),
            next_seq: first_seq,
            clock: 0,
            keep: keep.max(1),
            max_customers: max_customers.max(1),
        }
    }

    /// Entries kept per customer.
    pub fn keep(&self) -> usize {
        self.keep
    }

    /// Adds `entry` to `customer`'s transcript: its `seq`, or None when an entry with its
    /// `message_id` is already kept.
    pub fn append(&mut self, customer: &str, entry: Entry) -> Option<(u64, Arc<Entry>)> {
        self.clock += 1;
        let clock = self.clock;
        if !self.customers.contains_key(customer) && self.customers.len() >= self.max_customers {
            self.evict();
        }
        let log = self.customers.entry(customer.to_owned()).or_default();
        log.touched = clock;
        if !log.ids.insert(entry.message_id.clone()) {
            return None;
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        let entry = Arc::new(entry);
        log.entries.push_back((seq, entry.clone()));
        while log.entries.len() > self.keep {
            if let Some((_, old)) = log.entries.pop_front() {
                log.ids.remove(&old.message_id);
            }
        }
        Some((seq, entry))
    }

    /// `customer`'s kept entries after `after` (all kept ones for None), oldest first.
    pub fn since(&mut self, customer: &str, after: Option<u64>) -> Vec<(u64, Arc<Entry>)> {
        self.clock += 1;
        let Some(log) = self.customers.get_mut(customer) else {
            return Vec::new();
        };
        log.touched = self.clock;
        let after = after.unwrap_or(0);
        log.entries
            .iter()
            .filter(|(seq, _)| *seq > after)
            .cloned()
            .collect()
    }

    /// Forgets the tenth of the customers least recently active.
    fn evict(&mut self) {
        let mut touched: Vec<(u64, String)> = self
            .customers
            .iter()
            .map(|(c, log)| (log.touched, c.clone()))
            .collect();
        touched.sort_unstable();
        let n = (self.max_customers / 10).max(1);
        for (_, c) in touched.into_iter().take(n) {
            self.customers.remove(&c);
        }
    }
}

/// What a connected widget is sent.
#[derive(Clone, Debug)]
pub enum Frame {
    Entry(u64, Arc<Entry>),
    /// A customer message that could not be taken (bad, or NATS did not answer in time).
    Error {
        message_id: String,
        reason: String,
    },
}

impl Frame {
    pub fn to_json(&self) -> String {
        match self {
            Frame::Entry(seq, entry) => {
                serde_json::json!({"type": "message", "seq": seq, "message": entry.as_ref()})
                    .to_string()
            }
            Frame::Error { message_id, reason } => {
                serde_json::json!({"type": "error", "message_id": message_id, "reason": reason})
                    .to_string()
            }
        }
    }
}

/// A widget's connection: what the hub sends it.
pub type Outbox = mpsc::UnboundedSender<Frame>;

struct HubState {
    transcript: Transcript,
    sockets: HashMap<String, Vec<(u64, Outbox)>>,
    next_socket: u64,
}

/// The transcript and the open widgets of every customer, behind one lock, so that a
/// widget attaching gets the entries it missed and then every new one: none in neither,
/// none in both.
#[derive(Clone)]
pub struct Hub {
    state: Arc<Mutex<HubState>>,
}

/// A widget attached to its customer's transcript; detached when dropped.
pub struct Attached {
    hub: Hub,
    customer: String,
    id: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut state = self.hub.lock();
        if let Some(list) = state.sockets.get_mut(&self.customer) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                state.sockets.remove(&self.customer);
            }
        }
    }
}

impl Hub {
    pub fn new(transcript: Transcript) -> Self {
        Self {
            state: Arc::new(Mutex::new(HubState {
                transcript,
                sockets: HashMap::new(),
                next_socket: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Attaches a widget of `customer` that last saw `after`: the entries it missed are
    /// queued on `outbox` first, then every new entry follows.
    pub fn attach(&self, customer: &str, after: Option<u64>, outbox: Outbox) -> Attached {
        let mut state = self.lock();
        for (seq, entry) in state.transcript.since(customer, after) {
            let _ = outbox.send(Frame::Entry(seq, entry));
        }
        state.next_socket += 1;
        let id = state.next_socket;
        state
            .sockets
            .entry(customer.to_owned())
            .or_default()
            .push((id, outbox));
        Attached {
            hub: self.clone(),
            customer: customer.to_owned(),
            id,
        }
    }

    /// Records `entry` in `customer`'s transcript and sends it to the customer's open widgets.
    /// False when its `message_id` was already recorded (nothing is sent again).
    pub fn record(&self, customer: &str, entry: Entry) -> bool {
        let mut state = self.lock();
        let Some((seq, entry)) = state.transcript.append(customer, entry) else {
            return false;
        };
        if let Some(list) = state.sockets.get_mut(customer) {
            list.retain(|(_, outbox)| outbox.send(Frame::Entry(seq, entry.clone())).is_ok());
        }
        true
    }

    /// How many widgets are connected (for tests and logs).
    pub fn connected(&self) -> usize {
        self.lock().sockets.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(id: &str) -> Entry {
        Entry {
            message_id: id.to_owned(),
            author: Author::Bot,
            agent_id: None,
            text: format!("text {id}"),
            buttons: Vec::new(),
            image_url: None,
            at: Utc::now(),
        }
    }

    #[test]
    fn a_reconnecting_widget_gets_exactly_what_it_missed() {
        let hub = Hub::new(Transcript::new(100, 10, 1_000));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let first = hub.attach("c", None, tx);
        assert!(hub.record("c", entry("a")));
        assert!(hub.record("other", entry("x")));
        let Ok(Frame::Entry(seen, _)) = rx.try_recv() else {
            panic!("a")
        };
        assert!(seen > 1_000, "seqs start after the given first one");
        assert!(
            rx.try_recv().is_err(),
            "another customer's entry is not sent"
        );
        drop(first);
        assert!(hub.record("c", entry("b")));
        assert!(!hub.record("c", entry("a")), "an id is recorded once");
        assert!(hub.record("c", entry("c")));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _again = hub.attach("c", Some(seen), tx);
        let ids: Vec<String> = std::iter::from_fn(|| match rx.try_recv() {
            Ok(Frame::Entry(_, e)) => Some(e.message_id.clone()),
            _ => None,
        })
        .collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!(hub.connected(), 1);
    }

    #[test]
    fn only_the_last_entries_and_the_recent_customers_are_kept() {
        let mut t = Transcript::new(2, 10, 0);
        for id in ["a", "b", "c"] {
            t.append("c", entry(id));
        }
        let kept: Vec<_> = t
            .since("c", None)
            .iter()
            .map(|(_, e)| e.message_id.clone())
            .collect();
        assert_eq!(kept, ["b", "c"]);
        for n in 0..10 {
            t.append(&format!("other{n}"), entry("x"));
        }
        assert!(
            t.since("c", None).is_empty(),
            "the least recently active customer is forgotten"
        );
        assert_eq!(t.since("other9", None).len(), 1);
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// An entry for customer `c` with message id `m` (ids repeat: redeliveries).
        Record { c: u8, m: u8 },
        /// Customer `c`'s widget drops its connection and reconnects with its last seen seq.
        Reconnect { c: u8 },
        /// Customer `c`'s widget is offline for a while.
        Drop { c: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3, 0u8..12).prop_map(|(c, m)| Op::Record { c, m }),
            1 => (0u8..3).prop_map(|c| Op::Reconnect { c }),
            1 => (0u8..3).prop_map(|c| Op::Drop { c }),
        ]
    }

    proptest! {
        /// Whatever the drops, reconnects and redeliveries, each customer's widget ends up with
        /// every distinct message of its customer exactly once, in the order recorded.
        #[test]
        fn widgets_see_each_message_once_in_order(ops in proptest::collection::vec(op(), 0..80)) {
            let hub = Hub::new(Transcript::new(1_000, 10, 0));
            struct Widget { seen: Vec<(u64, String)>, rx: Option<mpsc::UnboundedReceiver<Frame>>, attached: Option<Attached> }
            let mut widgets: Vec<Widget> = (0..3).map(|_| Widget { seen: vec![], rx: None, attached: None }).collect();
            let mut expected: Vec<Vec<String>> = vec![vec![]; 3];
            let drain = |w: &mut Widget| {
                if let Some(rx) = w.rx.as_mut() {
                    while let Ok(Frame::Entry(seq, e)) = rx.try_recv() {
                        w.seen.push((seq, e.message_id.clone()));
                    }
                }
            };
            for op in ops {
                match op {
                    Op::Record { c, m } => {
                        let id = format!("m{m}");
                        let new = hub.record(&format!("c{c}"), entry(&id));
                        prop_assert_eq!(new, !expected[c as usize].contains(&id));
                        if new { expected[c as usize].push(id); }
                    }
                    Op::Reconnect { c } => {
                        let w = &mut widgets[c as usize];
                        drain(w);
                        w.attached = None;
                        let (tx, rx) = mpsc::unbounded_channel();
                        let last = w.seen.last().map(|(s, _)| *s);
                        w.attached = Some(hub.attach(&format!("c{c}"), last, tx));
                        w.rx = Some(rx);
                    }
                    Op::Drop { c } => {
                        let w = &mut widgets[c as usize];
                        drain(w);
                        w.attached = None;
                        w.rx = None;
                    }
                }
            }
            for (c, w) in widgets.iter_mut().enumerate() {
                drain(w);
                let last = w.seen.last().map(|(s, _)| *s);
                let (tx, rx) = mpsc::unbounded_channel();
                w.attached = Some(hub.attach(&format!("c{c}"), last, tx));
                w.rx = Some(rx);
                drain(w);
                let ids: Vec<String> = w.seen.iter().map(|(_, id)| id.clone()).collect();
                prop_assert_eq!(&ids, &expected[c]);
                prop_assert!(w.seen.windows(2).all(|p| p[0].0 < p[1].0), "seqs grow");
            }
        }
    }
}
