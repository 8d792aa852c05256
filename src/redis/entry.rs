//! Stream entries as the pipeline sees them.
//!
//! An input entry carries the event either as one field `payload` (JSON or
//! protobuf bytes, exactly what a Kafka record value would hold) or as flat
//! fields named like the ChatEvent's (`message_id`, `user_id`,
//! `conversation_id`, `kind`, `text`, `event_time`, `attributes` as a JSON
//! object), the usual Redis idiom. Flat fields are turned into the JSON event
//! so both forms go through the one decoder with the same validation.

use std::borrow::Cow;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use redis::Value;
use serde_json::{Map, Value as Json};

use crate::codec::Poison;

/// One entry read from a shard stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    /// `None` when the entry was deleted (trimmed) while pending.
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// Whether the entry held a `payload` field or flat event fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Payload,
    Fields,
}

impl Form {
    pub fn as_str(self) -> &'static str {
        match self {
            Form::Payload => "payload",
            Form::Fields => "fields",
        }
    }
}

impl Entry {
    /// The bytes to decode, and the form they came in. For flat fields that
    /// is a JSON object of every field (values as strings, `event_time` as a
    /// number when it is one, `attributes` parsed when it is a JSON object),
    /// which is also what a dead letter keeps as `payload`.
    ///
    /// A flat field that is not UTF-8 is never decoded lossily (two user ids
    /// differing only in invalid bytes would become one user): the entry is
    /// poison, reason `invalid`, naming the field, and the JSON object keeps
    /// such a value as `{"base64": …}`, so the dead letter loses no byte.
    pub fn payload(&self) -> (Cow<'_, [u8]>, Form, Option<Poison>) {
        if let Some(v) = self.field("payload") {
            return (Cow::Borrowed(v), Form::Payload, None);
        }
        let fields = self.fields.as_deref().unwrap_or_default();
        let mut object = Map::new();
        let mut poison = None;
        for (k, v) in fields {
            let key = match std::str::from_utf8(k) {
                Ok(key) => key.to_owned(),
                Err(_) => {
                    poison.get_or_insert_with(|| {
                        Poison::invalid(format!(
                            "a field name is not UTF-8 (base64 {})",
                            BASE64.encode(k)
                        ))
                    });
                    format!("base64:{}", BASE64.encode(k))
                }
            };
            let Ok(text) = std::str::from_utf8(v) else {
                poison.get_or_insert_with(|| {
                    Poison::invalid(format!(
                        "field `{key}` is not UTF-8 (kept as base64 in the dead letter)"
                    ))
                });
                object.insert(key, serde_json::json!({ "base64": BASE64.encode(v) }));
                continue;
            };
            let value = match key.as_str() {
                "event_time" => text
                    .parse::<i64>()
                    .map(Json::from)
                    .unwrap_or_else(|_| Json::String(text.to_owned())),
                "attributes" => match serde_json::from_str::<Json>(text) {
                    Ok(parsed @ Json::Object(_)) => parsed,
                    _ => Json::String(text.to_owned()),
                },
                _ => Json::String(text.to_owned()),
            };
            object.insert(key, value);
        }
        (
            Cow::Owned(
                serde_json::to_vec(&Json::Object(object)).expect("a JSON object serializes"),
            ),
            Form::Fields,
            poison,
        )
    }

    /// The value of the first field called `name`.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The `sessionizer.replay.*` fields a `dlq replay` added.
    pub fn replay_fields(&self) -> impl Iterator<Item = (&'static str, &[u8])> {
        self.fields
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    crate::model::dead_letter_names::replay_name(k)?,
                    v.as_slice(),
                ))
            })
    }
}

/// Parses the entries of a stream reply (`[[id, [field, value, …]], …]`).
pub fn parse_entries(value: Value) -> Result<Vec<Entry>, String> {
    let Value::Array(items) = value else {
        return match value {
            Value::Nil => Ok(Vec::new()),
            other => Err(format!("expected an array of entries, got {other:?}")),
        };
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(mut parts) = item else {
                return Err(format!("expected an entry, got {item:?}"));
            };
            if parts.len() != 2 {
                return Err(format!("expected [id, fields], got {parts:?}"));
            }
            let fields = parts.pop().expect("two parts");
            let id = bulk_string(parts.pop().expect("two parts"))?;
            let fields = match fields {
                Value::Nil => None,
                Value::Array(flat) => {
                    let mut pairs = Vec::with_capacity(flat.len() / 2);
                    let mut flat = flat.into_iter();
                    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                        pairs.push((bytes(k)?, bytes(v)?));
                    }
                    Some(pairs)
                }
                other => return Err(format!("expected entry fields, got {other:?}")),
            };
            Ok(Entry { id, fields })
        })
        .collect()
}

