//! Reading back the shard consumer's pending entries: a predecessor's
//! unacked work at takeover, entries whose read reply was lost, and the open
//! sessions' records after a panic.

use super::*;

impl ShardTask {
    /// The shard consumer's pending entries, oldest first, a page at a time.
    ///
    /// An entry delivered before (count ≥ 2) may be the one that killed the
    /// previous owner, so before processing such an entry its id is written
    /// to the shard's in-flight key. The entry named there when a new owner
    /// starts is the one a worker died on; once it has been delivered more
    /// than `max_deliveries` times it is dead-lettered instead. Entries that
    /// were merely pending beside it (open sessions) are replayed however
    /// often they were delivered, so a crash loop costs only its cause.
    pub(super) async fn replay_pending(
        &mut self,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Failure> {
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
    pub(super) async fn replay_after(
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
                if self.rebuild_pending {
                    // The rest stays pending; the rebuild reads it again.
                    break;
                }
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
            if self.rebuild_pending {
                break;
            }
        }
        Ok((replayed, marked))
    }

    /// Reads the in-flight key (`None`), or sets it to an entry id.
    pub(super) async fn in_flight(
        &mut self,
        set: Option<&str>,
    ) -> Result<Option<String>, RedisError> {
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

    pub(super) async fn clear_in_flight(&mut self) -> Result<(), RedisError> {
        redis::cmd("DEL")
            .arg(&self.keys.in_flight)
            .query_async(&mut self.conn)
            .await
    }

    /// Reads a page of pending entries after `cursor` with their delivery
    /// counts (this read included).
    pub(super) async fn read_pending(
        &mut self,
        cursor: &str,
    ) -> Result<Vec<(Entry, u64)>, RedisError> {
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
}

/// Delivery counts from an extended `XPENDING` reply
/// (`[[id, consumer, idle ms, deliveries], …]`).
pub(super) fn delivery_counts(reply: Value) -> Result<HashMap<String, u64>, String> {
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
                let id = crate::redis::entry::bulk_string(cols.pop().expect("four columns"))?;
                Ok((id, count))
            }
            other => Err(format!("unexpected XPENDING row {other:?}")),
        })
        .collect()
}
