//! Kafka: a consumer group between the chat-events topics, the turns topic and
//! the dead-letter topic (`source = "kafka"`).
//!
//! - [`client`]: librdkafka configurations for the consumer and producers.
//! - [`dead_letter`]: the dead-letter record: the original key, value and
//!   headers byte for byte, plus `sessionizer.dlq.*` provenance headers.
//! - [`offsets`]: the resolved offsets past the commit, kept in the commit's
//!   metadata so a restart does not re-emit part of a delivered turn.
//! - [`dlq`]: the DLQ topic for `sessionizer dlq` (read, replay with a
//!   consumer group recording progress).
//! - [`status`]: `sessionizer status`: commits, ends and owners per partition.
//! - [`demo`]: `sessionizer demo`, on librdkafka's in-process mock cluster.
//! - [`worker`]: the loop: consume, sessionize per partition, produce, and
//!   commit each partition's resolved prefix once its output is acknowledged
//!   (or, with `exactly_once`, inside one transaction per commit interval).

pub mod client;
mod commit;
pub mod config;
mod context;
pub mod dead_letter;
mod delivery;
pub mod demo;
pub mod dlq;
pub mod offsets;
mod partition;
pub mod status;
pub mod worker;

pub use worker::{run, WorkerError};
