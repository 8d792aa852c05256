//! librdkafka configurations. User properties come last so TLS, SASL and
//! timeouts can be set there; the properties sessionizer relies on are
//! rejected at config load (see `config.rs`).

use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext};

use crate::config::{Acks, KafkaSection};

/// The consumer: manual commits of resolved offsets only, cooperative-sticky
/// assignment (a rebalance moves only the partitions it must), partition EOF
/// events for the caught-up idle advance, and `read_committed` so aborted
/// transactional input is never sessionized.
pub fn consumer_config(kafka: &KafkaSection) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    for (k, v) in &kafka.properties {
        c.set(k, v);
    }
    c
}

/// A producer with the given acks; `all` turns on the idempotent producer
/// (no duplicates or reordering from retries). `transactional_id` makes it a
/// transactional producer (exactly-once mode).
pub fn producer_config(
    kafka: &KafkaSection,
    acks: Acks,
    transactional_id: Option<&str>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("acks", acks.as_str())
        .set(
            "enable.idempotence",
            if acks == Acks::All { "true" } else { "false" },
        )
        .set("linger.ms", "5");
    if let Some(id) = transactional_id {
        c.set("transactional.id", id);
    }
    for (k, v) in &kafka.properties {
        c.set(k, v);
    }
    c
}

/// The context of the `dlq` commands' consumers. librdkafka reports a
/// partition's end as an error event, and that is how those commands learn
/// they have read everything: it is logged at trace, not as the `ERROR`
/// librdkafka's default context prints. Other errors are warnings.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommandContext;

impl ClientContext for CommandContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::trace!(reason, "partition end");
        } else {
            tracing::warn!(%error, reason, "librdkafka error");
        }
    }
}

impl ConsumerContext for CommandContext {}
