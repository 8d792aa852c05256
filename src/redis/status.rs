//! `sessionizer status` on Redis: each shard's lease holder, its group's
//! progress and the stream's end, plus streams of another shard count that
//! still hold entries (see [`super::reshard`]).

use anyhow::Context as _;

use super::connection::RedisConn;
use super::keys::ShardKeys;
use super::reshard::leftover_streams;
use crate::config::RedisSection;
use crate::status::PartitionStatus;

pub async fn shards(
    conn: &mut RedisConn,
    section: &RedisSection,
) -> anyhow::Result<Vec<PartitionStatus>> {
    let mut rows = Vec::new();
    for keys in ShardKeys::all(section) {
        let owner: Option<String> = redis::cmd("GET")
            .arg(&keys.lease)
            .query_async(conn)
            .await
            .with_context(|| format!("reading the lease {}", keys.lease))?;
        let exists: bool = redis::cmd("EXISTS")
            .arg(&keys.stream)
            .query_async(conn)
            .await
            .with_context(|| format!("checking {}", keys.stream))?;
        let mut row = PartitionStatus {
            partition: keys.stream.clone(),
            owner,
            ..PartitionStatus::default()
        };
        if !exists {
            row.note = Some("no stream yet".to_owned());
            rows.push(row);
            continue;
        }
        let stream: redis::streams::StreamInfoStreamReply = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&keys.stream)
            .query_async(conn)
            .await
            .with_context(|| format!("reading {}", keys.stream))?;
        row.end = Some(stream.last_generated_id);
        let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&keys.stream)
            .query_async(conn)
            .await
            .with_context(|| format!("reading the groups of {}", keys.stream))?;
        match groups.groups.into_iter().find(|g| g.name == section.group) {
            Some(group) => {
                row.position = Some(group.last_delivered_id);
                row.pending = Some(group.pending as u64);
                row.lag = group.lag.map(|l| l as u64);
            }
            None => row.note = Some(format!("no group {} yet", section.group)),
        }
        rows.push(row);
    }
    for (stream, entries) in leftover_streams(conn, section).await? {
        rows.push(PartitionStatus {
            partition: stream,
            note: Some(format!(
                "{entries} entries no worker reads under redis.shards = {}: see `sessionizer reshard`",
                section.shards
            )),
            ..PartitionStatus::default()
        });
    }
    Ok(rows)
}
