//! Objects kept as CRDT state next to the log: Logux SyncMaps and `[[reducers]]`.
//!
//! `ObjectReducer` runs inside the log writer: every stored action that updates an object
//! (a SyncMap's `<plural>/created|changed|deleted`, or a reducer's type) is applied to the
//! object's state in the same sled batch. The `Worker` methods here answer subscriptions to
//! object channels from that state, so a client that was offline for weeks gets the current
//! state instead of the whole history:
//!
//! - `<plural>/<id>` (SyncMap): `<plural>/changed` actions with the fields changed since
//!   `since.time` (all fields without `since`), one action per distinct field time so that
//!   the client's last-write-wins check sees each field's real time; `notFound` for a missing
//!   or deleted object; nothing with `creating: true`.
//! - `<plural>` (SyncMap filter channel): the same for every live object whose fields match
//!   `filter`, subscribing the client to each object's channel (as `@logux/server` does).
//! - any other channel that has a reducer state: one `ferry/state` action
//!   `{type: "ferry/state", channel, kind, state}` with the reducer's snapshot, followed by
//!   the channel's actions newer than the state.

use super::answer::UndoReason;
use super::catchup::CATCHUP_PAGE_ENTRIES_MAX;
use super::hub::Outbound;
use super::pipeline::{PipelineError, Worker};
use crate::action::{Entry, Meta};
use crate::crdt::{self, Applied, Counter, OpId, ReducerKind, State};
use crate::log::{Log, ObjectState, StateReducer};
use crate::rules::Rules;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Type of the snapshot action sent on subscription to a reducer channel.
pub const STATE_ACTION_TYPE: &str = "ferry/state";

/// The log writer's reducer, built from the rules.
pub struct ObjectReducer {
    rules: Rules,
}

impl ObjectReducer {
    /// A reducer for the SyncMaps and `[[reducers]]` of these rules.
    pub fn new(rules: Rules) -> ObjectReducer {
        ObjectReducer { rules }
    }
}

/// Decodes a stored state.
pub fn decode(state: &[u8]) -> Option<State> {
    serde_json::from_slice(state).ok()
}

impl StateReducer for ObjectReducer {
    fn object_key(&self, entry: &Entry) -> Option<String> {
        self.rules
            .object_of(entry.action())
            .map(|object| object.key)
    }

    fn reduce(&self, key: &str, state: Option<&[u8]>, entry: &Entry) -> Option<Vec<u8>> {
        let object = self.rules.object_of(entry.action())?;
        let mut current = match state {
            Some(bytes) => match decode(bytes) {
                Some(state) => state,
                None => {
                    tracing::error!(
                        object = key,
                        "stored object state is unreadable; left as is"
                    );
                    return None;
                }
            },
            None => match (object.kind, &object.field) {
                (ReducerKind::Counter, Some(field)) => State::Counter(Counter::with_field(field)),
                (kind, _) => crdt::new_state(kind),
            },
        };
        let op = OpId::from_meta(&entry.meta.id, entry.meta.time)?;
        match crdt::apply(&mut current, entry.action(), &op) {
            Ok(Applied::Changed) => serde_json::to_vec(&current).ok(),
            Ok(Applied::NoEffect) => None,
            Err(error) => {
                tracing::warn!(object = key, %error, "action not applied to its object");
                None
            }
        }
    }
}

/// Reads a durable state and decodes it.
async fn read_state(log: &Log, key: &str) -> Result<Option<(ObjectState, State)>, PipelineError> {
    let Some(stored) = log.state(key).await? else {
        return Ok(None);
    };
    Ok(decode(&stored.state).map(|state| (stored, state)))
}

/// Does an object's fields match a SyncMap filter (every filter key equal)?
fn matches_filter(fields: &Map<String, Value>, filter: Option<&Value>) -> bool {
    match filter.and_then(Value::as_object) {
        Some(filter) => filter
            .iter()
            .all(|(key, value)| fields.get(key) == Some(value)),
        None => true,
    }
}

impl Worker {
    /// A server-created action that is sent, not stored.
    pub(super) fn unstored(&self, action: Value, time: i64) -> Arc<Entry> {
        let (id, _) = self.server.next_action_id();
        Arc::new(Entry::new(
            action,
            Meta {
                id,
                time,
                subprotocol: self.server.config.subprotocol,
                ..Meta::default()
            },
        ))
    }

    /// The `<plural>/changed` actions that bring a client up to date with one object:
    /// fields changed at or after `since`, one action per distinct field time.
    fn changed_actions(
        &self,
        plural: &str,
        id: &Value,
        state: &State,
        since: i64,
    ) -> Vec<Arc<Entry>> {
        let State::LwwMap(object) = state else {
            return Vec::new();
        };
        let mut by_time: BTreeMap<i64, Map<String, Value>> = BTreeMap::new();
        for (name, field) in object.fields() {
            if field.op.time >= since {
                by_time
                    .entry(field.op.time)
                    .or_default()
                    .insert(name.to_owned(), field.value.clone());
            }
        }
        by_time
            .into_iter()
            .map(|(time, fields)| {
                let action =
                    json!({"fields": fields, "id": id, "type": format!("{plural}/changed")});
                self.unstored(action, time)
            })
            .collect()
    }

    /// Positions of the channel's entries in `(after, upto]`: they are already part of a
    /// snapshot, so live copies of them must not be sent again.
    fn absorbed(&self, channel: &str, after: u64, upto: u64) -> Result<Vec<u64>, PipelineError> {
        if after >= upto {
            return Ok(Vec::new());
        }
        Ok(self.server.log.channel_positions(channel, after, upto)?)
    }

