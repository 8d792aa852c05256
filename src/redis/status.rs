//! `sessionizer status` on Redis: each shard's lease holder, its group's
//! progress and the stream's end, plus streams of another shard count that
//! still hold entries (see [`super::reshard`]).

use anyhow::Context as _;

use super::connection::RedisConn;
use super::entry::id_order;
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
        let mut row = PartitionStatus {
            partition: keys.stream.clone(),
            owner,
            ..PartitionStatus::default()
        };
        let exists: bool = redis::cmd("EXISTS")
            .arg(&keys.stream)
            .query_async(conn)
            .await
            .with_context(|| format!("checking {}", keys.stream))?;
        if !exists {
            row.note = Some("no stream yet".to_owned());
            rows.push(row);
            continue;
        }
        row.end = last_entry_id(conn, &keys.stream)
            .await
            .with_context(|| format!("reading the end of {}", keys.stream))?;
        match group_state(conn, &keys.stream, &section.group)
            .await
            .with_context(|| format!("reading the groups of {}", keys.stream))?
        {
            Some(group) => {
                row.position = Some(group.last_delivered);
                row.pending = Some(group.pending);
                row.lag = group.lag;
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

/// A shard stream's group as `status` and the consumer-lag gauge see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GroupState {
    pub last_delivered: String,
    pub pending: u64,
    /// Entries not yet delivered to the group: 0 once it has read past the
    /// stream's last entry (Redis's own `lag` stays wrong after entries were
    /// deleted, as a reshard does), else Redis's `lag` (`None` while Redis
    /// cannot say).
    pub lag: Option<u64>,
}

/// The group's state on `stream`, `None` without the group.
pub(super) async fn group_state(
    conn: &mut RedisConn,
    stream: &str,
    group: &str,
) -> Result<Option<GroupState>, redis::RedisError> {
    let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await?;
    let Some(info) = groups.groups.into_iter().find(|g| g.name == group) else {
        return Ok(None);
    };
    let read_all = last_entry_id(conn, stream)
        .await?
        .is_none_or(|last| id_order(&info.last_delivered_id) >= id_order(&last));
    Ok(Some(GroupState {
        lag: if read_all {
            Some(0)
        } else {
            info.lag.map(|l| l as u64)
        },
        pending: info.pending as u64,
        last_delivered: info.last_delivered_id,
    }))
}

/// The id of the stream's last entry, `None` when it has none.
pub(crate) async fn last_entry_id(
    conn: &mut RedisConn,
    stream: &str,
) -> Result<Option<String>, redis::RedisError> {
    let last: Vec<(String, redis::Value)> = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(last.into_iter().next().map(|(id, _)| id))
}
