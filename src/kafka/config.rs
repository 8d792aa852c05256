//! `[kafka]`: the Kafka worker's section of the configuration.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::values::*;
use crate::config::{check_destinations, ConfigError};

/// `[kafka]`: a consumer group between the chat-events topics, the turns topic
/// and the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSection {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// The consumer group every worker of this deployment joins.
    pub group_id: String,
    /// Chat-event topics (from the environment: comma-separated). Producers
    /// must key records by user id.
    #[serde(deserialize_with = "list")]
    pub input_topics: Vec<String>,
    /// Where turns go, keyed by session key.
    pub output_topic: String,
    /// Where dead letters go: original key, value and headers plus
    /// `sessionizer.dlq.*` headers.
    pub dlq_topic: String,
    /// Producer acks for turns: `"0"`, `"1"` or `"all"` (idempotent producer).
    /// With `"0"` a turn counts as durable once handed to the producer: less
    /// latency, and turns can be lost if a broker fails.
    #[serde(default)]
    pub output_acks: Acks,
    /// Producer acks for dead letters, as `output_acks`.
    #[serde(default)]
    pub dlq_acks: Acks,
    /// One transaction per commit interval holds the turns, the dead letters
    /// and the consumed offsets; `read_committed` readers never see a
    /// duplicate turn. Needs acks `"all"` and brokers with transactions.
    #[serde(default, deserialize_with = "boolean")]
    pub exactly_once: bool,
    /// With `exactly_once`: this worker's `transactional.id`, unique per
    /// worker and stable across its restarts, so a restarted worker fences
    /// its predecessor's open transaction at once. Default
    /// `<group_id>-<hostname>`; set it when several workers share a host.
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// How often resolved offsets are committed (and, with `exactly_once`,
    /// how long a transaction stays open).
    #[serde(default = "default_commit_interval")]
    pub commit_interval: Millis,
    /// How many bytes of turns and dead letters may wait for the broker's
    /// acknowledgement: past it the worker pauses fetching every partition
    /// until half of it is acknowledged, so an output that is down or slow
    /// stops the input instead of filling memory.
    #[serde(default = "default_max_in_flight_bytes", deserialize_with = "number")]
    pub max_in_flight_bytes: u64,
    /// A partition whose commit point has not advanced for this long while
    /// records wait behind it counts as failing (`/readyz` answers 503). An
    /// open session holds the commit point at its first record for up to
    /// `window.max_duration` + `window.gap`, so it must be longer than that.
    #[serde(default = "default_commit_stall")]
    pub commit_stall: Millis,
    /// On a broker that does not keep commit metadata, how long a partition's
    /// commit may stay pulled back to the first record of a delivered turn
    /// that spans the resolved prefix's end; then it moves to that end (a
    /// crash after that may re-send the rest of such a turn as a turn of its
    /// own). Bounds what a crash replays when turns overlap without pause.
    #[serde(default = "default_max_pullback")]
    pub max_pullback: Millis,
    /// Passed to librdkafka verbatim, for consumer and producers alike: TLS
    /// (`security.protocol`, `ssl.ca.location`, …), SASL, timeouts.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_commit_interval() -> Millis {
    Millis(1_000)
}

fn default_max_pullback() -> Millis {
    Millis(60_000)
}

fn default_commit_stall() -> Millis {
    Millis(300_000)
}

fn default_max_in_flight_bytes() -> u64 {
    64 << 20
}

/// Producer acknowledgements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// Fire and forget.
    Zero,
    /// The partition leader has it.
    One,
    /// Every in-sync replica has it; turns on the idempotent producer.
    #[default]
    All,
}

impl Acks {
    pub fn as_str(self) -> &'static str {
        match self {
            Acks::Zero => "0",
            Acks::One => "1",
            Acks::All => "all",
        }
    }
}

impl<'de> Deserialize<'de> for Acks {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        let raw = Raw::deserialize(deserializer)
            .map_err(|_| serde::de::Error::custom("expected \"0\", \"1\" or \"all\""))?;
        match raw {
            Raw::Int(0) => Ok(Acks::Zero),
            Raw::Int(1) => Ok(Acks::One),
            Raw::Str(s) if s == "0" => Ok(Acks::Zero),
            Raw::Str(s) if s == "1" => Ok(Acks::One),
            Raw::Str(s) if s == "all" || s == "-1" => Ok(Acks::All),
            Raw::Int(-1) => Ok(Acks::All),
            Raw::Int(n) => Err(serde::de::Error::custom(format!(
                "expected \"0\", \"1\" or \"all\", got {n}"
            ))),
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "expected \"0\", \"1\" or \"all\", got {s:?}"
            ))),
        }
    }
}

impl Serialize for Acks {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// librdkafka properties sessionizer sets itself; setting them in
/// `[kafka.properties]` would break its guarantees.
const MANAGED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "kafka.brokers"),
    ("group.id", "kafka.group_id"),
    (
        "enable.auto.commit",
        "offsets are committed after durable output",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed after durable output",
    ),
    ("acks", "kafka.output_acks / kafka.dlq_acks"),
    (
        "request.required.acks",
        "kafka.output_acks / kafka.dlq_acks",
    ),
    ("enable.idempotence", "implied by acks \"all\""),
    ("transactional.id", "kafka.exactly_once"),
    ("isolation.level", "always read_committed"),
    (
        "partition.assignment.strategy",
        "cooperative-sticky, so a rebalance only moves the partitions it must",
    ),
    ("enable.partition.eof", "drives the caught-up idle advance"),
];

impl KafkaSection {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("kafka.brokers", &self.brokers),
            ("kafka.group_id", &self.group_id),
            ("kafka.output_topic", &self.output_topic),
            ("kafka.dlq_topic", &self.dlq_topic),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::new(key, "must not be empty"));
            }
        }
        if self.input_topics.is_empty() || self.input_topics.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError::new(
                "kafka.input_topics",
                "must name at least one topic, none empty",
            ));
        }
        check_destinations(
            &self.input_topics,
            "an input topic",
            ("kafka.output_topic", &self.output_topic),
            ("kafka.dlq_topic", &self.dlq_topic),
        )?;
        if self.exactly_once {
            for (key, acks) in [
                ("kafka.output_acks", self.output_acks),
                ("kafka.dlq_acks", self.dlq_acks),
            ] {
                if acks != Acks::All {
                    return Err(ConfigError::new(
                        key,
                        format!(
                            "is {:?} but exactly_once = true needs \"all\"",
                            acks.as_str()
                        ),
                    ));
                }
            }
        }
        if self.max_in_flight_bytes == 0 {
            return Err(ConfigError::new(
                "kafka.max_in_flight_bytes",
                "must be at least 1",
            ));
        }
        if self.commit_interval.0 <= 0 {
            return Err(ConfigError::new(
                "kafka.commit_interval",
                "must be greater than 0",
            ));
        }
        for key in self.properties.keys() {
            if let Some((_, instead)) = MANAGED_KAFKA_PROPERTIES.iter().find(|(k, _)| k == key) {
                return Err(ConfigError::new(
                    format!("kafka.properties.{key}"),
                    format!("is managed by sessionizer ({instead})"),
                ));
            }
        }
        Ok(())
    }
}
