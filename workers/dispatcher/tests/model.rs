//! Property test of the dispatch decision over random *sequences* of events, against a small
//! model of the world (agents, conversations, offers, a clock) that is obviously right
//! because it does nothing clever: it applies events, and after each one runs a pass exactly
//! as the dispatcher does (expire offers past their cycle, then [`plan`] over the ready
//! agents and the queue in SPEC D10 order), then checks the rules independently:
//!
//! - D1: an agent offered something in a pass is ready and holds at most
//!   `min(limit, capacity - processing)` open offers after it;
//! - D2: offers to ready agents never exceed the sum of their places;
//! - D3/D4: no offer to an agent who is offline, not ready or lacks a required skill;
//! - D10 (D5 for equal weights): an agent never gets a conversation while one it could take
//!   with a higher score (weight x seconds waited), or an equal score and queued earlier, is left
//!   (unless the agent is the conversation's responsible agent, D11);
//! - D11: a ready responsible agent with a free slot never leaves a customer of theirs queued
//!   (unless they declined it or let an offer of it expire);
//! - D6: no idle capacity: after a pass, no queued conversation that a ready agent with a free
//!   slot could take (and did not decline) is left;
//! - one open offer per conversation, declined never re-offered to the same agent, and D8:
//!   no open offer past its deadline after a pass.
//!
//! Transfers are among the events (SPEC D12): to a named agent straight into their
//! `processing`, whatever their status and load (so an agent may serve more than their
//! capacity: the rules above must hold with them too), or back to the queue for anyone but the
//! agent who transferred it.

use std::collections::HashMap;

use chrono::{TimeZone, Utc};
use firstline_dispatcher::plan::{assigning_cap, plan, AgentLoad, Candidate};
use firstline_shared::domain::{AgentId, SkillSet};
use proptest::prelude::*;
use uuid::Uuid;

const SKILLS: [&str; 3] = ["en", "ja", "vip"];
const CYCLE: i64 = 60;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Status {
    Ready,
    NotReady,
    Offline,
}

#[derive(Clone, Debug)]
struct Agent {
    id: AgentId,
    status: Status,
    capacity: u32,
    skills: SkillSet,
    idle_since: i64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Waiting,
    Assigning,
    Processing,
    Completed,
}

#[derive(Clone, Debug)]
struct Conv {
    id: Uuid,
    skills: SkillSet,
    /// SPEC D10.
    weight: i32,
    /// SPEC D11: the customer's responsible agent.
    responsible: Option<usize>,
    queued_at: i64,
    state: State,
    agent: Option<usize>,
    declined_by: Vec<AgentId>,
    expired_for: Vec<AgentId>,
}

#[derive(Clone, Debug)]
struct Offer {
    conv: usize,
    agent: usize,
    deadline: i64,
    open: bool,
}

#[derive(Clone, Debug)]
enum Event {
    Presence {
        agent: usize,
        status: u8,
        capacity: u32,
    },
    NewConversation {
        skills: Vec<usize>,
        weight: i32,
        responsible: Option<usize>,
    },
    Accept {
        pick: usize,
    },
    Decline {
        pick: usize,
    },
    Close {
        pick: usize,
    },
    /// A served conversation to agent `to` (SPEC D12), or back to the queue with `None`.
    Transfer {
        pick: usize,
        to: Option<usize>,
    },
    Tick {
        secs: i64,
    },
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        2 => (0usize..5, 0u8..3, 0u32..6).prop_map(|(agent, status, capacity)| Event::Presence { agent, status, capacity }),
        3 => (prop::collection::vec(0usize..3, 0..2), prop::sample::select(vec![1, 1, 2, 5, 1000]),
              prop::option::weighted(0.3, 0usize..5))
            .prop_map(|(skills, weight, responsible)| Event::NewConversation { skills, weight, responsible }),
        2 => any::<usize>().prop_map(|pick| Event::Accept { pick }),
        1 => any::<usize>().prop_map(|pick| Event::Decline { pick }),
        1 => any::<usize>().prop_map(|pick| Event::Close { pick }),
        1 => (any::<usize>(), prop::option::weighted(0.8, 0usize..5))
            .prop_map(|(pick, to)| Event::Transfer { pick, to }),
        1 => (1i64..90).prop_map(|secs| Event::Tick { secs }),
    ]
}

struct World {
    agents: Vec<Agent>,
    convs: Vec<Conv>,
    offers: Vec<Offer>,
    now: i64,
    limit: u32,
}

impl World {
    fn new(agent_skills: Vec<Vec<usize>>, limit: u32) -> Self {
        let agents = agent_skills
            .into_iter()
            .enumerate()
            .map(|(i, s)| Agent {
                id: AgentId::parse(format!("a{i}")).unwrap(),
                status: Status::Offline,
                capacity: 3,
                skills: SkillSet::new(s.iter().map(|k| SKILLS[*k])),
                idle_since: 0,
            })
            .collect();
        World {
            agents,
            convs: vec![],
            offers: vec![],
            now: 1,
            limit,
        }
    }

    fn processing(&self, a: usize) -> u32 {
        self.convs
            .iter()
            .filter(|c| c.state == State::Processing && c.agent == Some(a))
            .count() as u32
    }

