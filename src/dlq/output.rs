//! How dead letters are shown: a readable table, JSON lines (payload
//! included, for jq), and the counts of `dlq stats`.

use std::collections::BTreeMap;
use std::io::{self, Write};

use serde_json::{json, Map, Value};

use super::DlqEntry;

/// Text as it should appear in one table cell: control characters escaped
/// (so a row stays one line), everything else as it is (quotes, accents), at
/// most `width` characters (an ellipsis marks a cut).
fn cell(bytes: &[u8], width: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    let shown = text.chars().flat_map(|c| {
        let escaped: Vec<char> = if c.is_control() {
            c.escape_default().collect()
        } else {
            vec![c]
        };
        escaped
    });
    for (count, c) in shown.enumerate() {
        if count + 1 >= width {
            out.push('…');
            return out;
        }
        out.push(c);
    }
    out
}

pub fn table_header(out: &mut (impl Write + ?Sized)) -> io::Result<()> {
    writeln!(
        out,
        "{:<36} {:<24} {:<14} {:<28} {:<60} ERROR",
        "POSITION", "FAILED AT", "REASON", "SOURCE", "PAYLOAD"
    )
}

/// One dead letter as a row. The error comes last and whole: it is what an
/// operator acts on, and cut at a fixed width it lost its point.
pub fn table_row(out: &mut (impl Write + ?Sized), e: &DlqEntry) -> io::Result<()> {
    let source = match &e.source_partition {
        Some(p) if p != &e.source => format!("{}[{p}]@{}", e.source, e.source_position),
        _ => format!("{}@{}", e.source, e.source_position),
    };
    writeln!(
        out,
        "{:<36} {:<24} {:<14} {:<28} {:<60} {}",
        cell(e.position.as_bytes(), 36),
        e.failed_at,
        e.reason,
        cell(source.as_bytes(), 28),
        cell(&e.payload, 60),
        cell(e.error.as_bytes(), usize::MAX)
    )
}

/// Bytes as JSON: a string when they are UTF-8; otherwise base64 under the
/// `<name>_base64` key.
fn put_bytes(object: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    use base64::Engine;
    match std::str::from_utf8(bytes) {
        Ok(text) => object.insert(name.to_owned(), text.into()),
        Err(_) => object.insert(
            format!("{name}_base64"),
            base64::engine::general_purpose::STANDARD
                .encode(bytes)
                .into(),
        ),
    };
}

/// One dead letter as a JSON object (one line of `--json`).
pub fn to_json(e: &DlqEntry) -> Value {
    let mut object = Map::new();
    object.insert("position".into(), e.position.clone().into());
    object.insert("failed_at".into(), e.failed_at.clone().into());
    object.insert("reason".into(), e.reason.clone().into());
    object.insert("error".into(), e.error.clone().into());
    object.insert(
        "source".into(),
        json!({
            "name": e.source,
            "partition": e.source_partition,
            "position": e.source_position,
        }),
    );
    object.insert("worker".into(), e.worker.clone().into());
    object.insert("replay_count".into(), e.replay_count.into());
    if let Some(key) = &e.key {
        put_bytes(&mut object, "key", key);
    }
    put_bytes(&mut object, "payload", &e.payload);
    if let Some(t) = &e.truncated {
        object.insert(
            "truncated".into(),
            json!({"original_bytes": t.original_bytes, "original_sha256": t.original_sha256}),
        );
    }
    if !e.headers.is_empty() {
        let mut headers = Map::new();
        for (k, v) in &e.headers {
            put_bytes(&mut headers, k, v);
        }
        object.insert("headers".into(), Value::Object(headers));
    }
    Value::Object(object)
}

/// What `dlq stats` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub total: u64,
    pub by_reason: BTreeMap<String, u64>,
    /// By source and partition (`topic[3]`, `stream[1]`, a file's name).
    pub by_source_partition: BTreeMap<String, u64>,
    /// (failed at, position) of the oldest and newest entry.
    pub oldest: Option<(String, String)>,
    pub newest: Option<(String, String)>,
    /// Their parsed times (`DlqEntry::failed_at_ms`), for comparing.
    oldest_ms: Option<Option<i64>>,
    newest_ms: Option<Option<i64>>,
    /// Of those, handled by a `dlq replay` already, by reason, where the
    /// store can tell (Kafka: see `KafkaDlq::replayed`).
    pub replayed: Option<BTreeMap<String, u64>>,
}

