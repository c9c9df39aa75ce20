//! The configuration file (`ferry.toml`).
//!
//! Every key is optional. Sections are deserialized with serde into structs that reject
//! unknown keys (so a typo is an error naming the key instead of a silently ignored
//! setting), then checked once. The rule sections are parsed once into the typed rules of
//! [`crate::rules`] and assembled into the [`Rules`] the server uses, so a bad pattern or
//! template is reported when the server starts, not on the first matching action.
//!
//! One file per section: `limits.rs`, `long_poll.rs`, `backend.rs`, `tls.rs`, `auth.rs` and
//! `rules.rs` (channels, types, SyncMaps and reducers); `bounds.rs` is the validation table
//! they share. `config` imports `rules`, never the other way round.
//!
//! README.md's "Configuration reference" documents every key.

mod auth;
mod backend;
mod bounds;
mod cluster;
mod limits;
mod long_poll;
mod rules;
#[cfg(test)]
mod tests;
mod tls;

pub use self::backend::{
    BackendConfig, BACKEND_CONCURRENCY_MAX_DEFAULT, BACKEND_EVENTS_BATCH_MAX_DEFAULT,
    BACKEND_PROCESS_DEADLINE_MS_DEFAULT, BACKEND_RESPONSE_BYTES_MAX_DEFAULT,
    BACKEND_RETRY_INITIAL_MS_DEFAULT, BACKEND_RETRY_MAX_MS_DEFAULT, BACKEND_SECRET_BYTES_MIN,
    BACKEND_TIMEOUT_MS_DEFAULT,
};
pub use self::cluster::{
    ClusterConfig, CLUSTER_APPEND_DEADLINE_MS_DEFAULT, CLUSTER_CATCH_UP_WAIT_MS_DEFAULT,
    CLUSTER_LEASE_MS_DEFAULT, CLUSTER_READY_LAG_MAX_DEFAULT, CLUSTER_REPLICAS_DEFAULT,
    CLUSTER_STREAM_DEFAULT,
};
pub use self::limits::{
    Limits, ADMISSION_DEADLINE_MS_DEFAULT, CONNECTIONS_MAX_DEFAULT,
    CONNECTIONS_PER_ADDRESS_MAX_DEFAULT, CONNECT_CATCHUP_MAX_DEFAULT, FRAME_BYTES_MAX_DEFAULT,
    HANDSHAKES_PER_SECOND_DEFAULT, HANDSHAKE_BURST_DEFAULT, HANDSHAKE_TIMEOUT_MS_DEFAULT,
    HEAVY_RESYNCS_MAX_DEFAULT, HEAVY_RESYNC_ACTIONS_DEFAULT, IDLE_TIMEOUT_MS_DEFAULT,
    LOG_CACHE_BYTES_DEFAULT, LOG_RECENT_BYTES_DEFAULT, OUTBOX_LEN_DEFAULT, PIPELINE_NICE_DEFAULT,
    PIPELINE_NICE_MAX, PIPELINE_THREADS_DEFAULT, PIPELINE_THREADS_MAX,
    SUBSCRIBE_HISTORY_MAX_DEFAULT, SYNC_PAIRS_MAX_DEFAULT, WAITING_ROOM_MAX_DEFAULT,
};
pub use self::long_poll::{
    LongPollConfig, LONG_POLL_BODY_BYTES_MAX_DEFAULT, LONG_POLL_HOLD_MS_DEFAULT,
    LONG_POLL_QUEUE_FRAMES_MAX_DEFAULT, LONG_POLL_SESSIONS_MAX_DEFAULT,
    LONG_POLL_SESSION_EXPIRY_MS_DEFAULT,
};
pub use self::tls::TlsConfig;
// These belong to `rules`, which uses them; re-exported for the server and back-end code.
pub use crate::rules::auth::{AuthConfig, SERVER_USER_ID};
pub use crate::rules::{Hook, RuleHooks};

use self::auth::RawAuth;
use self::backend::RawBackend;
use self::rules::{RawChannel, RawReducer, RawRules, RawSyncMap, RawType};
use crate::rules::Rules;
use serde::Deserialize;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Env {
    /// Helpful errors are sent to clients (the default).
    #[default]
    Development,
    /// Internal details stay on the server.
    Production,
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
    /// `[[channels]]`, `[[types]]`, `[[sync_maps]]` and `[[reducers]]`, parsed and indexed:
    /// who may subscribe to which channels, which action types are known, who may add them
    /// and where they are re-sent.
    pub rules: Rules,
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
    /// `[cluster]`: share one log with other nodes on NATS JetStream; `None` is the
    /// embedded single-node mode.
    pub cluster: Option<ClusterConfig>,
}

impl Config {
    /// Parses a TOML document.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        raw.into_config()
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

    /// The embedded default: demo rules ([`Rules::demo`]), development mode, and every user
    /// accepted.
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
            rules: Rules::demo(),
            limits: Limits::default(),
            long_poll: LongPollConfig::default(),
            tls: None,
            allowed_origins: Vec::new(),
            retention_actions_max: None,
            demo: true,
            backend: None,
            cluster: None,
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
    #[serde(default)]
    env: Env,
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
    limits: Limits,
    #[serde(default)]
    long_poll: LongPollConfig,
    tls: Option<TlsConfig>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    backend: Option<RawBackend>,
    cluster: Option<ClusterConfig>,
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
        let subprotocol = self.subprotocol.unwrap_or(SUBPROTOCOL_DEFAULT);
        let min_subprotocol = self.min_subprotocol.unwrap_or(MIN_SUBPROTOCOL_DEFAULT);
        if min_subprotocol > subprotocol {
            return Err(ConfigError::Invalid(format!(
                "min_subprotocol ({min_subprotocol}) must not exceed subprotocol ({subprotocol})"
            )));
        }
        let backend = self.backend.map(RawBackend::into_backend).transpose()?;
        let rules = RawRules {
            channels: self.channels,
            types: self.types,
            sync_maps: self.sync_maps,
            reducers: self.reducers,
        }
        .into_rules(backend.is_some())?;
        let auth = self.auth.into_auth()?;
        self.limits.validate()?;
        self.long_poll.validate()?;
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        Ok(Config {
            listen,
            data_dir,
            env: self.env,
            subprotocol,
            min_subprotocol,
            auth,
            rules,
            limits: self.limits,
            long_poll: self.long_poll,
            tls: self.tls,
            allowed_origins: self.allowed_origins,
            retention_actions_max: self.retention_actions_max.filter(|&n| n > 0),
            demo: false,
            backend,
            cluster: self.cluster,
        })
    }
}

/// An `Invalid` error with a fixed message.
fn invalid(message: &str) -> ConfigError {
    ConfigError::Invalid(message.to_owned())
}

/// Header names lowercased, as HTTP compares them.
fn lowercase(names: Vec<String>) -> Vec<String> {
    names
        .into_iter()
        .map(|name| name.to_ascii_lowercase())
        .collect()
}
