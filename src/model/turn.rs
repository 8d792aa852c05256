use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use smallvec::SmallVec;

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
    /// With `window.follow_up`: the key's previous turn, when this one
    /// started within `follow_up` of its last event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_turn_id: Option<String>,
    /// With `[redact]`: what was replaced, per detector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redactions: Option<Vec<Redaction>>,
    pub message_count: u32,
    /// The message texts joined with "\n".
    pub text: String,
    /// In (event time, source position) order.
    pub messages: Vec<TurnMessage<'a>>,
}

/// How many values one detector replaced in a turn (the values never leave
/// the redaction stage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redaction {
    pub detector: String,
    pub count: u32,
}

/// The turn id: the first 16 bytes, as 32 lowercase hex chars, of
/// `SHA-256("sessionizer.turn.v2" ‖ field(user_id) ‖ field(conversation_id)
/// ‖ u64be(n) ‖ field(id₁) ‖ … ‖ field(idₙ))`, where `field(x)` is `x`'s byte
/// length as a big-endian u64 followed by its bytes (an absent conversation
/// id is the empty string, which a valid event cannot carry) and `id₁ … idₙ`
/// are the turn's message ids sorted bytewise. Length prefixes make it
/// unambiguous whatever bytes the ids hold; covering every message id makes
/// the same id mean the same messages, so a consumer deduplicating by
/// `turn_id` never drops a message, and sorting makes it independent of the
/// order the messages arrived in. The formula is part of the contract
/// (`docs/contract.md`).
pub fn turn_id<'m>(
    user_id: &str,
    conversation_id: Option<&str>,
    message_ids: impl IntoIterator<Item = &'m str>,
) -> String {
    fn field(hasher: &mut Sha256, bytes: &[u8]) {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    }
    let mut ids: SmallVec<[&str; 8]> = message_ids.into_iter().collect();
    ids.sort_unstable();
    let mut hasher = Sha256::new();
    hasher.update(b"sessionizer.turn.v2");
    field(&mut hasher, user_id.as_bytes());
    field(&mut hasher, conversation_id.unwrap_or("").as_bytes());
    hasher.update((ids.len() as u64).to_be_bytes());
    for id in ids {
        field(&mut hasher, id.as_bytes());
    }
    super::hex(&hasher.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_id_is_pinned_and_separates_its_parts() {
        // Pinned: a change here breaks downstream deduplication across versions.
        let id = turn_id("u1", None, ["m1"]);
        // The same value computed independently (Python hashlib, the formula in docs/contract.md).
        assert_eq!(id, "feb2ffc9a58953c7193b8c99b218c4d7");
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(turn_id("u1", Some("c"), ["m1"]), id);
        assert_ne!(turn_id("u", Some("1"), ["m1"]), id);
        assert_ne!(turn_id("u1", None, ["m2"]), id);
    }

    #[test]
    fn turn_id_covers_every_message_in_any_order() {
        // A turn closed early and the same session closed whole must differ:
        // a consumer deduplicating by id would otherwise drop `m2`.
        assert_ne!(turn_id("u", None, ["m1"]), turn_id("u", None, ["m1", "m2"]));
        assert_eq!(
            turn_id("u", None, ["m1", "m2", "m3"]),
            turn_id("u", None, ["m3", "m1", "m2"])
        );
        assert_ne!(
            turn_id("u", None, ["m1m2"]),
            turn_id("u", None, ["m1", "m2"])
        );
    }

    #[test]
    fn turn_id_is_unambiguous_with_nul_and_any_bytes_in_ids() {
        // The collision the v1 formula had (0x00 separators).
        assert_ne!(
            turn_id("a\0b", None, ["\0m"]),
            turn_id("a", Some("b\0"), ["\0m"])
        );
        assert_ne!(turn_id("a", Some("b"), ["c"]), turn_id("ab", None, ["c"]));
        assert_ne!(
            turn_id("a", None, ["b", "c"]),
            turn_id("a", Some("b"), ["c"])
        );
    }
}
