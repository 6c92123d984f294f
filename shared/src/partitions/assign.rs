//! Which live instance reads which partition: a pure function of the partition names and the
//! live instances, so that every instance, given the same list, computes the same deal
//! without talking to the others (docs/ordering.md).
//!
//! Rendezvous hashing with quotas: each instance is given a quota (the partitions divided
//! evenly, the remainder one each to the instances that rank first), and each partition goes
//! to the instance that ranks highest for it (a hash of the pair) among those with room left.
//! The deal is even (quotas differ by at most one) and moves few partitions when an instance
//! joins or leaves: most partitions keep their first choice.

use std::collections::BTreeMap;

/// The owner of each of `partitions` among `live` (names of instances; duplicates and order do
/// not matter). Empty when no instance is live.
pub fn assign<'p, 'i>(partitions: &[&'p str], live: &[&'i str]) -> BTreeMap<&'p str, &'i str> {
    let mut instances: Vec<&'i str> = live.to_vec();
    instances.sort_unstable();
    instances.dedup();
    let mut owners = BTreeMap::new();
    if instances.is_empty() {
        return owners;
    }
    let n = instances.len();
    let (each, extra) = (partitions.len() / n, partitions.len() % n);
    // The remainder goes to the instances that rank first by their own hash.
    let mut by_rank: Vec<usize> = (0..n).collect();
    by_rank.sort_by_key(|&i| std::cmp::Reverse(score(instances[i], "")));
    let mut room = vec![each; n];
    for &i in by_rank.iter().take(extra) {
        room[i] += 1;
    }
    // Partitions in the order of how strongly they prefer their first choice, so that the
    // quotas bend the weakest preferences.
    let mut ranked: Vec<(&'p str, Vec<usize>)> = partitions
        .iter()
        .map(|&p| {
            let mut choices: Vec<usize> = (0..n).collect();
            choices.sort_by_key(|&i| std::cmp::Reverse(score(instances[i], p)));
            (p, choices)
        })
        .collect();
    ranked.sort_by_key(|(p, choices)| std::cmp::Reverse((score(instances[choices[0]], p), *p)));
    for (p, choices) in ranked {
        if let Some(&i) = choices.iter().find(|&&i| room[i] > 0) {
            room[i] -= 1;
            owners.insert(p, instances[i]);
        }
    }
    owners
}

/// The rank of `instance` for `partition`: FNV-1a of both, mixed (splitmix64's finalizer), so
/// that similar names give unrelated ranks. Stable across builds and platforms.
fn score(instance: &str, partition: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in instance.bytes().chain([0xff]).chain(partition.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    fn loads<'a>(owners: &BTreeMap<&'a str, &'a str>, live: &[&'a str]) -> Vec<usize> {
        live.iter()
            .map(|i| owners.values().filter(|o| *o == i).count())
            .collect()
    }

    #[test]
    fn sixty_four_partitions_over_two_three_and_seven_instances_are_dealt_evenly() {
        let partitions = names("ingest-p", 64);
        let partitions: Vec<&str> = partitions.iter().map(String::as_str).collect();
        for n in [1, 2, 3, 7] {
            let live = names("instance-", n);
            let live: Vec<&str> = live.iter().map(String::as_str).collect();
            let owners = assign(&partitions, &live);
            assert_eq!(owners.len(), 64);
            let loads = loads(&owners, &live);
            let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
            assert!(max - min <= 1, "{n} instances: {loads:?}");
        }
        assert!(assign(&partitions, &[]).is_empty());
    }

    proptest! {
        /// Every partition has exactly one owner, a live one, the deal is even, and every
        /// instance computes the same deal whatever order it lists the instances in.
        #[test]
        fn every_partition_has_one_live_owner_and_the_deal_is_even(
            n_partitions in 1usize..200,
            ids in proptest::collection::vec("[a-f0-9]{4,12}", 1..9),
        ) {
            let partitions = names("p", n_partitions);
            let partitions: Vec<&str> = partitions.iter().map(String::as_str).collect();
            let live: Vec<&str> = ids.iter().map(String::as_str).collect();
            let owners = assign(&partitions, &live);
            prop_assert_eq!(owners.len(), n_partitions);
            prop_assert!(owners.values().all(|o| live.contains(o)));
            let mut distinct = live.clone();
            distinct.sort_unstable();
            distinct.dedup();
            let loads = loads(&owners, &distinct);
            let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
            prop_assert!(max - min <= 1, "{:?}", loads);
            let mut reversed = live.clone();
            reversed.reverse();
            prop_assert_eq!(&assign(&partitions, &reversed), &owners);
        }

        /// When one more instance joins, most partitions stay where they were: at most about
        /// twice its fair share move (a plain modulo deal would move nearly all).
        #[test]
        fn a_joining_instance_moves_few_partitions(
            ids in proptest::collection::hash_set("[a-f0-9]{6}", 2..7),
        ) {
            let partitions = names("bot-router-p", 64);
            let partitions: Vec<&str> = partitions.iter().map(String::as_str).collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let (before, joined) = ids.split_at(ids.len() - 1);
            let old = assign(&partitions, before);
            let new = assign(&partitions, &ids);
            let moved = partitions.iter().filter(|p| old[*p] != new[*p]).count();
            let fair = 64 / ids.len() + 1;
            prop_assert!(moved <= 2 * fair, "{} moved, fair share {}", moved, fair);
            prop_assert!(new.values().any(|o| *o == joined[0]));
        }
    }
}
