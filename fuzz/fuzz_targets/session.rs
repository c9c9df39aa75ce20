//! Bytes split into lines → a `Session` fed line after line with a fake clock.
//!
//! A line is a frame, or a driver command:
//! - `!hold`: the next authentication stays pending (messages meanwhile are queued);
//! - `!ok` / `!fail`: finish a pending authentication (`authenticated` / `auth_failed`);
//! - `!now N`: the clock reads `N` ms;
//! - `!send A B ...`: `sync_frame` with entries whose `added` are `A B ...`;
//! - `!bad TEXT`: the transport reports an invalid frame (`Session::fail`).
//!
//! Without `!hold`, a requested authentication is answered at once: refused when the token
//! starts with `bad`, accepted otherwise. A pending authentication is accepted at the end.
//!
//! Invariants: no panic; nothing follows an `Output::Close` in one answer, and after it every
//! call answers nothing; every `Output::Error` is followed by `Output::Close`; frames are
//! JSON arrays; one `Authenticate` at most; decoded action ids round-trip and a non-denied
//! action belongs to the connection's client; `last_sent_added` never decreases and is the
//! `added` of every `sync` frame sent.

#![no_main]

use ferry::action::{ActionId, Entry, Meta, NodeIds};
use ferry::protocol::{Output, Session, SessionConfig};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::sync::Arc;

const START_MS: i64 = 1_000_000;
const SERVER_NODE: &str = "server:fuzz";

struct Driver {
    session: Session,
    now: i64,
    hold_next_auth: bool,
    /// A requested authentication not answered yet.
    pending_auth: bool,
    auth_requests: usize,
    closed: bool,
    last_sent_added: u64,
    seq: u64,
}

impl Driver {
    fn new(development: bool, sync_pairs_max: usize) -> Driver {
        let config = SessionConfig {
            server_node_id: SERVER_NODE.to_owned(),
            development,
            subprotocol: 1,
            min_subprotocol: 0,
            sync_pairs_max,
        };
        Driver {
            session: Session::new(Arc::new(config)),
            now: START_MS,
            hold_next_auth: false,
            pending_auth: false,
            auth_requests: 0,
            closed: false,
            last_sent_added: 0,
            seq: 0,
        }
    }

    fn line(&mut self, line: &str) {
        // The clock moves on a little with every line, as a real one would.
        self.now = self.now.saturating_add((line.len() % 7) as i64);
        if let Some(command) = line.strip_prefix('!') {
            self.command(command);
            return;
        }
        let outputs = self.session.receive(line, self.now);
        self.check(&outputs);
    }

    fn command(&mut self, command: &str) {
        let (name, rest) = command.split_once(' ').unwrap_or((command, ""));
        match name {
            "hold" => self.hold_next_auth = true,
            "ok" if self.pending_auth => self.finish_auth(true),
            "fail" if self.pending_auth => self.finish_auth(false),
            "now" => {
                if let Ok(now) = rest.trim().parse::<i64>() {
                    self.now = now;
                }
            }
            "send" => {
                let added: Vec<u64> = rest
                    .split(' ')
                    .filter_map(|part| part.parse::<u64>().ok())
                    .collect();
                self.send(&added);
            }
            "bad" => {
                let outputs = self
                    .session
                    .fail(ferry::protocol::ProtocolError::wrong_format(rest));
                self.check(&outputs);
            }
            _ => {}
        }
    }

    fn finish_auth(&mut self, ok: bool) {
        self.pending_auth = false;
        let outputs = if ok {
            self.session.authenticated(self.now)
        } else {
            self.session.auth_failed()
        };
        self.check(&outputs);
    }

