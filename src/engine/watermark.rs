/// The event-time watermark of one source partition: `W = max event time seen −
/// max_out_of_orderness`, "no event older than W is expected". It never moves
/// back. Besides event time, the caught-up idle advance moves it with the wall
/// clock, capped so that it never goes further than needed to close every open
/// session (`max seen + gap + 1 ms`): replayed or backfilled data fed in later
/// is therefore never misjudged late.
#[derive(Debug, Clone)]
pub struct WatermarkTracker {
    max_out_of_orderness_ms: i64,
    gap_ms: i64,
    max_event_time: Option<i64>,
    watermark: i64,
}

impl WatermarkTracker {
    pub fn new(max_out_of_orderness_ms: i64, gap_ms: i64) -> Self {
        WatermarkTracker {
            max_out_of_orderness_ms,
            gap_ms,
            max_event_time: None,
            watermark: i64::MIN,
        }
    }

    /// The current watermark; `i64::MIN` before the first event.
    pub fn current(&self) -> i64 {
        self.watermark
    }

    pub fn max_event_time(&self) -> Option<i64> {
        self.max_event_time
    }

    /// Takes an event's time into account; returns whether W moved.
    pub fn observe(&mut self, event_time: i64) -> bool {
        if self.max_event_time.is_none_or(|max| event_time > max) {
            self.max_event_time = Some(event_time);
        }
        self.raise(event_time.saturating_sub(self.max_out_of_orderness_ms))
    }

    /// The caught-up idle advance: the partition has been read to its end and
    /// stayed quiet for `idle_timeout` (the caller decides that, see
    /// [`IdleClock`]). W follows the wall clock to
    /// `min(now − max_out_of_orderness, max event time seen + gap + 1 ms)`.
    /// Returns whether W moved.
    pub fn advance_idle(&mut self, now_ms: i64) -> bool {
        let Some(max) = self.max_event_time else {
            return false;
        };
        let by_clock = now_ms.saturating_sub(self.max_out_of_orderness_ms);
        let cap = max.saturating_add(self.gap_ms).saturating_add(1);
        self.raise(by_clock.min(cap))
    }

    /// End of input (file mode, shutdown of a bounded run): every session may
    /// close.
    pub fn advance_to_end(&mut self) -> bool {
        self.raise(i64::MAX)
    }

    fn raise(&mut self, candidate: i64) -> bool {
        if candidate > self.watermark {
            self.watermark = candidate;
            true
        } else {
            false
        }
    }
}

/// Tracks whether a partition is caught up (read to its end) and quiet for
/// `idle_timeout`, which is when [`WatermarkTracker::advance_idle`] applies.
/// The broker loop feeds it records and end-of-partition signals with the wall
/// clock; while a partition has backlog, only event time moves its watermark.
#[derive(Debug, Clone)]
pub struct IdleClock {
    idle_timeout_ms: i64,
    /// Wall-clock time the partition was last seen at its end with nothing
    /// arriving since; `None` while it has backlog.
    caught_up_since: Option<i64>,
}

impl IdleClock {
    pub fn new(idle_timeout_ms: i64) -> Self {
        IdleClock {
            idle_timeout_ms,
            caught_up_since: None,
        }
    }

    /// A record arrived: the partition is not quiet.
    pub fn on_record(&mut self) {
        self.caught_up_since = None;
    }

    /// The partition was read to its end (Kafka EOF, an empty Redis read).
    pub fn on_caught_up(&mut self, now_ms: i64) {
        if self.caught_up_since.is_none() {
            self.caught_up_since = Some(now_ms);
        }
    }

    /// Whether the idle advance applies at `now_ms`.
    pub fn is_idle(&self, now_ms: i64) -> bool {
        self.idle_since().is_some_and(|since| now_ms >= since)
    }

    /// The wall-clock time from which the partition counts as idle, if it is
    /// caught up.
    pub fn idle_since(&self) -> Option<i64> {
        self.caught_up_since
            .map(|since| since.saturating_add(self.idle_timeout_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_is_max_minus_disorder_and_never_moves_back() {
        let mut w = WatermarkTracker::new(500, 3000);
        assert_eq!(w.current(), i64::MIN);
        assert!(w.observe(10_000));
        assert_eq!(w.current(), 9_500);
        assert!(!w.observe(9_000), "an older event does not move W");
        assert_eq!(w.current(), 9_500);
        assert!(w.observe(10_200));
        assert_eq!(w.current(), 9_700);
    }

    #[test]
    fn idle_advance_follows_the_clock_up_to_the_cap() {
        let mut w = WatermarkTracker::new(500, 3000);
        assert!(!w.advance_idle(1_000_000), "nothing seen, nothing to close");
        w.observe(10_000);
        assert!(w.advance_idle(11_000));
        assert_eq!(w.current(), 10_500, "now - max_out_of_orderness");
        assert!(w.advance_idle(1_000_000));
        assert_eq!(w.current(), 13_001, "capped at max seen + gap + 1 ms");
        assert!(!w.advance_idle(2_000_000));
    }

    #[test]
    fn idle_clock_requires_quiet_for_the_timeout() {
        let mut idle = IdleClock::new(1000);
        assert!(!idle.is_idle(5_000), "never caught up");
        idle.on_caught_up(5_000);
        idle.on_caught_up(5_500); // still the same quiet stretch
        assert!(!idle.is_idle(5_999));
        assert!(idle.is_idle(6_000));
        idle.on_record();
        assert!(!idle.is_idle(7_000), "a record ends the quiet stretch");
        idle.on_caught_up(7_000);
        assert_eq!(idle.idle_since(), Some(8_000));
    }
}
