//! An add-wins set of JSON values.

use super::json::{canonical_json, object, required, sorted, type_suffix, unsupported};
use super::{Applied, CrdtError, OpId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The type suffixes a set operation accepts, for error messages.
const EXPECTED: &str = "/add or /remove";

/// One set operation.
#[derive(Debug, Clone, PartialEq)]
pub enum SetOp {
    /// `{type: ".../add", value}`: add the value.
    Add(Value),
    /// `{type: ".../remove", value}`: remove the adds of the value this op could have seen.
    Remove(Value),
}

impl SetOp {
    /// Parses `{type: "<prefix>/add", value}` or `{type: "<prefix>/remove", value}`. `value`
    /// is any JSON value (`null` included) but must be present.
    pub fn parse(action: &Value) -> Result<SetOp, CrdtError> {
        let action = object(action)?;
        match type_suffix(action, "set", EXPECTED)? {
            "add" => Ok(SetOp::Add(required(action, "value")?.clone())),
            "remove" => Ok(SetOp::Remove(required(action, "value")?.clone())),
            _ => {
                let action_type = action.get("type").and_then(Value::as_str);
                Err(unsupported(
                    action_type.unwrap_or_default(),
                    "set",
                    EXPECTED,
                ))
            }
        }
    }
}

/// What the set knows about one value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetEntry {
    /// The value with its object keys sorted (canonical form).
    pub value: Value,
    /// The greatest OpId of the adds of this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added: Option<OpId>,
    /// The greatest OpId of the removes of this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<OpId>,
}

