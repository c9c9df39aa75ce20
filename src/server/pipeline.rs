//! The action pipeline of one connection: identity → rules (type, access, resend) → durable
//! append (group commit) → `synced` → delivery → `logux/processed` or `logux/undo`.
//!
//! One worker task per connection handles that client's `sync` messages strictly in order;
//! different clients run in parallel. Every step that a back-end hook may later take over
//! (access, resend, load) is a separate method here, so it can become an async call without
//! touching the transport or the protocol core.
//!
//! Ordering rule after an undo: unlike `@logux/server`, which undoes every later queued action
//! of the same client with reason `error` once one action is undone, Ferry judges each action
//! on its own. A client's unrelated offline actions are not lost because one was denied.

use super::admission::HeavyPermit;
use super::hub::{ConnHandle, Outbound};
use super::Server;
use crate::action::{Entry, Meta};
use crate::backend::{Decision, HookContext};
use crate::config::{Hook, RuleHooks};
use crate::log::{AppendOutcome, DurableHook, LogError, PendingAppend, TaskOp};
use crate::peer::Peer;
use crate::protocol::{IncomingEntry, IncomingSync};
use crate::rules::{ActionDecision, SubscribeDecision, SyncMapChannel, SyncMapOp};
use serde_json::{json, Map, Value};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;

/// Most entries written in one append request; a larger `sync` is written in several requests
/// and acknowledged once the last one is durable.
pub const APPEND_CHUNK_ENTRIES_MAX: usize = 5_000;

/// Most entries in one catch-up `sync` message sent to a client.
pub const CATCHUP_PAGE_ENTRIES_MAX: usize = 1_000;

/// Most appends one worker keeps queued in the log without waiting for them to be durable.
/// A client that sends `sync` after `sync` then shares each group commit with all its queued
/// actions instead of one `sync` per flush.
pub const APPENDS_IN_FLIGHT_MAX: usize = 32;

/// Appends of one worker that are queued in the log but not yet durable, oldest first, each
/// with the queue budget of its `sync` (released once it is durable). The log stores them,
/// and calls their hooks (`synced`), in this order.
#[derive(Debug, Default)]
struct InFlight {
    appends: VecDeque<(PendingAppend, Option<OwnedSemaphorePermit>)>,
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
    async fn settle(&mut self) -> Result<(), PipelineError> {
        while !self.appends.is_empty() {
            self.oldest_done().await?;
        }
        Ok(())
    }

    fn push(&mut self, append: PendingAppend, budget: Option<OwnedSemaphorePermit>) {
        self.appends.push_back((append, budget));
    }
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
    connect_synced: u64,
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

    fn hook_context(&self) -> HookContext<'_> {
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

    /// Sends everything targeted at this client, user or node with `added` above the
    /// client's `synced`.
    async fn connect_catchup(&self) -> Result<(), PipelineError> {
        let ids = &self.conn.ids;
        let log = &self.server.log;
        self.send(Outbound::CatchupPending).await?;
        let head = log.head();
        let mut after = self.connect_synced;
        let limit = self.server.config.limits.connect_catchup_max;
        let mut sent = 0;
        while after < head && sent < limit {
            let page = log.targeted_since(
                ids.user_id.as_deref(),
                &ids.client_id,
                &ids.node_id,
                after,
                head,
                CATCHUP_PAGE_ENTRIES_MAX.min(limit - sent),
            )?;
            let Some(last) = page.last() else { break };
            after = last.meta.added;
            sent += page.len();
            let page: Vec<_> = page
                .into_iter()
                .filter(|entry| self.wants_targeted(entry))
                .collect();
            if !page.is_empty() {
                self.send(Outbound::Catchup(page)).await?;
            }
        }
        self.send(Outbound::CatchupDone).await
    }

    /// Logux's `syncFilter`: direct client/node targets always; user targets unless this
    /// client wrote the action or is excluded.
    fn wants_targeted(&self, entry: &Entry) -> bool {
        let ids = &self.conn.ids;
        let meta = &entry.meta;
        if meta.clients.contains(&ids.client_id) || meta.nodes.contains(&ids.node_id) {
            return true;
        }
        entry.author_client_id() != ids.client_id && !meta.exclude_clients.contains(&ids.client_id)
    }

