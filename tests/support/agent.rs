//! A small HTTP agent the tests start on a loopback port: it records every
//! call and answers as the test's `decide` says (a status, with or without
//! `Retry-After`, or no answer until the test releases it). One thread per
//! connection; every answer closes its connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// One call the agent received.
#[derive(Debug, Clone)]
pub struct Call {
    /// Lowercased names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
    /// The status answered; `None` while held or never answered.
    pub answered: Option<u16>,
}

impl Call {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as a JSON turn.
    pub fn turn(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// What the agent answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Status(u16),
    /// A status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// No answer until [`Agent::release`] (then 200).
    Hold,
}

type Decide = dyn Fn(&Call, usize) -> Reply + Send + Sync;

#[derive(Clone)]
pub struct Agent {
    pub port: u16,
    calls: Arc<Mutex<Vec<Call>>>,
    released: Arc<(Mutex<bool>, Condvar)>,
}

impl Agent {
    /// Starts the agent; `decide` gets each call and how many calls with
    /// its `Idempotency-Key` came before it.
    pub fn start(decide: impl Fn(&Call, usize) -> Reply + Send + Sync + 'static) -> Agent {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let agent = Agent {
            port: listener.local_addr().unwrap().port(),
            calls: Arc::default(),
            released: Arc::new((Mutex::new(false), Condvar::new())),
        };
        let decide: Arc<Decide> = Arc::new(decide);
        let server = agent.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (server, decide) = (server.clone(), decide.clone());
                std::thread::spawn(move || server.answer(stream, &*decide));
            }
        });
        agent
    }

    fn answer(&self, mut stream: std::net::TcpStream, decide: &Decide) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = Vec::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let Some((k, v)) = line.trim_end().split_once(':') else {
                break;
            };
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let mut call = Call {
            headers,
            body,
            at: Instant::now(),
            answered: None,
        };
        let index = {
            let mut calls = self.calls.lock().unwrap();
            let before = calls
                .iter()
                .filter(|c| c.header("idempotency-key") == call.header("idempotency-key"))
                .count();
            let reply = decide(&call, before);
            call.answered = match reply {
                Reply::Status(s) | Reply::RetryAfter(s, _) => Some(s),
                Reply::Hold => None,
            };
            calls.push(call.clone());
            (calls.len() - 1, reply)
        };
        let (index, reply) = index;
        let (status, extra) = match reply {
            Reply::Status(s) => (s, String::new()),
            Reply::RetryAfter(s, secs) => (s, format!("retry-after: {secs}\r\n")),
            Reply::Hold => {
                let (lock, released) = &*self.released;
                let mut go = lock.lock().unwrap();
                while !*go {
                    go = released.wait(go).unwrap();
                }
                self.calls.lock().unwrap()[index].answered = Some(200);
                (200, String::new())
            }
        };
        let reply = format!(r#"{{"status":{status}}}"#);
        let _ = write!(
            stream,
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{reply}",
            reply.len()
        );
    }

    /// Answers every held call (and every later `Hold`) with 200.
    pub fn release(&self) {
        let (lock, released) = &*self.released;
        *lock.lock().unwrap() = true;
        released.notify_all();
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}
