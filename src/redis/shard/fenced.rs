//! The fenced step: `WATCH` the lease, check it, `MULTI`, the step's writes
//! and acks, `EXEC`; and the queue of steps waiting to be written, whose
//! replies are checked one by one because a Redis transaction does not roll
//! back ([`StepQueue::settle`]).

use super::*;

/// The writes and acks of one fenced step.
#[derive(Debug, Default)]
pub(super) struct EmitArgs {
    /// Outcomes to write, each with the entry ids it resolves; those are
    /// acked only once the write's reply said it succeeded.
    pub(super) writes: Vec<(Write, Vec<String>)>,
    /// Entries whose outcome is durable already: drops, and writes an earlier
    /// step confirmed.
    pub(super) acks: Vec<String>,
    /// Entry ids in `writes` and `acks` (kept, not summed: the step is
    /// checked against [`ACKS_PER_EMIT`] for every outcome).
    pub(super) entries: usize,
}

impl EmitArgs {
    pub(super) fn write(&mut self, write: Write, ids: Vec<String>) {
        self.entries += ids.len();
        self.writes.push((write, ids));
    }

    pub(super) fn ack(&mut self, ids: impl IntoIterator<Item = String>) {
        let before = self.acks.len();
        self.acks.extend(ids);
        self.entries += self.acks.len() - before;
    }
}

