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

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gateway");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, sub: &str) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        let exp = crate::wall_clock::now_ms() / 1000 + 600;
        let claims = serde_json::json!({"sub": sub, "aud": "sessionizer", "exp": exp});
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    /// RS256 and ES256 tokens verified by a JWKS file's keys (chosen by
    /// `kid`, or tried in turn without one), beside an HS256 secret; a key
    /// of the wrong kind, a foreign key, `alg: none` and an HS256 token
    /// keyed with the RSA public key (algorithm confusion) are all refused.
    #[test]
    fn jwks_keys_verify_rs256_and_es256_tokens_and_nothing_else() {
        let secret = "an-hs256-secret-of-at-least-thirty-two-bytes";
        std::env::set_var("SESSIONIZER_TEST_AUTH_HS256", secret);
        let section = AuthSection {
            jwt_hs256_secret_env: Some("SESSIONIZER_TEST_AUTH_HS256".into()),
            jwks_file: Some(format!("{FIXTURES}/jwks.json")),
            jwt_audience: Some("sessionizer".into()),
            jwt_user_claim: Some("sub".into()),
            ..AuthSection::default()
        };
        let auth = Auth::new(&section).unwrap();
        let rsa = EncodingKey::from_rsa_pem(&fixture("jwt-rs256.pem")).unwrap();
        let ec = EncodingKey::from_ec_pem(&fixture("jwt-es256.pem")).unwrap();
        let alice = |token: &str| auth.check(&bearer(token));
        let ok = Ok(Caller {
            user_id: Some("alice".into()),
        });
        assert_eq!(
            alice(&sign(Algorithm::RS256, Some("rsa-1"), &rsa, "alice")),
            ok
        );
        assert_eq!(
            alice(&sign(Algorithm::ES256, Some("ec-1"), &ec, "alice")),
            ok
        );
        assert_eq!(alice(&sign(Algorithm::ES256, None, &ec, "alice")), ok);
        let refused = |result: Result<Caller, (StatusCode, &str)>| {
            assert_eq!(
                result.map_err(|(status, _)| status),
                Err(StatusCode::UNAUTHORIZED)
            );
        };
        // The EC key under the RSA key's id, and an RSA token claimed as EC.
        refused(alice(&sign(Algorithm::ES256, Some("rsa-1"), &ec, "alice")));
        refused(alice(&sign(Algorithm::RS256, Some("ec-1"), &rsa, "alice")));
        // Algorithm confusion: HS256 keyed with the public JWKS text.
        let public = EncodingKey::from_secret(&fixture("jwks.json"));
        refused(alice(&sign(
            Algorithm::HS256,
            Some("rsa-1"),
            &public,
            "alice",
        )));
        // `alg: none`, unsigned.
        let good = sign(Algorithm::RS256, Some("rsa-1"), &rsa, "alice");
        let claims = good.split('.').nth(1).unwrap();
        refused(alice(&format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}."
        )));
        // A signature over other claims.
        let mut parts: Vec<&str> = good.split('.').collect();
        let other = sign(Algorithm::RS256, Some("rsa-1"), &rsa, "mallory");
        parts[1] = other.split('.').nth(1).unwrap();
        refused(alice(&parts.join(".")));
    }
}
