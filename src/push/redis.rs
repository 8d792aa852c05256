//! `sessionizer push` on Redis: every output stream read in the push's own
//! consumer group, each entry acked once its turn is delivered or
//! dead-lettered; dead letters are entries of the `[push] dlq` stream.
//! At start the process first takes over entries other consumers of the
//! group left unacked for longer than a delivery can take, then reads its
//! own pending entries again (a restart after a crash), then new ones.

use std::time::Duration;

use anyhow::Context as _;
use redis::Value;
use tokio::sync::mpsc;

use super::{At, PushSection, Turn};
use crate::config::Config;
use crate::model::dead_letter_names::redis::*;
use crate::model::DeadLetterReason;
use crate::redis::connection::RedisConn;
use crate::redis::entry::{parse_read_reply, Entry};
use crate::redis::keys::ShardKeys;

/// Acks settled entries.
#[derive(Clone)]
pub struct RedisSide {
    conn: RedisConn,
    group: String,
}

impl std::fmt::Debug for RedisSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSide")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// Writes the push's dead letters.
#[derive(Clone)]
pub struct RedisDeadLetters {
    conn: RedisConn,
    dlq: String,
}

impl std::fmt::Debug for RedisDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDeadLetters")
            .field("dlq", &self.dlq)
            .finish_non_exhaustive()
    }
}

/// Creates the group on every output stream and starts one reader per
/// stream that sends each entry to `turns`.
pub async fn open(
    config: &Config,
    push: &PushSection,
    turns: mpsc::Sender<Turn>,
) -> anyhow::Result<(RedisSide, RedisDeadLetters)> {
    let section = config.redis.as_ref().context("[redis] is missing")?;
    let conn = crate::redis::connection::connect_command(section).await?;
    let client = crate::redis::connection::client(section)?;
    let consumer = push.consumer.clone().unwrap_or_else(|| "push".to_owned());
    // Longer than any delivery of a live consumer can take.
    let stale = push.max_elapsed.as_duration()
        + push.timeout.as_duration()
        + push.shutdown_grace.as_duration()
        + Duration::from_secs(60);
    let start = if push.start == "latest" { "$" } else { "0" };
    for stream in ShardKeys::output_streams(section) {
        let mut setup = conn.clone();
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(&push.group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async(&mut setup)
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            other => {
                other.with_context(|| format!("creating the group {} on {stream}", push.group))?
            }
        }
        let reader = Reader {
            conn: crate::redis::connection::connect(&client, Duration::from_secs(1))
                .await
                .context("connecting the turn reader")?,
            stream,
            group: push.group.clone(),
            consumer: consumer.clone(),
            format: config.output_format(),
            turns: turns.clone(),
        };
        reader.take_over(stale).await?;
        tokio::spawn(reader.run());
    }
    Ok((
        RedisSide {
            conn: conn.clone(),
            group: push.group.clone(),
        },
        RedisDeadLetters {
            conn,
            dlq: push.dlq.clone(),
        },
    ))
}

struct Reader {
    conn: RedisConn,
    stream: String,
    group: String,
    consumer: String,
    format: crate::codec::OutputFormat,
    turns: mpsc::Sender<Turn>,
}

