//! `sessionizer reshard`: after a change of `redis.shards`, moves every entry
//! the workers of the old shard count had not finished (pending in the
//! group, or not read yet) to the shard stream of its session key under the
//! new count, and removes the old streams the new count does not use, so no
//! stream and no entry is left behind (`docs/redis.md`, "Changing the shard
//! count").
//!
//! It holds every old shard's lease while it runs (and refuses to start
//! while a worker holds one), so no worker reads or acks what it moves. The
//! old streams are merged by event time (each stream's own order kept; the
//! ones staying in their stream are re-appended too), so a new stream, fed
//! by several old ones, receives a backlog in event-time order and none of
//! it arrives behind newer events as late. (Entry ids cannot order streams
//! against each other: a producer writes thousands of entries in one
//! millisecond.)

use std::collections::HashSet;
use std::io::Write;

use anyhow::Context as _;
use redis::Value;

use super::connection::RedisConn;
use super::entry::{id_order, parse_entries, Entry};
use super::keys::{shard_of, ShardKeys};
use crate::codec::Decoder;
use crate::config::{Config, RedisSection};
use crate::wall_clock::now_ms;

const PAGE: usize = 1_000;

/// What a reshard did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReshardReport {
    /// Unfinished entries appended to the shard stream of their key under
    /// the new count and removed from their old place.
    pub moved: u64,
    /// Old streams (and their lease, epoch and marker keys) deleted.
    pub removed: Vec<String>,
}

/// How long the reshard's hold on an old lease lasts without renewal (it
/// renews after every page): a reshard that dies frees them this soon.
const HOLD_MS: i64 = 30_000;

/// KEYS: target, source. ARGV: group (empty: none), id, then the entry's
/// field/value pairs. Adds the entry to the target, then acks and deletes
/// it in the source; an error in the add stops the script before the
/// delete (a `MULTI` would run the delete anyway).
static MOVE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
if ARGV[1] ~= '' then redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]) end
redis.call('XDEL', KEYS[2], ARGV[2])
return 1
",
    )
});

/// Streams of another shard count that still hold entries: the plain
/// stream (one shard on one node) and shard `shards` (a count that was
/// larger), with their lengths. A worker warns about them at start.
pub async fn leftover_streams(
    conn: &mut RedisConn,
    section: &RedisSection,
) -> Result<Vec<(String, u64)>, redis::RedisError> {
    let used: HashSet<String> = ShardKeys::all(section)
        .into_iter()
        .map(|k| k.stream)
        .collect();
    let beyond = RedisSection {
        shards: section.shards + 1,
        ..section.clone()
    };
    let candidates = [
        section.input_stream.clone(),
        ShardKeys::new(&beyond, section.shards).stream,
    ];
    let mut left = Vec::new();
    for stream in candidates.into_iter().filter(|s| !used.contains(s)) {
        let len: u64 = redis::cmd("XLEN").arg(&stream).query_async(conn).await?;
        if len > 0 {
            left.push((stream, len));
        }
    }
    Ok(left)
}

/// `sessionizer reshard`: [`run`] on the configuration's Redis.
pub async fn run_command(
    config: &Config,
    from: u32,
    dry_run: bool,
    out: &mut impl Write,
) -> anyhow::Result<ReshardReport> {
    let section = config
        .redis
        .as_ref()
        .context("reshard moves Redis shard streams: the configuration has no [redis]")?;
    let mut conn = super::connection::connect_command(section).await?;
    let decoder = Decoder::new(config.input_format(), config.decode_limits());
    run(&mut conn, section, &decoder, from, dry_run, out).await
}

/// Moves the unfinished entries of the `from`-shard layout into `section`'s.
pub async fn run(
    conn: &mut RedisConn,
    section: &RedisSection,
    decoder: &Decoder,
    from: u32,
    dry_run: bool,
    out: &mut impl Write,
) -> anyhow::Result<ReshardReport> {
    anyhow::ensure!(from >= 1, "--from must be at least 1");
    let old_section = RedisSection {
        shards: from,
        ..section.clone()
    };
    let old = ShardKeys::all(&old_section);
    let new = ShardKeys::all(section);
    let holder = format!("reshard-{}", crate::wall_clock::worker_id());
    let tokens = hold_leases(conn, &old, &holder).await?;
    let moved = move_all(conn, section, decoder, &old, &new, &tokens, dry_run).await;
    let mut report = ReshardReport {
        moved: *moved.as_ref().unwrap_or(&0),
        ..ReshardReport::default()
    };
    let new_streams: HashSet<&str> = new.iter().map(|k| k.stream.as_str()).collect();
    for (keys, token) in old.iter().zip(&tokens) {
        let remove = moved.is_ok() && !dry_run && !new_streams.contains(keys.stream.as_str());
        if remove {
            let _: i64 = redis::cmd("DEL")
                .arg(&keys.stream)
                .arg(&keys.lease)
                .arg(&keys.epoch)
                .arg(&keys.in_flight)
                .arg(&keys.fence)
                .query_async(conn)
                .await
                .with_context(|| format!("removing {}", keys.stream))?;
            writeln!(out, "removed {} (no shard of the new count)", keys.stream)?;
            report.removed.push(keys.stream.clone());
        } else {
            let _: i64 = super::scripts::RELEASE
                .key(&keys.lease)
                .arg(token)
                .invoke_async(conn)
                .await
                .with_context(|| format!("releasing {}", keys.lease))?;
            if dry_run && !new_streams.contains(keys.stream.as_str()) {
                writeln!(
                    out,
                    "would remove {} (no shard of the new count)",
                    keys.stream
                )?;
                report.removed.push(keys.stream.clone());
            }
        }
    }
    moved?;
    writeln!(out, "{} unfinished entries moved", report.moved)?;
    Ok(report)
}

