//! Protocol 5 messages and their validation, exactly as `@logux/server` validates them, except
//! that `null` where an object belongs is a `wrong-format` error instead of a crash.

use super::error::ProtocolError;
use serde_json::{Map, Number, Value};

/// One validated message from a peer.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `["connect", protocol, nodeId, synced, options?]`.
    Connect {
        /// Protocol version, echoed in `wrong-protocol`.
        protocol: Number,
        /// The client's node id.
        node_id: String,
        /// The highest `added` the client got from us.
        synced: Number,
        /// `token`, `subprotocol`.
        options: Map<String, Value>,
    },
    /// `["connected", ...]`: only servers send it; a server ignores it.
    Connected,
    /// `["error", type, options?]`.
    Error {
        /// The error type.
        kind: String,
    },
    /// `["ping", synced]`.
    Ping,
    /// `["pong", synced]`.
    Pong,
    /// `["sync", added, action1, meta1, ...]`.
    Sync {
        /// The sender's log position for this batch, echoed in `synced`.
        added: Number,
        /// The action/meta pairs, shapes already checked.
        pairs: Vec<(Value, Map<String, Value>)>,
    },
    /// `["synced", added]`.
    Synced,
    /// `["debug", "error", text]`.
    Debug,
    /// `["headers", object]`.
    Headers(Map<String, Value>),
    /// `["duilian", line]`.
    Duilian(String),
}

impl Message {
    /// Messages that are handled before authentication instead of being queued.
    pub fn allowed_before_auth(&self) -> bool {
        matches!(
            self,
            Message::Connect { .. }
                | Message::Connected
                | Message::Error { .. }
                | Message::Debug
                | Message::Headers(_)
        )
    }
}

/// False only when a frame plainly names another message than `sync` (`["ping", 1]`): a
/// look at its first element without parsing it, so that a large `sync` can wait undecoded
/// (see `server::connection`). Whatever the look cannot tell (a name with escapes, a frame
/// that is not an array) may be a `sync`.
pub fn may_be_sync(frame: &str) -> bool {
    const JSON_WHITESPACE: [char; 4] = [' ', '\t', '\n', '\r'];
    let Some(rest) = frame.trim_start_matches(JSON_WHITESPACE).strip_prefix('[') else {
        return true;
    };
    let Some(name) = rest.trim_start_matches(JSON_WHITESPACE).strip_prefix('"') else {
        return true;
    };
    match name.find(['"', '\\']) {
        Some(end) if name[end..].starts_with('"') => &name[..end] == "sync",
        _ => true,
    }
}

/// Parses and validates one text frame.
pub fn parse(frame: &str) -> Result<Message, ProtocolError> {
    parse_limited(frame, usize::MAX)
}

