//! Property tests of the session engine against small, obviously-correct
//! reference models (the invariants of `DESIGN.md`).
//!
//! - `reference`: a naive simulator of the full rules (scans every session,
//!   stores every event) that the indexed engine must match exactly.
//! - `batch_sessions`: Flink's / Kafka Streams' session windows computed offline
//!   by sorting each key's events and splitting where the gap is exceeded; with
//!   disorder below `max_out_of_orderness` the engine must produce exactly these.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use sessionizer::codec::{DecodeLimits, Decoder, InputFormat};
use sessionizer::engine::{
    CompletionTracker, DropReason, LatePolicy, Resolution, SessionEngine, WindowConfig,
};
use sessionizer::model::{ChatEvent, ClosedBy, EventKind};
use sessionizer::pipeline::{Outcome, PartitionPipeline};

#[derive(Debug, Clone)]
struct Ev {
    user: u8,
    conversation: bool,
    kind: EventKind,
    id: String,
    text_len: usize,
    t: i64,
}

type Key = (u8, bool);

impl Ev {
    fn key(&self) -> Key {
        (self.user, self.conversation)
    }

    fn chat_event(&self) -> ChatEvent<'static> {
        ChatEvent {
            message_id: self.id.clone().into(),
            user_id: format!("user-{}", self.user).into(),
            conversation_id: self.conversation.then(|| "conv".into()),
            kind: self.kind,
            text: if self.kind == EventKind::Message {
                "x".repeat(self.text_len).into()
            } else {
                "".into()
            },
            event_time: self.t,
            attributes: None,
        }
    }
}

/// A turn as compared: (message ids, seqs, closed_by, late).
type TurnSummary = (Vec<String>, Vec<u64>, ClosedBy, bool);

/// A comparable summary of what became of the records.
#[derive(Debug, Default, PartialEq, Eq)]
struct Summary {
    /// Per key, the turns in emission order.
    turns: BTreeMap<Key, Vec<TurnSummary>>,
    dropped: BTreeSet<(u64, &'static str)>,
    late_dead_letters: BTreeSet<u64>,
}

fn summarize(events: &[Ev], resolutions: &[Resolution]) -> Summary {
    let mut s = Summary::default();
    for r in resolutions {
        match r {
            Resolution::Turn(t) => {
                let first = t
                    .seqs
                    .iter()
                    .copied()
                    .find(|seq| events[*seq as usize].kind == EventKind::Message)
                    .unwrap();
                let key = events[first as usize].key();
                let mut seqs = t.seqs.clone();
                seqs.sort();
                let ids = t
                    .messages
                    .iter()
                    .map(|m| m.message_id().to_owned())
                    .collect();
                s.turns
                    .entry(key)
                    .or_default()
                    .push((ids, seqs, t.closed_by, t.late));
            }
            Resolution::Dropped { seq, reason, .. } => {
                s.dropped.insert((*seq, reason.as_str()));
            }
            Resolution::LateDeadLetter { seq } => {
                s.late_dead_letters.insert(*seq);
            }
        }
    }
    s
}

fn run_engine(config: WindowConfig, events: &[Ev]) -> Vec<Resolution> {
    let mut engine = SessionEngine::new(config);
    let mut out = Vec::new();
    for (seq, e) in events.iter().enumerate() {
        engine.on_event(e.chat_event(), seq as u64, &mut out);
    }
    engine.flush(&mut out);
    assert_eq!(engine.open_sessions(), 0);
    out
}

/// The naive reference simulator of the full rules.
mod reference {
    use super::*;

    struct Session {
        key: Key,
        /// (seq, event)
        events: Vec<(u64, Ev)>,
    }

    impl Session {
        fn min_t(&self) -> i64 {
            self.events.iter().map(|(_, e)| e.t).min().unwrap()
        }
        fn max_t(&self) -> i64 {
            self.events.iter().map(|(_, e)| e.t).max().unwrap()
        }
    }

