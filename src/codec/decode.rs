use std::borrow::Cow;
use std::fmt;

use prost::Message as _;
use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::proto;
use crate::model::{Attributes, ChatEvent, DeadLetterReason, EventKind};

/// How input records are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    Json,
    Protobuf,
    /// JSON when the first non-blank byte is `{`, protobuf otherwise.
    Auto,
}

/// The limits a record must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// A larger record is dead-lettered as `oversize` before it is parsed.
    pub max_record_bytes: usize,
    /// A message text over this is `oversize`.
    pub max_text_bytes: usize,
    /// An event time further ahead of the worker's clock is `invalid`: one
    /// wrong client clock must not drag a partition's watermark into the future.
    pub max_future_skew_ms: i64,
}

/// A record that cannot become an event: the dead-letter reason and a sentence
/// a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason:?}: {message}")]
pub struct Poison {
    pub reason: DeadLetterReason,
    pub message: String,
}

impl Poison {
    pub fn decode(message: impl Into<String>) -> Self {
        Poison {
            reason: DeadLetterReason::Decode,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Poison {
            reason: DeadLetterReason::Invalid,
            message: message.into(),
        }
    }

    pub fn oversize(message: impl Into<String>) -> Self {
        Poison {
            reason: DeadLetterReason::Oversize,
            message: message.into(),
        }
    }
}

/// Decodes and validates chat events. Pure: the wall clock comes in as `now_ms`.
#[derive(Debug, Clone)]
pub struct Decoder {
    format: InputFormat,
    limits: DecodeLimits,
}

/// The fields of an event before validation, from either encoding.
struct Fields<'a> {
    message_id: Option<Cow<'a, str>>,
    user_id: Option<Cow<'a, str>>,
    conversation_id: Option<Cow<'a, str>>,
    kind: Result<EventKind, String>,
    text: Option<Cow<'a, str>>,
    event_time: Option<EventTime<'a>>,
    attributes: Option<Attributes>,
    gap_ms: Option<i64>,
}

enum EventTime<'a> {
    Millis(i64),
    Rfc3339(Cow<'a, str>),
}

impl Decoder {
    pub fn new(format: InputFormat, limits: DecodeLimits) -> Self {
        Decoder { format, limits }
    }

    pub fn limits(&self) -> &DecodeLimits {
        &self.limits
    }

    /// Decodes one record. `now_ms` is the worker's wall clock, used only for
    /// the future-skew check.
    pub fn decode<'a>(&self, bytes: &'a [u8], now_ms: i64) -> Result<ChatEvent<'a>, Poison> {
        if bytes.len() > self.limits.max_record_bytes {
            return Err(Poison::oversize(format!(
                "the record is {} bytes, over input.max_record_bytes ({})",
                bytes.len(),
                self.limits.max_record_bytes
            )));
        }
        let text = || bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
        let fields = match self.format {
            InputFormat::Json => json_fields(text())?,
            InputFormat::Protobuf => protobuf_fields(bytes)?,
            InputFormat::Auto => match text().iter().find(|b| !b.is_ascii_whitespace()) {
                None => return Err(Poison::decode("the record is empty")),
                Some(b'{') => json_fields(text())?,
                Some(_) => protobuf_fields(bytes).map_err(|e| {
                    if std::str::from_utf8(bytes).is_ok() {
                        Poison::decode(format!(
                            "not an event: {} (a JSON event starts with `{{`)",
                            looks_like(bytes)
                        ))
                    } else {
                        e
                    }
                })?,
            },
        };
        self.validate(fields, now_ms)
    }

    fn validate<'a>(&self, f: Fields<'a>, now_ms: i64) -> Result<ChatEvent<'a>, Poison> {
        let message_id = required_id("message_id", f.message_id)?;
        let user_id = required_id("user_id", f.user_id)?;
        let conversation_id = match f.conversation_id {
            None => None,
            Some(c) => Some(bounded_id("conversation_id", c)?),
        };
        let kind = f.kind.map_err(Poison::invalid)?;
        let text = match kind {
            EventKind::Message => {
                let text = f.text.unwrap_or_default();
                if text.is_empty() {
                    return Err(Poison::invalid(
                        "field `text` is required and must not be empty for a message",
                    ));
                }
                if text.len() > self.limits.max_text_bytes {
                    return Err(Poison::oversize(format!(
                        "field `text` is {} bytes, over input.max_text_bytes ({})",
                        text.len(),
                        self.limits.max_text_bytes
                    )));
                }
                text
            }
            EventKind::Typing | EventKind::EndOfTurn => Cow::Borrowed(""),
        };
        let event_time = match f.event_time {
            None => {
                return Err(Poison::invalid(
                    "field `event_time` is required (epoch milliseconds or an RFC 3339 time)",
                ))
            }
            Some(EventTime::Millis(ms)) => ms,
            Some(EventTime::Rfc3339(s)) => chrono::DateTime::parse_from_rfc3339(&s)
                .map_err(|e| {
                    Poison::invalid(format!(
                        "field `event_time`: {s:?} is not an RFC 3339 time ({e})"
                    ))
                })?
                .timestamp_millis(),
        };
        if let Some(gap) = f.gap_ms.filter(|g| *g < 0) {
            return Err(Poison::invalid(format!(
                "field `gap_ms` must be a non-negative number of milliseconds, got {gap}"
            )));
        }
        if event_time <= 0 {
            return Err(Poison::invalid(format!(
                "field `event_time` must be a positive epoch-millisecond time, got {event_time}"
            )));
        }
        if event_time.saturating_sub(now_ms) > self.limits.max_future_skew_ms {
            return Err(Poison::invalid(format!(
                "field `event_time` ({event_time}) is more than input.max_future_skew ({} ms) \
                 ahead of the worker's clock: the sending client's clock is probably wrong",
                self.limits.max_future_skew_ms
            )));
        }
        Ok(ChatEvent {
            message_id,
            user_id,
            conversation_id,
            kind,
            text,
            event_time,
            attributes: f.attributes.filter(|a| !a.is_empty()).map(Box::new),
            gap_ms: f.gap_ms,
        })
    }
}

