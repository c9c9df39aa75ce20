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

/// Parses and validates one text frame.
pub fn parse(frame: &str) -> Result<Message, ProtocolError> {
    let value: Value =
        serde_json::from_str(frame).map_err(|_| ProtocolError::wrong_format(frame))?;
    let Value::Array(items) = value else {
        return Err(ProtocolError::wrong_format(&value.to_string()));
    };
    let wrong_format = || ProtocolError::wrong_format(&Value::Array(items.clone()).to_string());
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
            let times_ok = matches!(items.get(3), Some(Value::Array(pair))
                if pair.len() == 2 && pair.iter().all(Value::is_number));
            let options_ok = len == 4 || matches!(items.get(4), Some(Value::Object(_)));
            if !(len == 4 || len == 5) || !times_ok || !options_ok {
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
        other => return Err(ProtocolError::UnknownMessage(other.to_owned())),
    };
    Ok(message)
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
    use super::*;

    fn error_of(frame: &str) -> String {
        match parse(frame) {
            Ok(message) => panic!("expected an error for {frame}, got {message:?}"),
            Err(error) => error.to_frame(),
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
