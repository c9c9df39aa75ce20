//! Event hooks, a server loop over the log: every stored action in a channel whose rule has
//! the `events` hook is POSTed to `url/events`, at least once, in log order, in batches. The
//! cursor (the last `added` delivered) is saved in the log's settings after each accepted
//! batch, so a restart resumes after it.
//!
//! A first start (no cursor) begins at the head: the hook gets what is added from then on,
//! not the whole history. A cursor that exists but is unreadable stops start-up
//! (`EventsError`) instead of guessing a position, which would replay or skip events.
//!
//! The dispatcher gets what it uses (`Uses`), not the `Server`.

use super::Shutdown;
use crate::action::Entry;
use crate::backend::{meta_json, Backend, Backoff};
use crate::cluster::lease::{Lease, Leases};
use crate::config::Hook;
use crate::log::{Log, LogError};
use crate::metrics::Metrics;
use crate::rules::Rules;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Setting that holds the cursor.
pub const CURSOR_SETTING: &str = "events_cursor";
/// Log entries scanned per step while looking for events.
const SCAN_ENTRIES_MAX: usize = 1_000;
/// How often the dispatcher looks for new entries when no commit woke it.
const IDLE_POLL_MS: u64 = 1_000;
/// Entries skipped (no event channel) before the cursor is saved anyway.
const SKIPPED_SAVE_ENTRIES: u64 = 10_000;

/// Why the event hooks cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The cursor setting could not be read.
    #[error("cannot read the events cursor (settings key {key:?}): {source}")]
    Read {
        /// The settings key.
        key: &'static str,
        /// Why.
        source: LogError,
    },
    /// The cursor setting exists but is not a log position.
    #[error(
        "the events cursor (settings key {key:?}) holds {value:?}, not a log position; \
         refusing to guess where event delivery resumes"
    )]
    Corrupt {
        /// The settings key.
        key: &'static str,
        /// What it holds.
        value: String,
    },
}

/// What the events dispatcher uses.
pub struct Uses {
    /// The log it scans and where the cursor is saved.
    pub log: Log,
    /// Which channels have the `events` hook.
    pub rules: Rules,
    /// The hook client.
    pub backend: Arc<Backend>,
    /// `events_delivered`.
    pub metrics: Arc<Metrics>,
    /// Woken after every group commit.
    pub wake: Arc<Notify>,
    /// Stops the dispatcher.
    pub shutdown: Shutdown,
    /// Cluster mode: one node at a time delivers events, under the events lease, from a
    /// cursor shared by every node.
    pub leases: Option<Leases>,
}

/// The lease the delivering node holds in cluster mode.
const EVENTS_LEASE: &str = "events";

/// Reads the saved cursor and starts the dispatcher. Fails, starting nothing, when the
/// cursor cannot be read or parsed.
pub fn start(uses: Uses) -> Result<(), EventsError> {
    if uses.leases.is_some() {
        tokio::spawn(async move { run_in_cluster(uses).await });
        return Ok(());
    }
    let saved = saved_cursor(&uses.log)?;
    tokio::spawn(async move { run(&uses, saved, None).await });
    Ok(())
}

/// Cluster mode: waits for the events lease, reads the shared cursor, and delivers until the
/// lease is lost (another node then takes over from the cursor it finds).
async fn run_in_cluster(uses: Uses) {
    let Some(leases) = uses.leases.clone() else {
        return;
    };
    while !uses.shutdown.is_started() {
        let Some(lease) = leases.acquire(EVENTS_LEASE).await else {
            uses.shutdown.sleep(leases.lease / 2).await;
            continue;
        };
        let saved = match leases.shared_setting(CURSOR_SETTING).await {
            Ok(None) => None,
            Ok(Some(text)) => match parse_cursor(text) {
                Ok(cursor) => Some(cursor),
                Err(error) => {
                    tracing::error!(%error, "event hooks stopped");
                    lease.release().await;
                    return;
                }
            },
            Err(error) => {
                tracing::warn!(%error, "reading the shared events cursor failed; retrying");
                lease.release().await;
                uses.shutdown.sleep(leases.lease / 2).await;
                continue;
            }
        };
        tracing::info!(cursor = ?saved, "this node delivers the event hooks");
        run(&uses, saved, Some(&lease)).await;
        lease.release().await;
    }
}

/// The saved cursor; `None` on a first start.
fn saved_cursor(log: &Log) -> Result<Option<u64>, EventsError> {
    let text = log
        .get_setting(CURSOR_SETTING)
        .map_err(|source| EventsError::Read {
            key: CURSOR_SETTING,
            source,
        })?;
    text.map(parse_cursor).transpose()
}

/// A saved cursor's text as a log position, or the error naming the setting.
fn parse_cursor(text: String) -> Result<u64, EventsError> {
    text.parse().map_err(|_| EventsError::Corrupt {
        key: CURSOR_SETTING,
        value: text,
    })
}

