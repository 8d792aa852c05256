//! The Redis worker against a real `redis-server` (started by the harness on
//! a free loopback port), run as the real binary.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use redis::Commands;
use sessionizer::config::Config;
use sessionizer::redis::entry::Entry;
use sessionizer::redis::keys::{shard_of, ShardKeys};
use support::redis_server::{RedisCluster, RedisOptions, RedisServer};
use support::{run_replay, wait_for, workload, Worker};

const TIMEOUT: Duration = Duration::from_secs(90);

/// One deployment's names and config.
struct Setup {
    config_text: String,
    config: Config,
}

impl Setup {
    fn new(
        server: &RedisServer,
        name: &str,
        shards: u32,
        extra_redis: &str,
        window: &str,
    ) -> Setup {
        Self::with_url(
            &server.url(),
            server.ca_file(),
            name,
            shards,
            extra_redis,
            window,
        )
    }

    fn with_url(
        url: &str,
        ca_file: Option<String>,
        name: &str,
        shards: u32,
        extra_redis: &str,
        window: &str,
    ) -> Setup {
        let ca = ca_file
            .map(|f| format!("tls_ca_file = \"{f}\"\n"))
            .unwrap_or_default();
        let window = if window.is_empty() {
            "idle_timeout = \"200ms\"\nbacklog_quiet = \"1s\""
        } else {
            window
        };
        let config_text = format!(
            r#"source = "redis"
[window]
{window}
[redis]
url = "{}"
input_stream = "{name}-chat"
output_stream = "{name}-turns"
dlq_stream = "{name}-dlq"
shards = {shards}
lease_ttl = "1500ms"
block = "100ms"
{ca}{extra_redis}
"#,
            url
        );
        let config = Config::from_toml(&config_text, Vec::new()).unwrap();
        Setup {
            config_text,
            config,
        }
    }

    fn section(&self) -> &sessionizer::config::RedisSection {
        self.config.redis.as_ref().unwrap()
    }

    fn shards(&self) -> Vec<ShardKeys> {
        ShardKeys::all(self.section())
    }
}

/// Adds the records to their shards: most as a `payload` field, every third
/// valid JSON event as flat fields (both forms producers may use).
fn produce(conn: &mut impl redis::ConnectionLike, setup: &Setup, records: &[(String, Vec<u8>)]) {
    let shards = setup.shards();
    let mut pipe = redis::pipe();
    for (i, (user, payload)) in records.iter().enumerate() {
        let shard = &shards[shard_of(user, None, shards.len() as u32) as usize];
        let flat = (i % 3 == 0)
            .then(|| {
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload).ok()
            })
            .flatten()
            .filter(|o| o.values().all(|v| v.is_string() || v.is_i64()));
        match flat {
            Some(object) => {
                let fields: Vec<(String, String)> = object
                    .into_iter()
                    .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                    .collect();
                pipe.xadd(&shard.stream, "*", &fields).ignore();
            }
            None => {
                pipe.xadd(&shard.stream, "*", &[("payload", payload.as_slice())])
                    .ignore();
            }
        }
        if i % 1_000 == 999 {
            pipe.query::<()>(conn).unwrap();
            pipe = redis::pipe();
        }
    }
    pipe.query::<()>(conn).unwrap();
}

type Fields = BTreeMap<String, Vec<u8>>;
type RawFields = Vec<(String, Vec<u8>)>;

/// Every entry of a stream, oldest first.
fn read_stream(conn: &mut impl redis::ConnectionLike, key: &str) -> Vec<(String, Fields)> {
    let mut out = Vec::new();
    let mut from = "-".to_owned();
    loop {
        let page: Vec<(String, RawFields)> = redis::cmd("XRANGE")
            .arg(key)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(1_000)
            .query(conn)
            .unwrap();
        let Some((last, _)) = page.last() else { break };
        from = format!("({last}");
        out.extend(
            page.into_iter()
                .map(|(id, f)| (id, f.into_iter().collect())),
        );
    }
    out
}

/// Every input entry's fields by (shard stream, entry id): what a dead
/// letter's `source_stream` and `source_id` point at.
fn inputs_by_position(
    conn: &mut impl redis::ConnectionLike,
    setup: &Setup,
) -> BTreeMap<(String, String), Fields> {
    setup
        .shards()
        .into_iter()
        .flat_map(|s| {
            read_stream(conn, &s.stream)
                .into_iter()
                .map(move |(id, f)| ((s.stream.clone(), id), f))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn turns(conn: &mut impl redis::ConnectionLike, key: &str) -> Vec<serde_json::Value> {
    read_stream(conn, key)
        .into_iter()
        .map(|(_, f)| serde_json::from_slice(&f["turn"]).unwrap())
        .collect()
}

fn pending(conn: &mut impl redis::ConnectionLike, setup: &Setup) -> usize {
    setup
        .shards()
        .iter()
        .map(|s| {
            let summary: redis::Value = redis::cmd("XPENDING")
                .arg(&s.stream)
                .arg(&setup.section().group)
                .query(conn)
                .unwrap();
            match summary {
                redis::Value::Array(parts) => match parts.first() {
                    Some(redis::Value::Int(n)) => *n as usize,
                    _ => 0,
                },
                _ => 0,
            }
        })
        .sum()
}

/// What the worker must produce: each shard's entries in id order through
/// the pipeline, then every session closed.
fn reference(
    conn: &mut impl redis::ConnectionLike,
    setup: &Setup,
) -> (Vec<serde_json::Value>, BTreeSet<(String, String, String)>) {
    reference_without(conn, setup, |_| false)
}

/// [`reference`] without the entries `leave_out` picks (by their payload).
fn reference_without(
    conn: &mut impl redis::ConnectionLike,
    setup: &Setup,
    leave_out: impl Fn(&[u8]) -> bool,
) -> (Vec<serde_json::Value>, BTreeSet<(String, String, String)>) {
    let mut turns = Vec::new();
    let mut dead = BTreeSet::new();
    for shard in setup.shards() {
        let mut entries = read_stream(conn, &shard.stream);
        entries.retain(|(_, fields)| !fields.values().any(|v| leave_out(v)));
        let payloads = entries.iter().map(|(id, fields)| {
            let entry = Entry {
                id: id.clone(),
                fields: Some(
                    fields
                        .iter()
                        .map(|(k, v)| (k.clone().into_bytes(), v.clone()))
                        .collect(),
                ),
            };
            entry.payload().0.into_owned()
        });
        let (t, d) = support::reference_run(&setup.config, payloads);
        turns.extend(t);
        for (index, reason) in d {
            dead.insert((shard.stream.clone(), entries[index].0.clone(), reason));
        }
    }
    (sorted(turns), dead)
}

fn sorted(mut turns: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    turns.sort_by(|a, b| a["turn_id"].as_str().cmp(&b["turn_id"].as_str()));
    turns
}

fn message_ids(turns: &[serde_json::Value]) -> BTreeSet<String> {
    turns.iter().flat_map(support::message_ids).collect()
}

/// Waits until the turns cover every wanted message and nothing is pending.
fn wait_until_done(
    conn: &mut impl redis::ConnectionLike,
    setup: &Setup,
    want: &BTreeSet<String>,
) -> Vec<serde_json::Value> {
    // One output stream, or one per shard on a cluster.
    let outputs: BTreeSet<String> = setup.shards().into_iter().map(|s| s.output).collect();
    wait_for(
        "every message in a turn and nothing pending",
        TIMEOUT,
        || {
            let turns: Vec<serde_json::Value> =
                outputs.iter().flat_map(|o| turns(conn, o)).collect();
            (message_ids(&turns).is_superset(want) && pending(conn, setup) == 0).then_some(turns)
        },
    )
}

/// The lease holders' pids (a lease value is `<host>-<pid>#<epoch>`).
fn lease_holders(conn: &mut impl redis::ConnectionLike, setup: &Setup) -> Vec<Option<u32>> {
    setup
        .shards()
        .iter()
        .map(|s| {
            let value: Option<String> = conn.get(&s.lease).unwrap();
            value.map(|v| {
                let worker = v.split('#').next().unwrap();
                worker.rsplit('-').next().unwrap().parse().unwrap()
            })
        })
        .collect()
}

#[test]
fn end_to_end_turns_equal_the_reference_and_poison_goes_to_the_dlq() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "e2e", 3, "", "");
    let records = workload(40, 1_200, 7);
    produce(&mut conn, &setup, &records);
    let (want_turns, want_dead) = reference(&mut conn, &setup);
    assert!(!want_dead.is_empty() && want_turns.len() > 50);

    let mut worker = Worker::start(&setup.config_text);
    let got = wait_until_done(&mut conn, &setup, &message_ids(&want_turns));
    assert_eq!(sorted(got), want_turns);

    let dlq = read_stream(&mut conn, &setup.section().dlq_stream);
    let inputs = inputs_by_position(&mut conn, &setup);
    let mut got_dead = BTreeSet::new();
    for (_, f) in &dlq {
        let text = |k: &str| String::from_utf8(f[k].clone()).unwrap();
        let source = (text("source_stream"), text("source_id"));
        let original = &inputs[&source];
        if text("form") == "payload" {
            assert_eq!(f["payload"], original["payload"], "the original bytes");
        }
        assert_eq!(text("deliveries"), "1");
        assert!(!text("error").is_empty() && !text("worker").is_empty());
        assert!(chrono::DateTime::parse_from_rfc3339(&text("failed_at")).is_ok());
        got_dead.insert((source.0, source.1, text("reason")));
    }
    assert_eq!(got_dead, want_dead);

    // An output entry names its turn and user for cheap filtering.
    for (_, f) in read_stream(&mut conn, &setup.section().output_stream) {
        let turn: serde_json::Value = serde_json::from_slice(&f["turn"]).unwrap();
        assert_eq!(turn["turn_id"].as_str().unwrap().as_bytes(), f["turn_id"]);
        assert_eq!(turn["user_id"].as_str().unwrap().as_bytes(), f["user_id"]);
    }

    assert!(worker.terminate().success(), "exits 0 on SIGTERM");
    assert_eq!(
        lease_holders(&mut conn, &setup),
        vec![None; 3],
        "leases released at shutdown"
    );
}

#[test]
fn a_killed_workers_shards_are_taken_over_and_nothing_is_lost() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "kill", 4, "", "");
    produce(&mut conn, &setup, &workload(300, 20_000, 11));
    let (want_turns, _) = reference(&mut conn, &setup);
    let want = message_ids(&want_turns);

    let mut first = Worker::start(&setup.config_text);
    let second = Worker::start(&setup.config_text);
    let (a, b) = (first.pid(), second.pid());
    wait_for("the shards split between the two workers", TIMEOUT, || {
        let holders = lease_holders(&mut conn, &setup);
        let count = |pid| holders.iter().filter(|h| **h == Some(pid)).count();
        (count(a) == 2 && count(b) == 2).then_some(())
    });
    first.kill9();
    wait_for("the survivor to take every shard", TIMEOUT, || {
        (lease_holders(&mut conn, &setup) == vec![Some(b); 4]).then_some(())
    });
    let got = wait_until_done(&mut conn, &setup, &want);
    support::assert_complete_without_partial_duplicates(&want, &got);
}

