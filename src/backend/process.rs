//! Durable, retried `process` calls.
//!
//! The pipeline stores an action whose type has the `process` hook together with a task in
//! the queue of its author's client (`log::TaskOp::Add`, same batch). Here one loop per
//! client with tasks calls the back-end for each task in `added` order, retrying with
//! jittered exponential backoff until it answers or `process_deadline_ms` passes, then writes
//! the answer's actions, the `logux/processed` or `logux/undo`, and the task's removal in one
//! append. Tasks survive restarts: `resume` starts a loop for every queue on disk.

use super::{sleep_or_shutdown, Backoff, HookContext, ProcessAnswer, ServerAction};
use crate::action::{Entry, Meta, NodeIds};
use crate::config::{Hook, RuleHooks};
use crate::log::{LogError, Task, TaskOp};
use crate::server::Server;
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Tasks read from the log at once by one client's loop.
const TASKS_READ_MAX: usize = 16;
/// Pause before a loop retries after the log failed to read or write.
const LOG_RETRY_MS: u64 = 1_000;

/// The queues (clients) that have a running loop.
#[derive(Debug, Default)]
pub struct ProcessQueues {
    active: Mutex<HashSet<String>>,
}

/// What a task keeps next to its action: when it was stored, and the connection's headers
/// and cookies the rule asked for (a later call, maybe after a restart, still sends them).
pub fn task_value(stored_at_ms: i64, headers: Value, cookies: Value) -> Vec<u8> {
    json!({"stored_at": stored_at_ms, "headers": headers, "cookies": cookies})
        .to_string()
        .into_bytes()
}

/// The task that makes `entry` (at `index` of its append) be processed, with the request
/// context of the hook rule.
pub fn task_for(
    server: &Server,
    index: usize,
    entry: &Entry,
    context: &HookContext<'_>,
    rule: &RuleHooks,
) -> TaskOp {
    let (headers, cookies) = context.forwarded(&rule.headers, &rule.cookies);
    TaskOp::Add {
        queue: entry.author_client_id().to_owned(),
        entry: index,
        value: task_value(server.clock.now_ms(), headers, cookies),
    }
}

/// Starts the loop of `queue` unless one runs.
pub fn notify(server: &Arc<Server>, queue: &str) {
    if server.backend.is_none() || server.is_shutting_down() {
        return;
    }
    {
        let mut active = server
            .process_queues
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !active.insert(queue.to_owned()) {
            return;
        }
    }
    let server = server.clone();
    let queue = queue.to_owned();
    tokio::spawn(async move { run_queue(server, queue).await });
}

/// Starts a loop for every queue with stored tasks (at start-up) and sets the pending gauge.
pub fn resume(server: &Arc<Server>) -> Result<(), LogError> {
    let queues = server.log.task_queues()?;
    let mut pending = 0;
    for (queue, _) in &queues {
        pending += server.log.tasks(queue, usize::MAX)?.len();
    }
    server
        .metrics
        .process_pending
        .set(i64::try_from(pending).unwrap_or(i64::MAX));
    if pending > 0 {
        tracing::info!(
            pending,
            clients = queues.len(),
            "resuming stored process tasks"
        );
    }
    for (queue, _) in queues {
        notify(server, &queue);
    }
    Ok(())
}

async fn run_queue(server: Arc<Server>, queue: String) {
    loop {
        if server.is_shutting_down() {
            break;
        }
        let tasks = match server.log.tasks(&queue, TASKS_READ_MAX) {
            Ok(tasks) => tasks,
            Err(error) => {
                tracing::error!(%error, "reading process tasks failed; retrying");
                sleep_or_shutdown(&server, Duration::from_millis(LOG_RETRY_MS)).await;
                continue;
            }
        };
        if tasks.is_empty() {
            // Re-check under the lock: a task stored after the read above notifies while we
            // hold it, sees the queue still active, and relies on this loop to find it.
            let mut active = server
                .process_queues
                .active
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match server.log.tasks(&queue, 1) {
                Ok(more) if more.is_empty() => {
                    active.remove(&queue);
                    return;
                }
                _ => continue,
            }
        }
        for task in tasks {
            if !run_task(&server, task).await {
                // Shutdown, or the log refuses writes: do not spin on the same task.
                sleep_or_shutdown(&server, Duration::from_millis(LOG_RETRY_MS)).await;
                break;
            }
        }
    }
    server
        .process_queues
        .active
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&queue);
}

