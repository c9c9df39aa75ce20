//! The configuration file (`ferry.toml`).
//!
//! Every key is optional. The file is parsed into private serde structs that reject unknown
//! keys (so a typo is an error naming the key instead of a silently ignored setting), then
//! converted into the public types below and validated. The channel and type rules are
//! compiled once by [`crate::rules::Rules::new`] during loading, so a bad pattern or template
//! is reported when the server starts, not on the first matching action.
//!
//! See `docs/configuration.md` for the reference of every key.

use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Address the server listens on when `listen` is absent: loopback only, so a forgotten
/// config never exposes a development server to the network.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:31337";
/// Directory of the action log when `data_dir` is absent (relative to the working directory).
pub const DATA_DIR_DEFAULT: &str = "ferry-data";
/// The application subprotocol announced in `connected` when `subprotocol` is absent.
pub const SUBPROTOCOL_DEFAULT: u32 = 1;
/// Oldest client subprotocol accepted when `min_subprotocol` is absent: every client.
pub const MIN_SUBPROTOCOL_DEFAULT: u32 = 0;
/// Largest accepted WebSocket frame: 64 MiB, because clients send their whole offline
/// backlog in one `sync` frame after reconnecting.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 64 * 1024 * 1024;
/// Most `[action, meta]` pairs accepted in one `sync` message.
pub const SYNC_PAIRS_MAX_DEFAULT: usize = 1_000_000;
/// Most past actions re-sent to a client when it subscribes to a channel.
pub const SUBSCRIBE_HISTORY_MAX_DEFAULT: usize = 1000;
/// Most missed actions sent to a client in the catch-up after `connect`.
pub const CONNECT_CATCHUP_MAX_DEFAULT: usize = 100_000;
/// Time a new connection has to finish the `connect` handshake.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 20_000;
/// Time without any incoming message (Logux clients ping every 10 s by default) before the
/// connection is dropped.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 75_000;
/// Messages queued for one slow client before it is disconnected instead of growing memory.
pub const OUTBOX_LEN_DEFAULT: usize = 4096;
/// Simultaneous connections accepted; more are refused to keep file descriptors available.
pub const CONNECTIONS_MAX_DEFAULT: usize = 19_000;
/// Default `connections_per_address_max`: as many as `connections_max`, since many users
/// share one address behind a NAT or a proxy; public servers should set it lower.
pub const CONNECTIONS_PER_ADDRESS_MAX_DEFAULT: usize = 19_000;
/// Default `handshakes_per_second`.
pub const HANDSHAKES_PER_SECOND_DEFAULT: u64 = 5_000;
/// Default `handshake_burst`: 20 ms of `handshakes_per_second`. Admitting thousands at once
/// queues their work in front of connected clients' pings (measured at 5,000 storming
/// clients: ping p99 52 ms with 2,000, 22 ms with 100, and the storm was no slower).
pub const HANDSHAKE_BURST_DEFAULT: u64 = 100;
/// Default `heavy_resync_actions`.
pub const HEAVY_RESYNC_ACTIONS_DEFAULT: u64 = 10_000;
/// Default `heavy_resyncs_max`.
pub const HEAVY_RESYNCS_MAX_DEFAULT: usize = 4;
/// Default `waiting_room_max`.
pub const WAITING_ROOM_MAX_DEFAULT: usize = 20_000;
/// Default `admission_deadline_ms`: well under the 70 s clients wait for `connected`.
pub const ADMISSION_DEADLINE_MS_DEFAULT: u64 = 30_000;
/// Default `pipeline_threads`: one thread for the pipeline and the log writer, the rest of
/// the machine for connections (measured on 2 cores: storm ping p99 2.4 s → 70-350 ms).
pub const PIPELINE_THREADS_DEFAULT: usize = 1;
/// Default `log_cache_bytes`: sled's page cache, defined by the log (see there why 512 MiB).
pub const LOG_CACHE_BYTES_DEFAULT: u64 = crate::log::CACHE_BYTES_DEFAULT;
/// Default `log_recent_bytes`: the newest entries kept decoded in memory, so subscriptions
/// and catch-ups read them without sled and JSON.
pub const LOG_RECENT_BYTES_DEFAULT: usize = crate::log::RECENT_BYTES_DEFAULT;
/// Default `pipeline_nice`: how many `nice` steps below the connection threads the pipeline
/// threads run, so that in a storm the CPU goes to answering connected clients first.
pub const PIPELINE_NICE_DEFAULT: i32 = 10;
/// Highest `pipeline_nice`, and the highest (lowest-priority) `nice` value Linux allows:
/// the range of `nice` values is 39 steps, and 19 above the default is already the lowest.
pub const PIPELINE_NICE_MAX: i32 = 19;
/// Most `pipeline_threads`.
pub const PIPELINE_THREADS_MAX: usize = 64;
/// The user id of the server's own node, which no client may authenticate as (Logux rule).
pub const SERVER_USER_ID: &str = "server";
/// Default `[long_poll] poll_hold_ms`: how long a poll waits for frames before answering an
/// empty list; under the 30-60 s idle timeouts of common proxies and load balancers.
pub const LONG_POLL_HOLD_MS_DEFAULT: u64 = 25_000;
/// Default `[long_poll] session_expiry_ms`: a session with no request for this long is closed
/// like a dropped socket. Longer than a poll plus a client's retries after a network blip.
pub const LONG_POLL_SESSION_EXPIRY_MS_DEFAULT: u64 = 60_000;
/// Default `[long_poll] sessions_max`: open long-poll sessions accepted at once.
pub const LONG_POLL_SESSIONS_MAX_DEFAULT: usize = 10_000;
/// Default `[long_poll] body_bytes_max`: twice the default frame limit, so one `sync` frame of
/// `frame_bytes_max` still fits after JSON string escaping.
pub const LONG_POLL_BODY_BYTES_MAX_DEFAULT: usize = 2 * FRAME_BYTES_MAX_DEFAULT;
/// Default `[long_poll] queue_frames_max`: frames kept for one session until the client
/// acknowledges them; beyond it the session is closed as a slow consumer (like `outbox_len`).
pub const LONG_POLL_QUEUE_FRAMES_MAX_DEFAULT: usize = 4096;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file that was asked for, to name it in the message.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The TOML is invalid or a value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// `development` sends `headers`/`debug` to clients; `production` does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Env {
    /// Helpful errors are sent to clients (the default).
    Development,
    /// Internal details stay on the server.
    Production,
}

/// Access vocabulary shared by channels and types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Every authenticated user.
    Anyone,
    /// Nobody.
    Nobody,
    /// Channels: the named pattern parameter must equal the user id.
    Param(String),
    /// Types: the named action field must equal the user id.
    Field(String),
}

