//! The session engine of one source partition.
//!
//! A key lives in one partition, so each partition has its own engine, its own
//! watermark and its own sessions: a backlog in one partition never holds back
//! another's turns, and a revoked partition is dropped whole.
//!
//! Turns follow one definition that does not depend on arrival order
//! (`docs/semantics.md`, "Sessions and turns"): per key, the events sorted by
//! event time are chained by their gaps and cut after an end of turn and
//! before a message that would break a cap. The engine keeps each key's
//! events sorted, applies that cut to them, and emits a piece once the
//! watermark has passed everything that could still change it.

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
    /// The largest per-event `gap_ms` honoured; larger ones are clamped.
    pub max_gap_ms: i64,
    /// A turn starting within this of its key's previous turn's last event
    /// names that turn (`previous_turn_id`); `None`: off.
    pub follow_up_ms: Option<i64>,
}

impl WindowConfig {
    /// An event's gap: its own `gap_ms`, clamped to `max_gap`, or `gap`.
    pub fn gap_of(&self, gap_ms: Option<i64>) -> i64 {
        gap_ms.map_or(self.gap_ms, |g| g.clamp(0, self.max_gap_ms))
    }
}

/// Why a record was resolved without output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Its `message_id` was already in its piece (see the module docs).
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

    /// Replaces the text (the redaction stage's rewrite).
    pub fn set_text(&mut self, text: &str) {
        let mut id_text = String::with_capacity(self.id_len as usize + text.len());
        id_text.push_str(self.message_id());
        id_text.push_str(text);
        self.id_text = id_text.into_boxed_str();
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
    /// In event-time order (ties: by message id, then text, then arrival).
    pub messages: Vec<SessionMessage>,
    /// Every record the session absorbed (messages, typing, end of turn).
    pub seqs: Vec<u64>,
    /// With `window.follow_up`: the key's previous turn, when this one
    /// started within `follow_up` of its last event.
    pub previous_turn_id: Option<String>,
    /// Set by the redaction stage between the engine and the output
    /// (`crate::redact`), which also rewrote the texts; the engine leaves it
    /// `None`.
    pub redactions: Option<Vec<crate::model::Redaction>>,
}

/// What became of records. Every record handed to the engine ends in exactly
/// one resolution: inside a turn, a dead letter, or a counted drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Turn(ClosedSession),
    Dropped {
        seq: u64,
        reason: DropReason,
        /// For a duplicate: the record the turn keeps in its place (the
        /// earliest in the piece's order). When that record came first, a
        /// replay that starts after it but at or before this one would see
        /// the duplicate without its original and emit it again, so a source
        /// must not resume between them (see `CompletionTracker::hold`);
        /// when it came later, any replay that sees this one sees it too.
        held_by: Option<u64>,
    },
    /// The record just handed in is a late message under `late = "dlq"`: the
    /// caller, which still holds its bytes, dead-letters it with reason `late`.
    LateDeadLetter {
        seq: u64,
    },
}

/// One event of a key waiting in its sorted buffer. Typing and end-of-turn
/// entries keep their message id (it orders events of the same millisecond)
/// and no text.
#[derive(Debug)]
struct Entry {
    time: i64,
    seq: u64,
    /// `message_id` followed by the text.
    id_text: Box<str>,
    attributes: Option<Box<Attributes>>,
    /// The event's own gap (clamped to `max_gap`) or `window.gap`.
    gap: u32,
    /// Ids are at most 128 bytes (the decoder's bound).
    id_len: u16,
    /// A one-byte hash of the message id: most ids of a piece differ in it,
    /// so the duplicate check rarely compares ids (see [`id_fingerprint`]).
    fingerprint: u8,
    kind: EventKind,
}

impl Entry {
    fn is_message(&self) -> bool {
        self.kind == EventKind::Message
    }

    /// The order of the definition: event time, an end of turn after the
    /// other events of its millisecond, then content (id, text, gap), then
    /// arrival (which only separates exact copies). The strings are only
    /// read for events of the same millisecond.
    fn sorts_before(&self, other: &Entry) -> bool {
        let eot = |e: &Entry| e.kind == EventKind::EndOfTurn;
        (self.time, eot(self))
            .cmp(&(other.time, eot(other)))
            .then_with(|| self.content_key().cmp(&other.content_key()))
            .is_lt()
    }

    /// The end of the event's window: a later event within it chains.
    fn reach(&self) -> i64 {
        self.time.saturating_add(i64::from(self.gap))
    }

