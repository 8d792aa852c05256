//! A hand-written JSON writer for turns, the hot path of every run: it writes
//! straight from the closed session (no intermediate `Turn`, no joined-text
//! allocation) and escapes strings eight bytes at a time. Its output is the
//! same JSON as serializing [`crate::model::Turn`] with serde (a test below
//! holds it to that), so the schema and the model stay the one contract.

use crate::engine::ClosedSession;
use crate::model::Attributes;

/// Appends the session's turn as one JSON object (no trailing newline);
/// `turn_id` is the session's [`crate::model::turn_id`], computed by the
/// caller, who may need it too.
pub fn write_turn(session: &ClosedSession, turn_id: &str, buf: &mut Vec<u8>) {
    buf.extend_from_slice(b"{\"turn_id\":\"");
    buf.extend_from_slice(turn_id.as_bytes());
    buf.extend_from_slice(b"\",\"user_id\":");
    write_str(buf, &session.user_id);
    if let Some(c) = &session.conversation_id {
        buf.extend_from_slice(b",\"conversation_id\":");
        write_str(buf, c);
    }
    buf.extend_from_slice(b",\"start_time\":");
    write_int(buf, session.start_time);
    buf.extend_from_slice(b",\"end_time\":");
    write_int(buf, session.end_time);
    buf.extend_from_slice(b",\"closed_by\":\"");
    buf.extend_from_slice(session.closed_by.as_str().as_bytes());
    buf.extend_from_slice(if session.late {
        b"\",\"late\":true"
    } else {
        b"\",\"late\":false"
    });
    if let Some(previous) = &session.previous_turn_id {
        buf.extend_from_slice(b",\"previous_turn_id\":");
        write_str(buf, previous);
    }
    if let Some(redactions) = &session.redactions {
        buf.extend_from_slice(b",\"redactions\":[");
        for (i, r) in redactions.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(b"{\"detector\":");
            write_str(buf, &r.detector);
            buf.extend_from_slice(b",\"count\":");
            write_int(buf, i64::from(r.count));
            buf.push(b'}');
        }
        buf.push(b']');
    }
    buf.extend_from_slice(b",\"message_count\":");
    write_int(buf, session.messages.len() as i64);
    buf.extend_from_slice(b",\"text\":\"");
    for (i, m) in session.messages.iter().enumerate() {
        if i > 0 {
            buf.extend_from_slice(b"\\n");
        }
        write_str_contents(buf, m.text());
    }
    buf.extend_from_slice(b"\",\"messages\":[");
    for (i, m) in session.messages.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(b"{\"message_id\":");
        write_str(buf, m.message_id());
        buf.extend_from_slice(b",\"event_time\":");
        write_int(buf, m.event_time);
        buf.extend_from_slice(b",\"text\":");
        write_str(buf, m.text());
        if let Some(attributes) = &m.attributes {
            buf.extend_from_slice(b",\"attributes\":");
            write_attributes(buf, attributes);
        }
        buf.push(b'}');
    }
    buf.extend_from_slice(b"]}");
}

fn write_attributes(buf: &mut Vec<u8>, attributes: &Attributes) {
    buf.push(b'{');
    for (i, (k, v)) in attributes.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_str(buf, k);
        buf.push(b':');
        write_str(buf, v);
    }
    buf.push(b'}');
}

fn write_int(buf: &mut Vec<u8>, n: i64) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn write_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    write_str_contents(buf, s);
    buf.push(b'"');
}

/// Whether any byte of the word is `"`, `\` or a control character (< 0x20).
#[inline]
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let below_0x20 = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    (below_0x20 | has_zero(word ^ (ONES * b'"' as u64)) | has_zero(word ^ (ONES * b'\\' as u64)))
        != 0
}

/// Escapes like serde_json: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, other
/// control characters as `\u00XX`; everything else (UTF-8 included) verbatim.
fn write_str_contents(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i + 8 <= bytes.len() {
        let word = u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        if !needs_escape(word) {
            i += 8;
            continue;
        }
        break;
    }
    while i < bytes.len() {
        let b = bytes[i];
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                buf.extend_from_slice(&bytes[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                buf.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 0xf) as usize],
                ]);
                i += 1;
                start = i;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        };
        buf.extend_from_slice(&bytes[start..i]);
        buf.extend_from_slice(escape);
        i += 1;
        start = i;
    }
    buf.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{session_turn_id, turn_from_session};
    use crate::engine::{LatePolicy, Resolution, SessionEngine, WindowConfig};
    use crate::model::{ChatEvent, EventKind};
    use proptest::prelude::*;

    fn session(texts: &[String], conversation: Option<&str>, attributes: bool) -> ClosedSession {
        let mut engine = SessionEngine::new(WindowConfig {
            gap_ms: 3000,
            max_out_of_orderness_ms: 0,
            max_duration_ms: 60_000,
            max_messages: 100,
            max_bytes: 1 << 20,
            late: LatePolicy::NewTurn,
            max_gap_ms: 60_000,
            follow_up_ms: None,
        });
        let mut out = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let event = ChatEvent {
                message_id: format!("id\"{i}").into(),
                user_id: "u\\1".into(),
                conversation_id: conversation.map(Into::into),
                kind: EventKind::Message,
                text: text.as_str().into(),
                event_time: 1000 + i as i64,
                attributes: attributes
                    .then(|| Box::new([("k\n".to_string(), text.clone())].into())),
                gap_ms: None,
            };
            engine.on_event(event, i as u64, &mut out);
        }
        engine.flush(&mut out);
        match out.pop() {
            Some(Resolution::Turn(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        /// Byte for byte what serde_json writes for the model's `Turn`.
        #[test]
        fn same_json_as_serde(texts in proptest::collection::vec("\\PC{1,40}|[\"\\\\\\x00-\\x1f\\u{7f}é😀a]{1,20}", 1..5), conversation in proptest::option::of("[a-z]{1,5}"), attributes in any::<bool>()) {
            let s = session(&texts, conversation.as_deref(), attributes);
            let mut fast = Vec::new();
            write_turn(&s, &session_turn_id(&s), &mut fast);
            let serde = serde_json::to_vec(&turn_from_session(&s)).unwrap();
            prop_assert_eq!(String::from_utf8(fast).unwrap(), String::from_utf8(serde).unwrap());
        }
    }
}