/// `[auth]`. Holds secrets, so its `Debug` output masks them as `"***"`.
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// A static token per user id, for small deployments and tests.
    pub tokens: HashMap<String, String>,
    /// One token accepted for every user id, for trusted environments (demo, internal tools).
    pub any_user_token: Option<String>,
    /// The shared secret of HS256 JWTs issued by the application's own backend.
    pub jwt_hs256_secret: Option<String>,
    /// Accept every user with any token or none: only the built-in demo rules set this; it
    /// cannot be written in a configuration file.
    pub allow_anyone: bool,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut users: Vec<&String> = self.tokens.keys().collect();
        users.sort();
        let tokens: Vec<(&String, &str)> = users.into_iter().map(|u| (u, "***")).collect();
        f.debug_struct("AuthConfig")
            .field("tokens", &tokens)
            .field(
                "any_user_token",
                &self.any_user_token.as_ref().map(|_| "***"),
            )
            .field(
                "jwt_hs256_secret",
                &self.jwt_hs256_secret.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

/// `[[channels]]`.
#[derive(Debug, Clone)]
pub struct ChannelRule {
    /// Which channels the rule covers: `/`-separated literal segments, `:name` parameters
    /// (one non-empty segment) and an optional final `*` (the rest, including `/`).
    pub pattern: String,
    /// Who may subscribe to a matching channel: `Anyone`, `Nobody` or `Param`.
    pub access: Access,
    /// Back-end hooks of this rule (`access`, `load`, `events`).
    pub hooks: RuleHooks,
}

/// `[[types]]`.
#[derive(Debug, Clone)]
pub struct TypeRule {
    /// The action type: exact (`"room/message"`), a prefix (`"room/*"`) or `"*"` (fallback).
    pub action_type: String,
    /// Who may add actions of this type: `Anyone`, `Nobody` or `Field`.
    pub access: Access,
    /// Channel templates (`"room/{room}"`) filled from the action's fields; the action is
    /// re-sent to every channel obtained.
    pub resend: Vec<String>,
    /// Back-end hooks of this rule (`access`, `resend`, `process`).
    pub hooks: RuleHooks,
}

/// A back-end hook a rule can delegate to `[backend] url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// Authentication of a `connect` (`[backend] auth = true`).
    Auth,
    /// May this user add this action / subscribe to this channel?
    Access,
    /// Where is this action re-sent?
    Resend,
    /// Actions sent to a new subscriber (not stored).
    Load,
    /// Durable, retried processing of a stored action.
    Process,
    /// Stored actions of a channel, delivered at least once in order.
    Events,
}

impl Hook {
    /// The hook's name: the last path segment of its URL and the `Ferry-Hook` header.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Auth => "auth",
            Hook::Access => "access",
            Hook::Resend => "resend",
            Hook::Load => "load",
            Hook::Process => "process",
            Hook::Events => "events",
        }
    }

    fn from_name(name: &str) -> Option<Hook> {
        [
            Hook::Auth,
            Hook::Access,
            Hook::Resend,
            Hook::Load,
            Hook::Process,
            Hook::Events,
        ]
        .into_iter()
        .find(|hook| hook.name() == name)
    }
}

/// The back-end hooks of one `[[types]]` or `[[channels]]` rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleHooks {
    /// The hooks this rule delegates.
    pub hooks: Vec<Hook>,
    /// Connection headers (lowercase names) sent with these hooks.
    pub headers: Vec<String>,
    /// Connection cookies sent with these hooks.
    pub cookies: Vec<String>,
}

impl RuleHooks {
    /// True when this rule delegates `hook`.
    pub fn has(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook)
    }
}

/// `[backend]`: where hooks go and the secret that signs both directions. Its `Debug` output
/// masks the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Base URL (`http://host:port/path`); each hook is POSTed to `url/<hook>`.
    pub url: String,
    /// HMAC-SHA256 key of hook requests and server API calls.
    pub secret: String,
    /// Delegate authentication to `url/auth`.
    pub auth: bool,
    /// Most time one hook request may take.
    pub timeout_ms: u64,
    /// Hook requests in flight at once.
    pub concurrency_max: usize,
    /// Largest hook answer read.
    pub response_bytes_max: usize,
    /// First retry delay of a `process` or `events` call; doubled on each failure.
    pub process_retry_initial_ms: u64,
    /// Longest retry delay.
    pub process_retry_max_ms: u64,
    /// A `process` task not answered this long after its action was stored ends in
    /// `logux/undo` reason `error`.
    pub process_deadline_ms: u64,
    /// Most events in one `url/events` request.
    pub events_batch_max: usize,
    /// Request headers sent with the auth hook.
    pub auth_headers: Vec<String>,
    /// Cookies sent with the auth hook.
    pub auth_cookies: Vec<String>,
    /// PEM roots trusted for an `https://` back-end instead of the built-in Mozilla roots.
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendConfig")
            .field("url", &self.url)
            .field("secret", &"***")
            .field("auth", &self.auth)
            .field("timeout_ms", &self.timeout_ms)
            .field("concurrency_max", &self.concurrency_max)
            .field("process_deadline_ms", &self.process_deadline_ms)
            .finish_non_exhaustive()
    }
}

/// Default `[backend] timeout_ms`.
pub const BACKEND_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default `[backend] concurrency_max`.
pub const BACKEND_CONCURRENCY_MAX_DEFAULT: usize = 64;
/// Default `[backend] response_bytes_max`.
pub const BACKEND_RESPONSE_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// Default `[backend] process_retry_initial_ms`.
pub const BACKEND_RETRY_INITIAL_MS_DEFAULT: u64 = 500;
/// Default `[backend] process_retry_max_ms`.
pub const BACKEND_RETRY_MAX_MS_DEFAULT: u64 = 30_000;
/// Default `[backend] process_deadline_ms`: one day.
pub const BACKEND_PROCESS_DEADLINE_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;
/// Default `[backend] events_batch_max`.
pub const BACKEND_EVENTS_BATCH_MAX_DEFAULT: usize = 100;
/// Shortest accepted `[backend] secret`.
pub const BACKEND_SECRET_BYTES_MIN: usize = 16;

