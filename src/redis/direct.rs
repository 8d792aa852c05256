//! A shard task's own connection to one Redis node over plain TCP, with a
//! hand-written RESP2 reader.
//!
//! Why: a shard's fenced step returns a whole batch of stream entries
//! (`[[id, [field, value]], …]`, five values an entry). The redis crate's
//! reader (parser combinators over a multiplexed connection driven by its own
//! task) took about a fifth of the worker's CPU in `cargo bench --bench
//! redis`; this reader walks the bytes once. It builds the same
//! [`redis::Value`]s, so the shard code is the same on either connection, and
//! a test holds it to the crate's parser on the same bytes.
//!
//! Scope: one node, `redis://` (TLS and Cluster connections keep the redis
//! crate's, see [`super::connection`]). Requests are whole pipelines written
//! at once, replies read in order; any I/O error or timeout drops the socket
//! (its state is unknown) and the next request connects again, as the
//! crate's `ConnectionManager` does, so the shard's retry paths see the same
//! errors.

use std::time::Duration;

use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

/// One socket, reconnected on demand.
#[derive(Debug)]
pub struct DirectConn {
    target: Target,
    /// The longest a request may take (a blocking read's block time and
    /// then some).
    timeout: Duration,
    socket: Option<TcpStream>,
    /// A request was started and not finished: its caller dropped it (a
    /// `select!` took another branch), so its reply may still come; the
    /// socket is replaced before the next request.
    in_flight: bool,
    /// Bytes read and not yet parsed.
    buffer: Vec<u8>,
}

impl DirectConn {
    /// Connects at once, so a wrong address or password fails here.
    pub async fn connect(target: Target, timeout: Duration) -> RedisResult<DirectConn> {
        let mut conn = DirectConn {
            target,
            timeout,
            socket: None,
            in_flight: false,
            buffer: Vec::with_capacity(64 * 1024),
        };
        conn.ensure_connected().await?;
        Ok(conn)
    }

    async fn ensure_connected(&mut self) -> RedisResult<()> {
        if self.socket.is_some() {
            return Ok(());
        }
        let t = &self.target;
        let socket = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect((t.host.as_str(), t.port)),
        )
        .await
        .map_err(|_| timed_out("connecting"))??;
        socket.set_nodelay(true)?;
        self.socket = Some(socket);
        self.buffer.clear();
        let mut hello = redis::pipe();
        if let Some(password) = &t.password {
            let auth = hello.cmd("AUTH");
            if let Some(user) = &t.username {
                auth.arg(user);
            }
            auth.arg(password);
        }
        if t.db != 0 {
            hello.cmd("SELECT").arg(t.db);
        }
        if !hello.is_empty() {
            let replies = self
                .round_trip(&hello.get_packed_pipeline(), hello.len())
                .await?;
            for reply in replies {
                if let Value::ServerError(e) = reply {
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Writes `packed` and reads `count` replies, connecting first when
    /// needed. Drops the socket on any failure, or when the previous
    /// request (or handshake) was abandoned halfway.
    async fn request(&mut self, packed: &[u8], count: usize) -> RedisResult<Vec<Value>> {
        if std::mem::take(&mut self.in_flight) {
            self.socket = None;
        }
        self.in_flight = true;
        let result = match self.ensure_connected().await {
            Ok(()) => self.round_trip(packed, count).await,
            Err(e) => Err(e),
        };
        self.in_flight = false;
        if result.is_err() {
            self.socket = None;
        }
        result
    }

    async fn round_trip(&mut self, packed: &[u8], count: usize) -> RedisResult<Vec<Value>> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.write_and_read(packed, count))
            .await
            .map_err(|_| timed_out("waiting for a reply"))?
    }

    async fn write_and_read(&mut self, packed: &[u8], count: usize) -> RedisResult<Vec<Value>> {
        let socket = self.socket.as_mut().expect("connected");
        socket.write_all(packed).await?;
        let mut replies = Vec::with_capacity(count);
        let mut at = 0;
        while replies.len() < count {
            match parse(&self.buffer[at..])? {
                Some((value, used)) => {
                    replies.push(value);
                    at += used;
                }
                None => {
                    self.buffer.drain(..at);
                    at = 0;
                    if self.buffer.capacity() - self.buffer.len() < 16 * 1024 {
                        self.buffer.reserve(64 * 1024);
                    }
                    if socket.read_buf(&mut self.buffer).await? == 0 {
                        return Err(RedisError::from(std::io::Error::from(
                            std::io::ErrorKind::UnexpectedEof,
                        )));
                    }
                }
            }
        }
        self.buffer.drain(..at);
        Ok(replies)
    }
}

fn timed_out(what: &str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("redis: timed out {what}"),
    ))
}

impl redis::aio::ConnectionLike for DirectConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut replies = self.request(&cmd.get_packed_command(), 1).await?;
            Ok(replies.pop().expect("one reply"))
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut replies = self
                .request(&cmd.get_packed_pipeline(), offset + count)
                .await?;
            replies.drain(..offset);
            Ok(replies)
        })
    }

    fn get_db(&self) -> i64 {
        self.target.db
    }
}