    /// What the entry counts toward `max_bytes` (0 for typing and end of
    /// turn). Reads no string byte: the cut runs on every insert, and a
    /// byte of each text would be a cache miss each.
    fn bytes(&self) -> u32 {
        if !self.is_message() {
            return 0;
        }
        message_bytes(
            self.id_text.len() - usize::from(self.id_len),
            self.attributes.as_deref(),
        )
    }

    fn content_key(&self) -> (&[u8], &[u8], u32, u64) {
        let (id, text) = self.id_text.as_bytes().split_at(usize::from(self.id_len));
        (id, text, self.gap, self.seq)
    }

    /// Whether both are messages with the same id; compares the one-byte
    /// fingerprints first, so distinct ids rarely cost a string compare.
    fn same_message(&self, other: &Entry) -> bool {
        self.fingerprint == other.fingerprint
            && self.id_len == other.id_len
            && self.is_message()
            && other.is_message()
            && self.id_text.as_bytes()[..usize::from(self.id_len)]
                == other.id_text.as_bytes()[..usize::from(other.id_len)]
    }
}

/// The first piece of a key's sorted events, as far as they go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    /// How many of the sorted entries it takes.
    len: usize,
    closed_by: ClosedBy,
    /// It is final once the watermark is past this: every event that could
    /// still join it or move its cut is then in.
    deadline: i64,
}

/// One key's events not yet emitted, in [`Entry::sort_key`] order, and what
/// the follow-up link needs of its last turn.
#[derive(Debug)]
struct KeyState {
    /// `user_id` followed by `conversation_id` (empty when absent: a valid
    /// conversation id is never empty).
    key: Box<str>,
    user_len: u32,
    /// The smallest deadline this key has in the engine's heap (`i64::MAX`:
    /// none), so a later, larger deadline needs no new heap entry.
    queued: i64,
    /// The first entry lives inline: most open sessions hold one message, and
    /// this saves them an allocation.
    entries: SmallVec<[Entry; 1]>,
    /// The key's last turn (its id and last event time), while a turn could
    /// still follow it up.
    previous: Option<Box<(String, i64)>>,
}

impl KeyState {
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

    /// Whether an event with window `[time, reach]` chains with any entry.
    fn reached_by(&self, time: i64, reach: i64) -> bool {
        self.entries
            .iter()
            .any(|e| time <= e.reach() && e.time <= reach)
    }
}

#[derive(Debug, Default)]
struct Slot {
    /// Bumped whenever the slot is freed, so stale deadline entries are skipped.
    generation: u32,
    key: Option<KeyState>,
}

