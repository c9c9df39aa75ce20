//! Pure CRDT reducers: they turn the action log into the current state of each object.
//!
//! Concurrent offline edits converge with predictable rules, and a client that was offline for
//! weeks can be sent a compact snapshot instead of the whole history. Nothing here does IO or
//! reads a clock: a reducer is a function of the set of operations it was given.
//!
//! # Operation order and identity
//!
//! Every operation is one logged action. Its [`OpId`] (built with [`OpId::from_meta`] from
//! `meta.id` = `"<ms> <node> <seq>"` and `meta.time`) orders it by `time`, then `node`
//! (byte-wise), then `seq`, then `ms`: Logux's `isFirstOlder`. "Newer" below means greater
//! in this order. An operation is *identified* by its action id (`ms`, `node`, `seq`): the
//! Logux log stores one action per id, and re-applying an id is a no-op for every reducer.
//!
//! All four states are join-semilattices over the operations: applying any permutation of
//! the same operations, with any duplicates, gives an identical state (the derived
//! `PartialEq` and the serialized form included), not only an identical snapshot.
//!
//! # Action shapes
//!
//! Only the listed fields are read; anything else in the action is ignored. The reducer
//! reads the part of `type` after its last `/`, so the type must contain a `/` (except for
//! the counter, which ignores `type`).
//!
//! * **LWW map** ([`ReducerKind::LwwMap`], [`LwwObject`], Logux SyncMap):
//!   `{"type": "<plural>/create" | "<plural>/created" | "<plural>/change" | "<plural>/changed",
//!   "id": "<object id>", "fields": {"<name>": <value>, ...}}` sets fields, and
//!   `{"type": "<plural>/delete" | "<plural>/deleted", "id": "<object id>"}` deletes.
//!   `fields` must be an object (it may be empty). `id` is not read: one state is one object.
//! * **Counter** ([`ReducerKind::Counter`], [`Counter`]): `{"type": <anything>,
//!   "delta": <integer>}`; the delta field name is a parameter of the counter
//!   ([`Counter::with_field`], default `"delta"`). The delta must be a JSON integer within
//!   i64 (`1.0`, `"1"` and `2^63` are errors).
//! * **Add-wins set** ([`ReducerKind::Set`], [`AddWinsSet`]):
//!   `{"type": "<prefix>/add", "value": <any JSON>}` and
//!   `{"type": "<prefix>/remove", "value": <any JSON>}`; `value` must be present (`null` is a
//!   value).
//! * **List** ([`ReducerKind::List`], [`RgaList`]):
//!   `{"type": "<prefix>/insert", "after": "<element id>" | null, "value": <any JSON>}` and
//!   `{"type": "<prefix>/remove", "element": "<element id>"}`. An element id is the action id
//!   (`"<ms> <node> <seq>"`, see [`OpId::action_id`]) of the insert that created the element;
//!   `after: null` inserts at the head; `after` and `value` must both be present.
//!
//! A malformed action gives a [`CrdtError`] and leaves the state untouched; parsing never
//! panics.
//!
//! # Rules
//!
//! * **LWW map**: each field keeps `(value, OpId)`; a write replaces it iff its OpId is
//!   greater (equal OpIds: the greater canonical JSON text). Writes to different fields never
//!   conflict. A delete is a permanent tombstone: it clears the fields and every change, older,
//!   concurrent or newer, is ignored afterwards (delete wins; the smallest delete OpId is
//!   kept). [`LwwObject::changed_since`] returns the fields whose winning `OpId.time > T`.
//! * **Counter**: the value is the sum of the deltas of all distinct action ids, computed
//!   exactly and clamped to the i64 range when read (so it does not depend on the order; a
//!   running saturating sum would).
//! * **Add-wins set**: values are compared by their canonical JSON text ([`canonical_json`]:
//!   object keys sorted recursively; `1` and `1.0` differ). A value is present iff it has at
//!   least one add not covered by a remove, where a remove covers exactly the adds of that
//!   value with a smaller OpId (the adds the remover could have seen). So a remove concurrent
//!   with a newer add (in the total order) leaves the value present, and a remove newer than
//!   every add removes it. Equivalently: present iff the greatest add > the greatest remove.
//! * **List (RGA)**: an insert creates an element whose id is the insert's action id, right
//!   after its reference element (or at the head). The list is the pre-order walk of the tree
//!   "element → elements inserted after it", siblings in descending OpId order (concurrent
//!   inserts after the same reference: newer first). A remove tombstones an element by id; a
//!   tombstone is hidden but still anchors inserts after it. An insert whose reference has not
//!   arrived is **buffered**: stored, invisible together with everything inserted after it,
//!   and shown in its RGA place as soon as the reference arrives (a reference that never
//!   arrives keeps it invisible). A remove that arrives before its insert is kept and applies
//!   when the insert arrives.
//!
//! # Snapshot shapes ([`State::snapshot`])
//!
//! * LWW map: `{"deleted": false, "fields": {"<name>": <value>, ...}, "times": {"<name>":
//!   <meta.time of the winning write>, ...}}` (names sorted), or `{"deleted": true}`.
//! * Counter: the value, a JSON number: `42`.
//! * Set: the present values in canonical-text order, object keys sorted: `["a", 1, {"k": 2}]`.
//! * List: the visible elements in order: `[{"id": "<element id>", "value": <value>}, ...]`.
//!
//! Snapshots contain only the visible state: tombstones, buffered inserts and idempotence
//! records stay in the stored state. A client that applies further list operations itself
//! needs the element ids, which the list snapshot carries.
//!
//! # Growth of the stored state
//!
//! * LWW map: one value and one OpId per live field; a deleted object keeps one OpId.
//! * Counter: one `(ms, seq, delta)` triple per applied operation, grouped by node (about 20
//!   JSON bytes each): exact idempotence without causal delivery needs every id, since action
//!   ids are sparse and a late operation is indistinguishable from a duplicate otherwise.
//! * Set: one entry per distinct value ever added or removed (the value plus at most two
//!   OpIds), independent of the number of operations.
//! * List: one element per insert (tombstones drop their value) plus one id per remove that
//!   arrived before its insert.
//!
//! The stored form is [`State`]'s serde JSON: `{"kind": "lww-map" | "counter" | "set" |
//! "list", "state": {...}}`.

