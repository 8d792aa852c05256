//! `[push]`: where `sessionizer push` delivers turns, and how hard it tries.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::values::*;
use crate::config::ConfigError;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PushSection {
    /// `http://` or `https://` URL each turn is POSTed to.
    pub url: String,
    /// The consumer group that tracks what was delivered (Kafka group id,
    /// Redis consumer group on the output streams).
    #[serde(default = "default_group")]
    pub group: String,
    /// Where turns that cannot be delivered go: a Kafka topic or a Redis
    /// stream (the source's kind).
    pub dlq: String,
    /// Redis: this process's consumer name in the group (default: the
    /// host name). Give each `push` process its own; a restart under the
    /// same name delivers again what the last run read and did not settle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Session keys delivered at once (each key one turn at a time).
    #[serde(default = "default_concurrency", deserialize_with = "number")]
    pub concurrency: usize,
    /// How long one attempt may take.
    #[serde(default = "default_timeout")]
    pub timeout: Millis,
    /// Attempts per turn at most, the first included.
    #[serde(default = "default_max_attempts", deserialize_with = "number")]
    pub max_attempts: u32,
    /// How long a turn may be retried, from its first attempt.
    #[serde(default = "default_max_elapsed")]
    pub max_elapsed: Millis,
    /// The first retry's delay; each next one doubles, up to `max_backoff`,
    /// with jitter.
    #[serde(default = "default_backoff")]
    pub backoff: Millis,
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Millis,
    /// The body's format: must be the output's (`[output] format`); turns
    /// are sent as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Where a new group starts: `earliest` (every turn the output keeps)
    /// or `latest` (turns written from now on).
    #[serde(default = "default_start")]
    pub start: String,
    /// At SIGTERM, how long calls in progress may still finish.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: Millis,
    /// Headers sent with every call (for the agent's authentication).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_group() -> String {
    "sessionizer-push".to_owned()
}
fn default_concurrency() -> usize {
    16
}
fn default_timeout() -> Millis {
    Millis(10_000)
}
fn default_max_attempts() -> u32 {
    8
}
fn default_max_elapsed() -> Millis {
    Millis(300_000)
}
fn default_backoff() -> Millis {
    Millis(200)
}
fn default_max_backoff() -> Millis {
    Millis(30_000)
}
fn default_start() -> String {
    "earliest".to_owned()
}
fn default_shutdown_grace() -> Millis {
    Millis(10_000)
}

impl PushSection {
    pub(crate) fn validate(&self, output_format: &str) -> Result<(), ConfigError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(ConfigError::new(
                "push.url",
                "must start with http:// or https://",
            ));
        }
        for (key, value) in [("push.group", &self.group), ("push.dlq", &self.dlq)] {
            if value.trim().is_empty() {
                return Err(ConfigError::new(key, "must not be empty"));
            }
        }
        if self.concurrency == 0 {
            return Err(ConfigError::new("push.concurrency", "must be at least 1"));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::new("push.max_attempts", "must be at least 1"));
        }
        for (key, value) in [
            ("push.timeout", self.timeout),
            ("push.max_elapsed", self.max_elapsed),
            ("push.backoff", self.backoff),
            ("push.max_backoff", self.max_backoff),
        ] {
            if value.0 <= 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        if self.shutdown_grace.0 < 0 {
            return Err(ConfigError::new(
                "push.shutdown_grace",
                "must not be negative",
            ));
        }
        if !matches!(self.start.as_str(), "earliest" | "latest") {
            return Err(ConfigError::new(
                "push.start",
                "must be \"earliest\" or \"latest\"",
            ));
        }
        if let Some(format) = &self.format {
            if format != output_format {
                return Err(ConfigError::new(
                    "push.format",
                    format!(
                        "must be the turn output's format ([output] format = \"{output_format}\"): turns are delivered as written"
                    ),
                ));
            }
        }
        for name in self.headers.keys() {
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError::new(
                    "push.headers",
                    format!("{name:?} is not a valid header name"),
                ));
            }
        }
        Ok(())
    }
}
