//! One owned shard: read, process, emit and ack in fenced steps.
//!
//! A shard task lives as long as its lease. It first replays the shard
//! consumer's pending entries (a predecessor's unacked work: the open
//! sessions it had), dead-lettering any entry already delivered
//! `max_deliveries` times, then reads new entries. What a read closes is
//! written with the next read, in one `WATCH`/`MULTI` transaction that runs
//! only while the lease holds this task's token (`ShardTask::fenced`).
//!
//! A Redis transaction does not roll back a failed command, so an entry is
//! never acked in the transaction that writes its outcome: each write's own
//! reply is checked, and only the entries of writes that succeeded are acked,
//! in the next fenced step (which rides with the next read, so it costs no
//! round trip). A write that failed (`WRONGTYPE`, `OOM`) is retried and its
//! entries stay pending. A crash between the two replays the entries of
//! written outcomes, which re-emits the same turns with the same `turn_id`s.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use redis::{RedisError, Value};
use tokio::sync::watch;

use super::connection::RedisConn;
use super::dlq::{TRUNCATED_BYTES, TRUNCATED_SHA256};
use super::entry::{parse_read_reply, Entry};
use super::keys::ShardKeys;
use super::scripts::{self, is_fenced};
use crate::codec::{encode_turn_with_id, session_turn_id, Decoder, OutputFormat};
use crate::engine::{IdleClock, IdlePolicy, WindowConfig};
use crate::log_throttle::LogThrottle;
use crate::metrics::{self, FailingMark, PartitionGauges};
use crate::model::{kept_payload, DeadLetterReason};
use crate::pipeline::{Outcome, PartitionPipeline, Stats};
use crate::wall_clock::{now_ms, rfc3339_ms};

/// What every shard task of a worker shares.
#[derive(Debug)]
pub struct Settings {
    pub group: String,
    pub batch: u32,
    pub block: Duration,
    pub max_deliveries: u32,
    pub output_maxlen: Option<u64>,
    pub dlq_maxlen: Option<u64>,
    pub decoder: Decoder,
    pub window: WindowConfig,
    pub idle: IdlePolicy,
    pub format: OutputFormat,
    pub worker: String,
}

/// Why a shard task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardExit {
    /// Asked to stop (shutdown, rebalance): the lease is still ours to release.
    Stopped,
    /// The lease was lost: another worker owns the shard now.
    Fenced,
}

/// Runs a call until it succeeds (`Ok(value)`), the task is fenced or
/// stopped (`Err(Failure)`); see [`ShardTask::after_error`].
macro_rules! retry {
    ($task:ident, $stop:ident, $call:expr) => {
        loop {
            match $call.await {
                Ok(value) => break Ok(value),
                Err(e) => {
                    if let Err(failure) = $task.after_error(e, $stop).await {
                        break Err(failure);
                    }
                }
            }
        }
    };
}

/// Entries per fenced emit at most, so one transaction never blocks Redis
/// long (an idle advance can close many sessions at once).
const ACKS_PER_EMIT: usize = 1_000;

/// How long a stopping shard may spend writing what it holds.
const FLUSH_ON_STOP: Duration = Duration::from_secs(2);

/// How long to wait before retrying after a connection error.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

pub struct ShardTask {
    keys: ShardKeys,
    token: String,
    conn: RedisConn,
    settings: Arc<Settings>,
    pipeline: PartitionPipeline,
    gauges: PartitionGauges,
    idle: IdleClock,
    /// Entry ids of records handed to the pipeline and not yet resolved,
    /// by seq from `unresolved_base` (`None` once resolved).
    unresolved: VecDeque<Option<String>>,
    unresolved_base: u64,
    next_seq: u64,
    outcomes: Vec<Outcome>,
    /// The id of the last entry handed to the pipeline.
    last_seen: String,
    /// A call failed on the connection since the last read: see `read_new`.
    reread_pending: bool,
    /// Fenced steps waiting to be written, in order.
    steps: VecDeque<EmitArgs>,
    /// A write failed: write everything before reading more (see
    /// [`Self::read_new`]), which also bounds what waits in memory.
    write_failed: bool,
    /// For `/readyz`: whether the shard's calls keep failing.
    failing: FailingMark,
    log_throttle: LogThrottle,
}

impl std::fmt::Debug for ShardTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardTask")
            .field("shard", &self.keys.stream)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// The writes and acks of one fenced step.
