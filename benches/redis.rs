//! The Redis worker against a plain consumer on the same `redis-server`, in
//! one run: events per second through the real `sessionizer` binary (read,
//! sessionize, write turns and ack in fenced steps) and through a
//! consume-and-ack loop that does nothing else, on the same entries.
//!
//! The worker is timed twice in the one run: from its spawn (process start,
//! leases and pending replay included) and from the moment its `/readyz`
//! says ready, counting only the entries acked after that: the steady rate,
//! comparable with the plain consumer, whose connections are made up front.
//!
//! `cargo bench --bench redis` (env `EVENTS`, default 1,000,000; `SHARDS`,
//! default 4; `BATCH`, entries per read for both, default 500; `PIN=1` puts
//! Redis alone on CPU 0 and the bench, the plain consumer and the worker on
//! CPU 1, as with Redis on a machine of its own). Needs `redis-server`
//! (scripts/install-test-deps) and, for `PIN`, `taskset`.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use sessionizer::redis::keys::{shard_of, ShardKeys};
use sessionizer::workload::{Workload, WorkloadSpec};
use support::redis_server::{all_acked, RedisServer};
use support::{env_or, Worker};

fn main() {
    let events: usize = env_or("EVENTS", 1_000_000);
    let shards: u32 = env_or("SHARDS", 4);
    let batch: usize = env_or("BATCH", 500);
    let server = RedisServer::start();
    if std::env::var_os("PIN").is_some() {
        // Threads and processes started from here on inherit CPU 1.
        pin(server.pid(), 0);
        pin(std::process::id(), 1);
    }
    let mut conn = server.conn();
    let metrics_port = support::free_port();
    let config = format!(
        r#"source = "redis"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[window]
idle_timeout = "100ms"
backlog_quiet = "100ms"
[redis]
url = "{}"
input_stream = "chat"
shards = {shards}
output_stream = "turns"
dlq_stream = "dlq"
lease_ttl = "3s"
block = "100ms"
batch = {batch}
"#,
        server.url()
    );
    let section = sessionizer::config::Config::from_toml(&config, Vec::new())
        .unwrap()
        .redis
        .unwrap();
    // The worker's own shard names (one shard is the plain stream).
    let streams: Vec<String> = ShardKeys::all(&section)
        .into_iter()
        .map(|k| k.stream)
        .collect();

    let started = Instant::now();
    let spec = WorkloadSpec {
        users: 20_000,
        // Recent event times: the future-skew check and the idle advance see
        // a live stream.
        start_ms: sessionizer::wall_clock::now_ms() - 3_600_000,
        ..WorkloadSpec::default()
    };
    let mut pipe = redis::pipe();
    for (i, record) in Workload::new(spec).take(events).enumerate() {
        let user = format!("user-{}", record.user);
        let stream = &streams[shard_of(&user, None, shards) as usize];
        pipe.xadd(stream, "*", &[("payload", record.payload.as_slice())])
            .ignore();
        if i % 5_000 == 4_999 {
            pipe.query::<()>(&mut conn).unwrap();
            pipe = redis::pipe();
        }
    }
    pipe.query::<()>(&mut conn).unwrap();
    eprintln!(
        "produced {events} events into {shards} shards in {:.1?}",
        started.elapsed()
    );

    command_stats(&mut conn); // counts from here on
    let cpu_before = redis_cpu_seconds(&mut conn);
    let plain = plain_consumer(&server, &streams, events, batch);
    let cpu_plain = redis_cpu_seconds(&mut conn) - cpu_before;
    let plain_stats = command_stats(&mut conn);
    let worker = sessionizer_worker(&server, &streams, &config, &section.group, metrics_port);
    let cpu_worker = redis_cpu_seconds(&mut conn) - cpu_before - cpu_plain;
    let plain_rate = events as f64 / plain;
    let total_rate = events as f64 / worker.total;
    let steady_rate = worker.after_ready as f64 / worker.from_ready;
    println!("redis, {events} events, {shards} shards, one redis-server on the same two cores");
    println!("  plain consumer (XREADGROUP {batch} + XACK): {plain_rate:>9.0} ev/s ({plain:.2} s)");
    println!(
        "  sessionizer worker, from spawn:         {total_rate:>9.0} ev/s ({:.2} s)",
        worker.total
    );
    println!(
        "  sessionizer worker, from ready:         {steady_rate:>9.0} ev/s ({} entries in {:.2} s)",
        worker.after_ready, worker.from_ready
    );
    println!(
        "  ratio worker / plain: from spawn {:.2}, from ready {:.2}",
        total_rate / plain_rate,
        steady_rate / plain_rate
    );
    // Redis's own CPU per event in each phase (its main thread, from
    // `INFO cpu`): what the worker's guarantees cost the server.
    println!(
        "  redis CPU: plain phase {cpu_plain:.2} s ({:.2} µs an event, {:.0} % of the phase), worker phase {cpu_worker:.2} s ({:.2} µs an event, {:.0} % of the phase since spawn)",
        cpu_plain * 1e6 / events as f64,
        100.0 * cpu_plain / plain,
        cpu_worker * 1e6 / events as f64,
        100.0 * cpu_worker / worker.total,
    );
    if std::env::var_os("COMMANDSTATS").is_some() {
        println!(
            "plain phase:\n{plain_stats}worker phase:\n{}",
            command_stats(&mut conn)
        );
    }
}

