//! The Redis dead-letter stream as `sessionizer dlq` reads and replays it.
//!
//! A replay adds the record back to the shard stream of its session key
//! (see [`RedisDlq::target`]) and deletes the dead letter in one script: the
//! entry leaves the DLQ exactly when it is back in the input, so a replay
//! can be interrupted (even killed) and run again without sending anything
//! twice, and two replays running at once cannot both send one entry. (On a
//! cluster, a record routed to another shard than its dead letter's is two
//! steps in two slots; see [`RedisDlq::republish`].)

use std::collections::BTreeSet;

use anyhow::Context as _;
use redis::Value;

use super::connection::RedisConn;
use super::entry::{id_order, parse_entries, Entry};
use super::keys::{shard_of, ShardKeys};
use crate::codec::Decoder;
use crate::config::RedisSection;
use crate::dlq::{parse_failed_at, DlqEntry, Locator};
use crate::model::dead_letter_names::redis::*;
use crate::model::dead_letter_names::{REPLAY_COUNT, REPLAY_FROM};
use crate::model::Truncated;
use crate::wall_clock::now_ms;

/// Deletes the dead letter (`KEYS[1]`, id `ARGV[1]`) and, only if it was
/// still there, adds the record to `KEYS[2]`.
static REPLAY: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'payload', ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return 1
",
    )
});

const PAGE: usize = 1_000;

/// The DLQ stream(s) of a `[redis]` configuration (one per shard on a
/// cluster, else one).
pub struct RedisDlq {
    conn: RedisConn,
    streams: Vec<String>,
    /// The shard streams the workers read, by shard index: where a replay
    /// sends a record (see [`RedisDlq::target`]).
    inputs: Vec<String>,
    /// The workers' decoder, for the session key of a replayed record.
    decoder: Decoder,
    /// `redis.misrouted = "process"`: producers route their own way, so a
    /// record goes back to its source stream while a worker reads it.
    keep_source: bool,
    /// For `follow`: the last id seen per stream.
    last: Vec<String>,
}

impl std::fmt::Debug for RedisDlq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDlq")
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

impl RedisDlq {
    pub async fn open(section: &RedisSection, decoder: Decoder) -> anyhow::Result<RedisDlq> {
        let conn = super::connection::connect_command(section).await?;
        let streams: Vec<String> = ShardKeys::all(section)
            .into_iter()
            .map(|k| k.dlq)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let last = vec!["0-0".to_owned(); streams.len()];
        Ok(RedisDlq {
            conn,
            streams,
            inputs: ShardKeys::all(section)
                .into_iter()
                .map(|k| k.stream)
                .collect(),
            decoder,
            keep_source: section.misrouted == crate::config::MisroutedSetting::Process,
            last,
        })
    }

    /// The DLQ stream of `sessionizer push`: its records are turns, and a
    /// replay sends each back to the output stream it was read from.
    pub async fn open_push(
        section: &RedisSection,
        dlq: &str,
        decoder: Decoder,
    ) -> anyhow::Result<RedisDlq> {
        let conn = super::connection::connect_command(section).await?;
        Ok(RedisDlq {
            conn,
            streams: vec![dlq.to_owned()],
            inputs: ShardKeys::output_streams(section),
            decoder,
            // A turn goes back to the output stream it came from.
            keep_source: true,
            last: vec!["0-0".to_owned()],
        })
    }

    /// Every dead letter there now, oldest first (by entry id).
    pub async fn snapshot(&mut self) -> anyhow::Result<Vec<DlqEntry>> {
        let mut all = Vec::new();
        for (index, stream) in self.streams.iter().enumerate() {
            let mut from = "-".to_owned();
            loop {
                let reply: Value = redis::cmd("XRANGE")
                    .arg(stream)
                    .arg(&from)
                    .arg("+")
                    .arg("COUNT")
                    .arg(PAGE)
                    .query_async(&mut self.conn)
                    .await
                    .with_context(|| format!("reading {stream}"))?;
                let page = parse_entries(reply).map_err(anyhow::Error::msg)?;
                let Some(last) = page.last() else { break };
                from = format!("({}", last.id);
                self.last[index] = last.id.clone();
                let full = page.len() == PAGE;
                all.extend(page.iter().map(|e| entry(stream, e)));
                if !full {
                    break;
                }
            }
        }
        all.sort_by_key(|e| match &e.locator {
            Locator::Redis { id, .. } => id_order(id),
            _ => unreachable!("Redis entries"),
        });
        Ok(all)
    }

