//! Deterministic tokens: `[LABEL:<token>]`, where the token is the value
//! sealed with AES-256-SIV (RFC 5297, the `aes-siv` crate) under the
//! configured key, with the detector's name as associated data, in
//! unpadded base64url. The same value under the same key always gives the
//! same token (so the agent still tells two addresses apart); the token
//! opens only under that key and only as that detector's, and any change to
//! it fails authentication.

use std::sync::{Arc, Mutex};

use aes_siv::siv::Aes256Siv;
use aes_siv::KeyInit as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use base64::Engine as _;

/// The key length AES-256-SIV takes: two 256-bit keys.
pub const KEY_BYTES: usize = 64;

/// A key, held only as the cipher (never printed); clones share it.
#[derive(Clone)]
pub struct TokenKey {
    /// SIV's `encrypt` takes `&mut self` (its MAC state); a lock is cheaper
    /// than keying a cipher per value.
    cipher: Arc<Mutex<Aes256Siv>>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(…)")
    }
}

impl TokenKey {
    /// `bytes` must be [`KEY_BYTES`] long.
    pub fn new(bytes: &[u8]) -> Option<TokenKey> {
        (bytes.len() == KEY_BYTES).then(|| TokenKey {
            cipher: Arc::new(Mutex::new(
                Aes256Siv::new_from_slice(bytes).expect("the length is checked"),
            )),
        })
    }

    /// The token of `value` found by `detector`.
    pub fn seal(&self, detector: &str, value: &str) -> String {
        let sealed = self
            .cipher()
            .encrypt([detector.as_bytes()], value.as_bytes())
            .expect("SIV encryption of a short value does not fail");
        BASE64URL.encode(sealed)
    }

    /// The value of a token made by [`Self::seal`] under this key for
    /// `detector`; `None` for any other token.
    pub fn open(&self, detector: &str, token: &str) -> Option<String> {
        let sealed = BASE64URL.decode(token).ok()?;
        let value = self.cipher().decrypt([detector.as_bytes()], &sealed).ok()?;
        String::from_utf8(value).ok()
    }

    fn cipher(&self) -> std::sync::MutexGuard<'_, Aes256Siv> {
        self.cipher.lock().unwrap_or_else(|e| e.into_inner())
    }
}
