//! Commit points: which offsets of a partition are resolved, what to commit
//! and with which metadata (`docs/kafka.md`, "Commits"), and how a commit
//! stall shows in the metrics and `/readyz`.

use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::error::KafkaResult;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Mutex;

use super::context::{Tp, WorkerContext};
use super::offsets::{self, Skip};
use super::worker::WorkerError;
use crate::engine::CompletionTracker;
use crate::metrics::{self, FailingMark};

/// Which offsets of a partition are resolved. Lives in [`Shared`] because a
/// revoke must commit exactly what is resolved at that moment.
pub(super) struct Tracked {
    /// This incarnation of the partition (see [`PartitionState::epoch`]).
    pub(super) epoch: u64,
    pub(super) tracker: CompletionTracker<i64>,
    /// The first offset read: the commit position while nothing is resolved.
    pub(super) start_offset: i64,
    /// What was last committed, to skip commits that change nothing.
    pub(super) last_commit: Option<(i64, String)>,
    /// Since when the commit has been pulled back behind the resolved
    /// prefix's end (see [`Tracked::commit_point`]).
    pub(super) pulled_back_since: Option<i64>,
    /// Whether the commit point has stopped advancing with records
    /// unresolved behind it (for `/readyz` and the gauge).
    pub(super) stall: CommitStall,
}

/// How long a partition's commit point has not advanced while records wait
/// behind it: exported per partition, and past `kafka.commit_stall` the
/// partition counts as failing for `/readyz` (a missing DLQ topic once froze
/// commits with nothing in the metrics or `/readyz`).
pub(super) struct CommitStall {
    /// The last offset the broker confirmed as committed.
    pub(super) confirmed: Option<i64>,
    /// Since when records have waited behind it.
    pub(super) since: Option<i64>,
    pub(super) mark: FailingMark,
    pub(super) gauge: ::metrics::Gauge,
    /// Records read past the confirmed offset (what a crash replays).
    pub(super) lag: ::metrics::Gauge,
}

impl CommitStall {
    pub(super) fn new(tp: &Tp, after_ms: i64) -> Self {
        let partition = format!("{}/{}", tp.0, tp.1);
        CommitStall {
            confirmed: None,
            since: None,
            mark: FailingMark::after(after_ms),
            gauge: metrics::commit_stalled(&partition),
            lag: metrics::commit_lag(&partition),
        }
    }

    /// The broker confirmed `offset` as committed. Progress is what the
    /// broker confirmed, not what was asked: a commit that keeps failing is a
    /// stall too.
    pub(super) fn confirmed(&mut self, offset: i64) {
        if self.confirmed != Some(offset) {
            self.confirmed = Some(offset);
            self.clear();
        }
    }

    /// On every tick: whether records wait behind the confirmed offset.
    pub(super) fn observe(&mut self, waiting: bool, now_ms: i64) {
        if !waiting {
            self.clear();
            return;
        }
        let since = *self.since.get_or_insert(now_ms);
        self.mark.failed(now_ms);
        self.gauge.set((now_ms - since) as f64 / 1000.0);
    }
}

impl CommitStall {
    pub(super) fn clear(&mut self) {
        self.since = None;
        self.mark.ok();
        self.gauge.set(0.0);
    }
}

impl Drop for CommitStall {
    fn drop(&mut self) {
        self.gauge.set(0.0);
        self.lag.set(0.0);
    }
}

impl Tracked {
    pub(super) fn new(tp: &Tp, epoch: u64, start_offset: i64, commit_stall_ms: i64) -> Self {
        Tracked {
            epoch,
            tracker: CompletionTracker::new(),
            start_offset,
            last_commit: None,
            pulled_back_since: None,
            stall: CommitStall::new(tp, commit_stall_ms),
        }
    }

    /// The offset to commit and its metadata (the resolved offsets past it;
    /// `docs/semantics.md`, "Kafka commits"). Where the broker keeps commit
    /// metadata and the list fits, that is the end of the resolved prefix.
    /// Otherwise the commit is pulled back to the first record of a turn
    /// that reaches past it (see [`CompletionTracker::hold`]), so a replay
    /// re-forms whole turns; overlapping turns can chain that back without
    /// end, so after `max_pullback_ms` the commit moves to the prefix's end.
    pub(super) fn commit_point(
        &mut self,
        tp: &Tp,
        now_ms: i64,
        policy: CommitPolicy,
    ) -> (i64, String) {
        let prefix = self.tracker.prefix_end(self.start_offset, |last| last + 1);
        if policy.metadata_kept {
            let (metadata, complete) =
                offsets::encode(Skip::Exclude, prefix, self.tracker.resolved_beyond_prefix());
            if complete {
                self.tracker.release_holds();
                self.pulled_back_since = None;
                return (prefix, metadata);
            }
        }
        let mut offset = prefix;
        match self.tracker.held_from().filter(|held| *held < prefix) {
            Some(held) => {
                let since = *self.pulled_back_since.get_or_insert(now_ms);
                if now_ms - since < policy.max_pullback_ms {
                    offset = held;
                } else {
                    tracing::info!(topic = %tp.0, partition = tp.1, from = held, to = prefix, "commit pulled back for kafka.max_pullback; moved to the resolved prefix's end");
                    metrics::pullback_released(&format!("{}/{}", tp.0, tp.1));
                    self.tracker.release_holds();
                    self.pulled_back_since = None;
                }
            }
            None => self.pulled_back_since = None,
        }
        let (metadata, _) =
            offsets::encode(Skip::Replay, offset, self.tracker.resolved_beyond_prefix());
        (offset, metadata)
    }
}

