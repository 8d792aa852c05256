use serde::{Deserialize, Serialize};

/// Why a record became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// Not JSON / not protobuf: the bytes do not parse.
    Decode,
    /// Well-formed, but a field is missing or wrong.
    Invalid,
    /// Over `input.max_record_bytes`, or text over `input.max_text_bytes`.
    Oversize,
    /// A late message under `window.late = "dlq"`.
    Late,
    /// Delivered more than `max_deliveries` times without an outcome.
    MaxDeliveries,
    /// Processing the record panicked; the worker went on.
    Panic,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 6] = [
        DeadLetterReason::Decode,
        DeadLetterReason::Invalid,
        DeadLetterReason::Oversize,
        DeadLetterReason::Late,
        DeadLetterReason::MaxDeliveries,
        DeadLetterReason::Panic,
    ];

    /// Its place in [`DeadLetterReason::ALL`] (declaration order), for per-kind counters.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "decode",
            DeadLetterReason::Invalid => "invalid",
            DeadLetterReason::Oversize => "oversize",
            DeadLetterReason::Late => "late",
            DeadLetterReason::MaxDeliveries => "max_deliveries",
            DeadLetterReason::Panic => "panic",
        }
    }
}

/// Where a dead letter came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSource {
    /// `file`, `kafka` or `redis`.
    pub kind: String,
    /// The file path (`-` for stdin), topic or stream.
    pub name: String,
    /// The 1-based line number for files.
    pub position: u64,
}

/// The file form of a dead letter (see `schemas/dead_letter.schema.json`):
/// the original bytes unchanged plus provenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    pub reason: DeadLetterReason,
    pub error: String,
    pub source: DeadLetterSource,
    /// RFC 3339, UTC, millisecond precision.
    pub failed_at: String,
    pub worker: String,
    /// The original record when it is valid UTF-8 …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// … and base64 (standard alphabet, padded) otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

impl DeadLetter {
    /// Keeps `payload` byte for byte: as text when it is UTF-8, else base64.
    pub fn new(
        reason: DeadLetterReason,
        error: String,
        source: DeadLetterSource,
        failed_at: String,
        worker: String,
        payload: &[u8],
    ) -> Self {
        use base64::Engine;
        let (payload, payload_base64) = match std::str::from_utf8(payload) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(payload)),
            ),
        };
        DeadLetter {
            reason,
            error,
            source,
            failed_at,
            worker,
            payload,
            payload_base64,
        }
    }

    /// The original record bytes.
    pub fn original_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        use base64::Engine;
        match (&self.payload, &self.payload_base64) {
            (Some(text), _) => Ok(text.as_bytes().to_vec()),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD.decode(b64),
            (None, None) => Ok(Vec::new()),
        }
    }
}
