//! The names a dead letter's provenance is stored under, defined once for the
//! workers that write them and `sessionizer dlq` that reads them
//! (`docs/contract.md`). Kafka keeps the original record and adds headers;
//! Redis writes a new stream entry of fields; both carry the replay names.

/// Names the DLQ position a replayed record came from (Kafka header, Redis
/// field).
pub const REPLAY_FROM: &str = "sessionizer.replay.from";
/// How often the record was replayed (Kafka header, Redis field); a dead
/// letter keeps it, so `--max-replays` can stop a record that never succeeds.
pub const REPLAY_COUNT: &str = "sessionizer.replay.count";

/// The static name of a `sessionizer.replay.*` field or header, for copying
/// it onto a new dead letter.
pub fn replay_name(name: &[u8]) -> Option<&'static str> {
    [REPLAY_FROM, REPLAY_COUNT]
        .into_iter()
        .find(|n| n.as_bytes() == name)
}

/// Headers a Kafka dead letter adds to the original record.
pub mod kafka {
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
    /// `sessionizer push`: the agent's last HTTP status (absent when the
    /// last attempt got no answer).
    pub const HTTP_STATUS: &str = "sessionizer.dlq.http_status";
}

/// Fields of a Redis dead-letter stream entry.
pub mod redis {
    /// The record as decoded (a flat entry's fields as its JSON event).
    pub const PAYLOAD: &str = "payload";
    pub const REASON: &str = "reason";
    pub const ERROR: &str = "error";
    pub const SOURCE_STREAM: &str = "source_stream";
    pub const SOURCE_ID: &str = "source_id";
    /// RFC 3339, UTC.
    pub const FAILED_AT: &str = "failed_at";
    pub const WORKER: &str = "worker";
    /// How often the entry was delivered before it was dead-lettered.
    pub const DELIVERIES: &str = "deliveries";
    /// `payload` or `fields`: how the entry carried its event.
    pub const FORM: &str = "form";
    /// Set when `payload` is only the record's first bytes.
    pub const TRUNCATED_BYTES: &str = "truncated_original_bytes";
    pub const TRUNCATED_SHA256: &str = "truncated_original_sha256";
    /// `sessionizer push`: the agent's last HTTP status.
    pub const HTTP_STATUS: &str = "http_status";
}