impl Stats {
    /// Counts an entry; `replayed`: whether a replay handled it, when known.
    pub fn add(&mut self, e: &DlqEntry, replayed: Option<bool>) {
        if let Some(r) = replayed {
            let counts = self.replayed.get_or_insert_with(BTreeMap::new);
            *counts.entry(e.reason.clone()).or_default() += u64::from(r);
        }
        self.total += 1;
        *self.by_reason.entry(e.reason.clone()).or_default() += 1;
        let partition = match &e.source_partition {
            Some(p) => format!("{}[{p}]", e.source),
            None => e.source.clone(),
        };
        *self.by_source_partition.entry(partition).or_default() += 1;
        let at = (e.failed_at.clone(), e.position.clone());
        if self.oldest_ms.is_none_or(|o| e.failed_at_ms < o) {
            self.oldest = Some(at.clone());
            self.oldest_ms = Some(e.failed_at_ms);
        }
        if self.newest_ms.is_none_or(|n| e.failed_at_ms >= n) {
            self.newest = Some(at);
            self.newest_ms = Some(e.failed_at_ms);
        }
    }

    pub fn to_json(&self) -> Value {
        let at = |x: &Option<(String, String)>| {
            x.as_ref()
                .map(|(t, p)| json!({"failed_at": t, "position": p}))
        };
        let mut stats = json!({
            "total": self.total,
            "by_reason": self.by_reason,
            "by_source_partition": self.by_source_partition,
            "oldest": at(&self.oldest),
            "newest": at(&self.newest),
        });
        if let Some(replayed) = &self.replayed {
            stats["replayed"] = json!({
                "total": replayed.values().sum::<u64>(),
                "by_reason": replayed,
            });
        }
        stats
    }

    pub fn print(&self, out: &mut impl Write) -> io::Result<()> {
        let replayed = |reason: &str| {
            self.replayed.as_ref().map_or_else(String::new, |r| {
                format!("  ({} handled by a replay)", r.get(reason).unwrap_or(&0))
            })
        };
        writeln!(out, "dead letters: {}", self.total)?;
        writeln!(out, "\nby reason:")?;
        for (reason, n) in &self.by_reason {
            writeln!(out, "  {reason:<20} {n}{}", replayed(reason))?;
        }
        writeln!(out, "\nby source partition:")?;
        for (partition, n) in &self.by_source_partition {
            writeln!(out, "  {partition:<40} {n}")?;
        }
        for (label, at) in [("oldest", &self.oldest), ("newest", &self.newest)] {
            if let Some((t, p)) = at {
                writeln!(out, "\n{label}: {t} at {p}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_escape_control_characters_and_cut_long_text() {
        assert_eq!(cell(b"a\nb", 10), "a\\nb");
        assert_eq!(cell(b"abcdefgh", 5), "abcd…");
        assert_eq!(cell(b"abcd", 5), "abcd");
        assert_eq!(
            cell(r#"{"text":"café"}"#.as_bytes(), 60),
            r#"{"text":"café"}"#,
            "quotes and accents as they are"
        );
    }

    #[test]
    fn a_row_keeps_the_whole_error_last() {
        let error = "event_time 1700000000000 plus window.gap (3000 ms) is before the \
                     partition's watermark (1700000100000) and the event reaches no open session";
        let entry = DlqEntry {
            position: "chat-dlq/0@7".into(),
            locator: super::super::Locator::File { line: 7 },
            failed_at: "2026-12-03T20:00:00.000Z".into(),
            failed_at_ms: None,
            reason: "late".into(),
            error: error.into(),
            source: "chat".into(),
            source_partition: Some("0".into()),
            source_position: "41".into(),
            worker: "w".into(),
            replay_count: 0,
            key: None,
            payload: br#"{"text":"where is it"}"#.to_vec(),
            truncated: None,
            headers: Vec::new(),
        };
        let mut out = Vec::new();
        table_row(&mut out, &entry).unwrap();
        let row = String::from_utf8(out).unwrap();
        assert!(row.trim_end().ends_with(error), "{row}");
        assert!(row.contains(r#"{"text":"where is it"}"#), "{row}");
    }

    #[test]
    fn binary_payloads_are_base64_in_json() {
        let mut object = Map::new();
        put_bytes(&mut object, "payload", &[0xff, 0x00]);
        assert_eq!(object["payload_base64"], "/wA=");
        put_bytes(&mut object, "key", b"user-1");
        assert_eq!(object["key"], "user-1");
    }
}
