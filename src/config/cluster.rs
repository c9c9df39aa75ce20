//! `[cluster]`: several Ferry nodes sharing one log on a NATS JetStream stream.

use super::bounds::{check_bounds, Bound};
use super::ConfigError;
use serde::Deserialize;
use std::path::PathBuf;

/// Default JetStream stream name.
pub const CLUSTER_STREAM_DEFAULT: &str = "ferry";
/// Default replica count of the stream (a quorum of 2 acknowledges an append).
pub const CLUSTER_REPLICAS_DEFAULT: usize = 3;
/// Most JetStream replicas (nats-server's own limit).
pub const CLUSTER_REPLICAS_MAX: usize = 5;
/// How long an append is retried (same message id) before the clients' connections are
/// closed without an error so that they reconnect elsewhere. Covers a leader election
/// (4-9 s) with room to spare.
pub const CLUSTER_APPEND_DEADLINE_MS_DEFAULT: u64 = 30_000;
/// A node whose view is more than this many stream messages behind the stream head answers
/// `/ready` with 503.
pub const CLUSTER_READY_LAG_MAX_DEFAULT: u64 = 10_000;
/// How long a connecting client waits for this node's view to reach the stream head
/// (read-your-writes) before its connection is closed without an error.
pub const CLUSTER_CATCH_UP_WAIT_MS_DEFAULT: u64 = 10_000;
/// How long a `process` task lease or the events lease lasts without renewal: a node that
/// died mid-call hands its tasks over after this long.
pub const CLUSTER_LEASE_MS_DEFAULT: u64 = 10_000;

/// `[cluster]` as configured.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS servers to connect to (any of them will do; the client fails over).
    pub nats_urls: Vec<String>,
    /// The JetStream stream; created (file storage) when missing.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Replicas of the stream when Ferry creates it.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// A user name and password for NATS, as `user:password` on the first line of a file.
    pub user_password_file: Option<PathBuf>,
    /// An nkey seed file (`SU...`) for NATS.
    pub nkey_seed_file: Option<PathBuf>,
    /// CA certificates (PEM) to verify the NATS servers' TLS certificates; TLS is required
    /// when set.
    pub ca_file: Option<PathBuf>,
    /// See [`CLUSTER_APPEND_DEADLINE_MS_DEFAULT`].
    #[serde(default = "default_append_deadline_ms")]
    pub append_deadline_ms: u64,
    /// See [`CLUSTER_READY_LAG_MAX_DEFAULT`].
    #[serde(default = "default_ready_lag_max")]
    pub ready_lag_max: u64,
    /// See [`CLUSTER_CATCH_UP_WAIT_MS_DEFAULT`].
    #[serde(default = "default_catch_up_wait_ms")]
    pub catch_up_wait_ms: u64,
    /// See [`CLUSTER_LEASE_MS_DEFAULT`].
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

fn default_stream() -> String {
    CLUSTER_STREAM_DEFAULT.to_owned()
}
fn default_replicas() -> usize {
    CLUSTER_REPLICAS_DEFAULT
}
fn default_append_deadline_ms() -> u64 {
    CLUSTER_APPEND_DEADLINE_MS_DEFAULT
}
fn default_ready_lag_max() -> u64 {
    CLUSTER_READY_LAG_MAX_DEFAULT
}
fn default_catch_up_wait_ms() -> u64 {
    CLUSTER_CATCH_UP_WAIT_MS_DEFAULT
}
fn default_lease_ms() -> u64 {
    CLUSTER_LEASE_MS_DEFAULT
}

impl ClusterConfig {
    /// Checks the section: at least one URL, a stream name NATS accepts, bounded numbers.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.nats_urls.is_empty() {
            return Err(ConfigError::Invalid(
                "cluster.nats_urls: name at least one NATS server".to_owned(),
            ));
        }
        let valid_name = !self.stream.is_empty()
            && self
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_name {
            return Err(ConfigError::Invalid(format!(
                "cluster.stream: {:?} must be letters, digits, '-' or '_'",
                self.stream
            )));
        }
        if self.user_password_file.is_some() && self.nkey_seed_file.is_some() {
            return Err(ConfigError::Invalid(
                "cluster: set user_password_file or nkey_seed_file, not both".to_owned(),
            ));
        }
        check_bounds(
            "cluster",
            &[
                Bound::within("replicas", self.replicas, 1, CLUSTER_REPLICAS_MAX),
                Bound::within(
                    "append_deadline_ms",
                    self.append_deadline_ms,
                    100,
                    3_600_000,
                ),
                Bound::positive("ready_lag_max", self.ready_lag_max),
                Bound::within("catch_up_wait_ms", self.catch_up_wait_ms, 10, 600_000),
                Bound::within("lease_ms", self.lease_ms, 1_000, 600_000),
            ],
        )
    }
}
