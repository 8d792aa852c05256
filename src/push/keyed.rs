//! Per-key order with bounded parallelism: the turns of one session key go
//! out one at a time in the order they were read, different keys in
//! parallel up to `concurrency`. A key whose turn is being retried holds its
//! own slot only, so it never delays another key beyond taking that slot.

use std::collections::{HashMap, HashSet, VecDeque};

#[derive(Debug)]
pub struct Keyed<T> {
    /// Turns not started yet, by key, in read order.
    queues: HashMap<String, VecDeque<T>>,
    /// Keys with queued turns and none in delivery, oldest first.
    ready: VecDeque<String>,
    /// Keys with a turn in delivery.
    active: HashSet<String>,
    queued: usize,
    concurrency: usize,
}

impl<T> Keyed<T> {
    pub fn new(concurrency: usize) -> Keyed<T> {
        Keyed {
            queues: HashMap::new(),
            ready: VecDeque::new(),
            active: HashSet::new(),
            queued: 0,
            concurrency,
        }
    }

    /// Queues a turn behind the key's earlier ones.
    pub fn push(&mut self, key: String, item: T) {
        let queue = self.queues.entry(key.clone()).or_default();
        if queue.is_empty() && !self.active.contains(&key) {
            self.ready.push_back(key);
        }
        queue.push_back(item);
        self.queued += 1;
    }

    /// The next turn to start, if a slot is free and a key is ready; its
    /// key counts as in delivery until [`Keyed::done`].
    pub fn start(&mut self) -> Option<(String, T)> {
        if self.active.len() >= self.concurrency {
            return None;
        }
        let key = self.ready.pop_front()?;
        let queue = self.queues.get_mut(&key).expect("a ready key has a queue");
        let item = queue.pop_front().expect("a ready key has a turn");
        if queue.is_empty() {
            self.queues.remove(&key);
        }
        self.queued -= 1;
        self.active.insert(key.clone());
        Some((key, item))
    }

    /// The key's turn in delivery has its outcome: its next turn may start.
    pub fn done(&mut self, key: &str) {
        if self.active.remove(key) && self.queues.contains_key(key) {
            self.ready.push_back(key.to_owned());
        }
    }

    /// Turns queued and in delivery.
    pub fn len(&self) -> usize {
        self.queued + self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every queued turn, for dropping at shutdown.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.ready.clear();
        self.queued = 0;
        self.queues.drain().flat_map(|(_, q)| q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_turn_per_key_at_a_time_in_order_and_keys_in_parallel() {
        let mut k = Keyed::new(2);
        k.push("a".into(), 1);
        k.push("a".into(), 2);
        k.push("b".into(), 3);
        k.push("c".into(), 4);
        assert_eq!(k.start(), Some(("a".into(), 1)));
        assert_eq!(k.start(), Some(("b".into(), 3)));
        assert_eq!(k.start(), None, "two slots");
        // a's turn 1 still retrying: b finishes, c (not a's turn 2) starts.
        k.done("b");
        assert_eq!(k.start(), Some(("c".into(), 4)));
        assert_eq!(k.start(), None);
        k.done("a");
        assert_eq!(k.start(), Some(("a".into(), 2)));
        k.done("a");
        k.done("c");
        assert_eq!(k.start(), None);
        assert!(k.is_empty());
    }

    #[test]
    fn a_turn_read_while_its_key_is_in_delivery_waits_for_it() {
        let mut k = Keyed::new(4);
        k.push("a".into(), 1);
        assert_eq!(k.start(), Some(("a".into(), 1)));
        k.push("a".into(), 2);
        assert_eq!(k.start(), None, "a is in delivery");
        assert_eq!(k.len(), 2);
        k.done("a");
        assert_eq!(k.start(), Some(("a".into(), 2)));
    }
}
