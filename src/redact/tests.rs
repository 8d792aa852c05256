use proptest::prelude::*;

use super::*;

fn section(mode: RedactMode, custom: &[(&str, &str)]) -> RedactSection {
    RedactSection {
        detectors: detectors::names().map(str::to_owned).collect(),
        mode,
        key_env: None,
        key_file: None,
        attributes: vec!["email".to_owned()],
        custom: custom
            .iter()
            .map(|(name, pattern)| CustomDetector {
                name: (*name).to_owned(),
                pattern: (*pattern).to_owned(),
            })
            .collect(),
    }
}

fn masker() -> Redactor {
    Redactor::new(&section(RedactMode::Mask, &[("order_id", r"#\d{3,}")])).unwrap()
}

fn tokenizer(key_byte: u8) -> Redactor {
    let mut r = Redactor::new(&section(RedactMode::Mask, &[("order_id", r"#\d{3,}")])).unwrap();
    r.key = TokenKey::new(&[key_byte; KEY_BYTES]);
    r
}

fn mask(text: &str) -> String {
    let r = masker();
    let mut counts = vec![0; r.detectors.len()];
    r.redact(text, &mut counts)
        .unwrap_or_else(|| text.to_owned())
}

/// Positive and negative examples per detector: checksums, numbers in
/// prose, unicode around values, values at the start and end of a text.
#[test]
fn the_corpus() {
    let cases = [
        (
            "write to bob.smith+tag@example.co.uk please",
            "write to [EMAIL] please",
        ),
        ("bob@example.com", "[EMAIL]"),
        ("«alice@mail.example.org»", "«[EMAIL]»"),
        (
            "not an address: bob@localhost",
            "not an address: bob@localhost",
        ),
        ("call +49 30 1234567 now", "call [PHONE] now"),
        ("(555) 123-4567", "[PHONE]"),
        ("my number is 555-123-4567.", "my number is [PHONE]."),
        ("+14155552671", "[PHONE]"),
        (
            "card 4111 1111 1111 1111 expires",
            "card [CREDIT_CARD] expires",
        ),
        ("4111-1111-1111-1111", "[CREDIT_CARD]"),
        (
            "card 4111 1111 1111 1112 fails Luhn",
            "card 4111 1111 1111 1112 fails Luhn",
        ),
        ("IBAN DE89 3704 0044 0532 0130 00 ok", "IBAN [IBAN] ok"),
        ("GB82WEST12345698765432", "[IBAN]"),
        (
            "GB82WEST12345698765433 fails mod 97",
            "GB82WEST12345698765433 fails mod 97",
        ),
        (
            "from 192.168.10.1 and 2001:db8::8a2e:370:7334",
            "from [IP] and [IP]",
        ),
        (
            "version 999.1.1.1 is no address",
            "version 999.1.1.1 is no address",
        ),
        ("meet at 10:30:00", "meet at 10:30:00"),
        (
            "https://admin:s3cret@db.example.com/x",
            "https://[URL_CREDENTIALS]@db.example.com/x",
        ),
        ("https://db.example.com/x", "https://db.example.com/x"),
        ("ssn 123-45-6789.", "ssn [US_SSN]."),
        (
            "ssn 666-45-6789 is never issued",
            "ssn 666-45-6789 is never issued",
        ),
        (
            "my order #123 never arrived",
            "my order [ORDER_ID] never arrived",
        ),
        (
            "I waited 45 minutes and 2 days",
            "I waited 45 minutes and 2 days",
        ),
        (
            "ordered on 2026-12-03 at 10:30",
            "ordered on 2026-12-03 at 10:30",
        ),
        ("", ""),
        (
            "at 2026-12-03 10:30 and 03.12.2026 10.30",
            "at 2026-12-03 10:30 and 03.12.2026 10.30",
        ),
        ("card 4111 1111 1111 1111 12/25", "card [CREDIT_CARD] 12/25"),
        ("ref 7 4111 1111 1111 1111", "ref 7 [CREDIT_CARD]"),
        ("4111111111111111 123", "[CREDIT_CARD] 123"),
        ("order 12345 67890", "order 12345 67890"),
        ("IBAN DE89 3704 0044 0532 0130 00 BIC", "IBAN [IBAN] BIC"),
        ("ip:2001:db8::1", "ip:[IP]"),
        ("x4111111111111111", "x4111111111111111"),
    ];
    for (text, want) in cases {
        assert_eq!(mask(text), want, "{text:?}");
    }
}

