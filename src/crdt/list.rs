//! An ordered list (RGA, replicated growable array) of JSON values.

use super::json::{canonical_json, element_id, object, required, type_suffix, unsupported};
use super::{Applied, CrdtError, OpId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The type suffixes a list operation accepts, for error messages.
const EXPECTED: &str = "/insert or /remove";

/// One list operation.
#[derive(Debug, Clone, PartialEq)]
pub enum ListOp {
    /// Insert `value` right after the element `after` (`None`: at the head). The new
    /// element's id is the inserting operation's action id.
    Insert {
        /// The element id (a canonical Logux action id) to insert after; `None` for the head.
        after: Option<String>,
        /// The inserted value.
        value: Value,
    },
    /// Remove (tombstone) the element with this id.
    Remove {
        /// The element id (a canonical Logux action id) to remove.
        element: String,
    },
}

impl ListOp {
    /// Parses `{type: "<prefix>/insert", after: <element id>|null, value}` or
    /// `{type: "<prefix>/remove", element: <element id>}`. `after` and `value` must both be
    /// present (`after: null` inserts at the head); element ids must be action ids
    /// `"<ms> <node> <seq>"` and are normalised (`"01 a 0"` is `"1 a 0"`).
    pub fn parse(action: &Value) -> Result<ListOp, CrdtError> {
        let action = object(action)?;
        match type_suffix(action, "list", EXPECTED)? {
            "insert" => {
                let after = match required(action, "after")? {
                    Value::Null => None,
                    other => Some(element_id(other, "after")?),
                };
                let value = required(action, "value")?.clone();
                Ok(ListOp::Insert { after, value })
            }
            "remove" => Ok(ListOp::Remove {
                element: element_id(required(action, "element")?, "element")?,
            }),
            _ => {
                let action_type = action.get("type").and_then(Value::as_str);
                Err(unsupported(
                    action_type.unwrap_or_default(),
                    "list",
                    EXPECTED,
                ))
            }
        }
    }
}

/// One inserted element, visible or tombstoned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListElement {
    /// The inserting operation: its position in the total order orders siblings.
    pub op: OpId,
    /// The element it was inserted after (its parent in the RGA tree); `None`: the head.
    pub after: Option<String>,
    /// The value; replaced by `null` once removed, since tombstones are never shown.
    pub value: Value,
    /// Whether the element has been removed. Tombstones stay: later inserts may refer to them.
    pub removed: bool,
}

impl ListElement {
    /// The order in which two versions of one element id are reconciled: the greater wins.
    fn rank(&self) -> (&OpId, &Option<String>, String) {
        (&self.op, &self.after, canonical_json(&self.value))
    }
}

/// An RGA list on the Logux total order.
///
/// Every element is a node of a tree whose parent is the element it was inserted after (the
/// head is the root). The list is the pre-order walk of that tree with the children of each
/// node in descending OpId order (newer first), skipping tombstones. This is the standard RGA
/// order: an insert lands right after its reference, before the older inserts after the same
/// reference, and the result depends only on the set of operations, not on their arrival.
///
/// An insert whose reference has not arrived is buffered: it is stored but invisible (with
/// any inserts made after it) until the reference arrives, then it appears in its RGA place.
/// A reference that never arrives, or a cycle of references (only possible with forged
/// ids), keeps those elements invisible for good. A remove of an element that has not
/// arrived is kept and applied when the insert arrives.
///
/// Growth: one element per insert ever applied (tombstones keep their OpId and reference but
/// drop their value) plus one id per remove of a never-inserted element. Reading the list
/// costs O(n log n) in the number of elements; applying an operation costs O(log n).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RgaList {
    /// Elements by element id (the canonical action id of the insert).
    elements: BTreeMap<String, ListElement>,
    /// Removes of elements whose insert has not been applied yet.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pending_removes: BTreeSet<String>,
}

impl RgaList {
    /// An empty list.
    pub fn new() -> RgaList {
        RgaList::default()
    }

    /// Applies an insert or a remove. Re-applying an operation is a no-op; two different
    /// inserts under one action id (never produced by a Logux log) keep the greater of
    /// (OpId, reference, canonical value), so even that converges.
    pub fn apply(&mut self, op_id: &OpId, op: ListOp) -> Applied {
        match op {
            ListOp::Insert { after, value } => self.insert(op_id, after, value),
            ListOp::Remove { element } => self.remove(element),
        }
    }

    /// Stores an inserted element (possibly already tombstoned by a pending remove).
    fn insert(&mut self, op_id: &OpId, after: Option<String>, value: Value) -> Applied {
        let id = op_id.action_id();
        let removed = self.pending_removes.remove(&id)
            || self
                .elements
                .get(&id)
                .is_some_and(|element| element.removed);
        let candidate = ListElement {
            op: op_id.clone(),
            after,
            value: if removed { Value::Null } else { value },
            removed,
        };
        match self.elements.get_mut(&id) {
            None => {
                self.elements.insert(id, candidate);
                Applied::Changed
            }
            Some(existing) if candidate.rank() > existing.rank() => {
                *existing = candidate;
                Applied::Changed
            }
            Some(_) => Applied::NoEffect,
        }
    }

