//! Actions and their server-side meta, as stored in the log and routed by the hub.
//!
//! An action is any JSON object with a string `type`. Its meta holds the Logux action id
//! (`"<ms> <nodeId> <seq>"`), the creation time on the server's clock, and the server-only
//! routing keys (`channels`, `users`, `clients`, `nodes`, `exclude_clients`) that never travel
//! on the wire.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::sync::{Arc, OnceLock};

/// A parsed Logux protocol 5 action id: `"<ms> <nodeId> <seq>"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActionId {
    /// Milliseconds on the creating node's own clock (never corrected by time fix).
    pub ms: i64,
    /// The node that created the action: `"<userId>:<clientId>:<tabId>"` or `"server:<id>"`.
    pub node: String,
    /// Sequence number that grows while the creating node's clock stands still.
    pub seq: u64,
}

impl ActionId {
    /// Parses `"<ms> <nodeId> <seq>"`. Returns `None` for anything else.
    pub fn parse(text: &str) -> Option<ActionId> {
        let (ms, node, seq) = ActionId::parts(text)?;
        Some(ActionId {
            ms,
            node: node.to_owned(),
            seq,
        })
    }

    /// Like `parse`, without copying the node id: `(ms, node, seq)`.
    pub fn parts(text: &str) -> Option<(i64, &str, u64)> {
        let mut parts = text.split(' ');
        let ms = parts.next()?.parse::<i64>().ok()?;
        let node = parts.next()?;
        let seq = parts.next()?.parse::<u64>().ok()?;
        if node.is_empty() || parts.next().is_some() {
            return None;
        }
        Some((ms, node, seq))
    }

    /// The client id part of the node id (`"<userId>:<random>"`, see `NodeIds`).
    pub fn client_id(&self) -> &str {
        NodeIds::client_id_of(&self.node)
    }
}

impl fmt::Display for ActionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.ms, self.node, self.seq)
    }
}

/// The ids derived from a node id, exactly as Logux's `parseId` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIds {
    /// The full node id, `"<userId>:<clientId>:<tabId>"`.
    pub node_id: String,
    /// `"<userId>:<clientId>"`: one browser profile or app install.
    pub client_id: String,
    /// The user id, absent when the node id has no `:`.
    pub user_id: Option<String>,
}

impl NodeIds {
    /// Splits a node id (or a whole action id) like Logux's `parseId`.
    pub fn parse(text: &str) -> NodeIds {
        let node = match text.split_once(' ') {
            Some((_, rest)) => rest.split(' ').next().unwrap_or(rest),
            None => text,
        };
        let mut parts = node.split(':');
        let first = parts.next().unwrap_or_default();
        match parts.next() {
            None => NodeIds {
                node_id: node.to_owned(),
                client_id: node.to_owned(),
                user_id: None,
            },
            Some(second) => NodeIds {
                node_id: node.to_owned(),
                client_id: format!("{first}:{second}"),
                user_id: Some(first.to_owned()),
            },
        }
    }

    /// The client id of a node id without allocating.
    pub fn client_id_of(node: &str) -> &str {
        match node.match_indices(':').nth(1) {
            Some((index, _)) => &node[..index],
            None => node,
        }
    }
}

/// Server-side meta of a stored action.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Meta {
    /// The Logux action id, `"<ms> <nodeId> <seq>"`.
    pub id: String,
    /// Creation time in ms on the server's clock.
    pub time: i64,
    /// Application subprotocol of the author.
    #[serde(default)]
    pub subprotocol: u32,
    /// Position in the server log, assigned by the log on append; 0 before that.
    #[serde(default)]
    pub added: u64,
    /// Channels the action is re-sent to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    /// Users whose connections get the action.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Client ids (`"<userId>:<random>"`) that get the action.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<String>,
    /// Node ids that get the action.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Client ids that never get the action through `users` or `channels`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_clients: Vec<String>,
    /// Set on the `logux/processed` answer to a plain action, whose id
    /// `Server::next_action_id` just made: no stored action can have it and nobody looks it
    /// up, so the log neither checks it for a duplicate nor indexes it. Not stored.
    #[serde(skip)]
    pub fresh_id: bool,
    /// Set on an answer (`logux/processed`, `logux/undo`) that follows the action it
    /// answers in the same append: the log stores it only when it stores that action, so a
    /// re-sent action that races its unflushed original gets no second answer. Not stored.
    #[serde(skip)]
    pub answers_previous: bool,
}

