use std::borrow::Cow;

use prost::Message as _;

use super::proto;
use crate::engine::ClosedSession;
use crate::model::{turn_id, ClosedBy, Turn, TurnMessage};

/// How turns are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Json,
    Protobuf,
}

impl OutputFormat {
    /// The `content-type` a broker record carries.
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Json => "application/json",
            OutputFormat::Protobuf => "application/x-protobuf",
        }
    }
}

/// The turn of a closed session, borrowing its texts.
pub fn turn_from_session(session: &ClosedSession) -> Turn<'_> {
    let text_len: usize = session.messages.iter().map(|m| m.text().len() + 1).sum();
    let mut text = String::with_capacity(text_len);
    for (i, m) in session.messages.iter().enumerate() {
        if i > 0 {
            text.push('\n');
        }
        text.push_str(m.text());
    }
    Turn {
        turn_id: session_turn_id(session),
        user_id: Cow::Borrowed(&session.user_id),
        conversation_id: session.conversation_id.as_deref().map(Cow::Borrowed),
        start_time: session.start_time,
        end_time: session.end_time,
        closed_by: session.closed_by,
        late: session.late,
        previous_turn_id: session.previous_turn_id.clone(),
        redactions: session.redactions.clone(),
        message_count: session.messages.len() as u32,
        text,
        messages: session
            .messages
            .iter()
            .map(|m| TurnMessage {
                message_id: Cow::Borrowed(m.message_id()),
                event_time: m.event_time,
                text: Cow::Borrowed(m.text()),
                attributes: m.attributes.as_deref().map(Cow::Borrowed),
            })
            .collect(),
    }
}

/// The session's `turn_id` (see [`turn_id`]).
pub fn session_turn_id(session: &ClosedSession) -> String {
    turn_id(
        &session.user_id,
        session.conversation_id.as_deref(),
        session.messages.iter().map(|m| m.message_id()),
    )
}

/// Appends the session's turn, encoded, to `buf` (JSON without a trailing
/// newline).
pub fn encode_turn(session: &ClosedSession, format: OutputFormat, buf: &mut Vec<u8>) {
    encode_turn_with_id(session, &session_turn_id(session), format, buf);
}

/// [`encode_turn`] for a caller that has the turn id already.
pub fn encode_turn_with_id(
    session: &ClosedSession,
    turn_id: &str,
    format: OutputFormat,
    buf: &mut Vec<u8>,
) {
    match format {
        OutputFormat::Json => super::json_writer::write_turn(session, turn_id, buf),
        OutputFormat::Protobuf => to_proto(&turn_from_session(session))
            .encode(buf)
            .expect("a Vec grows as needed"),
    }
}

fn to_proto(turn: &Turn<'_>) -> proto::Turn {
    let closed_by = match turn.closed_by {
        ClosedBy::Gap => proto::ClosedBy::Gap,
        ClosedBy::EndOfTurn => proto::ClosedBy::EndOfTurn,
        ClosedBy::MaxDuration => proto::ClosedBy::MaxDuration,
        ClosedBy::MaxMessages => proto::ClosedBy::MaxMessages,
        ClosedBy::MaxBytes => proto::ClosedBy::MaxBytes,
    };
    proto::Turn {
        turn_id: turn.turn_id.clone(),
        user_id: turn.user_id.to_string(),
        conversation_id: turn.conversation_id.as_ref().map(|c| c.to_string()),
        start_time: turn.start_time,
        end_time: turn.end_time,
        closed_by: closed_by as i32,
        late: turn.late,
        previous_turn_id: turn.previous_turn_id.clone(),
        redactions: turn
            .redactions
            .iter()
            .flatten()
            .map(|r| proto::Redaction {
                detector: r.detector.clone(),
                count: r.count,
            })
            .collect(),
        message_count: turn.message_count,
        text: turn.text.clone(),
        messages: turn
            .messages
            .iter()
            .map(|m| proto::TurnMessage {
                message_id: m.message_id.to_string(),
                event_time: m.event_time,
                text: m.text.to_string(),
                attributes: m.attributes.as_deref().cloned().unwrap_or_default(),
            })
            .collect(),
    }
}

