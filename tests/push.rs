//! `sessionizer push` against a real `redis-server` and the tansu Kafka
//! broker, delivering to a small agent the test starts: every turn
//! delivered once when the agent is healthy, retried ones after recovery in
//! per-key order, refused ones in the DLQ with the status, a stuck key not
//! delaying the others, and kill -9 mid-stream redelivering only the turns
//! in flight, under the same Idempotency-Key.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::Commands;
use support::agent::{Agent, Call, Reply};
use support::redis_server::RedisServer;
use support::{free_port, wait_for, Worker};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A turn as a worker writes it (the fields push reads, and some text).
fn turn(id: &str, user: &str) -> String {
    serde_json::json!({
        "turn_id": id, "user_id": user, "start_time": 1, "end_time": 2, "closed_by": "gap",
        "late": false, "message_count": 1, "text": format!("text of {id}"),
        "messages": [{"message_id": format!("m-{id}"), "event_time": 1, "text": format!("text of {id}")}],
    })
    .to_string()
}

/// `(turn_id, user)` for `per_user` turns of each user, interleaved as the
/// output would hold them.
fn turns_of(users: &[&str], per_user: usize) -> Vec<(String, String)> {
    (0..per_user)
        .flat_map(|i| {
            users
                .iter()
                .map(move |u| (format!("{u}-t{i}"), u.to_string()))
        })
        .collect()
}

