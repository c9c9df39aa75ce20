//! Back-end hooks: the client that hands decisions and work to the application's HTTP
//! back-end, and the format of the actions it writes back.
//!
//! - `Backend::call` POSTs one signed hook request (`sign.rs`) over the pooled client of
//!   `http_client.rs` and returns the JSON answer; the pipeline uses it for `access`,
//!   `resend` and `load`, the connection for `auth`, the server's loops for `process` and
//!   `events` (`server/process.rs`, `server/events.rs`).
//! - `ServerAction`: the action format of hook answers and of the server API.
//! - `Backoff`: the retry delays of a failing hook.
//!
//! Architecture invariant: this module is a hook client and imports neither the server nor
//! the transports (a tidy test below checks it); loops over the log that call hooks live in
//! `server/`.

pub mod http_client;
pub mod sign;

use crate::action::{Entry, Meta, NodeIds};
use crate::clock::Clock;
use crate::config::{BackendConfig, Hook, RuleHooks};
use crate::metrics::Metrics;
use crate::peer::Peer;
use http_client::{ClientTlsError, HttpClient};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// The node of actions added by the back-end (server API and hook answers). Its user id,
/// `server`, can never authenticate, so no client can forge these ids.
pub const API_NODE_ID: &str = "server:api";
/// Longest caller-given action id.
pub const CALLER_ID_BYTES_MAX: usize = 200;
/// Most actions in one server API request or one hook answer.
pub const ACTIONS_PER_REQUEST_MAX: usize = 1_000;

/// Why a hook gave no usable answer. Always transient from Ferry's point of view: the back-end
/// was down, slow, refused the signature or answered something unexpected.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// No answer (network, timeout, too large).
    #[error("back-end unreachable: {0}")]
    Unreachable(String),
    /// An answer other than `200`.
    #[error("back-end answered status {0}")]
    Status(u16),
    /// A `200` whose body is not the expected JSON.
    #[error("back-end answer is malformed: {0}")]
    Malformed(String),
}

/// A hook's yes/no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `{"result": "allowed"}`.
    Allowed,
    /// `{"result": "denied"}`.
    Denied,
    /// `{"result": "not_found"}` (access only).
    NotFound,
    /// `{"result": "wrong_subprotocol"}` (auth only).
    WrongSubprotocol,
}

/// The `process` hook's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ProcessAnswer {
    /// Done; store these actions with the `logux/processed`.
    Processed(Vec<ServerAction>),
    /// Refused; `logux/undo` with this reason, and store these actions.
    Failed(String, Vec<ServerAction>),
}

/// An action the back-end adds: from the server API or in a hook answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerAction {
    /// The caller's id, which makes adding it idempotent.
    pub id: String,
    /// The action (an object with a string `type`).
    pub action: Value,
    /// Channels it is sent to.
    pub channels: Vec<String>,
    /// Users it is sent to.
    pub users: Vec<String>,
    /// Clients it is sent to.
    pub clients: Vec<String>,
    /// Nodes it is sent to.
    pub nodes: Vec<String>,
}

