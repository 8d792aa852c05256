//! The Lua scripts of the fenced steps. Each checks the shard's lease token
//! first, so a worker that lost its lease (paused, partitioned, slow) can
//! neither take new entries, nor emit, nor ack. Every key a script touches
//! is in the shard's hash slot (see [`super::keys`]).

use std::sync::LazyLock;

use redis::Script;

/// The error prefix a script replies with when the lease is not held.
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

/// KEYS: lease, stream. ARGV: token, group, consumer, count. Reads new
/// entries (`>`), which puts them in the shard consumer's pending list: a
/// stale owner must not, or the entries would sit there unseen until the
/// next takeover. Replies `[entries, last-delivered-id]`, the id only when
/// nothing was read (where to wait for more from).
pub static READ_NEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the shard lease is no longer held')
end
local r = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4], 'STREAMS', KEYS[2], '>')
if r then return {r[1][2], ''} end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if name == ARGV[2] then return {{}, last} end
end
return {{}, '0-0'}
",
    )
});

/// KEYS: lease, stream, output, dlq. ARGV: token, group, output maxlen
/// (empty: none), dlq maxlen, worker id, turn count, then per turn `turn
/// turn_id user_id`, dead-letter count, then per dead letter a field count and its
/// field/value pairs, then every entry id to ack. One atomic step: the turns
/// and dead letters exist if and only if their entries are acked.
pub static EMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED the shard lease is no longer held')
end
local function add(key, maxlen, fields)
  if maxlen ~= '' then
    redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  else
    redis.call('XADD', key, '*', unpack(fields))
  end
end
local i = 6
for _ = 1, tonumber(ARGV[i]) do
  add(KEYS[3], ARGV[3], {'turn', ARGV[i + 1], 'turn_id', ARGV[i + 2], 'user_id', ARGV[i + 3], 'worker', ARGV[5]})
  i = i + 3
end
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  local n = tonumber(ARGV[i + 1])
  add(KEYS[4], ARGV[4], {unpack(ARGV, i + 2, i + 1 + 2 * n)})
  i = i + 1 + 2 * n
end
i = i + 1
while i <= #ARGV do
  local last = math.min(i + 999, #ARGV)
  redis.call('XACK', KEYS[2], ARGV[2], unpack(ARGV, i, last))
  i = last + 1
end
return 1
",
    )
});

/// Whether a script error is the fencing reply.
pub fn is_fenced(error: &redis::RedisError) -> bool {
    error.code() == Some(FENCED) || error.to_string().contains(FENCED)
}
