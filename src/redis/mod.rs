//! The Redis Streams worker.
//!
//! Redis consumer groups deal entries out round-robin, which would split one
//! user's burst across workers; so the input is split into shard streams by a
//! stable hash of the session key ([`keys::shard_of`]), and each shard is
//! owned by one worker at a time through a lease with a fencing epoch
//! ([`worker`]). The consumer name inside the group is the shard's name, so a
//! new owner replays its predecessor's pending entries and rebuilds the open
//! sessions ([`shard`]). A turn or dead letter is written and its entries
//! acked in one `WATCH` … `EXEC` step guarded by a lease check
//! ([`scripts::FENCE_CHECK`]): a stale owner can neither emit nor ack.
//! [`connection`] talks to one node or a Redis Cluster ([`direct`]: a shard
//! task's own socket and reply reader on one node); [`dlq`] is the
//! dead-letter stream as `sessionizer dlq` reads and replays it; [`reshard`]
//! moves unfinished entries after a change of the shard count; [`status`]
//! reads each shard's owner and progress for `sessionizer status`.

pub mod config;
pub mod connection;
pub mod direct;
pub mod dlq;
pub mod entry;
pub mod keys;
pub mod reshard;
pub mod scripts;
pub mod shard;
pub mod status;
pub mod worker;

pub use worker::{run, WorkerError};