/// Parses and validates one text frame; a `sync` with more than `sync_pairs_max` pairs is
/// refused while it is read, so it costs the memory of `sync_pairs_max` pairs, not of the
/// whole frame (the rest is only counted, for the error).
pub fn parse_limited(frame: &str, sync_pairs_max: usize) -> Result<Message, ProtocolError> {
    let items = match read_items(frame, sync_pairs_max) {
        Ok(Items::Values(items)) => items,
        Ok(Items::TooManyPairs(pairs)) => {
            return Err(ProtocolError::wrong_format(&format!(
                "sync with {pairs} actions is over the limit of {sync_pairs_max}"
            )))
        }
        Ok(Items::NotArray(value)) => return Err(ProtocolError::wrong_format(&echo(&value))),
        Err(_) => return Err(ProtocolError::wrong_format(frame)),
    };
    let wrong_format = || ProtocolError::wrong_format(&echo_items(&items));
    let Some(Value::String(kind)) = items.first() else {
        return Err(wrong_format());
    };
    let len = items.len();
    let message = match kind.as_str() {
        "connect" => {
            let (Some(protocol), Some(node_id), Some(synced)) = (
                number(items.get(1)),
                string(items.get(2)),
                number(items.get(3)),
            ) else {
                return Err(wrong_format());
            };
            let options = match (len, items.get(4)) {
                (4, _) => Map::new(),
                (5, Some(Value::Object(options))) => options.clone(),
                _ => return Err(wrong_format()),
            };
            Message::Connect {
                protocol,
                node_id,
                synced,
                options,
            }
        }
        "connected" => {
            let ids_ok = number(items.get(1)).is_some() && string(items.get(2)).is_some();
            let times_ok = matches!(items.get(3), Some(Value::Array(pair))
                if pair.len() == 2 && pair.iter().all(Value::is_number));
            let options_ok = len == 4 || matches!(items.get(4), Some(Value::Object(_)));
            if !(len == 4 || len == 5) || !ids_ok || !times_ok || !options_ok {
                return Err(wrong_format());
            }
            Message::Connected
        }
        "error" => match (len, items.get(1)) {
            (2 | 3, Some(Value::String(kind))) => Message::Error { kind: kind.clone() },
            _ => return Err(wrong_format()),
        },
        "ping" | "pong" | "synced" => {
            if len != 2 || number(items.get(1)).is_none() {
                return Err(wrong_format());
            }
            match kind.as_str() {
                "ping" => Message::Ping,
                "pong" => Message::Pong,
                _ => Message::Synced,
            }
        }
        "sync" => {
            let Some(added) = number(items.get(1)) else {
                return Err(wrong_format());
            };
            if len % 2 != 0 {
                return Err(wrong_format());
            }
            let shapes_ok = items[2..].chunks_exact(2).all(|pair| {
                matches!((&pair[0], &pair[1]), (Value::Object(action), Value::Object(meta))
                    if matches!(action.get("type"), Some(Value::String(_)))
                        && matches!(meta.get("time"), Some(Value::Number(_)))
                        && valid_wire_id(meta.get("id")))
            });
            if !shapes_ok {
                return Err(wrong_format());
            }
            // The shapes are checked: take the pairs without copying them.
            let mut pairs = Vec::with_capacity((len - 2) / 2);
            let mut rest = items.into_iter().skip(2);
            while let (Some(action), Some(Value::Object(meta))) = (rest.next(), rest.next()) {
                pairs.push((action, meta));
            }
            Message::Sync { added, pairs }
        }
        "debug" => match (len, items.get(1), items.get(2)) {
            (3, Some(Value::String(level)), Some(Value::String(_))) if level == "error" => {
                Message::Debug
            }
            _ => return Err(wrong_format()),
        },
        "headers" => match (len, items.get(1)) {
            (2, Some(Value::Object(headers))) => Message::Headers(headers.clone()),
            _ => return Err(wrong_format()),
        },
        "duilian" => match (len, items.get(1)) {
            (2, Some(Value::String(line))) => Message::Duilian(line.clone()),
            _ => return Err(wrong_format()),
        },
        other => return Err(ProtocolError::unknown_message(other)),
    };
    Ok(message)
}

/// The items of a frame, as far as they are kept.
enum Items {
    /// A JSON array.
    Values(Vec<Value>),
    /// A `sync` with this many pairs, over the limit: its items were not kept.
    TooManyPairs(usize),
    /// JSON that is not an array.
    NotArray(Value),
}

/// Reads a frame's JSON. An array is read item by item, so that a `sync` over the pair
/// limit is not built whole.
fn read_items(frame: &str, sync_pairs_max: usize) -> Result<Items, serde_json::Error> {
    if !frame
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('[')
    {
        return serde_json::from_str(frame).map(Items::NotArray);
    }
    let mut deserializer = serde_json::Deserializer::from_str(frame);
    let items = serde::Deserializer::deserialize_seq(
        &mut deserializer,
        ItemsVisitor {
            sync_items_max: sync_pairs_max.saturating_mul(2).saturating_add(2),
        },
    )?;
    deserializer.end()?;
    Ok(items)
}

struct ItemsVisitor {
    /// `"sync"`, `added` and the pairs.
    sync_items_max: usize,
}

impl<'de> serde::de::Visitor<'de> for ItemsVisitor {
    type Value = Items;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a protocol message")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Items, A::Error> {
        let mut items = Vec::new();
        let Some(first) = seq.next_element::<Value>()? else {
            return Ok(Items::Values(items));
        };
        let items_max = if first.as_str() == Some("sync") {
            self.sync_items_max
        } else {
            usize::MAX
        };
        items.push(first);
        while items.len() < items_max {
            match seq.next_element::<Value>()? {
                Some(item) => items.push(item),
                None => return Ok(Items::Values(items)),
            }
        }
        if seq.next_element::<serde::de::IgnoredAny>()?.is_none() {
            return Ok(Items::Values(items));
        }
        let mut count = items.len() + 1;
        drop(items);
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
            count += 1;
        }
        Ok(Items::TooManyPairs(count.saturating_sub(2) / 2))
    }
}

/// A value's JSON for a `wrong-format` echo, written only as far as the echo is kept.
fn echo(value: &Value) -> String {
    let mut out = EchoWriter(Vec::new());
    // The writer refuses bytes beyond the echo limit: the error only means "cut".
    let _ = serde_json::to_writer(&mut out, value);
    String::from_utf8_lossy(&out.0).into_owned()
}

