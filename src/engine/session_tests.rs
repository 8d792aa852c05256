//! The session rules of `docs/semantics.md`, one by one, with explicit time.

use super::*;

const GAP: i64 = 3_000;
const OOO: i64 = 500;

fn config() -> WindowConfig {
    WindowConfig {
        gap_ms: GAP,
        max_out_of_orderness_ms: OOO,
        max_duration_ms: 60_000,
        max_messages: 200,
        max_bytes: 65_536,
        late: LatePolicy::NewTurn,
        max_gap_ms: 60_000,
        follow_up_ms: None,
    }
}

fn event(kind: EventKind, id: &str, user: &str, t: i64) -> ChatEvent<'static> {
    ChatEvent {
        message_id: id.to_owned().into(),
        user_id: user.to_owned().into(),
        conversation_id: None,
        kind,
        text: if kind == EventKind::Message {
            format!("text of {id}").into()
        } else {
            "".into()
        },
        event_time: t,
        attributes: None,
        gap_ms: None,
    }
}

fn msg(id: &str, user: &str, t: i64) -> ChatEvent<'static> {
    event(EventKind::Message, id, user, t)
}

/// Feeds events with sequence numbers 0, 1, …; returns everything resolved.
struct Harness {
    engine: SessionEngine,
    seq: u64,
    out: Vec<Resolution>,
}

impl Harness {
    fn new(config: WindowConfig) -> Self {
        Harness {
            engine: SessionEngine::new(config),
            seq: 0,
            out: Vec::new(),
        }
    }

    fn feed(&mut self, e: ChatEvent<'static>) -> &mut Self {
        self.engine.on_event(e, self.seq, &mut self.out);
        self.seq += 1;
        self
    }

    /// Turns emitted so far, as (message ids, closed_by, late), then cleared.
    fn turns(&mut self) -> Vec<(Vec<String>, ClosedBy, bool)> {
        let turns = self
            .out
            .iter()
            .filter_map(|r| match r {
                Resolution::Turn(s) => Some((
                    s.messages
                        .iter()
                        .map(|m| m.message_id().to_owned())
                        .collect(),
                    s.closed_by,
                    s.late,
                )),
                _ => None,
            })
            .collect();
        self.out.retain(|r| !matches!(r, Resolution::Turn(_)));
        turns
    }

    fn others(&mut self) -> Vec<Resolution> {
        std::mem::take(&mut self.out)
    }

    fn flush(&mut self) -> &mut Self {
        self.engine.flush(&mut self.out);
        self
    }
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn events_exactly_gap_apart_merge_and_one_ms_more_splits() {
    let mut h = Harness::new(config());
    h.feed(msg("a", "u", 10_000))
        .feed(msg("b", "u", 13_000))
        .feed(msg("c", "u", 16_001));
    h.flush();
    assert_eq!(
        h.turns(),
        vec![
            (ids(&["a", "b"]), ClosedBy::Gap, false),
            (ids(&["c"]), ClosedBy::Gap, false)
        ]
    );
}

#[test]
fn a_session_closes_only_once_the_watermark_passes_last_plus_gap() {
    let mut h = Harness::new(config());
    h.feed(msg("a", "u", 10_000));
    // W = 13_500 - 500 = 13_000 = last + gap: not yet.
    h.feed(msg("x", "other", 13_500));
    assert!(h.turns().is_empty());
    // W = 13_001 > 13_000: closes.
    h.feed(msg("y", "other", 13_501));
    assert_eq!(h.turns(), vec![(ids(&["a"]), ClosedBy::Gap, false)]);
    assert_eq!(h.engine.open_sessions(), 1);
}

#[test]
fn an_out_of_order_event_bridges_two_open_sessions() {
    let mut h = Harness::new(WindowConfig {
        max_out_of_orderness_ms: 10_000,
        ..config()
    });
    h.feed(msg("a", "u", 10_000)).feed(msg("c", "u", 16_000));
    assert_eq!(h.engine.open_sessions(), 1, "one key");
    h.feed(msg("b", "u", 13_000));
    h.flush();
    assert_eq!(
        h.turns(),
        vec![(ids(&["a", "b", "c"]), ClosedBy::Gap, false)]
    );
}

#[test]
fn messages_come_out_in_event_time_then_arrival_order() {
    let mut h = Harness::new(config());
    h.feed(msg("late-arrival", "u", 10_200))
        .feed(msg("first", "u", 10_000))
        .feed(msg("same-time", "u", 10_200));
    h.flush();
    assert_eq!(h.turns()[0].0, ids(&["first", "late-arrival", "same-time"]));
}

#[test]
fn keys_are_user_and_conversation() {
    let mut h = Harness::new(config());
    let mut in_conv = msg("b", "u", 10_100);
    in_conv.conversation_id = Some("c1".into());
    h.feed(msg("a", "u", 10_000))
        .feed(in_conv)
        .feed(msg("c", "v", 10_200));
    assert_eq!(h.engine.open_sessions(), 3);
    h.flush();
    let turns = h.out.iter().filter_map(|r| match r {
        Resolution::Turn(s) => Some((s.user_id.clone(), s.conversation_id.clone())),
        _ => None,
    });
    let mut keys: Vec<_> = turns.collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            ("u".into(), None),
            ("u".into(), Some("c1".into())),
            ("v".into(), None)
        ]
    );
}