impl Reader {
    /// Claims the entries other consumers left unacked for `stale` (they
    /// are then this consumer's pending entries, read by [`Reader::run`]).
    async fn take_over(&self, stale: Duration) -> anyhow::Result<()> {
        let mut cursor = "0-0".to_owned();
        loop {
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(stale.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(500)
                .arg("JUSTID")
                .query_async(&mut self.conn.clone())
                .await
                .with_context(|| format!("XAUTOCLAIM on {}", self.stream))?;
            let Value::Array(parts) = reply else {
                anyhow::bail!("XAUTOCLAIM answered {reply:?}");
            };
            let next = parts
                .into_iter()
                .next()
                .map(crate::redis::entry::bulk_string)
                .transpose()
                .map_err(anyhow::Error::msg)?
                .unwrap_or_else(|| "0-0".to_owned());
            if next == "0-0" {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// This consumer's pending entries first (read before a crash, or
    /// taken over), then new ones, until the receiver is gone.
    async fn run(mut self) {
        let mut pending_from = Some("0-0".to_owned());
        let mut failing =
            crate::metrics::FailingMark::after(crate::metrics::READER_FAILING_AFTER_MS);
        loop {
            let mut read = redis::cmd("XREADGROUP");
            read.arg("GROUP")
                .arg(&self.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(200);
            if pending_from.is_none() {
                read.arg("BLOCK").arg(1000);
            }
            read.arg("STREAMS")
                .arg(&self.stream)
                .arg(pending_from.as_deref().unwrap_or(">"));
            let reply: redis::RedisResult<Value> = read.query_async(&mut self.conn).await;
            let entries = match reply.map_err(|e| e.to_string()).and_then(parse_read_reply) {
                Ok(entries) => {
                    failing.ok();
                    entries
                }
                Err(e) => {
                    failing.failed(crate::wall_clock::now_ms());
                    tracing::warn!(error = %e, stream = %self.stream, "reading turns failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if pending_from.is_some() && entries.is_empty() {
                pending_from = None;
                continue;
            }
            for entry in entries {
                if pending_from.is_some() {
                    pending_from = Some(entry.id.clone());
                }
                if self.turns.send(self.turn(entry)).await.is_err() {
                    return;
                }
            }
        }
    }

    fn turn(&self, entry: Entry) -> Turn {
        let at = At::Redis {
            stream: self.stream.clone(),
            id: entry.id.clone(),
        };
        // A worker writes `turn`; `dlq replay` writes `payload`.
        let body = entry
            .field("turn")
            .or_else(|| entry.field(PAYLOAD))
            .map(<[u8]>::to_vec);
        match body {
            Some(body) => Turn::parse(body, at, self.format),
            None => Turn::poison(at, "the entry has no turn field (deleted, or not a turn)"),
        }
    }
}

impl RedisSide {
    /// `XACK`s the entry; an entry no longer pending (taken over by another
    /// consumer) is reported.
    pub async fn settled(&self, stream: &str, id: &str) -> anyhow::Result<()> {
        let acked: i64 = redis::cmd("XACK")
            .arg(stream)
            .arg(&self.group)
            .arg(id)
            .query_async(&mut self.conn.clone())
            .await
            .with_context(|| format!("XACK {stream} {id}"))?;
        if acked != 1 {
            tracing::warn!(%stream, %id, "a delivered turn was no longer pending in the group (taken over?)");
        }
        Ok(())
    }
}

impl RedisDeadLetters {
    /// Adds the dead letter to the DLQ stream; returns once Redis answered
    /// with its id.
    pub async fn write(
        &self,
        turn: &Turn,
        reason: DeadLetterReason,
        error: &str,
        status: Option<u16>,
        attempts: u32,
    ) -> anyhow::Result<()> {
        let At::Redis { stream, id } = &turn.at else {
            anyhow::bail!("not a Redis turn");
        };
        let mut add = redis::cmd("XADD");
        add.arg(&self.dlq)
            .arg("*")
            .arg(PAYLOAD)
            .arg(&turn.body)
            .arg(REASON)
            .arg(reason.as_str())
            .arg(ERROR)
            .arg(error)
            .arg(SOURCE_STREAM)
            .arg(stream)
            .arg(SOURCE_ID)
            .arg(id)
            .arg(FAILED_AT)
            .arg(crate::wall_clock::rfc3339_ms(crate::wall_clock::now_ms()))
            .arg(WORKER)
            .arg(crate::wall_clock::worker_id())
            .arg(DELIVERIES)
            .arg(attempts)
            .arg(FORM)
            .arg("payload");
        if let Some(status) = status {
            add.arg(HTTP_STATUS).arg(status);
        }
        let added: String = add
            .query_async(&mut self.conn.clone())
            .await
            .with_context(|| format!("XADD {}", self.dlq))?;
        anyhow::ensure!(!added.is_empty(), "XADD {} answered no id", self.dlq);
        Ok(())
    }
}