    pub fn run(c: WindowConfig, events: &[Ev]) -> Summary {
        let mut w = i64::MIN;
        let mut open: Vec<Session> = Vec::new();
        let mut out = Summary::default();
        let close = |s: Session, by: ClosedBy, out: &mut Summary| {
            let mut evs = s.events;
            if !evs.iter().any(|(_, e)| e.kind == EventKind::Message) {
                for (seq, _) in evs {
                    out.dropped.insert((seq, DropReason::NoMessage.as_str()));
                }
                return;
            }
            evs.sort_by_key(|(seq, e)| (e.t, *seq));
            let ids = evs
                .iter()
                .filter(|(_, e)| e.kind == EventKind::Message)
                .map(|(_, e)| e.id.clone())
                .collect();
            let mut seqs: Vec<u64> = evs.iter().map(|(seq, _)| *seq).collect();
            seqs.sort();
            out.turns
                .entry(s.key)
                .or_default()
                .push((ids, seqs, by, false));
        };
        for (seq, e) in events.iter().enumerate() {
            let seq = seq as u64;
            let same_key = |s: &Session| s.key == e.key();
            let duplicate = e.kind == EventKind::Message
                && open.iter().filter(|s| same_key(s)).any(|s| {
                    s.events
                        .iter()
                        .any(|(_, x)| x.kind == EventKind::Message && x.id == e.id)
                });
            if duplicate {
                out.dropped.insert((seq, DropReason::Duplicate.as_str()));
            } else {
                let (reached, rest): (Vec<Session>, Vec<Session>) = open.drain(..).partition(|s| {
                    same_key(s) && s.events.iter().any(|(_, x)| (x.t - e.t).abs() <= c.gap_ms)
                });
                open = rest;
                if reached.is_empty() {
                    if e.t + c.gap_ms < w {
                        match (e.kind, c.late) {
                            (EventKind::Message, LatePolicy::NewTurn) => {
                                out.turns.entry(e.key()).or_default().push((
                                    vec![e.id.clone()],
                                    vec![seq],
                                    ClosedBy::Gap,
                                    true,
                                ));
                            }
                            (EventKind::Message, LatePolicy::Dlq) => {
                                out.late_dead_letters.insert(seq);
                            }
                            _ => {
                                out.dropped.insert((seq, DropReason::Late.as_str()));
                            }
                        }
                    } else if e.kind == EventKind::EndOfTurn {
                        out.dropped.insert((seq, DropReason::NoMessage.as_str()));
                    } else {
                        open.push(Session {
                            key: e.key(),
                            events: vec![(seq, e.clone())],
                        });
                    }
                } else {
                    let mut all: Vec<(u64, Ev)> = reached
                        .iter()
                        .flat_map(|s| s.events.iter().cloned())
                        .collect();
                    all.push((seq, e.clone()));
                    let messages = all
                        .iter()
                        .filter(|(_, x)| x.kind == EventKind::Message)
                        .count() as u64;
                    let bytes: u64 = all
                        .iter()
                        .filter(|(_, x)| x.kind == EventKind::Message)
                        .map(|(_, x)| x.text_len as u64)
                        .sum();
                    let span = all.iter().map(|(_, x)| x.t).max().unwrap()
                        - all.iter().map(|(_, x)| x.t).min().unwrap();
                    let cap = if messages > u64::from(c.max_messages) {
                        Some(ClosedBy::MaxMessages)
                    } else if bytes > u64::from(c.max_bytes) {
                        Some(ClosedBy::MaxBytes)
                    } else if span > c.max_duration_ms {
                        Some(ClosedBy::MaxDuration)
                    } else {
                        None
                    };
                    match cap {
                        Some(cap) => {
                            let mut reached = reached;
                            reached.sort_by_key(Session::min_t);
                            for s in reached {
                                close(s, cap, &mut out);
                            }
                            if e.kind == EventKind::EndOfTurn {
                                out.dropped.insert((seq, DropReason::NoMessage.as_str()));
                            } else {
                                open.push(Session {
                                    key: e.key(),
                                    events: vec![(seq, e.clone())],
                                });
                            }
                        }
                        None => {
                            let merged = Session {
                                key: e.key(),
                                events: all,
                            };
                            if e.kind == EventKind::EndOfTurn {
                                close(merged, ClosedBy::EndOfTurn, &mut out);
                            } else {
                                open.push(merged);
                            }
                        }
                    }
                }
            }
            w = w.max(e.t - c.max_out_of_orderness_ms);
            close_expired(&mut open, w, c.gap_ms, &mut out, &close);
        }
        close_expired(&mut open, i64::MAX, c.gap_ms, &mut out, &close);
        out
    }