#[test]
fn late_policy_new_turn_dlq_and_drop() {
    for (policy, want_turn, want_other) in [
        (LatePolicy::NewTurn, true, None),
        (
            LatePolicy::Dlq,
            false,
            Some(Resolution::LateDeadLetter { seq: 2 }),
        ),
        (
            LatePolicy::Drop,
            false,
            Some(Resolution::Dropped {
                seq: 2,
                reason: DropReason::Late,
                held_by: None,
            }),
        ),
    ] {
        let mut h = Harness::new(WindowConfig {
            late: policy,
            ..config()
        });
        h.feed(msg("a", "u", 10_000)).feed(msg("b", "v", 20_000)); // W = 19_500
        assert_eq!(h.turns().len(), 1, "u's session closed");
        h.feed(msg("old", "u", 16_000)); // 16_000 + 3_000 < 19_500: late
        let turns = h.turns();
        assert_eq!(turns.is_empty(), !want_turn, "{policy:?}");
        if want_turn {
            assert_eq!(turns, vec![(ids(&["old"]), ClosedBy::Gap, true)]);
        }
        assert_eq!(h.others().into_iter().next(), want_other, "{policy:?}");
    }
}

#[test]
fn lateness_is_judged_after_merging() {
    let mut h = Harness::new(config());
    h.feed(msg("a", "u", 10_000)).feed(msg("b", "u", 12_500));
    h.feed(msg("x", "v", 15_500)); // W = 15_000; u's session [10_000, 12_500] still open
                                   // 10_500 + gap < W, but it reaches u's open session: not late.
    h.feed(msg("c", "u", 10_500));
    h.flush();
    let turns = h.turns();
    assert!(
        turns.contains(&(ids(&["a", "c", "b"]), ClosedBy::Gap, false)),
        "{turns:?}"
    );
}

#[test]
fn an_event_at_the_edge_of_the_watermark_is_not_late() {
    let mut h = Harness::new(config());
    h.feed(msg("x", "v", 20_000)); // W = 19_500
    h.feed(msg("edge", "u", 16_500)); // 16_500 + 3_000 = W: not late
    h.feed(msg("over", "w", 16_499)); // 16_499 + 3_000 < W: late
    let turns = h.turns();
    assert_eq!(turns, vec![(ids(&["over"]), ClosedBy::Gap, true)]);
    h.feed(msg("y", "v", 20_001)); // W = 19_501 > 16_500 + 3_000: edge's session closes
    assert_eq!(h.turns(), vec![(ids(&["edge"]), ClosedBy::Gap, false)]);
}

/// Moves the watermark with another user's event at `t`.
fn tick(h: &mut Harness, t: i64) {
    h.feed(event(EventKind::Typing, &format!("tick-{t}"), "clock", t));
}