#[test]
fn a_turn_is_redacted_in_texts_and_named_attributes_with_counts() {
    use crate::codec::{encode_turn, OutputFormat};
    use crate::engine::{Resolution, SessionEngine};
    use crate::model::{ChatEvent, EventKind};
    let config =
        crate::config::Config::from_toml("source = \"file\"\n[file]\ndlq = \"-\"\n", Vec::new());
    let mut engine = SessionEngine::new(config.unwrap().window_config());
    let mut out = Vec::new();
    for (i, text) in [
        "mail bob@example.com",
        "or eve@example.com, card 4111111111111111",
    ]
    .into_iter()
    .enumerate()
    {
        let mut attributes = crate::model::Attributes::new();
        attributes.insert("email".into(), "carol@example.com".into());
        attributes.insert("plan".into(), "gold@tier.com".into());
        let event = ChatEvent {
            message_id: format!("m{i}").into(),
            user_id: "u".into(),
            conversation_id: None,
            kind: EventKind::Message,
            text: text.into(),
            event_time: 1_000 + i as i64,
            attributes: Some(Box::new(attributes)),
            gap_ms: None,
        };
        engine.on_event(event, i as u64, &mut out);
    }
    engine.flush(&mut out);
    let Some(Resolution::Turn(mut session)) = out.pop() else {
        panic!("one turn");
    };
    masker().apply(&mut session);
    let mut json = Vec::new();
    encode_turn(&session, OutputFormat::Json, &mut json);
    let turn: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(turn["text"], "mail [EMAIL]\nor [EMAIL], card [CREDIT_CARD]");
    assert_eq!(turn["messages"][1]["attributes"]["email"], "[EMAIL]");
    assert_eq!(
        turn["messages"][1]["attributes"]["plan"], "gold@tier.com",
        "not named"
    );
    assert_eq!(
        turn["redactions"],
        serde_json::json!([
            {"detector": "email", "count": 4},
            {"detector": "credit_card", "count": 1}
        ])
    );
    // The fast JSON writer and serde agree, and protobuf carries the counts.
    let serde = serde_json::to_value(crate::codec::turn_from_session(&session)).unwrap();
    assert_eq!(turn, serde);
    let mut pb = Vec::new();
    encode_turn(&session, OutputFormat::Protobuf, &mut pb);
    let decoded = <crate::codec::proto::Turn as prost::Message>::decode(&pb[..]).unwrap();
    let counts: Vec<(String, u32)> = decoded
        .redactions
        .into_iter()
        .map(|r| (r.detector, r.count))
        .collect();
    assert_eq!(
        counts,
        [("email".to_owned(), 4), ("credit_card".to_owned(), 1)]
    );
    assert_eq!(decoded.text, "mail [EMAIL]\nor [EMAIL], card [CREDIT_CARD]");
}

#[test]
fn tokens_are_deterministic_per_key_and_reidentify_only_under_it() {
    let (a, b) = (tokenizer(1), tokenizer(2));
    let mut counts = vec![0; a.detectors.len()];
    let once = a.redact("bob@example.com", &mut counts).unwrap();
    let twice = a.redact("bob@example.com", &mut counts).unwrap();
    let other = a.redact("eve@example.com", &mut counts).unwrap();
    assert_eq!(once, twice, "the same value, the same token");
    assert_ne!(once, other, "two addresses stay apart");
    assert!(
        once.starts_with("[EMAIL:") && !once.contains("bob"),
        "{once}"
    );
    let answer = format!("Hi, I wrote to {once} and {other}.");
    assert_eq!(
        a.reidentify(&answer),
        (
            "Hi, I wrote to bob@example.com and eve@example.com.".to_owned(),
            Reidentified {
                restored: 2,
                refused: 0
            }
        )
    );
    let (kept, done) = b.reidentify(&answer);
    assert_eq!(
        (kept.as_str(), done.refused),
        (answer.as_str(), 2),
        "another key"
    );
    let mut tampered = once.clone();
    tampered.insert(8, 'A');
    assert_eq!(a.reidentify(&tampered).1.refused, 1);
    let as_phone = once.replace("[EMAIL:", "[PHONE:");
    assert_eq!(
        a.reidentify(&as_phone).1.refused,
        1,
        "bound to its detector"
    );
}

