//! The session engine of one source partition.
//!
//! A key lives in one partition, so each partition has its own engine, its own
//! watermark and its own sessions: a backlog in one partition never holds back
//! another's turns, and a revoked partition is dropped whole.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::{BuildHasher, Hasher};

use hashbrown::{DefaultHashBuilder, HashTable};
use smallvec::SmallVec;

use super::watermark::WatermarkTracker;
use crate::model::{Attributes, ChatEvent, ClosedBy, EventKind};

/// What happens to a late event (one that reaches no open session of its key
/// and has `t + gap < W`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatePolicy {
    /// A late message becomes a turn of its own at once, flagged `late`.
    NewTurn,
    /// A late message becomes a dead letter with reason `late`.
    Dlq,
    /// A late message is dropped and counted.
    Drop,
}

/// The window rules, in milliseconds of event time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// Two events of a key share a session iff a chain of the key's events
    /// joins them with consecutive differences ≤ `gap_ms`.
    pub gap_ms: i64,
    pub max_out_of_orderness_ms: i64,
    /// Caps, checked when an event would join a session.
    pub max_duration_ms: i64,
    pub max_messages: u32,
    /// Sum of the messages' sizes in bytes: text plus attribute keys and
    /// values (see [`message_bytes`]), so a turn's size stays bounded.
    pub max_bytes: u32,
    pub late: LatePolicy,
}

/// Why a record was resolved without output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Its `message_id` was already in an open session of its key.
    Duplicate,
    /// A late typing or end-of-turn event, or a late message under `late = "drop"`.
    Late,
    /// A typing or end-of-turn event whose session held no message.
    NoMessage,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [
        DropReason::Duplicate,
        DropReason::Late,
        DropReason::NoMessage,
    ];

    /// Its place in [`DropReason::ALL`] (declaration order), for per-kind counters.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Duplicate => "duplicate",
            DropReason::Late => "late",
            DropReason::NoMessage => "no_message",
        }
    }
}

/// A message of a closed session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMessage {
    pub event_time: i64,
    /// The record's sequence number in its partition.
    pub seq: u64,
    /// `message_id` followed by `text`, one allocation per message.
    id_text: Box<str>,
    id_len: u32,
    pub attributes: Option<Box<Attributes>>,
}

impl SessionMessage {
    pub fn message_id(&self) -> &str {
        &self.id_text[..self.id_len as usize]
    }

    pub fn text(&self) -> &str {
        &self.id_text[self.id_len as usize..]
    }
}

/// A session the engine closed and that holds at least one message: the caller
/// encodes it as a turn, publishes it, and resolves `seqs` once it is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedSession {
    pub user_id: String,
    pub conversation_id: Option<String>,
    pub start_time: i64,
    pub end_time: i64,
    pub closed_by: ClosedBy,
    pub late: bool,
    /// In (event time, seq) order.
    pub messages: Vec<SessionMessage>,
    /// Every record the session absorbed (messages, typing, end of turn).
    pub seqs: Vec<u64>,
}

/// What became of records. Every record handed to the engine ends in exactly
/// one resolution: inside a turn, a dead letter, or a counted drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Turn(ClosedSession),
    Dropped {
        seq: u64,
        reason: DropReason,
        /// For a duplicate: the first record (lowest seq) of the open
        /// session that holds the original. A replay that starts after that
        /// record but at or before this one would see the duplicate without
        /// its original and emit it again, so a source must not resume
        /// between them (see `CompletionTracker::hold`).
        held_by: Option<u64>,
    },
    /// The record just handed in is a late message under `late = "dlq"`: the
    /// caller, which still holds its bytes, dead-letters it with reason `late`.
    LateDeadLetter {
        seq: u64,
    },
}

const NONE: u32 = u32::MAX;

/// One record inside an open session. Typing and end-of-turn entries have no
/// text and only keep the session's extent and the record's position.
#[derive(Debug)]
struct Entry {
    time: i64,
    seq: u64,
    id_text: Box<str>,
    attributes: Option<Box<Attributes>>,
    id_len: u32,
    is_message: bool,
}

#[derive(Debug)]
struct Session {
    /// `user_id` followed by `conversation_id` (empty when absent: a valid
    /// conversation id is never empty).
    key: Box<str>,
    user_len: u32,
    /// Next open session of the same key (several are open when out-of-order
    /// events have not bridged them yet), or `NONE`.
    next_same_key: u32,
    start: i64,
    last: i64,
    bytes: u32,
    message_count: u32,
    /// The first entry lives inline: most open sessions hold one message, and
    /// this saves them an allocation.
    entries: SmallVec<[Entry; 1]>,
}