/// `[tls]`: certificate chain and private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificate chain (leaf first).
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[[sync_maps]]`: a Logux SyncMap (`syncMapTemplate` on the client) served from the log.
#[derive(Debug, Clone)]
pub struct SyncMapRule {
    /// The plural name: types `<plural>/create|change|delete`, channels `<plural>/<id>` and
    /// the filter channel `<plural>`.
    pub plural: String,
    /// Who may read and write these objects: `Anyone` or `Nobody`.
    pub access: Access,
}

/// `[[reducers]]`: a CRDT reducer attached to one action type.
#[derive(Debug, Clone)]
pub struct ReducerRule {
    /// The exact action type this reducer consumes.
    pub action_type: String,
    /// Which CRDT: counter, set, list or LWW map.
    pub kind: crate::crdt::ReducerKind,
    /// Template of the object key, which is also the channel the action is re-sent to and
    /// that clients subscribe to (`"counter/{id}"`).
    pub object: String,
    /// Counter only: the field holding the delta (default `"delta"`).
    pub field: Option<String>,
    /// Who may add actions of this type: `Anyone`, `Nobody` or `Field`.
    pub access: Access,
}

/// `[limits]`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted WebSocket frame in bytes.
    pub frame_bytes_max: usize,
    /// Most `[action, meta]` pairs in one `sync` message.
    pub sync_pairs_max: usize,
    /// Most past actions sent on `logux/subscribe`.
    pub subscribe_history_max: usize,
    /// Most missed actions sent after `connect`.
    pub connect_catchup_max: usize,
    /// Time allowed to finish the `connect` handshake.
    pub handshake_timeout_ms: u64,
    /// Time without messages in either direction before a connection is dropped.
    pub idle_timeout_ms: u64,
    /// Messages queued for one client before it is disconnected as too slow.
    pub outbox_len: usize,
    /// Simultaneous connections accepted.
    pub connections_max: usize,
    /// Simultaneous connections accepted from one IP address.
    pub connections_per_address_max: usize,
    /// Handshakes admitted per second from the waiting room (token bucket rate).
    pub handshakes_per_second: u64,
    /// Handshakes admitted at once after a quiet period (token bucket size).
    pub handshake_burst: u64,
    /// A client further behind the log head than this many positions is a heavy resync.
    pub heavy_resync_actions: u64,
    /// Heavy resyncs running at once; lighter clients are admitted past waiting heavy ones.
    pub heavy_resyncs_max: usize,
    /// Clients that may wait for admission; beyond it new connections get HTTP 503.
    pub waiting_room_max: usize,
    /// Longest wait for admission (well under the clients' 70 s `connected` timeout); then
    /// the socket is closed without an error and the client retries after 1-1.5 s.
    pub admission_deadline_ms: u64,
    /// Threads of the separate runtime that runs the action pipeline and the log writer, so
    /// that a storm's work cannot delay connected clients' pings; 0 runs everything on the
    /// main runtime.
    pub pipeline_threads: usize,
    /// `nice` steps the pipeline threads run below the connection threads (Linux; 0 = same).
    pub pipeline_nice: i32,
    /// Size of the log's page cache (sled), in bytes.
    pub log_cache_bytes: u64,
    /// Memory budget, in estimated bytes, of the newest entries kept decoded; 0 turns it off.
    pub log_recent_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            sync_pairs_max: SYNC_PAIRS_MAX_DEFAULT,
            subscribe_history_max: SUBSCRIBE_HISTORY_MAX_DEFAULT,
            connect_catchup_max: CONNECT_CATCHUP_MAX_DEFAULT,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
            idle_timeout_ms: IDLE_TIMEOUT_MS_DEFAULT,
            outbox_len: OUTBOX_LEN_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            connections_per_address_max: CONNECTIONS_PER_ADDRESS_MAX_DEFAULT,
            handshakes_per_second: HANDSHAKES_PER_SECOND_DEFAULT,
            handshake_burst: HANDSHAKE_BURST_DEFAULT,
            heavy_resync_actions: HEAVY_RESYNC_ACTIONS_DEFAULT,
            heavy_resyncs_max: HEAVY_RESYNCS_MAX_DEFAULT,
            waiting_room_max: WAITING_ROOM_MAX_DEFAULT,
            admission_deadline_ms: ADMISSION_DEADLINE_MS_DEFAULT,
            pipeline_threads: PIPELINE_THREADS_DEFAULT,
            pipeline_nice: PIPELINE_NICE_DEFAULT,
            log_cache_bytes: LOG_CACHE_BYTES_DEFAULT,
            log_recent_bytes: LOG_RECENT_BYTES_DEFAULT,
        }
    }
}

/// `[long_poll]`: the HTTP long-poll transport.
#[derive(Debug, Clone)]
pub struct LongPollConfig {
    /// How long a poll waits for frames before it answers with an empty list.
    pub poll_hold_ms: u64,
    /// A session without any request for this long is closed like a dropped socket.
    pub session_expiry_ms: u64,
    /// Long-poll sessions open at once; `open` beyond it gets 503 with `Retry-After`.
    pub sessions_max: usize,
    /// Largest request body accepted; larger ones get 413.
    pub body_bytes_max: usize,
    /// Frames kept for one session until acknowledged; a session that would exceed it is
    /// closed as a slow consumer and its client reconnects and catches up from the log.
    pub queue_frames_max: usize,
    /// Browser origins allowed to call the endpoints from another origin (CORS), exactly as
    /// browsers send them (`"https://app.example"`); `"*"` allows any origin without
    /// credentials. Empty: no CORS headers.
    pub cors_origins: Vec<String>,
}

impl Default for LongPollConfig {
    fn default() -> LongPollConfig {
        LongPollConfig {
            poll_hold_ms: LONG_POLL_HOLD_MS_DEFAULT,
            session_expiry_ms: LONG_POLL_SESSION_EXPIRY_MS_DEFAULT,
            sessions_max: LONG_POLL_SESSIONS_MAX_DEFAULT,
            body_bytes_max: LONG_POLL_BODY_BYTES_MAX_DEFAULT,
            queue_frames_max: LONG_POLL_QUEUE_FRAMES_MAX_DEFAULT,
            cors_origins: Vec::new(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `IP:port` the WebSocket server binds.
    pub listen: SocketAddr,
    /// Where the action log is stored.
    pub data_dir: PathBuf,
    /// Development or production behaviour.
    pub env: Env,
    /// The application subprotocol announced to clients in `connected`.
    pub subprotocol: u32,
    /// Clients announcing an older subprotocol get `wrong-subprotocol`.
    pub min_subprotocol: u32,
    /// How clients authenticate.
    pub auth: AuthConfig,
    /// Who may subscribe to which channels, in definition order (first match decides).
    pub channels: Vec<ChannelRule>,
    /// Which action types are known, who may add them and where they are re-sent.
    pub types: Vec<TypeRule>,
    /// SyncMaps served from the log.
    pub sync_maps: Vec<SyncMapRule>,
    /// CRDT reducers attached to action types.
    pub reducers: Vec<ReducerRule>,
    /// Resource limits.
    pub limits: Limits,
    /// The HTTP long-poll transport.
    pub long_poll: LongPollConfig,
    /// `[tls]`: serve `wss://` and `https://` directly from this certificate and key.
    pub tls: Option<TlsConfig>,
    /// Browser origins allowed to open WebSocket connections (`Origin` header); empty allows
    /// every origin. Clients that send no `Origin` (native apps, Node) are not affected.
    pub allowed_origins: Vec<String>,
    /// Most actions kept in the log; `None` keeps everything.
    pub retention_actions_max: Option<u64>,
    /// True for the embedded demo configuration, so the server can warn that it is open.
    pub demo: bool,
    /// `[backend]`: HTTP hooks and the server API; `None` disables both.
    pub backend: Option<BackendConfig>,
}

impl Config {
    /// Parses a TOML document.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let config = raw.into_config()?;
        // Compiles patterns and templates once to report their errors at startup.
        crate::rules::Rules::new(&config)?;
        Ok(config)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml_str(&text).map_err(|e| match e {
            ConfigError::Invalid(message) => {
                ConfigError::Invalid(format!("{}: {message}", path.display()))
            }
            other => other,
        })
    }

    /// The embedded default: demo rules, development mode.
    ///
    /// Every channel may be subscribed by anyone, every action type is accepted from anyone,
    /// and an action with a string `channel` field is re-sent to that channel.
    pub fn demo() -> Config {
        Config {
            listen: default_listen(),
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            env: Env::Development,
            subprotocol: SUBPROTOCOL_DEFAULT,
            min_subprotocol: MIN_SUBPROTOCOL_DEFAULT,
            auth: AuthConfig {
                allow_anyone: true,
                ..AuthConfig::default()
            },
            channels: vec![ChannelRule {
                pattern: "*".to_owned(),
                access: Access::Anyone,
                hooks: RuleHooks::default(),
            }],
            types: vec![TypeRule {
                action_type: "*".to_owned(),
                access: Access::Anyone,
                resend: vec!["{channel}".to_owned()],
                hooks: RuleHooks::default(),
            }],
            sync_maps: Vec::new(),
            reducers: Vec::new(),
            limits: Limits::default(),
            long_poll: LongPollConfig::default(),
            tls: None,
            allowed_origins: Vec::new(),
            retention_actions_max: None,
            demo: true,
            backend: None,
        }
    }
}

