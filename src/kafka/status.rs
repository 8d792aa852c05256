//! `sessionizer status` on Kafka: the group's committed offsets, the high
//! watermarks and the members' assignments, read without joining the group.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::client::{consumer_config, CommandContext};
use crate::config::KafkaSection;
use crate::status::PartitionStatus;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Every partition of the input topics.
pub fn partitions(kafka: &KafkaSection) -> anyhow::Result<Vec<PartitionStatus>> {
    let consumer: BaseConsumer<CommandContext> = consumer_config(kafka)
        .create_with_context(CommandContext)
        .context("creating the status consumer")?;
    let owners = owners(&consumer, &kafka.group_id).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the group's members; owners left out");
        HashMap::new()
    });
    let mut list = TopicPartitionList::new();
    for topic in &kafka.input_topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), TIMEOUT)
            .with_context(|| format!("reading the metadata of {topic}"))?;
        let t = metadata.topics().iter().find(|t| t.name() == topic);
        match t.map(|t| t.error()) {
            Some(None) => {}
            Some(Some(e)) => anyhow::bail!(
                "topic {topic}: {:?}",
                rdkafka::error::RDKafkaErrorCode::from(e)
            ),
            None => anyhow::bail!("topic {topic} is not in the metadata"),
        }
        for p in t.map(|t| t.partitions()).unwrap_or_default() {
            list.add_partition(topic, p.id());
        }
    }
    let committed = consumer
        .committed_offsets(list, TIMEOUT)
        .with_context(|| format!("reading the commits of group {}", kafka.group_id))?;
    let ends = ends(&consumer, &committed)?;
    let mut rows = Vec::new();
    for e in committed.elements() {
        let (topic, partition) = (e.topic(), e.partition());
        let position = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        let end = ends.get(&(topic.to_owned(), partition)).copied();
        rows.push(PartitionStatus {
            partition: format!("{topic}/{partition}"),
            owner: owners.get(&(topic.to_owned(), partition)).cloned(),
            position: Some(position.map_or_else(|| "none".to_owned(), |o| o.to_string())),
            end: end.map(|e| e.to_string()),
            lag: end.map(|end| (end - position.unwrap_or(0)).max(0) as u64),
            ..PartitionStatus::default()
        });
    }
    Ok(rows)
}

/// Each partition's end: the high watermark of a fetch from the group's
/// position (a `ListOffsets` answer is not exact on every broker: tansu 0.6
/// answers the last batch's start + 1). Reads at most one fetch per partition.
fn ends(
    consumer: &BaseConsumer<CommandContext>,
    committed: &TopicPartitionList,
) -> anyhow::Result<HashMap<(String, i32), i64>> {
    let mut assignment = TopicPartitionList::new();
    for e in committed.elements() {
        let from = match e.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        assignment.add_partition_offset(e.topic(), e.partition(), from)?;
    }
    consumer.assign(&assignment)?;
    let wanted: Vec<(String, i32)> = assignment
        .elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect();
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let ends: HashMap<(String, i32), i64> = wanted
            .iter()
            .filter_map(|(topic, p)| {
                let high = super::worker::cached_high_watermark(consumer.client(), topic, *p)?;
                Some(((topic.clone(), *p), high))
            })
            .collect();
        if ends.len() == wanted.len() {
            return Ok(ends);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no fetch answer from {} of {} partitions within {TIMEOUT:?}",
            wanted.len() - ends.len(),
            wanted.len()
        );
        // Polling drives the fetches whose answers carry the watermarks;
        // the records and end-of-partition events themselves are not needed.
        match consumer.poll(Duration::from_millis(200)) {
            Some(Err(e)) if !matches!(e, KafkaError::PartitionEOF(_)) => {
                return Err(e).context("reading the partitions' ends")
            }
            _ => {}
        }
    }
}

/// Partition → `client_id@host` of the member it is assigned to, where the
/// broker reports assignments (Apache Kafka does; tansu 0.6 does not).
fn owners(
    consumer: &BaseConsumer<CommandContext>,
    group: &str,
) -> anyhow::Result<HashMap<(String, i32), String>> {
    let groups = consumer.fetch_group_list(Some(group), TIMEOUT)?;
    let mut owners = HashMap::new();
    for g in groups.groups().iter().filter(|g| g.name() == group) {
        for m in g.members() {
            let owner = format!(
                "{}@{}",
                m.client_id(),
                m.client_host().trim_start_matches('/')
            );
            for tp in m.assignment().map(assigned).unwrap_or_default() {
                owners.insert(tp, owner.clone());
            }
        }
    }
    Ok(owners)
}

/// The partitions of a consumer-protocol assignment (version, then
/// `[topic, [partition]]`; the user data after it is left alone). A
/// malformed one yields what parsed before the fault.
fn assigned(bytes: &[u8]) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    let mut at = 2; // version
    let mut take = |n: usize| {
        let slice = bytes.get(at..at + n)?;
        at += n;
        Some(slice)
    };
    let mut parse = || -> Option<()> {
        let topics = i32::from_be_bytes(take(4)?.try_into().ok()?);
        for _ in 0..topics.max(0) {
            let len = i16::from_be_bytes(take(2)?.try_into().ok()?);
            let topic = String::from_utf8(take(len.max(0) as usize)?.to_vec()).ok()?;
            let partitions = i32::from_be_bytes(take(4)?.try_into().ok()?);
            for _ in 0..partitions.max(0) {
                let p = i32::from_be_bytes(take(4)?.try_into().ok()?);
                out.push((topic.clone(), p));
            }
        }
        Some(())
    };
    parse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_parses_to_its_partitions() {
        let mut b = vec![0, 1]; // version 1
        b.extend(1i32.to_be_bytes());
        b.extend(6i16.to_be_bytes());
        b.extend(b"events");
        b.extend(2i32.to_be_bytes());
        b.extend(0i32.to_be_bytes());
        b.extend(3i32.to_be_bytes());
        b.extend((-1i32).to_be_bytes()); // no user data
        let want = vec![("events".to_owned(), 0), ("events".to_owned(), 3)];
        assert_eq!(assigned(&b), want);
        assert_eq!(assigned(&b[..b.len() - 8]), want[..1], "cut short");
        assert!(assigned(&[]).is_empty());
    }
}
