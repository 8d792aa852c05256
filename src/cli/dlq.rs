//! `sessionizer dlq`: inspect, stats and replay over the configured source's
//! dead letters.

use std::path::PathBuf;

use clap::Subcommand;
use sessionizer::config::{Config, SourceKind};

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
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
        /// Show payloads and errors through the `[redact]` detectors (the
        /// default when `[redact]` is configured; the dead letters
        /// themselves keep the original bytes).
        #[arg(long, overrides_with = "no_redact")]
        redact: bool,
        /// Show payloads as they are, even with `[redact]` configured.
        #[arg(long)]
        no_redact: bool,
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
pub struct DlqSelect {
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
    /// The dead letters of `sessionizer push` (`[push] dlq`) instead of the
    /// workers': undelivered turns, replayed back onto the turn output.
    #[arg(long)]
    push: bool,
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

pub async fn run(command: DlqCommand) -> anyhow::Result<()> {
    use sessionizer::dlq::{output, replay, DeadLetterStore as _, Store};
    use std::io::Write as _;
    let select = match &command {
        DlqCommand::Inspect { select, .. }
        | DlqCommand::Stats { select, .. }
        | DlqCommand::Replay { select, .. } => select,
    };
    let config = Config::load(&select.config)?;
    let filter = select.filter()?;
    let mut store = if select.push {
        Store::open_push(&config).await?
    } else {
        Store::open(&config).await?
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match command {
        DlqCommand::Inspect {
            select,
            oldest_first,
            json,
            follow,
            redact,
            no_redact,
        } => {
            // `--no-redact` needs no key: the redactor is not even built.
            let redactor = match (no_redact, redact) {
                (true, _) => None,
                (false, explicit) => match config.redactor()? {
                    None if explicit => anyhow::bail!(
                        "--redact needs a [redact] section in the configuration (its detectors)"
                    ),
                    redactor => redactor,
                },
            };
            let shown = |e: &sessionizer::dlq::DlqEntry| match &redactor {
                None => e.clone(),
                Some(r) => {
                    let mut e = e.clone();
                    e.payload = r.redacted_payload(&e.payload);
                    e.error = r.redacted(&e.error).into_owned();
                    e
                }
            };
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
                let e = &shown(e);
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
            if entries.is_empty() && !follow {
                // On stderr: `--json` output stays JSON lines (none).
                eprintln!("no dead letters match");
            }
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
            let entries: Vec<_> = store
                .snapshot(None)
                .await?
                .into_iter()
                .filter(|e| filter.matches(e))
                .collect();
            let replayed = store.replayed(&entries)?;
            for (i, e) in entries.iter().enumerate() {
                stats.add(e, replayed.as_ref().map(|r| r[i]));
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
                } + &match report.skipped_unroutable.len() {
                    0 => String::new(),
                    n => format!(", {n} skipped with nowhere to go"),
                }
            );
        }
    }
    out.flush()?;
    Ok(())
}
