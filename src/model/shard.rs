//! The shard of a session key: how producers pick the Redis shard stream of
//! an event, and how a worker knows an entry was written to the wrong one.

/// The shard of a session key: 64-bit FNV-1a over the UTF-8 bytes of
/// `user_id`, followed by a zero byte and `conversation_id` when the event
/// has one, modulo the shard count. Stable across versions: producers in any
/// language compute it the same way (`docs/redis.md`).
pub fn shard_of(user_id: &str, conversation_id: Option<&str>, shards: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(PRIME);
        }
    };
    feed(user_id.as_bytes());
    if let Some(conversation) = conversation_id {
        feed(&[0]);
        feed(conversation.as_bytes());
    }
    (hash % u64::from(shards.max(1))) as u32
}
