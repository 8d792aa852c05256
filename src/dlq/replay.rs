//! `dlq replay`: republish selected dead letters to the input, once.
//!
//! The loop is shared; what "once" means is the store's: Kafka records the
//! progress in a consumer group of its own (each DLQ position is committed
//! after its record was acknowledged by all in-sync replicas), Redis removes
//! the entry from the DLQ stream in the same script that adds it back to the
//! input, a file DLQ is only read. A record already replayed `max_replays`
//! times is skipped and reported, so a record that can never succeed cannot
//! loop between the input and the DLQ.

use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{DeadLetterStore as _, DlqEntry, Filter, Store};
use crate::codec::Decoder;
use crate::wall_clock::now_ms;

/// What to replay and how.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub filter: Filter,
    /// Replay at most this many.
    pub limit: Option<u64>,
    /// Another topic or stream than the record's source (file DLQ: the file
    /// to write, `-` for stdout).
    pub to: Option<String>,
    /// List what would be sent; send and record nothing.
    pub dry_run: bool,
    /// Records per second.
    pub rate: Option<f64>,
    pub max_replays: u32,
    /// A shell command each payload is piped through (stdin → stdout).
    pub transform: Option<String>,
    /// How long one run of the transform may take.
    pub transform_timeout: Duration,
    /// The workers' decoder: a transformed record going back into a worker's
    /// input must decode and validate before it is sent (and its dead letter
    /// removed).
    pub decoder: Option<Decoder>,
    /// Skip (and report) a record whose transform output is not a valid
    /// event, instead of stopping the replay.
    pub skip_invalid: bool,
    /// Kafka: the consumer group that records the replay's progress.
    pub group: String,
}

