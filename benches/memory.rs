//! Memory per open session: 1,000,000 users with one open session each,
//! measured by a counting allocator (bytes the engine holds, minus the message
//! texts) and by peak RSS. Then what `window.follow_up` keeps per key after
//! its turn is out (the previous turn's id and end), until the watermark
//! passes the follow-up horizon.
//!
//! `cargo bench --bench memory`

// A counting global allocator needs `unsafe impl GlobalAlloc`; nothing else does.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use sessionizer::engine::{LatePolicy, SessionEngine, WindowConfig};
use sessionizer::model::{ChatEvent, EventKind};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn main() {
    const SESSIONS: usize = 1_000_000;
    const TEXT: &str = "hello, is anyone there"; // 22 bytes
    let config = WindowConfig {
        gap_ms: 3000,
        max_out_of_orderness_ms: 60_000, // nothing closes while we fill
        max_duration_ms: 120_000,
        max_messages: 200,
        max_bytes: 65_536,
        late: LatePolicy::NewTurn,
        max_gap_ms: 60_000,
        follow_up_ms: None,
    };
    let names: Vec<(String, String)> = (0..SESSIONS)
        .map(|i| (format!("user-{i}"), format!("u{i}-b0-m0")))
        .collect();
    let key_bytes: usize = names.iter().map(|(u, m)| u.len() + m.len()).sum();
    let rss_before = status_kb("VmRSS:");
    let live_before = LIVE.load(Ordering::Relaxed);
    let mut engine = SessionEngine::new(config);
    let mut out = Vec::new();
    for (seq, (user, id)) in names.iter().enumerate() {
        let event = ChatEvent {
            message_id: id.as_str().into(),
            user_id: user.as_str().into(),
            conversation_id: None,
            kind: EventKind::Message,
            text: TEXT.into(),
            event_time: 1_700_000_000_000 + (seq as i64 % 1000),
            attributes: None,
            gap_ms: None,
        };
        engine.on_event(event, seq as u64, &mut out);
    }
    assert!(out.is_empty());
    assert_eq!(engine.open_sessions(), SESSIONS);
    let live = LIVE.load(Ordering::Relaxed) - live_before;
    let rss = status_kb("VmRSS:") - rss_before;
    let per_session = live as f64 / SESSIONS as f64;
    let text = TEXT.len() as f64;
    println!("{SESSIONS} open sessions, one {}-byte message each (user ids and message ids {:.1} bytes per session on average)", TEXT.len(), key_bytes as f64 / SESSIONS as f64);
    println!("  allocated by the engine : {per_session:.1} bytes per session");
    println!(
        "  beyond the message text : {:.1} bytes per session (ids and key included)",
        per_session - text
    );
    println!("  RSS growth              : {:.1} bytes per session (allocator overhead included); peak RSS {} MB", rss as f64 * 1024.0 / SESSIONS as f64, status_kb("VmHWM:") / 1024);
    std::hint::black_box(&engine);
    drop(engine);

    // Follow-up memory: every key's turn emitted, its memory still held.
    let config = WindowConfig {
        max_out_of_orderness_ms: 0,
        follow_up_ms: Some(3_600_000),
        ..config
    };
    let mut engine = SessionEngine::new(config);
    let live_before = LIVE.load(Ordering::Relaxed);
    let mut emitted = 0;
    for (seq, (user, id)) in names.iter().enumerate() {
        let event = ChatEvent {
            message_id: id.as_str().into(),
            user_id: user.as_str().into(),
            conversation_id: None,
            kind: EventKind::EndOfTurn,
            text: "".into(),
            event_time: 1_700_000_000_000 + seq as i64,
            attributes: None,
            gap_ms: None,
        };
        // An end of turn alone is dropped, but the message before it makes
        // a turn: send both.
        let message = ChatEvent {
            kind: EventKind::Message,
            text: TEXT.into(),
            ..event.clone()
        };
        engine.on_event(message, 2 * seq as u64, &mut out);
        engine.on_event(event, 2 * seq as u64 + 1, &mut out);
        emitted += out.len();
        out.clear();
    }
    let held = LIVE.load(Ordering::Relaxed) - live_before;
    println!(
        "follow_up memory: {emitted} turns out, {} keys waiting; {:.1} bytes per key held after its turn",
        engine.open_sessions(),
        held as f64 / SESSIONS as f64
    );
    std::hint::black_box(&engine);
}
