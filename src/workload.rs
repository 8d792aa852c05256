//! A deterministic generator of bursty chat traffic: users who send a few
//! messages close together, then go quiet; arrival order disordered by less
//! than a bound; optional duplicates (producer retries) and poison records.
//! Benchmarks, tests and the load generator use it, so they all measure the
//! same kind of input.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// What traffic to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    pub users: u32,
    /// Messages per burst, inclusive range.
    pub burst_messages: (u32, u32),
    /// Event-time gap between messages of a burst (ms), inclusive range.
    pub in_burst_gap_ms: (i64, i64),
    /// Event-time gap between a user's bursts (ms), inclusive range.
    pub between_bursts_ms: (i64, i64),
    /// Arrival delay after event time, uniformly below this (ms): the arrival
    /// disorder. Keep it below `max_out_of_orderness` for no late events.
    pub disorder_ms: i64,
    /// Fraction of messages sent twice (a producer retry).
    pub duplicate_fraction: f64,
    /// Fraction of records that are poison (invalid JSON, missing fields,
    /// oversize text).
    pub poison_fraction: f64,
    /// Fraction of bursts that end with an `end_of_turn` event, stamped 5 ms
    /// after the burst's last message (a send button) and arriving with the
    /// same disorder, so it can overtake that message.
    pub end_of_turn_fraction: f64,
    /// Event time of the first burst (epoch ms).
    pub start_ms: i64,
    pub seed: u64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            users: 20_000,
            burst_messages: (1, 6),
            in_burst_gap_ms: (200, 2_000),
            between_bursts_ms: (5_000, 60_000),
            disorder_ms: 400,
            duplicate_fraction: 0.0,
            poison_fraction: 0.0,
            end_of_turn_fraction: 0.0,
            start_ms: 1_700_000_000_000,
            seed: 42,
        }
    }
}

/// One generated record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedRecord {
    /// The record key (the user id; poison records keep one too).
    pub user: u32,
    pub event_time: i64,
    /// When it arrives (≥ event time, < event time + disorder).
    pub arrival: i64,
    /// JSON bytes.
    pub payload: Vec<u8>,
    pub poison: bool,
    pub duplicate: bool,
}

/// A small, fast, seedable PRNG (SplitMix64): deterministic across platforms.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in the inclusive range.
    pub fn range(&mut self, (lo, hi): (i64, i64)) -> i64 {
        lo + (self.next_u64() % ((hi - lo) as u64 + 1)) as i64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - p
    }
}

const WORDS: &[&str] = &[
    "hi", "hello", "quick", "question", "my", "order", "never", "arrived", "can", "you", "check",
    "the", "status", "please", "thanks", "refund", "when", "will", "it", "ship",
];

/// Generates records in arrival order, without end (take what you need).
#[derive(Debug)]
pub struct Workload {
    spec: WorkloadSpec,
    rng: SplitMix64,
    /// Per user: (next event time, messages left in the current burst, burst number, message number).
    users: Vec<(i64, u32, u32, u32)>,
    /// Users by next event time.
    next: BinaryHeap<Reverse<(i64, u32)>>,
    /// Generated records waiting for their arrival time, by arrival.
    pending: BinaryHeap<Reverse<(i64, u64)>>,
    pending_records: std::collections::HashMap<u64, GeneratedRecord>,
    counter: u64,
}

impl Workload {
    pub fn new(spec: WorkloadSpec) -> Self {
        let mut rng = SplitMix64::new(spec.seed);
        let mut users = Vec::with_capacity(spec.users as usize);
        let mut next = BinaryHeap::with_capacity(spec.users as usize);
        for user in 0..spec.users {
            // Spread the first bursts over one between-burst interval.
            let t = spec.start_ms + rng.range((0, spec.between_bursts_ms.1));
            let burst =
                rng.range((spec.burst_messages.0 as i64, spec.burst_messages.1 as i64)) as u32;
            users.push((t, burst, 0, 0));
            next.push(Reverse((t, user)));
        }
        Workload {
            spec,
            rng,
            users,
            next,
            pending: BinaryHeap::new(),
            pending_records: std::collections::HashMap::new(),
            counter: 0,
        }
    }

