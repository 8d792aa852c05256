//! What a commit records beyond the offset: the resolved offsets past it.
//!
//! A partition commits the end of its contiguous resolved prefix, but records
//! after it may be resolved already (their turn was delivered while an older
//! session is still open). A restart from the committed offset must not send
//! those again in part, or it would re-emit part of a delivered turn under a
//! new `turn_id`. So each commit carries, in Kafka's commit metadata, the
//! resolved offsets after it as ranges relative to the committed offset, in
//! one of two forms (see `docs/semantics.md`, "Kafka commits"):
//!
//! - `r2:3-5,9,12-40` ([`Skip::Exclude`]): the list is complete, the commit
//!   is the prefix's end. The next owner leaves these records out of its
//!   sessions (their event times still move its watermark): every one of them
//!   is part of an outcome already delivered.
//! - `r1:…` ([`Skip::Replay`]): the commit was pulled back to the first
//!   record of a turn that spans it (the broker may not keep metadata, or the
//!   list did not fit). The next owner processes the listed records like any
//!   other and only leaves out what is made of them alone.
//!
//! The metadata is bounded (Kafka's default `offset.metadata.max.bytes` is
//! 4096); an `r2` list that does not fit is not written (the worker falls
//! back to `r1`, where a cut list is safe, only less tidy).

/// The most metadata written.
const MAX_METADATA: usize = 3_000;

/// How the next owner treats the listed records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Processed again; outcomes made only of them are not sent again.
    Replay,
    /// Left out of the sessions (only their event times count).
    Exclude,
}

impl Skip {
    fn prefix(self) -> &'static str {
        match self {
            Skip::Replay => "r1:",
            Skip::Exclude => "r2:",
        }
    }
}

/// Encodes the resolved offsets (ascending, all ≥ `committed`) after
/// `committed`. The flag says whether all of them fit.
pub fn encode(
    form: Skip,
    committed: i64,
    resolved: impl IntoIterator<Item = i64>,
) -> (String, bool) {
    let mut out = String::from(form.prefix());
    let mut range: Option<(i64, i64)> = None;
    let push = |out: &mut String, (a, b): (i64, i64)| -> bool {
        let item = if a == b {
            format!("{}", a - committed)
        } else {
            format!("{}-{}", a - committed, b - committed)
        };
        if out.len() + item.len() + 1 > MAX_METADATA {
            return false;
        }
        if out.len() > form.prefix().len() {
            out.push(',');
        }
        out.push_str(&item);
        true
    };
    for offset in resolved {
        range = match range {
            Some((a, b)) if offset == b + 1 => Some((a, offset)),
            Some(r) => {
                if !push(&mut out, r) {
                    return (out, false);
                }
                Some((offset, offset))
            }
            None => Some((offset, offset)),
        };
    }
    let complete = range.is_none_or(|r| push(&mut out, r));
    (out, complete)
}

/// Whether `metadata` was written by [`encode`] (a broker that keeps commit
/// metadata gives it back; one that does not gives back an empty string).
pub fn is_ours(metadata: &str) -> bool {
    [Skip::Replay, Skip::Exclude]
        .iter()
        .any(|f| metadata.starts_with(f.prefix()))
}

/// Decodes metadata written by [`encode`] into its form and absolute
/// inclusive ranges; anything else (another tool's metadata, none) means
/// nothing to skip.
pub fn decode(committed: i64, metadata: &str) -> (Skip, Vec<(i64, i64)>) {
    let nothing = (Skip::Replay, Vec::new());
    let Some((form, body)) = [Skip::Replay, Skip::Exclude]
        .into_iter()
        .find_map(|f| Some(f).zip(metadata.strip_prefix(f.prefix())))
    else {
        return nothing;
    };
    let mut ranges = Vec::new();
    for item in body.split(',').filter(|i| !i.is_empty()) {
        let parsed = match item.split_once('-') {
            Some((a, b)) => a.parse::<i64>().ok().zip(b.parse::<i64>().ok()),
            None => item.parse::<i64>().ok().map(|a| (a, a)),
        };
        match parsed {
            Some((a, b)) if a <= b => ranges.push((committed + a, committed + b)),
            _ => return nothing, // not ours after all: skip nothing
        }
    }
    (form, ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_ranges() {
        let (m, complete) = encode(Skip::Replay, 100, [103, 104, 105, 109, 112, 113]);
        assert!(complete);
        assert_eq!(m, "r1:3-5,9,12-13");
        assert_eq!(
            decode(100, &m),
            (Skip::Replay, vec![(103, 105), (109, 109), (112, 113)])
        );
        let (m, _) = encode(Skip::Exclude, 100, [101]);
        assert_eq!(m, "r2:1");
        assert_eq!(decode(100, &m), (Skip::Exclude, vec![(101, 101)]));
        assert_eq!(encode(Skip::Replay, 7, []), ("r1:".to_owned(), true));
        assert!(decode(7, "r1:").1.is_empty());
        assert!(is_ours("r1:") && is_ours("r2:4") && !is_ours(""));
        assert_eq!(decode(7, "someone else's"), (Skip::Replay, vec![]));
        assert!(decode(7, "r1:5-2").1.is_empty());
        assert_eq!(
            decode(7, "r2:x"),
            (Skip::Replay, vec![]),
            "not ours: no exclusion"
        );
    }

    #[test]
    fn stays_bounded_and_says_when_cut() {
        let (m, complete) = encode(Skip::Exclude, 0, (0..100_000).map(|i| i * 2));
        assert!(!complete);
        assert!(m.len() <= MAX_METADATA);
        let (_, ranges) = decode(0, &m);
        assert!(ranges.len() > 100 && ranges.iter().all(|(a, b)| a == b && a % 2 == 0));
    }
}