    fn send(&mut self, added: &[u64]) {
        let entries: Vec<Arc<Entry>> = added
            .iter()
            .enumerate()
            .map(|(index, &added)| {
                self.seq += 1;
                let id = match index % 3 {
                    0 => format!("{} {SERVER_NODE} {}", self.now, self.seq),
                    1 => format!("{} 10:other:tab 0", self.now.saturating_sub(added as i64)),
                    // A corrupt stored id must not take the connection down.
                    _ => format!("corrupt{added}"),
                };
                Arc::new(Entry::new(
                    json!({"type": "fuzz", "n": index}),
                    Meta {
                        id,
                        time: self.now,
                        subprotocol: 1,
                        added,
                        ..Meta::default()
                    },
                ))
            })
            .collect();
        let before = self.session.last_sent_added();
        let frame = self.session.sync_frame(&entries);
        let after = self.session.last_sent_added();
        assert!(
            after >= before,
            "last_sent_added went down: {before} -> {after}"
        );
        match frame {
            Some(frame) => {
                assert!(!self.closed, "a sync frame after Close");
                assert!(!entries.is_empty(), "a sync frame without entries");
                let value: Value = serde_json::from_str(&frame).expect("sync frames are JSON");
                assert_eq!(value[0], "sync");
                assert_eq!(value[1], json!(after), "sync carries last_sent_added");
                let newest = added.iter().copied().max().unwrap_or(0);
                assert_eq!(after, before.max(newest));
                let len = value.as_array().map_or(0, Vec::len);
                assert_eq!(len, 2 + 2 * entries.len(), "every entry is sent");
            }
            None => assert_eq!(after, before, "nothing sent, nothing counted"),
        }
        assert!(after >= self.last_sent_added);
        self.last_sent_added = after;
    }

    fn check(&mut self, outputs: &[Output]) {
        if self.closed {
            assert!(outputs.is_empty(), "outputs after Close: {outputs:?}");
            return;
        }
        let mut deferred_auth = None;
        for (index, output) in outputs.iter().enumerate() {
            assert!(
                !self.closed,
                "outputs after Close in one answer: {outputs:?}"
            );
            match output {
                Output::Frame(frame) => {
                    let value: Value =
                        serde_json::from_str(frame).expect("session frames are JSON");
                    assert!(value.is_array(), "{frame}");
                }
                Output::Error(error) => {
                    let value: Value =
                        serde_json::from_str(&error.to_frame()).expect("error frames are JSON");
                    assert_eq!(value[0], "error");
                    assert!(
                        matches!(outputs.get(index + 1), Some(Output::Close)),
                        "an error not followed by Close: {outputs:?}"
                    );
                }
                Output::Close => self.closed = true,
                Output::Authenticate(request) => {
                    self.auth_requests += 1;
                    assert_eq!(self.auth_requests, 1, "a second Authenticate");
                    assert_ne!(request.ids.user_id.as_deref(), Some("server"));
                    let ok = !request
                        .token
                        .as_deref()
                        .is_some_and(|token| token.starts_with("bad"));
                    deferred_auth = Some(ok);
                }
                Output::Actions(sync) => {
                    // `remote_pending`: a replayed queue may close the session in this answer.
                    let remote = self
                        .session
                        .remote_pending()
                        .expect("actions only from an authenticated session");
                    let client = remote.ids.client_id.clone();
                    for incoming in &sync.entries {
                        let id = ActionId::parse(&incoming.entry.meta.id)
                            .expect("decoded ids are valid action ids");
                        assert_eq!(id.to_string(), incoming.entry.meta.id);
                        if incoming.denied.is_none() {
                            assert_eq!(NodeIds::client_id_of(&id.node), client);
                        }
                        assert!(incoming.entry.meta.channels.is_empty());
                        assert!(incoming.entry.meta.clients.is_empty());
                        assert_eq!(incoming.entry.meta.added, 0);
                    }
                }
            }
        }
        assert!(self.session.last_sent_added() >= self.last_sent_added);
        if let Some(ok) = deferred_auth {
            self.pending_auth = true;
            if !std::mem::take(&mut self.hold_next_auth) {
                self.finish_auth(ok);
            }
        }
    }

    fn finish(&mut self) {
        if self.pending_auth {
            self.finish_auth(true);
        }
        if self.closed {
            assert!(self.session.is_closed());
            assert!(self.session.receive(r#"["ping",0]"#, self.now).is_empty());
            assert!(self.session.sync_frame(&[]).is_none());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    // The first byte picks the mode and a small pair limit, so the limit path is reachable.
    let development = mode & 1 == 1;
    let sync_pairs_max = if mode & 2 == 2 { 2 } else { 1_000 };
    let mut driver = Driver::new(development, sync_pairs_max);
    for line in text.split('\n') {
        driver.line(line);
    }
    driver.finish();
});
