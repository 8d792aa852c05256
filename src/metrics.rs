//! What the workers report: every metric name in one place, the Prometheus
//! exporter, and the `/healthz` and `/readyz` endpoints beside `/metrics`.
//!
//! The hot path holds registered handles ([`PipelineMetrics`]): an increment
//! is one atomic add, and with no exporter installed (`[metrics]` unset, the
//! tests, the benchmarks) the handles do nothing. Labels carry kinds,
//! reasons and partition or shard names, never user ids, so the number of
//! series stays bounded whatever the traffic.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::{ClosedSession, DropReason};
use crate::model::{ClosedBy, DeadLetterReason};
use crate::progress;

/// Records handed to a pipeline (read from the source), poison included.
pub const RECORDS_CONSUMED: &str = "sessionizer_records_consumed_total";
/// Valid events by `kind` (message, typing, end_of_turn).
pub const EVENTS: &str = "sessionizer_events_total";
/// Turns closed, by `closed_by`; `late` turns counted again in `LATE_TURNS`.
pub const TURNS: &str = "sessionizer_turns_total";
/// Turns made of one late message (`late = "new-turn"`).
pub const LATE_TURNS: &str = "sessionizer_late_turns_total";
/// Dead letters by `reason`.
pub const DEAD_LETTERS: &str = "sessionizer_dead_letters_total";
/// Duplicates dropped (a message id seen again in its open session).
pub const DUPLICATES: &str = "sessionizer_duplicates_total";
/// Other counted drops by `reason` (`late` under `late = "drop"`,
/// `no_message`).
pub const DROPPED: &str = "sessionizer_dropped_total";
/// Messages per turn.
pub const TURN_MESSAGES: &str = "sessionizer_turn_messages";
/// Seconds from the moment a turn could close by event time (its last
/// event's time + gap for `gap`; its last event's time for the other
/// closures, so for a cap this includes the pause before the event that
/// broke it) to the moment the worker hands it to the output, by the wall
/// clock.
pub const EMIT_DELAY: &str = "sessionizer_emit_delay_seconds";
/// Open sessions, by `partition`.
pub const OPEN_SESSIONS: &str = "sessionizer_open_sessions";
/// Wall clock minus the partition's watermark, seconds, by `partition`,
/// while it has open sessions (0 without).
pub const WATERMARK_LAG: &str = "sessionizer_watermark_lag_seconds";
/// Records in the source not yet read, by `partition` (Kafka: high
/// watermark minus position; Redis: the group's `lag`).
pub const CONSUMER_LAG: &str = "sessionizer_consumer_lag_records";
/// Commits (Kafka offset commits, Redis ack steps) by `result` (ok, failed).
pub const COMMITS: &str = "sessionizer_commits_total";
/// Ownership changes by `change`: Kafka `assigned`/`revoked` partitions,
/// Redis `acquired`/`lost`/`released` shard leases.
pub const OWNERSHIP_CHANGES: &str = "sessionizer_ownership_changes_total";
/// Partitions or shards this worker owns now.
pub const OWNED: &str = "sessionizer_owned_partitions";
/// Bytes of turns and dead letters handed to the output and not yet
/// acknowledged (Kafka; bounded by `kafka.max_in_flight_bytes`).
pub const IN_FLIGHT_BYTES: &str = "sessionizer_output_in_flight_bytes";
/// 1 while the worker has paused reading its input because too much output
/// waits for acknowledgement, else 0.
pub const INPUT_PAUSED: &str = "sessionizer_input_paused";
/// Owned partitions or shards whose broker calls have failed without a
/// success for [`FAILING_AFTER`] or longer (they make `/readyz` fail).
pub const FAILING: &str = "sessionizer_failing_partitions";
/// Seconds a partition's commit point has not advanced while records wait
/// behind it, by `partition` (Kafka; past `kafka.commit_stall` the partition
/// counts in [`FAILING`]).
pub const COMMIT_STALLED: &str = "sessionizer_commit_stalled_seconds";
/// Per-event `gap_ms` values over `window.max_gap`, clamped to it.
pub const GAPS_CLAMPED: &str = "sessionizer_gaps_clamped_total";
/// Records a partition has read past its last confirmed commit, by
/// `partition` (Kafka): what a crash would make the next owner read again.
pub const COMMIT_LAG: &str = "sessionizer_commit_lag_records";
/// Times a partition's commit, pulled back to the start of a delivered turn,
/// was moved to the end of its resolved prefix after `kafka.max_pullback`
/// (Kafka, brokers that do not keep commit metadata), by `partition`.
pub const PULLBACKS_RELEASED: &str = "sessionizer_commit_pullbacks_released_total";
/// Partitions (Kafka) or shards (Redis) whose open sessions were rebuilt
/// after a panic while processing a record, by `partition`.
pub const PARTITIONS_REBUILT: &str = "sessionizer_partitions_rebuilt_total";
/// Redis entries whose session key hashes to another shard than the
/// stream they were read from, by `partition` (see `redis.misrouted`).
pub const MISROUTED: &str = "sessionizer_misrouted_total";
/// Values the redaction stage replaced in emitted turns, by `detector`.
pub const REDACTIONS: &str = "sessionizer_redactions_total";
/// Seconds an agent call took (`[gateway.agent]`), answered or not.
pub const GATEWAY_AGENT_CALL: &str = "sessionizer_gateway_agent_call_seconds";
/// Seconds a `?wait=` request was held after its write, by the `outcome`
/// it got: `turn`, `superseded` or `pending`.
pub const GATEWAY_WAIT: &str = "sessionizer_gateway_wait_seconds";
/// Gateway requests held for their turn now (`?wait=`).
pub const GATEWAY_HELD: &str = "sessionizer_gateway_held_requests";
/// Gateway requests by `route` and `status` (the HTTP status code).
pub const GATEWAY_REQUESTS: &str = "sessionizer_gateway_requests_total";
/// `sessionizer push`: turns settled, by `result` (`delivered`,
/// `rejected`, `failed`, `not_a_turn`) and `class` of the last answer
/// (`2xx` … `5xx`, `error` for none).
pub const PUSH_DELIVERIES: &str = "sessionizer_push_deliveries_total";
/// `sessionizer push`: HTTP attempts by `class`.
pub const PUSH_ATTEMPTS: &str = "sessionizer_push_attempts_total";
/// `sessionizer push`: seconds of one HTTP attempt.
pub const PUSH_CALL: &str = "sessionizer_push_call_seconds";
/// `sessionizer push`: seconds from a turn's read to its settled outcome
/// (delivered, or dead-lettered), retries included.
pub const PUSH_DELIVERY: &str = "sessionizer_push_delivery_seconds";
/// `sessionizer push`: deliveries in progress now.
pub const PUSH_IN_FLIGHT: &str = "sessionizer_push_in_flight";
/// `sessionizer push`: age of the oldest turn read and not settled, seconds
/// (0 when none).
pub const PUSH_OLDEST: &str = "sessionizer_push_oldest_undelivered_seconds";
/// Redis consumer groups recreated after they vanished (`FLUSHALL`, a
/// restart without persistence, `XGROUP DESTROY`), by `partition`.
pub const GROUPS_RECREATED: &str = "sessionizer_groups_recreated_total";

