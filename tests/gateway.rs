//! `sessionizer gateway` against a real `redis-server` and the tansu Kafka
//! broker, called over a real socket: authentication, validation before any
//! write, the write acknowledged before 202, and 503 when the broker is down.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use redis::Commands;
use sessionizer::config::Config;
use sessionizer::redis::keys::ShardKeys;
use support::redis_server::RedisServer;
use support::{free_port, http_post, wait_for, Worker};

const TIMEOUT: Duration = Duration::from_secs(60);
/// The bearer token the tests' gateway accepts (configured by its SHA-256).
const TOKEN: &str = "let-me-in";

fn token_hash() -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(TOKEN.as_bytes());
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// The test gateway's section on `port`; `extra` goes before
/// `[gateway.auth]` (keys of `[gateway]`, or tables like `[gateway.agent]`).
fn gateway_section(port: u16, extra: &str) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:{port}\"\nmax_batch = 3\nmax_body_bytes = 4096\n{extra}[gateway.auth]\nbearer_sha256 = [\"{}\"]\n",
        token_hash()
    )
}

fn post(
    port: u16,
    token: Option<&str>,
    body: &str,
) -> (u16, support::HttpResponse, serde_json::Value) {
    post_to(port, "/v1/events", token, body)
}

fn post_to(
    port: u16,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, support::HttpResponse, serde_json::Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("authorization", auth.as_str()));
    }
    let response = http_post(port, path, &headers, body.as_bytes()).expect("the gateway answers");
    let json = serde_json::from_str(&response.body).unwrap_or(serde_json::Value::Null);
    (response.status, response, json)
}

fn wait_ready(port: u16) {
    wait_for("the gateway to be ready", TIMEOUT, || {
        support::http_get(port, "/readyz").filter(|(status, _)| *status == 200)
    });
}

fn event(id: &str, user: &str, with_time: bool) -> String {
    let t = sessionizer::wall_clock::now_ms();
    if with_time {
        format!(r#"{{"message_id":"{id}","user_id":"{user}","text":"hi {id}","event_time":{t}}}"#)
    } else {
        format!(r#"{{"message_id":"{id}","user_id":"{user}","text":"hi {id}"}}"#)
    }
}

/// Entries of every shard stream, as parsed payloads.
fn written(conn: &mut redis::Connection, shards: &[ShardKeys]) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    for s in shards {
        let reply: redis::streams::StreamRangeReply = conn.xrange_all(&s.stream).unwrap();
        for id in reply.ids {
            let payload: Vec<u8> = id.get("payload").unwrap();
            all.push(serde_json::from_slice(&payload).unwrap());
        }
    }
    all
}

/// A Redis worker-and-gateway configuration: streams named after `name`,
/// the `[window]` lines given, the test's gateway on `port` with `extra`
/// (see [`gateway_section`]).
fn redis_config(
    server: &RedisServer,
    name: &str,
    window: &str,
    shards: u32,
    port: u16,
    extra: &str,
) -> String {
    format!(
        "source = \"redis\"\n[window]\n{window}\n[redis]\nurl = \"{}\"\ninput_stream = \"{name}-chat\"\noutput_stream = \"{name}-turns\"\ndlq_stream = \"{name}-dlq\"\nshards = {shards}\nlease_ttl = \"1500ms\"\nblock = \"100ms\"\n{}",
        server.url(),
        gateway_section(port, extra)
    )
}

#[test]
fn redis_ingest_authenticates_validates_then_writes_and_the_worker_makes_the_turn() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let port = free_port();
    let config = redis_config(&server, "gw", "idle_timeout = \"200ms\"", 2, port, "");
    let shards = ShardKeys::all(
        Config::from_toml(&config, Vec::new())
            .unwrap()
            .redis
            .as_ref()
            .unwrap(),
    );
    let _gateway = Worker::start_command(&["gateway"], &config);
    wait_ready(port);

    let one = event("m1", "alice", true);
    let (status, response, _) = post(port, None, &one);
    assert_eq!(status, 401);
    assert_eq!(response.header("www-authenticate"), Some("Bearer"));
    assert_eq!(post(port, Some("guess"), &one).0, 401);
    assert!(
        written(&mut conn, &shards).is_empty(),
        "auth failures reach no broker"
    );

    // One invalid event: 400 naming it, and nothing of the request written.
    let bad = format!("[{one}, {{\"message_id\":\"m9\",\"text\":\"no user\"}}]");
    let (status, _, body) = post(port, Some(TOKEN), &bad);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["index"], 1);
    assert_eq!(body["reason"], "invalid");
    assert!(
        body["error"].as_str().unwrap().contains("user_id"),
        "{body}"
    );
    assert_eq!(post(port, Some(TOKEN), "not json").0, 400);
    let four = format!("[{one},{one},{one},{one}]");
    assert_eq!(post(port, Some(TOKEN), &four).0, 413, "over max_batch");
    let huge = event("m8", "alice", true).replace("hi m8", &"x".repeat(5000));
    assert_eq!(post(port, Some(TOKEN), &huge).0, 413, "over max_body_bytes");
    assert!(written(&mut conn, &shards).is_empty());

    // A burst of three, one without event_time: accepted once written.
    let burst = format!(
        "[{}, {}, {}]",
        event("m1", "alice", true),
        event("m2", "alice", false),
        event("m3", "alice", true)
    );
    let (status, _, body) = post(port, Some(TOKEN), &burst);
    assert_eq!(
        (status, &body["status"], &body["count"]),
        (202, &"accepted".into(), &3.into())
    );
    let events = written(&mut conn, &shards);
    assert_eq!(events.len(), 3, "written before the 202");
    assert!(
        events.iter().all(|e| e["event_time"].is_i64()),
        "the missing time stamped"
    );

    let worker = format!("{config}\n");
    let _worker = Worker::start(&worker);
    let turn = wait_for("the turn", TIMEOUT, || {
        let reply: redis::streams::StreamRangeReply = conn.xrange_all("gw-turns").ok()?;
        let id = reply.ids.first()?;
        let turn: Vec<u8> = id.get("turn")?;
        Some(serde_json::from_slice::<serde_json::Value>(&turn).unwrap())
    });
    let ids: BTreeSet<String> = support::message_ids(&turn).into_iter().collect();
    assert_eq!(ids, BTreeSet::from(["m1".into(), "m2".into(), "m3".into()]));

    // Redis gone: 503 with Retry-After, not 202; not ready.
    let mut server = server;
    server.kill();
    let (status, response, body) = post(port, Some(TOKEN), &event("m4", "bob", true));
    assert_eq!(status, 503, "{body}");
    assert_eq!(response.header("retry-after"), Some("1"));
    wait_for("/readyz to say not ready", TIMEOUT, || {
        support::http_get(port, "/readyz").filter(|(status, _)| *status == 503)
    });
}

