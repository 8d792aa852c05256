//! `[gateway]`: where `sessionizer gateway` listens, its bounds, and who may
//! call it (`[gateway.auth]`, required: a gateway open to anyone must say so).

use std::collections::HashSet;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::values::*;
use crate::config::ConfigError;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// `host:port` of the HTTP service (also `/metrics`, `/healthz`, `/readyz`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Events per request at most (a JSON array).
    #[serde(default = "default_max_batch", deserialize_with = "number")]
    pub max_batch: usize,
    /// Request body bytes at most.
    #[serde(default = "default_max_body_bytes", deserialize_with = "number")]
    pub max_body_bytes: usize,
    /// The longest `?wait=` honoured (longer ones are cut to it).
    #[serde(default = "default_max_wait")]
    pub max_wait: Millis,
    /// Requests held for their turn at most; more are answered 503.
    #[serde(default = "default_max_held", deserialize_with = "number")]
    pub max_held: usize,
    /// The status of a "superseded" answer: 200 with a body, or 204.
    #[serde(default = "default_superseded_status", deserialize_with = "number")]
    pub superseded_status: u16,
    /// HTTPS: a PEM certificate chain, with `tls_key` (both or neither).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    /// HTTPS: the PEM private key of `tls_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    pub auth: AuthSection,
    /// `[gateway.agent]`: the turn of a held request is POSTed here, and the
    /// agent's answer is the request's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentSection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// `http://` or `https://` URL the turn is POSTed to.
    pub url: String,
    /// How long the agent may take (504 beyond).
    #[serde(default = "default_agent_timeout")]
    pub timeout: Millis,
    /// Headers sent with every call (for the agent's own authentication).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

fn default_agent_timeout() -> Millis {
    Millis(30_000)
}

/// `[gateway.auth]`: static bearer tokens, kept as SHA-256 hashes (the
/// configuration never holds a token), or `none = true`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Accept requests without a token. Never the default.
    #[serde(default, deserialize_with = "boolean")]
    pub none: bool,
    /// Lowercase hex SHA-256 of each accepted bearer token.
    #[serde(default, deserialize_with = "list")]
    pub bearer_sha256: Vec<String>,
    /// A file of such hashes, one per line (`#` comments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_sha256_file: Option<String>,
    /// JWT (HS256): the environment variable holding the shared secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_hs256_secret_env: Option<String>,
    /// JWT (RS256/ES256): a JWKS file of the issuer's public keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// JWT: the required `iss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,
    /// JWT: the required `aud`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<String>,
    /// JWT: a claim every event's `user_id` must equal (403 otherwise), so
    /// a token for one user cannot post as another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_user_claim: Option<String>,
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:8080".parse().expect("a valid address")
}

fn default_max_batch() -> usize {
    100
}

fn default_max_body_bytes() -> usize {
    1 << 20
}

fn default_max_wait() -> Millis {
    Millis(30_000)
}

fn default_max_held() -> usize {
    10_000
}

fn default_superseded_status() -> u16 {
    200
}

impl GatewaySection {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_batch == 0 {
            return Err(ConfigError::new("gateway.max_batch", "must be at least 1"));
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::new(
                "gateway.max_body_bytes",
                "must be at least 1",
            ));
        }
        if self.max_wait.0 <= 0 {
            return Err(ConfigError::new(
                "gateway.max_wait",
                "must be greater than 0",
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::new(
                if self.tls_cert.is_some() {
                    "gateway.tls_key"
                } else {
                    "gateway.tls_cert"
                },
                "HTTPS needs both tls_cert and tls_key",
            ));
        }
        if let Some(agent) = &self.agent {
            if !(agent.url.starts_with("http://") || agent.url.starts_with("https://")) {
                return Err(ConfigError::new(
                    "gateway.agent.url",
                    "must start with http:// or https://",
                ));
            }
            if agent.timeout.0 <= 0 {
                return Err(ConfigError::new(
                    "gateway.agent.timeout",
                    "must be greater than 0",
                ));
            }
        }
        if !matches!(self.superseded_status, 200 | 204) {
            return Err(ConfigError::new(
                "gateway.superseded_status",
                "must be 200 or 204",
            ));
        }
        let a = &self.auth;
        let tokens = !a.bearer_sha256.is_empty()
            || a.bearer_sha256_file.is_some()
            || a.jwt_hs256_secret_env.is_some()
            || a.jwks_file.is_some();
        if a.none == tokens {
            return Err(ConfigError::new(
                "gateway.auth",
                if a.none {
                    "none = true and tokens at once: choose one"
                } else {
                    "no authentication: set bearer_sha256 (or bearer_sha256_file), jwt_hs256_secret_env or jwks_file, or none = true to accept anyone"
                },
            ));
        }
        for hash in &a.bearer_sha256 {
            parse_hash(hash).ok_or_else(|| {
                ConfigError::new(
                    "gateway.auth.bearer_sha256",
                    "each entry must be 64 hex characters (the SHA-256 of a token, e.g. `printf %s TOKEN | sha256sum`)",
                )
            })?;
        }
        Ok(())
    }
}

impl AuthSection {
    /// The accepted token hashes (`None`: anyone), the file read now.
    pub fn hashes(&self) -> Result<Option<HashSet<[u8; 32]>>, ConfigError> {
        if self.none {
            return Ok(None);
        }
        let mut hashes = HashSet::new();
        for hash in &self.bearer_sha256 {
            hashes.insert(parse_hash(hash).expect("validated"));
        }
        if let Some(file) = &self.bearer_sha256_file {
            let key = "gateway.auth.bearer_sha256_file";
            let text = std::fs::read_to_string(file)
                .map_err(|e| ConfigError::new(key, format!("cannot read {file}: {e}")))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or_default().trim();
                if line.is_empty() {
                    continue;
                }
                let hash = parse_hash(line).ok_or_else(|| {
                    ConfigError::new(key, format!("{file}:{}: not 64 hex characters", n + 1))
                })?;
                hashes.insert(hash);
            }
        }
        Ok(Some(hashes))
    }
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}
