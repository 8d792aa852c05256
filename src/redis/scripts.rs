//! The Lua scripts of the shard leases. The fenced steps themselves (reading
//! new entries, emitting and acking) are `WATCH`/`MULTI` transactions in
//! [`super::shard`], guarded by [`FENCE_CHECK`]; every key they touch is in the shard's hash slot (see
//! [`super::keys`]).

use std::sync::LazyLock;

use redis::Script;

/// The error code of a step attempted without the lease.
pub const FENCED: &str = "FENCED";

/// KEYS: lease, epoch. ARGV: worker id, ttl ms. Takes a free lease under a
/// new fencing epoch; replies the token `<worker>#<epoch>`, or nil.
pub static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = ARGV[1] .. '#' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
",
    )
});

/// KEYS: lease. ARGV: token, ttl ms. Replies 1 when renewed, 0 when lost.
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
",
    )
});

/// KEYS: lease. ARGV: token. Deletes the lease if it is still ours, so the
/// next worker takes the shard at once.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
",
    )
});

/// KEYS: lease, fence. ARGV: token. Replies 1 while the lease is the
/// token's; otherwise touches the fence key, which the caller `WATCH`es, so
/// its `EXEC` that follows in the same pipeline aborts, and replies 0. Only
/// keys and a token pass through Lua, never entries or turns. `allow-oom`:
/// at `maxmemory` Redis refuses a plain script's `INCR`, and the fence would
/// then rest on Redis aborting the stale step for memory.
pub const FENCE_CHECK: &str = r"#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
redis.call('INCR', KEYS[2])
return 0
";

/// Whether an error is the fencing error.
pub fn is_fenced(error: &redis::RedisError) -> bool {
    error.code() == Some(FENCED) || error.to_string().contains(FENCED)
}
