//! One assigned partition as the loop sees it: its pipeline and idle clock,
//! and the decision what to do with each record the consumer returns
//! ([`PartitionState::admit`]): a record already seen, an offset gap to
//! check, a record an earlier owner resolved (commit metadata), or a record
//! re-read while the partition is rebuilt after a panic. No broker calls
//! here: the loop carries out what `admit` says, so the decisions are unit
//! tested in-process.

use std::collections::HashMap;

use super::offsets::Skip;
use crate::engine::IdleClock;
use crate::metrics::PartitionGauges;
use crate::pipeline::PartitionPipeline;

/// One partition's state (its offsets are in the shared commit trackers).
pub(super) struct PartitionState {
    pub pipeline: PartitionPipeline,
    pub idle: IdleClock,
    /// Distinguishes this incarnation from an earlier one of the same
    /// partition (revoked, then assigned again), so a late delivery of the
    /// earlier one resolves nothing here.
    pub epoch: u64,
    /// The next offset to hand to the pipeline.
    pub next_offset: i64,
    pub gauges: PartitionGauges,
    /// Offsets after the committed one that an earlier owner already resolved
    /// (from the commit metadata), and what to do with them.
    skip: (Skip, Vec<(i64, i64)>),
    /// An offset gap already re-read once (see [`Admit::ReRead`]).
    gap_checked: Option<i64>,
    rebuild: Option<Rebuild>,
}

/// Re-reading a partition after a panic (`docs/semantics.md`, "Panics"):
/// the engine starts over and gets back exactly the records whose outcome
/// was not issued yet (the open sessions), under their old sequence numbers;
/// the other records up to where reading stopped only move the watermark.
#[derive(Debug)]
struct Rebuild {
    /// Offset → sequence number of the records to process again.
    reprocess: HashMap<i64, u64>,
    /// Records that panicked: skipped without decoding.
    panicked: Vec<i64>,
    /// Where first-time reading resumes once the rebuild is done.
    resume: i64,
}

/// Whether the commit metadata's ranges list `offset` as resolved.
fn listed(ranges: &[(i64, i64)], offset: i64) -> bool {
    ranges.iter().any(|(a, b)| (*a..=*b).contains(&offset))
}

/// What to do with a record the consumer returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admit {
    /// Already handed in by this incarnation (or fetched before a seek).
    Stale,
    /// The offsets jumped: seek back to `from` and read again. If the same
    /// record comes first again, the gap is real; if the seek fails, admit
    /// the record again to accept the gap.
    ReRead { from: i64 },
    /// A new record: register and process it. `replayed`: an earlier owner
    /// resolved it, and it is processed again only so its session re-forms
    /// (see [`PartitionPipeline::mark_replayed`]).
    Process { replayed: bool },
    /// A new record an earlier owner resolved, listed completely (`r2`):
    /// register it, let its event time move the watermark, resolve it.
    Observe,
    /// Re-read while rebuilding: process it again under its old `seq`.
    Reprocess { seq: u64, replayed: bool },
    /// Re-read while rebuilding, its outcome already issued: its event time
    /// only.
    ObserveAgain,
    /// Re-read while rebuilding: the record that panicked.
    SkipPanicked,
}

impl PartitionState {
    pub fn new(
        pipeline: PartitionPipeline,
        idle: IdleClock,
        epoch: u64,
        first_offset: i64,
        skip: (Skip, Vec<(i64, i64)>),
        gauges: PartitionGauges,
    ) -> Self {
        PartitionState {
            pipeline,
            idle,
            epoch,
            next_offset: first_offset,
            gauges,
            skip,
            gap_checked: None,
            rebuild: None,
        }
    }

    /// Decides what to do with the record at `offset`, and moves the read
    /// position past it unless it is [`Admit::Stale`] or
    /// [`Admit::ReRead`].
    pub fn admit(&mut self, offset: i64) -> Admit {
        if offset < self.next_offset {
            return Admit::Stale;
        }
        if offset > self.next_offset && self.gap_checked != Some(offset) {
            // Offsets can legitimately jump (compaction, transaction
            // markers), but a rebalance can also drop fetched records on the
            // way to us.
            self.gap_checked = Some(offset);
            return Admit::ReRead {
                from: self.next_offset,
            };
        }
        self.next_offset = offset + 1;
        self.idle.on_record();
        let resolved_before = listed(&self.skip.1, offset);
        if let Some(rebuild) = &mut self.rebuild {
            if offset < rebuild.resume {
                let admit = if let Some(seq) = rebuild.reprocess.remove(&offset) {
                    Admit::Reprocess {
                        seq,
                        replayed: resolved_before,
                    }
                } else if rebuild.panicked.contains(&offset) {
                    Admit::SkipPanicked
                } else {
                    Admit::ObserveAgain
                };
                if self.next_offset >= rebuild.resume {
                    self.rebuild = None;
                }
                return admit;
            }
            self.rebuild = None;
        }
        match (resolved_before, self.skip.0) {
            (true, Skip::Exclude) => Admit::Observe,
            (replayed, _) => Admit::Process { replayed },
        }
    }

