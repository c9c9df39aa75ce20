//! The per-connection protocol 5 state machine.
//!
//! A `Session` is fed text frames and the current time, and answers with `Output`s: frames to
//! send, a request to authenticate, decoded actions to process, or a close. It never does IO,
//! so transports (WebSocket, long-poll) only move frames and the golden transcripts drive it
//! exactly.

use super::codec::{self, DecodeError};
use super::error::ProtocolError;
use super::message::{self, Message};
use super::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use crate::action::{Entry, Meta, NodeIds};
use serde_json::{json, Map, Number, Value};
use std::collections::VecDeque;
use std::sync::Arc;

/// Meta keys a client may send; any other key gets the action denied (Logux rule).
pub const CLIENT_META_KEYS: [&str; 3] = ["id", "time", "subprotocol"];

/// Messages held while authentication runs; a client that sends more is disconnected.
pub const PREAUTH_QUEUE_MESSAGES_MAX: usize = 256;

/// Frame bytes held while authentication runs; a client that sends more is disconnected.
/// Logux clients send nothing but `connect` (and `headers`) before `connected`, so this only
/// stops an unauthenticated peer from making the server hold up to
/// `PREAUTH_QUEUE_MESSAGES_MAX` parsed frames of `frame_bytes_max` each.
pub const PREAUTH_QUEUE_BYTES_MAX: usize = 1024 * 1024;

/// Settings shared by all sessions of a server.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// This server's node id, `"server:<id>"`: its actions use the short id forms.
    pub server_node_id: String,
    /// Development mode sends `headers {env: "development"}` and `debug` messages.
    pub development: bool,
    /// The server's application subprotocol, sent in `connected`.
    pub subprotocol: u32,
    /// Clients with an older subprotocol get `wrong-subprotocol`.
    pub min_subprotocol: u32,
    /// Most action/meta pairs accepted in one `sync`.
    pub sync_pairs_max: usize,
}

/// Credentials and identity from `connect`, for the authenticator.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthRequest {
    /// Node, client and user ids derived from the node id.
    pub ids: NodeIds,
    /// The `token` option, when it is a string.
    pub token: Option<String>,
    /// The client's subprotocol (0 when missing).
    pub subprotocol: u32,
    /// The highest `added` of ours the client has seen.
    pub synced: u64,
}

/// One action from a client's `sync`, decoded to absolute ids and times.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingEntry {
    /// The action and its meta (`id`, `time`, `subprotocol` only).
    pub entry: Entry,
    /// Why the action is refused before any rule runs (`logux/undo` reason `denied`).
    pub denied: Option<&'static str>,
}

/// A client's `sync` message, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingSync {
    /// The client's `added`, echoed as received in `synced`.
    pub added: Number,
    /// The actions, in message order.
    pub entries: Vec<IncomingEntry>,
}

/// What the session asks its driver to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this text frame.
    Frame(String),
    /// Check these credentials, then call `Session::authenticated` or `Session::auth_failed`.
    Authenticate(AuthRequest),
    /// Process these actions; answer with `Session::synced_frame` once they are durable.
    Actions(IncomingSync),
    /// Send this error (`ProtocolError::to_frame`); a `Close` follows.
    Error(ProtocolError),
    /// Close the connection after the frames before this output.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingConnect,
    Authenticating,
    Authenticated,
    Closed,
}

/// Identity of an authenticated peer.
#[derive(Debug, Clone, PartialEq)]
pub struct Remote {
    /// Its ids.
    pub ids: NodeIds,
    /// Its application subprotocol.
    pub subprotocol: u32,
    /// The `synced` it sent in `connect`.
    pub synced: u64,
}

/// The protocol state of one connection.
#[derive(Debug)]
pub struct Session {
    config: Arc<SessionConfig>,
    state: State,
    /// Messages received before authentication finished, replayed after it.
    queued: VecDeque<Message>,
    /// Frame bytes of the queued messages.
    queued_bytes: usize,
    /// Set from `connect`, confirmed by authentication.
    remote: Option<Remote>,
    /// The latest `headers` the client sent.
    headers: Map<String, Value>,
    /// Server time when `connect` arrived: the `start` of `connected`.
    connect_time: i64,
    /// The `end` of `connected`: every relative id and time on this connection uses it.
    base_time: i64,
    /// Highest `added` sent to this client; the `added` we send never goes down.
    last_sent_added: u64,
}

