//! `sessionizer produce`: a load generator of bursty chat traffic (the
//! [`crate::workload`] model) into the input a configuration names: the
//! first Kafka input topic (keyed by user id), the Redis shard streams (each
//! event in the shard of its session key, as one `payload` field), or a
//! file of JSON lines.
//!
//! Event times. At a target `rate` ([`Pace::Rate`]) each valid event is
//! stamped with the wall clock at sending minus its modeled arrival delay,
//! so the worker sees live traffic whose disorder stays below `disorder`. The modeled gaps hold
//! when the users, at their modeled pace, make about `rate` events per
//! second (about `rate × 10` users with the default burst shape); with fewer
//! users time is compressed, and the progress line shows by how much
//! (`time ×`). Unpaced (`rate = 0`), the modeled event times are kept,
//! starting a day in the past, so the worker sessionizes a backlog exactly as
//! the model wrote it. In model time (`--real-time`, the demo) each event
//! is sent at its modeled arrival from now: exact gaps, at the users' rate.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::stream::{FuturesUnordered, StreamExt as _};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::codec::proto;
use crate::config::{Acks, Config, SourceKind};
use crate::redis::keys::{shard_of, ShardKeys};
use crate::wall_clock::now_ms;
use crate::workload::{GeneratedRecord, Workload, WorkloadSpec};

/// How fast records go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// As fast as the sink takes them; modeled event times from a day ago.
    Unpaced,
    /// Records per second; event times follow the wall clock.
    Rate(u64),
    /// Each record at its modeled arrival time from now: modeled gaps and
    /// event times exactly, at the rate the users make (the demo).
    ModelTime,
}

/// What to generate and how fast.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    pub spec: WorkloadSpec,
    pub pace: Pace,
    /// Stop after this many records.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    pub protobuf: bool,
    /// Another topic, stream prefix or file than the configured input.
    pub to: Option<String>,
    /// A progress line on stderr every second.
    pub progress: bool,
}

/// What was sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Produced {
    pub records: u64,
    pub poison: u64,
    pub duplicates: u64,
}

/// Where records go.
enum Sink {
    Kafka {
        producer: FutureProducer,
        topic: String,
        in_flight: FuturesUnordered<rdkafka::producer::DeliveryFuture>,
    },
    Redis {
        conn: crate::redis::connection::RedisConn,
        shards: Vec<String>,
        /// One pipeline per shard: on a cluster each goes to its own node.
        pipes: Vec<redis::Pipeline>,
        queued: usize,
    },
    File(Box<dyn std::io::Write + Send>),
}

/// At most this many Kafka records in flight, and Redis entries per pipeline.
const WINDOW: usize = 10_000;
const REDIS_BATCH: usize = 500;

impl Sink {
    async fn open(config: &Config, to: Option<&str>) -> anyhow::Result<Sink> {
        Ok(match config.source {
            SourceKind::Kafka => {
                let kafka = config.kafka.as_ref().context("[kafka] is missing")?;
                let producer = crate::kafka::client::producer_config(kafka, Acks::All, None)
                    .create()
                    .context("creating the Kafka producer")?;
                Sink::Kafka {
                    producer,
                    topic: to.unwrap_or(&kafka.input_topics[0]).to_owned(),
                    in_flight: FuturesUnordered::new(),
                }
            }
            SourceKind::Redis => {
                let mut section = config.redis.clone().context("[redis] is missing")?;
                if let Some(to) = to {
                    section.input_stream = to.to_owned();
                }
                let client = crate::redis::connection::client(&section)?;
                let conn = crate::redis::connection::connect(&client, Duration::from_secs(1))
                    .await
                    .context("connecting to Redis")?;
                let shards: Vec<String> = ShardKeys::all(&section)
                    .into_iter()
                    .map(|k| k.stream)
                    .collect();
                Sink::Redis {
                    conn,
                    pipes: vec![redis::pipe(); shards.len()],
                    shards,
                    queued: 0,
                }
            }
            SourceKind::File => {
                let path = to.unwrap_or("-");
                Sink::File(if path == "-" {
                    Box::new(std::io::BufWriter::new(std::io::stdout()))
                } else {
                    Box::new(std::io::BufWriter::new(
                        std::fs::File::create(path).with_context(|| format!("creating {path}"))?,
                    ))
                })
            }
        })
    }

    async fn send(&mut self, user: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Sink::Kafka {
                producer,
                topic,
                in_flight,
            } => {
                while in_flight.len() >= WINDOW {
                    delivered(in_flight.next().await)?;
                }
                let record = FutureRecord::to(topic).key(user).payload(&payload);
                let future = producer
                    .send_result(record)
                    .map_err(|(e, _)| anyhow::anyhow!("enqueueing a record failed: {e}"))?;
                in_flight.push(future);
            }
            Sink::Redis {
                shards,
                pipes,
                queued,
                ..
            } => {
                let shard = shard_of(user, None, shards.len() as u32) as usize;
                pipes[shard]
                    .cmd("XADD")
                    .arg(&shards[shard])
                    .arg("*")
                    .arg("payload")
                    .arg(payload)
                    .ignore();
                *queued += 1;
                if *queued >= REDIS_BATCH {
                    self.flush().await?;
                }
            }
            Sink::File(out) => {
                out.write_all(&payload)?;
                out.write_all(b"\n")?;
            }
        }
        Ok(())
    }

    /// Sends what waits in a batch (Redis pipeline, file buffer), so a paced
    /// record is not held back until the batch fills.
    async fn push_out(&mut self) -> anyhow::Result<()> {
        match self {
            Sink::Kafka { .. } => Ok(()), // librdkafka sends within linger.ms
            Sink::Redis { .. } | Sink::File(_) => self.flush().await,
        }
    }

    /// Waits until everything sent is acknowledged (or written).
    async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Sink::Kafka { in_flight, .. } => {
                while let Some(result) = in_flight.next().await {
                    delivered(Some(result))?;
                }
            }
            Sink::Redis {
                conn,
                pipes,
                queued,
                ..
            } => {
                for pipe in pipes.iter_mut().filter(|p| p.cmd_iter().next().is_some()) {
                    pipe.query_async::<()>(conn)
                        .await
                        .context("adding entries")?;
                    pipe.clear();
                }
                *queued = 0;
            }
            Sink::File(out) => out.flush()?,
        }
        Ok(())
    }
}

