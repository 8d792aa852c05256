//! Shared harness of the broker tests: a real Kafka-protocol broker (`tansu`)
//! on a free loopback port with its own storage, the real `sessionizer`
//! binary as a child process, and helpers that wait on conditions with a
//! deadline (never on fixed sleeps).

#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub mod agent;
pub mod redis_server;

/// A free TCP port on loopback (bound, then released for the child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An environment variable parsed, or `default` when unset or unparsable
/// (the benchmarks' knobs).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    wait_for_every(what, timeout, Duration::from_millis(50), check)
}

/// [`wait_for`], asking `check` every `interval` (a benchmark's clock stops
/// at the first answer, so it asks often).
pub fn wait_for_every<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(interval);
    }
}

/// A program: `$<env_var>` when set, else the first `name` on PATH or
/// among `also`.
pub fn find_binary(env_var: &str, name: &str, also: &[PathBuf]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Some(path.into());
    }
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain(also.iter().cloned())
        .find(|c| c.is_file())
}

/// The tansu binary: `$TANSU_BIN`, else `tansu` on PATH, else `~/.cargo/bin/tansu`.
fn tansu_binary() -> PathBuf {
    let cargo_bin: Vec<PathBuf> = std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".cargo/bin/tansu"))
        .into_iter()
        .collect();
    find_binary("TANSU_BIN", "tansu", &cargo_bin).unwrap_or_else(|| {
        panic!("the Kafka-protocol broker `tansu` is missing: run scripts/install-test-deps (or set TANSU_BIN)")
    })
}

/// Kills a child process and reaps it (a test's cleanup: errors ignored).
pub fn stop_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A tansu broker on a free loopback port; killed when dropped.
pub struct Broker {
    pub port: u16,
    storage: Option<PathBuf>,
    child: Option<Child>,
    /// With [`Broker::start_tls`]: the TLS front clients connect to.
    tls: Option<TlsFront>,
    /// With [`Broker::start_sasl`]: the SCRAM-SHA-512 user and password
    /// every client must authenticate with.
    sasl: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

/// `socat` terminating TLS (a certificate for 127.0.0.1 from a CA made by
/// `openssl`) in front of the broker's plain port. tansu 0.6 cannot serve
/// TLS itself: its `--cert` and `--key` flags are declared in one exclusive
/// argument group, and it needs both.
struct TlsFront {
    port: u16,
    ca: PathBuf,
    child: Child,
}

impl Broker {
    /// A broker keeping its data in memory.
    pub fn start() -> Broker {
        Self::start_with(None)
    }

    /// A broker keeping its data in an SQLite file, so it survives a restart.
    pub fn start_persistent() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tansu.db");
        let mut broker = Self::start_with(Some(db));
        broker._dir = dir;
        broker
    }

