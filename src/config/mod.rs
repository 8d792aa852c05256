//! The typed configuration tree: TOML, unknown keys rejected, every key
//! overridable from the environment, defaults in one place (the `Default`
//! impls below), and a check that names the key and the reason before
//! anything is read.
//!
//! Environment overrides: `SESSIONIZER__` followed by the key path with `__`
//! between the parts, case-insensitive: `SESSIONIZER__WINDOW__GAP=5s` sets
//! `[window] gap`, `SESSIONIZER__SOURCE=file` sets `source`. A value from the
//! environment is taken as a string; numbers, booleans and comma-separated
//! lists parse from it. Under `[kafka.properties]` underscores become dots:
//! `SESSIONIZER__KAFKA__PROPERTIES__SSL_CA_LOCATION` sets `ssl.ca.location`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::codec::{DecodeLimits, InputFormat, OutputFormat};
use crate::engine::{IdlePolicy, LatePolicy, WindowConfig};

pub(crate) mod values;

pub use crate::file::config::FileSection;
pub use crate::kafka::config::{Acks, KafkaSection};
pub use crate::redis::config::{MisroutedSetting, RedisSection};
pub use values::Millis;
use values::*;

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "SESSIONIZER__";

/// A configuration problem: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where chat events come from: `"file"` (JSON lines from a file or
    /// stdin) or `"kafka"`.
    pub source: SourceKind,
    #[serde(default)]
    pub window: WindowSection,
    #[serde(default)]
    pub input: InputSection,
    #[serde(default)]
    pub output: OutputSection,
    /// Required when `source = "file"`.
    #[serde(default)]
    pub file: Option<FileSection>,
    /// Required when `source = "kafka"`.
    #[serde(default)]
    pub kafka: Option<KafkaSection>,
    /// Required when `source = "redis"`.
    #[serde(default)]
    pub redis: Option<RedisSection>,
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `sessionizer gateway` (HTTP ingest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<crate::gateway::GatewaySection>,
    /// `sessionizer push` (turns POSTed to an HTTP agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<crate::push::PushSection>,
    /// Redaction of emitted turns (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redact: Option<crate::redact::RedactSection>,
}

/// `[metrics]`: the Prometheus endpoint, and the progress line in the log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// `host:port` serving `/metrics`, `/healthz` and `/readyz` (for example
    /// `"0.0.0.0:9464"`); unset, nothing is served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<std::net::SocketAddr>,
    /// How often a worker logs its progress line (totals, rates, lag and
    /// open sessions per owned partition); `"0s"` turns it off.
    pub progress_interval: Millis,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            listen: None,
            progress_interval: Millis(30_000),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    File,
    Kafka,
    Redis,
}

/// `[window]`: the session rules, in event time.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowSection {
    /// Inactivity that ends a session; events exactly `gap` apart still merge.
    pub gap: Millis,
    /// How much arrival disorder is expected: `W = max event time − this`.
    pub max_out_of_orderness: Millis,
    /// How long a caught-up partition must stay quiet before its watermark
    /// follows the wall clock (brokers only; file mode uses event time only).
    pub idle_timeout: Millis,
    /// A caught-up partition whose newest event time is further behind the
    /// wall clock than `max_out_of_orderness` plus this is reading a backlog
    /// (old event times arriving now): the clock may not close its sessions
    /// after `idle_timeout`, only after `backlog_quiet`.
    pub backlog_lag: Millis,
    /// How long a partition reading a backlog must stay quiet before its
    /// open sessions are flushed (a producer pausing mid-backlog must not
    /// split bursts).
    pub backlog_quiet: Millis,
    /// A session longer than this closes early (`closed_by = max_duration`).
    pub max_duration: Millis,
    /// A session never holds more messages than this.
    #[serde(deserialize_with = "number")]
    pub max_messages: u32,
    /// A session's texts never add up to more bytes than this.
    #[serde(deserialize_with = "number")]
    pub max_bytes: u32,
    /// What happens to a late message: `new-turn`, `dlq` or `drop`.
    pub late: LateSetting,
    /// The largest per-event `gap_ms` honoured; a larger one is clamped
    /// (and counted), never an error.
    pub max_gap: Millis,
    /// A turn that starts within this of its key's previous turn's last
    /// event carries `previous_turn_id`. Off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follow_up: Option<Millis>,
}

