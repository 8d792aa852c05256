//! A fault-injection hook for the crash tests, off unless set.
//!
//! `SESSIONIZER_FAULT_ABORT_ON=<bytes>` makes the worker abort (as a crash
//! would: no unwinding, no cleanup) when a record's payload contains those
//! bytes. The tests use it to prove that a record which kills the worker on
//! every delivery ends in the DLQ after `max_deliveries` instead of looping.
//! Never set it in production.

use std::sync::OnceLock;

pub const ENV: &str = "SESSIONIZER_FAULT_ABORT_ON";

/// Aborts the process when the payload holds the marker bytes.
pub fn abort_if_marked(payload: &[u8]) {
    static MARKER: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    let marker = MARKER.get_or_init(|| {
        std::env::var_os(ENV)
            .filter(|v| !v.is_empty())
            .map(|v| v.into_encoded_bytes())
    });
    if let Some(marker) = marker {
        if payload
            .windows(marker.len())
            .any(|w| w == marker.as_slice())
        {
            eprintln!("{ENV}: the record holds the marker; aborting");
            std::process::abort();
        }
    }
}
