//! One turn's delivery: POSTs with `Idempotency-Key: <turn_id>`, retried on
//! 408, 429, 5xx, connection errors and timeouts with exponential backoff and
//! jitter (`Retry-After` in seconds honoured), until `max_attempts` or
//! `max_elapsed`; any other status but 2xx is a rejection at once
//! (`docs/push.md`).

use std::time::{Duration, Instant};

use axum::http::header;

use super::config::PushSection;

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The agent answered 2xx.
    Delivered { status: u16, attempts: u32 },
    /// A status that is not retried (3xx, 4xx but 408 and 429).
    Rejected {
        status: u16,
        body: String,
        attempts: u32,
    },
    /// Retried until the bounds: the last status (none when the last
    /// attempt got no answer) and body or error.
    Failed {
        status: Option<u16>,
        body: String,
        attempts: u32,
    },
    /// Stopped at shutdown before an outcome: not acked, delivered again
    /// by the next run.
    Abandoned,
}

/// What one attempt's answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Success,
    Retry,
    Reject,
}

pub fn classify(status: u16) -> Class {
    match status {
        200..=299 => Class::Success,
        408 | 429 | 500..=599 => Class::Retry,
        _ => Class::Reject,
    }
}

/// The status class a metric labels an answer with.
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
        None => "error",
    }
}

/// The retry schedule of `[push]`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub max_attempts: u32,
    pub max_elapsed: Duration,
}

impl Backoff {
    pub fn of(section: &PushSection) -> Backoff {
        Backoff {
            first: section.backoff.as_duration(),
            max: section.max_backoff.as_duration(),
            max_attempts: section.max_attempts,
            max_elapsed: section.max_elapsed.as_duration(),
        }
    }

    /// The wait before attempt `attempts + 1`, or `None` when the bounds
    /// are reached. `jitter` in [0, 1) picks the point of the full-jitter
    /// window `[delay / 2, delay]`; a `Retry-After` replaces the delay (but
    /// not the bounds).
    pub fn next(
        &self,
        attempts: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        if attempts >= self.max_attempts {
            return None;
        }
        let delay = retry_after
            .map(|d| d.min(self.max_elapsed))
            .unwrap_or_else(|| {
                let doubled = self
                    .first
                    .saturating_mul(1 << attempts.saturating_sub(1).min(20));
                let delay = doubled.min(self.max);
                delay / 2 + delay.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
            });
        (elapsed.saturating_add(delay) <= self.max_elapsed).then_some(delay)
    }
}

