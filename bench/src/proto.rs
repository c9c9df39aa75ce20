//! The client side of Logux protocol 5, as far as a load generator needs it: building the
//! frames a client sends and reading the frames a server sends.
//!
//! Everything here is pure (no IO, no clock): callers pass `now` and the connection's
//! `baseTime`, so the wire format can be tested with exact strings.

use serde_json::Value;

/// The Logux protocol version ferry-bench speaks (what `@logux/client` 0.23 speaks).
pub const PROTOCOL_VERSION: u32 = 5;

/// Generates Logux action ids the way `@logux/core` 0.10 does: `<ms> <node> <seq>`, where
/// `seq` goes up while the clock does not move forward, so ids stay unique per node.
#[derive(Debug, Default, Clone)]
pub struct IdGen {
    /// The `ms` part of the last id handed out.
    last_ms: u64,
    /// The `seq` part of the last id handed out.
    seq: u32,
}

impl IdGen {
    /// The next `(ms, seq)` for an action created at `now_ms`.
    pub fn next(&mut self, now_ms: u64) -> (u64, u32) {
        if now_ms <= self.last_ms {
            self.seq += 1;
        } else {
            self.last_ms = now_ms;
            self.seq = 0;
        }
        (self.last_ms, self.seq)
    }
}

/// A JSON string literal (with quotes) for `text`.
pub fn json_str(text: &str) -> String {
    // Serializing a &str cannot fail.
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// `["connect",5,nodeId,synced,{"token":..,"subprotocol":N}]`.
pub fn connect_frame(node_id: &str, synced: u64, token: &str, subprotocol: u32) -> String {
    format!(
        "[\"connect\",{PROTOCOL_VERSION},{},{synced},{{\"token\":{},\"subprotocol\":{subprotocol}}}]",
        json_str(node_id),
        json_str(token)
    )
}

/// The wire meta of one of our own actions: `{"id":shift,"time":shift}` (or `[shift,seq]` for
/// a non-zero seq), relative to the connection's `baseTime`.
pub fn own_meta(ms: u64, seq: u32, base_time: i64) -> String {
    let shift = ms as i64 - base_time;
    if seq == 0 {
        format!("{{\"id\":{shift},\"time\":{shift}}}")
    } else {
        format!("{{\"id\":[{shift},{seq}],\"time\":{shift}}}")
    }
}

/// Builds a `sync` frame from already encoded `(action, meta)` JSON pairs.
#[derive(Debug)]
pub struct SyncFrame {
    /// The frame being built.
    text: String,
}

impl SyncFrame {
    /// Starts `["sync",added`.
    pub fn new(added: u64) -> SyncFrame {
        let mut text = String::with_capacity(256);
        text.push_str("[\"sync\",");
        text.push_str(&added.to_string());
        SyncFrame { text }
    }

    /// Appends one `action, meta` pair.
    pub fn push(&mut self, action: &str, meta: &str) {
        self.text.push(',');
        self.text.push_str(action);
        self.text.push(',');
        self.text.push_str(meta);
    }

    /// The finished frame.
    pub fn finish(mut self) -> String {
        self.text.push(']');
        self.text
    }
}

/// `{"type":"logux/subscribe","channel":..}` with an optional `since`.
pub fn subscribe_action(channel_json: &str, since: Option<&(String, i64)>) -> String {
    match since {
        None => format!("{{\"type\":\"logux/subscribe\",\"channel\":{channel_json}}}"),
        Some((id, time)) => format!(
            "{{\"type\":\"logux/subscribe\",\"channel\":{channel_json},\"since\":{{\"id\":{},\"time\":{time}}}}}",
            json_str(id)
        ),
    }
}

/// The benchmark action `{type, room, n, sent_at_ms}`. `type_json` and `room_json` are JSON
/// string literals; `sent_at_ms` is wall-clock milliseconds (fractional for µs precision).
pub fn bench_action(type_json: &str, room_json: &str, n: u64, sent_at_ms: f64) -> String {
    format!(
        "{{\"type\":{type_json},\"room\":{room_json},\"n\":{n},\"sent_at_ms\":{sent_at_ms:.3}}}"
    )
}

/// `["synced",added]`.
pub fn synced_frame(added: u64) -> String {
    format!("[\"synced\",{added}]")
}

/// `["ping",added]`.
pub fn ping_frame(added: u64) -> String {
    format!("[\"ping\",{added}]")
}

/// `["pong",added]`.
pub fn pong_frame(added: u64) -> String {
    format!("[\"pong\",{added}]")
}

/// A message a server sends to a client.
#[derive(Debug)]
pub enum ServerMsg {
    /// `["headers",{...}]`: nothing to do for a raw client.
    Headers,
    /// `["connected",5,serverNode,[start,end],{...}]`; `end` is the connection's `baseTime`.
    Connected {
        /// The protocol version the server answered with.
        version: i64,
        /// The server's node id (short id forms in `sync` refer to it).
        server_node: String,
        /// Server time when authentication finished: the `baseTime`.
        end: i64,
    },
    /// `["sync",added,action,meta,...]`.
    Sync {
        /// The number to echo in `synced`.
        added: u64,
        /// The action/meta pairs, as far as ferry-bench reads them.
        pairs: Vec<Pair>,
    },
    /// `["synced",added]`.
    Synced(u64),
    /// `["ping",added]` (the value is the server's own log position; a client answers with
    /// its own).
    Ping,
    /// `["pong",added]`.
    Pong,
    /// `["error",type,options?]`.
    Error(String),
    /// `["debug","error",text]` (development mode only).
    Debug,
    /// A type a protocol 5 client does not know.
    Unknown(String),
}

/// The fields of a received action that ferry-bench reads; the others are skipped while
/// parsing, without building them. Each is kept as it came (`null` when absent), so an
/// action of another shape is not an error.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct Action {
    /// `type`.
    #[serde(rename = "type")]
    kind: Value,
    /// `id`: the action a `logux/processed` or `logux/undo` answers.
    id: Value,
    /// `reason` of a `logux/undo`.
    reason: Value,
    /// `n`: the benchmark action's number.
    n: Value,
    /// `sent_at_ms` of a benchmark action.
    sent_at_ms: Value,
    /// `room` of a benchmark action.
    room: Value,
}

