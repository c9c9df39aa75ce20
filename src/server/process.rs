//! Durable, retried `process` calls: a server loop over the log's task queues.
//!
//! The pipeline stores an action whose type has the `process` hook together with a task in
//! the queue of its author's client (`log::TaskOp::Add`, same batch, built by `task_for`) and
//! then calls `notify`. Here one loop per client with tasks calls the back-end for each task
//! in `added` order, retrying with jittered exponential backoff until it answers or
//! `process_deadline_ms` passes, then writes the answer's actions, the `logux/processed` or
//! `logux/undo`, and the task's removal in one append. Tasks survive restarts: `resume`
//! starts a loop for every queue on disk.
//!
//! The loops get what they use (`Uses`), not the `Server`.

use super::answer::{self, UndoReason};
use super::{ActionIds, Server, Shutdown};
use crate::action::{Entry, Meta, NodeIds};
use crate::backend::{meta_json, Backend, Backoff, HookContext, ProcessAnswer, ServerAction};
use crate::clock::Clock;
use crate::cluster::lease::{Lease, Leases};
use crate::config::{Hook, RuleHooks};
use crate::log::{Log, LogError, Task, TaskOp};
use crate::metrics::Metrics;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Tasks read from the log at once by one client's loop.
const TASKS_READ_MAX: usize = 16;
/// Pause before a loop retries after the log failed to read or write.
const LOG_RETRY_MS: u64 = 1_000;

/// What the `process` loops use.
pub struct Uses {
    /// Where the tasks, their actions and the answers are.
    pub log: Log,
    /// The hook client.
    pub backend: Arc<Backend>,
    /// The time of new tasks and of the deadline check.
    pub clock: Arc<dyn Clock>,
    /// `process_pending` and `process_finished`.
    pub metrics: Arc<Metrics>,
    /// The ids of the `logux/processed` and `logux/undo` answers.
    pub ids: Arc<ActionIds>,
    /// The subprotocol of the actions the server writes.
    pub subprotocol: u32,
    /// Stops the loops.
    pub shutdown: Shutdown,
    /// Cluster mode: a queue is run by the node holding its lease.
    pub leases: Option<Leases>,
}

/// The `process` loops of one server: what they use, and the queues (clients) that have a
/// running loop.
pub struct ProcessLoops {
    /// What the loops use.
    uses: Uses,
    /// Queues with a running loop; a queue is in here exactly while its loop runs.
    active: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for ProcessLoops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessLoops").finish_non_exhaustive()
    }
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

/// Starts the loop of `queue` unless one runs (or there is no `[backend]`).
pub fn notify(server: &Server, queue: &str) {
    if let Some(loops) = &server.process {
        loops.notify(queue);
    }
}

/// Starts a loop for every queue with stored tasks (at start-up) and sets the pending gauge.
pub fn resume(loops: &Arc<ProcessLoops>) -> Result<(), LogError> {
    let log = &loops.uses.log;
    let queues = log.task_queues()?;
    let pending = pending_tasks(log, &queues)?;
    loops
        .uses
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
        loops.notify(&queue);
    }
    Ok(())
}

/// Cluster mode: starts a loop for every queue with tasks that has none (tasks of clients
/// of other nodes, whose loop may have died with its node).
pub fn sweep(loops: &Arc<ProcessLoops>) {
    match loops.uses.log.task_queues() {
        Ok(queues) => {
            for (queue, _) in queues {
                loops.notify(&queue);
            }
        }
        Err(error) => tracing::warn!(%error, "listing process queues failed"),
    }
}

/// How many durable tasks `queues` hold, counted without reading them.
fn pending_tasks(log: &Log, queues: &[(String, u64)]) -> Result<usize, LogError> {
    let mut pending = 0;
    for (queue, _) in queues {
        pending += log.task_count(queue)?;
    }
    Ok(pending)
}

impl ProcessLoops {
    /// The loops of a server; none runs until `notify` or `resume`.
    pub fn new(uses: Uses) -> ProcessLoops {
        ProcessLoops {
            uses,
            active: Mutex::new(HashSet::new()),
        }
    }