#[derive(Debug, Default)]
struct EmitArgs {
    /// Outcomes to write, each with the entry ids it resolves; those are
    /// acked only once the write's reply said it succeeded.
    writes: Vec<(Write, Vec<String>)>,
    /// Entries whose outcome is durable already: drops, and writes an earlier
    /// step confirmed.
    acks: Vec<String>,
    /// Entry ids in `writes` and `acks` (kept, not summed: the step is
    /// checked against [`ACKS_PER_EMIT`] for every outcome).
    entries: usize,
}

impl EmitArgs {
    fn write(&mut self, write: Write, ids: Vec<String>) {
        self.entries += ids.len();
        self.writes.push((write, ids));
    }

    fn ack(&mut self, ids: impl IntoIterator<Item = String>) {
        let before = self.acks.len();
        self.acks.extend(ids);
        self.entries += self.acks.len() - before;
    }
}

/// One outcome's `XADD`.
#[derive(Debug)]
enum Write {
    Turn {
        turn: Vec<u8>,
        id: String,
        user: String,
    },
    DeadLetter(Vec<(&'static str, Vec<u8>)>),
}

/// Why a loop of the task ends early.
enum Failure {
    Fenced,
    Stopped,
    /// The consumer group is gone (`NOGROUP`): Redis lost its data or the
    /// group was destroyed. See [`ShardTask::recreate_group`].
    GroupLost,
}

impl ShardTask {
    pub fn new(keys: ShardKeys, token: String, conn: RedisConn, settings: Arc<Settings>) -> Self {
        ShardTask {
            pipeline: PartitionPipeline::new(settings.decoder.clone(), settings.window),
            gauges: PartitionGauges::new(&keys.stream),
            idle: IdleClock::new(settings.idle),
            keys,
            token,
            conn,
            settings,
            unresolved: VecDeque::new(),
            unresolved_base: 0,
            next_seq: 0,
            outcomes: Vec::new(),
            steps: VecDeque::new(),
            write_failed: false,
            failing: FailingMark::default(),
            log_throttle: LogThrottle::default(),
            last_seen: "0".to_owned(),
            reread_pending: false,
        }
    }

    /// Runs until `stop` turns true or the lease is lost; returns why, with
    /// the shard's counts. Open sessions are dropped on exit: their entries
    /// stay pending for the next owner.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> (ShardExit, Stats) {
        let exit = loop {
            let exit = match self.replay_pending(&mut stop).await {
                Ok(()) => self.read_new(&mut stop).await,
                Err(failure) => failure,
            };
            match exit {
                Failure::GroupLost => {
                    if let Err(failure) = self.recreate_group(&mut stop).await {
                        break failure;
                    }
                }
                other => break other,
            }
        };
        let exit = match exit {
            Failure::Fenced => {
                tracing::warn!(shard = %self.keys.stream, "lease lost: another worker owns the shard; stopping it here");
                ShardExit::Fenced
            }
            Failure::Stopped | Failure::GroupLost => {
                self.flush_on_stop(&mut stop).await;
                ShardExit::Stopped
            }
        };
        self.gauges.clear();
        (exit, self.pipeline.stats().clone())
    }

    /// Asked to stop: writes what is closed and acks what is written, so a
    /// graceful stop (a rolling restart, a rebalance) re-emits no turn. At
    /// most [`FLUSH_ON_STOP`], and nothing more after an error: what is not
    /// acked then is replayed by the next owner, as after a crash.
    async fn flush_on_stop(&mut self, stop: &mut watch::Receiver<bool>) {
        if self.steps.is_empty() {
            return;
        }
        if tokio::time::timeout(FLUSH_ON_STOP, self.emit(stop))
            .await
            .is_err()
        {
            tracing::warn!(shard = %self.keys.stream, "writing at stop took too long; the rest is replayed by the next owner");
        }
    }

    /// The consumer group vanished (`FLUSHALL`, a restart without
    /// persistence, `XGROUP DESTROY`): the pending entries and the read
    /// position went with it, and retrying would fail forever. Recreates the
    /// group at the start of the stream (as at first start: what is still in
    /// the stream is processed again, at least once) and starts the shard over
    /// as a new owner would: open sessions and unwritten outcomes are dropped,
    /// since their entries are read again.
    async fn recreate_group(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), Failure> {
        tracing::error!(
            shard = %self.keys.stream,
            group = %self.settings.group,
            "the consumer group is gone (Redis lost its data, or the group was destroyed); \
             recreating it and processing the stream again from its start"
        );
        metrics::group_recreated(&self.keys.stream);
        let (stream, group) = (self.keys.stream.clone(), self.settings.group.clone());
        retry!(
            self,
            stop,
            super::worker::create_group(&mut self.conn, &stream, &group)
        )?;
        self.pipeline.reset_engine();
        self.idle = IdleClock::new(self.settings.idle);
        self.unresolved.clear();
        self.unresolved_base = self.next_seq;
        self.outcomes.clear();
        self.steps.clear();
        self.last_seen = "0".to_owned();
        self.reread_pending = false;
        self.write_failed = false;
        Ok(())
    }

    /// The shard consumer's pending entries, oldest first, a page at a time.
    ///
    /// An entry delivered before (count ≥ 2) may be the one that killed the
    /// previous owner, so before processing such an entry its id is written
    /// to the shard's in-flight key. The entry named there when a new owner
    /// starts is the one a worker died on; once it has been delivered more
    /// than `max_deliveries` times it is dead-lettered instead. Entries that
    /// were merely pending beside it (open sessions) are replayed however
    /// often they were delivered, so a crash loop costs only its cause.
    async fn replay_pending(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), Failure> {
        let died_on: Option<String> = retry!(self, stop, self.in_flight(None))?;
        let (replayed, marked) = self
            .replay_after("0", true, died_on.as_deref(), stop)
            .await?;
        if marked || died_on.is_some() {
            retry!(self, stop, self.clear_in_flight())?;
        }
        if replayed > 0 {
            tracing::info!(shard = %self.keys.stream, entries = replayed, "replayed the pending entries");
        }
        Ok(())
    }

    /// Processes the shard consumer's pending entries after `cursor`, a page
    /// at a time. `died_on`: the entry a previous owner died on; entries delivered before are
    /// marked in flight first when `mark` (see [`Self::replay_pending`]). Returns how many
    /// entries it processed and whether it marked any.
    async fn replay_after(
        &mut self,
        cursor: &str,
        mark: bool,
        died_on: Option<&str>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(usize, bool), Failure> {
        let mut cursor = cursor.to_owned();
        let mut replayed = 0usize;
        let mut marked = false;
        loop {
            let page = retry!(self, stop, self.read_pending(&cursor))?;
            let Some(last) = page.last() else { break };
            cursor = last.0.id.clone();
            replayed += page.len();
            for (entry, deliveries) in page {
                let exhausted = deliveries > u64::from(self.settings.max_deliveries)
                    && died_on == Some(entry.id.as_str());
                if mark && deliveries >= 2 && !exhausted {
                    let id = entry.id.clone();
                    retry!(self, stop, self.in_flight(Some(&id)))?;
                    marked = true;
                }
                self.process(entry, deliveries, exhausted, now_ms());
            }
            self.last_seen = cursor.clone();
            self.emit(stop).await?;
        }
        Ok((replayed, marked))
    }

    /// Reads the in-flight key (`None`), or sets it to an entry id.
    async fn in_flight(&mut self, set: Option<&str>) -> Result<Option<String>, RedisError> {
        match set {
            None => {
                redis::cmd("GET")
                    .arg(&self.keys.in_flight)
                    .query_async(&mut self.conn)
                    .await
            }
            Some(id) => redis::cmd("SET")
                .arg(&self.keys.in_flight)
                .arg(id)
                .query_async::<()>(&mut self.conn)
                .await
                .map(|()| None),
        }
    }

    async fn clear_in_flight(&mut self) -> Result<(), RedisError> {
        redis::cmd("DEL")
            .arg(&self.keys.in_flight)
            .query_async(&mut self.conn)
            .await
    }

    /// Reads a page of pending entries after `cursor` with their delivery
    /// counts (this read included).
    async fn read_pending(&mut self, cursor: &str) -> Result<Vec<(Entry, u64)>, RedisError> {
        let s = &self.settings;
        let reply: Value = self.read_group(cursor).query_async(&mut self.conn).await?;
        let entries = parse_read_reply(reply).map_err(protocol_error)?;
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(Vec::new());
        };
        let pending: Value = redis::cmd("XPENDING")
            .arg(&self.keys.stream)
            .arg(&s.group)
            .arg(&first.id)
            .arg(&last.id)
            .arg(entries.len())
            .arg(&self.keys.consumer)
            .query_async(&mut self.conn)
            .await?;
        let counts = delivery_counts(pending).map_err(protocol_error)?;
        Ok(entries
            .into_iter()
            .map(|e| {
                let n = counts.get(&e.id).copied().unwrap_or(1);
                (e, n)
            })
            .collect())
    }

    /// New entries, through the fenced read; waits up to `block` for more
    /// when caught up, and runs the idle advance.
    async fn read_new(&mut self, stop: &mut watch::Receiver<bool>) -> Failure {
        loop {
            if *stop.borrow() {
                return Failure::Stopped;
            }
            if std::mem::take(&mut self.write_failed) {
                // Write (and retry) everything before reading more: a shard
                // whose output fails stops reading instead of piling up turns.
                if let Err(failure) = self.emit(stop).await {
                    return failure;
                }
            }
            if std::mem::take(&mut self.reread_pending) {
                // A call failed on the connection: a read may have reached
                // Redis and lost its reply, leaving entries in this
                // consumer's pending list that nobody would see until the
                // next takeover. Read them back from after the last seen.
                let after = self.last_seen.clone();
                match self.replay_after(&after, false, None, stop).await {
                    Ok((0, _)) => {}
                    Ok((n, _)) => {
                        tracing::info!(shard = %self.keys.stream, entries = n, "re-read entries whose read reply was lost")
                    }
                    Err(failure) => return failure,
                }
            }
            // What the last read closed rides in the transaction of the
            // next read: one round trip fewer per batch.
            let step = match self.emit_all_but_last(stop).await {
                Ok(step) => step,
                Err(failure) => return failure,
            };
            // Not `retry!`: after a connection error the loop starts over,
            // so the lost-reply check above runs before the next read.
            let (entries, last_delivered) = match self.read_fenced(step).await {
                Ok(read) => {
                    if !self.write_failed {
                        self.failing.ok();
                    }
                    read
                }
                Err((e, step)) => {
                    // Not written (or written without our knowing: then the
                    // retry re-emits the same turns, same `turn_id`s).
                    self.steps.extend(step);
                    match self.after_error(e, stop).await {
                        Ok(()) => continue,
                        Err(failure) => return failure,
                    }
                }
            };
            let now = now_ms();
            let caught_up = entries.len() < self.settings.batch as usize;
            if let Some(last) = entries.last() {
                self.last_seen = last.id.clone();
            }
            for entry in entries {
                self.process(entry, 1, false, now);
            }
            if caught_up {
                let newest = self.pipeline.engine().max_event_time();
                self.idle.on_caught_up(now, newest);
            }
            if self.idle.is_idle(now) && self.pipeline.engine().open_sessions() > 0 {
                let mut outcomes = std::mem::take(&mut self.outcomes);
                self.pipeline.advance_idle(now, &mut outcomes);
                self.collect(&mut outcomes, None);
                self.outcomes = outcomes;
            }
            let engine = self.pipeline.engine();
            self.gauges
                .update(engine.open_sessions(), engine.watermark(), now);
            if let Some(from) = last_delivered {
                if let Err(failure) = self.emit(stop).await {
                    return failure;
                }
                // Nothing new: wait for an entry after the last delivered
                // one, or until the idle advance can close a session.
                let mut wait = redis::cmd("XREAD");
                wait.arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(self.wait_ms(now_ms()))
                    .arg("STREAMS")
                    .arg(&self.keys.stream)
                    .arg(from);
                let wait = wait.query_async::<Value>(&mut self.conn);
                tokio::select! {
                    _ = stop.changed() => return Failure::Stopped,
                    result = wait => if let Err(e) = result {
                        tracing::warn!(shard = %self.keys.stream, error = %e, "waiting for entries failed; retrying");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    },
                }
            }
        }
    }

    /// How long a caught-up shard waits for new entries: the block time, or
    /// less when the idle advance can close a session sooner (at wall clock
    /// `deadline + max_out_of_orderness + 1`, once the shard counts as idle),
    /// so a quiet user's turn is not held back by up to a block time.
    fn wait_ms(&self, now: i64) -> u64 {
        let block = self.settings.block.as_millis() as i64;
        let engine = self.pipeline.engine();
        let close_at = engine
            .next_deadline()
            .map(|d| d + engine.config().max_out_of_orderness_ms + 1);
        match (close_at, self.idle.idle_since()) {
            (Some(close), Some(idle)) => (close.max(idle) - now).clamp(1, block) as u64,
            _ => block as u64,
        }
    }

    /// `XREADGROUP` of a batch for the shard's consumer: `>` for new
    /// entries, an id for its pending entries after that id.
    fn read_group(&self, from: &str) -> redis::Cmd {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(&self.settings.group)
            .arg(&self.keys.consumer)
            .arg("COUNT")
            .arg(self.settings.batch)
            .arg("STREAMS")
            .arg(&self.keys.stream)
            .arg(from);
        read
    }

    /// One fenced read of new entries; with none, the group's last
    /// delivered id.
    /// `step`: turns, dead letters and acks written in the same transaction.
    /// On an error nothing of the step was applied; it is handed back.
    async fn read_fenced(
        &mut self,
        step: Option<EmitArgs>,
    ) -> Result<(Vec<Entry>, Option<String>), (RedisError, Option<EmitArgs>)> {
        let s = self.settings.clone();
        let mut read = self.begin_fenced();
        if let Some(step) = &step {
            self.add_step(&mut read, step);
        }
        read.add_command(self.read_group(">"));
        let replies = match self.fenced(read).await {
            Ok(replies) => replies,
            Err(e) => {
                if step.as_ref().is_some_and(|step| step.entries > 0) {
                    count_commit(&e);
                }
                return Err((e, step));
            }
        };
        let mut replies = replies.into_iter();
        if let Some(step) = step {
            // A failed write is queued again and retried before the next read.
            let _ = self.settle(step, &mut replies);
        }
        let read = replies.next().unwrap_or(Value::Nil);
        if let Value::ServerError(e) = read {
            return Err((e.into(), None));
        }
        let entries = parse_read_reply(read).map_err(|e| (protocol_error(e), None))?;
        if !entries.is_empty() {
            return Ok((entries, None));
        }
        let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.keys.stream)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| (e, None))?;
        let last = groups
            .groups
            .into_iter()
            .find(|g| g.name == s.group)
            .map(|g| g.last_delivered_id);
        Ok((entries, last))
    }

    /// A fenced step's start: `WATCH` the lease and the fence key, run
    /// [`scripts::FENCE_CHECK`] (which touches the fence key unless the
    /// lease is ours), `MULTI`. The caller adds the step's commands and hands
    /// it to [`Self::fenced`].
    fn begin_fenced(&self) -> redis::Pipeline {
        let mut step = redis::pipe();
        step.cmd("WATCH")
            .arg(&self.keys.lease)
            .arg(&self.keys.fence)
            .cmd("EVAL")
            .arg(scripts::FENCE_CHECK)
            .arg(2)
            .arg(&self.keys.lease)
            .arg(&self.keys.fence)
            .arg(&self.token)
            .cmd("MULTI");
        step
    }

    /// Runs a step begun by [`Self::begin_fenced`] in one round trip. Redis
    /// refuses its `EXEC` if either watched key changed after the `WATCH`:
    /// the lease taken, or only renewed (a `TryAgain` error the retry loops
    /// repeat at once), or the check failing (the fencing error). `WATCH`
    /// lives on the connection and `EXEC` ends it, so a reconnect between
    /// steps cannot leave a stale one behind. Returns `EXEC`'s replies, one
    /// per command: a command that failed inside the transaction is a
    /// `ServerError` among them (the others were applied), for the caller to
    /// check reply by reply.
    async fn fenced(&mut self, mut step: redis::Pipeline) -> Result<Vec<Value>, RedisError> {
        step.cmd("EXEC");
        // The raw replies: `query_async` would rebuild the whole reply tree
        // twice to look for errors nested in it, a tenth of the worker's CPU
        // for big reads; errors can only stand at the top level here.
        let count = step.len();
        let mut replies =
            redis::aio::ConnectionLike::req_packed_commands(&mut self.conn, &step, 0, count)
                .await?;
        let applied = replies.pop().unwrap_or(Value::Nil);
        // Before `EXEC`: `WATCH`, the check, `MULTI` and the `QUEUED`s. An
        // error there (or `EXECABORT`) means nothing was applied.
        for reply in replies.iter().chain(std::iter::once(&applied)) {
            if let Value::ServerError(e) = reply {
                return Err(e.clone().into());
            }
        }
        let held = matches!(replies.get(1), Some(Value::Int(1)));
        match applied {
            Value::Nil | Value::Array(_) if !held => Err(RedisError::from((
                redis::ErrorKind::ExtensionError,
                scripts::FENCED,
                "the shard lease is no longer held".to_owned(),
            ))),
            Value::Nil => Err(RedisError::from((
                redis::ErrorKind::TryAgain,
                "transaction aborted",
                "the lease key changed".to_owned(),
            ))),
            Value::Array(applied) => Ok(applied),
            other => Err(protocol_error(format!("unexpected EXEC reply {other:?}"))),
        }
    }

    /// Hands one entry to the pipeline and collects what it resolved;
    /// `exhausted`: dead-letter it as `max_deliveries` instead.
    fn process(&mut self, entry: Entry, deliveries: u64, exhausted: bool, now: i64) {
        if entry.fields.is_none() {
            // Trimmed away while pending: nothing left to process or keep.
            tracing::warn!(shard = %self.keys.stream, id = %entry.id, "a pending entry was deleted; acking it");
            self.step().ack([entry.id]);
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.idle.on_record();
        self.unresolved.push_back(Some(entry.id.clone()));
        let mut outcomes = std::mem::take(&mut self.outcomes);
        let (payload, form, refused) = entry.payload();
        if let Some(poison) = refused {
            self.pipeline.reject(seq, poison, &mut outcomes);
        } else if exhausted {
            outcomes.push(Outcome::DeadLetter {
                seq,
                reason: DeadLetterReason::MaxDeliveries,
                error: format!(
                    "delivered {} times and a worker died processing it each time (redis.max_deliveries = {})",
                    deliveries - 1,
                    self.settings.max_deliveries
                ),
            });
        } else {
            crate::fault::abort_if_marked(&payload);
            if let Some(panic) = self
                .pipeline
                .process_guarded(&payload, seq, now, &mut outcomes)
            {
                tracing::error!(shard = %self.keys.stream, id = %entry.id, panic = %panic, "processing an entry panicked; dead-lettered it");
            }
        }
        let about = DeadLetterAbout {
            entry: &entry,
            payload: &payload,
            form: form.as_str(),
            // The delivery that dead-letters an exhausted entry is not an attempt.
            deliveries: if exhausted {
                deliveries - 1
            } else {
                deliveries
            },
        };
        self.collect(&mut outcomes, Some(about));
        self.outcomes = outcomes;
    }

    /// Moves outcomes into the emit batch: turns encoded, dead letters with
    /// their fields, and the ids each resolves.
    fn collect(&mut self, outcomes: &mut Vec<Outcome>, about: Option<DeadLetterAbout<'_>>) {
        for outcome in outcomes.drain(..) {
            match outcome {
                Outcome::Turn(session) => {
                    metrics::observe_emit(&session, self.settings.window.gap_ms, now_ms());
                    let id = session_turn_id(&session);
                    let mut turn = Vec::with_capacity(512);
                    encode_turn_with_id(&session, &id, self.settings.format, &mut turn);
                    let user = session.user_id;
                    let acks: Vec<String> = session
                        .seqs
                        .iter()
                        .filter_map(|seq| self.take_id(*seq))
                        .collect();
                    self.step().write(Write::Turn { turn, id, user }, acks);
                }
                Outcome::DeadLetter { seq, reason, error } => {
                    let about = about
                        .as_ref()
                        .expect("dead letters are about the entry just processed");
                    let (payload, truncated) = kept_payload(
                        about.payload,
                        self.settings.decoder.limits().max_record_bytes,
                    );
                    let mut fields = vec![
                        ("payload", payload.to_vec()),
                        ("reason", reason.as_str().as_bytes().to_vec()),
                        ("error", error.into_bytes()),
                        ("source_stream", self.keys.stream.clone().into_bytes()),
                        ("source_id", about.entry.id.as_bytes().to_vec()),
                        ("failed_at", rfc3339_ms(now_ms()).into_bytes()),
                        ("worker", self.settings.worker.clone().into_bytes()),
                        ("deliveries", about.deliveries.to_string().into_bytes()),
                        ("form", about.form.as_bytes().to_vec()),
                    ];
                    if let Some(t) = truncated {
                        fields.push((TRUNCATED_BYTES, t.original_bytes.to_string().into_bytes()));
                        fields.push((TRUNCATED_SHA256, t.original_sha256.into_bytes()));
                    }
                    // A record that fails again after a `dlq replay` keeps
                    // its replay count.
                    for (name, value) in about.entry.replay_fields() {
                        fields.push((name, value.to_vec()));
                    }
                    let acks = self.take_id(seq).into_iter().collect();
                    self.step().write(Write::DeadLetter(fields), acks);
                }
                Outcome::Dropped { seq, .. } => {
                    let acks = self.take_id(seq);
                    self.step().ack(acks);
                }
            }
        }
    }

    /// The entry id of a resolved record (once).
    fn take_id(&mut self, seq: u64) -> Option<String> {
        let index = usize::try_from(seq.checked_sub(self.unresolved_base)?).ok()?;
        let id = self.unresolved.get_mut(index)?.take();
        while let Some(None) = self.unresolved.front() {
            self.unresolved.pop_front();
            self.unresolved_base += 1;
        }
        id
    }

    /// The step the next outcome goes into: a new one once the last
    /// resolves [`ACKS_PER_EMIT`] entries.
    fn step(&mut self) -> &mut EmitArgs {
        if self
            .steps
            .back()
            .is_none_or(|last| last.entries >= ACKS_PER_EMIT)
        {
            self.steps.push_back(EmitArgs::default());
        }
        self.steps.back_mut().expect("pushed above")
    }

    /// Writes the waiting steps in order, and then acks what they wrote,
    /// retrying connection errors and failed writes until each is written,
    /// fenced or stopped.
    async fn emit(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), Failure> {
        self.emit_until(0, stop).await
    }

    /// Writes steps from the front until at most `left` remain.
    async fn emit_until(
        &mut self,
        left: usize,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Failure> {
        while self.steps.len() > left {
            let args = self.steps.pop_front().expect("more than left");
            if let Err(e) = self.emit_once(args).await {
                self.after_error(e, stop).await?;
            }
        }
        Ok(())
    }

    /// Writes one step in one fenced transaction. Whatever did not succeed is
    /// put back at the front of the queue, and the error returned.
    async fn emit_once(&mut self, args: EmitArgs) -> Result<(), RedisError> {
        let mut step = self.begin_fenced();
        self.add_step(&mut step, &args);
        match self.fenced(step).await {
            Ok(replies) => match self.settle(args, &mut replies.into_iter()) {
                None => {
                    self.failing.ok();
                    Ok(())
                }
                Some(e) => Err(e),
            },
            Err(e) => {
                count_commit(&e);
                self.steps.push_front(args);
                Err(e)
            }
        }
    }

    /// Checks the replies of an applied step, in the order [`Self::add_step`]
    /// added its commands: the entries of each write that succeeded are acked
    /// by the next step; a failed write goes back to the front of the queue
    /// with its entries (still pending); a failed `XACK` is retried (acking
    /// twice is harmless). Returns the first error, if any.
    fn settle(
        &mut self,
        args: EmitArgs,
        replies: &mut impl Iterator<Item = Value>,
    ) -> Option<RedisError> {
        let mut failed = EmitArgs::default();
        let mut confirmed = Vec::new();
        let mut first_error = None;
        for (write, ids) in args.writes {
            match replies.next() {
                Some(Value::BulkString(_) | Value::SimpleString(_)) => confirmed.extend(ids),
                other => {
                    first_error.get_or_insert(reply_error("XADD", other));
                    failed.write(write, ids);
                }
            }
        }
        if !args.acks.is_empty() {
            match replies.next() {
                Some(Value::Int(_)) => {}
                other => {
                    first_error.get_or_insert(reply_error("XACK", other));
                    failed.ack(args.acks);
                }
            }
        }
        if !confirmed.is_empty() {
            // Acked by the step that goes next (the front), or a new one.
            match self.steps.front_mut() {
                Some(next) if next.entries < ACKS_PER_EMIT => next.ack(confirmed),
                _ => {
                    let mut acks = EmitArgs::default();
                    acks.ack(confirmed);
                    self.steps.push_front(acks);
                }
            }
        }
        metrics::commit(first_error.is_none());
        // Logged by the caller's retry (`after_error`).
        let error = first_error?;
        self.write_failed = true;
        self.steps.push_front(failed);
        Some(error)
    }

    /// Writes all waiting steps but the last, which is returned to go with
    /// the next read.
    async fn emit_all_but_last(
        &mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<EmitArgs>, Failure> {
        self.emit_until(1, stop).await?;
        Ok(self.steps.pop_back())
    }

    /// Adds one step's commands to a transaction: an `XADD` per write, then
    /// one `XACK` (see [`Self::settle`] for their replies).
    fn add_step(&self, step: &mut redis::Pipeline, args: &EmitArgs) {
        let s = &self.settings;
        for (write, _) in &args.writes {
            match write {
                Write::Turn { turn, id, user } => {
                    let add = step.cmd("XADD").arg(&self.keys.output);
                    if let Some(maxlen) = s.output_maxlen {
                        add.arg("MAXLEN").arg("~").arg(maxlen);
                    }
                    add.arg("*")
                        .arg("turn")
                        .arg(turn)
                        .arg("turn_id")
                        .arg(id)
                        .arg("user_id")
                        .arg(user)
                        .arg("worker")
                        .arg(&s.worker);
                }
                Write::DeadLetter(fields) => {
                    let add = step.cmd("XADD").arg(&self.keys.dlq);
                    if let Some(maxlen) = s.dlq_maxlen {
                        add.arg("MAXLEN").arg("~").arg(maxlen);
                    }
                    add.arg("*");
                    for (k, v) in fields {
                        add.arg(*k).arg(v);
                    }
                }
            }
        }
        if !args.acks.is_empty() {
            step.cmd("XACK")
                .arg(&self.keys.stream)
                .arg(&s.group)
                .arg(&args.acks);
        }
    }

    /// After a failed call: fencing ends the task; any other error (the
    /// connection, a restarting server) is retried after a pause, unless
    /// `stop` is set meanwhile.
    async fn after_error(
        &mut self,
        error: RedisError,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Failure> {
        if is_fenced(&error) {
            return Err(Failure::Fenced);
        }
        if error.code() == Some("NOGROUP") {
            return Err(Failure::GroupLost);
        }
        self.failing.failed(now_ms());
        if error.kind() == redis::ErrorKind::TryAgain {
            tracing::debug!(shard = %self.keys.stream, error = %error, "trying again");
            return Ok(());
        }
        if let Some(count) = self.log_throttle.occurred(&error.to_string(), now_ms()) {
            tracing::warn!(shard = %self.keys.stream, error = %error, count, "Redis call failed; retrying (count: failures of this kind since the last such line)");
        }
        self.reread_pending = true;
        tokio::select! {
            _ = stop.changed() => return Err(Failure::Stopped),
            () = tokio::time::sleep(RETRY_PAUSE) => {}
        }
        if *stop.borrow() {
            return Err(Failure::Stopped);
        }
        Ok(())
    }
}

/// The entry a dead letter is about.
struct DeadLetterAbout<'a> {
    entry: &'a Entry,
    /// What was decoded (see [`Entry::payload`]).
    payload: &'a [u8],
    form: &'static str,
    deliveries: u64,
}

/// Delivery counts from an extended `XPENDING` reply
/// (`[[id, consumer, idle ms, deliveries], …]`).
fn delivery_counts(reply: Value) -> Result<HashMap<String, u64>, String> {
    let Value::Array(rows) = reply else {
        return Err(format!("unexpected XPENDING reply {reply:?}"));
    };
    rows.into_iter()
        .map(|row| match row {
            Value::Array(mut cols) if cols.len() == 4 => {
                let count = match cols.pop() {
                    Some(Value::Int(n)) => n.max(0) as u64,
                    other => return Err(format!("unexpected delivery count {other:?}")),
                };
                cols.truncate(1);
                let id = super::entry::bulk_string(cols.pop().expect("four columns"))?;
                Ok((id, count))
            }
            other => Err(format!("unexpected XPENDING row {other:?}")),
        })
        .collect()
}

/// Counts a write-and-ack step that was not applied; an aborted transaction
/// (the lease was only renewed meanwhile) is retried at once and is no
/// failure. An applied step is counted by [`ShardTask::settle`].
fn count_commit(error: &RedisError) {
    if error.kind() != redis::ErrorKind::TryAgain {
        metrics::commit(false);
    }
}

fn protocol_error(message: String) -> RedisError {
    RedisError::from((redis::ErrorKind::TypeError, "unexpected reply", message))
}

/// The error a command's reply inside a transaction stands for.
fn reply_error(command: &str, reply: Option<Value>) -> RedisError {
    match reply {
        Some(Value::ServerError(e)) => e.into(),
        other => protocol_error(format!("unexpected {command} reply {other:?}")),
    }
}
