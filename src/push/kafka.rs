//! `sessionizer push` on Kafka: the output topic read in the push's own
//! consumer group, offsets committed as the contiguous prefix of settled
//! turns per partition (a turn is settled once delivered or dead-lettered),
//! dead letters written to the `[push] dlq` topic. As the worker does
//! (`docs/semantics.md`, "Kafka commits"), each commit lists in its metadata
//! the turns settled past it, and a consumer that takes the partition over
//! leaves them out: a crash delivers again only the turns in flight (on a
//! broker that keeps commit metadata).

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
use crate::kafka::offsets::{self, Skip};
use crate::model::DeadLetterReason;

/// What one partition has read and settled.
#[derive(Debug, Default)]
pub struct Progress {
    /// Read, not settled.
    pending: BTreeSet<i64>,
    /// Settled, at or past the commit point.
    settled: BTreeSet<i64>,
    /// The offset after the last one read.
    next: i64,
}

impl Progress {
    pub fn read(&mut self, offset: i64) {
        self.pending.insert(offset);
        self.next = self.next.max(offset + 1);
    }

    pub fn settled(&mut self, offset: i64) {
        self.pending.remove(&offset);
        self.settled.insert(offset);
    }

    /// The offset to commit (the first not settled, or the one after the
    /// last read) and the metadata listing the turns settled past it
    /// (empty when the list does not fit: they would come again).
    pub fn commit_point(&mut self) -> (i64, String) {
        let at = self.pending.first().copied().unwrap_or(self.next);
        self.settled = self.settled.split_off(&at);
        let (metadata, complete) = offsets::encode(Skip::Exclude, at, self.settled.iter().copied());
        (at, if complete { metadata } else { String::new() })
    }
}

/// The consumer and what it has read and settled.
pub struct KafkaSide {
    consumer: Arc<StreamConsumer>,
    topic: String,
    partitions: HashMap<i32, Progress>,
    /// The last commit per partition.
    committed: HashMap<i32, (i64, String)>,
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
    // The reader stops polling while the read-ahead is full (one key's
    // turn retrying for `max_elapsed`, the agent down): librdkafka's
    // default five minutes would drop the consumer from the group then.
    if !kafka.properties.contains_key("max.poll.interval.ms") {
        c.set("max.poll.interval.ms", "86400000");
    }
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
    let topic = kafka.output_topic.clone();
    tokio::spawn(async move {
        // Per partition, the settled offsets the last commit lists.
        let mut skips: HashMap<i32, Vec<(i64, i64)>> = HashMap::new();
        loop {
            match reader.recv().await {
                Ok(m) => {
                    let partition = m.partition();
                    if let std::collections::hash_map::Entry::Vacant(e) = skips.entry(partition) {
                        e.insert(settled_past_commit(&reader, &topic, partition).await);
                    }
                    let at = At::Kafka {
                        partition,
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                    };
                    let mut turn =
                        Turn::parse(m.payload().unwrap_or_default().to_vec(), at, format);
                    turn.settled_before = skips[&partition]
                        .iter()
                        .any(|(a, b)| (*a..=*b).contains(&m.offset()));
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

/// The offsets the partition's last commit lists as settled past it (none
/// when it has no such metadata, or it cannot be read).
async fn settled_past_commit(
    consumer: &Arc<StreamConsumer>,
    topic: &str,
    partition: i32,
) -> Vec<(i64, i64)> {
    let consumer = consumer.clone();
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    let read = tokio::task::spawn_blocking(move || {
        consumer.committed_offsets(list, Duration::from_secs(10))
    })
    .await;
    let Ok(Ok(read)) = read else {
        tracing::warn!(
            partition,
            "reading the commit's metadata failed: turns settled past it may be delivered again"
        );
        return Vec::new();
    };
    read.elements()
        .first()
        .and_then(|e| match e.offset() {
            Offset::Offset(at) => match offsets::decode(at, e.metadata()) {
                (Skip::Exclude, ranges) => Some(ranges),
                (Skip::Replay, _) => None,
            },
            _ => None,
        })
        .unwrap_or_default()
}

impl KafkaSide {
    pub fn read(&mut self, partition: i32, offset: i64) {
        self.partitions.entry(partition).or_default().read(offset);
    }

    pub fn settled(&mut self, partition: i32, offset: i64) {
        if let Some(progress) = self.partitions.get_mut(&partition) {
            progress.settled(offset);
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
            let Some(progress) = self.partitions.get_mut(&partition) else {
                continue;
            };
            let point = progress.commit_point();
            if self.committed.get(&partition) != Some(&point) {
                list.add_partition_offset(&self.topic, partition, Offset::Offset(point.0))?;
                list.find_partition(&self.topic, partition)
                    .expect("just added")
                    .set_metadata(point.1.clone());
                commits.push((partition, point));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_the_first_unsettled_offset_and_lists_the_settled_past_it() {
        let mut p = Progress::default();
        for offset in 10..16 {
            p.read(offset);
        }
        assert_eq!(p.commit_point(), (10, "r2:".to_owned()));
        for offset in [11, 12, 14] {
            p.settled(offset);
        }
        assert_eq!(p.commit_point(), (10, "r2:1-2,4".to_owned()));
        assert_eq!(
            offsets::decode(10, "r2:1-2,4"),
            (Skip::Exclude, vec![(11, 12), (14, 14)])
        );
        p.settled(10);
        assert_eq!(p.commit_point(), (13, "r2:1".to_owned()));
        p.settled(13);
        p.settled(15);
        assert_eq!(p.commit_point(), (16, "r2:".to_owned()));
    }
}