mod counter;
mod json;
mod list;
mod lww;
mod op_id;
mod registry;
mod set;

pub use counter::{Counter, CounterOp, DEFAULT_DELTA_FIELD};
pub use json::canonical_json;
pub use list::{ListElement, ListOp, RgaList};
pub use lww::{LwwField, LwwObject, LwwOp};
pub use op_id::OpId;
pub use registry::{apply, new_state, ReducerKind, State};
pub use set::{AddWinsSet, SetEntry, SetOp};

/// What applying one operation did, so the caller knows whether the state must be persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The stored state changed (the snapshot may or may not have).
    Changed,
    /// The stored state is unchanged: a duplicate, a write older than the current one, a
    /// change to a deleted object, a remove of an already removed element, ...
    NoEffect,
}

/// Why an action could not be read as an operation of a reducer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrdtError {
    /// The action is not a JSON object.
    #[error("action is not a JSON object")]
    NotAnObject,
    /// The action has no string `type` (and the reducer needs one).
    #[error("action has no string `type`")]
    MissingType,
    /// The type does not name an operation of this reducer.
    #[error("action type {action_type:?} is not a {reducer} operation (expected a type ending in {expected})")]
    UnsupportedType {
        /// The reducer that rejected it: `map`, `set` or `list`.
        reducer: &'static str,
        /// The action's type.
        action_type: String,
        /// The accepted type suffixes.
        expected: &'static str,
    },
    /// A field the operation needs is absent.
    #[error("action has no `{field}` field")]
    MissingField {
        /// The field's name.
        field: String,
    },
    /// A field has the wrong JSON type or an invalid value.
    #[error("action field `{field}` must be {expected}")]
    InvalidField {
        /// The field's name.
        field: String,
        /// What it must hold.
        expected: &'static str,
    },
}