#[test]
fn a_paused_worker_whose_lease_was_taken_writes_nothing_after_it_wakes() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    // No idle advance: only event time closes sessions, so the paused
    // worker holds open sessions (pending entries) that the next owner must
    // replay.
    let setup = Setup::new(&server, "fence", 1, "", "idle_timeout = \"1h\"");
    let records = workload(50, 2_000, 5);
    let (first_half, second_half) = records.split_at(1_000);
    produce(&mut conn, &setup, first_half);
    let shard = setup.shards().remove(0);
    let output = setup.section().output_stream.clone();

    let paused = Worker::start(&setup.config_text);
    wait_for(
        "the first worker to read everything and emit",
        TIMEOUT,
        || {
            let stream: redis::streams::StreamInfoStreamReply =
                conn.xinfo_stream(&shard.stream).unwrap();
            let groups: redis::streams::StreamInfoGroupsReply =
                conn.xinfo_groups(&shard.stream).unwrap();
            let caught_up = groups
                .groups
                .iter()
                .any(|g| g.last_delivered_id == stream.last_generated_id);
            (caught_up && pending(&mut conn, &setup) > 0 && !turns(&mut conn, &output).is_empty())
                .then_some(())
        },
    );
    paused.signal("STOP");
    wait_for("the paused worker's lease to lapse", TIMEOUT, || {
        (lease_holders(&mut conn, &setup) == vec![None]).then_some(())
    });
    // Frozen now: whatever it wrote is before this id.
    let before_wake = read_stream(&mut conn, &output).last().unwrap().0.clone();
    let taker = Worker::start(&setup.config_text);
    wait_for("the second worker to take the shard", TIMEOUT, || {
        (lease_holders(&mut conn, &setup) == vec![Some(taker.pid())]).then_some(())
    });
    paused.signal("CONT");
    produce(&mut conn, &setup, second_half);
    let (want_turns, _) = reference(&mut conn, &setup);
    // The last sessions stay open (no idle advance): wait for all but them.
    let last = want_turns
        .iter()
        .map(|t| t["end_time"].as_i64().unwrap())
        .max()
        .unwrap();
    let window = &setup.config.window;
    let watermark = last - window.max_out_of_orderness.0;
    let closed: BTreeSet<String> = want_turns
        .iter()
        .filter(|t| t["end_time"].as_i64().unwrap() + window.gap.0 + 1_000 < watermark)
        .flat_map(support::message_ids)
        .collect();
    assert!(closed.len() > 100);
    let got = wait_for("the closed sessions' turns", TIMEOUT, || {
        let got = turns(&mut conn, &output);
        message_ids(&got).is_superset(&closed).then_some(got)
    });
    support::assert_complete_without_partial_duplicates(&message_ids(&got), &got);
    let paused_worker = format!("-{}", paused.pid());
    for (id, f) in read_stream(&mut conn, &output) {
        let worker = String::from_utf8(f["worker"].clone()).unwrap();
        if worker.ends_with(&paused_worker) {
            assert!(
                compare_ids(&id, &before_wake) != std::cmp::Ordering::Greater,
                "the paused worker wrote {id} after its lease was taken"
            );
        }
    }
    assert_eq!(lease_holders(&mut conn, &setup), vec![Some(taker.pid())]);
}

fn compare_ids(a: &str, b: &str) -> std::cmp::Ordering {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap();
        (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
    };
    parse(a).cmp(&parse(b))
}

#[test]
fn the_worker_rides_out_a_redis_restart_with_aof() {
    let mut server = RedisServer::start_with(RedisOptions {
        aof: true,
        ..Default::default()
    });
    let mut conn = server.conn();
    let setup = Setup::new(&server, "restart", 2, "", "");
    let records = workload(100, 4_000, 13);
    let (first, second) = records.split_at(2_000);
    produce(&mut conn, &setup, first);
    let _worker = Worker::start(&setup.config_text);
    let output = setup.section().output_stream.clone();
    wait_for("some turns before the restart", TIMEOUT, || {
        (!turns(&mut conn, &output).is_empty()).then_some(())
    });
    server.restart();
    let mut conn = server.conn();
    produce(&mut conn, &setup, second);
    // The pause can let the idle advance close sessions early, so turns may
    // split differently from one uninterrupted run; every valid message must
    // still arrive, once.
    let (want_turns, _) = reference(&mut conn, &setup);
    let want = message_ids(&want_turns);
    let got = wait_until_done(&mut conn, &setup, &want);
    support::assert_complete_without_partial_duplicates(&want, &got);
}

/// SIGTERM with Redis gone: after the first lease release fails, the
/// worker skips the other best-effort calls (those leases lapse after
/// `lease_ttl`) and exits 0 within the graceful-stop bound. Before, each
/// of its 16 shards waited out a reconnect (~2.5 s each).
#[test]
fn sigterm_with_redis_down_exits_promptly() {
    let mut server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "down", 16, "", "");
    let mut worker = Worker::start(&setup.config_text);
    let leases: Vec<String> = ShardKeys::all(setup.section())
        .into_iter()
        .map(|k| k.lease)
        .collect();
    wait_for("every shard owned", TIMEOUT, || {
        let owned: i64 = redis::cmd("EXISTS").arg(&leases).query(&mut conn).unwrap();
        (owned == leases.len() as i64).then_some(())
    });
    server.kill();
    assert!(worker.terminate().success());
}

