//! sessionizer groups each chat user's burst of short messages into one
//! **turn** (an event-time session window per user and conversation), so an AI
//! agent answers each burst once instead of each message.
//!
//! Layout, from the inside out (`docs/semantics.md` fixes the semantics; `docs/architecture.md` has the tour):
//!
//! - [`engine`]: the pure core. [`engine::SessionEngine`] keeps one partition's
//!   open sessions and watermark; [`engine::WatermarkTracker`] and
//!   [`engine::IdleClock`] decide when sessions may close;
//!   [`engine::CompletionTracker`] says how far a partition may be committed.
//!   No I/O, no clock reads, no async: time is an argument.
//! - [`model`]: the wire contract's records (ChatEvent, Turn, DeadLetter).
//! - [`codec`]: bytes ⇄ records (JSON and protobuf, prost types generated from
//!   `proto/`), with validation that turns poison into a typed reason.
//! - [`pipeline`]: decode → engine → outcomes for one partition, and the
//!   one seam from outcomes to a source's output
//!   ([`pipeline::OutcomeSink`]); shared by every source.
//! - [`file`]: file mode (JSON lines in, turns and dead letters out).
//! - [`kafka`]: the Kafka worker (consumer group, commits after durable
//!   output, dead letters with provenance headers, optional exactly-once),
//!   split by concern: `worker` (the loop), `partition` (what to do with
//!   each record), `commit`, `delivery`, `context` (rebalance callbacks),
//!   `config` (`[kafka]`).
//! - [`redis`]: the Redis Streams worker (shard streams owned through
//!   fenced leases, turns and dead letters written before their acks in
//!   fenced steps, pending-entry recovery); a shard task is `redis::shard`
//!   with `fenced`, `pending` and `emit` beside it.
//! - [`metrics`]: metric names, the Prometheus recorder, readiness.
//! - [`progress`]: totals and owned partitions in-process, the progress line.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz` on one axum router.
//! - [`gateway`]: `sessionizer gateway`, HTTP ingest into the source.
//! - [`dlq`]: `sessionizer dlq` inspect, stats and replay over every
//!   source's dead letters ([`dlq::DeadLetterStore`], implemented in each
//!   broker's folder).
//! - [`fault`]: the fault-test hooks (off unless their variables are set).
//! - [`log_throttle`]: one log line per cause per interval, with counts.
//! - [`shutdown`]: the signal future the workers stop on.
//! - [`config`]: the one loader (TOML file plus environment overrides) and
//!   the shared sections; each broker's section lives in its folder
//!   (`kafka/config.rs`, `redis/config.rs`, `file/config.rs`).
//! - [`wall_clock`]: the one place the wall clock is read.
//! - [`produce`]: `sessionizer produce`, the load generator.
//! - [`redact`]: the redaction stage between the engine and the output
//!   encoders (`[redact]`), and re-identification of tokens.
//! - [`status`]: `sessionizer status`'s rows and table (each broker reads
//!   its own in `kafka/status.rs`, `redis/status.rs`).
//! - [`workload`]: a deterministic generator of bursty chat traffic for
//!   benchmarks, tests and load generation.
//! - `main.rs` and `cli/`: the `sessionizer` command line (the binary).
//!
//! Dependencies point inwards: `engine` and `model` import nothing of the
//! rest; `codec` only `model`; `pipeline` the three of them, `metrics` and `log_throttle`;
//! the sources import the pipeline, never each other (the `dlq` commands
//! reach each store through `dlq::DeadLetterStore`).

pub mod codec;
pub mod config;
pub mod dlq;
pub mod engine;
pub mod fault;
pub mod file;
pub mod gateway;
pub mod http;
pub mod kafka;
pub mod log_throttle;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod produce;
pub mod progress;
pub mod push;
pub mod redact;
pub mod redis;
pub mod shutdown;
pub mod status;
pub mod wall_clock;
pub mod workload;
