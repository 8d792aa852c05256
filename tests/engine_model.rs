//! Property tests of the session engine against small, obviously-correct
//! reference models (the invariants of `docs/semantics.md`).
//!
//! - `reference`: the definition of `docs/semantics.md` ("Sessions and
//!   turns") applied offline: per key, sort, chain, cut. Whatever the arrival
//!   order within the disorder bound, the engine must produce exactly its
//!   turns, byte for byte.
//! - `batch_sessions`: Flink's / Kafka Streams' session windows computed offline
//!   by sorting each key's events and splitting where the gap is exceeded; with
//!   disorder below `max_out_of_orderness` the engine must produce exactly these.

use std::collections::BTreeMap;

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
    gap: Option<i64>,
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
            gap_ms: self.gap,
        }
    }
}

/// An emitted turn as compared: (its JSON, message ids, closed_by,
/// previous_turn_id).
type EmittedTurn = (String, Vec<String>, ClosedBy, Option<String>);

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

/// The definition, offline and written apart from the engine: per key, the
/// events sorted by (time, end of turn last, message id, text), chained
/// while the next event is within the furthest `t + gap` so far, cut before
/// an event past `max_duration` from the piece's first, before a message
/// that would break `max_messages` or `max_bytes`, and right after an end of
/// turn. A message id already in the piece is a duplicate. Returns per key
/// the turns' (message ids, closed_by, previous turn's index in that list).
mod reference {
    use super::*;

    pub type RefTurn = (Vec<String>, ClosedBy, Option<usize>);

    pub fn turns(c: &WindowConfig, events: &[Ev]) -> BTreeMap<Key, Vec<RefTurn>> {
        let mut by_key: BTreeMap<Key, Vec<&Ev>> = BTreeMap::new();
        for e in events {
            by_key.entry(e.key()).or_default().push(e);
        }
        let gap_of = |e: &Ev| e.gap.map_or(c.gap_ms, |g| g.clamp(0, c.max_gap_ms));
        let mut result = BTreeMap::new();
        for (key, mut evs) in by_key {
            // Only a message has text (the engine orders by it after the id).
            evs.sort_by_key(|e| {
                let text = if e.kind == EventKind::Message {
                    e.text_len
                } else {
                    0
                };
                (
                    e.t,
                    e.kind == EventKind::EndOfTurn,
                    e.id.clone(),
                    text,
                    gap_of(e),
                )
            });
            let mut turns: Vec<RefTurn> = Vec::new();
            let mut last_end: Option<(usize, i64)> = None; // (turn index, end time)
            let mut i = 0;
            while i < evs.len() {
                let start = evs[i].t;
                let mut reach = i64::MIN;
                let mut ids: Vec<String> = Vec::new();
                let mut bytes = 0usize;
                let mut closed_by = None;
                let mut j = i;
                while j < evs.len() {
                    let e = evs[j];
                    if j > i && e.t > reach {
                        closed_by = Some(ClosedBy::Gap);
                        break;
                    }
                    if e.t - start > c.max_duration_ms {
                        closed_by = Some(ClosedBy::MaxDuration);
                        break;
                    }
                    if e.kind == EventKind::Message && ids.contains(&e.id) {
                        j += 1; // a duplicate: neither counts nor chains
                        continue;
                    }
                    if e.kind == EventKind::Message {
                        if j > i && ids.len() as u32 >= c.max_messages {
                            closed_by = Some(ClosedBy::MaxMessages);
                            break;
                        }
                        if j > i && !ids.is_empty() && bytes + e.text_len > c.max_bytes as usize {
                            closed_by = Some(ClosedBy::MaxBytes);
                            break;
                        }
                        ids.push(e.id.clone());
                        bytes += e.text_len;
                    }
                    reach = reach.max(e.t + gap_of(e));
                    j += 1;
                    if e.kind == EventKind::EndOfTurn {
                        closed_by = Some(ClosedBy::EndOfTurn);
                        break;
                    }
                }
                // A chain ending by its gap after max_duration ended there.
                let closed_by = match closed_by {
                    None | Some(ClosedBy::Gap) if reach > start + c.max_duration_ms => {
                        ClosedBy::MaxDuration
                    }
                    None => ClosedBy::Gap,
                    Some(by) => by,
                };
                if !ids.is_empty() {
                    let end = evs[j - 1].t;
                    let previous = match (c.follow_up_ms, last_end) {
                        (Some(f), Some((index, last))) if start - last <= f => Some(index),
                        _ => None,
                    };
                    turns.push((ids, closed_by, previous));
                    last_end = Some((turns.len() - 1, end));
                }
                i = j;
            }
            if !turns.is_empty() {
                result.insert(key, turns);
            }
        }
        result
    }
}

