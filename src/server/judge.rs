//! Judging one client action: identity → type rule → access → resend channels, and what to
//! store for it. Every outcome goes through `Worker::store_processed` or `Worker::undo`,
//! which count it and build its answer (see `answer`).

use super::answer::{self, UndoReason, PROCESSED_METRIC};
use super::pipeline::{InFlight, PipelineError, Worker};
use crate::action::{Entry, Meta};
use crate::backend::Decision;
use crate::config::{Hook, RuleHooks};
use crate::log::TaskOp;
use crate::protocol::IncomingEntry;
use crate::rules::{ActionDecision, SubscribeDecision, SyncMapChannel, SyncMapOp};
use serde_json::{json, Map, Value};

/// What judging a `sync`'s actions decided: the entries to store (each action followed by its
/// answer), the durable `process` tasks for them, and `debug` frames for the client.
#[derive(Debug, Default)]
pub(super) struct Judged {
    pub(super) entries: Vec<Entry>,
    pub(super) tasks: Vec<TaskOp>,
    pub(super) debug: Vec<String>,
}

/// How the `logux/processed` of a stored action is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnswerIndex {
    /// Indexed by id: a re-subscription's `since.id` names the answer to a subscription.
    ById,
    /// Not indexed (`Meta::fresh_id`): nobody looks the answer to a plain action up.
    Fresh,
}

impl Worker {
    /// Decides one action and adds what to store to `judged`: the action itself when it is
    /// allowed, and the `logux/processed` or `logux/undo` for its author.
    ///
    /// Steps that read the log or call the back-end (subscriptions, SyncMaps, hooked types)
    /// first wait for this worker's queued appends, so they see everything the client sent
    /// before; plain actions do not wait.
    pub(super) async fn judge(
        &self,
        incoming: IncomingEntry,
        judged: &mut Judged,
        in_flight: &mut InFlight,
    ) -> Result<(), PipelineError> {
        let IncomingEntry { entry, denied } = incoming;
        if let Some(why) = denied {
            tracing::debug!(id = %entry.meta.id, why, "action denied");
            self.undo(judged, entry, UndoReason::Denied);
            return Ok(());
        }
        match entry.action_type() {
            "logux/subscribe" => {
                in_flight.settle().await?;
                self.subscribe(entry, judged).await
            }
            "logux/unsubscribe" => {
                match entry.action().get("channel").and_then(Value::as_str) {
                    Some(channel) => {
                        self.server.hub.unsubscribe(&self.conn, channel);
                        self.store_processed(judged, entry, AnswerIndex::ById);
                    }
                    None => self.undo(judged, entry, UndoReason::WrongChannel),
                }
                Ok(())
            }
            // Only the server creates the other `logux/` actions (`processed`, `undo`, ...):
            // a client sending one, even under a `*` rule, could fake answers for others.
            other if other.starts_with("logux/") => {
                self.undo(judged, entry, UndoReason::UnknownType);
                Ok(())
            }
            _ => self.judge_typed(entry, judged, in_flight).await,
        }
    }

    /// An action of an application type: its `[[types]]` rule decides.
    async fn judge_typed(
        &self,
        mut entry: Entry,
        judged: &mut Judged,
        in_flight: &mut InFlight,
    ) -> Result<(), PipelineError> {
        let user = self.conn.ids.user_id.as_deref();
        match self.server.rules.check_action(entry.action(), user) {
            ActionDecision::Allowed { channels } => {
                if let Some(rule) = self.server.rules.type_hooks(entry.action_type()) {
                    in_flight.settle().await?;
                    self.hooked_action(entry, channels, &rule, judged).await;
                    return Ok(());
                }
                entry.meta.channels = channels;
                self.store_processed(judged, entry, AnswerIndex::Fresh);
            }
            ActionDecision::SyncMap { plural, id, op } => {
                in_flight.settle().await?;
                self.sync_map_action(entry, &plural, &id, op, judged)
                    .await?;
            }
            ActionDecision::UnknownType => self.undo(judged, entry, UndoReason::UnknownType),
            ActionDecision::Denied => self.undo(judged, entry, UndoReason::Denied),
        }
        Ok(())
    }