/// The messages of an encoded turn as JSON ChatEvents (`message_id`,
/// `user_id`, `conversation_id`, `text`, `event_time`, `attributes`), with
/// the turn's id: what a worker dead-letters when the broker refuses the turn
/// for good, so every message still ends in a dead letter that `dlq replay`
/// can send back. `None` if the bytes are not a turn of this format.
pub fn turn_as_events(bytes: &[u8], format: OutputFormat) -> Option<(String, Vec<Vec<u8>>)> {
    let (turn_id, user_id, conversation_id, messages) = match format {
        OutputFormat::Json => {
            let t: Turn<'static> = serde_json::from_slice(bytes).ok()?;
            (t.turn_id, t.user_id, t.conversation_id, t.messages)
        }
        OutputFormat::Protobuf => {
            let t = proto::Turn::decode(bytes).ok()?;
            let messages = t
                .messages
                .into_iter()
                .map(|m| TurnMessage {
                    message_id: Cow::Owned(m.message_id),
                    event_time: m.event_time,
                    text: Cow::Owned(m.text),
                    attributes: (!m.attributes.is_empty())
                        .then(|| Cow::Owned(m.attributes.into_iter().collect())),
                })
                .collect();
            let conversation_id = t.conversation_id.map(Cow::Owned);
            (t.turn_id, Cow::Owned(t.user_id), conversation_id, messages)
        }
    };
    let events = messages
        .iter()
        .map(|m| {
            let mut event = serde_json::json!({
                "message_id": m.message_id,
                "user_id": user_id,
                "text": m.text,
                "event_time": m.event_time,
            });
            if let Some(c) = &conversation_id {
                event["conversation_id"] = serde_json::json!(c);
            }
            if let Some(a) = &m.attributes {
                event["attributes"] = serde_json::json!(a);
            }
            serde_json::to_vec(&event).expect("a JSON value serializes")
        })
        .collect();
    Some((turn_id, events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{LatePolicy, Resolution, SessionEngine, WindowConfig};
    use crate::model::{ChatEvent, EventKind};

    fn closed() -> ClosedSession {
        let mut engine = SessionEngine::new(WindowConfig {
            gap_ms: 3000,
            max_out_of_orderness_ms: 0,
            max_duration_ms: 60_000,
            max_messages: 10,
            max_bytes: 1000,
            late: LatePolicy::NewTurn,
            max_gap_ms: 60_000,
            follow_up_ms: None,
        });
        let mut out = Vec::new();
        for (seq, (id, t, text)) in [("b", 2000, "world"), ("a", 1000, "hello")]
            .into_iter()
            .enumerate()
        {
            let event = ChatEvent {
                message_id: id.into(),
                user_id: "u1".into(),
                conversation_id: Some("c1".into()),
                kind: EventKind::Message,
                text: text.into(),
                event_time: t,
                attributes: None,
                gap_ms: None,
            };
            engine.on_event(event, seq as u64, &mut out);
        }
        engine.flush(&mut out);
        match out.pop() {
            Some(Resolution::Turn(session)) => session,
            other => panic!("expected a turn, got {other:?}"),
        }
    }

    #[test]
    fn json_turn_has_the_contract_fields_in_event_time_order() {
        let session = closed();
        let mut buf = Vec::new();
        encode_turn(&session, OutputFormat::Json, &mut buf);
        let turn: Turn<'static> = serde_json::from_slice(&buf).unwrap();
        assert_eq!(turn.turn_id, turn_id("u1", Some("c1"), ["a", "b"]));
        assert_eq!(turn.text, "hello\nworld");
        assert_eq!(turn.message_count, 2);
        assert_eq!((turn.start_time, turn.end_time), (1000, 2000));
        assert_eq!(turn.closed_by, ClosedBy::Gap);
        assert_eq!(turn.messages[0].message_id, "a");
    }

    #[test]
    fn a_turn_becomes_its_messages_as_valid_events_in_either_format() {
        let session = closed();
        let decoder = crate::codec::Decoder::new(
            crate::codec::InputFormat::Json,
            crate::codec::DecodeLimits {
                max_record_bytes: 1 << 20,
                max_text_bytes: 1024,
                max_future_skew_ms: 0,
            },
        );
        for format in [OutputFormat::Json, OutputFormat::Protobuf] {
            let mut buf = Vec::new();
            encode_turn(&session, format, &mut buf);
            let (id, events) = turn_as_events(&buf, format).unwrap();
            assert_eq!(id, session_turn_id(&session));
            let decoded: Vec<_> = events
                .iter()
                .map(|e| decoder.decode(e, i64::MAX / 2).unwrap())
                .map(|e| (e.message_id.into_owned(), e.text.into_owned(), e.event_time))
                .collect();
            assert_eq!(
                decoded,
                [
                    ("a".to_owned(), "hello".to_owned(), 1000),
                    ("b".to_owned(), "world".to_owned(), 2000)
                ]
            );
        }
        assert_eq!(turn_as_events(b"not a turn", OutputFormat::Json), None);
    }

    #[test]
    fn protobuf_turn_round_trips() {
        let session = closed();
        let mut buf = Vec::new();
        encode_turn(&session, OutputFormat::Protobuf, &mut buf);
        let turn = proto::Turn::decode(&buf[..]).unwrap();
        assert_eq!(turn.text, "hello\nworld");
        assert_eq!(turn.conversation_id.as_deref(), Some("c1"));
        assert_eq!(turn.messages.len(), 2);
        assert_eq!(turn.closed_by, proto::ClosedBy::Gap as i32);
    }
}