proptest! {
    /// tokenize → reidentify gives back the original text exactly, for any
    /// text (values placed among arbitrary unicode).
    #[test]
    fn tokenize_then_reidentify_is_the_identity(
        parts in proptest::collection::vec(
            prop_oneof![
                any::<String>(),
                Just("bob@example.com".to_owned()),
                Just("4111 1111 1111 1111".to_owned()),
                Just("+49 30 1234567".to_owned()),
                Just("#4242".to_owned()),
                Just("[EMAIL:notatoken]".to_owned()),
            ],
            0..6,
        )
    ) {
        let r = tokenizer(7);
        let text = parts.concat();
        let mut counts = vec![0; r.detectors.len()];
        let redacted = r.redact(&text, &mut counts).unwrap_or_else(|| text.clone());
        let (back, _) = r.reidentify(&redacted);
        prop_assert_eq!(back, text);
    }
}

#[test]
fn sections_that_would_redact_nothing_or_show_a_key_are_refused() {
    let load = |redact: &str| {
        let text = format!("source = \"file\"\n[file]\ndlq = \"-\"\n[redact]\n{redact}");
        crate::config::Config::from_toml(&text, Vec::new())
            .err()
            .map(|e| e.to_string())
    };
    let no_detector = load("detectors = []\n").unwrap();
    assert!(no_detector.contains("redact.detectors"), "{no_detector}");
    let key =
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0+Pw==";
    let in_env_name = load(&format!("mode = \"tokenize\"\nkey_env = \"{key}\"\n")).unwrap();
    assert!(
        in_env_name.contains("redact.key_env") && !in_env_name.contains(key),
        "{in_env_name}"
    );
    let empty = load("[[redact.custom]]\nname = \"edges\"\npattern = '\\b'\n").unwrap();
    assert!(
        empty.contains("redact.custom[0].pattern") && empty.contains("empty"),
        "{empty}"
    );
    let bad = load("[[redact.custom]]\nname = \"broken\"\npattern = '(unclosed'\n").unwrap();
    assert!(
        bad.contains("redact.custom[0].pattern") && bad.contains("broken"),
        "{bad}"
    );
    assert_eq!(load("detectors = [\"email\"]\n"), None);
}

#[test]
fn a_key_wrapped_over_lines_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    // As `openssl rand -base64 64` prints it: 64 characters, then the rest.
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4v\nMDEyMzQ1Njc4OTo7PD0+Pw==\n";
    std::fs::write(&file, key).unwrap();
    let mut s = section(RedactMode::Tokenize, &[]);
    s.key_file = Some(file.display().to_string());
    assert!(s.key().unwrap().is_some());
}

#[test]
fn payloads_are_shown_redacted_inside_json_strings_and_as_lossy_text() {
    let r = masker();
    let json = br#"{"text":"my card:\n4111 1111 1111 1111","event_time":1700000000000}"#;
    let shown: serde_json::Value = serde_json::from_slice(&r.redacted_payload(json)).unwrap();
    assert_eq!(shown["text"], "my card:\n[CREDIT_CARD]");
    assert_eq!(
        shown["event_time"], 1_700_000_000_000i64,
        "numbers are not values"
    );
    let binary = b"\xff\x00bob@example.com";
    let shown = String::from_utf8(r.redacted_payload(binary)).unwrap();
    assert!(
        shown.ends_with("[EMAIL]") && !shown.contains("bob"),
        "{shown}"
    );
}
