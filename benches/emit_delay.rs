//! Emit delay of the Redis worker under steady load: for every turn, the time
//! Redis stamped its output entry minus (its last event time + gap), over a
//! run where `sessionizer produce --real-time` writes live chat traffic
//! (event time = now) at the pace the workload model gives, then stops, so the last turns come out
//! through the caught-up idle advance.
//!
//! It also splits each turn's delay in two: the *floor*, the earliest wall
//! time the semantics (docs/semantics.md) let the turn close given what had arrived in
//! its shard (Redis stamps each entry's arrival in its id), and the worker's
//! own part, emit time − floor. The floor is the first arrival that lifts
//! the shard's event-time watermark past `last event + gap`, or, sooner, the
//! caught-up idle advance (wall clock past `last event + gap +
//! max_out_of_orderness`, the shard quiet for `idle_timeout`). It depends on
//! the traffic alone: any engine with these semantics (Flink's bounded
//! out-of-orderness watermark, Kafka Streams' stream time) waits as long.
//!
//! Bursts end with an `end_of_turn` event (5 ms after the last message, same
//! arrival disorder) in a fraction `EOT_FRACTION` of them (default 0.3): for
//! their turns it prints the delay from the end of turn's arrival to the
//! emit, which the semantics put at about `max_out_of_orderness` (the turn
//! waits until the watermark passes the end of turn).
//!
//! `cargo bench --bench emit_delay` (env `DURATION_SECS`, default 30; `USERS`,
//! default 20,000: about 1,100 events/s; `SHARDS`, default 4; `IDLE_TIMEOUT`,
//! default "100ms"; `EOT_FRACTION`, default 0.3).
//! Needs `redis-server`.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::Duration;

use sessionizer::config::Config;
use sessionizer::redis::keys::{shard_of, ShardKeys};
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
    let eot_fraction: f64 = env_or("EOT_FRACTION", 0.3);
    let produced = support::run_produce(
        &config_text,
        &[
            "--real-time",
            "--duration",
            &format!("{seconds}s"),
            "--users",
            &users.to_string(),
            "--end-of-turn-fraction",
            &eot_fraction.to_string(),
        ],
    )
    .0;
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
    let turns: Vec<(i64, serde_json::Value)> = entries
        .ids
        .into_iter()
        .map(|entry| {
            let emitted = entry_time(&entry.id);
            let turn: serde_json::Value = match entry.map.get("turn") {
                Some(redis::Value::BulkString(b)) => serde_json::from_slice(b).unwrap(),
                other => panic!("turn field: {other:?}"),
            };
            (emitted, turn)
        })
        .collect();
    println!(
        "emit delay (Redis entry time − (last event + gap)), {produced} events in {seconds} s from {users} users over {shard_count} shards, max_out_of_orderness {} ms, idle_timeout {}, arrival disorder < 400 ms:",
        config.window.max_out_of_orderness.0, config.window.idle_timeout
    );
    support::print_emit_delays(turns.iter().cloned(), gap, stopped);

    let arrivals: Vec<Arrivals> = shards
        .iter()
        .map(|s| Arrivals::read(&mut conn, &s.stream, &config))
        .collect();
    let ooo = config.window.max_out_of_orderness.0;
    let idle = config.window.idle_timeout.0;
    let mut after_end = (Vec::new(), Vec::new());
    for (emitted, turn) in &turns {
        if turn["closed_by"] != "end_of_turn" {
            continue;
        }
        let user = turn["user_id"].as_str().unwrap();
        let shard = shard_of(user, turn["conversation_id"].as_str(), shard_count);
        let key = (user.to_owned(), turn["end_time"].as_i64().unwrap());
        let arrived = arrivals[shard as usize].ends[&key];
        if *emitted <= stopped {
            after_end.0.push(emitted - arrived);
        } else {
            after_end.1.push(emitted - arrived);
        }
    }
    println!(
        "end_of_turn turns, emit − arrival of the end of turn (max_out_of_orderness {ooo} ms):"
    );
    support::print_percentiles("under load", &mut after_end.0);
    support::print_percentiles("after the producer stopped", &mut after_end.1);
    let mut floors = Vec::new();
    for (emitted, turn) in &turns {
        if turn["late"].as_bool() == Some(true) || turn["closed_by"] != "gap" {
            continue;
        }
        let user = turn["user_id"].as_str().unwrap();
        let shard = shard_of(user, turn["conversation_id"].as_str(), shard_count);
        let last = turn["end_time"].as_i64().unwrap();
        let floor = arrivals[shard as usize].floor(last + gap, ooo, idle);
        floors.push((floor, last + gap, *emitted));
    }
    println!("split at the semantic floor (gap-closed turns):");
    let split = |under_load: bool| {
        floors
            .iter()
            .filter(|(_, _, emitted)| (*emitted <= stopped) == under_load)
            .map(|(floor, due, emitted)| (floor - due, emitted - floor))
            .unzip::<i64, i64, Vec<_>, Vec<_>>()
    };
    for (under_load, what) in [(true, "under load"), (false, "after the producer stopped")] {
        let (mut floor, mut own) = split(under_load);
        support::print_percentiles(&format!("{what}, floor − (last event + gap)"), &mut floor);
        let early = own.iter().filter(|d| **d < 0).count();
        support::print_percentiles(&format!("{what}, emit − floor (the worker)"), &mut own);
        // A turn out before its floor would mean the floor is computed wrong.
        println!("  {what}: turns out before their floor: {early}");
    }
}