#[test]
fn a_record_that_kills_the_worker_is_dead_lettered_after_max_deliveries() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "crash", 1, "max_deliveries = 3", "");
    let mut records = workload(20, 300, 3);
    let marker = "KILLS-THE-WORKER";
    let poison = format!(
        r#"{{"message_id":"{marker}","user_id":"user-0","text":"x","event_time":{}}}"#,
        sessionizer::wall_clock::now_ms()
    );
    records.insert(
        151, // not a multiple of 3: kept as a payload field
        ("user-0".to_owned(), poison.clone().into_bytes()),
    );
    produce(&mut conn, &setup, &records);
    let dlq = setup.section().dlq_stream.clone();
    let mut crashes = 0;
    let dead = loop {
        let mut worker = Worker::start_with_env(
            &setup.config_text,
            &[("SESSIONIZER_FAULT_ABORT_ON", marker)],
        );
        let ended = wait_for(
            "the worker to crash or dead-letter the record",
            TIMEOUT,
            || {
                if let Some(status) = worker.child.try_wait().unwrap() {
                    return Some(Some(status));
                }
                read_stream(&mut conn, &dlq)
                    .into_iter()
                    .find(|(_, f)| f["reason"] == b"max_deliveries")
                    .map(|_| None)
            },
        );
        match ended {
            Some(status) => {
                assert!(!status.success(), "the worker died on the record");
                crashes += 1;
                assert!(crashes <= 3, "delivered more than max_deliveries times");
            }
            None => break read_stream(&mut conn, &dlq),
        }
    };
    assert_eq!(crashes, 3, "exactly max_deliveries deliveries");
    let exhausted: Vec<&Fields> = dead
        .iter()
        .map(|(_, f)| f)
        .filter(|f| f["reason"] == b"max_deliveries")
        .collect();
    assert_eq!(exhausted.len(), 1, "only the record that killed the worker");
    assert_eq!(exhausted[0]["payload"], poison.as_bytes());
    assert_eq!(exhausted[0]["deliveries"], b"3");
}

/// Runs a small workload through a worker and checks every message arrives.
fn small_run(server: &RedisServer, setup: &Setup) {
    let mut conn = server.conn();
    produce(&mut conn, setup, &workload(10, 200, 21));
    let (want_turns, _) = reference(&mut conn, setup);
    let want = message_ids(&want_turns);
    let _worker = Worker::start(&setup.config_text);
    let got = wait_until_done(&mut conn, setup, &want);
    support::assert_complete_without_partial_duplicates(&want, &got);
}

#[test]
fn acl_credentials_from_the_config_keys() {
    let server = RedisServer::start_with(RedisOptions {
        acl_user: Some(("sessionizer".into(), "s3cret-pass".into())),
        ..Default::default()
    });
    // The URL without credentials, the user and password as keys.
    let mut setup = Setup::new(
        &server,
        "acl",
        2,
        "username = \"sessionizer\"\npassword = \"s3cret-pass\"",
        "",
    );
    let bare = format!("redis://127.0.0.1:{}", server.port);
    setup.config_text = setup.config_text.replace(&server.url(), &bare);
    setup.config = Config::from_toml(&setup.config_text, Vec::new()).unwrap();
    small_run(&server, &setup);
}

/// A wrong password is a configuration error: the worker exits at start
/// with the reason instead of retrying forever.
#[test]
fn wrong_credentials_stop_the_worker_at_start_with_the_reason() {
    let server = RedisServer::start_with(RedisOptions {
        acl_user: Some(("sessionizer".into(), "s3cret-pass".into())),
        ..Default::default()
    });
    let setup = Setup::new(&server, "auth", 1, "", "");
    let wrong = setup.config_text.replace("s3cret-pass", "not-the-password");
    assert_ne!(wrong, setup.config_text);
    let (stderr, success) = support::run_to_exit(&["run"], &wrong, TIMEOUT);
    assert!(!success, "exits with an error");
    assert!(
        stderr.contains("redis:") && stderr.contains("redis.password"),
        "says why: {stderr}"
    );
}

#[test]
fn tls_with_a_private_ca() {
    let server = RedisServer::start_with(RedisOptions {
        tls: true,
        ..Default::default()
    });
    let setup = Setup::new(&server, "tls", 1, "", "");
    assert!(setup.config_text.contains("rediss://"));
    small_run(&server, &setup);
}

/// `/readyz` answers 503 until the worker has reached Redis and owns shards,
/// then 200; the counters on `/metrics` match what was sent.
#[test]
fn metrics_count_what_was_sent_and_readyz_flips_to_ready() {
    use sessionizer::metrics as m;
    use support::{http_get, metric};
    let mut server = RedisServer::start();
    let setup = Setup::new(&server, "metrics", 2, "", "");
    let (config, port) = support::with_metrics(&setup.config_text);
    server.kill();
    let _worker = Worker::start(&config);
    let (status, body) = wait_for("/healthz", TIMEOUT, || http_get(port, "/healthz"));
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // Not ready while Redis is down, and the reason names the server.
    let (status, body) = wait_for("/readyz to name the server", TIMEOUT, || {
        http_get(port, "/readyz").filter(|(_, body)| body.contains("last broker error"))
    });
    assert_eq!(status, 503, "not ready while Redis is down: {body}");
    assert!(body.contains("not connected"), "{body}");
    assert!(
        body.contains(&server.url().replace("redis://", "")),
        "{body}"
    );

    server.restart();
    wait_for("/readyz to say ready", TIMEOUT, || {
        http_get(port, "/readyz").filter(|(status, _)| *status == 200)
    });
    let mut conn = server.conn();
    let records = workload(30, 900, 11);
    produce(&mut conn, &setup, &records);
    let (want_turns, want_dead) = reference(&mut conn, &setup);
    wait_until_done(&mut conn, &setup, &message_ids(&want_turns));

    let exposition = support::scrape_when_turns(port, want_turns.len());
    let count = |name: &str, labels: &[(&str, &str)]| metric(&exposition, name, labels) as usize;
    assert_eq!(count(m::RECORDS_CONSUMED, &[]), records.len());
    support::assert_dead_letters_by_reason(
        &exposition,
        want_dead.iter().map(|(_, _, r)| r.as_str()),
    );
    assert_eq!(count(m::DEAD_LETTERS, &[]), want_dead.len());
    let valid = records.len() - want_dead.len();
    assert_eq!(count(m::EVENTS, &[("kind", "message")]), valid);
    let in_turns: usize = want_turns
        .iter()
        .map(|t| support::message_ids(t).len())
        .sum();
    assert_eq!(count(m::DUPLICATES, &[]), valid - in_turns);
    for closed_by in ["gap", "end_of_turn", "max_messages"] {
        let want = want_turns
            .iter()
            .filter(|t| t["closed_by"] == closed_by)
            .count();
        assert_eq!(
            count(m::TURNS, &[("closed_by", closed_by)]),
            want,
            "{closed_by}"
        );
    }
    assert_eq!(
        count(&format!("{}_count", m::EMIT_DELAY), &[]),
        want_turns.len()
    );
    assert_eq!(count(m::OWNED, &[]), 2, "both shards owned");
    assert!(count(m::OWNERSHIP_CHANGES, &[("change", "acquired")]) >= 2);
    assert!(count(m::COMMITS, &[("result", "ok")]) > 0);
    assert_eq!(count(m::OPEN_SESSIONS, &[]), 0, "every session closed");
    // With nothing open, the watermark holds nothing back: the lag reads 0
    // on every shard, not the time since the last event.
    wait_for("an idle shard's watermark lag at 0", TIMEOUT, || {
        let (_, body) = http_get(port, "/metrics")?;
        (metric(&body, m::WATERMARK_LAG, &[]) == 0.0).then_some(())
    });
}

