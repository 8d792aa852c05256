//! Where the gateway writes events: the configured source's input, exactly
//! as producers do (the Kafka input topic keyed by user id, or the Redis
//! shard stream of the session key), answering only after the broker did.

use std::time::Duration;

use anyhow::Context as _;
use futures::future::join_all;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::{Acks, Config, SourceKind};
use crate::model::shard_of;
use crate::redis::connection::RedisConn;
use crate::redis::keys::ShardKeys;

/// How long a Kafka write may take before the request fails with 503
/// (librdkafka's own default is five minutes).
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// One validated event on its way to the broker.
#[derive(Debug, Clone)]
pub struct Record {
    pub message_id: String,
    pub user_id: String,
    pub conversation_id: Option<String>,
    pub payload: Vec<u8>,
}

pub enum Publisher {
    Kafka {
        producer: FutureProducer,
        topic: String,
    },
    Redis {
        conn: RedisConn,
        shards: Vec<String>,
    },
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Publisher::Kafka { .. } => "Publisher::Kafka",
            Publisher::Redis { .. } => "Publisher::Redis",
        })
    }
}

impl Publisher {
    pub async fn open(config: &Config) -> anyhow::Result<Publisher> {
        Ok(match config.source {
            SourceKind::Kafka => {
                let kafka = config.kafka.as_ref().context("[kafka] is missing")?;
                let mut c = crate::kafka::client::producer_config(kafka, Acks::All, None);
                if !kafka.properties.contains_key("message.timeout.ms") {
                    c.set("message.timeout.ms", KAFKA_TIMEOUT.as_millis().to_string());
                }
                Publisher::Kafka {
                    producer: c.create().context("creating the Kafka producer")?,
                    topic: kafka.input_topics[0].clone(),
                }
            }
            SourceKind::Redis => {
                let section = config.redis.as_ref().context("[redis] is missing")?;
                Publisher::Redis {
                    conn: crate::redis::connection::connect_command(section).await?,
                    shards: ShardKeys::all(section)
                        .into_iter()
                        .map(|k| k.stream)
                        .collect(),
                }
            }
            SourceKind::File => anyhow::bail!(
                "the gateway writes into a broker; source = \"file\" has none (use kafka or redis)"
            ),
        })
    }

    /// Writes every record and returns once the broker acknowledged them
    /// all (Kafka: at `acks = all`; Redis: each `XADD`'s reply). An error
    /// means some may be written and some not: the client retries the
    /// request, and the workers drop what they already have by message id.
    pub async fn publish(&self, records: &[Record]) -> anyhow::Result<()> {
        match self {
            Publisher::Kafka { producer, topic } => {
                let sends = records.iter().map(|r| {
                    producer.send(
                        FutureRecord::to(topic).key(&r.user_id).payload(&r.payload),
                        KAFKA_TIMEOUT,
                    )
                });
                for result in join_all(sends).await {
                    result.map_err(|(e, _)| anyhow::anyhow!("Kafka did not take an event: {e}"))?;
                }
                Ok(())
            }
            Publisher::Redis { conn, shards } => {
                let mut pipe = redis::pipe();
                for r in records {
                    let shard = shard_of(
                        &r.user_id,
                        r.conversation_id.as_deref(),
                        shards.len() as u32,
                    );
                    pipe.cmd("XADD")
                        .arg(&shards[shard as usize])
                        .arg("*")
                        .arg("payload")
                        .arg(&r.payload);
                }
                let ids: Vec<String> = pipe
                    .query_async(&mut conn.clone())
                    .await
                    .context("Redis did not take the events")?;
                anyhow::ensure!(
                    ids.len() == records.len(),
                    "Redis answered {} of {} writes",
                    ids.len(),
                    records.len()
                );
                Ok(())
            }
        }
    }
}
