//! A Kafka dead letter keeps the original key, value and headers unchanged and
//! adds provenance as headers, so `dlq inspect` and `dlq replay` need nothing
//! but the record itself.

use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};

use crate::model::{DeadLetterReason, Truncated};

pub const REASON: &str = "sessionizer.dlq.reason";
pub const ERROR: &str = "sessionizer.dlq.error";
pub const SOURCE_TOPIC: &str = "sessionizer.dlq.source.topic";
pub const SOURCE_PARTITION: &str = "sessionizer.dlq.source.partition";
pub const SOURCE_OFFSET: &str = "sessionizer.dlq.source.offset";
/// The original record's timestamp, epoch ms (absent when it had none).
pub const SOURCE_TIMESTAMP: &str = "sessionizer.dlq.source.timestamp";
/// RFC 3339, UTC.
pub const FAILED_AT: &str = "sessionizer.dlq.failed_at";
pub const WORKER: &str = "sessionizer.dlq.worker";
/// Set when the value is only the record's first bytes (see
/// [`crate::model::kept_payload`]): the whole record's length and SHA-256.
pub const TRUNCATED_BYTES: &str = "sessionizer.dlq.truncated.original_bytes";
pub const TRUNCATED_SHA256: &str = "sessionizer.dlq.truncated.original_sha256";

/// The provenance of one dead letter.
#[derive(Debug, Clone)]
pub struct Provenance<'a> {
    pub reason: DeadLetterReason,
    pub error: &'a str,
    pub failed_at: &'a str,
    pub worker: &'a str,
    pub truncated: Option<&'a Truncated>,
}

/// The headers of a dead letter made from an emitted turn's message (the
/// turn was refused for good): the provenance, with the offset of the turn's
/// first record.
pub fn turn_headers(
    topic: &str,
    partition: i32,
    offset: i64,
    provenance: &Provenance<'_>,
) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(8);
    let (partition, offset) = (partition.to_string(), offset.to_string());
    for (key, value) in [
        (REASON, provenance.reason.as_str()),
        (ERROR, provenance.error),
        (SOURCE_TOPIC, topic),
        (SOURCE_PARTITION, &partition),
        (SOURCE_OFFSET, &offset),
        (FAILED_AT, provenance.failed_at),
        (WORKER, provenance.worker),
    ] {
        out = out.insert(Header {
            key,
            value: Some(value),
        });
    }
    match provenance.truncated {
        Some(t) => with_truncated(out, t),
        None => out,
    }
}

/// `headers` plus the headers saying the value is only the record's first
/// bytes.
pub fn with_truncated(headers: OwnedHeaders, t: &Truncated) -> OwnedHeaders {
    let bytes = t.original_bytes.to_string();
    headers
        .insert(Header {
            key: TRUNCATED_BYTES,
            value: Some(&bytes),
        })
        .insert(Header {
            key: TRUNCATED_SHA256,
            value: Some(&t.original_sha256),
        })
}

/// The headers of a dead letter for `message`: its own headers first, in
/// order, then the provenance.
pub fn headers(message: &BorrowedMessage<'_>, provenance: &Provenance<'_>) -> OwnedHeaders {
    let capacity = message.headers().map_or(0, |h| h.count()) + 8;
    let mut out = OwnedHeaders::new_with_capacity(capacity);
    if let Some(original) = message.headers() {
        for h in original.iter() {
            out = out.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let partition = message.partition().to_string();
    let offset = message.offset().to_string();
    let timestamp = message.timestamp().to_millis().map(|t| t.to_string());
    let mut add = |key: &str, value: &str| {
        out = std::mem::replace(&mut out, OwnedHeaders::new()).insert(Header {
            key,
            value: Some(value),
        });
    };
    add(REASON, provenance.reason.as_str());
    add(ERROR, provenance.error);
    add(SOURCE_TOPIC, message.topic());
    add(SOURCE_PARTITION, &partition);
    add(SOURCE_OFFSET, &offset);
    if let Some(t) = &timestamp {
        add(SOURCE_TIMESTAMP, t);
    }
    add(FAILED_AT, provenance.failed_at);
    add(WORKER, provenance.worker);
    if let Some(t) = provenance.truncated {
        add(TRUNCATED_BYTES, &t.original_bytes.to_string());
        add(TRUNCATED_SHA256, &t.original_sha256);
    }
    out
}