/// `echo` of the array of `items`, without copying them into one value.
fn echo_items(items: &[Value]) -> String {
    let mut out = EchoWriter(Vec::new());
    let _ = (|| -> std::io::Result<()> {
        std::io::Write::write_all(&mut out, b"[")?;
        for (index, item) in items.iter().enumerate() {
            if index > 0 {
                std::io::Write::write_all(&mut out, b",")?;
            }
            serde_json::to_writer(&mut out, item)?;
        }
        std::io::Write::write_all(&mut out, b"]")
    })();
    String::from_utf8_lossy(&out.0).into_owned()
}

/// Keeps the first `WRONG_FORMAT_ECHO_BYTES_MAX` bytes (plus up to 3, so a character cut
/// by the limit stays whole for `ProtocolError::wrong_format` to cut cleanly) and then
/// refuses more.
struct EchoWriter(Vec<u8>);

impl std::io::Write for EchoWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let room = (super::error::WRONG_FORMAT_ECHO_BYTES_MAX + 3).saturating_sub(self.0.len());
        if room == 0 {
            return Err(std::io::Error::other("echo is long enough"));
        }
        let taken = bytes.len().min(room);
        self.0.extend_from_slice(&bytes[..taken]);
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A wire `meta.id`: a number, `[number, number]`, or `[number, string, number]`.
fn valid_wire_id(id: Option<&Value>) -> bool {
    match id {
        Some(Value::Number(_)) => true,
        Some(Value::Array(parts)) => matches!(
            parts.as_slice(),
            [Value::Number(_), Value::Number(_)]
                | [Value::Number(_), Value::String(_), Value::Number(_)]
        ),
        _ => false,
    }
}

fn number(value: Option<&Value>) -> Option<Number> {
    match value {
        Some(Value::Number(number)) => Some(number.clone()),
        _ => None,
    }
}