/// The ms part of a stream entry id: when Redis added the entry.
fn entry_time(id: &str) -> i64 {
    id.split('-').next().unwrap().parse().unwrap()
}

/// One shard's input in arrival order: each entry's arrival time and the
/// highest event time seen up to and including it.
struct Arrivals {
    at: Vec<i64>,
    max_event_time: Vec<i64>,
    /// When each end-of-turn event arrived, by (user, event time).
    ends: std::collections::HashMap<(String, i64), i64>,
}

impl Arrivals {
    fn read(conn: &mut redis::Connection, stream: &str, config: &Config) -> Arrivals {
        let decoder =
            sessionizer::codec::Decoder::new(config.input_format(), config.decode_limits());
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(conn)
            .unwrap();
        let (mut at, mut max_event_time) = (Vec::new(), Vec::new());
        let mut ends = std::collections::HashMap::new();
        let mut max = i64::MIN;
        for entry in entries.ids {
            let arrived = entry_time(&entry.id);
            if let Some(redis::Value::BulkString(payload)) = entry.map.get("payload") {
                if let Ok(event) = decoder.decode(payload, arrived) {
                    max = max.max(event.event_time);
                    if event.kind == sessionizer::model::EventKind::EndOfTurn {
                        ends.insert((event.user_id.into_owned(), event.event_time), arrived);
                    }
                }
            }
            at.push(arrived);
            max_event_time.push(max);
        }
        Arrivals {
            at,
            max_event_time,
            ends,
        }
    }

    /// The earliest wall time a session due at `due` (last event + gap)
    /// may close: the watermark must pass `due`, by event time (an arrival
    /// with event time > `due + ooo`) or by the idle advance (wall clock >
    /// `due + ooo`, nothing arrived for `idle`).
    fn floor(&self, due: i64, ooo: i64, idle: i64) -> i64 {
        let by_event_time = self.max_event_time.partition_point(|&max| max <= due + ooo);
        let by_event_time = self.at.get(by_event_time).copied().unwrap_or(i64::MAX);
        let wall = due + ooo + 1;
        // The last arrival at or before `wall`, then the first quiet spell.
        let mut k = self.at.partition_point(|&a| a <= wall);
        let by_idle = loop {
            let Some(previous) = k.checked_sub(1).map(|i| self.at[i]) else {
                break wall;
            };
            let quiet_from = previous + idle;
            match self.at.get(k) {
                Some(&next) if next <= quiet_from.max(wall) => k += 1,
                _ => break quiet_from.max(wall),
            }
        };
        by_event_time.min(by_idle)
    }
}