/// `sessionizer produce` writes the requested count into the shard of each
/// event's session key, with the requested poison fraction.
#[test]
fn produce_emits_the_requested_count_and_poison_fraction_into_the_right_shards() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "produce", 3, "", "");
    let (records, poison, duplicates) = support::run_produce(
        &setup.config_text,
        &[
            "--count",
            "10000",
            "--rate",
            "0",
            "--poison-fraction",
            "0.1",
            "--duplicate-fraction",
            "0.05",
        ],
    );
    assert_eq!(records, 10_000);
    let decoder =
        sessionizer::codec::Decoder::new(setup.config.input_format(), setup.config.decode_limits());
    let (mut total, mut undecodable) = (0, 0);
    for (index, shard) in setup.shards().iter().enumerate() {
        for (_, fields) in read_stream(&mut conn, &shard.stream) {
            total += 1;
            match decoder.decode(&fields["payload"], sessionizer::wall_clock::now_ms()) {
                Ok(event) => assert_eq!(
                    shard_of(&event.user_id, None, 3) as usize,
                    index,
                    "{} in its shard",
                    event.user_id
                ),
                Err(_) => undecodable += 1,
            }
        }
    }
    assert_eq!(total, 10_000, "every record in a shard stream");
    assert_eq!(
        undecodable, poison,
        "the poison records, and only them, fail"
    );
    // Poison is drawn per event; duplicate copies of valid events come on
    // top: expected 0.1 / (1 + 0.05 × 0.9) of the records.
    let fraction = poison as f64 / 10_000.0;
    let expected = 0.1 / (1.0 + 0.05 * 0.9);
    assert!(
        (fraction - expected).abs() < 0.012,
        "poison fraction {fraction}, expected {expected}"
    );
    assert!(duplicates > 0);

    // Protobuf events, to another input stream (`--to`): every one decodes.
    support::run_produce(
        &setup.config_text,
        &[
            "--count",
            "200",
            "--rate",
            "0",
            "--format",
            "protobuf",
            "--to",
            "proto-chat",
        ],
    );
    let proto_shards = ShardKeys::all(&sessionizer::config::RedisSection {
        input_stream: "proto-chat".into(),
        ..setup.section().clone()
    });
    let mut decoded = 0;
    for shard in &proto_shards {
        for (_, fields) in read_stream(&mut conn, &shard.stream) {
            assert_ne!(fields["payload"].first(), Some(&b'{'), "not JSON");
            decoder
                .decode(&fields["payload"], sessionizer::wall_clock::now_ms())
                .unwrap();
            decoded += 1;
        }
    }
    assert_eq!(decoded, 200);
}

/// `dlq stats`, `inspect` and `replay` on the Redis DLQ: filters select the
/// right entries, `--json` parses, a replay after a config fix (and one
/// through `--transform`) turns the dead letters into turns, a repeated
/// replay sends nothing, and `--max-replays` stops a record that never
/// succeeds.
#[test]
fn dlq_inspect_stats_and_replay_after_a_fix() {
    use support::{inspect_json, stats_json};
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "dlqops", 2, "", "");
    let records = workload(30, 900, 21);
    produce(&mut conn, &setup, &records);
    let (want_turns, want_dead) = reference(&mut conn, &setup);
    let mut worker = Worker::start(&setup.config_text);
    // Dead letters are written with their acks: nothing pending, all there.
    wait_until_done(&mut conn, &setup, &message_ids(&want_turns));
    let text = setup.config_text.as_str();
    let shards = setup.shards();
    let count_of = |reason: &str| want_dead.iter().filter(|(_, _, r)| r == reason).count();

    let stats = stats_json(text, &[]);
    assert_eq!(stats["total"], want_dead.len());
    for reason in ["decode", "invalid", "oversize"] {
        assert!(count_of(reason) > 0, "the workload has {reason} poison");
        assert_eq!(stats["by_reason"][reason], count_of(reason), "{reason}");
    }
    let in_shard_1 = want_dead
        .iter()
        .filter(|(s, _, _)| *s == shards[1].stream)
        .count();
    assert_eq!(
        stats["by_source_partition"][format!("{}[1]", shards[1].stream)],
        in_shard_1
    );

    let invalid = inspect_json(text, &["--reason", "invalid"]);
    assert_eq!(invalid.len(), count_of("invalid"));
    assert!(invalid.iter().all(|e| e["reason"] == "invalid"));
    let shard_1 = inspect_json(text, &["--source-partition", "1"]);
    assert_eq!(shard_1.len(), in_shard_1);
    assert!(shard_1
        .iter()
        .all(|e| e["source"]["name"] == shards[1].stream));
    let oldest_first = inspect_json(text, &["--oldest-first"]);
    assert_eq!(oldest_first.len(), want_dead.len());
    let newest_two = inspect_json(text, &["--limit", "2"]);
    assert_eq!(newest_two.len(), 2);
    assert_eq!(newest_two[0], oldest_first[oldest_first.len() - 1]);
    assert_eq!(newest_two[1], oldest_first[oldest_first.len() - 2]);
    assert_eq!(
        inspect_json(text, &["--since", "1h"]).len(),
        want_dead.len()
    );
    assert!(inspect_json(text, &["--since", "2h", "--until", "1h"]).is_empty());
    let inputs = inputs_by_position(&mut conn, &setup);
    for e in &oldest_first {
        let at = |k: &str| e["source"][k].as_str().unwrap().to_owned();
        let original = &inputs[&(at("name"), at("position"))];
        if let Some(payload) = original.get("payload") {
            assert!(
                e["payload"].as_str().unwrap().as_bytes() == payload.as_slice(),
                "payload kept at {}",
                e["position"]
            );
        }
    }

    // The fix: longer texts allowed. Restart the worker with it, replay.
    assert!(worker.terminate().success());
    let fixed = format!("{text}\n[input]\nmax_text_bytes = 65536\n");
    let _worker = Worker::start(&fixed);
    let oversize = inspect_json(text, &["--reason", "oversize"]);
    assert_eq!(
        run_replay(text, &["--reason", "oversize", "--dry-run"]),
        (oversize.len() as u64, 0)
    );
    assert_eq!(
        inspect_json(text, &["--reason", "oversize"]),
        oversize,
        "a dry run changes nothing"
    );
    assert_eq!(
        run_replay(text, &["--reason", "oversize"]),
        (oversize.len() as u64, 0)
    );
    let fix = r#"sed 's/}$/,"text":"fixed"}/'"#;
    assert_eq!(
        run_replay(text, &["--reason", "invalid", "--transform", fix]),
        (invalid.len() as u64, 0)
    );
    let mut want = support::payload_message_ids(&oversize);
    want.extend(support::payload_message_ids(&invalid));
    let output = setup.section().output_stream.clone();
    wait_for("the replayed records in turns", TIMEOUT, || {
        message_ids(&turns(&mut conn, &output))
            .is_superset(&want)
            .then_some(())
    });
    assert_eq!(
        run_replay(text, &["--reason", "oversize"]),
        (0, 0),
        "nothing twice"
    );
    assert_eq!(
        run_replay(text, &["--reason", "invalid"]),
        (0, 0),
        "nothing twice"
    );
    let replayed_entries = shards
        .iter()
        .flat_map(|s| read_stream(&mut conn, &s.stream))
        .filter(|(_, f)| f.contains_key("sessionizer.replay.from"))
        .count();
    assert_eq!(replayed_entries, want.len(), "each replayed once");
    let stats = stats_json(text, &[]);
    assert!(stats["by_reason"].get("oversize").is_none());
    assert!(stats["by_reason"].get("invalid").is_none());

    // Records that never decode come back with their replay count, and are
    // skipped once replayed --max-replays times.
    let decode = count_of("decode") as u64;
    assert_eq!(
        run_replay(text, &["--reason", "decode", "--max-replays", "1"]),
        (decode, 0)
    );
    wait_for("the replayed records back in the DLQ", TIMEOUT, || {
        let back = inspect_json(text, &["--reason", "decode"]);
        (back.len() as u64 == decode && back.iter().all(|e| e["replay_count"] == 1)).then_some(())
    });
    assert_eq!(
        run_replay(text, &["--reason", "decode", "--max-replays", "1"]),
        (0, decode)
    );
}

/// `dlq inspect --follow` prints dead letters added after it started.
#[test]
fn dlq_inspect_follow_prints_new_dead_letters() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "follow", 1, "", "");
    let dlq = setup.section().dlq_stream.clone();
    let add = |conn: &mut redis::Connection, payload: &str| {
        let fields = [
            ("payload", payload),
            ("reason", "decode"),
            ("error", "not valid JSON"),
            ("source_stream", "follow-chat"),
            ("source_id", "1-0"),
            ("failed_at", "2026-11-23T00:00:00.000Z"),
            ("worker", "test"),
        ];
        let _: String = conn.xadd(&dlq, "*", &fields).unwrap();
    };
    add(&mut conn, "first");
    let follow = support::FollowDlq::start(&setup.config_text);
    assert_eq!(
        follow.next()["payload"],
        "first",
        "the existing dead letter first"
    );
    add(&mut conn, "second");
    let second = follow.next();
    assert_eq!(
        (second["payload"].as_str(), second["reason"].as_str()),
        (Some("second"), Some("decode"))
    );
}

