//! The Kafka worker loop.
//!
//! One task owns everything: the consumer, the per-partition pipelines, the
//! in-flight deliveries. Each partition has its own session engine, its own
//! [`CompletionTracker`] of offsets and its own [`IdleClock`]. An offset is
//! resolved when its turn or dead letter is acknowledged at the configured
//! acks (or it was a counted drop), and each partition commits the contiguous
//! prefix of resolved offsets every `commit_interval`. Nothing is committed
//! before its outcome is durable, so a crash replays from the last commit and
//! rebuilds the open sessions: at-least-once, and a replayed turn carries the
//! same `turn_id`.
//!
//! With `exactly_once`, the turns, dead letters and consumed offsets of one
//! commit interval go into one transaction instead; a record is resolved once
//! it is in the open transaction.

use std::collections::HashMap;
use std::ffi::CString;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::client::{consumer_config, producer_config};
use super::dead_letter::{self, Provenance};
use super::offsets::{self, Skip};
use crate::codec::turn_as_events;
use crate::codec::{encode_turn, Decoder, OutputFormat};
use crate::config::{Config, KafkaSection};
use crate::engine::{ClosedSession, CompletionTracker, IdleClock, IdlePolicy};
use crate::log_throttle::LogThrottle;
use crate::metrics::{self, FailingMark, PartitionGauges};
use crate::model::{kept_payload, DeadLetterReason, KEPT_PREFIX_BYTES};
use crate::pipeline::{Outcome, PartitionPipeline, Stats};
use crate::wall_clock::{now_ms, rfc3339_ms, worker_id};

/// Why the worker stopped. Every variant is fatal for this process: the
/// records it had not committed are replayed by the next owner.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the configuration has no [kafka] section")]
    NoKafkaSection,
    #[error("creating the Kafka {what}: {source}")]
    Client {
        what: &'static str,
        source: KafkaError,
    },
    #[error("subscribing to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        source: KafkaError,
    },
    #[error("exactly-once transaction failed ({step}): {source}; restart to replay from the last committed offsets")]
    Transaction {
        step: &'static str,
        source: KafkaError,
    },
    /// The broker refused the credentials before the worker ever got a
    /// partition: a configuration error, so the worker stops instead of
    /// retrying forever. (Later ones are logged and retried by librdkafka.)
    #[error("kafka: {0} (check sasl.* and ssl.* in [kafka.properties])")]
    Refused(String),
}

/// A topic-partition.
type Tp = (Arc<str>, i32);

/// What the rebalance callbacks tell the loop.
#[derive(Debug)]
enum Rebalanced {
    Assigned(Vec<Tp>),
    Revoked(Vec<Tp>),
}

/// Which offsets of a partition are resolved. Lives in [`Shared`] because a
/// revoke must commit exactly what is resolved at that moment.
struct Tracked {
    /// This incarnation of the partition (see [`PartitionState::epoch`]).
    epoch: u64,
    tracker: CompletionTracker<i64>,
    /// The first offset read: the commit position while nothing is resolved.
    start_offset: i64,
    /// What was last committed, to skip commits that change nothing.
    last_commit: Option<(i64, String)>,
    /// Since when the commit has been pulled back behind the resolved
    /// prefix's end (see [`Tracked::commit_point`]).
    pulled_back_since: Option<i64>,
    /// Whether the commit point has stopped advancing with records
    /// unresolved behind it (for `/readyz` and the gauge).
    stall: CommitStall,
}

/// How long a partition's commit point has not advanced while records wait
/// behind it: exported per partition, and past `kafka.commit_stall` the
/// partition counts as failing for `/readyz` (a missing DLQ topic once froze
/// commits with nothing in the metrics or `/readyz`).
struct CommitStall {
    /// The last offset the broker confirmed as committed.
    confirmed: Option<i64>,
    /// Since when records have waited behind it.
    since: Option<i64>,
    mark: FailingMark,
    gauge: ::metrics::Gauge,
    /// Records read past the confirmed offset (what a crash replays).
    lag: ::metrics::Gauge,
}