    fn open_offers(&self, a: usize) -> u32 {
        self.offers
            .iter()
            .filter(|o| o.open && o.agent == a)
            .count() as u32
    }

    fn load(&self, a: usize) -> AgentLoad {
        let agent = &self.agents[a];
        AgentLoad {
            id: agent.id.clone(),
            ready: agent.status == Status::Ready,
            capacity: agent.capacity,
            processing: self.processing(a),
            open_offers: self.open_offers(a),
            skills: agent.skills.clone(),
            idle_since: Utc.timestamp_opt(agent.idle_since, 0).unwrap(),
        }
    }

    fn queued(&self, c: usize) -> bool {
        let conv = &self.convs[c];
        conv.state == State::Waiting
            || (conv.state == State::Assigning
                && !self.offers.iter().any(|o| o.open && o.conv == c))
    }

    fn apply(&mut self, event: &Event) {
        match *event {
            Event::Presence {
                agent,
                status,
                capacity,
            } => {
                let a = agent % self.agents.len();
                let status = [Status::Ready, Status::NotReady, Status::Offline][status as usize];
                if status == Status::Ready && self.agents[a].status != Status::Ready {
                    self.agents[a].idle_since = self.now;
                }
                self.agents[a].status = status;
                self.agents[a].capacity = capacity;
            }
            Event::NewConversation {
                ref skills,
                weight,
                responsible,
            } => {
                self.convs.push(Conv {
                    id: Uuid::from_u128(self.convs.len() as u128 + 1),
                    skills: SkillSet::new(skills.iter().map(|k| SKILLS[*k])),
                    weight,
                    responsible: responsible.map(|r| r % self.agents.len()),
                    queued_at: self.now,
                    state: State::Waiting,
                    agent: None,
                    declined_by: vec![],
                    expired_for: vec![],
                });
            }
            Event::Accept { pick } | Event::Decline { pick } => {
                let open: Vec<usize> = (0..self.offers.len())
                    .filter(|i| self.offers[*i].open)
                    .collect();
                if open.is_empty() {
                    return;
                }
                let o = open[pick % open.len()];
                self.offers[o].open = false;
                let (c, a) = (self.offers[o].conv, self.offers[o].agent);
                if matches!(event, Event::Accept { .. }) {
                    self.convs[c].state = State::Processing;
                    self.convs[c].agent = Some(a);
                } else {
                    let id = self.agents[a].id.clone();
                    self.convs[c].declined_by.push(id);
                    self.convs[c].state = State::Waiting;
                }
            }
            Event::Close { pick } => {
                let serving: Vec<usize> = (0..self.convs.len())
                    .filter(|c| self.convs[*c].state == State::Processing)
                    .collect();
                if let Some(c) = serving.get(pick % serving.len().max(1)) {
                    self.convs[*c].state = State::Completed;
                }
            }
            Event::Transfer { pick, to } => {
                let serving: Vec<usize> = (0..self.convs.len())
                    .filter(|c| self.convs[*c].state == State::Processing)
                    .collect();
                let Some(&c) = serving.get(pick % serving.len().max(1)) else {
                    return;
                };
                let from = self.convs[c].agent.expect("served");
                let to = to.map(|t| t % self.agents.len());
                if to == Some(from) {
                    return; // refused
                }
                let id = self.agents[from].id.clone();
                self.convs[c].declined_by.push(id);
                match to {
                    Some(to) => self.convs[c].agent = Some(to),
                    None => {
                        self.convs[c].state = State::Waiting;
                        self.convs[c].agent = None;
                    }
                }
            }
            Event::Tick { secs } => self.now += secs,
        }
    }