/// The worker on a Redis Cluster (three primaries): shard keys hash-tagged
/// so each fenced step stays on one node, shards spread over the nodes,
/// output and DLQ sharded like the input; the turns equal the reference and
/// `dlq stats` counts the poison.
#[test]
fn end_to_end_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let mut conn = cluster.conn();
    let setup = Setup::with_url(&cluster.url(), None, "cluster", 6, "cluster = true\n", "");
    let slots: BTreeSet<i64> = setup
        .shards()
        .iter()
        .map(|s| {
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&s.stream)
                .query::<i64>(&mut conn)
                .unwrap()
                / 5462
        })
        .collect();
    assert!(slots.len() >= 2, "the shards live on more than one node");
    let (sent, poison, _) = support::run_produce(
        &setup.config_text,
        &[
            "--count",
            "1500",
            "--rate",
            "0",
            "--users",
            "40",
            "--poison-fraction",
            "0.05",
            "--duplicate-fraction",
            "0.05",
        ],
    );
    assert_eq!(sent, 1500);
    let (want_turns, want_dead) = reference(&mut conn, &setup);
    assert_eq!(want_dead.len() as u64, poison);
    let _worker = Worker::start(&setup.config_text);
    let got = wait_until_done(&mut conn, &setup, &message_ids(&want_turns));
    assert_eq!(sorted(got), want_turns);
    let dead: usize = setup
        .shards()
        .iter()
        .map(|s| read_stream(&mut conn, &s.dlq).len())
        .sum();
    assert_eq!(dead, want_dead.len());
    let stats = support::stats_json(&setup.config_text, &[]);
    assert_eq!(stats["total"], want_dead.len());
}

/// A shard task's own connection (`redis::direct`) answers each request
/// with its own reply after a request was dropped unanswered (a `select!`
/// took another branch), and again after Redis restarts under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shard_connection_survives_a_dropped_request_and_a_restart() {
    use sessionizer::redis::direct::{DirectConn, Target};
    let mut server = RedisServer::start_with(RedisOptions {
        aof: true,
        ..RedisOptions::default()
    });
    let target = Target {
        host: "127.0.0.1".into(),
        port: server.port,
        username: None,
        password: None,
        db: 3,
    };
    let mut conn = DirectConn::connect(target, Duration::from_secs(10))
        .await
        .unwrap();
    // Polled once, so sent; then dropped while Redis blocks on it forever.
    {
        let mut xread = redis::cmd("XREAD");
        xread
            .arg("BLOCK")
            .arg(0)
            .arg("STREAMS")
            .arg("nothing")
            .arg("$");
        let blocked = xread.query_async::<redis::Value>(&mut conn);
        tokio::pin!(blocked);
        assert!(futures::poll!(blocked.as_mut()).is_pending());
        let mut admin = server.conn();
        wait_for(
            "Redis to block on the XREAD",
            Duration::from_secs(10),
            || {
                let info: String = redis::cmd("INFO").arg("clients").query(&mut admin).unwrap();
                info.contains("blocked_clients:1").then_some(())
            },
        );
    }
    let set = tokio::time::timeout(
        Duration::from_secs(10),
        redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async::<redis::Value>(&mut conn),
    )
    .await
    .expect("the next request is answered, not stuck behind the dropped one");
    assert_eq!(set.unwrap(), redis::Value::Okay);
    let mut db3 = redis::Client::open(format!("{}/3", server.url()))
        .unwrap()
        .get_connection()
        .unwrap();
    let got: String = db3.get("k").unwrap();
    assert_eq!(
        got, "v",
        "written to the configured database after reconnecting"
    );

    // The first request after a restart fails on the dead socket, the next
    // one connects again.
    server.restart();
    let get = redis::cmd("GET").arg("k").clone();
    let got = match get.query_async::<String>(&mut conn).await {
        Ok(v) => v,
        Err(e) => {
            assert!(e.is_io_error() || e.is_connection_dropped(), "{e}");
            get.query_async::<String>(&mut conn).await.unwrap()
        }
    };
    assert_eq!(got, "v");
}

/// A Redis transaction does not roll back a failed command: with the output
/// key of the wrong type, every turn's `XADD` fails inside the fenced step.
/// No entry of those turns may be acked (the old step acked them anyway, and
/// after a crash and the fix they were in no turn and no dead letter).
#[test]
fn a_turn_that_fails_to_write_leaves_its_entries_pending() {
    use support::{http_get, metric};
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "wrongtype", 2, "", "");
    let (config, port) = support::with_metrics(&setup.config_text);
    produce(&mut conn, &setup, &workload(40, 2_000, 21));
    let (want_turns, _) = reference(&mut conn, &setup);
    let want = message_ids(&want_turns);
    let output = setup.section().output_stream.clone();
    let () = conn.set(&output, "not a stream").unwrap();

    let mut worker = Worker::start(&config);
    wait_for("turn writes to fail", TIMEOUT, || {
        let (_, body) = http_get(port, "/metrics")?;
        let failed = metric(
            &body,
            sessionizer::metrics::COMMITS,
            &[("result", "failed")],
        );
        (failed >= 4.0).then_some(())
    });
    assert!(
        pending(&mut conn, &setup) > 0,
        "the turns' entries stay pending"
    );
    worker.kill9();
    let () = conn.del(&output).unwrap();

    let _worker = Worker::start(&config);
    let got = wait_until_done(&mut conn, &setup, &want);
    support::assert_complete_without_partial_duplicates(&want, &got);
}

