//! Records on their way to the output and dead-letter topics: what each
//! resolves once acknowledged, the in-flight bound that pauses the input, and
//! which send errors are for good.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::TopicPartitionList;

use super::context::{Tp, WorkerContext};
use crate::config::Config;
use crate::engine::ClosedSession;
use crate::metrics;

/// A record on its way to a broker, with what it resolves once delivered.
pub(super) struct Outgoing {
    pub(super) tp: Tp,
    pub(super) epoch: u64,
    pub(super) seqs: Vec<u64>,
    pub(super) topic: Arc<str>,
    pub(super) key: Vec<u8>,
    pub(super) payload: Vec<u8>,
    /// With `[redact]`, a turn's unredacted JSON: what its messages'
    /// dead letters keep if the broker refuses the turn for good (a dead
    /// letter keeps the original bytes, for replay).
    pub(super) original: Option<Vec<u8>>,
    pub(super) headers: OwnedHeaders,
    pub(super) dead_letter: bool,
    /// Several records that resolve the same `seqs` together (the dead
    /// letters of an undeliverable turn): how many are not yet durable.
    pub(super) group: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

impl Outgoing {
    /// What it holds in memory until acknowledged, near enough.
    pub(super) fn size(&self) -> u64 {
        let original = self.original.as_ref().map_or(0, Vec::len);
        (self.key.len() + self.payload.len() + original) as u64
    }
}

/// Bytes handed to the producers and not yet acknowledged. Past the bound the
/// worker pauses fetching every assigned partition (librdkafka drops what it
/// prefetched and resumes from the next record to hand out), and resumes once
/// half the bound is acknowledged: an output that is down or slow stops the
/// input instead of filling memory (RSS grew from 31 MB to 976 MB in two
/// minutes of a blocked output before).
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) bytes: u64,
    pub(super) max: u64,
    pub(super) paused: bool,
    pub(super) gauge: ::metrics::Gauge,
}

impl InFlight {
    pub(super) fn new(max: u64) -> Self {
        InFlight {
            bytes: 0,
            max,
            paused: false,
            gauge: metrics::in_flight_bytes(),
        }
    }

    pub(super) fn add(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.gauge.set(self.bytes as f64);
    }

    pub(super) fn remove(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_sub(bytes);
        self.gauge.set(self.bytes as f64);
    }

    /// Pauses or resumes `partitions` as the current state says (newly
    /// assigned ones: librdkafka keeps a partition's flag across a revoke and
    /// a re-assignment).
    pub(super) fn apply_to<'a>(
        &self,
        consumer: &StreamConsumer<WorkerContext>,
        partitions: impl IntoIterator<Item = &'a Tp>,
    ) -> KafkaResult<()> {
        let mut list = TopicPartitionList::new();
        for (topic, partition) in partitions {
            list.add_partition(topic, *partition);
        }
        if self.paused {
            consumer.pause(&list)
        } else {
            consumer.resume(&list)
        }
    }

    /// Pauses or resumes fetching as the bound says. Returns whether it just
    /// paused.
    pub(super) fn pause_or_resume(
        &mut self,
        consumer: &StreamConsumer<WorkerContext>,
        assigned: &std::collections::HashSet<Tp>,
    ) -> bool {
        let pause = if self.paused {
            self.bytes > self.max / 2
        } else {
            self.bytes > self.max
        };
        if pause == self.paused {
            return false; // the common case: one comparison per record
        }
        self.paused = pause;
        if let Err(e) = self.apply_to(consumer, assigned) {
            // Tried again on the next record or tick.
            self.paused = !pause;
            tracing::warn!(error = %e, pause, "pausing or resuming the input failed; trying again");
            return false;
        }
        if pause {
            tracing::warn!(
                in_flight_bytes = self.bytes,
                max = self.max,
                "output not acknowledged fast enough: input paused (kafka.max_in_flight_bytes)"
            );
        } else {
            tracing::info!(
                in_flight_bytes = self.bytes,
                "output caught up: input resumed"
            );
        }
        metrics::input_paused(pause);
        pause
    }
}

pub(super) type Delivery = Pin<Box<dyn Future<Output = (Outgoing, Result<(), KafkaError>)> + Send>>;

pub(super) fn send(producer: FutureProducer, outgoing: Outgoing, backoff: Duration) -> Delivery {
    Box::pin(async move {
        if !backoff.is_zero() {
            tokio::time::sleep(backoff).await;
        }
        crate::fault::hold_output().await;
        let record = FutureRecord::to(&outgoing.topic)
            .key(&outgoing.key)
            .payload(&outgoing.payload)
            .headers(outgoing.headers.clone());
        let result = producer
            .send(record, Timeout::Never)
            .await
            .map(|_| ())
            .map_err(|(e, _)| e);
        (outgoing, result)
    })
}

/// The session key as the output record key: `user_id`, or
/// `user_id` + 0x1f + `conversation_id`.
pub(super) fn output_key(session: &ClosedSession) -> Vec<u8> {
    let mut key = session.user_id.as_bytes().to_vec();
    if let Some(c) = &session.conversation_id {
        key.push(0x1f);
        key.extend_from_slice(c.as_bytes());
    }
    key
}

/// Room a dead letter's headers and key may take beside its value: 64 KiB,
/// or a quarter of a small producer limit.
pub(super) fn dead_letter_headroom(producer_limit: usize) -> usize {
    (64 << 10).min(producer_limit / 4)
}

/// Whether this record's outcome is the last of its group to be settled
/// (always, outside a group); counts it as settled.
pub(super) fn last_of_group(outgoing: &Outgoing) -> bool {
    outgoing
        .group
        .as_ref()
        .is_none_or(|remaining| remaining.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) == 1)
}

/// Whether a send error is about the record itself, so retrying cannot help.
pub(super) fn is_permanent(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

/// The largest value a dead letter keeps whole: `input.max_record_bytes`, and
/// below what the producer accepts (`message.max.bytes`, 1,000,000 unless set
/// in `[kafka.properties]`) with room for the provenance headers. A larger
/// record's dead letter keeps its first bytes, length and SHA-256
/// ([`kept_payload`]), so it can always be written.
pub(super) fn max_dead_letter_bytes(config: &Config) -> usize {
    let producer_limit = config
        .kafka
        .as_ref()
        .and_then(|k| k.properties.get("message.max.bytes"))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1_000_000);
    config
        .input
        .max_record_bytes
        .min(producer_limit - dead_letter_headroom(producer_limit))
}
