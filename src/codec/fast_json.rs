//! A fast path for the common ChatEvent JSON: one flat object whose strings
//! have no escapes. It reads the fields in one pass over the bytes and borrows
//! every string. Anything outside that subset (escapes, nested values,
//! attributes, floats, duplicate keys, anything odd) returns `None`, and the
//! caller decodes with serde_json, which decides validity and errors. So this
//! path never decides that a record is poison; a proptest holds it to serde's
//! results on everything it accepts.

/// The fields of a ChatEvent as the fast path read them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FastFields<'a> {
    pub message_id: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub conversation_id: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub text: Option<&'a str>,
    /// `Ok(ms)` for an integer, `Err(text)` for a string (RFC 3339).
    pub event_time: Option<Result<i64, &'a str>>,
}

struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes().get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    /// A string without escapes or control characters; the cursor is on `"`.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.pos;
        let rest = &self.bytes()[start..];
        let end = rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if rest[end] != b'"' {
            return None;
        }
        self.pos = start + end + 1;
        // Both ends are ASCII, so these are char boundaries of valid UTF-8.
        Some(&self.text[start..start + end])
    }

    /// An integer in i64 range, in JSON's syntax (no leading zeros, no
    /// fraction or exponent).
    fn integer(&mut self) -> Option<i64> {
        let start = self.pos;
        self.eat(b'-');
        let digits_start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        let digits = &self.text[digits_start..self.pos];
        if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
            return None;
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.text[start..self.pos].parse().ok()
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        self.text[self.pos..]
            .starts_with(word)
            .then(|| self.pos += word.len())
    }

    /// Skips a scalar value of an unknown field.
    fn skip_scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'-' | b'0'..=b'9' => {
                // Any JSON number: let serde judge unusual ones.
                self.integer().map(|_| ())
            }
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            _ => None,
        }
    }

    /// A string or `null` (absent).
    fn optional_string(&mut self) -> Option<Option<&'a str>> {
        if self.peek()? == b'n' {
            self.literal("null")?;
            Some(None)
        } else {
            self.string().map(Some)
        }
    }
}

/// Reads the common shape; `None` means "use the full decoder".
pub fn read(text: &str) -> Option<FastFields<'_>> {
    let mut c = Cursor { text, pos: 0 };
    let mut f = FastFields::default();
    let mut seen = 0u8;
    c.skip_ws();
    c.eat(b'{')?;
    c.skip_ws();
    if c.eat(b'}').is_none() {
        loop {
            c.skip_ws();
            let key = c.string()?;
            c.skip_ws();
            c.eat(b':')?;
            c.skip_ws();
            let bit = match key {
                "message_id" => 1,
                "user_id" => 2,
                "conversation_id" => 4,
                "kind" => 8,
                "text" => 16,
                "event_time" => 32,
                "attributes" | "gap_ms" => return None,
                _ => 0,
            };
            if seen & bit != 0 {
                return None; // a duplicate field: serde's call
            }
            seen |= bit;
            match key {
                "message_id" => f.message_id = c.optional_string()?,
                "user_id" => f.user_id = c.optional_string()?,
                "conversation_id" => f.conversation_id = c.optional_string()?,
                "kind" => f.kind = c.optional_string()?,
                "text" => f.text = c.optional_string()?,
                "event_time" => {
                    f.event_time = match c.peek()? {
                        b'"' => Some(Err(c.string()?)),
                        b'n' => {
                            c.literal("null")?;
                            None
                        }
                        _ => Some(Ok(c.integer()?)),
                    }
                }
                _ => c.skip_scalar()?,
            }
            c.skip_ws();
            match c.peek()? {
                b',' => c.pos += 1,
                b'}' => {
                    c.pos += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    c.skip_ws();
    (c.pos == text.len()).then_some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_common_shape_and_defers_the_rest() {
        let f = read(
            r#" {"message_id":"m1","user_id":"u","text":"hi there","event_time":1700000000000,"x":[1]} "#,
        );
        assert_eq!(f, None, "a nested unknown value is serde's");
        let f = read(r#"{"message_id":"m1", "user_id" : "u","conversation_id":null,"text":"hi","event_time":1700000000000,"client":"ios","n":5,"ok":true}"#).unwrap();
        assert_eq!(
            (f.message_id, f.user_id, f.conversation_id, f.text),
            (Some("m1"), Some("u"), None, Some("hi"))
        );
        assert_eq!(f.event_time, Some(Ok(1_700_000_000_000)));
        for deferred in [
            r#"{"message_id":"m\n1"}"#,
            r#"{"event_time":1.5}"#,
            r#"{"event_time":01}"#,
            r#"{"a":1,"a":2,"text":"x","text":"y"}"#,
            r#"{"attributes":{}}"#,
            r#"{"text":"x"} trailing"#,
            r#"{"text":"x",}"#,
            r#"{"event_time":99999999999999999999}"#,
            r#"[1]"#,
            "",
        ] {
            assert_eq!(read(deferred), None, "{deferred}");
        }
        assert_eq!(
            read(r#"{"event_time":"2023-11-14T22:13:20Z"}"#)
                .unwrap()
                .event_time,
            Some(Err("2023-11-14T22:13:20Z"))
        );
        assert_eq!(read("{}").unwrap(), FastFields::default());
    }
}