/// The keys with events or a follow-up memory in one partition, and its
/// watermark.
///
/// Keys live in a slab; a hash table maps each key to its slot, and a
/// min-heap of `(deadline, slot, generation)` is the ordered index of
/// deadlines, so emitting never scans the keys. A key's deadline only needs a
/// new heap entry when it moves earlier; an entry that comes due early is
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
    /// Keys with events waiting.
    open: usize,
    /// Gaps above `max_gap` clamped so far.
    clamped_gaps: u64,
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
            watermark: WatermarkTracker::new(config.max_out_of_orderness_ms),
            hasher: DefaultHashBuilder::default(),
            by_key: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            deadlines: BinaryHeap::new(),
            open: 0,
            clamped_gaps: 0,
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

    /// Keys with events not yet emitted.
    pub fn open_sessions(&self) -> usize {
        self.open
    }

    /// Per-event gaps above `window.max_gap` clamped so far.
    pub fn clamped_gaps(&self) -> u64 {
        self.clamped_gaps
    }

    /// The earliest event-time deadline of a key: something is emitted once
    /// the watermark exceeds it. Under the idle advance that is at wall clock
    /// `deadline + max_out_of_orderness + 1`. May be early (never late),
    /// which only costs a wake-up.
    pub fn next_deadline(&self) -> Option<i64> {
        self.deadlines.peek().map(|Reverse((d, _, _))| *d)
    }

    /// Hands the engine the next record of the partition (in read order) and
    /// its sequence number; pushes what got resolved to `out`. The event's own
    /// watermark update happens after it has been placed, and everything it
    /// lets out is emitted before this returns, so the result does not depend
    /// on how records are batched.
    pub fn on_event(&mut self, event: ChatEvent<'_>, seq: u64, out: &mut Vec<Resolution>) {
        let t = event.event_time;
        if event.gap_ms.is_some_and(|g| g > self.config.max_gap_ms) {
            self.clamped_gaps += 1;
        }
        let gap = self.config.gap_of(event.gap_ms);
        let reach = t.saturating_add(gap);
        let conversation_id = event.conversation_id.as_deref();
        let hash = key_hash(&self.hasher, &event.user_id, conversation_id.unwrap_or(""));
        let slot = self.find(hash, &event.user_id, conversation_id);
        let reached = slot.is_some_and(|s| self.key(s).reached_by(t, reach));
        if !reached && reach < self.watermark.current() {
            self.on_late(event, seq, out);
        } else {
            let slot = slot.unwrap_or_else(|| self.open_key(hash, &event));
            let fault = crate::fault::panic_marked(&event.text);
            let entry = make_entry(event, seq, gap);
            let entries = &mut self.key_mut(slot).entries;
            let was_empty = entries.is_empty();
            let at = entries.partition_point(|e| e.sorts_before(&entry));
            entries.insert(at, entry);
            if fault {
                panic!("{}: the message holds the marker", crate::fault::PANIC_ENV);
            }
            self.open += usize::from(was_empty);
            self.schedule(slot);
        }
        self.observe(t, reach, out);
    }

    /// Moves the watermark for an event that is not placed in a session (it
    /// belongs to a turn an earlier owner already delivered); emits what that
    /// lets out.
    pub fn observe_event_time(
        &mut self,
        event_time: i64,
        gap_ms: Option<i64>,
        out: &mut Vec<Resolution>,
    ) {
        let reach = event_time.saturating_add(self.config.gap_of(gap_ms));
        self.observe(event_time, reach, out);
    }

    /// The caught-up idle advance (see [`WatermarkTracker::advance_idle`]);
    /// the caller has established with an [`super::IdleClock`] that the
    /// partition is read to its end and quiet.
    pub fn advance_idle(&mut self, now_ms: i64, out: &mut Vec<Resolution>) {
        if self.watermark.advance_idle(now_ms) {
            self.emit_due(out);
        }
    }

    /// End of input: emits every key's pieces, in deadline order, as they
    /// come out once the watermark passes everything (a piece still open is
    /// closed by `gap`, or `max_duration` when its chain reaches past it).
    pub fn flush(&mut self, out: &mut Vec<Resolution>) {
        self.watermark.advance_to_end();
        while let Some(Reverse((_, slot, generation))) = self.deadlines.pop() {
            if self.slots[slot as usize].generation != generation
                || self.slots[slot as usize].key.is_none()
            {
                continue;
            }
            while !self.key(slot).entries.is_empty() {
                let piece = self.first_piece(slot);
                self.emit(slot, piece, out);
            }
            self.release(slot);
        }
    }

    fn observe(&mut self, t: i64, reach: i64, out: &mut Vec<Resolution>) {
        self.watermark.observe(t, reach);
        self.emit_due(out);
    }

    /// Emits every piece the watermark has passed the deadline of.
    fn emit_due(&mut self, out: &mut Vec<Resolution>) {
        let w = self.watermark.current();
        while let Some(&Reverse((deadline, slot, generation))) = self.deadlines.peek() {
            if w <= deadline {
                break;
            }
            self.deadlines.pop();
            let entry = &self.slots[slot as usize];
            let Some(state) = entry
                .key
                .as_ref()
                .filter(|_| entry.generation == generation)
            else {
                continue; // released since
            };
            if state.queued != deadline {
                continue; // superseded by an earlier one
            }
            self.key_mut(slot).queued = i64::MAX;
            loop {
                if self.key(slot).entries.is_empty() {
                    self.schedule(slot);
                    break;
                }
                let piece = self.first_piece(slot);
                if w <= piece.deadline {
                    self.queue(slot, piece.deadline);
                    break;
                }
                self.emit(slot, piece, out);
            }
        }
    }

    /// Queues the key's current deadline, or lets the key go when it has
    /// neither events nor a follow-up memory that matters any more.
    fn schedule(&mut self, slot: u32) {
        let deadline = if self.key(slot).entries.is_empty() {
            match (&self.key(slot).previous, self.config.follow_up_ms) {
                (Some(previous), Some(follow_up)) => {
                    let horizon = previous.1.saturating_add(follow_up);
                    if horizon < self.watermark.current() {
                        self.release(slot);
                        return;
                    }
                    horizon
                }
                _ => {
                    self.release(slot);
                    return;
                }
            }
        } else {
            self.first_piece(slot).deadline
        };
        self.queue(slot, deadline);
    }

    /// Puts the key's deadline in the heap unless an earlier one is there.
    fn queue(&mut self, slot: u32, deadline: i64) {
        let generation = self.slots[slot as usize].generation;
        let state = self.key_mut(slot);
        if deadline < state.queued {
            state.queued = deadline;
            self.deadlines.push(Reverse((deadline, slot, generation)));
        }
    }

    /// Cuts the key's first piece from its sorted entries (see the module
    /// docs): chain while the next event is within the window so far, cut
    /// before a message that would break a cap or an event past
    /// `max_duration`, and right after an end of turn.
    fn first_piece(&mut self, slot: u32) -> Piece {
        let c = self.config;
        let state = self.slots[slot as usize]
            .key
            .as_ref()
            .expect("slot holds a key");
        let entries = &state.entries;
        let start = entries[0].time;
        let duration_end = start.saturating_add(c.max_duration_ms);
        let mut chain_end = i64::MIN;
        let (mut messages, mut bytes) = (0u32, 0u64);
        // A chain that ends by its gap after `max_duration` was final at
        // `max_duration` already.
        let ended = |chain_end: i64| {
            if chain_end <= duration_end {
                (ClosedBy::Gap, chain_end)
            } else {
                (ClosedBy::MaxDuration, duration_end)
            }
        };
        let mut piece = None;
        for (i, e) in entries.iter().enumerate() {
            if i > 0 && e.time > chain_end {
                let (closed_by, deadline) = ended(chain_end);
                piece = Some((i, closed_by, deadline));
                break;
            }
            if e.time > duration_end {
                piece = Some((i, ClosedBy::MaxDuration, duration_end));
                break;
            }
            if e.is_message() {
                // Pieces are short: a scan of the earlier entries costs less
                // than hashing every id on every cut.
                let duplicate = entries[..i].iter().any(|x| x.same_message(e));
                if duplicate {
                    continue; // as if it were not there: it neither counts nor chains
                }
                {
                    if i > 0 && messages >= c.max_messages {
                        piece = Some((i, ClosedBy::MaxMessages, e.time));
                        break;
                    }
                    let b = u64::from(e.bytes());
                    if i > 0 && messages > 0 && bytes + b > u64::from(c.max_bytes) {
                        piece = Some((i, ClosedBy::MaxBytes, e.time));
                        break;
                    }
                    messages += 1;
                    bytes += b;
                }
            }
            chain_end = chain_end.max(e.reach());
            if e.kind == EventKind::EndOfTurn {
                piece = Some((i + 1, ClosedBy::EndOfTurn, e.time));
                break;
            }
        }
        let (len, closed_by, deadline) = piece.unwrap_or_else(|| {
            let (closed_by, deadline) = ended(chain_end);
            (entries.len(), closed_by, deadline)
        });
        Piece {
            len,
            closed_by,
            deadline,
        }
    }

    /// Takes the piece's entries out of the key and emits them: a turn with
    /// its duplicates dropped, or, without a message, drops.
    fn emit(&mut self, slot: u32, piece: Piece, out: &mut Vec<Resolution>) {
        let follow_up = self.config.follow_up_ms;
        let state = self.slots[slot as usize]
            .key
            .as_mut()
            .expect("slot holds a key");
        let piece_entries = &state.entries[..piece.len];
        if !piece_entries.iter().any(Entry::is_message) {
            for entry in state.entries.drain(..piece.len) {
                out.push(Resolution::Dropped {
                    seq: entry.seq,
                    reason: DropReason::NoMessage,
                    held_by: None,
                });
            }
            self.open -= usize::from(state.entries.is_empty());
            return;
        }
        let (start_time, end_time) = (piece_entries[0].time, piece_entries[piece.len - 1].time);
        // A message whose id came earlier in the piece is a duplicate of the
        // first such entry, which the turn keeps: its seq.
        let duplicate: SmallVec<[Option<u64>; 8]> = (0..piece.len)
            .map(|i| {
                piece_entries[..i]
                    .iter()
                    .find(|x| x.same_message(&piece_entries[i]))
                    .map(|x| x.seq)
            })
            .collect();
        let user_id = state.user_id().to_owned();
        let conversation_id = state.conversation_id().map(str::to_owned);
        let mut seqs = Vec::with_capacity(piece.len);
        let mut messages: Vec<SessionMessage> = Vec::with_capacity(piece.len);
        for (e, duplicate) in state.entries.drain(..piece.len).zip(duplicate) {
            if let Some(original) = duplicate {
                out.push(Resolution::Dropped {
                    seq: e.seq,
                    reason: DropReason::Duplicate,
                    held_by: Some(original),
                });
                continue;
            }
            seqs.push(e.seq);
            if e.is_message() {
                messages.push(SessionMessage {
                    event_time: e.time,
                    seq: e.seq,
                    id_text: e.id_text,
                    id_len: u32::from(e.id_len),
                    attributes: e.attributes,
                });
            }
        }
        let emptied = state.entries.is_empty();
        seqs.sort_unstable();
        let mut session = ClosedSession {
            user_id,
            conversation_id,
            start_time,
            end_time,
            closed_by: piece.closed_by,
            late: false,
            messages,
            seqs,
            previous_turn_id: None,
            redactions: None,
        };
        if let Some(follow_up) = follow_up {
            if let Some(previous) = &state.previous {
                if start_time.saturating_sub(previous.1) <= follow_up {
                    session.previous_turn_id = Some(previous.0.clone());
                }
            }
            let id = crate::model::turn_id(
                &session.user_id,
                session.conversation_id.as_deref(),
                session.messages.iter().map(SessionMessage::message_id),
            );
            state.previous = Some(Box::new((id, end_time)));
        }
        self.open -= usize::from(emptied);
        out.push(Resolution::Turn(session));
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
                    previous_turn_id: None,
                    redactions: None,
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

    /// The slot of a key.
    fn find(&self, hash: u64, user_id: &str, conversation_id: Option<&str>) -> Option<u32> {
        self.by_key
            .find(hash, |&slot| {
                self.slots[slot as usize]
                    .key
                    .as_ref()
                    .is_some_and(|s| s.is_key(user_id, conversation_id))
            })
            .copied()
    }

    fn open_key(&mut self, hash: u64, event: &ChatEvent<'_>) -> u32 {
        let mut key = String::with_capacity(
            event.user_id.len() + event.conversation_id.as_ref().map_or(0, |c| c.len()),
        );
        key.push_str(&event.user_id);
        key.push_str(event.conversation_id.as_deref().unwrap_or(""));
        let state = KeyState {
            key: key.into_boxed_str(),
            user_len: event.user_id.len() as u32,
            queued: i64::MAX,
            entries: SmallVec::new(),
            previous: None,
        };
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[slot as usize].key = Some(state);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_key.insert_unique(hash, slot, |&s| {
            let state = slots[s as usize]
                .key
                .as_ref()
                .expect("indexed slots hold keys");
            key_hash(
                hasher,
                state.user_id(),
                state.conversation_id().unwrap_or(""),
            )
        });
        slot
    }

    /// Lets a key with no events go.
    fn release(&mut self, slot: u32) {
        let state = self.slots[slot as usize]
            .key
            .take()
            .expect("releasing a held key");
        debug_assert!(state.entries.is_empty());
        self.slots[slot as usize].generation = self.slots[slot as usize].generation.wrapping_add(1);
        self.free.push(slot);
        let hash = key_hash(
            &self.hasher,
            state.user_id(),
            state.conversation_id().unwrap_or(""),
        );
        if let Ok(entry) = self.by_key.find_entry(hash, |&s| s == slot) {
            entry.remove();
        }
    }

    fn key(&self, slot: u32) -> &KeyState {
        self.slots[slot as usize]
            .key
            .as_ref()
            .expect("slot holds a key")
    }

    fn key_mut(&mut self, slot: u32) -> &mut KeyState {
        self.slots[slot as usize]
            .key
            .as_mut()
            .expect("slot holds a key")
    }
}