impl ServerAction {
    /// Parses `{"id", "action", "channels"?, "users"?, "clients"?, "nodes"?}`.
    pub fn parse(value: &Value) -> Result<ServerAction, String> {
        let object = value
            .as_object()
            .ok_or("an action entry must be an object")?;
        let id = object
            .get("id")
            .and_then(Value::as_str)
            .ok_or("an action entry needs a string \"id\" (it makes adding idempotent)")?;
        if id.is_empty()
            || id.len() > CALLER_ID_BYTES_MAX
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:@/".contains(&b))
        {
            return Err(format!(
                "id {id:?} must be 1 to {CALLER_ID_BYTES_MAX} letters, digits or -_.:@/"
            ));
        }
        let action = object
            .get("action")
            .filter(|action| {
                action
                    .get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| !t.is_empty())
            })
            .ok_or("\"action\" must be an object with a non-empty string \"type\"")?;
        let targets = Targets::parse(value)?;
        Ok(ServerAction {
            id: id.to_owned(),
            action: action.clone(),
            channels: targets.channels,
            users: targets.users,
            clients: targets.clients,
            nodes: targets.nodes,
        })
    }

    /// Parses a list of action entries (`"actions"` of an answer or request); absent is empty.
    pub fn parse_list(value: Option<&Value>) -> Result<Vec<ServerAction>, String> {
        match value {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) if items.len() <= ACTIONS_PER_REQUEST_MAX => {
                items.iter().map(ServerAction::parse).collect()
            }
            Some(Value::Array(_)) => Err(format!(
                "at most {ACTIONS_PER_REQUEST_MAX} actions per request"
            )),
            Some(_) => Err("\"actions\" must be an array".to_owned()),
        }
    }

    /// The Logux action id of a caller id: the same caller id always gives the same action
    /// id, so the log stores it once. It has the usual `"<ms> <node> <seq>"` shape (the
    /// caller id is part of the node), so the wire codec and clients read it like any id.
    pub fn logux_id(caller_id: &str) -> String {
        format!("0 {API_NODE_ID}:{caller_id} 0")
    }

    /// The log entry for this action, created now.
    pub fn into_entry(self, now_ms: i64, subprotocol: u32) -> Entry {
        Entry::new(
            self.action,
            Meta {
                id: ServerAction::logux_id(&self.id),
                time: now_ms,
                subprotocol,
                channels: self.channels,
                users: self.users,
                clients: self.clients,
                nodes: self.nodes,
                ..Meta::default()
            },
        )
    }
}

/// Who a hook request is about: the client, its connection's headers and cookies.
pub struct HookContext<'a> {
    /// The client's ids.
    pub ids: &'a NodeIds,
    /// The client's application subprotocol.
    pub subprotocol: u32,
    /// The connection (for headers and cookies), when there is one.
    pub peer: Option<&'a Peer>,
}

impl HookContext<'_> {
    /// The common fields of a hook body, with the headers and cookies `rule` asks for.
    pub fn body(&self, hook: Hook, headers: &[String], cookies: &[String]) -> Map<String, Value> {
        let mut body = Map::new();
        body.insert("hook".into(), json!(hook.name()));
        body.insert("user_id".into(), json!(self.ids.user_id));
        body.insert("client_id".into(), json!(self.ids.client_id));
        body.insert("node_id".into(), json!(self.ids.node_id));
        body.insert("subprotocol".into(), json!(self.subprotocol));
        let (header_values, cookie_values) = self.forwarded(headers, cookies);
        body.insert("headers".into(), header_values);
        body.insert("cookies".into(), cookie_values);
        body
    }

    /// The connection's headers and cookies named in `headers` and `cookies` (those it has),
    /// as two JSON objects.
    pub fn forwarded(&self, headers: &[String], cookies: &[String]) -> (Value, Value) {
        let mut header_values = Map::new();
        let mut cookie_values = Map::new();
        if let Some(peer) = self.peer {
            for name in headers {
                if let Some(value) = peer.header(name) {
                    header_values.insert(name.clone(), json!(value));
                }
            }
            for name in cookies {
                if let Some((_, value)) = peer.cookies.iter().find(|(key, _)| key == name) {
                    cookie_values.insert(name.clone(), json!(value));
                }
            }
        }
        (Value::Object(header_values), Value::Object(cookie_values))
    }

    /// A hook body about one action under `rule`.
    pub fn action_body(&self, hook: Hook, rule: &RuleHooks, entry: &Entry) -> Value {
        let mut body = self.body(hook, &rule.headers, &rule.cookies);
        body.insert("action".into(), entry.action().clone());
        body.insert("meta".into(), meta_json(&entry.meta));
        Value::Object(body)
    }
}

