//! Bytes in, typed records out, and back: pure functions, tested from byte
//! literals. Decoding validates (a poison record comes back as a [`Poison`]
//! with its dead-letter reason and a sentence saying what is wrong);
//! encoding writes turns as JSON or protobuf.

mod decode;
mod encode;
mod fast_json;
mod json_writer;
pub mod proto;

pub use decode::{DecodeLimits, Decoder, InputFormat, Poison};
pub use encode::{
    encode_turn, encode_turn_with_id, session_turn_id, turn_as_events, turn_from_session,
    OutputFormat,
};