impl Session {
    fn user_id(&self) -> &str {
        &self.key[..self.user_len as usize]
    }

    fn conversation_id(&self) -> Option<&str> {
        let conversation = &self.key[self.user_len as usize..];
        (!conversation.is_empty()).then_some(conversation)
    }

    fn is_key(&self, user_id: &str, conversation_id: Option<&str>) -> bool {
        self.user_id() == user_id && self.conversation_id() == conversation_id
    }

    fn has_message(&self, message_id: &str) -> bool {
        self.entries
            .iter()
            .any(|e| e.is_message && &e.id_text[..e.id_len as usize] == message_id)
    }
}

#[derive(Debug, Default)]
struct Slot {
    /// Bumped whenever the slot is freed, so stale deadline entries are skipped.
    generation: u32,
    session: Option<Session>,
}

/// The open sessions of one partition and its watermark.
///
/// Sessions live in a slab; a hash table maps each key to its first open
/// session, and a min-heap of `(deadline, slot)` is the ordered index of
/// deadlines, so closing never scans the keys. A session's deadline
/// (`last + gap`) only grows, so the heap holds one entry per session, possibly
/// older than the session's real deadline: when such an entry comes due, it is
/// re-pushed with the real one.
#[derive(Debug)]
pub struct SessionEngine {
    config: WindowConfig,
    watermark: WatermarkTracker,
    hasher: DefaultHashBuilder,
    by_key: HashTable<u32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    deadlines: BinaryHeap<Reverse<(i64, u32, u32)>>,
    open: usize,
    /// Scratch: the sessions an event reaches.
    reached: Vec<u32>,
}

fn key_hash(hasher: &DefaultHashBuilder, user_id: &str, conversation_id: &str) -> u64 {
    let mut h = hasher.build_hasher();
    h.write(user_id.as_bytes());
    h.write_u8(0xff); // not UTF-8: separates the parts
    h.write(conversation_id.as_bytes());
    h.finish()
}

impl SessionEngine {
    pub fn new(config: WindowConfig) -> Self {
        SessionEngine {
            config,
            watermark: WatermarkTracker::new(config.max_out_of_orderness_ms, config.gap_ms),
            hasher: DefaultHashBuilder::default(),
            by_key: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            deadlines: BinaryHeap::new(),
            open: 0,
            reached: Vec::new(),
        }
    }

    pub fn config(&self) -> &WindowConfig {
        &self.config
    }

    /// The partition's current watermark (`i64::MIN` before the first event).
    pub fn watermark(&self) -> i64 {
        self.watermark.current()
    }

    pub fn max_event_time(&self) -> Option<i64> {
        self.watermark.max_event_time()
    }

    pub fn open_sessions(&self) -> usize {
        self.open
    }

    /// The earliest event-time deadline of an open session: something closes
    /// once the watermark exceeds it. Under the idle advance that is at wall
    /// clock `deadline + max_out_of_orderness + 1`. May be early (never late),
    /// which only costs a wake-up.
    pub fn next_deadline(&self) -> Option<i64> {
        self.deadlines.peek().map(|Reverse((d, _, _))| *d)
    }

