//! The action pipeline of one connection: identity → rules (type, access, resend) → durable
//! append (group commit) → `synced` → delivery → `logux/processed` or `logux/undo`.
//!
//! One worker task per connection handles that client's `sync` messages strictly in order;
//! different clients run in parallel. Judging one action is `judge.rs`, the catch-ups that a
//! connection or subscription sends are `catchup.rs`, subscriptions answered from object
//! state are `objects.rs`.
//!
//! Ordering rule after an undo: unlike `@logux/server`, which undoes every later queued action
//! of the same client with reason `error` once one action is undone, Ferry judges each action
//! on its own. A client's unrelated offline actions are not lost because one was denied.

use super::admission::HeavyPermit;
use super::connection::SyncBudget;
use super::hub::{ConnHandle, Outbound};
use super::judge::Judged;
use super::Server;
use crate::action::Entry;
use crate::backend::HookContext;
use crate::log::{AppendOutcome, DurableHook, LogError, PendingAppend, TaskOp};
use crate::peer::Peer;
use crate::protocol::IncomingSync;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Most entries written in one append request; a larger `sync` is written in several requests
/// and acknowledged once the last one is durable.
pub const APPEND_CHUNK_ENTRIES_MAX: usize = 5_000;

/// Most appends one worker keeps queued in the log without waiting for them to be durable.
/// A client that sends `sync` after `sync` then shares each group commit with all its queued
/// actions instead of one `sync` per flush.
pub const APPENDS_IN_FLIGHT_MAX: usize = 32;

/// Appends of one worker that are queued in the log but not yet durable, oldest first, each
/// with the budgets of its `sync` (released once it is durable). The log stores them,
/// and calls their hooks (`synced`), in this order.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    appends: VecDeque<(PendingAppend, Option<SyncBudget>)>,
}

impl InFlight {
    /// Waits until the oldest append is durable; pending forever when there is none.
    async fn oldest_done(&mut self) -> Result<(), PipelineError> {
        let Some((append, _)) = self.appends.front_mut() else {
            return std::future::pending().await;
        };
        let result = append.wait().await;
        self.appends.pop_front();
        result.map(drop).map_err(PipelineError::from)
    }

    /// Waits until there is room for one more append.
    async fn make_room(&mut self) -> Result<(), PipelineError> {
        while self.appends.len() >= APPENDS_IN_FLIGHT_MAX {
            self.oldest_done().await?;
        }
        Ok(())
    }

    /// Waits until every queued append is durable: before a step that reads what they wrote.
    pub(super) async fn settle(&mut self) -> Result<(), PipelineError> {
        while !self.appends.is_empty() {
            self.oldest_done().await?;
        }
        Ok(())
    }

    fn push(&mut self, append: PendingAppend, budget: Option<SyncBudget>) {
        self.appends.push_back((append, budget));
    }
}

/// How a `sync` is answered once its last append is durable.
#[derive(Debug)]
struct SyncAnswer {
    /// The `sync`'s number, for `synced`.
    added: serde_json::Number,
    /// When the `sync` arrived (latency metric).
    received: Instant,
    /// `debug` frames judging produced, sent after `synced`.
    debug: Vec<String>,
}

/// Why a worker stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The log refused to write or read.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The connection is gone.
    #[error("connection closed")]
    Disconnected,
}

/// The per-connection worker.
pub struct Worker {
    pub(super) server: Arc<Server>,
    pub(super) conn: Arc<ConnHandle>,
    /// The `synced` the client sent in `connect`: it has every action targeted at it up to
    /// this position.
    pub(super) connect_synced: u64,
    /// A heavy resync's waiting-room slot, released once the connect catch-up is sent.
    heavy_permit: std::sync::Mutex<Option<HeavyPermit>>,
    /// The connection's headers and cookies, for back-end hooks.
    peer: Option<Peer>,
    /// The client's application subprotocol, for back-end hooks.
    subprotocol: u32,
    /// True for the connection's first worker, which sends the connect catch-up.
    catchup: bool,
}

