//! The command line's shape: commands, their arguments and how they parse.
//! `main.rs` runs them; `dlq.rs` runs the `dlq` commands.

pub mod dlq;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub use dlq::DlqCommand;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Groups each chat user's burst of messages into one turn"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "SESSIONIZER_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the worker with the given configuration.
    Run {
        /// The TOML configuration file.
        #[arg(long, env = "SESSIONIZER_CONFIG")]
        config: PathBuf,
    },
    /// Run the whole pipeline with nothing installed: an in-process mock
    /// Kafka cluster, two workers, a synthetic producer; prints each turn.
    Demo {
        /// How long to run ("20s", "2m").
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// How many chatting users to simulate.
        #[arg(long, default_value_t = 40)]
        users: u32,
        /// The fraction of records that are poison (they go to the DLQ).
        #[arg(long, default_value_t = 0.03)]
        poison_fraction: f64,
    },
    /// Generate bursty chat traffic into the configured input (Kafka topic,
    /// Redis shard streams, or a file of JSON lines).
    Produce(ProduceArgs),
    /// Inspect, count and replay dead letters (the DLQ of the configured
    /// source: Kafka topic, Redis stream or file).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Serve `POST /v1/events` (`[gateway]`): authenticated HTTP ingest
    /// into the configured source's input.
    Gateway {
        #[arg(long, env = "SESSIONIZER_CONFIG")]
        config: PathBuf,
    },
    /// Deliver each turn of the output to an HTTP agent (`[push]`): in
    /// order per session key, retried, dead-lettered, committed after the
    /// outcome.
    Push {
        #[arg(long, env = "SESSIONIZER_CONFIG")]
        config: PathBuf,
    },
    /// Replace the tokens `[redact] mode = "tokenize"` made with their
    /// values: stdin to stdout (an agent's answer on its way back to the
    /// user). Tokens made under another key, or changed, stay as they are.
    Reidentify {
        #[arg(long, env = "SESSIONIZER_CONFIG")]
        config: PathBuf,
    },
    /// Per input partition (Kafka) or shard (Redis): owner, the group's
    /// position, the end and the lag, as the broker sees them.
    Status {
        #[arg(long, env = "SESSIONIZER_CONFIG")]
        config: PathBuf,
        /// One JSON object per line instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Redis: after changing `redis.shards`, with every worker stopped, move
    /// the entries the old shard count left unfinished to the shard streams
    /// of the new one and remove the old streams it no longer uses.
    Reshard {
        /// The configuration with the new `redis.shards`.
        #[arg(long, env = "SESSIONIZER_CONFIG")]
        config: PathBuf,
        /// The shard count the workers ran with before.
        #[arg(long)]
        from: u32,
        /// Count what would move; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check a configuration (with environment overrides) and print the
    /// effective values, defaults included.
    CheckConfig {
        #[arg(long, env = "SESSIONIZER_CONFIG")]
        config: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct ProduceArgs {
    /// The worker's configuration: its source says where the records go.
    #[arg(long, env = "SESSIONIZER_CONFIG")]
    pub config: PathBuf,
    /// Records per second; 0 sends as fast as the broker takes them (and
    /// keeps the modeled event times, starting a day ago). Default: 1000
    /// into a broker, 0 into a file (nobody reads a file live).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Send each event at its modeled arrival time instead: exact modeled
    /// gaps, at the rate `--users` make (about users / 10 per second).
    #[arg(long)]
    pub real_time: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long ("30s", "5m"); without it and `--count`, run
    /// until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Chatting users; default `rate × 10` (about `rate` events per second
    /// at the default burst shape), or 20,000 unpaced.
    #[arg(long)]
    pub users: Option<u32>,
    /// Messages per burst, "MIN-MAX".
    #[arg(long, default_value = "1-6", value_parser = count_range)]
    pub burst_messages: (u32, u32),
    /// Event-time gap between the messages of a burst, "MIN-MAX".
    #[arg(long, default_value = "200ms-2s", value_parser = duration_range)]
    pub in_burst_gap: (i64, i64),
    /// Event-time gap between a user's bursts, "MIN-MAX".
    #[arg(long, default_value = "5s-60s", value_parser = duration_range)]
    pub between_bursts: (i64, i64),
    /// Arrival delay after event time, below this: the disorder.
    #[arg(long, default_value = "400ms", value_parser = humantime::parse_duration)]
    pub disorder: std::time::Duration,
    /// Fraction of messages sent twice (producer retries).
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_fraction: f64,
    /// Fraction of the generated events that are poison (invalid JSON,
    /// missing text, oversize text); duplicate copies come on top.
    #[arg(long, default_value_t = 0.0)]
    pub poison_fraction: f64,
    /// Fraction of bursts that end with an end_of_turn event (5 ms after the
    /// last message, with the same arrival disorder).
    #[arg(long, default_value_t = 0.0)]
    pub end_of_turn_fraction: f64,
    /// Encoding of valid events.
    #[arg(long, default_value = "json")]
    pub format: EventFormat,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Another topic, input stream or file (`-` = stdout) than the
    /// configured input.
    #[arg(long)]
    pub to: Option<String>,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum EventFormat {
    Json,
    Protobuf,
}

/// "MIN-MAX", each side parsed by `parse`, at least `least` and MIN <= MAX.
pub fn range<T: PartialOrd + std::fmt::Display + Copy>(
    s: &str,
    least: T,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<(T, T), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("expected MIN-MAX, got {s:?}"))?;
    let (lo, hi) = (parse(lo.trim())?, parse(hi.trim())?);
    if lo < least || lo > hi {
        return Err(format!("need {least} <= MIN <= MAX, got {s:?}"));
    }
    Ok((lo, hi))
}

pub fn count_range(s: &str) -> Result<(u32, u32), String> {
    range(s, 1, |v| v.parse().map_err(|e| format!("{v:?}: {e}")))
}

pub fn duration_range(s: &str) -> Result<(i64, i64), String> {
    range(s, 0, |v| {
        humantime::parse_duration(v)
            .map(|d| d.as_millis() as i64)
            .map_err(|e| format!("{v:?}: {e}"))
    })
}