const MAX_ID_BYTES: usize = 128;

/// A byte-order mark some editors put at the start of a UTF-8 file: skipped
/// before a JSON record.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

fn required_id<'a>(field: &str, value: Option<Cow<'a, str>>) -> Result<Cow<'a, str>, Poison> {
    match value {
        Some(v) if !v.is_empty() => bounded_id(field, v),
        _ => Err(Poison::invalid(format!(
            "field `{field}` is required and must not be empty"
        ))),
    }
}

fn bounded_id<'a>(field: &str, value: Cow<'a, str>) -> Result<Cow<'a, str>, Poison> {
    if value.is_empty() || value.len() > MAX_ID_BYTES {
        return Err(Poison::invalid(format!(
            "field `{field}` must be 1 to {MAX_ID_BYTES} bytes, got {}",
            value.len()
        )));
    }
    Ok(value)
}

fn parse_kind(kind: Option<&str>) -> Result<EventKind, String> {
    match kind {
        None | Some("message") => Ok(EventKind::Message),
        Some("typing") => Ok(EventKind::Typing),
        Some("end_of_turn") => Ok(EventKind::EndOfTurn),
        Some(other) => Err(format!(
            "field `kind` must be \"message\", \"typing\" or \"end_of_turn\", got {other:?}"
        )),
    }
}

/// The JSON shape. Unknown fields are ignored; `null` counts as absent.
#[derive(serde::Deserialize)]
struct JsonEvent<'a> {
    #[serde(borrow, default)]
    message_id: Option<Str<'a>>,
    #[serde(borrow, default)]
    user_id: Option<Str<'a>>,
    #[serde(borrow, default)]
    conversation_id: Option<Str<'a>>,
    #[serde(borrow, default)]
    kind: Option<Str<'a>>,
    #[serde(borrow, default)]
    text: Option<Str<'a>>,
    #[serde(borrow, default)]
    event_time: Option<JsonEventTime<'a>>,
    #[serde(default)]
    attributes: Option<Attributes>,
    #[serde(default)]
    gap_ms: Option<i64>,
}

fn json_fields(bytes: &[u8]) -> Result<Fields<'_>, Poison> {
    // One UTF-8 check of the whole record is cheaper than serde_json's check
    // of every string, and says more precisely what is wrong.
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let what = if object {
            String::new()
        } else {
            format!(": {}", looks_like(bytes))
        };
        Poison::decode(format!(
            "not valid JSON: the record is not UTF-8 ({e}){what}"
        ))
    })?;
    match super::fast_json::read(text) {
        Some(f) => Ok(fast_fields(f)),
        None => serde_fields(text),
    }
}