#[test]
fn a_gateway_without_authentication_refuses_to_start() {
    let config = "source = \"redis\"\n[redis]\nurl = \"redis://127.0.0.1:1\"\ninput_stream = \"c\"\noutput_stream = \"t\"\ndlq_stream = \"d\"\n[gateway]\n[gateway.auth]\n";
    let stderr = support::run_cli_failing(&["gateway"], config, &[]);
    assert!(
        stderr.contains("gateway.auth") && stderr.contains("none = true"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_ingest_writes_keyed_by_user_before_answering() {
    let broker = support::Broker::start();
    let input = "gw-kafka-chat";
    broker.create_topic(input, 2).await;
    broker.create_topic("gw-kafka-turns", 2).await;
    broker.create_topic("gw-kafka-dlq", 1).await;
    let port = free_port();
    let config = format!(
        "source = \"kafka\"\n[window]\nidle_timeout = \"200ms\"\n[kafka]\nbrokers = \"{}\"\ngroup_id = \"gw\"\ncommit_interval = \"200ms\"\ninput_topics = [\"{input}\"]\noutput_topic = \"gw-kafka-turns\"\ndlq_topic = \"gw-kafka-dlq\"\n[kafka.properties]\n{}\n{}",
        broker.bootstrap(),
        broker.worker_properties(),
        gateway_section(port, "")
    );
    let mut gateway = Worker::start_command(&["gateway"], &config);
    wait_ready(port);
    let body = format!(
        "[{}, {}]",
        event("k1", "carol", true),
        event("k2", "dave", false)
    );
    let (status, _, answer) = post(port, Some(TOKEN), &body);
    assert_eq!(status, 202, "{answer}");
    let records = support::read_until(broker.client_config(), input, false, TIMEOUT, |r| {
        r.len() >= 2
    });
    let keys: BTreeSet<String> = records
        .iter()
        .map(|r| String::from_utf8(r.key.clone()).unwrap())
        .collect();
    assert_eq!(keys, BTreeSet::from(["carol".into(), "dave".into()]));
    assert!(records.iter().all(|r| r.json()["event_time"].is_i64()));

    // The turn reader on Kafka: a held request gets its turn.
    let _worker = Worker::start(&config);
    let (status, body) = post_wait(port, "/v1/events?wait=30s", &event("k3", "erin", true));
    assert_eq!((status, &body["status"]), (200, &"turn".into()), "{body}");
    assert_eq!(body["turn"]["messages"][0]["message_id"], "k3");

    // The broker gone: 503 with Retry-After once the write times out
    // (10 s), not 202; SIGTERM still exits 0.
    let mut broker = broker;
    broker.kill();
    let (status, response, body) = post(port, Some(TOKEN), &event("k4", "frank", true));
    assert_eq!(status, 503, "{body}");
    assert_eq!(response.header("retry-after"), Some("1"));
    assert!(gateway.terminate().success());
}

/// `?wait=`: three requests of one burst held at once; when the worker
/// emits the turn, the one holding its last message gets the turn and the
/// two others "superseded" with its id. A request whose turn comes after
/// its wait gets 202 pending (the turn still reaches the output); SIGTERM
/// answers a held request "pending" and the gateway exits 0.
#[test]
fn held_requests_get_the_turn_or_superseded_or_pending() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let port = free_port();
    let window = "gap = \"1s\"\nidle_timeout = \"100ms\"";
    let config = redis_config(&server, "hold", window, 1, port, "");
    let mut gateway = Worker::start_command(&["gateway"], &config);
    wait_ready(port);
    let _worker = Worker::start(&config);
    let t = sessionizer::wall_clock::now_ms();
    let held: Vec<_> = (0..3)
        .map(|i| {
            let body = format!(
                r#"{{"message_id":"m{i}","user_id":"alice","text":"part {i}","event_time":{}}}"#,
                t + 100 * i
            );
            std::thread::spawn(move || post_wait(port, "/v1/events?wait=30s", &body))
        })
        .collect();
    let answers: Vec<(u16, serde_json::Value)> =
        held.into_iter().map(|h| h.join().unwrap()).collect();
    let turn = &answers[2].1;
    assert_eq!(
        (answers[2].0, &turn["status"]),
        (200, &"turn".into()),
        "{turn}"
    );
    let ids: BTreeSet<String> = support::message_ids(&turn["turn"]).into_iter().collect();
    assert_eq!(ids, BTreeSet::from(["m0".into(), "m1".into(), "m2".into()]));
    for (status, body) in &answers[..2] {
        assert_eq!(
            (*status, &body["status"]),
            (200, &"superseded".into()),
            "{body}"
        );
        assert_eq!(body["turn_id"], turn["turn"]["turn_id"]);
    }

    // The turn closes a second after its event: a 100 ms wait ends first.
    let late = format!(
        r#"{{"message_id":"b1","user_id":"bob","text":"hello","event_time":{}}}"#,
        sessionizer::wall_clock::now_ms()
    );
    let (status, body) = post_wait(port, "/v1/events?wait=100ms", &late);
    assert_eq!(
        (status, &body["status"]),
        (202, &"pending".into()),
        "{body}"
    );
    wait_for("bob's turn on the output anyway", TIMEOUT, || {
        let reply: redis::streams::StreamRangeReply = conn.xrange_all("hold-turns").ok()?;
        (reply.ids.len() == 2).then_some(())
    });

    // SIGTERM while a request is held: answered pending, exit 0.
    let body = format!(
        r#"{{"message_id":"c1","user_id":"carol","text":"hi","event_time":{}}}"#,
        sessionizer::wall_clock::now_ms()
    );
    let waiting = std::thread::spawn(move || post_wait(port, "/v1/events?wait=30s", &body));
    wait_for("the request held", TIMEOUT, || {
        let body = support::http_get(port, "/metrics")?.1;
        (support::metric(&body, sessionizer::metrics::GATEWAY_HELD, &[]) == 1.0).then_some(())
    });
    assert!(gateway.terminate().success());
    let (status, body) = waiting.join().unwrap();
    assert_eq!(
        (status, &body["status"]),
        (202, &"pending".into()),
        "{body}"
    );
}

fn post_wait(port: u16, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, _, json) = post_to(port, path, Some(TOKEN), body);
    (status, json)
}

/// JWT access tokens (HS256 here): expiry, issuer and audience checked, the
/// `sub` claim bound to the events' `user_id`; refused tokens reach no broker.
#[test]
fn jwt_tokens_are_checked_and_bound_to_their_user() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let server = RedisServer::start();
    let mut conn = server.conn();
    let port = free_port();
    let secret = "a-test-secret-of-at-least-thirty-two-bytes";
    let config = format!(
        "source = \"redis\"\n[redis]\nurl = \"{}\"\ninput_stream = \"jwt-chat\"\noutput_stream = \"jwt-turns\"\ndlq_stream = \"jwt-dlq\"\n[gateway]\nlisten = \"127.0.0.1:{port}\"\n[gateway.auth]\njwt_hs256_secret_env = \"GW_TEST_SECRET\"\njwt_issuer = \"https://issuer.test\"\njwt_audience = \"sessionizer\"\njwt_user_claim = \"sub\"\n",
        server.url()
    );
    let shards = ShardKeys::all(
        Config::from_toml(&config, Vec::new())
            .unwrap()
            .redis
            .as_ref()
            .unwrap(),
    );
    let _gateway =
        Worker::start_command_with_env(&["gateway"], &config, &[("GW_TEST_SECRET", secret)]);
    wait_ready(port);
    let now = sessionizer::wall_clock::now_ms() / 1000;
    let token = |sub: &str, aud: &str, exp: i64, key: &str| {
        let claims =
            serde_json::json!({"sub": sub, "aud": aud, "iss": "https://issuer.test", "exp": exp});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let alice = event("j1", "alice", true);
    let expired = token("alice", "sessionizer", now - 3600, secret);
    assert_eq!(post(port, Some(&expired), &alice).0, 401, "expired");
    let other_audience = token("alice", "someone-else", now + 600, secret);
    assert_eq!(
        post(port, Some(&other_audience), &alice).0,
        401,
        "wrong audience"
    );
    let forged = token(
        "alice",
        "sessionizer",
        now + 600,
        "another-secret-of-at-least-thirty-two-b",
    );
    assert_eq!(post(port, Some(&forged), &alice).0, 401, "wrong key");
    let good = token("alice", "sessionizer", now + 600, secret);
    let (status, _, body) = post(port, Some(&good), &event("j2", "bob", true));
    assert_eq!(
        (status, &body["status"]),
        (403, &"forbidden".into()),
        "{body}"
    );
    assert!(
        written(&mut conn, &shards).is_empty(),
        "refused tokens reach no broker"
    );
    let (status, _, body) = post(port, Some(&good), &alice);
    assert_eq!(status, 202, "{body}");
    assert_eq!(written(&mut conn, &shards).len(), 1);
}

/// `[gateway.agent]`: the request holding the turn's last message gets the
/// agent's own status and body; the agent sees the turn, its id as the
/// `Idempotency-Key` and the configured headers. An agent that does not
/// answer in time: 504 with the turn id.
#[test]
fn the_agent_answers_the_request_holding_the_turn() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use support::agent::{Agent, Reply};
    let server = RedisServer::start();
    let hang = std::sync::Arc::new(AtomicBool::new(false));
    let hanging = hang.clone();
    let agent = Agent::start(move |_, _| {
        if hanging.load(Ordering::SeqCst) {
            Reply::Hold
        } else {
            Reply::Status(201)
        }
    });
    let port = free_port();
    let agent_section = format!(
        "[gateway.agent]\nurl = \"http://127.0.0.1:{}/agent\"\ntimeout = \"500ms\"\n[gateway.agent.headers]\nx-agent-key = \"k1\"\n",
        agent.port
    );
    let window = "gap = \"300ms\"\nidle_timeout = \"100ms\"";
    let config = redis_config(&server, "agent", window, 1, port, &agent_section);
    let _gateway = Worker::start_command(&["gateway"], &config);
    wait_ready(port);
    let _worker = Worker::start(&config);
    let (_, response, _) = post_to(
        port,
        "/v1/events?wait=30s",
        Some(TOKEN),
        &event("a1", "alice", true),
    );
    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(response.body, r#"{"status":201}"#, "the agent's own body");
    let call = agent.calls()[0].clone();
    let turn = call.turn();
    assert_eq!(turn["messages"][0]["message_id"], "a1");
    assert_eq!(call.header("idempotency-key"), turn["turn_id"].as_str());
    assert_eq!(call.header("x-agent-key"), Some("k1"));

    hang.store(true, Ordering::SeqCst);
    let (status, body) = post_wait(port, "/v1/events?wait=30s", &event("a2", "bob", true));
    assert_eq!(
        (status, &body["status"]),
        (504, &"agent_timeout".into()),
        "{body}"
    );
    assert_eq!(body["turn_id"], agent.calls()[1].turn()["turn_id"]);
}

/// Two gateway replicas behind one address, as behind a load balancer: one
/// user's burst spread over both, each replica answers the requests it
/// holds (it reads every turn). A replica at its `max_held` answers 503.
#[test]
fn two_replicas_each_answer_the_requests_they_hold() {
    let server = RedisServer::start();
    let (a, b) = (free_port(), free_port());
    // Room for the max_held check between the burst's messages.
    let window = "gap = \"3s\"\nidle_timeout = \"100ms\"";
    let config_a = redis_config(&server, "two", window, 2, a, "");
    let config_b = redis_config(&server, "two", window, 2, b, "max_held = 1\n");
    let _gateway_a = Worker::start_command(&["gateway"], &config_a);
    let _gateway_b = Worker::start_command(&["gateway"], &config_b);
    wait_ready(a);
    wait_ready(b);
    let _worker = Worker::start(&config_a);
    let t = sessionizer::wall_clock::now_ms();
    let send = |port: u16, i: i64| {
        let body = format!(
            r#"{{"message_id":"r{i}","user_id":"alice","text":"part {i}","event_time":{}}}"#,
            t + 100 * i
        );
        std::thread::spawn(move || post_wait(port, "/v1/events?wait=30s", &body))
    };
    let first = send(a, 0);
    let second = send(b, 1);
    wait_for("b holding its request", TIMEOUT, || {
        let body = support::http_get(b, "/metrics")?.1;
        (support::metric(&body, sessionizer::metrics::GATEWAY_HELD, &[]) == 1.0).then_some(())
    });
    let (status, body) = post_wait(b, "/v1/events?wait=30s", &event("x1", "zoe", true));
    assert_eq!(
        (status, &body["status"]),
        (503, &"unavailable".into()),
        "{body}"
    );
    assert!(
        body["error"].as_str().unwrap().contains("max_held"),
        "{body}"
    );
    let third = send(a, 2);
    let answers: Vec<(u16, serde_json::Value)> = [first, second, third]
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let turn = &answers[2].1;
    assert_eq!(
        (answers[2].0, &turn["status"]),
        (200, &"turn".into()),
        "{turn}"
    );
    let ids: BTreeSet<String> = support::message_ids(&turn["turn"]).into_iter().collect();
    assert_eq!(ids, BTreeSet::from(["r0".into(), "r1".into(), "r2".into()]));
    for (status, body) in &answers[..2] {
        assert_eq!(
            (*status, &body["status"]),
            (200, &"superseded".into()),
            "{body}"
        );
        assert_eq!(body["turn_id"], turn["turn"]["turn_id"]);
    }
    let body = support::http_get(a, "/metrics").unwrap().1;
    assert_eq!(
        support::metric(
            &body,
            &format!("{}_count", sessionizer::metrics::GATEWAY_WAIT),
            &[("outcome", "turn")]
        ),
        1.0,
        "the wait histogram counts the turn"
    );
}

/// `tls_cert`/`tls_key`: the gateway speaks HTTPS only; a client trusting
/// the certificate posts, a plain HTTP request on the port gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_https_with_the_configured_certificate() {
    let server = RedisServer::start();
    let port = free_port();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gateway");
    let tls =
        format!("tls_cert = \"{fixtures}/tls-cert.pem\"\ntls_key = \"{fixtures}/tls-key.pem\"\n");
    let config = redis_config(&server, "tls", "", 1, port, &tls);
    let mut gateway = Worker::start_command(&["gateway"], &config);
    let cert = std::fs::read(format!("{fixtures}/tls-cert.pem")).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&cert).unwrap())
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let ready = client.get(format!("{url}/readyz")).send().await;
        if ready.as_ref().is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never got ready: {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let post = |path: &str, body: String| {
        client
            .post(format!("{url}{path}"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let response = post("/v1/events", event("s1", "alice", true))
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let plain = tokio::task::spawn_blocking(move || support::http_get(port, "/readyz"))
        .await
        .unwrap();
    assert!(
        plain.as_ref().is_none_or(|(status, _)| *status != 200),
        "plain HTTP is not served: {plain:?}"
    );

    // SIGTERM with a request held (no worker: no turn comes): the HTTPS
    // server answers it pending too, and exits 0.
    let held = tokio::spawn(post("/v1/events?wait=30s", event("s2", "bob", true)));
    loop {
        let metrics = client.get(format!("{url}/metrics")).send().await.unwrap();
        let body = metrics.text().await.unwrap();
        if support::metric(&body, sessionizer::metrics::GATEWAY_HELD, &[]) == 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request was never held"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = tokio::task::spawn_blocking(move || gateway.terminate())
        .await
        .unwrap();
    assert!(status.success());
    let answer = held.await.unwrap().unwrap();
    assert_eq!(answer.status(), 202);
    let body: serde_json::Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
    assert_eq!(body["status"], "pending");
}
