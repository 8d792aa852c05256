use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Attributes;

/// Why a session closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClosedBy {
    /// The watermark passed `last_event_time + gap` (also: end of input, and
    /// the single-message turn of a late event).
    Gap,
    /// An `end_of_turn` event joined the session.
    EndOfTurn,
    MaxDuration,
    MaxMessages,
    MaxBytes,
}

impl ClosedBy {
    pub const ALL: [ClosedBy; 5] = [
        ClosedBy::Gap,
        ClosedBy::EndOfTurn,
        ClosedBy::MaxDuration,
        ClosedBy::MaxMessages,
        ClosedBy::MaxBytes,
    ];

    /// Its place in [`ClosedBy::ALL`] (declaration order), for per-kind counters.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Gap => "gap",
            ClosedBy::EndOfTurn => "end_of_turn",
            ClosedBy::MaxDuration => "max_duration",
            ClosedBy::MaxMessages => "max_messages",
            ClosedBy::MaxBytes => "max_bytes",
        }
    }
}

/// One message inside a turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnMessage<'a> {
    pub message_id: Cow<'a, str>,
    /// Epoch milliseconds.
    pub event_time: i64,
    pub text: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Cow<'a, Attributes>>,
}

/// A closed session: one burst of a user's messages, answered once downstream
/// (see `schemas/turn.schema.json`). Borrows from the closed session it is
/// encoded from; deserialized turns own their strings (`Turn<'static>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Turn<'a> {
    pub turn_id: String,
    pub user_id: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<Cow<'a, str>>,
    /// Epoch ms of the first event of the session (typing events included).
    pub start_time: i64,
    /// Epoch ms of the last event of the session.
    pub end_time: i64,
    pub closed_by: ClosedBy,
    pub late: bool,
    pub message_count: u32,
    /// The message texts joined with "\n".
    pub text: String,
    /// In (event time, source position) order.
    pub messages: Vec<TurnMessage<'a>>,
}

/// The turn id: the first 16 bytes, as 32 lowercase hex chars, of
/// `SHA-256("sessionizer.turn.v1" 0x00 user_id 0x00 conversation_id 0x00 first_message_id)`
/// (an absent conversation id is the empty string, which a valid event cannot
/// carry). It depends only on the session key and the first message, so a turn
/// re-emitted after a crash or a rebalance carries the same id and downstream
/// can deduplicate. The formula is part of the contract: never change it.
pub fn turn_id(user_id: &str, conversation_id: Option<&str>, first_message_id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"sessionizer.turn.v1\0");
    hasher.update(user_id.as_bytes());
    hasher.update([0]);
    hasher.update(conversation_id.unwrap_or("").as_bytes());
    hasher.update([0]);
    hasher.update(first_message_id.as_bytes());
    let digest = hasher.finalize();
    let mut id = String::with_capacity(32);
    for byte in &digest[..16] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        id.push(HEX[(byte >> 4) as usize] as char);
        id.push(HEX[(byte & 0xf) as usize] as char);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_id_is_stable_and_separates_its_parts() {
        // Pinned: a change here breaks downstream deduplication across versions.
        assert_eq!(
            turn_id("u1", None, "m1"),
            turn_id("u1", None, "m1"),
            "deterministic"
        );
        let id = turn_id("u1", None, "m1");
        assert_eq!(id.len(), 32);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(turn_id("u1", Some("c"), "m1"), id);
        assert_ne!(turn_id("u", Some("1"), "m1"), turn_id("u1", None, "m1"));
        assert_ne!(turn_id("u1", None, "m2"), id);
    }
}