fn fast_fields(f: super::fast_json::FastFields<'_>) -> Fields<'_> {
    Fields {
        message_id: f.message_id.map(Cow::Borrowed),
        user_id: f.user_id.map(Cow::Borrowed),
        conversation_id: f.conversation_id.map(Cow::Borrowed),
        kind: parse_kind(f.kind),
        text: f.text.map(Cow::Borrowed),
        event_time: f.event_time.map(|t| match t {
            Ok(ms) => EventTime::Millis(ms),
            Err(s) => EventTime::Rfc3339(Cow::Borrowed(s)),
        }),
        attributes: None,
        gap_ms: None,
    }
}

/// What undecodable bytes look like, for the dead letter's error: text
/// (its start), a known compressed format, or other binary (its first
/// bytes), so an operator sees at once a plain-text producer or a
/// compressed payload.
fn looks_like(bytes: &[u8]) -> String {
    const SHOWN: usize = 8;
    if bytes.is_empty() {
        return "the record is empty".to_owned();
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        let start: String = text.chars().take(24).collect();
        let more = if start.len() < text.len() { "…" } else { "" };
        return format!("text starting {start:?}{more}");
    }
    let hex: Vec<String> = bytes
        .iter()
        .take(SHOWN)
        .map(|b| format!("{b:02x}"))
        .collect();
    let kind = match bytes {
        [0x1f, 0x8b, ..] => "gzip-compressed data",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd-compressed data",
        [0x04, 0x22, 0x4d, 0x18, ..] => "lz4-compressed data",
        _ => "binary data",
    };
    format!("{kind}, {} bytes starting {}", bytes.len(), hex.join(" "))
}

/// The full JSON decoder: every shape, and the errors.
fn serde_fields(text: &str) -> Result<Fields<'_>, Poison> {
    let raw: JsonEvent<'_> = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) if e.is_data() => {
            // Well-formed JSON with a wrong field: parse again to name the field.
            let mut de = serde_json::Deserializer::from_str(text);
            let message = match serde_path_to_error::deserialize::<_, JsonEvent<'_>>(&mut de) {
                Err(e) if e.path().iter().next().is_some() => {
                    format!("field `{}`: {}", e.path(), e.inner())
                }
                _ => e.to_string(),
            };
            return Err(Poison::invalid(message));
        }
        Err(e) => return Err(Poison::decode(format!("not valid JSON: {e}"))),
    };
    Ok(Fields {
        message_id: raw.message_id.map(|s| s.0),
        user_id: raw.user_id.map(|s| s.0),
        conversation_id: raw.conversation_id.map(|s| s.0),
        kind: parse_kind(raw.kind.as_ref().map(|k| &*k.0)),
        text: raw.text.map(|s| s.0),
        event_time: raw.event_time.map(|t| t.0),
        attributes: raw.attributes,
        gap_ms: raw.gap_ms,
    })
}

fn protobuf_fields(bytes: &[u8]) -> Result<Fields<'static>, Poison> {
    let event = proto::ChatEvent::decode(bytes).map_err(|e| {
        Poison::decode(format!(
            "not a valid protobuf ChatEvent ({e}): {}",
            looks_like(bytes)
        ))
    })?;
    let kind = match proto::EventKind::try_from(event.kind) {
        Ok(proto::EventKind::Message) => Ok(EventKind::Message),
        Ok(proto::EventKind::Typing) => Ok(EventKind::Typing),
        Ok(proto::EventKind::EndOfTurn) => Ok(EventKind::EndOfTurn),
        Err(_) => Err(format!(
            "field `kind` has the unknown enum value {}",
            event.kind
        )),
    };
    let present = |s: String| (!s.is_empty()).then_some(Cow::Owned(s));
    Ok(Fields {
        message_id: present(event.message_id),
        user_id: present(event.user_id),
        conversation_id: event.conversation_id.map(Cow::Owned),
        kind,
        text: present(event.text),
        // proto3 cannot tell 0 from unset: 0 counts as missing.
        event_time: (event.event_time_ms != 0).then_some(EventTime::Millis(event.event_time_ms)),
        attributes: Some(event.attributes),
        gap_ms: event.gap_ms,
    })
}

/// A JSON string borrowed from the record when it has no escapes. (serde does
/// not borrow through `Option<Cow<str>>`, hence this newtype.)
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> Visitor<'de> for StrVisitor {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
}

