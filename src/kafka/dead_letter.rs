//! A Kafka dead letter keeps the original key, value and headers unchanged and
//! adds provenance as headers, so `dlq inspect` and `dlq replay` need nothing
//! but the record itself.

use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};

use crate::model::{DeadLetterReason, Truncated};

pub use crate::model::dead_letter_names::kafka::*;

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
    let source = Source {
        topic,
        partition,
        offset,
        timestamp: None,
    };
    with_provenance(OwnedHeaders::new_with_capacity(9), &source, provenance)
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
    let capacity = message.headers().map_or(0, |h| h.count()) + 9;
    let mut out = OwnedHeaders::new_with_capacity(capacity);
    if let Some(original) = message.headers() {
        for h in original.iter() {
            out = out.insert(Header {
                key: h.key,
                value: h.value,
            });
        }
    }
    let source = Source {
        topic: message.topic(),
        partition: message.partition(),
        offset: message.offset(),
        timestamp: message.timestamp().to_millis(),
    };
    with_provenance(out, &source, provenance)
}

/// Where a dead letter's record came from.
struct Source<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
}

/// `headers` plus the `sessionizer.dlq.*` provenance headers.
fn with_provenance(
    mut headers: OwnedHeaders,
    source: &Source<'_>,
    provenance: &Provenance<'_>,
) -> OwnedHeaders {
    let (partition, offset) = (source.partition.to_string(), source.offset.to_string());
    let timestamp = source.timestamp.map(|t| t.to_string());
    for (key, value) in [
        (REASON, Some(provenance.reason.as_str())),
        (ERROR, Some(provenance.error)),
        (SOURCE_TOPIC, Some(source.topic)),
        (SOURCE_PARTITION, Some(&partition)),
        (SOURCE_OFFSET, Some(&offset)),
        (SOURCE_TIMESTAMP, timestamp.as_deref()),
        (FAILED_AT, Some(provenance.failed_at)),
        (WORKER, Some(provenance.worker)),
    ] {
        if let Some(value) = value {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
    }
    match provenance.truncated {
        Some(t) => with_truncated(headers, t),
        None => headers,
    }
}
