//! Event hooks: every stored action in a channel whose rule has the `events` hook is POSTed
//! to `url/events`, at least once, in log order, in batches. The cursor (the last `added`
//! delivered) is saved after each accepted batch, so a restart resumes after it.

use super::{meta_json, Backoff};
use crate::action::Entry;
use crate::config::Hook;
use crate::server::Server;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Setting that holds the cursor.
const CURSOR_SETTING: &str = "events_cursor";
/// Log entries scanned per step while looking for events.
const SCAN_ENTRIES_MAX: usize = 1_000;
/// How often the dispatcher looks for new entries when no commit woke it.
const IDLE_POLL_MS: u64 = 1_000;
/// Entries skipped (no event channel) before the cursor is saved anyway.
const SKIPPED_SAVE_EVERY: u64 = 10_000;

/// Starts the dispatcher when some channel rule has the `events` hook.
pub fn start(server: &Arc<Server>) {
    if server.backend.is_none() || !server.rules.has_event_hooks() {
        return;
    }
    let server = server.clone();
    tokio::spawn(async move { run(server).await });
}

fn is_event(server: &Server, entry: &Entry) -> bool {
    entry.meta.channels.iter().any(|channel| {
        server
            .rules
            .channel_hooks(channel)
            .is_some_and(|hooks| hooks.has(Hook::Events))
    })
}

async fn save_cursor(server: &Arc<Server>, cursor: u64) {
    if let Err(error) = server
        .log
        .put_setting(CURSOR_SETTING, &cursor.to_string())
        .await
    {
        tracing::error!(%error, "saving the events cursor failed");
    }
}

async fn run(server: Arc<Server>) {
    let Some(backend) = server.backend.clone() else {
        return;
    };
    // A first start delivers what is added from now on, not the whole history.
    let mut cursor = match server.log.get_setting(CURSOR_SETTING) {
        Ok(Some(text)) => text.parse().unwrap_or(0),
        Ok(None) => {
            let head = server.log.head();
            save_cursor(&server, head).await;
            head
        }
        Err(error) => {
            tracing::error!(%error, "reading the events cursor failed; event hooks are off");
            return;
        }
    };
    let mut saved = cursor;
    let batch_max = backend.config.events_batch_max;
    loop {
        if server.is_shutting_down() {
            return;
        }
        let scanned = match server.log.entries_after(cursor, SCAN_ENTRIES_MAX) {
            Ok(scanned) => scanned,
            Err(error) => {
                tracing::error!(%error, "reading the log for events failed");
                Vec::new()
            }
        };
        if scanned.is_empty() {
            tokio::select! {
                _ = server.events_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(IDLE_POLL_MS)) => {}
                _ = server.shut_down() => return,
            }
            continue;
        }
        // Take entries up to the batch size; the cursor moves to the last entry looked at.
        let mut events = Vec::new();
        let mut last = cursor;
        for entry in &scanned {
            if is_event(&server, entry) {
                if events.len() == batch_max {
                    break;
                }
                events.push(json!({
                    "added": entry.meta.added,
                    "action": entry.action,
                    "meta": meta_json(&entry.meta),
                }));
            }
            last = entry.meta.added;
        }
        if events.is_empty() {
            cursor = last;
            if cursor - saved >= SKIPPED_SAVE_EVERY {
                save_cursor(&server, cursor).await;
                saved = cursor;
            }
            continue;
        }
        let count = events.len() as u64;
        let body = json!({"hook": Hook::Events.name(), "events": Value::Array(events)});
        let mut backoff = Backoff::new(&backend.config);
        while backend.call(Hook::Events, &body, None).await.is_err() {
            if !backoff.wait(&server).await {
                return;
            }
        }
        server.metrics.events_delivered.inc_by(count);
        cursor = last;
        save_cursor(&server, cursor).await;
        saved = cursor;
    }
}