/// A number in [0, 1) from the standard library's random hasher keys.
fn jitter() -> f64 {
    use std::hash::BuildHasher;
    let bits = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// `Retry-After` in seconds (an HTTP date is not honoured: the backoff
/// applies).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

/// The most of an answer's body kept (for the dead letter); the rest is
/// not read.
const EXCERPT: usize = 512;

/// The first [`EXCERPT`] bytes of an answer's body.
async fn excerpt(mut response: reqwest::Response) -> Result<String, reqwest::Error> {
    let mut kept = Vec::new();
    while kept.len() < EXCERPT {
        match response.chunk().await? {
            Some(chunk) => kept.extend_from_slice(&chunk[..chunk.len().min(EXCERPT - kept.len())]),
            None => break,
        }
    }
    Ok(String::from_utf8_lossy(&kept).into_owned())
}

/// The agent's endpoint and how to call it.
#[derive(Debug, Clone)]
pub struct Deliverer {
    client: reqwest::Client,
    url: String,
    headers: Vec<(String, String)>,
    content_type: &'static str,
    backoff: Backoff,
}

impl Deliverer {
    pub fn new(section: &PushSection, content_type: &'static str) -> anyhow::Result<Deliverer> {
        use anyhow::Context as _;
        Ok(Deliverer {
            client: reqwest::Client::builder()
                .timeout(section.timeout.as_duration())
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .context("building the push HTTP client")?,
            url: section.url.clone(),
            headers: section
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            content_type,
            backoff: Backoff::of(section),
        })
    }

    /// Delivers one turn; `stopping` resolving abandons it between
    /// attempts (an attempt in progress is left to finish or time out).
    pub async fn deliver(
        &self,
        turn_id: &str,
        body: &[u8],
        stopping: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Verdict {
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut request = self
                .client
                .post(&self.url)
                .header(header::CONTENT_TYPE, self.content_type)
                .header("idempotency-key", turn_id)
                .body(body.to_vec());
            for (name, value) in &self.headers {
                request = request.header(name, value);
            }
            let call = Instant::now();
            let answer = async {
                let response = request.send().await?;
                let status = response.status().as_u16();
                let wait = retry_after(response.headers());
                Ok::<_, reqwest::Error>((status, wait, excerpt(response).await?))
            }
            .await;
            let (status, wait, text) = match answer {
                Ok((status, wait, body)) => (Some(status), wait, body),
                Err(e) => (None, None, format!("{e}")),
            };
            crate::metrics::push_attempt(status_class(status), call.elapsed());
            match status.map(classify) {
                Some(Class::Success) => {
                    return Verdict::Delivered {
                        status: status.unwrap_or_default(),
                        attempts,
                    }
                }
                Some(Class::Reject) => {
                    return Verdict::Rejected {
                        status: status.unwrap_or_default(),
                        body: text,
                        attempts,
                    }
                }
                Some(Class::Retry) | None => {}
            }
            let Some(delay) = self
                .backoff
                .next(attempts, started.elapsed(), wait, jitter())
            else {
                return Verdict::Failed {
                    status,
                    body: text,
                    attempts,
                };
            };
            if *stopping.borrow() {
                return Verdict::Abandoned;
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stopping.wait_for(|s| *s) => return Verdict::Abandoned,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_delivered_retried_or_rejected() {
        assert_eq!(classify(200), Class::Success);
        assert_eq!(classify(204), Class::Success);
        for retried in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(classify(retried), Class::Retry, "{retried}");
        }
        for rejected in [301, 400, 401, 403, 404, 409, 413, 422] {
            assert_eq!(classify(rejected), Class::Reject, "{rejected}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_stops_at_its_bounds() {
        let b = Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_millis(1_000),
            max_attempts: 6,
            max_elapsed: Duration::from_secs(10),
        };
        let at = |attempts, jitter| b.next(attempts, Duration::ZERO, None, jitter).unwrap();
        // Attempt n waits within [d/2, d], d = 100 ms · 2^(n-1), capped.
        assert_eq!(at(1, 0.0), Duration::from_millis(50));
        assert_eq!(at(1, 0.5), Duration::from_millis(75));
        assert_eq!(at(2, 0.0), Duration::from_millis(100));
        assert_eq!(at(3, 0.0), Duration::from_millis(200));
        assert_eq!(at(5, 0.0), Duration::from_millis(500), "capped at max");
        assert_eq!(b.next(6, Duration::ZERO, None, 0.0), None, "max_attempts");
        let late = Duration::from_millis(9_990);
        assert_eq!(b.next(1, late, None, 0.0), None, "max_elapsed");
        // Retry-After replaces the delay, within the same bounds, and an
        // absurd one neither overflows nor waits past them.
        let after = Some(Duration::from_secs(3));
        assert_eq!(b.next(1, Duration::ZERO, after, 0.5), after);
        assert_eq!(b.next(1, Duration::from_secs(8), after, 0.5), None);
        let absurd = Some(Duration::from_secs(u64::MAX));
        assert_eq!(b.next(1, Duration::from_secs(1), absurd, 0.5), None);
        assert_eq!(b.next(1, Duration::ZERO, absurd, 0.5), Some(b.max_elapsed));
    }

    #[test]
    fn jitter_is_in_the_unit_interval() {
        for _ in 0..1_000 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }
}