/// One action with its meta: the unit the log stores and the hub routes.
///
/// The action is held as a `Value`, as its JSON text, or both, each made from the other on
/// first use. Entries read back from the log start as text only: delivering them needs only
/// the text, so most history reads never build a `Value` (in a 15,000 client storm, decoding
/// stored actions into values was a tenth of the server's CPU).
#[derive(Clone)]
pub struct Entry {
    action: ActionBody,
    /// Its meta.
    pub meta: Meta,
}

/// An action as a value, as JSON text, or both; at least one is always set.
#[derive(Clone)]
struct ActionBody {
    /// The action object; always has a string `type`.
    value: OnceLock<Value>,
    /// The action's JSON text, written once and shared by every connection that sends it
    /// (one channel action goes to every subscriber).
    json: OnceLock<Arc<str>>,
}

impl ActionBody {
    fn from_value(action: Value) -> ActionBody {
        ActionBody {
            value: OnceLock::from(action),
            json: OnceLock::new(),
        }
    }
}

impl Entry {
    /// An entry for `action`, its JSON text made on first use.
    pub fn new(action: Value, meta: Meta) -> Entry {
        Entry {
            action: ActionBody::from_value(action),
            meta,
        }
    }

    /// An entry whose action is known only as JSON text, decoded on first use. `json` must be
    /// a JSON object (the log passes the text it stored, which it checked when reading it).
    pub fn from_action_json(json: Arc<str>, meta: Meta) -> Entry {
        Entry {
            action: ActionBody {
                value: OnceLock::new(),
                json: OnceLock::from(json),
            },
            meta,
        }
    }

    /// The action object, decoded from its text on first use.
    pub fn action(&self) -> &Value {
        self.action.value.get_or_init(|| {
            let text = self.action.json.get().map_or("null", |json| &**json);
            // The text was checked to be JSON when it was read; a value too deep for the
            // decoder is the only failure left, and it still travels as its text.
            serde_json::from_str(text).unwrap_or(Value::Null)
        })
    }

    /// Replaces the action (its JSON text is made again on first use).
    pub fn set_action(&mut self, action: Value) {
        self.action = ActionBody::from_value(action);
    }

    /// Drops the decoded action and keeps only its JSON text (made now if missing): an entry
    /// that stays in memory for long (the log's window of recent entries, queued deliveries)
    /// takes a fraction of the memory, and is decoded again only if somebody asks for it.
    pub fn keep_json_only(&mut self) {
        self.action_json();
        self.action.value.take();
    }

    /// The action as JSON text, serialized on first use.
    pub fn action_json(&self) -> &str {
        self.action.json.get_or_init(|| {
            let value = self.action.value.get().unwrap_or(&Value::Null);
            // `to_string` goes through `fmt::Display`, a byte-by-byte adapter: in a storm it
            // was most of the time the connections spent serializing.
            Arc::from(serde_json::to_string(value).unwrap_or_default())
        })
    }

