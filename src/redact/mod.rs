//! The redaction stage between the engine and the output encoders
//! (`docs/redaction.md`): with `[redact]`, every emitted turn's message texts
//! and named attributes have their sensitive values replaced, by `[LABEL]`
//! (mask) or by a deterministic token `[LABEL:…]` that
//! [`Redactor::reidentify`] turns back into the value (tokenize). The turn
//! records how many values each detector replaced, never the values. The
//! engine never sees redacted text; the output never sees raw text; dead
//! letters keep the original bytes (a replay needs them).

mod config;
mod detectors;
mod token;

use std::sync::{Arc, LazyLock};

use regex::{Regex, RegexSet};

pub use config::{CustomDetector, RedactMode, RedactSection};
pub use token::{TokenKey, KEY_BYTES};

use crate::config::ConfigError;
use crate::engine::ClosedSession;
use crate::model::Redaction;

/// One detector as it runs.
struct Detector {
    name: String,
    /// `[LABEL]`, `[LABEL:token]`: the name in capitals.
    label: String,
    regex: Regex,
    /// The capture group that is the value (0: the whole match).
    group: usize,
    check: fn(&str) -> bool,
    /// See [`detectors::Builtin::thorough`].
    thorough: bool,
    counter: ::metrics::Counter,
}

/// A configured redaction stage; cheap to clone (shared detectors).
#[derive(Clone)]
pub struct Redactor {
    detectors: Arc<[Detector]>,
    /// All detectors' patterns: one pass says which may match at all, so
    /// a text without sensitive values costs one scan.
    any: Arc<RegexSet>,
    key: Option<TokenKey>,
    attributes: Arc<[String]>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.detectors.iter().map(|d| d.name.as_str()).collect();
        f.debug_struct("Redactor")
            .field("detectors", &names)
            .field("tokenize", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

/// What [`Redactor::reidentify`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reidentified {
    /// Tokens replaced by their values.
    pub restored: u64,
    /// Token-shaped text that does not open under the key (another key,
    /// tampered, or not a token at all): left as it is.
    pub refused: u64,
}

/// `[LABEL:token]`, as [`Redactor`] writes tokens.
static TOKEN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\[([A-Z][A-Z0-9_]*):([A-Za-z0-9_\-]+)\]").expect("valid"));

impl Redactor {
    /// The stage a `[redact]` section describes (validated at config load:
    /// this repeats the key loading, so it fails only as validation did).
    pub fn new(section: &RedactSection) -> Result<Redactor, ConfigError> {
        let mut detectors = Vec::new();
        for builtin in detectors::BUILTINS.iter() {
            if section.detectors.iter().any(|d| d == builtin.name) {
                detectors.push(Detector::new(
                    builtin.name,
                    builtin.pattern,
                    builtin.group,
                    builtin.check,
                    builtin.thorough,
                )?);
            }
        }
        for custom in &section.custom {
            detectors.push(Detector::new(
                &custom.name,
                &custom.pattern,
                0,
                |_| true,
                false,
            )?);
        }
        let any = RegexSet::new(detectors.iter().map(|d| d.regex.as_str()))
            .map_err(|e| ConfigError::new("redact", e.to_string()))?;
        Ok(Redactor {
            detectors: detectors.into(),
            any: Arc::new(any),
            key: section.key()?,
            attributes: section.attributes.clone().into(),
        })
    }

    /// Redacts the session's message texts and named attributes in place
    /// and records what was replaced (`session.redactions`, one entry per
    /// detector that found something, in detector order).
    pub fn apply(&self, session: &mut ClosedSession) {
        let mut counts = vec![0u32; self.detectors.len()];
        for message in &mut session.messages {
            if let Some(text) = self.redact(message.text(), &mut counts) {
                message.set_text(&text);
            }
            if let Some(attributes) = message.attributes.as_deref_mut() {
                for name in self.attributes.iter() {
                    if let Some(value) = attributes.get_mut(name) {
                        if let Some(redacted) = self.redact(value, &mut counts) {
                            *value = redacted;
                        }
                    }
                }
            }
        }
        session.redactions = Some(
            self.detectors
                .iter()
                .zip(counts)
                .filter(|(_, n)| *n > 0)
                .map(|(d, count)| {
                    d.counter.increment(u64::from(count));
                    Redaction {
                        detector: d.name.clone(),
                        count,
                    }
                })
                .collect(),
        );
    }

