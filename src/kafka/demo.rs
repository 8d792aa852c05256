//! `sessionizer demo`: the whole pipeline with nothing installed. librdkafka's
//! in-process mock cluster stands in for Kafka; two workers share one
//! consumer group; the load generator ([`crate::produce`], in model time)
//! sends bursty chat traffic (with some poison records) in real time; each turn is printed as it is emitted; a
//! summary closes the run. Meanwhile a gateway ([`crate::gateway`]) on a
//! loopback port takes one web visitor's three quick messages over HTTP with
//! `?wait=`, and prints the three answers: two superseded, one turn.

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

    // One poison record for sure (the producer's are random): the demo
    // always shows a dead letter.
    {
        let kafka = config
            .kafka
            .as_ref()
            .expect("the demo's config has [kafka]");
        let producer: rdkafka::producer::FutureProducer =
            super::client::producer_config(kafka, crate::config::Acks::All, None).create()?;
        let record = rdkafka::producer::FutureRecord::to("chat")
            .key("demo-poison")
            .payload(r#"{"message_id":"p1","user_id":"demo-poison","text":"#);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    let (http_tx, mut http_lines) = tokio::sync::mpsc::unbounded_channel();
    let gateway = {
        let mut stop = stop_rx.clone();
        let config = config.clone();
        tokio::spawn(async move {
            if let Err(e) = http_burst(config, http_tx.clone(), async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
            {
                let _ = http_tx.send(format!("http       the gateway failed: {e:#}"));
            }
        })
    };

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
            Some(line) = http_lines.recv() => {
                let _ = writeln!(out, "{:>8.1}s  {line}", (now_ms() - start) as f64 / 1000.0);
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
    let _ = gateway.await;
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

/// The demo's bearer token for its gateway (loopback only).
const DEMO_TOKEN: &str = "demo-token";

/// Serves a gateway on a loopback port and sends one web visitor's three
/// quick messages to it, each held with `?wait=30s`; every answer goes to
/// `lines` as it comes. Returns when `stop` resolves.
async fn http_burst(
    config: Config,
    lines: tokio::sync::mpsc::UnboundedSender<String>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use sha2::Digest as _;
    let hash: String = sha2::Sha256::digest(DEMO_TOKEN.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut config = config;
    config.gateway = Some(toml::from_str(&format!(
        "listen = \"127.0.0.1:0\"\n[auth]\nbearer_sha256 = [\"{hash}\"]\n"
    ))?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { crate::gateway::serve(&config, listener, stop).await });
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !client
        .get(format!("{url}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if server.is_finished() {
            server.await.context("the gateway task")??;
            anyhow::bail!("the gateway stopped before it was ready");
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the gateway did not get ready within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = lines.send(format!(
        "http       gateway at {url}: web-visitor sends 3 messages, each POST /v1/events?wait=30s"
    ));
    let mut held = Vec::new();
    for (i, text) in ["hi", "my order didn't arrive", "it's #4521"]
        .into_iter()
        .enumerate()
    {
        let request = client
            .post(format!("{url}/v1/events?wait=30s"))
            .bearer_auth(DEMO_TOKEN)
            .header("content-type", "application/json")
            .body(
                serde_json::json!({
                    "message_id": format!("web-{i}"), "user_id": "web-visitor", "text": text,
                })
                .to_string(),
            );
        let lines = lines.clone();
        held.push(tokio::spawn(async move {
            let answer = async {
                let response = request.send().await?;
                let status = response.status().as_u16();
                let body: serde_json::Value =
                    serde_json::from_slice(&response.bytes().await?).unwrap_or_default();
                Ok::<_, reqwest::Error>(match body["status"].as_str() {
                    Some("turn") => format!(
                        "{status} turn {} with {} messages: {:?}",
                        body["turn"]["turn_id"].as_str().unwrap_or_default(),
                        body["turn"]["message_count"],
                        body["turn"]["text"].as_str().unwrap_or_default()
                    ),
                    Some("superseded") => format!(
                        "{status} superseded by turn {}",
                        body["turn_id"].as_str().unwrap_or_default()
                    ),
                    _ => format!("{status} {body}"),
                })
            };
            let line = match answer.await {
                Ok(answer) => answer,
                Err(e) => format!("failed: {e}"),
            };
            let _ = lines.send(format!("http       {text:?} answered {line}"));
        }));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    for request in held {
        let _ = request.await;
    }
    server.await.context("the gateway task")?
}