/// What decides a commit point besides the partition's own state.
#[derive(Debug, Clone, Copy)]
pub(super) struct CommitPolicy {
    /// The broker gave back the metadata of a commit (see [`probe_metadata`]).
    pub(super) metadata_kept: bool,
    /// `kafka.max_pullback`.
    pub(super) max_pullback_ms: i64,
}

/// Sends the transaction's offsets, commits it and opens the next one.
pub(super) fn commit_transaction<X: ConsumerContext, K: Consumer<X>>(
    producer: &FutureProducer,
    consumer: &K,
    offsets: &TopicPartitionList,
    in_txn: &Mutex<bool>,
) -> Result<(), WorkerError> {
    let timeout = Duration::from_secs(30);
    let mut open = in_txn.lock().expect("not poisoned");
    if !*open {
        return Ok(());
    }
    if offsets.count() > 0 {
        let metadata = consumer.group_metadata().ok_or(WorkerError::Transaction {
            step: "group metadata",
            source: KafkaError::Canceled,
        })?;
        producer
            .send_offsets_to_transaction(offsets, &metadata, timeout)
            .map_err(|source| WorkerError::Transaction {
                step: "send offsets",
                source,
            })?;
    }
    producer
        .commit_transaction(timeout)
        .map_err(|source| WorkerError::Transaction {
            step: "commit",
            source,
        })?;
    *open = false;
    producer
        .begin_transaction()
        .map_err(|source| WorkerError::Transaction {
            step: "begin",
            source,
        })?;
    *open = true;
    Ok(())
}

/// A periodic commit's result, with what reading it back showed (the first
/// time only; see [`probe_metadata`]).
pub(super) struct CommitDone {
    pub(super) offsets: TopicPartitionList,
    pub(super) result: KafkaResult<()>,
    pub(super) metadata_kept: Option<bool>,
}

/// Reads back the commit of `offsets`, just confirmed, and says whether the
/// broker kept its metadata (Kafka does; `tansu` 0.6 gives back an empty
/// string). Every commit the worker writes has metadata, so metadata that is
/// not ours means the broker dropped it.
pub(super) fn probe_metadata<X: ConsumerContext, K: Consumer<X>>(
    consumer: &K,
    offsets: &TopicPartitionList,
) -> KafkaResult<bool> {
    let mut list = TopicPartitionList::new();
    for e in offsets.elements() {
        list.add_partition(e.topic(), e.partition());
    }
    let read = consumer.committed_offsets(list, Duration::from_secs(10))?;
    Ok(read
        .elements()
        .iter()
        .any(|e| offsets::is_ours(e.metadata())))
}

/// The offsets after the group's committed offset that an earlier owner
/// already resolved, from the commit metadata (see [`offsets`]).
pub(super) fn resolved_by_earlier_owner(
    consumer: &StreamConsumer<WorkerContext>,
    tp: &Tp,
) -> (Skip, Vec<(i64, i64)>) {
    let mut list = TopicPartitionList::new();
    list.add_partition(&tp.0, tp.1);
    match consumer.committed_offsets(list, Duration::from_secs(10)) {
        Ok(committed) => committed
            .find_partition(&tp.0, tp.1)
            .and_then(|e| match e.offset() {
                Offset::Offset(offset) => Some(offsets::decode(offset, e.metadata())),
                _ => None,
            })
            .unwrap_or((Skip::Replay, Vec::new())),
        Err(e) => {
            tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, "cannot read the commit metadata; resolved records past the commit are replayed");
            (Skip::Replay, Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const KEPT: CommitPolicy = CommitPolicy {
        metadata_kept: true,
        max_pullback_ms: 1_000,
    };
    const DROPPED: CommitPolicy = CommitPolicy {
        metadata_kept: false,
        max_pullback_ms: 1_000,
    };

    /// Offsets 100..106 read; a turn of 100 and 103 delivered, 101 a drop;
    /// 102 still in an open session; 104 a dead letter delivered.
    fn tracked() -> (Tp, Tracked) {
        let tp: Tp = (Arc::from("chat"), 0);
        let mut t = Tracked::new(&tp, 1, 100, 60_000);
        let s: Vec<u64> = (100..106).map(|o| t.tracker.register(o)).collect();
        t.tracker.hold(s[0], s[3]);
        for i in [0, 1, 3, 4] {
            t.tracker.resolve(s[i]);
        }
        (tp, t)
    }

    #[test]
    fn with_metadata_kept_the_commit_is_the_prefix_end_with_every_resolved_offset_past_it() {
        let (tp, mut t) = tracked();
        let (offset, metadata) = t.commit_point(&tp, 0, KEPT);
        assert_eq!(
            offset, 102,
            "the resolved prefix ends before the open record"
        );
        assert_eq!(
            offsets::decode(offset, &metadata),
            (Skip::Exclude, vec![(103, 104)]),
            "the next owner leaves out 103 and 104 and processes 102 and 105"
        );
    }

    #[test]
    fn without_metadata_the_commit_is_pulled_back_to_the_turn_start_for_max_pullback() {
        let (tp, mut t) = tracked();
        let (offset, metadata) = t.commit_point(&tp, 0, DROPPED);
        assert_eq!(offset, 100, "resuming at 102 would re-send 103 without 100");
        assert_eq!(offsets::decode(offset, &metadata).0, Skip::Replay);
        assert_eq!(t.commit_point(&tp, 999, DROPPED).0, 100, "still held");
        assert_eq!(
            t.commit_point(&tp, 1_000, DROPPED).0,
            102,
            "after kafka.max_pullback it moves to the prefix end"
        );
        assert_eq!(
            t.commit_point(&tp, 1_001, DROPPED).0,
            102,
            "released for good"
        );
    }
}