impl Session {
    /// A session waiting for `connect`.
    pub fn new(config: Arc<SessionConfig>) -> Session {
        Session {
            config,
            state: State::AwaitingConnect,
            queued: VecDeque::new(),
            queued_bytes: 0,
            remote: None,
            headers: Map::new(),
            connect_time: 0,
            base_time: 0,
            last_sent_added: 0,
        }
    }

    /// The authenticated peer, once authentication succeeded.
    pub fn remote(&self) -> Option<&Remote> {
        match self.state {
            State::Authenticated => self.remote.as_ref(),
            _ => None,
        }
    }

    /// The peer from `connect`, while its authentication runs or after it succeeded.
    pub fn remote_pending(&self) -> Option<&Remote> {
        self.remote.as_ref()
    }

    /// The latest headers the client sent.
    pub fn headers(&self) -> &Map<String, Value> {
        &self.headers
    }

    /// True once the session has asked to close.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// True while waiting for `connect` or for authentication.
    pub fn is_handshaking(&self) -> bool {
        matches!(self.state, State::AwaitingConnect | State::Authenticating)
    }

    /// Highest `added` sent to this client.
    pub fn last_sent_added(&self) -> u64 {
        self.last_sent_added
    }

    /// Handles one text frame received at `now` (ms).
    pub fn receive(&mut self, frame: &str, now: i64) -> Vec<Output> {
        if self.state == State::Closed {
            return Vec::new();
        }
        match message::parse_limited(frame, self.config.sync_pairs_max) {
            Ok(message) => self.handle(message, frame.len(), now),
            Err(error) => self.fail(error),
        }
    }

    /// Ends the session with a protocol error (also used by transports for oversized or
    /// non-UTF-8 frames). A session that is already closed answers nothing: a `Close` is the
    /// last output of a session.
    pub fn fail(&mut self, error: ProtocolError) -> Vec<Output> {
        if self.state == State::Closed {
            return Vec::new();
        }
        self.state = State::Closed;
        vec![Output::Error(error), Output::Close]
    }

    /// Handles a message that arrived in a frame of `bytes` bytes.
    fn handle(&mut self, message: Message, bytes: usize, now: i64) -> Vec<Output> {
        match self.state {
            State::Closed => Vec::new(),
            State::AwaitingConnect | State::Authenticating => {
                if message.allowed_before_auth() {
                    self.handle_handshake(message, now)
                } else if self.queued.len() >= PREAUTH_QUEUE_MESSAGES_MAX
                    || self.queued_bytes.saturating_add(bytes) > PREAUTH_QUEUE_BYTES_MAX
                {
                    self.state = State::Closed;
                    vec![Output::Close]
                } else {
                    self.queued_bytes += bytes;
                    self.queued.push_back(message);
                    Vec::new()
                }
            }
            State::Authenticated => self.handle_authenticated(message),
        }
    }

    fn handle_handshake(&mut self, message: Message, now: i64) -> Vec<Output> {
        match message {
            Message::Headers(headers) => {
                self.headers = headers;
                Vec::new()
            }
            Message::Connect {
                protocol,
                node_id,
                synced,
                options,
            } if self.state == State::AwaitingConnect => {
                self.connect_time = now;
                self.connect(protocol, node_id, synced, options)
            }
            _ => Vec::new(),
        }
    }

