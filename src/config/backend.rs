//! `[backend]`: the HTTP back-end that rules delegate hooks to, and the server API's secret.

use super::bounds::{check_bounds, Bound};
use super::{invalid, lowercase, ConfigError};
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;

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

/// `[backend]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
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
    /// Fills in the defaults and checks the URL, the secret and every number.
    pub(super) fn into_backend(self) -> Result<BackendConfig, ConfigError> {
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
        let retry_initial = self
            .process_retry_initial_ms
            .unwrap_or(BACKEND_RETRY_INITIAL_MS_DEFAULT);
        let backend = BackendConfig {
            url: self.url.trim_end_matches('/').to_owned(),
            secret: self.secret,
            auth: self.auth,
            timeout_ms: self.timeout_ms.unwrap_or(BACKEND_TIMEOUT_MS_DEFAULT),
            concurrency_max: self
                .concurrency_max
                .unwrap_or(BACKEND_CONCURRENCY_MAX_DEFAULT),
            response_bytes_max: self
                .response_bytes_max
                .unwrap_or(BACKEND_RESPONSE_BYTES_MAX_DEFAULT),
            process_retry_initial_ms: retry_initial,
            process_retry_max_ms: self
                .process_retry_max_ms
                .unwrap_or(BACKEND_RETRY_MAX_MS_DEFAULT),
            process_deadline_ms: self
                .process_deadline_ms
                .unwrap_or(BACKEND_PROCESS_DEADLINE_MS_DEFAULT),
            events_batch_max: self
                .events_batch_max
                .unwrap_or(BACKEND_EVENTS_BATCH_MAX_DEFAULT),
            auth_headers: lowercase(self.auth_headers),
            auth_cookies: self.auth_cookies,
            ca_file: self.ca_file,
        };
        check_bounds("backend", &backend.bounds())?;
        Ok(BackendConfig {
            // A longest delay below the first one would make retries faster, not slower.
            process_retry_max_ms: backend.process_retry_max_ms.max(retry_initial),
            ..backend
        })
    }
}

impl BackendConfig {
    /// The validation table: every number must be greater than 0.
    fn bounds(&self) -> [Bound; 7] {
        [
            Bound::positive("timeout_ms", self.timeout_ms),
            Bound::positive("process_retry_initial_ms", self.process_retry_initial_ms),
            Bound::positive("process_retry_max_ms", self.process_retry_max_ms),
            Bound::positive("process_deadline_ms", self.process_deadline_ms),
            Bound::positive("concurrency_max", self.concurrency_max),
            Bound::positive("response_bytes_max", self.response_bytes_max),
            Bound::positive("events_batch_max", self.events_batch_max),
        ]
    }
}
