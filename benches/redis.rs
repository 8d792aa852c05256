//! The Redis worker against a plain consumer on the same `redis-server`, in
//! one run: events per second through the real `sessionizer` binary (read,
//! sessionize, write turns and ack in fenced steps) and through a
//! consume-and-ack loop that does nothing else, on the same entries.
//!
//! `cargo bench --bench redis` (env `EVENTS`, default 1,000,000; `SHARDS`,
//! default 4; `BATCH`, entries per read for both, default 500). Needs
//! `redis-server` (scripts/install-test-deps).

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use sessionizer::redis::keys::{shard_of, ShardKeys};
use sessionizer::workload::{Workload, WorkloadSpec};
use support::redis_server::{all_acked, RedisServer};
use support::{env_or, wait_for, Worker};

fn main() {
    let events: usize = env_or("EVENTS", 1_000_000);
    let shards: u32 = env_or("SHARDS", 4);
    let batch: usize = env_or("BATCH", 500);
    let server = RedisServer::start();
    let mut conn = server.conn();
    let config = format!(
        r#"source = "redis"
[window]
idle_timeout = "100ms"
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

    let plain = plain_consumer(&server, &streams, events, batch);
    let worker = sessionizer_worker(&server, &streams, &config, &section.group);
    println!("redis, {events} events, {shards} shards, one redis-server on the same two cores");
    println!(
        "  plain consumer (XREADGROUP {batch} + XACK): {:>9.0} ev/s ({plain:.2} s)",
        events as f64 / plain
    );
    println!(
        "  sessionizer worker (release binary):   {:>9.0} ev/s ({worker:.2} s)",
        events as f64 / worker
    );
    println!("  ratio worker / plain: {:.2}", plain / worker);
    if std::env::var_os("COMMANDSTATS").is_some() {
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut conn)
            .unwrap();
        println!("{stats}");
    }
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

/// Runs the worker binary until every entry of every shard is acked.
fn sessionizer_worker(server: &RedisServer, streams: &[String], config: &str, group: &str) -> f64 {
    let mut conn = server.conn();
    let started = Instant::now();
    let _worker = Worker::start(config);
    wait_for("every entry acked", Duration::from_secs(600), || {
        all_acked(&mut conn, streams, group).then_some(())
    });
    started.elapsed().as_secs_f64()
}