    fn connect(
        &mut self,
        protocol: Number,
        node_id: String,
        synced: Number,
        options: Map<String, Value>,
    ) -> Vec<Output> {
        let version_ok = protocol
            .as_f64()
            .is_some_and(|version| version >= f64::from(MIN_PROTOCOL_VERSION));
        if !version_ok {
            return self.fail(ProtocolError::WrongProtocol {
                supported: MIN_PROTOCOL_VERSION,
                used: protocol,
            });
        }
        let subprotocol = match options.get("subprotocol") {
            Some(Value::Number(number)) => codec::safe_integer(number)
                .and_then(|value| u32::try_from(value).ok())
                .unwrap_or(0),
            _ => 0,
        };
        if subprotocol < self.config.min_subprotocol {
            let used = options.get("subprotocol").cloned().unwrap_or(json!(0));
            return self.fail(ProtocolError::WrongSubprotocol {
                supported: self.config.min_subprotocol,
                used,
            });
        }
        let ids = NodeIds::parse(&node_id);
        if ids.node_id == "server" || ids.user_id.as_deref() == Some("server") {
            return self.fail(ProtocolError::WrongCredentials);
        }
        let synced = codec::safe_integer(&synced)
            .and_then(|value| u64::try_from(value).ok())
            .unwrap_or(0);
        let token = match options.get("token") {
            Some(Value::String(token)) => Some(token.clone()),
            _ => None,
        };
        self.remote = Some(Remote {
            ids: ids.clone(),
            subprotocol,
            synced,
        });
        self.state = State::Authenticating;
        vec![Output::Authenticate(AuthRequest {
            ids,
            token,
            subprotocol,
            synced,
        })]
    }

    /// Authentication succeeded at `now`: sends `headers` (development) and `connected`, then
    /// replays the messages that arrived meanwhile.
    pub fn authenticated(&mut self, now: i64) -> Vec<Output> {
        if self.state != State::Authenticating {
            return Vec::new();
        }
        self.state = State::Authenticated;
        self.base_time = now;
        let mut outputs = Vec::new();
        if self.config.development {
            outputs.push(Output::Frame(
                json!(["headers", {"env": "development"}]).to_string(),
            ));
        }
        let times = json!([self.connect_time, self.base_time]);
        let connected = if self.config.subprotocol == 0 {
            json!([
                "connected",
                PROTOCOL_VERSION,
                self.config.server_node_id,
                times
            ])
        } else {
            json!([
                "connected",
                PROTOCOL_VERSION,
                self.config.server_node_id,
                times,
                {"subprotocol": self.config.subprotocol}
            ])
        };
        outputs.push(Output::Frame(connected.to_string()));
        self.queued_bytes = 0;
        while let Some(message) = self.queued.pop_front() {
            outputs.extend(self.handle_authenticated(message));
            if self.state == State::Closed {
                break;
            }
        }
        outputs
    }

    /// Authentication failed: `wrong-credentials`, then close. Like `authenticated`, it
    /// answers nothing unless an authentication is running (a session closed meanwhile, for
    /// example by a bad frame, stays closed without a second error).
    pub fn auth_failed(&mut self) -> Vec<Output> {
        if self.state != State::Authenticating {
            return Vec::new();
        }
        self.fail(ProtocolError::WrongCredentials)
    }

    /// The back-end refused the client's subprotocol: `wrong-subprotocol` naming ours, then
    /// close. Answers nothing unless an authentication is running.
    pub fn auth_wrong_subprotocol(&mut self) -> Vec<Output> {
        if self.state != State::Authenticating {
            return Vec::new();
        }
        let used = self
            .remote
            .as_ref()
            .map_or(json!(0), |remote| json!(remote.subprotocol));
        self.fail(ProtocolError::WrongSubprotocol {
            supported: self.config.subprotocol,
            used,
        })
    }

    fn handle_authenticated(&mut self, message: Message) -> Vec<Output> {
        match message {
            Message::Ping => vec![Output::Frame(
                json!(["pong", self.last_sent_added]).to_string(),
            )],
            Message::Sync { added, pairs } => self.decode_sync(added, pairs),
            Message::Headers(headers) => {
                self.headers = headers;
                Vec::new()
            }
            Message::Duilian(line) if line == "金木水火土" => {
                vec![Output::Frame(json!(["duilian", "板城烧锅酒"]).to_string())]
            }
            Message::Connect { .. }
            | Message::Connected
            | Message::Error { .. }
            | Message::Pong
            | Message::Synced
            | Message::Debug
            | Message::Duilian(_) => Vec::new(),
        }
    }

