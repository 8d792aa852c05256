//! Key names and the shard of a session key.
//!
//! Every key one fenced step touches must live in one hash slot on Redis
//! Cluster, so a shard's keys share the hash tag `{i}`: the shard stream
//! `<input_stream>:{i}`, its lease `<input_stream>:{i}:lease`, fencing
//! epoch `<input_stream>:{i}:epoch` and in-flight marker
//! `<input_stream>:{i}:in-flight`, and (on a cluster) `<output_stream>:{i}`
//! and `<dlq_stream>:{i}`. One shard on a single node is the plain stream
//! `<input_stream>`, with `<input_stream>:lease` and `<input_stream>:epoch`.

use crate::config::RedisSection;

/// The names one shard's work touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardKeys {
    pub index: u32,
    /// The consumer name inside the group: the same for every owner, so a
    /// new owner finds its predecessor's pending entries under it.
    pub consumer: String,
    pub stream: String,
    pub lease: String,
    pub epoch: String,
    /// The pending entry being replayed, so the next owner knows which entry
    /// a worker died on (see `shard::ShardTask::replay_pending`).
    pub in_flight: String,
    /// Touched by the fence check when the lease is not the caller's, so
    /// the `WATCH` on it aborts the step's transaction (see
    /// `scripts::FENCE_CHECK`).
    pub fence: String,
    pub output: String,
    pub dlq: String,
}

impl ShardKeys {
    pub fn new(config: &RedisSection, index: u32) -> ShardKeys {
        let tagged = config.shards > 1 || config.cluster;
        let stream = if tagged {
            format!("{}:{{{index}}}", config.input_stream)
        } else {
            config.input_stream.clone()
        };
        let (output, dlq) = if config.cluster {
            (
                format!("{}:{{{index}}}", config.output_stream),
                format!("{}:{{{index}}}", config.dlq_stream),
            )
        } else {
            (config.output_stream.clone(), config.dlq_stream.clone())
        };
        ShardKeys {
            index,
            consumer: format!("shard-{index}"),
            lease: format!("{stream}:lease"),
            epoch: format!("{stream}:epoch"),
            in_flight: format!("{stream}:in-flight"),
            fence: format!("{stream}:fence"),
            stream,
            output,
            dlq,
        }
    }

    /// Every shard of a deployment.
    pub fn all(config: &RedisSection) -> Vec<ShardKeys> {
        (0..config.shards)
            .map(|i| ShardKeys::new(config, i))
            .collect()
    }

    /// The distinct turn output streams (one, or one per shard on a
    /// cluster), sorted.
    pub fn output_streams(config: &RedisSection) -> Vec<String> {
        let mut streams: Vec<String> = ShardKeys::all(config)
            .into_iter()
            .map(|k| k.output)
            .collect();
        streams.sort();
        streams.dedup();
        streams
    }
}

/// The sorted set of live workers (member = worker id, score = last
/// heartbeat in epoch ms); each worker takes its fair share of the shards.
pub fn members_key(config: &RedisSection) -> String {
    format!("{}:workers", config.input_stream)
}

pub use crate::model::shard_of;

#[cfg(test)]
mod tests {
    use super::*;

    fn section(shards: u32, cluster: bool) -> RedisSection {
        let text = format!(
            "source = \"redis\"\n[redis]\nurl = \"redis://x\"\ninput_stream = \"chat\"\noutput_stream = \"turns\"\ndlq_stream = \"dlq\"\nshards = {shards}\ncluster = {cluster}\n"
        );
        crate::config::Config::from_toml(&text, Vec::new())
            .unwrap()
            .redis
            .unwrap()
    }

    #[test]
    fn one_shard_on_one_node_is_the_plain_stream() {
        let k = ShardKeys::new(&section(1, false), 0);
        assert_eq!(k.stream, "chat");
        assert_eq!(k.lease, "chat:lease");
        assert_eq!(k.output, "turns");
        assert_eq!(k.consumer, "shard-0");
    }

    #[test]
    fn shards_are_hash_tagged_and_a_cluster_shards_the_outputs() {
        let k = ShardKeys::new(&section(4, false), 3);
        assert_eq!(k.stream, "chat:{3}");
        assert_eq!(k.lease, "chat:{3}:lease");
        assert_eq!(k.epoch, "chat:{3}:epoch");
        assert_eq!(k.output, "turns");
        let k = ShardKeys::new(&section(1, true), 0);
        assert_eq!(k.stream, "chat:{0}");
        assert_eq!(k.output, "turns:{0}");
        assert_eq!(k.dlq, "dlq:{0}");
    }

    /// Pinned values: producers in other languages compute the same (the
    /// the Python snippet in `docs/redis.md` gives these).
    #[test]
    fn the_shard_hash_is_pinned() {
        assert_eq!(
            shard_of("", None, u32::MAX),
            (0xcbf2_9ce4_8422_2325u64 % u64::from(u32::MAX)) as u32
        );
        assert_eq!(shard_of("alice", None, 8), 7);
        assert_eq!(shard_of("alice", Some("c1"), 8), 1);
        assert_eq!(shard_of("bob", None, 8), 4);
        assert_eq!(shard_of("anything", None, 1), 0);
    }
}
