//! The `sessionizer` command line.

/// Every record allocates (decoded fields, replies, encoded turns) and glibc's
/// allocator cost the Redis worker a quarter of its CPU; mimalloc is faster
/// at the many small short-lived blocks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

mod cli;

use anyhow::Context as _;
use clap::Parser;
use cli::{Cli, Command, EventFormat, LogFormat};
use sessionizer::config::{Config, SourceKind};
use sessionizer::engine::DropReason;

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
            let to_file = config.source == SourceKind::File;
            let rate = args.rate.unwrap_or(if to_file { 0 } else { 1000 });
            let users = args.users.unwrap_or(if rate > 0 {
                (rate.saturating_mul(10)).min(u32::MAX as u64) as u32
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
                pace: match (args.real_time, rate) {
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
        Command::Dlq { command } => runtime()?.block_on(cli::dlq::run(command)),
        Command::Gateway { config } => {
            let config = Config::load(&config)?;
            runtime()?.block_on(sessionizer::gateway::run(
                &config,
                sessionizer::shutdown::signal(),
            ))
        }
        Command::Push { config } => {
            let config = Config::load(&config)?;
            runtime()?.block_on(sessionizer::push::run(
                &config,
                sessionizer::shutdown::signal(),
            ))
        }
        Command::Reidentify { config } => {
            let config = Config::load(&config)?;
            let redactor = match (&config.redact, config.redactor()?) {
                (Some(section), Some(r)) if section.mode == sessionizer::redact::RedactMode::Tokenize => r,
                _ => anyhow::bail!(
                    "reidentify needs [redact] with mode = \"tokenize\" and its key in the configuration"
                ),
            };
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("reading stdin (UTF-8 text)")?;
            let (restored, done) = redactor.reidentify(&text);
            std::io::Write::write_all(&mut std::io::stdout(), restored.as_bytes())?;
            eprintln!(
                "reidentify: {} tokens restored, {} left as they were (made under another key, or changed)",
                done.restored, done.refused
            );
            Ok(())
        }
        Command::Status { config, json } => {
            let config = Config::load(&config)?;
            let rows = runtime()?.block_on(sessionizer::status::read(&config))?;
            sessionizer::status::print(&rows, json, &mut std::io::stdout())?;
            Ok(())
        }
        Command::Reshard {
            config,
            from,
            dry_run,
        } => {
            let config = Config::load(&config)?;
            let report = runtime()?.block_on(sessionizer::redis::reshard::run_command(
                &config,
                from,
                dry_run,
                &mut std::io::stdout(),
            ))?;
            eprintln!(
                "reshard: done: {} entries moved, {} streams removed{}",
                report.moved,
                report.removed.len(),
                if dry_run {
                    " (dry run: nothing changed)"
                } else {
                    ""
                }
            );
            Ok(())
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            // The redaction key, and the files, as `run` opens them (not the
            // brokers).
            config.redactor()?;
            if config.source == SourceKind::File {
                sessionizer::file::check_paths(config.file_section()?)?;
            }
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::Run { config } => {
            let config = Config::load(&config)?;
            runtime()?.block_on(async move {
                if let Some(listen) = config.metrics.listen {
                    sessionizer::http::serve(listen).await?;
                }
                let every = config.metrics.progress_interval.as_duration();
                if !every.is_zero() {
                    tokio::spawn(sessionizer::progress::report(every));
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
    // Colour codes only for a person at a terminal, never in a file or a
    // log collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