    fn decode_sync(
        &mut self,
        added: Number,
        pairs: Vec<(Value, Map<String, Value>)>,
    ) -> Vec<Output> {
        if pairs.len() > self.config.sync_pairs_max {
            return self.fail(ProtocolError::wrong_format(&format!(
                "sync with {} actions is over the limit of {}",
                pairs.len(),
                self.config.sync_pairs_max
            )));
        }
        let Some(remote) = self.remote.as_ref() else {
            return Vec::new();
        };
        let mut entries = Vec::with_capacity(pairs.len());
        for (action, meta) in pairs {
            match self.decode_entry(remote, action, &meta) {
                Ok(entry) => entries.push(entry),
                Err(DecodeError::NotSafeInteger | DecodeError::BadId) => {
                    let text =
                        json!(["sync", added, {"id": meta.get("id"), "time": meta.get("time")}]);
                    return self.fail(ProtocolError::wrong_format(&text.to_string()));
                }
            }
        }
        vec![Output::Actions(IncomingSync { added, entries })]
    }

    fn decode_entry(
        &self,
        remote: &Remote,
        action: Value,
        meta: &Map<String, Value>,
    ) -> Result<IncomingEntry, DecodeError> {
        let id_value = meta.get("id").unwrap_or(&Value::Null);
        let time_value = meta.get("time").unwrap_or(&Value::Null);
        let id = codec::decode_id(id_value, self.base_time, &remote.ids.node_id)?;
        let time = codec::decode_time(time_value, self.base_time)?;
        let mut denied = None;
        if meta
            .keys()
            .any(|key| !CLIENT_META_KEYS.contains(&key.as_str()))
        {
            denied = Some("meta has keys other than id, time and subprotocol");
        }
        let subprotocol = match meta.get("subprotocol") {
            None => remote.subprotocol,
            Some(Value::Number(number)) => codec::safe_integer(number)
                .and_then(|value| u32::try_from(value).ok())
                .unwrap_or_else(|| {
                    denied = Some("meta.subprotocol is not a small integer");
                    0
                }),
            Some(_) => {
                denied = Some("meta.subprotocol is not a number");
                0
            }
        };
        if id.client_id() != remote.ids.client_id {
            denied = Some("action id belongs to another client");
        }
        Ok(IncomingEntry {
            entry: Entry::new(
                action,
                Meta {
                    id: id.to_string(),
                    time,
                    subprotocol,
                    ..Meta::default()
                },
            ),
            denied,
        })
    }

    /// The `synced` answer to a client `sync` whose actions are now durable.
    pub fn synced_frame(added: &Number) -> String {
        json!(["synced", added]).to_string()
    }

    /// A `debug` message, only in development mode.
    pub fn debug_frame(&self, text: &str) -> Option<String> {
        self.config
            .development
            .then(|| json!(["debug", "error", text]).to_string())
    }

