//! The dispatcher's decision, with no I/O: given the agents with their presence and load,
//! the queue in dispatch order and the tenant's offer limit, which conversation is offered
//! to which agent. The I/O around it (`db`) loads the inputs and writes the offers under the
//! tenant's advisory lock.
//!
//! The reading of SPEC D1-D6 that this implements (SPEC "How D2, D4 and D6 fit together"):
//! a conversation enters `assigning` only together with an offer to a suitable agent who has
//! a free slot, a slot being one of an agent's `min(offer_limit, remaining capacity)` places.
//! One pass walks the queue in order and gives each conversation to the best suitable agent
//! with a free slot; it stops when no slot is left.

use chrono::{DateTime, Utc};
use firstline_shared::domain::{AgentId, SkillSet};
use uuid::Uuid;

/// An agent as the dispatcher sees them.
#[derive(Clone, Debug)]
pub struct AgentLoad {
    pub id: AgentId,
    /// Online and ready (SPEC words).
    pub ready: bool,
    /// SPEC capacity: conversations in `processing` at once.
    pub capacity: u32,
    /// Conversations in `processing` with this agent.
    pub processing: u32,
    /// Open offers to this agent.
    pub open_offers: u32,
    pub skills: SkillSet,
    /// SPEC D5 tie-break: the agent idle longest (earliest) goes first.
    pub idle_since: DateTime<Utc>,
}

impl AgentLoad {
    /// SPEC D1/D2: the agent's places for offers, `min(offer_limit, capacity - processing)`,
    /// 0 unless online and ready (D3).
    pub fn places(&self, offer_limit: u32) -> u32 {
        if self.ready {
            offer_limit.min(self.capacity.saturating_sub(self.processing))
        } else {
            0
        }
    }

    /// Places not yet taken by open offers.
    pub fn free_slots(&self, offer_limit: u32) -> u32 {
        self.places(offer_limit).saturating_sub(self.open_offers)
    }
}

/// SPEC D2: the most conversations that may be in `assigning` with an offer: the sum over
/// online and ready agents of `min(offer_limit, remaining capacity)`.
pub fn assigning_cap(agents: &[AgentLoad], offer_limit: u32) -> u32 {
    agents.iter().map(|a| a.places(offer_limit)).sum()
}

/// A conversation that may be offered: `waiting`, or `assigning` without an open offer
/// (its offer expired with nobody else to take it, SPEC D7/D8).
#[derive(Clone, Debug)]
pub struct Candidate {
    pub conversation_id: Uuid,
    /// SPEC D4.
    pub required_skills: SkillSet,
    /// Agents who declined it, or transferred it away: never offered it again (README).
    pub declined_by: Vec<AgentId>,
    /// Agents whose offer of it expired: chosen only when no other suitable agent has room
    /// (SPEC D8: "to another suitable agent if there is one").
    pub expired_for: Vec<AgentId>,
    /// SPEC D10 assignment weight (>= 1): the score is `weight x seconds since queued_at`.
    /// Used to order the queue; the plan itself takes the queue as given.
    pub weight: i32,
    pub queued_at: DateTime<Utc>,
    /// SPEC D11: the customer's responsible agent, offered it first.
    pub responsible: Option<AgentId>,
    /// Read beyond the queue's heads only because its responsible agent has room: offered to
    /// that agent or to no one in this pass (to anyone else it would pass the heads).
    pub responsible_only: bool,
}

impl Candidate {
    /// SPEC D11: the responsible agent, while they may still be offered it first: not after
    /// they declined it or let one offer of it expire ("do not accept within one dispatch
    /// cycle").
    pub fn responsible_first(&self) -> Option<&AgentId> {
        self.responsible
            .as_ref()
            .filter(|r| !self.declined_by.contains(r) && !self.expired_for.contains(r))
    }

    /// SPEC D10: `weight x time waited` at `now`, in weight-microseconds (exact: no rounding
    /// decides between two conversations). A conversation queued after `now` (another clock)
    /// has waited 0.
    pub fn score(&self, now: DateTime<Utc>) -> i128 {
        let waited = (now - self.queued_at)
            .num_microseconds()
            .unwrap_or(i64::MAX);
        i128::from(self.weight.max(1)) * i128::from(waited.max(0))
    }

