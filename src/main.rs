//! The `sessionizer` command line.

use std::path::PathBuf;

/// Every record allocates (decoded fields, replies, encoded turns) and glibc's
/// allocator cost the Redis worker a quarter of its CPU; mimalloc is faster
/// at the many small short-lived blocks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use sessionizer::config::{Config, SourceKind};
use sessionizer::engine::DropReason;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Groups each chat user's burst of messages into one turn"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "SESSIONIZER_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
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
    /// Check a configuration (with environment overrides) and print the
    /// effective values, defaults included.
    CheckConfig {
        #[arg(long, env = "SESSIONIZER_CONFIG")]
        config: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct ProduceArgs {
    /// The worker's configuration: its source says where the records go.
    #[arg(long, env = "SESSIONIZER_CONFIG")]
    config: PathBuf,
    /// Records per second; 0 sends as fast as the broker takes them (and
    /// keeps the modeled event times, starting a day ago).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Send each event at its modeled arrival time instead: exact modeled
    /// gaps, at the rate `--users` make (about users / 10 per second).
    #[arg(long)]
    real_time: bool,
    /// Stop after this many records.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long ("30s", "5m"); without it and `--count`, run
    /// until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<std::time::Duration>,
    /// Chatting users; default `rate × 10` (about `rate` events per second
    /// at the default burst shape), or 20,000 unpaced.
    #[arg(long)]
    users: Option<u32>,
    /// Messages per burst, "MIN-MAX".
    #[arg(long, default_value = "1-6", value_parser = count_range)]
    burst_messages: (u32, u32),
    /// Event-time gap between the messages of a burst, "MIN-MAX".
    #[arg(long, default_value = "200ms-2s", value_parser = duration_range)]
    in_burst_gap: (i64, i64),
    /// Event-time gap between a user's bursts, "MIN-MAX".
    #[arg(long, default_value = "5s-60s", value_parser = duration_range)]
    between_bursts: (i64, i64),
    /// Arrival delay after event time, below this: the disorder.
    #[arg(long, default_value = "400ms", value_parser = humantime::parse_duration)]
    disorder: std::time::Duration,
    /// Fraction of messages sent twice (producer retries).
    #[arg(long, default_value_t = 0.0)]
    duplicate_fraction: f64,
    /// Fraction of the generated events that are poison (invalid JSON,
    /// missing text, oversize text); duplicate copies come on top.
    #[arg(long, default_value_t = 0.0)]
    poison_fraction: f64,
    /// Fraction of bursts that end with an end_of_turn event (5 ms after the
    /// last message, with the same arrival disorder).
    #[arg(long, default_value_t = 0.0)]
    end_of_turn_fraction: f64,
    /// Encoding of valid events.
    #[arg(long, default_value = "json")]
    format: EventFormat,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Another topic, input stream or file (`-` = stdout) than the
    /// configured input.
    #[arg(long)]
    to: Option<String>,
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List dead letters: a table, or JSON lines with `--json`.
    Inspect {
        #[command(flatten)]
        select: DlqSelect,
        /// Oldest first (default: newest first).
        #[arg(long)]
        oldest_first: bool,
        /// One JSON object per line, payload included.
        #[arg(long)]
        json: bool,
        /// Keep printing new dead letters as they arrive (until Ctrl-C).
        #[arg(long)]
        follow: bool,
    },
    /// Counts by reason and by source partition, oldest and newest entry.
    Stats {
        #[command(flatten)]
        select: DlqSelect,
        #[arg(long)]
        json: bool,
    },
    /// Republish the selected dead letters' original records to their input
    /// (oldest first), once.
    Replay {
        #[command(flatten)]
        select: DlqSelect,
        /// Another topic or stream (file DLQ: the file to write; default
        /// stdout).
        #[arg(long)]
        to: Option<String>,
        /// List what would be sent; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many records per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Skip (and report) a record already replayed this often.
        #[arg(long, default_value_t = 3)]
        max_replays: u32,
        /// Pipe each payload through this shell command (stdin → stdout).
        /// Going back to the input, its output must be a valid event, or the
        /// replay stops there and the dead letter is kept.
        #[arg(long)]
        transform: Option<String>,
        /// Kill a transform (its whole process group) that runs longer than
        /// this, and stop the replay there.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        transform_timeout: std::time::Duration,
        /// Skip (and report) a record whose transformed output is not a
        /// valid event, keeping its dead letter, instead of stopping.
        #[arg(long)]
        skip_invalid: bool,
        /// Kafka: the consumer group recording the replay's progress
        /// (default `<group_id>.dlq-replay`, plus `.<reasons>` with
        /// `--reason`, so each selection keeps its own progress).
        #[arg(long)]
        group: Option<String>,
    },
}

/// Which dead letters a `dlq` command looks at.
#[derive(clap::Args, Debug)]
struct DlqSelect {
    #[arg(long, env = "SESSIONIZER_CONFIG")]
    config: PathBuf,
    /// Only these reasons (repeat or comma-separate).
    #[arg(long = "reason", value_delimiter = ',')]
    reasons: Vec<String>,
    /// Failed at or after: RFC 3339, or a duration ago ("2h").
    #[arg(long)]
    since: Option<String>,
    /// Failed before: RFC 3339, or a duration ago.
    #[arg(long)]
    until: Option<String>,
    /// Kafka: the source partition; Redis: the shard index or stream.
    #[arg(long)]
    source_partition: Option<String>,
    /// At most this many entries.
    #[arg(long)]
    limit: Option<u64>,
}

impl DlqSelect {
    fn filter(&self) -> anyhow::Result<sessionizer::dlq::Filter> {
        let known: Vec<&str> = sessionizer::model::DeadLetterReason::ALL
            .iter()
            .map(|r| r.as_str())
            .collect();
        for reason in &self.reasons {
            anyhow::ensure!(
                known.contains(&reason.as_str()),
                "--reason: unknown reason {reason:?} (one of {})",
                known.join(", ")
            );
        }
        let now = sessionizer::wall_clock::now_ms();
        let time = |flag: &str, value: &Option<String>| {
            value
                .as_deref()
                .map(|v| sessionizer::dlq::parse_time(v, now))
                .transpose()
                .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
        };
        Ok(sessionizer::dlq::Filter {
            reasons: self.reasons.clone(),
            since_ms: time("--since", &self.since)?,
            until_ms: time("--until", &self.until)?,
            source_partition: self.source_partition.clone(),
        })
    }
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum EventFormat {
    Json,
    Protobuf,
}

/// "MIN-MAX", each side parsed by `parse`, at least `least` and MIN <= MAX.
fn range<T: PartialOrd + std::fmt::Display + Copy>(
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

fn count_range(s: &str) -> Result<(u32, u32), String> {
    range(s, 1, |v| v.parse().map_err(|e| format!("{v:?}: {e}")))
}

fn duration_range(s: &str) -> Result<(i64, i64), String> {
    range(s, 0, |v| {
        humantime::parse_duration(v)
            .map(|d| d.as_millis() as i64)
            .map_err(|e| format!("{v:?}: {e}"))
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo {
            duration,
            users,
            poison_fraction,
        } => {
            let runtime = runtime()?;
            let options = sessionizer::kafka::demo::DemoOptions {
                duration,
                users,
                poison_fraction,
            };
            runtime.block_on(sessionizer::kafka::demo::run(
                options,
                sessionizer::shutdown::signal(),
                &mut std::io::stdout(),
            ))?;
            Ok(())
        }
        Command::Produce(args) => {
            let config = Config::load(&args.config)?;
            for (name, fraction) in [
                ("--poison-fraction", args.poison_fraction),
                ("--duplicate-fraction", args.duplicate_fraction),
                ("--end-of-turn-fraction", args.end_of_turn_fraction),
            ] {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&fraction),
                    "{name}: must be between 0 and 1, got {fraction}"
                );
            }
            let users = args.users.unwrap_or(if args.rate > 0 {
                (args.rate.saturating_mul(10)).min(u32::MAX as u64) as u32
            } else {
                20_000
            });
            let options = sessionizer::produce::ProduceOptions {
                spec: sessionizer::workload::WorkloadSpec {
                    users: users.max(1),
                    burst_messages: args.burst_messages,
                    in_burst_gap_ms: args.in_burst_gap,
                    between_bursts_ms: args.between_bursts,
                    disorder_ms: args.disorder.as_millis() as i64,
                    duplicate_fraction: args.duplicate_fraction,
                    poison_fraction: args.poison_fraction,
                    end_of_turn_fraction: args.end_of_turn_fraction,
                    start_ms: 0,
                    seed: args.seed,
                },
                pace: match (args.real_time, args.rate) {
                    (true, _) => sessionizer::produce::Pace::ModelTime,
                    (false, 0) => sessionizer::produce::Pace::Unpaced,
                    (false, rate) => sessionizer::produce::Pace::Rate(rate),
                },
                count: args.count,
                duration: args.duration,
                protobuf: matches!(args.format, EventFormat::Protobuf),
                to: args.to,
                progress: true,
            };
            let produced = runtime()?.block_on(sessionizer::produce::run(
                &config,
                options,
                sessionizer::shutdown::signal(),
            ))?;
            eprintln!(
                "produce: done: {} records, {} poison, {} duplicates",
                produced.records, produced.poison, produced.duplicates
            );
            Ok(())
        }
        Command::Dlq { command } => runtime()?.block_on(dlq(command)),
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::Run { config } => {
            let config = Config::load(&config)?;
            runtime()?.block_on(async move {
                if let Some(listen) = config.metrics.listen {
                    sessionizer::http::serve(listen).await?;
                }
                match config.source {
                    SourceKind::Kafka => {
                        sessionizer::kafka::run(
                            &config,
                            sessionizer::shutdown::signal_with_stop_bound(),
                        )
                        .await?;
                    }
                    SourceKind::Redis => {
                        sessionizer::redis::run(
                            &config,
                            sessionizer::shutdown::signal_with_stop_bound(),
                        )
                        .await?;
                    }
                    SourceKind::File => {
                        let stats = tokio::task::spawn_blocking(move || {
                            sessionizer::file::run(&config).context("file mode")
                        })
                        .await??;
                        tracing::info!(
                            records = stats.records,
                            turns = stats.total_turns(),
                            dead_letters = stats.total_dead_letters(),
                            duplicates = stats.dropped[DropReason::Duplicate.index()],
                            late_dropped = stats.dropped[DropReason::Late.index()],
                            no_message_dropped = stats.dropped[DropReason::NoMessage.index()],
                            "input done"
                        );
                    }
                }
                Ok(())
            })
        }
    }
}

async fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    use sessionizer::dlq::{output, replay, Store};
    use std::io::Write as _;
    let select = match &command {
        DlqCommand::Inspect { select, .. }
        | DlqCommand::Stats { select, .. }
        | DlqCommand::Replay { select, .. } => select,
    };
    let config = Config::load(&select.config)?;
    let filter = select.filter()?;
    let mut store = Store::open(&config).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match command {
        DlqCommand::Inspect {
            select,
            oldest_first,
            json,
            follow,
        } => {
            let mut entries: Vec<_> = store
                .snapshot(None)
                .await?
                .into_iter()
                .filter(|e| filter.matches(e))
                .collect();
            // By failure time across partitions (a stable sort keeps each
            // partition's order among equal times).
            entries.sort_by_key(|e| e.failed_at_ms);
            if !oldest_first {
                entries.reverse();
            }
            entries.truncate(select.limit.map_or(usize::MAX, |l| l as usize));
            let print = |out: &mut dyn std::io::Write, e: &sessionizer::dlq::DlqEntry| {
                if json {
                    writeln!(out, "{}", output::to_json(e))
                } else {
                    output::table_row(out, e)
                }
            };
            if !json {
                output::table_header(&mut out)?;
            }
            for e in &entries {
                print(&mut out, e)?;
            }
            out.flush()?;
            if follow {
                let stop = sessionizer::shutdown::signal();
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        () = &mut stop => break,
                        new = store.follow() => {
                            for e in new?.iter().filter(|e| filter.matches(e)) {
                                print(&mut out, e)?;
                            }
                            out.flush()?;
                        }
                    }
                }
            }
        }
        DlqCommand::Stats { json, .. } => {
            let mut stats = output::Stats::default();
            for e in store.snapshot(None).await? {
                if filter.matches(&e) {
                    stats.add(&e);
                }
            }
            if json {
                writeln!(out, "{}", stats.to_json())?;
            } else {
                stats.print(&mut out)?;
            }
        }
        DlqCommand::Replay {
            select,
            to,
            dry_run,
            rate,
            max_replays,
            transform,
            transform_timeout,
            skip_invalid,
            group,
        } => {
            let group = group.unwrap_or_else(|| {
                let base = config
                    .kafka
                    .as_ref()
                    .map_or("sessionizer", |k| k.group_id.as_str());
                replay::default_group(base, &select.reasons)
            });
            let options = replay::ReplayOptions {
                filter,
                limit: select.limit,
                to: to.clone(),
                dry_run,
                rate,
                max_replays,
                transform,
                transform_timeout,
                decoder: Some(sessionizer::codec::Decoder::new(
                    config.input_format(),
                    config.decode_limits(),
                )),
                skip_invalid,
                group,
            };
            // Replaying a file DLQ to stdout: the report goes to stderr.
            let to_stdout =
                config.source == SourceKind::File && to.as_deref().unwrap_or("-") == "-";
            let mut stderr = std::io::stderr();
            let mut report_to: &mut dyn std::io::Write =
                if to_stdout { &mut stderr } else { &mut out };
            let report = replay::run(
                &mut store,
                &options,
                sessionizer::shutdown::signal(),
                &mut report_to,
            )
            .await?;
            out.flush()?;
            eprintln!(
                "replay: {} {}, {} skipped after --max-replays {}{}",
                report.replayed,
                if dry_run {
                    "would be replayed"
                } else {
                    "replayed"
                },
                report.skipped_max_replays.len(),
                max_replays,
                match report.skipped_invalid.len() {
                    0 => String::new(),
                    n => format!(", {n} skipped as invalid after --transform"),
                } + &match report.skipped_truncated.len() {
                    0 => String::new(),
                    n => format!(", {n} skipped as truncated"),
                }
            );
        }
    }
    out.flush()?;
    Ok(())
}

/// The async runtime the broker workers run on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SESSIONIZER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
