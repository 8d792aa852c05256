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
    /// Check a configuration (with environment overrides) and print the
    /// effective values, defaults included.
    CheckConfig {
        #[arg(long, env = "SESSIONIZER_CONFIG")]
        config: PathBuf,
    },
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
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::Run { config } => {
            let config = Config::load(&config)?;
            runtime()?.block_on(async move {
                if let Some(listen) = config.metrics.listen {
                    sessionizer::metrics::serve(listen).await?;
                }
                match config.source {
                    SourceKind::Kafka => {
                        sessionizer::kafka::run(&config, sessionizer::shutdown::signal()).await?;
                    }
                    SourceKind::Redis => {
                        sessionizer::redis::run(&config, sessionizer::shutdown::signal()).await?;
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
                            duplicates = stats.dropped[0],
                            late_dropped = stats.dropped[1],
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
