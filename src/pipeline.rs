//! The broker-independent step every source shares: record bytes in, decode and
//! validate, feed the partition's session engine, and say what became of each
//! record. The file runner and the broker loops only move bytes and positions.

use std::collections::HashSet;

use crate::codec::{Decoder, Poison};
use crate::engine::{ClosedSession, DropReason, Resolution, SessionEngine, WindowConfig};
use crate::log_throttle::LogThrottle;
use crate::metrics::PipelineMetrics;
use crate::model::{shard_of, DeadLetterReason, EventKind};

/// What became of records (see `docs/semantics.md`: every record ends in exactly one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Publish as a turn; its `seqs` resolve once the turn is durable.
    Turn(ClosedSession),
    /// Dead-letter the record with this sequence number (always the record
    /// just handed in: the caller still holds its bytes).
    DeadLetter {
        seq: u64,
        reason: DeadLetterReason,
        error: String,
    },
    /// Resolved without output, counted.
    Dropped {
        seq: u64,
        reason: DropReason,
        /// See [`Resolution::Dropped`].
        held_by: Option<u64>,
    },
    /// Made only of records an earlier owner already resolved (see
    /// [`PartitionPipeline::mark_replayed`]): that owner delivered it, so it
    /// is resolved without being sent again.
    Delivered {
        seqs: Vec<u64>,
        held_by: Option<u64>,
    },
}

impl Outcome {
    /// Whether the outcome is a late event's: a late turn, or a late event
    /// dead-lettered or dropped.
    pub fn is_late(&self) -> bool {
        match self {
            Outcome::Turn(session) => session.late,
            Outcome::DeadLetter { reason, .. } => *reason == DeadLetterReason::Late,
            Outcome::Dropped { reason, .. } => *reason == DropReason::Late,
            Outcome::Delivered { .. } => false,
        }
    }

    /// The records this outcome resolves.
    pub fn seqs(&self) -> &[u64] {
        match self {
            Outcome::Turn(session) => &session.seqs,
            Outcome::DeadLetter { seq, .. } | Outcome::Dropped { seq, .. } => {
                std::slice::from_ref(seq)
            }
            Outcome::Delivered { seqs, .. } => seqs,
        }
    }

    /// Hands the outcome to its sink.
    pub fn deliver(self, sink: &mut impl OutcomeSink) {
        match self {
            Outcome::Turn(session) => sink.turn(session),
            Outcome::DeadLetter { seq, reason, error } => sink.dead_letter(seq, reason, error),
            Outcome::Dropped { seq, held_by, .. } => sink.resolve(&[seq], held_by),
            Outcome::Delivered { seqs, held_by } => sink.resolve(&seqs, held_by),
        }
    }
}

/// Where one partition's outcomes go: the one seam between the pipeline and
/// a source's output (Kafka's producers, Redis's fenced steps, file mode's
/// files). Each source implements it once; [`deliver_all`] is the dispatch.
pub trait OutcomeSink {
    /// Publishes a closed session as one turn; its `seqs` resolve once the
    /// turn is durable.
    fn turn(&mut self, session: ClosedSession);
    /// Dead-letters the record with this sequence number: always the record
    /// just handed to the pipeline (the source still holds its bytes).
    fn dead_letter(&mut self, seq: u64, reason: DeadLetterReason, error: String);
    /// Resolves records without output (a drop, or an outcome an earlier
    /// owner delivered). `held_by`: a duplicate's original (see
    /// [`crate::engine::CompletionTracker::hold`]).
    fn resolve(&mut self, seqs: &[u64], held_by: Option<u64>);
}

/// Hands every outcome to `sink`, in order, leaving `outcomes` empty.
pub fn deliver_all(outcomes: &mut Vec<Outcome>, sink: &mut impl OutcomeSink) {
    for outcome in outcomes.drain(..) {
        outcome.deliver(sink);
    }
}

