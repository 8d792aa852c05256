use std::borrow::Cow;
use std::collections::BTreeMap;

/// Free-form string attributes a producer attaches to a message (channel,
/// locale, …). Ordered so that encoded turns are byte-for-byte reproducible.
pub type Attributes = BTreeMap<String, String>;

/// What a chat event says about the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A chat message with text: the content of a turn.
    Message,
    /// The user is typing: extends the session, adds no text.
    Typing,
    /// Ends the turn right after it in event time (a send button, the end
    /// of a voice utterance).
    EndOfTurn,
}

impl EventKind {
    /// The name used in JSON (`kind`) and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Message => "message",
            EventKind::Typing => "typing",
            EventKind::EndOfTurn => "end_of_turn",
        }
    }
}

/// A validated chat event (see `schemas/chat_event.schema.json`). The decoder
/// in [`crate::codec`] builds these and enforces the limits, so the engine can
/// trust them. Strings borrow from the record where they can: the engine copies
/// what it keeps exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatEvent<'a> {
    pub message_id: Cow<'a, str>,
    pub user_id: Cow<'a, str>,
    pub conversation_id: Option<Cow<'a, str>>,
    pub kind: EventKind,
    /// Empty for typing and end-of-turn events.
    pub text: Cow<'a, str>,
    /// Epoch milliseconds.
    pub event_time: i64,
    pub attributes: Option<Box<Attributes>>,
    /// This event's own session gap (Flink's dynamic gap): its window is
    /// `[event_time, event_time + gap_ms]`; `None`: `window.gap`. The engine
    /// clamps it to `window.max_gap`.
    pub gap_ms: Option<i64>,
}
