//! The Kafka worker against a consume-only client on the same broker, in one
//! run: events per second through the real `sessionizer` binary (JSON in,
//! JSON turns out, acks all, offsets committed after delivery) and through an
//! rdkafka consumer that reads the same topic and does nothing else.
//!
//! `cargo bench --bench kafka` (env `EVENTS`, default 200,000, from 20,000
//! users). The broker is `tansu` (scripts/install-test-deps), in memory, on
//! the same two cores.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use sessionizer::workload::{Workload, WorkloadSpec};
use support::{committed, wait_for, Broker, Worker};

const PARTITIONS: i32 = 4;

fn main() {
    let events: usize = std::env::var("EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
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

    let (plain, ends) = consume_only(&broker, events);
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
fn consume_only(broker: &Broker, events: usize) -> (f64, Vec<i64>) {
    let mut config = broker.client_config();
    let consumer: BaseConsumer = config
        .set("group.id", "consume-only")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment
            .add_partition_offset("chat", p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let started = Instant::now();
    let mut read = 0usize;
    let mut bytes = 0usize;
    let mut ends = vec![0i64; PARTITIONS as usize];
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

/// Runs the worker binary until its group has committed every partition to
/// its end (every record resolved: turned, dead-lettered or dropped).
fn run_worker(broker: &Broker, ends: &[i64]) -> f64 {
    let config = format!(
        r#"source = "kafka"
[kafka]
brokers = "{}"
group_id = "sessionizer"
input_topics = ["chat"]
output_topic = "turns"
dlq_topic = "dlq"
commit_interval = "200ms"
"#,
        broker.bootstrap()
    );
    let started = Instant::now();
    let _worker = Worker::start(&config);
    wait_for("every offset committed", Duration::from_secs(600), || {
        (committed(broker.client_config(), "sessionizer", "chat", PARTITIONS) == ends).then_some(())
    });
    started.elapsed().as_secs_f64()
}
