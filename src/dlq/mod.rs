//! `sessionizer dlq`: inspect, count and replay the dead letters of any
//! source, from the worker's own configuration.
//!
//! - [`DlqEntry`] is a dead letter as the commands see it, whatever the
//!   store; [`Filter`] selects entries.
//! - [`output`]: the readable table, JSON lines, and the counts of `stats`.
//! - [`replay`]: the shared replay loop (max replays, `--transform`, rate).
//! - The stores live beside their brokers: `kafka::dlq`, `redis::dlq`,
//!   `file::dlq`; [`Store`] dispatches to them.

pub mod output;
pub mod replay;

use anyhow::Context as _;

use crate::codec::Decoder;
use crate::config::{Config, SourceKind};

pub use crate::model::dead_letter_names::{REPLAY_COUNT, REPLAY_FROM};

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqEntry {
    /// Where it is in the DLQ: `topic/partition/offset`, `stream/id` or
    /// `path:line`. Replays name it in [`REPLAY_FROM`].
    pub position: String,
    /// The broker-specific address of the same position.
    pub locator: Locator,
    /// RFC 3339, as the worker wrote it.
    pub failed_at: String,
    pub failed_at_ms: Option<i64>,
    pub reason: String,
    pub error: String,
    /// The input it came from: topic, stream or file.
    pub source: String,
    /// Kafka: the source partition; Redis: the shard index.
    pub source_partition: Option<String>,
    /// Offset, entry id or line number in the source.
    pub source_position: String,
    pub worker: String,
    pub replay_count: u32,
    /// The original record key (Kafka).
    pub key: Option<Vec<u8>>,
    /// The original record, byte for byte (its first bytes when `truncated`).
    pub payload: Vec<u8>,
    /// Set when the worker kept only the first bytes of a record over
    /// `input.max_record_bytes`: such a dead letter is never replayed as is.
    pub truncated: Option<crate::model::Truncated>,
    /// The original record's headers (Kafka), without the `sessionizer.dlq.*`
    /// provenance.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A DLQ position in the store's own terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locator {
    Kafka { partition: i32, offset: i64 },
    Redis { stream: String, id: String },
    File { line: u64 },
}

/// Which dead letters a command looks at.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Any of these reasons (all when empty).
    pub reasons: Vec<String>,
    /// Failed at or after (epoch ms).
    pub since_ms: Option<i64>,
    /// Failed before (epoch ms).
    pub until_ms: Option<i64>,
    /// Kafka: the source partition number; Redis: the shard index or the
    /// source stream's name.
    pub source_partition: Option<String>,
}

impl Filter {
    pub fn matches(&self, entry: &DlqEntry) -> bool {
        (self.reasons.is_empty() || self.reasons.contains(&entry.reason))
            && self
                .since_ms
                .is_none_or(|t| entry.failed_at_ms.is_some_and(|f| f >= t))
            && self
                .until_ms
                .is_none_or(|t| entry.failed_at_ms.is_some_and(|f| f < t))
            && self
                .source_partition
                .as_ref()
                .is_none_or(|p| entry.source_partition.as_ref() == Some(p) || &entry.source == p)
    }
}

/// `--since` / `--until`: an RFC 3339 time, or a duration ("90m", "2h")
/// meaning that long before `now_ms`.
pub fn parse_time(text: &str, now_ms: i64) -> Result<i64, String> {
    if let Some(t) = parse_failed_at(text) {
        return Ok(t);
    }
    humantime::parse_duration(text)
        .map(|d| now_ms - d.as_millis() as i64)
        .map_err(|_| format!("{text:?} is neither an RFC 3339 time nor a duration like \"2h\""))
}

