//! What this worker has done and owns, kept in-process: the totals and the
//! owned partitions or shards with their open sessions and lag. It feeds
//! the progress line logged every `metrics.progress_interval`, and tells
//! `/metrics` which partitions' gauges to show (see
//! [`crate::metrics::render`]); it works without an exporter installed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Records read, turns emitted and dead letters made since the start.
static RECORDS: AtomicU64 = AtomicU64::new(0);
static TURNS: AtomicU64 = AtomicU64::new(0);
static DEAD_LETTERS: AtomicU64 = AtomicU64::new(0);

pub fn record() {
    RECORDS.fetch_add(1, Ordering::Relaxed);
}

pub fn turn() {
    TURNS.fetch_add(1, Ordering::Relaxed);
}

pub fn dead_letter() {
    DEAD_LETTERS.fetch_add(1, Ordering::Relaxed);
}

/// A partition's latest open-session count and consumer lag
/// ([`UNKNOWN`] while the broker cannot say).
#[derive(Debug, Default)]
pub struct PartitionState {
    pub open_sessions: AtomicU64,
    pub consumer_lag: AtomicU64,
}

/// The consumer lag of a partition whose broker cannot say.
pub const UNKNOWN: u64 = u64::MAX;

/// Owned partitions by label: how many [`Owned`] holds there are, and the state.
type Registry = HashMap<String, (usize, Arc<PartitionState>)>;

static OWNED: LazyLock<Mutex<Registry>> = LazyLock::new(Default::default);

fn owned() -> MutexGuard<'static, Registry> {
    OWNED.lock().unwrap_or_else(|e| e.into_inner())
}

/// One hold on an owned partition, released on drop: the partition counts as
/// owned while any hold on it lives.
#[derive(Debug)]
pub struct Owned {
    label: String,
    pub state: Arc<PartitionState>,
    /// The partition was not owned before this hold.
    pub first: bool,
}

impl Owned {
    pub fn new(label: &str) -> Owned {
        let mut owned = owned();
        let (count, state) = owned.entry(label.to_owned()).or_insert_with(|| {
            let state = PartitionState::default();
            state.consumer_lag.store(UNKNOWN, Ordering::Relaxed);
            (0, Arc::new(state))
        });
        *count += 1;
        Owned {
            label: label.to_owned(),
            state: state.clone(),
            first: *count == 1,
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let mut owned = owned();
        if let Some((count, _)) = owned.get_mut(&self.label) {
            *count -= 1;
            if *count == 0 {
                owned.remove(&self.label);
            }
        }
    }
}

/// Whether a partition label is owned now.
pub fn is_owned(label: &str) -> bool {
    owned().contains_key(label)
}

/// The totals and the owned partitions now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub records: u64,
    pub turns: u64,
    pub dead_letters: u64,
    /// Label → (open sessions, consumer lag or `None`).
    pub partitions: BTreeMap<String, (u64, Option<u64>)>,
}

pub fn snapshot() -> Snapshot {
    let partitions = owned()
        .iter()
        .map(|(label, (_, state))| {
            let lag = state.consumer_lag.load(Ordering::Relaxed);
            let open = state.open_sessions.load(Ordering::Relaxed);
            (label.clone(), (open, (lag != UNKNOWN).then_some(lag)))
        })
        .collect();
    Snapshot {
        records: RECORDS.load(Ordering::Relaxed),
        turns: TURNS.load(Ordering::Relaxed),
        dead_letters: DEAD_LETTERS.load(Ordering::Relaxed),
        partitions,
    }
}

/// The progress line's partition list: `name lag N open M`, `;`-separated.
pub fn describe_partitions(snapshot: &Snapshot) -> String {
    if snapshot.partitions.is_empty() {
        return "none owned".to_owned();
    }
    let lag = |l: Option<u64>| l.map_or_else(|| "unknown".to_owned(), |l| l.to_string());
    snapshot
        .partitions
        .iter()
        .map(|(name, (open, l))| format!("{name} lag {} open {open}", lag(*l)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Logs a progress line every `every` at info level, forever: totals, rates
/// since the last line, and lag and open sessions per owned partition.
pub async fn report(every: Duration) {
    let mut last = (Instant::now(), snapshot());
    loop {
        tokio::time::sleep(every).await;
        let now = (Instant::now(), snapshot());
        let seconds = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| ((a - b) as f64 / seconds).round() as u64;
        let s = &now.1;
        tracing::info!(
            records = s.records,
            records_per_s = rate(s.records, last.1.records),
            turns = s.turns,
            turns_per_s = rate(s.turns, last.1.turns),
            dead_letters = s.dead_letters,
            partitions = %describe_partitions(s),
            "progress"
        );
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_owned_while_any_hold_lives() {
        let first = Owned::new("progress-unit/0");
        let second = Owned::new("progress-unit/0");
        first.state.open_sessions.store(3, Ordering::Relaxed);
        second.state.consumer_lag.store(UNKNOWN, Ordering::Relaxed);
        let s = snapshot();
        assert_eq!(s.partitions["progress-unit/0"], (3, None), "one state");
        assert!(describe_partitions(&s).contains("progress-unit/0 lag unknown open 3"));
        drop(first);
        assert!(is_owned("progress-unit/0"));
        drop(second);
        assert!(!is_owned("progress-unit/0"));
    }
}