/// A flat-field entry whose fields are not UTF-8 is a dead letter (reason
/// `invalid`, naming the field) that keeps every original byte: decoded
/// lossily, user ids "\xff" and "\x83" both became "\u{fffd}" and their
/// messages were merged into one turn.
#[test]
fn flat_fields_that_are_not_utf8_are_dead_letters_never_merged_users() {
    use base64::Engine as _;
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "utf8", 1, "", "");
    let stream = setup.shards()[0].stream.clone();
    let t = sessionizer::wall_clock::now_ms().to_string();
    let entries: [&[(&[u8], &[u8])]; 4] = [
        &[
            (b"message_id", b"m1"),
            (b"user_id", b"\xff"),
            (b"text", b"secret of user one"),
            (b"event_time", t.as_bytes()),
        ],
        &[
            (b"message_id", b"m2"),
            (b"user_id", b"\x83"),
            (b"text", b"secret of user two"),
            (b"event_time", t.as_bytes()),
        ],
        &[
            (b"message_id", b"m3"),
            (b"user_id", b"u3"),
            (b"text", b"caf\xe9"),
            (b"event_time", t.as_bytes()),
        ],
        &[
            (b"message_id", b"m4"),
            (b"user_id", b"u4"),
            (b"text", b"fine"),
            (b"event_time", t.as_bytes()),
        ],
    ];
    for fields in entries {
        let _: String = conn.xadd(&stream, "*", fields).unwrap();
    }
    let _worker = Worker::start(&setup.config_text);
    let got = wait_until_done(&mut conn, &setup, &BTreeSet::from(["m4".to_owned()]));
    assert_eq!(message_ids(&got), BTreeSet::from(["m4".to_owned()]));

    let dlq = read_stream(&mut conn, &setup.section().dlq_stream);
    assert_eq!(dlq.len(), 3, "one dead letter per bad entry");
    for ((_, letter), (field, original)) in dlq.iter().zip([
        ("user_id", b"\xff".as_slice()),
        ("user_id", b"\x83"),
        ("text", b"caf\xe9"),
    ]) {
        assert_eq!(letter["reason"], b"invalid");
        let error = String::from_utf8_lossy(&letter["error"]);
        assert!(error.contains(&format!("`{field}`")), "{error}");
        let payload: serde_json::Value = serde_json::from_slice(&letter["payload"]).unwrap();
        let kept = base64::engine::general_purpose::STANDARD
            .decode(payload[field]["base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(kept, original, "the original bytes are kept");
    }
}

/// An entry written to a shard its session key does not hash to would split
/// its user's bursts across two workers. By default it is dead-lettered
/// (`misrouted`) and counted, and `dlq replay` sends it to its own shard,
/// where it becomes a turn; a dead letter from a stream no worker reads (a
/// reshard) goes to its key's shard too, or, without a key, is refused.
/// Under `misrouted = "process"` it is processed where it is, counted.
#[test]
fn misrouted_entries_are_counted_dead_lettered_and_replayed_to_their_shard() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let t = sessionizer::wall_clock::now_ms();
    let in_shard = |shard: u32| {
        (0..)
            .map(|i| format!("user-{i}"))
            .find(|u| shard_of(u, None, 2) == shard)
            .unwrap()
    };
    let (stays, strays) = (in_shard(0), in_shard(1));
    let event = |id: &str, user: &str| {
        serde_json::json!({"message_id": id, "user_id": user, "text": "hi", "event_time": t})
            .to_string()
    };
    for (policy, name) in [("", "misrouted"), ("misrouted = \"process\"", "processed")] {
        let setup = Setup::new(&server, name, 2, policy, "");
        let shards = setup.shards();
        for (id, user) in [("right", &stays), ("wrong", &strays)] {
            let _: String = conn
                .xadd(&shards[0].stream, "*", &[("payload", event(id, user))])
                .unwrap();
        }
        let (config, port) = support::with_metrics(&setup.config_text);
        let _worker = Worker::start(&config);
        let mut want = BTreeSet::from(["right".to_owned()]);
        if !policy.is_empty() {
            want.insert("wrong".to_owned());
        }
        let got = wait_until_done(&mut conn, &setup, &want);
        assert_eq!(message_ids(&got), want, "{name}");
        let body = support::http_get(port, "/metrics").unwrap().1;
        let partition = [("partition", shards[0].stream.as_str())];
        let metric = sessionizer::metrics::MISROUTED;
        assert_eq!(support::metric(&body, metric, &partition), 1.0, "{name}");
        let dlq = read_stream(&mut conn, &setup.section().dlq_stream);
        if !policy.is_empty() {
            assert!(dlq.is_empty(), "processed, not dead-lettered");
            continue;
        }
        assert_eq!(dlq.len(), 1);
        assert_eq!(dlq[0].1["reason"], b"misrouted");
        let error = String::from_utf8_lossy(&dlq[0].1["error"]);
        assert!(error.contains("shard 1 of 2"), "{error}");

        // Dead letters of a stream no worker reads any more (`shards` was 1).
        let old = format!("{name}-chat");
        for (payload, reason) in [(event("old", &strays), "late"), ("{".to_owned(), "decode")] {
            let fields = [
                ("payload", payload.as_str()),
                ("reason", reason),
                ("error", "test"),
                ("source_stream", old.as_str()),
                ("source_id", "1-0"),
                ("failed_at", "2026-12-03T00:00:00.000Z"),
                ("worker", "test"),
            ];
            let _: String = conn
                .xadd(&setup.section().dlq_stream, "*", &fields)
                .unwrap();
        }
        let text = setup.config_text.as_str();
        assert_eq!(run_replay(text, &["--reason", "misrouted,late"]), (2, 0));
        let moved: BTreeSet<String> = read_stream(&mut conn, &shards[1].stream)
            .into_iter()
            .map(|(_, f)| {
                let event: serde_json::Value = serde_json::from_slice(&f["payload"]).unwrap();
                event["message_id"].as_str().unwrap().to_owned()
            })
            .collect();
        let both = BTreeSet::from(["wrong".to_owned(), "old".to_owned()]);
        assert_eq!(moved, both, "replayed to the shard of their key");
        want.extend(both);
        assert_eq!(
            message_ids(&wait_until_done(&mut conn, &setup, &want)),
            want
        );
        let (out, err) = support::run_cli(&["dlq", "replay"], text, &["--reason", "decode"]);
        let said = format!("{out}{err}");
        assert!(said.contains("a stream no worker reads"), "{said}");
        assert!(said.contains("1 skipped with nowhere to go"), "{said}");
        assert_eq!(
            support::inspect_json(text, &["--reason", "decode"]).len(),
            1,
            "kept"
        );
    }
}

/// Changing `redis.shards`. The old workers leave entries unfinished (their
/// open sessions' entries pending, and entries written after they stopped
/// never read); `reshard` refuses while a worker holds a lease, then moves
/// those entries to the shards of their keys, merged in the order they were
/// written, and removes the old streams the new count does not use. The
/// workers of the new count then make the same turns as a clean run (none
/// split, none late), with nothing misrouted.
fn reshard_case(name: &str, from: u32, to: u32) {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let records = workload(30, 600, 23);
    let scratch = Setup::new(&server, &format!("{name}-reference"), 1, "", "");
    produce(&mut conn, &scratch, &records);
    let want_turns = reference(&mut conn, &scratch).0;
    let want = message_ids(&want_turns);

    let never_idle = "idle_timeout = \"1h\"\nbacklog_quiet = \"1h\"";
    let old = Setup::new(&server, name, from, "", never_idle);
    let new = Setup::new(&server, name, to, "", "");
    let from_arg = from.to_string();
    let args = ["--from", from_arg.as_str()];
    let (first, second) = records.split_at(records.len() / 2);
    produce(&mut conn, &old, first);
    let mut worker = Worker::start(&old.config_text);
    let ends: Vec<(String, String)> = old
        .shards()
        .into_iter()
        .map(|s| {
            let last = read_stream(&mut conn, &s.stream).pop().unwrap().0;
            (s.stream, last)
        })
        .collect();
    wait_for("the old worker read everything", TIMEOUT, || {
        for (stream, last) in &ends {
            let groups: redis::streams::StreamInfoGroupsReply = conn.xinfo_groups(stream).unwrap();
            if groups.groups.first()?.last_delivered_id != *last {
                return None;
            }
        }
        (pending(&mut conn, &old) > 0).then_some(())
    });
    let refused = support::run_cli_failing(&["reshard"], &new.config_text, &args);
    assert!(refused.contains("stop every worker"), "{refused}");
    assert!(worker.terminate().success());
    produce(&mut conn, &old, second);

    let new_streams: BTreeSet<String> = new.shards().into_iter().map(|s| s.stream).collect();
    let left: Vec<String> = old
        .shards()
        .into_iter()
        .map(|s| s.stream)
        .filter(|s| !new_streams.contains(s))
        .collect();
    let (status, _) = support::run_cli(&["status"], &new.config_text, &["--json"]);
    let rows: Vec<serde_json::Value> = status
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        rows.len(),
        new_streams.len() + left.len().min(1),
        "{status}"
    );
    for (row, stream) in rows[new_streams.len()..].iter().zip(&left) {
        assert_eq!(row["partition"], stream.as_str());
        assert!(row["note"].as_str().unwrap().contains("no worker reads"));
    }
    let dry_args = [args[0], args[1], "--dry-run"];
    let (_, dry) = support::run_cli(&["reshard"], &new.config_text, &dry_args);
    let would = support::numbers_after(&dry, "reshard: done: ");
    let (_, stderr) = support::run_cli(&["reshard"], &new.config_text, &args);
    let moved = support::numbers_after(&stderr, "reshard: done: ");
    assert_eq!(would, moved, "a dry run counts what a run moves");
    assert!(moved[0] > second.len() as u64, "{stderr}");
    assert_eq!(moved[1], left.len() as u64, "streams removed: {stderr}");
    for stream in &left {
        let exists: bool = conn.exists(stream).unwrap();
        assert!(!exists, "{stream} is gone");
    }

    let _worker = Worker::start(&new.config_text);
    let got = wait_until_done(&mut conn, &new, &want);
    let groups = |turns: &[serde_json::Value]| -> BTreeSet<Vec<String>> {
        turns
            .iter()
            .map(|t| {
                let mut ids = support::message_ids(t);
                ids.sort();
                ids
            })
            .collect()
    };
    assert!(got.iter().all(|t| t["late"] == false), "nothing late");
    assert_eq!(
        groups(&got),
        groups(&want_turns),
        "the turns of a clean run"
    );
    let (status, _) = support::run_cli(&["status"], &new.config_text, &[]);
    let lines: Vec<&str> = status.lines().collect();
    assert_eq!(
        lines.len(),
        1 + new_streams.len(),
        "a header and the shards: {status}"
    );
    for (line, shard) in lines[1..].iter().zip(new.shards()) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        let owner: String = conn.get(&shard.lease).unwrap();
        assert_eq!(
            cells[..2],
            [shard.stream.as_str(), owner.as_str()],
            "{status}"
        );
        assert_eq!(cells[4..6], ["0", "0"], "no lag, nothing pending: {status}");
    }
    let dlq = read_stream(&mut conn, &new.section().dlq_stream);
    assert!(dlq.iter().all(|(_, f)| f["reason"] != b"misrouted"));
}