    /// New dead letters since the last read (waits up to a second). One
    /// blocking `XREAD` of the DLQ stream; on a cluster, where each shard
    /// has its own DLQ stream in its own slot, one non-blocking read each.
    pub async fn follow(&mut self) -> anyhow::Result<Vec<DlqEntry>> {
        if self.streams.len() == 1 {
            let reply: Value = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(1_000)
                .arg("STREAMS")
                .arg(&self.streams)
                .arg(&self.last)
                .query_async(&mut self.conn)
                .await?;
            return self.new_entries(reply);
        }
        let mut out = Vec::new();
        for index in 0..self.streams.len() {
            let reply: Value = redis::cmd("XREAD")
                .arg("STREAMS")
                .arg(&self.streams[index])
                .arg(&self.last[index])
                .query_async(&mut self.conn)
                .await?;
            out.extend(self.new_entries(reply)?);
        }
        if out.is_empty() {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        Ok(out)
    }

    /// The entries of an `XREAD` reply; moves the read positions past them.
    fn new_entries(&mut self, reply: Value) -> anyhow::Result<Vec<DlqEntry>> {
        let mut out = Vec::new();
        let Value::Array(streams) = reply else {
            return Ok(out); // nil: nothing new
        };
        for item in streams {
            let Value::Array(mut pair) = item else {
                continue;
            };
            let entries =
                parse_entries(pair.pop().unwrap_or(Value::Nil)).map_err(anyhow::Error::msg)?;
            let name = super::entry::bulk_string(pair.pop().unwrap_or(Value::Nil))
                .map_err(anyhow::Error::msg)?;
            let Some(index) = self.streams.iter().position(|s| *s == name) else {
                continue;
            };
            if let Some(last) = entries.last() {
                self.last[index] = last.id.clone();
            }
            out.extend(entries.iter().map(|e| entry(&name, e)));
        }
        Ok(out)
    }

    /// Adds the record to `target` and removes the dead letter, atomically;
    /// `false` when the dead letter was gone already.
    pub async fn republish(
        &mut self,
        e: &DlqEntry,
        payload: Vec<u8>,
        target: &str,
    ) -> anyhow::Result<bool> {
        let Locator::Redis { stream, id } = &e.locator else {
            anyhow::bail!("not a Redis dead letter: {}", e.position);
        };
        let done: Result<i64, redis::RedisError> = REPLAY
            .key(stream)
            .key(target)
            .arg(id)
            .arg(&payload)
            .arg(REPLAY_FROM)
            .arg(&e.position)
            .arg(REPLAY_COUNT)
            .arg(e.replay_count + 1)
            .invoke_async(&mut self.conn)
            .await;
        match done {
            Ok(done) => Ok(done == 1),
            // On a cluster, a record routed to another shard than the one it
            // was dead-lettered from has its DLQ stream and its target in two
            // slots: add it, then delete the dead letter (a kill between the
            // two sends it again on the next run; docs/operations.md).
            Err(error) if error.kind() == redis::ErrorKind::CrossSlot => {
                let _: String = redis::cmd("XADD")
                    .arg(target)
                    .arg("*")
                    .arg("payload")
                    .arg(&payload)
                    .arg(REPLAY_FROM)
                    .arg(&e.position)
                    .arg(REPLAY_COUNT)
                    .arg(e.replay_count + 1)
                    .query_async(&mut self.conn)
                    .await
                    .with_context(|| format!("replaying {} to {target}", e.position))?;
                let deleted: i64 = redis::cmd("XDEL")
                    .arg(stream)
                    .arg(id)
                    .query_async(&mut self.conn)
                    .await
                    .with_context(|| format!("deleting the replayed {}", e.position))?;
                if deleted == 0 {
                    tracing::warn!(position = %e.position, "another replay sent this dead letter too: it went to the input twice");
                }
                Ok(true)
            }
            Err(error) => Err(error).with_context(|| format!("replaying {}", e.position)),
        }
    }
}

/// The shard index of a shard stream name (`chat:{3}` → 3; an untagged
/// single stream is shard 0).
fn shard_index(stream: &str) -> String {
    stream
        .rsplit_once(":{")
        .and_then(|(_, rest)| rest.strip_suffix('}'))
        .unwrap_or("0")
        .to_owned()
}

fn entry(stream: &str, e: &Entry) -> DlqEntry {
    let text = |name: &str| String::from_utf8_lossy(e.field(name).unwrap_or_default()).into_owned();
    let source = text(SOURCE_STREAM);
    let failed_at = text(FAILED_AT);
    DlqEntry {
        position: format!("{stream}/{}", e.id),
        locator: Locator::Redis {
            stream: stream.to_owned(),
            id: e.id.clone(),
        },
        failed_at_ms: parse_failed_at(&failed_at),
        failed_at,
        reason: text(REASON),
        error: text(ERROR),
        source_partition: Some(shard_index(&source)),
        source,
        source_position: text(SOURCE_ID),
        worker: text(WORKER),
        replay_count: text(REPLAY_COUNT).parse().unwrap_or(0),
        key: None,
        payload: e.field(PAYLOAD).unwrap_or_default().to_vec(),
        truncated: e
            .field(TRUNCATED_BYTES)
            .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
            .map(|original_bytes| Truncated {
                original_bytes,
                original_sha256: text(TRUNCATED_SHA256),
            }),
        headers: Vec::new(),
    }
}

impl crate::dlq::DeadLetterStore for RedisDlq {
    /// Redis keeps no replay progress: what a replay sends back it removes.
    async fn snapshot(&mut self, _replay_group: Option<&str>) -> anyhow::Result<Vec<DlqEntry>> {
        RedisDlq::snapshot(self).await
    }

