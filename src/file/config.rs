//! `[file]`: file mode's section of the configuration.

use serde::{Deserialize, Serialize};

/// `[file]`: file mode.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileSection {
    /// JSON lines to read; `-` is stdin.
    #[serde(default = "dash")]
    pub input: String,
    /// Where turns go; `-` is stdout.
    #[serde(default = "dash")]
    pub output: String,
    /// Where dead letters go (JSON lines); `-` is stderr. Required: dead
    /// letters are never discarded silently.
    pub dlq: String,
}

fn dash() -> String {
    "-".to_owned()
}