fn delivered(
    result: Option<
        Result<
            rdkafka::producer::future_producer::OwnedDeliveryResult,
            futures::channel::oneshot::Canceled,
        >,
    >,
) -> anyhow::Result<()> {
    match result {
        Some(Ok(Ok(_))) | None => Ok(()),
        Some(Ok(Err((e, _)))) => anyhow::bail!("a record was not delivered: {e}"),
        Some(Err(_)) => anyhow::bail!("the producer went away"),
    }
}

/// Re-stamps a valid JSON event with a new event time, in the wanted format.
fn encode(record: &GeneratedRecord, event_time: i64, protobuf: bool) -> Vec<u8> {
    if record.poison {
        return record.payload.clone();
    }
    let mut event: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&record.payload).expect("the workload writes valid JSON events");
    event.insert("event_time".to_owned(), event_time.into());
    if !protobuf {
        return serde_json::to_vec(&event).expect("a map serializes");
    }
    let text = |k: &str| {
        event
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned()
    };
    let message = proto::ChatEvent {
        message_id: text("message_id"),
        user_id: text("user_id"),
        conversation_id: None,
        kind: proto::EventKind::Message as i32,
        text: text("text"),
        event_time_ms: event_time,
        attributes: Default::default(),
        gap_ms: None,
    };
    prost::Message::encode_to_vec(&message)
}

/// Sends until the count or duration is reached or `stop` resolves; a
/// progress line on stderr every second.
pub async fn run(
    config: &Config,
    mut options: ProduceOptions,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Produced> {
    let started_ms = now_ms();
    options.spec.start_ms = match options.pace {
        Pace::Unpaced => started_ms - 86_400_000,
        Pace::Rate(_) | Pace::ModelTime => started_ms,
    };
    anyhow::ensure!(
        !(options.protobuf && config.source == SourceKind::File),
        "--format protobuf: file mode reads JSON lines; protobuf needs a Kafka or Redis input"
    );
    let mut sink = Sink::open(config, options.to.as_deref()).await?;
    let mut workload = Workload::new(options.spec.clone());
    let mut produced = Produced::default();
    let started = Instant::now();
    let deadline = options.duration.map(|d| started + d);
    let mut next_progress = started + Duration::from_secs(1);
    let mut first_arrival = None;
    tokio::pin!(stop);
    loop {
        if options.count.is_some_and(|c| produced.records >= c)
            || deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        let record = workload.next().expect("the workload never ends");
        let due = match options.pace {
            Pace::Unpaced => None,
            Pace::Rate(rate) => Some(
                started + Duration::from_secs_f64(produced.records as f64 / rate.max(1) as f64),
            ),
            Pace::ModelTime => {
                Some(started + Duration::from_millis((record.arrival - started_ms).max(0) as u64))
            }
        };
        if due.zip(deadline).is_some_and(|(due, end)| due > end) {
            break; // due after the run's end
        }
        match due.filter(|due| *due > Instant::now()) {
            Some(due) => {
                sink.push_out().await?;
                tokio::select! {
                    () = &mut stop => break,
                    () = tokio::time::sleep_until(due.into()) => {}
                }
            }
            None => {
                if futures::poll!(&mut stop).is_ready() {
                    break;
                }
            }
        }
        let event_time = match options.pace {
            Pace::Rate(_) => now_ms() - (record.arrival - record.event_time),
            Pace::Unpaced | Pace::ModelTime => record.event_time,
        };
        first_arrival.get_or_insert(record.arrival);
        sink.send(
            &format!("user-{}", record.user),
            encode(&record, event_time, options.protobuf),
        )
        .await?;
        produced.records += 1;
        produced.poison += u64::from(record.poison);
        produced.duplicates += u64::from(record.duplicate);
        if options.progress && Instant::now() >= next_progress {
            next_progress += Duration::from_secs(1);
            let elapsed = started.elapsed().as_secs_f64();
            let modeled =
                (record.arrival - first_arrival.unwrap_or(record.arrival)) as f64 / 1000.0;
            eprintln!(
                "produce: {} records ({:.0}/s), {} poison, {} duplicates, time ×{:.2}",
                produced.records,
                produced.records as f64 / elapsed,
                produced.poison,
                produced.duplicates,
                modeled / elapsed
            );
        }
    }
    sink.flush().await?;
    Ok(produced)
}