    /// After the record at `panicked` panicked (its dead letter already
    /// issued): starts the engine over and sets up the re-read of
    /// `unissued` (sequence number, offset), the records of the open
    /// sessions. Returns the offset to seek to, or `None` when the next
    /// record is the right one already.
    pub fn start_rebuild(
        &mut self,
        panicked: i64,
        unissued: impl IntoIterator<Item = (u64, i64)>,
    ) -> Option<i64> {
        self.pipeline.reset_engine();
        self.idle.on_record();
        let (resume, mut skip) = match self.rebuild.take() {
            Some(r) => (r.resume, r.panicked),
            None => (self.next_offset, Vec::new()),
        };
        skip.push(panicked);
        let reprocess: HashMap<i64, u64> = unissued
            .into_iter()
            .map(|(seq, offset)| (offset, seq))
            .collect();
        // Records before the first open one have their outcomes issued:
        // only their event times would count, so the re-read starts there.
        let from = reprocess.keys().min().copied().unwrap_or(resume);
        let seek = from != self.next_offset;
        self.next_offset = from;
        self.gap_checked = None;
        self.rebuild = (from < resume).then_some(Rebuild {
            reprocess,
            panicked: skip,
            resume,
        });
        seek.then_some(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Decoder;

    fn state(first: i64, skip: (Skip, Vec<(i64, i64)>)) -> PartitionState {
        let config = crate::config::Config::from_toml(
            "source = \"file\"\n[file]\ninput = \"-\"\noutput = \"-\"\ndlq = \"-\"\n",
            Vec::new(),
        )
        .expect("a minimal config");
        let decoder = Decoder::new(config.input_format(), config.decode_limits());
        PartitionState::new(
            PartitionPipeline::new(decoder, config.window_config()),
            IdleClock::new(config.idle_policy()),
            1,
            first,
            skip,
            PartitionGauges::new("test/0"),
        )
    }

    #[test]
    fn a_gap_is_re_read_once_and_then_accepted() {
        let mut s = state(10, (Skip::Replay, vec![]));
        assert_eq!(s.admit(10), Admit::Process { replayed: false });
        assert_eq!(s.admit(10), Admit::Stale, "seen");
        assert_eq!(s.admit(13), Admit::ReRead { from: 11 });
        assert_eq!(s.admit(11), Admit::Process { replayed: false });
        // 13 again right after 11: offset 12 is gone, the gap is real.
        assert_eq!(s.admit(13), Admit::Process { replayed: false });
        assert_eq!(s.admit(20), Admit::ReRead { from: 14 }, "a new gap");
        assert_eq!(s.admit(20), Admit::Process { replayed: false });
        assert_eq!(s.next_offset, 21);
    }

    #[test]
    fn records_listed_in_the_commit_metadata_are_replayed_or_observed() {
        let mut s = state(5, (Skip::Replay, vec![(6, 7)]));
        assert_eq!(s.admit(5), Admit::Process { replayed: false });
        assert_eq!(s.admit(6), Admit::Process { replayed: true });
        assert_eq!(s.admit(7), Admit::Process { replayed: true });
        assert_eq!(s.admit(8), Admit::Process { replayed: false });
        let mut s = state(5, (Skip::Exclude, vec![(6, 6)]));
        assert_eq!(s.admit(5), Admit::Process { replayed: false });
        assert_eq!(s.admit(6), Admit::Observe);
        assert_eq!(s.admit(7), Admit::Process { replayed: false });
    }

    #[test]
    fn a_rebuild_reprocesses_the_open_sessions_and_skips_the_panicked_record() {
        let mut s = state(0, (Skip::Replay, vec![(3, 3)]));
        for offset in 0..6 {
            s.admit(offset);
        }
        // Record 5 panicked; records 1 (seq 1) and 3 (seq 3) were in open
        // sessions, everything else has its outcome issued.
        assert_eq!(s.start_rebuild(5, [(1, 1), (3, 3)]), Some(1));
        assert_eq!(
            s.admit(7),
            Admit::ReRead { from: 1 },
            "fetched before the seek"
        );
        let got: Vec<Admit> = (1..6).map(|o| s.admit(o)).collect();
        assert_eq!(
            got,
            vec![
                Admit::Reprocess {
                    seq: 1,
                    replayed: false
                },
                Admit::ObserveAgain,
                Admit::Reprocess {
                    seq: 3,
                    replayed: true
                },
                Admit::ObserveAgain,
                Admit::SkipPanicked,
            ]
        );
        assert_eq!(
            s.admit(6),
            Admit::Process { replayed: false },
            "reading goes on"
        );
    }

    #[test]
    fn a_panic_with_no_open_session_reads_on_and_a_second_panic_keeps_the_first_skipped() {
        let mut s = state(0, (Skip::Replay, vec![]));
        for offset in 0..3 {
            s.admit(offset);
        }
        assert_eq!(s.start_rebuild(2, []), None, "nothing to re-read");
        assert_eq!(s.admit(3), Admit::Process { replayed: false });
        // Record 3 is open; record 4 panics; while re-reading, record 3
        // panics too.
        s.admit(4);
        assert_eq!(s.start_rebuild(4, [(3, 3)]), Some(3));
        assert_eq!(
            s.admit(3),
            Admit::Reprocess {
                seq: 3,
                replayed: false
            }
        );
        assert_eq!(s.start_rebuild(3, []), Some(5), "on past both");
        assert_eq!(s.admit(5), Admit::Process { replayed: false });
        let mut s = state(0, (Skip::Replay, vec![]));
        for offset in 0..4 {
            s.admit(offset);
        }
        assert_eq!(s.start_rebuild(3, [(0, 0)]), Some(0));
        s.admit(0);
        // Record 0 panics again while re-read; record 1, still to come, is
        // the next one anyway.
        assert_eq!(s.start_rebuild(0, [(1, 1)]), None);
        let got: Vec<Admit> = (1..4).map(|o| s.admit(o)).collect();
        assert_eq!(
            got,
            vec![
                Admit::Reprocess {
                    seq: 1,
                    replayed: false
                },
                Admit::ObserveAgain,
                Admit::SkipPanicked
            ]
        );
    }
}