    async fn follow(&mut self) -> anyhow::Result<Vec<DlqEntry>> {
        RedisDlq::follow(self).await
    }

    /// `to`, or the shard stream of the record's session key under the
    /// current `redis.shards`, so a misrouted entry, or one from before a
    /// reshard, goes where a worker reads its user (under `misrouted =
    /// "process"`, its source stream while a worker reads it). A record
    /// without a key (it does not decode) goes back to its source stream,
    /// unless no worker reads that one: then it has nowhere to go, and the
    /// replay skips it with the reason.
    fn target(&self, entry: &DlqEntry, payload: &[u8], to: Option<&str>) -> anyhow::Result<String> {
        if let Some(to) = to {
            return Ok(to.to_owned());
        }
        if self.keep_source && self.inputs.contains(&entry.source) {
            return Ok(entry.source.clone());
        }
        if let Ok(event) = self.decoder.decode(payload, now_ms()) {
            let shards = self.inputs.len() as u32;
            let shard = shard_of(&event.user_id, event.conversation_id.as_deref(), shards);
            return Ok(self.inputs[shard as usize].clone());
        }
        if self.inputs.contains(&entry.source) {
            return Ok(entry.source.clone());
        }
        anyhow::bail!(
            "{} came from {}, a stream no worker reads under this configuration (redis.shards = \
             {}: {} … {}), and its payload does not decode, so it has no session key to route it \
             by: fix it with --transform, or send it elsewhere with --to",
            entry.position,
            entry.source,
            self.inputs.len(),
            self.inputs[0],
            self.inputs[self.inputs.len() - 1],
        )
    }

    async fn republish(
        &mut self,
        entry: &DlqEntry,
        payload: Vec<u8>,
        target: &str,
    ) -> anyhow::Result<bool> {
        RedisDlq::republish(self, entry, payload, target).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_index_of_stream_names() {
        assert_eq!(shard_index("chat:{3}"), "3");
        assert_eq!(shard_index("chat"), "0");
        assert_eq!(id_order("1700000000000-5"), (1_700_000_000_000, 5));
    }
}
