//! Fuzzes the record decoder: whatever the bytes, it returns an event or a
//! typed poison reason, never panics, and a decoded event respects the limits.
//!
//! `cargo install cargo-fuzz && cargo fuzz run decode` (cargo-fuzz needs a
//! nightly compiler, or `RUSTC_BOOTSTRAP=1` on stable).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessionizer::codec::{DecodeLimits, Decoder, InputFormat};

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits { max_record_bytes: 4096, max_text_bytes: 256, max_future_skew_ms: 300_000 };
    for format in [InputFormat::Json, InputFormat::Protobuf, InputFormat::Auto] {
        if let Ok(event) = Decoder::new(format, limits).decode(data, 1_700_000_000_000) {
            assert!(!event.message_id.is_empty() && event.message_id.len() <= 128);
            assert!(!event.user_id.is_empty() && event.user_id.len() <= 128);
            assert!(event.text.len() <= limits.max_text_bytes);
            assert!(event.event_time > 0 && event.event_time <= 1_700_000_300_000);
        }
    }
});
