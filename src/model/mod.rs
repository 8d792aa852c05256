//! The records of the wire contract: what producers send ([`ChatEvent`]), what
//! downstream AI consumers read ([`Turn`]) and what operators inspect
//! ([`DeadLetter`]). Their JSON form is described by `schemas/`, their protobuf
//! form by `proto/`; both are encoded in [`crate::codec`].

mod dead_letter;
pub mod dead_letter_names;
mod event;
mod shard;
mod turn;

pub use dead_letter::{
    kept_payload, DeadLetter, DeadLetterReason, DeadLetterSource, Truncated, KEPT_PREFIX_BYTES,
};
pub use event::{Attributes, ChatEvent, EventKind};
pub use shard::shard_of;
pub use turn::{turn_id, ClosedBy, Redaction, Turn, TurnMessage};

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xf) as usize] as char);
    }
    out
}