/// One outcome's `XADD`.
#[derive(Debug)]
pub(super) enum Write {
    Turn {
        turn: Vec<u8>,
        id: String,
        user: String,
    },
    DeadLetter(Vec<(&'static str, Vec<u8>)>),
}

impl ShardTask {
    /// A fenced step's start: `WATCH` the lease and the fence key, run
    /// [`scripts::FENCE_CHECK`] (which touches the fence key unless the
    /// lease is ours), `MULTI`. The caller adds the step's commands and hands
    /// it to [`Self::fenced`].
    pub(super) fn begin_fenced(&self) -> redis::Pipeline {
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
    pub(super) async fn fenced(
        &mut self,
        mut step: redis::Pipeline,
    ) -> Result<Vec<Value>, RedisError> {
        step.cmd("EXEC");
        // The raw replies: `query_async` would rebuild the whole reply tree
        // twice to look for errors nested in it, a tenth of the worker's CPU
        // for big reads; errors can only stand at the top level here.
        let count = step.len();
        let replies =
            redis::aio::ConnectionLike::req_packed_commands(&mut self.conn, &step, 0, count)
                .await?;
        exec_outcome(replies)
    }

    /// Adds one step's commands to a transaction: an `XADD` per write, then
    /// one `XACK` (see [`Self::settle`] for their replies).
    pub(super) fn add_step(&self, step: &mut redis::Pipeline, args: &EmitArgs) {
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
}

/// Fenced steps waiting to be written, in order.
#[derive(Debug, Default)]
pub(super) struct StepQueue {
    pub steps: VecDeque<EmitArgs>,
    /// A write failed: write everything before reading more (see
    /// [`ShardTask::read_new`]), which also bounds what waits in memory.
    pub write_failed: bool,
}

impl StepQueue {
    /// The step the next outcome goes into: a new one once the last
    /// resolves [`ACKS_PER_EMIT`] entries.
    pub(super) fn step(&mut self) -> &mut EmitArgs {
        if self
            .steps
            .back()
            .is_none_or(|last| last.entries >= ACKS_PER_EMIT)
        {
            self.steps.push_back(EmitArgs::default());
        }
        self.steps.back_mut().expect("pushed above")
    }

    /// Checks the replies of an applied step, in the order [`Self::add_step`]
    /// added its commands: the entries of each write that succeeded are acked
    /// by the next step; a failed write goes back to the front of the queue
    /// with its entries (still pending); a failed `XACK` is retried (acking
    /// twice is harmless). Returns the first error, if any.
    pub(super) fn settle(
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
}

/// What a fenced step's replies say: `EXEC`'s replies when it was applied;
/// the fencing error when the check said the lease is not ours; `TryAgain`
/// when `EXEC` was refused because a watched key changed (the lease was
/// renewed); the first error before `EXEC` otherwise (nothing applied).
pub(super) fn exec_outcome(mut replies: Vec<Value>) -> Result<Vec<Value>, RedisError> {
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

/// Counts a write-and-ack step that was not applied; an aborted transaction
/// (the lease was only renewed meanwhile) is retried at once and is no
/// failure. An applied step is counted by [`ShardTask::settle`].
pub(super) fn count_commit(error: &RedisError) {
    if error.kind() != redis::ErrorKind::TryAgain {
        metrics::commit(false);
    }
}

pub(super) fn protocol_error(message: String) -> RedisError {
    RedisError::from((redis::ErrorKind::TypeError, "unexpected reply", message))
}

/// The error a command's reply inside a transaction stands for.
pub(super) fn reply_error(command: &str, reply: Option<Value>) -> RedisError {
    match reply {
        Some(Value::ServerError(e)) => e.into(),
        other => protocol_error(format!("unexpected {command} reply {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Value {
        Value::Okay
    }

    fn server_error(code: &str) -> Value {
        redis::parse_redis_value(format!("-{code} refused\r\n").as_bytes()).unwrap()
    }

    fn turn(id: &str) -> Write {
        Write::Turn {
            turn: b"{}".to_vec(),
            id: id.to_owned(),
            user: "u".to_owned(),
        }
    }

    #[test]
    fn exec_replies_say_applied_fenced_or_try_again() {
        let queued = Value::SimpleString("QUEUED".into());
        // WATCH, the check (1: ours), MULTI, one QUEUED, EXEC.
        let applied = exec_outcome(vec![
            ok(),
            Value::Int(1),
            ok(),
            queued.clone(),
            Value::Array(vec![Value::Int(1)]),
        ]);
        assert_eq!(applied.unwrap(), vec![Value::Int(1)]);
        let fenced =
            exec_outcome(vec![ok(), Value::Int(0), ok(), queued.clone(), Value::Nil]).unwrap_err();
        assert!(is_fenced(&fenced), "{fenced:?}");
        let renewed =
            exec_outcome(vec![ok(), Value::Int(1), ok(), queued, Value::Nil]).unwrap_err();
        assert_eq!(renewed.kind(), redis::ErrorKind::TryAgain);
        let aborted = exec_outcome(vec![
            ok(),
            Value::Int(1),
            ok(),
            server_error("OOM"),
            server_error("EXECABORT"),
        ]);
        assert!(aborted.is_err(), "an error before EXEC: nothing applied");
    }

    #[test]
    fn a_failed_write_keeps_its_entries_pending_and_a_confirmed_one_is_acked_next() {
        let mut queue = StepQueue::default();
        let mut args = EmitArgs::default();
        args.write(turn("t1"), vec!["1-0".into(), "1-1".into()]);
        args.write(turn("t2"), vec!["2-0".into()]);
        args.ack(["0-9".to_owned()]);
        // t1 written, t2 refused (WRONGTYPE), the XACK of 0-9 done.
        let replies = vec![
            Value::BulkString(b"5-0".to_vec()),
            server_error("WRONGTYPE"),
            Value::Int(1),
        ];
        let error = queue.settle(args, &mut replies.into_iter());
        assert!(error.is_some(), "the failed write is reported");
        assert!(queue.write_failed, "no more reads until it is written");
        let front = queue.steps.pop_front().unwrap();
        assert_eq!(front.writes.len(), 1, "t2 is written again");
        assert_eq!(
            front.writes[0].1,
            vec!["2-0".to_owned()],
            "its entry still pending"
        );
        assert!(front.acks.is_empty());
        let next = queue.steps.pop_front().unwrap();
        assert_eq!(
            next.acks,
            vec!["1-0".to_owned(), "1-1".to_owned()],
            "t1's entries are acked by the next step, not by the one that wrote it"
        );
        assert!(queue.steps.is_empty());
    }

    #[test]
    fn a_failed_ack_is_retried_and_a_clean_step_leaves_only_its_acks() {
        let mut queue = StepQueue::default();
        let mut args = EmitArgs::default();
        args.ack(["3-0".to_owned()]);
        assert!(queue
            .settle(args, &mut vec![server_error("READONLY")].into_iter())
            .is_some());
        assert_eq!(
            queue.steps.pop_front().unwrap().acks,
            vec!["3-0".to_owned()]
        );
        assert!(
            std::mem::take(&mut queue.write_failed),
            "as the read loop takes it"
        );
        let mut args = EmitArgs::default();
        args.write(turn("t"), vec!["4-0".into()]);
        assert!(queue
            .settle(
                args,
                &mut vec![Value::BulkString(b"9-0".to_vec())].into_iter()
            )
            .is_none());
        assert!(!queue.write_failed);
        assert_eq!(
            queue.steps.pop_front().unwrap().acks,
            vec!["4-0".to_owned()]
        );
    }
}