fn is_event(rules: &Rules, entry: &Entry) -> bool {
    entry.meta.channels.iter().any(|channel| {
        rules
            .channel_hooks(channel)
            .is_some_and(|hooks| hooks.has(Hook::Events))
    })
}

async fn save_cursor(uses: &Uses, cursor: u64) {
    let saved = match &uses.leases {
        Some(leases) => {
            leases
                .put_shared_setting(CURSOR_SETTING, &cursor.to_string())
                .await
        }
        None => uses
            .log
            .put_setting(CURSOR_SETTING, &cursor.to_string())
            .await
            .map_err(|error| error.to_string()),
    };
    if let Err(error) = saved {
        tracing::error!(%error, "saving the events cursor failed");
    }
}

/// The events among `scanned`, at most `batch_max`, and the `added` of the last entry
/// looked at (where the cursor moves once they are delivered).
fn next_batch(
    rules: &Rules,
    scanned: &[Arc<Entry>],
    cursor: u64,
    batch_max: usize,
) -> (Vec<Value>, u64) {
    let mut events = Vec::new();
    let mut last = cursor;
    for entry in scanned {
        if is_event(rules, entry) {
            if events.len() == batch_max {
                break;
            }
            events.push(json!({
                "added": entry.meta.added,
                "action": entry.action(),
                "meta": meta_json(&entry.meta),
            }));
        }
        last = entry.meta.added;
    }
    (events, last)
}

/// Waits for a commit, the idle poll or shutdown; false at shutdown.
async fn idle(uses: &Uses) -> bool {
    tokio::select! {
        _ = uses.wake.notified() => true,
        _ = tokio::time::sleep(Duration::from_millis(IDLE_POLL_MS)) => true,
        _ = uses.shutdown.started() => false,
    }
}

/// POSTs one batch until the back-end accepts it; false at shutdown.
async fn deliver(uses: &Uses, events: Vec<Value>) -> bool {
    let count = events.len() as u64;
    let body = json!({"hook": Hook::Events.name(), "events": Value::Array(events)});
    let mut backoff = Backoff::new(&uses.backend.config);
    while uses.backend.call(Hook::Events, &body, None).await.is_err() {
        if !uses.shutdown.sleep(backoff.next_delay()).await {
            return false;
        }
    }
    uses.metrics.events_delivered.inc_by(count);
    true
}

/// Delivers events after `saved_cursor` until shutdown, or until `lease` is lost.
async fn run(uses: &Uses, saved_cursor: Option<u64>, lease: Option<&Lease>) {
    let log = &uses.log;
    let mut cursor = match saved_cursor {
        Some(cursor) => cursor,
        None => {
            let head = log.head();
            save_cursor(uses, head).await;
            head
        }
    };
    let mut saved = cursor;
    let batch_max = uses.backend.config.events_batch_max;
    while !uses.shutdown.is_started() && !lease.is_some_and(Lease::is_lost) {
        let scanned = match log.entries_after(cursor, SCAN_ENTRIES_MAX) {
            Ok(scanned) => scanned,
            Err(error) => {
                tracing::error!(%error, "reading the log for events failed");
                Vec::new()
            }
        };
        if scanned.is_empty() {
            if !idle(uses).await {
                return;
            }
            continue;
        }
        let (events, last) = next_batch(&uses.rules, &scanned, cursor, batch_max);
        if events.is_empty() {
            cursor = last;
            if cursor - saved >= SKIPPED_SAVE_ENTRIES {
                save_cursor(uses, cursor).await;
                saved = cursor;
            }
            continue;
        }
        if !deliver(uses, events).await {
            return;
        }
        cursor = last;
        save_cursor(uses, cursor).await;
        saved = cursor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{CommitListener, LogOptions};

    struct NoListener;
    impl CommitListener for NoListener {
        fn committed(&self, _: &[Arc<Entry>]) {}
    }

    #[tokio::test]
    async fn the_saved_cursor_is_absent_a_position_or_an_error_naming_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path(), LogOptions::default(), Arc::new(NoListener)).expect("log");
        assert_eq!(saved_cursor(&log).ok(), Some(None), "a first start");
        log.put_setting(CURSOR_SETTING, "42")
            .await
            .expect("setting");
        assert_eq!(saved_cursor(&log).ok(), Some(Some(42)));
        for corrupt in ["", "-1", "4 2", "forty-two"] {
            log.put_setting(CURSOR_SETTING, corrupt)
                .await
                .expect("setting");
            let error = saved_cursor(&log).expect_err(corrupt).to_string();
            assert!(error.contains(CURSOR_SETTING), "{error}");
            assert!(error.contains(&format!("{corrupt:?}")), "{error}");
        }
        log.close().await.expect("close");
    }
}
