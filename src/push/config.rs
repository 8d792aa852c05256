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
    /// Redis: this process's consumer name in the group (default
    /// `push`). A restart under the same name first delivers what the last
    /// run read and did not settle.
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

/// The most keys delivered at once (each holds a task and a connection).
const MAX_CONCURRENCY: usize = 10_000;

/// Headers push sets itself.
const OWN_HEADERS: [&str; 3] = ["idempotency-key", "content-type", "content-length"];

impl PushSection {
    /// Checks the section; `output` is where the workers write turns (Kafka
    /// topic, or Redis stream base name) and `worker_group` the workers'
    /// Kafka group, which push must not join.
    pub(crate) fn validate(
        &self,
        output_format: &str,
        output: &str,
        worker_group: Option<&str>,
    ) -> Result<(), ConfigError> {
        match reqwest::Url::parse(&self.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            Ok(_) => {
                return Err(ConfigError::new(
                    "push.url",
                    "must be an http:// or https:// URL with a host",
                ))
            }
            Err(e) => return Err(ConfigError::new("push.url", format!("not a URL: {e}"))),
        }
        if self.dlq == output {
            return Err(ConfigError::new(
                "push.dlq",
                "must not be the turn output: a dead letter would be delivered again, forever",
            ));
        }
        if Some(self.group.as_str()) == worker_group {
            return Err(ConfigError::new(
                "push.group",
                "must not be kafka.group_id: push would join the workers' group",
            ));
        }
        if self.concurrency > MAX_CONCURRENCY {
            return Err(ConfigError::new(
                "push.concurrency",
                format!("must be at most {MAX_CONCURRENCY}"),
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
        for (name, value) in &self.headers {
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError::new(
                    "push.headers",
                    format!("{name:?} is not a valid header name"),
                ));
            }
            if OWN_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(ConfigError::new(
                    "push.headers",
                    format!("{name} is set by push itself"),
                ));
            }
            if axum::http::HeaderValue::from_str(value).is_err() {
                return Err(ConfigError::new(
                    "push.headers",
                    format!("the value of {name} is not a valid header value"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const KAFKA: &str = "source = \"kafka\"\n[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"workers\"\ninput_topics = [\"chat\"]\noutput_topic = \"turns\"\ndlq_topic = \"dlq\"\n";

    fn refused(push: &str) -> (String, String) {
        let e = Config::from_toml(&format!("{KAFKA}[push]\n{push}"), Vec::new()).unwrap_err();
        (e.key, e.reason)
    }

    #[test]
    fn push_sections_that_cannot_work_fail_at_start_naming_the_key() {
        let ok = "url = \"http://agent:9000/turns\"\ndlq = \"push-dlq\"\n";
        assert!(Config::from_toml(&format!("{KAFKA}[push]\n{ok}"), Vec::new()).is_ok());
        for (push, key) in [
            ("url = \"agent:9000\"\ndlq = \"d\"", "push.url"),
            ("url = \"http://\"\ndlq = \"d\"", "push.url"),
            ("url = \"ftp://agent/\"\ndlq = \"d\"", "push.url"),
            ("url = \"http://a/\"\ndlq = \"turns\"", "push.dlq"),
            (
                "url = \"http://a/\"\ndlq = \"d\"\ngroup = \"workers\"",
                "push.group",
            ),
            (
                "url = \"http://a/\"\ndlq = \"d\"\nconcurrency = 0",
                "push.concurrency",
            ),
            (
                "url = \"http://a/\"\ndlq = \"d\"\nconcurrency = 1000000",
                "push.concurrency",
            ),
            (
                "url = \"http://a/\"\ndlq = \"d\"\nmax_attempts = 0",
                "push.max_attempts",
            ),
            (
                "url = \"http://a/\"\ndlq = \"d\"\ntimeout = \"0s\"",
                "push.timeout",
            ),
            (
                "url = \"http://a/\"\ndlq = \"d\"\nstart = \"middle\"",
                "push.start",
            ),
            (
                "url = \"http://a/\"\ndlq = \"d\"\nformat = \"protobuf\"",
                "push.format",
            ),
            (
                "url = \"http://a/\"\ndlq = \"d\"\n[push.headers]\nIdempotency-Key = \"x\"",
                "push.headers",
            ),
            (
                "url = \"http://a/\"\ndlq = \"d\"\n[push.headers]\n\"x y\" = \"v\"",
                "push.headers",
            ),
            (
                "url = \"http://a/\"\ndlq = \"d\"\n[push.headers]\nx = \"a\\nb\"",
                "push.headers",
            ),
        ] {
            assert_eq!(refused(push).0, key, "{push}");
        }
    }
}
