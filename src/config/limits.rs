//! `[limits]`: the named bound of every per-configuration resource.
//!
//! Each limit is written once as a field of [`Limits`] (deserialized directly, every key
//! optional), once as its default constant (unit last in the name), and once as a row of
//! [`Limits::bounds`], the table that validation walks (see `bounds.rs`).

use super::bounds::{check_bounds, Bound};
use super::ConfigError;
use serde::Deserialize;

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
/// Most `pipeline_threads`.
pub const PIPELINE_THREADS_MAX: usize = 64;
/// Default `pipeline_nice`: how many `nice` steps below the connection threads the pipeline
/// threads run, so that in a storm the CPU goes to answering connected clients first.
pub const PIPELINE_NICE_DEFAULT: i32 = 10;
/// Highest `pipeline_nice`, and the highest (lowest-priority) `nice` value Linux allows:
/// the range of `nice` values is 39 steps, and 19 above the default is already the lowest.
pub const PIPELINE_NICE_MAX: i32 = 19;
/// Default `log_cache_bytes`: sled's page cache, defined by the log (see there why 128 MiB).
pub const LOG_CACHE_BYTES_DEFAULT: u64 = crate::log::CACHE_BYTES_DEFAULT;
/// Default `pipeline_backlog_bytes`: the `sync` frames, in bytes of their text, that may be in
/// the action pipeline at once, all connections together. In a reconnect storm the offline
/// actions of the other clients then wait as frame text instead of decoded and judged (which
/// takes about ten times the text); the log writer is kept as busy as before (15,000 clients x
/// 20 actions: 24 s and the same server CPU with 2 MiB as with 8 MiB; 2 MiB is about three
/// group commits of that storm's actions).
pub const PIPELINE_BACKLOG_BYTES_DEFAULT: usize = 2 * 1024 * 1024;
/// Most `pipeline_backlog_bytes`: a `sync`'s share is taken from it at once, in one count
/// of at most `u32::MAX`.
pub const PIPELINE_BACKLOG_BYTES_MAX: usize = u32::MAX as usize;
/// Default `log_recent_bytes`: the newest entries kept in memory, so subscriptions
/// and catch-ups read them without sled and JSON.
pub const LOG_RECENT_BYTES_DEFAULT: usize = crate::log::RECENT_BYTES_DEFAULT;

/// `[limits]`. A key left out keeps its default; an unknown key is an error naming it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    /// Bytes of `sync` frames in the action pipeline at once (from decoding until durable),
    /// all connections together; a larger `sync` waits undecoded and its connection stops
    /// reading until it fits.
    pub pipeline_backlog_bytes: usize,
    /// Size of the log's page cache (sled), in bytes.
    pub log_cache_bytes: u64,
    /// Memory budget, in estimated bytes, of the newest entries kept in memory; 0 turns it
    /// off.
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
            pipeline_backlog_bytes: PIPELINE_BACKLOG_BYTES_DEFAULT,
            log_cache_bytes: LOG_CACHE_BYTES_DEFAULT,
            log_recent_bytes: LOG_RECENT_BYTES_DEFAULT,
        }
    }
}

impl Limits {
    /// The validation table: every bounded limit with its value and allowed range. Zero is
    /// refused where it would disable the server; `log_recent_bytes` may be anything (0
    /// turns the window off).
    fn bounds(&self) -> [Bound; 19] {
        [
            Bound::positive("frame_bytes_max", self.frame_bytes_max),
            Bound::positive("sync_pairs_max", self.sync_pairs_max),
            Bound::positive("subscribe_history_max", self.subscribe_history_max),
            Bound::positive("connect_catchup_max", self.connect_catchup_max),
            Bound::positive("handshake_timeout_ms", self.handshake_timeout_ms),
            Bound::positive("idle_timeout_ms", self.idle_timeout_ms),
            Bound::positive("outbox_len", self.outbox_len),
            Bound::positive("connections_max", self.connections_max),
            Bound::positive(
                "connections_per_address_max",
                self.connections_per_address_max,
            ),
            Bound::positive("handshakes_per_second", self.handshakes_per_second),
            Bound::positive("handshake_burst", self.handshake_burst),
            Bound::positive("heavy_resync_actions", self.heavy_resync_actions),
            Bound::positive("heavy_resyncs_max", self.heavy_resyncs_max),
            Bound::positive("waiting_room_max", self.waiting_room_max),
            Bound::positive("admission_deadline_ms", self.admission_deadline_ms),
            Bound::within(
                "pipeline_threads",
                self.pipeline_threads,
                0,
                PIPELINE_THREADS_MAX,
            ),
            Bound::within("pipeline_nice", self.pipeline_nice, 0, PIPELINE_NICE_MAX),
            Bound::within(
                "pipeline_backlog_bytes",
                self.pipeline_backlog_bytes,
                1,
                PIPELINE_BACKLOG_BYTES_MAX,
            ),
            Bound::positive("log_cache_bytes", self.log_cache_bytes),
        ]
    }

    /// Checks every row of [`Limits::bounds`]; the error names the first key out of range.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_bounds("limits", &self.bounds())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Limits, ConfigError> {
        let limits: Limits =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        limits.validate()?;
        Ok(limits)
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_default_is_within_its_bounds() {
        assert!(Limits::default().validate().is_ok());
        assert_eq!(parse("").unwrap().frame_bytes_max, FRAME_BYTES_MAX_DEFAULT);
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
    fn every_bounded_limit_refuses_values_out_of_range_by_name() {
        for bound in Limits::default().bounds() {
            let below = bound.min - 1;
            if below >= 0 {
                let e = err(&format!("{} = {below}", bound.key));
                assert!(e.contains(&format!("limits.{}", bound.key)), "{e}");
            }
            if let Some(max) = bound.max {
                let e = err(&format!("{} = {}", bound.key, max + 1));
                assert!(e.contains(&format!("limits.{}", bound.key)), "{e}");
                assert!(parse(&format!("{} = {max}", bound.key)).is_ok());
            }
        }
    }

    #[test]
    fn messages_say_what_is_allowed() {
        assert_eq!(
            err("outbox_len = 0"),
            "invalid configuration: limits.outbox_len: must be greater than 0"
        );
        assert_eq!(
            err("pipeline_nice = -1"),
            "invalid configuration: limits.pipeline_nice: from 0 to 19"
        );
        assert!(err("frame_bytes_max = -1").contains("frame_bytes_max"));
    }
}
