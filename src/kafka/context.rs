//! What the consumer's callbacks share with the loop: rebalance events,
//! the partitions' commit trackers (a revoke commits what is resolved at that
//! moment), the transactional producer and refused logins.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::commit::{commit_transaction, CommitPolicy, Tracked};
use crate::metrics;
use crate::wall_clock::now_ms;

/// A topic-partition.
pub(super) type Tp = (Arc<str>, i32);

/// What the rebalance callbacks tell the loop.
#[derive(Debug)]
pub(super) enum Rebalanced {
    Assigned(Vec<Tp>),
    Revoked(Vec<Tp>),
}

/// State shared between the loop and the consumer's rebalance callbacks.
/// librdkafka runs the callbacks inside `recv`, on the loop's own task, so the
/// locks are never contended; they only make the sharing explicit.
#[derive(Default)]
pub(super) struct Shared {
    /// `kafka.max_pullback`.
    pub(super) max_pullback_ms: i64,
    /// Whether the broker keeps commit metadata: unknown (`None`) until the
    /// first confirmed commit is read back.
    pub(super) metadata_kept: Mutex<Option<bool>>,
    pub(super) tracked: Mutex<HashMap<Tp, Tracked>>,
    pub(super) events: Mutex<Vec<Rebalanced>>,
    /// The transactional producer, in exactly-once mode: a revoke commits the
    /// open transaction before the partitions go.
    pub(super) transactional: Mutex<Option<(FutureProducer, Arc<Mutex<bool>>)>>,
    /// The last authentication failure librdkafka reported.
    pub(super) refused: Mutex<Option<String>>,
}

impl Shared {
    /// The commit points of `which` partitions (all when `None`) that changed
    /// since the last commit; marks them committed (see
    /// [`Self::commit_failed`]).
    pub(super) fn take_commit_points(&self, which: Option<&[Tp]>) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        let policy = CommitPolicy {
            metadata_kept: self.metadata_kept() == Some(true),
            max_pullback_ms: self.max_pullback_ms,
        };
        let now = now_ms();
        let mut tracked = self.tracked.lock().expect("not poisoned");
        for (tp, t) in tracked.iter_mut() {
            if which.is_some_and(|w| !w.contains(tp)) {
                continue;
            }
            let point = t.commit_point(tp, now, policy);
            if t.last_commit.as_ref() == Some(&point) {
                continue;
            }
            tracing::debug!(topic = %tp.0, partition = tp.1, offset = point.0, in_flight = t.tracker.in_flight(), "commit point");
            let mut elem = list.add_partition(&tp.0, tp.1);
            elem.set_offset(Offset::Offset(point.0))
                .expect("a concrete offset");
            elem.set_metadata(&point.1);
            t.last_commit = Some(point);
        }
        list
    }

    pub(super) fn metadata_kept(&self) -> Option<bool> {
        *self.metadata_kept.lock().expect("not poisoned")
    }

    /// What reading back a confirmed commit showed (see [`probe_metadata`]).
    pub(super) fn learned_metadata_kept(&self, kept: bool) {
        let mut known = self.metadata_kept.lock().expect("not poisoned");
        if known.is_none() {
            if kept {
                tracing::info!("the broker keeps commit metadata: each partition commits the end of its resolved prefix");
            } else {
                tracing::warn!("the broker does not keep commit metadata: a commit is pulled back to the start of a turn that spans it, for up to kafka.max_pullback (docs/semantics.md, \"Kafka commits\")");
            }
            *known = Some(kept);
        }
    }

    /// The outcome of committing `offsets`: confirmed, they are each
    /// partition's progress ([`CommitStall`]); failed, they are committed
    /// again at the next interval, even if nothing changed meanwhile.
    pub(super) fn committed(&self, offsets: &TopicPartitionList, ok: bool) {
        let mut tracked = self.tracked.lock().expect("not poisoned");
        for elem in offsets.elements() {
            let tp = (Arc::from(elem.topic()), elem.partition());
            let Some(t) = tracked.get_mut(&tp) else {
                continue;
            };
            match (ok, elem.offset()) {
                (true, Offset::Offset(offset)) => t.stall.confirmed(offset),
                (true, _) => {}
                (false, _) => t.last_commit = None,
            }
        }
    }

    /// Updates each partition's [`CommitStall`].
    pub(super) fn observe_stalls(&self, now_ms: i64) {
        let mut tracked = self.tracked.lock().expect("not poisoned");
        for t in tracked.values_mut() {
            let waiting = t.tracker.in_flight() > 0;
            t.stall.observe(waiting, now_ms);
        }
    }
}

pub(super) struct WorkerContext {
    pub(super) shared: Arc<Shared>,
}

impl ClientContext for WorkerContext {
    /// librdkafka reports a partition's end as an error event too; it is the
    /// normal signal of a caught-up partition, handled in the loop.
    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        if code == Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::trace!(reason, "partition end");
        } else {
            if code == Some(RDKafkaErrorCode::AllBrokersDown) {
                // Not ready until a record or a partition end comes again.
                metrics::READINESS.set_connected(false);
                metrics::READINESS.cause(format!("{error} ({reason})"));
            }
            if matches!(
                code,
                Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed)
            ) {
                *self.shared.refused.lock().expect("not poisoned") = Some(format!("{error}"));
                metrics::READINESS.cause(format!("{error} (check sasl.* and ssl.*)"));
            }
            tracing::warn!(%error, reason, "librdkafka error");
        }
    }
}

pub(super) fn tps(list: &TopicPartitionList) -> Vec<Tp> {
    list.elements()
        .iter()
        .map(|e| (Arc::<str>::from(e.topic()), e.partition()))
        .collect()
}

impl ConsumerContext for WorkerContext {
    /// Every offset commit's result, synchronous or not.
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        match result {
            Ok(()) => metrics::commit(true),
            // No offset to commit is not a failure.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                metrics::commit(false);
                tracing::warn!(error = %e, "offset commit failed; retried at the next interval");
            }
        }
    }

    /// Before partitions go, commit what is resolved for them, so the next
    /// owner replays as little as possible (it replays from the last commit,
    /// and re-emits open sessions with the same turn ids).
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let revoked = tps(list);
        let transactional = self
            .shared
            .transactional
            .lock()
            .expect("not poisoned")
            .clone();
        if let Some((producer, in_txn)) = transactional {
            // Exactly-once: the open transaction holds output of these
            // partitions; commit it with every partition's offsets now.
            let offsets = self.shared.take_commit_points(None);
            if let Err(e) = commit_transaction(&producer, consumer, &offsets, &in_txn) {
                tracing::error!(error = %e, "committing the transaction on revoke failed");
            }
        } else {
            let offsets = self.shared.take_commit_points(Some(&revoked));
            if offsets.count() > 0 {
                if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
                    tracing::warn!(error = %e, "committing revoked partitions failed; the next owner replays more");
                }
            }
        }
        tracing::info!(partitions = ?revoked, "partitions revoked");
        metrics::ownership_change("revoked", revoked.len());
        self.shared
            .events
            .lock()
            .expect("not poisoned")
            .push(Rebalanced::Revoked(revoked));
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let assigned = tps(list);
            tracing::info!(partitions = ?assigned, "partitions assigned");
            metrics::ownership_change("assigned", assigned.len());
            self.shared
                .events
                .lock()
                .expect("not poisoned")
                .push(Rebalanced::Assigned(assigned));
        }
    }
}