    async fn subscribe(&self, entry: Entry, judged: &mut Judged) -> Result<(), PipelineError> {
        let Some(channel) = entry.action().get("channel").and_then(Value::as_str) else {
            self.undo(judged, entry, UndoReason::WrongChannel);
            return Ok(());
        };
        let channel = channel.to_owned();
        let user = self.conn.ids.user_id.as_deref();
        match self.server.rules.check_subscribe(&channel, user) {
            SubscribeDecision::WrongChannel => {
                if let Some(frame) = self.debug_text(&format!("Wrong channel name {channel}")) {
                    judged.debug.push(frame);
                }
                self.undo(judged, entry, UndoReason::WrongChannel);
            }
            SubscribeDecision::Denied => self.undo(judged, entry, UndoReason::Denied),
            SubscribeDecision::Allowed => match self.subscribe_allowed(&channel, &entry).await? {
                Some(reason) => {
                    // Whatever step refused, the client must not keep receiving the channel.
                    self.server.hub.unsubscribe(&self.conn, &channel);
                    self.undo(judged, entry, reason);
                }
                None => self.store_processed(judged, entry, AnswerIndex::ById),
            },
        }
        Ok(())
    }

    /// Subscribes to a channel the rules allow and sends what the client is missing; the
    /// undo reason when a hook or the object refuses.
    async fn subscribe_allowed(
        &self,
        channel: &str,
        entry: &Entry,
    ) -> Result<Option<UndoReason>, PipelineError> {
        let rules = &self.server.rules;
        let sync_map = rules.sync_map_channel(channel);
        let hooks = match sync_map {
            Some(_) => None,
            None => rules.channel_hooks(channel),
        };
        if let Some(rule) = &hooks {
            if let Some(reason) = self.hook_access(rule, entry).await {
                return Ok(Some(reason));
            }
        }
        match sync_map {
            Some(SyncMapChannel::Object { plural, .. }) => {
                self.subscribe_sync_map_object(channel, &plural, entry.action())
                    .await
            }
            Some(SyncMapChannel::Filter { plural }) => {
                self.subscribe_sync_map_filter(&plural, entry.action())
                    .await?;
                Ok(None)
            }
            None => {
                if !self
                    .subscribe_reducer_channel(channel, entry.action())
                    .await?
                {
                    self.channel_catchup(channel, entry.action().get("since"))
                        .await?;
                }
                match &hooks {
                    Some(rule) if rule.has(Hook::Load) => self.hook_load(rule, entry).await,
                    _ => Ok(None),
                }
            }
        }
    }

    /// A SyncMap `create`/`change`/`delete`: stored once as the `created`/`changed`/`deleted`
    /// action other clients receive (with the client's own id and time, so duplicates are
    /// recognised and last-write-wins uses the real time). Deleted objects stay deleted.
    async fn sync_map_action(
        &self,
        entry: Entry,
        plural: &str,
        id: &str,
        op: SyncMapOp,
        judged: &mut Judged,
    ) -> Result<(), PipelineError> {
        let key = format!("{plural}/{id}");
        let deleted = match self.server.log.state(&key).await? {
            Some(stored) => matches!(
                super::objects::decode(&stored.state),
                Some(crate::crdt::State::LwwMap(object)) if object.is_deleted()
            ),
            None => false,
        };
        if deleted && op != SyncMapOp::Delete {
            self.undo(judged, entry, UndoReason::NotFound);
            return Ok(());
        }
        let mut action = Map::new();
        action.insert("type".into(), json!(op.finished_type(plural)));
        action.insert(
            "id".into(),
            entry.action().get("id").cloned().unwrap_or(json!(id)),
        );
        if op != SyncMapOp::Delete {
            let fields = entry.action().get("fields").cloned().unwrap_or(json!({}));
            action.insert("fields".into(), fields);
        }
        let author = entry.author_client_id().to_owned();
        let mut stored = entry;
        stored.set_action(Value::Object(action));
        stored.meta.channels = match op {
            SyncMapOp::Delete => vec![key],
            SyncMapOp::Create | SyncMapOp::Change => vec![plural.to_owned(), key],
        };
        stored.meta.exclude_clients = vec![author];
        self.store_processed(judged, stored, AnswerIndex::ById);
        Ok(())
    }

    /// An action of a type rule with back-end hooks: `access`, then `resend`, then either a
    /// durable `process` task or the usual `logux/processed`.
    async fn hooked_action(
        &self,
        entry: Entry,
        channels: Vec<String>,
        rule: &RuleHooks,
        judged: &mut Judged,
    ) {
        if let Some(reason) = self.hook_access(rule, &entry).await {
            return self.undo(judged, entry, reason);
        }
        let mut entry = entry;
        entry.meta.channels = channels;
        if rule.has(Hook::Resend) {
            let Some(backend) = &self.server.backend else {
                return self.undo(judged, entry, UndoReason::Error);
            };
            let body = self.hook_context().action_body(Hook::Resend, rule, &entry);
            match backend.resend(&body).await {
                Ok(targets) => {
                    entry.meta.channels = targets.channels;
                    entry.meta.users = targets.users;
                    entry.meta.clients = targets.clients;
                    entry.meta.nodes = targets.nodes;
                }
                Err(_) => return self.undo(judged, entry, UndoReason::Error),
            }
        }
        if rule.has(Hook::Process) {
            // Answered once the back-end processed it (see `process`).
            self.count(PROCESSED_METRIC);
            let context = self.hook_context();
            let task = super::process::task_for(
                &self.server,
                judged.entries.len(),
                &entry,
                &context,
                rule,
            );
            judged.tasks.push(task);
            judged.entries.push(entry);
        } else {
            self.store_processed(judged, entry, AnswerIndex::ById);
        }
    }