impl Action {
    /// `type`, or "" when it is not a string.
    pub fn kind(&self) -> &str {
        self.kind.as_str().unwrap_or("")
    }
    /// `id` as a string.
    pub fn id(&self) -> Option<&str> {
        self.id.as_str()
    }
    /// `reason` as a string.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_str()
    }
    /// `n` as an unsigned integer.
    pub fn n(&self) -> Option<u64> {
        self.n.as_u64()
    }
    /// `sent_at_ms` as a number.
    pub fn sent_at_ms(&self) -> Option<f64> {
        self.sent_at_ms.as_f64()
    }
    /// `room` as a string.
    pub fn room(&self) -> Option<&str> {
        self.room.as_str()
    }
}

/// The fields of a received meta that ferry-bench reads (`id`, `time`); the others are skipped.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct Meta {
    /// `id`, in protocol 5's short forms (see [`decode_meta_id`]).
    pub id: Value,
    /// `time`, relative to the connection's `baseTime`.
    time: Value,
}

impl Meta {
    /// `time` as an integer.
    pub fn time(&self) -> Option<i64> {
        self.time.as_i64()
    }
}

/// One action/meta pair of a server `sync`.
#[derive(Debug)]
pub struct Pair {
    /// The action.
    pub action: Action,
    /// Its meta.
    pub meta: Meta,
}

/// Why a server frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not JSON.
    #[error("server frame is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// JSON, but not a Logux message.
    #[error("server frame is not a logux message: {0}")]
    Shape(&'static str),
}

fn as_u64(value: Option<&Value>) -> Result<u64, ParseError> {
    match value {
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .ok_or(ParseError::Shape("expected a non-negative number")),
        None => Err(ParseError::Shape("missing number")),
    }
}

fn as_i64(value: Option<&Value>) -> Result<i64, ParseError> {
    match value {
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().map(|f| f as i64))
            .ok_or(ParseError::Shape("expected a number")),
        None => Err(ParseError::Shape("missing number")),
    }
}

