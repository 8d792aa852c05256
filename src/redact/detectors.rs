//! The built-in detectors: a regular expression finds candidates, a check
//! keeps only real values (a Luhn-valid card number, an IBAN whose mod-97
//! checksum holds, an address that parses, a possible US SSN), so numbers
//! in prose that fail their checksum are left alone.

use std::net::{Ipv4Addr, Ipv6Addr};

/// One built-in detector: its name, the pattern that finds candidates, the
/// capture group that is the value (0: the whole match) and the check.
pub struct Builtin {
    pub name: &'static str,
    pub pattern: &'static str,
    pub group: usize,
    pub check: fn(&str) -> bool,
    /// A candidate failing the check is tried shorter, and the search goes
    /// on from its next character: for values that run on into what
    /// follows or hide behind what precedes (a card number into an expiry
    /// date, an IBAN into the next word, `ip:2001:db8::1`); never for
    /// phones, whose fragments are numbers too.
    pub thorough: bool,
}

/// Every built-in detector, in the order overlapping finds are preferred
/// (the first listed wins a tie on start and length).
pub const BUILTINS: [Builtin; 7] = [
    Builtin {
        name: "url_credentials",
        // scheme://user:password@ — the value is `user:password`.
        pattern: r"(?i)\b[a-z][a-z0-9+.\-]*://([^\s/@:]+:[^\s/@]+)@",
        group: 1,
        check: |_| true,
        thorough: false,
    },
    Builtin {
        name: "email",
        pattern: r"(?i)\b[a-z0-9._%+\-]+@[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?)*\.[a-z]{2,}\b",
        group: 0,
        check: |_| true,
        thorough: false,
    },
    Builtin {
        name: "iban",
        pattern: r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b",
        group: 0,
        check: iban_checksum_holds,
        thorough: true,
    },
    Builtin {
        name: "credit_card",
        pattern: r"\b[0-9](?:[ \-]?[0-9]){12,18}\b",
        group: 0,
        check: luhn_holds,
        thorough: true,
    },
    Builtin {
        name: "us_ssn",
        pattern: r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b",
        group: 0,
        check: us_ssn_possible,
        thorough: false,
    },
    Builtin {
        name: "ip",
        pattern: r"(?i)\b(?:[0-9]{1,3}\.){3}[0-9]{1,3}\b|(?:[0-9a-f]{0,4}:){2,7}(?:[0-9a-f]{1,4}|(?:[0-9]{1,3}\.){3}[0-9]{1,3})?",
        group: 0,
        check: is_ip,
        thorough: true,
    },
    Builtin {
        name: "phone",
        // E.164 (`+` and 7 to 15 digits, optionally grouped) and national
        // forms like `(555) 123-4567`, `555-123-4567`, `030 1234567`.
        pattern: r"(?:\+[1-9][0-9]{0,2}[ .\-]?)?(?:\([0-9]{1,4}\)[ .\-]?)?[0-9]{2,4}(?:[ .\-][0-9]{2,8}){1,4}\b|\+[1-9][0-9]{6,14}\b",
        group: 0,
        check: phone_digits_plausible,
        thorough: false,
    },
];

/// The built-in detector names, for config validation.
pub fn names() -> impl Iterator<Item = &'static str> {
    BUILTINS.iter().map(|b| b.name)
}

/// Luhn's checksum over the digits (separators ignored), 13 to 19 digits.
fn luhn_holds(value: &str) -> bool {
    let digits: Vec<u32> = value.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| match i % 2 {
            0 => *d,
            _ if *d * 2 > 9 => *d * 2 - 9,
            _ => *d * 2,
        })
        .sum();
    sum % 10 == 0
}

/// ISO 13616: the country code and check digits moved to the end, letters
/// as 10–35, the number mod 97 is 1.
fn iban_checksum_holds(value: &str) -> bool {
    let compact: Vec<char> = value.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let rotated = compact[4..].iter().chain(&compact[..4]);
    let mut remainder = 0u32;
    for c in rotated {
        let Some(v) = c.to_digit(36) else {
            return false;
        };
        let step = if v < 10 { 10 } else { 100 };
        remainder = (remainder * step + v) % 97;
    }
    remainder == 1
}

/// Area 000, 666 and 900–999, group 00 and serial 0000 are never issued.
fn us_ssn_possible(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let [area, group, serial] = parts[..] else {
        return false;
    };
    let area: u32 = area.parse().unwrap_or(0);
    area != 0 && area != 666 && area < 900 && group != "00" && serial != "0000"
}

fn is_ip(value: &str) -> bool {
    value.parse::<Ipv4Addr>().is_ok() || (value.contains(':') && value.parse::<Ipv6Addr>().is_ok())
}

/// 7 to 15 digits (E.164's bound), not all one digit, and not shaped like
/// a date (`2026-12-03`, `03.12.2026`) or a US SSN (`us_ssn` decides those).
fn phone_digits_plausible(value: &str) -> bool {
    let digits: Vec<char> = value.chars().filter(char::is_ascii_digit).collect();
    let groups: Vec<usize> = value
        .split(|c: char| !c.is_ascii_digit())
        .filter(|g| !g.is_empty())
        .map(str::len)
        .collect();
    let date = groups.starts_with(&[4, 2, 2]) || groups.starts_with(&[2, 2, 4]);
    let other = date || groups == [3, 2, 4];
    (7..=15).contains(&digits.len()) && digits.iter().any(|d| *d != digits[0]) && !other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums() {
        assert!(luhn_holds("4111 1111 1111 1111"));
        assert!(luhn_holds("5500-0000-0000-0004"));
        assert!(!luhn_holds("4111 1111 1111 1112"), "one digit off");
        assert!(!luhn_holds("1234"), "too short");
        assert!(iban_checksum_holds("DE89 3704 0044 0532 0130 00"));
        assert!(iban_checksum_holds("GB82WEST12345698765432"));
        assert!(
            !iban_checksum_holds("GB82WEST12345698765433"),
            "checksum fails"
        );
        assert!(us_ssn_possible("123-45-6789"));
        assert!(!us_ssn_possible("000-45-6789"));
        assert!(!us_ssn_possible("666-45-6789"));
        assert!(!us_ssn_possible("900-45-6789"));
        assert!(!us_ssn_possible("123-00-6789"));
        assert!(!us_ssn_possible("123-45-0000"));
        assert!(is_ip("192.168.0.1") && is_ip("2001:db8::1") && is_ip("::ffff:10.0.0.1"));
        assert!(!is_ip("999.1.1.1") && !is_ip("10:30:00"));
        assert!(phone_digits_plausible("+49 30 1234567"));
        assert!(!phone_digits_plausible("000 0000"), "one digit repeated");
        assert!(!phone_digits_plausible("12 34"), "too few digits");
        assert!(!phone_digits_plausible("2026-12-03"), "a date");
        assert!(!phone_digits_plausible("03.12.2026"), "a date");
    }
}