    /// The next event of some user in event-time order, with its arrival time.
    fn generate(&mut self) {
        let Reverse((t, user)) = self.next.pop().expect("users never run out");
        let (_, left, burst, number) = self.users[user as usize];
        let message_id = format!("u{user}-b{burst}-m{number}");
        let poison = self.rng.chance(self.spec.poison_fraction);
        let payload = if poison {
            self.poison(user, &message_id, t)
        } else {
            let words = 2 + (self.rng.next_u64() % 8) as usize;
            let mut text = String::new();
            for i in 0..words {
                if i > 0 {
                    text.push(' ');
                }
                text.push_str(WORDS[(self.rng.next_u64() % WORDS.len() as u64) as usize]);
            }
            format!(r#"{{"message_id":"{message_id}","user_id":"user-{user}","text":"{text}","event_time":{t}}}"#).into_bytes()
        };
        let duplicate = !poison && self.rng.chance(self.spec.duplicate_fraction);
        let copies = if duplicate { 2 } else { 1 };
        for copy in 0..copies {
            let arrival = t + self.rng.range((0, (self.spec.disorder_ms - 1).max(0)));
            let record = GeneratedRecord {
                user,
                event_time: t,
                arrival,
                payload: payload.clone(),
                poison,
                duplicate: copy == 1,
            };
            self.counter += 1;
            self.pending.push(Reverse((arrival, self.counter)));
            self.pending_records.insert(self.counter, record);
        }
        if left == 1
            && !poison
            && self.spec.end_of_turn_fraction > 0.0
            && self.rng.chance(self.spec.end_of_turn_fraction)
        {
            let end = t + 5;
            let record = GeneratedRecord {
                user,
                event_time: end,
                arrival: end + self.rng.range((0, (self.spec.disorder_ms - 1).max(0))),
                payload: format!(r#"{{"message_id":"{message_id}-end","user_id":"user-{user}","kind":"end_of_turn","event_time":{end}}}"#).into_bytes(),
                poison: false,
                duplicate: false,
            };
            self.counter += 1;
            self.pending.push(Reverse((record.arrival, self.counter)));
            self.pending_records.insert(self.counter, record);
        }
        // Schedule the user's next message.
        let state = &mut self.users[user as usize];
        let (next_t, next_left, next_burst, next_number) = if left > 1 {
            (
                t + self.rng.range(self.spec.in_burst_gap_ms),
                left - 1,
                burst,
                number + 1,
            )
        } else {
            let burst_len = self.rng.range((
                self.spec.burst_messages.0 as i64,
                self.spec.burst_messages.1 as i64,
            )) as u32;
            (
                t + self.rng.range(self.spec.between_bursts_ms),
                burst_len,
                burst + 1,
                0,
            )
        };
        *state = (next_t, next_left, next_burst, next_number);
        self.next.push(Reverse((next_t, user)));
    }

    fn poison(&mut self, user: u32, message_id: &str, t: i64) -> Vec<u8> {
        match self.rng.next_u64() % 3 {
            0 => format!(r#"{{"message_id":"{message_id}","user_id":"user-{user}","text":"unterminated"#).into_bytes(),
            1 => format!(r#"{{"message_id":"{message_id}","user_id":"user-{user}","event_time":{t}}}"#).into_bytes(),
            _ => format!(r#"{{"message_id":"{message_id}","user_id":"user-{user}","text":"{}","event_time":{t}}}"#, "x".repeat(20_000)).into_bytes(),
        }
    }
}

impl Iterator for Workload {
    type Item = GeneratedRecord;

    /// Records in arrival order: a record is released once no event still to
    /// be generated can arrive before it.
    fn next(&mut self) -> Option<GeneratedRecord> {
        loop {
            let earliest_unseen = self
                .next
                .peek()
                .map(|Reverse((t, _))| *t)
                .unwrap_or(i64::MAX);
            if let Some(&Reverse((arrival, id))) = self.pending.peek() {
                if arrival < earliest_unseen {
                    self.pending.pop();
                    return self.pending_records.remove(&id);
                }
            }
            self.generate();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrival_order_with_bounded_disorder_and_requested_fractions() {
        let spec = WorkloadSpec {
            users: 50,
            duplicate_fraction: 0.1,
            poison_fraction: 0.05,
            ..WorkloadSpec::default()
        };
        let records: Vec<_> = Workload::new(spec.clone()).take(20_000).collect();
        assert!(
            records.windows(2).all(|w| w[0].arrival <= w[1].arrival),
            "arrival order"
        );
        let mut max_seen = i64::MIN;
        for r in &records {
            assert!(r.arrival - r.event_time < spec.disorder_ms);
            assert!(
                max_seen.saturating_sub(r.event_time) < spec.disorder_ms,
                "disorder below the bound"
            );
            max_seen = max_seen.max(r.event_time);
        }
        let poison = records.iter().filter(|r| r.poison).count() as f64 / records.len() as f64;
        let dups = records.iter().filter(|r| r.duplicate).count() as f64 / records.len() as f64;
        assert!((0.03..0.07).contains(&poison), "poison fraction {poison}");
        assert!((0.07..0.12).contains(&dups), "duplicate fraction {dups}");
        let again: Vec<_> = Workload::new(spec).take(100).collect();
        assert_eq!(&records[..100], &again[..], "deterministic");
    }
}