/// Reads one server frame. A `sync`'s pairs are read straight into [`Pair`]s (no JSON tree
/// of the whole frame), since a client under load receives thousands of actions per second.
pub fn parse_server(text: &str) -> Result<ServerMsg, ParseError> {
    let Frame(frame) = serde_json::from_str(text)?;
    let (kind, mut items) = match frame {
        RawFrame::Sync { added, pairs } => {
            return Ok(ServerMsg::Sync {
                added: as_u64(Some(&added))?,
                pairs,
            })
        }
        RawFrame::OddSync => return Err(ParseError::Shape("sync with an odd length")),
        RawFrame::Other { kind, items } => (kind, items),
    };
    // `items` holds the elements after the type.
    items.insert(0, Value::Null);
    Ok(match kind.as_str() {
        "headers" => ServerMsg::Headers,
        "connected" => {
            let version = as_i64(items.get(1))?;
            let server_node = items
                .get(2)
                .and_then(Value::as_str)
                .ok_or(ParseError::Shape("connected without a server node id"))?
                .to_owned();
            let times = items
                .get(3)
                .and_then(Value::as_array)
                .ok_or(ParseError::Shape("connected without [start, end]"))?;
            as_i64(times.first())?;
            ServerMsg::Connected {
                version,
                server_node,
                end: as_i64(times.get(1))?,
            }
        }
        "synced" => ServerMsg::Synced(as_u64(items.get(1))?),
        "ping" => {
            as_u64(items.get(1))?;
            ServerMsg::Ping
        }
        "pong" => {
            as_u64(items.get(1))?;
            ServerMsg::Pong
        }
        "error" => ServerMsg::Error(
            items
                .get(1)
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned(),
        ),
        "debug" => ServerMsg::Debug,
        _ => ServerMsg::Unknown(kind),
    })
}

/// A server frame as the deserializer sees it: a `sync` read pair by pair, anything else as
/// its type and the elements after it.
enum RawFrame {
    Sync { added: Value, pairs: Vec<Pair> },
    OddSync,
    Other { kind: String, items: Vec<Value> },
}

/// Deserializes a JSON array whose first element names the message type.
struct Frame(RawFrame);

impl<'de> serde::Deserialize<'de> for Frame {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Frame, D::Error> {
        deserializer.deserialize_seq(FrameVisitor)
    }
}

struct FrameVisitor;

impl<'de> serde::de::Visitor<'de> for FrameVisitor {
    type Value = Frame;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Logux message: an array whose first element is a string")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Frame, A::Error> {
        use serde::de::Error;
        let kind: String = seq
            .next_element()?
            .ok_or_else(|| A::Error::custom("empty message"))?;
        if kind != "sync" {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<Value>()? {
                items.push(item);
            }
            return Ok(Frame(RawFrame::Other { kind, items }));
        }
        let added: Value = seq.next_element()?.unwrap_or(Value::Null);
        let mut pairs = Vec::new();
        while let Some(action) = seq.next_element::<Action>()? {
            let Some(meta) = seq.next_element::<Meta>()? else {
                return Ok(Frame(RawFrame::OddSync));
            };
            pairs.push(Pair { action, meta });
        }
        Ok(Frame(RawFrame::Sync { added, pairs }))
    }
}

/// A Logux action id `"<ms> <node> <seq>"`, borrowed.
#[derive(Debug, PartialEq, Eq)]
pub struct ActionId<'a> {
    /// The creator's clock, in ms.
    pub ms: u64,
    /// The creating node.
    pub node: &'a str,
    /// The sequence within `ms`.
    pub seq: u32,
}

/// Splits `"<ms> <node> <seq>"`.
pub fn parse_action_id(id: &str) -> Option<ActionId<'_>> {
    let mut parts = id.split(' ');
    let ms = parts.next()?.parse().ok()?;
    let node = parts.next()?;
    let seq = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(ActionId { ms, node, seq })
}