/// `event_time`: integer epoch milliseconds or an RFC 3339 string.
struct JsonEventTime<'a>(EventTime<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for JsonEventTime<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TimeVisitor;
        impl<'de> Visitor<'de> for TimeVisitor {
            type Value = JsonEventTime<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("integer epoch milliseconds or an RFC 3339 string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(JsonEventTime(EventTime::Millis(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                i64::try_from(v)
                    .map(|v| JsonEventTime(EventTime::Millis(v)))
                    .map_err(|_| E::custom("epoch milliseconds out of range"))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(JsonEventTime(EventTime::Rfc3339(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(JsonEventTime(EventTime::Rfc3339(Cow::Owned(v.to_owned()))))
            }
        }
        deserializer.deserialize_any(TimeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn decoder(format: InputFormat) -> Decoder {
        Decoder::new(
            format,
            DecodeLimits {
                max_record_bytes: 1024,
                max_text_bytes: 16,
                max_future_skew_ms: 300_000,
            },
        )
    }

    fn json(bytes: &[u8]) -> Result<ChatEvent<'_>, Poison> {
        decoder(InputFormat::Json).decode(bytes, NOW)
    }

    fn reason(bytes: &[u8]) -> (DeadLetterReason, String) {
        let p = json(bytes).unwrap_err();
        (p.reason, p.message)
    }

    #[test]
    fn a_leading_byte_order_mark_is_skipped_and_text_is_not_called_protobuf() {
        let line = b"\xEF\xBB\xBF{\"message_id\":\"m1\",\"user_id\":\"u1\",\"text\":\"hi\",\"event_time\":1700000000000}";
        for format in [InputFormat::Json, InputFormat::Auto] {
            let e = decoder(format).decode(line, NOW).unwrap();
            assert_eq!(e.message_id, "m1");
        }
        let p = decoder(InputFormat::Auto)
            .decode(b"hello there", NOW)
            .unwrap_err();
        assert_eq!(p.reason, DeadLetterReason::Decode);
        assert!(p.message.starts_with("not an event: text"), "{}", p.message);
    }

    #[test]
    fn decodes_a_message_and_borrows_its_strings() {
        let e = json(br#"{"message_id":"m1","user_id":"u1","text":"hi","event_time":1700000000000,"extra":[1]}"#).unwrap();
        assert_eq!(e.kind, EventKind::Message, "kind defaults to message");
        assert_eq!(e.event_time, 1_700_000_000_000);
        assert!(matches!(e.text, Cow::Borrowed("hi")));
        assert_eq!(e.conversation_id, None);
    }

    #[test]
    fn accepts_rfc3339_times_escapes_and_attributes() {
        let e = json(
            br#"{"message_id":"m1","user_id":"u1","conversation_id":"c","text":"a\nb","event_time":"2023-11-14T22:13:20.5+01:00","attributes":{"lang":"en"}}"#,
        )
        .unwrap();
        assert_eq!(e.event_time, 1_699_996_400_500);
        assert_eq!(e.text, "a\nb");
        assert_eq!(e.conversation_id.as_deref(), Some("c"));
        assert_eq!(
            e.attributes.unwrap().get("lang").map(String::as_str),
            Some("en")
        );
    }

    #[test]
    fn typing_needs_no_text() {
        let e =
            json(br#"{"message_id":"t","user_id":"u","kind":"typing","event_time":5}"#).unwrap();
        assert_eq!(e.kind, EventKind::Typing);
        assert_eq!(e.text, "");
    }

    #[test]
    fn each_poison_gets_its_reason_and_names_the_field() {
        let cases: &[(&[u8], DeadLetterReason, &str)] = &[
            (b"not json", DeadLetterReason::Decode, "not valid JSON"),
            (b"{\"message_id\":", DeadLetterReason::Decode, "not valid JSON"),
            (br#"{"user_id":"u","text":"x","event_time":5}"#, DeadLetterReason::Invalid, "`message_id` is required"),
            (br#"{"message_id":"","user_id":"u","text":"x","event_time":5}"#, DeadLetterReason::Invalid, "`message_id` is required"),
            (br#"{"message_id":"m","user_id":7,"text":"x","event_time":5}"#, DeadLetterReason::Invalid, "field `user_id`"),
            (br#"{"message_id":"m","user_id":"u","conversation_id":"","text":"x","event_time":5}"#, DeadLetterReason::Invalid, "`conversation_id` must be 1 to 128"),
            (br#"{"message_id":"m","user_id":"u","text":"","event_time":5}"#, DeadLetterReason::Invalid, "`text` is required"),
            (br#"{"message_id":"m","user_id":"u","event_time":5}"#, DeadLetterReason::Invalid, "`text` is required"),
            (br#"{"message_id":"m","user_id":"u","kind":"shout","text":"x","event_time":5}"#, DeadLetterReason::Invalid, "`kind` must be"),
            (br#"{"message_id":"m","user_id":"u","text":"x"}"#, DeadLetterReason::Invalid, "`event_time` is required"),
            (br#"{"message_id":"m","user_id":"u","text":"x","event_time":1.5}"#, DeadLetterReason::Invalid, "field `event_time`"),
            (br#"{"message_id":"m","user_id":"u","text":"x","event_time":"yesterday"}"#, DeadLetterReason::Invalid, "not an RFC 3339 time"),
            (br#"{"message_id":"m","user_id":"u","text":"x","event_time":-1}"#, DeadLetterReason::Invalid, "positive"),
            (br#"{"message_id":"m","user_id":"u","text":"x","event_time":1700000400000}"#, DeadLetterReason::Invalid, "ahead of the worker's clock"),
            (br#"{"message_id":"m","user_id":"u","text":"x","event_time":5,"attributes":{"a":1}}"#, DeadLetterReason::Invalid, "field `attributes.a`"),
            (br#"{"message_id":"m","user_id":"u","text":"this text is too long","event_time":5}"#, DeadLetterReason::Oversize, "over input.max_text_bytes (16)"),
            (br#"[1,2]"#, DeadLetterReason::Invalid, "invalid type"),
        ];
        for (bytes, want_reason, want_text) in cases {
            let (got_reason, message) = reason(bytes);
            assert_eq!(
                got_reason,
                *want_reason,
                "{}: {message}",
                String::from_utf8_lossy(bytes)
            );
            assert!(
                message.contains(want_text),
                "{}: {message:?} lacks {want_text:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let long_id = format!(
            r#"{{"message_id":"{}","user_id":"u","text":"x","event_time":5}}"#,
            "m".repeat(129)
        );
        assert!(reason(long_id.as_bytes())
            .1
            .contains("`message_id` must be 1 to 128 bytes, got 129"));
        let huge = vec![b' '; 1025];
        assert_eq!(reason(&huge).0, DeadLetterReason::Oversize);
    }

    #[test]
    fn gap_ms_is_a_non_negative_integer_in_every_form() {
        let json = |gap: &str| {
            format!(
                r#"{{"message_id":"m","user_id":"u","text":"x","event_time":5,"gap_ms":{gap}}}"#
            )
        };
        let d = decoder(InputFormat::Json);
        assert_eq!(
            d.decode(json("250").as_bytes(), NOW).unwrap().gap_ms,
            Some(250)
        );
        assert_eq!(d.decode(json("null").as_bytes(), NOW).unwrap().gap_ms, None);
        for bad in ["-1", "\"5s\"", "1.5"] {
            let e = d.decode(json(bad).as_bytes(), NOW).unwrap_err();
            assert_eq!(e.reason, DeadLetterReason::Invalid, "{bad}");
            assert!(e.message.contains("gap_ms"), "{bad}: {}", e.message);
        }
        let negative = proto::ChatEvent {
            message_id: "m".into(),
            user_id: "u".into(),
            text: "x".into(),
            event_time_ms: 5,
            gap_ms: Some(-1),
            ..Default::default()
        }
        .encode_to_vec();
        let e = decoder(InputFormat::Protobuf)
            .decode(&negative, NOW)
            .unwrap_err();
        assert_eq!(e.reason, DeadLetterReason::Invalid);
    }

    #[test]
    fn decodes_protobuf_and_auto_detects() {
        let event = proto::ChatEvent {
            message_id: "m1".into(),
            user_id: "u1".into(),
            conversation_id: Some("c1".into()),
            kind: proto::EventKind::Message as i32,
            text: "hello".into(),
            event_time_ms: 1_000,
            attributes: [("k".to_string(), "v".to_string())].into(),
            gap_ms: Some(250),
        };
        let bytes = event.encode_to_vec();
        for format in [InputFormat::Protobuf, InputFormat::Auto] {
            let e = decoder(format).decode(&bytes, NOW).unwrap();
            assert_eq!(
                (
                    &*e.user_id,
                    e.conversation_id.as_deref(),
                    &*e.text,
                    e.event_time
                ),
                ("u1", Some("c1"), "hello", 1_000)
            );
            assert_eq!(e.gap_ms, Some(250));
        }
        let json = br#"{"message_id":"m","user_id":"u","text":"x","event_time":5}"#;
        assert!(decoder(InputFormat::Auto).decode(json, NOW).is_ok());
        assert_eq!(
            decoder(InputFormat::Auto)
                .decode(b"  ", NOW)
                .unwrap_err()
                .reason,
            DeadLetterReason::Decode
        );
        assert_eq!(
            decoder(InputFormat::Protobuf)
                .decode(b"\xff\xff\xff", NOW)
                .unwrap_err()
                .reason,
            DeadLetterReason::Decode
        );
        let unset_time = proto::ChatEvent {
            event_time_ms: 0,
            ..event.clone()
        }
        .encode_to_vec();
        assert!(decoder(InputFormat::Protobuf)
            .decode(&unset_time, NOW)
            .unwrap_err()
            .message
            .contains("`event_time` is required"));
        let bad_kind = proto::ChatEvent { kind: 9, ..event }.encode_to_vec();
        assert!(decoder(InputFormat::Protobuf)
            .decode(&bad_kind, NOW)
            .unwrap_err()
            .message
            .contains("unknown enum value 9"));
    }

    /// What a decoded record says, comparable.
    fn summary(f: &Fields<'_>) -> String {
        let time = match &f.event_time {
            None => "none".to_owned(),
            Some(EventTime::Millis(ms)) => format!("ms {ms}"),
            Some(EventTime::Rfc3339(s)) => format!("str {s}"),
        };
        format!(
            "{:?} {:?} {:?} {:?} {:?} {time} {:?}",
            f.message_id, f.user_id, f.conversation_id, f.kind, f.text, f.attributes
        )
    }

    /// JSON objects built from the fields' names and awkward values.
    fn json_object() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let key = prop_oneof![
            Just("message_id"),
            Just("user_id"),
            Just("conversation_id"),
            Just("kind"),
            Just("text"),
            Just("event_time"),
            Just("extra"),
        ];
        let value = prop_oneof![
            Just(r#""m1""#),
            Just(r#""typing""#),
            Just(
                r#""a
b""#
            ),
            Just("null"),
            Just("true"),
            Just("12"),
            Just("-3"),
            Just("1.5"),
            Just("007"),
            Just("[1]"),
            Just("{}"),
            Just(r#""2023-11-14T22:13:20Z""#),
            Just(r#""""#),
            Just(r#""é😀""#),
            Just("99999999999999999999"),
        ];
        let ws = prop_oneof![Just(""), Just(" "), Just("\n ")];
        proptest::collection::vec((key, ws, value), 0..7).prop_map(|fields| {
            let body: Vec<String> = fields
                .iter()
                .map(|(k, w, v)| format!("{w}\"{k}\"{w}:{w}{v}"))
                .collect();
            format!("{{{}}}", body.join(","))
        })
    }

    proptest::proptest! {
        /// Wherever the fast path answers, it answers exactly as serde_json.
        #[test]
        fn fast_path_agrees_with_serde(object in json_object(), trailing in proptest::option::of("[ ,x}]")) {
            let text = format!("{object}{}", trailing.unwrap_or_default());
            if let Some(f) = super::super::fast_json::read(&text) {
                let fast = fast_fields(f);
                let slow = serde_fields(&text);
                proptest::prop_assert!(slow.is_ok(), "serde rejects what the fast path accepted: {} ({:?})", text, slow.err());
                proptest::prop_assert_eq!(summary(&fast), summary(&slow.unwrap()), "{}", text);
            }
        }

        /// The decoder never panics, whatever the bytes.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            for format in [InputFormat::Json, InputFormat::Protobuf, InputFormat::Auto] {
                let _ = decoder(format).decode(&bytes, NOW);
            }
        }
    }

    #[test]
    fn undecodable_records_are_described_by_what_they_look_like() {
        let error = |format, bytes: &[u8]| decoder(format).decode(bytes, NOW).unwrap_err().message;
        let text = error(InputFormat::Auto, b"hello, is anyone there? I need help");
        assert!(
            text.starts_with("not an event: text starting \"hello, is anyone there? \"…"),
            "{text}"
        );
        let gzip = error(InputFormat::Auto, b"\x1f\x8b\x08\x00\xff\xfe");
        assert!(
            gzip.contains("gzip-compressed data, 6 bytes starting 1f 8b 08 00 ff fe"),
            "{gzip}"
        );
        let binary = error(InputFormat::Json, b"\x80\x81");
        assert!(
            binary.contains("binary data, 2 bytes starting 80 81"),
            "{binary}"
        );
    }
}