    /// SPEC D10 dispatch order at `now`: score (highest first), then time queued (so equal
    /// weights are first-come first-served, D5), then id.
    pub fn order_key(&self, now: DateTime<Utc>) -> (std::cmp::Reverse<i128>, DateTime<Utc>, Uuid) {
        (
            std::cmp::Reverse(self.score(now)),
            self.queued_at,
            self.conversation_id,
        )
    }
}

/// One decision: offer `conversation_id` to `agent`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedOffer {
    pub conversation_id: Uuid,
    pub agent: AgentId,
}

/// The pass. `queue` must be in dispatch order ([`Candidate::order_key`]: SPEC D10 score,
/// then earliest queued).
///
/// - D1: no agent gets more offers than their free slots.
/// - D2/D3: so the offers never exceed the cap, and are none without a ready agent.
/// - D4/D6: a conversation no agent with room can take is skipped; the ones behind it go on.
/// - D5: each conversation goes to the suitable agent with room who is least loaded
///   (processing + open offers), then idle longest, then by id (deterministic).
/// - D11: but first, each responsible agent with room gets their customers' conversations
///   (in dispatch order); one they declined or let expire goes to anyone suitable.
pub fn plan(agents: &[AgentLoad], queue: &[Candidate], offer_limit: u32) -> Vec<PlannedOffer> {
    let mut free: Vec<u32> = agents.iter().map(|a| a.free_slots(offer_limit)).collect();
    let mut load: Vec<u32> = agents
        .iter()
        .map(|a| a.processing + a.open_offers)
        .collect();
    let mut left: u32 = free.iter().sum();
    let mut offers = Vec::new();
    // SPEC D11, first: each responsible agent's free slots go to their customers'
    // conversations, in dispatch order, when they can take them (skills, D4).
    let mut placed = vec![false; queue.len()];
    for (k, candidate) in queue.iter().enumerate() {
        let Some(responsible) = candidate.responsible_first() else {
            continue;
        };
        let Some(i) = agents.iter().position(|a| &a.id == responsible) else {
            continue;
        };
        if free[i] > 0 && agents[i].skills.covers(&candidate.required_skills) {
            free[i] -= 1;
            load[i] += 1;
            left -= 1;
            placed[k] = true;
            offers.push(PlannedOffer {
                conversation_id: candidate.conversation_id,
                agent: agents[i].id.clone(),
            });
        }
    }
    // Then everything else, to the best suitable agent with room (a responsible agent who is
    // not ready or full, or who let it expire, no longer holds it).
    for (k, candidate) in queue.iter().enumerate() {
        if left == 0 {
            break;
        }
        if placed[k] || candidate.responsible_only {
            continue;
        }
        let best = agents
            .iter()
            .enumerate()
            .filter(|(i, a)| {
                free[*i] > 0
                    && a.skills.covers(&candidate.required_skills)
                    && !candidate.declined_by.contains(&a.id)
            })
            .min_by_key(|(i, a)| {
                (
                    candidate.expired_for.contains(&a.id),
                    load[*i],
                    a.idle_since,
                    a.id.clone(),
                )
            })
            .map(|(i, _)| i);
        if let Some(i) = best {
            free[i] -= 1;
            load[i] += 1;
            left -= 1;
            offers.push(PlannedOffer {
                conversation_id: candidate.conversation_id,
                agent: agents[i].id.clone(),
            });
        }
    }
    offers
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn agent(id: &str, capacity: u32, processing: u32, skills: &[&str]) -> AgentLoad {
        AgentLoad {
            id: AgentId::parse(id).unwrap(),
            ready: true,
            capacity,
            processing,
            open_offers: 0,
            skills: SkillSet::new(skills),
            idle_since: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
        }
    }

    fn queue(n: usize, skills: &[&str]) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                conversation_id: Uuid::from_u128(i as u128 + 1),
                required_skills: SkillSet::new(skills),
                declined_by: vec![],
                expired_for: vec![],
                weight: 1,
                responsible: None,
                responsible_only: false,
                queued_at: Utc.timestamp_opt(1_700_000_000 + i as i64, 0).unwrap(),
            })
            .collect()
    }

    #[test]
    fn seed_example_five_ready_agents_with_ten_remaining_cap_fifteen() {
        // SPEC D2, 交談佇列 FAQ: 5 ready agents with 10 remaining each -> 15 in assigning.
        let agents: Vec<_> = (0..5)
            .map(|i| agent(&format!("a{i}"), 10, 0, &[]))
            .collect();
        assert_eq!(assigning_cap(&agents, 3), 15);
        assert_eq!(plan(&agents, &queue(100, &[]), 3).len(), 15);
    }

    #[test]
    fn seed_example_one_agent_with_one_remaining_cap_thirteen() {
        // SPEC D2: the same but one agent with 1 remaining -> 4*3+1 = 13.
        let mut agents: Vec<_> = (0..5)
            .map(|i| agent(&format!("a{i}"), 10, 0, &[]))
            .collect();
        agents[4].processing = 9;
        assert_eq!(assigning_cap(&agents, 3), 13);
        let offers = plan(&agents, &queue(100, &[]), 3);
        assert_eq!(offers.len(), 13);
        assert_eq!(
            offers.iter().filter(|o| o.agent.as_str() == "a4").count(),
            1
        );
    }

    #[test]
    fn no_ready_agent_or_all_full_means_cap_zero() {
        // SPEC D3
        let mut not_ready = agent("a", 10, 0, &[]);
        not_ready.ready = false;
        let full = agent("b", 4, 4, &[]);
        let agents = vec![not_ready, full];
        assert_eq!(assigning_cap(&agents, 3), 0);
        assert!(plan(&agents, &queue(5, &[]), 3).is_empty());
    }

    #[test]
    fn a_conversation_nobody_can_take_does_not_hold_up_the_rest() {
        // SPEC D4
        let agents = vec![agent("a", 10, 0, &["english"])];
        let mut q = queue(1, &["日本語"]);
        q.extend(queue(3, &["english"]).into_iter().map(|mut c| {
            c.conversation_id = Uuid::from_u128(c.conversation_id.as_u128() + 100);
            c
        }));
        let offers = plan(&agents, &q, 3);
        assert_eq!(offers.len(), 3);
        assert!(offers
            .iter()
            .all(|o| o.conversation_id != q[0].conversation_id));
    }

    #[test]
    fn least_loaded_then_idle_longest() {
        // SPEC D5
        let busy = agent("busy", 10, 5, &[]);
        let mut idle_long = agent("idle-long", 10, 1, &[]);
        idle_long.idle_since = Utc.timestamp_opt(1_600_000_000, 0).unwrap();
        let idle_short = agent("idle-short", 10, 1, &[]);
        let offers = plan(&[busy, idle_short, idle_long], &queue(1, &[]), 3);
        assert_eq!(offers[0].agent.as_str(), "idle-long");
    }

    #[test]
    fn declined_never_again_and_expired_only_when_no_one_else() {
        let a = agent("a", 10, 0, &[]);
        let b = agent("b", 10, 3, &[]);
        let mut q = queue(1, &[]);
        q[0].declined_by = vec![a.id.clone()];
        assert_eq!(plan(&[a.clone(), b.clone()], &q, 3)[0].agent.as_str(), "b");
        assert!(plan(std::slice::from_ref(&a), &q, 3).is_empty());
        // D8: another suitable agent first, even a busier one...
        let mut q = queue(1, &[]);
        q[0].expired_for = vec![a.id.clone()];
        assert_eq!(plan(&[a.clone(), b], &q, 3)[0].agent.as_str(), "b");
        // ...and the same agent again when nobody else can (D7).
        assert_eq!(plan(std::slice::from_ref(&a), &q, 3)[0].agent.as_str(), "a");
    }

    fn at(secs: i64, micros: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap() + chrono::Duration::microseconds(micros)
    }

    fn queued(id: u128, weight: i32, queued_at: DateTime<Utc>) -> Candidate {
        Candidate {
            conversation_id: Uuid::from_u128(id),
            required_skills: SkillSet::default(),
            declined_by: vec![],
            expired_for: vec![],
            weight,
            queued_at,
            responsible: None,
            responsible_only: false,
        }
    }

    #[test]
    fn the_products_example_urgent_mail_weight_1000() {
        // SPEC D10 (緊急信件轉派): urgent mail, weight 1000, queued after ordinary mail, is
        // served first once it has waited a thousandth of the ordinary mail's wait...
        let ordinary = queued(1, 1, at(0, 0));
        let urgent = queued(2, 1000, at(1, 0));
        let first = |now| {
            let mut q = [ordinary.clone(), urgent.clone()];
            q.sort_by_key(|c| c.order_key(now));
            q[0].conversation_id.as_u128()
        };
        assert_eq!(first(at(3, 0)), 2); // 1000 x 2 s against 1 x 3 s
        assert_eq!(first(at(1, 1_000)), 1); // 1000 x 1 ms against 1 x 1.001 s
        assert_eq!(first(at(1, 1_002)), 2); // 1000 x 1.002 ms against 1 x 1.001002 s

        // ...and ordinary mail that has waited more than 1000 times longer still goes first.
        let old = queued(3, 1, at(-2_000, 0));
        let mut q = [urgent.clone(), old];
        q.sort_by_key(|c| c.order_key(at(2, 0))); // 1 x 2002 s against 1000 x 1 s
        assert_eq!(q[0].conversation_id.as_u128(), 3);
    }

    #[test]
    fn a_score_is_exact_and_never_negative() {
        let c = queued(1, 7, at(10, 0));
        assert_eq!(c.score(at(12, 5)), 7 * 2_000_005);
        assert_eq!(c.score(at(9, 0)), 0, "queued after now by another clock");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// SPEC D10: equal weights give first-come first-served, whatever the instant.
        #[test]
        fn equal_weights_are_first_come_first_served(
            weight in 1i32..2000,
            times in prop::collection::vec(0i64..1_000_000_000, 1..20),
            now in 0i64..2_000_000_000,
        ) {
            let mut q: Vec<Candidate> = times.iter().enumerate()
                .map(|(i, t)| queued(i as u128 + 1, weight, at(0, *t))).collect();
            let now = at(0, now);
            q.sort_by_key(|c| c.order_key(now));
            prop_assert!(q.windows(2).all(|w| (w[0].queued_at, w[0].conversation_id) < (w[1].queued_at, w[1].conversation_id)));
        }

        /// SPEC D10: a heavier conversation overtakes a lighter one exactly when its score
        /// (weight x time waited) passes the other's.
        #[test]
        fn a_heavier_conversation_overtakes_exactly_when_its_score_passes(
            light in 1i32..50, extra in 1i32..2000,
            light_waited in 0i64..10_000_000_000, heavy_waited in 0i64..10_000_000_000,
        ) {
            let heavy_weight = light + extra;
            let now = at(20_000, 0);
            let l = queued(1, light, now - chrono::Duration::microseconds(light_waited));
            let h = queued(2, heavy_weight, now - chrono::Duration::microseconds(heavy_waited));
            let heavy_first = h.order_key(now) < l.order_key(now);
            let (hs, ls) = (i128::from(heavy_weight) * i128::from(heavy_waited), i128::from(light) * i128::from(light_waited));
            let expected = hs > ls || (hs == ls && heavy_waited > light_waited);
            prop_assert_eq!(heavy_first, expected);
        }
    }

    // ---- properties against a reference model ----

    fn arb_agents() -> impl Strategy<Value = Vec<AgentLoad>> {
        prop::collection::vec(
            (
                any::<bool>(),
                0u32..6,
                0u32..6,
                0u32..4,
                prop::collection::vec(0usize..3, 0..3),
                0i64..100,
            ),
            0..8,
        )
        .prop_map(|rows| {
            rows.into_iter()
                .enumerate()
                .map(|(i, (ready, capacity, processing, offers, skills, idle))| {
                    let processing = processing.min(capacity);
                    let names = ["en", "ja", "vip"];
                    let mut a = agent(
                        &format!("a{i}"),
                        capacity,
                        processing,
                        &skills.iter().map(|s| names[*s]).collect::<Vec<_>>(),
                    );
                    a.ready = ready;
                    a.open_offers = offers.min(3.min(capacity - processing));
                    a.idle_since = Utc.timestamp_opt(idle, 0).unwrap();
                    a
                })
                .collect()
        })
    }

    /// Conversations, some with a responsible agent (`a0`..`a7`, SPEC D11), some of those
    /// read only for them, some declined by or expired for their responsible agent.
    fn arb_queue() -> impl Strategy<Value = Vec<Candidate>> {
        let row = (
            prop::collection::vec(0usize..3, 0..2),
            prop::option::weighted(0.4, 0usize..8),
            0u8..6,
        );
        prop::collection::vec(row, 0..30).prop_map(|rows| {
            rows.into_iter()
                .enumerate()
                .map(|(i, (skills, responsible, how))| {
                    let names = ["en", "ja", "vip"];
                    let responsible = responsible.map(|r| AgentId::parse(format!("a{r}")).unwrap());
                    let mut c = Candidate {
                        conversation_id: Uuid::from_u128(i as u128 + 1),
                        required_skills: SkillSet::new(skills.iter().map(|s| names[*s])),
                        declined_by: vec![],
                        expired_for: vec![],
                        weight: 1,
                        responsible: responsible.clone(),
                        responsible_only: responsible.is_some() && how == 0,
                        queued_at: Utc.timestamp_opt(1_700_000_000 + i as i64, 0).unwrap(),
                    };
                    match (responsible, how) {
                        (Some(r), 1) => c.declined_by.push(r),
                        (Some(r), 2) => c.expired_for.push(r),
                        _ => {}
                    }
                    c
                })
                .collect()
        })
    }

    #[test]
    fn the_responsible_agent_first_then_anyone_suitable() {
        // SPEC D11: amy is idle longest, but ben is the customer's responsible agent.
        let mut amy = agent("amy", 10, 0, &[]);
        amy.idle_since = Utc.timestamp_opt(1_600_000_000, 0).unwrap();
        let ben = agent("ben", 10, 2, &[]);
        let mut q = queue(2, &[]);
        q[1].responsible = Some(ben.id.clone());
        let to = |offers: &[PlannedOffer], c: &Candidate| {
            offers
                .iter()
                .find(|o| o.conversation_id == c.conversation_id)
                .map(|o| o.agent.as_str().to_owned())
        };
        let offers = plan(&[amy.clone(), ben.clone()], &q, 3);
        assert_eq!(to(&offers, &q[1]).as_deref(), Some("ben"));
        assert_eq!(to(&offers, &q[0]).as_deref(), Some("amy"));
        // Ben not ready (absent from the ready agents) or full: anyone suitable, at once.
        let offers = plan(std::slice::from_ref(&amy), &q, 3);
        assert_eq!(to(&offers, &q[1]).as_deref(), Some("amy"));
        let mut full = ben.clone();
        full.open_offers = 3;
        let offers = plan(&[amy.clone(), full], &q, 3);
        assert_eq!(to(&offers, &q[1]).as_deref(), Some("amy"));
        // Ben let one offer expire (one dispatch cycle unaccepted): anyone suitable first.
        q[1].expired_for = vec![ben.id.clone()];
        let offers = plan(&[amy.clone(), ben.clone()], &q, 3);
        assert_eq!(to(&offers, &q[1]).as_deref(), Some("amy"));
        // Read only for its responsible agent, who is full: left for a later pass.
        let mut q = queue(1, &[]);
        q[0].responsible = Some(ben.id.clone());
        q[0].responsible_only = true;
        let mut full = ben.clone();
        full.open_offers = 3;
        assert!(plan(&[amy, full], &q, 3).is_empty());
        // A responsible agent without the skills (SPEC D4) is passed over.
        let mut q = queue(1, &["vip"]);
        q[0].responsible = Some(ben.id.clone());
        let mut vip = agent("vic", 10, 5, &["vip"]);
        vip.idle_since = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        assert_eq!(to(&plan(&[ben, vip], &q, 3), &q[0]).as_deref(), Some("vic"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn every_pass_keeps_the_dispatch_rules(agents in arb_agents(), q in arb_queue(), limit in 1u32..4) {
            let offers = plan(&agents, &q, limit);
            let by_id: HashMap<_, _> = agents.iter().map(|a| (a.id.clone(), a)).collect();
            let mut given: HashMap<AgentId, u32> = HashMap::new();
            let mut seen = std::collections::HashSet::new();
            for o in &offers {
                let a = by_id[&o.agent];
                let c = q.iter().find(|c| c.conversation_id == o.conversation_id).unwrap();
                prop_assert!(seen.insert(o.conversation_id), "offered twice");
                prop_assert!(a.ready, "D3: offer to an agent not ready");
                prop_assert!(a.skills.covers(&c.required_skills), "D4: skills");
                *given.entry(o.agent.clone()).or_default() += 1;
            }
            // D1: open offers <= min(limit, capacity - processing)
            for a in &agents {
                let total = a.open_offers + given.get(&a.id).copied().unwrap_or(0);
                if given.contains_key(&a.id) {
                    prop_assert!(total <= limit.min(a.capacity - a.processing), "D1");
                }
            }
            // D2: everything with an offer fits under the cap.
            let open: u32 = agents.iter().map(|a| a.open_offers.min(a.places(limit))).sum();
            prop_assert!(open + offers.len() as u32 <= assigning_cap(&agents, limit), "D2");
            // No idle capacity left behind (D6): no unoffered conversation that an agent
            // with a slot left could take (one read only for its responsible agent aside).
            for c in q.iter().filter(|c| !seen.contains(&c.conversation_id) && !c.responsible_only) {
                for a in &agents {
                    let left = a.free_slots(limit) - given.get(&a.id).copied().unwrap_or(0);
                    prop_assert!(!(left > 0 && a.skills.covers(&c.required_skills) && !c.declined_by.contains(&a.id)),
                        "{} could take {} but it was left waiting", a.id, c.conversation_id);
                }
            }
            // D5 FIFO: an agent never gets a later conversation while an earlier one it could
            // take was left waiting, unless the agent is the later one's responsible (D11).
            for (pos, o) in offers.iter().enumerate() {
                let a = by_id[&o.agent];
                let qpos = q.iter().position(|c| c.conversation_id == o.conversation_id).unwrap();
                let c = &q[qpos];
                prop_assert!(!c.responsible_only || c.responsible_first() == Some(&a.id),
                    "read only for its responsible agent, offered to {}", a.id);
                if c.responsible_first() == Some(&a.id) {
                    continue;
                }
                for earlier in &q[..qpos] {
                    prop_assert!(
                        seen.contains(&earlier.conversation_id) || !a.skills.covers(&earlier.required_skills)
                            || earlier.responsible_only || earlier.declined_by.contains(&a.id),
                        "offer #{pos} skipped an earlier conversation its agent could take"
                    );
                }
            }
            // D11: a responsible agent left with a free slot got every conversation of theirs
            // they could take (not declined, not expired, skills).
            for a in agents.iter().filter(|a| a.free_slots(limit) > given.get(&a.id).copied().unwrap_or(0)) {
                for c in q.iter().filter(|c| c.responsible_first() == Some(&a.id) && a.skills.covers(&c.required_skills)) {
                    prop_assert!(offers.iter().any(|o| o.conversation_id == c.conversation_id && o.agent == a.id),
                        "D11: {} has room but {} went elsewhere or waits", a.id, c.conversation_id);
                }
            }
        }
    }
}
