//! The HTTP long-poll transport against a real listener: the contract documented in README
//! ("Long-poll transport"), retries, limits, expiry, CORS, and what reaches `Peer`.

mod support;

use ferry::config::Config;
use ferry::peer::Peer;
use ferry::transports::http::ServeOptions;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::net::{connect_client, HttpResponse, Running, WAIT};

/// A short hold so that polls with nothing to say answer quickly.
const TEST_HOLD_MS: u64 = 300;

fn config() -> Config {
    let mut config = Config::demo();
    config.long_poll.poll_hold_ms = TEST_HOLD_MS;
    config.long_poll.session_expiry_ms = 5_000;
    config
}

async fn start(config: Config) -> Running {
    Running::start_with(config, ServeOptions::default()).await
}

/// One long-poll session driven by hand.
struct Lp<'a> {
    server: &'a Running,
    id: String,
    /// The number of the next frame this client sends.
    seq: u64,
    /// Frames received so far (the next poll's `ack`).
    ack: u64,
}

impl<'a> Lp<'a> {
    async fn open(server: &'a Running) -> Lp<'a> {
        let response = server.http("POST", "/lp/open", &[], "").await;
        assert_eq!(response.status, 200, "{response:?}");
        let id = response.json()["session"]
            .as_str()
            .expect("a session id")
            .to_owned();
        Lp {
            server,
            id,
            seq: 1,
            ack: 0,
        }
    }

    /// Sends `frames` numbered from `seq` without moving this client's own numbering.
    async fn send_at(&self, seq: u64, frames: &[&str]) -> HttpResponse {
        let body = json!({ "seq": seq, "messages": frames }).to_string();
        let path = format!("/lp/{}/send", self.id);
        self.server.http("POST", &path, &[], &body).await
    }

    /// Sends the next frames and expects them all received.
    async fn send(&mut self, frames: &[&str]) {
        let response = self.send_at(self.seq, frames).await;
        assert_eq!(response.status, 200, "{response:?}");
        self.seq += frames.len() as u64;
        assert_eq!(response.json()["received"], json!(self.seq - 1));
    }

    async fn poll_raw(&self, ack: u64) -> HttpResponse {
        let path = format!("/lp/{}/poll?ack={ack}", self.id);
        self.server.http("GET", &path, &[], "").await
    }

    /// One poll acknowledging what was received; returns the new frames and `closed`.
    async fn poll(&mut self) -> (Vec<String>, bool) {
        let response = self.poll_raw(self.ack).await;
        assert_eq!(response.status, 200, "{response:?}");
        let body = response.json();
        assert_eq!(body["first"], json!(self.ack + 1), "{body}");
        let frames: Vec<String> = body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|frame| frame.as_str().expect("a frame's text").to_owned())
            .collect();
        self.ack += frames.len() as u64;
        (frames, body["closed"] == json!(true))
    }