/// Takes every old lease for the reshard; refuses (releasing what it took)
/// when a worker holds one. Returns the tokens, by old shard.
async fn hold_leases(
    conn: &mut RedisConn,
    old: &[ShardKeys],
    holder: &str,
) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::new();
    for keys in old {
        let token: Option<String> = super::scripts::ACQUIRE
            .key(&keys.lease)
            .key(&keys.epoch)
            .arg(holder)
            .arg(HOLD_MS)
            .invoke_async(conn)
            .await
            .with_context(|| format!("taking the lease {}", keys.lease))?;
        match token {
            Some(token) => tokens.push(token),
            None => {
                let owner: Option<String> = redis::cmd("GET")
                    .arg(&keys.lease)
                    .query_async(conn)
                    .await
                    .unwrap_or(None);
                for (keys, token) in old.iter().zip(&tokens) {
                    let _: Result<i64, _> = super::scripts::RELEASE
                        .key(&keys.lease)
                        .arg(token)
                        .invoke_async(conn)
                        .await;
                }
                anyhow::bail!(
                    "{} is leased by a running worker ({}): stop every worker before resharding \
                     (docs/redis.md, \"Changing the shard count\")",
                    keys.stream,
                    owner.unwrap_or_default()
                );
            }
        }
    }
    Ok(tokens)
}

/// One old stream being drained: its group's progress, its end when the
/// reshard started, and the next page of its unfinished entries.
struct Source<'k> {
    keys: &'k ShardKeys,
    group: Option<String>,
    last_delivered: Option<String>,
    pending: HashSet<String>,
    end: Option<String>,
    after: String,
    /// Unfinished entries read, with the event time they merge by and the
    /// new shard they go to.
    page: std::collections::VecDeque<(Entry, i64, u32)>,
    /// The event time of the last entry read: an entry that does not decode
    /// merges at its predecessor's.
    last_time: i64,
    done: bool,
}

/// Moves the unfinished entries of every old stream, merged in id order;
/// returns how many.
async fn move_all(
    conn: &mut RedisConn,
    section: &RedisSection,
    decoder: &Decoder,
    old: &[ShardKeys],
    new: &[ShardKeys],
    tokens: &[String],
    dry_run: bool,
) -> anyhow::Result<u64> {
    let mut sources = Vec::new();
    for keys in old {
        let (last_delivered, pending) = group_progress(conn, &keys.stream, &section.group).await?;
        let end = super::status::last_entry_id(conn, &keys.stream)
            .await
            .with_context(|| format!("reading the end of {}", keys.stream))?;
        sources.push(Source {
            keys,
            group: last_delivered.as_ref().map(|_| section.group.clone()),
            last_delivered,
            pending,
            done: end.is_none(),
            end,
            after: "-".to_owned(),
            page: Default::default(),
            last_time: i64::MIN,
        });
    }
    let mut moved = 0;
    let shards = new.len() as u32;
    loop {
        for source in sources.iter_mut() {
            fill(conn, source, decoder, shards).await?;
        }
        let next = sources
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let (entry, time, _) = s.page.front()?;
                Some(((*time, id_order(&entry.id)), i))
            })
            .min();
        let Some((_, i)) = next else { break };
        let source = &mut sources[i];
        let (entry, _, shard) = source.page.pop_front().expect("a head");
        let target = &new[shard as usize];
        if !dry_run {
            move_entry(conn, section.cluster, source, &entry, &target.stream).await?;
        }
        moved += 1;
        if moved % PAGE as u64 == 0 {
            renew(conn, old, tokens).await?;
        }
    }
    Ok(moved)
}

