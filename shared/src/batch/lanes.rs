//! Lanes: a batch's messages grouped by key, run side by side on one transaction, each key's
//! in order; and the lookups a batch's messages share ([`Memo`]).

use std::sync::Arc;

/// The indexes of `items` grouped by `key`, each group in the items' order, the groups in the
/// order of their first item; an item without a key (one that does not decode: it fails
/// alone) is a group of its own. The lanes of [`in_one_transaction`], and of the dispatcher's
/// agent actions.
pub fn lanes<T, K: std::hash::Hash + Eq>(
    items: &[T],
    key: impl Fn(&T) -> Option<K>,
) -> Vec<Vec<usize>> {
    let mut lanes: Vec<Vec<usize>> = Vec::new();
    let mut by_key: std::collections::HashMap<K, usize> = std::collections::HashMap::new();
    for (i, item) in items.iter().enumerate() {
        match key(item) {
            Some(k) => match by_key.entry(k) {
                std::collections::hash_map::Entry::Occupied(e) => lanes[*e.get()].push(i),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(lanes.len());
                    lanes.push(vec![i]);
                }
            },
            None => lanes.push(vec![i]),
        }
    }
    lanes
}

/// Runs `step` for every index of `lanes`: the lanes side by side (on one transaction, their
/// statements pipelined), each lane's indexes one after the other, a lane stopping at its
/// first error. The outputs in index order, as if run one by one; or every lane's error.
pub async fn in_lanes<T, E, F, Fut>(lanes: Vec<Vec<usize>>, step: F) -> Result<Vec<T>, Vec<E>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let step = &step;
    let done = futures::future::join_all(lanes.into_iter().map(|lane| async move {
        let mut out = Vec::with_capacity(lane.len());
        for i in lane {
            out.push((i, step(i).await?));
        }
        Ok(out)
    }))
    .await;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for lane in done {
        match lane {
            Ok(o) => out.extend(o),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, t)| t).collect())
}

/// Lookups shared by a batch's messages: the first message that needs a key's value reads it
/// (in the batch's transaction), the others, in the same lane or another, wait for that read
/// and take its answer. Settings read once per batch rather than once per message: a batch is
/// handled as of one moment, and the statements saved were a third of a message's.
pub struct Memo<K, V> {
    cells: std::sync::Mutex<std::collections::HashMap<K, Arc<tokio::sync::OnceCell<V>>>>,
}

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Self {
            cells: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl<K: std::hash::Hash + Eq, V: Clone> Memo<K, V> {
    /// `key`'s value: read by `read` the first time; a failed read is not remembered.
    pub async fn get<E, F, Fut>(&self, key: K, read: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<V, E>>,
    {
        let cell = self
            .cells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        cell.get_or_try_init(read).await.cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::{in_lanes, lanes, Memo};

    #[test]
    fn lanes_keep_each_keys_order_and_put_keyless_items_alone() {
        let items = ["a1", "b1", "x", "a2", "x", "b2", "a3"];
        let key = |s: &&str| (!s.starts_with('x')).then(|| s.as_bytes()[0]);
        assert_eq!(
            lanes(&items, key),
            vec![vec![0, 3, 6], vec![1, 5], vec![2], vec![4]]
        );
    }

    #[tokio::test]
    async fn in_lanes_returns_outputs_in_index_order_or_every_lanes_error() {
        let lanes = vec![vec![1, 3], vec![0, 2]];
        let out: Result<Vec<usize>, Vec<usize>> =
            in_lanes(lanes.clone(), |i| async move { Ok(i * 10) }).await;
        assert_eq!(out, Ok(vec![0, 10, 20, 30]));
        // Each lane stops at its first error; index 3 is never run after 1 failed.
        let ran = std::sync::Mutex::new(Vec::new());
        let out: Result<Vec<usize>, Vec<usize>> = in_lanes(lanes, |i| {
            ran.lock().unwrap().push(i);
            async move {
                if i == 1 || i == 2 {
                    Err(i)
                } else {
                    Ok(i)
                }
            }
        })
        .await;
        assert_eq!(out, Err(vec![1, 2]));
        assert!(!ran.lock().unwrap().contains(&3));
    }

    #[tokio::test]
    async fn a_memo_reads_a_key_once_for_concurrent_askers_and_forgets_a_failed_read() {
        let memo: Memo<&str, u32> = Memo::default();
        let reads = std::sync::atomic::AtomicU32::new(0);
        let read = |v: u32| {
            let reads = &reads;
            move || async move {
                reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::task::yield_now().await;
                Ok::<_, ()>(v)
            }
        };
        let got = futures::future::join_all((0..5).map(|i| memo.get("a", read(i)))).await;
        // The first asker read; the others, side by side, waited for its answer.
        assert_eq!(got, vec![Ok(0); 5]);
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(memo.get("b", read(7)).await, Ok(7));
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
        // A failed read is not kept: the next asker reads again.
        assert_eq!(
            memo.get("c", || async { Err::<u32, _>("down") }).await,
            Err("down")
        );
        assert_eq!(memo.get("c", read(9)).await, Ok(9));
    }
}
