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

use self::emit::DeadLetterAbout;
use self::fenced::{count_commit, protocol_error, EmitArgs, StepQueue, Write};
use super::connection::RedisConn;
use super::entry::{parse_read_reply, Entry};
use super::keys::ShardKeys;
use super::scripts::{self, is_fenced};
use crate::codec::{encode_turn_with_id, session_turn_id, Decoder, OutputFormat};
use crate::config::MisroutedSetting;
use crate::engine::ClosedSession;
use crate::engine::{IdleClock, IdlePolicy, WindowConfig};
use crate::log_throttle::LogThrottle;
use crate::metrics::{self, FailingMark, PartitionGauges};
use crate::model::dead_letter_names::redis as field;
use crate::model::{kept_payload, DeadLetterReason};
use crate::pipeline::{deliver_all, Outcome, OutcomeSink, PartitionPipeline, ShardRoute, Stats};
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
    /// The shard count, to check each entry's shard (`redis.misrouted`).
    pub shards: u32,
    pub misrouted: MisroutedSetting,
    /// `[redact]`: applied to each turn before it is encoded.
    pub redactor: Option<crate::redact::Redactor>,
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

mod emit;
mod fenced;
mod pending;

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
    /// Fenced steps waiting to be written.
    queue: StepQueue,
    /// Processing an entry panicked: the engine may be half-updated, so
    /// nothing more is processed until the shard is rebuilt
    /// ([`Self::rebuild`]).
    rebuild_pending: bool,
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
            pipeline: PartitionPipeline::new(settings.decoder.clone(), settings.window)
                .named(&keys.stream)
                .with_route(ShardRoute::new(
                    &keys.stream,
                    keys.index,
                    settings.shards,
                    settings.misrouted == MisroutedSetting::Dlq,
                )),
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
            queue: StepQueue::default(),
            rebuild_pending: false,
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
        (exit, self.pipeline.stats().clone())
    }

    /// Asked to stop: writes what is closed and acks what is written, so a
    /// graceful stop (a rolling restart, a rebalance) re-emits no turn. At
    /// most [`FLUSH_ON_STOP`], and nothing more after an error: what is not
    /// acked then is replayed by the next owner, as after a crash.
    async fn flush_on_stop(&mut self, stop: &mut watch::Receiver<bool>) {
        if self.queue.steps.is_empty() {
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
        self.forget_sessions();
        self.outcomes.clear();
        self.queue = StepQueue::default();
        self.last_seen = "0".to_owned();
        self.reread_pending = false;
        Ok(())
    }

    /// Drops the open sessions and the ids of their entries, which stay
    /// pending in Redis: the source hands them in again.
    fn forget_sessions(&mut self) {
        self.pipeline.reset_engine();
        self.idle = IdleClock::new(self.settings.idle);
        self.unresolved.clear();
        self.unresolved_base = self.next_seq;
    }

    /// After a panic (`docs/semantics.md`, "Panics"): writes and acks every
    /// outcome issued so far, so the consumer's pending entries are exactly
    /// the records of the open sessions (and those not processed after the
    /// panic); then starts the engine over and processes those again, in
    /// order. The entry that panicked is acked with its dead letter, so it is
    /// not among them.
    async fn rebuild(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), Failure> {
        self.emit(stop).await?;
        metrics::partition_rebuilt(&self.keys.stream);
        self.forget_sessions();
        self.rebuild_pending = false;
        let (entries, _) = self.replay_after("0", false, None, stop).await?;
        tracing::info!(shard = %self.keys.stream, entries, "rebuilt the open sessions after a panic");
        Ok(())
    }

    /// New entries, through the fenced read; waits up to `block` for more
    /// when caught up, and runs the idle advance.
    async fn read_new(&mut self, stop: &mut watch::Receiver<bool>) -> Failure {
        loop {
            if *stop.borrow() {
                return Failure::Stopped;
            }
            if self.rebuild_pending {
                if let Err(failure) = self.rebuild(stop).await {
                    return failure;
                }
                continue;
            }
            if std::mem::take(&mut self.queue.write_failed) {
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
                    if !self.queue.write_failed {
                        self.failing.ok();
                    }
                    read
                }
                Err((e, step)) => {
                    // Not written (or written without our knowing: then the
                    // retry re-emits the same turns, same `turn_id`s).
                    self.queue.steps.extend(step);
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
                if self.rebuild_pending {
                    break; // the rest stays pending: the rebuild reads it
                }
                self.process(entry, 1, false, now);
            }
            if caught_up && !self.rebuild_pending {
                let newest = self.pipeline.engine().max_event_time();
                self.idle.on_caught_up(now, newest);
            }
            if !self.rebuild_pending
                && self.idle.is_idle(now)
                && self.pipeline.engine().open_sessions() > 0
            {
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
            let _ = self.queue.settle(step, &mut replies);
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

    /// Hands one entry to the pipeline and collects what it resolved;
    /// `exhausted`: dead-letter it as `max_deliveries` instead.
    fn process(&mut self, entry: Entry, deliveries: u64, exhausted: bool, now: i64) {
        if entry.fields.is_none() {
            // Trimmed away while pending: nothing left to process or keep.
            tracing::warn!(shard = %self.keys.stream, id = %entry.id, "a pending entry was deleted; acking it");
            self.queue.step().ack([entry.id]);
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
                tracing::error!(shard = %self.keys.stream, id = %entry.id, panic = %panic, "processing an entry panicked; dead-lettered it, rebuilding the shard's open sessions");
                self.rebuild_pending = true;
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