    /// Hands the engine the next record of the partition (in read order) and
    /// its sequence number; pushes what got resolved to `out`. The event's own
    /// watermark update happens after it has been placed, and every session it
    /// lets close is closed before this returns, so the result does not depend
    /// on how records are batched.
    pub fn on_event(&mut self, event: ChatEvent<'_>, seq: u64, out: &mut Vec<Resolution>) {
        let t = event.event_time;
        let conversation_id = event.conversation_id.as_deref();
        let hash = key_hash(&self.hasher, &event.user_id, conversation_id.unwrap_or(""));
        let head = self.find_head(hash, &event.user_id, conversation_id);

        if event.kind == EventKind::Message {
            if let Some(head) = head {
                let original = self
                    .chain(head)
                    .find(|s| s.has_message(&event.message_id))
                    .map(|s| s.entries.iter().map(|e| e.seq).min());
                if let Some(held_by) = original {
                    out.push(Resolution::Dropped {
                        seq,
                        reason: DropReason::Duplicate,
                        held_by,
                    });
                    self.observe(t, out);
                    return;
                }
            }
        }

        let gap = self.config.gap_ms;
        let mut reached = std::mem::take(&mut self.reached);
        reached.clear();
        let mut slot = head.unwrap_or(NONE);
        while slot != NONE {
            let session = self.session(slot);
            if t >= session.start.saturating_sub(gap) && t <= session.last.saturating_add(gap) {
                reached.push(slot);
            }
            slot = session.next_same_key;
        }

        if reached.is_empty() {
            if t.saturating_add(gap) < self.watermark.current() {
                self.on_late(event, seq, out);
            } else if event.kind == EventKind::EndOfTurn {
                out.push(Resolution::Dropped {
                    seq,
                    reason: DropReason::NoMessage,
                    held_by: None,
                });
            } else {
                self.open_session(hash, head, event, seq);
            }
        } else if let Some(cap) = self.broken_cap(&reached, &event) {
            // Close what the event would have joined, oldest first; the event
            // opens the next session.
            reached.sort_by_key(|&slot| self.session(slot).start);
            for &slot in &reached {
                self.close(slot, cap, out);
            }
            if event.kind == EventKind::EndOfTurn {
                out.push(Resolution::Dropped {
                    seq,
                    reason: DropReason::NoMessage,
                    held_by: None,
                });
            } else {
                let head = self.find_head(hash, &event.user_id, event.conversation_id.as_deref());
                self.open_session(hash, head, event, seq);
            }
        } else {
            let target = self.merge(&reached);
            let is_end = event.kind == EventKind::EndOfTurn;
            self.add_to(target, event, seq);
            if is_end {
                self.close(target, ClosedBy::EndOfTurn, out);
            }
        }
        self.reached = reached;
        self.observe(t, out);
    }

    /// Moves the watermark for an event that is not placed in a session (it
    /// belongs to a turn an earlier owner already delivered); closes what
    /// that lets close.
    pub fn observe_event_time(&mut self, event_time: i64, out: &mut Vec<Resolution>) {
        self.observe(event_time, out);
    }

    /// The caught-up idle advance (see [`WatermarkTracker::advance_idle`]);
    /// the caller has established with an [`super::IdleClock`] that the
    /// partition is read to its end and quiet.
    pub fn advance_idle(&mut self, now_ms: i64, out: &mut Vec<Resolution>) {
        if self.watermark.advance_idle(now_ms) {
            self.close_expired(out);
        }
    }

    /// End of input: closes every open session (`closed_by = gap`), in
    /// deadline order.
    pub fn flush(&mut self, out: &mut Vec<Resolution>) {
        self.watermark.advance_to_end();
        self.close_expired(out);
    }

    /// Takes the event's time into the watermark and closes what is due. Also
    /// runs when W did not move: a session opened after a cap closed its
    /// predecessor may already be behind W, and then closes at once.
    fn observe(&mut self, t: i64, out: &mut Vec<Resolution>) {
        self.watermark.observe(t);
        self.close_expired(out);
    }

    fn close_expired(&mut self, out: &mut Vec<Resolution>) {
        let w = self.watermark.current();
        let gap = self.config.gap_ms;
        while let Some(&Reverse((deadline, slot, generation))) = self.deadlines.peek() {
            if w <= deadline {
                break;
            }
            self.deadlines.pop();
            let entry = &self.slots[slot as usize];
            let Some(session) = entry
                .session
                .as_ref()
                .filter(|_| entry.generation == generation)
            else {
                continue; // closed or merged away
            };
            let actual = session.last.saturating_add(gap);
            if w > actual {
                self.close(slot, ClosedBy::Gap, out);
            } else {
                self.deadlines.push(Reverse((actual, slot, generation)));
            }
        }
    }

    fn on_late(&mut self, event: ChatEvent<'_>, seq: u64, out: &mut Vec<Resolution>) {
        let resolution = match (event.kind, self.config.late) {
            (EventKind::Message, LatePolicy::NewTurn) => {
                let t = event.event_time;
                let (id_text, id_len) = join_id_text(&event.message_id, &event.text);
                Resolution::Turn(ClosedSession {
                    user_id: event.user_id.into_owned(),
                    conversation_id: event.conversation_id.map(|c| c.into_owned()),
                    start_time: t,
                    end_time: t,
                    closed_by: ClosedBy::Gap,
                    late: true,
                    messages: vec![SessionMessage {
                        event_time: t,
                        seq,
                        id_text,
                        id_len,
                        attributes: event.attributes,
                    }],
                    seqs: vec![seq],
                })
            }
            (EventKind::Message, LatePolicy::Dlq) => Resolution::LateDeadLetter { seq },
            _ => Resolution::Dropped {
                seq,
                reason: DropReason::Late,
                held_by: None,
            },
        };
        out.push(resolution);
    }