/// Calls the back-end for one task until it is finished; false when the loop must pause and
/// read its queue again (shutdown, or the log failed).
async fn run_task(server: &Arc<Server>, task: Task) -> bool {
    let Some(backend) = server.backend.clone() else {
        return false;
    };
    let entry = match server.log.entry_at(task.added) {
        Ok(Some(entry)) => entry,
        Ok(None) if task.added <= server.log.head() => {
            tracing::warn!(
                added = task.added,
                "the action of a process task is gone (retention); dropping the task"
            );
            return finish(server, &task, Vec::new()).await;
        }
        Ok(None) => {
            // Not durable yet (`tasks` never returns such tasks; kept as a safety net): the
            // loop pauses and reads the queue again, keeping the order.
            return false;
        }
        Err(error) => {
            tracing::error!(%error, "reading a process task's action failed");
            return false;
        }
    };
    let saved: Value = serde_json::from_slice(&task.value).unwrap_or(Value::Null);
    let stored_at = saved
        .get("stored_at")
        .and_then(Value::as_i64)
        .unwrap_or_else(|| server.clock.now_ms());
    let ids = NodeIds::parse(&entry.meta.id);
    let context = HookContext {
        ids: &ids,
        subprotocol: entry.meta.subprotocol,
        peer: None,
    };
    let mut body = context.body(Hook::Process, &[], &[]);
    for key in ["headers", "cookies"] {
        if let Some(value) = saved.get(key).filter(|value| value.is_object()) {
            body.insert(key.into(), value.clone());
        }
    }
    body.insert("action".into(), entry.action.clone());
    body.insert("meta".into(), super::meta_json(&entry.meta));
    let body = Value::Object(body);
    let config = &backend.config;
    let mut backoff = Backoff::new(config);
    loop {
        if server.is_shutting_down() {
            return false;
        }
        let deadline_passed = server.clock.now_ms().saturating_sub(stored_at)
            > i64::try_from(config.process_deadline_ms).unwrap_or(i64::MAX);
        let answer = if deadline_passed {
            tracing::warn!(id = %entry.meta.id, "process deadline passed; undoing the action");
            server
                .metrics
                .process_finished
                .with_label_values(&["deadline"])
                .inc();
            ProcessAnswer::Failed("error".to_owned(), Vec::new())
        } else {
            match backend.process(&body, &entry.meta.id).await {
                Ok(answer) => {
                    let outcome = match answer {
                        ProcessAnswer::Processed(_) => "processed",
                        ProcessAnswer::Failed(..) => "failed",
                    };
                    server
                        .metrics
                        .process_finished
                        .with_label_values(&[outcome])
                        .inc();
                    answer
                }
                Err(_) => {
                    backoff.wait(server).await;
                    continue;
                }
            }
        };
        let entries = answer_entries(server, &entry, answer);
        return finish(server, &task, entries).await;
    }
}

/// The entries that finish a task: the back-end's actions, then the `logux/processed` or
/// `logux/undo` for the author (an undo also goes to everyone who got the action).
fn answer_entries(server: &Server, original: &Entry, answer: ProcessAnswer) -> Vec<Entry> {
    let now = server.clock.now_ms();
    let subprotocol = server.config.subprotocol;
    let author = original.author_client_id().to_owned();
    let (actions, reply) = match answer {
        ProcessAnswer::Processed(actions) => (
            actions,
            json!({"id": original.meta.id, "type": "logux/processed"}),
        ),
        ProcessAnswer::Failed(reason, actions) => {
            let mut undo = Map::new();
            undo.insert("action".into(), original.action.clone());
            undo.insert("id".into(), json!(original.meta.id));
            undo.insert("reason".into(), json!(reason));
            undo.insert("type".into(), json!("logux/undo"));
            (actions, Value::Object(undo))
        }
    };
    let undo = reply.get("type").and_then(Value::as_str) == Some("logux/undo");
    let mut entries: Vec<Entry> = actions
        .into_iter()
        .map(|action: ServerAction| action.into_entry(now, subprotocol))
        .collect();
    let (id, time) = server.next_action_id();
    let mut meta = Meta {
        id,
        time,
        subprotocol,
        clients: vec![author.clone()],
        ..Meta::default()
    };
    if undo {
        meta.channels = original.meta.channels.clone();
        meta.users = original.meta.users.clone();
        meta.nodes = original.meta.nodes.clone();
        for client in &original.meta.clients {
            if !meta.clients.contains(client) {
                meta.clients.push(client.clone());
            }
        }
    }
    entries.push(Entry::new(reply, meta));
    entries
}

/// Stores `entries` and removes the task in one write; false when the log refused.
async fn finish(server: &Arc<Server>, task: &Task, entries: Vec<Entry>) -> bool {
    let done = vec![TaskOp::Done {
        queue: task.queue.clone(),
        added: task.added,
    }];
    match server.log.append_with_tasks(entries, done, None).await {
        Ok(_) => {
            server.metrics.process_pending.dec();
            true
        }
        Err(error) => {
            tracing::error!(%error, "storing a process answer failed; the task stays");
            false
        }
    }
}