/// How long a partition's calls may keep failing before it counts as failing.
pub const FAILING_AFTER: Duration = Duration::from_secs(30);

/// Counter handles for one partition's pipeline.
#[derive(Debug, Clone)]
pub struct PipelineMetrics {
    records: Counter,
    events: [Counter; 3],
    turns: [Counter; 5],
    late_turns: Counter,
    dead_letters: [Counter; DeadLetterReason::ALL.len()],
    dropped: [Counter; 3],
    turn_messages: Histogram,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        PipelineMetrics {
            records: counter!(RECORDS_CONSUMED),
            events: ["message", "typing", "end_of_turn"]
                .map(|kind| counter!(EVENTS, "kind" => kind)),
            turns: ClosedBy::ALL.map(|c| counter!(TURNS, "closed_by" => c.as_str())),
            late_turns: counter!(LATE_TURNS),
            dead_letters: DeadLetterReason::ALL
                .map(|r| counter!(DEAD_LETTERS, "reason" => r.as_str())),
            dropped: DropReason::ALL.map(|r| match r {
                DropReason::Duplicate => counter!(DUPLICATES),
                _ => counter!(DROPPED, "reason" => r.as_str()),
            }),
            turn_messages: histogram!(TURN_MESSAGES),
        }
    }
}

impl PipelineMetrics {
    pub fn record(&self) {
        self.records.increment(1);
        progress::record();
    }

