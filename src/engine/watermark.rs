/// The event-time watermark of one source partition: `W = max event time seen −
/// max_out_of_orderness`, "no event older than W is expected". It never moves
/// back. Besides event time, the caught-up idle advance moves it with the wall
/// clock, capped so that it never goes further than needed to close every open
/// session (the furthest event window end seen, `t + gap`, plus 1 ms):
/// replayed or backfilled data fed in later is therefore never misjudged late.
#[derive(Debug, Clone)]
pub struct WatermarkTracker {
    max_out_of_orderness_ms: i64,
    max_event_time: Option<i64>,
    /// The furthest `t + gap` of the events seen.
    max_reach: Option<i64>,
    watermark: i64,
}

impl WatermarkTracker {
    pub fn new(max_out_of_orderness_ms: i64) -> Self {
        WatermarkTracker {
            max_out_of_orderness_ms,
            max_event_time: None,
            max_reach: None,
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

    /// Takes an event's time and the end of its window (`t + gap`) into
    /// account; returns whether W moved.
    pub fn observe(&mut self, event_time: i64, reach: i64) -> bool {
        if self.max_event_time.is_none_or(|max| event_time > max) {
            self.max_event_time = Some(event_time);
        }
        if self.max_reach.is_none_or(|max| reach > max) {
            self.max_reach = Some(reach);
        }
        self.raise(event_time.saturating_sub(self.max_out_of_orderness_ms))
    }

    /// The caught-up idle advance: the partition has been read to its end and
    /// stayed quiet for `idle_timeout` (the caller decides that, see
    /// [`IdleClock`]). W follows the wall clock to
    /// `min(now − max_out_of_orderness, furthest window end seen + 1 ms)`.
    /// Returns whether W moved.
    pub fn advance_idle(&mut self, now_ms: i64) -> bool {
        let Some(reach) = self.max_reach else {
            return false;
        };
        let by_clock = now_ms.saturating_sub(self.max_out_of_orderness_ms);
        let cap = reach.saturating_add(1);
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

/// When the caught-up idle advance may move a partition's watermark by the
/// wall clock (see `docs/semantics.md`, "The caught-up idle advance").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdlePolicy {
    /// How long a live partition must stay quiet.
    pub idle_timeout_ms: i64,
    /// How far behind the wall clock a partition's newest event time may be,
    /// when it is caught up, for the partition to count as live:
    /// `max_out_of_orderness + backlog_lag`.
    pub live_lag_ms: i64,
    /// How long a partition reading a backlog must stay quiet.
    pub backlog_quiet_ms: i64,
}

/// Tracks whether a partition is caught up (read to its end) and quiet, which
/// is when [`WatermarkTracker::advance_idle`] applies. The broker loop feeds
/// it records and end-of-partition signals with the wall clock; while a
/// partition has backlog, only event time moves its watermark.
///
/// The advance assumes events arrive within `max_out_of_orderness` of the
/// wall clock. A backlog (old event times arriving now, a producer replaying
/// yesterday) breaks that: a short pause of its producer would close its
/// sessions early and make what follows late. So a partition counts as
/// *live* only if its newest event time is within `live_lag_ms` of the wall
/// clock when it is caught up, and then needs `idle_timeout_ms` of quiet;
/// otherwise it needs `backlog_quiet_ms`.
#[derive(Debug, Clone)]
pub struct IdleClock {
    policy: IdlePolicy,
    /// Wall-clock time the partition was last seen at its end with nothing
    /// arriving since; `None` while it has backlog.
    caught_up_since: Option<i64>,
    /// Whether it was live then.
    live: bool,
}

impl IdleClock {
    pub fn new(policy: IdlePolicy) -> Self {
        IdleClock {
            policy,
            caught_up_since: None,
            live: false,
        }
    }

    /// A record arrived: the partition is not quiet.
    pub fn on_record(&mut self) {
        self.caught_up_since = None;
    }

    /// The partition was read to its end (Kafka EOF, an empty Redis read);
    /// `max_event_time` is the newest event time it has seen.
    pub fn on_caught_up(&mut self, now_ms: i64, max_event_time: Option<i64>) {
        if self.caught_up_since.is_none() {
            self.caught_up_since = Some(now_ms);
            self.live = max_event_time
                .is_some_and(|max| now_ms.saturating_sub(max) <= self.policy.live_lag_ms);
        }
    }

    /// Whether the idle advance applies at `now_ms`.
    pub fn is_idle(&self, now_ms: i64) -> bool {
        self.idle_since().is_some_and(|since| now_ms >= since)
    }

    /// The wall-clock time from which the partition counts as idle, if it is
    /// caught up.
    pub fn idle_since(&self) -> Option<i64> {
        let quiet = if self.live {
            self.policy.idle_timeout_ms
        } else {
            self.policy.backlog_quiet_ms
        };
        self.caught_up_since
            .map(|since| since.saturating_add(quiet))
    }

    /// Whether the partition was live when it was last caught up.
    pub fn is_live(&self) -> bool {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_is_max_minus_disorder_and_never_moves_back() {
        let mut w = WatermarkTracker::new(500);
        assert_eq!(w.current(), i64::MIN);
        assert!(w.observe(10_000, 13_000));
        assert_eq!(w.current(), 9_500);
        assert!(!w.observe(9_000, 12_000), "an older event does not move W");
        assert_eq!(w.current(), 9_500);
        assert!(w.observe(10_200, 13_200));
        assert_eq!(w.current(), 9_700);
    }

    #[test]
    fn idle_advance_follows_the_clock_up_to_the_cap() {
        let mut w = WatermarkTracker::new(500);
        assert!(!w.advance_idle(1_000_000), "nothing seen, nothing to close");
        w.observe(10_000, 13_000);
        assert!(w.advance_idle(11_000));
        assert_eq!(w.current(), 10_500, "now - max_out_of_orderness");
        assert!(w.advance_idle(1_000_000));
        assert_eq!(w.current(), 13_001, "capped at the furthest t + gap + 1 ms");
        // An earlier event with a longer gap of its own reaches further.
        w.observe(9_000, 20_000);
        assert!(w.advance_idle(1_000_000));
        assert_eq!(w.current(), 20_001);
        assert!(!w.advance_idle(2_000_000));
    }

    const POLICY: IdlePolicy = IdlePolicy {
        idle_timeout_ms: 1_000,
        live_lag_ms: 5_500,
        backlog_quiet_ms: 10_000,
    };

    #[test]
    fn idle_clock_requires_quiet_for_the_timeout() {
        let mut idle = IdleClock::new(POLICY);
        assert!(!idle.is_idle(5_000), "never caught up");
        idle.on_caught_up(5_000, Some(4_900));
        idle.on_caught_up(5_500, Some(4_900)); // still the same quiet stretch
        assert!(!idle.is_idle(5_999));
        assert!(idle.is_idle(6_000));
        idle.on_record();
        assert!(!idle.is_idle(7_000), "a record ends the quiet stretch");
        idle.on_caught_up(7_000, Some(6_900));
        assert_eq!(idle.idle_since(), Some(8_000));
    }

    #[test]
    fn a_backlog_needs_the_longer_quiet_period() {
        // A producer writing yesterday's events pauses: the partition is at
        // its end, but its newest event is far behind the wall clock.
        let day = 86_400_000;
        let mut idle = IdleClock::new(POLICY);
        idle.on_caught_up(day + 5_000, Some(5_000));
        assert!(!idle.is_live());
        assert!(!idle.is_idle(day + 5_000 + 1_000), "not after idle_timeout");
        assert!(!idle.is_idle(day + 5_000 + 9_999));
        assert!(idle.is_idle(day + 5_000 + 10_000), "after backlog_quiet");
        // Just inside the live bound counts as live, just outside does not.
        let mut idle = IdleClock::new(POLICY);
        idle.on_caught_up(10_000 + 5_500, Some(10_000));
        assert!(idle.is_live());
        let mut idle = IdleClock::new(POLICY);
        idle.on_caught_up(10_000 + 5_501, Some(10_000));
        assert!(!idle.is_live());
        let mut idle = IdleClock::new(POLICY);
        idle.on_caught_up(10_000, None);
        assert!(!idle.is_live(), "nothing seen: no evidence of live traffic");
    }
}