/// Counts of what one partition's pipeline did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub records: u64,
    /// Valid events by kind: message, typing, end_of_turn.
    pub events: [u64; 3],
    /// Turns by `closed_by`, in [`ClosedBy::ALL`] order.
    pub turns: [u64; 5],
    pub late_turns: u64,
    /// Dead letters by reason, in [`DeadLetterReason::ALL`] order.
    pub dead_letters: [u64; DeadLetterReason::ALL.len()],
    /// Drops by reason, in [`DropReason::ALL`] order.
    pub dropped: [u64; 3],
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        self.records += other.records;
        self.late_turns += other.late_turns;
        for (a, b) in self.events.iter_mut().zip(other.events) {
            *a += b;
        }
        for (a, b) in self.turns.iter_mut().zip(other.turns) {
            *a += b;
        }
        for (a, b) in self.dead_letters.iter_mut().zip(other.dead_letters) {
            *a += b;
        }
        for (a, b) in self.dropped.iter_mut().zip(other.dropped) {
            *a += b;
        }
    }

    pub fn total_turns(&self) -> u64 {
        self.turns.iter().sum()
    }

    pub fn total_dead_letters(&self) -> u64 {
        self.dead_letters.iter().sum()
    }

    fn count(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Turn(s) => {
                self.turns[s.closed_by.index()] += 1;
                self.late_turns += u64::from(s.late);
            }
            Outcome::DeadLetter { reason, .. } => self.dead_letters[reason.index()] += 1,
            Outcome::Dropped { reason, .. } => self.dropped[reason.index()] += 1,
            Outcome::Delivered { .. } => {}
        }
    }
}

/// The shard a partition serves when the source routes records by the
/// session key's hash (Redis, `docs/redis.md` "Misrouted entries"): an event
/// whose key belongs to another shard is misrouted, since the rest of its
/// user's burst is read by another worker and would become another turn.
#[derive(Debug)]
pub struct ShardRoute {
    stream: String,
    index: u32,
    shards: u32,
    /// `true`: dead-letter a misrouted event (`misrouted`); `false`:
    /// process it all the same, counted and logged.
    dead_letter: bool,
    counter: metrics::Counter,
    log_throttle: LogThrottle,
}

impl ShardRoute {
    pub fn new(stream: &str, index: u32, shards: u32, dead_letter: bool) -> Self {
        ShardRoute {
            stream: stream.to_owned(),
            index,
            shards,
            dead_letter,
            counter: crate::metrics::misrouted(stream),
            log_throttle: LogThrottle::default(),
        }
    }

    /// The error of a misrouted event, `None` when it is in its shard.
    fn check(
        &mut self,
        user_id: &str,
        conversation_id: Option<&str>,
        now_ms: i64,
    ) -> Option<String> {
        let right = shard_of(user_id, conversation_id, self.shards);
        if right == self.index {
            return None;
        }
        self.counter.increment(1);
        let handling = if self.dead_letter {
            "dead-lettered"
        } else {
            "processed"
        };
        if let Some(count) = self.log_throttle.occurred("misrouted", now_ms) {
            tracing::warn!(
                stream = %self.stream,
                right_shard = right,
                count,
                "an entry's session key belongs to shard {right} of {}, not to this stream's; {handling} (redis.misrouted; count: entries since the last such line)",
                self.shards
            );
        }
        Some(format!(
            "the session key hashes to shard {right} of {}, but the entry was written to shard {} ({}): \
             the producer picked the wrong stream (docs/redis.md, \"Misrouted entries\")",
            self.shards, self.index, self.stream
        ))
    }
}

/// One source partition's pipeline: decoder, session engine and counts.
#[derive(Debug)]
pub struct PartitionPipeline {
    decoder: Decoder,
    engine: SessionEngine,
    stats: Stats,
    metrics: PipelineMetrics,
    scratch: Vec<Resolution>,
    /// Records an earlier owner already resolved that are processed again so
    /// their sessions re-form (see [`Self::mark_replayed`]).
    replayed: HashSet<u64>,
    route: Option<ShardRoute>,
    /// For the late-events warning (see [`Self::warn_late`]).
    late_log: LogThrottle,
    /// The partition, shard or file it reads, for its log lines.
    name: Box<str>,
}

impl PartitionPipeline {
    pub fn new(decoder: Decoder, window: WindowConfig) -> Self {
        PartitionPipeline {
            decoder,
            engine: SessionEngine::new(window),
            stats: Stats::default(),
            metrics: PipelineMetrics::default(),
            scratch: Vec::new(),
            replayed: HashSet::new(),
            route: None,
            late_log: LogThrottle::default(),
            name: Box::from(""),
        }
    }

    /// Names the partition, shard or file in the pipeline's log lines.
    pub fn named(mut self, name: &str) -> Self {
        self.name = Box::from(name);
        self
    }

    /// Checks every event against the shard this partition serves.
    pub fn with_route(mut self, route: ShardRoute) -> Self {
        self.route = Some(route);
        self
    }