    /// A broker clients reach over TLS only: it advertises the TLS front's
    /// port, so every connection (bootstrap and partition leader) is TLS.
    pub fn start_tls() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        redis_server::make_certificates(dir.path());
        let port = free_port();
        let tls_port = free_port();
        let child = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                dir.path().join("server.crt").display(),
                dir.path().join("server.key").display()
            ))
            .arg(format!("TCP:127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat is missing: run scripts/install-test-deps");
        let mut broker = Broker {
            port,
            storage: None,
            child: None,
            tls: Some(TlsFront {
                port: tls_port,
                ca: dir.path().join("ca.crt"),
                child,
            }),
            sasl: None,
            _dir: dir,
        };
        broker.spawn();
        broker
    }

    /// A broker that requires SASL/SCRAM-SHA-512 as `user`: the user is
    /// made through an open broker on the same storage, which then restarts
    /// with `--authentication`.
    pub fn start_sasl(user: &str, password: &str) -> Broker {
        let mut broker = Self::start_persistent();
        let made = Command::new(tansu_binary())
            .args(["user", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", broker.port))
            .args([user, password])
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "tansu user create: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        broker.kill();
        broker.sasl = Some((user.to_owned(), password.to_owned()));
        broker.spawn();
        broker
    }

    /// The `[kafka.properties]` lines a worker needs to reach this broker.
    pub fn worker_properties(&self) -> String {
        self.security()
            .iter()
            .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
            .collect()
    }

    /// The client properties of the broker's TLS or SASL.
    fn security(&self) -> Vec<(&'static str, String)> {
        let mut properties = Vec::new();
        if let Some(tls) = &self.tls {
            properties.push(("security.protocol", "ssl".to_owned()));
            properties.push(("ssl.ca.location", tls.ca.display().to_string()));
        }
        if let Some((user, password)) = &self.sasl {
            properties.push(("security.protocol", "sasl_plaintext".to_owned()));
            properties.push(("sasl.mechanism", "SCRAM-SHA-512".to_owned()));
            properties.push(("sasl.username", user.clone()));
            properties.push(("sasl.password", password.clone()));
        }
        properties
    }

    fn start_with(storage: Option<PathBuf>) -> Broker {
        let mut broker = Broker {
            port: free_port(),
            storage,
            child: None,
            tls: None,
            sasl: None,
            _dir: tempfile::tempdir().unwrap(),
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = match &self.tls {
            Some(tls) => format!("tcp://127.0.0.1:{}", tls.port),
            None => url.clone(),
        };
        let mut cmd = Command::new(tansu_binary());
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
        ]);
        if self.sasl.is_some() {
            cmd.arg("--authentication");
        }
        if let Some(db) = &self.storage {
            // tansu resolves a sqlite path against its working directory
            // (even an absolute one), so run it in the database's folder.
            cmd.current_dir(db.parent().unwrap());
            let name = db.file_name().unwrap().to_str().unwrap();
            cmd.args(["--storage-engine", &format!("sqlite://{name}")]);
        }
        let log = std::fs::File::create(self._dir.path().join(format!("tansu-{}.log", self.port)))
            .unwrap();
        cmd.stdout(Stdio::null()).stderr(log);
        self.child = Some(cmd.spawn().expect("start tansu"));
        let client = self.client_config();
        wait_for(
            "the broker to answer metadata requests",
            Duration::from_secs(60),
            || {
                let consumer: BaseConsumer = client.create().ok()?;
                consumer
                    .fetch_metadata(None, Duration::from_secs(2))
                    .ok()
                    .filter(|m| !m.brokers().is_empty())
            },
        );
    }

    pub fn bootstrap(&self) -> String {
        let port = self.tls.as_ref().map_or(self.port, |t| t.port);
        format!("127.0.0.1:{port}")
    }

    /// Starts a killed broker again on the same port and storage.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
    }

    /// Sends the broker process a signal by name (`STOP` freezes it).
    pub fn signal(&self, name: &str) {
        signal(self.child.as_ref().expect("running").id(), name);
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap());
        for (key, value) in self.security() {
            c.set(key, value);
        }
        c
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        create_topic(self.client_config(), name, partitions).await;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if let Some(tls) = self.tls.as_mut() {
            stop_child(&mut tls.child);
        }
    }
}

pub async fn create_topic(config: ClientConfig, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = config.create().unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .unwrap();
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// Produces keyed records (acks all) and waits for every delivery.
///
/// One record per batch: tansu 0.6 answers a fetch from an offset inside a
/// record batch with the batches after it, skipping the rest of that one
/// (Kafka returns the whole batch and the client skips ahead). A worker
/// resuming at a committed offset mid-batch would never see those records,
/// so the tests keep every offset a batch start. Real Kafka needs nothing
/// like it (`docs/testing.md`).
pub async fn produce(config: ClientConfig, topic: &str, records: &[(Vec<u8>, Vec<u8>)]) {
    let mut config = config;
    let producer: FutureProducer = config
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .unwrap();
    let sends = records.iter().map(|(key, payload)| {
        let producer = producer.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(topic).key(key).payload(payload),
                    Timeout::Never,
                )
                .await
                .map_err(|(e, _)| e)
                .expect("produce");
        }
    });
    futures::future::join_all(sends).await;
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, Vec<u8>>,
}

impl Read {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.payload)))
    }

    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .get(key)
            .map(|v| std::str::from_utf8(v).unwrap())
    }
}

