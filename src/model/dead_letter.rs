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
    /// The broker refused its outcome for good (a turn larger than the
    /// producer accepts): each message of the turn is dead-lettered as an
    /// event, instead of being retried forever.
    Undeliverable,
    /// Redis: the entry's session key hashes to another shard than the
    /// stream it was written to, under `redis.misrouted = "dlq"`.
    Misrouted,
    /// `sessionizer push`: the agent kept failing (408, 429, 5xx, no
    /// answer) until `max_attempts` or `max_elapsed`.
    DeliveryFailed,
    /// `sessionizer push`: the agent refused the turn (another status
    /// than 2xx, 408, 429 or 5xx).
    DeliveryRejected,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 10] = [
        DeadLetterReason::Decode,
        DeadLetterReason::Invalid,
        DeadLetterReason::Oversize,
        DeadLetterReason::Late,
        DeadLetterReason::MaxDeliveries,
        DeadLetterReason::Panic,
        DeadLetterReason::Undeliverable,
        DeadLetterReason::Misrouted,
        DeadLetterReason::DeliveryFailed,
        DeadLetterReason::DeliveryRejected,
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
            DeadLetterReason::Undeliverable => "undeliverable",
            DeadLetterReason::Misrouted => "misrouted",
            DeadLetterReason::DeliveryFailed => "delivery_failed",
            DeadLetterReason::DeliveryRejected => "delivery_rejected",
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
    /// Set when the payload above is only the record's first bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<Truncated>,
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
            truncated: None,
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

/// How many bytes of a payload over the size bound a dead letter keeps.
pub const KEPT_PREFIX_BYTES: usize = 64 << 10;

/// What a dead letter says of a payload it could not keep whole (over
/// `input.max_record_bytes`): it keeps the first [`KEPT_PREFIX_BYTES`] bytes,
/// and this, so an operator can still match it against its producer's copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Truncated {
    /// The whole payload's length in bytes.
    pub original_bytes: u64,
    /// The whole payload's SHA-256, lowercase hex.
    pub original_sha256: String,
}

impl Truncated {
    /// From a hasher that saw the whole payload.
    pub fn from_hasher(original_bytes: u64, hasher: sha2::Sha256) -> Self {
        use sha2::Digest;
        Truncated {
            original_bytes,
            original_sha256: super::hex(&hasher.finalize()),
        }
    }
}

/// The payload a dead letter keeps: all of it when it is at most
/// `max_bytes`, else its first [`KEPT_PREFIX_BYTES`] bytes and a
/// [`Truncated`]. Bounds what one poison record costs to write and store.
pub fn kept_payload(payload: &[u8], max_bytes: usize) -> (&[u8], Option<Truncated>) {
    use sha2::Digest;
    if payload.len() <= max_bytes {
        return (payload, None);
    }
    let kept = &payload[..KEPT_PREFIX_BYTES.min(max_bytes)];
    let truncated =
        Truncated::from_hasher(payload.len() as u64, sha2::Sha256::new_with_prefix(payload));
    (kept, Some(truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_over_the_bound_keeps_a_prefix_its_length_and_hash() {
        let small = b"{\"a\":1}";
        assert_eq!(kept_payload(small, 100), (&small[..], None));
        let big = vec![1u8; 200_000];
        let (kept, truncated) = kept_payload(&big, 100_000);
        assert_eq!(kept.len(), KEPT_PREFIX_BYTES);
        let truncated = truncated.unwrap();
        assert_eq!(truncated.original_bytes, 200_000);
        // sha256 of 200,000 bytes of 0x01, computed with Python's hashlib.
        assert_eq!(
            truncated.original_sha256,
            "6015fcd09f3f14b7da9d89cb95f1e4ee007948bc7cf9a59be8163c3460e4f954"
        );
        let (kept, _) = kept_payload(&big, 10);
        assert_eq!(kept.len(), 10, "never more than the bound");
    }
}
