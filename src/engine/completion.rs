use std::collections::VecDeque;

/// Which source positions of one partition are resolved, and so how far the
/// partition may be committed.
///
/// A record is registered when read and gets a dense sequence number (the
/// engine's `seq`); it is issued when the pipeline hands out its outcome,
/// and resolved when that outcome is durable: its turn or dead letter
/// acknowledged by the broker, or a counted drop. The records read and not
/// yet issued are exactly those in open sessions, which is what a rebuild
/// after a panic re-reads ([`Self::unissued`]). The commit
/// position is the end of the contiguous resolved prefix, so it never passes
/// an unresolved record, whatever order the outcomes complete in. Positions
/// are opaque (`P`: a Kafka offset, a Redis entry id, a line number) and may
/// have gaps.
#[derive(Debug, Clone)]
pub struct CompletionTracker<P> {
    /// Sequence number of `pending[0]`.
    base_seq: u64,
    /// Registered records not yet below the resolved prefix.
    pending: VecDeque<(P, Progress)>,
    /// The last position of the resolved prefix, if it moved since taken.
    committable: Option<P>,
    /// Resolved outcomes spanning several records, as (seq of the first
    /// record, its position, seq of the last), while a restart could still
    /// land inside them.
    holds: Vec<(u64, P, u64)>,
}