impl Worker {
    /// A worker for an authenticated connection.
    pub fn new(
        server: Arc<Server>,
        conn: Arc<ConnHandle>,
        connect_synced: u64,
        heavy_permit: Option<HeavyPermit>,
    ) -> Worker {
        Worker {
            server,
            conn,
            connect_synced,
            heavy_permit: std::sync::Mutex::new(heavy_permit),
            peer: None,
            subprotocol: 0,
            catchup: true,
        }
    }

    /// A worker for a connection whose earlier worker retired: no connect catch-up.
    pub fn successor(mut self) -> Worker {
        self.catchup = false;
        self
    }

    /// The connection and subprotocol back-end hooks are told about.
    pub fn with_client(mut self, peer: Peer, subprotocol: u32) -> Worker {
        self.peer = Some(peer);
        self.subprotocol = subprotocol;
        self
    }

    pub(super) fn hook_context(&self) -> HookContext<'_> {
        HookContext {
            ids: &self.conn.ids,
            subprotocol: self.subprotocol,
            peer: self.peer.as_ref(),
        }
    }

    /// Waits for the connection's `previous` worker, sends the connect catch-up (first worker
    /// only), then processes `sync` messages until it has nothing queued and nothing in
    /// flight: then it retires, so an idle connection holds no worker task and no queue. The
    /// connection starts a successor for its next `sync` (see `connection::Connection`).
    pub async fn run(
        self,
        mut jobs: mpsc::Receiver<super::connection::Job>,
        previous: Option<tokio::task::JoinHandle<()>>,
    ) {
        if let Some(previous) = previous {
            // The predecessor closed its queue and finishes what it took: keep the order.
            let _ = previous.await;
            if self.conn.is_kicked() {
                return;
            }
        }
        let workers = &self.server.metrics.pipeline_workers;
        workers.inc();
        let result = async {
            if self.catchup {
                // Boxed, like `process` below: a waiting worker then holds only its small
                // outer state, not the largest state of every step.
                let catchup = Box::pin(self.connect_catchup()).await;
                // Free the heavy-resync slot whatever happened.
                if let Ok(mut permit) = self.heavy_permit.lock() {
                    permit.take();
                }
                catchup?;
            }
            let mut in_flight = InFlight::default();
            loop {
                if in_flight.appends.is_empty() {
                    match jobs.try_recv() {
                        Ok(job) => {
                            self.take(job, &mut in_flight).await?;
                            continue;
                        }
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                        Err(mpsc::error::TryRecvError::Empty) => {
                            // Retire. `sync`s queued before the close are still ours, and
                            // so are sends that were under way: `recv` (unlike `try_recv`)
                            // waits for them before it says `None`.
                            jobs.close();
                            while let Some(job) = jobs.recv().await {
                                self.take(job, &mut in_flight).await?;
                            }
                            break;
                        }
                    }
                }
                tokio::select! {
                    done = in_flight.oldest_done() => done?,
                    job = jobs.recv() => {
                        let Some(job) = job else { break };
                        self.take(job, &mut in_flight).await?;
                    }
                }
            }
            // The connection waits for this task at shutdown: answer everything queued.
            in_flight.settle().await
        }
        .await;
        workers.dec();
        if let Err(error) = result {
            if !matches!(error, PipelineError::Disconnected) {
                tracing::error!(client = %self.conn.ids.client_id, %error, "action pipeline stopped; closing the connection without acknowledging");
            }
            self.conn.kick();
        }
    }

    /// Handles one queued `sync`. Boxed: a waiting worker then holds only its small outer
    /// state, not the largest state of every step (memory per connection).
    async fn take(
        &self,
        job: super::connection::Job,
        in_flight: &mut InFlight,
    ) -> Result<(), PipelineError> {
        let (received, sync, budget) = *job;
        Box::pin(self.process(received, sync, budget, in_flight)).await
    }

    pub(super) async fn send(&self, item: Outbound) -> Result<(), PipelineError> {
        if self.conn.is_kicked() {
            return Err(PipelineError::Disconnected);
        }
        self.conn
            .outbox
            .send(item)
            .await
            .map_err(|_| PipelineError::Disconnected)
    }

    /// Judges one `sync` and queues its append; `synced` follows once it is durable.
    async fn process(
        &self,
        received: Instant,
        sync: IncomingSync,
        budget: SyncBudget,
        in_flight: &mut InFlight,
    ) -> Result<(), PipelineError> {
        let mut judged = Judged::default();
        let mut ids = HashSet::with_capacity(sync.entries.len());
        for incoming in sync.entries {
            // A re-sent action (its `synced` was lost) is acknowledged again but not judged
            // again: its stored `logux/processed` or `logux/undo` reaches the client through
            // the connect catch-up or already went out on this connection. (One that races
            // its original still in flight is judged, and the log drops it and its answer.)
            // Identity comes first: an action under another client's id is denied even when
            // that id is stored (otherwise a forged id would be acknowledged as a re-send).
            let id = &incoming.entry.meta.id;
            let duplicate = incoming.denied.is_none()
                && (!ids.insert(id.clone()) || self.server.log.added_of(id)?.is_some());
            if duplicate {
                self.server
                    .metrics
                    .actions_received
                    .with_label_values(&["duplicate"])
                    .inc();
                continue;
            }
            self.judge(incoming, &mut judged, in_flight).await?;
            if judged.entries.len() >= APPEND_CHUNK_ENTRIES_MAX {
                let entries = std::mem::take(&mut judged.entries);
                let tasks = std::mem::take(&mut judged.tasks);
                let hook = self.durable_hook(&entries, &tasks, None);
                in_flight.make_room().await?;
                let append = self.server.log.submit(entries, tasks, Some(hook)).await?;
                in_flight.push(append, None);
            }
        }
        let Judged {
            entries,
            tasks,
            debug,
        } = judged;
        let answer = SyncAnswer {
            added: sync.added,
            received,
            debug,
        };
        let hook = self.durable_hook(&entries, &tasks, Some(answer));
        if entries.is_empty() {
            // Nothing to store: `synced` still goes after the earlier `sync`s' answers.
            in_flight.settle().await?;
            hook(&[]);
        } else {
            in_flight.make_room().await?;
            let append = self.server.log.submit(entries, tasks, Some(hook)).await?;
            in_flight.push(append, Some(budget));
        }
        Ok(())
    }

    /// What runs once an append of this worker is durable: count the duplicates the log
    /// found (actions only, not their dropped answers), start this client's `process` loop
    /// when tasks were stored, and, for a `sync`'s last append, answer it.
    fn durable_hook(
        &self,
        entries: &[Entry],
        tasks: &[TaskOp],
        answer: Option<SyncAnswer>,
    ) -> DurableHook {
        let answers: Vec<bool> = entries
            .iter()
            .map(|entry| entry.meta.answers_previous)
            .collect();
        let notify = self.process_notifier(tasks);
        let conn = self.conn.clone();
        let metrics = self.server.metrics.clone();
        Box::new(move |outcomes: &[AppendOutcome]| {
            let duplicates = outcomes
                .iter()
                .zip(&answers)
                .filter(|(outcome, answer)| {
                    !**answer && matches!(outcome, AppendOutcome::Duplicate(_))
                })
                .count();
            metrics
                .actions_received
                .with_label_values(&["duplicate"])
                .inc_by(duplicates as u64);
            if let Some(notify) = notify {
                notify(outcomes);
            }
            if let Some(answer) = answer {
                metrics
                    .sync_latency
                    .observe(answer.received.elapsed().as_secs_f64());
                conn.push(Outbound::Synced(answer.added));
                for frame in answer.debug {
                    conn.push(Outbound::Frame(frame));
                }
            }
        })
    }

    /// A durable hook that starts this client's `process` loop once the tasks are stored.
    fn process_notifier(&self, tasks: &[TaskOp]) -> Option<DurableHook> {
        let created = tasks
            .iter()
            .filter(|task| matches!(task, TaskOp::Add { .. }))
            .count();
        if created == 0 {
            return None;
        }
        let server = self.server.clone();
        let queue = self.conn.ids.client_id.clone();
        Some(Box::new(move |outcomes: &[AppendOutcome]| {
            let stored = outcomes
                .iter()
                .filter(|outcome| matches!(outcome, AppendOutcome::Appended(_)))
                .count()
                .min(created);
            server
                .metrics
                .process_pending
                .add(i64::try_from(stored).unwrap_or(i64::MAX));
            super::process::notify(&server, &queue);
        }))
    }
}
