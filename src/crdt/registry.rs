//! The reducer registry: one `State` enum over the four CRDTs, applied to raw Logux actions.

use super::{
    AddWinsSet, Applied, Counter, CrdtError, ListOp, LwwObject, LwwOp, OpId, RgaList, SetOp,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// Which CRDT turns a stream of actions into state; chosen per action type prefix by the
/// server's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReducerKind {
    /// Logux SyncMap objects: per-field last-writer-wins with delete-wins ([`LwwObject`]).
    LwwMap,
    /// A counter of deltas ([`Counter`]).
    Counter,
    /// An add-wins set of JSON values ([`AddWinsSet`]).
    Set,
    /// An ordered RGA list ([`RgaList`]).
    List,
}

impl ReducerKind {
    /// Every kind, for configuration help and tests.
    pub const ALL: [ReducerKind; 4] = [
        ReducerKind::LwwMap,
        ReducerKind::Counter,
        ReducerKind::Set,
        ReducerKind::List,
    ];

    /// The configuration name: `lww-map`, `counter`, `set` or `list`.
    pub fn name(self) -> &'static str {
        match self {
            ReducerKind::LwwMap => "lww-map",
            ReducerKind::Counter => "counter",
            ReducerKind::Set => "set",
            ReducerKind::List => "list",
        }
    }

    /// The kind with this configuration name.
    pub fn from_name(name: &str) -> Option<ReducerKind> {
        ReducerKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
    }
}

impl fmt::Display for ReducerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The reduced state of one object, whatever its CRDT. Serialized as
/// `{"kind": "<kind name>", "state": {...}}` for storage next to the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "state", rename_all = "kebab-case")]
pub enum State {
    /// A SyncMap object.
    LwwMap(LwwObject),
    /// A counter.
    Counter(Counter),
    /// An add-wins set.
    Set(AddWinsSet),
    /// An RGA list.
    List(RgaList),
}

impl State {
    /// The CRDT of this state.
    pub fn kind(&self) -> ReducerKind {
        match self {
            State::LwwMap(_) => ReducerKind::LwwMap,
            State::Counter(_) => ReducerKind::Counter,
            State::Set(_) => ReducerKind::Set,
            State::List(_) => ReducerKind::List,
        }
    }

    /// Parses the action as an operation of this state's CRDT and applies it. The state is
    /// untouched when the action is malformed.
    pub fn apply(&mut self, action: &Value, op_id: &OpId) -> Result<Applied, CrdtError> {
        Ok(match self {
            State::LwwMap(object) => object.apply(op_id, LwwOp::parse(action)?),
            State::Counter(counter) => {
                let op = counter.parse(action)?;
                counter.apply(op_id, op)
            }
            State::Set(set) => set.apply(op_id, SetOp::parse(action)?),
            State::List(list) => list.apply(op_id, ListOp::parse(action)?),
        })
    }

    /// The compact JSON state for a resyncing client (see the module docs for the shapes).
    pub fn snapshot(&self) -> Value {
        match self {
            State::LwwMap(object) => object.snapshot(),
            State::Counter(counter) => counter.snapshot(),
            State::Set(set) => set.snapshot(),
            State::List(list) => list.snapshot(),
        }
    }
}

/// The empty state of a kind; a counter reads the default `delta` field (build
/// `State::Counter(Counter::with_field(..))` for another one).
pub fn new_state(kind: ReducerKind) -> State {
    match kind {
        ReducerKind::LwwMap => State::LwwMap(LwwObject::new()),
        ReducerKind::Counter => State::Counter(Counter::new()),
        ReducerKind::Set => State::Set(AddWinsSet::new()),
        ReducerKind::List => State::List(RgaList::new()),
    }
}

/// Applies one logged action (with its OpId from `OpId::from_meta`) to a state; see
/// [`State::apply`].
pub fn apply(state: &mut State, action: &Value, op_id: &OpId) -> Result<Applied, CrdtError> {
    state.apply(action, op_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(time: i64, seq: u64) -> OpId {
        OpId {
            time,
            node: "1:client:tab".to_owned(),
            seq,
            ms: time,
        }
    }

    #[test]
    fn kinds_have_stable_names() {
        for kind in ReducerKind::ALL {
            assert_eq!(ReducerKind::from_name(kind.name()), Some(kind));
            assert_eq!(new_state(kind).kind(), kind);
            let text = serde_json::to_string(&kind).unwrap_or_default();
            assert_eq!(text, format!("\"{}\"", kind.name()));
        }
        assert_eq!(ReducerKind::from_name("map"), None);
    }

    #[test]
    fn applies_syncmap_actions() {
        let mut state = new_state(ReducerKind::LwwMap);
        let create = json!({"type": "tasks/create", "id": "t1", "fields": {"title": "a"}});
        assert_eq!(apply(&mut state, &create, &id(1, 0)), Ok(Applied::Changed));
        let changed = json!({"type": "tasks/changed", "id": "t1", "fields": {"done": true}});
        assert_eq!(apply(&mut state, &changed, &id(2, 0)), Ok(Applied::Changed));
        assert_eq!(
            state.snapshot(),
            json!({"deleted": false, "fields": {"done": true, "title": "a"}, "times": {"done": 2, "title": 1}})
        );
        let deleted = json!({"type": "tasks/deleted", "id": "t1"});
        assert_eq!(apply(&mut state, &deleted, &id(3, 0)), Ok(Applied::Changed));
        assert_eq!(state.snapshot(), json!({"deleted": true}));
    }

    #[test]
    fn applies_counter_set_and_list_actions() {
        let mut counter = new_state(ReducerKind::Counter);
        let like = json!({"type": "post/like", "delta": 2});
        assert_eq!(apply(&mut counter, &like, &id(1, 0)), Ok(Applied::Changed));
        assert_eq!(apply(&mut counter, &like, &id(1, 0)), Ok(Applied::NoEffect));
        assert_eq!(counter.snapshot(), json!(2));

        let mut set = new_state(ReducerKind::Set);
        let add = json!({"type": "tags/add", "value": "x"});
        assert_eq!(apply(&mut set, &add, &id(1, 0)), Ok(Applied::Changed));
        assert_eq!(set.snapshot(), json!(["x"]));

        let mut list = new_state(ReducerKind::List);
        let first = json!({"type": "todo/insert", "after": null, "value": "a"});
        assert_eq!(apply(&mut list, &first, &id(1, 0)), Ok(Applied::Changed));
        let second = json!({"type": "todo/insert", "after": id(1, 0).action_id(), "value": "b"});
        assert_eq!(apply(&mut list, &second, &id(2, 1)), Ok(Applied::Changed));
        assert_eq!(
            list.snapshot(),
            json!([{"id": "1 1:client:tab 0", "value": "a"}, {"id": "2 1:client:tab 1", "value": "b"}])
        );
    }

    #[test]
    fn malformed_action_leaves_the_state_untouched() {
        for kind in ReducerKind::ALL {
            let mut state = new_state(kind);
            let before = state.clone();
            let result = apply(&mut state, &json!({"type": "x/unknown"}), &id(1, 0));
            assert!(result.is_err(), "{kind}");
            assert_eq!(state, before);
        }
    }

    #[test]
    fn state_serializes_with_its_kind() {
        let mut state = new_state(ReducerKind::Counter);
        let _ = apply(&mut state, &json!({"delta": 3}), &id(1, 0));
        let value = serde_json::to_value(&state).unwrap_or_default();
        assert_eq!(value["kind"], json!("counter"));
        let back: Result<State, _> = serde_json::from_value(value);
        assert_eq!(back.ok(), Some(state));
    }
}