    /// The first cap that joining `event` to the `reached` sessions would
    /// break, checked in the order max_messages, max_bytes, max_duration.
    fn broken_cap(&self, reached: &[u32], event: &ChatEvent<'_>) -> Option<ClosedBy> {
        let (mut start, mut last) = (event.event_time, event.event_time);
        let (mut messages, mut bytes) = (0u64, 0u64);
        if event.kind == EventKind::Message {
            messages = 1;
            bytes = u64::from(message_bytes(&event.text, event.attributes.as_deref()));
        }
        for &slot in reached {
            let s = self.session(slot);
            start = start.min(s.start);
            last = last.max(s.last);
            messages += u64::from(s.message_count);
            bytes += u64::from(s.bytes);
        }
        if messages > u64::from(self.config.max_messages) {
            Some(ClosedBy::MaxMessages)
        } else if bytes > u64::from(self.config.max_bytes) {
            Some(ClosedBy::MaxBytes)
        } else if last - start > self.config.max_duration_ms {
            Some(ClosedBy::MaxDuration)
        } else {
            None
        }
    }

    /// Merges the reached sessions (an out-of-order event bridging them) into
    /// the first; returns its slot.
    fn merge(&mut self, reached: &[u32]) -> u32 {
        let target = reached[0];
        for &other in &reached[1..] {
            let absorbed = self.remove(other);
            let t = self.session_mut(target);
            t.start = t.start.min(absorbed.start);
            t.last = t.last.max(absorbed.last);
            t.bytes += absorbed.bytes;
            t.message_count += absorbed.message_count;
            t.entries.extend(absorbed.entries);
        }
        target
    }

    fn add_to(&mut self, slot: u32, event: ChatEvent<'_>, seq: u64) {
        let entry = make_entry(event, seq);
        let s = self.session_mut(slot);
        s.start = s.start.min(entry.time);
        s.last = s.last.max(entry.time);
        if entry.is_message {
            s.message_count += 1;
            s.bytes = s.bytes.saturating_add(entry.bytes());
        }
        s.entries.push(entry);
    }

    /// The first open session of a key (the head of its chain).
    fn find_head(&self, hash: u64, user_id: &str, conversation_id: Option<&str>) -> Option<u32> {
        self.by_key
            .find(hash, |&slot| {
                self.slots[slot as usize]
                    .session
                    .as_ref()
                    .is_some_and(|s| s.is_key(user_id, conversation_id))
            })
            .copied()
    }

    fn open_session(&mut self, hash: u64, head: Option<u32>, event: ChatEvent<'_>, seq: u64) {
        let t = event.event_time;
        let mut key = String::with_capacity(
            event.user_id.len() + event.conversation_id.as_ref().map_or(0, |c| c.len()),
        );
        key.push_str(&event.user_id);
        key.push_str(event.conversation_id.as_deref().unwrap_or(""));
        let user_len = event.user_id.len() as u32;
        let entry = make_entry(event, seq);
        let (message_count, bytes) = (u32::from(entry.is_message), entry.bytes());
        let mut entries = SmallVec::new();
        entries.push(entry);
        let session = Session {
            key: key.into_boxed_str(),
            user_len,
            next_same_key: head.unwrap_or(NONE),
            start: t,
            last: t,
            bytes,
            message_count,
            entries,
        };
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[slot as usize].session = Some(session);
        let generation = self.slots[slot as usize].generation;
        self.open += 1;
        // The new session becomes the head of its key's chain.
        match head {
            Some(old_head) => {
                let found = self.by_key.find_mut(hash, |&s| s == old_head);
                *found.expect("the chain head is in the table") = slot;
            }
            None => {
                let (slots, hasher) = (&self.slots, &self.hasher);
                self.by_key.insert_unique(hash, slot, |&s| {
                    let session = slots[s as usize]
                        .session
                        .as_ref()
                        .expect("indexed slots are open");
                    key_hash(
                        hasher,
                        session.user_id(),
                        session.conversation_id().unwrap_or(""),
                    )
                });
            }
        }
        self.deadlines.push(Reverse((
            t.saturating_add(self.config.gap_ms),
            slot,
            generation,
        )));
    }

