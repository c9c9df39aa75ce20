//! Last-writer-wins map per field with delete-wins tombstones (Logux SyncMap objects).

use super::json::{canonical_json, object, required, type_suffix, unsupported};
use super::{Applied, CrdtError, OpId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// The type suffixes a map operation accepts, for error messages.
const EXPECTED: &str = "/create, /created, /change, /changed, /delete or /deleted";

/// One operation on an [`LwwObject`], parsed from a SyncMap-style action.
#[derive(Debug, Clone, PartialEq)]
pub enum LwwOp {
    /// `<plural>/create`, `/created`, `/change`, `/changed`: set these fields.
    Change(Map<String, Value>),
    /// `<plural>/delete`, `/deleted`: delete the object for good.
    Delete,
}

impl LwwOp {
    /// Parses `{type: "<plural>/create"|"/created"|"/change"|"/changed", fields: {...}}` or
    /// `{type: "<plural>/delete"|"/deleted"}`. Only the suffix after the last `/` and `fields`
    /// are read (`id` names the object and is the caller's business).
    pub fn parse(action: &Value) -> Result<LwwOp, CrdtError> {
        let action = object(action)?;
        match type_suffix(action, "map", EXPECTED)? {
            "create" | "created" | "change" | "changed" => match required(action, "fields")? {
                Value::Object(fields) => Ok(LwwOp::Change(fields.clone())),
                _ => Err(CrdtError::InvalidField {
                    field: "fields".to_owned(),
                    expected: "an object of field values",
                }),
            },
            "delete" | "deleted" => Ok(LwwOp::Delete),
            _ => {
                let action_type = action.get("type").and_then(Value::as_str);
                Err(unsupported(
                    action_type.unwrap_or_default(),
                    "map",
                    EXPECTED,
                ))
            }
        }
    }
}

/// The current value of one field and the operation that wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LwwField {
    /// The field's value.
    pub value: Value,
    /// The operation that wrote it: a write with a greater OpId replaces it.
    pub op: OpId,
}

/// A SyncMap object: per-field last-writer-wins, and a delete that wins over every change.
///
/// State size follows the number of distinct fields (one value and one OpId each), never the
/// number of operations; a deleted object keeps only the delete's OpId.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LwwObject {
    /// Live fields by name; empty once deleted.
    fields: BTreeMap<String, LwwField>,
    /// The smallest OpId of the delete operations seen: once set, the object is gone for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deleted: Option<OpId>,
}

impl LwwObject {
    /// An object no operation has touched yet.
    pub fn new() -> LwwObject {
        LwwObject::default()
    }

    /// Applies one operation. Per field, the write with the greater OpId wins (an equal OpId
    /// with a different value keeps the value with the greater canonical JSON text, so even
    /// conflicting duplicates converge). A delete clears the fields and makes every later
    /// change a no-op, whatever its OpId.
    pub fn apply(&mut self, op_id: &OpId, op: LwwOp) -> Applied {
        match op {
            LwwOp::Delete => {
                let newer_first = match &self.deleted {
                    Some(existing) => op_id < existing,
                    None => true,
                };
                if !newer_first {
                    return Applied::NoEffect;
                }
                self.deleted = Some(op_id.clone());
                self.fields.clear();
                Applied::Changed
            }
            LwwOp::Change(fields) => {
                if self.deleted.is_some() {
                    return Applied::NoEffect;
                }
                let mut applied = Applied::NoEffect;
                for (name, value) in fields {
                    let wins = match self.fields.get(&name) {
                        None => true,
                        Some(current) => match op_id.cmp(&current.op) {
                            std::cmp::Ordering::Greater => true,
                            std::cmp::Ordering::Less => false,
                            std::cmp::Ordering::Equal => {
                                canonical_json(&value) > canonical_json(&current.value)
                            }
                        },
                    };
                    if wins {
                        self.fields.insert(
                            name,
                            LwwField {
                                value,
                                op: op_id.clone(),
                            },
                        );
                        applied = Applied::Changed;
                    }
                }
                applied
            }
        }
    }