    /// Tombstones an element, or remembers the remove until the element arrives.
    fn remove(&mut self, id: String) -> Applied {
        match self.elements.get_mut(&id) {
            Some(element) if element.removed => Applied::NoEffect,
            Some(element) => {
                element.removed = true;
                element.value = Value::Null;
                Applied::Changed
            }
            None if self.pending_removes.insert(id) => Applied::Changed,
            None => Applied::NoEffect,
        }
    }

    /// The ids of the elements reachable from the head, in list order, tombstones included.
    fn walk(&self) -> Vec<&str> {
        let mut children: HashMap<Option<&str>, Vec<(&OpId, &str)>> = HashMap::new();
        for (id, element) in &self.elements {
            children
                .entry(element.after.as_deref())
                .or_default()
                .push((&element.op, id.as_str()));
        }
        for siblings in children.values_mut() {
            // Ascending, so that the newest sibling is pushed last and popped first.
            siblings.sort();
        }
        let mut order = Vec::with_capacity(self.elements.len());
        let mut stack: Vec<&str> = Vec::new();
        if let Some(roots) = children.get(&None) {
            stack.extend(roots.iter().map(|&(_, id)| id));
        }
        while let Some(id) = stack.pop() {
            order.push(id);
            if let Some(kids) = children.get(&Some(id)) {
                stack.extend(kids.iter().map(|&(_, kid)| kid));
            }
        }
        order
    }

    /// The visible elements in list order, as `(element id, value)`.
    pub fn values(&self) -> Vec<(&str, &Value)> {
        self.walk()
            .into_iter()
            .filter_map(|id| {
                let element = self.elements.get(id)?;
                (!element.removed).then_some((id, &element.value))
            })
            .collect()
    }

    /// Every stored element by id, tombstones and buffered inserts included.
    pub fn elements(&self) -> impl Iterator<Item = (&str, &ListElement)> {
        self.elements
            .iter()
            .map(|(id, element)| (id.as_str(), element))
    }

    /// How many stored inserts are not reachable from the head yet (waiting for their
    /// reference, or part of a reference cycle).
    pub fn buffered(&self) -> usize {
        self.elements.len() - self.walk().len()
    }

