//! `sessionizer push`: reads the turn output in a consumer group of its own
//! and POSTs each turn to an HTTP agent (`[push] url`). The turns of one
//! session key go one at a time in output order, different keys in parallel
//! ([`keyed`]); failures are retried, then dead-lettered ([`deliver`]); a
//! Kafka offset is committed (contiguous prefix) or a Redis entry acked only
//! once its turn was delivered (2xx) or its dead letter written, so a crash
//! delivers again at most what was in flight, under the same
//! `Idempotency-Key` (`docs/push.md`).

pub mod config;
pub mod deliver;
mod kafka;
pub mod keyed;
mod redis;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

pub use config::PushSection;
use deliver::{status_class, Deliverer, Verdict};
use keyed::Keyed;

use crate::codec::{proto, OutputFormat};
use crate::config::{Config, SourceKind};
use crate::model::DeadLetterReason;

/// One turn read from the output.
#[derive(Debug, Clone)]
pub struct Turn {
    /// The session key: the turns of one key are delivered in order.
    pub key: String,
    pub turn_id: String,
    /// The turn as written (the request body).
    pub body: Vec<u8>,
    pub at: At,
    /// Set when the record is not a turn: it goes to the DLQ unsent.
    pub poison: Option<String>,
    /// Kafka: the last commit lists it as settled already (by a run that
    /// crashed after its outcome): it is not delivered again.
    pub settled_before: bool,
}

/// Where a turn was read.
#[derive(Debug, Clone)]
pub enum At {
    Kafka {
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
    },
    Redis {
        stream: String,
        id: String,
    },
}

impl At {
    fn describe(&self) -> String {
        match self {
            At::Kafka {
                partition, offset, ..
            } => format!("partition {partition} offset {offset}"),
            At::Redis { stream, id } => format!("{stream} {id}"),
        }
    }
}

/// The fields of a JSON turn push needs (the rest is skipped, not built).
#[derive(serde::Deserialize)]
struct TurnHead<'a> {
    #[serde(borrow)]
    turn_id: Cow<'a, str>,
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow, default)]
    conversation_id: Option<Cow<'a, str>>,
}

impl Turn {
    /// A turn from its bytes; one that does not parse is poison.
    pub fn parse(body: Vec<u8>, at: At, format: OutputFormat) -> Turn {
        let parsed = match format {
            OutputFormat::Json => serde_json::from_slice::<TurnHead<'_>>(&body).ok().map(|t| {
                (
                    t.turn_id.into_owned(),
                    t.user_id.into_owned(),
                    t.conversation_id.map(Cow::into_owned),
                )
            }),
            OutputFormat::Protobuf => proto::Turn::decode(body.as_slice()).ok().map(|t| {
                (
                    t.turn_id,
                    t.user_id,
                    t.conversation_id.filter(|c| !c.is_empty()),
                )
            }),
        };
        match parsed {
            Some((turn_id, user, conversation)) if !turn_id.is_empty() => Turn {
                key: match conversation {
                    Some(c) => format!("{user}\u{1f}{c}"),
                    None => user,
                },
                turn_id,
                body,
                at,
                poison: None,
                settled_before: false,
            },
            _ => {
                let mut turn = Turn::poison(at, "not a turn of the configured output format");
                turn.body = body;
                turn
            }
        }
    }

    pub fn poison(at: At, why: &str) -> Turn {
        Turn {
            key: format!("\u{0}{}", at.describe()),
            turn_id: String::new(),
            body: Vec::new(),
            at,
            poison: Some(why.to_owned()),
            settled_before: false,
        }
    }
}

/// Where turns come from and are settled.
#[derive(Debug)]
enum Side {
    Kafka(kafka::KafkaSide),
    Redis(redis::RedisSide),
}

/// Where dead letters go (shared by the deliveries).
#[derive(Debug, Clone)]
enum DeadLetters {
    Kafka(kafka::KafkaDeadLetters),
    Redis(redis::RedisDeadLetters),
}

impl DeadLetters {
    async fn write(
        &self,
        turn: &Turn,
        reason: DeadLetterReason,
        error: &str,
        status: Option<u16>,
        attempts: u32,
    ) -> anyhow::Result<()> {
        match self {
            DeadLetters::Kafka(d) => d.write(turn, reason, error, status).await,
            DeadLetters::Redis(d) => d.write(turn, reason, error, status, attempts).await,
        }
    }
}

/// Runs `step` until it succeeds (`true`), a second apart, or until
/// `stopping` (`false`: the turn is then not settled, and comes again).
async fn until_done<F, Fut>(what: &str, stopping: &mut watch::Receiver<bool>, mut step: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    loop {
        match step().await {
            Ok(()) => return true,
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "{what} failed; retrying"),
        }
        if *stopping.borrow() {
            return false;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopping.wait_for(|s| *s) => return false,
        }
    }
}