/// The meta a hook sees.
pub fn meta_json(meta: &Meta) -> Value {
    let mut object = Map::new();
    object.insert("id".into(), json!(meta.id));
    object.insert("time".into(), json!(meta.time));
    if meta.added > 0 {
        object.insert("added".into(), json!(meta.added));
    }
    for (key, names) in [
        ("channels", &meta.channels),
        ("users", &meta.users),
        ("clients", &meta.clients),
        ("nodes", &meta.nodes),
    ] {
        if !names.is_empty() {
            object.insert(key.into(), json!(names));
        }
    }
    Value::Object(object)
}

/// The hook client: signs requests, bounds concurrency, counts outcomes.
pub struct Backend {
    /// `[backend]`.
    pub config: BackendConfig,
    /// The pooled HTTP client every hook request goes through.
    client: HttpClient,
    /// `concurrency_max` requests in flight at most, so a slow back-end is not flooded.
    permits: Semaphore,
    /// Hook request counts and latencies.
    metrics: Arc<Metrics>,
    /// The time of the request signatures.
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// A hook client for `config`; fails when its `ca_file` is unusable.
    pub fn new(
        config: BackendConfig,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Result<Backend, ClientTlsError> {
        let tls = http_client::client_config(config.ca_file.as_deref())?;
        Ok(Backend {
            permits: Semaphore::new(config.concurrency_max),
            config,
            client: HttpClient::new(tls),
            metrics,
            clock,
        })
    }

    /// POSTs `body` to `url/<hook>`, signed; the JSON object of a `200` answer.
    pub async fn call(
        &self,
        hook: Hook,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> Result<Value, HookError> {
        let result = self.exchange(hook, body, idempotency_key).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .hook_requests
            .with_label_values(&[hook.name(), outcome])
            .inc();
        if let Err(error) = &result {
            tracing::warn!(hook = hook.name(), %error, "back-end hook failed");
        }
        result
    }

    async fn exchange(
        &self,
        hook: Hook,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> Result<Value, HookError> {
        let body = serde_json::to_vec(body).map_err(|e| HookError::Malformed(e.to_string()))?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| HookError::Unreachable("shutting down".to_owned()))?;
        let started = Instant::now();
        let timestamp = self.clock.now_ms();
        let mut headers = vec![
            ("ferry-hook", hook.name().to_owned()),
            (sign::TIMESTAMP_HEADER, timestamp.to_string()),
            (
                sign::SIGNATURE_HEADER,
                sign::sign(&self.config.secret, timestamp, &body),
            ),
        ];
        if let Some(key) = idempotency_key {
            headers.push(("idempotency-key", key.to_owned()));
        }
        let url = format!("{}/{}", self.config.url, hook.name());
        let answer = self
            .client
            .post_json(
                &url,
                &headers,
                body,
                Duration::from_millis(self.config.timeout_ms),
                self.config.response_bytes_max,
            )
            .await;
        self.metrics
            .hook_latency
            .with_label_values(&[hook.name()])
            .observe(started.elapsed().as_secs_f64());
        let (status, bytes) = answer.map_err(|e| HookError::Unreachable(e.to_string()))?;
        if !(200..300).contains(&status) {
            return Err(HookError::Status(status));
        }
        if hook == Hook::Events {
            return Ok(Value::Null);
        }
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|e| HookError::Malformed(e.to_string()))?;
        if !value.is_object() {
            return Err(HookError::Malformed(
                "the answer is not an object".to_owned(),
            ));
        }
        Ok(value)
    }

    /// Calls a yes/no hook (`auth`, `access`).
    pub async fn decide(&self, hook: Hook, body: &Value) -> Result<Decision, HookError> {
        let answer = self.call(hook, body, None).await?;
        parse_decision(&answer)
    }

    /// Calls `resend`: the targets to store the action with.
    pub async fn resend(&self, body: &Value) -> Result<Targets, HookError> {
        let answer = self.call(Hook::Resend, body, None).await?;
        Targets::parse(&answer).map_err(HookError::Malformed)
    }

    /// Calls `load`: the actions to send to the new subscriber.
    pub async fn load(&self, body: &Value) -> Result<Vec<Value>, HookError> {
        let answer = self.call(Hook::Load, body, None).await?;
        let items = match answer.get("actions") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) if items.len() <= ACTIONS_PER_REQUEST_MAX => items,
            Some(_) => {
                return Err(HookError::Malformed(format!(
                    "\"actions\" must be an array of at most {ACTIONS_PER_REQUEST_MAX}"
                )))
            }
        };
        items
            .iter()
            .map(|item| {
                item.get("action")
                    .filter(|a| a.get("type").and_then(Value::as_str).is_some())
                    .cloned()
                    .ok_or_else(|| {
                        HookError::Malformed("each load action needs an \"action\"".to_owned())
                    })
            })
            .collect()
    }

    /// Calls `process` for one stored action.
    pub async fn process(&self, body: &Value, action_id: &str) -> Result<ProcessAnswer, HookError> {
        let answer = self.call(Hook::Process, body, Some(action_id)).await?;
        parse_process(&answer).map_err(HookError::Malformed)
    }
}