impl SetEntry {
    /// Present iff some add is not covered by a remove: the greatest add is greater than the
    /// greatest remove (which covers every add a smaller remove covers).
    pub fn is_present(&self) -> bool {
        match (&self.added, &self.removed) {
            (Some(added), Some(removed)) => added > removed,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// An add-wins (observed-remove style) set on the Logux total order.
///
/// A value is present iff at least one of its adds is not covered by a remove, where a remove
/// covers exactly the adds of the same value with a smaller OpId. Because "covered by the
/// greatest remove" implies "covered by any remove", only the greatest add and the greatest
/// remove per value are kept: the state grows with the number of distinct values ever added
/// or removed (removed values stay as small tombstones), not with the number of operations,
/// and re-applying an operation is a no-op by construction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AddWinsSet {
    /// Entries by the canonical JSON text of their value.
    entries: BTreeMap<String, SetEntry>,
}

impl AddWinsSet {
    /// An empty set.
    pub fn new() -> AddWinsSet {
        AddWinsSet::default()
    }

    /// Applies an add or a remove; see the type docs for the rule.
    pub fn apply(&mut self, op_id: &OpId, op: SetOp) -> Applied {
        let (value, is_add) = match op {
            SetOp::Add(value) => (value, true),
            SetOp::Remove(value) => (value, false),
        };
        let key = canonical_json(&value);
        let entry = self.entries.entry(key).or_insert_with(|| SetEntry {
            value: sorted(&value),
            added: None,
            removed: None,
        });
        let slot = if is_add {
            &mut entry.added
        } else {
            &mut entry.removed
        };
        match slot {
            Some(existing) if &*existing >= op_id => Applied::NoEffect,
            _ => {
                *slot = Some(op_id.clone());
                Applied::Changed
            }
        }
    }

    /// Whether the value is present.
    pub fn contains(&self, value: &Value) -> bool {
        self.entries
            .get(&canonical_json(value))
            .is_some_and(SetEntry::is_present)
    }

    /// The present values in canonical-text order.
    pub fn values(&self) -> impl Iterator<Item = &Value> {
        self.entries
            .values()
            .filter(|entry| entry.is_present())
            .map(|entry| &entry.value)
    }

    /// Every value the set knows, tombstones included, with its greatest add and remove.
    pub fn entries(&self) -> impl Iterator<Item = &SetEntry> {
        self.entries.values()
    }

    /// The compact state for a resyncing client: a JSON array of the present values (object
    /// keys sorted) in canonical-text order; tombstones are left out.
    pub fn snapshot(&self) -> Value {
        Value::Array(self.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(time: i64, node: &str) -> OpId {
        OpId {
            time,
            node: node.to_owned(),
            seq: 0,
            ms: time,
        }
    }

    #[test]
    fn added_value_is_present_until_removed() {
        let mut s = AddWinsSet::new();
        s.apply(&id(1, "a"), SetOp::Add(json!("x")));
        assert!(s.contains(&json!("x")));
        s.apply(&id(2, "a"), SetOp::Remove(json!("x")));
        assert!(!s.contains(&json!("x")));
        assert_eq!(s.snapshot(), json!([]));
    }

    #[test]
    fn add_wins_over_a_concurrent_earlier_remove() {
        let mut s = AddWinsSet::new();
        s.apply(&id(1, "a"), SetOp::Add(json!("x")));
        s.apply(&id(3, "b"), SetOp::Add(json!("x")));
        s.apply(&id(2, "c"), SetOp::Remove(json!("x")));
        assert!(s.contains(&json!("x")));
    }

    #[test]
    fn remove_covers_every_earlier_add() {
        let mut s = AddWinsSet::new();
        s.apply(&id(5, "r"), SetOp::Remove(json!("x")));
        s.apply(&id(1, "a"), SetOp::Add(json!("x")));
        s.apply(&id(4, "b"), SetOp::Add(json!("x")));
        assert!(!s.contains(&json!("x")));
        s.apply(&id(6, "c"), SetOp::Add(json!("x")));
        assert!(s.contains(&json!("x")));
    }

    #[test]
    fn values_are_compared_by_canonical_json() {
        let mut s = AddWinsSet::new();
        s.apply(&id(1, "a"), SetOp::Add(json!({"b": 1, "a": 2})));
        assert!(s.contains(&json!({"a": 2, "b": 1})));
        s.apply(&id(2, "a"), SetOp::Remove(json!({"a": 2, "b": 1})));
        assert!(s.snapshot().as_array().is_some_and(Vec::is_empty));
        s.apply(&id(3, "a"), SetOp::Add(json!(1)));
        assert!(!s.contains(&json!(1.0)));
    }

    #[test]
    fn applying_the_same_op_twice_has_no_effect() {
        let mut s = AddWinsSet::new();
        assert_eq!(s.apply(&id(1, "a"), SetOp::Add(json!(1))), Applied::Changed);
        assert_eq!(
            s.apply(&id(1, "a"), SetOp::Add(json!(1))),
            Applied::NoEffect
        );
        assert_eq!(
            s.apply(&id(2, "a"), SetOp::Remove(json!(1))),
            Applied::Changed
        );
        assert_eq!(
            s.apply(&id(2, "a"), SetOp::Remove(json!(1))),
            Applied::NoEffect
        );
    }

    #[test]
    fn snapshot_lists_present_values_in_canonical_order() {
        let mut s = AddWinsSet::new();
        s.apply(&id(1, "a"), SetOp::Add(json!("b")));
        s.apply(&id(2, "a"), SetOp::Add(json!({"z": 1, "y": 2})));
        s.apply(&id(3, "a"), SetOp::Add(json!("a")));
        s.apply(&id(4, "a"), SetOp::Add(json!(null)));
        let text = s.snapshot().to_string();
        assert_eq!(text, r#"["a","b",null,{"y":2,"z":1}]"#);
    }

    #[test]
    fn parses_add_and_remove_actions() {
        assert_eq!(
            SetOp::parse(&json!({"type": "tags/add", "value": null})),
            Ok(SetOp::Add(json!(null)))
        );
        assert_eq!(
            SetOp::parse(&json!({"type": "post/1/tags/remove", "value": [1]})),
            Ok(SetOp::Remove(json!([1])))
        );
        for bad in [
            json!("x"),
            json!({"type": "tags/add"}),
            json!({"type": "add", "value": 1}),
            json!({"type": "tags/toggle", "value": 1}),
        ] {
            assert!(SetOp::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn state_round_trips_through_serde() {
        let mut s = AddWinsSet::new();
        s.apply(&id(1, "a"), SetOp::Add(json!({"k": [1, 2]})));
        s.apply(&id(2, "a"), SetOp::Remove(json!("gone")));
        let text = serde_json::to_string(&s).unwrap_or_default();
        let back: Result<AddWinsSet, _> = serde_json::from_str(&text);
        assert_eq!(back.ok(), Some(s));
    }
}
