//! `sessionizer gateway` into Redis, beside `sessionizer produce` into the
//! same `redis-server`, in one run:
//!
//! 1. `produce`: events/s written by the load generator (pipelined `XADD`s);
//! 2. the gateway, 64 keep-alive HTTP clients, one event per request;
//! 3. the same with 100 events per request;
//! 4. the synchronous wait: one-message requests held with `?wait=` while a
//!    worker closes their turns; the overhead is from the turn's write to
//!    the output (its entry id, Redis's clock in ms) to the response
//!    received, p50/p99, with nothing else in Redis.
//!
//! Every `POST` is answered 202 (or 200 with the turn) only after Redis's
//! `XADD` reply, as in production. The HTTP clients run in this process on
//! the same two cores as the gateway and Redis, so the gateway's own figure
//! is lower than on a machine of its own.
//!
//! `cargo bench --bench gateway` (env `EVENTS`, default 200,000 per phase;
//! `CLIENTS`, default 64; `HELD`, default 300). Needs `redis-server`
//! (scripts/install-test-deps).

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::redis_server::RedisServer;
use support::{env_or, wait_for, Worker};

const TOKEN: &str = "bench-token";

fn main() {
    let events: usize = env_or("EVENTS", 200_000);
    let clients: usize = env_or("CLIENTS", 64);
    let held: usize = env_or("HELD", 300);
    let server = RedisServer::start();
    let mut conn = server.conn();
    let port = support::free_port();
    let hash: String = {
        use sha2::Digest;
        sha2::Sha256::digest(TOKEN.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let config = format!(
        "source = \"redis\"\n[window]\ngap = \"300ms\"\nidle_timeout = \"50ms\"\n[redis]\nurl = \"{}\"\ninput_stream = \"chat\"\noutput_stream = \"turns\"\ndlq_stream = \"dlq\"\nshards = 4\nblock = \"50ms\"\n[gateway]\nlisten = \"127.0.0.1:{port}\"\nmax_held = 100000\n[gateway.auth]\nbearer_sha256 = [\"{hash}\"]\n",
        server.url()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let started = Instant::now();
    let count = events.to_string();
    let (records, _, _) = support::run_produce(&config, &["--count", &count, "--rate", "0"]);
    let produce_rate = records as f64 / started.elapsed().as_secs_f64();
    let _: () = redis::cmd("FLUSHALL").query(&mut conn).unwrap();

    let _gateway = Worker::start_command(&["gateway"], &config);
    wait_for("the gateway to be ready", Duration::from_secs(60), || {
        support::http_get(port, "/readyz").filter(|(status, _)| *status == 200)
    });
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let single = runtime.block_on(ingest(&url, clients, events, 1));
    let batched = runtime.block_on(ingest(&url, clients, events, 100));
    let section = sessionizer::config::Config::from_toml(&config, Vec::new())
        .unwrap()
        .redis
        .unwrap();
    let written: usize = sessionizer::redis::keys::ShardKeys::all(&section)
        .iter()
        .map(|s| {
            redis::cmd("XLEN")
                .arg(&s.stream)
                .query::<usize>(&mut conn)
                .unwrap()
        })
        .sum();
    assert_eq!(written, 2 * events, "every accepted event is in Redis");
    // The wait is timed without a backlog: the worker and the gateway's
    // turn reader would be busy with the 2 x EVENTS events above.
    let _: () = redis::cmd("FLUSHALL").query(&mut conn).unwrap();

    let _worker = Worker::start(&config);
    let mut overheads = runtime.block_on(sync_overhead(&url, held, &server.url()));

    println!("gateway bench: {events} events per phase, {clients} keep-alive clients");
    println!("  sessionizer produce (pipelined XADD): {produce_rate:>10.0} events/s");
    for (what, rate) in [
        ("gateway, 1 event per request", single),
        ("gateway, 100 events per request", batched),
    ] {
        println!(
            "  {what:<37} {rate:>10.0} events/s  (ratio to produce {:.2})",
            rate / produce_rate
        );
    }
    support::print_percentiles(
        &format!("  sync overhead, turn written -> response received ({held} held requests)"),
        &mut overheads,
    );
}

/// Posts `events` events from `clients` keep-alive clients, `batch` per
/// request; events/s, every request answered 202.
async fn ingest(url: &str, clients: usize, events: usize, batch: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let requests = events / batch;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let client = reqwest::Client::new();
            let url = url.to_owned();
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= requests {
                        return;
                    }
                    let now = sessionizer::wall_clock::now_ms();
                    let body: Vec<String> = (0..batch)
                        .map(|i| {
                            let id = n * batch + i;
                            format!(
                                r#"{{"message_id":"b{batch}-{id}","user_id":"u{}","text":"message number {id}","event_time":{now}}}"#,
                                (id + c) % 50_000
                            )
                        })
                        .collect();
                    let body = if batch == 1 {
                        body.concat()
                    } else {
                        format!("[{}]", body.join(","))
                    };
                    let response = client
                        .post(&url)
                        .bearer_auth(TOKEN)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 202);
                    response.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (requests * batch) as f64 / started.elapsed().as_secs_f64()
}

/// `held` one-message requests of distinct users held with `?wait=30s`,
/// 50 at a time: for each answered with its turn, ms from the turn's entry
/// id on the output (when Redis wrote it) to the response received.
async fn sync_overhead(url: &str, held: usize, redis_url: &str) -> Vec<i64> {
    let client = reqwest::Client::new();
    let mut received = Vec::new();
    for chunk in (0..held).collect::<Vec<_>>().chunks(50) {
        let requests: Vec<_> = chunk
            .iter()
            .map(|i| {
                let body = format!(
                    r#"{{"message_id":"w{i}","user_id":"waiter-{i}","text":"are you there?","event_time":{}}}"#,
                    sessionizer::wall_clock::now_ms()
                );
                let request = client
                    .post(format!("{url}?wait=30s"))
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/json")
                    .body(body);
                tokio::spawn(async move {
                    let response = request.send().await.unwrap();
                    let body = response.bytes().await.unwrap();
                    let at = sessionizer::wall_clock::now_ms();
                    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(body["status"], "turn", "{body}");
                    (body["turn"]["turn_id"].as_str().unwrap().to_owned(), at)
                })
            })
            .collect();
        for r in requests {
            received.push(r.await.unwrap());
        }
    }
    // When each turn was written: its entry id's milliseconds.
    let mut conn = redis::Client::open(redis_url)
        .unwrap()
        .get_connection()
        .unwrap();
    let reply: redis::streams::StreamRangeReply =
        redis::Commands::xrange_all(&mut conn, "turns").unwrap();
    let written: std::collections::HashMap<String, i64> = reply
        .ids
        .iter()
        .map(|e| {
            let turn: Vec<u8> = e.get("turn").unwrap();
            let turn: serde_json::Value = serde_json::from_slice(&turn).unwrap();
            let ms = e.id.split('-').next().unwrap().parse().unwrap();
            (turn["turn_id"].as_str().unwrap().to_owned(), ms)
        })
        .collect();
    received
        .into_iter()
        .map(|(turn_id, at)| at - written[&turn_id])
        .collect()
}
