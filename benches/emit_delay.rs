//! Emit delay of the Redis worker under steady load: for every turn, the time
//! Redis stamped its output entry minus (its last event time + gap), over a
//! run where `sessionizer produce --real-time` writes live chat traffic
//! (event time = now) at the pace the workload model gives, then stops, so the last turns come out
//! through the caught-up idle advance.
//!
//! `cargo bench --bench emit_delay` (env `DURATION_SECS`, default 30; `USERS`,
//! default 20,000: about 1,100 events/s; `SHARDS`, default 4; `IDLE_TIMEOUT`,
//! default "100ms").
//! Needs `redis-server`.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::Duration;

use sessionizer::config::Config;
use sessionizer::redis::keys::ShardKeys;
use sessionizer::wall_clock::now_ms;
use support::redis_server::{all_acked, RedisServer};
use support::{env_or, wait_for, Worker};

fn main() {
    let seconds: u64 = env_or("DURATION_SECS", 30);
    let users: u32 = env_or("USERS", 20_000);
    let server = RedisServer::start();
    let shard_count: u32 = env_or("SHARDS", 4);
    let idle_timeout = std::env::var("IDLE_TIMEOUT").unwrap_or_else(|_| "100ms".into());
    let config_text = format!(
        r#"source = "redis"
[window]
idle_timeout = "{idle_timeout}"
[redis]
url = "{}"
input_stream = "chat"
shards = {shard_count}
output_stream = "turns"
dlq_stream = "dlq"
lease_ttl = "3s"
block = "100ms"
"#,
        server.url()
    );
    let config = Config::from_toml(&config_text, Vec::new()).unwrap();
    let section = config.redis.as_ref().unwrap();
    let shards = ShardKeys::all(section);
    let gap = config.window.gap.0;
    let _worker = Worker::start(&config_text);
    let mut conn = server.conn();
    wait_for(
        "the worker to own every shard",
        Duration::from_secs(30),
        || {
            shards
                .iter()
                .all(|s| {
                    redis::cmd("EXISTS")
                        .arg(&s.lease)
                        .query::<i64>(&mut conn)
                        .unwrap()
                        == 1
                })
                .then_some(())
        },
    );

    // Live traffic from the load generator: each record is written at its
    // modeled arrival time (event time = now).
    let produced = support::run_live_traffic(&config_text, seconds, users);
    let stopped = now_ms();
    // Every entry acked means every session closed (the idle advance closes
    // the last ones).
    let streams: Vec<String> = shards.iter().map(|s| s.stream.clone()).collect();
    wait_for("every entry acked", Duration::from_secs(120), || {
        all_acked(&mut conn, &streams, &section.group).then_some(())
    });

    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("turns")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    let turns = entries.ids.into_iter().map(|entry| {
        let emitted: i64 = entry.id.split('-').next().unwrap().parse().unwrap();
        let turn: serde_json::Value = match entry.map.get("turn") {
            Some(redis::Value::BulkString(b)) => serde_json::from_slice(b).unwrap(),
            other => panic!("turn field: {other:?}"),
        };
        (emitted, turn)
    });
    println!(
        "emit delay (Redis entry time − (last event + gap)), {produced} events in {seconds} s from {users} users over {shard_count} shards, max_out_of_orderness {} ms, idle_timeout {}, arrival disorder < 400 ms:",
        config.window.max_out_of_orderness.0, config.window.idle_timeout
    );
    support::print_emit_delays(turns, gap, stopped);
}