#[test]
fn reshard_from_one_shard_to_two_leaves_no_stream_behind() {
    reshard_case("reshard-1-2", 1, 2);
}

/// Two old streams feed three new ones: merged by id, nothing arrives late.
#[test]
fn reshard_from_two_shards_to_three_keeps_the_written_order() {
    reshard_case("reshard-2-3", 2, 3);
}

/// With `[redact]`, the turns on the output stream carry `[EMAIL]` and the
/// counts, while the dead letter keeps the original bytes (for replay).
#[test]
fn redacted_turns_on_the_output_and_the_original_in_the_dead_letter() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "redact", 1, "", "");
    let config = format!("{}\n[redact]\nmode = \"mask\"\n", setup.config_text);
    let t = sessionizer::wall_clock::now_ms();
    let stream = setup.shards()[0].stream.clone();
    for (id, user) in [("m1", "u"), ("p1", "")] {
        let event = format!(
            r#"{{"message_id":"{id}","user_id":"{user}","text":"mail bob@example.com","event_time":{t}}}"#
        );
        let _: String = conn.xadd(&stream, "*", &[("payload", event)]).unwrap();
    }
    let _worker = Worker::start(&config);
    let got = wait_until_done(&mut conn, &setup, &BTreeSet::from(["m1".to_owned()]));
    assert_eq!(got[0]["text"], "mail [EMAIL]");
    assert_eq!(
        got[0]["redactions"],
        serde_json::json!([{"detector": "email", "count": 1}])
    );
    let dlq = read_stream(&mut conn, &setup.section().dlq_stream);
    assert!(String::from_utf8_lossy(&dlq[0].1["payload"]).contains("bob@example.com"));
}

/// After `FLUSHALL` (Redis lost its data) every shard met `NOGROUP` and
/// retried it forever. The group is recreated and new entries processed.
#[test]
fn the_worker_recreates_a_consumer_group_that_vanished() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "nogroup", 2, "", "");
    produce(&mut conn, &setup, &workload(20, 300, 5));
    let (before, _) = reference(&mut conn, &setup);
    let _worker = Worker::start(&setup.config_text);
    wait_until_done(&mut conn, &setup, &message_ids(&before));

    let () = redis::cmd("FLUSHALL").query(&mut conn).unwrap();
    let records = workload(30, 2_000, 6);
    produce(&mut conn, &setup, &records);
    let (after, _) = reference(&mut conn, &setup);
    let want = message_ids(&after);
    let got = wait_until_done(&mut conn, &setup, &want);
    support::assert_complete_without_partial_duplicates(&want, &got);
}

/// `dlq replay --transform` with a transform that hangs, writes garbage,
/// stops reading its input, or is stopped by SIGTERM: the replay never
/// hangs, never leaves the transform running, and never deletes a dead
/// letter whose replacement is not a valid event.
#[test]
fn dlq_replay_transforms_are_bounded_validated_and_keep_the_original() {
    use support::{inspect_json, run_cli_failing, run_replay};
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "transform", 1, "", "");
    let stream = setup.shards()[0].stream.clone();
    let event = |id: &str, text: &str| {
        format!(
            r#"{{"message_id":"{id}","user_id":"u1","text":"{text}","event_time":1700000000000}}"#
        )
    };
    // Two invalid (no text) and one oversize record, over a pipe buffer.
    for payload in [
        r#"{"message_id":"d1","user_id":"u1","event_time":1700000000000}"#.to_owned(),
        r#"{"message_id":"d2","user_id":"u1","event_time":1700000000000}"#.to_owned(),
        event("big", &"x".repeat(200_000)),
    ] {
        let _: String = conn.xadd(&stream, "*", &[("payload", payload)]).unwrap();
    }
    let mut worker = Worker::start(&setup.config_text);
    wait_for("three dead letters", TIMEOUT, || {
        (read_stream(&mut conn, &setup.section().dlq_stream).len() == 3
            && pending(&mut conn, &setup) == 0)
            .then_some(())
    });
    assert!(worker.terminate().success());
    let text = setup.config_text.as_str();
    let all = inspect_json(text, &["--oldest-first"]);
    assert_eq!(all.len(), 3);
    let tmp = tempfile::tempdir().unwrap();
    let pids = tmp.path().join("pids");
    // SIGKILL takes effect at once but a process disappears only once it is
    // reaped; without the kill, `sleep 600` outlives the deadline.
    let group_gone = |what: &str| {
        for pid in std::fs::read_to_string(&pids).unwrap().split_whitespace() {
            wait_for(
                &format!("{what}: process group {pid} gone"),
                TIMEOUT,
                || {
                    let alive = std::process::Command::new("pgrep")
                        .args(["-g", pid])
                        .output()
                        .unwrap();
                    (!alive.status.success()).then_some(())
                },
            );
        }
    };

    // Garbage out: the replay stops and the dead letter stays.
    let garbage = "cat >/dev/null; echo garbage";
    let stderr = run_cli_failing(&["dlq", "replay"], text, &["--transform", garbage]);
    assert!(
        stderr.contains("not a valid event") && stderr.contains("dead letter is kept"),
        "{stderr}"
    );
    assert_eq!(
        inspect_json(text, &["--oldest-first"]),
        all,
        "nothing deleted"
    );
    // ... or, with --skip-invalid, every record is skipped and kept.
    assert_eq!(
        run_replay(text, &["--transform", garbage, "--skip-invalid"]),
        (0, 0)
    );
    assert_eq!(
        inspect_json(text, &["--oldest-first"]),
        all,
        "nothing deleted"
    );

    // A hung transform (and what it started) is killed after the timeout.
    let hang = format!("echo $$ >> {}; sleep 600", pids.display());
    let stderr = run_cli_failing(
        &["dlq", "replay"],
        text,
        &["--transform", &hang, "--transform-timeout", "1s"],
    );
    assert!(stderr.contains("did not finish within"), "{stderr}");
    group_gone("after the timeout");
    assert_eq!(
        inspect_json(text, &["--oldest-first"]),
        all,
        "nothing deleted"
    );

    // SIGTERM stops the replay and kills the transform.
    std::fs::write(&pids, "").unwrap();
    let replay = Worker::start_command(&["dlq", "replay", "--transform", &hang], text);
    wait_for("the transform to start", TIMEOUT, || {
        (!std::fs::read_to_string(&pids).unwrap().is_empty()).then_some(())
    });
    let mut replay = replay;
    assert!(
        replay.terminate().success(),
        "an interrupted replay exits 0"
    );
    group_gone("after SIGTERM");
    assert_eq!(
        inspect_json(text, &["--oldest-first"]),
        all,
        "nothing deleted"
    );

    // A transform that does not read its input (the 200 kB record is more
    // than a pipe holds) but writes a valid event is fine.
    let replacement = event("big-fixed", "shorter now");
    let ignore_input = format!("printf '%s' '{replacement}'");
    assert_eq!(
        run_replay(
            text,
            &["--reason", "oversize", "--transform", &ignore_input]
        ),
        (1, 0)
    );
    assert_eq!(inspect_json(text, &["--reason", "oversize"]).len(), 0);
    let replayed = read_stream(&mut conn, &stream);
    assert_eq!(
        replayed.last().unwrap().1["payload"],
        replacement.as_bytes()
    );
}