    /// `kind`: 0 message, 1 typing, 2 end of turn (as `Stats::events`).
    pub fn event(&self, kind: usize) {
        self.events[kind].increment(1);
    }

    pub fn turn(&self, s: &ClosedSession) {
        self.turns[s.closed_by.index()].increment(1);
        progress::turn();
        if s.late {
            self.late_turns.increment(1);
        }
        self.turn_messages.record(s.messages.len() as f64);
    }

    pub fn dead_letter(&self, reason: DeadLetterReason) {
        self.dead_letters[reason.index()].increment(1);
        progress::dead_letter();
    }

    pub fn dropped(&self, reason: DropReason) {
        self.dropped[reason.index()].increment(1);
    }
}

/// Records a turn's emit delay as it is handed to the output. Late turns are
/// left out: their delay is the lateness of the data, not the worker's.
pub fn observe_emit(session: &ClosedSession, gap_ms: i64, now_ms: i64) {
    if session.late {
        return;
    }
    let could_close = match session.closed_by {
        ClosedBy::Gap => session.end_time + gap_ms,
        _ => session.end_time,
    };
    // Registered once: the recorder is installed before any worker starts.
    static HANDLE: std::sync::OnceLock<Histogram> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| histogram!(EMIT_DELAY))
        .record((now_ms - could_close).max(0) as f64 / 1000.0);
}

/// The per-partition gauges: `/metrics` shows them only for the partitions
/// and shards this worker owns now (see [`render`]).
const PARTITION_GAUGES: [&str; 5] = [
    OPEN_SESSIONS,
    WATERMARK_LAG,
    CONSUMER_LAG,
    COMMIT_LAG,
    COMMIT_STALLED,
];

