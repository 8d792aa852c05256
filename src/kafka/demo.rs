//! `sessionizer demo`: the whole pipeline with nothing installed. librdkafka's
//! in-process mock cluster stands in for Kafka; two workers share one
//! consumer group; the load generator ([`crate::produce`], in model time)
//! sends bursty chat traffic (with some poison records) in real time; each turn is printed as it is emitted; a
//! summary closes the run.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;

use crate::config::Config;
use crate::wall_clock::now_ms;
use crate::workload::WorkloadSpec;

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub duration: Duration,
    pub users: u32,
    pub poison_fraction: f64,
}

/// What the demo saw.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub events: u64,
    pub turns: u64,
    pub dead_letters: BTreeMap<String, u64>,
    /// Emit delay (turn seen − (last event + gap)) percentiles, ms.
    pub delay_p50_ms: Option<i64>,
    pub delay_p99_ms: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the mock cluster: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("a worker stopped: {0}")]
    Worker(#[from] super::WorkerError),
    #[error("the producer stopped: {0:#}")]
    Producer(#[from] anyhow::Error),
}

const TOPICS: [(&str, i32); 3] = [("chat", 4), ("turns", 2), ("dlq", 1)];

/// Runs the demo until `duration` has passed or `interrupt` resolves; turns
/// are written to `out` as they arrive.
pub async fn run(
    options: DemoOptions,
    interrupt: impl Future<Output = ()>,
    out: &mut (dyn std::io::Write + Send),
) -> Result<DemoSummary, DemoError> {
    let cluster = MockCluster::new(3)?;
    for (topic, partitions) in TOPICS {
        cluster.create_topic(topic, partitions, 1)?;
    }
    let bootstrap = cluster.bootstrap_servers();
    let config = Config::from_toml(
        &format!(
            "source = \"kafka\"\n[kafka]\nbrokers = \"{bootstrap}\"\ngroup_id = \"demo\"\ninput_topics = [\"chat\"]\noutput_topic = \"turns\"\ndlq_topic = \"dlq\"\n[kafka.properties]\n\"log_level\" = \"3\"\n"
        ),
        Vec::new(),
    )?;
    let gap = config.window.gap.0;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..2 {
        let config = config.clone();
        let mut stop = stop_rx.clone();
        workers.push(tokio::spawn(async move {
            super::run(&config, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        }));
    }

    let client = |group: &str| {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &bootstrap)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("log_level", "3");
        c
    };
    let turns: StreamConsumer = client("demo-printer").create()?;
    turns.subscribe(&["turns"])?;
    let dlq: StreamConsumer = client("demo-dlq").create()?;
    dlq.subscribe(&["dlq"])?;

    let start = now_ms();
    let spec = WorkloadSpec {
        users: options.users,
        burst_messages: (1, 5),
        in_burst_gap_ms: (300, 1_500),
        between_bursts_ms: (4_000, 30_000),
        duplicate_fraction: 0.02,
        poison_fraction: options.poison_fraction,
        start_ms: start,
        seed: start as u64,
        ..WorkloadSpec::default()
    };
    let producer = {
        let config = config.clone();
        let options = crate::produce::ProduceOptions {
            spec,
            pace: crate::produce::Pace::ModelTime,
            count: None,
            duration: None,
            protobuf: false,
            to: None,
            progress: false,
        };
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            crate::produce::run(&config, options, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
        })
    };
    let mut summary = DemoSummary::default();
    let mut delays = Vec::new();
    let deadline = tokio::time::Instant::now() + options.duration;
    tokio::pin!(interrupt);
    let _ = writeln!(out, "sessionizer demo: 2 workers, mock Kafka cluster at {bootstrap}, {} users, gap {gap} ms; Ctrl-C to stop", options.users);
    loop {
        tokio::select! {
            () = &mut interrupt => break,
            () = tokio::time::sleep_until(deadline) => break,
            m = turns.recv() => {
                let Ok(m) = m else { continue };
                let Ok(turn) = serde_json::from_slice::<crate::model::Turn<'static>>(m.payload().unwrap_or_default()) else { continue };
                let delay = now_ms() - (turn.end_time + gap);
                delays.push(delay);
                summary.turns += 1;
                let texts: Vec<&str> = turn.messages.iter().map(|m| &*m.text).collect();
                let _ = writeln!(
                    out,
                    "{:>8.1}s  {:<10} {:?}  ({} message{}, closed by {}{}, emitted {} ms after the gap)",
                    (now_ms() - start) as f64 / 1000.0,
                    turn.user_id,
                    texts.join(" / "),
                    turn.message_count,
                    if turn.message_count == 1 { "" } else { "s" },
                    turn.closed_by.as_str(),
                    if turn.late { ", late" } else { "" },
                    delay
                );
            }
            m = dlq.recv() => {
                let Ok(m) = m else { continue };
                let reason = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == super::dead_letter::REASON))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                let _ = writeln!(out, "{:>8.1}s  dead letter: {reason}", (now_ms() - start) as f64 / 1000.0);
                *summary.dead_letters.entry(reason).or_default() += 1;
            }
        }
    }
    let _ = stop_tx.send(true);
    if let Ok(produced) = producer.await {
        summary.events = produced?.records;
    }
    for worker in workers {
        if let Ok(result) = worker.await {
            result?;
        }
    }
    delays.sort_unstable();
    let percentile = |p: f64| {
        delays
            .get(((delays.len() as f64 - 1.0) * p).round() as usize)
            .copied()
    };
    summary.delay_p50_ms = percentile(0.50);
    summary.delay_p99_ms = percentile(0.99);
    let _ = writeln!(
        out,
        "\nsummary: {} events sent, {} turns, dead letters {:?}",
        summary.events, summary.turns, summary.dead_letters
    );
    let _ = writeln!(
        out,
        "emit delay after the gap: p50 {} ms, p99 {} ms (window.max_out_of_orderness is {} ms)",
        summary.delay_p50_ms.map_or("-".into(), |d| d.to_string()),
        summary.delay_p99_ms.map_or("-".into(), |d| d.to_string()),
        config.window.max_out_of_orderness.0
    );
    // The readers leave their groups while the cluster still answers: a
    // consumer closed after its brokers are gone waits for them, and the demo
    // hung at the end.
    drop(turns);
    drop(dlq);
    drop(cluster);
    Ok(summary)
}
