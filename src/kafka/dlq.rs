//! The Kafka dead-letter topic as `sessionizer dlq` reads and replays it.
//!
//! Reading assigns every partition of the DLQ topic from its beginning and
//! stops when each has reported its end. A replay's progress is a
//! consumer group of its own: each DLQ position is committed once its record
//! was acknowledged (acks all, idempotent producer), so a repeated or resumed
//! replay starts after it. Positions below the group's commit are skipped in
//! the client rather than by seeking, because some Kafka-protocol brokers
//! (tansu 0.6) answer a fetch from inside a record batch with the batches
//! after it, which would skip dead letters silently.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::client::{consumer_config, producer_config, CommandContext};
use super::dead_letter as h;
use crate::config::{Acks, KafkaSection};
use crate::dlq::{parse_failed_at, DlqEntry, Locator, REPLAY_COUNT, REPLAY_FROM};
use crate::model::Truncated;

const TIMEOUT: Duration = Duration::from_secs(30);
/// Commit the replay group's progress at least this often (records).
const COMMIT_EVERY: usize = 100;

/// The DLQ topic of a `[kafka]` configuration.
pub struct KafkaDlq {
    kafka: KafkaSection,
    topic: String,
    consumer: BaseConsumer<CommandContext>,
    producer: Option<FutureProducer>,
    /// The replay group's consumer (commits only).
    group: Option<BaseConsumer<CommandContext>>,
    /// Next offset per partition to commit for the replay group.
    progress: HashMap<i32, i64>,
    uncommitted: usize,
}

impl std::fmt::Debug for KafkaDlq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDlq")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// The worker's consumer settings (TLS, SASL, `read_committed`, partition
/// EOF events) under another group id; the DLQ is read by assignment only.
fn client_config(kafka: &KafkaSection, group: &str) -> ClientConfig {
    let mut c = consumer_config(kafka);
    c.set("group.id", group);
    c
}

impl KafkaDlq {
    pub fn open(kafka: &KafkaSection) -> anyhow::Result<KafkaDlq> {
        let consumer = client_config(kafka, &format!("{}.dlq-reader", kafka.group_id))
            .create_with_context(CommandContext)
            .context("creating the DLQ consumer")?;
        Ok(KafkaDlq {
            kafka: kafka.clone(),
            topic: kafka.dlq_topic.clone(),
            consumer,
            producer: None,
            group: None,
            progress: HashMap::new(),
            uncommitted: 0,
        })
    }

    /// Whether a replay group has passed each entry: a group named as
    /// `dlq replay` names its default groups (`<group_id>.dlq-replay`, all
    /// reasons, or `….<reason>+<reason>`) whose committed position on the
    /// entry's partition is past it, and whose reasons include the entry's.
    /// Such an entry was replayed, or skipped by that replay and reported
    /// (`--max-replays`, truncated); selections by other filters or under
    /// `--group` names are not known here.
    pub fn replayed(&mut self, entries: &[DlqEntry]) -> anyhow::Result<Vec<bool>> {
        let base = crate::dlq::replay::default_group(&self.kafka.group_id, &[]);
        let groups = self
            .consumer
            .fetch_group_list(None, TIMEOUT)
            .context("listing the replay groups")?;
        let partitions = self.partitions()?;
        // (the reasons a group covers, `None` for all; its position per partition)
        type Passed = (Option<Vec<String>>, HashMap<i32, i64>);
        let mut passed: Vec<Passed> = Vec::new();
        for g in groups.groups() {
            let reasons = match g.name().strip_prefix(&base) {
                Some("") => None,
                Some(rest) => match rest.strip_prefix('.') {
                    Some(list) => Some(list.split('+').map(str::to_owned).collect()),
                    None => continue,
                },
                None => continue,
            };
            let (_, at) = self.group_positions(g.name(), &partitions)?;
            passed.push((reasons, at));
        }
        Ok(entries
            .iter()
            .map(|e| {
                let Locator::Kafka { partition, offset } = e.locator else {
                    return false;
                };
                passed.iter().any(|(reasons, at)| {
                    reasons.as_ref().is_none_or(|r| r.contains(&e.reason))
                        && at.get(&partition).is_some_and(|c| *c > offset)
                })
            })
            .collect())
    }