/// The absolute id of an action received in a server `sync` (protocol 5 decoding: a number
/// or `[shift, seq]` is the server's own action, `[shift, node, seq]` anybody's).
pub fn decode_meta_id(id: &Value, base_time: i64, server_node: &str) -> Option<String> {
    let num = |v: &Value| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64));
    match id {
        Value::Number(_) => Some(format!("{} {server_node} 0", num(id)? + base_time)),
        Value::Array(parts) => match parts.as_slice() {
            [shift, seq] => Some(format!(
                "{} {server_node} {}",
                num(shift)? + base_time,
                num(seq)?
            )),
            [shift, Value::String(node), seq] => {
                Some(format!("{} {node} {}", num(shift)? + base_time, num(seq)?))
            }
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_get_a_sequence_while_the_clock_stands_still() {
        let mut ids = IdGen::default();
        assert_eq!(ids.next(100), (100, 0));
        assert_eq!(ids.next(100), (100, 1));
        assert_eq!(ids.next(99), (100, 2));
        assert_eq!(ids.next(101), (101, 0));
    }

    #[test]
    fn frames_match_the_wire_format() {
        assert_eq!(
            connect_frame("u1:c1:t", 7, "secret", 1),
            r#"["connect",5,"u1:c1:t",7,{"token":"secret","subprotocol":1}]"#
        );
        assert_eq!(own_meta(1_000, 0, 1_031), r#"{"id":-31,"time":-31}"#);
        assert_eq!(own_meta(1_040, 2, 1_031), r#"{"id":[9,2],"time":9}"#);
        let mut sync = SyncFrame::new(3);
        sync.push(&subscribe_action("\"room/a\"", None), &own_meta(5, 0, 0));
        sync.push(
            &bench_action("\"room/message\"", "\"a\"", 4, 12.5),
            &own_meta(5, 1, 0),
        );
        assert_eq!(
            sync.finish(),
            r#"["sync",3,{"type":"logux/subscribe","channel":"room/a"},{"id":5,"time":5},{"type":"room/message","room":"a","n":4,"sent_at_ms":12.500},{"id":[5,1],"time":5}]"#
        );
        assert_eq!(
            subscribe_action("\"room/a\"", Some(&("9 server:x 0".to_owned(), 9))),
            r#"{"type":"logux/subscribe","channel":"room/a","since":{"id":"9 server:x 0","time":9}}"#
        );
    }

    #[test]
    fn server_messages_are_read() {
        match parse_server(r#"["connected",5,"server:x",[10,12],{"subprotocol":1}]"#) {
            Ok(ServerMsg::Connected {
                version: 5,
                server_node,
                end: 12,
            }) => assert_eq!(server_node, "server:x"),
            other => panic!("{other:?}"),
        }
        match parse_server(
            r#"["sync",4,{"type":"a","n":3,"x":{"y":[1]}},{"id":1,"time":1,"added":9},{"type":"logux/undo","id":"1 a:b:c 0","reason":"denied","action":{"type":"b"}},{"id":[2,"a:b:c",0],"time":2}]"#,
        ) {
            Ok(ServerMsg::Sync { added: 4, pairs }) => {
                assert_eq!(pairs.len(), 2);
                assert_eq!(pairs[0].action.kind(), "a");
                assert_eq!(pairs[0].action.n(), Some(3));
                assert_eq!(pairs[0].meta.time(), Some(1));
                assert_eq!(pairs[1].action.id(), Some("1 a:b:c 0"));
                assert_eq!(pairs[1].action.reason(), Some("denied"));
                assert_eq!(pairs[1].meta.id, serde_json::json!([2, "a:b:c", 0]));
            }
            other => panic!("{other:?}"),
        }
        // An action of another shape is no error.
        match parse_server(r#"["sync",5,{"type":7,"id":{"a":1}},{}]"#) {
            Ok(ServerMsg::Sync { pairs, .. }) => {
                assert_eq!(pairs[0].action.kind(), "");
                assert_eq!(pairs[0].action.id(), None);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_server(r#"["synced",3]"#),
            Ok(ServerMsg::Synced(3))
        ));
        assert!(matches!(
            parse_server(r#"["error","wrong-format"]"#),
            Ok(ServerMsg::Error(kind)) if kind == "wrong-format"
        ));
        assert!(matches!(parse_server(r#"["ping",3]"#), Ok(ServerMsg::Ping)));
        assert!(matches!(
            parse_server(r#"["ready",3]"#),
            Ok(ServerMsg::Unknown(_))
        ));
        assert!(parse_server("hello").is_err());
        assert!(parse_server(r#"["sync",1,{}]"#).is_err());
    }

    #[test]
    fn ids_are_decoded_relative_to_base_time() {
        let base = 1_000;
        let v: Value = serde_json::from_str("7").unwrap_or_default();
        assert_eq!(
            decode_meta_id(&v, base, "server:x").as_deref(),
            Some("1007 server:x 0")
        );
        let v: Value = serde_json::from_str("[-3,2]").unwrap_or_default();
        assert_eq!(
            decode_meta_id(&v, base, "server:x").as_deref(),
            Some("997 server:x 2")
        );
        let v: Value = serde_json::from_str(r#"[5,"u:c:t",1]"#).unwrap_or_default();
        assert_eq!(
            decode_meta_id(&v, base, "server:x").as_deref(),
            Some("1005 u:c:t 1")
        );
        assert_eq!(
            parse_action_id("1795423671243 10:cW:YO 3"),
            Some(ActionId {
                ms: 1_795_423_671_243,
                node: "10:cW:YO",
                seq: 3
            })
        );
        assert_eq!(parse_action_id("1 a"), None);
    }
}