/// Jittered exponential backoff between retries of a hook (`process`, `events`): half the
/// delay plus a random part of the other half, doubled after each failure up to the maximum.
pub struct Backoff {
    /// The full delay of the next pause, before jitter.
    delay_ms: u64,
    /// The ceiling the doubling stops at.
    max_ms: u64,
}

impl Backoff {
    /// The backoff of `[backend]`'s `process_retry_initial_ms` / `process_retry_max_ms`.
    pub fn new(config: &BackendConfig) -> Backoff {
        Backoff {
            delay_ms: config.process_retry_initial_ms,
            max_ms: config.process_retry_max_ms,
        }
    }

    /// The pause before the next attempt; each call doubles the delay for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.delay_ms;
        let jitter = rand::random::<u64>() % (delay / 2 + 1);
        self.delay_ms = delay.saturating_mul(2).min(self.max_ms);
        Duration::from_millis(delay / 2 + jitter + 1)
    }
}

/// Where the `resend` hook sends an action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    /// Channels.
    pub channels: Vec<String>,
    /// Users.
    pub users: Vec<String>,
    /// Clients.
    pub clients: Vec<String>,
    /// Nodes.
    pub nodes: Vec<String>,
}

impl Targets {
    /// Reads `channels`, `users`, `clients` and `nodes` (each optional) of an object.
    fn parse(object: &Value) -> Result<Targets, String> {
        let names = |key: &str| -> Result<Vec<String>, String> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| {
                        item.as_str()
                            .filter(|name| !name.is_empty() && !name.contains('\0'))
                            .map(str::to_owned)
                            .ok_or_else(|| format!("\"{key}\" must hold non-empty strings"))
                    })
                    .collect(),
                Some(_) => Err(format!("\"{key}\" must be an array of strings")),
            }
        };
        Ok(Targets {
            channels: names("channels")?,
            users: names("users")?,
            clients: names("clients")?,
            nodes: names("nodes")?,
        })
    }
}

fn parse_decision(answer: &Value) -> Result<Decision, HookError> {
    match answer.get("result").and_then(Value::as_str) {
        Some("allowed") => Ok(Decision::Allowed),
        Some("denied") => Ok(Decision::Denied),
        Some("not_found") => Ok(Decision::NotFound),
        Some("wrong_subprotocol") => Ok(Decision::WrongSubprotocol),
        other => Err(HookError::Malformed(format!(
            "\"result\" must be allowed, denied, not_found or wrong_subprotocol, not {other:?}"
        ))),
    }
}