    /// Starts the loop of `queue` unless one runs.
    pub fn notify(self: &Arc<Self>, queue: &str) {
        if self.uses.shutdown.is_started() {
            return;
        }
        if !self.active().insert(queue.to_owned()) {
            return;
        }
        let loops = self.clone();
        let queue = queue.to_owned();
        tokio::spawn(async move { loops.run_queue(queue).await });
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // A panic while holding the set cannot leave it half-changed (one insert or remove).
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn pause(&self) -> bool {
        self.uses
            .shutdown
            .sleep(Duration::from_millis(LOG_RETRY_MS))
            .await
    }

    async fn run_queue(&self, queue: String) {
        let log = &self.uses.log;
        let mut lease: Option<Lease> = None;
        while !self.uses.shutdown.is_started() {
            let tasks = match log.tasks(&queue, TASKS_READ_MAX) {
                Ok(tasks) => tasks,
                Err(error) => {
                    tracing::error!(%error, "reading process tasks failed; retrying");
                    self.pause().await;
                    continue;
                }
            };
            if tasks.is_empty() {
                // Re-check under the lock: a task stored after the read above notifies while
                // we hold it, sees the queue still active, and relies on this loop to find it.
                let finished = {
                    let mut active = self.active();
                    match log.tasks(&queue, 1) {
                        Ok(more) if more.is_empty() => {
                            active.remove(&queue);
                            true
                        }
                        _ => false,
                    }
                };
                if finished {
                    if let Some(lease) = lease.take() {
                        lease.release().await;
                    }
                    return;
                }
                continue;
            }
            if !self.hold_lease(&queue, &mut lease).await {
                continue;
            }
            for task in tasks {
                if lease.as_ref().is_some_and(Lease::is_lost) || !self.run_task(task).await {
                    // Shutdown, the log refuses writes, or the lease was lost: do not spin
                    // on the same task.
                    self.pause().await;
                    break;
                }
            }
        }
        self.active().remove(&queue);
    }

    /// Cluster mode: takes (or keeps) the lease of `queue`. False when another node holds
    /// it: then this loop waits and reads the queue again, which that node's answers empty,
    /// or which this node takes over once the lease expires.
    async fn hold_lease(&self, queue: &str, lease: &mut Option<Lease>) -> bool {
        let Some(leases) = &self.uses.leases else {
            return true;
        };
        if lease.as_ref().is_some_and(|held| !held.is_lost()) {
            return true;
        }
        *lease = leases.acquire(&format!("process {queue}")).await;
        if lease.is_none() {
            self.uses.shutdown.sleep(leases.lease / 2).await;
            return false;
        }
        true
    }

    /// Calls the back-end for one task until it is finished; false when the loop must pause
    /// and read its queue again (shutdown, or the log failed).
    async fn run_task(&self, task: Task) -> bool {
        let log = &self.uses.log;
        let entry = match log.entry_at(task.added) {
            Ok(Some(entry)) => entry,
            Ok(None) if task.added <= log.head() => {
                tracing::warn!(
                    added = task.added,
                    "the action of a process task is gone (retention); dropping the task"
                );
                return self.finish(&task, Vec::new()).await;
            }
            Ok(None) => {
                // Not durable yet (`tasks` never returns such tasks; kept as a safety net):
                // the loop pauses and reads the queue again, keeping the order.
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
            .unwrap_or_else(|| self.uses.clock.now_ms());
        let body = hook_body(&entry, &saved);
        let Some(answer) = self.call_until_answer(&entry, &body, stored_at).await else {
            return false;
        };
        let entries = self.answer_entries(&entry, answer);
        self.finish(&task, entries).await
    }

    /// Calls `process` until the back-end answers or the deadline passes (then the answer is
    /// a failure); `None` at shutdown.
    async fn call_until_answer(
        &self,
        entry: &Entry,
        body: &Value,
        stored_at_ms: i64,
    ) -> Option<ProcessAnswer> {
        let backend = &self.uses.backend;
        let finished = &self.uses.metrics.process_finished;
        let deadline_ms = i64::try_from(backend.config.process_deadline_ms).unwrap_or(i64::MAX);
        let mut backoff = Backoff::new(&backend.config);
        loop {
            if self.uses.shutdown.is_started() {
                return None;
            }
            if self.uses.clock.now_ms().saturating_sub(stored_at_ms) > deadline_ms {
                tracing::warn!(id = %entry.meta.id, "process deadline passed; undoing the action");
                finished.with_label_values(&["deadline"]).inc();
                return Some(ProcessAnswer::Failed("error".to_owned(), Vec::new()));
            }
            match backend.process(body, &entry.meta.id).await {
                Ok(answer) => {
                    let outcome = match answer {
                        ProcessAnswer::Processed(_) => "processed",
                        ProcessAnswer::Failed(..) => "failed",
                    };
                    finished.with_label_values(&[outcome]).inc();
                    return Some(answer);
                }
                Err(_) => {
                    self.uses.shutdown.sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// The entries that finish a task: the back-end's actions, then the `logux/processed` or
    /// `logux/undo` for the author (an undo also goes to everyone who got the action).
    fn answer_entries(&self, original: &Entry, answer: ProcessAnswer) -> Vec<Entry> {
        let now = self.uses.clock.now_ms();
        let subprotocol = self.uses.subprotocol;
        let author = original.author_client_id().to_owned();
        let (actions, undone) = match answer {
            ProcessAnswer::Processed(actions) => (actions, None),
            ProcessAnswer::Failed(reason, actions) => {
                (actions, Some(UndoReason::from_wire(reason)))
            }
        };
        let reply = match &undone {
            None => answer::processed(&original.meta.id),
            Some(reason) => answer::undo(original.action(), &original.meta.id, reason),
        };
        let mut entries: Vec<Entry> = actions
            .into_iter()
            .map(|action: ServerAction| action.into_entry(now, subprotocol))
            .collect();
        let (id, time) = self.uses.ids.next();
        let mut meta = Meta {
            id,
            time,
            subprotocol,
            clients: vec![author.clone()],
            ..Meta::default()
        };
        if undone.is_some() {
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
    async fn finish(&self, task: &Task, entries: Vec<Entry>) -> bool {
        let done = vec![TaskOp::Done {
            queue: task.queue.clone(),
            added: task.added,
        }];
        match self.uses.log.append_with_tasks(entries, done, None).await {
            Ok(_) => {
                self.uses.metrics.process_pending.dec();
                true
            }
            Err(error) => {
                tracing::error!(%error, "storing a process answer failed; the task stays");
                false
            }
        }
    }
}

/// The `process` hook body of `entry`, with the headers and cookies `saved` with its task.
fn hook_body(entry: &Entry, saved: &Value) -> Value {
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
    body.insert("action".into(), entry.action().clone());
    body.insert("meta".into(), meta_json(&entry.meta));
    Value::Object(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{CommitListener, LogOptions};

    struct NoListener;
    impl CommitListener for NoListener {
        fn committed(&self, _: &[Arc<Entry>]) {}
    }

    fn entry(id: &str) -> Entry {
        Entry::new(
            json!({"type": "order/buy"}),
            Meta {
                id: id.to_owned(),
                time: 1,
                ..Meta::default()
            },
        )
    }

    /// Appends one action per queue name in `queues`, each with a task in that queue.
    async fn add_tasks(log: &Log, queues: &[&str]) {
        let entries = (0..queues.len())
            .map(|n| entry(&format!("{} 10:{}:x 0", n + 1, queues[n])))
            .collect();
        let tasks = queues
            .iter()
            .enumerate()
            .map(|(n, queue)| TaskOp::Add {
                queue: (*queue).to_owned(),
                entry: n,
                value: task_value(1, json!({}), json!({})),
            })
            .collect();
        log.append_with_tasks(entries, tasks, None)
            .await
            .expect("append");
    }

    #[tokio::test]
    async fn pending_tasks_are_counted_per_queue_without_reading_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(dir.path(), LogOptions::default(), Arc::new(NoListener)).expect("log");
        add_tasks(&log, &["a", "a", "ab", "a"]).await;
        assert_eq!(log.task_count("a").ok(), Some(3));
        assert_eq!(log.task_count("ab").ok(), Some(1));
        assert_eq!(log.task_count("b").ok(), Some(0), "no prefix matches");
        let queues = log.task_queues().expect("queues");
        assert_eq!(pending_tasks(&log, &queues).ok(), Some(4));
        let first = log.tasks("a", 1).expect("tasks")[0].added;
        let done = vec![TaskOp::Done {
            queue: "a".to_owned(),
            added: first,
        }];
        log.append_with_tasks(Vec::new(), done, None)
            .await
            .expect("done");
        assert_eq!(log.task_count("a").ok(), Some(2));
        log.close().await.expect("close");
    }
}