    /// Polls until a frame starting with `prefix` arrives; returns every frame up to it.
    async fn poll_until(&mut self, prefix: &str) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            let (frames, closed) = self.poll().await;
            seen.extend(frames);
            if seen.iter().any(|frame| frame.starts_with(prefix)) {
                return seen;
            }
            assert!(!closed, "closed before {prefix}: {seen:?}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {prefix} in {seen:?}"
            );
        }
    }

    async fn handshake(&mut self, node: &str) {
        let connect = format!(r#"["connect",5,"{node}",0,{{"token":"t","subprotocol":1}}]"#);
        self.send(&[&connect]).await;
        let frames = self.poll_until(r#"["connected""#).await;
        assert_eq!(frames[0], r#"["headers",{"env":"development"}]"#);
    }
}

fn rejections(server: &Running, reason: &str) -> f64 {
    server
        .server
        .metrics
        .rejections
        .with_label_values(&[reason])
        .get() as f64
}

#[tokio::test]
async fn open_send_poll_close_round_trip_with_a_logux_handshake() {
    let server = start(config()).await;
    let response = server.http("POST", "/lp/open", &[], "").await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.header("cache-control"), Some("no-store"));
    let body = response.json();
    assert_eq!(body["hold_ms"], json!(TEST_HOLD_MS));
    assert_eq!(body["expiry_ms"], json!(5_000));
    assert_eq!(server.server.metrics.long_poll_sessions.get(), 1);
    let mut lp = Lp {
        server: &server,
        id: body["session"].as_str().expect("id").to_owned(),
        seq: 1,
        ack: 0,
    };
    lp.handshake("10:lp:tab").await;
    lp.send(&[r#"["ping",0]"#]).await;
    assert_eq!(lp.poll_until(r#"["pong""#).await, [r#"["pong",0]"#]);
    // An array instead of a string is sent as its JSON text.
    let body = json!({ "seq": lp.seq, "messages": [["ping", 0]] }).to_string();
    let path = format!("/lp/{}/send", lp.id);
    assert_eq!(server.http("POST", &path, &[], &body).await.status, 200);
    lp.seq += 1;
    assert_eq!(lp.poll_until(r#"["pong""#).await, [r#"["pong",0]"#]);

    let path = format!("/lp/{}/close", lp.id);
    let closed = server.http("POST", &path, &[], "").await;
    assert_eq!(closed.status, 204, "{closed:?}");
    wait_until(|| server.server.hub.connection_count() == 0).await;
    wait_until(|| server.server.metrics.long_poll_sessions.get() == 0).await;
    assert_eq!(lp.poll_raw(lp.ack).await.status, 410);
    server.stop().await;
}

#[tokio::test]
async fn a_repeated_send_is_applied_once() {
    let server = start(config()).await;
    let mut lp = Lp::open(&server).await;
    lp.handshake("10:lp:tab").await;
    let first = lp.send_at(2, &[r#"["ping",1]"#]).await;
    let again = lp.send_at(2, &[r#"["ping",1]"#]).await;
    assert_eq!(first.json()["received"], json!(2));
    assert_eq!(again.json()["received"], json!(2));
    // An overlapping retry applies only its new frame.
    let overlap = lp.send_at(2, &[r#"["ping",1]"#, r#"["ping",2]"#]).await;
    assert_eq!(overlap.json()["received"], json!(3));
    lp.seq = 4;
    let mut pongs = Vec::new();
    while pongs.len() < 2 {
        let (frames, _) = lp.poll().await;
        pongs.extend(frames);
    }
    // Nothing more arrives within a hold.
    let (more, _) = lp.poll().await;
    pongs.extend(more);
    // A pong carries the server's `synced`, not the ping's: count them.
    assert_eq!(pongs, [r#"["pong",0]"#, r#"["pong",0]"#]);
    server.stop().await;
}

#[tokio::test]
async fn a_repeated_poll_returns_unacknowledged_frames_until_acknowledged() {
    let server = start(config()).await;
    let mut lp = Lp::open(&server).await;
    lp.send(&[r#"["connect",5,"10:lp:tab",0,{"token":"t","subprotocol":1}]"#])
        .await;
    // Wait for both handshake frames without acknowledging anything.
    let deadline = tokio::time::Instant::now() + WAIT;
    let body = loop {
        let body = lp.poll_raw(0).await.json();
        if body["messages"].as_array().map(Vec::len) == Some(2) {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
    };
    assert_eq!(body["first"], json!(1));
    let again = lp.poll_raw(0).await.json();
    assert_eq!(again, body, "a repeated poll returns the same frames");
    let partly = lp.poll_raw(1).await.json();
    assert_eq!(partly["first"], json!(2));
    assert_eq!(partly["messages"], json!([body["messages"][1]]));
    let started = tokio::time::Instant::now();
    let empty = lp.poll_raw(2).await.json();
    assert_eq!(empty["first"], json!(3));
    assert_eq!(empty["messages"], json!([]));
    assert!(started.elapsed() >= Duration::from_millis(TEST_HOLD_MS - 50));
    // Acknowledging what was never sent is refused.
    assert_eq!(lp.poll_raw(7).await.status, 400);
    server.stop().await;
}

#[tokio::test]
async fn a_waiting_poll_answers_at_once_when_a_frame_arrives_or_a_newer_poll_comes() {
    let mut config = config();
    config.long_poll.poll_hold_ms = 1_500;
    let server = start(config).await;
    let mut lp = Lp::open(&server).await;
    lp.handshake("10:lp:tab").await;
    let started = tokio::time::Instant::now();
    let (waiting, ()) = tokio::join!(lp.poll_raw(lp.ack), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let response = lp.send_at(lp.seq, &[r#"["ping",5]"#]).await;
        assert_eq!(response.status, 200);
    });
    assert_eq!(waiting.json()["messages"], json!([r#"["pong",0]"#]));
    assert!(started.elapsed() < Duration::from_millis(1_000));
    lp.ack += 1;

    let started = tokio::time::Instant::now();
    let (older, newer) = tokio::join!(lp.poll_raw(lp.ack), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        lp.poll_raw(lp.ack).await
    });
    assert_eq!(older.status, 200);
    assert_eq!(older.json()["messages"], json!([]));
    assert_eq!(newer.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(1_400),
        "the newer poll waited the whole hold: {:?}",
        started.elapsed()
    );
    server.stop().await;
}

#[tokio::test]
async fn a_gap_is_refused_with_409_naming_the_expected_number() {
    let server = start(config()).await;
    let mut lp = Lp::open(&server).await;
    lp.handshake("10:lp:tab").await;
    let gap = lp.send_at(5, &[r#"["ping",1]"#]).await;
    assert_eq!(gap.status, 409, "{gap:?}");
    let body = gap.json();
    assert_eq!(body["error"], json!("gap"));
    assert_eq!(body["expected"], json!(2));
    assert_eq!(body["received"], json!(1));
    assert_eq!(rejections(&server, "long_poll_gap"), 1.0);
    // Nothing of the refused request was applied.
    lp.send(&[r#"["ping",2]"#]).await;
    assert_eq!(lp.poll_until(r#"["pong""#).await, [r#"["pong",0]"#]);
    let (more, _) = lp.poll().await;
    assert!(more.is_empty(), "exactly one pong: {more:?}");
    server.stop().await;
}

#[tokio::test]
async fn unknown_sessions_and_paths_get_410_and_404() {
    let server = start(config()).await;
    for (method, path) in [
        ("GET", "/lp/0123456789abcdef/poll?ack=0"),
        ("POST", "/lp/0123456789abcdef/send"),
        ("POST", "/lp/0123456789abcdef/close"),
    ] {
        let body = r#"{"seq":1,"messages":[]}"#;
        let response = server.http(method, path, &[], body).await;
        assert_eq!(response.status, 410, "{path}: {response:?}");
        assert_eq!(response.json()["error"], json!("gone"));
    }
    assert_eq!(rejections(&server, "long_poll_unknown_session"), 3.0);
    assert_eq!(server.http("POST", "/lp/nope", &[], "").await.status, 404);
    let wrong_method = server.http("GET", "/lp/open", &[], "").await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.header("allow"), Some("POST, OPTIONS"));
    let lp = Lp::open(&server).await;
    let bad = server
        .http("POST", &format!("/lp/{}/send", lp.id), &[], "not json")
        .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(lp.send_at(0, &[]).await.status, 400);
    server.stop().await;
}

#[tokio::test]
async fn an_expired_session_is_closed_like_a_dropped_socket() {
    let mut config = config();
    config.long_poll.poll_hold_ms = 100;
    config.long_poll.session_expiry_ms = 400;
    let server = start(config).await;
    let mut lp = Lp::open(&server).await;
    lp.handshake("10:expiring:tab").await;
    lp.send(&[r#"["sync",1,{"type":"logux/subscribe","channel":"room/1"},{"id":1,"time":1}]"#])
        .await;
    lp.poll_until(r#"["synced""#).await;
    assert_eq!(server.server.hub.connection_count(), 1);
    assert_eq!(server.server.hub.subscription_count(), 1);
    // The client stops polling.
    wait_until(|| server.server.hub.connection_count() == 0).await;
    assert_eq!(server.server.hub.subscription_count(), 0);
    assert_eq!(server.server.metrics.long_poll_sessions.get(), 0);
    assert_eq!(lp.poll_raw(lp.ack).await.status, 410);
    // The same client id connects again.
    let mut again = Lp::open(&server).await;
    again.handshake("10:expiring:tab").await;
    assert_eq!(server.server.hub.connection_count(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_session_the_server_closes_hands_out_its_last_frames_then_closed() {
    let server = start(config()).await;
    let mut lp = Lp::open(&server).await;
    lp.handshake("10:lp:tab").await;
    lp.send(&["hello"]).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut frames = Vec::new();
    loop {
        let (more, closed) = lp.poll().await;
        frames.extend(more);
        if closed {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{frames:?}");
    }
    assert_eq!(frames, [r#"["error","wrong-format","hello"]"#]);
    // Frames sent after the close are dropped, as on a closed socket.
    let late = lp.send_at(lp.seq, &[r#"["ping",1]"#]).await.json();
    assert_eq!(late["closed"], json!(true));
    wait_until(|| server.server.hub.connection_count() == 0).await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_too_many_frames_unacknowledged_is_disconnected() {
    let mut config = config();
    config.long_poll.queue_frames_max = 2;
    let server = start(config).await;
    let mut lp = Lp::open(&server).await;
    let connect = r#"["connect",5,"10:slow:tab",0,{"token":"t","subprotocol":1}]"#;
    lp.send(&[connect]).await;
    // `headers` and `connected` fill the queue (nothing is acknowledged); the `pong` does
    // not fit.
    let deadline = tokio::time::Instant::now() + WAIT;
    while lp.poll_raw(0).await.json()["messages"]
        .as_array()
        .map(Vec::len)
        != Some(2)
    {
        assert!(tokio::time::Instant::now() < deadline, "no handshake");
    }
    lp.send(&[r#"["ping",1]"#]).await;
    wait_until(|| rejections(&server, "long_poll_queue_full") == 1.0).await;
    let body = lp.poll_raw(0).await.json();
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(2), "{body}");
    assert_eq!(body["closed"], json!(true));
    wait_until(|| server.server.hub.connection_count() == 0).await;
    server.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_and_a_frame_over_the_limit_wrong_format() {
    let mut config = config();
    config.long_poll.body_bytes_max = 1_000;
    config.limits.frame_bytes_max = 100;
    let server = start(config).await;
    let mut lp = Lp::open(&server).await;
    lp.handshake("10:lp:tab").await;
    let huge = format!(r#"["ping",{}]"#, "1".repeat(2_000));
    let response = lp.send_at(2, &[&huge]).await;
    assert_eq!(response.status, 413, "{response:?}");
    assert_eq!(response.json()["error"], json!("too-large"));
    assert_eq!(rejections(&server, "long_poll_body_too_large"), 1.0);
    let big = format!(r#"["ping",{}]"#, "1".repeat(200));
    lp.send(&[&big]).await;
    let frames = lp.poll_until(r#"["error""#).await;
    assert!(
        frames[0].starts_with(r#"["error","wrong-format","frame of 209 bytes"#),
        "{frames:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn open_beyond_sessions_max_gets_503_with_retry_after() {
    let mut config = config();
    config.long_poll.sessions_max = 2;
    let server = start(config).await;
    let first = Lp::open(&server).await;
    let _second = Lp::open(&server).await;
    let refused = server.http("POST", "/lp/open", &[], "").await;
    assert_eq!(refused.status, 503, "{refused:?}");
    let retry_after: u64 = refused
        .header("retry-after")
        .and_then(|value| value.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((5..=10).contains(&retry_after), "{retry_after}");
    assert_eq!(refused.json()["error"], json!("busy"));
    assert_eq!(rejections(&server, "long_poll_sessions_max"), 1.0);
    // A closed session frees its place.
    let path = format!("/lp/{}/close", first.id);
    assert_eq!(server.http("POST", &path, &[], "").await.status, 204);
    wait_until(|| server.server.metrics.long_poll_sessions.get() == 1).await;
    Lp::open(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn cors_answers_listed_origins_with_credentials_and_others_not_at_all() {
    let mut config = config();
    config.long_poll.cors_origins = vec!["https://app.example".to_owned()];
    let server = start(config).await;
    let preflight = server
        .http(
            "OPTIONS",
            "/lp/open",
            &[
                ("Origin", "https://app.example"),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type"),
            ],
            "",
        )
        .await;
    assert_eq!(preflight.status, 204, "{preflight:?}");
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        preflight.header("access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(
        preflight.header("access-control-allow-methods"),
        Some("GET, POST, OPTIONS")
    );
    assert_eq!(
        preflight.header("access-control-allow-headers"),
        Some("content-type")
    );
    assert!(preflight.header("access-control-max-age").is_some());
    let open = server
        .http("POST", "/lp/open", &[("Origin", "https://app.example")], "")
        .await;
    assert_eq!(open.status, 200);
    assert_eq!(
        open.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        open.header("access-control-expose-headers"),
        Some("Retry-After")
    );
    assert_eq!(open.header("vary"), Some("Origin"));
    let other = server
        .http(
            "POST",
            "/lp/open",
            &[("Origin", "https://evil.example")],
            "",
        )
        .await;
    assert_eq!(other.header("access-control-allow-origin"), None);
    assert_eq!(other.header("access-control-allow-credentials"), None);
    server.stop().await;

    let mut config = self::config();
    config.long_poll.cors_origins = vec!["*".to_owned()];
    let server = start(config).await;
    let any = server
        .http("POST", "/lp/open", &[("Origin", "https://any.example")], "")
        .await;
    assert_eq!(any.header("access-control-allow-origin"), Some("*"));
    assert_eq!(any.header("access-control-allow-credentials"), None);
    server.stop().await;

    let server = start(self::config()).await;
    let none = server
        .http("POST", "/lp/open", &[("Origin", "https://app.example")], "")
        .await;
    assert_eq!(none.header("access-control-allow-origin"), None);
    server.stop().await;
}

#[tokio::test]
async fn cookies_and_headers_of_the_opening_request_reach_the_peer() {
    let peers: Arc<Mutex<Vec<Peer>>> = Arc::default();
    let seen = peers.clone();
    let options = ServeOptions {
        peer_observer: Some(Arc::new(move |peer: &Peer| {
            seen.lock().expect("lock").push(peer.clone());
        })),
    };
    let server = Running::start_with(config(), options).await;
    let response = server
        .http(
            "POST",
            "/lp/open",
            &[
                ("Cookie", "session=abc; theme=\"dark\""),
                ("X-App-Version", "7"),
            ],
            "",
        )
        .await;
    assert_eq!(response.status, 200);
    {
        let peers = peers.lock().expect("lock");
        let peer = peers.last().expect("a long-poll peer");
        assert_eq!(peer.transport, "long-poll");
        assert_eq!(peer.cookie("session"), Some("abc"));
        assert_eq!(peer.cookie("theme"), Some("dark"));
        assert_eq!(peer.header("x-app-version"), Some("7"));
        assert!(peer.addr.is_loopback());
        let debug = format!("{peer:?}");
        assert!(
            !debug.contains("abc"),
            "cookie values stay out of logs: {debug}"
        );
    }

    let request = tokio_tungstenite::tungstenite::http::Request::builder()
        .uri(format!("ws://{}/", server.addr))
        .header("Host", server.addr.to_string())
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Cookie", "session=xyz")
        .header("X-App-Version", "8")
        .body(())
        .expect("request");
    let stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (mut socket, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("websocket handshake");
    connect_client(&mut socket, "10:ws:tab").await;
    {
        let peers = peers.lock().expect("lock");
        let peer = peers.last().expect("a websocket peer");
        assert_eq!(peer.transport, "ws");
        assert_eq!(peer.cookie("session"), Some("xyz"));
        assert_eq!(peer.header("X-App-Version"), Some("8"));
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_long_poll_sessions() {
    let mut config = config();
    config.long_poll.poll_hold_ms = 4_000;
    let server = start(config).await;
    let mut lp = Lp::open(&server).await;
    lp.handshake("10:lp:tab").await;
    let addr = server.addr;
    let ack = lp.ack;
    let id = lp.id.clone();
    let waiting = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        raw_poll(stream, &id, ack).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop().await;
    let body = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the poll answers at shutdown")
        .expect("task");
    assert!(body.contains(r#""closed":true"#), "{body}");
}

async fn raw_poll(mut stream: tokio::net::TcpStream, id: &str, ack: u64) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request =
        format!("GET /lp/{id}/poll?ack={ack} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    response
}

async fn wait_until(check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
