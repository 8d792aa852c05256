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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::Offset;

use super::client::{consumer_config, producer_config};
use super::commit::{
    commit_transaction, probe_metadata, resolved_by_earlier_owner, CommitDone, Tracked,
};
use super::context::{Rebalanced, Shared, Tp, WorkerContext};
use super::dead_letter::{self, Provenance};
use super::delivery::{
    is_permanent, last_of_group, max_dead_letter_bytes, output_key, send, Delivery, InFlight,
    Outgoing,
};
use super::partition::{Admit, PartitionState};
use crate::codec::turn_as_events;
use crate::codec::{encode_turn, Decoder, OutputFormat};
use crate::config::{Config, KafkaSection};
use crate::engine::{ClosedSession, IdleClock, IdlePolicy};
use crate::log_throttle::LogThrottle;
use crate::metrics::{self, PartitionGauges};
use crate::model::{kept_payload, DeadLetterReason, KEPT_PREFIX_BYTES};
use crate::pipeline::{deliver_all, Outcome, OutcomeSink, PartitionPipeline, Stats};
use crate::wall_clock::{now_ms, rfc3339_ms, worker_id};

/// Why the worker stopped. Every variant is fatal for this process: the
/// records it had not committed are replayed by the next owner.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the configuration has no [kafka] section")]
    NoKafkaSection,
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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
    /// Re-reading a partition after a panic needs a seek; without it the
    /// partition's state cannot be trusted, so the worker stops and the next
    /// owner replays from the last commit.
    #[error("seeking {topic}/{partition} to rebuild it after a panic: {source}; restart to replay from the last committed offset")]
    Rebuild {
        topic: String,
        partition: i32,
        source: KafkaError,
    },
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
    tracing::info!(brokers = %kafka.brokers, group = %kafka.group_id, topics = ?kafka.input_topics, worker = %worker, exactly_once = kafka.exactly_once, "kafka worker started");

    let mut w = Worker {
        kafka: kafka.clone(),
        redactor: config.redactor()?,
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

struct Worker {
    kafka: KafkaSection,
    redactor: Option<crate::redact::Redactor>,
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
                            self.on_message(consumer, &m)?;
                            // At once, not on the tick: while records are
                            // queued the tick waits behind them.
                            self.pause_or_resume(consumer);
                        }
                        Err(KafkaError::PartitionEOF(partition)) if !self.in_flight.paused => {
                            self.mark_caught_up(consumer, now_ms(), Some(partition))
                        }
                        Err(KafkaError::PartitionEOF(_)) => {}
                        Err(e) => {
                            if matches!(
                                e.rdkafka_error_code(),
                                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
                            ) {
                                metrics::READINESS.cause(format!("{e} (create the input topics first: docs/kafka.md)"));
                            }
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
                            // Dropping it removes its gauges from /metrics.
                            self.stats.add(state.pipeline.stats());
                        }
                    }
                }
            }
            metrics::READINESS.set_owned(self.assigned.len());
        }
    }

    fn on_message(
        &mut self,
        consumer: &StreamConsumer<WorkerContext>,
        m: &BorrowedMessage<'_>,
    ) -> Result<(), WorkerError> {
        let tp: Tp = (self.topic(m.topic()), m.partition());
        if !self.assigned.contains(&tp) {
            // Fetched before a revoke: the new owner processes it.
            return Ok(());
        }
        let now = now_ms();
        if !self.partitions.contains_key(&tp) {
            self.next_epoch += 1;
            let skip = resolved_by_earlier_owner(consumer, &tp);
            tracing::debug!(topic = %tp.0, partition = tp.1, first_offset = m.offset(), skip = ?skip, "partition state created");
            self.partitions.insert(
                tp.clone(),
                PartitionState::new(
                    PartitionPipeline::new(self.decoder.clone(), self.window)
                        .named(&format!("{}/{}", tp.0, tp.1)),
                    IdleClock::new(self.idle),
                    self.next_epoch,
                    m.offset(),
                    skip,
                    PartitionGauges::new(&format!("{}/{}", tp.0, tp.1)),
                ),
            );
            self.shared.tracked.lock().expect("not poisoned").insert(
                tp.clone(),
                Tracked::new(&tp, self.next_epoch, m.offset(), self.commit_stall_ms),
            );
        }
        let state = self.partitions.get_mut(&tp).expect("inserted above");
        let mut admit = state.admit(m.offset());
        if let Admit::ReRead { from } = admit {
            // Read again from where we are: if the same record comes back
            // first, the gap is real.
            tracing::debug!(topic = %tp.0, partition = tp.1, expected = from, got = m.offset(), "offset gap; re-reading to check it");
            match consumer.seek(&tp.0, tp.1, Offset::Offset(from), Duration::from_secs(5)) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, "seek to re-read a gap failed; accepting the gap");
                    admit = state.admit(m.offset());
                }
            }
        }
        let epoch = state.epoch;
        let payload = m.payload().unwrap_or(&[]);
        let mut outcomes = std::mem::take(&mut self.outcomes);
        let register = |shared: &Shared| {
            let mut tracked = shared.tracked.lock().expect("not poisoned");
            let t = tracked.get_mut(&tp).expect("tracked with its state");
            t.tracker.register(m.offset())
        };
        let (seq, replayed) = match admit {
            Admit::Stale | Admit::ReRead { .. } | Admit::SkipPanicked => (None, false),
            Admit::ObserveAgain => {
                state.pipeline.observe_resolved(payload, now, &mut outcomes);
                (None, false)
            }
            Admit::Observe => {
                // Part of an outcome already delivered, and every such record
                // past the commit is listed: only its event time counts, so
                // the watermark comes out as it did for the earlier owner.
                let seq = register(&self.shared);
                state.pipeline.observe_resolved(payload, now, &mut outcomes);
                self.resolve(&tp, epoch, &[seq], None);
                (None, false)
            }
            Admit::Process { replayed } => (Some(register(&self.shared)), replayed),
            Admit::Reprocess { seq, replayed } => (Some(seq), replayed),
        };
        let mut panicked = false;
        if let Some(seq) = seq {
            let state = self.partitions.get_mut(&tp).expect("admitted above");
            if replayed {
                state.pipeline.mark_replayed(seq);
            }
            if let Some(panic) = state
                .pipeline
                .process_guarded(payload, seq, now, &mut outcomes)
            {
                tracing::error!(topic = %tp.0, partition = tp.1, offset = m.offset(), panic = %panic, "processing a record panicked; dead-lettered it, rebuilding the partition's open sessions");
                panicked = true;
            }
        }
        self.dispatch(&tp, epoch, &mut outcomes, Some(m));
        self.outcomes = outcomes;
        if panicked {
            self.rebuild(consumer, &tp, m.offset())?;
        }
        Ok(())
    }

    /// After a panic at `offset` (its dead letter issued): no later turn may
    /// come from the engine's state, so the partition's engine starts over
    /// and re-reads the records of its open sessions
    /// ([`PartitionState::start_rebuild`]; `docs/semantics.md`, "Panics").
    /// A failed seek stops the worker: the next owner replays from the last
    /// commit, which is safe too.
    fn rebuild(
        &mut self,
        consumer: &StreamConsumer<WorkerContext>,
        tp: &Tp,
        offset: i64,
    ) -> Result<(), WorkerError> {
        let unissued: Vec<(u64, i64)> = {
            let tracked = self.shared.tracked.lock().expect("not poisoned");
            let t = tracked.get(tp).expect("tracked with its state");
            t.tracker.unissued().collect()
        };
        metrics::partition_rebuilt(&format!("{}/{}", tp.0, tp.1));
        let state = self.partitions.get_mut(tp).expect("processed above");
        let records = unissued.len();
        if let Some(from) = state.start_rebuild(offset, unissued) {
            tracing::info!(topic = %tp.0, partition = tp.1, from, records, "re-reading the open sessions' records after a panic");
            consumer
                .seek(&tp.0, tp.1, Offset::Offset(from), Duration::from_secs(5))
                .map_err(|source| WorkerError::Rebuild {
                    topic: tp.0.to_string(),
                    partition: tp.1,
                    source,
                })?;
        }
        Ok(())
    }

    /// Hands outcomes to the partition's output. `message` is the record
    /// just processed, the only one a dead letter can be about.
    fn dispatch(
        &mut self,
        tp: &Tp,
        epoch: u64,
        outcomes: &mut Vec<Outcome>,
        message: Option<&BorrowedMessage<'_>>,
    ) {
        deliver_all(
            outcomes,
            &mut PartitionOutput {
                worker: self,
                tp,
                epoch,
                message,
            },
        );
    }

    /// Marks records' outcome as handed out (see
    /// [`crate::engine::CompletionTracker::unissued`]): every record on its
    /// way to a producer, from [`Self::enqueue`].
    fn issue(&self, tp: &Tp, epoch: u64, seqs: &[u64]) {
        let mut tracked = self.shared.tracked.lock().expect("not poisoned");
        if let Some(t) = tracked.get_mut(tp).filter(|t| t.epoch == epoch) {
            for &seq in seqs {
                t.tracker.issue(seq);
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
        } else {
            self.issue(&outgoing.tp, outgoing.epoch, &outgoing.seqs);
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
        let events = match (&outgoing.original, outgoing.dead_letter) {
            (_, true) => None,
            (Some(original), false) => turn_as_events(original, OutputFormat::Json),
            (None, false) => turn_as_events(&outgoing.payload, self.format),
        };
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
                original: None,
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
                && cached_high_watermark(consumer.client(), topic, *partition)
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
            if let Some(high) = cached_high_watermark(consumer.client(), topic, *partition) {
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

/// One partition's outcomes on their way to the producers.
struct PartitionOutput<'a, 'm> {
    worker: &'a mut Worker,
    tp: &'a Tp,
    epoch: u64,
    message: Option<&'a BorrowedMessage<'m>>,
}

impl OutcomeSink for PartitionOutput<'_, '_> {
    fn turn(&mut self, mut session: ClosedSession) {
        let w = &mut *self.worker;
        metrics::observe_emit(&session, w.window.gap_ms, now_ms());
        let original = w.redactor.as_ref().map(|redactor| {
            let mut original = Vec::with_capacity(512);
            encode_turn(&session, OutputFormat::Json, &mut original);
            redactor.apply(&mut session);
            original
        });
        let mut payload = Vec::with_capacity(512);
        encode_turn(&session, w.format, &mut payload);
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(w.format.content_type()),
        });
        let outgoing = Outgoing {
            tp: self.tp.clone(),
            epoch: self.epoch,
            key: output_key(&session),
            seqs: session.seqs,
            topic: w.output_topic.clone(),
            payload,
            original,
            headers,
            dead_letter: false,
            group: None,
        };
        w.enqueue(outgoing);
    }

    fn dead_letter(&mut self, seq: u64, reason: DeadLetterReason, error: String) {
        let w = &mut *self.worker;
        let m = self
            .message
            .expect("dead letters are about the record just processed");
        let failed_at = rfc3339_ms(now_ms());
        let (payload, truncated) =
            kept_payload(m.payload().unwrap_or_default(), w.max_dead_letter_bytes);
        let headers = dead_letter::headers(
            m,
            &Provenance {
                reason,
                error: &error,
                failed_at: &failed_at,
                worker: &w.worker,
                truncated: truncated.as_ref(),
            },
        );
        let outgoing = Outgoing {
            tp: self.tp.clone(),
            epoch: self.epoch,
            seqs: vec![seq],
            topic: w.dlq_topic.clone(),
            key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
            payload: payload.to_vec(),
            original: None,
            headers,
            dead_letter: true,
            group: None,
        };
        w.enqueue(outgoing);
    }

    fn resolve(&mut self, seqs: &[u64], held_by: Option<u64>) {
        self.worker.resolve(self.tp, self.epoch, seqs, held_by);
    }
}

/// librdkafka's cached high watermark of a partition (no network round trip).
pub(super) fn cached_high_watermark<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
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
            client.native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
}
