//! `sessionizer status`: per input partition (Kafka) or shard (Redis), who
//! owns it, how far its group has got, where its end is and the lag, read
//! from the broker (the broker's own view, whatever the workers say).
//! Open sessions are each owner's to say: its `/metrics` and progress line.

use std::io::Write;

use serde::Serialize;

/// One input partition or shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PartitionStatus {
    /// `topic/partition`, or the shard stream.
    pub partition: String,
    /// The owning worker (Kafka: the group member's client id and host;
    /// Redis: the lease value), `None` when nobody owns it.
    pub owner: Option<String>,
    /// Kafka: the group's committed offset; Redis: the last entry id the
    /// group read (its pending entries are not acked yet).
    pub position: Option<String>,
    /// Kafka: the high watermark; Redis: the stream's last entry id.
    pub end: Option<String>,
    /// Records between the position and the end (Redis: `None` while the
    /// server cannot say).
    pub lag: Option<u64>,
    /// Redis: entries read and not acked yet (open sessions, outcomes being
    /// written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
    /// Something the operator should know (a stream no worker reads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The rows of the configuration's broker.
pub async fn read(config: &crate::config::Config) -> anyhow::Result<Vec<PartitionStatus>> {
    use anyhow::Context as _;
    match config.source {
        crate::config::SourceKind::Kafka => {
            let kafka = config.kafka.clone().context("[kafka] is missing")?;
            tokio::task::spawn_blocking(move || crate::kafka::status::partitions(&kafka)).await?
        }
        crate::config::SourceKind::Redis => {
            let section = config.redis.as_ref().context("[redis] is missing")?;
            let mut conn = crate::redis::connection::connect_command(section).await?;
            crate::redis::status::shards(&mut conn, section).await
        }
        crate::config::SourceKind::File => anyhow::bail!(
            "status reads a broker's positions; file mode has none (source = \"file\")"
        ),
    }
}

/// Prints the rows as an aligned table, or one JSON object per line.
pub fn print(rows: &[PartitionStatus], json: bool, out: &mut impl Write) -> std::io::Result<()> {
    if json {
        for row in rows {
            serde_json::to_writer(&mut *out, row)?;
            writeln!(out)?;
        }
        return Ok(());
    }
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    let number = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let mut table = vec![[
        "PARTITION",
        "OWNER",
        "POSITION",
        "END",
        "LAG",
        "PENDING",
        "NOTE",
    ]
    .map(str::to_owned)];
    for r in rows {
        table.push([
            r.partition.clone(),
            dash(&r.owner),
            dash(&r.position),
            dash(&r.end),
            number(r.lag),
            number(r.pending),
            dash(&r.note),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| {
            table
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &table {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < row.len() {
                line.extend(std::iter::repeat_n(
                    ' ',
                    widths[c] - cell.chars().count() + 2,
                ));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}
