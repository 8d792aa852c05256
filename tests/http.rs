//! The worker's HTTP surface (`sessionizer::http`), served in this process on
//! a free loopback port and driven by a real client over TCP.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use sessionizer::metrics::{self as m, READINESS};
use support::{free_port, http_get, metric};

/// One raw exchange: `request` as written, the whole response as read.
fn exchange(port: u16, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_answer_with_their_codes_and_bad_clients_cost_only_themselves() {
    let port = free_port();
    let bound = sessionizer::http::serve(([127, 0, 0, 1], port).into())
        .await
        .unwrap();
    assert_eq!(bound.port(), port);
    // The port is taken now: a second server fails at start, naming the key.
    let taken = sessionizer::http::serve(bound).await.unwrap_err();
    assert!(format!("{taken:#}").contains("metrics.listen"), "{taken:#}");

    let checks = tokio::task::spawn_blocking(move || {
        assert_eq!(http_get(port, "/healthz"), Some((200, "ok\n".to_owned())));

        // Not ready until connected, with partitions, and nothing failing.
        let (status, body) = http_get(port, "/readyz").unwrap();
        assert_eq!(status, 503);
        assert!(body.contains("not connected"), "{body}");
        READINESS.set_connected(true);
        READINESS.cause("Subscribed topic not available: chat");
        let (status, body) = http_get(port, "/readyz").unwrap();
        assert_eq!(
            (status, body.contains("no partitions")),
            (503, true),
            "{body}"
        );
        assert!(
            body.contains("last broker error: Subscribed topic not available: chat"),
            "the cause beside what is missing: {body}"
        );
        READINESS.set_owned(2);
        assert_eq!(
            http_get(port, "/readyz"),
            Some((200, "ready: 2 owned\n".to_owned())),
            "a stale cause is not shown once ready"
        );
        READINESS.set_owned(0);
        let (_, body) = http_get(port, "/readyz").unwrap();
        assert!(!body.contains("last broker error"), "cleared: {body}");
        READINESS.set_owned(2);

        m::commit(true);
        let (status, body) = http_get(port, "/metrics").unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            metric(&body, m::COMMITS, &[("result", "ok")]),
            1.0,
            "{body}"
        );
        let head = exchange(
            port,
            b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );

        assert_eq!(http_get(port, "/nowhere").map(|(s, _)| s), Some(404));
        let post = exchange(
            port,
            b"POST /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let garbage = exchange(port, b"\x00\x01 not http at all\r\n\r\n");
        assert!(
            garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
            "{garbage}"
        );

        // A client that sends half a request and stalls holds its own
        // connection only: others are answered meanwhile.
        let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
        slow.write_all(b"GET /heal").unwrap();
        let idle: Vec<TcpStream> = (0..50)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        assert_eq!(http_get(port, "/healthz"), Some((200, "ok\n".to_owned())));
        drop((slow, idle));
        assert_eq!(http_get(port, "/healthz"), Some((200, "ok\n".to_owned())));
    });
    checks.await.unwrap();
}