    /// Closes a session and emits its turn (or drops a session without messages).
    fn close(&mut self, slot: u32, closed_by: ClosedBy, out: &mut Vec<Resolution>) {
        let mut session = self.remove(slot);
        if session.message_count == 0 {
            for entry in &session.entries {
                out.push(Resolution::Dropped {
                    seq: entry.seq,
                    reason: DropReason::NoMessage,
                    held_by: None,
                });
            }
            return;
        }
        session.entries.sort_by_key(|e| (e.time, e.seq));
        let seqs = session.entries.iter().map(|e| e.seq).collect();
        let user_id = session.user_id().to_owned();
        let conversation_id = session.conversation_id().map(str::to_owned);
        let messages = session
            .entries
            .into_iter()
            .filter(|e| e.is_message)
            .map(|e| SessionMessage {
                event_time: e.time,
                seq: e.seq,
                id_text: e.id_text,
                id_len: e.id_len,
                attributes: e.attributes,
            })
            .collect();
        out.push(Resolution::Turn(ClosedSession {
            user_id,
            conversation_id,
            start_time: session.start,
            end_time: session.last,
            closed_by,
            late: false,
            messages,
            seqs,
        }));
    }

    /// Takes a session out of the slab and its key's chain.
    fn remove(&mut self, slot: u32) -> Session {
        let session = self.slots[slot as usize]
            .session
            .take()
            .expect("removing an open session");
        self.slots[slot as usize].generation = self.slots[slot as usize].generation.wrapping_add(1);
        self.free.push(slot);
        self.open -= 1;
        let hash = key_hash(
            &self.hasher,
            session.user_id(),
            session.conversation_id().unwrap_or(""),
        );
        let entry = self.by_key.find_entry(hash, |&s| s == slot);
        match entry {
            Ok(head) => {
                if session.next_same_key == NONE {
                    head.remove();
                } else {
                    *head.into_mut() = session.next_same_key;
                }
            }
            Err(_) => {
                // Not the head: unlink it from the chain that starts at the head.
                let head = self
                    .find_head(hash, session.user_id(), session.conversation_id())
                    .expect("an open session's key is indexed");
                let mut previous = head;
                loop {
                    let next = self.session(previous).next_same_key;
                    if next == slot {
                        self.session_mut(previous).next_same_key = session.next_same_key;
                        break;
                    }
                    previous = next;
                }
            }
        }
        session
    }

    fn chain(&self, head: u32) -> impl Iterator<Item = &Session> {
        let mut slot = head;
        std::iter::from_fn(move || {
            if slot == NONE {
                return None;
            }
            let session = self.session(slot);
            slot = session.next_same_key;
            Some(session)
        })
    }

    fn session(&self, slot: u32) -> &Session {
        self.slots[slot as usize]
            .session
            .as_ref()
            .expect("slot holds an open session")
    }

    fn session_mut(&mut self, slot: u32) -> &mut Session {
        self.slots[slot as usize]
            .session
            .as_mut()
            .expect("slot holds an open session")
    }
}

/// What a message counts toward `max_bytes`: its text and its attributes'
/// keys and values. Attributes count because they go into the turn too: two
/// messages with 600 kB of attributes each made a turn no producer accepted.
pub fn message_bytes(text: &str, attributes: Option<&Attributes>) -> u32 {
    let attributes: usize =
        attributes.map_or(0, |a| a.iter().map(|(k, v)| k.len() + v.len()).sum());
    u32::try_from(text.len() + attributes).unwrap_or(u32::MAX)
}

impl Entry {
    /// What the entry counts toward `max_bytes` (0 for typing and end of turn).
    fn bytes(&self) -> u32 {
        if self.is_message {
            message_bytes(
                &self.id_text[self.id_len as usize..],
                self.attributes.as_deref(),
            )
        } else {
            0
        }
    }
}

fn join_id_text(message_id: &str, text: &str) -> (Box<str>, u32) {
    let mut id_text = String::with_capacity(message_id.len() + text.len());
    id_text.push_str(message_id);
    id_text.push_str(text);
    (id_text.into_boxed_str(), message_id.len() as u32)
}

fn make_entry(event: ChatEvent<'_>, seq: u64) -> Entry {
    let is_message = event.kind == EventKind::Message;
    let (id_text, id_len) = if is_message {
        join_id_text(&event.message_id, &event.text)
    } else {
        (Box::default(), 0)
    };
    Entry {
        time: event.event_time,
        seq,
        id_text,
        attributes: if is_message { event.attributes } else { None },
        id_len,
        is_message,
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
