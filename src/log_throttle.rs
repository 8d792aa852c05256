//! One log line per cause per interval, with the count of what it stands
//! for: a failure that repeats on every record and retry (a missing output
//! topic wrote 2.6 GB of warnings in 150 s) must not flood the log.

use std::collections::HashMap;

/// How often one cause is logged at most.
pub const INTERVAL_MS: i64 = 10_000;

/// Per-cause state: when it was last logged, and how often it happened since.
#[derive(Debug, Default)]
pub struct LogThrottle {
    causes: HashMap<String, (i64, u64)>,
}

impl LogThrottle {
    /// Records one occurrence of `cause` at `now_ms`. Returns how many
    /// occurrences the line to log now stands for (this one included), or
    /// `None` when the cause was logged less than [`INTERVAL_MS`] ago.
    pub fn occurred(&mut self, cause: &str, now_ms: i64) -> Option<u64> {
        // A cause seen before costs no allocation (late events during a
        // backlog call this for every record).
        if !self.causes.contains_key(cause) {
            self.causes.insert(cause.to_owned(), (i64::MIN, 0));
        }
        let (last, count) = self.causes.get_mut(cause).expect("inserted");
        *count += 1;
        if *last != i64::MIN && now_ms - *last < INTERVAL_MS {
            return None;
        }
        *last = now_ms;
        Some(std::mem::take(count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_cause_per_interval_with_the_count() {
        let mut t = LogThrottle::default();
        assert_eq!(t.occurred("a", 0), Some(1), "the first one is logged");
        assert_eq!(t.occurred("a", 10), None);
        assert_eq!(t.occurred("b", 20), Some(1), "causes are apart");
        assert_eq!(t.occurred("a", INTERVAL_MS - 1), None);
        assert_eq!(
            t.occurred("a", INTERVAL_MS),
            Some(3),
            "stands for the two held back too"
        );
        assert_eq!(t.occurred("a", INTERVAL_MS + 1), None);
    }
}