    /// One pass, as the dispatcher runs it; returns the new offers' indexes.
    fn pass(&mut self) -> Vec<usize> {
        for o in 0..self.offers.len() {
            if self.offers[o].open && self.offers[o].deadline <= self.now {
                self.offers[o].open = false;
                let id = self.agents[self.offers[o].agent].id.clone();
                self.convs[self.offers[o].conv].expired_for.push(id);
            }
        }
        let loads: Vec<AgentLoad> = (0..self.agents.len())
            .filter(|a| self.agents[*a].status == Status::Ready)
            .map(|a| self.load(a))
            .collect();
        let mut queue: Vec<Candidate> = (0..self.convs.len())
            .filter(|c| self.queued(*c))
            .map(|c| {
                let conv = &self.convs[c];
                Candidate {
                    conversation_id: conv.id,
                    required_skills: conv.skills.clone(),
                    declined_by: conv.declined_by.clone(),
                    expired_for: conv.expired_for.clone(),
                    weight: conv.weight,
                    queued_at: Utc.timestamp_opt(conv.queued_at, 0).unwrap(),
                    responsible: conv.responsible.map(|r| self.agents[r].id.clone()),
                    responsible_only: false,
                }
            })
            .collect();
        let now = Utc.timestamp_opt(self.now, 0).unwrap();
        queue.sort_by_key(|c| c.order_key(now));
        let mut new = vec![];
        for p in plan(&loads, &queue, self.limit) {
            let c = self
                .convs
                .iter()
                .position(|c| c.id == p.conversation_id)
                .unwrap();
            let a = self.agents.iter().position(|a| a.id == p.agent).unwrap();
            self.convs[c].state = State::Assigning;
            self.agents[a].idle_since = self.now;
            self.offers.push(Offer {
                conv: c,
                agent: a,
                deadline: self.now + CYCLE,
                open: true,
            });
            new.push(self.offers.len() - 1);
        }
        new
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn every_sequence_of_events_keeps_the_dispatch_rules(
        agent_skills in prop::collection::vec(prop::collection::vec(0usize..3, 0..3), 1..5),
        limit in 1u32..4,
        events in prop::collection::vec(event(), 1..80),
    ) {
        let mut world = World::new(agent_skills, limit);
        for (step, event) in events.iter().enumerate() {
            world.apply(event);
            let new = world.pass();
            let ctx = format!("step {step} after {event:?}");

            // One open offer per conversation.
            let mut open_per_conv: HashMap<usize, u32> = HashMap::new();
            for o in world.offers.iter().filter(|o| o.open) {
                *open_per_conv.entry(o.conv).or_default() += 1;
                // D8: nothing open past its deadline after a pass.
                prop_assert!(o.deadline > world.now, "{ctx}: open offer past its deadline");
            }
            prop_assert!(open_per_conv.values().all(|n| *n == 1), "{ctx}: two open offers for one conversation");

            let mut new_per_agent: HashMap<usize, u32> = HashMap::new();
            for &o in &new {
                let Offer { conv, agent, .. } = world.offers[o];
                let a = &world.agents[agent];
                let c = &world.convs[conv];
                prop_assert_eq!(a.status, Status::Ready, "{}: D3 offer to an agent not ready", ctx);
                prop_assert!(a.skills.covers(&c.skills), "{ctx}: D4 skills");
                prop_assert!(!c.declined_by.contains(&a.id), "{ctx}: re-offered to who declined");
                *new_per_agent.entry(agent).or_default() += 1;
            }
            // D1 at offering time.
            for &a in new_per_agent.keys() {
                let load = world.load(a);
                prop_assert!(load.open_offers <= limit.min(load.capacity.saturating_sub(load.processing)),
                    "{ctx}: D1 broken for {}: {load:?}", load.id);
            }
            // D2: offers held by ready agents fit under the cap, counting only offers that
            // were within an agent's places when made (D7 lets a not-ready agent keep hers).
            let ready: Vec<AgentLoad> = (0..world.agents.len())
                .filter(|a| world.agents[*a].status == Status::Ready).map(|a| world.load(a)).collect();
            let cap = assigning_cap(&ready, limit);
            let held: u32 = ready.iter().map(|l| l.open_offers.min(l.places(limit))).sum();
            prop_assert!(held <= cap, "{ctx}: D2 {held} > {cap}");

            // D6: no idle capacity left behind.
            for c in (0..world.convs.len()).filter(|c| world.queued(*c)) {
                let conv = &world.convs[c];
                for l in &ready {
                    prop_assert!(
                        !(l.free_slots(limit) > 0 && l.skills.covers(&conv.skills) && !conv.declined_by.contains(&l.id)),
                        "{ctx}: {} has room for queued conversation {} (D6)", l.id, conv.id
                    );
                }
            }
            // D10 (and D5 for equal weights): by score, weight x seconds waited, highest first,
            // then first-come first-served, among what an agent could take.
            let now = world.now;
            let key = |c: &Conv| (std::cmp::Reverse(i64::from(c.weight) * (now - c.queued_at)), c.queued_at, c.id);
            // D11: the responsible agent, while they have not declined it or let it expire.
            let responsible_first = |c: &Conv| c.responsible.filter(|r| {
                let id = &world.agents[*r].id;
                !c.declined_by.contains(id) && !c.expired_for.contains(id)
            });
            for &o in &new {
                let Offer { conv, agent, .. } = world.offers[o];
                let taken = &world.convs[conv];
                if responsible_first(taken) == Some(agent) {
                    continue; // D11 before D10
                }
                for (c, other) in world.convs.iter().enumerate() {
                    let earlier = key(other) < key(taken);
                    if earlier && world.queued(c) {
                        let a = &world.agents[agent];
                        prop_assert!(
                            !a.skills.covers(&other.skills) || other.declined_by.contains(&a.id),
                            "{ctx}: {} got {} before the earlier {}", a.id, taken.id, other.id
                        );
                    }
                }
            }
            // D11: a ready responsible agent with a free slot left has every queued
            // conversation of theirs they can take.
            for l in &ready {
                if l.free_slots(limit) == 0 {
                    continue;
                }
                let a = world.agents.iter().position(|x| x.id == l.id).unwrap();
                for c in (0..world.convs.len()).filter(|c| world.queued(*c)) {
                    let conv = &world.convs[c];
                    prop_assert!(
                        !(responsible_first(conv) == Some(a) && l.skills.covers(&conv.skills)),
                        "{ctx}: {} has room but its customer's {} waits (D11)", l.id, conv.id
                    );
                }
            }
        }
    }
}
