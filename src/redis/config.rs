//! `[redis]`: the Redis worker's section of the configuration.

use serde::{Deserialize, Serialize};

use crate::config::values::*;
use crate::config::{check_destinations, ConfigError};

/// `[redis]`: shard streams owned through leases, turns and dead letters
/// written with the acks in one fenced step.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` (TLS).
    pub url: String,
    /// ACL user, when not in the URL.
    #[serde(default)]
    pub username: Option<String>,
    /// Password, when not in the URL (mind that `check-config` prints it).
    #[serde(default)]
    pub password: Option<String>,
    /// A PEM file of the CA that signed the server's certificate, for
    /// `rediss://` servers with a private CA (default: the web PKI roots).
    #[serde(default)]
    pub tls_ca_file: Option<String>,
    /// The chat-event stream; with `shards > 1` the shards are
    /// `<input_stream>:{0}` … `<input_stream>:{N-1}`.
    pub input_stream: String,
    /// How many shard streams the input is split into (producers pick the
    /// shard by the documented hash of the session key).
    #[serde(default = "one", deserialize_with = "number")]
    pub shards: u32,
    /// The consumer group on every shard stream.
    #[serde(default = "default_group")]
    pub group: String,
    /// Where turns go (fields `turn`, `turn_id`, `user_id`).
    pub output_stream: String,
    /// Where dead letters go (fields `payload`, `reason`, `error`, …).
    pub dlq_stream: String,
    /// An entry delivered this many times without an outcome is
    /// dead-lettered (`max_deliveries`) instead of being delivered again.
    #[serde(default = "default_max_deliveries", deserialize_with = "number")]
    pub max_deliveries: u32,
    /// How long a shard lease lasts without renewal; renewed every third of
    /// it. A dead worker's shards move after this long.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: Millis,
    /// How long a read waits for new entries before the idle advance runs.
    #[serde(default = "default_block")]
    pub block: Millis,
    /// Entries per read (XREADGROUP COUNT).
    #[serde(default = "default_batch", deserialize_with = "number")]
    pub batch: u32,
    /// Approximate MAXLEN trimming of the output stream (off when absent).
    #[serde(default, deserialize_with = "optional_number")]
    pub output_maxlen: Option<u64>,
    /// Approximate MAXLEN trimming of the DLQ stream (off when absent).
    #[serde(default, deserialize_with = "optional_number")]
    pub dlq_maxlen: Option<u64>,
    /// Redis Cluster: shard streams are always hash-tagged and the output
    /// and DLQ streams are sharded like the input (`<output_stream>:{i}`), so
    /// every key one fenced step touches is in one hash slot.
    #[serde(default, deserialize_with = "boolean")]
    pub cluster: bool,
    /// What a worker does with an entry whose session key hashes to another
    /// shard than the stream it was written to (`docs/redis.md`).
    #[serde(default)]
    pub misrouted: MisroutedSetting,
}

/// `redis.misrouted`: `dlq` (the default) dead-letters a misrouted entry
/// with reason `misrouted`, so the rest of its user's burst is not split
/// across two workers and `dlq replay` can send it to its shard; `process`
/// processes it where it is, counted and logged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MisroutedSetting {
    Process,
    #[default]
    Dlq,
}

fn one() -> u32 {
    1
}

fn default_group() -> String {
    "sessionizer".to_owned()
}

fn default_max_deliveries() -> u32 {
    5
}

fn default_lease_ttl() -> Millis {
    Millis(10_000)
}

fn default_block() -> Millis {
    Millis(200)
}

fn default_batch() -> u32 {
    500
}

impl RedisSection {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("redis://") || self.url.starts_with("rediss://")) {
            return Err(ConfigError::new(
                "redis.url",
                "must start with redis:// or rediss:// (TLS)",
            ));
        }
        for (key, value) in [
            ("redis.input_stream", &self.input_stream),
            ("redis.group", &self.group),
            ("redis.output_stream", &self.output_stream),
            ("redis.dlq_stream", &self.dlq_stream),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::new(key, "must not be empty"));
            }
        }
        check_destinations(
            std::slice::from_ref(&self.input_stream),
            "the input stream",
            ("redis.output_stream", &self.output_stream),
            ("redis.dlq_stream", &self.dlq_stream),
        )?;
        if self.shards == 0 || self.shards > 16_384 {
            return Err(ConfigError::new("redis.shards", "must be from 1 to 16384"));
        }
        if self.max_deliveries == 0 {
            return Err(ConfigError::new(
                "redis.max_deliveries",
                "must be at least 1",
            ));
        }
        if self.lease_ttl.0 < 300 {
            return Err(ConfigError::new(
                "redis.lease_ttl",
                "must be at least 300ms (it is renewed every third of it)",
            ));
        }
        if self.block.0 <= 0 || self.block.0 * 2 > self.lease_ttl.0 {
            return Err(ConfigError::new(
                "redis.block",
                "must be greater than 0 and at most half of redis.lease_ttl",
            ));
        }
        if self.batch == 0 {
            return Err(ConfigError::new("redis.batch", "must be at least 1"));
        }
        for (key, maxlen) in [
            ("redis.output_maxlen", self.output_maxlen),
            ("redis.dlq_maxlen", self.dlq_maxlen),
        ] {
            if maxlen == Some(0) {
                return Err(ConfigError::new(
                    key,
                    "must be at least 1 (leave it out to keep every entry)",
                ));
            }
        }
        for (key, name) in [
            ("redis.output_stream", &self.output_stream),
            ("redis.dlq_stream", &self.dlq_stream),
        ] {
            let shard = name
                .strip_prefix(self.input_stream.as_str())
                .and_then(|rest| rest.strip_prefix(":{"))
                .and_then(|rest| rest.strip_suffix('}'));
            if shard.is_some_and(|i| i.parse::<u32>().is_ok()) {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "{name:?} is named like a shard stream of the input ({}:{{i}})",
                        self.input_stream
                    ),
                ));
            }
        }
        Ok(())
    }
}