/// A delivery's end: the turn, and whether its outcome is durable.
struct Done {
    turn: Turn,
    seq: u64,
    durable: bool,
}

/// Runs until `shutdown` resolves: then stops reading, lets calls in
/// progress finish within `[push] shutdown_grace` (abandoning the rest,
/// unsettled), commits, and returns.
pub async fn run(config: &Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let section = config
        .push
        .as_ref()
        .context("push needs a [push] section with url and dlq")?;
    if let Some(listen) = config.metrics.listen {
        crate::http::serve(listen).await?;
    }
    let format = config.output_format();
    let deliverer = Arc::new(Deliverer::new(section, format.content_type())?);
    let max_buffered = section.concurrency.saturating_mul(64).max(1_000);
    let (tx, mut turns) = mpsc::channel(max_buffered);
    let (mut side, dead) = match config.source {
        SourceKind::Kafka => {
            let (side, dead) = kafka::open(config, section, tx)?;
            (Side::Kafka(side), DeadLetters::Kafka(dead))
        }
        SourceKind::Redis => {
            let (side, dead) = redis::open(config, section, tx).await?;
            (Side::Redis(side), DeadLetters::Redis(dead))
        }
        SourceKind::File => anyhow::bail!(
            "push reads turns from a broker; source = \"file\" has none (use kafka or redis)"
        ),
    };
    // Redis entries are acked by their delivery task, in parallel: their
    // order does not matter (Kafka's commit needs the order: it is here).
    let acker = match &side {
        Side::Redis(r) => Some(r.clone()),
        Side::Kafka(_) => None,
    };
    crate::metrics::READINESS.set_connected(true);
    crate::metrics::READINESS.set_owned(1);
    tracing::info!(url = %section.url, group = %section.group, dlq = %section.dlq, concurrency = section.concurrency, "push delivering turns");

    let (stop, stopping) = watch::channel(false);
    let mut keyed: Keyed<(u64, Turn)> = Keyed::new(section.concurrency);
    let mut tasks: JoinSet<Done> = JoinSet::new();
    // Read and not settled, by read order: the oldest one's age is a gauge.
    let mut unsettled: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        while let Some((_, (n, turn))) = keyed.start() {
            tasks.spawn(deliver_one(
                deliverer.clone(),
                dead.clone(),
                acker.clone(),
                turn,
                n,
                stopping.clone(),
            ));
        }
        crate::metrics::push_in_flight(tasks.len());
        tokio::select! {
            () = &mut shutdown => break,
            Some(joined) = tasks.join_next() => {
                let done = joined.context("a delivery task")?;
                settle(&mut side, &mut keyed, &mut unsettled, done);
            }
            received = turns.recv(), if keyed.len() < max_buffered => {
                let turn = received.context("the turn reader stopped")?;
                if let (Side::Kafka(k), At::Kafka { partition, offset, .. }) = (&mut side, &turn.at) {
                    k.read(*partition, *offset);
                    if turn.settled_before {
                        k.settled(*partition, *offset);
                        continue;
                    }
                }
                seq += 1;
                unsettled.insert(seq, Instant::now());
                keyed.push(turn.key.clone(), (seq, turn));
            }
            _ = tick.tick() => {
                crate::metrics::push_oldest(unsettled.values().next().map(Instant::elapsed));
                commit(&mut side).await;
            }
        }
    }

    tracing::info!(
        in_flight = tasks.len(),
        queued = keyed.len() - tasks.len(),
        "stopping: no more reads; finishing the calls in progress"
    );
    drop(turns);
    let _ = stop.send(true);
    let abandoned = keyed.drain().count();
    let grace = section.shutdown_grace.as_duration();
    let finished = tokio::time::timeout(grace, async {
        while let Some(joined) = tasks.join_next().await {
            if let Ok(done) = joined {
                settle(&mut side, &mut keyed, &mut unsettled, done);
            }
        }
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            calls = tasks.len(),
            "calls still in progress after push.shutdown_grace: abandoned, not settled (delivered again by the next run)"
        );
        tasks.abort_all();
    }
    commit(&mut side).await;
    tracing::info!(
        abandoned_queued = abandoned,
        "push stopped; unsettled turns are delivered again by the next run"
    );
    Ok(())
}

async fn commit(side: &mut Side) {
    if let Side::Kafka(k) = side {
        if let Err(e) = k.commit().await {
            tracing::warn!(error = %format!("{e:#}"), "committing delivered turns failed; retried at the next tick");
        }
    }
}