    /// The compact state for a resyncing client: the visible elements in order as
    /// `[{"id": "<element id>", "value": <value>}, ...]`. Tombstones and buffered inserts
    /// are left out.
    pub fn snapshot(&self) -> Value {
        Value::Array(
            self.values()
                .into_iter()
                .map(|(id, value)| json!({ "id": id, "value": value }))
                .collect(),
        )
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

    fn insert(after: Option<&OpId>, value: Value) -> ListOp {
        ListOp::Insert {
            after: after.map(OpId::action_id),
            value,
        }
    }

    fn remove(element: &OpId) -> ListOp {
        ListOp::Remove {
            element: element.action_id(),
        }
    }

    fn shown(list: &RgaList) -> Vec<Value> {
        list.values().into_iter().map(|(_, v)| v.clone()).collect()
    }

    #[test]
    fn inserts_after_the_reference_element() {
        let (a, b, c) = (id(1, "w"), id(2, "w"), id(3, "w"));
        let mut l = RgaList::new();
        l.apply(&a, insert(None, json!("a")));
        l.apply(&b, insert(Some(&a), json!("c")));
        l.apply(&c, insert(Some(&a), json!("b")));
        assert_eq!(shown(&l), vec![json!("a"), json!("b"), json!("c")]);
    }

    #[test]
    fn concurrent_inserts_at_the_same_place_put_the_newer_first() {
        let head = id(1, "w");
        let mut one = RgaList::new();
        one.apply(&head, insert(None, json!(0)));
        let mut two = one.clone();
        let (older, newer) = (id(5, "alice"), id(5, "bob"));
        one.apply(&older, insert(Some(&head), json!("alice")));
        one.apply(&newer, insert(Some(&head), json!("bob")));
        two.apply(&newer, insert(Some(&head), json!("bob")));
        two.apply(&older, insert(Some(&head), json!("alice")));
        assert_eq!(one, two);
        assert_eq!(shown(&one), vec![json!(0), json!("bob"), json!("alice")]);
    }

    #[test]
    fn concurrent_runs_of_typing_do_not_interleave() {
        let head = id(1, "w");
        let (a1, a2) = (id(10, "a"), id(11, "a"));
        let (b1, b2) = (id(12, "b"), id(13, "b"));
        let mut l = RgaList::new();
        l.apply(&head, insert(None, json!("|")));
        l.apply(&b2, insert(Some(&b1), json!("b2")));
        l.apply(&a1, insert(Some(&head), json!("a1")));
        l.apply(&b1, insert(Some(&head), json!("b1")));
        l.apply(&a2, insert(Some(&a1), json!("a2")));
        let expected = vec![
            json!("|"),
            json!("b1"),
            json!("b2"),
            json!("a1"),
            json!("a2"),
        ];
        assert_eq!(shown(&l), expected);
    }

    #[test]
    fn removed_element_disappears_but_still_anchors_later_inserts() {
        let (a, b, c) = (id(1, "w"), id(2, "w"), id(4, "w"));
        let mut l = RgaList::new();
        l.apply(&a, insert(None, json!("a")));
        l.apply(&b, insert(Some(&a), json!("b")));
        l.apply(&id(3, "w"), remove(&a));
        assert_eq!(shown(&l), vec![json!("b")]);
        l.apply(&c, insert(Some(&a), json!("c")));
        assert_eq!(shown(&l), vec![json!("c"), json!("b")]);
    }

    #[test]
    fn insert_with_unknown_reference_is_buffered_until_it_arrives() {
        let (a, b) = (id(1, "w"), id(2, "w"));
        let mut l = RgaList::new();
        l.apply(&b, insert(Some(&a), json!("b")));
        assert_eq!(shown(&l), Vec::<Value>::new());
        assert_eq!(l.buffered(), 1);
        l.apply(&a, insert(None, json!("a")));
        assert_eq!(shown(&l), vec![json!("a"), json!("b")]);
        assert_eq!(l.buffered(), 0);
    }

    #[test]
    fn remove_before_insert_is_applied_when_the_insert_arrives() {
        let a = id(1, "w");
        let mut one = RgaList::new();
        assert_eq!(one.apply(&id(2, "w"), remove(&a)), Applied::Changed);
        one.apply(&a, insert(None, json!("a")));
        let mut two = RgaList::new();
        two.apply(&a, insert(None, json!("a")));
        two.apply(&id(2, "w"), remove(&a));
        assert_eq!(one, two);
        assert!(shown(&one).is_empty());
    }

    #[test]
    fn self_referencing_insert_stays_invisible_without_looping() {
        let a = id(1, "w");
        let mut l = RgaList::new();
        l.apply(&a, insert(Some(&a), json!("loop")));
        assert!(shown(&l).is_empty());
        assert_eq!(l.buffered(), 1);
    }

    #[test]
    fn applying_the_same_op_twice_has_no_effect() {
        let a = id(1, "w");
        let mut l = RgaList::new();
        assert_eq!(l.apply(&a, insert(None, json!(1))), Applied::Changed);
        assert_eq!(l.apply(&a, insert(None, json!(1))), Applied::NoEffect);
        assert_eq!(l.apply(&id(2, "w"), remove(&a)), Applied::Changed);
        assert_eq!(l.apply(&id(2, "w"), remove(&a)), Applied::NoEffect);
        assert_eq!(l.apply(&a, insert(None, json!(1))), Applied::NoEffect);
        assert!(shown(&l).is_empty());
    }

    #[test]
    fn long_single_writer_chain_does_not_overflow_the_stack() {
        let mut l = RgaList::new();
        let mut previous: Option<OpId> = None;
        for time in 0..50_000 {
            let op = id(time, "w");
            l.apply(&op, insert(previous.as_ref(), json!(time)));
            previous = Some(op);
        }
        assert_eq!(l.values().len(), 50_000);
    }

    #[test]
    fn snapshot_lists_visible_ids_and_values() {
        let (a, b) = (id(1, "w"), id(2, "w"));
        let mut l = RgaList::new();
        l.apply(&a, insert(None, json!("a")));
        l.apply(&b, insert(Some(&a), json!("b")));
        l.apply(&id(3, "w"), remove(&a));
        assert_eq!(l.snapshot(), json!([{"id": "2 w 0", "value": "b"}]));
    }

    #[test]
    fn parses_insert_and_remove_actions() {
        assert_eq!(
            ListOp::parse(&json!({"type": "todo/insert", "after": null, "value": 1})),
            Ok(ListOp::Insert {
                after: None,
                value: json!(1)
            })
        );
        assert_eq!(
            ListOp::parse(&json!({"type": "todo/insert", "after": "05 a:b:c 1", "value": 1})),
            Ok(ListOp::Insert {
                after: Some("5 a:b:c 1".to_owned()),
                value: json!(1)
            })
        );
        assert_eq!(
            ListOp::parse(&json!({"type": "todo/remove", "element": "5 a 1"})),
            Ok(ListOp::Remove {
                element: "5 a 1".to_owned()
            })
        );
        for bad in [
            json!(1),
            json!({"type": "todo/insert", "value": 1}),
            json!({"type": "todo/insert", "after": null}),
            json!({"type": "todo/insert", "after": "x", "value": 1}),
            json!({"type": "todo/insert", "after": 5, "value": 1}),
            json!({"type": "todo/remove"}),
            json!({"type": "todo/remove", "element": null}),
            json!({"type": "todo/move", "element": "1 a 0"}),
        ] {
            assert!(ListOp::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn state_round_trips_through_serde() {
        let (a, b) = (id(1, "w"), id(2, "w"));
        let mut l = RgaList::new();
        l.apply(&a, insert(None, json!({"t": "a"})));
        l.apply(&b, remove(&id(9, "x")));
        let text = serde_json::to_string(&l).unwrap_or_default();
        let back: Result<RgaList, _> = serde_json::from_str(&text);
        assert_eq!(back.ok(), Some(l));
    }
}