fn parse_process(answer: &Value) -> Result<ProcessAnswer, String> {
    let actions = ServerAction::parse_list(answer.get("actions"))?;
    match answer.get("result").and_then(Value::as_str) {
        Some("processed") => Ok(ProcessAnswer::Processed(actions)),
        Some("failed") => {
            let reason = answer
                .get("reason")
                .and_then(Value::as_str)
                .filter(|reason| !reason.is_empty())
                .unwrap_or("error");
            Ok(ProcessAnswer::Failed(reason.to_owned(), actions))
        }
        other => Err(format!(
            "\"result\" must be processed or failed, not {other:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_actions_need_a_safe_id_and_a_typed_action() {
        let ok = ServerAction::parse(&json!({
            "id": "order-7-paid", "action": {"type": "order/status"}, "channels": ["orders/7"]
        }))
        .expect("valid");
        assert_eq!(ok.channels, vec!["orders/7"]);
        assert_eq!(
            ServerAction::logux_id(&ok.id),
            "0 server:api:order-7-paid 0"
        );
        let parsed = crate::action::ActionId::parse(&ServerAction::logux_id(&ok.id));
        assert_eq!(
            parsed.map(|id| id.node),
            Some("server:api:order-7-paid".to_owned())
        );
        for bad in [
            json!({"action": {"type": "a"}}),
            json!({"id": "has space", "action": {"type": "a"}}),
            json!({"id": "x", "action": {"no": "type"}}),
            json!({"id": "x", "action": {"type": "a"}, "channels": "c"}),
            json!({"id": "x", "action": {"type": "a"}, "users": [1]}),
            json!({"id": "x".repeat(CALLER_ID_BYTES_MAX + 1), "action": {"type": "a"}}),
        ] {
            assert!(ServerAction::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn process_answers_are_processed_or_failed_with_a_reason() {
        assert_eq!(
            parse_process(&json!({"result": "processed"})),
            Ok(ProcessAnswer::Processed(Vec::new()))
        );
        assert_eq!(
            parse_process(&json!({"result": "failed", "reason": "outOfStock"})),
            Ok(ProcessAnswer::Failed("outOfStock".into(), Vec::new()))
        );
        assert_eq!(
            parse_process(&json!({"result": "failed"})),
            Ok(ProcessAnswer::Failed("error".into(), Vec::new()))
        );
        assert!(parse_process(&json!({"result": "ok"})).is_err());
        assert!(parse_process(&json!({"result": "processed", "actions": [{}]})).is_err());
    }

    #[test]
    fn decisions_are_read_from_result() {
        assert_eq!(
            parse_decision(&json!({"result": "allowed"})).ok(),
            Some(Decision::Allowed)
        );
        assert_eq!(
            parse_decision(&json!({"result": "not_found"})).ok(),
            Some(Decision::NotFound)
        );
        assert!(parse_decision(&json!({"allowed": true})).is_err());
    }

    /// Tidy: the hook client must not reach up into the server or out to the transports.
    #[test]
    fn the_hook_client_imports_neither_the_server_nor_the_transports() {
        let forbidden = [
            concat!("crate::", "server"),
            concat!("crate::", "transports"),
        ];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend");
        let files = std::fs::read_dir(&dir).expect("src/backend");
        for file in files {
            let path = file.expect("directory entry").path();
            let text = std::fs::read_to_string(&path).expect("source file");
            for word in forbidden {
                assert!(!text.contains(word), "{} uses {word}", path.display());
            }
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_maximum_with_jitter_in_the_upper_half() {
        let mut backoff = Backoff {
            delay_ms: 100,
            max_ms: 300,
        };
        for full_ms in [100_u64, 200, 300, 300] {
            let pause = backoff.next_delay().as_millis();
            let full_ms = u128::from(full_ms);
            assert!(
                pause > full_ms / 2 && pause <= full_ms + 1,
                "{pause} of {full_ms}"
            );
        }
    }
}
