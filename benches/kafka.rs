//! The Kafka worker against a consume-only client on the same broker, in one
//! run: events per second through the real `sessionizer` binary (JSON in,
//! JSON turns out, acks all, offsets committed after delivery) and through an
//! rdkafka consumer that reads the same topic and does nothing else.
//!
//! Then the emit delay under live load: `sessionizer produce --real-time`
//! writes traffic with event time = now at the workload model's pace
//! (`DURATION_SECS`, default 20; `LIVE_PARTITIONS`, default 4; `USERS`,
//! default 20,000: about 1,050 events/s) through a
//! second worker, and each turn's record timestamp is compared with its
//! last event time + gap, under load and after the producer stops (idle
//! advance). `LIVE_KAFKA_PROPERTIES` adds `[kafka.properties]` lines to that
//! worker (e.g. `'"fetch.wait.max.ms" = "50"'`).
//!
//! `cargo bench --bench kafka` (env `EVENTS`, default 200,000, from 20,000
//! users). The broker is `tansu` (scripts/install-test-deps), in memory, on
//! the same two cores.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::Message;
use sessionizer::workload::{Workload, WorkloadSpec};
use support::{committed, wait_for, Broker, Worker};

const PARTITIONS: i32 = 4;

fn main() {
    let events: usize = support::env_or("EVENTS", 200_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let broker = Broker::start();
    runtime.block_on(async {
        broker.create_topic("chat", PARTITIONS).await;
        broker.create_topic("turns", PARTITIONS).await;
        broker.create_topic("dlq", 1).await;
    });
    let started = Instant::now();
    runtime.block_on(produce(&broker, events));
    eprintln!("produced {events} events in {:.1?}", started.elapsed());

    let (plain, ends) = consume_only(&broker, "chat", PARTITIONS, events);
    let worker = run_worker(&broker, &ends);
    println!(
        "kafka (tansu, in memory), {events} events, {PARTITIONS} partitions, on the same two cores"
    );
    println!(
        "  consume-only rdkafka client: {:>9.0} ev/s ({plain:.2} s)",
        events as f64 / plain
    );
    println!(
        "  sessionizer worker (release): {:>9.0} ev/s ({worker:.2} s)",
        events as f64 / worker
    );
    println!("  ratio worker / consume-only: {:.2}", plain / worker);
    emit_delay(&broker, &runtime);
}

/// Live traffic through a fresh worker; prints the emit delay percentiles.
fn emit_delay(broker: &Broker, runtime: &tokio::runtime::Runtime) {
    let seconds: u64 = support::env_or("DURATION_SECS", 20);
    let partitions: i32 = support::env_or("LIVE_PARTITIONS", PARTITIONS);
    runtime.block_on(async {
        broker.create_topic("live", partitions).await;
        broker.create_topic("live-turns", PARTITIONS).await;
        broker.create_topic("live-dlq", 1).await;
    });
    let properties = std::env::var("LIVE_KAFKA_PROPERTIES")
        .map(|p| format!("[kafka.properties]\n{p}"))
        .unwrap_or_default();
    let config_text = worker_config(
        broker,
        ["live", "live", "live-turns", "live-dlq"],
        &properties,
    );
    let parsed = sessionizer::config::Config::from_toml(&config_text, Vec::new()).unwrap();
    let gap = parsed.window.gap.0;
    let _worker = Worker::start(&config_text);
    let mut config = broker.client_config();
    let producer: FutureProducer = config
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()
        .unwrap();
    // Warm-up: one old message; its turn (the idle advance closes it) and
    // commit show the worker has joined and reads. Its turn is not counted.
    let warm_up = format!(
        r#"{{"message_id":"warm-up","user_id":"warm-up","text":"hi","event_time":{}}}"#,
        sessionizer::wall_clock::now_ms() - 600_000
    );
    runtime
        .block_on(producer.send(
            FutureRecord::to("live").key("warm-up").payload(&warm_up),
            Timeout::Never,
        ))
        .map_err(|(e, _)| e)
        .unwrap();
    wait_for(
        "the worker to join and emit the warm-up turn",
        Duration::from_secs(120),
        || {
            committed(broker.client_config(), "live", "live", partitions)
                .iter()
                .any(|&o| o >= 1)
                .then_some(())
        },
    );
    // Live traffic from the load generator: each record at its modeled
    // arrival time (event time = now).
    let produced =
        support::run_live_traffic(&config_text, seconds, support::env_or("USERS", 20_000));
    let stopped = sessionizer::wall_clock::now_ms();
    let (_, ends) = consume_only(broker, "live", partitions, produced as usize + 1);
    wait_for("every offset committed", Duration::from_secs(300), || {
        (committed(broker.client_config(), "live", "live", partitions) == ends).then_some(())
    });
    let turns = read_all(broker, "live-turns")
        .into_iter()
        .map(|(timestamp, payload)| (timestamp, serde_json::from_slice(&payload).unwrap()))
        .filter(|(_, turn): &(i64, serde_json::Value)| turn["user_id"] != "warm-up");
    println!(
        "emit delay (turn record timestamp - (last event + gap)), {produced} events in {seconds} s, max_out_of_orderness {} ms, idle_timeout {}:",
        parsed.window.max_out_of_orderness.0, parsed.window.idle_timeout
    );
    support::print_emit_delays(turns, gap, stopped);
}

/// Every record of a topic (timestamp, value): read from the beginning until
/// nothing more comes for two seconds (everything was committed before, so
/// nothing more is on its way).
fn read_all(broker: &Broker, topic: &str) -> Vec<(i64, Vec<u8>)> {
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", format!("read-all-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    support::assign_from_beginning(&consumer, topic, PARTITIONS);
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(2) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            out.push((
                m.timestamp().to_millis().unwrap_or(-1),
                m.payload().unwrap_or_default().to_vec(),
            ));
            last = Instant::now();
        }
    }
    out
}