/// `used_cpu_user` + `used_cpu_sys` of `INFO cpu`, in seconds.
fn redis_cpu_seconds(conn: &mut redis::Connection) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query(conn).unwrap();
    info.lines()
        .filter_map(|l| {
            l.strip_prefix("used_cpu_user:")
                .or_else(|| l.strip_prefix("used_cpu_sys:"))
        })
        .map(|v| v.trim().parse::<f64>().unwrap())
        .sum()
}

/// `INFO commandstats` since the last call (which resets the counters).
fn command_stats(conn: &mut redis::Connection) -> String {
    let stats: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(conn)
        .unwrap();
    stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .map(|l| format!("  {l}\n"))
        .collect()
}

/// Reads every shard through its own group and acks each batch: the floor
/// any consumer of these streams pays.
fn plain_consumer(server: &RedisServer, streams: &[String], events: usize, batch: usize) -> f64 {
    let mut conn = server.conn();
    for s in streams {
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(s)
            .arg("plain")
            .arg("0")
            .query::<()>(&mut conn)
            .unwrap();
    }
    let started = Instant::now();
    let threads: Vec<_> = streams
        .iter()
        .cloned()
        .map(|stream| {
            let mut conn = server.conn();
            std::thread::spawn(move || {
                let mut read = 0usize;
                loop {
                    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg("plain")
                        .arg("c")
                        .arg("COUNT")
                        .arg(batch)
                        .arg("STREAMS")
                        .arg(&stream)
                        .arg(">")
                        .query(&mut conn)
                        .unwrap();
                    let ids: Vec<String> = reply
                        .keys
                        .into_iter()
                        .flat_map(|k| k.ids.into_iter().map(|e| e.id))
                        .collect();
                    if ids.is_empty() {
                        return read;
                    }
                    read += ids.len();
                    redis::cmd("XACK")
                        .arg(&stream)
                        .arg("plain")
                        .arg(&ids)
                        .query::<()>(&mut conn)
                        .unwrap();
                }
            })
        })
        .collect();
    let read: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(read, events);
    started.elapsed().as_secs_f64()
}

/// The worker's run: seconds from spawn to the last ack, and from its
/// readiness to the last ack with the entries acked in that time.
struct WorkerRun {
    total: f64,
    from_ready: f64,
    after_ready: usize,
}

/// Runs the worker binary until every entry of every shard is acked.
fn sessionizer_worker(
    server: &RedisServer,
    streams: &[String],
    config: &str,
    group: &str,
    metrics_port: u16,
) -> WorkerRun {
    let mut conn = server.conn();
    let started = Instant::now();
    let _worker = Worker::start(config);
    // Polled often: each poll's lateness is added to the measured time.
    let (long, often) = (Duration::from_secs(600), Duration::from_millis(2));
    support::wait_for_every("/readyz", long, often, || {
        support::http_get(metrics_port, "/readyz").filter(|(status, _)| *status == 200)
    });
    let ready = Instant::now();
    let acked_at_ready = acked(&mut conn, streams, group);
    support::wait_for_every("every entry acked", long, often, || {
        all_acked(&mut conn, streams, group).then_some(())
    });
    let done = Instant::now();
    let total_entries = acked(&mut conn, streams, group);
    WorkerRun {
        total: (done - started).as_secs_f64(),
        from_ready: (done - ready).as_secs_f64(),
        after_ready: total_entries - acked_at_ready,
    }
}

/// Entries the group has acked over all shards (read minus pending).
fn acked(conn: &mut redis::Connection, streams: &[String], group: &str) -> usize {
    streams
        .iter()
        .map(|s| {
            let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(s)
                .query(conn)
                .unwrap_or_default();
            groups
                .groups
                .iter()
                .find(|g| g.name == group)
                .map_or(0, |g| g.entries_read.unwrap_or(0) - g.pending)
        })
        .sum()
}

/// Binds a process (its main thread, and what it starts later) to one CPU.
fn pin(pid: u32, cpu: u32) {
    let status = std::process::Command::new("taskset")
        .args(["-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("taskset (util-linux)");
    assert!(status.success(), "taskset -p -c {cpu} {pid}");
}