/// The default listen address, parsed from [`LISTEN_DEFAULT`].
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 31337))
}

/// `ferry.toml` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    env: Option<RawEnv>,
    subprotocol: Option<u32>,
    min_subprotocol: Option<u32>,
    retention_actions_max: Option<u64>,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    channels: Vec<RawChannel>,
    #[serde(default)]
    types: Vec<RawType>,
    #[serde(default)]
    sync_maps: Vec<RawSyncMap>,
    #[serde(default)]
    reducers: Vec<RawReducer>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    long_poll: RawLongPoll,
    tls: Option<RawTls>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    backend: Option<RawBackend>,
}

/// `[backend]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    url: String,
    secret: String,
    #[serde(default)]
    auth: bool,
    timeout_ms: Option<u64>,
    concurrency_max: Option<usize>,
    response_bytes_max: Option<usize>,
    process_retry_initial_ms: Option<u64>,
    process_retry_max_ms: Option<u64>,
    process_deadline_ms: Option<u64>,
    events_batch_max: Option<usize>,
    #[serde(default)]
    auth_headers: Vec<String>,
    #[serde(default)]
    auth_cookies: Vec<String>,
    ca_file: Option<PathBuf>,
}

impl RawBackend {
    fn into_backend(self) -> Result<BackendConfig, ConfigError> {
        let Some(rest) = self
            .url
            .strip_prefix("http://")
            .or_else(|| self.url.strip_prefix("https://"))
        else {
            return Err(ConfigError::Invalid(format!(
                "backend.url: {:?} must start with http:// or https://",
                self.url
            )));
        };
        if rest.is_empty() || rest.starts_with('/') {
            return Err(invalid("backend.url: needs a host"));
        }
        if self.secret.len() < BACKEND_SECRET_BYTES_MIN {
            return Err(ConfigError::Invalid(format!(
                "backend.secret: must be at least {BACKEND_SECRET_BYTES_MIN} bytes"
            )));
        }
        let positive = |name: &str, value: Option<u64>, default: u64| match value {
            Some(0) => Err(ConfigError::Invalid(format!(
                "backend.{name}: must be greater than 0"
            ))),
            Some(value) => Ok(value),
            None => Ok(default),
        };
        let timeout_ms = positive("timeout_ms", self.timeout_ms, BACKEND_TIMEOUT_MS_DEFAULT)?;
        let retry_initial = positive(
            "process_retry_initial_ms",
            self.process_retry_initial_ms,
            BACKEND_RETRY_INITIAL_MS_DEFAULT,
        )?;
        let retry_max = positive(
            "process_retry_max_ms",
            self.process_retry_max_ms,
            BACKEND_RETRY_MAX_MS_DEFAULT,
        )?;
        let deadline = positive(
            "process_deadline_ms",
            self.process_deadline_ms,
            BACKEND_PROCESS_DEADLINE_MS_DEFAULT,
        )?;
        let as_usize = |value: Option<usize>| value.map(|value| value as u64);
        let concurrency = positive(
            "concurrency_max",
            as_usize(self.concurrency_max),
            BACKEND_CONCURRENCY_MAX_DEFAULT as u64,
        )?;
        let response = positive(
            "response_bytes_max",
            as_usize(self.response_bytes_max),
            BACKEND_RESPONSE_BYTES_MAX_DEFAULT as u64,
        )?;
        let events = positive(
            "events_batch_max",
            as_usize(self.events_batch_max),
            BACKEND_EVENTS_BATCH_MAX_DEFAULT as u64,
        )?;
        Ok(BackendConfig {
            url: self.url.trim_end_matches('/').to_owned(),
            secret: self.secret,
            auth: self.auth,
            timeout_ms,
            concurrency_max: usize::try_from(concurrency).unwrap_or(usize::MAX),
            response_bytes_max: usize::try_from(response).unwrap_or(usize::MAX),
            process_retry_initial_ms: retry_initial,
            process_retry_max_ms: retry_max.max(retry_initial),
            process_deadline_ms: deadline,
            events_batch_max: usize::try_from(events).unwrap_or(usize::MAX),
            auth_headers: lowercase(self.auth_headers),
            auth_cookies: self.auth_cookies,
            ca_file: self.ca_file,
        })
    }
}

fn lowercase(names: Vec<String>) -> Vec<String> {
    names
        .into_iter()
        .map(|name| name.to_ascii_lowercase())
        .collect()
}

/// Parses a rule's `hooks` list, allowing only the hooks in `allowed`.
fn parse_hooks(
    rule: &str,
    names: Vec<String>,
    headers: Vec<String>,
    cookies: Vec<String>,
    allowed: &[Hook],
    backend: bool,
) -> Result<RuleHooks, ConfigError> {
    let mut hooks = Vec::with_capacity(names.len());
    for name in names {
        match Hook::from_name(&name).filter(|hook| allowed.contains(hook)) {
            Some(hook) if !hooks.contains(&hook) => hooks.push(hook),
            Some(_) => {
                return Err(ConfigError::Invalid(format!(
                    "{rule}: hook {name:?} is listed twice"
                )))
            }
            None => {
                let allowed: Vec<&str> = allowed.iter().map(|hook| hook.name()).collect();
                return Err(ConfigError::Invalid(format!(
                    "{rule}: hook {name:?} must be one of {allowed:?}"
                )));
            }
        }
    }
    if !hooks.is_empty() && !backend {
        return Err(ConfigError::Invalid(format!(
            "{rule}: hooks need a [backend] section with url and secret"
        )));
    }
    Ok(RuleHooks {
        hooks,
        headers: lowercase(headers),
        cookies,
    })
}

/// `[tls]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

/// `env` as written.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawEnv {
    Development,
    Production,
}

/// `[auth]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    tokens: HashMap<String, String>,
    any_user_token: Option<String>,
    jwt_hs256_secret: Option<String>,
}

/// One `[[channels]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChannel {
    pattern: String,
    access: String,
    #[serde(default)]
    hooks: Vec<String>,
    #[serde(default)]
    headers: Vec<String>,
    #[serde(default)]
    cookies: Vec<String>,
}

/// One `[[types]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawType {
    #[serde(rename = "type")]
    action_type: String,
    access: String,
    #[serde(default)]
    resend: Vec<String>,
    #[serde(default)]
    hooks: Vec<String>,
    #[serde(default)]
    headers: Vec<String>,
    #[serde(default)]
    cookies: Vec<String>,
}

/// One `[[sync_maps]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSyncMap {
    plural: String,
    access: String,
}

/// One `[[reducers]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReducer {
    #[serde(rename = "type")]
    action_type: String,
    kind: String,
    object: String,
    field: Option<String>,
    access: String,
}