/// The consumer group that records a Kafka replay's progress by default:
/// one per selection of reasons (in any order, repeats ignored), so
/// replaying `invalid` and later `decode` does not skip either.
pub fn default_group(base: &str, reasons: &[String]) -> String {
    let mut reasons = reasons.to_vec();
    reasons.sort();
    reasons.dedup();
    if reasons.is_empty() {
        format!("{base}.dlq-replay")
    } else {
        format!("{base}.dlq-replay.{}", reasons.join("+"))
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub replayed: u64,
    /// Positions skipped because they were replayed `max_replays` times.
    pub skipped_max_replays: Vec<String>,
    /// Positions skipped because the transform's output was not a valid
    /// event (`--skip-invalid`); their dead letters stay.
    pub skipped_invalid: Vec<String>,
    /// Positions skipped because the dead letter keeps only the record's
    /// first bytes and no `--transform` rebuilds it.
    pub skipped_truncated: Vec<String>,
    /// Positions skipped because the store has nowhere to send them (Redis:
    /// no session key, from a stream no worker reads); their dead letters
    /// stay.
    pub skipped_unroutable: Vec<String>,
}

/// Replays, oldest first, until done, `limit`, or `stop` resolves (then
/// what was sent is recorded and the run ends cleanly). One line per record
/// on `out`.
pub async fn run(
    store: &mut Store,
    options: &ReplayOptions,
    stop: impl Future<Output = ()>,
    out: &mut impl Write,
) -> anyhow::Result<ReplayReport> {
    tokio::pin!(stop);
    let candidates = store.snapshot(Some(&options.group)).await?;
    let mut report = ReplayReport::default();
    let replayed = replay_each(store, options, candidates, &mut stop, out, &mut report).await;
    // Whatever happened, record what was sent (Kafka commits the progress),
    // so a failed or interrupted run repeated sends nothing twice.
    if !options.dry_run {
        store.finish()?;
    }
    replayed.map(|()| report)
}

async fn replay_each(
    store: &mut Store,
    options: &ReplayOptions,
    candidates: Vec<DlqEntry>,
    stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    out: &mut impl Write,
    report: &mut ReplayReport,
) -> anyhow::Result<()> {
    let started = Instant::now();
    for entry in candidates {
        if futures::poll!(stop.as_mut()).is_ready() {
            writeln!(out, "interrupted")?;
            break;
        }
        if options.limit.is_some_and(|l| report.replayed >= l) {
            break;
        }
        if !options.filter.matches(&entry) {
            store.pass(&entry)?;
            continue;
        }
        if entry.replay_count >= options.max_replays {
            writeln!(
                out,
                "skipped {}: replayed {} times already (--max-replays {})",
                entry.position, entry.replay_count, options.max_replays
            )?;
            report.skipped_max_replays.push(entry.position.clone());
            store.pass(&entry)?;
            continue;
        }
        if let (Some(t), None) = (&entry.truncated, &options.transform) {
            writeln!(
                out,
                "skipped {}: the dead letter keeps only the first {} of the record's {} bytes \
                 (SHA-256 {}); --transform can rebuild it",
                entry.position,
                entry.payload.len(),
                t.original_bytes,
                t.original_sha256
            )?;
            report.skipped_truncated.push(entry.position.clone());
            store.pass(&entry)?;
            continue;
        }
        let payload = match &options.transform {
            Some(command) => {
                let transformed =
                    transform(command, &entry.payload, options.transform_timeout, stop).await;
                match transformed {
                    Ok(Transformed::Payload(payload)) => payload,
                    Ok(Transformed::Interrupted) => {
                        writeln!(out, "interrupted")?;
                        break;
                    }
                    // Ctrl-C reaches the transform too: an interruption, not
                    // a failure of the record.
                    Err(_) if futures::poll!(stop.as_mut()).is_ready() => {
                        writeln!(out, "interrupted")?;
                        break;
                    }
                    Err(e) => return Err(e.context(format!("--transform on {}", entry.position))),
                }
            }
            None => entry.payload.clone(),
        };
        let target = match store.target(&entry, &payload, options.to.as_deref()) {
            Ok(target) => target,
            Err(why) => {
                writeln!(out, "skipped {why}")?;
                report.skipped_unroutable.push(entry.position.clone());
                store.pass(&entry)?;
                continue;
            }
        };
        // What goes back into a worker's input must be a valid event: a
        // transform's garbage would only come back as a dead letter, and
        // (Redis) the original would be gone. A parking lot elsewhere (`--to`)
        // is not read by the workers.
        let into_input =
            matches!(store, Store::File(_)) || options.to.is_none() || target == entry.source;
        if options.transform.is_some() && into_input {
            if let Some(poison) = options
                .decoder
                .as_ref()
                .and_then(|d| d.decode(&payload, now_ms()).err())
            {
                let why = format!(
                    "the transform's output for {} is not a valid event ({}: {}); its dead letter is kept",
                    entry.position,
                    poison.reason.as_str(),
                    poison.message
                );
                if !options.skip_invalid {
                    anyhow::bail!("{why} (--skip-invalid goes on with the next record)");
                }
                writeln!(out, "skipped {why}")?;
                report.skipped_invalid.push(entry.position.clone());
                store.pass(&entry)?;
                continue;
            }
        }
        if options.dry_run {
            writeln!(
                out,
                "would replay {} ({}) to {target}: {}",
                entry.position,
                entry.reason,
                String::from_utf8_lossy(&payload)
            )?;
            report.replayed += 1;
            continue;
        }
        if let Some(rate) = options.rate.filter(|r| *r > 0.0) {
            let due = started + Duration::from_secs_f64(report.replayed as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        if store.republish(&entry, payload, &target).await? {
            writeln!(out, "replayed {} to {target}", entry.position)?;
            report.replayed += 1;
        } else {
            writeln!(
                out,
                "skipped {}: replayed meanwhile by another run",
                entry.position
            )?;
        }
    }
    Ok(())
}

/// What a transform made of a payload.
enum Transformed {
    Payload(Vec<u8>),
    /// `stop` resolved first: the transform's process group was killed.
    Interrupted,
}

/// Pipes the payload through `sh -c command`, in a process group of its own
/// so that a timeout or a stop of the replay kills the transform and
/// everything it started (`sh -c 'a | b'`). A non-zero exit, or no exit
/// within `timeout`, stops the replay before this record (nothing after it
/// is recorded as replayed). A transform may stop reading its input early.
async fn transform(
    command: &str,
    payload: &[u8],
    timeout: Duration,
    stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<Transformed> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .process_group(0)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("starting the transform")?;
    let group = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32))
        .context("the transform has no process id")?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let payload = payload.to_vec();
    let writer = tokio::spawn(async move {
        match stdin.write_all(&payload).await {
            // The transform closed its input early: what it read is its business.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    });
    // Writing its input is inside the timeout too: a background child can
    // hold the pipe open after the shell exits.
    let run = async {
        let mut bytes = Vec::new();
        let read = stdout.read_to_end(&mut bytes).await;
        let status = child.wait().await;
        let written = writer.await;
        (read, status, written, bytes)
    };
    let kill = || {
        // Already gone is fine; anything else leaves a process behind: say so.
        if let Err(e) = rustix::process::kill_process_group(group, rustix::process::Signal::KILL) {
            if e != rustix::io::Errno::SRCH {
                tracing::warn!(error = %e, "could not kill the transform's process group");
            }
        }
    };
    let ended = tokio::select! {
        done = run => Ok(done),
        () = tokio::time::sleep(timeout) => Err(None),
        () = stop.as_mut() => Err(Some(Transformed::Interrupted)),
    };
    // Whatever it started in the background goes with it.
    kill();
    let (read, status, written, mut bytes) = match ended {
        Ok(done) => done,
        Err(interrupted) => {
            // Reap the shell; what it started died with the group.
            let _ = child.wait().await;
            return interrupted.ok_or_else(|| {
                anyhow::anyhow!(
                    "the transform did not finish within --transform-timeout ({}); killed it",
                    humantime::format_duration(timeout)
                )
            });
        }
    };
    read.context("reading the transform's output")?;
    let status = status.context("waiting for the transform")?;
    written?.context("writing the payload to the transform")?;
    anyhow::ensure!(status.success(), "the transform exited with {status}");
    // Commands like `jq -c` end their output with one newline: drop that one.
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    Ok(Transformed::Payload(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_group_names_the_selection_whatever_its_order() {
        let r = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(default_group("g", &[]), "g.dlq-replay");
        assert_eq!(
            default_group("g", &r(&["oversize", "invalid", "invalid"])),
            default_group("g", &r(&["invalid", "oversize"]))
        );
        assert_eq!(default_group("g", &r(&["invalid"])), "g.dlq-replay.invalid");
    }
}