impl CommitStall {
    fn new(tp: &Tp, after_ms: i64) -> Self {
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
    fn confirmed(&mut self, offset: i64) {
        if self.confirmed != Some(offset) {
            self.confirmed = Some(offset);
            self.clear();
        }
    }

    /// On every tick: whether records wait behind the confirmed offset.
    fn observe(&mut self, waiting: bool, now_ms: i64) {
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
    fn clear(&mut self) {
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
    /// The offset to commit and its metadata (the resolved offsets past it;
    /// `docs/semantics.md`, "Kafka commits"). Where the broker keeps commit
    /// metadata and the list fits, that is the end of the resolved prefix.
    /// Otherwise the commit is pulled back to the first record of a turn
    /// that reaches past it (see [`CompletionTracker::hold`]), so a replay
    /// re-forms whole turns; overlapping turns can chain that back without
    /// end, so after `max_pullback_ms` the commit moves to the prefix's end.
    fn commit_point(&mut self, tp: &Tp, now_ms: i64, policy: CommitPolicy) -> (i64, String) {
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
struct CommitPolicy {
    /// The broker gave back the metadata of a commit (see [`probe_metadata`]).
    metadata_kept: bool,
    /// `kafka.max_pullback`.
    max_pullback_ms: i64,
}

/// State shared between the loop and the consumer's rebalance callbacks.
/// librdkafka runs the callbacks inside `recv`, on the loop's own task, so the
/// locks are never contended; they only make the sharing explicit.
#[derive(Default)]
struct Shared {
    /// `kafka.max_pullback`.
    max_pullback_ms: i64,
    /// Whether the broker keeps commit metadata: unknown (`None`) until the
    /// first confirmed commit is read back.
    metadata_kept: Mutex<Option<bool>>,
    tracked: Mutex<HashMap<Tp, Tracked>>,
    events: Mutex<Vec<Rebalanced>>,
    /// The transactional producer, in exactly-once mode: a revoke commits the
    /// open transaction before the partitions go.
    transactional: Mutex<Option<(FutureProducer, Arc<Mutex<bool>>)>>,
    /// The last authentication failure librdkafka reported.
    refused: Mutex<Option<String>>,
}

impl Shared {
    /// The commit points of `which` partitions (all when `None`) that changed
    /// since the last commit; marks them committed (see
    /// [`Self::commit_failed`]).
    fn take_commit_points(&self, which: Option<&[Tp]>) -> TopicPartitionList {
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

    fn metadata_kept(&self) -> Option<bool> {
        *self.metadata_kept.lock().expect("not poisoned")
    }

    /// What reading back a confirmed commit showed (see [`probe_metadata`]).
    fn learned_metadata_kept(&self, kept: bool) {
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
    fn committed(&self, offsets: &TopicPartitionList, ok: bool) {
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
    fn observe_stalls(&self, now_ms: i64) {
        let mut tracked = self.tracked.lock().expect("not poisoned");
        for t in tracked.values_mut() {
            let waiting = t.tracker.in_flight() > 0;
            t.stall.observe(waiting, now_ms);
        }
    }
}

struct WorkerContext {
    shared: Arc<Shared>,
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
            }
            if matches!(
                code,
                Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed)
            ) {
                *self.shared.refused.lock().expect("not poisoned") = Some(format!("{error}"));
            }
            tracing::warn!(%error, reason, "librdkafka error");
        }
    }
}

fn tps(list: &TopicPartitionList) -> Vec<Tp> {
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

/// Sends the transaction's offsets, commits it and opens the next one.
fn commit_transaction<X: ConsumerContext, K: Consumer<X>>(
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

/// One partition's state: its pipeline and its idle clock (its offsets are
/// in [`Shared::tracked`]).
struct PartitionState {
    pipeline: PartitionPipeline,
    idle: IdleClock,
    /// Offsets after the committed one that an earlier owner already resolved
    /// (from the commit metadata), and what to do with them.
    skip: (Skip, Vec<(i64, i64)>),
    /// An offset gap already re-read once (see `on_message`).
    gap_checked: Option<i64>,
    /// Sequence numbers of records in `skip` whose outcome is still to come.
    replayed: std::collections::HashSet<u64>,
    /// Distinguishes this incarnation from an earlier one of the same
    /// partition (revoked, then assigned again), so a late delivery of the
    /// earlier one resolves nothing here.
    epoch: u64,
    next_offset: i64,
    gauges: PartitionGauges,
}

/// A record on its way to a broker, with what it resolves once delivered.
struct Outgoing {
    tp: Tp,
    epoch: u64,
    seqs: Vec<u64>,
    topic: Arc<str>,
    key: Vec<u8>,
    payload: Vec<u8>,
    headers: OwnedHeaders,
    dead_letter: bool,
    /// Several records that resolve the same `seqs` together (the dead
    /// letters of an undeliverable turn): how many are not yet durable.
    group: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

impl Outgoing {
    /// What it holds in memory until acknowledged, near enough.
    fn size(&self) -> u64 {
        (self.key.len() + self.payload.len()) as u64
    }
}

/// Bytes handed to the producers and not yet acknowledged. Past the bound the
/// worker pauses fetching every assigned partition (librdkafka drops what it
/// prefetched and resumes from the next record to hand out), and resumes once
/// half the bound is acknowledged: an output that is down or slow stops the
/// input instead of filling memory (RSS grew from 31 MB to 976 MB in two
/// minutes of a blocked output before).
#[derive(Debug)]
struct InFlight {
    bytes: u64,
    max: u64,
    paused: bool,
    gauge: ::metrics::Gauge,
}

impl InFlight {
    fn new(max: u64) -> Self {
        InFlight {
            bytes: 0,
            max,
            paused: false,
            gauge: metrics::in_flight_bytes(),
        }
    }

    fn add(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.gauge.set(self.bytes as f64);
    }

    fn remove(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_sub(bytes);
        self.gauge.set(self.bytes as f64);
    }

    /// Pauses or resumes `partitions` as the current state says (newly
    /// assigned ones: librdkafka keeps a partition's flag across a revoke and
    /// a re-assignment).
    fn apply_to<'a>(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        partitions: impl IntoIterator<Item = &'a Tp>,
    ) -> KafkaResult<()> {
        let mut list = TopicPartitionList::new();
        for (topic, partition) in partitions {
            list.add_partition(topic, *partition);
        }
        if self.paused {
            consumer.pause(&list)
        } else {
            consumer.resume(&list)
        }
    }

    /// Pauses or resumes fetching as the bound says. Returns whether it just
    /// paused.
    fn pause_or_resume(
        &mut self,
        consumer: &StreamConsumer<WorkerContext>,
        assigned: &std::collections::HashSet<Tp>,
    ) -> bool {
        let pause = if self.paused {
            self.bytes > self.max / 2
        } else {
            self.bytes > self.max
        };
        if pause == self.paused {
            return false; // the common case: one comparison per record
        }
        self.paused = pause;
        if let Err(e) = self.apply_to(consumer, assigned) {
            // Tried again on the next record or tick.
            self.paused = !pause;
            tracing::warn!(error = %e, pause, "pausing or resuming the input failed; trying again");
            return false;
        }
        if pause {
            tracing::warn!(
                in_flight_bytes = self.bytes,
                max = self.max,
                "output not acknowledged fast enough: input paused (kafka.max_in_flight_bytes)"
            );
        } else {
            tracing::info!(
                in_flight_bytes = self.bytes,
                "output caught up: input resumed"
            );
        }
        metrics::input_paused(pause);
        pause
    }
}

type Delivery = Pin<Box<dyn Future<Output = (Outgoing, Result<(), KafkaError>)> + Send>>;

fn send(producer: FutureProducer, outgoing: Outgoing, backoff: Duration) -> Delivery {
    Box::pin(async move {
        if !backoff.is_zero() {
            tokio::time::sleep(backoff).await;
        }
        crate::fault::hold_output().await;
        let record = FutureRecord::to(&outgoing.topic)
            .key(&outgoing.key)
            .payload(&outgoing.payload)
            .headers(outgoing.headers.clone());
        let result = producer
            .send(record, Timeout::Never)
            .await
            .map(|_| ())
            .map_err(|(e, _)| e);
        (outgoing, result)
    })
}

/// The session key as the output record key: `user_id`, or
/// `user_id` + 0x1f + `conversation_id`.
fn output_key(session: &ClosedSession) -> Vec<u8> {
    let mut key = session.user_id.as_bytes().to_vec();
    if let Some(c) = &session.conversation_id {
        key.push(0x1f);
        key.extend_from_slice(c.as_bytes());
    }
    key
}

/// Runs the Kafka worker until `shutdown` resolves, then stops fetching, waits
/// for in-flight deliveries (bounded), commits and leaves the group.
pub async fn run(
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Stats, WorkerError> {
    let kafka = config.kafka.as_ref().ok_or(WorkerError::NoKafkaSection)?;
    let shared = Arc::new(Shared {
        max_pullback_ms: kafka.max_pullback.0,
        ..Shared::default()
    });
    // Shared with the thread that runs each periodic commit.
    let consumer: Arc<StreamConsumer<WorkerContext>> = Arc::new(
        consumer_config(kafka)
            .create_with_context(WorkerContext {
                shared: shared.clone(),
            })
            .map_err(|source| WorkerError::Client {
                what: "consumer",
                source,
            })?,
    );
    let worker = worker_id();
    let transactional_id = kafka.exactly_once.then(|| {
        kafka
            .transactional_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", kafka.group_id, crate::wall_clock::hostname()))
    });
    let output_producer: FutureProducer =
        producer_config(kafka, kafka.output_acks, transactional_id.as_deref())
            .create()
            .map_err(|source| WorkerError::Client {
                what: "producer",
                source,
            })?;
    let dlq_producer: FutureProducer = if kafka.exactly_once || kafka.dlq_acks == kafka.output_acks
    {
        output_producer.clone()
    } else {
        producer_config(kafka, kafka.dlq_acks, None)
            .create()
            .map_err(|source| WorkerError::Client {
                what: "dead-letter producer",
                source,
            })?
    };
    let in_txn = Arc::new(Mutex::new(false));
    if kafka.exactly_once {
        output_producer
            .init_transactions(Duration::from_secs(30))
            .map_err(|source| WorkerError::Transaction {
                step: "init",
                source,
            })?;
        output_producer
            .begin_transaction()
            .map_err(|source| WorkerError::Transaction {
                step: "begin",
                source,
            })?;
        *in_txn.lock().expect("not poisoned") = true;
        *shared.transactional.lock().expect("not poisoned") =
            Some((output_producer.clone(), in_txn.clone()));
    }
    let topics: Vec<&str> = kafka.input_topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| WorkerError::Subscribe {
            topics: kafka.input_topics.clone(),
            source,
        })?;
    tracing::info!(group = %kafka.group_id, topics = ?kafka.input_topics, worker = %worker, exactly_once = kafka.exactly_once, "kafka worker started");

    let mut w = Worker {
        kafka: kafka.clone(),
        decoder: Decoder::new(config.input_format(), config.decode_limits()),
        max_dead_letter_bytes: max_dead_letter_bytes(config),
        window: config.window_config(),
        idle: config.idle_policy(),
        format: config.output_format(),
        input_topics: kafka
            .input_topics
            .iter()
            .map(|t| Arc::from(t.as_str()))
            .collect(),
        output_topic: Arc::from(kafka.output_topic.as_str()),
        dlq_topic: Arc::from(kafka.dlq_topic.as_str()),
        output_producer,
        dlq_producer,
        shared,
        in_txn,
        worker,
        assigned: Default::default(),
        partitions: HashMap::new(),
        next_epoch: 0,
        deliveries: FuturesUnordered::new(),
        in_flight: InFlight::new(kafka.max_in_flight_bytes),
        commits: FuturesUnordered::new(),
        commit_stall_ms: kafka.commit_stall.0,
        log_throttle: LogThrottle::default(),
        stats: Stats::default(),
        outcomes: Vec::new(),
    };
    let result = w.run_loop(&consumer, shutdown).await;
    w.shutdown(&consumer).await;
    result.map(|()| w.stats)
}

/// Room a dead letter's headers and key may take beside its value: 64 KiB,
/// or a quarter of a small producer limit.
fn dead_letter_headroom(producer_limit: usize) -> usize {
    (64 << 10).min(producer_limit / 4)
}

/// Whether this record's outcome is the last of its group to be settled
/// (always, outside a group); counts it as settled.
fn last_of_group(outgoing: &Outgoing) -> bool {
    outgoing
        .group
        .as_ref()
        .is_none_or(|remaining| remaining.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) == 1)
}

/// Whether a send error is about the record itself, so retrying cannot help.
fn is_permanent(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

/// The largest value a dead letter keeps whole: `input.max_record_bytes`, and
/// below what the producer accepts (`message.max.bytes`, 1,000,000 unless set
/// in `[kafka.properties]`) with room for the provenance headers. A larger
/// record's dead letter keeps its first bytes, length and SHA-256
/// ([`kept_payload`]), so it can always be written.
fn max_dead_letter_bytes(config: &Config) -> usize {
    let producer_limit = config
        .kafka
        .as_ref()
        .and_then(|k| k.properties.get("message.max.bytes"))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1_000_000);
    config
        .input
        .max_record_bytes
        .min(producer_limit - dead_letter_headroom(producer_limit))
}

struct Worker {
    kafka: KafkaSection,
    decoder: Decoder,
    max_dead_letter_bytes: usize,
    window: crate::engine::WindowConfig,
    idle: IdlePolicy,
    format: OutputFormat,
    /// The subscribed topics' names, shared by every record's key into the
    /// partition maps (no allocation per record).
    input_topics: Vec<Arc<str>>,
    output_topic: Arc<str>,
    dlq_topic: Arc<str>,
    output_producer: FutureProducer,
    dlq_producer: FutureProducer,
    shared: Arc<Shared>,
    in_txn: Arc<Mutex<bool>>,
    worker: String,
    /// Partitions this worker owns now.
    assigned: std::collections::HashSet<Tp>,
    partitions: HashMap<Tp, PartitionState>,
    next_epoch: u64,
    deliveries: FuturesUnordered<Delivery>,
    /// What `deliveries` holds, and whether reading is paused for it.
    in_flight: InFlight,
    /// The periodic commit in progress (at most one).
    commits: FuturesUnordered<tokio::task::JoinHandle<CommitDone>>,
    commit_stall_ms: i64,
    log_throttle: LogThrottle,
    /// Counts of partitions no longer owned, plus totals at the end.
    stats: Stats,
    outcomes: Vec<Outcome>,
}

impl Worker {
    async fn run_loop(
        &mut self,
        consumer: &Arc<StreamConsumer<WorkerContext>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), WorkerError> {
        tokio::pin!(shutdown);
        let mut last_commit = now_ms();
        // Whether the worker ever got a partition or a record: until then a
        // refused login is fatal.
        let mut reached = false;
        // The loop sleeps until its next duty (see `next_wake`), not on a
        // fixed tick: an idle worker wakes about once a second.
        let mut wake = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                Some((outgoing, result)) = self.deliveries.next(), if !self.deliveries.is_empty() => {
                    self.on_delivered(outgoing, result);
                    if self.in_flight.paused {
                        self.pause_or_resume(consumer);
                    }
                }
                Some(done) = self.commits.next(), if !self.commits.is_empty() => {
                    self.on_committed(done);
                }
                message = consumer.recv() => {
                    self.apply_rebalance_events(consumer);
                    if matches!(message, Ok(_) | Err(KafkaError::PartitionEOF(_))) {
                        metrics::READINESS.set_connected(true);
                        reached = true;
                    }
                    match message {
                        Ok(m) => {
                            self.on_message(consumer, &m);
                            // At once, not on the tick: while records are
                            // queued the tick waits behind them.
                            self.pause_or_resume(consumer);
                        }
                        Err(KafkaError::PartitionEOF(partition)) if !self.in_flight.paused => {
                            self.mark_caught_up(consumer, now_ms(), Some(partition))
                        }
                        Err(KafkaError::PartitionEOF(_)) => {}
                        Err(e) => {
                            if let Some(count) = self.log_throttle.occurred(&e.to_string(), now_ms()) {
                                tracing::warn!(error = %e, count, "consumer error; librdkafka retries");
                            }
                        }
                    }
                }
                // Rebalance callbacks only run inside `recv`, so their events
                // are applied there, before the record it returns.
                () = tokio::time::sleep_until(wake) => {
                    reached |= !self.assigned.is_empty();
                    if !reached {
                        if let Some(why) = self.shared.refused.lock().expect("not poisoned").take() {
                            return Err(WorkerError::Refused(why));
                        }
                    }
                    let now = now_ms();
                    self.pause_or_resume(consumer);
                    // Paused, a partition's cached high watermark stands
                    // still: it must not look caught up and quiet.
                    if !self.in_flight.paused {
                        self.mark_caught_up(consumer, now, None);
                        self.advance_idle(now);
                    }
                    self.update_gauges(consumer, now);
                    self.shared.observe_stalls(now);
                    if now - last_commit >= self.kafka.commit_interval.0 {
                        self.commit(consumer)?;
                        last_commit = now;
                    }
                    wake = tokio::time::Instant::now()
                        + self.next_wake(reached, now, last_commit);
                }
            }
        }
    }

    /// How long the loop may sleep. While it waits for its first partition
    /// (a refused login must stop it at once), while output holds the input
    /// paused, and while sessions are open (the caught-up check polls
    /// librdkafka's cached high watermarks, and the idle advance follows the
    /// clock), it checks every 20 ms. Otherwise only the commit interval and
    /// a 1-second refresh of the gauges and stall checks remain.
    fn next_wake(&self, reached: bool, now: i64, last_commit: i64) -> Duration {
        const POLL_MS: i64 = 20;
        const REFRESH_MS: i64 = 1_000;
        let busy = !reached
            || self.in_flight.paused
            || self
                .partitions
                .values()
                .any(|s| s.pipeline.engine().open_sessions() > 0);
        let commit_due = (last_commit + self.kafka.commit_interval.0 - now).max(0);
        let ms = commit_due.min(if busy { POLL_MS } else { REFRESH_MS });
        Duration::from_millis(ms.max(1) as u64)
    }

    fn topic(&self, name: &str) -> Arc<str> {
        self.input_topics
            .iter()
            .find(|t| &***t == name)
            .cloned()
            .unwrap_or_else(|| Arc::from(name))
    }

    /// [`InFlight::pause_or_resume`]; a pause also ends every partition's
    /// quiet stretch, so after the resume a partition must be seen caught up
    /// and quiet afresh before the clock may close its sessions.
    fn pause_or_resume(&mut self, consumer: &StreamConsumer<WorkerContext>) {
        if self.in_flight.pause_or_resume(consumer, &self.assigned) {
            for state in self.partitions.values_mut() {
                state.idle.on_record();
            }
        }
    }

    fn apply_rebalance_events(&mut self, consumer: &StreamConsumer<WorkerContext>) {
        let events = std::mem::take(&mut *self.shared.events.lock().expect("not poisoned"));
        for event in events {
            match event {
                // Pipeline state is created on a partition's first record.
                Rebalanced::Assigned(assigned) => {
                    metrics::READINESS.set_connected(true);
                    if let Err(e) = self.in_flight.apply_to(consumer, &assigned) {
                        tracing::warn!(error = %e, "setting newly assigned partitions' pause state failed");
                    }
                    self.assigned.extend(assigned);
                }
                Rebalanced::Revoked(revoked) => {
                    let mut tracked = self.shared.tracked.lock().expect("not poisoned");
                    for tp in revoked {
                        tracked.remove(&tp);
                        self.assigned.remove(&tp);
                        if let Some(state) = self.partitions.remove(&tp) {
                            // Its open sessions go: the next owner replays them.
                            self.stats.add(state.pipeline.stats());
                            state.gauges.clear();
                        }
                    }
                }
            }
            metrics::READINESS.set_owned(self.assigned.len());
        }
    }

    fn on_message(&mut self, consumer: &StreamConsumer<WorkerContext>, m: &BorrowedMessage<'_>) {
        let tp: Tp = (self.topic(m.topic()), m.partition());
        if !self.assigned.contains(&tp) {
            // Fetched before a revoke: the new owner processes it.
            return;
        }
        let now = now_ms();
        if !self.partitions.contains_key(&tp) {
            self.next_epoch += 1;
            let skip = resolved_by_earlier_owner(consumer, &tp);
            tracing::debug!(topic = %tp.0, partition = tp.1, first_offset = m.offset(), skip = ?skip, "partition state created");
            self.partitions.insert(
                tp.clone(),
                PartitionState {
                    pipeline: PartitionPipeline::new(self.decoder.clone(), self.window),
                    idle: IdleClock::new(self.idle),
                    skip,
                    replayed: Default::default(),
                    gap_checked: None,
                    epoch: self.next_epoch,
                    next_offset: m.offset(),
                    gauges: PartitionGauges::new(&format!("{}/{}", tp.0, tp.1)),
                },
            );
            self.shared.tracked.lock().expect("not poisoned").insert(
                tp.clone(),
                Tracked {
                    epoch: self.next_epoch,
                    tracker: CompletionTracker::new(),
                    start_offset: m.offset(),
                    last_commit: None,
                    pulled_back_since: None,
                    stall: CommitStall::new(&tp, self.commit_stall_ms),
                },
            );
        }
        let state = self.partitions.get_mut(&tp).expect("inserted above");
        if m.offset() < state.next_offset {
            return; // already seen in this incarnation
        }
        if m.offset() > state.next_offset && state.gap_checked != Some(m.offset()) {
            // Offsets can legitimately jump (compaction, transaction
            // markers), but a rebalance can also drop fetched records on the
            // way to us. Read again from where we are: if the same record
            // comes back first, the gap is real.
            tracing::debug!(topic = %tp.0, partition = tp.1, expected = state.next_offset, got = m.offset(), "offset gap; re-reading to check it");
            state.gap_checked = Some(m.offset());
            if let Err(e) = consumer.seek(
                &tp.0,
                tp.1,
                Offset::Offset(state.next_offset),
                Duration::from_secs(5),
            ) {
                tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, "seek to re-read a gap failed; accepting the gap");
            } else {
                return;
            }
        }
        state.next_offset = m.offset() + 1;
        state.idle.on_record();
        let epoch = state.epoch;
        let seq = {
            let mut tracked = self.shared.tracked.lock().expect("not poisoned");
            let t = tracked.get_mut(&tp).expect("tracked with its state");
            t.tracker.register(m.offset())
        };
        let (form, skip) = &state.skip;
        let resolved_before = skip.iter().any(|(a, b)| (*a..=*b).contains(&m.offset()));
        let excluded = resolved_before && *form == Skip::Exclude;
        let payload = m.payload().unwrap_or(&[]);
        let mut outcomes = std::mem::take(&mut self.outcomes);
        if excluded {
            // Part of an outcome already delivered, and every such record
            // past the commit is listed: only its event time counts, so the
            // watermark comes out as it did for the earlier owner.
            state.pipeline.observe_resolved(payload, now, &mut outcomes);
        } else {
            if resolved_before {
                // Processed all the same, so the sessions re-form as they did
                // for the earlier owner; only what is made of such records
                // alone is not sent again (see `dispatch`).
                state.replayed.insert(seq);
            }
            if let Some(panic) = state
                .pipeline
                .process_guarded(payload, seq, now, &mut outcomes)
            {
                tracing::error!(topic = %tp.0, partition = tp.1, offset = m.offset(), panic = %panic, "processing a record panicked; dead-lettered it");
            }
        }
        if excluded {
            self.resolve(&tp, epoch, &[seq], None);
        }
        self.dispatch(&tp, epoch, &mut outcomes, Some(m));
        self.outcomes = outcomes;
    }

    /// Sends turns and dead letters, resolves drops. `message` is the record
    /// just processed, the only one a dead letter can be about.
    fn dispatch(
        &mut self,
        tp: &Tp,
        epoch: u64,
        outcomes: &mut Vec<Outcome>,
        message: Option<&BorrowedMessage<'_>>,
    ) {
        for outcome in outcomes.drain(..) {
            // An outcome made only of records an earlier owner already
            // resolved was delivered by it: resolve, do not send again. A turn
            // with any other record is sent whole (same turn_id, same
            // messages), so nothing is re-emitted in part.
            let replayed = self
                .partitions
                .get_mut(tp)
                .filter(|s| s.epoch == epoch)
                .map(|s| &mut s.replayed);
            if let Some(replayed) = replayed.filter(|r| !r.is_empty()) {
                let seqs: &[u64] = match &outcome {
                    Outcome::Turn(session) => &session.seqs,
                    Outcome::DeadLetter { seq, .. } | Outcome::Dropped { seq, .. } => {
                        std::slice::from_ref(seq)
                    }
                };
                let all_replayed = seqs.iter().all(|s| replayed.contains(s));
                for s in seqs {
                    replayed.remove(s);
                }
                if all_replayed {
                    let seqs = seqs.to_vec();
                    let held_by = match &outcome {
                        Outcome::Dropped { held_by, .. } => *held_by,
                        _ => None,
                    };
                    self.resolve(tp, epoch, &seqs, held_by);
                    continue;
                }
            }
            match outcome {
                Outcome::Turn(session) => {
                    metrics::observe_emit(&session, self.window.gap_ms, now_ms());
                    let mut payload = Vec::with_capacity(512);
                    encode_turn(&session, self.format, &mut payload);
                    let headers = OwnedHeaders::new().insert(Header {
                        key: "content-type",
                        value: Some(self.format.content_type()),
                    });
                    self.enqueue(Outgoing {
                        tp: tp.clone(),
                        epoch,
                        key: output_key(&session),
                        seqs: session.seqs,
                        topic: self.output_topic.clone(),
                        payload,
                        headers,
                        dead_letter: false,
                        group: None,
                    });
                }
                Outcome::DeadLetter { seq, reason, error } => {
                    let m = message.expect("dead letters are about the record just processed");
                    let failed_at = rfc3339_ms(now_ms());
                    let (payload, truncated) =
                        kept_payload(m.payload().unwrap_or_default(), self.max_dead_letter_bytes);
                    let headers = dead_letter::headers(
                        m,
                        &Provenance {
                            reason,
                            error: &error,
                            failed_at: &failed_at,
                            worker: &self.worker,
                            truncated: truncated.as_ref(),
                        },
                    );
                    self.enqueue(Outgoing {
                        tp: tp.clone(),
                        epoch,
                        seqs: vec![seq],
                        topic: self.dlq_topic.clone(),
                        key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
                        payload: payload.to_vec(),
                        headers,
                        dead_letter: true,
                        group: None,
                    });
                }
                Outcome::Dropped { seq, held_by, .. } => self.resolve(tp, epoch, &[seq], held_by),
            }
        }
    }

    /// The producer with the acks configured for this kind of record.
    fn producer_for(&self, outgoing: &Outgoing) -> FutureProducer {
        if outgoing.dead_letter {
            &self.dlq_producer
        } else {
            &self.output_producer
        }
        .clone()
    }

    fn enqueue(&mut self, outgoing: Outgoing) {
        self.in_flight.add(outgoing.size());
        let producer = self.producer_for(&outgoing);
        if self.kafka.exactly_once {
            // In the open transaction: resolved now, committed with it.
            self.resolve(&outgoing.tp, outgoing.epoch, &outgoing.seqs, None);
        }
        self.deliveries
            .push(send(producer, outgoing, Duration::ZERO));
    }

    fn on_delivered(&mut self, outgoing: Outgoing, result: Result<(), KafkaError>) {
        match result {
            Ok(()) => {
                self.in_flight.remove(outgoing.size());
                if !self.kafka.exactly_once && last_of_group(&outgoing) {
                    self.resolve(&outgoing.tp, outgoing.epoch, &outgoing.seqs, None);
                }
            }
            Err(e) if is_permanent(&e) => {
                self.in_flight.remove(outgoing.size());
                self.undeliverable(outgoing, e);
            }
            Err(e) => {
                // Not durable: the offsets stay unresolved, so nothing past
                // them is committed. Send again after a pause.
                let cause = format!("{}: {e}", outgoing.topic);
                if let Some(count) = self.log_throttle.occurred(&cause, now_ms()) {
                    tracing::warn!(error = %e, topic = %outgoing.topic, count, "delivery failed; retrying (count: failures of this kind since the last such line)");
                }
                let producer = self.producer_for(&outgoing);
                self.deliveries
                    .push(send(producer, outgoing, Duration::from_millis(500)));
            }
        }
    }

    /// The broker refused a record for good (retrying would loop forever and
    /// freeze the partition's commits). A turn becomes one dead letter per
    /// message, each the message as a ChatEvent (reason `undeliverable`),
    /// resolving the turn's records once all are durable. A refused dead
    /// letter (the DLQ topic's own size limit can be below the producer's)
    /// is sent again with only its first [`KEPT_PREFIX_BYTES`]; refused even
    /// then, it is logged with its position and given up (the record stays in
    /// the input topic), and its records resolve once the rest of its group
    /// is durable.
    fn undeliverable(&mut self, mut outgoing: Outgoing, error: KafkaError) {
        let events = (!outgoing.dead_letter)
            .then(|| turn_as_events(&outgoing.payload, self.format))
            .flatten();
        let Some((turn_id, events)) = events else {
            if outgoing.dead_letter && outgoing.payload.len() > KEPT_PREFIX_BYTES {
                let (kept, truncated) = kept_payload(&outgoing.payload, KEPT_PREFIX_BYTES);
                let already = outgoing
                    .headers
                    .iter()
                    .any(|h| h.key == dead_letter::TRUNCATED_BYTES);
                if let (Some(t), false) = (truncated, already) {
                    outgoing.headers = dead_letter::with_truncated(outgoing.headers, &t);
                }
                outgoing.payload = kept.to_vec();
                tracing::warn!(error = %error, topic = %outgoing.topic, "a dead letter was refused for good; sending its first bytes only");
                self.enqueue(outgoing);
                return;
            }
            tracing::error!(error = %error, topic = %outgoing.topic, source_topic = %outgoing.tp.0, source_partition = outgoing.tp.1, first_offset = ?self.first_offset(&outgoing), "a record was refused by the broker for good; giving it up (the input record stays in its topic)");
            if last_of_group(&outgoing) {
                self.resolve(&outgoing.tp, outgoing.epoch, &outgoing.seqs, None);
            }
            return;
        };
        let offset = self.first_offset(&outgoing).unwrap_or(-1);
        let failed_at = rfc3339_ms(now_ms());
        let message = format!(
            "the turn {turn_id} ({} bytes) was refused by the broker for good ({error}); \
             each of its {} messages is dead-lettered as an event",
            outgoing.payload.len(),
            events.len()
        );
        tracing::warn!(turn_id = %turn_id, error = %error, messages = events.len(), "a turn was refused for good; dead-lettering its messages");
        let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(events.len()));
        for event in events {
            let (payload, truncated) = kept_payload(&event, self.max_dead_letter_bytes);
            let headers = dead_letter::turn_headers(
                &outgoing.tp.0,
                outgoing.tp.1,
                offset,
                &Provenance {
                    reason: DeadLetterReason::Undeliverable,
                    error: &message,
                    failed_at: &failed_at,
                    worker: &self.worker,
                    truncated: truncated.as_ref(),
                },
            );
            metrics::dead_letter(DeadLetterReason::Undeliverable);
            self.enqueue(Outgoing {
                tp: outgoing.tp.clone(),
                epoch: outgoing.epoch,
                seqs: outgoing.seqs.clone(),
                topic: self.dlq_topic.clone(),
                key: outgoing.key.clone(),
                payload: payload.to_vec(),
                headers,
                dead_letter: true,
                group: Some(remaining.clone()),
            });
        }
    }

    /// The input offset of an outgoing record's first source record.
    fn first_offset(&self, outgoing: &Outgoing) -> Option<i64> {
        let tracked = self.shared.tracked.lock().expect("not poisoned");
        let t = tracked
            .get(&outgoing.tp)
            .filter(|t| t.epoch == outgoing.epoch)?;
        t.tracker.position(*outgoing.seqs.iter().min()?)
    }

    /// Resolves one outcome's records; `held_by` is a duplicate's original
    /// (see [`CompletionTracker::hold`]).
    fn resolve(&mut self, tp: &Tp, epoch: u64, seqs: &[u64], held_by: Option<u64>) {
        let mut tracked = self.shared.tracked.lock().expect("not poisoned");
        let Some(t) = tracked.get_mut(tp).filter(|t| t.epoch == epoch) else {
            return; // revoked since: the next owner replays it
        };
        let first = seqs.iter().chain(&held_by).min();
        if let (Some(&first), Some(&last)) = (first, seqs.iter().max()) {
            t.tracker.hold(first, last);
        }
        for &seq in seqs {
            t.tracker.resolve(seq);
        }
    }

    /// Marks partitions caught up that have been read to librdkafka's cached
    /// high watermark (kept fresh by the fetches that go on at the end of a
    /// partition). Runs on every tick, because an EOF event is only sent once
    /// per end reached and not always after a reassignment, and on each EOF
    /// event (`only` = its partition: the event does not name the topic).
    fn mark_caught_up(
        &mut self,
        consumer: &StreamConsumer<WorkerContext>,
        now: i64,
        only: Option<i32>,
    ) {
        for ((topic, partition), state) in self.partitions.iter_mut() {
            // `>=`: tansu's cached high watermark can trail what was read
            // after batched produce; being quiet is checked separately.
            // The end-of-partition event names no topic: the high
            // watermark decides for each topic's partition of that number.
            if only.is_none_or(|p| p == *partition)
                && state.pipeline.engine().open_sessions() > 0
                && cached_high_watermark(consumer, topic, *partition)
                    .is_some_and(|high| state.next_offset >= high)
            {
                let newest = state.pipeline.engine().max_event_time();
                state.idle.on_caught_up(now, newest);
            }
        }
    }

    fn update_gauges(&self, consumer: &StreamConsumer<WorkerContext>, now: i64) {
        let tracked = self.shared.tracked.lock().expect("not poisoned");
        for (tp @ (topic, partition), state) in &self.partitions {
            if let Some(t) = tracked.get(tp) {
                let confirmed = t.stall.confirmed.unwrap_or(t.start_offset);
                t.stall
                    .lag
                    .set((state.next_offset - confirmed).max(0) as f64);
            }
            let engine = state.pipeline.engine();
            state
                .gauges
                .update(engine.open_sessions(), engine.watermark(), now);
            if let Some(high) = cached_high_watermark(consumer, topic, *partition) {
                state
                    .gauges
                    .consumer_lag((high - state.next_offset).max(0) as u64);
            }
        }
    }

    fn advance_idle(&mut self, now: i64) {
        let idle: Vec<(Tp, u64)> = self
            .partitions
            .iter()
            .filter(|(_, s)| s.idle.is_idle(now) && s.pipeline.engine().open_sessions() > 0)
            .map(|(tp, s)| (tp.clone(), s.epoch))
            .collect();
        for (tp, epoch) in idle {
            let mut outcomes = std::mem::take(&mut self.outcomes);
            if let Some(state) = self.partitions.get_mut(&tp) {
                state.pipeline.advance_idle(now, &mut outcomes);
            }
            self.dispatch(&tp, epoch, &mut outcomes, None);
            self.outcomes = outcomes;
        }
    }

    /// The periodic commit. Offsets are committed synchronously on a
    /// blocking thread, one commit at a time, so its result is known and
    /// counted (an asynchronous commit's result event never reached the
    /// commit callback under the stream consumer) without blocking the loop.
    fn commit(&mut self, consumer: &Arc<StreamConsumer<WorkerContext>>) -> Result<(), WorkerError> {
        if !self.commits.is_empty() {
            return Ok(()); // the previous one is still on its way
        }
        let offsets = self.shared.take_commit_points(None);
        let probe = self.shared.metadata_kept().is_none();
        if self.kafka.exactly_once {
            let committed =
                commit_transaction(&self.output_producer, &**consumer, &offsets, &self.in_txn);
            metrics::commit(committed.is_ok());
            self.shared.committed(&offsets, committed.is_ok());
            if probe && committed.is_ok() && offsets.count() > 0 {
                if let Ok(kept) = probe_metadata(&**consumer, &offsets) {
                    self.shared.learned_metadata_kept(kept);
                }
            }
            return committed;
        }
        if offsets.count() > 0 {
            let consumer = consumer.clone();
            self.commits.push(tokio::task::spawn_blocking(move || {
                let result = consumer.commit(&offsets, CommitMode::Sync);
                let metadata_kept = (probe && result.is_ok())
                    .then(|| probe_metadata(&*consumer, &offsets).ok())
                    .flatten();
                CommitDone {
                    offsets,
                    result,
                    metadata_kept,
                }
            }));
        }
        Ok(())
    }

    fn on_committed(&mut self, done: Result<CommitDone, tokio::task::JoinError>) {
        let CommitDone {
            offsets,
            result,
            metadata_kept,
        } = match done {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "the commit task failed");
                metrics::commit(false);
                return;
            }
        };
        if let Some(kept) = metadata_kept {
            self.shared.learned_metadata_kept(kept);
        }
        match result {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {
                metrics::commit(true);
                self.shared.committed(&offsets, true);
            }
            Err(e) => {
                metrics::commit(false);
                self.shared.committed(&offsets, false);
                if let Some(count) = self.log_throttle.occurred(&e.to_string(), now_ms()) {
                    tracing::warn!(error = %e, count, "offset commit failed; retried at the next interval");
                }
            }
        }
    }

    /// Graceful stop: no more fetching; wait (bounded) for in-flight
    /// deliveries, commit what they resolved, leave the group.
    async fn shutdown(&mut self, consumer: &StreamConsumer<WorkerContext>) {
        // Most of the stop bound; the commit and the close get the rest.
        let deadline = tokio::time::Instant::now() + crate::shutdown::STOP_BOUND * 7 / 10;
        while !self.deliveries.is_empty() {
            match tokio::time::timeout_at(deadline, self.deliveries.next()).await {
                Ok(Some((outgoing, Ok(())))) => self.on_delivered(outgoing, Ok(())),
                Ok(Some((_, Err(e)))) => {
                    tracing::warn!(error = %e, "a delivery failed during shutdown; its records are replayed")
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        in_flight = self.deliveries.len(),
                        "deliveries still in flight at shutdown; their records are replayed"
                    );
                    break;
                }
            }
        }
        let offsets = self.shared.take_commit_points(None);
        if self.kafka.exactly_once {
            if let Err(e) =
                commit_transaction(&self.output_producer, consumer, &offsets, &self.in_txn)
            {
                tracing::warn!(error = %e, "final transaction failed; its records are replayed");
            }
        } else if offsets.count() > 0 {
            if let Err(e) = consumer.commit(&offsets, CommitMode::Sync) {
                tracing::warn!(error = %e, "final commit failed; records since the last commit are replayed");
            }
        }
        for state in self.partitions.values() {
            self.stats.add(state.pipeline.stats());
        }
        self.partitions.clear();
        consumer.unsubscribe();
        tracing::info!(
            records = self.stats.records,
            turns = self.stats.total_turns(),
            dead_letters = self.stats.total_dead_letters(),
            "kafka worker stopped"
        );
    }
}

/// A periodic commit's result, with what reading it back showed (the first
/// time only; see [`probe_metadata`]).
struct CommitDone {
    offsets: TopicPartitionList,
    result: KafkaResult<()>,
    metadata_kept: Option<bool>,
}

/// Reads back the commit of `offsets`, just confirmed, and says whether the
/// broker kept its metadata (Kafka does; `tansu` 0.6 gives back an empty
/// string). Every commit the worker writes has metadata, so metadata that is
/// not ours means the broker dropped it.
fn probe_metadata<X: ConsumerContext, K: Consumer<X>>(
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
fn resolved_by_earlier_owner(
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

/// librdkafka's cached high watermark of a partition (no network round trip).
fn cached_high_watermark(
    consumer: &StreamConsumer<WorkerContext>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let topic = CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives, `topic` is
    // a NUL-terminated string that outlives the call, and the call only
    // writes the two out-parameters.
    #[allow(unsafe_code)]
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}
