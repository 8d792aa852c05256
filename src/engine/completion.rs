use std::collections::VecDeque;

/// Which source positions of one partition are resolved, and so how far the
/// partition may be committed.
///
/// A record is registered when read and gets a dense sequence number (the
/// engine's `seq`); it is resolved when its outcome is durable: its turn or
/// dead letter acknowledged by the broker, or a counted drop. The commit
/// position is the end of the contiguous resolved prefix, so it never passes
/// an unresolved record, whatever order the outcomes complete in. Positions
/// are opaque (`P`: a Kafka offset, a Redis entry id, a line number) and may
/// have gaps.
#[derive(Debug, Clone)]
pub struct CompletionTracker<P> {
    /// Sequence number of `pending[0]`.
    base_seq: u64,
    /// Registered records not yet below the resolved prefix.
    pending: VecDeque<(P, bool)>,
    /// The last position of the resolved prefix, if it moved since taken.
    committable: Option<P>,
}

impl<P: Copy> Default for CompletionTracker<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Copy> CompletionTracker<P> {
    pub fn new() -> Self {
        CompletionTracker {
            base_seq: 0,
            pending: VecDeque::new(),
            committable: None,
        }
    }

    /// Registers the next record read (positions in read order) and returns
    /// its sequence number.
    pub fn register(&mut self, position: P) -> u64 {
        self.pending.push_back((position, false));
        self.base_seq + self.pending.len() as u64 - 1
    }

    /// The position of a registered, not yet committed record.
    pub fn position(&self, seq: u64) -> Option<P> {
        let index = seq.checked_sub(self.base_seq)?;
        self.pending.get(index as usize).map(|(p, _)| *p)
    }

    /// Marks a record resolved. Resolving twice, or a sequence number already
    /// below the prefix, is a no-op.
    pub fn resolve(&mut self, seq: u64) {
        let Some(index) = seq.checked_sub(self.base_seq) else {
            return;
        };
        if let Some(entry) = self.pending.get_mut(index as usize) {
            entry.1 = true;
        }
        while let Some(&(position, true)) = self.pending.front() {
            self.pending.pop_front();
            self.base_seq += 1;
            self.committable = Some(position);
        }
    }

    /// The last position of the resolved prefix if it moved since the last
    /// call (Kafka commits the offset after it).
    pub fn take_committable(&mut self) -> Option<P> {
        self.committable.take()
    }

    /// Positions resolved but not yet in the prefix (they wait behind an
    /// unresolved one). A restart from the commit position can skip them if
    /// they are recorded with the commit, so their turns are not re-emitted in
    /// part.
    pub fn resolved_beyond_prefix(&self) -> impl Iterator<Item = P> + '_ {
        self.pending
            .iter()
            .filter(|(_, resolved)| *resolved)
            .map(|(p, _)| *p)
    }

    /// The last position of the resolved prefix as of now (whether or not it
    /// was taken).
    pub fn peek_committable(&self) -> Option<P> {
        self.committable
    }

    /// Records registered and not yet resolved-and-passed.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_waits_for_the_oldest_unresolved_record() {
        let mut t = CompletionTracker::new();
        let a = t.register(10_i64);
        let b = t.register(11);
        let c = t.register(15); // gaps in positions are fine
        t.resolve(c);
        assert_eq!(t.take_committable(), None);
        assert_eq!(t.resolved_beyond_prefix().collect::<Vec<_>>(), vec![15]);
        t.resolve(b);
        assert_eq!(t.take_committable(), None);
        t.resolve(a);
        assert_eq!(t.take_committable(), Some(15));
        assert_eq!(t.take_committable(), None, "taken");
        assert_eq!(t.in_flight(), 0);
        t.resolve(a); // stale: no-op
        let d = t.register(16);
        assert_eq!(t.position(d), Some(16));
        assert_eq!(t.position(a), None);
    }

    proptest! {
        /// The commit position never passes an unresolved record, and reaches
        /// the end once everything is resolved, in any resolution order.
        #[test]
        fn commit_never_passes_an_unresolved_record(order in Just((0..40u64).collect::<Vec<_>>()).prop_shuffle()) {
            let mut t = CompletionTracker::new();
            for position in 0..40u64 {
                t.register(position * 2);
            }
            let mut resolved = [false; 40];
            let mut committed: Option<u64> = None;
            for seq in order {
                t.resolve(seq);
                resolved[seq as usize] = true;
                if let Some(p) = t.take_committable() {
                    committed = Some(p);
                }
                if let Some(p) = committed {
                    let upto = (p / 2) as usize;
                    prop_assert!(resolved[..=upto].iter().all(|r| *r));
                }
            }
            prop_assert_eq!(committed, Some(78));
        }
    }
}