#[test]
fn caps_cut_before_the_breaking_message_once_the_watermark_passes_it() {
    let mut h = Harness::new(WindowConfig {
        max_messages: 2,
        ..config()
    });
    h.feed(msg("a", "u", 1_000))
        .feed(msg("b", "u", 1_100))
        .feed(msg("c", "u", 1_200));
    tick(&mut h, 1_700);
    assert!(
        h.turns().is_empty(),
        "W = 1200: not past the breaking message"
    );
    tick(&mut h, 1_701);
    assert_eq!(
        h.turns(),
        vec![(ids(&["a", "b"]), ClosedBy::MaxMessages, false)]
    );
    h.flush();
    assert_eq!(h.turns(), vec![(ids(&["c"]), ClosedBy::Gap, false)]);

    // "text of a" is 9 bytes.
    let mut h = Harness::new(WindowConfig {
        max_bytes: 18,
        ..config()
    });
    h.feed(msg("a", "u", 1_000))
        .feed(msg("b", "u", 1_100))
        .feed(msg("c", "u", 1_200));
    h.flush();
    assert_eq!(
        h.turns(),
        vec![
            (ids(&["a", "b"]), ClosedBy::MaxBytes, false),
            (ids(&["c"]), ClosedBy::Gap, false)
        ]
    );

    // Attributes count toward max_bytes: they go into the turn too.
    let mut h = Harness::new(WindowConfig {
        max_bytes: 40,
        ..config()
    });
    let with_attributes = |id: &str, t: i64| {
        let mut e = msg(id, "u", t);
        e.attributes = Some(Box::new(
            [("k".to_owned(), "v".repeat(20))].into_iter().collect(),
        ));
        e
    };
    // 9 bytes of text + 21 of attributes = 30 each: two would be 60.
    h.feed(with_attributes("a", 1_000))
        .feed(with_attributes("b", 1_100));
    tick(&mut h, 1_601);
    assert_eq!(h.turns(), vec![(ids(&["a"]), ClosedBy::MaxBytes, false)]);

    let mut h = Harness::new(WindowConfig {
        max_duration_ms: 5_000,
        ..config()
    });
    h.feed(msg("a", "u", 1_000))
        .feed(event(EventKind::Typing, "t", "u", 3_000))
        .feed(msg("b", "u", 6_000));
    tick(&mut h, 6_500);
    assert!(h.turns().is_empty(), "exactly max_duration is allowed");
    h.feed(msg("c", "u", 6_001));
    tick(&mut h, 6_501);
    assert_eq!(
        h.turns(),
        vec![(ids(&["a", "b"]), ClosedBy::MaxDuration, false)]
    );
    h.flush();
    assert_eq!(h.turns(), vec![(ids(&["c"]), ClosedBy::Gap, false)]);
}

#[test]
fn the_endless_typist_gets_a_turn_at_max_duration() {
    let mut h = Harness::new(WindowConfig {
        max_duration_ms: 5_000,
        ..config()
    });
    h.feed(msg("a", "u", 1_000));
    for t in (2_000..=5_500).step_by(1_000) {
        h.feed(event(EventKind::Typing, &format!("t{t}"), "u", t));
    }
    // Still typing: the chain reaches past 1000 + 5000, nothing else came.
    tick(&mut h, 6_501);
    assert_eq!(h.turns(), vec![(ids(&["a"]), ClosedBy::MaxDuration, false)]);
}

#[test]
fn typing_extends_a_session_but_alone_emits_nothing() {
    let mut h = Harness::new(config());
    h.feed(msg("a", "u", 1_000))
        .feed(event(EventKind::Typing, "t1", "u", 3_500))
        .feed(msg("b", "u", 6_000));
    h.flush();
    assert_eq!(h.turns(), vec![(ids(&["a", "b"]), ClosedBy::Gap, false)]);

    let mut h = Harness::new(config());
    h.feed(event(EventKind::Typing, "t1", "u", 1_000))
        .feed(event(EventKind::Typing, "t2", "u", 2_000));
    h.flush();
    assert!(h.turns().is_empty());
    assert_eq!(
        h.others(),
        vec![
            Resolution::Dropped {
                seq: 0,
                reason: DropReason::NoMessage,
                held_by: None,
            },
            Resolution::Dropped {
                seq: 1,
                reason: DropReason::NoMessage,
                held_by: None,
            }
        ]
    );
}