    /// Starts the engine over (open sessions, watermark and replay marks
    /// dropped), keeping the counts: the source will hand in the same records
    /// again.
    pub fn reset_engine(&mut self) {
        self.engine = SessionEngine::new(*self.engine.config());
        self.replayed.clear();
    }

    /// Marks the record about to be processed as one an earlier owner already
    /// resolved (Kafka's `r1` commit metadata, `docs/semantics.md`). It is
    /// processed all the same, so the sessions re-form as they did for that
    /// owner; an outcome made only of such records becomes
    /// [`Outcome::Delivered`], and one with any other record is sent whole
    /// (same `turn_id`, same messages), so nothing is re-emitted in part.
    pub fn mark_replayed(&mut self, seq: u64) {
        self.replayed.insert(seq);
    }

    pub fn engine(&self) -> &SessionEngine {
        &self.engine
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Processes the partition's next record. `now_ms` is the wall clock (for
    /// the future-skew check only).
    pub fn process(&mut self, payload: &[u8], seq: u64, now_ms: i64, out: &mut Vec<Outcome>) {
        self.stats.records += 1;
        self.metrics.record();
        match self.decoder.decode(payload, now_ms) {
            Err(Poison { reason, message }) => self.push(
                Outcome::DeadLetter {
                    seq,
                    reason,
                    error: message,
                },
                out,
            ),
            Ok(event) => {
                let misrouted = self.route.as_mut().and_then(|r| {
                    let error =
                        r.check(&event.user_id, event.conversation_id.as_deref(), now_ms)?;
                    r.dead_letter.then_some(error)
                });
                if let Some(error) = misrouted {
                    let reason = DeadLetterReason::Misrouted;
                    self.push(Outcome::DeadLetter { seq, reason, error }, out);
                    return;
                }
                let kind = match event.kind {
                    EventKind::Message => 0,
                    EventKind::Typing => 1,
                    EventKind::EndOfTurn => 2,
                };
                self.stats.events[kind] += 1;
                self.metrics.event(kind);
                let event_time = event.event_time;
                let clamped = self.engine.clamped_gaps();
                let mut resolutions = std::mem::take(&mut self.scratch);
                self.engine.on_event(event, seq, &mut resolutions);
                if self.engine.clamped_gaps() != clamped {
                    crate::metrics::gap_clamped();
                }
                let mut late = false;
                for r in resolutions.drain(..) {
                    let outcome = self.outcome(r, event_time);
                    late |= outcome.is_late();
                    self.push(outcome, out);
                }
                self.scratch = resolutions;
                if late {
                    self.warn_late(event_time, now_ms);
                }
            }
        }
    }

    /// Late events are the data's, not a fault, but many at once usually mean
    /// a backlog written behind live traffic (its old event times arrive
    /// after the watermark moved on), so they are logged at most once every
    /// 10 s per partition, with the count.
    fn warn_late(&mut self, event_time: i64, now_ms: i64) {
        if let Some(count) = self.late_log.occurred("late", now_ms) {
            let behind_s = (self.engine.watermark() - event_time) / 1000;
            tracing::warn!(
                partition = %self.name,
                count,
                behind_s,
                policy = ?self.engine.config().late,
                "late events: event times behind the partition's watermark reached no open \
                 session (count: late events since the last such line; behind_s: how far \
                 behind, for this one). A backlog written into an input with live traffic \
                 arrives late like this: write backlogs into an input of their own \
                 (docs/semantics.md, \"Backlogs behind live traffic\")"
            );
        }
    }

    /// A record that an earlier owner already resolved and that is left out
    /// of the sessions (Kafka's `r2` commit metadata, `docs/semantics.md`):
    /// counted as read, and its event time moves the watermark as it did
    /// when it was processed, which can close sessions.
    pub fn observe_resolved(&mut self, payload: &[u8], now_ms: i64, out: &mut Vec<Outcome>) {
        self.stats.records += 1;
        self.metrics.record();
        if let Ok(event) = self.decoder.decode(payload, now_ms) {
            let mut resolutions = std::mem::take(&mut self.scratch);
            self.engine
                .observe_event_time(event.event_time, event.gap_ms, &mut resolutions);
            self.drain(resolutions, out);
        }
    }

    /// A record the source refused before decoding (a flat Redis entry that
    /// is not UTF-8, a record over the size bound while reading): counted as
    /// a record and dead-lettered, never handed to the engine.
    pub fn reject(&mut self, seq: u64, poison: Poison, out: &mut Vec<Outcome>) {
        self.stats.records += 1;
        self.metrics.record();
        self.push(
            Outcome::DeadLetter {
                seq,
                reason: poison.reason,
                error: poison.message,
            },
            out,
        );
    }

    /// The caught-up idle advance (see [`SessionEngine::advance_idle`]).
    pub fn advance_idle(&mut self, now_ms: i64, out: &mut Vec<Outcome>) {
        let mut resolutions = std::mem::take(&mut self.scratch);
        self.engine.advance_idle(now_ms, &mut resolutions);
        self.drain(resolutions, out);
    }

    /// End of input: closes every session.
    pub fn flush(&mut self, out: &mut Vec<Outcome>) {
        let mut resolutions = std::mem::take(&mut self.scratch);
        self.engine.flush(&mut resolutions);
        self.drain(resolutions, out);
    }

    fn drain(&mut self, mut resolutions: Vec<Resolution>, out: &mut Vec<Outcome>) {
        for r in resolutions.drain(..) {
            // Only on_event yields LateDeadLetter, so the time is never read here.
            let outcome = self.outcome(r, 0);
            self.push(outcome, out);
        }
        self.scratch = resolutions;
    }

    fn outcome(&self, resolution: Resolution, event_time: i64) -> Outcome {
        match resolution {
            Resolution::Turn(session) => Outcome::Turn(session),
            Resolution::Dropped {
                seq,
                reason,
                held_by,
            } => Outcome::Dropped {
                seq,
                reason,
                held_by,
            },
            Resolution::LateDeadLetter { seq } => Outcome::DeadLetter {
                seq,
                reason: DeadLetterReason::Late,
                error: format!(
                    "late event: event_time {event_time} plus window.gap ({} ms) is before the \
                     partition's watermark ({}) and the event reaches no open session",
                    self.engine.config().gap_ms,
                    self.engine.watermark()
                ),
            },
        }
    }

    /// [`Self::process`], but a panic while processing becomes a dead letter
    /// with reason `panic` (and an error log) instead of ending the worker:
    /// one record that trips a bug must not stop a partition. Returns the
    /// panic message when there was one.
    ///
    /// After a panic the engine may be half-updated, so the outcomes the
    /// call produced before it are dropped, and the caller must rebuild the
    /// open sessions before processing more (`docs/semantics.md`, "Panics"):
    /// [`Self::reset_engine`], then the records whose outcome was not issued
    /// yet again, in order, without the one that panicked.
    pub fn process_guarded(
        &mut self,
        payload: &[u8],
        seq: u64,
        now_ms: i64,
        out: &mut Vec<Outcome>,
    ) -> Option<String> {
        let before = out.len();
        let processed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.process(payload, seq, now_ms, out);
        }));
        let panic = processed.err()?;
        out.truncate(before);
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        self.push(
            Outcome::DeadLetter {
                seq,
                reason: DeadLetterReason::Panic,
                error: format!("processing the record panicked: {what}"),
            },
            out,
        );
        Some(what)
    }

    fn push(&mut self, outcome: Outcome, out: &mut Vec<Outcome>) {
        let outcome = self.unless_delivered(outcome);
        self.stats.count(&outcome);
        match &outcome {
            Outcome::Turn(s) => self.metrics.turn(s),
            Outcome::DeadLetter { reason, .. } => self.metrics.dead_letter(*reason),
            Outcome::Dropped { reason, .. } => self.metrics.dropped(*reason),
            Outcome::Delivered { .. } => {}
        }
        out.push(outcome);
    }

    /// [`Outcome::Delivered`] for an outcome made only of replayed records
    /// (see [`Self::mark_replayed`]).
    fn unless_delivered(&mut self, outcome: Outcome) -> Outcome {
        if self.replayed.is_empty() {
            return outcome;
        }
        let seqs = outcome.seqs();
        let all_replayed = seqs.iter().all(|s| self.replayed.contains(s));
        for s in seqs {
            self.replayed.remove(s);
        }
        if !all_replayed {
            return outcome;
        }
        let held_by = match &outcome {
            Outcome::Dropped { held_by, .. } => *held_by,
            _ => None,
        };
        Outcome::Delivered {
            seqs: seqs.to_vec(),
            held_by,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClosedBy;

    #[test]
    fn kinds_index_their_all_arrays() {
        for (i, c) in ClosedBy::ALL.into_iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        for (i, r) in DeadLetterReason::ALL.into_iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, r) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
