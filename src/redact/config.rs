//! `[redact]`: which detectors run over every emitted turn, mask or
//! tokenize, and where the tokenization key comes from (never the config
//! file itself, which `check-config` prints).

use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::detectors;
use super::token::{TokenKey, KEY_BYTES};
use crate::config::values::list;
use crate::config::ConfigError;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedactSection {
    /// Built-in detectors to run (default: all of them).
    #[serde(default = "all_builtins", deserialize_with = "list")]
    pub detectors: Vec<String>,
    #[serde(default)]
    pub mode: RedactMode,
    /// `tokenize`: the environment variable holding the key (base64 of 64
    /// bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    /// `tokenize`: a file holding the key (base64 of 64 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// Attribute names whose values are redacted too.
    #[serde(default, deserialize_with = "list")]
    pub attributes: Vec<String>,
    /// `[[redact.custom]]`: detectors of your own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom: Vec<CustomDetector>,
}

/// `mask` replaces a value with `[LABEL]`; `tokenize` with `[LABEL:token]`,
/// which `sessionizer reidentify` turns back into the value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RedactMode {
    #[default]
    Mask,
    Tokenize,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CustomDetector {
    /// Lowercase letters, digits and `_`; its label is the name in capitals.
    pub name: String,
    /// A regular expression (Rust `regex` syntax); the whole match is the value.
    pub pattern: String,
}

fn all_builtins() -> Vec<String> {
    detectors::names().map(str::to_owned).collect()
}

impl RedactSection {
    /// Checks names and patterns, so a bad section fails at load with the
    /// key named. The key itself is loaded by [`Self::key`] where it is used
    /// (`run`, `check-config`, `reidentify`, `dlq inspect`), so commands that
    /// need no key (`status`, `dlq stats`) run without it.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.detectors.is_empty() && self.custom.is_empty() {
            return Err(ConfigError::new(
                "redact.detectors",
                "no detector: [redact] would change nothing while turns say they were redacted \
                 (leave [redact] out to turn redaction off)",
            ));
        }
        if let Some(var) = &self.key_env {
            let name_like = var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !name_like {
                // Never echo it: it may be the key itself, put there by mistake.
                return Err(ConfigError::new(
                    "redact.key_env",
                    "must name an environment variable (letters, digits, _), not hold the key",
                ));
            }
        }
        for name in &self.detectors {
            if !detectors::names().any(|b| b == name) {
                return Err(ConfigError::new(
                    "redact.detectors",
                    format!(
                        "unknown detector {name:?} (built-in: {}; add your own under [[redact.custom]])",
                        detectors::names().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        for (i, custom) in self.custom.iter().enumerate() {
            let key = |field: &str| format!("redact.custom[{i}].{field}");
            let well_formed = custom.name.starts_with(|c: char| c.is_ascii_lowercase())
                && custom
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !well_formed {
                return Err(ConfigError::new(
                    key("name"),
                    format!(
                        "{:?} must be lowercase letters, digits and _ , starting with a letter",
                        custom.name
                    ),
                ));
            }
            if detectors::names().any(|b| b == custom.name)
                || self.custom[..i].iter().any(|c| c.name == custom.name)
            {
                return Err(ConfigError::new(
                    key("name"),
                    format!("{:?} is taken by another detector", custom.name),
                ));
            }
            let regex = regex::Regex::new(&custom.pattern).map_err(|e| {
                ConfigError::new(
                    key("pattern"),
                    format!("{:?} ({}): {e}", custom.pattern, custom.name),
                )
            })?;
            // An empty match (`\b`, `x*`) would insert a label at every such
            // place; probe a few texts for one.
            let empty = ["", "ab cd", "12 34", "#x"]
                .iter()
                .any(|probe| regex.find_iter(probe).any(|m| m.is_empty()));
            if empty {
                return Err(ConfigError::new(
                    key("pattern"),
                    format!(
                        "{:?} ({}) can match empty text",
                        custom.pattern, custom.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The tokenization key (`None` under `mask`). Errors name the key that
    /// is missing or wrong, never its value.
    pub(crate) fn key(&self) -> Result<Option<TokenKey>, ConfigError> {
        if self.mode == RedactMode::Mask {
            if self.key_env.is_some() || self.key_file.is_some() {
                return Err(ConfigError::new(
                    "redact.mode",
                    "a key is set but mode is \"mask\" (use \"tokenize\", or leave the key out)",
                ));
            }
            return Ok(None);
        }
        let (key, text) =
            match (&self.key_env, &self.key_file) {
                (Some(var), None) => (
                    "redact.key_env",
                    std::env::var(var).map_err(|_| {
                        ConfigError::new("redact.key_env", format!("the variable {var} is not set"))
                    })?,
                ),
                (None, Some(file)) => (
                    "redact.key_file",
                    std::fs::read_to_string(Path::new(file)).map_err(|e| {
                        ConfigError::new("redact.key_file", format!("cannot read {file}: {e}"))
                    })?,
                ),
                _ => return Err(ConfigError::new(
                    "redact.key_env",
                    "mode = \"tokenize\" needs exactly one of redact.key_env and redact.key_file",
                )),
            };
        // `openssl rand -base64 64` wraps its output over two lines.
        let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bytes = BASE64.decode(compact).map_err(|_| {
            ConfigError::new(
                key,
                "the key is not base64 (make one with `openssl rand -base64 64`)",
            )
        })?;
        TokenKey::new(&bytes).map(Some).ok_or_else(|| {
            ConfigError::new(
                key,
                format!(
                    "the key is {} bytes; AES-256-SIV takes {KEY_BYTES} (make one with `openssl rand -base64 64`)",
                    bytes.len()
                ),
            )
        })
    }
}