    /// Whether a delete has been applied (the object is gone for good).
    pub fn is_deleted(&self) -> bool {
        self.deleted.is_some()
    }

    /// The first (smallest) delete operation, if any.
    pub fn deleted_by(&self) -> Option<&OpId> {
        self.deleted.as_ref()
    }

    /// The live fields with their values and winning OpIds, by name.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &LwwField)> {
        self.fields
            .iter()
            .map(|(name, field)| (name.as_str(), field))
    }

    /// The value of one live field.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.get(name).map(|field| &field.value)
    }

    /// The fields whose winning write has `time > since`, for SyncMap's `since` resync: a
    /// client that synced up to `since` needs only these. Empty for a deleted object (check
    /// [`LwwObject::is_deleted`]).
    pub fn changed_since(&self, since: i64) -> Map<String, Value> {
        self.fields
            .iter()
            .filter(|(_, field)| field.op.time > since)
            .map(|(name, field)| (name.clone(), field.value.clone()))
            .collect()
    }

    /// The compact state for a resyncing client: `{"deleted": true}` for a deleted object,
    /// else `{"deleted": false, "fields": {name: value}, "times": {name: <winning meta.time>}}`
    /// with fields in name order.
    pub fn snapshot(&self) -> Value {
        if self.deleted.is_some() {
            return json!({ "deleted": true });
        }
        let mut fields = Map::with_capacity(self.fields.len());
        let mut times = Map::with_capacity(self.fields.len());
        for (name, field) in &self.fields {
            fields.insert(name.clone(), field.value.clone());
            times.insert(name.clone(), Value::from(field.op.time));
        }
        json!({ "deleted": false, "fields": fields, "times": times })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(time: i64, node: &str) -> OpId {
        OpId {
            time,
            node: node.to_owned(),
            seq: 0,
            ms: time,
        }
    }

    fn change(fields: Value) -> LwwOp {
        match fields {
            Value::Object(map) => LwwOp::Change(map),
            _ => LwwOp::Change(Map::new()),
        }
    }

    #[test]
    fn concurrent_edits_of_different_fields_all_survive() {
        let mut a = LwwObject::new();
        a.apply(&id(1, "x"), change(json!({"title": "t", "done": false})));
        a.apply(&id(5, "alice"), change(json!({"title": "Buy milk"})));
        a.apply(&id(5, "bob"), change(json!({"done": true})));
        assert_eq!(a.get("title"), Some(&json!("Buy milk")));
        assert_eq!(a.get("done"), Some(&json!(true)));
    }

    #[test]
    fn newer_write_of_the_same_field_wins_in_any_order() {
        let mut a = LwwObject::new();
        a.apply(&id(2, "a"), change(json!({"title": "new"})));
        assert_eq!(
            a.apply(&id(1, "b"), change(json!({"title": "old"}))),
            Applied::NoEffect
        );
        let mut b = LwwObject::new();
        b.apply(&id(1, "b"), change(json!({"title": "old"})));
        b.apply(&id(2, "a"), change(json!({"title": "new"})));
        assert_eq!(a, b);
        assert_eq!(a.get("title"), Some(&json!("new")));
    }

    #[test]
    fn equal_times_are_broken_by_node() {
        let mut a = LwwObject::new();
        a.apply(&id(3, "b"), change(json!({"k": "from b"})));
        a.apply(&id(3, "a"), change(json!({"k": "from a"})));
        assert_eq!(a.get("k"), Some(&json!("from b")));
    }

    #[test]
    fn delete_wins_over_a_later_change() {
        let mut a = LwwObject::new();
        a.apply(&id(1, "a"), change(json!({"title": "x"})));
        a.apply(&id(2, "a"), LwwOp::Delete);
        assert_eq!(
            a.apply(&id(9, "b"), change(json!({"title": "back"}))),
            Applied::NoEffect
        );
        assert!(a.is_deleted());
        assert_eq!(a.snapshot(), json!({"deleted": true}));
    }

    #[test]
    fn delete_wins_over_a_concurrent_change_arriving_first() {
        let mut a = LwwObject::new();
        a.apply(&id(9, "b"), change(json!({"title": "late"})));
        a.apply(&id(2, "a"), LwwOp::Delete);
        let mut b = LwwObject::new();
        b.apply(&id(2, "a"), LwwOp::Delete);
        b.apply(&id(9, "b"), change(json!({"title": "late"})));
        assert_eq!(a, b);
        assert!(a.changed_since(i64::MIN).is_empty());
    }

    #[test]
    fn delete_keeps_the_first_delete_id() {
        let mut a = LwwObject::new();
        a.apply(&id(5, "a"), LwwOp::Delete);
        assert_eq!(a.apply(&id(7, "a"), LwwOp::Delete), Applied::NoEffect);
        assert_eq!(a.apply(&id(3, "a"), LwwOp::Delete), Applied::Changed);
        assert_eq!(a.deleted_by(), Some(&id(3, "a")));
    }

    #[test]
    fn changed_since_returns_fields_written_after_the_time() {
        let mut a = LwwObject::new();
        a.apply(&id(10, "a"), change(json!({"a": 1, "b": 2})));
        a.apply(&id(20, "a"), change(json!({"b": 3, "c": 4})));
        let since = a.changed_since(10);
        assert_eq!(Value::Object(since), json!({"b": 3, "c": 4}));
        assert_eq!(a.changed_since(20).len(), 0);
        assert_eq!(a.changed_since(9).len(), 3);
    }

    #[test]
    fn snapshot_lists_fields_and_their_times() {
        let mut a = LwwObject::new();
        a.apply(&id(10, "a"), change(json!({"b": 1, "a": null})));
        assert_eq!(
            a.snapshot(),
            json!({"deleted": false, "fields": {"a": null, "b": 1}, "times": {"a": 10, "b": 10}})
        );
    }

    #[test]
    fn applying_the_same_change_twice_has_no_effect() {
        let mut a = LwwObject::new();
        assert_eq!(
            a.apply(&id(1, "a"), change(json!({"x": 1}))),
            Applied::Changed
        );
        let before = a.clone();
        assert_eq!(
            a.apply(&id(1, "a"), change(json!({"x": 1}))),
            Applied::NoEffect
        );
        assert_eq!(a, before);
    }

    #[test]
    fn parses_syncmap_action_types_by_suffix() {
        for suffix in ["create", "created", "change", "changed"] {
            let action = json!({"type": format!("tasks/{suffix}"), "id": "1", "fields": {"a": 1}});
            assert!(
                matches!(LwwOp::parse(&action), Ok(LwwOp::Change(_))),
                "{suffix}"
            );
        }
        for suffix in ["delete", "deleted"] {
            let action = json!({"type": format!("a/b/{suffix}"), "id": "1"});
            assert_eq!(LwwOp::parse(&action), Ok(LwwOp::Delete), "{suffix}");
        }
    }

    #[test]
    fn rejects_malformed_map_actions() {
        let bad = [
            json!([]),
            json!({"fields": {}}),
            json!({"type": 5}),
            json!({"type": "create", "fields": {}}),
            json!({"type": "tasks/rename", "fields": {}}),
            json!({"type": "tasks/change"}),
            json!({"type": "tasks/change", "fields": [1]}),
        ];
        for action in bad {
            assert!(LwwOp::parse(&action).is_err(), "{action}");
        }
    }

    #[test]
    fn state_round_trips_through_serde() {
        let mut a = LwwObject::new();
        a.apply(&id(1, "a"), change(json!({"x": {"y": [1, 2]}})));
        let text = serde_json::to_string(&a).unwrap_or_default();
        let back: Result<LwwObject, _> = serde_json::from_str(&text);
        assert_eq!(back.ok(), Some(a));
    }
}