/// Reads a whole topic from the beginning until `done` holds for what was
/// read with every partition read to its end, or panics after `timeout`.
pub fn read_until(
    config: ClientConfig,
    topic: &str,
    read_committed: bool,
    timeout: Duration,
    done: impl Fn(&[Read]) -> bool,
) -> Vec<Read> {
    let mut config = config;
    let consumer: BaseConsumer = config
        .set("group.id", format!("reader-{}", free_port()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set(
            "isolation.level",
            if read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    assign_from_beginning(&consumer, topic, partitions);
    let deadline = Instant::now() + timeout;
    let mut records = Vec::new();
    // `done` may be costly (it can parse every record): ask it when the
    // reader has reached the end of every partition, not after every record.
    let mut at_end = std::collections::BTreeSet::new();
    loop {
        if at_end.len() == partitions as usize && done(&records) {
            return records;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} reading {topic}: {} records so far",
                records.len()
            );
        }
        let polled = consumer.poll(Duration::from_millis(100));
        if let Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) = polled {
            at_end.insert(p);
        }
        if let Some(Ok(m)) = polled {
            at_end.remove(&m.partition());
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            records.push(Read {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().unwrap_or_default().to_vec(),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
}

/// Assigns every partition of `topic` to `consumer`, from its first record.
pub fn assign_from_beginning(consumer: &BaseConsumer, topic: &str, partitions: i32) {
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
}

/// Prints the emit delays of turns, given as (emit time, turn JSON): emit
/// time − (last event time + `gap_ms`), split at `stopped_ms` (when the
/// producer stopped) into under load and after (the idle advance). Late
/// turns are left out.
pub fn print_emit_delays(
    turns: impl IntoIterator<Item = (i64, serde_json::Value)>,
    gap_ms: i64,
    stopped_ms: i64,
) {
    let (mut under_load, mut after) = (Vec::new(), Vec::new());
    for (emitted, turn) in turns {
        if turn["late"].as_bool() == Some(true) {
            continue;
        }
        let delay = emitted - (turn["end_time"].as_i64().unwrap() + gap_ms);
        if emitted <= stopped_ms {
            under_load.push(delay);
        } else {
            after.push(delay);
        }
    }
    print_percentiles("under load", &mut under_load);
    print_percentiles("after the producer stopped (idle advance)", &mut after);
}

/// Prints the percentiles of emit delays (ms).
pub fn print_percentiles(what: &str, delays: &mut [i64]) {
    if delays.is_empty() {
        println!("  {what}: no turns");
        return;
    }
    delays.sort_unstable();
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q).round() as usize];
    println!(
        "  {what}: {} turns, p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        delays.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        delays[delays.len() - 1]
    );
}

/// The group's committed offsets of a topic's partitions (no group join).
pub fn committed(config: ClientConfig, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    commits(config, group, topic, partitions)
        .into_iter()
        .map(|(offset, _)| offset)
        .collect()
}

/// The group's commits of a topic's partitions: offset (-1 for none) and
/// metadata.
pub fn commits(
    config: ClientConfig,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Vec<(i64, String)> {
    let mut config = config;
    let consumer: BaseConsumer = config.set("group.id", group).create().unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    (0..partitions)
        .map(|p| match committed.find_partition(topic, p) {
            Some(e) => match e.offset() {
                Offset::Offset(o) => (o, e.metadata().to_owned()),
                _ => (-1, String::new()),
            },
            None => (-1, String::new()),
        })
        .collect()
}

/// The `sessionizer` binary with `args` and `--config <a file holding
/// config>` (keep the file while it runs), the caller's `SESSIONIZER*`
/// variables removed so they cannot leak into a test, and the log filter
/// `$SESSIONIZER_TEST_LOG_FILTER` or `log`.
fn sessionizer(args: &[&str], config: &str, log: &str) -> (Command, tempfile::NamedTempFile) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, config.as_bytes()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sessionizer"));
    for (name, _) in std::env::vars() {
        if name.starts_with("SESSIONIZER") {
            cmd.env_remove(name);
        }
    }
    cmd.args(args).arg("--config").arg(file.path()).env(
        "SESSIONIZER_LOG",
        std::env::var("SESSIONIZER_TEST_LOG_FILTER").unwrap_or_else(|_| log.to_owned()),
    );
    (cmd, file)
}

/// The real `sessionizer` binary running a config, killed when dropped.
pub struct Worker {
    pub child: Child,
    _config: tempfile::NamedTempFile,
}

impl Worker {
    pub fn start(config: &str) -> Worker {
        Self::start_with_env(config, &[])
    }

    /// Started with extra environment variables (e.g. the fault hook).
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Worker {
        Self::spawn(&["run"], config, env)
    }

    /// Another long-running command than `run` (`dlq replay …`), stopped the
    /// same way.
    pub fn start_command(command: &[&str], config: &str) -> Worker {
        Self::spawn(command, config, &[])
    }

    /// [`Worker::start_command`] with extra environment variables.
    pub fn start_command_with_env(command: &[&str], config: &str, env: &[(&str, &str)]) -> Worker {
        Self::spawn(command, config, env)
    }

    /// [`Worker::start`] with its log (stderr) written to `log`.
    pub fn start_logging_to(config: &str, log: std::fs::File) -> Worker {
        Self::spawn_with_log(&["run"], config, &[], Some(log))
    }

    fn spawn(command: &[&str], config: &str, env: &[(&str, &str)]) -> Worker {
        Self::spawn_with_log(command, config, env, None)
    }

    fn spawn_with_log(
        command: &[&str],
        config: &str,
        env: &[(&str, &str)],
        log: Option<std::fs::File>,
    ) -> Worker {
        let (mut cmd, file) = sessionizer(command, config, "info,rdkafka=warn");
        // The worker's logs only with SESSIONIZER_TEST_LOGS=1: they would
        // bypass the test harness's output capture.
        let logs = match log {
            Some(file) => Stdio::from(file),
            None if std::env::var_os("SESSIONIZER_TEST_LOGS").is_some() => Stdio::inherit(),
            None => Stdio::null(),
        };
        let child = cmd
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logs)
            .spawn()
            .unwrap();
        Worker {
            child,
            _config: file,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`STOP`, `CONT`, …).
    pub fn signal(&self, name: &str) {
        signal(self.child.id(), name);
    }

    /// SIGKILL: no chance to commit or flush.
    pub fn kill9(&mut self) {
        stop_child(&mut self.child);
    }

    /// SIGTERM, then waits for the exit status (bounded).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        wait_for(
            "the worker to exit after SIGTERM",
            Duration::from_secs(30),
            || self.child.try_wait().unwrap(),
        )
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// The message ids of a turn (JSON).
pub fn message_ids(turn: &serde_json::Value) -> Vec<String> {
    turn["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Nothing lost, and duplicates only as re-emissions of the same turn: every
/// wanted message is in a turn, a `turn_id` seen twice carries the same
/// messages, and no message is in two different turns. Returns how many
/// turns were re-emitted.
pub fn assert_complete_without_partial_duplicates(
    want: &std::collections::BTreeSet<String>,
    turns: &[serde_json::Value],
) -> usize {
    let mut by_turn: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut duplicates = 0;
    for json in turns {
        let ids = message_ids(json);
        let turn_id = json["turn_id"].as_str().unwrap().to_owned();
        if let Some(previous) = by_turn.get(&turn_id) {
            assert_eq!(
                previous, &ids,
                "turn {turn_id} re-emitted with other messages"
            );
            duplicates += 1;
        } else {
            by_turn.insert(turn_id, ids);
        }
    }
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    for (turn_id, ids) in &by_turn {
        for id in ids {
            if let Some(other) = owner.insert(id, turn_id) {
                panic!(
                    "message {id} is in turns {other} {:?} and {turn_id} {:?}",
                    by_turn[other], ids
                );
            }
        }
    }
    let seen: std::collections::BTreeSet<String> = owner.keys().map(|k| k.to_string()).collect();
    assert_eq!(&seen, want, "every wanted message in exactly one turn");
    eprintln!("{} turns, {duplicates} re-emitted", by_turn.len());
    duplicates
}

/// What a worker must produce from one partition's (or shard's) records, in
/// order: each through the pipeline, then every session closed (the idle
/// advance closes them all once the partition is quiet). The turns as JSON,
/// the dead letters as (index of the record, reason).
pub fn reference_run<P: AsRef<[u8]>>(
    config: &sessionizer::config::Config,
    payloads: impl IntoIterator<Item = P>,
) -> (Vec<serde_json::Value>, Vec<(usize, String)>) {
    use sessionizer::pipeline::Outcome;
    let decoder = sessionizer::codec::Decoder::new(config.input_format(), config.decode_limits());
    let mut pipeline =
        sessionizer::pipeline::PartitionPipeline::new(decoder, config.window_config());
    let mut out = Vec::new();
    for (seq, payload) in payloads.into_iter().enumerate() {
        pipeline.process(
            payload.as_ref(),
            seq as u64,
            sessionizer::wall_clock::now_ms(),
            &mut out,
        );
    }
    pipeline.flush(&mut out);
    let (mut turns, mut dead) = (Vec::new(), Vec::new());
    for outcome in out {
        match outcome {
            Outcome::Turn(s) => {
                let mut buf = Vec::new();
                sessionizer::codec::encode_turn(
                    &s,
                    sessionizer::codec::OutputFormat::Json,
                    &mut buf,
                );
                turns.push(serde_json::from_slice(&buf).unwrap());
            }
            Outcome::DeadLetter { seq, reason, .. } => {
                dead.push((seq as usize, reason.as_str().to_owned()))
            }
            Outcome::Dropped { .. } | Outcome::Delivered { .. } => {}
        }
    }
    (turns, dead)
}

/// Bursty traffic with duplicates and every poison kind: (user id, payload).
pub fn workload(users: u32, count: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let spec = sessionizer::workload::WorkloadSpec {
        users,
        duplicate_fraction: 0.05,
        poison_fraction: 0.05,
        seed,
        ..Default::default()
    };
    sessionizer::workload::Workload::new(spec)
        .take(count)
        .map(|r| (format!("user-{}", r.user), r.payload))
        .collect()
}

/// `config` with `/metrics`, `/healthz` and `/readyz` served on a free
/// loopback port: (the config, the port).
pub fn with_metrics(config: &str) -> (String, u16) {
    let port = free_port();
    (
        format!("{config}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        port,
    )
}

/// `GET path` on a loopback port: the status code and body, or `None` while
/// nothing answers there.
/// An HTTP response as [`http_post`] reads it.
pub struct HttpResponse {
    pub status: u16,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 POST over a plain socket.
pub fn http_post(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<HttpResponse> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// The sum of a Prometheus text exposition's samples of `name` whose labels
/// include every `key="value"` in `labels`.
pub fn metric(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, l)) => (n, l),
                None => (series, ""),
            };
            (series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Runs `sessionizer <command> --config <config> <args>` to completion;
/// panics with its stderr when it fails. Returns (stdout, stderr).
pub fn run_cli(command: &[&str], config: &str, args: &[&str]) -> (String, String) {
    run_cli_logging(command, config, args, "warn,rdkafka=off")
}

/// [`run_cli`] with the log filter `filter` (`SESSIONIZER_LOG`).
pub fn run_cli_logging(
    command: &[&str],
    config: &str,
    args: &[&str],
    filter: &str,
) -> (String, String) {
    let (mut cmd, _file) = sessionizer(command, config, filter);
    let out = cmd.args(args).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "sessionizer {command:?} {args:?} failed: {stderr}"
    );
    if std::env::var_os("SESSIONIZER_TEST_LOG_FILTER").is_some() {
        eprintln!("sessionizer {command:?} {args:?}: {stderr}");
    }
    (stdout, stderr)
}

/// Sends a signal by name (`INT`, `TERM`, `STOP`, …) to a process.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// Runs `sessionizer <command> --config <config>` until it exits on its
/// own (killed after `timeout`, which fails the test): (stderr, success).
pub fn run_to_exit(command: &[&str], config: &str, timeout: Duration) -> (String, bool) {
    let (mut cmd, _file) = sessionizer(command, config, "warn,rdkafka=off");
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for("sessionizer to exit", timeout, || child.try_wait().unwrap());
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (stderr, status.success())
}

/// Runs `sessionizer <command> --config <config> <args>`, which must fail;
/// returns its stderr.
pub fn run_cli_failing(command: &[&str], config: &str, args: &[&str]) -> String {
    let (mut cmd, _file) = sessionizer(command, config, "warn,rdkafka=off");
    let out = cmd.args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "sessionizer {command:?} {args:?} should have failed; stderr: {stderr}"
    );
    stderr
}

/// The numbers in the line of `text` that starts with `prefix`.
pub fn numbers_after(text: &str, prefix: &str) -> Vec<u64> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in: {text}"));
    line.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect()
}

/// Runs `sessionizer produce` to completion: (records, poison, duplicates).
pub fn run_produce(config: &str, args: &[&str]) -> (u64, u64, u64) {
    let (_, stderr) = run_cli(&["produce"], config, args);
    let n = numbers_after(&stderr, "produce: done: ");
    (n[0], n[1], n[2])
}

/// `sessionizer dlq replay …`: (replayed, skipped after max replays).
pub fn run_replay(config: &str, args: &[&str]) -> (u64, u64) {
    let (_, stderr) = run_cli(&["dlq", "replay"], config, args);
    let n = numbers_after(&stderr, "replay: ");
    (n[0], n[1])
}

/// `sessionizer dlq inspect --json …`, parsed.
pub fn inspect_json(config: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (stdout, _) = run_cli(&["dlq", "inspect"], config, &all);
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The `message_id`s of `dlq inspect --json` entries' JSON payloads.
pub fn payload_message_ids(entries: &[serde_json::Value]) -> std::collections::BTreeSet<String> {
    entries
        .iter()
        .map(|e| {
            let payload: serde_json::Value =
                serde_json::from_str(e["payload"].as_str().unwrap()).unwrap();
            payload["message_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// `sessionizer dlq stats --json …`, parsed.
pub fn stats_json(config: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (stdout, _) = run_cli(&["dlq", "stats"], config, &all);
    serde_json::from_str(stdout.trim()).unwrap()
}

/// Scrapes `/metrics` until the worker counted `turns` turns; returns that
/// exposition.
pub fn scrape_when_turns(port: u16, turns: usize) -> String {
    wait_for("the turn counters", Duration::from_secs(90), || {
        let (_, text) = http_get(port, "/metrics")?;
        (metric(&text, sessionizer::metrics::TURNS, &[]) as usize == turns).then_some(text)
    })
}

/// The dead-letter counters of an exposition equal the reasons given (one
/// per dead letter).
pub fn assert_dead_letters_by_reason<'a>(exposition: &str, reasons: impl Iterator<Item = &'a str>) {
    let mut want: BTreeMap<&str, usize> = BTreeMap::new();
    for reason in reasons {
        *want.entry(reason).or_default() += 1;
    }
    for reason in ["decode", "invalid", "oversize"] {
        let got = metric(
            exposition,
            sessionizer::metrics::DEAD_LETTERS,
            &[("reason", reason)],
        ) as usize;
        assert_eq!(got, want.get(reason).copied().unwrap_or(0), "{reason}");
    }
}

/// Runs `sessionizer produce --real-time` for `seconds` from `users`
/// users (live traffic: event time = now); returns the records sent.
pub fn run_live_traffic(config: &str, seconds: u64, users: u32) -> u64 {
    run_produce(
        config,
        &[
            "--real-time",
            "--duration",
            &format!("{seconds}s"),
            "--users",
            &users.to_string(),
        ],
    )
    .0
}

/// `sessionizer dlq inspect --follow --json` running in the background; its
/// lines arrive through a channel. Killed when dropped.
pub struct FollowDlq {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    _config: tempfile::NamedTempFile,
}

impl FollowDlq {
    pub fn start(config: &str) -> FollowDlq {
        use std::io::BufRead;
        let (mut cmd, file) = sessionizer(
            &["dlq", "inspect", "--follow", "--json"],
            config,
            "warn,rdkafka=off",
        );
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        FollowDlq {
            child,
            lines,
            _config: file,
        }
    }

    /// The next dead letter it prints (panics after 90 s).
    pub fn next(&self) -> serde_json::Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(90))
            .expect("a line from dlq inspect --follow");
        serde_json::from_str(&line).unwrap()
    }
}

impl Drop for FollowDlq {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// Issue #11's hostile case, as produced: `ann` sends two messages at `t`
/// and `t + 600`, and an end of turn stamped at `t + 605` that overtakes the
/// second on the way. (user, JSON payload) in arrival order.
pub fn end_of_turn_overtaking_its_message(t: i64) -> Vec<(String, Vec<u8>)> {
    [
        format!(r#"{{"message_id":"a1","user_id":"ann","text":"my parcel","event_time":{t}}}"#),
        format!(
            r#"{{"message_id":"a-end","user_id":"ann","kind":"end_of_turn","event_time":{}}}"#,
            t + 605
        ),
        format!(
            r#"{{"message_id":"a2","user_id":"ann","text":"never came","event_time":{}}}"#,
            t + 600
        ),
    ]
    .into_iter()
    .map(|p| ("ann".to_owned(), p.into_bytes()))
    .collect()
}

/// The text that makes the engine panic under
/// [`sessionizer::fault::PANIC_ENV`].
pub const PANIC_MARKER: &str = "PANIC-IN-THE-ENGINE";

/// Marks one message in the middle of a burst for a panic (its user sends
/// more right after it), so a half-updated engine would show in the turns
/// that follow. Returns the marked record's index.
pub fn mark_for_panic(records: &mut [(String, Vec<u8>)]) -> usize {
    let message = |payload: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .filter(|v| v["text"].is_string() && v.get("kind").is_none_or(|k| k == "message"))
    };
    let index = (records.len() / 2..records.len())
        .find(|&i| {
            message(&records[i].1).is_some()
                && records[i + 1..(i + 10).min(records.len())]
                    .iter()
                    .any(|(user, payload)| *user == records[i].0 && message(payload).is_some())
        })
        .expect("a message with more of its burst after it");
    let mut event = message(&records[index].1).unwrap();
    event["text"] = format!("{} {PANIC_MARKER}", event["text"].as_str().unwrap()).into();
    records[index].1 = serde_json::to_vec(&event).unwrap();
    index
}