fn user_of(call: &Call) -> String {
    call.turn()["user_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The turns that got a 2xx, with how many 2xx each got.
fn delivered(agent: &Agent) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for call in agent.calls() {
        if call.answered.is_some_and(|s| (200..300).contains(&s)) {
            *out.entry(call.turn()["turn_id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    out
}

/// The turns whose calls got no answer (yet).
fn unanswered(agent: &Agent) -> BTreeSet<String> {
    agent
        .calls()
        .iter()
        .filter(|c| c.answered.is_none())
        .map(|c| c.turn()["turn_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The turns that got a 2xx more than once.
fn delivered_twice(agent: &Agent) -> BTreeSet<String> {
    delivered(agent)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, _)| id)
        .collect()
}

/// Per key, the agent saw each turn only after the previous one got its
/// 2xx, in output order; and every call carried its turn's id as the
/// Idempotency-Key.
fn assert_in_order_per_key(calls: &[Call], turns: &[(String, String)], skip: &[&str]) {
    let mut order: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (id, user) in turns {
        if !skip.contains(&user.as_str()) {
            order.entry(user).or_default().push(id);
        }
    }
    for (user, ids) in order {
        let mut next = 0;
        for call in calls.iter().filter(|c| user_of(c) == user) {
            let id = call.turn()["turn_id"].as_str().unwrap().to_owned();
            assert_eq!(id, ids[next], "{user}: a turn out of order");
            if call.answered.is_some_and(|s| (200..300).contains(&s)) {
                next += 1;
            }
        }
        assert_eq!(next, ids.len(), "{user}: every turn delivered");
    }
    for call in calls {
        assert_eq!(
            call.header("idempotency-key"),
            call.turn()["turn_id"].as_str(),
            "the Idempotency-Key is the turn id"
        );
    }
}

fn redis_config(server: &RedisServer, name: &str, agent: u16, metrics: u16, push: &str) -> String {
    format!(
        "source = \"redis\"\n[redis]\nurl = \"{}\"\ninput_stream = \"{name}-chat\"\noutput_stream = \"{name}-turns\"\ndlq_stream = \"{name}-dlq\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[push]\nurl = \"http://127.0.0.1:{agent}/turns\"\ndlq = \"{name}-push-dlq\"\nbackoff = \"50ms\"\nmax_backoff = \"200ms\"\nmax_attempts = 5\ntimeout = \"5s\"\nshutdown_grace = \"1s\"\n{push}\n[push.headers]\nauthorization = \"Bearer agent-key\"\n",
        server.url()
    )
}

fn write_turns(conn: &mut redis::Connection, stream: &str, turns: &[(String, String)]) {
    for (id, user) in turns {
        let _: String = conn
            .xadd(
                stream,
                "*",
                &[
                    ("turn", turn(id, user).as_str()),
                    ("turn_id", id),
                    ("user_id", user),
                ],
            )
            .unwrap();
    }
}

/// Entries of the group not acked yet.
fn pending(conn: &mut redis::Connection, stream: &str) -> usize {
    let reply: redis::streams::StreamPendingReply =
        conn.xpending(stream, "sessionizer-push").unwrap();
    reply.count()
}

/// Healthy, flaky (500 twice), refusing (400) and rate-limiting (429 with
/// `Retry-After: 1`) keys on Redis: each turn delivered once, in order per
/// key; the refused one dead-lettered with its status; every entry acked;
/// `dlq replay --push` puts it back on the output and push tries it again.
#[test]
fn redis_push_delivers_in_order_retries_and_dead_letters() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let agent = Agent::start(|call, before| match user_of(call).as_str() {
        "flaky" if before < 2 => Reply::Status(500),
        "bad" => Reply::Status(400),
        "down" => Reply::Status(500),
        "slow" if before == 0 => Reply::RetryAfter(429, 1),
        _ => Reply::Status(200),
    });
    let metrics = free_port();
    let config = redis_config(&server, "p", agent.port, metrics, "concurrency = 4");
    let mut turns = turns_of(&["a", "b", "c"], 5);
    turns.extend(turns_of(&["flaky"], 3));
    turns.extend(turns_of(&["bad", "slow", "down"], 1));
    write_turns(&mut conn, "p-turns", &turns);
    let mut push = Worker::start_command(&["push"], &config);

    wait_for("every turn settled", TIMEOUT, || {
        let dlq: usize = conn.xlen("p-push-dlq").ok()?;
        (delivered(&agent).len() == turns.len() - 2
            && dlq == 2
            && pending(&mut conn, "p-turns") == 0)
            .then_some(())
    });
    let once = delivered(&agent);
    assert!(
        once.values().all(|n| *n == 1),
        "each delivered once: {once:?}"
    );
    let calls = agent.calls();
    assert_in_order_per_key(&calls, &turns, &["bad", "down"]);
    let down = calls.iter().filter(|c| user_of(c) == "down").count();
    assert_eq!(down, 5, "max_attempts");
    assert!(calls
        .iter()
        .all(|c| c.header("authorization") == Some("Bearer agent-key")
            && c.header("content-type") == Some("application/json")));
    let flaky: Vec<Option<u16>> = calls
        .iter()
        .filter(|c| c.turn()["turn_id"] == "flaky-t0")
        .map(|c| c.answered)
        .collect();
    assert_eq!(flaky, [Some(500), Some(500), Some(200)]);
    let slow: Vec<&Call> = calls.iter().filter(|c| user_of(c) == "slow").collect();
    assert!(
        slow[1].at - slow[0].at >= Duration::from_secs(1),
        "Retry-After: 1 honoured"
    );

    let reply: redis::streams::StreamRangeReply = conn.xrange_all("p-push-dlq").unwrap();
    let entry = |user: &str| {
        let e = reply
            .ids
            .iter()
            .find(|e| {
                e.get::<String>("payload")
                    .unwrap()
                    .contains(&format!("\"{user}-t0\""))
            })
            .unwrap_or_else(|| panic!("no dead letter of {user}: {:?}", reply.ids));
        move |name: &str| e.get::<String>(name).unwrap_or_default()
    };
    let bad = entry("bad");
    assert_eq!(bad("reason"), "delivery_rejected");
    assert_eq!(bad("http_status"), "400");
    assert_eq!(bad("source_stream"), "p-turns");
    assert_eq!(bad("payload"), turn("bad-t0", "bad"));
    assert!(bad("error").contains("HTTP 400"), "{}", bad("error"));
    let down = entry("down");
    assert_eq!(down("reason"), "delivery_failed");
    assert_eq!(down("http_status"), "500");
    assert_eq!(down("deliveries"), "5");
    let body = support::http_get(metrics, "/metrics").unwrap().1;
    let count = |result: &str| {
        support::metric(
            &body,
            sessionizer::metrics::PUSH_DELIVERIES,
            &[("result", result)],
        )
    };
    assert_eq!(
        (count("delivered"), count("rejected"), count("failed")),
        (19.0, 1.0, 1.0)
    );

    // The DLQ tools on the push's DLQ; a replay goes back onto the output.
    let inspected = support::inspect_json(&config, &["--push", "--reason", "delivery_rejected"]);
    assert_eq!(inspected.len(), 1);
    assert_eq!(inspected[0]["reason"], "delivery_rejected");
    assert_eq!(
        support::run_replay(&config, &["--push", "--reason", "delivery_rejected"]),
        (1, 0)
    );
    wait_for("the replayed turn tried again", TIMEOUT, || {
        let again = agent.calls().iter().filter(|c| user_of(c) == "bad").count();
        let dlq: usize = conn.xlen("p-push-dlq").ok()?;
        (again == 2 && dlq == 2 && pending(&mut conn, "p-turns") == 0).then_some(())
    });
    assert!(push.terminate().success());
}

/// A key whose call hangs holds its own slot only: the other keys' turns
/// are all delivered meanwhile, and its own next turn waits behind it.
#[test]
fn a_stuck_key_does_not_delay_the_others() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let agent = Agent::start(|call, _| match user_of(call).as_str() {
        "stuck" => Reply::Hold,
        _ => Reply::Status(200),
    });
    let config = redis_config(
        &server,
        "hol",
        agent.port,
        free_port(),
        "concurrency = 2\ntimeout = \"120s\"",
    )
    .replace("timeout = \"5s\"\n", "");
    let mut turns = turns_of(&["stuck"], 2);
    let others: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    turns.extend(turns_of(&others, 2));
    write_turns(&mut conn, "hol-turns", &turns);
    let mut push = Worker::start_command(&["push"], &config);
    wait_for("the other keys' turns delivered", TIMEOUT, || {
        (delivered(&agent).len() == 20).then_some(())
    });
    let stuck: Vec<Call> = agent
        .calls()
        .into_iter()
        .filter(|c| user_of(c) == "stuck")
        .collect();
    assert_eq!(stuck.len(), 1, "the stuck key's next turn waits behind it");
    assert_eq!(stuck[0].answered, None, "still held");

    // SIGTERM with the call still held: exit 0 after shutdown_grace, the
    // stuck key's turns unacked; a restart delivers them, in order.
    assert!(push.terminate().success());
    assert_eq!(pending(&mut conn, "hol-turns"), 2);
    agent.release();
    let _push = Worker::start_command(&["push"], &config);
    wait_for("the stuck key delivered in order", TIMEOUT, || {
        (delivered(&agent).len() == 22 && pending(&mut conn, "hol-turns") == 0).then_some(())
    });
    let stuck: Vec<String> = agent
        .calls()
        .iter()
        .filter(|c| user_of(c) == "stuck")
        .map(|c| c.turn()["turn_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(stuck, ["stuck-t0", "stuck-t0", "stuck-t1"]);
}

/// kill -9 while calls are in flight, then a restart: every turn is
/// delivered at least once; the turns delivered twice are only those whose
/// calls were in flight at the kill, under the same Idempotency-Key.
#[test]
fn kill_9_mid_stream_redelivers_only_what_was_in_flight() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let answered = Arc::new(AtomicUsize::new(0));
    let hold = Arc::new(AtomicBool::new(true));
    let (counting, holding) = (answered.clone(), hold.clone());
    let agent = Agent::start(move |_, _| {
        if holding.load(Ordering::SeqCst) && counting.fetch_add(1, Ordering::SeqCst) >= 10 {
            Reply::Hold
        } else {
            Reply::Status(200)
        }
    });
    let config = redis_config(&server, "k9", agent.port, free_port(), "concurrency = 4");
    let users: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    let turns = turns_of(&users, 5);
    write_turns(&mut conn, "k9-turns", &turns);
    let mut push = Worker::start_command(&["push"], &config);
    wait_for("10 answered and 4 calls held", TIMEOUT, || {
        (agent.calls().len() == 14).then_some(())
    });
    push.kill9();
    let in_flight = unanswered(&agent);
    assert_eq!(in_flight.len(), 4);
    hold.store(false, Ordering::SeqCst);
    agent.release();
    let _push = Worker::start_command(&["push"], &config);
    wait_for("every turn delivered", TIMEOUT, || {
        (delivered(&agent).len() == turns.len() && pending(&mut conn, "k9-turns") == 0)
            .then_some(())
    });
    let twice = delivered_twice(&agent);
    assert!(
        twice.is_subset(&in_flight),
        "only turns in flight at the kill come twice: {twice:?} vs {in_flight:?}"
    );
    for call in agent.calls() {
        assert_eq!(
            call.header("idempotency-key"),
            call.turn()["turn_id"].as_str()
        );
    }
}

/// On Kafka: the push's own group; each turn delivered once, in order per
/// key, a 500-twice key after recovery, a 400 in the DLQ topic with the
/// status header; the group's commits reach the end; SIGTERM exits 0 and a
/// restart delivers nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_push_commits_after_delivery_and_dead_letters_refusals() {
    let broker = support::Broker::start();
    broker.create_topic("kp-turns", 2).await;
    broker.create_topic("kp-push-dlq", 1).await;
    let agent = Agent::start(|call, before| match user_of(call).as_str() {
        "flaky" if before < 2 => Reply::Status(503),
        "bad" => Reply::Status(400),
        _ => Reply::Status(200),
    });
    let config = format!(
        "source = \"kafka\"\n[kafka]\nbrokers = \"{}\"\ngroup_id = \"kp\"\ninput_topics = [\"kp-chat\"]\noutput_topic = \"kp-turns\"\ndlq_topic = \"kp-dlq\"\n[kafka.properties]\n{}\n[push]\nurl = \"http://127.0.0.1:{}/turns\"\ndlq = \"kp-push-dlq\"\nbackoff = \"50ms\"\nmax_attempts = 5\nshutdown_grace = \"1s\"\n",
        broker.bootstrap(),
        broker.worker_properties(),
        agent.port
    );
    let mut turns = turns_of(&["a", "b", "c"], 4);
    turns.extend(turns_of(&["flaky", "bad"], 2));
    let records: Vec<(Vec<u8>, Vec<u8>)> = turns
        .iter()
        .map(|(id, user)| (user.as_bytes().to_vec(), turn(id, user).into_bytes()))
        .collect();
    support::produce(broker.client_config(), "kp-turns", &records).await;
    let written = support::read_until(broker.client_config(), "kp-turns", false, TIMEOUT, |r| {
        r.len() >= records.len()
    });
    let mut ends = vec![0i64; 2];
    for r in &written {
        ends[r.partition as usize] = ends[r.partition as usize].max(r.offset + 1);
    }
    let mut push = Worker::start_command(&["push"], &config);
    let dead = support::read_until(broker.client_config(), "kp-push-dlq", false, TIMEOUT, |r| {
        r.len() >= 2
    });
    wait_for("every turn delivered and committed", TIMEOUT, || {
        let committed =
            support::committed(broker.client_config(), "sessionizer-push", "kp-turns", 2);
        (delivered(&agent).len() == turns.len() - 2 && committed == ends).then_some(())
    });
    assert!(delivered(&agent).values().all(|n| *n == 1));
    assert_in_order_per_key(&agent.calls(), &turns, &["bad"]);
    let ids: BTreeSet<String> = dead
        .iter()
        .map(|r| r.json()["turn_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, BTreeSet::from(["bad-t0".into(), "bad-t1".into()]));
    for r in &dead {
        assert_eq!(
            r.header("sessionizer.dlq.reason"),
            Some("delivery_rejected")
        );
        assert_eq!(r.header("sessionizer.dlq.http_status"), Some("400"));
        assert_eq!(r.header("sessionizer.dlq.source.topic"), Some("kp-turns"));
        assert_eq!(r.key, b"bad");
    }
    let stats = support::stats_json(&config, &["--push"]);
    assert_eq!(stats["by_reason"]["delivery_rejected"], 2, "{stats}");
    // A replay puts the turns back on the output: delivered (refused) again.
    assert_eq!(support::run_replay(&config, &["--push"]), (2, 0));
    wait_for("the replayed turns tried again", TIMEOUT, || {
        let bad = agent.calls().iter().filter(|c| user_of(c) == "bad").count();
        (bad == 4).then_some(())
    });
    assert!(push.terminate().success());

    // A restart resumes at the commits: one new turn is all it delivers.
    let calls = agent.calls().len();
    let _again = Worker::start_command(&["push"], &config);
    let late = (b"a".to_vec(), turn("a-late", "a").into_bytes());
    support::produce(broker.client_config(), "kp-turns", &[late]).await;
    wait_for("the new turn delivered", TIMEOUT, || {
        delivered(&agent).contains_key("a-late").then_some(())
    });
    assert_eq!(
        agent.calls().len(),
        calls + 1,
        "nothing committed came again"
    );
}

/// Whether a commit leaves the record out of the next run: before the
/// committed offset, or listed in its metadata as settled.
fn settled_by(commit: &(i64, String), offset: i64) -> bool {
    let (at, metadata) = commit;
    offset < *at
        || sessionizer::kafka::offsets::decode(*at, metadata)
            .1
            .iter()
            .any(|(a, b)| (*a..=*b).contains(&offset))
}

/// kill -9 of push on Kafka while the first turn of one key is in flight
/// and every other key's turns were delivered, then a restart: every turn
/// delivered at least once, duplicates under the same Idempotency-Key, and
/// only of turns the last commit did not settle. On a broker that keeps
/// commit metadata (`exact`) that is the one turn in flight, though its
/// partition's delivered turns lie past it.
async fn kill_9_on_kafka(
    client: rdkafka::ClientConfig,
    bootstrap: &str,
    properties: &str,
    exact: bool,
) {
    let hold = Arc::new(AtomicBool::new(true));
    let holding = hold.clone();
    let agent = Agent::start(move |call, _| {
        if holding.load(Ordering::SeqCst) && user_of(call) == "u0" {
            Reply::Hold
        } else {
            Reply::Status(200)
        }
    });
    let config = format!(
        "source = \"kafka\"\n[kafka]\nbrokers = \"{bootstrap}\"\ngroup_id = \"k9\"\ninput_topics = [\"k9-chat\"]\noutput_topic = \"k9-turns\"\ndlq_topic = \"k9-dlq\"\n[kafka.properties]\n{properties}\n[push]\nurl = \"http://127.0.0.1:{}/turns\"\ndlq = \"k9-push-dlq\"\nconcurrency = 4\nshutdown_grace = \"1s\"\n",
        agent.port
    );
    let users: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    let turns = turns_of(&users, 5);
    let records: Vec<(Vec<u8>, Vec<u8>)> = turns
        .iter()
        .map(|(id, user)| (user.as_bytes().to_vec(), turn(id, user).into_bytes()))
        .collect();
    support::produce(client.clone(), "k9-turns", &records).await;
    let written = support::read_until(client.clone(), "k9-turns", false, TIMEOUT, |r| {
        r.len() >= records.len()
    });
    let offset_of: BTreeMap<String, (i32, i64)> = written
        .iter()
        .map(|r| {
            let id = r.json()["turn_id"].as_str().unwrap().to_owned();
            (id, (r.partition, r.offset))
        })
        .collect();
    let mut push = Worker::start_command(&["push"], &config);
    wait_for("every other key delivered", TIMEOUT, || {
        (delivered(&agent).len() == turns.len() - 5).then_some(())
    });
    let answered_ids: Vec<String> = agent
        .calls()
        .iter()
        .filter(|c| c.answered.is_some())
        .map(|c| c.turn()["turn_id"].as_str().unwrap().to_owned())
        .collect();
    if exact {
        wait_for("the answered turns committed", TIMEOUT, || {
            let commits = support::commits(client.clone(), "sessionizer-push", "k9-turns", 2);
            answered_ids
                .iter()
                .all(|id| {
                    let (p, o) = offset_of[id];
                    settled_by(&commits[p as usize], o)
                })
                .then_some(())
        });
    }
    push.kill9();
    let in_flight = unanswered(&agent);
    assert_eq!(in_flight, BTreeSet::from(["u0-t0".to_owned()]));
    let at_kill = support::commits(client.clone(), "sessionizer-push", "k9-turns", 2);
    hold.store(false, Ordering::SeqCst);
    agent.release();
    let _push = Worker::start_command(&["push"], &config);
    wait_for("every turn delivered", TIMEOUT, || {
        (delivered(&agent).len() == turns.len()).then_some(())
    });
    let twice = delivered_twice(&agent);
    for id in &twice {
        let (p, o) = offset_of[id];
        assert!(
            !settled_by(&at_kill[p as usize], o),
            "{id} came twice though the last commit settled it"
        );
    }
    if exact {
        assert!(
            twice.is_subset(&in_flight),
            "only turns in flight at the kill come twice: {twice:?} vs {in_flight:?}"
        );
    }
    for call in agent.calls() {
        assert_eq!(
            call.header("idempotency-key"),
            call.turn()["turn_id"].as_str()
        );
    }
}

/// On tansu, which does not keep commit metadata: duplicates only past the
/// first unsettled offset of each partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_kill_9_mid_stream_redelivers_only_unsettled_turns() {
    let broker = support::Broker::start();
    broker.create_topic("k9-turns", 2).await;
    broker.create_topic("k9-push-dlq", 1).await;
    kill_9_on_kafka(
        broker.client_config(),
        &broker.bootstrap(),
        &format!(
            "{}\"session.timeout.ms\" = \"6000\"\n",
            broker.worker_properties()
        ),
        false,
    )
    .await;
}

/// On librdkafka's mock cluster, which keeps commit metadata: the commit
/// lists the turns settled past it, so only the turns in flight come twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_kill_9_with_commit_metadata_redelivers_only_the_turns_in_flight() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("k9-turns", 2, 1).unwrap();
    cluster.create_topic("k9-push-dlq", 1, 1).unwrap();
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", cluster.bootstrap_servers());
    let properties = "\"session.timeout.ms\" = \"6000\"\n";
    kill_9_on_kafka(client, &cluster.bootstrap_servers(), properties, true).await;
}