/// The entries of an `XREADGROUP`/`XREAD` reply for one stream (nil when
/// nothing was read).
pub fn parse_read_reply(value: Value) -> Result<Vec<Entry>, String> {
    match value {
        Value::Nil => Ok(Vec::new()),
        Value::Array(mut streams) => match streams.pop() {
            None => Ok(Vec::new()),
            Some(Value::Array(mut stream)) if stream.len() == 2 => {
                parse_entries(stream.pop().expect("two parts"))
            }
            Some(other) => Err(format!("expected [stream, entries], got {other:?}")),
        },
        Value::Map(mut streams) => match streams.pop() {
            None => Ok(Vec::new()),
            Some((_, entries)) => parse_entries(entries),
        },
        other => Err(format!("expected a stream read reply, got {other:?}")),
    }
}

/// An entry id as a number pair, for ordering (across streams too).
pub fn id_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

pub fn bytes(value: Value) -> Result<Vec<u8>, String> {
    match value {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        other => Err(format!("expected a string, got {other:?}")),
    }
}

pub fn bulk_string(value: Value) -> Result<String, String> {
    String::from_utf8(bytes(value)?).map_err(|e| format!("expected UTF-8: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> Entry {
        Entry {
            id: "1-0".into(),
            fields: Some(
                fields
                    .iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn a_payload_field_is_taken_byte_for_byte() {
        let e = entry(&[("payload", "{\"a\": 1}"), ("x", "y")]);
        let (bytes, form, poison) = e.payload();
        assert_eq!(&*bytes, b"{\"a\": 1}");
        assert_eq!(poison, None);
        assert_eq!(form, Form::Payload);
    }

    #[test]
    fn flat_fields_become_the_json_event() {
        let e = entry(&[
            ("message_id", "m1"),
            ("user_id", "u"),
            ("text", "hi"),
            ("event_time", "1700000000000"),
            ("attributes", "{\"lang\":\"en\"}"),
        ]);
        let (bytes, form, poison) = e.payload();
        assert_eq!(form, Form::Fields);
        assert_eq!(poison, None);
        let json: Json = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["event_time"], 1_700_000_000_000i64);
        assert_eq!(json["attributes"]["lang"], "en");
        assert_eq!(json["text"], "hi");
        let e = entry(&[("event_time", "2026-01-01T00:00:00Z")]);
        let (bytes, _, _) = e.payload();
        let json: Json = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["event_time"], "2026-01-01T00:00:00Z");
    }

    #[test]
    fn a_flat_field_that_is_not_utf8_is_poison_and_kept_whole() {
        // Two users whose ids differ only in invalid bytes must never become
        // one user "\u{fffd}" (a lossy decode merged their turns).
        let payloads: Vec<_> = [b"\xff".as_slice(), b"\x83"]
            .into_iter()
            .map(|user| {
                let e = Entry {
                    id: "1-0".into(),
                    fields: Some(vec![
                        (b"message_id".to_vec(), b"m1".to_vec()),
                        (b"user_id".to_vec(), user.to_vec()),
                        (b"text".to_vec(), b"caf\xe9".to_vec()),
                    ]),
                };
                let (bytes, form, poison) = e.payload();
                assert_eq!(form, Form::Fields);
                let poison = poison.expect("not UTF-8 is poison");
                assert_eq!(poison.reason, crate::model::DeadLetterReason::Invalid);
                assert!(poison.message.contains("`user_id`"), "{}", poison.message);
                let json: Json = serde_json::from_slice(&bytes).unwrap();
                let kept = BASE64
                    .decode(json["user_id"]["base64"].as_str().unwrap())
                    .unwrap();
                assert_eq!(kept, user, "the original bytes survive");
                assert_eq!(
                    BASE64
                        .decode(json["text"]["base64"].as_str().unwrap())
                        .unwrap(),
                    b"caf\xe9"
                );
                bytes.into_owned()
            })
            .collect();
        assert_ne!(payloads[0], payloads[1]);
    }

    #[test]
    fn replies_parse_and_deleted_entries_have_no_fields() {
        let reply = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"s".to_vec()),
            Value::Array(vec![
                Value::Array(vec![
                    Value::BulkString(b"1-0".to_vec()),
                    Value::Array(vec![
                        Value::BulkString(b"payload".to_vec()),
                        Value::BulkString(b"x".to_vec()),
                    ]),
                ]),
                Value::Array(vec![Value::BulkString(b"2-0".to_vec()), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read_reply(reply).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(&*entries[0].payload().0, b"x");
        assert_eq!(entries[1].fields, None);
        assert_eq!(parse_read_reply(Value::Nil).unwrap(), vec![]);
    }
}
