//! Fault-injection hooks for the fault tests, off unless set. Never set them
//! in production.
//!
//! - `SESSIONIZER_FAULT_ABORT_ON=<bytes>` makes the worker abort (as a crash
//!   would: no unwinding, no cleanup) when a record's payload contains those
//!   bytes. The tests use it to prove that a record which kills the worker on
//!   every delivery ends in the DLQ after `max_deliveries` instead of looping.
//! - `SESSIONIZER_FAULT_PANIC_ON=<text>` makes the session engine panic
//!   halfway through placing a message whose text contains that text: the
//!   message is in its user's buffer but not scheduled, the state a bug
//!   would leave. The tests use it to prove that no later turn comes from
//!   that state (`docs/semantics.md`, "Panics").
//! - `SESSIONIZER_FAULT_HOLD_OUTPUT=<path>` holds every Kafka output and
//!   dead-letter send while that file exists, as a proxy holding the output's
//!   writes would (the broker itself stays up for the input).

use std::sync::OnceLock;

pub const ENV: &str = "SESSIONIZER_FAULT_ABORT_ON";
pub const HOLD_OUTPUT_ENV: &str = "SESSIONIZER_FAULT_HOLD_OUTPUT";
pub const PANIC_ENV: &str = "SESSIONIZER_FAULT_PANIC_ON";

/// The marker bytes an environment variable holds, read once.
fn marker(cell: &'static OnceLock<Option<Vec<u8>>>, env: &str) -> Option<&'static [u8]> {
    cell.get_or_init(|| {
        std::env::var_os(env)
            .filter(|v| !v.is_empty())
            .map(|v| v.into_encoded_bytes())
    })
    .as_deref()
}

fn holds(haystack: &[u8], marker: &[u8]) -> bool {
    haystack.windows(marker.len()).any(|w| w == marker)
}

/// Whether a message text holds the panic marker (see the module doc).
pub fn panic_marked(text: &str) -> bool {
    static MARKER: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    marker(&MARKER, PANIC_ENV).is_some_and(|m| holds(text.as_bytes(), m))
}

/// Waits while the hold-output file exists (see the module doc); returns at
/// once when the hook is off.
pub async fn hold_output() {
    static PATH: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        std::env::var_os(HOLD_OUTPUT_ENV)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    });
    if let Some(path) = path {
        while path.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// Aborts the process when the payload holds the marker bytes.
pub fn abort_if_marked(payload: &[u8]) {
    static MARKER: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    if marker(&MARKER, ENV).is_some_and(|m| holds(payload, m)) {
        eprintln!("{ENV}: the record holds the marker; aborting");
        std::process::abort();
    }
}