    /// A consumer of `group` (committing nothing by itself) and the group's
    /// committed position on each DLQ partition that has one.
    fn group_positions(
        &self,
        group: &str,
        partitions: &[i32],
    ) -> anyhow::Result<(BaseConsumer<CommandContext>, HashMap<i32, i64>)> {
        let consumer: BaseConsumer<CommandContext> = client_config(&self.kafka, group)
            .create_with_context(CommandContext)
            .with_context(|| format!("creating a consumer of group {group}"))?;
        let mut list = TopicPartitionList::new();
        for p in partitions {
            list.add_partition(&self.topic, *p);
        }
        let committed = consumer
            .committed_offsets(list, TIMEOUT)
            .with_context(|| format!("reading the commits of group {group}"))?;
        let positions = committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect();
        Ok((consumer, positions))
    }

    fn partitions(&self) -> anyhow::Result<Vec<i32>> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), TIMEOUT)
            .with_context(|| format!("reading the metadata of {}", self.topic))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default())
    }

    /// Every dead letter up to the current end, oldest first by partition
    /// and offset; with `group`, only those after the group's commits.
    pub fn snapshot(&mut self, group: Option<&str>) -> anyhow::Result<Vec<DlqEntry>> {
        let partitions = self.partitions()?;
        let mut from: HashMap<i32, i64> = HashMap::new();
        if let Some(group) = group {
            let (consumer, positions) = self.group_positions(group, &partitions)?;
            from = positions;
            self.group = Some(consumer);
        }
        // The end is where librdkafka reports the partition's EOF (the
        // high watermark of the fetch responses), not a ListOffsets answer:
        // tansu 0.6 answers that with the last batch's base offset + 1.
        let mut assignment = TopicPartitionList::new();
        for p in &partitions {
            assignment.add_partition_offset(&self.topic, *p, Offset::Beginning)?;
        }
        self.consumer.assign(&assignment)?;
        let mut at_end = std::collections::HashSet::new();
        let mut entries = Vec::new();
        let mut last_progress = Instant::now();
        while at_end.len() < partitions.len() {
            match self.consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    last_progress = Instant::now();
                    if m.offset() >= from.get(&m.partition()).copied().unwrap_or(0) {
                        entries.push(entry(&m));
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    last_progress = Instant::now();
                    at_end.insert(p);
                }
                Some(Err(e)) => tracing::debug!(error = %e, "DLQ consumer error; retrying"),
                None => anyhow::ensure!(
                    last_progress.elapsed() < TIMEOUT,
                    "reading {} stalled for {TIMEOUT:?} before its end",
                    self.topic
                ),
            }
        }
        entries.sort_by_key(|e| match e.locator {
            Locator::Kafka { partition, offset } => (partition, offset),
            _ => unreachable!("Kafka entries"),
        });
        Ok(entries)
    }

    /// New dead letters since the snapshot.
    pub fn follow(&mut self) -> anyhow::Result<Vec<DlqEntry>> {
        let mut entries = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.consumer.poll(left) {
                Some(Ok(m)) => entries.push(entry(&m)),
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => tracing::debug!(error = %e, "DLQ consumer error; retrying"),
                None => break,
            }
        }
        Ok(entries)
    }

    pub fn pass(&mut self, e: &DlqEntry) -> anyhow::Result<()> {
        if let Locator::Kafka { partition, offset } = e.locator {
            self.progress.insert(partition, offset + 1);
            self.uncommitted += 1;
        }
        Ok(())
    }

    /// Sends the original key, the payload and the original headers (with a
    /// fresh replay count and origin) and waits for the acknowledgement. Back
    /// to the source topic it goes to the source partition, so the user's
    /// events stay with the worker that owns their sessions.
    pub async fn republish(
        &mut self,
        e: &DlqEntry,
        payload: Vec<u8>,
        target: &str,
    ) -> anyhow::Result<()> {
        if self.producer.is_none() {
            self.producer = Some(
                producer_config(&self.kafka, Acks::All, None)
                    .create()
                    .context("creating the replay producer")?,
            );
        }
        let producer = self.producer.as_ref().expect("created above");
        let count = (e.replay_count + 1).to_string();
        let mut headers = OwnedHeaders::new_with_capacity(e.headers.len() + 2);
        for (k, v) in &e.headers {
            if k != REPLAY_COUNT && k != REPLAY_FROM {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
        }
        headers = headers
            .insert(Header {
                key: REPLAY_FROM,
                value: Some(&e.position),
            })
            .insert(Header {
                key: REPLAY_COUNT,
                value: Some(&count),
            });
        let mut record = FutureRecord::to(target).payload(&payload).headers(headers);
        if let Some(key) = &e.key {
            record = record.key(key);
        }
        let partition = e.source_partition.as_ref().and_then(|p| p.parse().ok());
        if let (true, Some(p)) = (target == e.source, partition) {
            record = record.partition(p);
        }
        producer
            .send(record, TIMEOUT)
            .await
            .map_err(|(err, _)| anyhow::anyhow!("replaying {} failed: {err}", e.position))?;
        self.pass(e)?;
        if self.uncommitted >= COMMIT_EVERY {
            self.commit()?;
        }
        Ok(())
    }

    /// Commits the replay group's progress.
    pub fn commit(&mut self) -> anyhow::Result<()> {
        let (Some(group), false) = (&self.group, self.progress.is_empty()) else {
            return Ok(());
        };
        let mut list = TopicPartitionList::new();
        for (p, o) in &self.progress {
            list.add_partition_offset(&self.topic, *p, Offset::Offset(*o))?;
        }
        group
            .commit(&list, CommitMode::Sync)
            .context("committing the replay's progress")?;
        self.uncommitted = 0;
        Ok(())
    }
}