    /// Asks the `access` hook when `rule` has it: `None` when allowed, else the undo reason
    /// (`Error` when the back-end gave no answer).
    async fn hook_access(&self, rule: &RuleHooks, entry: &Entry) -> Option<UndoReason> {
        if !rule.has(Hook::Access) {
            return None;
        }
        let Some(backend) = &self.server.backend else {
            return Some(UndoReason::Error);
        };
        let body = self.hook_context().action_body(Hook::Access, rule, entry);
        match backend.decide(Hook::Access, &body).await {
            Ok(Decision::Allowed) => None,
            Ok(Decision::NotFound) => Some(UndoReason::NotFound),
            Ok(Decision::Denied | Decision::WrongSubprotocol) => Some(UndoReason::Denied),
            Err(_) => Some(UndoReason::Error),
        }
    }

    /// Sends the `load` hook's actions to the new subscriber (not stored); `Error` when the
    /// back-end gave no answer.
    async fn hook_load(
        &self,
        rule: &RuleHooks,
        entry: &Entry,
    ) -> Result<Option<UndoReason>, PipelineError> {
        let Some(backend) = &self.server.backend else {
            return Ok(Some(UndoReason::Error));
        };
        let body = self.hook_context().action_body(Hook::Load, rule, entry);
        let actions = match backend.load(&body).await {
            Ok(actions) => actions,
            Err(_) => return Ok(Some(UndoReason::Error)),
        };
        if actions.is_empty() {
            return Ok(None);
        }
        let now = self.server.clock.now_ms();
        let page = actions
            .into_iter()
            .map(|action| self.unstored(action, now))
            .collect();
        self.send_catchup_page(page).await?;
        Ok(None)
    }

    fn debug_text(&self, text: &str) -> Option<String> {
        self.server
            .session_config
            .development
            .then(|| json!(["debug", "error", text]).to_string())
    }

    fn count(&self, outcome: &str) {
        self.server
            .metrics
            .actions_received
            .with_label_values(&[outcome])
            .inc();
    }

    /// A server action for this connection's client (the author of what it answers), stored
    /// only when the entry before it is (`Meta::answers_previous`).
    fn answer(&self, action: Value, answers_previous: bool) -> Entry {
        let (id, time) = self.server.next_action_id();
        Entry::new(
            action,
            Meta {
                id,
                time,
                subprotocol: self.server.config.subprotocol,
                clients: vec![self.conn.ids.client_id.clone()],
                answers_previous,
                ..Meta::default()
            },
        )
    }

    /// Counts `stored` as processed and adds it with its `logux/processed`: the action goes
    /// first, so subscribers get it before the author hears it was processed.
    fn store_processed(&self, judged: &mut Judged, stored: Entry, index: AnswerIndex) {
        self.count(PROCESSED_METRIC);
        let mut processed = self.answer(answer::processed(&stored.meta.id), true);
        processed.meta.fresh_id = index == AnswerIndex::Fresh;
        judged.entries.push(stored);
        judged.entries.push(processed);
    }

    /// Counts the undo and adds the `logux/undo` for `original`. The original is stored
    /// (unrouted) so that a re-send is recognised, but only under this client's own id:
    /// storing another client's id would let anyone squat on ids.
    fn undo(&self, judged: &mut Judged, original: Entry, reason: UndoReason) {
        self.count(reason.metric());
        let text = match reason {
            UndoReason::Denied => Some(format!("Action \"{}\" was denied", original.meta.id)),
            UndoReason::UnknownType => Some(format!(
                "Action with unknown type {}",
                original.action_type()
            )),
            _ => None,
        };
        if let Some(frame) = text.and_then(|text| self.debug_text(&text)) {
            judged.debug.push(frame);
        }
        let undo = answer::undo(original.action(), &original.meta.id, &reason);
        let own = original.author_client_id() == self.conn.ids.client_id;
        if own {
            let mut stored = original;
            stored.meta.channels.clear();
            stored.meta.users.clear();
            stored.meta.clients.clear();
            stored.meta.nodes.clear();
            judged.entries.push(stored);
        }
        judged.entries.push(self.answer(undo, own));
    }
}
