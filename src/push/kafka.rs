//! `sessionizer push` on Kafka: the output topic read in the push's own
//! consumer group, offsets committed as the contiguous prefix of settled
//! turns per partition (a turn is settled once delivered or dead-lettered),
//! dead letters written to the `[push] dlq` topic.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Message as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::{At, PushSection, Turn};
use crate::config::Config;
use crate::kafka::dead_letter::{turn_headers, Provenance, HTTP_STATUS};
use crate::model::DeadLetterReason;

/// The consumer and what it has read and settled.
pub struct KafkaSide {
    consumer: Arc<StreamConsumer>,
    topic: String,
    /// Per partition: offsets read and not settled, and the offset after
    /// the last one read.
    partitions: HashMap<i32, (BTreeSet<i64>, i64)>,
    /// The last offset committed per partition.
    committed: HashMap<i32, i64>,
}

impl std::fmt::Debug for KafkaSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSide")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// Writes the push's dead letters.
#[derive(Clone)]
pub struct KafkaDeadLetters {
    producer: FutureProducer,
    dlq: String,
    output: String,
}

impl std::fmt::Debug for KafkaDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDeadLetters")
            .field("dlq", &self.dlq)
            .finish_non_exhaustive()
    }
}

/// Opens the consumer (subscribed) and the dead-letter producer, and starts
/// the reader that sends each record to `turns`.
pub fn open(
    config: &Config,
    push: &PushSection,
    turns: mpsc::Sender<Turn>,
) -> anyhow::Result<(KafkaSide, KafkaDeadLetters)> {
    let kafka = config.kafka.as_ref().context("[kafka] is missing")?;
    let mut c = crate::kafka::client::consumer_config(kafka);
    c.set("group.id", &push.group)
        .set("auto.offset.reset", &push.start)
        .set("enable.partition.eof", "false");
    let consumer: Arc<StreamConsumer> =
        Arc::new(c.create().context("creating the Kafka consumer")?);
    consumer
        .subscribe(&[&kafka.output_topic])
        .context("subscribing to the output topic")?;
    let producer: FutureProducer =
        crate::kafka::client::producer_config(kafka, kafka.dlq_acks, None)
            .create()
            .context("creating the dead-letter producer")?;
    let format = config.output_format();
    let reader = consumer.clone();
    tokio::spawn(async move {
        loop {
            match reader.recv().await {
                Ok(m) => {
                    let at = At::Kafka {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                    };
                    let turn = Turn::parse(m.payload().unwrap_or_default().to_vec(), at, format);
                    if turns.send(turn).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading turns failed; librdkafka retries");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    Ok((
        KafkaSide {
            consumer,
            topic: kafka.output_topic.clone(),
            partitions: HashMap::new(),
            committed: HashMap::new(),
        },
        KafkaDeadLetters {
            producer,
            dlq: push.dlq.clone(),
            output: kafka.output_topic.clone(),
        },
    ))
}

impl KafkaSide {
    pub fn read(&mut self, partition: i32, offset: i64) {
        let (pending, next) = self.partitions.entry(partition).or_default();
        pending.insert(offset);
        *next = (*next).max(offset + 1);
    }

    pub fn settled(&mut self, partition: i32, offset: i64) {
        if let Some((pending, _)) = self.partitions.get_mut(&partition) {
            pending.remove(&offset);
        }
    }

    /// Commits, for each assigned partition, the first offset not settled
    /// (or the one after the last read); waits for the broker's answer.
    pub async fn commit(&mut self) -> anyhow::Result<()> {
        let assigned = self.consumer.assignment().context("the assignment")?;
        let mut list = TopicPartitionList::new();
        let mut commits = Vec::new();
        for element in assigned.elements() {
            let partition = element.partition();
            let Some((pending, next)) = self.partitions.get(&partition) else {
                continue;
            };
            let at = pending.first().copied().unwrap_or(*next);
            if self.committed.get(&partition) != Some(&at) {
                list.add_partition_offset(&self.topic, partition, Offset::Offset(at))?;
                commits.push((partition, at));
            }
        }
        if commits.is_empty() {
            return Ok(());
        }
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync))
            .await
            .context("the commit task")?
            .context("committing offsets")?;
        self.committed.extend(commits);
        Ok(())
    }
}

impl KafkaDeadLetters {
    /// Writes the turn to the DLQ topic, keyed as it was, with the
    /// provenance headers and the last HTTP status; returns once acked.
    pub async fn write(
        &self,
        turn: &Turn,
        reason: DeadLetterReason,
        error: &str,
        status: Option<u16>,
    ) -> anyhow::Result<()> {
        let At::Kafka {
            partition,
            offset,
            key,
        } = &turn.at
        else {
            anyhow::bail!("not a Kafka turn");
        };
        let failed_at = crate::wall_clock::rfc3339_ms(crate::wall_clock::now_ms());
        let worker = crate::wall_clock::worker_id();
        let mut headers = turn_headers(
            &self.output,
            *partition,
            *offset,
            &Provenance {
                reason,
                error,
                failed_at: &failed_at,
                worker: &worker,
                truncated: None,
            },
        );
        let status = status.map(|s| s.to_string());
        if let Some(status) = &status {
            headers = headers.insert(Header {
                key: HTTP_STATUS,
                value: Some(status),
            });
        }
        let mut record = FutureRecord::to(&self.dlq)
            .payload(&turn.body)
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("the dead letter was not written: {e}"))?;
        Ok(())
    }
}