/// Parses one RESP2 reply at the start of `bytes`: the value and the bytes
/// it took, or `None` when `bytes` does not hold all of it yet. Error
/// replies (rare) go through the redis crate's parser, which knows their
/// kinds.
pub fn parse(bytes: &[u8]) -> RedisResult<Option<(Value, usize)>> {
    // A reply that came in several reads is checked for completeness (no
    // allocation) on each read and built once.
    let mut at = 0;
    if value(bytes, &mut at, false)?.is_none() {
        return Ok(None);
    }
    at = 0;
    Ok(value(bytes, &mut at, true)?.map(|v| (v, at)))
}

/// The value at `at`, or with `build` false only whether it is complete
/// (then every value is `Nil`).
fn value(bytes: &[u8], at: &mut usize, build: bool) -> RedisResult<Option<Value>> {
    let start = *at;
    let Some(line) = line(bytes, at) else {
        return Ok(None);
    };
    let (&kind, rest) = line
        .split_first()
        .ok_or_else(|| protocol("an empty line"))?;
    Ok(Some(match kind {
        b'$' => {
            let len = integer(rest)?;
            if len < 0 {
                return Ok(Some(Value::Nil));
            }
            let len = len as usize;
            let end = *at + len;
            if bytes.len() < end + 2 {
                return Ok(None);
            }
            if &bytes[end..end + 2] != b"\r\n" {
                return Err(protocol("a bulk string without its CRLF"));
            }
            let data = &bytes[*at..end];
            *at = end + 2;
            if !build {
                return Ok(Some(Value::Nil));
            }
            Value::BulkString(data.to_vec())
        }
        b'*' => {
            let len = integer(rest)?;
            if len < 0 {
                return Ok(Some(Value::Nil));
            }
            let mut items = Vec::with_capacity(if build { (len as usize).min(4096) } else { 0 });
            for _ in 0..len {
                match value(bytes, at, build)? {
                    Some(v) if build => items.push(v),
                    Some(_) => {}
                    None => return Ok(None),
                }
            }
            Value::Array(items)
        }
        b':' => Value::Int(integer(rest)?),
        b'+' => match rest {
            b"OK" => Value::Okay,
            _ => Value::SimpleString(String::from_utf8_lossy(rest).into_owned()),
        },
        b'-' if build => redis::parse_redis_value(&bytes[start..*at])?,
        b'-' => Value::Nil,
        other => {
            return Err(protocol(&format!(
                "a RESP2 reply, got type byte {:?}",
                other as char
            )))
        }
    }))
}

/// The line at `at` without its CRLF; moves `at` past it.
fn line<'a>(bytes: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let from = *at;
    let cr = bytes[from..].iter().position(|&b| b == b'\r')? + from;
    if bytes.len() < cr + 2 {
        return None;
    }
    *at = cr + 2;
    Some(&bytes[from..cr])
}

fn integer(digits: &[u8]) -> RedisResult<i64> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| protocol("an integer"))
}

fn protocol(expected: &str) -> RedisError {
    RedisError::from((
        ErrorKind::ParseError,
        "invalid RESP reply",
        format!("expected {expected}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replies of every kind the worker meets, as Redis writes them.
    const REPLIES: &[&[u8]] = &[
        b"+OK\r\n",
        b"+QUEUED\r\n",
        b":42\r\n",
        b":-1\r\n",
        b"$-1\r\n",
        b"*-1\r\n",
        b"$0\r\n\r\n",
        b"$5\r\nhe\r\no\r\n",
        b"*0\r\n",
        b"-ERR unknown command\r\n",
        b"-EXECABORT Transaction discarded\r\n",
        b"-MOVED 3999 127.0.0.1:6381\r\n",
        b"*2\r\n*2\r\n$5\r\nchat0\r\n*2\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$7\r\npayload\r\n$2\r\n{}\r\n*2\r\n$3\r\n2-0\r\n*-1\r\n:1\r\n",
    ];

    #[test]
    fn replies_parse_as_the_redis_crate_parses_them() {
        for reply in REPLIES {
            let ours = parse(reply).unwrap().expect("complete");
            let theirs = redis::parse_redis_value(reply).unwrap();
            assert_eq!(ours.0, theirs, "{}", String::from_utf8_lossy(reply));
            assert_eq!(ours.1, reply.len());
        }
    }

    #[test]
    fn a_reply_cut_anywhere_asks_for_more_and_back_to_back_replies_split() {
        for reply in REPLIES {
            for cut in 0..reply.len() {
                assert!(
                    parse(&reply[..cut]).unwrap().is_none(),
                    "{} cut at {cut}",
                    String::from_utf8_lossy(reply)
                );
            }
        }
        let both = [REPLIES[2], REPLIES[12]].concat();
        let (first, used) = parse(&both).unwrap().unwrap();
        assert_eq!(first, Value::Int(42));
        let (second, rest) = parse(&both[used..]).unwrap().unwrap();
        assert_eq!(used + rest, both.len());
        assert!(matches!(second, Value::Array(_)));
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        assert!(parse(b"?what\r\n").is_err());
        assert!(parse(b"$2\r\nabcd\r\n").is_err());
        assert!(parse(b":x\r\n").is_err());
    }
}