#[test]
fn end_of_turn_cuts_right_after_it_once_the_watermark_passes_it() {
    let mut h = Harness::new(config());
    h.feed(msg("a", "u", 1_000))
        .feed(event(EventKind::EndOfTurn, "e", "u", 1_600))
        // Sent before the end of turn, arriving after it: still in the turn.
        .feed(msg("b", "u", 1_500));
    tick(&mut h, 2_100);
    assert!(
        h.turns().is_empty(),
        "W = 1600: an event at 1600 may still come"
    );
    tick(&mut h, 2_101);
    assert_eq!(
        h.turns(),
        vec![(ids(&["a", "b"]), ClosedBy::EndOfTurn, false)]
    );
    h.feed(msg("c", "u", 1_700));
    h.flush();
    assert_eq!(
        h.turns(),
        vec![(ids(&["c"]), ClosedBy::Gap, false)],
        "later events start the next turn"
    );

    // A message of the same millisecond sorts before the end of turn.
    let mut h = Harness::new(config());
    h.feed(event(EventKind::EndOfTurn, "e", "u", 1_000))
        .feed(msg("a", "u", 1_000))
        .flush();
    assert_eq!(h.turns(), vec![(ids(&["a"]), ClosedBy::EndOfTurn, false)]);

    let mut h = Harness::new(config());
    h.feed(event(EventKind::EndOfTurn, "e", "u", 1_000));
    tick(&mut h, 1_501);
    assert_eq!(
        h.others()[0],
        Resolution::Dropped {
            seq: 0,
            reason: DropReason::NoMessage,
            held_by: None,
        }
    );
}

#[test]
fn a_turn_resolves_every_record_it_absorbed() {
    let mut h = Harness::new(config());
    h.feed(msg("a", "u", 1_000))
        .feed(event(EventKind::Typing, "t", "u", 1_100))
        .feed(event(EventKind::EndOfTurn, "e", "u", 1_200))
        .flush();
    match &h.out[..] {
        [Resolution::Turn(s)] => assert_eq!(s.seqs, vec![0, 1, 2]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn duplicates_within_an_open_session_are_dropped() {
    let mut h = Harness::new(config());
    h.feed(msg("a", "u", 1_000))
        .feed(msg("a", "u", 1_000))
        .feed(msg("b", "u", 1_500));
    h.flush();
    assert_eq!(h.turns(), vec![(ids(&["a", "b"]), ClosedBy::Gap, false)]);
    assert_eq!(
        h.others(),
        vec![Resolution::Dropped {
            seq: 1,
            reason: DropReason::Duplicate,
            held_by: Some(0),
        }]
    );
    // Another user may reuse the id.
    let mut h = Harness::new(config());
    h.feed(msg("a", "u", 1_000)).feed(msg("a", "v", 1_000));
    assert_eq!(h.engine.open_sessions(), 2);
}

#[test]
fn idle_advance_closes_a_lone_users_session_with_the_wall_clock() {
    let mut h = Harness::new(config());
    h.feed(msg("a", "u", 10_000));
    assert_eq!(h.engine.next_deadline(), Some(13_000));
    let mut out = Vec::new();
    h.engine.advance_idle(13_500, &mut out); // W = 13_000: not past the deadline
    assert!(out.is_empty());
    h.engine.advance_idle(13_501, &mut out); // W = 13_001
    assert!(matches!(&out[..], [Resolution::Turn(s)] if s.closed_by == ClosedBy::Gap));
    assert_eq!(h.engine.watermark(), 13_001, "capped at max t + gap + 1");
    h.engine.advance_idle(1_000_000, &mut out);
    assert_eq!(h.engine.watermark(), 13_001, "never further than needed");
    // A backfilled event older than the clock is still not late.
    h.feed(msg("b", "u", 10_500));
    assert!(h.turns().is_empty());
    assert_eq!(h.engine.open_sessions(), 1);
}

#[test]
fn slots_are_reused_and_stale_deadlines_skipped() {
    let mut h = Harness::new(WindowConfig {
        max_out_of_orderness_ms: 0,
        ..config()
    });
    for round in 0..50 {
        let base = round * 10_000;
        h.feed(msg(&format!("a{round}"), "u", base))
            .feed(msg(&format!("b{round}"), "v", base + 100))
            .feed(msg(&format!("c{round}"), "u", base + 200));
    }
    h.flush();
    let turns = h.turns();
    assert_eq!(turns.len(), 100);
    assert!(
        h.engine.slots.len() <= 4,
        "slots reused, got {}",
        h.engine.slots.len()
    );
    assert_eq!(h.engine.open_sessions(), 0);
}
