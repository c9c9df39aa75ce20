//! A catalogue of hostile input sent raw to the real listener: malformed and odd frames,
//! invalid UTF-8, deep nesting, numbers beyond 2^53, oversized frames and syncs, and
//! hostile clients (slowloris, a client that never reads, a ping flood).
//!
//! Each input gets its defined error (the exact `error` frame where the protocol defines one)
//! or its defined treatment, the server never panics, and a bystander client's ping round
//! trip stays normal after every hostile case. Each test prints how many inputs it tried.

mod support;

use ferry::config::Config;
use ferry::protocol::codec::JS_SAFE_INTEGER_MAX;
use ferry::transports::http::ServeOptions;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::net::{next_text, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<TcpStream>;

/// A bystander's ping round trip must stay under this after every hostile case.
const ROUND_TRIP_MAX: Duration = Duration::from_millis(500);

/// How long "nothing arrives" is watched.
const QUIET: Duration = Duration::from_millis(150);

/// Counts the hostile inputs of one test and prints the count at the end.
struct Tally {
    test: &'static str,
    inputs: usize,
}

impl Tally {
    fn new(test: &'static str) -> Tally {
        Tally { test, inputs: 0 }
    }

    fn add(&mut self, inputs: usize) {
        self.inputs += inputs;
    }
}

/// Inputs tried by every test of this file so far.
static INPUTS_TRIED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for Tally {
    fn drop(&mut self) {
        let total =
            INPUTS_TRIED.fetch_add(self.inputs, std::sync::atomic::Ordering::SeqCst) + self.inputs;
        println!(
            "catalogue: {} hostile inputs tried in {} ({total} in this run so far)",
            self.inputs, self.test
        );
    }
}

fn config() -> Config {
    Config::demo()
}

async fn start(config: Config) -> Running {
    Running::start_with(config, ServeOptions::default()).await
}

fn connect_frame(node: &str) -> String {
    json!(["connect", 5, node, 0, {"token": "t", "subprotocol": 1}]).to_string()
}

/// Completes the handshake of a demo-mode server.
async fn handshake(socket: &mut Socket, connect: &str) {
    socket
        .send(Message::text(connect.to_owned()))
        .await
        .expect("send connect");
    assert_eq!(
        next_text(socket).await.as_deref(),
        Some(r#"["headers",{"env":"development"}]"#),
        "{connect}"
    );
    let connected = next_text(socket).await.expect("connected");
    assert!(
        connected.starts_with(r#"["connected",5,"server:"#),
        "{connect}: {connected}"
    );
}

/// The next text frame within `wait` (`None`: nothing came), or `Some(None)` when the
/// connection ended.
async fn try_next(socket: &mut Socket, wait: Duration) -> Option<Option<String>> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Text(text)))) => return Some(Some(text.to_string())),
            Ok(Some(Ok(Message::Close(_))) | None) => return Some(None),
            Ok(Some(Err(error))) => {
                println!("catalogue: connection ended with {error}");
                return Some(None);
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// `["error","wrong-format",echo]`.
fn wrong_format(echo: &str) -> String {
    json!(["error", "wrong-format", echo]).to_string()
}

/// The `wrong-format` error for a frame that is not JSON: the text itself, cut to 1 KiB.
fn wrong_format_raw(frame: &str) -> String {
    let mut end = frame.len().min(1024);
    while !frame.is_char_boundary(end) {
        end -= 1;
    }
    wrong_format(&frame[..end])
}

fn unknown_message(name: &str) -> String {
    json!(["error", "unknown-message", name]).to_string()
}

/// A client on the server throughout, whose ping round trip is measured.
struct Bystander {
    socket: Socket,
    slowest: Duration,
}

impl Bystander {
    async fn join(server: &Running) -> Bystander {
        let mut socket = server.ws("/").await;
        handshake(&mut socket, &connect_frame("99:bystander:tab")).await;
        Bystander {
            socket,
            slowest: Duration::ZERO,
        }
    }

    /// Pings and asserts the round trip is normal.
    async fn round_trip(&mut self, after: &str) {
        let started = Instant::now();
        self.socket
            .send(Message::text(r#"["ping",0]"#))
            .await
            .expect("bystander sends ping");
        loop {
            let frame = next_text(&mut self.socket)
                .await
                .unwrap_or_else(|| panic!("the bystander was disconnected after {after}"));
            if frame.starts_with(r#"["pong","#) {
                break;
            }
        }
        let elapsed = started.elapsed();
        self.slowest = self.slowest.max(elapsed);
        assert!(
            elapsed < ROUND_TRIP_MAX,
            "the bystander's ping took {elapsed:?} after {after}"
        );
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        println!("catalogue: slowest bystander round trip {:?}", self.slowest);
    }
}

/// What a hostile input must get.
enum Expect {
    /// Exactly this error frame, then the connection closes.
    Error(String),
    /// Exactly these frames, and the connection stays open.
    Frames(Vec<String>),
    /// `synced` with this echo and the `logux/processed` of the one action.
    Processed(String),
    /// `synced` with this echo and a `logux/undo` with this reason.
    Undone(String, &'static str),
    /// Nothing, and the connection stays open.
    Nothing,
}

/// Sends `frame` on a new connection (after a handshake when `authenticated`) and checks
/// what comes back; then the bystander's round trip.
async fn check(
    server: &Running,
    bystander: &mut Bystander,
    authenticated: bool,
    frame: Message,
    expect: Expect,
) {
    let label = match &frame {
        Message::Text(text) => text.chars().take(120).collect::<String>(),
        other => format!("{:?}", other).chars().take(120).collect(),
    };
    let mut socket = server.ws("/").await;
    if authenticated {
        // The same client connects for every case: with the highest `synced`, it is owed no
        // catch-up of the answers to earlier cases.
        let connect = json!(["connect", 5, "10:hostile:tab", JS_SAFE_INTEGER_MAX,
            {"token": "t", "subprotocol": 1}]);
        handshake(&mut socket, &connect.to_string()).await;
    }
    // The server may close while a large frame is still being written.
    let _ = socket.send(frame).await;
    match expect {
        Expect::Error(error) => {
            assert_eq!(next_text(&mut socket).await, Some(error), "{label}");
            assert_eq!(
                next_text(&mut socket).await,
                None,
                "{label}: closed after the error"
            );
        }
        Expect::Frames(frames) => {
            for expected in frames {
                assert_eq!(next_text(&mut socket).await, Some(expected), "{label}");
            }
            still_open(&mut socket, &label).await;
        }
        Expect::Processed(synced) => {
            let answer = answer(&mut socket, &synced, &label).await;
            assert_eq!(answer["type"], "logux/processed", "{label}: {answer}");
            still_open(&mut socket, &label).await;
        }
        Expect::Undone(synced, reason) => {
            let answer = answer(&mut socket, &synced, &label).await;
            assert_eq!(answer["type"], "logux/undo", "{label}: {answer}");
            assert_eq!(answer["reason"], reason, "{label}: {answer}");
            still_open(&mut socket, &label).await;
        }
        Expect::Nothing => still_open(&mut socket, &label).await,
    }
    bystander.round_trip(&label).await;
}

/// The answer to a one-action `sync`: `synced`, optional `debug`, then one `sync`.
async fn answer(socket: &mut Socket, synced: &str, label: &str) -> Value {
    assert_eq!(
        next_text(socket).await.as_deref(),
        Some(synced),
        "{label}: synced"
    );
    loop {
        let frame = next_text(socket).await.expect("the answer");
        let value: Value = serde_json::from_str(&frame).expect("JSON");
        match value[0].as_str() {
            Some("debug") => continue,
            Some("sync") => {
                assert_eq!(value.as_array().map(Vec::len), Some(4), "{label}: {frame}");
                return value[2].clone();
            }
            _ => panic!("{label}: unexpected {frame}"),
        }
    }
}

/// Nothing more arrives, and a ping is still answered.
async fn still_open(socket: &mut Socket, label: &str) {
    assert_eq!(try_next(socket, QUIET).await, None, "{label}: nothing more");
    socket
        .send(Message::text(r#"["ping",0]"#))
        .await
        .expect("still open");
    let pong = next_text(socket).await;
    assert!(
        pong.as_deref()
            .is_some_and(|pong| pong.starts_with(r#"["pong","#)),
        "{label}: still answered, got {pong:?}"
    );
}

/// Frames that are not JSON, not arrays, unknown, of the wrong arity, with `null` or a
/// string where an object or number belongs, nested 100,000 deep: each gets the reference
/// server's error (`wrong-format` echoing the text, re-serialized when it is JSON and cut
/// to 1 KiB) and only its own connection closes.
#[tokio::test]
async fn malformed_frames_get_the_reference_error_and_close_only_their_connection() {
    let server = start(config()).await;
    let mut bystander = Bystander::join(&server).await;
    let mut tally = Tally::new("malformed frames");

    let not_json = [
        "hello",
        "",
        " ",
        "[",
        "]",
        "{",
        r#"["ping",0"#,
        r#"["ping",0]]"#,
        r#"["ping",0] ["ping",0]"#,
        r#"[1,2,]"#,
        r#"{"a":1,}"#,
        "'ping'",
        "\u{feff}[\"ping\",0]",
        "\0",
        "[\"ping\",0]\0",
        "NaN",
        r#"["ping",NaN]"#,
        r#"["ping",Infinity]"#,
        r#"["ping",-Infinity]"#,
        r#"["ping",0x10]"#,
        r#"["ping",01]"#,
        r#"["ping",.5]"#,
        r#"["ping",+1]"#,
        r#"["ping",1.]"#,
        r#"["ping",1e400]"#,
        r#"["ping",-1e400]"#,
        r#"["sync",1e400,{"type":"a"},{"id":1,"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":1e400,"time":1}]"#,
        r#"["ping",tru]"#,
        r#"["ping",nul]"#,
        r#"["ping","\ud800"]"#,
        r#"["ping","\x41"]"#,
        "[\"ping\",\"a\nb\"]",
        r#"{"a":1}{"#,
    ];
    for frame in not_json {
        check(
            &server,
            &mut bystander,
            false,
            Message::text(frame),
            Expect::Error(wrong_format_raw(frame)),
        )
        .await;
    }
    tally.add(not_json.len());

    // JSON, but not a protocol message: echoed as JSON.
    let wrong_shape = [
        "null",
        "1",
        r#""ping""#,
        "true",
        "{}",
        r#"{"a":1}"#,
        "[]",
        "[null]",
        "[1]",
        "[true]",
        r#"[["ping"]]"#,
        r#"[{"ping":0}]"#,
        // NaN-like strings where numbers belong.
        r#"["ping","NaN"]"#,
        r#"["ping","1"]"#,
        r#"["pong","Infinity"]"#,
        r#"["synced","-0"]"#,
        r#"["connect","5","1:a:b",0]"#,
        r#"["connect",5,"1:a:b","0"]"#,
        r#"["connect",5,1,0]"#,
        r#"["connected","5","server:x",[0,0]]"#,
        r#"["connected",5,1,[0,0]]"#,
        r#"["connected",5,"server:x",["0",0]]"#,
        r#"["sync","1"]"#,
        r#"["sync","NaN",{"type":"a"},{"id":1,"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":"1","time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":1,"time":"1"}]"#,
        r#"["sync",1,{"type":"a"},{"id":"NaN","time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":["1",2],"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":[1,"2"],"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":[1,2,3],"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":[1,"a","0"],"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":[],"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":[1],"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":[1,"a",0,0],"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":{"a":1},"time":1}]"#,
        r#"["sync",1,{"type":1},{"id":1,"time":1}]"#,
        r#"["sync",1,{"type":["a"]},{"id":1,"time":1}]"#,
        r#"["sync",1,{"kind":"a"},{"id":1,"time":1}]"#,
        r#"["sync",1,["type","a"],{"id":1,"time":1}]"#,
        r#"["sync",1,"a",{"id":1,"time":1}]"#,
        r#"["sync",1,{"type":"a"},[1,1]]"#,
        r#"["debug","info","x"]"#,
        r#"["debug","error",1]"#,
        r#"["headers",[]]"#,
        r#"["headers","a"]"#,
        r#"["duilian",1]"#,
        r#"["error",1]"#,
        // null in every position where an object, a string or a number belongs.
        "[null,1]",
        r#"["connect",null,"1:a:b",0]"#,
        r#"["connect",5,null,0]"#,
        r#"["connect",5,"1:a:b",null]"#,
        r#"["connect",5,"1:a:b",0,null]"#,
        r#"["connected",null,"server:x",[0,0]]"#,
        r#"["connected",5,null,[0,0]]"#,
        r#"["connected",5,"server:x",null]"#,
        r#"["connected",5,"server:x",[null,0]]"#,
        r#"["connected",5,"server:x",[0,0],null]"#,
        r#"["error",null]"#,
        r#"["ping",null]"#,
        r#"["pong",null]"#,
        r#"["synced",null]"#,
        r#"["sync",null]"#,
        r#"["sync",1,null,{"id":1,"time":1}]"#,
        r#"["sync",1,{"type":"a"},null]"#,
        r#"["sync",1,{"type":null},{"id":1,"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":null,"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":1,"time":null}]"#,
        r#"["sync",1,{"type":"a"},{"id":[null,"a",0],"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":[1,null,0],"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":[1,"a",null],"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":[1,null],"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":[null,1],"time":1}]"#,
        r#"["sync",1,{"type":"a"},{"id":1,"time":1},null,{"id":2,"time":2}]"#,
        r#"["debug",null,"x"]"#,
        r#"["debug","error",null]"#,
        r#"["headers",null]"#,
        r#"["duilian",null]"#,
        // Wrong arity for every message type.
        r#"["connect"]"#,
        r#"["connect",5]"#,
        r#"["connect",5,"1:a:b"]"#,
        r#"["connect",5,"1:a:b",0,{},1]"#,
        r#"["connected"]"#,
        r#"["connected",5,"server:x"]"#,
        r#"["connected",5,"server:x",[0,0],{},1]"#,
        r#"["connected",5,"server:x",[0]]"#,
        r#"["connected",5,"server:x",[0,0,0]]"#,
        r#"["error"]"#,
        r#"["error","timeout",{},1]"#,
        r#"["ping"]"#,
        r#"["ping",1,2]"#,
        r#"["pong"]"#,
        r#"["pong",1,2]"#,
        r#"["synced"]"#,
        r#"["synced",1,2]"#,
        r#"["sync"]"#,
        r#"["sync",1,{"type":"a"}]"#,
        r#"["sync",1,{"type":"a"},{"id":1,"time":1},{"type":"b"}]"#,
        r#"["debug"]"#,
        r#"["debug","error"]"#,
        r#"["debug","error","x",1]"#,
        r#"["headers"]"#,
        r#"["headers",{},{}]"#,
        r#"["duilian"]"#,
        r#"["duilian","a","b"]"#,
    ];
    for frame in wrong_shape {
        check(
            &server,
            &mut bystander,
            false,
            Message::text(frame),
            Expect::Error(wrong_format(frame)),
        )
        .await;
    }
    tally.add(wrong_shape.len());

    let unknown = [
        (r#"["foo"]"#, "foo"),
        (r#"["foo",1]"#, "foo"),
        (r#"[""]"#, ""),
        (r#"["PING",0]"#, "PING"),
        (r#"["ping ",0]"#, "ping "),
        (r#"["logux/subscribe",{}]"#, "logux/subscribe"),
        (r#"["sync\u0000",1]"#, "sync\u{0}"),
        (r#"["__proto__",1]"#, "__proto__"),
        (r#"["constructor"]"#, "constructor"),
    ];
    let long_name = "x".repeat(100_000);
    let long_unknown = format!(r#"["{long_name}",1]"#);
    for (frame, name) in unknown {
        check(
            &server,
            &mut bystander,
            false,
            Message::text(frame),
            Expect::Error(unknown_message(name)),
        )
        .await;
    }
    tally.add(unknown.len());
    // A huge unknown name is echoed cut to 1 KiB, like a wrong-format echo.
    check(
        &server,
        &mut bystander,
        false,
        Message::text(long_unknown),
        Expect::Error(unknown_message(&long_name[..1024])),
    )
    .await;
    tally.add(1);

    // Nested 100,000 deep (serde_json stops at 128 levels, without a stack overflow): the
    // text is not JSON to the server, so it is echoed raw, cut to 1 KiB.
    let depth = 100_000;
    let deep = [
        format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth)),
        format!(
            r#"["sync",1,{{"type":"a","deep":{}{}}},{{"id":1,"time":1}}]"#,
            "[".repeat(depth),
            "]".repeat(depth)
        ),
        format!(
            r#"["sync",1,{{"type":"a"}},{{"id":1,"time":1,"deep":{}{}}}]"#,
            "[".repeat(200),
            "]".repeat(200)
        ),
        format!(
            r#"["headers",{}1{}]"#,
            r#"{"a":"#.repeat(depth),
            "}".repeat(depth)
        ),
        format!(
            r#"["connect",5,"1:a:b",0,{}{}]"#,
            "[".repeat(depth),
            "]".repeat(depth)
        ),
    ];
    for frame in &deep {
        check(
            &server,
            &mut bystander,
            false,
            Message::text(frame.clone()),
            Expect::Error(wrong_format_raw(frame)),
        )
        .await;
    }
    tally.add(deep.len());
    server.stop().await;
}

/// After authentication: numbers beyond 2^53, fractions and ids that cannot round-trip are
/// `wrong-format` (echoing the `sync`'s `added` and the bad meta), not garbage ids.
#[tokio::test]
async fn ids_and_times_beyond_the_safe_integer_range_are_wrong_format_after_authentication() {
    let server = start(config()).await;
    let mut bystander = Bystander::join(&server).await;
    let mut tally = Tally::new("unsafe ids and times");
    let node = "10:hostile:tab";
    let metas = [
        json!({"id": 9_007_199_254_740_993_u64, "time": 1}),
        json!({"id": 9_007_199_254_740_991_u64, "time": 1}),
        json!({"id": -9_007_199_254_740_993_i64, "time": 1}),
        json!({"id": 18_446_744_073_709_551_615_u64, "time": 1}),
        json!({"id": 1e300, "time": 1}),
        json!({"id": 1.5, "time": 1}),
        json!({"id": [9_007_199_254_740_993_u64, 0], "time": 1}),
        json!({"id": [1, 9_007_199_254_740_993_u64], "time": 1}),
        json!({"id": [1, 2.5], "time": 1}),
        json!({"id": [1, -2], "time": 1}),
        json!({"id": [9_007_199_254_740_993_u64, node, 0], "time": 1}),
        json!({"id": [1, node, 9_007_199_254_740_993_u64], "time": 1}),
        json!({"id": [1, node, -1], "time": 1}),
        json!({"id": [1.5, node, 0], "time": 1}),
        json!({"id": [1, "10:hostile:tab x", 0], "time": 1}),
        json!({"id": [1, " ", 0], "time": 1}),
        json!({"id": [1, "", 0], "time": 1}),
        json!({"id": [1, "a b c", 0], "time": 1}),
        json!({"id": 1, "time": 9_007_199_254_740_993_u64}),
        json!({"id": 1, "time": 9_007_199_254_740_991_u64}),
        json!({"id": 1, "time": -9_007_199_254_740_993_i64}),
        json!({"id": 1, "time": 1e300}),
        json!({"id": 1, "time": -1e300}),
        json!({"id": 1, "time": 0.5}),
    ];
    for meta in &metas {
        for added in [json!(1), json!(-5), json!(1e300)] {
            let frame = json!(["sync", added, {"type": "a"}, meta]).to_string();
            let echo = json!(["sync", added, {"id": meta["id"], "time": meta["time"]}]);
            check(
                &server,
                &mut bystander,
                true,
                Message::text(frame),
                Expect::Error(wrong_format(&echo.to_string())),
            )
            .await;
            tally.add(1);
        }
    }
    server.stop().await;
}

/// Odd values that the protocol accepts get their defined treatment: `synced` echoes any
/// number as received, `connect`'s `synced` outside the safe range counts as 0, a newer
/// protocol is answered with 5, `null` in optional places is ignored or denied.
#[tokio::test]
async fn odd_but_valid_numbers_and_nulls_get_their_defined_treatment() {
    let server = start(config()).await;
    let mut bystander = Bystander::join(&server).await;
    let mut tally = Tally::new("odd valid values");

    let connects = [
        r#"["connect",5,"10:a:b",-1]"#,
        r#"["connect",5,"10:a:b",1e300]"#,
        r#"["connect",5,"10:a:b",-1e300]"#,
        r#"["connect",5,"10:a:b",9007199254740993]"#,
        r#"["connect",5,"10:a:b",18446744073709551615]"#,
        r#"["connect",5,"10:a:b",1.5]"#,
        r#"["connect",5,"10:a:b",0,{}]"#,
        r#"["connect",5,"10:a:b",0,{"token":null,"subprotocol":null}]"#,
        r#"["connect",5,"10:a:b",0,{"token":{"a":1},"subprotocol":"1"}]"#,
        r#"["connect",5,"10:a:b",0,{"subprotocol":1e300}]"#,
        r#"["connect",5,"10:a:b",0,{"subprotocol":-1}]"#,
        r#"["connect",5,"10:a:b",0,{"__proto__":{"token":"x"}}]"#,
        r#"["connect",6,"10:a:b",0]"#,
        r#"["connect",5.5,"10:a:b",0]"#,
        r#"["connect",1e300,"10:a:b",0]"#,
        r#"["connect",9007199254740993,"10:a:b",0]"#,
    ];
    for frame in connects {
        let mut socket = server.ws("/").await;
        handshake(&mut socket, frame).await;
        still_open(&mut socket, frame).await;
        bystander.round_trip(frame).await;
    }
    tally.add(connects.len());

    let old_protocols = [
        ("4", json!(4)),
        ("4.99", json!(4.99)),
        ("0", json!(0)),
        ("-5", json!(-5)),
        ("-1e300", json!(-1e300)),
    ];
    for (text, used) in &old_protocols {
        let frame = format!(r#"["connect",{text},"10:a:b",0]"#);
        let error = json!(["error", "wrong-protocol", {"supported": 5, "used": used}]);
        check(
            &server,
            &mut bystander,
            false,
            Message::text(frame),
            Expect::Error(error.to_string()),
        )
        .await;
    }
    tally.add(old_protocols.len());

    let answered = [
        (r#"["sync",-5]"#, vec![r#"["synced",-5]"#]),
        (r#"["sync",1.5]"#, vec![r#"["synced",1.5]"#]),
        // serde_json writes 1e300 as 1e+300: the same number to every JSON reader.
        (r#"["sync",1e300]"#, vec![r#"["synced",1e+300]"#]),
        (
            r#"["sync",9007199254740993]"#,
            vec![r#"["synced",9007199254740993]"#],
        ),
        (r#"["ping",9007199254740993]"#, vec![r#"["pong",0]"#]),
        (r#"["ping",-1]"#, vec![r#"["pong",0]"#]),
        (r#"["ping",1e300]"#, vec![r#"["pong",0]"#]),
        (r#"["ping",1e-400]"#, vec![r#"["pong",0]"#]),
        (
            r#"["duilian","金木水火土"]"#,
            vec![r#"["duilian","板城烧锅酒"]"#],
        ),
    ];
    for (frame, frames) in &answered {
        let frames = frames.iter().map(|frame| (*frame).to_owned()).collect();
        check(
            &server,
            &mut bystander,
            true,
            Message::text(*frame),
            Expect::Frames(frames),
        )
        .await;
    }
    tally.add(answered.len());

    // Messages a server ignores, with odd values and nulls where anything may stand.
    let ignored = [
        r#"["synced",-1]"#,
        r#"["synced",1e300]"#,
        r#"["pong",9007199254740993]"#,
        r#"["error","timeout",null]"#,
        r#"["error","wrong-format",{"a":null}]"#,
        r#"["headers",{"a":null}]"#,
        r#"["headers",{}]"#,
        r#"["duilian","x"]"#,
        r#"["connected",5,"server:x",[0,0]]"#,
        r#"["connected",5,"server:x",[1e300,-1e300],{"a":null}]"#,
        r#"["debug","error",""]"#,
        r#"["connect",5,"20:other:tab",0]"#,
        r#"["connect",4,"10:hostile:tab",0]"#,
    ];
    for frame in ignored {
        check(
            &server,
            &mut bystander,
            true,
            Message::text(frame),
            Expect::Nothing,
        )
        .await;
    }
    tally.add(ignored.len());

    let actions = [
        (r#"["sync",-5,{"type":"a"},{"id":1,"time":1}]"#, "-5", None),
        (
            r#"["sync",1,{"type":"a","x":null},{"id":1,"time":1}]"#,
            "1",
            None,
        ),
        (
            r#"["sync",1,{"type":"a","channel":null},{"id":1,"time":1}]"#,
            "1",
            None,
        ),
        (r#"["sync",1,{"type":""},{"id":1,"time":1}]"#, "1", None),
        (
            r#"["sync",1,{"type":"a"},{"id":-9007199254740991,"time":1}]"#,
            "1",
            None,
        ),
        (
            r#"["sync",1,{"type":"a"},{"id":[1,"10:hostile:other:tab",0],"time":1}]"#,
            "1",
            None,
        ),
        (
            r#"["sync",1,{"type":"logux/subscribe","channel":"room/1","since":null}]"#,
            "",
            None,
        ),
        (
            r#"["sync",1,{"type":"logux/subscribe","channel":"room/1","since":{"id":null,"time":null}},{"id":1,"time":1}]"#,
            "1",
            None,
        ),
        (
            r#"["sync",1,{"type":"logux/subscribe","channel":null},{"id":1,"time":1}]"#,
            "1",
            Some("wrongChannel"),
        ),
        (
            r#"["sync",1,{"type":"logux/subscribe"},{"id":1,"time":1}]"#,
            "1",
            Some("wrongChannel"),
        ),
        (
            r#"["sync",1,{"type":"logux/unsubscribe","channel":7},{"id":1,"time":1}]"#,
            "1",
            Some("wrongChannel"),
        ),
        (
            r#"["sync",1,{"type":"a"},{"id":1,"time":1,"subprotocol":null}]"#,
            "1",
            Some("denied"),
        ),
        (
            r#"["sync",1,{"type":"a"},{"id":1,"time":1,"subprotocol":"1"}]"#,
            "1",
            Some("denied"),
        ),
        (
            r#"["sync",1,{"type":"a"},{"id":1,"time":1,"subprotocol":1.5}]"#,
            "1",
            Some("denied"),
        ),
        (
            r#"["sync",1,{"type":"a"},{"id":1,"time":1,"subprotocol":-1}]"#,
            "1",
            Some("denied"),
        ),
        (
            r#"["sync",1,{"type":"a"},{"id":1,"time":1,"subprotocol":4294967296}]"#,
            "1",
            Some("denied"),
        ),
        (
            r#"["sync",1,{"type":"a"},{"id":1,"time":1,"x":null}]"#,
            "1",
            Some("denied"),
        ),
        (
            r#"["sync",1,{"type":"a"},{"id":[1,"10:hostile",0],"time":1}]"#,
            "1",
            None,
        ),
        (
            r#"["sync",1,{"type":"a"},{"id":[1,"10:other:tab",0],"time":1}]"#,
            "1",
            Some("denied"),
        ),
        (
            r#"["sync",1,{"type":"a"},{"id":[1,"10",0],"time":1}]"#,
            "1",
            Some("denied"),
        ),
        (
            r#"["sync",1,{"type":"a"},{"id":[1,":::",0],"time":1}]"#,
            "1",
            Some("denied"),
        ),
    ];
    for (frame, synced, undone) in &actions {
        if synced.is_empty() {
            // An odd number of items after `added`: wrong-format, as the reference says.
            check(
                &server,
                &mut bystander,
                true,
                Message::text(*frame),
                Expect::Error(wrong_format(frame)),
            )
            .await;
            continue;
        }
        let synced = format!(r#"["synced",{synced}]"#);
        let expect = match undone {
            Some(reason) => Expect::Undone(synced, reason),
            None => Expect::Processed(synced),
        };
        check(&server, &mut bystander, true, Message::text(*frame), expect).await;
    }
    tally.add(actions.len());
    server.stop().await;
}

/// Node ids with spaces or colons in odd places: Logux's `parseId` rules (a space means an
/// action id, whose second word is the node), and an action id must name the connection's
/// own client.
#[tokio::test]
async fn node_ids_with_spaces_and_colons_in_odd_places_get_parse_id_rules() {
    let server = start(config()).await;
    let mut bystander = Bystander::join(&server).await;
    let mut tally = Tally::new("odd node ids");
    // (node id in connect, the node its actions are under, whether a numeric id works)
    // Every node id is of another client, so no connection gets another's catch-up.
    let nodes = [
        ("11:a:b c", true),
        (":::", true),
        ("12", true),
        ("13:a", true),
        ("a b c d", true),
        ("14:a:b\u{0}", true),
        ("15:a:b:c:d", true),
        ("\u{1F600}:a:b", true),
        ("", false),
        (" ", false),
        ("server ", false),
    ];
    for (node, numeric_ids_work) in nodes {
        let mut socket = server.ws("/").await;
        let connect = json!(["connect", 5, node, 0]).to_string();
        handshake(&mut socket, &connect).await;
        let sync = r#"["sync",1,{"type":"a"},{"id":1,"time":1}]"#;
        socket.send(Message::text(sync)).await.expect("send sync");
        if numeric_ids_work {
            let answer = answer(&mut socket, r#"["synced",1]"#, node).await;
            assert_eq!(answer["type"], "logux/processed", "{node:?}: {answer}");
            still_open(&mut socket, node).await;
        } else {
            // An empty node id cannot make an action id: every action is wrong-format.
            let error = next_text(&mut socket).await.expect("an error");
            assert!(
                error.starts_with(r#"["error","wrong-format","#),
                "{node:?}: {error}"
            );
            assert_eq!(next_text(&mut socket).await, None, "{node:?}: closed");
        }
        bystander.round_trip(&format!("node id {node:?}")).await;
    }
    tally.add(nodes.len());
    // The reserved user, however it is spelled in a node id.
    for node in [
        "server",
        "server:x",
        "server:x:y",
        "1 server:x 0",
        "x server",
    ] {
        check(
            &server,
            &mut bystander,
            false,
            Message::text(json!(["connect", 5, node, 0]).to_string()),
            Expect::Error(r#"["error","wrong-credentials"]"#.to_owned()),
        )
        .await;
        tally.add(1);
    }
    server.stop().await;
}

fn raw_frame(opcode: OpCode, is_final: bool, payload: Vec<u8>) -> Message {
    let header = FrameHeader {
        is_final,
        opcode,
        ..FrameHeader::default()
    };
    Message::Frame(Frame::from_payload(header, payload.into()))
}

#[tokio::test]
async fn invalid_utf8_gets_wrong_format_but_utf8_split_across_fragments_is_accepted() {
    let server = start(config()).await;
    let mut bystander = Bystander::join(&server).await;
    let mut tally = Tally::new("invalid UTF-8");
    let invalid: [&[u8]; 8] = [
        &[0xff, 0xfe, 0x5b],
        b"[\"ping\",0]\xff",
        b"[\"duilian\",\"\xe9\x87\"]",
        b"[\"duilian\",\"\xc0\xaf\"]",
        b"[\"duilian\",\"\xed\xa0\x80\"]",
        b"[\"duilian\",\"\xf4\x90\x80\x80\"]",
        b"\x80",
        b"[\"ping\",0]\xe2\x82",
    ];
    for bytes in invalid {
        for authenticated in [false, true] {
            check(
                &server,
                &mut bystander,
                authenticated,
                raw_frame(OpCode::Data(Data::Text), true, bytes.to_vec()),
                Expect::Error(wrong_format("text frame is not UTF-8")),
            )
            .await;
            check(
                &server,
                &mut bystander,
                authenticated,
                Message::binary(bytes.to_vec()),
                Expect::Error(wrong_format("binary frame is not UTF-8")),
            )
            .await;
            tally.add(2);
        }
    }

    // A valid message whose fragments split a character is one valid frame.
    let mut socket = server.ws("/").await;
    handshake(&mut socket, &connect_frame("10:fragments:tab")).await;
    let text = "[\"duilian\",\"金木水火土\"]".as_bytes();
    let split = text.len() - 4; // inside the last character, before `"]`
    socket
        .send(raw_frame(
            OpCode::Data(Data::Text),
            false,
            text[..split].to_vec(),
        ))
        .await
        .expect("first fragment");
    socket
        .send(raw_frame(
            OpCode::Data(Data::Continue),
            true,
            text[split..].to_vec(),
        ))
        .await
        .expect("last fragment");
    assert_eq!(
        next_text(&mut socket).await.as_deref(),
        Some(r#"["duilian","板城烧锅酒"]"#)
    );
    // The same split with an invalid end is refused.
    socket
        .send(raw_frame(
            OpCode::Data(Data::Text),
            false,
            text[..split].to_vec(),
        ))
        .await
        .expect("first fragment");
    socket
        .send(raw_frame(
            OpCode::Data(Data::Continue),
            true,
            b"\xff\"]".to_vec(),
        ))
        .await
        .expect("bad last fragment");
    assert_eq!(
        next_text(&mut socket).await,
        Some(wrong_format("text frame is not UTF-8"))
    );
    assert_eq!(next_text(&mut socket).await, None);
    tally.add(2);
    bystander.round_trip("fragmented UTF-8").await;
    server.stop().await;
}

/// `["error","wrong-format","frame of N bytes is over the limit of M bytes"]`.
fn assert_over_limit(error: Option<String>, limit: usize, label: &str) {
    let error = error.unwrap_or_else(|| panic!("{label}: an error frame"));
    let value: Value = serde_json::from_str(&error).expect("JSON");
    assert_eq!(value[0], "error", "{label}: {error}");
    assert_eq!(value[1], "wrong-format", "{label}: {error}");
    let text = value[2].as_str().expect("a text");
    let size: usize = text
        .strip_prefix("frame of ")
        .and_then(|rest| rest.strip_suffix(&format!(" bytes is over the limit of {limit} bytes")))
        .and_then(|size| size.parse().ok())
        .unwrap_or_else(|| panic!("{label}: {error}"));
    assert!(size > limit, "{label}: {error}");
}

#[tokio::test]
async fn frames_over_the_size_limit_get_wrong_format_whole_or_in_fragments() {
    const LIMIT: usize = 64 * 1024;
    let mut config = config();
    config.limits.frame_bytes_max = LIMIT;
    let server = start(config).await;
    let mut bystander = Bystander::join(&server).await;
    let mut tally = Tally::new("oversized frames");
    for authenticated in [false, true] {
        for size in [LIMIT + 1, 2 * LIMIT, 16 * LIMIT] {
            let mut socket = server.ws("/").await;
            if authenticated {
                handshake(&mut socket, &connect_frame("10:big:tab")).await;
            }
            let frame = format!(r#"["ping",{}]"#, "1".repeat(size));
            let _ = socket.send(Message::text(frame)).await;
            assert_over_limit(next_text(&mut socket).await, LIMIT, "one frame");
            assert_eq!(next_text(&mut socket).await, None, "closed");
            bystander.round_trip("an oversized frame").await;
            tally.add(1);
        }
        // Fragments each under the limit, together over it.
        let mut socket = server.ws("/").await;
        if authenticated {
            handshake(&mut socket, &connect_frame("10:big:tab")).await;
        }
        let fragment = vec![b'1'; LIMIT / 2];
        let mut result = socket
            .send(raw_frame(
                OpCode::Data(Data::Text),
                false,
                b"[\"ping\",".to_vec(),
            ))
            .await;
        for _ in 0..4 {
            if result.is_ok() {
                result = socket
                    .send(raw_frame(
                        OpCode::Data(Data::Continue),
                        false,
                        fragment.clone(),
                    ))
                    .await;
            }
        }
        if result.is_ok() {
            let _ = socket
                .send(raw_frame(OpCode::Data(Data::Continue), true, b"]".to_vec()))
                .await;
        }
        assert_over_limit(next_text(&mut socket).await, LIMIT, "fragments");
        assert_eq!(next_text(&mut socket).await, None, "closed");
        bystander
            .round_trip("an oversized fragmented message")
            .await;
        tally.add(1);
    }
    // A frame of exactly the limit is accepted.
    let mut socket = server.ws("/").await;
    handshake(&mut socket, &connect_frame("10:big:tab")).await;
    let prefix = r#"["ping",1"#;
    let frame = format!("{prefix}{}]", " ".repeat(LIMIT - prefix.len() - 1));
    assert_eq!(frame.len(), LIMIT);
    socket.send(Message::text(frame)).await.expect("send");
    assert_eq!(
        next_text(&mut socket).await.as_deref(),
        Some(r#"["pong",0]"#)
    );
    tally.add(1);
    server.stop().await;
}

/// Tests that measure this process's memory run one at a time.
static MEMORY_MEASURED: std::sync::LazyLock<tokio::sync::Mutex<()>> =
    std::sync::LazyLock::new(|| tokio::sync::Mutex::new(()));

/// Resets the peak (`VmHWM`) to the current RSS (Linux 4.0+; ignored elsewhere).
fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Memory of this process (the server runs in it), in KiB: `VmRSS` or `VmHWM` (peak).
fn memory_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// A `sync` of `pairs` tiny action/meta pairs.
fn tiny_sync(pairs: usize) -> String {
    let mut frame = String::with_capacity(32 + pairs * 32);
    frame.push_str(r#"["sync",1"#);
    for n in 1..=pairs {
        frame.push_str(&format!(r#",{{"type":"a"}},{{"id":{n},"time":1}}"#));
    }
    frame.push(']');
    frame
}

/// Largest growth of this process's memory a hostile frame of `bytes` may cause, in MiB:
/// the frame is held a few times over (socket buffer, message, text), plus room for the
/// other tests running in this process. Parsing a whole `sync` of tiny pairs into values
/// costs about 35 times its text, so this bound holds only if an over-limit `sync` is not
/// built whole (a 34 MiB one grew the peak by 1.2 GiB before it was refused while read).
fn memory_bound_mib(bytes: usize) -> u64 {
    (bytes as u64 >> 20) * 8 + 128
}

#[tokio::test]
async fn a_sync_with_a_million_tiny_pairs_is_refused_with_a_defined_error_and_bounded_memory() {
    const PAIRS: usize = 1_000_000;
    const LIMIT: usize = 100_000;
    let mut config = config();
    config.limits.sync_pairs_max = LIMIT;
    let server = start(config).await;
    let mut bystander = Bystander::join(&server).await;
    let mut tally = Tally::new("a million pairs");
    let _measuring = MEMORY_MEASURED.lock().await;
    let frame = tiny_sync(PAIRS);
    let bytes = frame.len();
    let mut socket = server.ws("/").await;
    handshake(&mut socket, &connect_frame("10:million:tab")).await;
    reset_peak_memory();
    let rss_before = memory_kib("VmRSS:");
    let started = Instant::now();
    socket.send(Message::text(frame)).await.expect("send");
    assert_eq!(
        next_text(&mut socket).await,
        Some(wrong_format(&format!(
            "sync with {PAIRS} actions is over the limit of {LIMIT}"
        )))
    );
    assert_eq!(next_text(&mut socket).await, None, "closed");
    let elapsed = started.elapsed();
    let rss_after = memory_kib("VmRSS:");
    let peak = memory_kib("VmHWM:");
    println!(
        "catalogue: a {} MiB sync of {PAIRS} pairs refused in {elapsed:?}; RSS {} -> {} MiB, \
         peak {} MiB",
        bytes >> 20,
        rss_before >> 10,
        rss_after >> 10,
        peak >> 10
    );
    let bound = memory_bound_mib(bytes);
    assert!(
        (peak >> 10).saturating_sub(rss_before >> 10) < bound,
        "a {bytes}-byte sync grew the peak memory from {rss_before} KiB to {peak} KiB"
    );
    tally.add(1);
    bystander.round_trip("a million-pair sync").await;
    server.stop().await;
}

/// Behind `FERRY_CATALOGUE_LONG=1`: the same million pairs under the default limit are
/// stored and answered (this takes minutes on two cores). On the runtime `ferry` uses (multi
/// threaded), as the work of one connection blocks a whole single-threaded test runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_with_a_million_tiny_pairs_under_the_default_limit_is_processed() {
    if std::env::var_os("FERRY_CATALOGUE_LONG").is_none() {
        println!("skipped: set FERRY_CATALOGUE_LONG=1");
        return;
    }
    const PAIRS: usize = 1_000_000;
    let server = start(config()).await;
    let mut bystander = Bystander::join(&server).await;
    let frame = tiny_sync(PAIRS);
    let bytes = frame.len();
    let rss_before = memory_kib("VmRSS:");
    let mut socket = server.ws("/").await;
    handshake(&mut socket, &connect_frame("10:million:tab")).await;
    let started = Instant::now();
    socket.send(Message::text(frame)).await.expect("send");
    let mut processed = 0;
    let mut synced = false;
    while processed < PAIRS || !synced {
        let frame = tokio::time::timeout(Duration::from_secs(600), socket.next())
            .await
            .expect("progress")
            .expect("open")
            .expect("frame");
        let Message::Text(text) = frame else { continue };
        let value: Value = serde_json::from_str(&text).expect("JSON");
        match value[0].as_str() {
            Some("synced") => synced = true,
            Some("sync") => processed += (value.as_array().map_or(2, Vec::len) - 2) / 2,
            _ => {}
        }
        if processed % 100_000 == 0 {
            bystander
                .round_trip("a million-pair sync in progress")
                .await;
        }
    }
    let peak = memory_kib("VmHWM:");
    println!(
        "catalogue: a {} MiB sync of {PAIRS} pairs processed in {:?}; peak {} MiB (from {} MiB)",
        bytes >> 20,
        started.elapsed(),
        peak >> 10,
        rss_before >> 10
    );
    bystander.round_trip("a million-pair sync").await;
    server.stop().await;
}

/// Messages before `connect` are queued until authentication: a client that has not even
/// sent `connect` must not make the server hold an unbounded amount of them.
#[tokio::test]
async fn messages_queued_before_authentication_are_bounded_in_memory() {
    const FRAMES: usize = 32;
    const PAIRS: usize = 60_000; // about 2 MiB of text each
    let server = start(config()).await;
    let mut bystander = Bystander::join(&server).await;
    let mut tally = Tally::new("pre-auth queue");
    let _measuring = MEMORY_MEASURED.lock().await;
    let frame = tiny_sync(PAIRS);
    let bytes = frame.len();
    reset_peak_memory();
    let rss_before = memory_kib("VmRSS:");
    let mut socket = server.ws("/").await;
    let mut sent = 0;
    for _ in 0..FRAMES {
        if socket.send(Message::text(frame.clone())).await.is_err() {
            break;
        }
        sent += 1;
        tally.add(1);
    }
    // Either the server closed the connection, or it holds everything for `connect`.
    let closed = match try_next(&mut socket, Duration::from_secs(2)).await {
        Some(None) => true,
        Some(Some(frame)) => panic!("unexpected {frame}"),
        None => false,
    };
    let rss_after = memory_kib("VmRSS:");
    let peak = memory_kib("VmHWM:");
    println!(
        "catalogue: {sent} syncs of {} KiB before connect: closed {closed}; RSS {} -> {} MiB, \
         peak {} MiB",
        bytes >> 10,
        rss_before >> 10,
        rss_after >> 10,
        peak >> 10
    );
    assert!(
        closed,
        "a client sending {sent} big syncs before connect is disconnected"
    );
    let grown_mib = (peak >> 10).saturating_sub(rss_before >> 10);
    assert!(
        grown_mib < memory_bound_mib(2 * bytes),
        "{sent} queued syncs of {bytes} bytes grew the memory by {grown_mib} MiB"
    );
    bystander.round_trip("syncs before connect").await;
    server.stop().await;
}

/// Slowloris: a socket that opens (the upgrade) and never sends `connect`, or keeps sending
/// `headers` without ever connecting, is closed after `handshake_timeout_ms`.
#[tokio::test]
async fn a_client_that_never_sends_connect_is_closed_after_the_handshake_timeout() {
    const TIMEOUT_MS: u64 = 400;
    let mut config = config();
    config.limits.handshake_timeout_ms = TIMEOUT_MS;
    let server = start(config).await;
    let mut bystander = Bystander::join(&server).await;
    let mut tally = Tally::new("slowloris");

    let mut silent = server.ws("/").await;
    let started = Instant::now();
    assert_eq!(
        next_text(&mut silent).await,
        None,
        "closed without a message"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(TIMEOUT_MS - 50) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    tally.add(1);
    bystander.round_trip("a silent socket").await;

    // Trickling messages that are allowed before connect does not extend the deadline.
    let mut trickle = server.ws("/").await;
    let started = Instant::now();
    let mut closed = false;
    while started.elapsed() < Duration::from_secs(3) {
        if trickle
            .send(Message::text(r#"["headers",{"a":1}]"#))
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        if let Some(None) = try_next(&mut trickle, Duration::from_millis(50)).await {
            closed = true;
            break;
        }
    }
    let waited = started.elapsed();
    assert!(closed, "a socket trickling headers is closed");
    assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
    tally.add(1);
    bystander.round_trip("a trickling socket").await;

    // A `connect` after the deadline is too late.
    let mut late = server.ws("/").await;
    tokio::time::sleep(Duration::from_millis(TIMEOUT_MS + 200)).await;
    let _ = late.send(Message::text(connect_frame("10:late:tab"))).await;
    assert_eq!(
        try_next(&mut late, Duration::from_secs(2)).await,
        Some(None)
    );
    tally.add(1);

    // Many silent sockets at once are all closed, and the bystander never notices.
    let mut sockets = Vec::new();
    for _ in 0..50 {
        sockets.push(server.ws("/").await);
    }
    bystander.round_trip("50 silent sockets").await;
    for mut socket in sockets {
        assert_eq!(next_text(&mut socket).await, None);
    }
    tally.add(50);
    bystander.round_trip("50 closed silent sockets").await;

    // A raw TCP client that sends half a request and stops: not our timeout (hyper's header
    // timeout, 10 s), checked only in the long run.
    if std::env::var_os("FERRY_CATALOGUE_LONG").is_some() {
        let mut stream = TcpStream::connect(server.addr).await.expect("tcp");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("half a request");
        let mut buffer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut buffer))
            .await
            .expect("closed by the header read timeout");
        assert!(read.is_ok());
        tally.add(1);
    }
    server.stop().await;
}

/// A client whose socket is never read: the outbox stays bounded, the client is kicked as a
/// slow consumer, and the others (writer and bystander) never notice.
#[tokio::test]
async fn a_client_that_never_reads_is_kicked_and_its_outbox_stays_bounded() {
    flood_a_client_that_never_reads(false).await;
}

/// Regression (found by this file): a kicked slow consumer was never disconnected. Its
/// connection task was blocked in `write_pending` (`feed`/`flush` on a socket whose peer
/// never reads, with no timeout and no look at the kick), so it never saw the kick, never
/// closed the socket and never unregistered: it kept its `connections_max` permit and socket
/// buffers until the peer went away, the idle timeout could not fire, and shutdown waited
/// its whole drain time for it. The final close of the socket must not wait for the peer
/// either (closing flushes a close frame into the same full socket).
#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_after_it_is_kicked() {
    flood_a_client_that_never_reads(true).await;
}

/// Reads until the next `synced`.
async fn next_synced(socket: &mut Socket) {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("the answers arrive in time");
        match message {
            Some(Ok(Message::Text(text))) if text.starts_with(r#"["synced","#) => return,
            Some(Ok(_)) => continue,
            other => panic!("the connection ended: {other:?}"),
        }
    }
}

async fn flood_a_client_that_never_reads(check_disconnect: bool) {
    const OUTBOX_LEN: usize = 16;
    const SYNCS: usize = 400;
    const ACTIONS_PER_SYNC: usize = 20;
    let mut config = config();
    config.limits.outbox_len = OUTBOX_LEN;
    let server = start(config).await;
    let mut bystander = Bystander::join(&server).await;
    let mut tally = Tally::new("never reads");
    let _measuring = MEMORY_MEASURED.lock().await;

    let mut victim = server.ws("/").await;
    handshake(&mut victim, &connect_frame("30:victim:tab")).await;
    victim
        .send(Message::text(
            r#"["sync",1,{"type":"logux/subscribe","channel":"flood"},{"id":1,"time":1}]"#,
        ))
        .await
        .expect("subscribe");
    assert_eq!(
        next_text(&mut victim).await.as_deref(),
        Some(r#"["synced",1]"#)
    );
    // From here on the victim never reads again.

    let mut writer = server.ws("/").await;
    handshake(&mut writer, &connect_frame("40:writer:tab")).await;
    // The writer keeps a few syncs outstanding, as a client does: each one's answers and
    // `synced` fit the small outbox this test gives every connection, so only the victim
    // overflows its outbox.
    const OUTSTANDING_SYNCS_MAX: usize = 4;
    let mut synced = 0;
    reset_peak_memory();
    let rss_before = memory_kib("VmRSS:");
    let padding = "x".repeat(2048);
    for n in 0..SYNCS {
        let mut frame = format!(r#"["sync",{}"#, n + 1);
        for k in 0..ACTIONS_PER_SYNC {
            let id = n * ACTIONS_PER_SYNC + k + 1;
            frame.push_str(&format!(
                r#",{{"type":"flood","channel":"flood","pad":"{padding}"}},{{"id":{id},"time":1}}"#
            ));
        }
        frame.push(']');
        writer
            .send(Message::text(frame))
            .await
            .expect("writer sends");
        if n + 1 - synced > OUTSTANDING_SYNCS_MAX {
            next_synced(&mut writer).await;
            synced += 1;
        }
    }
    while synced < SYNCS {
        next_synced(&mut writer).await;
        synced += 1;
    }
    tally.add(SYNCS * ACTIONS_PER_SYNC);
    assert_eq!(synced, SYNCS, "the writer gets every synced");
    bystander.round_trip("a flood at a non-reader").await;
    let slow = server.server.metrics.slow_consumers.get();
    let peak = memory_kib("VmHWM:");
    println!(
        "catalogue: {} MiB sent to a client that never reads; slow consumers {slow}; RSS {} MiB, \
         peak {} MiB",
        (SYNCS * ACTIONS_PER_SYNC * padding.len()) >> 20,
        rss_before >> 10,
        peak >> 10
    );
    assert!(slow >= 1, "the non-reader is counted as a slow consumer");
    let grown_mib = (peak >> 10).saturating_sub(rss_before >> 10);
    assert!(grown_mib < 256, "memory grew by {grown_mib} MiB");

    if !check_disconnect {
        drop(victim);
        server.stop().await;
        return;
    }
    // It is disconnected: the server lets go of the connection (hub and socket), even though
    // the peer never reads what is in flight.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.server.hub.connection_count() > 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connections = server.server.hub.connection_count();
    println!("catalogue: connections after the slow consumer was kicked: {connections}");
    assert_eq!(
        connections, 2,
        "the never-reading client is still registered 5 s after it was kicked"
    );
    bystander.round_trip("the non-reader's disconnect").await;
    drop(victim);
    server.stop().await;
}

/// A client that pings as fast as it can is answered, and a bystander's round trip stays
/// normal meanwhile.
#[tokio::test]
async fn a_client_pinging_in_a_tight_loop_is_answered_and_others_stay_responsive() {
    const PINGS: usize = 20_000;
    let server = start(config()).await;
    let mut bystander = Bystander::join(&server).await;
    let mut tally = Tally::new("ping flood");
    let mut pinger = server.ws("/").await;
    handshake(&mut pinger, &connect_frame("50:pinger:tab")).await;
    let (mut tx, mut rx) = pinger.split();
    let sender = tokio::spawn(async move {
        for n in 0..PINGS {
            tx.feed(Message::text(format!(r#"["ping",{n}]"#)))
                .await
                .expect("ping");
            if n % 256 == 0 {
                tx.flush().await.expect("flush");
            }
        }
        tx.flush().await.expect("flush");
        tx
    });
    let receiver = tokio::spawn(async move {
        let mut pongs = 0;
        while pongs < PINGS {
            match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    assert_eq!(text.as_str(), r#"["pong",0]"#);
                    pongs += 1;
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        pongs
    });
    let started = Instant::now();
    while !receiver.is_finished() && started.elapsed() < Duration::from_secs(30) {
        bystander.round_trip("a ping flood").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _tx = sender.await.expect("sender");
    let pongs = receiver.await.expect("receiver");
    println!(
        "catalogue: {pongs} pongs for {PINGS} pings in {:?}",
        started.elapsed()
    );
    assert_eq!(pongs, PINGS, "every ping is answered");
    tally.add(PINGS);
    bystander.round_trip("the ping flood").await;
    server.stop().await;
}
