//! Peak RSS of the worker binary holding 100,000 open sessions (one per
//! user), for Kafka (tansu) and Redis: the worker's resident memory once it
//! is ready and idle, then its peak (`VmHWM`) after it consumed the records,
//! read from `/proc`. The sessions stay open (`gap` 10 min, no idle advance)
//! and the count is the worker's own `sessionizer_open_sessions`.
//!
//! `cargo bench --bench worker_memory` (env `USERS`, default 100,000). Needs
//! `tansu` and `redis-server`.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::Duration;

use support::redis_server::RedisServer;
use support::{http_get, metric, run_produce, wait_for, Broker, Worker};

const WINDOW: &str = "[window]\ngap = \"10m\"\nmax_duration = \"1h\"\nidle_timeout = \"1h\"\n";

fn kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Runs one worker on `config`, loads `users` records, prints the figures.
fn measure(name: &str, config: &str, users: u64) {
    let port = support::free_port();
    let config = format!("{config}\n{WINDOW}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let worker = Worker::start(&config);
    wait_for("the worker to be ready", Duration::from_secs(60), || {
        http_get(port, "/readyz").filter(|(s, _)| *s == 200)
    });
    let idle = kib(worker.pid(), "VmRSS:");
    let count = users.to_string();
    run_produce(
        &config,
        &[
            "--rate",
            "0",
            "--count",
            &count,
            "--users",
            &count,
            "--burst-messages",
            "1-1",
        ],
    );
    let open = wait_for("every record consumed", Duration::from_secs(300), || {
        let (_, text) = http_get(port, "/metrics")?;
        let open = metric(&text, sessionizer::metrics::OPEN_SESSIONS, &[]) as u64;
        // The gauges follow within a tick (Kafka 20 ms, Redis each read).
        (metric(&text, sessionizer::metrics::RECORDS_CONSUMED, &[]) as u64 >= users && open > 0)
            .then_some(open)
    });
    let peak = kib(worker.pid(), "VmHWM:");
    println!(
        "{name}: {open} open sessions; RSS idle {:.1} MiB, peak {:.1} MiB; {:.0} bytes per open session above idle",
        idle as f64 / 1024.0,
        peak as f64 / 1024.0,
        (peak - idle) as f64 * 1024.0 / open.max(1) as f64
    );
}

fn main() {
    let users: u64 = support::env_or("USERS", 100_000);

    let broker = Broker::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for (topic, partitions) in [("chat", 4), ("turns", 2), ("dlq", 1)] {
        runtime.block_on(broker.create_topic(topic, partitions));
    }
    let kafka = format!(
        "source = \"kafka\"\n[kafka]\nbrokers = \"{}\"\ngroup_id = \"memory\"\ninput_topics = [\"chat\"]\noutput_topic = \"turns\"\ndlq_topic = \"dlq\"\n",
        broker.bootstrap()
    );
    measure("kafka", &kafka, users);

    let server = RedisServer::start();
    let redis = format!(
        "source = \"redis\"\n[redis]\nurl = \"{}\"\ninput_stream = \"chat\"\nshards = 4\noutput_stream = \"turns\"\ndlq_stream = \"dlq\"\n",
        server.url()
    );
    measure("redis", &redis, users);
}