/// Reads the source's next page of unfinished entries when its buffer is
/// empty (entries up to its end at the start only: what the reshard appends
/// itself is never read again).
async fn fill(
    conn: &mut RedisConn,
    source: &mut Source<'_>,
    decoder: &Decoder,
    shards: u32,
) -> anyhow::Result<()> {
    while source.page.is_empty() && !source.done {
        let end = source.end.clone().expect("not done without an end");
        let page = redis::cmd("XRANGE")
            .arg(&source.keys.stream)
            .arg(&source.after)
            .arg(&end)
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await
            .with_context(|| format!("reading {}", source.keys.stream))?;
        let entries = parse_entries(page).map_err(anyhow::Error::msg)?;
        source.done = entries.len() < PAGE;
        if let Some(last) = entries.last() {
            source.after = format!("({}", last.id);
        }
        for entry in entries {
            let unfinished = source.pending.contains(&entry.id)
                || source
                    .last_delivered
                    .as_ref()
                    .is_none_or(|l| id_order(&entry.id) > id_order(l));
            if unfinished {
                let (time, shard) = placement(&entry, decoder, source.keys.index, shards);
                source.last_time = time.unwrap_or(source.last_time);
                source.page.push_back((entry, source.last_time, shard));
            }
        }
    }
    Ok(())
}

async fn renew(conn: &mut RedisConn, old: &[ShardKeys], tokens: &[String]) -> anyhow::Result<()> {
    for (keys, token) in old.iter().zip(tokens) {
        let renewed: i64 = super::scripts::RENEW
            .key(&keys.lease)
            .arg(token)
            .arg(HOLD_MS)
            .invoke_async(conn)
            .await
            .with_context(|| format!("renewing {}", keys.lease))?;
        anyhow::ensure!(
            renewed == 1,
            "lost the lease {} while resharding",
            keys.lease
        );
    }
    Ok(())
}

/// The group's last-delivered id (`None`: no group, nothing read) and its
/// pending ids.
async fn group_progress(
    conn: &mut RedisConn,
    stream: &str,
    group: &str,
) -> anyhow::Result<(Option<String>, HashSet<String>)> {
    let Some(state) = super::status::group_state(conn, stream, group)
        .await
        .with_context(|| format!("reading the groups of {stream}"))?
    else {
        return Ok((None, HashSet::new()));
    };
    let mut pending = HashSet::new();
    let mut from = "-".to_owned();
    while pending.len() < state.pending as usize {
        let reply: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg(&from)
            .arg("+")
            .arg(PAGE)
            .query_async(conn)
            .await
            .with_context(|| format!("reading the pending entries of {stream}"))?;
        let Some((last, ..)) = reply.last() else {
            break;
        };
        from = format!("({last}");
        pending.extend(reply.into_iter().map(|(id, ..)| id));
    }
    Ok((Some(state.last_delivered), pending))
}

/// The entry's event time and its shard under the new count: its session
/// key's, or, for an entry that does not decode (the worker will
/// dead-letter it wherever it lands), the old index's.
fn placement(entry: &Entry, decoder: &Decoder, old_index: u32, shards: u32) -> (Option<i64>, u32) {
    let (payload, _, refused) = entry.payload();
    match decoder.decode(&payload, now_ms()) {
        Ok(event) if refused.is_none() => (
            Some(event.event_time),
            shard_of(&event.user_id, event.conversation_id.as_deref(), shards),
        ),
        _ => (None, old_index % shards),
    }
}

/// Appends the entry, field for field, to `target`, and acks (in the
/// group, when the stream has one) and deletes it in its old stream: one
/// script on one node; on a cluster, where the two streams are in different
/// slots, the add first (a kill between the two moves that entry twice).
async fn move_entry(
    conn: &mut RedisConn,
    cluster: bool,
    source: &Source<'_>,
    entry: &Entry,
    target: &str,
) -> anyhow::Result<()> {
    let stream = &source.keys.stream;
    let what = || format!("moving {stream}/{} to {target}", entry.id);
    let fields = entry.fields.as_deref().unwrap_or_default();
    if !cluster {
        let mut script = MOVE.key(target);
        script
            .key(stream)
            .arg(source.group.as_deref().unwrap_or(""))
            .arg(&entry.id);
        for (k, v) in fields {
            script.arg(k).arg(v);
        }
        let _: Value = script.invoke_async(conn).await.with_context(what)?;
        return Ok(());
    }
    let mut add = redis::cmd("XADD");
    add.arg(target).arg("*");
    for (k, v) in fields {
        add.arg(k).arg(v);
    }
    let _: Value = add.query_async(conn).await.with_context(what)?;
    let mut remove = redis::pipe();
    remove.atomic();
    if let Some(group) = &source.group {
        remove
            .cmd("XACK")
            .arg(stream)
            .arg(group)
            .arg(&entry.id)
            .ignore();
    }
    remove.cmd("XDEL").arg(stream).arg(&entry.id).ignore();
    let _: Value = remove.query_async(conn).await.with_context(what)?;
    Ok(())
}
