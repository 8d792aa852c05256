//! `sessionizer push` on Redis beside a plain reader of the same turns, in
//! one run: turns/s read and acked by a consume-and-ack loop that delivers
//! nothing (`XREADGROUP` 200 at a time, one `XACK` per batch), then turns/s
//! that `push` (release build) delivers to a local agent answering 200 at
//! once, each acked after its answer. The agent (axum, in this process) and
//! Redis share the same two cores with `push`.
//!
//! `cargo bench --bench push` (env `TURNS`, default 50,000; `USERS`,
//! default 5,000; `CONCURRENCY`, default 64). Needs `redis-server`.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Commands;
use support::redis_server::RedisServer;
use support::{env_or, wait_for, Worker};

fn main() {
    let turns: usize = env_or("TURNS", 50_000);
    let users: usize = env_or("USERS", 5_000);
    let concurrency: usize = env_or("CONCURRENCY", 64);
    let server = RedisServer::start();
    let mut conn = server.conn();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let agent_port = {
        let calls = calls.clone();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().route(
            "/turns",
            axum::routing::post(move |_body: axum::body::Bytes| {
                calls.fetch_add(1, Ordering::Relaxed);
                async { axum::http::StatusCode::OK }
            }),
        );
        runtime.spawn(async move { axum::serve(listener, app).await });
        port
    };

    // The same turns in two streams: one for each reader.
    for stream in ["plain-turns", "turns"] {
        let mut pipe = redis::pipe();
        for i in 0..turns {
            let user = format!("user-{}", i % users);
            let turn = serde_json::json!({
                "turn_id": format!("t{i}"), "user_id": user, "start_time": 1, "end_time": 2,
                "closed_by": "gap", "late": false, "message_count": 2,
                "text": "hello\nis anyone there?",
                "messages": [
                    {"message_id": format!("m{i}a"), "event_time": 1, "text": "hello"},
                    {"message_id": format!("m{i}b"), "event_time": 2, "text": "is anyone there?"},
                ],
            })
            .to_string();
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("turn")
                .arg(turn)
                .ignore();
            if i % 1_000 == 999 {
                let () = pipe.query(&mut conn).unwrap();
                pipe = redis::pipe();
            }
        }
        let () = pipe.query(&mut conn).unwrap();
    }

    let plain = plain_reader(&mut conn, "plain-turns", turns);

    let config = format!(
        "source = \"redis\"\n[redis]\nurl = \"{}\"\ninput_stream = \"chat\"\noutput_stream = \"turns\"\ndlq_stream = \"dlq\"\n[push]\nurl = \"http://127.0.0.1:{agent_port}/turns\"\ndlq = \"push-dlq\"\nconcurrency = {concurrency}\n",
        server.url()
    );
    let started = Instant::now();
    let _push = Worker::start_command(&["push"], &config);
    wait_for(
        "every turn delivered and acked",
        Duration::from_secs(600),
        || {
            let pending: redis::streams::StreamPendingReply =
                conn.xpending("turns", "sessionizer-push").ok()?;
            (calls.load(Ordering::Relaxed) >= turns && pending.count() == 0).then_some(())
        },
    );
    let pushed = turns as f64 / started.elapsed().as_secs_f64();
    assert_eq!(calls.load(Ordering::Relaxed), turns, "each delivered once");

    println!("push bench: {turns} turns of {users} users, concurrency {concurrency}");
    println!("  read and acked, no delivery:         {plain:>9.0} turns/s");
    println!(
        "  sessionizer push, delivered (2xx):   {pushed:>9.0} turns/s  (ratio {:.2}; from process start)",
        pushed / plain
    );
}

/// Reads every entry in a group and acks each batch: turns/s.
fn plain_reader(conn: &mut redis::Connection, stream: &str, turns: usize) -> f64 {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("plain")
        .arg("0")
        .query(conn)
        .unwrap();
    let started = Instant::now();
    let mut read = 0;
    while read < turns {
        let reply: redis::streams::StreamReadReply = conn
            .xread_options(
                &[stream],
                &[">"],
                &redis::streams::StreamReadOptions::default()
                    .group("plain", "bench")
                    .count(200),
            )
            .unwrap();
        let ids: Vec<String> = reply
            .keys
            .iter()
            .flat_map(|k| k.ids.iter().map(|e| e.id.clone()))
            .collect();
        for e in reply.keys.iter().flat_map(|k| k.ids.iter()) {
            let turn: Vec<u8> = e.get("turn").unwrap();
            std::hint::black_box(serde_json::from_slice::<serde_json::Value>(&turn).unwrap());
        }
        let _: usize = conn.xack(stream, "plain", &ids).unwrap();
        read += ids.len();
    }
    turns as f64 / started.elapsed().as_secs_f64()
}
