//! From outcomes to fenced steps: each turn or dead letter becomes a write
//! with the entry ids it resolves ([`ShardOutput`], the shard's
//! [`OutcomeSink`]), and the steps are written in order, retried until
//! written, fenced or stopped.

use super::*;

impl ShardTask {
    /// Moves outcomes into the emit batch (see [`ShardOutput`]).
    pub(super) fn collect(
        &mut self,
        outcomes: &mut Vec<Outcome>,
        about: Option<DeadLetterAbout<'_>>,
    ) {
        deliver_all(outcomes, &mut ShardOutput { task: self, about });
    }

    /// The entry id of a resolved record (once).
    pub(super) fn take_id(&mut self, seq: u64) -> Option<String> {
        let index = usize::try_from(seq.checked_sub(self.unresolved_base)?).ok()?;
        let id = self.unresolved.get_mut(index)?.take();
        while let Some(None) = self.unresolved.front() {
            self.unresolved.pop_front();
            self.unresolved_base += 1;
        }
        id
    }

    /// Writes the waiting steps in order, and then acks what they wrote,
    /// retrying connection errors and failed writes until each is written,
    /// fenced or stopped.
    pub(super) async fn emit(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), Failure> {
        self.emit_until(0, stop).await
    }

    /// Writes steps from the front until at most `left` remain.
    pub(super) async fn emit_until(
        &mut self,
        left: usize,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Failure> {
        while self.queue.steps.len() > left {
            let args = self.queue.steps.pop_front().expect("more than left");
            if let Err(e) = self.emit_once(args).await {
                self.after_error(e, stop).await?;
            }
        }
        Ok(())
    }

    /// Writes one step in one fenced transaction. Whatever did not succeed is
    /// put back at the front of the queue, and the error returned.
    pub(super) async fn emit_once(&mut self, args: EmitArgs) -> Result<(), RedisError> {
        let mut step = self.begin_fenced();
        self.add_step(&mut step, &args);
        match self.fenced(step).await {
            Ok(replies) => match self.queue.settle(args, &mut replies.into_iter()) {
                None => {
                    self.failing.ok();
                    Ok(())
                }
                Some(e) => Err(e),
            },
            Err(e) => {
                count_commit(&e);
                self.queue.steps.push_front(args);
                Err(e)
            }
        }
    }

    /// Writes all waiting steps but the last, which is returned to go with
    /// the next read.
    pub(super) async fn emit_all_but_last(
        &mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<EmitArgs>, Failure> {
        self.emit_until(1, stop).await?;
        Ok(self.queue.steps.pop_back())
    }
}

/// A shard's outcomes on their way into its fenced steps: turns encoded,
/// dead letters with their fields, and the entry ids each resolves.
pub(super) struct ShardOutput<'a, 'e> {
    pub(super) task: &'a mut ShardTask,
    /// The entry just processed, the only one a dead letter can be about.
    pub(super) about: Option<DeadLetterAbout<'e>>,
}

impl OutcomeSink for ShardOutput<'_, '_> {
    fn turn(&mut self, mut session: ClosedSession) {
        let task = &mut *self.task;
        metrics::observe_emit(&session, task.settings.window.gap_ms, now_ms());
        if let Some(redactor) = &task.settings.redactor {
            redactor.apply(&mut session);
        }
        let id = session_turn_id(&session);
        let mut turn = Vec::with_capacity(512);
        encode_turn_with_id(&session, &id, task.settings.format, &mut turn);
        let user = session.user_id;
        let acks: Vec<String> = session
            .seqs
            .iter()
            .filter_map(|seq| task.take_id(*seq))
            .collect();
        task.queue
            .step()
            .write(Write::Turn { turn, id, user }, acks);
    }

    fn dead_letter(&mut self, seq: u64, reason: DeadLetterReason, error: String) {
        let task = &mut *self.task;
        let about = self
            .about
            .as_ref()
            .expect("dead letters are about the entry just processed");
        let (payload, truncated) = kept_payload(
            about.payload,
            task.settings.decoder.limits().max_record_bytes,
        );
        let mut fields = vec![
            (field::PAYLOAD, payload.to_vec()),
            (field::REASON, reason.as_str().as_bytes().to_vec()),
            (field::ERROR, error.into_bytes()),
            (field::SOURCE_STREAM, task.keys.stream.clone().into_bytes()),
            (field::SOURCE_ID, about.entry.id.as_bytes().to_vec()),
            (field::FAILED_AT, rfc3339_ms(now_ms()).into_bytes()),
            (field::WORKER, task.settings.worker.clone().into_bytes()),
            (field::DELIVERIES, about.deliveries.to_string().into_bytes()),
            (field::FORM, about.form.as_bytes().to_vec()),
        ];
        if let Some(t) = truncated {
            fields.push((
                field::TRUNCATED_BYTES,
                t.original_bytes.to_string().into_bytes(),
            ));
            fields.push((field::TRUNCATED_SHA256, t.original_sha256.into_bytes()));
        }
        // A record that fails again after a `dlq replay` keeps its replay
        // count.
        for (name, value) in about.entry.replay_fields() {
            fields.push((name, value.to_vec()));
        }
        let acks = task.take_id(seq).into_iter().collect();
        task.queue.step().write(Write::DeadLetter(fields), acks);
    }

    fn resolve(&mut self, seqs: &[u64], _held_by: Option<u64>) {
        let acks: Vec<String> = seqs.iter().filter_map(|s| self.task.take_id(*s)).collect();
        self.task.queue.step().ack(acks);
    }
}

/// The entry a dead letter is about.
pub(super) struct DeadLetterAbout<'a> {
    pub(super) entry: &'a Entry,
    /// What was decoded (see [`Entry::payload`]).
    pub(super) payload: &'a [u8],
    pub(super) form: &'static str,
    pub(super) deliveries: u64,
}