impl Default for WindowSection {
    fn default() -> Self {
        WindowSection {
            gap: Millis(3_000),
            max_out_of_orderness: Millis(500),
            idle_timeout: Millis(100),
            backlog_lag: Millis(5_000),
            backlog_quiet: Millis(10_000),
            max_duration: Millis(120_000),
            max_messages: 200,
            max_bytes: 65_536,
            late: LateSetting::NewTurn,
            max_gap: Millis(60_000),
            follow_up: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LateSetting {
    NewTurn,
    Dlq,
    Drop,
}

/// `[input]`: how records are decoded and what they may hold.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputSection {
    /// `json`, `protobuf` or `auto` (JSON when the record starts with `{`).
    pub format: InputFormatSetting,
    /// A larger record is dead-lettered as `oversize` unparsed.
    #[serde(deserialize_with = "number")]
    pub max_record_bytes: usize,
    /// A message text over this is dead-lettered as `oversize`.
    #[serde(deserialize_with = "number")]
    pub max_text_bytes: usize,
    /// An event time further ahead of the worker's clock is `invalid`.
    pub max_future_skew: Millis,
}

impl Default for InputSection {
    fn default() -> Self {
        InputSection {
            format: InputFormatSetting::Auto,
            max_record_bytes: 1 << 20,
            max_text_bytes: 16 << 10,
            max_future_skew: Millis(300_000),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputFormatSetting {
    Json,
    Protobuf,
    Auto,
}

/// `[output]`: how turns are written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    /// `json` (default) or `protobuf` (length-delimited in files).
    pub format: OutputFormatSetting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormatSetting {
    #[default]
    Json,
    Protobuf,
}

impl Config {
    /// Reads a TOML file, applies the environment overrides and checks the
    /// result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        Config::from_toml(&text, std::env::vars())
    }

    /// Parses TOML text with the given environment (only `SESSIONIZER__…`
    /// variables are looked at).
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::new("(file)", e.to_string().trim_end().to_owned())
        })?;
        let mut from_env = BTreeMap::new();
        for (name, value) in env {
            let Some(path) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let mut parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            // librdkafka property names are dotted, which an environment
            // variable name cannot be: `…__KAFKA__PROPERTIES__SSL_CA_LOCATION`
            // sets `ssl.ca.location`.
            if parts.len() >= 3 && parts[0] == "kafka" && parts[1] == "properties" {
                let property = parts[2..].join("_").replace('_', ".");
                parts.truncate(2);
                parts.push(property);
            }
            if parts.iter().any(String::is_empty) {
                return Err(ConfigError::new(name, "malformed override name"));
            }
            set_path(&mut table, &parts, value)
                .map_err(|reason| ConfigError::new(&name, reason))?;
            from_env.insert(parts.join("."), name);
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let origin = from_env
                    .iter()
                    .find(|(k, _)| key.starts_with(k.as_str()) || k.starts_with(&key))
                    .map(|(_, name)| format!(" (set by {name})"))
                    .unwrap_or_default();
                ConfigError::new(key, format!("{}{origin}", e.inner()))
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The checks that span keys or bound values.
    fn validate(&self) -> Result<(), ConfigError> {
        let w = &self.window;
        if w.gap.0 <= 0 {
            return Err(ConfigError::new("window.gap", "must be greater than 0"));
        }
        if w.max_duration.0 <= 0 {
            return Err(ConfigError::new(
                "window.max_duration",
                "must be greater than 0",
            ));
        }
        if w.follow_up.is_some_and(|f| f.0 <= 0) {
            return Err(ConfigError::new(
                "window.follow_up",
                "must be greater than 0 (leave it out to turn follow-up links off)",
            ));
        }
        if w.max_messages == 0 {
            return Err(ConfigError::new(
                "window.max_messages",
                "must be at least 1",
            ));
        }
        if (w.max_bytes as usize) < self.input.max_text_bytes {
            return Err(ConfigError::new(
                "window.max_bytes",
                format!(
                    "must be at least input.max_text_bytes ({}), or a valid message could not fit in a turn",
                    self.input.max_text_bytes
                ),
            ));
        }
        if self.input.max_record_bytes == 0 {
            return Err(ConfigError::new(
                "input.max_record_bytes",
                "must be at least 1",
            ));
        }
        if self.input.max_text_bytes == 0 {
            return Err(ConfigError::new(
                "input.max_text_bytes",
                "must be at least 1",
            ));
        }
        if self.input.max_record_bytes < self.input.max_text_bytes {
            return Err(ConfigError::new(
                "input.max_record_bytes",
                format!(
                    "must be at least input.max_text_bytes ({}), or a valid message could not fit in a record",
                    self.input.max_text_bytes
                ),
            ));
        }
        if let Some(redact) = &self.redact {
            redact.validate()?;
        }
        if let Some(gateway) = &self.gateway {
            gateway.validate()?;
        }
        if let Some(push) = &self.push {
            let (output, worker_group) = match (&self.kafka, &self.redis) {
                (Some(k), _) if self.source == SourceKind::Kafka => {
                    (k.output_topic.as_str(), Some(k.group_id.as_str()))
                }
                (_, Some(r)) if self.source == SourceKind::Redis => {
                    (r.output_stream.as_str(), None)
                }
                _ => ("", None),
            };
            push.validate(
                match self.output.format {
                    OutputFormatSetting::Json => "json",
                    OutputFormatSetting::Protobuf => "protobuf",
                },
                output,
                worker_group,
            )?;
        }
        match self.source {
            SourceKind::Kafka => {
                let Some(k) = &self.kafka else {
                    return Err(ConfigError::new(
                        "kafka",
                        "a [kafka] section is required when source = \"kafka\"",
                    ));
                };
                k.validate()?;
                let held = w
                    .max_duration
                    .0
                    .saturating_add(w.gap.0)
                    .saturating_add(k.max_pullback.0);
                if k.commit_stall.0 <= held {
                    return Err(ConfigError::new(
                        "kafka.commit_stall",
                        format!(
                            "must be longer than window.max_duration + window.gap + \
                             kafka.max_pullback ({held} ms): an open session and a pulled-back \
                             commit hold the commit point that long"
                        ),
                    ));
                }
            }
            SourceKind::Redis => {
                let Some(r) = &self.redis else {
                    return Err(ConfigError::new(
                        "redis",
                        "a [redis] section is required when source = \"redis\"",
                    ));
                };
                r.validate()?;
            }
            SourceKind::File => {
                let file = self.file_section()?;
                if self.input.format == InputFormatSetting::Protobuf {
                    return Err(ConfigError::new(
                        "input.format",
                        "file mode reads JSON lines; protobuf records cannot be split into lines (use \"json\" or \"auto\")",
                    ));
                }
                for (key, value) in [
                    ("file.input", &file.input),
                    ("file.output", &file.output),
                    ("file.dlq", &file.dlq),
                ] {
                    if value.is_empty() {
                        return Err(ConfigError::new(key, "must be a path or \"-\""));
                    }
                }
                if file.output != "-" && file.output == file.dlq {
                    return Err(ConfigError::new("file.dlq", "must differ from file.output"));
                }
                if file.input != "-" && (file.input == file.output || file.input == file.dlq) {
                    return Err(ConfigError::new(
                        "file.input",
                        "must differ from file.output and file.dlq",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The `[file]` section, required when `source = "file"`.
    pub fn file_section(&self) -> Result<&FileSection, ConfigError> {
        self.file.as_ref().ok_or_else(|| {
            ConfigError::new(
                "file",
                "a [file] section is required when source = \"file\"",
            )
        })
    }

    /// When the caught-up idle advance applies (see [`IdlePolicy`]).
    pub fn idle_policy(&self) -> IdlePolicy {
        let w = &self.window;
        IdlePolicy {
            idle_timeout_ms: w.idle_timeout.0,
            live_lag_ms: w.max_out_of_orderness.0.saturating_add(w.backlog_lag.0),
            backlog_quiet_ms: w.backlog_quiet.0,
        }
    }

    /// The redaction stage of `[redact]`, `None` without it.
    pub fn redactor(&self) -> Result<Option<crate::redact::Redactor>, ConfigError> {
        self.redact
            .as_ref()
            .map(crate::redact::Redactor::new)
            .transpose()
    }

    pub fn window_config(&self) -> WindowConfig {
        let w = &self.window;
        WindowConfig {
            gap_ms: w.gap.0,
            max_out_of_orderness_ms: w.max_out_of_orderness.0,
            max_duration_ms: w.max_duration.0,
            max_messages: w.max_messages,
            max_bytes: w.max_bytes,
            late: match w.late {
                LateSetting::NewTurn => LatePolicy::NewTurn,
                LateSetting::Dlq => LatePolicy::Dlq,
                LateSetting::Drop => LatePolicy::Drop,
            },
            max_gap_ms: w.max_gap.0,
            follow_up_ms: w.follow_up.map(|f| f.0),
        }
    }

    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_record_bytes: self.input.max_record_bytes,
            max_text_bytes: self.input.max_text_bytes,
            max_future_skew_ms: self.input.max_future_skew.0,
        }
    }

    pub fn input_format(&self) -> InputFormat {
        match self.input.format {
            InputFormatSetting::Json => InputFormat::Json,
            InputFormatSetting::Protobuf => InputFormat::Protobuf,
            InputFormatSetting::Auto => InputFormat::Auto,
        }
    }

    pub fn output_format(&self) -> OutputFormat {
        match self.output.format {
            OutputFormatSetting::Json => OutputFormat::Json,
            OutputFormatSetting::Protobuf => OutputFormat::Protobuf,
        }
    }

    /// The effective configuration (defaults filled in) as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes")
    }
}

/// The output and the dead letters must go somewhere the worker does not
/// read, and not to the same place: `(key, name)` of each.
pub(crate) fn check_destinations(
    inputs: &[String],
    inputs_are: &str,
    output: (&str, &str),
    dlq: (&str, &str),
) -> Result<(), ConfigError> {
    for (key, name) in [output, dlq] {
        if inputs.iter().any(|i| i == name) {
            return Err(ConfigError::new(
                key,
                format!("{name:?} is also {inputs_are}: the worker would read its own output"),
            ));
        }
    }
    if output.1 == dlq.1 {
        return Err(ConfigError::new(
            dlq.0,
            format!("must differ from {}", output.0),
        ));
    }
    Ok(())
}

fn set_path(table: &mut toml::Table, parts: &[String], value: String) -> Result<(), String> {
    let (last, sections) = parts.split_last().expect("at least one part");
    let mut current = table;
    for part in sections {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is not a section"))?;
    }
    current.insert(last.clone(), toml::Value::String(value));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "source = \"file\"\n[file]\ndlq = \"dlq.jsonl\"\n";

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Vec::new())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.window, WindowSection::default());
        assert_eq!(c.window.gap, Millis(3000));
        assert_eq!(c.window.max_out_of_orderness, Millis(500));
        assert_eq!(c.window.idle_timeout, Millis(100));
        assert_eq!(c.window.max_duration, Millis(120_000));
        assert_eq!((c.window.max_messages, c.window.max_bytes), (200, 65536));
        assert_eq!(c.window.late, LateSetting::NewTurn);
        assert_eq!(c.input.max_record_bytes, 1 << 20);
        assert_eq!(c.input.max_text_bytes, 16 << 10);
        assert_eq!(c.input.max_future_skew, Millis(300_000));
        assert_eq!(c.input.format, InputFormatSetting::Auto);
        assert_eq!(c.output.format, OutputFormatSetting::Json);
        let file = c.file.unwrap();
        assert_eq!((file.input.as_str(), file.output.as_str()), ("-", "-"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = load(&format!("{MINIMAL}[window]\ngapp = \"3s\"\n")).unwrap_err();
        assert!(e.to_string().contains("gapp"), "{e}");
        let e = load(&format!("colour = 1\n{MINIMAL}")).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_reason() {
        let cases = [
            (
                "[window]\ngap = \"3 parsecs\"\n",
                "window.gap",
                "invalid duration",
            ),
            ("[window]\ngap = 3\n", "window.gap", "duration string"),
            ("[window]\ngap = \"0s\"\n", "window.gap", "greater than 0"),
            (
                "[window]\nlate = \"ignore\"\n",
                "window.late",
                "unknown variant",
            ),
            (
                "[window]\nmax_messages = -1\n",
                "window.max_messages",
                "non-negative integer",
            ),
            (
                "[window]\nmax_messages = 99999999999\n",
                "window.max_messages",
                "up to 4294967295",
            ),
            (
                "[window]\nmax_bytes = 100\n",
                "window.max_bytes",
                "input.max_text_bytes",
            ),
            (
                "[window]\nfollow_up = \"0s\"\n",
                "window.follow_up",
                "greater than 0",
            ),
            (
                "[window]\nmax_gap = \"forever\"\n",
                "window.max_gap",
                "invalid duration",
            ),
            (
                "[input]\nformat = \"xml\"\n",
                "input.format",
                "unknown variant",
            ),
        ];
        for (extra, key, reason) in cases {
            let e = load(&format!("{MINIMAL}{extra}")).unwrap_err();
            assert_eq!(e.key, key, "{extra}: {e}");
            assert!(e.reason.contains(reason), "{extra}: {e}");
        }
        let e = load("source = \"file\"\n").unwrap_err();
        assert_eq!(e.key, "file");
        let e = load("source = \"file\"\n[file]\noutput = \"x\"\n").unwrap_err();
        assert!(e.reason.contains("dlq"), "{e}");
        let e = load("source = \"file\"\n[file]\noutput = \"x\"\ndlq = \"x\"\n").unwrap_err();
        assert_eq!(e.key, "file.dlq");
    }

    #[test]
    fn environment_overrides_every_key() {
        let env = [
            ("SESSIONIZER__WINDOW__GAP", "5s"),
            ("SESSIONIZER__WINDOW__MAX_MESSAGES", "7"),
            ("SESSIONIZER__window__late", "drop"),
            ("SESSIONIZER__FILE__OUTPUT", "turns.jsonl"),
            ("UNRELATED", "x"),
            ("SESSIONIZER_CONFIG", "not an override"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let c = Config::from_toml(MINIMAL, env).unwrap();
        assert_eq!(c.window.gap, Millis(5000));
        assert_eq!(c.window.max_messages, 7);
        assert_eq!(c.window.late, LateSetting::Drop);
        assert_eq!(c.file.unwrap().output, "turns.jsonl");

        let env = [("SESSIONIZER__WINDOW__GAPP".to_owned(), "5s".to_owned())];
        let e = Config::from_toml(MINIMAL, env).unwrap_err();
        assert!(
            e.to_string().contains("gapp") && e.to_string().contains("SESSIONIZER__WINDOW__GAPP"),
            "{e}"
        );
        let env = [(
            "SESSIONIZER__WINDOW__MAX_BYTES".to_owned(),
            "lots".to_owned(),
        )];
        let e = Config::from_toml(MINIMAL, env).unwrap_err();
        assert_eq!(e.key, "window.max_bytes", "{e}");
    }

    #[test]
    fn contradictions_the_workers_would_trip_on_are_refused() {
        let redis = "source = \"redis\"\n[redis]\nurl = \"redis://127.0.0.1:6379\"\ninput_stream = \"chat\"\n";
        let cases = [
            (
                format!("{MINIMAL}[input]\nformat = \"protobuf\"\n"),
                "input.format",
                "JSON lines",
            ),
            (
                format!("{MINIMAL}[input]\nmax_record_bytes = 100\nmax_text_bytes = 200\n[window]\nmax_bytes = 200\n"),
                "input.max_record_bytes",
                "at least input.max_text_bytes",
            ),
            (
                format!("{redis}output_stream = \"t\"\ndlq_stream = \"d\"\noutput_maxlen = 0\n"),
                "redis.output_maxlen",
                "at least 1",
            ),
            (
                format!("{redis}output_stream = \"chat:{{1}}\"\ndlq_stream = \"d\"\n"),
                "redis.output_stream",
                "shard stream",
            ),
            (
                format!("{redis}output_stream = \"t\"\ndlq_stream = \"chat:{{12}}\"\n"),
                "redis.dlq_stream",
                "shard stream",
            ),
        ];
        for (text, key, reason) in cases {
            let e = load(&text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(e.to_string().contains(reason), "{text}: {e}");
        }
    }

    const KAFKA: &str = "source = \"kafka\"\n[kafka]\nbrokers = \"127.0.0.1:9092\"\ngroup_id = \"g\"\ninput_topics = [\"chat\"]\noutput_topic = \"turns\"\ndlq_topic = \"dlq\"\n";

    #[test]
    fn kafka_section_defaults_and_contradictions() {
        let c = load(KAFKA).unwrap();
        let k = c.kafka.unwrap();
        assert_eq!(
            (k.output_acks, k.dlq_acks, k.exactly_once, k.commit_interval),
            (Acks::All, Acks::All, false, Millis(1000))
        );
        let c = load(&format!("{KAFKA}output_acks = 1\ndlq_acks = \"0\"\n"))
            .unwrap()
            .kafka
            .unwrap();
        assert_eq!((c.output_acks, c.dlq_acks), (Acks::One, Acks::Zero));
        let cases = [
            (
                "exactly_once = true\noutput_acks = \"1\"\n",
                "kafka.output_acks",
                "exactly_once",
            ),
            ("output_acks = \"2\"\n", "kafka.output_acks", "expected"),
            (
                "[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n",
                "kafka.properties.enable.auto.commit",
                "managed",
            ),
            (
                "commit_stall = \"2m\"\n",
                "kafka.commit_stall",
                "max_duration + window.gap + kafka.max_pullback",
            ),
            (
                "commit_stall = \"3m\"\nmax_pullback = \"1m\"\n",
                "kafka.commit_stall",
                "kafka.max_pullback (183000 ms)",
            ),
            (
                "max_in_flight_bytes = 0\n",
                "kafka.max_in_flight_bytes",
                "at least 1",
            ),
        ];
        for (extra, key, reason) in cases {
            let e = load(&format!("{KAFKA}{extra}")).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.reason.contains(reason), "{e}");
        }
        let e = load(&KAFKA.replace("dlq_topic = \"dlq\"", "dlq_topic = \"chat\"")).unwrap_err();
        assert_eq!(e.key, "kafka.dlq_topic", "{e}");
        let e = load("source = \"kafka\"\n").unwrap_err();
        assert_eq!(e.key, "kafka");
        let env = [
            (
                "SESSIONIZER__KAFKA__INPUT_TOPICS".to_owned(),
                "a, b".to_owned(),
            ),
            (
                "SESSIONIZER__KAFKA__EXACTLY_ONCE".to_owned(),
                "true".to_owned(),
            ),
        ];
        let k = Config::from_toml(KAFKA, env).unwrap().kafka.unwrap();
        assert_eq!(k.input_topics, ["a", "b"]);
        assert!(k.exactly_once);
    }

    #[test]
    fn effective_config_round_trips() {
        let c = load(MINIMAL).unwrap();
        let again = load(&c.to_toml()).unwrap();
        assert_eq!(c, again);
    }

    const REDIS: &str = "source = \"redis\"\n[redis]\nurl = \"redis://127.0.0.1:6379\"\ninput_stream = \"chat\"\noutput_stream = \"turns\"\ndlq_stream = \"dlq\"\n";

    #[test]
    fn redis_defaults_and_errors_name_the_key() {
        let r = load(REDIS).unwrap().redis.unwrap();
        assert_eq!((r.shards, r.max_deliveries, r.batch), (1, 5, 500));
        assert_eq!((r.lease_ttl, r.block), (Millis(10_000), Millis(200)));
        assert_eq!(r.group, "sessionizer");
        for (text, key, reason) in [
            ("source = \"redis\"\n".to_owned(), "redis", "required"),
            (
                REDIS.replace("redis://127", "http://127"),
                "redis.url",
                "redis://",
            ),
            (
                REDIS.replace("\"turns\"", "\"chat\""),
                "redis.output_stream",
                "input stream",
            ),
            (
                REDIS.replace("\"dlq\"", "\"turns\""),
                "redis.dlq_stream",
                "differ",
            ),
            (format!("{REDIS}shards = 0\n"), "redis.shards", "1 to 16384"),
            (
                format!("{REDIS}lease_ttl = \"1s\"\nblock = \"600ms\"\n"),
                "redis.block",
                "half",
            ),
            (
                format!("{REDIS}max_deliveries = 0\n"),
                "redis.max_deliveries",
                "at least 1",
            ),
        ] {
            let e = load(&text).unwrap_err();
            assert_eq!(e.key, key, "{text}");
            assert!(e.reason.contains(reason), "{key}: {}", e.reason);
        }
        let env = vec![("SESSIONIZER__REDIS__SHARDS".to_owned(), "four".to_owned())];
        let e = Config::from_toml(REDIS, env).unwrap_err();
        assert_eq!(e.key, "redis.shards");
        assert!(
            e.reason.contains("SESSIONIZER__REDIS__SHARDS"),
            "{}",
            e.reason
        );
    }
}