    fn close_expired(
        open: &mut Vec<Session>,
        w: i64,
        gap: i64,
        out: &mut Summary,
        close: &dyn Fn(Session, ClosedBy, &mut Summary),
    ) {
        let (mut expired, rest): (Vec<Session>, Vec<Session>) =
            open.drain(..).partition(|s| s.max_t() + gap < w);
        *open = rest;
        expired.sort_by_key(|s| s.max_t());
        for s in expired {
            close(s, ClosedBy::Gap, out);
        }
    }
}

/// Flink's session windows, offline: per key, sort by time and split where
/// consecutive events are more than `gap` apart. Returns per key the sessions'
/// message ids in (time, seq) order.
fn batch_sessions(gap: i64, events: &[Ev]) -> BTreeMap<Key, Vec<Vec<String>>> {
    let mut by_key: BTreeMap<Key, Vec<(i64, u64, &str)>> = BTreeMap::new();
    for (seq, e) in events.iter().enumerate() {
        by_key
            .entry(e.key())
            .or_default()
            .push((e.t, seq as u64, &e.id));
    }
    by_key
        .into_iter()
        .map(|(key, mut evs)| {
            evs.sort();
            let mut sessions: Vec<Vec<String>> = Vec::new();
            let mut last = i64::MIN;
            for (t, _, id) in evs {
                if sessions.is_empty() || t - last > gap {
                    sessions.push(Vec::new());
                }
                sessions.last_mut().unwrap().push(id.to_owned());
                last = t;
            }
            (key, sessions)
        })
        .collect()
}

fn kind_strategy() -> impl Strategy<Value = EventKind> {
    prop_oneof![6 => Just(EventKind::Message), 2 => Just(EventKind::Typing), 1 => Just(EventKind::EndOfTurn)]
}

/// Events in arbitrary arrival order: few keys, times on a coarse grid so that
/// merges, splits, bridges and exact-gap ties all happen; ids from a small
/// pool so duplicates happen.
fn arbitrary_events() -> impl Strategy<Value = Vec<Ev>> {
    proptest::collection::vec(
        (
            0u8..3,
            any::<bool>(),
            kind_strategy(),
            0u32..12,
            1usize..10,
            0i64..60,
        )
            .prop_map(|(user, conversation, kind, id, text_len, slot)| Ev {
                user,
                conversation: conversation && user == 0,
                kind,
                id: format!("m{id}"),
                text_len,
                t: 1_000_000 + slot * 500,
            }),
        0..60,
    )
}

fn arbitrary_config() -> impl Strategy<Value = WindowConfig> {
    (
        1i64..8,
        0i64..12,
        1u32..6,
        10u32..40,
        1i64..30,
        prop_oneof![
            Just(LatePolicy::NewTurn),
            Just(LatePolicy::Dlq),
            Just(LatePolicy::Drop)
        ],
    )
        .prop_map(
            |(gap, ooo, max_messages, max_bytes, max_duration, late)| WindowConfig {
                gap_ms: gap * 500,
                max_out_of_orderness_ms: ooo * 250,
                max_duration_ms: max_duration * 500,
                max_messages,
                max_bytes,
                late,
            },
        )
}

/// Bursts of messages from a few users, in event-time order.
fn ordered_bursts() -> impl Strategy<Value = Vec<Ev>> {
    proptest::collection::vec((0u8..5, 0i64..8_000), 1..80).prop_map(|raw| {
        let mut t = 1_000_000;
        raw.into_iter()
            .enumerate()
            .map(|(i, (user, step))| {
                t += step;
                Ev {
                    user,
                    conversation: false,
                    kind: EventKind::Message,
                    id: format!("m{i}"),
                    text_len: 3,
                    t,
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The indexed engine makes exactly the naive simulator's decisions.
    #[test]
    fn engine_matches_the_reference_simulator(config in arbitrary_config(), events in arbitrary_events()) {
        let got = summarize(&events, &run_engine(config, &events));
        let want = reference::run(config, &events);
        prop_assert_eq!(got, want);
    }

    /// With disorder below max_out_of_orderness and no caps in reach, the turns
    /// are exactly Flink's session windows; nothing is late or lost.
    #[test]
    fn bounded_disorder_gives_exactly_flinks_sessions(ooo in 1i64..2_000, gap in 500i64..5_000, mut events in ordered_bursts()) {
        let config = WindowConfig { gap_ms: gap, max_out_of_orderness_ms: ooo, max_duration_ms: i64::MAX / 4, max_messages: u32::MAX, max_bytes: u32::MAX, late: LatePolicy::Dlq };
        // Swap neighbours whose times differ by less than ooo: bounded disorder.
        for i in (1..events.len()).step_by(2) {
            if events[i].t - events[i - 1].t < ooo {
                events.swap(i, i - 1);
            }
        }
        let resolutions = run_engine(config, &events);
        let mut got: BTreeMap<Key, Vec<Vec<String>>> = BTreeMap::new();
        for r in &resolutions {
            match r {
                Resolution::Turn(t) => {
                    prop_assert!(!t.late);
                    let key = events[t.seqs[0] as usize].key();
                    got.entry(key).or_default().push(t.messages.iter().map(|m| m.message_id().to_owned()).collect());
                }
                other => prop_assert!(false, "nothing but turns expected, got {:?}", other),
            }
        }
        prop_assert_eq!(got, batch_sessions(gap, &events));
    }

    /// Every record ends in exactly one outcome, consecutive events of a turn are
    /// at most `gap` apart, and the outcomes do not depend on how records are
    /// batched between reads.
    #[test]
    fn every_record_once_gaps_bounded_and_batching_independent(
        config in arbitrary_config(),
        events in arbitrary_events(),
        cuts in proptest::collection::vec(1usize..8, 1..20),
    ) {
        let bytes: Vec<Vec<u8>> = events.iter().map(|e| {
            let c = e.chat_event();
            serde_json::to_vec(&serde_json::json!({
                "message_id": c.message_id, "user_id": c.user_id, "conversation_id": c.conversation_id,
                "kind": c.kind.as_str(), "text": c.text, "event_time": c.event_time,
            })).unwrap()
        }).collect();
        let decoder = Decoder::new(InputFormat::Json, DecodeLimits { max_record_bytes: 1 << 20, max_text_bytes: 10, max_future_skew_ms: i64::MAX / 4 });

        // One record at a time.
        let mut single = PartitionPipeline::new(decoder.clone(), config);
        let mut one_by_one = Vec::new();
        for (seq, b) in bytes.iter().enumerate() {
            single.process(b, seq as u64, 0, &mut one_by_one);
        }
        single.flush(&mut one_by_one);

        // In batches of varying size, outcomes collected per batch.
        let mut batched_pipeline = PartitionPipeline::new(decoder, config);
        let mut batched = Vec::new();
        let mut seq = 0usize;
        for cut in cuts.iter().cycle() {
            if seq >= bytes.len() { break; }
            let end = (seq + cut).min(bytes.len());
            let mut batch_out = Vec::new();
            for (i, b) in bytes[seq..end].iter().enumerate() {
                batched_pipeline.process(b, (seq + i) as u64, 0, &mut batch_out);
            }
            batched.extend(batch_out);
            seq = end;
        }
        batched_pipeline.flush(&mut batched);
        prop_assert_eq!(&one_by_one, &batched);

        let mut seen = vec![0u32; events.len()];
        for outcome in &one_by_one {
            match outcome {
                Outcome::Turn(t) => {
                    for s in &t.seqs { seen[*s as usize] += 1; }
                    let mut times: Vec<i64> = t.seqs.iter().map(|s| events[*s as usize].t).collect();
                    times.sort();
                    prop_assert!(times.windows(2).all(|w| w[1] - w[0] <= config.gap_ms), "gap exceeded in {:?}", times);
                    prop_assert!(t.messages.len() as u32 <= config.max_messages);
                }
                Outcome::DeadLetter { seq, .. } | Outcome::Dropped { seq, .. } => seen[*seq as usize] += 1,
            }
        }
        prop_assert!(seen.iter().all(|n| *n == 1), "outcomes per record: {:?}", seen);
    }

    /// Driving a completion tracker from the engine's outcomes, with turns
    /// confirmed in a shuffled order, never commits past an unresolved record
    /// and commits everything in the end.
    #[test]
    fn commit_position_never_passes_an_unresolved_record(
        config in arbitrary_config(),
        events in arbitrary_events(),
        confirm_order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..200),
    ) {
        let mut engine = SessionEngine::new(config);
        let mut tracker = CompletionTracker::new();
        let mut in_flight: Vec<Vec<u64>> = Vec::new();
        let mut resolved = vec![false; events.len()];
        let mut out = Vec::new();
        let mut picks = confirm_order.into_iter();
        let mut committed: Option<u64> = None;
        let settle = |out: &mut Vec<Resolution>, in_flight: &mut Vec<Vec<u64>>, tracker: &mut CompletionTracker<u64>, resolved: &mut Vec<bool>| {
            for r in out.drain(..) {
                match r {
                    Resolution::Turn(t) => in_flight.push(t.seqs),
                    Resolution::Dropped { seq, .. } | Resolution::LateDeadLetter { seq } => {
                        tracker.resolve(seq);
                        resolved[seq as usize] = true;
                    }
                }
            }
        };
        for (seq, e) in events.iter().enumerate() {
            let s = tracker.register(seq as u64 * 10);
            prop_assert_eq!(s, seq as u64);
            engine.on_event(e.chat_event(), s, &mut out);
            settle(&mut out, &mut in_flight, &mut tracker, &mut resolved);
            // Confirm one in-flight turn, chosen by the test case, now and then.
            if let Some(pick) = picks.next() {
                if !in_flight.is_empty() {
                    let seqs = in_flight.swap_remove(pick.index(in_flight.len()));
                    for s in seqs { tracker.resolve(s); resolved[s as usize] = true; }
                }
            }
            if let Some(p) = tracker.take_committable() { committed = Some(p); }
            if let Some(p) = committed {
                prop_assert!(resolved[..=(p / 10) as usize].iter().all(|r| *r), "committed {} past an unresolved record", p);
            }
        }
        engine.flush(&mut out);
        settle(&mut out, &mut in_flight, &mut tracker, &mut resolved);
        for seqs in in_flight.drain(..) { for s in seqs { tracker.resolve(s); } }
        if let Some(p) = tracker.take_committable() { committed = Some(p); }
        prop_assert_eq!(committed, events.len().checked_sub(1).map(|last| last as u64 * 10));
        prop_assert_eq!(tracker.in_flight(), 0);
    }

    /// With every confirmed turn (and every dropped duplicate with the
    /// session of its original) held, the resume point (where a restart
    /// replays from) never falls strictly inside a resolved outcome, and
    /// never passes an unresolved record.
    #[test]
    fn the_resume_point_never_splits_a_resolved_outcome(
        config in arbitrary_config(),
        events in arbitrary_events(),
        confirm_order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..200),
    ) {
        let mut engine = SessionEngine::new(config);
        let mut tracker = CompletionTracker::new();
        let mut in_flight: Vec<Vec<u64>> = Vec::new();
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let mut resolved = vec![false; events.len()];
        let mut out = Vec::new();
        let mut picks = confirm_order.into_iter();
        for (seq, e) in events.iter().enumerate() {
            tracker.register(seq as u64 * 10);
            engine.on_event(e.chat_event(), seq as u64, &mut out);
            for r in out.drain(..) {
                match r {
                    Resolution::Turn(t) => in_flight.push(t.seqs),
                    Resolution::Dropped { seq, held_by, .. } => {
                        if let Some(first) = held_by {
                            tracker.hold(first, seq);
                            spans.push((first, seq));
                        }
                        tracker.resolve(seq);
                        resolved[seq as usize] = true;
                    }
                    Resolution::LateDeadLetter { seq } => {
                        tracker.resolve(seq);
                        resolved[seq as usize] = true;
                    }
                }
            }
            if let Some(pick) = picks.next() {
                if !in_flight.is_empty() {
                    let seqs = in_flight.swap_remove(pick.index(in_flight.len()));
                    let (first, last) = (*seqs.iter().min().unwrap(), *seqs.iter().max().unwrap());
                    tracker.hold(first, last);
                    spans.push((first, last));
                    for s in seqs { tracker.resolve(s); resolved[s as usize] = true; }
                }
            }
            let resume = tracker.resume_point(0, |p| p + 10);
            let resume_seq = resume / 10;
            prop_assert!(resolved[..resume_seq as usize].iter().all(|r| *r), "resume {} passes an unresolved record", resume);
            for (first, last) in &spans {
                prop_assert!(
                    !(*first < resume_seq && resume_seq <= *last),
                    "resume at seq {} splits the outcome spanning {}..={}", resume_seq, first, last
                );
            }
        }
    }
}
