//! The synchronous wait (`POST /v1/events?wait=20s`): every gateway replica
//! reads every turn from the output (Redis: `XREAD` from the streams' ends
//! at start; Kafka: a consumer assigned every output partition from its
//! end, in no group that commits) and answers the requests it holds whose
//! messages the turn contains: the one holding the turn's last message gets
//! the turn, the others "superseded". Nothing depends on a held call: the
//! turn is on the output either way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::codec::{proto, OutputFormat};
use crate::config::{Config, SourceKind};
use crate::redis::entry::parse_read_reply;
use crate::redis::keys::ShardKeys;

/// A turn as the gateway needs it.
#[derive(Debug, Clone)]
pub struct SeenTurn {
    pub turn_id: String,
    pub user_id: String,
    /// In the turn's order; the last one decides who gets the turn.
    pub message_ids: Vec<String>,
    /// The turn as JSON, for the answer.
    pub json: Value,
}

/// What a held request is answered with.
#[derive(Debug, Clone)]
pub enum Outcome {
    Turn(Value),
    Superseded(String),
}

/// One held request: its user's messages, and where its answer goes.
#[derive(Debug)]
pub struct Hold {
    user_id: String,
    message_ids: Vec<String>,
    answer: Mutex<Option<oneshot::Sender<Outcome>>>,
}

/// A held request's registration; released when dropped.
#[derive(Debug)]
pub struct HoldGuard {
    holds: Arc<Holds>,
    hold: Arc<Hold>,
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.holds.release(&self.hold);
    }
}

/// A message: (user id, message id); message ids are unique per user only.
type MessageKey = (String, String);

/// The requests held now, by message.
#[derive(Debug, Default)]
pub struct Holds {
    by_message: Mutex<HashMap<MessageKey, Vec<Arc<Hold>>>>,
    count: Mutex<usize>,
}

impl Holds {
    /// Holds a request for these messages of `user_id`, unless `max` are
    /// held already (`None`). Dropping the guard releases the hold, also
    /// when the client goes away and its handler is dropped mid-wait.
    pub fn hold(
        self: &Arc<Self>,
        user_id: &str,
        message_ids: Vec<String>,
        max: usize,
    ) -> Option<(HoldGuard, oneshot::Receiver<Outcome>)> {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        if *count >= max {
            return None;
        }
        *count += 1;
        crate::metrics::gateway_held(*count);
        let (tx, rx) = oneshot::channel();
        let hold = Arc::new(Hold {
            user_id: user_id.to_owned(),
            message_ids,
            answer: Mutex::new(Some(tx)),
        });
        let mut by_message = self.by_message.lock().unwrap_or_else(|e| e.into_inner());
        for id in &hold.message_ids {
            by_message
                .entry((hold.user_id.clone(), id.clone()))
                .or_default()
                .push(hold.clone());
        }
        let guard = HoldGuard {
            holds: self.clone(),
            hold,
        };
        Some((guard, rx))
    }

    /// Forgets a hold (answered, timed out, or its request gone).
    pub fn release(&self, hold: &Arc<Hold>) {
        let mut by_message = self.by_message.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = false;
        for id in &hold.message_ids {
            let key = (hold.user_id.clone(), id.clone());
            if let Some(list) = by_message.get_mut(&key) {
                let before = list.len();
                list.retain(|h| !Arc::ptr_eq(h, hold));
                removed |= list.len() < before;
                if list.is_empty() {
                    by_message.remove(&key);
                }
            }
        }
        if removed {
            let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
            *count = count.saturating_sub(1);
            crate::metrics::gateway_held(*count);
        }
    }

    /// How many requests are held.
    pub fn len(&self) -> usize {
        *self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Answers every request holding one of the turn's messages: the turn
    /// for the one holding its last message, "superseded" for the others.
    pub fn on_turn(&self, turn: &SeenTurn) {
        let Some(last) = turn.message_ids.last() else {
            return;
        };
        let holds: Vec<Arc<Hold>> = {
            let by_message = self.by_message.lock().unwrap_or_else(|e| e.into_inner());
            let mut found: Vec<Arc<Hold>> = Vec::new();
            for id in &turn.message_ids {
                for h in by_message
                    .get(&(turn.user_id.clone(), id.clone()))
                    .into_iter()
                    .flatten()
                {
                    if !found.iter().any(|f| Arc::ptr_eq(f, h)) {
                        found.push(h.clone());
                    }
                }
            }
            found
        };
        for hold in holds {
            let outcome = if hold.message_ids.contains(last) {
                Outcome::Turn(turn.json.clone())
            } else {
                Outcome::Superseded(turn.turn_id.clone())
            };
            if let Some(tx) = hold.answer.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = tx.send(outcome);
            }
            self.release(&hold);
        }
    }
}