    /// `text` with every value found replaced (for showing, not counted).
    pub fn redacted<'t>(&self, text: &'t str) -> std::borrow::Cow<'t, str> {
        let mut counts = vec![0; self.detectors.len()];
        match self.redact(text, &mut counts) {
            Some(text) => std::borrow::Cow::Owned(text),
            None => std::borrow::Cow::Borrowed(text),
        }
    }

    /// A record's bytes as an operator may see them: a JSON record with
    /// every string value redacted (so escapes and field names do not hide
    /// or fake a value), anything else as text with invalid bytes replaced,
    /// redacted.
    pub fn redacted_payload(&self, bytes: &[u8]) -> Vec<u8> {
        fn walk(r: &Redactor, value: &mut serde_json::Value) {
            match value {
                serde_json::Value::String(s) => {
                    if let std::borrow::Cow::Owned(text) = r.redacted(s) {
                        *s = text;
                    }
                }
                serde_json::Value::Array(items) => items.iter_mut().for_each(|v| walk(r, v)),
                serde_json::Value::Object(map) => map.values_mut().for_each(|v| walk(r, v)),
                _ => {}
            }
        }
        match serde_json::from_slice::<serde_json::Value>(bytes) {
            Ok(mut value) => {
                walk(self, &mut value);
                serde_json::to_vec(&value).expect("a JSON value serializes")
            }
            Err(_) => self
                .redacted(&String::from_utf8_lossy(bytes))
                .into_owned()
                .into_bytes(),
        }
    }

    /// `text` with every value found replaced, or `None` when nothing was
    /// found; `counts` (one per detector) grows by what was replaced.
    pub fn redact(&self, text: &str, counts: &mut [u32]) -> Option<String> {
        let finds = self.finds(text);
        if finds.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(text.len() + 16 * finds.len());
        let mut at = 0;
        for (start, end, i) in finds {
            let d = &self.detectors[i];
            out.push_str(&text[at..start]);
            out.push('[');
            out.push_str(&d.label);
            if let Some(key) = &self.key {
                out.push(':');
                out.push_str(&key.seal(&d.name, &text[start..end]));
            }
            out.push(']');
            counts[i] += 1;
            at = end;
        }
        out.push_str(&text[at..]);
        Some(out)
    }

    /// The values in `text`: (start, end, detector), ascending, without
    /// overlaps (at one start the longest find wins, then the detector
    /// listed first).
    fn finds(&self, text: &str) -> Vec<(usize, usize, usize)> {
        let candidates = self.any.matches(text);
        if !candidates.matched_any() {
            return Vec::new();
        }
        let mut finds = Vec::new();
        for i in candidates.iter() {
            self.detectors[i].find_all(text, |start, end| finds.push((start, end, i)));
        }
        finds.sort_by_key(|&(start, end, i)| (start, std::cmp::Reverse(end), i));
        let mut kept: Vec<(usize, usize, usize)> = Vec::with_capacity(finds.len());
        for f in finds {
            if kept.last().is_none_or(|last| f.0 >= last.1) {
                kept.push(f);
            }
        }
        kept
    }

    /// Replaces every token made under this stage's key with its value
    /// (the way back, for an agent's answer); tokens made under another
    /// key or changed are left as they are and counted. Under `mask` there
    /// is nothing to restore: the text comes back unchanged.
    pub fn reidentify(&self, text: &str) -> (String, Reidentified) {
        let mut done = Reidentified::default();
        let Some(key) = &self.key else {
            return (text.to_owned(), done);
        };
        let out = TOKEN.replace_all(text, |caps: &regex::Captures<'_>| {
            let name = caps[1].to_ascii_lowercase();
            match key.open(&name, &caps[2]) {
                Some(value) => {
                    done.restored += 1;
                    value
                }
                None => {
                    done.refused += 1;
                    caps[0].to_owned()
                }
            }
        });
        (out.into_owned(), done)
    }
}

impl Detector {
    /// Every value of this detector in `text`, as byte ranges. A candidate
    /// that fails the check may hide a value: a card number followed by more
    /// digits (`4111 1111 1111 1111 12/25`), an IBAN running into the next
    /// word. So for a thorough detector a failed candidate is tried shorter
    /// (cut where a separator follows a letter or digit, longest first), and
    /// the search goes on from its next character, not from its end. A
    /// value never starts in the middle of a word or number.
    fn find_all(&self, text: &str, mut found: impl FnMut(usize, usize)) {
        let mut at = 0;
        while at <= text.len() {
            let Some(caps) = self.regex.captures_at(text, at) else {
                return;
            };
            let whole = caps.get(0).expect("group 0");
            let value = caps
                .get(self.group)
                .filter(|m| !starts_mid_word(text, m.start()))
                .and_then(|m| self.accept(text, m.start(), m.end()));
            at = match value {
                Some(end) => {
                    found(caps.get(self.group).expect("matched").start(), end);
                    end.max(whole.end()).max(next_char(text, at))
                }
                None if self.thorough => next_char(text, whole.start()),
                None => whole.end().max(next_char(text, at)),
            };
        }
    }

    /// The end of the longest value starting at `start` within the
    /// candidate `start..end` that passes the check.
    fn accept(&self, text: &str, start: usize, end: usize) -> Option<usize> {
        if (self.check)(&text[start..end]) {
            return Some(end);
        }
        if !self.thorough {
            return None;
        }
        let candidate = &text[start..end];
        let mut cuts: Vec<usize> = candidate
            .char_indices()
            .zip(candidate.chars().skip(1))
            .filter(|((_, c), next)| c.is_alphanumeric() && !next.is_alphanumeric())
            .map(|((i, c), _)| start + i + c.len_utf8())
            .collect();
        cuts.reverse();
        cuts.into_iter()
            .find(|&cut| (self.check)(&text[start..cut]))
    }

    fn new(
        name: &str,
        pattern: &str,
        group: usize,
        check: fn(&str) -> bool,
        thorough: bool,
    ) -> Result<Detector, ConfigError> {
        let regex = Regex::new(pattern)
            .map_err(|e| ConfigError::new("redact", format!("detector {name}: {e}")))?;
        Ok(Detector {
            name: name.to_owned(),
            label: name.to_ascii_uppercase(),
            regex,
            group,
            check,
            thorough,
            counter: crate::metrics::redactions(name),
        })
    }
}

/// Whether `at` is inside a word or number: a letter or digit on both sides.
fn starts_mid_word(text: &str, at: usize) -> bool {
    let before = text[..at].chars().next_back();
    let first = text[at..].chars().next();
    before.is_some_and(char::is_alphanumeric) && first.is_some_and(char::is_alphanumeric)
}

/// The index of the character after the one at `at` (`len + 1` at the end).
fn next_char(text: &str, at: usize) -> usize {
    text[at..]
        .chars()
        .next()
        .map_or(text.len() + 1, |c| at + c.len_utf8())
}

#[cfg(test)]
mod tests;
