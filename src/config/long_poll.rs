//! `[long_poll]`: the HTTP long-poll transport.

use super::bounds::{check_bounds, Bound};
use super::limits::FRAME_BYTES_MAX_DEFAULT;
use super::ConfigError;
use serde::Deserialize;

/// Default `poll_hold_ms`: how long a poll waits for frames before answering an empty list;
/// under the 30-60 s idle timeouts of common proxies and load balancers.
pub const LONG_POLL_HOLD_MS_DEFAULT: u64 = 25_000;
/// Default `session_expiry_ms`: a session with no request for this long is closed like a
/// dropped socket. Longer than a poll plus a client's retries after a network blip.
pub const LONG_POLL_SESSION_EXPIRY_MS_DEFAULT: u64 = 60_000;
/// Default `sessions_max`: open long-poll sessions accepted at once.
pub const LONG_POLL_SESSIONS_MAX_DEFAULT: usize = 10_000;
/// Default `body_bytes_max`: twice the default frame limit, so one `sync` frame of
/// `frame_bytes_max` still fits after JSON string escaping.
pub const LONG_POLL_BODY_BYTES_MAX_DEFAULT: usize = 2 * FRAME_BYTES_MAX_DEFAULT;
/// Default `queue_frames_max`: frames kept for one session until the client acknowledges
/// them; beyond it the session is closed as a slow consumer (like `outbox_len`).
pub const LONG_POLL_QUEUE_FRAMES_MAX_DEFAULT: usize = 4096;

/// `[long_poll]`. A key left out keeps its default; an unknown key is an error naming it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
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

impl LongPollConfig {
    /// Every number must be greater than 0, sessions must outlive a poll, and every CORS
    /// origin must be one a browser could send.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_bounds(
            "long_poll",
            &[
                Bound::positive("poll_hold_ms", self.poll_hold_ms),
                Bound::positive("session_expiry_ms", self.session_expiry_ms),
                Bound::positive("sessions_max", self.sessions_max),
                Bound::positive("body_bytes_max", self.body_bytes_max),
                Bound::positive("queue_frames_max", self.queue_frames_max),
            ],
        )?;
        if self.session_expiry_ms <= self.poll_hold_ms {
            return Err(ConfigError::Invalid(format!(
                "long_poll.session_expiry_ms ({}) must be greater than \
                 long_poll.poll_hold_ms ({}), or sessions expire while polling",
                self.session_expiry_ms, self.poll_hold_ms
            )));
        }
        self.cors_origins
            .iter()
            .try_for_each(|origin| check_cors_origin(origin))
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