/// Parses an RFC 3339 `failed_at`.
pub fn parse_failed_at(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// A source's dead-letter store as the `dlq` commands use it; each broker
/// folder implements it (`kafka/dlq.rs`, `redis/dlq.rs`, `file/dlq.rs`).
/// Only used with static dispatch through [`Store`], inside the crate.
#[allow(async_fn_in_trait)]
pub trait DeadLetterStore {
    /// Every dead letter there now, oldest first. `replay_group`: Kafka
    /// starts after that replay group's progress (the other stores keep
    /// none: Redis removes what it replays, a file is only read).
    async fn snapshot(&mut self, replay_group: Option<&str>) -> anyhow::Result<Vec<DlqEntry>>;

    /// Dead letters added since the last call (waits up to about a second
    /// for some), for `--follow`.
    async fn follow(&mut self) -> anyhow::Result<Vec<DlqEntry>>;

    /// For each entry, whether a `dlq replay` has handled it, where the store
    /// keeps dead letters after their replay (Kafka); `None` where it does
    /// not (Redis deletes what it replays; a file DLQ cannot know).
    fn replayed(&mut self, _entries: &[DlqEntry]) -> anyhow::Result<Option<Vec<bool>>> {
        Ok(None)
    }

    /// Where a record (`payload`, after any transform) goes back to: `to`,
    /// or where it came from; an error when it cannot go anywhere.
    fn target(
        &self,
        entry: &DlqEntry,
        _payload: &[u8],
        to: Option<&str>,
    ) -> anyhow::Result<String> {
        Ok(to.unwrap_or(&entry.source).to_owned())
    }

    /// The entry was looked at and not sent (Kafka's progress passes it).
    fn pass(&mut self, _entry: &DlqEntry) -> anyhow::Result<()> {
        Ok(())
    }

    /// Sends the record back to `target` and records that it was; `false`
    /// when another run replayed it first (Redis).
    async fn republish(
        &mut self,
        entry: &DlqEntry,
        payload: Vec<u8>,
        target: &str,
    ) -> anyhow::Result<bool>;

    /// The end of a replay: record the progress (Kafka), flush (file).
    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The dead-letter store a configuration names (one per command run, so its
/// size does not matter).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Store {
    Kafka(crate::kafka::dlq::KafkaDlq),
    Redis(crate::redis::dlq::RedisDlq),
    File(crate::file::dlq::FileDlq),
}

/// Calls a [`DeadLetterStore`] method on whichever store it is.
macro_rules! each {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            Store::Kafka($s) => $call,
            Store::Redis($s) => $call,
            Store::File($s) => $call,
        }
    };
}

impl Store {
    pub async fn open(config: &Config) -> anyhow::Result<Store> {
        Ok(match config.source {
            SourceKind::Kafka => Store::Kafka(crate::kafka::dlq::KafkaDlq::open(
                config.kafka.as_ref().context("[kafka] is missing")?,
            )?),
            SourceKind::Redis => Store::Redis(
                crate::redis::dlq::RedisDlq::open(
                    config.redis.as_ref().context("[redis] is missing")?,
                    Decoder::new(config.input_format(), config.decode_limits()),
                )
                .await?,
            ),
            SourceKind::File => {
                Store::File(crate::file::dlq::FileDlq::open(config.file_section()?)?)
            }
        })
    }
}

impl Store {
    /// The DLQ of `sessionizer push` (`[push] dlq`): its records are turns,
    /// and a replay sends each back to the output it was read from.
    pub async fn open_push(config: &Config) -> anyhow::Result<Store> {
        let push = config
            .push
            .as_ref()
            .context("--push: the configuration has no [push] section")?;
        Ok(match config.source {
            SourceKind::Kafka => {
                let mut kafka = config.kafka.clone().context("[kafka] is missing")?;
                kafka.dlq_topic = push.dlq.clone();
                Store::Kafka(crate::kafka::dlq::KafkaDlq::open(&kafka)?)
            }
            SourceKind::Redis => Store::Redis(
                crate::redis::dlq::RedisDlq::open_push(
                    config.redis.as_ref().context("[redis] is missing")?,
                    &push.dlq,
                    Decoder::new(config.input_format(), config.decode_limits()),
                )
                .await?,
            ),
            SourceKind::File => anyhow::bail!("--push: push reads from Kafka or Redis"),
        })
    }
}

impl DeadLetterStore for Store {
    async fn snapshot(&mut self, replay_group: Option<&str>) -> anyhow::Result<Vec<DlqEntry>> {
        each!(self, s => DeadLetterStore::snapshot(s, replay_group).await)
    }

    async fn follow(&mut self) -> anyhow::Result<Vec<DlqEntry>> {
        each!(self, s => DeadLetterStore::follow(s).await)
    }

    fn replayed(&mut self, entries: &[DlqEntry]) -> anyhow::Result<Option<Vec<bool>>> {
        each!(self, s => DeadLetterStore::replayed(s, entries))
    }

    fn target(&self, entry: &DlqEntry, payload: &[u8], to: Option<&str>) -> anyhow::Result<String> {
        each!(self, s => DeadLetterStore::target(s, entry, payload, to))
    }

    fn pass(&mut self, entry: &DlqEntry) -> anyhow::Result<()> {
        each!(self, s => DeadLetterStore::pass(s, entry))
    }

    async fn republish(
        &mut self,
        entry: &DlqEntry,
        payload: Vec<u8>,
        target: &str,
    ) -> anyhow::Result<bool> {
        each!(self, s => DeadLetterStore::republish(s, entry, payload, target).await)
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        each!(self, s => DeadLetterStore::finish(s))
    }
}
