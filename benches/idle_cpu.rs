//! CPU a Kafka worker burns while it owns partitions and nothing arrives:
//! the worker against the Kafka-protocol test broker (`tansu`), 4 input
//! partitions, no traffic; its user + system time over `SECONDS` (default
//! 20), read from `/proc/<pid>/stat`.
//!
//! `cargo bench --bench idle_cpu`

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use support::{env_or, http_get, wait_for, Broker, Worker};

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = env_or("SECONDS", 20);
    let broker = Broker::start();
    for (topic, partitions) in [("idle-chat", 4), ("idle-turns", 1), ("idle-dlq", 1)] {
        broker.create_topic(topic, partitions).await;
    }
    let (config, port) = support::with_metrics(&format!(
        "source = \"kafka\"\n[kafka]\nbrokers = \"{}\"\ngroup_id = \"idle\"\ninput_topics = [\"idle-chat\"]\noutput_topic = \"idle-turns\"\ndlq_topic = \"idle-dlq\"\n[kafka.properties]\n{}",
        broker.bootstrap(),
        broker.worker_properties()
    ));
    let worker = Worker::start(&config);
    wait_for("the worker to be ready", Duration::from_secs(60), || {
        http_get(port, "/readyz").filter(|(status, _)| *status == 200)
    });
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let before = cpu_ticks(worker.pid());
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let used = (cpu_ticks(worker.pid()) - before) as f64 / ticks_per_second;
    let wall = started.elapsed().as_secs_f64();
    println!(
        "idle Kafka worker, 4 partitions, no traffic: {used:.2} s CPU in {wall:.1} s ({:.2} % of one core)",
        100.0 * used / wall
    );
}