    /// Sends `page` (built from a state) followed by the channel's entries with
    /// `after < added <= upto`, in catch-up pages.
    async fn send_with_newer(
        &self,
        mut page: Vec<Arc<Entry>>,
        channel: &str,
        mut after: u64,
        upto: u64,
    ) -> Result<(), PipelineError> {
        while after < upto {
            let newer =
                self.server
                    .log
                    .channel_since(channel, after, upto, CATCHUP_PAGE_ENTRIES_MAX)?;
            let Some(last) = newer.last() else { break };
            after = last.meta.added;
            page.extend(newer);
            if page.len() >= CATCHUP_PAGE_ENTRIES_MAX {
                self.send(Outbound::Catchup(std::mem::take(&mut page)))
                    .await?;
            }
        }
        self.send(Outbound::Catchup(page)).await
    }

    /// Subscribes to one SyncMap object. Returns the undo reason when it cannot.
    pub(super) async fn subscribe_sync_map_object(
        &self,
        channel: &str,
        plural: &str,
        action: &Value,
    ) -> Result<Option<UndoReason>, PipelineError> {
        let log = &self.server.log;
        if action.get("creating") == Some(&Value::Bool(true)) {
            self.server.hub.subscribe(&self.conn, channel);
            return Ok(None);
        }
        let registered_at = log.head();
        self.send(Outbound::CatchupPending).await?;
        self.server.hub.subscribe(&self.conn, channel);
        let found = read_state(log, channel).await?;
        let Some((stored, state)) = found
            .filter(|(_, state)| matches!(state, State::LwwMap(object) if !object.is_deleted()))
        else {
            self.server.hub.unsubscribe(&self.conn, channel);
            self.send(Outbound::CatchupDone).await?;
            return Ok(Some(UndoReason::NotFound));
        };
        let since = since_time(action);
        let id = Value::String(channel[plural.len() + 1..].to_owned());
        let page = self.changed_actions(plural, &id, &state, since);
        self.send_with_newer(page, channel, stored.added, registered_at)
            .await?;
        let absorbed = self.absorbed(channel, registered_at, stored.added)?;
        self.send(Outbound::Absorbed(absorbed)).await?;
        self.send(Outbound::CatchupDone).await?;
        Ok(None)
    }

    /// Subscribes to a SyncMap's filter channel: every live object matching the filter.
    pub(super) async fn subscribe_sync_map_filter(
        &self,
        plural: &str,
        action: &Value,
    ) -> Result<(), PipelineError> {
        let log = &self.server.log;
        let registered_at = log.head();
        self.send(Outbound::CatchupPending).await?;
        self.server.hub.subscribe(&self.conn, plural);
        let since = since_time(action);
        let filter = action.get("filter");
        let mut page = Vec::new();
        let mut absorbed = Vec::new();
        for stored in log.states_with_prefix(&format!("{plural}/")).await? {
            let Some(State::LwwMap(object)) = decode(&stored.state) else {
                continue;
            };
            let fields: Map<String, Value> = object
                .fields()
                .map(|(name, field)| (name.to_owned(), field.value.clone()))
                .collect();
            if object.is_deleted() || !matches_filter(&fields, filter) {
                continue;
            }
            self.server.hub.subscribe(&self.conn, &stored.key);
            let id = Value::String(stored.key[plural.len() + 1..].to_owned());
            page.extend(self.changed_actions(plural, &id, &State::LwwMap(object), since));
            absorbed.extend(self.absorbed(&stored.key, registered_at, stored.added)?);
            if page.len() >= CATCHUP_PAGE_ENTRIES_MAX {
                self.send(Outbound::Catchup(std::mem::take(&mut page)))
                    .await?;
            }
        }
        self.send(Outbound::Catchup(page)).await?;
        self.send(Outbound::Absorbed(absorbed)).await?;
        self.send(Outbound::CatchupDone).await
    }

    /// Subscribes to a channel that has reducer state, when the client cannot be brought up
    /// to date from the log alone: sends the state, then the channel's newer actions.
    /// Returns false when the channel has no state (the caller replays history instead).
    pub(super) async fn subscribe_reducer_channel(
        &self,
        channel: &str,
        action: &Value,
    ) -> Result<bool, PipelineError> {
        let log = &self.server.log;
        if log.state(channel).await?.is_none() {
            return Ok(false);
        }
        // With a `since` the log still holds, plain replay is smaller than the state.
        let since_id = action
            .get("since")
            .and_then(|since| since.get("id"))
            .and_then(Value::as_str);
        if let Some(id) = since_id {
            if log.added_of(id)?.is_some() {
                return Ok(false);
            }
        }
        let registered_at = log.head();
        self.send(Outbound::CatchupPending).await?;
        self.server.hub.subscribe(&self.conn, channel);
        let Some((stored, state)) = read_state(log, channel).await? else {
            self.send(Outbound::CatchupDone).await?;
            return Ok(true);
        };
        let snapshot = json!({
            "channel": channel,
            "kind": state.kind().name(),
            "state": state.snapshot(),
            "type": STATE_ACTION_TYPE,
        });
        let page = vec![self.unstored(snapshot, self.server.clock.now_ms())];
        self.send_with_newer(page, channel, stored.added, registered_at)
            .await?;
        let absorbed = self.absorbed(channel, registered_at, stored.added)?;
        self.send(Outbound::Absorbed(absorbed)).await?;
        self.send(Outbound::CatchupDone).await?;
        Ok(true)
    }
}

/// `since.time` of a subscription, or 0.
fn since_time(action: &Value) -> i64 {
    action
        .get("since")
        .and_then(|since| since.get("time"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}