/// A DLQ record as an entry: provenance from the `sessionizer.dlq.*`
/// headers, the rest kept as the original headers.
fn entry(m: &BorrowedMessage<'_>) -> DlqEntry {
    let mut e = DlqEntry {
        position: format!("{}/{}/{}", m.topic(), m.partition(), m.offset()),
        locator: Locator::Kafka {
            partition: m.partition(),
            offset: m.offset(),
        },
        failed_at: String::new(),
        failed_at_ms: None,
        reason: String::new(),
        error: String::new(),
        source: String::new(),
        source_partition: None,
        source_position: String::new(),
        worker: String::new(),
        replay_count: 0,
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().unwrap_or_default().to_vec(),
        truncated: None,
        headers: Vec::new(),
    };
    let mut truncated = (None, String::new());
    if let Some(headers) = m.headers() {
        for header in headers.iter() {
            let value = header.value.unwrap_or_default();
            let text = || String::from_utf8_lossy(value).into_owned();
            match header.key {
                h::REASON => e.reason = text(),
                h::ERROR => e.error = text(),
                h::SOURCE_TOPIC => e.source = text(),
                h::SOURCE_PARTITION => e.source_partition = Some(text()),
                h::SOURCE_OFFSET => e.source_position = text(),
                h::FAILED_AT => e.failed_at = text(),
                h::WORKER => e.worker = text(),
                h::SOURCE_TIMESTAMP => {}
                h::TRUNCATED_BYTES => truncated.0 = text().parse().ok(),
                h::TRUNCATED_SHA256 => truncated.1 = text(),
                key => {
                    if key == REPLAY_COUNT {
                        e.replay_count = text().parse().unwrap_or(0);
                    }
                    e.headers.push((key.to_owned(), value.to_vec()));
                }
            }
        }
    }
    e.failed_at_ms = parse_failed_at(&e.failed_at);
    e.truncated = truncated.0.map(|original_bytes| Truncated {
        original_bytes,
        original_sha256: truncated.1,
    });
    e
}

impl crate::dlq::DeadLetterStore for KafkaDlq {
    async fn snapshot(&mut self, replay_group: Option<&str>) -> anyhow::Result<Vec<DlqEntry>> {
        KafkaDlq::snapshot(self, replay_group)
    }

    fn replayed(&mut self, entries: &[DlqEntry]) -> anyhow::Result<Option<Vec<bool>>> {
        KafkaDlq::replayed(self, entries).map(Some)
    }

    async fn follow(&mut self) -> anyhow::Result<Vec<DlqEntry>> {
        KafkaDlq::follow(self)
    }

    fn pass(&mut self, entry: &DlqEntry) -> anyhow::Result<()> {
        KafkaDlq::pass(self, entry)
    }

    async fn republish(
        &mut self,
        entry: &DlqEntry,
        payload: Vec<u8>,
        target: &str,
    ) -> anyhow::Result<bool> {
        KafkaDlq::republish(self, entry, payload, target)
            .await
            .map(|()| true)
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.commit()
    }
}