/// Records a delivery's end: its key may go on, and a durable outcome may
/// be committed (Kafka; a Redis entry was acked by its task).
fn settle(
    side: &mut Side,
    keyed: &mut Keyed<(u64, Turn)>,
    unsettled: &mut BTreeMap<u64, Instant>,
    done: Done,
) {
    keyed.done(&done.turn.key);
    if !done.durable {
        return;
    }
    if let Some(read) = unsettled.remove(&done.seq) {
        crate::metrics::push_delivery_seconds(read.elapsed());
    }
    if let (
        Side::Kafka(k),
        At::Kafka {
            partition, offset, ..
        },
    ) = (side, &done.turn.at)
    {
        k.settled(*partition, *offset);
    }
}

/// Delivers one turn and makes its outcome durable (on Redis, acks it).
async fn deliver_one(
    deliverer: Arc<Deliverer>,
    dead: DeadLetters,
    acker: Option<redis::RedisSide>,
    turn: Turn,
    seq: u64,
    stopping: watch::Receiver<bool>,
) -> Done {
    let durable = outcome(&deliverer, &dead, &turn, stopping.clone()).await;
    if let (true, Some(acker), At::Redis { stream, id }) = (durable, &acker, &turn.at) {
        // An entry left pending is delivered again only after a restart.
        let mut stopping = stopping;
        until_done("acking a delivered turn", &mut stopping, || {
            acker.settled(stream, id)
        })
        .await;
    }
    Done { turn, seq, durable }
}

/// Delivers one turn; whether its outcome (2xx, or dead letter) is durable.
async fn outcome(
    deliverer: &Deliverer,
    dead: &DeadLetters,
    turn: &Turn,
    mut stopping: watch::Receiver<bool>,
) -> bool {
    let verdict = match &turn.poison {
        Some(why) => Verdict::Rejected {
            status: 0,
            body: why.clone(),
            attempts: 0,
        },
        None => {
            deliverer
                .deliver(&turn.turn_id, &turn.body, &mut stopping)
                .await
        }
    };
    let (reason, error, status, attempts) = match &verdict {
        Verdict::Delivered { status, .. } => {
            crate::metrics::push_delivery("delivered", status_class(Some(*status)));
            return true;
        }
        Verdict::Abandoned => return false,
        Verdict::Rejected {
            attempts: 0, body, ..
        } => {
            crate::metrics::push_delivery("not_a_turn", "none");
            (DeadLetterReason::Decode, body.clone(), None, 0)
        }
        Verdict::Rejected {
            status,
            body,
            attempts,
        } => {
            crate::metrics::push_delivery("rejected", status_class(Some(*status)));
            (
                DeadLetterReason::DeliveryRejected,
                format!("HTTP {status}: {body}"),
                Some(*status),
                *attempts,
            )
        }
        Verdict::Failed {
            status,
            body,
            attempts,
        } => {
            crate::metrics::push_delivery("failed", status_class(*status));
            let last = status.map_or("no answer".to_owned(), |s| format!("HTTP {s}"));
            (
                DeadLetterReason::DeliveryFailed,
                format!("{last} after {attempts} attempts: {body}"),
                *status,
                *attempts,
            )
        }
    };
    tracing::warn!(turn_id = %turn.turn_id, at = %turn.at.describe(), reason = reason.as_str(), %error, "a turn goes to the push DLQ");
    until_done("writing a dead letter", &mut stopping, || {
        dead.write(turn, reason, &error, status, attempts)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> At {
        At::Redis {
            stream: "turns".into(),
            id: "1-0".into(),
        }
    }

    #[test]
    fn a_json_turn_gives_its_id_and_session_key_and_anything_else_is_poison() {
        let body = br#"{"turn_id":"t1","user_id":"al\"ice","conversation_id":"c1","messages":[]}"#;
        let turn = Turn::parse(body.to_vec(), at(), OutputFormat::Json);
        assert_eq!(
            (turn.turn_id.as_str(), turn.key.as_str()),
            ("t1", "al\"ice\u{1f}c1")
        );
        assert!(turn.poison.is_none());
        let alone = Turn::parse(
            br#"{"turn_id":"t2","user_id":"bob","conversation_id":null}"#.to_vec(),
            at(),
            OutputFormat::Json,
        );
        assert_eq!(alone.key, "bob");
        for bad in [
            &br#"{"user_id":"bob"}"#[..],
            br#"{"turn_id":"","user_id":"bob"}"#,
            br#"{"turn_id":3,"user_id":"bob"}"#,
            b"not json",
        ] {
            let turn = Turn::parse(bad.to_vec(), at(), OutputFormat::Json);
            assert!(turn.poison.is_some(), "{}", String::from_utf8_lossy(bad));
            assert_eq!(turn.body, bad, "the dead letter keeps the bytes");
        }
    }
}