/// The exposition, without the per-partition gauges of partitions this
/// worker does not own (the recorder has no way to unregister a series).
pub fn render(handle: &PrometheusHandle) -> String {
    let text = handle.render();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if keep(line, progress::is_owned) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Whether an exposition line stays: anything but a sample of a
/// per-partition gauge whose `partition` is not owned.
fn keep(line: &str, is_owned: impl Fn(&str) -> bool) -> bool {
    let name = line.split(['{', ' ']).next().unwrap_or_default();
    if !PARTITION_GAUGES.contains(&name) {
        return true;
    }
    let Some((_, rest)) = line.split_once("partition=\"") else {
        return true;
    };
    is_owned(rest.split('"').next().unwrap_or_default())
}

/// Gauges for one owned partition or shard; while any clone lives, the
/// partition's gauges are in `/metrics`.
#[derive(Debug, Clone)]
pub struct PartitionGauges {
    open_sessions: Gauge,
    watermark_lag: Gauge,
    consumer_lag: Gauge,
    owned: Arc<progress::Owned>,
}

impl PartitionGauges {
    pub fn new(partition: &str) -> Self {
        let label = partition.to_owned();
        let owned = progress::Owned::new(&label);
        let first = owned.first;
        let gauges = PartitionGauges {
            owned: Arc::new(owned),
            open_sessions: gauge!(OPEN_SESSIONS, "partition" => label.clone()),
            watermark_lag: gauge!(WATERMARK_LAG, "partition" => label.clone()),
            consumer_lag: gauge!(CONSUMER_LAG, "partition" => label),
        };
        if first {
            // Taken just now: no sessions and an unknown lag, not the values
            // its series held when this worker owned it before.
            gauges.open_sessions.set(0.0);
            gauges.watermark_lag.set(0.0);
            gauges.consumer_lag.set(f64::NAN);
        }
        gauges
    }

    /// `watermark` is `i64::MIN` until the partition has seen an event. The
    /// lag only counts while sessions wait on the watermark: an idle,
    /// caught-up partition reads 0, not the time since its last event (which
    /// after a backlog looked like an outage: 86,303 s).
    pub fn update(&self, open_sessions: usize, watermark: i64, now_ms: i64) {
        self.open_sessions.set(open_sessions as f64);
        let state = &self.owned.state;
        state
            .open_sessions
            .store(open_sessions as u64, Ordering::Relaxed);
        if open_sessions == 0 {
            self.watermark_lag.set(0.0);
        } else if watermark != i64::MIN {
            self.watermark_lag
                .set((now_ms - watermark).max(0) as f64 / 1000.0);
        }
    }

    pub fn consumer_lag(&self, records: u64) {
        self.consumer_lag.set(records as f64);
        let state = &self.owned.state;
        state.consumer_lag.store(records, Ordering::Relaxed);
    }

    /// The broker cannot say (Redis after a restart): NaN, which no alert
    /// threshold matches, rather than a stale number.
    pub fn consumer_lag_unknown(&self) {
        self.consumer_lag.set(f64::NAN);
        let state = &self.owned.state;
        state
            .consumer_lag
            .store(progress::UNKNOWN, Ordering::Relaxed);
    }
}

pub fn commit(ok: bool) {
    counter!(COMMITS, "result" => if ok { "ok" } else { "failed" }).increment(1);
}

/// A dead letter made outside a pipeline (the messages of an undeliverable
/// turn).
pub fn dead_letter(reason: DeadLetterReason) {
    counter!(DEAD_LETTERS, "reason" => reason.as_str()).increment(1);
    progress::dead_letter();
}

/// The gauge of [`COMMIT_STALLED`] for one partition.
pub fn commit_stalled(partition: &str) -> Gauge {
    gauge!(COMMIT_STALLED, "partition" => partition.to_owned())
}

/// The [`MISROUTED`] counter of one shard.
pub fn misrouted(partition: &str) -> Counter {
    counter!(MISROUTED, "partition" => partition.to_owned())
}

pub fn redactions(detector: &str) -> Counter {
    counter!(REDACTIONS, "detector" => detector.to_owned())
}

/// An event's `gap_ms` was clamped to `window.max_gap`.
pub fn gateway_agent_call(took: Duration) {
    histogram!(GATEWAY_AGENT_CALL).record(took.as_secs_f64());
}

pub fn gateway_wait(outcome: &'static str, held: Duration) {
    histogram!(GATEWAY_WAIT, "outcome" => outcome).record(held.as_secs_f64());
}

pub fn push_attempt(class: &'static str, took: Duration) {
    counter!(PUSH_ATTEMPTS, "class" => class).increment(1);
    histogram!(PUSH_CALL).record(took.as_secs_f64());
}

pub fn push_delivery(result: &'static str, class: &'static str) {
    counter!(PUSH_DELIVERIES, "result" => result, "class" => class).increment(1);
}

pub fn push_delivery_seconds(took: Duration) {
    histogram!(PUSH_DELIVERY).record(took.as_secs_f64());
}

pub fn push_in_flight(n: usize) {
    gauge!(PUSH_IN_FLIGHT).set(n as f64);
}

pub fn push_oldest(age: Option<Duration>) {
    gauge!(PUSH_OLDEST).set(age.map_or(0.0, |a| a.as_secs_f64()));
}

pub fn gateway_held(held: usize) {
    gauge!(GATEWAY_HELD).set(held as f64);
}

pub fn gateway_request(route: &'static str, status: u16) {
    counter!(GATEWAY_REQUESTS, "route" => route, "status" => status.to_string()).increment(1);
}

/// An event's `gap_ms` was clamped to `window.max_gap`.
pub fn gap_clamped() {
    counter!(GAPS_CLAMPED).increment(1);
}

/// The gauge of [`COMMIT_LAG`] for one partition.
pub fn commit_lag(partition: &str) -> Gauge {
    gauge!(COMMIT_LAG, "partition" => partition.to_owned())
}

/// A pulled-back commit was released on `partition` ([`PULLBACKS_RELEASED`]).
pub fn pullback_released(partition: &str) {
    counter!(PULLBACKS_RELEASED, "partition" => partition.to_owned()).increment(1);
}

/// `partition`'s open sessions were rebuilt after a panic
/// ([`PARTITIONS_REBUILT`]).
pub fn partition_rebuilt(partition: &str) {
    counter!(PARTITIONS_REBUILT, "partition" => partition.to_owned()).increment(1);
}

/// The gauge of [`IN_FLIGHT_BYTES`].
pub fn in_flight_bytes() -> Gauge {
    gauge!(IN_FLIGHT_BYTES)
}

/// Whether the input is paused for unacknowledged output ([`INPUT_PAUSED`]).
pub fn input_paused(paused: bool) {
    gauge!(INPUT_PAUSED).set(if paused { 1.0 } else { 0.0 });
}

/// A Redis consumer group was recreated on `partition`.
pub fn group_recreated(partition: &str) {
    counter!(GROUPS_RECREATED, "partition" => partition.to_owned()).increment(1);
}

/// `change`: assigned, revoked, acquired, lost, released.
pub fn ownership_change(change: &'static str, count: usize) {
    counter!(OWNERSHIP_CHANGES, "change" => change).increment(count as u64);
}

/// What `/readyz` reports. Process-wide, like the metrics registry: a
/// process runs one worker.
#[derive(Debug)]
pub struct Readiness {
    connected: AtomicBool,
    owned: AtomicUsize,
    failing: AtomicUsize,
    /// The last broker error that explains why the worker is not ready
    /// (unreachable server, refused login, missing topic), shown by
    /// `/readyz`; cleared once it is ready.
    cause: std::sync::Mutex<Option<String>>,
}

pub static READINESS: Readiness = Readiness {
    connected: AtomicBool::new(false),
    owned: AtomicUsize::new(0),
    failing: AtomicUsize::new(0),
    cause: std::sync::Mutex::new(None),
};

/// How long a turn reader (the gateway's, push's) may fail before
/// `/readyz` says not ready: a blip is not an outage.
pub const READER_FAILING_AFTER_MS: i64 = 5_000;

/// One owned partition's failing state for `/readyz`: failing once its calls
/// have failed for [`FAILING_AFTER`] without a success in between; clears on
/// the next success and when dropped (the partition left the worker).
#[derive(Debug)]
pub struct FailingMark {
    after_ms: i64,
    failing_since: Option<i64>,
    marked: bool,
}

impl Default for FailingMark {
    fn default() -> Self {
        FailingMark::after(FAILING_AFTER.as_millis() as i64)
    }
}

impl FailingMark {
    /// Failing once the failures span `after_ms`.
    pub fn after(after_ms: i64) -> Self {
        FailingMark {
            after_ms,
            failing_since: None,
            marked: false,
        }
    }

    /// A call failed at `now_ms`.
    pub fn failed(&mut self, now_ms: i64) {
        let since = *self.failing_since.get_or_insert(now_ms);
        if !self.marked && now_ms - since >= self.after_ms {
            self.marked = true;
            READINESS.failing.fetch_add(1, Ordering::Relaxed);
            gauge!(FAILING).increment(1.0);
        }
    }

    /// A call succeeded.
    pub fn ok(&mut self) {
        self.failing_since = None;
        if std::mem::take(&mut self.marked) {
            READINESS.failing.fetch_sub(1, Ordering::Relaxed);
            gauge!(FAILING).decrement(1.0);
        }
    }
}

impl Drop for FailingMark {
    fn drop(&mut self) {
        self.ok();
    }
}

impl Readiness {
    /// The worker reached its broker (a successful read or assignment).
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// How many partitions or shards the worker owns.
    pub fn set_owned(&self, owned: usize) {
        self.owned.store(owned, Ordering::Relaxed);
        gauge!(OWNED).set(owned as f64);
    }

    /// A broker error that can explain why the worker is not ready: shown by
    /// `/readyz` beside what is missing, until the worker is ready.
    pub fn cause(&self, cause: impl Into<String>) {
        *self.cause.lock().expect("not poisoned") = Some(cause.into());
    }

    /// `Err` says what is missing, and the last broker error that explains it.
    pub fn check(&self) -> Result<usize, String> {
        let missing = self.missing();
        let mut cause = self.cause.lock().expect("not poisoned");
        match missing {
            Ok(n) => {
                *cause = None;
                Ok(n)
            }
            Err(what) => Err(match cause.as_deref() {
                Some(cause) => format!("{what}; last broker error: {cause}"),
                None => what,
            }),
        }
    }

    fn missing(&self) -> Result<usize, String> {
        if !self.connected.load(Ordering::Relaxed) {
            return Err("not connected to the broker".to_owned());
        }
        match self.failing.load(Ordering::Relaxed) {
            0 => {}
            n => {
                return Err(format!(
                    "{n} owned partition(s) or shard(s) failing for {} s or more (see the log)",
                    FAILING_AFTER.as_secs()
                ))
            }
        }
        match self.owned.load(Ordering::Relaxed) {
            0 => Err("no partitions or shards assigned".to_owned()),
            n => Ok(n),
        }
    }
}

/// Buckets of the request latency histograms, seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the Prometheus recorder (once per process: later calls get the
/// same handle) that `/metrics` renders (see [`crate::http`]).
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(EMIT_DELAY.to_owned()),
            &[
                0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 5.0, 10.0,
                30.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(TURN_MESSAGES.to_owned()),
                &[1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 50.0, 100.0],
            )
        })
        .and_then(|b| {
            // Request latencies (the gateway's agent calls, push attempts):
            // histograms, so replicas can be summed.
            b.set_buckets_for_metric(Matcher::Suffix("_call_seconds".to_owned()), LATENCY_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(GATEWAY_WAIT.to_owned()), LATENCY_BUCKETS)
        })
        .and_then(|b| {
            // Retries included: up to `push.max_elapsed` (5 min by default).
            b.set_buckets_for_metric(
                Matcher::Full(PUSH_DELIVERY.to_owned()),
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0,
                ],
            )
        })
        .context("building the Prometheus recorder")?
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_counts_as_failing_only_after_failing_for_the_bound() {
        let failing = || READINESS.failing.load(Ordering::Relaxed);
        let after = FAILING_AFTER.as_millis() as i64;
        let mut mark = FailingMark::default();
        mark.failed(1_000);
        mark.failed(1_000 + after - 1);
        assert_eq!(failing(), 0, "not yet");
        mark.failed(1_000 + after);
        assert_eq!(failing(), 1);
        mark.failed(1_000 + 2 * after);
        assert_eq!(failing(), 1, "counted once");
        mark.ok();
        assert_eq!(failing(), 0, "a success clears it");
        mark.failed(10_000_000);
        mark.failed(10_000_000 + after);
        assert_eq!(failing(), 1);
        drop(mark);
        assert_eq!(failing(), 0, "a partition that leaves clears it");
    }

    #[test]
    fn only_owned_partitions_keep_their_gauges_in_the_exposition() {
        let owned = |p: &str| p == "unit/held";
        let sample = |p: &str| format!("{OPEN_SESSIONS}{{partition=\"{p}\"}} 0");
        assert!(keep(&sample("unit/held"), owned));
        assert!(!keep(&sample("unit/released"), owned));
        assert!(keep(&format!("# TYPE {OPEN_SESSIONS} gauge"), owned));
        let counter = format!("{MISROUTED}{{partition=\"unit/released\"}} 3");
        assert!(keep(&counter, owned), "counters stay");
    }
}
