//! The records of the wire contract: what producers send ([`ChatEvent`]), what
//! downstream AI consumers read ([`Turn`]) and what operators inspect
//! ([`DeadLetter`]). Their JSON form is described by `schemas/`, their protobuf
//! form by `proto/`; both are encoded in [`crate::codec`].

mod dead_letter;
mod event;
mod turn;

pub use dead_letter::{
    kept_payload, DeadLetter, DeadLetterReason, DeadLetterSource, Truncated, KEPT_PREFIX_BYTES,
};
pub use event::{Attributes, ChatEvent, EventKind};
pub use turn::{turn_id, ClosedBy, Turn, TurnMessage};