/// An entry over `input.max_record_bytes` becomes a dead letter holding its
/// first 64 KiB, its length and SHA-256 (it was copied whole), and `dlq
/// replay` refuses to send the prefix for the record.
#[test]
fn an_entry_over_the_size_bound_is_dead_lettered_truncated() {
    use sha2::Digest;
    use support::{inspect_json, run_cli};
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "huge", 1, "", "");
    let stream = setup.shards()[0].stream.clone();
    let huge = vec![b'{'; 3 << 20];
    let _: String = conn.xadd(&stream, "*", &[("payload", &huge)]).unwrap();
    let _worker = Worker::start(&setup.config_text);
    wait_for("the dead letter", TIMEOUT, || {
        let dlq = read_stream(&mut conn, &setup.section().dlq_stream);
        (dlq.len() == 1 && pending(&mut conn, &setup) == 0).then_some(dlq)
    });
    let dlq = read_stream(&mut conn, &setup.section().dlq_stream);
    let letter = &dlq[0].1;
    assert_eq!(letter["reason"], b"oversize");
    assert_eq!(letter["payload"], &huge[..64 << 10]);
    assert_eq!(
        letter["truncated_original_bytes"],
        (3u64 << 20).to_string().as_bytes()
    );
    let sha: String = sha2::Sha256::digest(&huge)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(letter["truncated_original_sha256"], sha.as_bytes());
    let inspected = inspect_json(&setup.config_text, &[]);
    assert_eq!(inspected[0]["truncated"]["original_bytes"], 3u64 << 20);
    let (stdout, stderr) = run_cli(&["dlq", "replay"], &setup.config_text, &[]);
    assert!(stderr.contains("1 skipped as truncated"), "{stderr}");
    assert!(stdout.contains("keeps only the first 65536"), "{stdout}");
    assert_eq!(read_stream(&mut conn, &stream).len(), 1, "nothing sent");
}

/// A backlog (event times from long ago) written while the worker reads,
/// with the producer pausing between chunks for longer than `idle_timeout`:
/// the turns are the same as for the same data read afterwards. The idle
/// advance closed every open session at each pause (bursts split, the rest
/// late) when "caught up and quiet for idle_timeout" was enough.
#[test]
fn a_backlog_written_while_the_worker_reads_gives_the_turns_read_afterwards() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let window = "idle_timeout = \"100ms\"\nbacklog_quiet = \"4s\"";
    let setup = Setup::new(&server, "backlog", 2, "", window);
    let records = workload(40, 4_000, 31);
    let _worker = Worker::start(&setup.config_text);
    let group = setup.section().group.clone();
    for chunk in records.chunks(800) {
        produce(&mut conn, &setup, chunk);
        wait_for("the worker to read everything so far", TIMEOUT, || {
            setup
                .shards()
                .iter()
                .all(|s| {
                    let last: Vec<(String, RawFields)> = redis::cmd("XREVRANGE")
                        .arg(&s.stream)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1)
                        .query(&mut conn)
                        .unwrap();
                    let groups: redis::streams::StreamInfoGroupsReply =
                        conn.xinfo_groups(&s.stream).unwrap();
                    let delivered = groups
                        .groups
                        .iter()
                        .find(|g| g.name == group)
                        .map(|g| g.last_delivered_id.clone());
                    last.first().map(|(id, _)| id.clone()) == delivered
                })
                .then_some(())
        });
        // The producer pauses, longer than idle_timeout and shorter than
        // backlog_quiet: the workload's shape, not a synchronisation.
        std::thread::sleep(Duration::from_secs(1));
    }
    let (want_turns, _) = reference(&mut conn, &setup);
    let got = wait_until_done(&mut conn, &setup, &message_ids(&want_turns));
    let late = got.iter().filter(|t| t["late"] == true).count();
    assert_eq!(late, 0, "nothing judged late");
    assert_eq!(sorted(got), want_turns);
}

/// A graceful stop mid-stream writes what it closed and acks what it wrote:
/// the worker that takes over re-emits no turn. (Acks ride one step behind
/// the writes they confirm, so without a flush at stop the last written
/// turns would come again.)
#[test]
fn a_graceful_stop_mid_stream_leaves_nothing_to_re_emit() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "graceful", 4, "", "");
    produce(&mut conn, &setup, &workload(300, 20_000, 12));
    let (want_turns, _) = reference(&mut conn, &setup);
    let want = message_ids(&want_turns);
    let output = setup.section().output_stream.clone();
    let mut first = Worker::start(&setup.config_text);
    wait_for("some turns", TIMEOUT, || {
        let n: usize = conn.xlen(&output).unwrap();
        (n >= 500).then_some(())
    });
    assert!(first.terminate().success());
    let _second = Worker::start(&setup.config_text);
    let got = wait_until_done(&mut conn, &setup, &want);
    let re_emitted = support::assert_complete_without_partial_duplicates(&want, &got);
    assert_eq!(re_emitted, 0, "a graceful stop re-emits nothing");
}

/// At `maxmemory` a stale owner is fenced the normal way: its fence check
/// (allowed to run at OOM) touches the fence key and its step reads nothing.
/// A review expected the old check, whose `INCR` Redis refuses at OOM, to let
/// the stale step's read through; on Redis 7.0 it did not (nothing pending
/// either way), but the old check never touched the fence key there, so it
/// relied on Redis aborting the whole transaction for memory.
#[test]
fn the_fence_holds_at_maxmemory() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "oom", 1, "", "");
    let shard = setup.shards().remove(0);
    let worker = Worker::start(&setup.config_text);
    wait_for("the lease", TIMEOUT, || {
        (lease_holders(&mut conn, &setup) == vec![Some(worker.pid())]).then_some(())
    });
    worker.signal("STOP");
    produce(&mut conn, &setup, &workload(10, 50, 3));
    let fence_before: Option<i64> = conn.get(&shard.fence).unwrap();
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(1)
        .query(&mut conn)
        .unwrap();
    // DEL runs at OOM: the lease is no longer the worker's.
    let () = conn.del(&shard.lease).unwrap();
    worker.signal("CONT");
    wait_for("the stale worker's next step", TIMEOUT, || {
        let fence: Option<i64> = conn.get(&shard.fence).unwrap();
        (fence != fence_before || pending(&mut conn, &setup) > 0).then_some(())
    });
    assert_eq!(
        pending(&mut conn, &setup),
        0,
        "the stale worker read nothing into the shard's pending list"
    );
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query(&mut conn)
        .unwrap();
}

/// Issue #11: a client stamps the end of turn a few ms after the burst's
/// last message, and the end of turn overtakes it on the way. One turn, with
/// both messages, closed by the end of turn: the agent answers once.
#[test]
fn an_end_of_turn_that_overtakes_its_last_message_still_ends_after_it() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "overtake", 1, "", "");
    let records = support::end_of_turn_overtaking_its_message(sessionizer::wall_clock::now_ms());
    produce(&mut conn, &setup, &records);
    let _worker = Worker::start(&setup.config_text);
    let want = BTreeSet::from(["a1".to_owned(), "a2".to_owned()]);
    let got = wait_until_done(&mut conn, &setup, &want);
    assert_eq!(got.len(), 1, "one turn: {got:?}");
    assert_eq!(got[0]["closed_by"], "end_of_turn");
    assert_eq!(got[0]["text"], "my parcel\nnever came");
}

#[test]
fn after_a_panic_in_the_engine_the_turns_equal_a_clean_runs() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let setup = Setup::new(&server, "panic", 2, "", "");
    let mut records = workload(30, 1_000, 5);
    support::mark_for_panic(&mut records);
    produce(&mut conn, &setup, &records);
    let marked = |v: &[u8]| {
        v.windows(support::PANIC_MARKER.len())
            .any(|w| w == support::PANIC_MARKER.as_bytes())
    };
    let (want_turns, _) = reference_without(&mut conn, &setup, marked);
    let (config, port) = support::with_metrics(&setup.config_text);
    let _worker = Worker::start_with_env(
        &config,
        &[(sessionizer::fault::PANIC_ENV, support::PANIC_MARKER)],
    );
    let got = wait_until_done(&mut conn, &setup, &message_ids(&want_turns));
    assert_eq!(
        sorted(got),
        want_turns,
        "the turns equal a clean run's without the record that panicked"
    );
    let dlq = read_stream(&mut conn, &setup.section().dlq_stream);
    let panicked: Vec<_> = dlq
        .iter()
        .filter(|(_, f)| f["reason"] == b"panic")
        .collect();
    assert_eq!(panicked.len(), 1, "one panic dead letter");
    assert!(marked(&panicked[0].1["payload"]));
    let body = support::http_get(port, "/metrics").unwrap().1;
    assert_eq!(
        support::metric(&body, sessionizer::metrics::PARTITIONS_REBUILT, &[]),
        1.0
    );
}