    /// The action's `type`, or `""` when missing (never the case for validated actions).
    pub fn action_type(&self) -> &str {
        self.action()
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// The client id of the node that created the action.
    pub fn author_client_id(&self) -> &str {
        let node = self.meta.id.split(' ').nth(1).unwrap_or_default();
        NodeIds::client_id_of(node)
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        self.meta == other.meta && self.action() == other.action()
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("action", self.action())
            .field("meta", &self.meta)
            .finish()
    }
}

impl Serialize for Entry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct EntryValue<'a> {
            action: &'a Value,
            meta: &'a Meta,
        }
        EntryValue {
            action: self.action(),
            meta: &self.meta,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Entry, D::Error> {
        #[derive(Deserialize)]
        struct EntryValue {
            action: Value,
            meta: Meta,
        }
        let EntryValue { action, meta } = EntryValue::deserialize(deserializer)?;
        Ok(Entry::new(action, meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_action_ids() {
        let id = ActionId::parse("1795423671243 10:cWLyMz54:YOQOLqeW 3").expect("valid id");
        assert_eq!(id.ms, 1795423671243);
        assert_eq!(id.node, "10:cWLyMz54:YOQOLqeW");
        assert_eq!(id.seq, 3);
        assert_eq!(id.client_id(), "10:cWLyMz54");
        assert_eq!(id.to_string(), "1795423671243 10:cWLyMz54:YOQOLqeW 3");
    }

    #[test]
    fn rejects_malformed_action_ids() {
        for bad in ["", "1 a", "x a 0", "1 a b", "1  0", "1 a 0 extra", "1 a -1"] {
            assert_eq!(ActionId::parse(bad), None, "{bad:?}");
        }
    }

    fn meta(id: &str) -> Meta {
        Meta {
            id: id.to_owned(),
            time: 1,
            ..Meta::default()
        }
    }

    #[test]
    fn an_entry_known_as_text_decodes_its_action_on_first_use() {
        let text = r#"{"type":"a","n":1.5,"s":"\u00e9"}"#;
        let entry = Entry::from_action_json(Arc::from(text), meta("1 a 0"));
        assert_eq!(
            entry.action_json(),
            text,
            "the text travels as it was stored"
        );
        assert_eq!(entry.action_type(), "a");
        assert_eq!(
            entry.action(),
            &serde_json::json!({"type": "a", "n": 1.5, "s": "é"})
        );
        assert_eq!(entry.action()["s"], "é");
    }

    #[test]
    fn an_entry_keeping_only_its_text_has_the_same_action_and_text() {
        let action = serde_json::json!({"type": "a", "z": [1, {"b": null}], "a": "x"});
        let mut entry = Entry::new(action.clone(), meta("1 a 0"));
        let before = entry.clone();
        entry.keep_json_only();
        assert_eq!(
            entry.action_json(),
            serde_json::to_string(&action).expect("encode")
        );
        assert_eq!(entry, before);
        assert_eq!(entry.action(), &action);
    }

    #[test]
    fn setting_the_action_replaces_its_text() {
        let mut entry = Entry::from_action_json(Arc::from(r#"{"type":"a"}"#), meta("1 a 0"));
        entry.set_action(serde_json::json!({"type": "b"}));
        assert_eq!(entry.action_json(), r#"{"type":"b"}"#);
        assert_eq!(entry.action_type(), "b");
    }

    #[test]
    fn entries_serialize_as_action_and_meta_either_way() {
        let text = r#"{"type":"a","n":2}"#;
        let from_text = Entry::from_action_json(Arc::from(text), meta("1 a 0"));
        let from_value = Entry::new(serde_json::from_str(text).expect("json"), meta("1 a 0"));
        let encoded = serde_json::to_string(&from_text).expect("encode");
        assert_eq!(encoded, serde_json::to_string(&from_value).expect("encode"));
        let decoded: Entry = serde_json::from_str(&encoded).expect("decode");
        assert_eq!(decoded, from_value);
    }

    #[test]
    fn derives_ids_like_logux_parse_id() {
        let full = NodeIds::parse("10:abc:tab");
        assert_eq!(full.client_id, "10:abc");
        assert_eq!(full.user_id.as_deref(), Some("10"));
        let two = NodeIds::parse("10:abc");
        assert_eq!(two.client_id, "10:abc");
        let anon = NodeIds::parse("anon");
        assert_eq!(anon.client_id, "anon");
        assert_eq!(anon.user_id, None);
        let from_action = NodeIds::parse("1 10:abc:tab 0");
        assert_eq!(from_action.node_id, "10:abc:tab");
    }
}
