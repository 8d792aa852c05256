//! Who may call the gateway: static bearer tokens (configured as SHA-256
//! hashes) and OAuth2/JWT access tokens (HS256 with a secret from the
//! environment, or RS256/ES256 with public keys from a JWKS file; `exp`, and
//! `iss` and `aud` when configured, checked by the `jsonwebtoken` crate),
//! optionally bound to the events' `user_id` by a claim.

use std::collections::HashSet;

use axum::http::{header, HeaderMap, StatusCode};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};

use super::config::AuthSection;
use crate::config::ConfigError;

/// The configured ways in.
pub struct Auth {
    /// `auth.none = true`: anyone.
    open: bool,
    hashes: HashSet<[u8; 32]>,
    /// Keys (with their `kid`, if any) and the validation for each.
    jwt: Vec<(Option<String>, DecodingKey, Validation)>,
    user_claim: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("open", &self.open)
            .field("bearer_tokens", &self.hashes.len())
            .field("jwt_keys", &self.jwt.len())
            .finish()
    }
}

/// Who a request is: anyone, or a token that may be bound to one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// With `jwt_user_claim`: the only `user_id` this caller may post as.
    pub user_id: Option<String>,
}

impl Auth {
    pub fn new(section: &AuthSection) -> Result<Auth, ConfigError> {
        let hashes = section.hashes()?.unwrap_or_default();
        let mut jwt = Vec::new();
        let validation = |alg: Algorithm| {
            let mut v = Validation::new(alg);
            v.leeway = 5;
            v.validate_aud = section.jwt_audience.is_some();
            if let Some(aud) = &section.jwt_audience {
                v.set_audience(&[aud]);
            }
            if let Some(iss) = &section.jwt_issuer {
                v.set_issuer(&[iss]);
            }
            v
        };
        if let Some(var) = &section.jwt_hs256_secret_env {
            let key = "gateway.auth.jwt_hs256_secret_env";
            let secret = std::env::var(var)
                .map_err(|_| ConfigError::new(key, format!("the variable {var} is not set")))?;
            if secret.len() < 32 {
                return Err(ConfigError::new(
                    key,
                    "the secret must be at least 32 bytes",
                ));
            }
            jwt.push((
                None,
                DecodingKey::from_secret(secret.as_bytes()),
                validation(Algorithm::HS256),
            ));
        }
        if let Some(file) = &section.jwks_file {
            let key = "gateway.auth.jwks_file";
            let text = std::fs::read_to_string(file)
                .map_err(|e| ConfigError::new(key, format!("cannot read {file}: {e}")))?;
            let set: JwkSet = serde_json::from_str(&text)
                .map_err(|e| ConfigError::new(key, format!("{file} is not a JWKS: {e}")))?;
            for jwk in &set.keys {
                let alg = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    _ => {
                        return Err(ConfigError::new(
                            key,
                            format!("{file}: only RSA (RS256) and EC (ES256) keys are accepted"),
                        ))
                    }
                };
                let decoding = DecodingKey::from_jwk(jwk).map_err(|e| {
                    ConfigError::new(key, format!("{file}: a key does not load: {e}"))
                })?;
                jwt.push((jwk.common.key_id.clone(), decoding, validation(alg)));
            }
            if set.keys.is_empty() {
                return Err(ConfigError::new(key, format!("{file} holds no key")));
            }
        }
        Ok(Auth {
            open: section.none,
            hashes,
            jwt,
            user_claim: section.jwt_user_claim.clone(),
        })
    }

    /// The caller of a request, or the status and reason to refuse it.
    pub fn check(&self, headers: &HeaderMap) -> Result<Caller, (StatusCode, &'static str)> {
        if self.open {
            return Ok(Caller { user_id: None });
        }
        let unauthorized = |why| (StatusCode::UNAUTHORIZED, why);
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(unauthorized("no Authorization header"))?
            .to_str()
            .map_err(|_| unauthorized("the Authorization header is not text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or(unauthorized(
                "the Authorization header is not `Bearer <token>`",
            ))?
            .trim();
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if self.hashes.contains(&hash) {
            return Ok(Caller { user_id: None });
        }
        if self.jwt.is_empty() {
            return Err(unauthorized("the token is not accepted"));
        }
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|_| unauthorized("the token is not accepted"))?
            .kid;
        for (key_id, key, validation) in &self.jwt {
            if kid.is_some() && key_id.is_some() && *key_id != kid {
                continue;
            }
            let Ok(data) = jsonwebtoken::decode::<serde_json::Value>(token, key, validation) else {
                continue;
            };
            let user_id = match &self.user_claim {
                None => None,
                Some(claim) => Some(
                    data.claims[claim]
                        .as_str()
                        .ok_or((StatusCode::FORBIDDEN, "the token has no user claim"))?
                        .to_owned(),
                ),
            };
            return Ok(Caller { user_id });
        }
        Err(unauthorized(
            "the token is not accepted (signature, expiry, issuer or audience)",
        ))
    }
}
