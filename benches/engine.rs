//! The session engine alone, on pre-decoded events (criterion), and its ratio
//! to a plain HashMap grouping pass over the same events, in one run.
//!
//! `cargo bench --bench engine`

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput};
use sessionizer::engine::{LatePolicy, SessionEngine, WindowConfig};
use sessionizer::model::{ChatEvent, EventKind};
use sessionizer::workload::{Workload, WorkloadSpec};

const EVENTS: usize = 1_000_000;

struct Decoded {
    message_id: String,
    user_id: String,
    text: String,
    event_time: i64,
}

fn events() -> Vec<Decoded> {
    let decoder = sessionizer::codec::Decoder::new(
        sessionizer::codec::InputFormat::Json,
        sessionizer::codec::DecodeLimits {
            max_record_bytes: 1 << 20,
            max_text_bytes: 1 << 14,
            max_future_skew_ms: i64::MAX / 4,
        },
    );
    Workload::new(WorkloadSpec::default())
        .take(EVENTS)
        .map(|r| {
            let e = decoder.decode(&r.payload, 0).unwrap();
            Decoded {
                message_id: e.message_id.into_owned(),
                user_id: e.user_id.into_owned(),
                text: e.text.into_owned(),
                event_time: e.event_time,
            }
        })
        .collect()
}

fn window() -> WindowConfig {
    WindowConfig {
        gap_ms: 3000,
        max_out_of_orderness_ms: 500,
        max_duration_ms: 120_000,
        max_messages: 200,
        max_bytes: 65_536,
        late: LatePolicy::NewTurn,
        max_gap_ms: 60_000,
        follow_up_ms: None,
    }
}

/// Every event through the engine, every session closed; returns the turn count.
fn engine_pass(events: &[Decoded]) -> usize {
    let mut engine = SessionEngine::new(window());
    let mut out = Vec::with_capacity(1024);
    let mut turns = 0;
    for (seq, e) in events.iter().enumerate() {
        let event = ChatEvent {
            message_id: e.message_id.as_str().into(),
            user_id: e.user_id.as_str().into(),
            conversation_id: None,
            kind: EventKind::Message,
            text: e.text.as_str().into(),
            event_time: e.event_time,
            attributes: None,
            gap_ms: None,
        };
        engine.on_event(event, seq as u64, &mut out);
        turns += out.len();
        out.clear();
    }
    engine.flush(&mut out);
    turns + out.len()
}

/// The floor: group events by user in a HashMap, copying what a session keeps
/// (id and text), then drain it. No windows, no watermark, no ordering.
fn hashmap_pass(events: &[Decoded]) -> usize {
    let mut groups: HashMap<String, Vec<(i64, Box<str>)>> = HashMap::new();
    for e in events {
        let mut id_text = String::with_capacity(e.message_id.len() + e.text.len());
        id_text.push_str(&e.message_id);
        id_text.push_str(&e.text);
        match groups.get_mut(e.user_id.as_str()) {
            Some(g) => g.push((e.event_time, id_text.into_boxed_str())),
            None => {
                groups.insert(
                    e.user_id.clone(),
                    vec![(e.event_time, id_text.into_boxed_str())],
                );
            }
        }
    }
    groups.drain().map(|(_, g)| black_box(g).len()).sum()
}

fn main() {
    let events = events();
    let mut c = Criterion::default().sample_size(10).configure_from_args();
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("sessionize 1M pre-decoded events, 20k users", |b| {
        b.iter(|| black_box(engine_pass(&events)))
    });
    group.bench_function("hashmap grouping pass (floor)", |b| {
        b.iter(|| black_box(hashmap_pass(&events)))
    });
    group.finish();
    c.final_summary();

    // The ratio, both measured here, best of five, alternating.
    let (mut engine_best, mut map_best) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        let t = Instant::now();
        black_box(engine_pass(&events));
        engine_best = engine_best.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        black_box(hashmap_pass(&events));
        map_best = map_best.min(t.elapsed().as_secs_f64());
    }
    let n = events.len() as f64;
    println!("engine  : {:>10.0} events/s", n / engine_best);
    println!("hashmap : {:>10.0} events/s", n / map_best);
    println!(
        "ratio engine / hashmap throughput: {:.2}",
        map_best / engine_best
    );
}