fn string(value: Option<&Value>) -> Option<String> {
    match value {
        Some(Value::String(text)) => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::error::WRONG_FORMAT_ECHO_BYTES_MAX;
    use super::*;

    fn error_of(frame: &str) -> String {
        match parse(frame) {
            Ok(message) => panic!("expected an error for {frame}, got {message:?}"),
            Err(error) => error.to_frame(),
        }
    }

    #[test]
    fn only_a_frame_that_plainly_names_another_message_is_known_not_to_be_a_sync() {
        for frame in [
            r#"["sync",1,{"type":"a"},{"id":"1 a:1 0","time":1}]"#,
            " [ \"sync\" , 1]",
            r#"["\u0073ync",1]"#,
            r#"["sy\"nc"]"#,
            r#"{"sync":1}"#,
            "[1]",
            "not json",
            "",
        ] {
            assert!(may_be_sync(frame), "{frame}");
        }
        for frame in [
            r#"["ping",1]"#,
            " [\"synced\",3]",
            r#"["syncs"]"#,
            r#"["pong",1]"#,
        ] {
            assert!(!may_be_sync(frame), "{frame}");
        }
    }

    #[test]
    fn non_json_frame_is_wrong_format_with_raw_text() {
        assert_eq!(error_of("hello"), r#"["error","wrong-format","hello"]"#);
    }

    #[test]
    fn non_array_is_wrong_format_with_its_json() {
        assert_eq!(
            error_of(r#"{"a":1}"#),
            r#"["error","wrong-format","{\"a\":1}"]"#
        );
    }

    #[test]
    fn unknown_type_is_unknown_message() {
        assert_eq!(
            error_of(r#"["foo",1]"#),
            r#"["error","unknown-message","foo"]"#
        );
    }

    #[test]
    fn a_huge_unknown_message_name_is_echoed_cut() {
        let name = "x".repeat(100_000);
        let error = error_of(&format!(r#"["{name}",1]"#));
        assert_eq!(
            error,
            format!(r#"["error","unknown-message","{}"]"#, &name[..1024])
        );
    }

    #[test]
    fn null_where_an_object_belongs_is_wrong_format_not_a_crash() {
        for frame in [
            r#"["headers",null]"#,
            r#"["connect",5,"10:a:b",0,null]"#,
            r#"["sync",1,null,{"id":1,"time":1}]"#,
            r#"["sync",1,{"type":"a"},null]"#,
            r#"[null]"#,
            r#"null"#,
        ] {
            assert!(error_of(frame).contains("wrong-format"), "{frame}");
        }
    }

    #[test]
    fn wrong_arity_is_wrong_format() {
        for frame in [
            r#"["ping"]"#,
            r#"["ping",1,2]"#,
            r#"["synced"]"#,
            r#"["connect",5,"a"]"#,
            r#"["connect",5,"a",0,{},1]"#,
            r#"["sync",1,{"type":"a"}]"#,
            r#"["headers",{},1]"#,
            r#"["debug","info","x"]"#,
            r#"["error"]"#,
        ] {
            assert!(error_of(frame).contains("wrong-format"), "{frame}");
        }
    }

    #[test]
    fn accepts_every_wire_id_form() {
        let frame = r#"["sync",3,{"type":"a"},{"id":1,"time":1},{"type":"b"},{"id":[1,2],"time":1},{"type":"c"},{"id":[1,"10:a:b",0],"time":1}]"#;
        match parse(frame) {
            Ok(Message::Sync { pairs, .. }) => assert_eq!(pairs.len(), 3),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn empty_sync_is_legal() {
        assert!(matches!(parse(r#"["sync",0]"#), Ok(Message::Sync { .. })));
    }

    #[test]
    fn deep_nesting_is_wrong_format_without_overflowing_the_stack() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(error_of(&deep).contains("wrong-format"));
    }

    // Found by tests/catalogue.rs: `@logux/core` also requires a number and a string before
    // the times of `connected`; these were accepted (and ignored).
    #[test]
    fn connected_needs_a_numeric_protocol_and_a_string_node_id() {
        for frame in [
            r#"["connected",null,"server:x",[0,0]]"#,
            r#"["connected","5","server:x",[0,0]]"#,
            r#"["connected",5,null,[0,0]]"#,
            r#"["connected",5,1,[0,0]]"#,
        ] {
            assert_eq!(
                error_of(frame),
                ProtocolError::wrong_format(frame).to_frame(),
                "{frame}"
            );
        }
        assert_eq!(
            parse(r#"["connected",5,"server:x",[0,0]]"#),
            Ok(Message::Connected)
        );
    }

    // Found by tests/catalogue.rs: a `sync` of a million pairs over a limit of 100,000 was
    // parsed whole (about 1.2 GiB for 34 MiB of text) before the limit was checked.
    #[test]
    fn a_sync_over_the_pair_limit_is_refused_while_it_is_read() {
        let mut frame = String::from(r#"["sync",1"#);
        for n in 1..=5 {
            frame.push_str(&format!(r#",{{"type":"a"}},{{"id":{n},"time":1}}"#));
        }
        frame.push(']');
        assert!(
            matches!(parse_limited(&frame, 5), Ok(Message::Sync { pairs, .. }) if pairs.len() == 5)
        );
        assert_eq!(
            parse_limited(&frame, 4),
            Err(ProtocolError::wrong_format(
                "sync with 5 actions is over the limit of 4"
            ))
        );
        assert_eq!(
            parse_limited(&frame, 0),
            Err(ProtocolError::wrong_format(
                "sync with 5 actions is over the limit of 0"
            ))
        );
        // Other messages have no pair limit, and bad JSON after the limit is still bad JSON.
        assert_eq!(parse_limited(r#"["ping",1]"#, 0), Ok(Message::Ping));
        let broken = format!("{}x", &frame[..frame.len() - 1]);
        assert_eq!(
            parse_limited(&broken, 1),
            Err(ProtocolError::wrong_format(&broken))
        );
    }

    #[test]
    fn a_long_wrong_format_echo_is_cut_without_splitting_a_character() {
        let frame = format!(r#"["sync",1,{{"type":"{}"}}]"#, "é".repeat(2000));
        let ProtocolError::WrongFormat(echo) = parse(&frame)
            .err()
            .unwrap_or(ProtocolError::WrongCredentials)
        else {
            panic!("wrong-format expected");
        };
        assert!(echo.len() <= WRONG_FORMAT_ECHO_BYTES_MAX);
        assert!(echo.len() > WRONG_FORMAT_ECHO_BYTES_MAX - 4);
        assert!(frame.starts_with(&echo));
        let object = format!(r#"{{"a":"{}"}}"#, "€".repeat(1000));
        assert_eq!(parse(&object), Err(ProtocolError::wrong_format(&object)));
    }

    #[test]
    fn wrong_meta_shapes_are_wrong_format() {
        for frame in [
            r#"["sync",1,{"type":"a"},{"id":"1 a 0","time":1}]"#,
            r#"["sync",1,{"type":"a"},{"id":[1],"time":1}]"#,
            r#"["sync",1,{"type":"a"},{"id":1}]"#,
            r#"["sync",1,{"type":1},{"id":1,"time":1}]"#,
            r#"["sync",1,[],{"id":1,"time":1}]"#,
        ] {
            assert!(error_of(frame).contains("wrong-format"), "{frame}");
        }
    }
}