    /// Judges one `sync` and queues its append; `synced` follows once it is durable.
    async fn process(
        &self,
        received: Instant,
        sync: IncomingSync,
        budget: OwnedSemaphorePermit,
        in_flight: &mut InFlight,
    ) -> Result<(), PipelineError> {
        let mut batch = Vec::new();
        let mut tasks = Vec::new();
        let mut debug = Vec::new();
        let mut ids = HashSet::with_capacity(sync.entries.len());
        for incoming in sync.entries {
            // A re-sent action (its `synced` was lost) is acknowledged again but not judged
            // again: its stored `logux/processed` or `logux/undo` reaches the client through
            // the connect catch-up or already went out on this connection.
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
            self.judge(incoming, &mut batch, &mut tasks, &mut debug, in_flight)
                .await?;
            if batch.len() >= APPEND_CHUNK_ENTRIES_MAX {
                let chunk_tasks = std::mem::take(&mut tasks);
                let hook = self.process_notifier(&chunk_tasks);
                in_flight.make_room().await?;
                let append = self
                    .server
                    .log
                    .submit(std::mem::take(&mut batch), chunk_tasks, hook)
                    .await?;
                in_flight.push(append, None);
            }
        }
        let notify = self.process_notifier(&tasks);
        let conn = self.conn.clone();
        let added = sync.added;
        let metrics = self.server.metrics.clone();
        let hook: DurableHook = Box::new(move |outcomes: &[AppendOutcome]| {
            let duplicates = outcomes
                .iter()
                .filter(|outcome| matches!(outcome, AppendOutcome::Duplicate(_)))
                .count();
            metrics
                .actions_received
                .with_label_values(&["duplicate"])
                .inc_by(duplicates as u64);
            metrics
                .sync_latency
                .observe(received.elapsed().as_secs_f64());
            if let Some(notify) = notify {
                notify(outcomes);
            }
            conn.push(Outbound::Synced(added));
            for frame in debug {
                conn.push(Outbound::Frame(frame));
            }
        });
        if batch.is_empty() {
            // Nothing to store: `synced` still goes after the earlier `sync`s' answers.
            in_flight.settle().await?;
            hook(&[]);
        } else {
            in_flight.make_room().await?;
            let append = self.server.log.submit(batch, tasks, Some(hook)).await?;
            in_flight.push(append, Some(budget));
        }
        Ok(())
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

    /// Decides one action and adds what to store to `batch`: the action itself when it is
    /// allowed, and the `logux/processed` or `logux/undo` for its author.
    ///
    /// Steps that read the log or call the back-end (subscriptions, SyncMaps, hooked types)
    /// first wait for this worker's queued appends, so they see everything the client sent
    /// before; plain actions do not wait.
    async fn judge(
        &self,
        incoming: IncomingEntry,
        batch: &mut Vec<Entry>,
        tasks: &mut Vec<TaskOp>,
        debug: &mut Vec<String>,
        in_flight: &mut InFlight,
    ) -> Result<(), PipelineError> {
        let IncomingEntry { entry, denied } = incoming;
        let received = &self.server.metrics.actions_received;
        if let Some(why) = denied {
            tracing::debug!(id = %entry.meta.id, why, "action denied");
            received.with_label_values(&["denied"]).inc();
            self.undo(entry, "denied", batch, debug);
            return Ok(());
        }
        match entry.action_type() {
            "logux/subscribe" => {
                in_flight.settle().await?;
                self.subscribe(entry, batch, debug).await
            }
            // Only the server creates the other `logux/` actions (`processed`, `undo`, ...):
            // a client sending one, even under a `*` rule, could fake answers for others.
            other if other.starts_with("logux/") && other != "logux/unsubscribe" => {
                received.with_label_values(&["unknown_type"]).inc();
                self.undo(entry, "unknownType", batch, debug);
                Ok(())
            }
            "logux/unsubscribe" => {
                match entry.action.get("channel").and_then(Value::as_str) {
                    Some(channel) => {
                        self.server.hub.unsubscribe(&self.conn, channel);
                        self.processed(&entry, batch);
                    }
                    None => self.undo(entry, "wrongChannel", batch, debug),
                }
                Ok(())
            }
            _ => {
                let user = self.conn.ids.user_id.as_deref();
                match self.server.rules.check_action(&entry.action, user) {
                    ActionDecision::Allowed { channels } => {
                        if let Some(rule) = self.server.rules.type_hooks(entry.action_type()) {
                            in_flight.settle().await?;
                            self.hooked_action(entry, channels, &rule, batch, tasks, debug)
                                .await;
                            return Ok(());
                        }
                        received.with_label_values(&["processed"]).inc();
                        // The action goes before its `logux/processed`, so subscribers get it
                        // before the author hears it was processed.
                        let mut processed = self.processed_for(&entry);
                        // Nobody looks this answer up by id (a re-subscription's `since`
                        // names the answer to a subscription, never this one).
                        processed.meta.fresh_id = true;
                        let mut entry = entry;
                        entry.meta.channels = channels;
                        batch.push(entry);
                        batch.push(processed);
                    }
                    ActionDecision::SyncMap { plural, id, op } => {
                        in_flight.settle().await?;
                        self.sync_map_action(entry, &plural, &id, op, batch, debug)?;
                    }
                    ActionDecision::UnknownType => {
                        received.with_label_values(&["unknown_type"]).inc();
                        self.undo(entry, "unknownType", batch, debug);
                    }
                    ActionDecision::Denied => {
                        received.with_label_values(&["denied"]).inc();
                        self.undo(entry, "denied", batch, debug);
                    }
                }
                Ok(())
            }
        }
    }

    async fn subscribe(
        &self,
        entry: Entry,
        batch: &mut Vec<Entry>,
        debug: &mut Vec<String>,
    ) -> Result<(), PipelineError> {
        let received = &self.server.metrics.actions_received;
        let Some(channel) = entry.action.get("channel").and_then(Value::as_str) else {
            received.with_label_values(&["wrong_channel"]).inc();
            self.undo(entry, "wrongChannel", batch, debug);
            return Ok(());
        };
        let user = self.conn.ids.user_id.as_deref();
        match self.server.rules.check_subscribe(channel, user) {
            SubscribeDecision::WrongChannel => {
                received.with_label_values(&["wrong_channel"]).inc();
                if let Some(frame) = self.debug_text(&format!("Wrong channel name {channel}")) {
                    debug.push(frame);
                }
                self.undo(entry, "wrongChannel", batch, debug);
            }
            SubscribeDecision::Denied => {
                received.with_label_values(&["denied"]).inc();
                self.undo(entry, "denied", batch, debug);
            }
            SubscribeDecision::Allowed => {
                let channel = channel.to_owned();
                let is_sync_map = self.server.rules.sync_map_channel(&channel).is_some();
                let hooks = if is_sync_map {
                    None
                } else {
                    self.server.rules.channel_hooks(&channel)
                };
                if let Some(rule) = &hooks {
                    if let Some(reason) = self.hook_access(rule, &entry).await {
                        self.undo(entry, reason, batch, debug);
                        return Ok(());
                    }
                }
                let refused = match self.server.rules.sync_map_channel(&channel) {
                    Some(SyncMapChannel::Object { plural, .. }) => {
                        self.subscribe_sync_map_object(&channel, &plural, &entry.action)
                            .await?
                    }
                    Some(SyncMapChannel::Filter { plural }) => {
                        self.subscribe_sync_map_filter(&plural, &entry.action)
                            .await?;
                        None
                    }
                    None => {
                        if !self
                            .subscribe_reducer_channel(&channel, &entry.action)
                            .await?
                        {
                            self.channel_catchup(&channel, entry.action.get("since"))
                                .await?;
                        }
                        match &hooks {
                            Some(rule) if rule.has(Hook::Load) => {
                                self.hook_load(rule, &entry).await?
                            }
                            _ => None,
                        }
                    }
                };
                match refused {
                    Some(reason) => {
                        received.with_label_values(&["not_found"]).inc();
                        self.undo(entry, reason, batch, debug);
                    }
                    None => {
                        received.with_label_values(&["processed"]).inc();
                        self.processed(&entry, batch);
                    }
                }
            }
        }
        Ok(())
    }

    /// Subscribes and sends the channel's history: everything after `since` when given,
    /// otherwise the newest `subscribe_history_max` actions. Live actions are held by the
    /// connection until the history is out, so the client sees them in order.
    async fn channel_catchup(
        &self,
        channel: &str,
        since: Option<&Value>,
    ) -> Result<(), PipelineError> {
        let log = &self.server.log;
        self.send(Outbound::CatchupPending).await?;
        self.server.hub.subscribe(&self.conn, channel);
        let head = log.head();
        let since_id = since
            .and_then(|since| since.get("id"))
            .and_then(Value::as_str);
        let since_time = since
            .and_then(|since| since.get("time"))
            .and_then(Value::as_i64);
        match (since_id, since_time) {
            (None, None) => {
                let limit = self.server.config.limits.subscribe_history_max;
                let page = log.channel_tail(channel, head, limit)?;
                self.send_channel_page(page, None).await?;
            }
            _ => {
                // The client has everything of this channel up to the `logux/processed` of
                // its previous subscription, and everything sent to it up to the `synced` of
                // its `connect`: only what comes after both is missing.
                let since_added = match since_id {
                    Some(id) => log.added_of(id)?,
                    None => None,
                };
                let mut after = match since_added {
                    Some(added) => added.max(self.connect_synced),
                    None => self.connect_synced,
                };
                let time_floor = if since_added.is_some() {
                    None
                } else {
                    since_time
                };
                while after < head {
                    let page = log.channel_since(channel, after, head, CATCHUP_PAGE_ENTRIES_MAX)?;
                    let Some(last) = page.last() else { break };
                    after = last.meta.added;
                    self.send_channel_page(page, time_floor).await?;
                }
            }
        }
        self.send(Outbound::CatchupDone).await
    }

    async fn send_channel_page(
        &self,
        page: Vec<Arc<Entry>>,
        time_floor: Option<i64>,
    ) -> Result<(), PipelineError> {
        let own = &self.conn.ids.client_id;
        let page: Vec<_> = page
            .into_iter()
            .filter(|entry| entry.author_client_id() != own)
            .filter(|entry| !entry.meta.exclude_clients.contains(own))
            .filter(|entry| time_floor.is_none_or(|floor| entry.meta.time > floor))
            .collect();
        if page.is_empty() {
            return Ok(());
        }
        self.send(Outbound::Catchup(page)).await
    }

    /// A SyncMap `create`/`change`/`delete`: stored once as the `created`/`changed`/`deleted`
    /// action other clients receive (with the client's own id and time, so duplicates are
    /// recognised and last-write-wins uses the real time). Deleted objects stay deleted.
    fn sync_map_action(
        &self,
        entry: Entry,
        plural: &str,
        id: &str,
        op: SyncMapOp,
        batch: &mut Vec<Entry>,
        debug: &mut Vec<String>,
    ) -> Result<(), PipelineError> {
        let key = format!("{plural}/{id}");
        let deleted = match self.server.log.state(&key)? {
            Some(stored) => matches!(
                super::objects::decode(&stored.state),
                Some(crate::crdt::State::LwwMap(object)) if object.is_deleted()
            ),
            None => false,
        };
        if deleted && op != SyncMapOp::Delete {
            self.server
                .metrics
                .actions_received
                .with_label_values(&["not_found"])
                .inc();
            self.undo(entry, "notFound", batch, debug);
            return Ok(());
        }
        self.server
            .metrics
            .actions_received
            .with_label_values(&["processed"])
            .inc();
        let processed = self.processed_for(&entry);
        let mut action = Map::new();
        action.insert("type".into(), json!(op.finished_type(plural)));
        action.insert(
            "id".into(),
            entry.action.get("id").cloned().unwrap_or(json!(id)),
        );
        if op != SyncMapOp::Delete {
            let fields = entry.action.get("fields").cloned().unwrap_or(json!({}));
            action.insert("fields".into(), fields);
        }
        let author = entry.author_client_id().to_owned();
        let mut stored = entry;
        stored.action = Value::Object(action);
        stored.meta.channels = match op {
            SyncMapOp::Delete => vec![key],
            SyncMapOp::Create | SyncMapOp::Change => vec![plural.to_owned(), key],
        };
        stored.meta.exclude_clients = vec![author];
        batch.push(stored);
        batch.push(processed);
        Ok(())
    }

    /// An action of a type rule with back-end hooks: `access`, then `resend`, then either a
    /// durable `process` task or the usual `logux/processed`.
    async fn hooked_action(
        &self,
        entry: Entry,
        channels: Vec<String>,
        rule: &RuleHooks,
        batch: &mut Vec<Entry>,
        tasks: &mut Vec<TaskOp>,
        debug: &mut Vec<String>,
    ) {
        let received = &self.server.metrics.actions_received;
        if let Some(reason) = self.hook_access(rule, &entry).await {
            let label = match reason {
                "notFound" => "not_found",
                "denied" => "denied",
                _ => "error",
            };
            received.with_label_values(&[label]).inc();
            self.undo(entry, reason, batch, debug);
            return;
        }
        let mut entry = entry;
        entry.meta.channels = channels;
        if rule.has(Hook::Resend) {
            let Some(backend) = &self.server.backend else {
                return self.undo(entry, "error", batch, debug);
            };
            let context = self.hook_context();
            let body = context.action_body(Hook::Resend, rule, &entry);
            match backend.resend(&body).await {
                Ok(targets) => {
                    entry.meta.channels = targets.channels;
                    entry.meta.users = targets.users;
                    entry.meta.clients = targets.clients;
                    entry.meta.nodes = targets.nodes;
                }
                Err(_) => {
                    received.with_label_values(&["error"]).inc();
                    return self.undo(entry, "error", batch, debug);
                }
            }
        }
        received.with_label_values(&["processed"]).inc();
        if rule.has(Hook::Process) {
            let context = self.hook_context();
            tasks.push(super::process::task_for(
                &self.server,
                batch.len(),
                &entry,
                &context,
                rule,
            ));
            batch.push(entry);
        } else {
            let processed = self.processed_for(&entry);
            batch.push(entry);
            batch.push(processed);
        }
    }

    /// Asks the `access` hook when `rule` has it: `None` when allowed, else the undo reason
    /// (`denied`, `notFound`, or `error` when the back-end gave no answer).
    async fn hook_access(&self, rule: &RuleHooks, entry: &Entry) -> Option<&'static str> {
        if !rule.has(Hook::Access) {
            return None;
        }
        let Some(backend) = &self.server.backend else {
            return Some("error");
        };
        let body = self.hook_context().action_body(Hook::Access, rule, entry);
        match backend.decide(Hook::Access, &body).await {
            Ok(Decision::Allowed) => None,
            Ok(Decision::NotFound) => Some("notFound"),
            Ok(Decision::Denied | Decision::WrongSubprotocol) => Some("denied"),
            Err(_) => Some("error"),
        }
    }