/// Parses a turn of the output (JSON or protobuf).
pub fn parse_turn(bytes: &[u8], format: OutputFormat) -> Option<SeenTurn> {
    match format {
        OutputFormat::Json => {
            let json: Value = serde_json::from_slice(bytes).ok()?;
            let message_ids = json["messages"]
                .as_array()?
                .iter()
                .filter_map(|m| Some(m["message_id"].as_str()?.to_owned()))
                .collect();
            Some(SeenTurn {
                turn_id: json["turn_id"].as_str()?.to_owned(),
                user_id: json["user_id"].as_str()?.to_owned(),
                message_ids,
                json,
            })
        }
        OutputFormat::Protobuf => {
            let t = proto::Turn::decode(bytes).ok()?;
            let messages: Vec<Value> = t
                .messages
                .iter()
                .map(|m| json!({"message_id": m.message_id, "event_time": m.event_time, "text": m.text}))
                .collect();
            Some(SeenTurn {
                message_ids: t.messages.iter().map(|m| m.message_id.clone()).collect(),
                json: json!({
                    "turn_id": t.turn_id, "user_id": t.user_id, "start_time": t.start_time,
                    "end_time": t.end_time, "message_count": t.message_count, "text": t.text,
                    "messages": messages,
                }),
                turn_id: t.turn_id,
                user_id: t.user_id,
            })
        }
    }
}

/// Starts reading every turn from the output's current end into `holds`;
/// returns once reading is set up (so no turn after that point is missed).
pub async fn start_reader(config: &Config, holds: Arc<Holds>) -> anyhow::Result<()> {
    let format = config.output_format();
    match config.source {
        SourceKind::Redis => {
            let section = config.redis.as_ref().expect("checked by the publisher");
            // One reader per stream: on a cluster the output shards live in
            // different slots, and one XREAD may not span them.
            for stream in ShardKeys::output_streams(section) {
                // A connection of its own: a blocking read holds it.
                let mut conn = crate::redis::connection::connect_command(section).await?;
                let mut id = crate::redis::status::last_entry_id(&mut conn, &stream)
                    .await?
                    .unwrap_or_else(|| "0-0".to_owned());
                let holds = holds.clone();
                tokio::spawn(async move {
                    // Not ready while turns cannot be read (for a while): a
                    // held request could not get its turn.
                    let mut failing =
                        crate::metrics::FailingMark::after(crate::metrics::READER_FAILING_AFTER_MS);
                    loop {
                        let read: redis::RedisResult<redis::Value> = redis::cmd("XREAD")
                            .arg("COUNT")
                            .arg(500)
                            .arg("BLOCK")
                            .arg(1000)
                            .arg("STREAMS")
                            .arg(&stream)
                            .arg(&id)
                            .query_async(&mut conn)
                            .await;
                        match read.map_err(|e| e.to_string()).and_then(parse_read_reply) {
                            Ok(entries) => {
                                failing.ok();
                                for entry in entries {
                                    id = entry.id.clone();
                                    if let Some(turn) =
                                        entry.field("turn").and_then(|b| parse_turn(b, format))
                                    {
                                        holds.on_turn(&turn);
                                    }
                                }
                            }
                            Err(e) => {
                                failing.failed(crate::wall_clock::now_ms());
                                tracing::warn!(error = %e, %stream, "reading turns failed; retrying");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                    }
                });
            }
        }
        SourceKind::Kafka => {
            let kafka = config.kafka.as_ref().expect("checked by the publisher");
            let mut c = crate::kafka::client::consumer_config(kafka);
            c.set("group.id", format!("{}.gateway", kafka.group_id));
            let consumer: StreamConsumer = c.create()?;
            let metadata =
                consumer.fetch_metadata(Some(&kafka.output_topic), Duration::from_secs(10))?;
            let mut list = TopicPartitionList::new();
            for t in metadata
                .topics()
                .iter()
                .filter(|t| t.name() == kafka.output_topic)
            {
                for p in t.partitions() {
                    list.add_partition_offset(&kafka.output_topic, p.id(), Offset::End)?;
                }
            }
            anyhow::ensure!(
                list.count() > 0,
                "the output topic {} has no partitions",
                kafka.output_topic
            );
            consumer.assign(&list)?;
            tokio::spawn(async move {
                loop {
                    match consumer.recv().await {
                        Ok(m) => {
                            if let Some(turn) = m.payload().and_then(|b| parse_turn(b, format)) {
                                holds.on_turn(&turn);
                            }
                        }
                        Err(rdkafka::error::KafkaError::PartitionEOF(_)) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "reading turns failed; librdkafka retries")
                        }
                    }
                }
            });
        }
        SourceKind::File => anyhow::bail!("the gateway needs a broker source"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request whose client went away mid-wait (its handler dropped)
    /// frees its slot: `max_held` is not used up by the departed.
    #[test]
    fn a_dropped_hold_is_released() {
        let holds = Arc::new(Holds::default());
        let (guard, _answer) = holds.hold("alice", vec!["m1".into()], 1).unwrap();
        assert!(
            holds.hold("bob", vec!["m2".into()], 1).is_none(),
            "at max_held"
        );
        drop(guard);
        assert!(holds.is_empty());
        assert!(holds.hold("bob", vec!["m2".into()], 1).is_some());
    }
}