    /// A `sync` message carrying `entries`, or `None` before authentication.
    /// Its `added` is the highest sent so far, so the client's cursor never goes back.
    pub fn sync_frame(&mut self, entries: &[Arc<Entry>]) -> Option<String> {
        if self.state != State::Authenticated || entries.is_empty() {
            return None;
        }
        let newest = entries
            .iter()
            .map(|entry| entry.meta.added)
            .max()
            .unwrap_or(0);
        self.last_sent_added = self.last_sent_added.max(newest);
        // Written straight into the frame: building a `Value` first would copy every action.
        /// Room for `"sync"`, `added` and the brackets, and for one entry's meta.
        const FRAME_OVERHEAD_BYTES: usize = 32;
        const META_BYTES: usize = 96;
        let capacity = entries.iter().fold(FRAME_OVERHEAD_BYTES, |bytes, entry| {
            bytes + entry.action_json().len() + META_BYTES
        });
        let mut frame = String::with_capacity(capacity);
        frame.push_str("[\"sync\",");
        frame.push_str(itoa::Buffer::new().format(self.last_sent_added));
        for entry in entries {
            frame.push(',');
            frame.push_str(entry.action_json());
            frame.push(',');
            codec::write_meta(
                &mut frame,
                entry,
                self.base_time,
                &self.config.server_node_id,
            );
        }
        frame.push(']');
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECT: &str = r#"["connect",5,"10:abc:tab",0,{"token":"t","subprotocol":1}]"#;

    fn session() -> Session {
        Session::new(Arc::new(SessionConfig {
            server_node_id: "server:test".to_owned(),
            development: false,
            subprotocol: 1,
            min_subprotocol: 0,
            sync_pairs_max: 10,
        }))
    }

    fn is_authenticate(outputs: &[Output]) -> bool {
        matches!(outputs, [Output::Authenticate(_)])
    }

    // Found by the `session` fuzz target: a bad frame while authentication runs closes the
    // session, and the authentication answer that arrives later produced a second
    // `wrong-credentials` and `Close`.
    #[test]
    fn a_failed_authentication_after_the_session_closed_answers_nothing() {
        let mut session = session();
        assert!(is_authenticate(&session.receive(CONNECT, 1)));
        assert_eq!(session.receive("oops", 2).len(), 2);
        assert!(session.is_closed());
        assert_eq!(session.auth_failed(), Vec::new());
        assert_eq!(session.authenticated(3), Vec::new());
    }

    #[test]
    fn a_closed_session_answers_nothing_to_a_transport_failure() {
        let mut session = session();
        assert_eq!(session.receive("oops", 1).len(), 2);
        let again = session.fail(ProtocolError::wrong_format("frame of 9 bytes"));
        assert_eq!(again, Vec::new());
        assert!(session.is_closed());
    }

    #[test]
    fn auth_failed_without_a_running_authentication_is_ignored() {
        let mut session = session();
        assert_eq!(session.auth_failed(), Vec::new());
        assert!(!session.is_closed());
        assert!(is_authenticate(&session.receive(CONNECT, 1)));
        assert_eq!(
            session.auth_failed(),
            vec![
                Output::Error(ProtocolError::WrongCredentials),
                Output::Close
            ]
        );
    }

    // Found by tests/catalogue.rs: 32 syncs of 2 MiB sent before `connect` were all parsed
    // and held (1.9 GiB of memory for 64 MiB of frames) for an unauthenticated peer.
    #[test]
    fn messages_before_authentication_are_held_only_up_to_a_byte_limit() {
        let mut session = session();
        let ping = r#"["ping",0]"#;
        let pad = PREAUTH_QUEUE_BYTES_MAX / 2;
        let big = format!(r#"["ping",0{}]"#, " ".repeat(pad));
        assert_eq!(session.receive(&big, 1), Vec::new());
        assert_eq!(session.receive(ping, 1), Vec::new());
        assert!(!session.is_closed());
        assert_eq!(session.receive(&big, 1), vec![Output::Close]);
        assert!(session.is_closed());
    }

    #[test]
    fn held_messages_are_replayed_after_authentication_within_the_byte_limit() {
        let mut session = session();
        let big = format!(
            r#"["ping",0{}]"#,
            " ".repeat(PREAUTH_QUEUE_BYTES_MAX - r#"["ping",0]"#.len())
        );
        assert_eq!(big.len(), PREAUTH_QUEUE_BYTES_MAX);
        assert_eq!(session.receive(&big, 1), Vec::new());
        assert!(is_authenticate(&session.receive(CONNECT, 1)));
        let outputs = session.authenticated(2);
        assert_eq!(
            outputs.last(),
            Some(&Output::Frame(r#"["pong",0]"#.to_owned()))
        );
    }

    #[test]
    fn a_sync_over_the_pair_limit_is_wrong_format_naming_the_limit() {
        let mut session = session();
        assert!(is_authenticate(&session.receive(CONNECT, 1)));
        session.authenticated(2);
        let mut frame = String::from(r#"["sync",1"#);
        for n in 1..=11 {
            frame.push_str(&format!(r#",{{"type":"a"}},{{"id":{n},"time":1}}"#));
        }
        frame.push(']');
        assert_eq!(
            session.receive(&frame, 3),
            vec![
                Output::Error(ProtocolError::wrong_format(
                    "sync with 11 actions is over the limit of 10"
                )),
                Output::Close
            ]
        );
    }

    #[test]
    fn an_authenticated_session_is_not_failed_by_a_late_auth_answer() {
        let mut session = session();
        assert!(is_authenticate(&session.receive(CONNECT, 1)));
        assert_eq!(session.authenticated(2).len(), 1);
        assert_eq!(session.auth_failed(), Vec::new());
        assert!(session.remote().is_some());
        assert_eq!(
            session.receive(r#"["ping",0]"#, 3),
            vec![Output::Frame(r#"["pong",0]"#.to_owned())]
        );
    }
}