/// What a message counts toward `max_bytes`: its text's length and its
/// attributes' keys and values. Attributes count because they go into the
/// turn too: two messages with 600 kB of attributes each made a turn no
/// producer accepted.
pub fn message_bytes(text_len: usize, attributes: Option<&Attributes>) -> u32 {
    let attributes: usize =
        attributes.map_or(0, |a| a.iter().map(|(k, v)| k.len() + v.len()).sum());
    u32::try_from(text_len + attributes).unwrap_or(u32::MAX)
}

fn join_id_text(message_id: &str, text: &str) -> (Box<str>, u32) {
    let mut id_text = String::with_capacity(message_id.len() + text.len());
    id_text.push_str(message_id);
    id_text.push_str(text);
    (id_text.into_boxed_str(), message_id.len() as u32)
}

fn make_entry(event: ChatEvent<'_>, seq: u64, gap: i64) -> Entry {
    let is_message = event.kind == EventKind::Message;
    let text = if is_message { &event.text[..] } else { "" };
    let (id_text, id_len) = join_id_text(&event.message_id, text);
    Entry {
        time: event.event_time,
        seq,
        fingerprint: id_fingerprint(&event.message_id),
        id_text,
        attributes: if is_message { event.attributes } else { None },
        id_len: u16::try_from(id_len).expect("message ids are at most 128 bytes"),
        gap: u32::try_from(gap).unwrap_or(u32::MAX),
        kind: event.kind,
    }
}

/// FNV-1a over the id, folded to a byte.
fn id_fingerprint(id: &str) -> u8 {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (h ^ (h >> 8) ^ (h >> 16) ^ (h >> 24)) as u8
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