/// Batched producing (a fresh group starts at offset 0, a batch start, so
/// tansu's mid-batch fetch quirk does not arise here).
async fn produce(broker: &Broker, events: usize) {
    let mut config = broker.client_config();
    let producer: FutureProducer = config
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .create()
        .unwrap();
    let spec = WorkloadSpec {
        users: 20_000,
        start_ms: sessionizer::wall_clock::now_ms() - 3_600_000,
        ..WorkloadSpec::default()
    };
    let records: Vec<_> = Workload::new(spec).take(events).collect();
    for chunk in records.chunks(10_000) {
        let sends = chunk.iter().map(|r| {
            let key = format!("user-{}", r.user);
            let producer = producer.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to("chat").key(&key).payload(&r.payload),
                        Timeout::Never,
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .expect("produce");
            }
        });
        futures::future::join_all(sends).await;
    }
}

/// Reads every record once, from the beginning, and nothing else; returns
/// the time and each partition's end (last offset + 1: tansu's high
/// watermark is not exact after batched produce).
fn consume_only(broker: &Broker, topic: &str, partitions: i32, events: usize) -> (f64, Vec<i64>) {
    let mut config = broker.client_config();
    let consumer: BaseConsumer = config
        .set("group.id", format!("consume-only-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    support::assign_from_beginning(&consumer, topic, partitions);
    let started = Instant::now();
    let mut read = 0usize;
    let mut bytes = 0usize;
    let mut ends = vec![0i64; partitions as usize];
    while read < events {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            bytes += m.payload().map_or(0, <[u8]>::len);
            ends[m.partition() as usize] = m.offset() + 1;
            read += 1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "consume-only stalled at {read}"
        );
    }
    assert!(bytes > 0);
    (started.elapsed().as_secs_f64(), ends)
}

/// A worker config: `[group, input, output, dlq]`, then extra lines.
fn worker_config(broker: &Broker, [group, input, output, dlq]: [&str; 4], extra: &str) -> String {
    format!(
        r#"source = "kafka"
[window]
# The input is a backlog (old event times): flush it as soon as it is read.
backlog_quiet = "100ms"
[kafka]
brokers = "{}"
group_id = "{group}"
input_topics = ["{input}"]
output_topic = "{output}"
dlq_topic = "{dlq}"
commit_interval = "200ms"
{extra}
"#,
        broker.bootstrap()
    )
}

/// Runs the worker binary until its group has committed every partition to
/// its end (every record resolved: turned, dead-lettered or dropped).
fn run_worker(broker: &Broker, ends: &[i64]) -> f64 {
    let config = worker_config(broker, ["sessionizer", "chat", "turns", "dlq"], "");
    let started = Instant::now();
    let _worker = Worker::start(&config);
    wait_for("every offset committed", Duration::from_secs(600), || {
        (committed(broker.client_config(), "sessionizer", "chat", PARTITIONS) == ends).then_some(())
    });
    started.elapsed().as_secs_f64()
}