    /// Sends the `load` hook's actions to the new subscriber (not stored); `Some("error")`
    /// when the back-end gave no answer.
    async fn hook_load(
        &self,
        rule: &RuleHooks,
        entry: &Entry,
    ) -> Result<Option<&'static str>, PipelineError> {
        let Some(backend) = &self.server.backend else {
            return Ok(Some("error"));
        };
        let body = self.hook_context().action_body(Hook::Load, rule, entry);
        let actions = match backend.load(&body).await {
            Ok(actions) => actions,
            Err(_) => return Ok(Some("error")),
        };
        if actions.is_empty() {
            return Ok(None);
        }
        let now = self.server.clock.now_ms();
        let page = actions
            .into_iter()
            .map(|action| self.unstored(action, now))
            .collect();
        self.send(Outbound::CatchupPending).await?;
        self.send(Outbound::Catchup(page)).await?;
        self.send(Outbound::CatchupDone).await?;
        Ok(None)
    }

    fn debug_text(&self, text: &str) -> Option<String> {
        self.server
            .session_config
            .development
            .then(|| json!(["debug", "error", text]).to_string())
    }

    /// A server action for this connection's client (the author of what it answers).
    fn reply(&self, action: Value) -> Entry {
        let (id, time) = self.server.next_action_id();
        Entry {
            action,
            meta: Meta {
                id,
                time,
                subprotocol: self.server.config.subprotocol,
                clients: vec![self.conn.ids.client_id.clone()],
                ..Meta::default()
            },
            json: Default::default(),
        }
    }

    fn processed_for(&self, original: &Entry) -> Entry {
        let action = json!({"id": original.meta.id, "type": "logux/processed"});
        self.reply(action)
    }

    /// Stores `original` (without routing, so a re-send is recognised) and its
    /// `logux/processed`.
    fn processed(&self, original: &Entry, batch: &mut Vec<Entry>) {
        batch.push(Entry::new(original.action.clone(), original.meta.clone()));
        batch.push(self.processed_for(original));
    }

    fn undo(&self, original: Entry, reason: &str, batch: &mut Vec<Entry>, debug: &mut Vec<String>) {
        if reason == "denied" {
            if let Some(frame) =
                self.debug_text(&format!("Action \"{}\" was denied", original.meta.id))
            {
                debug.push(frame);
            }
        } else if reason == "unknownType" {
            if let Some(frame) = self.debug_text(&format!(
                "Action with unknown type {}",
                original.action_type()
            )) {
                debug.push(frame);
            }
        }
        // The original is stored (unrouted) so that a re-send is recognised, but only under
        // this client's own id: storing another client's id would let anyone squat on ids.
        if original.author_client_id() == self.conn.ids.client_id {
            batch.push(Entry::new(original.action.clone(), original.meta.clone()));
        }
        let mut action = Map::new();
        action.insert("action".into(), original.action.clone());
        action.insert("id".into(), json!(original.meta.id));
        action.insert("reason".into(), json!(reason));
        action.insert("type".into(), json!("logux/undo"));
        batch.push(self.reply(Value::Object(action)));
    }
}