/// Flink's session windows, offline: per key, sort by time and split where
/// consecutive events are more than `gap` apart. Returns per key the sessions'
/// message ids in (time, message id) order.
fn batch_sessions(gap: i64, events: &[Ev]) -> BTreeMap<Key, Vec<Vec<String>>> {
    let mut by_key: BTreeMap<Key, Vec<(i64, &str, u64)>> = BTreeMap::new();
    for (seq, e) in events.iter().enumerate() {
        by_key
            .entry(e.key())
            .or_default()
            .push((e.t, &e.id, seq as u64));
    }
    by_key
        .into_iter()
        .map(|(key, mut evs)| {
            evs.sort();
            let mut sessions: Vec<Vec<String>> = Vec::new();
            let mut last = i64::MIN;
            for (t, id, _) in evs {
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
            prop_oneof![6 => Just(None), 1 => (0i64..12).prop_map(|g| Some(g * 500))],
        )
            .prop_map(|(user, conversation, kind, id, text_len, slot, gap)| Ev {
                user,
                conversation: conversation && user == 0,
                kind,
                id: format!("m{id}"),
                text_len,
                t: 1_000_000 + slot * 500,
                gap,
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
        (
            1i64..10,
            prop_oneof![Just(None), (0i64..10).prop_map(|f| Some(f * 500))],
        ),
    )
        .prop_map(
            |(gap, ooo, max_messages, max_bytes, max_duration, late, (max_gap, follow_up))| {
                WindowConfig {
                    gap_ms: gap * 500,
                    max_out_of_orderness_ms: ooo * 250,
                    max_duration_ms: max_duration * 500,
                    max_messages,
                    max_bytes,
                    late,
                    max_gap_ms: max_gap * 500,
                    follow_up_ms: follow_up,
                }
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
                    gap: None,
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any arrival order within the disorder bound gives the same turns,
    /// byte for byte (turn_id, messages, closed_by, previous_turn_id), and
    /// they are the definition's.
    #[test]
    fn turns_do_not_depend_on_arrival_order_within_the_bound(
        config in arbitrary_config(),
        events in arbitrary_events(),
        delays in proptest::collection::vec(0.0f64..=1.0, 60),
        other_delays in proptest::collection::vec(0.0f64..=1.0, 60),
    ) {
        // Each event arrives at most max_out_of_orderness after its time:
        // within the bound, so nothing is late.
        let arrival = |delays: &[f64]| {
            let mut order: Vec<(i64, usize)> = events.iter().enumerate()
                .map(|(i, e)| (e.t + (delays[i] * config.max_out_of_orderness_ms as f64) as i64, i))
                .collect();
            order.sort();
            order.into_iter().map(|(_, i)| events[i].clone()).collect::<Vec<Ev>>()
        };
        let (a, b) = (arrival(&delays), arrival(&other_delays));
        let turns_of = |evs: &[Ev]| -> BTreeMap<Key, Vec<EmittedTurn>> {
            let mut got: BTreeMap<Key, Vec<_>> = BTreeMap::new();
            for r in run_engine(config, evs) {
                match r {
                    Resolution::Turn(t) => {
                        assert!(!t.late, "nothing is late within the bound");
                        let key = evs[*t.seqs.iter().find(|s| evs[**s as usize].kind == EventKind::Message).unwrap() as usize].key();
                        let mut bytes = Vec::new();
                        sessionizer::codec::encode_turn(&t, sessionizer::codec::OutputFormat::Json, &mut bytes);
                        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                        got.entry(key).or_default().push((
                            String::from_utf8(bytes).unwrap(),
                            t.messages.iter().map(|m| m.message_id().to_owned()).collect(),
                            t.closed_by,
                            json["previous_turn_id"].as_str().map(str::to_owned),
                        ));
                    }
                    Resolution::LateDeadLetter { .. } => panic!("nothing is late within the bound"),
                    Resolution::Dropped { reason, .. } => assert_ne!(reason, DropReason::Late),
                }
            }
            got
        };
        let (got_a, got_b) = (turns_of(&a), turns_of(&b));
        let bytes = |g: &BTreeMap<Key, Vec<EmittedTurn>>| -> BTreeMap<Key, Vec<String>> {
            g.iter().map(|(k, v)| (*k, v.iter().map(|t| t.0.clone()).collect())).collect()
        };
        prop_assert_eq!(bytes(&got_a), bytes(&got_b));
        let want = reference::turns(&config, &events);
        let got: BTreeMap<Key, Vec<reference::RefTurn>> = got_a.iter().map(|(k, v)| {
            let ids: Vec<&str> = v.iter().map(|t| serde_json::from_str::<serde_json::Value>(&t.0).unwrap()["turn_id"].as_str().unwrap().to_owned().leak() as &str).collect();
            (*k, v.iter().enumerate().map(|(n, t)| (t.1.clone(), t.2, t.3.as_ref().map(|p| ids[..n].iter().rposition(|id| id == p).expect("links an earlier turn of the key")))).collect())
        }).collect();
        prop_assert_eq!(got, want);
    }

    /// With disorder below max_out_of_orderness and no caps in reach, the turns
    /// are exactly Flink's session windows; nothing is late or lost.
    #[test]
    fn bounded_disorder_gives_exactly_flinks_sessions(ooo in 1i64..2_000, gap in 500i64..5_000, mut events in ordered_bursts()) {
        let config = WindowConfig { gap_ms: gap, max_out_of_orderness_ms: ooo, max_duration_ms: i64::MAX / 4, max_messages: u32::MAX, max_bytes: u32::MAX, late: LatePolicy::Dlq, max_gap_ms: 0, follow_up_ms: None };
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
                "kind": c.kind.as_str(), "text": c.text, "event_time": c.event_time, "gap_ms": c.gap_ms,
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
                    // Each event is within the window of the ones before it.
                    let mut chain: Vec<(i64, i64)> = t.seqs.iter().map(|s| {
                        let e = &events[*s as usize];
                        (e.t, e.t + config.gap_of(e.gap))
                    }).collect();
                    chain.sort();
                    let mut reach = chain[0].1;
                    for (time, end) in &chain[1..] {
                        prop_assert!(*time <= reach, "gap exceeded in {:?}", chain);
                        reach = reach.max(*end);
                    }
                    prop_assert!(t.messages.len() as u32 <= config.max_messages);
                }
                Outcome::DeadLetter { seq, .. } | Outcome::Dropped { seq, .. } => seen[*seq as usize] += 1,
                Outcome::Delivered { .. } => unreachable!("no record is marked replayed"),
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