/// `[limits]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    frame_bytes_max: Option<usize>,
    sync_pairs_max: Option<usize>,
    subscribe_history_max: Option<usize>,
    connect_catchup_max: Option<usize>,
    handshake_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    outbox_len: Option<usize>,
    connections_max: Option<usize>,
    connections_per_address_max: Option<usize>,
    handshakes_per_second: Option<u64>,
    handshake_burst: Option<u64>,
    heavy_resync_actions: Option<u64>,
    heavy_resyncs_max: Option<usize>,
    waiting_room_max: Option<usize>,
    admission_deadline_ms: Option<u64>,
    pipeline_threads: Option<usize>,
    pipeline_nice: Option<i32>,
    log_cache_bytes: Option<u64>,
    log_recent_bytes: Option<usize>,
}

/// `[long_poll]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLongPoll {
    poll_hold_ms: Option<u64>,
    session_expiry_ms: Option<u64>,
    sessions_max: Option<usize>,
    body_bytes_max: Option<usize>,
    queue_frames_max: Option<usize>,
    #[serde(default)]
    cors_origins: Vec<String>,
}

impl RawConfig {
    fn into_config(self) -> Result<Config, ConfigError> {
        let listen = match self.listen {
            None => default_listen(),
            Some(text) => text.parse::<SocketAddr>().map_err(|e| {
                ConfigError::Invalid(format!("listen: {text:?} is not an IP:port address ({e})"))
            })?,
        };
        let data_dir = self
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DATA_DIR_DEFAULT));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir: must not be empty"));
        }
        let env = match self.env {
            None | Some(RawEnv::Development) => Env::Development,
            Some(RawEnv::Production) => Env::Production,
        };
        let subprotocol = self.subprotocol.unwrap_or(SUBPROTOCOL_DEFAULT);
        let min_subprotocol = self.min_subprotocol.unwrap_or(MIN_SUBPROTOCOL_DEFAULT);
        if min_subprotocol > subprotocol {
            return Err(ConfigError::Invalid(format!(
                "min_subprotocol ({min_subprotocol}) must not exceed subprotocol ({subprotocol})"
            )));
        }
        let backend = self.backend.map(RawBackend::into_backend).transpose()?;
        let has_backend = backend.is_some();
        let channels = self
            .channels
            .into_iter()
            .enumerate()
            .map(|(index, raw)| {
                let access = parse_channel_access(index, &raw.pattern, &raw.access)?;
                let hooks = parse_hooks(
                    &format!("channels[{index}] (pattern {:?})", raw.pattern),
                    raw.hooks,
                    raw.headers,
                    raw.cookies,
                    &[Hook::Access, Hook::Load, Hook::Events],
                    has_backend,
                )?;
                Ok(ChannelRule {
                    pattern: raw.pattern,
                    access,
                    hooks,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let types = self
            .types
            .into_iter()
            .enumerate()
            .map(|(index, raw)| {
                let access = parse_type_access(index, &raw.action_type, &raw.access)?;
                let hooks = parse_hooks(
                    &format!("types[{index}] (type {:?})", raw.action_type),
                    raw.hooks,
                    raw.headers,
                    raw.cookies,
                    &[Hook::Access, Hook::Resend, Hook::Process],
                    has_backend,
                )?;
                Ok(TypeRule {
                    action_type: raw.action_type,
                    access,
                    resend: raw.resend,
                    hooks,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let sync_maps = self
            .sync_maps
            .into_iter()
            .enumerate()
            .map(|(index, raw)| {
                let rule = format!("sync_maps[{index}] (plural {:?})", raw.plural);
                if raw.plural.is_empty() || raw.plural.contains(['/', '*', ':', '{', '}', '\0']) {
                    return Err(ConfigError::Invalid(format!(
                        "{rule}: plural must be a non-empty name without / * : {{ }}"
                    )));
                }
                let access = match raw.access.as_str() {
                    "anyone" => Access::Anyone,
                    "nobody" => Access::Nobody,
                    other => {
                        return Err(ConfigError::Invalid(format!(
                            "{rule}: access {other:?} must be \"anyone\" or \"nobody\""
                        )))
                    }
                };
                Ok(SyncMapRule {
                    plural: raw.plural,
                    access,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let reducers =
            self.reducers
                .into_iter()
                .enumerate()
                .map(|(index, raw)| {
                    let rule = format!("reducers[{index}] (type {:?})", raw.action_type);
                    let kind = crate::crdt::ReducerKind::from_name(&raw.kind).ok_or_else(|| {
                        ConfigError::Invalid(format!(
                        "{rule}: kind {:?} must be \"counter\", \"set\", \"list\" or \"lww-map\"",
                        raw.kind
                    ))
                    })?;
                    if raw.action_type.is_empty() || raw.action_type.contains('*') {
                        return Err(ConfigError::Invalid(format!(
                            "{rule}: type must be one exact action type"
                        )));
                    }
                    if raw.field.is_some() && kind != crate::crdt::ReducerKind::Counter {
                        return Err(ConfigError::Invalid(format!(
                            "{rule}: field is only for counters"
                        )));
                    }
                    let access = parse_type_access(index, &raw.action_type, &raw.access).map_err(
                        |error| match error {
                            ConfigError::Invalid(text) => {
                                ConfigError::Invalid(text.replacen("types[", "reducers[", 1))
                            }
                            other => other,
                        },
                    )?;
                    Ok(ReducerRule {
                        action_type: raw.action_type,
                        kind,
                        object: raw.object,
                        field: raw.field,
                        access,
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(Config {
            listen,
            data_dir,
            env,
            subprotocol,
            min_subprotocol,
            auth: self.auth.into_auth()?,
            channels,
            types,
            sync_maps,
            reducers,
            limits: self.limits.into_limits()?,
            long_poll: self.long_poll.into_long_poll()?,
            tls: self.tls.map(|raw| TlsConfig {
                cert: raw.cert,
                key: raw.key,
            }),
            allowed_origins: self.allowed_origins,
            retention_actions_max: self.retention_actions_max.filter(|&n| n > 0),
            demo: false,
            backend,
        })
    }
}

impl RawAuth {
    fn into_auth(self) -> Result<AuthConfig, ConfigError> {
        let mut users: Vec<&String> = self.tokens.keys().collect();
        users.sort();
        for user in users {
            if user.as_str() == SERVER_USER_ID {
                return Err(invalid(
                    "auth.tokens: the user id \"server\" is reserved and can never authenticate",
                ));
            }
            if user.is_empty() {
                return Err(invalid("auth.tokens: a user id must not be empty"));
            }
            if self.tokens.get(user).is_some_and(|t| t.is_empty()) {
                return Err(ConfigError::Invalid(format!(
                    "auth.tokens: the token of user {user:?} must not be empty"
                )));
            }
        }
        if self.any_user_token.as_deref() == Some("") {
            return Err(invalid("auth.any_user_token: must not be empty"));
        }
        if self.jwt_hs256_secret.as_deref() == Some("") {
            return Err(invalid("auth.jwt_hs256_secret: must not be empty"));
        }
        Ok(AuthConfig {
            tokens: self.tokens,
            any_user_token: self.any_user_token,
            jwt_hs256_secret: self.jwt_hs256_secret,
            allow_anyone: false,
        })
    }
}

impl RawLimits {
    fn into_limits(self) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        Ok(Limits {
            frame_bytes_max: positive("frame_bytes_max", self.frame_bytes_max, d.frame_bytes_max)?,
            sync_pairs_max: positive("sync_pairs_max", self.sync_pairs_max, d.sync_pairs_max)?,
            subscribe_history_max: positive(
                "subscribe_history_max",
                self.subscribe_history_max,
                d.subscribe_history_max,
            )?,
            connect_catchup_max: positive(
                "connect_catchup_max",
                self.connect_catchup_max,
                d.connect_catchup_max,
            )?,
            handshake_timeout_ms: positive(
                "handshake_timeout_ms",
                self.handshake_timeout_ms,
                d.handshake_timeout_ms,
            )?,
            idle_timeout_ms: positive("idle_timeout_ms", self.idle_timeout_ms, d.idle_timeout_ms)?,
            outbox_len: positive("outbox_len", self.outbox_len, d.outbox_len)?,
            connections_max: positive("connections_max", self.connections_max, d.connections_max)?,
            connections_per_address_max: positive(
                "connections_per_address_max",
                self.connections_per_address_max,
                d.connections_per_address_max,
            )?,
            handshakes_per_second: positive(
                "handshakes_per_second",
                self.handshakes_per_second,
                d.handshakes_per_second,
            )?,
            handshake_burst: positive("handshake_burst", self.handshake_burst, d.handshake_burst)?,
            heavy_resync_actions: positive(
                "heavy_resync_actions",
                self.heavy_resync_actions,
                d.heavy_resync_actions,
            )?,
            heavy_resyncs_max: positive(
                "heavy_resyncs_max",
                self.heavy_resyncs_max,
                d.heavy_resyncs_max,
            )?,
            waiting_room_max: positive(
                "waiting_room_max",
                self.waiting_room_max,
                d.waiting_room_max,
            )?,
            admission_deadline_ms: positive(
                "admission_deadline_ms",
                self.admission_deadline_ms,
                d.admission_deadline_ms,
            )?,
            pipeline_threads: match self.pipeline_threads {
                Some(threads) if threads > PIPELINE_THREADS_MAX => {
                    return Err(ConfigError::Invalid(format!(
                        "limits.pipeline_threads: at most {PIPELINE_THREADS_MAX}"
                    )))
                }
                Some(threads) => threads,
                None => d.pipeline_threads,
            },
            pipeline_nice: match self.pipeline_nice {
                Some(nice) if !(0..=PIPELINE_NICE_MAX).contains(&nice) => {
                    return Err(ConfigError::Invalid(format!(
                        "limits.pipeline_nice: from 0 to {PIPELINE_NICE_MAX}"
                    )))
                }
                Some(nice) => nice,
                None => d.pipeline_nice,
            },
            log_cache_bytes: positive("log_cache_bytes", self.log_cache_bytes, d.log_cache_bytes)?,
            log_recent_bytes: self.log_recent_bytes.unwrap_or(d.log_recent_bytes),
        })
    }
}

impl RawLongPoll {
    fn into_long_poll(self) -> Result<LongPollConfig, ConfigError> {
        let d = LongPollConfig::default();
        let section = "long_poll";
        let poll_hold_ms = positive_in(section, "poll_hold_ms", self.poll_hold_ms, d.poll_hold_ms)?;
        let session_expiry_ms = positive_in(
            section,
            "session_expiry_ms",
            self.session_expiry_ms,
            d.session_expiry_ms,
        )?;
        if session_expiry_ms <= poll_hold_ms {
            return Err(ConfigError::Invalid(format!(
                "long_poll.session_expiry_ms ({session_expiry_ms}) must be greater than \
                 long_poll.poll_hold_ms ({poll_hold_ms}), or sessions expire while polling"
            )));
        }
        for origin in &self.cors_origins {
            check_cors_origin(origin)?;
        }
        Ok(LongPollConfig {
            poll_hold_ms,
            session_expiry_ms,
            sessions_max: positive_in(section, "sessions_max", self.sessions_max, d.sessions_max)?,
            body_bytes_max: positive_in(
                section,
                "body_bytes_max",
                self.body_bytes_max,
                d.body_bytes_max,
            )?,
            queue_frames_max: positive_in(
                section,
                "queue_frames_max",
                self.queue_frames_max,
                d.queue_frames_max,
            )?,
            cors_origins: self.cors_origins,
        })
    }
}

/// Checks one `cors_origins` entry: `"*"` or an origin as browsers send it in `Origin`
/// (`scheme://host[:port]`, no path and no trailing slash), since entries are compared
/// exactly and anything else would silently never match.
fn check_cors_origin(origin: &str) -> Result<(), ConfigError> {
    if origin == "*" {
        return Ok(());
    }
    let well_formed = origin.split_once("://").is_some_and(|(scheme, rest)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            && !rest.is_empty()
            && !rest.contains(['/', '?', '#', ' '])
    });
    if well_formed {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "long_poll.cors_origins: {origin:?} must be \"*\" or an origin like \
             \"https://app.example\" (scheme://host[:port], no path or trailing slash)"
        )))
    }
}

/// A `[limits]` value, or its default; zero is refused because it would disable the server.
fn positive<T>(key: &str, value: Option<T>, default: T) -> Result<T, ConfigError>
where
    T: Copy + PartialEq + From<u8>,
{
    positive_in("limits", key, value, default)
}

/// A value of `[section]`, or its default; zero is refused because it would disable a feature.
fn positive_in<T>(section: &str, key: &str, value: Option<T>, default: T) -> Result<T, ConfigError>
where
    T: Copy + PartialEq + From<u8>,
{
    match value {
        None => Ok(default),
        Some(v) if v == T::from(0) => Err(ConfigError::Invalid(format!(
            "{section}.{key}: must be greater than 0"
        ))),
        Some(v) => Ok(v),
    }
}

fn invalid(message: &str) -> ConfigError {
    ConfigError::Invalid(message.to_owned())
}

/// Parses the `access` of `[[channels]]` number `index` (0-based).
fn parse_channel_access(index: usize, pattern: &str, text: &str) -> Result<Access, ConfigError> {
    let rule = format!("channels[{index}] (pattern {pattern:?})");
    match text {
        "anyone" => Ok(Access::Anyone),
        "nobody" => Ok(Access::Nobody),
        _ => match text.strip_prefix("param:") {
            Some("") => Err(ConfigError::Invalid(format!(
                "{rule}: access {text:?} needs a parameter name, as in \"param:id\""
            ))),
            Some(name) => Ok(Access::Param(name.to_owned())),
            None if text.starts_with("field:") => Err(ConfigError::Invalid(format!(
                "{rule}: access {text:?} is only for [[types]]; channels use \"param:NAME\""
            ))),
            None => Err(ConfigError::Invalid(format!(
                "{rule}: access {text:?} must be \"anyone\", \"nobody\" or \"param:NAME\""
            ))),
        },
    }
}

/// Parses the `access` of `[[types]]` number `index` (0-based).
fn parse_type_access(index: usize, action_type: &str, text: &str) -> Result<Access, ConfigError> {
    let rule = format!("types[{index}] (type {action_type:?})");
    match text {
        "anyone" => Ok(Access::Anyone),
        "nobody" => Ok(Access::Nobody),
        _ => match text.strip_prefix("field:") {
            Some("") => Err(ConfigError::Invalid(format!(
                "{rule}: access {text:?} needs a field name, as in \"field:userId\""
            ))),
            Some(name) => Ok(Access::Field(name.to_owned())),
            None if text.starts_with("param:") => Err(ConfigError::Invalid(format!(
                "{rule}: access {text:?} is only for [[channels]]; types use \"field:NAME\""
            ))),
            None => Err(ConfigError::Invalid(format!(
                "{rule}: access {text:?} must be \"anyone\", \"nobody\" or \"field:NAME\""
            ))),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match Config::from_toml_str(text) {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml_str("").unwrap();
        assert_eq!(c.listen.to_string(), LISTEN_DEFAULT);
        assert_eq!(c.data_dir, PathBuf::from(DATA_DIR_DEFAULT));
        assert_eq!(c.env, Env::Development);
        assert_eq!(c.subprotocol, 1);
        assert_eq!(c.min_subprotocol, 0);
        assert_eq!(c.retention_actions_max, None);
        assert!(!c.demo);
        assert!(c.channels.is_empty() && c.types.is_empty());
        assert!(c.auth.tokens.is_empty());
        assert!(c.auth.any_user_token.is_none() && c.auth.jwt_hs256_secret.is_none());
        let l = c.limits;
        assert_eq!(l.frame_bytes_max, 64 * 1024 * 1024);
        assert_eq!(l.sync_pairs_max, 1_000_000);
        assert_eq!(l.subscribe_history_max, 1000);
        assert_eq!(l.connect_catchup_max, 100_000);
        assert_eq!(l.handshake_timeout_ms, 20_000);
        assert_eq!(l.idle_timeout_ms, 75_000);
        assert_eq!(l.outbox_len, 4096);
        assert_eq!(l.connections_max, 19_000);
    }

    #[test]
    fn log_options_default_to_the_configured_page_cache() {
        // Regression: the log had its own 64 MiB default while `[limits] log_cache_bytes`
        // defaulted to 512 MiB, so a log opened with default options used a smaller cache.
        assert_eq!(
            crate::log::LogOptions::default().cache_bytes,
            Limits::default().log_cache_bytes
        );
    }

    #[test]
    fn default_listen_matches_its_constant() {
        assert_eq!(default_listen().to_string(), LISTEN_DEFAULT);
    }

    const FULL_EXAMPLE: &str = r#"
listen = "0.0.0.0:8080"
data_dir = "/var/lib/ferry"
env = "production"
subprotocol = 3
min_subprotocol = 2
retention_actions_max = 500

[auth]
tokens = { "10" = "good-10" }
any_user_token = "secret"
jwt_hs256_secret = "change-me"

[[channels]]
pattern = "users/:id"
access = "param:id"

[[types]]
type = "room/message"
access = "anyone"
resend = ["room/{room}"]

[limits]
frame_bytes_max = 1024
sync_pairs_max = 2
subscribe_history_max = 3
connect_catchup_max = 4
handshake_timeout_ms = 5
idle_timeout_ms = 6
outbox_len = 7
connections_max = 8
log_cache_bytes = 9
log_recent_bytes = 10
pipeline_nice = 11
"#;

    #[test]
    fn every_key_is_read() {
        let c = Config::from_toml_str(FULL_EXAMPLE).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/ferry"));
        assert_eq!(c.env, Env::Production);
        assert_eq!((c.subprotocol, c.min_subprotocol), (3, 2));
        assert_eq!(c.retention_actions_max, Some(500));
        assert_eq!(c.auth.tokens.get("10").map(String::as_str), Some("good-10"));
        assert_eq!(c.auth.any_user_token.as_deref(), Some("secret"));
        assert_eq!(c.auth.jwt_hs256_secret.as_deref(), Some("change-me"));
        assert_eq!(c.channels.len(), 1);
        assert_eq!(c.channels[0].pattern, "users/:id");
        assert_eq!(c.channels[0].access, Access::Param("id".into()));
        assert_eq!(c.types[0].action_type, "room/message");
        assert_eq!(c.types[0].access, Access::Anyone);
        assert_eq!(c.types[0].resend, vec!["room/{room}".to_owned()]);
        let l = c.limits;
        assert_eq!(
            [
                l.frame_bytes_max,
                l.sync_pairs_max,
                l.subscribe_history_max,
                l.connect_catchup_max,
                l.outbox_len,
                l.connections_max
            ],
            [1024, 2, 3, 4, 7, 8]
        );
        assert_eq!((l.handshake_timeout_ms, l.idle_timeout_ms), (5, 6));
        assert_eq!(l.log_cache_bytes, 9);
        assert_eq!(
            Config::from_toml_str("").unwrap().limits.log_cache_bytes,
            LOG_CACHE_BYTES_DEFAULT
        );
        assert!(Config::from_toml_str("[limits]\nlog_cache_bytes = 0").is_err());
        assert_eq!(l.log_recent_bytes, 10);
        assert_eq!(l.pipeline_nice, 11);
        for wrong in ["-1", "20"] {
            let text = format!("[limits]\npipeline_nice = {wrong}");
            assert!(Config::from_toml_str(&text).is_err(), "{wrong}");
        }
        let off = Config::from_toml_str("[limits]\nlog_recent_bytes = 0").unwrap();
        assert_eq!(off.limits.log_recent_bytes, 0);
    }

    #[test]
    fn long_poll_section_has_defaults_and_reads_every_key() {
        let d = Config::from_toml_str("").unwrap().long_poll;
        assert_eq!(d.poll_hold_ms, LONG_POLL_HOLD_MS_DEFAULT);
        assert_eq!(d.session_expiry_ms, LONG_POLL_SESSION_EXPIRY_MS_DEFAULT);
        assert_eq!(d.sessions_max, LONG_POLL_SESSIONS_MAX_DEFAULT);
        assert_eq!(d.body_bytes_max, LONG_POLL_BODY_BYTES_MAX_DEFAULT);
        assert_eq!(d.queue_frames_max, LONG_POLL_QUEUE_FRAMES_MAX_DEFAULT);
        assert!(d.cors_origins.is_empty());
        let c = Config::from_toml_str(
            r#"
[long_poll]
poll_hold_ms = 100
session_expiry_ms = 200
sessions_max = 3
body_bytes_max = 4
queue_frames_max = 5
cors_origins = ["https://app.example", "http://localhost:5173", "*"]
"#,
        )
        .unwrap()
        .long_poll;
        assert_eq!((c.poll_hold_ms, c.session_expiry_ms), (100, 200));
        assert_eq!(
            (c.sessions_max, c.body_bytes_max, c.queue_frames_max),
            (3, 4, 5)
        );
        assert_eq!(c.cors_origins.len(), 3);
    }

    #[test]
    fn long_poll_section_rejects_bad_values_by_name() {
        assert!(err("[long_poll]\nholds = 1").contains("holds"));
        assert!(err("[long_poll]\nsessions_max = 0").contains("long_poll.sessions_max"));
        assert!(
            err("[long_poll]\npoll_hold_ms = 500\nsession_expiry_ms = 500")
                .contains("session_expiry_ms")
        );
        for bad in [
            "https://app.example/",
            "app.example",
            "https://a.example/path",
            "",
        ] {
            let text = format!("[long_poll]\ncors_origins = [{bad:?}]");
            assert!(err(&text).contains("cors_origins"), "{bad}");
        }
    }

    #[test]
    fn retention_zero_keeps_everything() {
        let c = Config::from_toml_str("retention_actions_max = 0").unwrap();
        assert_eq!(c.retention_actions_max, None);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        assert!(err("lisen = \"127.0.0.1:1\"").contains("lisen"));
        assert!(err("[limits]\nframe_byte_max = 1").contains("frame_byte_max"));
        assert!(err("[auth]\ntoken = \"x\"").contains("token"));
        assert!(
            err("[[channels]]\npattern = \"a\"\naccess = \"anyone\"\nacess = 1").contains("acess")
        );
        assert!(err("[[types]]\ntype = \"a\"\naccess = \"anyone\"\nresnd = []").contains("resnd"));
    }

    #[test]
    fn bad_env_and_listen_are_rejected() {
        assert!(err("env = \"staging\"").contains("staging"));
        assert!(err("listen = \"localhost\"").contains("listen"));
    }

    #[test]
    fn min_subprotocol_above_subprotocol_is_rejected() {
        assert!(err("subprotocol = 2\nmin_subprotocol = 3").contains("min_subprotocol"));
        assert!(Config::from_toml_str("subprotocol = 2\nmin_subprotocol = 2").is_ok());
    }

    #[test]
    fn zero_limits_are_rejected_with_their_name() {
        for key in [
            "frame_bytes_max",
            "sync_pairs_max",
            "subscribe_history_max",
            "connect_catchup_max",
            "handshake_timeout_ms",
            "idle_timeout_ms",
            "outbox_len",
            "connections_max",
        ] {
            assert!(err(&format!("[limits]\n{key} = 0")).contains(key), "{key}");
        }
        assert!(Config::from_toml_str("[limits]\nframe_bytes_max = -1").is_err());
    }

    #[test]
    fn invalid_access_values_name_the_rule_and_value() {
        let e = err("[[channels]]\npattern = \"users/:id\"\naccess = \"everyone\"");
        assert!(e.contains("users/:id") && e.contains("everyone"), "{e}");
        let e = err("[[channels]]\npattern = \"users/:id\"\naccess = \"field:id\"");
        assert!(
            e.contains("field:id") && e.contains("only for [[types]]"),
            "{e}"
        );
        let e = err("[[channels]]\npattern = \"users/:id\"\naccess = \"param:\"");
        assert!(e.contains("param:"), "{e}");
        let e = err("[[types]]\ntype = \"room/add\"\naccess = \"param:id\"");
        assert!(
            e.contains("room/add") && e.contains("only for [[channels]]"),
            "{e}"
        );
        let e = err("[[types]]\ntype = \"room/add\"\naccess = \"Anyone\"");
        assert!(e.contains("room/add") && e.contains("Anyone"), "{e}");
        let e = err("[[types]]\ntype = \"room/add\"\naccess = \"field:\"");
        assert!(e.contains("field:"), "{e}");
    }

    #[test]
    fn param_access_must_name_a_pattern_parameter() {
        let e = err("[[channels]]\npattern = \"users/:id\"\naccess = \"param:user\"");
        assert!(e.contains("users/:id") && e.contains(":user"), "{e}");
        assert!(Config::from_toml_str(
            "[[channels]]\npattern = \"users/:user\"\naccess = \"param:user\""
        )
        .is_ok());
    }

    #[test]
    fn bad_patterns_and_templates_are_rejected_at_load() {
        let e = err("[[channels]]\npattern = \"a/*/b\"\naccess = \"anyone\"");
        assert!(e.contains("a/*/b"), "{e}");
        let e = err("[[types]]\ntype = \"a\"\naccess = \"anyone\"\nresend = [\"room/{room\"]");
        assert!(e.contains("room/{room"), "{e}");
    }

    #[test]
    fn reserved_and_empty_credentials_are_rejected() {
        assert!(err("[auth]\ntokens = { server = \"x\" }").contains("server"));
        assert!(err("[auth]\ntokens = { \"1\" = \"\" }").contains("auth.tokens"));
        assert!(err("[auth]\nany_user_token = \"\"").contains("any_user_token"));
        assert!(err("[auth]\njwt_hs256_secret = \"\"").contains("jwt_hs256_secret"));
    }

    #[test]
    fn demo_is_open_development_config() {
        let c = Config::demo();
        assert!(c.demo);
        assert_eq!(c.env, Env::Development);
        assert_eq!(c.listen.to_string(), LISTEN_DEFAULT);
        assert_eq!(c.channels[0].pattern, "*");
        assert_eq!(c.channels[0].access, Access::Anyone);
        assert_eq!(c.types[0].action_type, "*");
        assert_eq!(c.types[0].resend, vec!["{channel}".to_owned()]);
        assert!(crate::rules::Rules::new(&c).is_ok());
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = Config::from_toml_str(FULL_EXAMPLE).unwrap();
        let text = format!("{c:?}");
        assert!(!text.contains("good-10"), "{text}");
        assert!(!text.contains("\"secret\""), "{text}");
        assert!(!text.contains("change-me"), "{text}");
        assert!(text.contains("***"), "{text}");
        assert!(text.contains("\"10\""), "user ids stay visible: {text}");
    }

    #[test]
    fn load_reads_a_file_and_names_it_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, "subprotocol = 7").unwrap();
        assert_eq!(Config::load(&path).unwrap().subprotocol, 7);
        std::fs::write(&path, "bogus = 1").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains("ferry.toml") && e.contains("bogus"), "{e}");
        let missing = dir.path().join("missing.toml");
        assert!(matches!(
            Config::load(&missing),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn backend_hooks_are_checked_and_the_secret_is_masked() {
        let backend =
            "[backend]\nurl = \"http://127.0.0.1:4000/ferry/\"\nsecret = \"0123456789abcdef\"\n";
        let rule = "[[types]]\ntype = \"order/buy\"\naccess = \"anyone\"\nhooks = [\"process\", \"access\"]\nheaders = [\"X-Device\"]\n";
        let config = Config::from_toml_str(&format!("{backend}{rule}")).expect("valid");
        let parsed = config.backend.as_ref().expect("backend");
        assert_eq!(parsed.url, "http://127.0.0.1:4000/ferry");
        assert_eq!(
            parsed.process_deadline_ms,
            BACKEND_PROCESS_DEADLINE_MS_DEFAULT
        );
        assert!(!format!("{parsed:?}").contains("0123456789abcdef"));
        let hooks = &config.types[0].hooks;
        assert!(hooks.has(Hook::Process) && hooks.has(Hook::Access) && !hooks.has(Hook::Resend));
        assert_eq!(hooks.headers, vec!["x-device"]);

        let e = err(rule);
        assert!(e.contains("[backend]"), "{e}");
        let e = err(&format!(
            "{backend}{}",
            rule.replace("\"access\"]", "\"load\"]")
        ));
        assert!(e.contains("\"load\"") && e.contains("order/buy"), "{e}");
        let e = err(&backend.replace("0123456789abcdef", "short"));
        assert!(e.contains("backend.secret"), "{e}");
        let e = err(&backend.replace("http://", "ftp://"));
        assert!(e.contains("backend.url"), "{e}");
        let e = err(&format!("{backend}timeout_ms = 0\n"));
        assert!(e.contains("timeout_ms"), "{e}");
    }
}
