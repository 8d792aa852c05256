//! What a commit records beyond the offset: the resolved offsets past it.
//!
//! A partition commits the end of its contiguous resolved prefix, but records
//! after it may be resolved already (their turn was delivered while an older
//! session is still open). A restart from the committed offset must not
//! process those again, or it would re-emit part of a delivered turn under a
//! new `turn_id`. So each commit carries, in Kafka's commit metadata, the
//! resolved offsets after it as ranges relative to the committed offset:
//! `r1:3-5,9,12-40`. The metadata is bounded (Kafka's default
//! `offset.metadata.max.bytes` is 4096); offsets that do not fit are replayed,
//! which is safe, only less tidy.

/// The most metadata written.
const MAX_METADATA: usize = 3_000;
const PREFIX: &str = "r1:";

/// Encodes the resolved offsets (ascending, all ≥ `committed`) after `committed`.
pub fn encode(committed: i64, resolved: impl IntoIterator<Item = i64>) -> String {
    let mut out = String::from(PREFIX);
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
        if out.len() > PREFIX.len() {
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
                    return out;
                }
                Some((offset, offset))
            }
            None => Some((offset, offset)),
        };
    }
    if let Some(r) = range {
        push(&mut out, r);
    }
    out
}

/// Decodes metadata written by [`encode`] into absolute inclusive ranges;
/// anything else (another tool's metadata, none) means nothing to skip.
pub fn decode(committed: i64, metadata: &str) -> Vec<(i64, i64)> {
    let Some(body) = metadata.strip_prefix(PREFIX) else {
        return Vec::new();
    };
    let mut ranges = Vec::new();
    for item in body.split(',').filter(|i| !i.is_empty()) {
        let parsed = match item.split_once('-') {
            Some((a, b)) => a.parse::<i64>().ok().zip(b.parse::<i64>().ok()),
            None => item.parse::<i64>().ok().map(|a| (a, a)),
        };
        match parsed {
            Some((a, b)) if a <= b => ranges.push((committed + a, committed + b)),
            _ => return Vec::new(), // not ours after all: skip nothing
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_ranges() {
        let m = encode(100, [103, 104, 105, 109, 112, 113]);
        assert_eq!(m, "r1:3-5,9,12-13");
        assert_eq!(decode(100, &m), vec![(103, 105), (109, 109), (112, 113)]);
        assert_eq!(encode(7, []), "r1:");
        assert!(decode(7, "r1:").is_empty());
        assert!(decode(7, "someone else's").is_empty());
        assert!(decode(7, "r1:5-2").is_empty());
    }

    #[test]
    fn stays_bounded() {
        let m = encode(0, (0..100_000).map(|i| i * 2));
        assert!(m.len() <= MAX_METADATA);
        let ranges = decode(0, &m);
        assert!(ranges.len() > 100 && ranges.iter().all(|(a, b)| a == b && a % 2 == 0));
    }
}
