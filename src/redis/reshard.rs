//! `sessionizer reshard`: after a change of `redis.shards`, moves every entry
//! the workers of the old shard count had not finished (pending in the
//! group, or not read yet) to the shard stream of its session key under the
//! new count, and removes the old streams the new count does not use, so no
//! stream and no entry is left behind (`docs/redis.md`, "Changing the shard
//! count").
//!
//! It refuses to run while any old shard is leased: a running worker would
//! keep reading and acking the entries being moved.

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
    /// Entries added to another shard stream and removed from their old one.
    pub moved: u64,
    /// Unfinished entries already in the stream of their key's new shard.
    pub kept: u64,
    /// Old streams (and their lease, epoch and marker keys) deleted.
    pub removed: Vec<String>,
}

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
    let client = super::connection::client(section)?;
    let mut conn = super::connection::connect(&client, std::time::Duration::from_secs(2))
        .await
        .with_context(|| {
            format!(
                "connecting to {}",
                super::connection::display_url(&section.url)
            )
        })?;
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
    for keys in &old {
        let holder: Option<String> = redis::cmd("GET")
            .arg(&keys.lease)
            .query_async(conn)
            .await
            .with_context(|| format!("reading the lease {}", keys.lease))?;
        if let Some(holder) = holder {
            anyhow::bail!(
                "{} is leased by a running worker ({holder}): stop every worker before resharding \
                 (docs/redis.md, \"Changing the shard count\")",
                keys.stream
            );
        }
    }
    let new_streams: HashSet<&str> = new.iter().map(|k| k.stream.as_str()).collect();
    let mut report = ReshardReport::default();
    for keys in &old {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&keys.stream)
            .query_async(conn)
            .await
            .with_context(|| format!("checking {}", keys.stream))?;
        if !exists {
            continue;
        }
        let (moved, kept) =
            move_unfinished(conn, section, decoder, keys, &new, dry_run, out).await?;
        report.moved += moved;
        report.kept += kept;
        if !new_streams.contains(keys.stream.as_str()) {
            if !dry_run {
                let _: i64 = redis::cmd("DEL")
                    .arg(&keys.stream)
                    .arg(&keys.lease)
                    .arg(&keys.epoch)
                    .arg(&keys.in_flight)
                    .arg(&keys.fence)
                    .query_async(conn)
                    .await
                    .with_context(|| format!("removing {}", keys.stream))?;
            }
            writeln!(out, "removed {} (no shard of the new count)", keys.stream)?;
            report.removed.push(keys.stream.clone());
        }
    }
    Ok(report)
}

/// Moves one old stream's unfinished entries; returns (moved, kept).
async fn move_unfinished(
    conn: &mut RedisConn,
    section: &RedisSection,
    decoder: &Decoder,
    keys: &ShardKeys,
    new: &[ShardKeys],
    dry_run: bool,
    out: &mut impl Write,
) -> anyhow::Result<(u64, u64)> {
    let (last_delivered, pending) = group_progress(conn, &keys.stream, &section.group).await?;
    let (mut moved, mut kept) = (0, 0);
    let mut from = "-".to_owned();
    loop {
        let page = redis::cmd("XRANGE")
            .arg(&keys.stream)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await
            .with_context(|| format!("reading {}", keys.stream))?;
        let entries = parse_entries(page).map_err(anyhow::Error::msg)?;
        let Some(last) = entries.last() else { break };
        from = format!("({}", last.id);
        for entry in &entries {
            let unfinished = pending.contains(&entry.id)
                || last_delivered
                    .as_ref()
                    .is_none_or(|l| id_order(&entry.id) > id_order(l));
            if !unfinished {
                continue;
            }
            let target = &new[new_shard(entry, decoder, keys.index, new.len() as u32) as usize];
            if target.stream == keys.stream {
                kept += 1;
                continue;
            }
            if !dry_run {
                let group = last_delivered.as_ref().map(|_| section.group.as_str());
                move_entry(
                    conn,
                    section.cluster,
                    group,
                    &keys.stream,
                    entry,
                    &target.stream,
                )
                .await?;
            }
            moved += 1;
        }
        if entries.len() < PAGE {
            break;
        }
    }
    writeln!(
        out,
        "{}: {moved} unfinished entries moved, {kept} kept",
        keys.stream
    )?;
    Ok((moved, kept))
}

/// The group's last-delivered id (`None`: no group, nothing read) and its
/// pending ids.
async fn group_progress(
    conn: &mut RedisConn,
    stream: &str,
    group: &str,
) -> anyhow::Result<(Option<String>, HashSet<String>)> {
    let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .with_context(|| format!("reading the groups of {stream}"))?;
    let Some(info) = groups.groups.into_iter().find(|g| g.name == group) else {
        return Ok((None, HashSet::new()));
    };
    let mut pending = HashSet::new();
    let mut from = "-".to_owned();
    loop {
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
        let full = reply.len() == PAGE;
        pending.extend(reply.into_iter().map(|(id, ..)| id));
        if !full {
            break;
        }
    }
    Ok((Some(info.last_delivered_id), pending))
}

/// The entry's shard under the new count: its session key's, or, for an
/// entry that does not decode (the worker will dead-letter it wherever it
/// lands), the old index's.
fn new_shard(entry: &Entry, decoder: &Decoder, old_index: u32, shards: u32) -> u32 {
    let (payload, _, refused) = entry.payload();
    match decoder.decode(&payload, now_ms()) {
        Ok(event) if refused.is_none() => {
            shard_of(&event.user_id, event.conversation_id.as_deref(), shards)
        }
        _ => old_index % shards,
    }
}

/// Adds the entry, field for field, to `target`, and acks (in `group`, when
/// the stream has one) and deletes it in its old stream: in one transaction
/// on one node; on a cluster, where the two streams are in different slots,
/// the add first (a kill between the two adds it again on the next run).
async fn move_entry(
    conn: &mut RedisConn,
    cluster: bool,
    group: Option<&str>,
    stream: &str,
    entry: &Entry,
    target: &str,
) -> anyhow::Result<()> {
    let what = || format!("moving {stream}/{} to {target}", entry.id);
    let mut add = redis::cmd("XADD");
    add.arg(target).arg("*");
    for (k, v) in entry.fields.as_deref().unwrap_or_default() {
        add.arg(k).arg(v);
    }
    let mut step = redis::pipe();
    step.atomic();
    if cluster {
        let _: Value = add.query_async(conn).await.with_context(what)?;
    } else {
        step.add_command(add).ignore();
    }
    if let Some(group) = group {
        step.cmd("XACK")
            .arg(stream)
            .arg(group)
            .arg(&entry.id)
            .ignore();
    }
    step.cmd("XDEL").arg(stream).arg(&entry.id).ignore();
    let _: Value = step.query_async(conn).await.with_context(what)?;
    Ok(())
}