/// How far one record has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Progress {
    Read,
    Issued,
    Resolved,
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
            holds: Vec::new(),
        }
    }

    /// Registers the next record read (positions in read order) and returns
    /// its sequence number.
    pub fn register(&mut self, position: P) -> u64 {
        self.pending.push_back((position, Progress::Read));
        self.base_seq + self.pending.len() as u64 - 1
    }

    /// The position of a registered, not yet committed record.
    pub fn position(&self, seq: u64) -> Option<P> {
        let index = seq.checked_sub(self.base_seq)?;
        self.pending.get(index as usize).map(|(p, _)| *p)
    }

    /// Marks a record's outcome handed out (on its way to durable output).
    /// A no-op for a record already issued or resolved.
    pub fn issue(&mut self, seq: u64) {
        if let Some(entry) = self.entry(seq) {
            entry.1 = entry.1.max(Progress::Issued);
        }
    }

    /// Marks a record resolved, and returns its position if it was not
    /// resolved before. Resolving twice, or a sequence number already below
    /// the prefix, is a no-op.
    pub fn resolve(&mut self, seq: u64) -> Option<P> {
        let entry = self.entry(seq)?;
        if entry.1 == Progress::Resolved {
            return None;
        }
        entry.1 = Progress::Resolved;
        let position = entry.0;
        while let Some(&(position, Progress::Resolved)) = self.pending.front() {
            self.pending.pop_front();
            self.base_seq += 1;
            self.committable = Some(position);
        }
        Some(position)
    }

    fn entry(&mut self, seq: u64) -> Option<&mut (P, Progress)> {
        let index = seq.checked_sub(self.base_seq)?;
        self.pending.get_mut(usize::try_from(index).ok()?)
    }

    /// The records read whose outcome is not issued yet, in read order: the
    /// records of the open sessions.
    pub fn unissued(&self) -> impl Iterator<Item = (u64, P)> + '_ {
        self.pending
            .iter()
            .enumerate()
            .filter(|(_, (_, progress))| *progress == Progress::Read)
            .map(|(i, (p, _))| (self.base_seq + i as u64, *p))
    }

    /// The last position of the resolved prefix if it moved since the last
    /// call (Kafka commits the offset after it).
    pub fn take_committable(&mut self) -> Option<P> {
        self.committable.take()
    }

    /// Records that one outcome spans the records from `first_seq` to
    /// `last_seq` (a turn; a duplicate and the session holding its
    /// original). A restart must not resume strictly inside that span: it
    /// would re-emit the outcome in part, a turn missing its first messages
    /// under a new `turn_id`, or a duplicate without its original. Call it
    /// before resolving the outcome's records.
    pub fn hold(&mut self, first_seq: u64, last_seq: u64) {
        if last_seq > first_seq {
            if let Some(first) = self.position(first_seq) {
                self.holds.push((first_seq, first, last_seq));
            }
        }
    }

    /// Where a restart must resume, when holds put it before the end of the
    /// resolved prefix: the first record of the earliest outcome that the
    /// prefix's end, or an earlier resume point, falls inside (one pulled
    /// back point can land inside another outcome, so this repeats). The
    /// replay then re-forms whole outcomes, re-emitted with the same
    /// `turn_id`. `None`: resume at the prefix's end.
    pub fn held_from(&mut self) -> Option<P> {
        let mut resume = self.base_seq;
        let mut position = None;
        loop {
            let inside = self
                .holds
                .iter()
                .filter(|(first, _, last)| *first < resume && resume <= *last)
                .min_by_key(|(first, _, _)| *first);
            match inside {
                Some(&(first, first_position, _)) => {
                    resume = first;
                    position = Some(first_position);
                }
                None => break,
            }
        }
        // Resume points only move forward (a new hold's records were
        // unresolved, so it starts at or after this one): older holds that
        // end before it can never matter again.
        self.holds.retain(|(_, _, last)| *last >= resume);
        position
    }

    /// Forgets the holds that the prefix's end falls inside: the caller
    /// resumes there from now on (the resolved records past it are recorded
    /// elsewhere, or a bounded pull-back gave up; see `docs/semantics.md`,
    /// "Kafka commits"). Holds of outcomes wholly past the prefix stay.
    pub fn release_holds(&mut self) {
        let base = self.base_seq;
        self.holds.retain(|(first, _, _)| *first >= base);
    }

    /// Where a restart must resume: after the resolved prefix (`next` of its
    /// last position; `start` while nothing is resolved), or earlier where
    /// [`Self::held_from`] says a resolved outcome reaches past it.
    pub fn resume_point(&mut self, start: P, next: impl Fn(P) -> P) -> P
    where
        P: Ord,
    {
        let prefix = self.prefix_end(start, next);
        self.held_from().map_or(prefix, |held| held.min(prefix))
    }

    /// The position after the resolved prefix (`next` of its last position;
    /// `start` while nothing is resolved), ignoring holds.
    pub fn prefix_end(&self, start: P, next: impl Fn(P) -> P) -> P {
        self.peek_committable().map_or(start, next)
    }

    /// Positions resolved but not yet in the prefix (they wait behind an
    /// unresolved one). A restart from the commit position can skip them if
    /// they are recorded with the commit, so their turns are not re-emitted in
    /// part.
    pub fn resolved_beyond_prefix(&self) -> impl Iterator<Item = P> + '_ {
        self.pending
            .iter()
            .filter(|(_, progress)| *progress == Progress::Resolved)
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
    fn a_hold_keeps_the_resume_point_at_the_start_of_its_outcome() {
        let mut t = CompletionTracker::new();
        let seqs: Vec<u64> = (100..106_i64).map(|p| t.register(p)).collect();
        // A turn of records 0, 1 and 3 resolves; 2 is still in an open one.
        t.hold(seqs[0], seqs[3]);
        for s in [seqs[0], seqs[1], seqs[3]] {
            t.resolve(s);
        }
        assert_eq!(t.peek_committable(), Some(101));
        assert_eq!(
            t.held_from(),
            Some(100),
            "resuming at 102 would re-emit record 103 alone"
        );
        t.resolve(seqs[2]);
        assert_eq!(t.peek_committable(), Some(103));
        assert_eq!(t.held_from(), None, "the whole turn is in the prefix now");
        // A hold of one record is no hold.
        t.hold(seqs[4], seqs[4]);
        assert_eq!(t.held_from(), None);
    }

    #[test]
    fn a_pulled_back_resume_point_inside_another_turn_moves_to_its_start() {
        let mut t = CompletionTracker::new();
        let s: Vec<u64> = (0..8_i64).map(|p| t.register(p)).collect();
        // Turn A: records 0 and 3. Turn B: records 2 and 6. Record 7 open.
        t.hold(s[0], s[3]);
        t.hold(s[2], s[6]);
        for i in [0, 1, 3, 4, 5, 2, 6] {
            t.resolve(s[i]);
        }
        assert_eq!(t.peek_committable(), Some(6));
        // The prefix ends inside nothing, but record 7 is open: resume at 7.
        assert_eq!(t.held_from(), None);
        let mut t = CompletionTracker::new();
        let s: Vec<u64> = (0..8_i64).map(|p| t.register(p)).collect();
        t.hold(s[0], s[3]);
        t.hold(s[2], s[6]);
        for i in [0, 1, 3, 4, 2, 6] {
            t.resolve(s[i]);
        }
        // Record 5 is open: resuming at 5 would split B (2, 6); B's start is
        // inside A (0, 3), so the replay must start at A's first record.
        assert_eq!(t.peek_committable(), Some(4));
        assert_eq!(t.held_from(), Some(0));
    }

    #[test]
    fn released_holds_let_the_resume_point_reach_the_prefix_end() {
        let mut t = CompletionTracker::new();
        let s: Vec<u64> = (0..8_i64).map(|p| t.register(p)).collect();
        // Turn A: 0 and 3, resolved; record 2 open; turn C: 5 and 7,
        // resolved; record 6 open.
        t.hold(s[0], s[3]);
        t.hold(s[5], s[7]);
        for i in [0, 1, 3, 5, 7] {
            t.resolve(s[i]);
        }
        assert_eq!(t.resume_point(0, |p| p + 1), 0, "held at A's start");
        t.release_holds();
        assert_eq!(t.resume_point(0, |p| p + 1), 2, "A's hold is gone");
        // C lies wholly past the prefix: its hold still counts once the
        // prefix ends inside it.
        t.resolve(s[2]);
        t.resolve(s[4]);
        assert_eq!(t.prefix_end(0, |p| p + 1), 6);
        assert_eq!(t.resume_point(0, |p| p + 1), 5, "held at C's start");
    }

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
        assert_eq!(t.resolve(a), None, "stale: no-op");
        let d = t.register(16);
        assert_eq!(t.position(d), Some(16));
        assert_eq!(t.position(a), None);
    }

    #[test]
    fn unissued_records_are_those_without_an_outcome_yet() {
        let mut t = CompletionTracker::new();
        let s: Vec<u64> = (10..15_i64).map(|p| t.register(p)).collect();
        t.issue(s[1]);
        t.issue(s[3]);
        assert_eq!(t.resolve(s[3]), Some(13));
        assert_eq!(t.resolve(s[3]), None, "once");
        t.issue(s[3]); // an issue after the resolve changes nothing
        assert_eq!(
            t.unissued().collect::<Vec<_>>(),
            vec![(s[0], 10), (s[2], 12), (s[4], 14)]
        );
        assert_eq!(t.resolve(s[0]), Some(10));
        assert_eq!(t.unissued().next(), Some((s[2], 12)));
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
