//! Properties of the CRDT reducers: convergence under any permutation and duplication of the
//! operations, agreement with a simple sequential model when there is a single writer, and
//! parsers that never panic on arbitrary JSON.

use ferry::crdt::{
    apply, new_state, AddWinsSet, Counter, CounterOp, ListOp, LwwOp, OpId, ReducerKind, RgaList,
    SetOp, State,
};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Generated cases per property: enough to find ordering bugs, small enough for seconds.
const CASES: u32 = 128;
/// Most operations in one generated history.
const MAX_OPS: usize = 24;
/// Writers of the concurrent histories; few, so that equal times tie-break on the node.
const NODES: [&str; 3] = ["10:a:t", "11:b:t", "server:x"];
/// Field names of the map histories; few, so that writes collide.
const FIELDS: [&str; 3] = ["title", "done", "tags"];

/// One logged action with its OpId.
#[derive(Debug, Clone)]
struct Logged {
    id: OpId,
    action: Value,
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        ..ProptestConfig::default()
    }
}

/// OpIds of a concurrent history: small random times, nodes and ms, and `seq` equal to the
/// position, so that action ids are unique (as in a Logux log) while times often tie.
fn concurrent_ids(len: usize) -> impl Strategy<Value = Vec<OpId>> {
    proptest::collection::vec((0i64..6, 0..NODES.len(), 0i64..3), len).prop_map(|parts| {
        parts
            .into_iter()
            .enumerate()
            .map(|(seq, (time, node, ms))| OpId {
                time,
                node: NODES[node].to_owned(),
                seq: seq as u64,
                ms,
            })
            .collect()
    })
}

/// OpIds of a single writer, increasing in the total order.
fn sequential_id(position: usize) -> OpId {
    OpId {
        time: position as i64,
        node: "10:w:t".to_owned(),
        seq: position as u64,
        ms: position as i64,
    }
}

/// The original history and the same operations shuffled with some of them duplicated.
fn with_reordering(ops: Vec<Logged>) -> impl Strategy<Value = (Vec<Logged>, Vec<Logged>)> {
    let len = ops.len();
    proptest::collection::vec(0..len, 0..=len).prop_flat_map(move |duplicates| {
        let mut all = ops.clone();
        all.extend(duplicates.iter().map(|&i| ops[i].clone()));
        (Just(ops.clone()), Just(all).prop_shuffle())
    })
}

/// Applies a history through the registry; every generated action is valid.
fn reduce(kind: ReducerKind, ops: &[Logged]) -> State {
    let mut state = new_state(kind);
    for op in ops {
        let result = apply(&mut state, &op.action, &op.id);
        assert!(
            result.is_ok(),
            "{:?} rejected {}: {result:?}",
            kind,
            op.action
        );
    }
    state
}

/// Checks that two orders of one history converge, and that the state survives serde.
fn assert_converges(kind: ReducerKind, original: &[Logged], reordered: &[Logged]) {
    let first = reduce(kind, original);
    let second = reduce(kind, reordered);
    let mut sorted = original.to_vec();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let third = reduce(kind, &sorted);
    assert_eq!(first.snapshot(), second.snapshot());
    assert_eq!(first, second);
    assert_eq!(first, third);
    let text = serde_json::to_string(&first).unwrap_or_default();
    assert_eq!(text, serde_json::to_string(&second).unwrap_or_default());
    let back: Result<State, _> = serde_json::from_str(&text);
    assert_eq!(back.ok().as_ref(), Some(&first));
}

// ---------------------------------------------------------------------------------------
// LWW map

/// One abstract map operation: `None` deletes, `Some` writes these fields.
fn map_op() -> impl Strategy<Value = Option<Vec<(usize, i64)>>> {
    prop_oneof![
        1 => Just(None),
        7 => proptest::collection::vec((0..FIELDS.len(), 0i64..4), 0..3).prop_map(Some),
    ]
}

fn map_action(op: &Option<Vec<(usize, i64)>>, variant: usize) -> Value {
    match op {
        None => {
            let types = ["tasks/delete", "tasks/deleted"];
            json!({"type": types[variant % 2], "id": "t"})
        }
        Some(writes) => {
            let fields: Map<String, Value> = writes
                .iter()
                .map(|&(field, value)| (FIELDS[field].to_owned(), json!(value)))
                .collect();
            let types = [
                "tasks/create",
                "tasks/created",
                "tasks/change",
                "tasks/changed",
            ];
            json!({"type": types[variant % 4], "id": "t", "fields": fields})
        }
    }
}

fn map_history() -> impl Strategy<Value = Vec<Logged>> {
    proptest::collection::vec((map_op(), 0usize..4), 1..MAX_OPS).prop_flat_map(|ops| {
        concurrent_ids(ops.len()).prop_map(move |ids| {
            ids.into_iter()
                .zip(&ops)
                .map(|(id, (op, variant))| Logged {
                    id,
                    action: map_action(op, *variant),
                })
                .collect()
        })
    })
}

// ---------------------------------------------------------------------------------------
// Counter

fn delta() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => -5i64..=5,
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
    ]
}

fn counter_history() -> impl Strategy<Value = Vec<Logged>> {
    proptest::collection::vec(delta(), 1..MAX_OPS).prop_flat_map(|deltas| {
        concurrent_ids(deltas.len()).prop_map(move |ids| {
            ids.into_iter()
                .zip(&deltas)
                .map(|(id, delta)| Logged {
                    id,
                    action: json!({"type": "post/like", "delta": delta}),
                })
                .collect()
        })
    })
}

// ---------------------------------------------------------------------------------------
// Set

/// The values of the set histories; the last two are one element (same canonical JSON).
fn set_values() -> [Value; 6] {
    [
        json!(1),
        json!("x"),
        json!(null),
        json!([1, "x"]),
        json!({"a": 1, "b": 2}),
        json!({"b": 2, "a": 1}),
    ]
}

/// The model's element of a set value: the two spellings of one object are one element.
fn set_class(value: usize) -> usize {
    value.min(4)
}

fn set_action(add: bool, value: usize) -> Value {
    let values = set_values();
    let kind = if add { "tags/add" } else { "tags/remove" };
    json!({"type": kind, "value": values[value].clone()})
}

fn set_history() -> impl Strategy<Value = Vec<Logged>> {
    proptest::collection::vec((any::<bool>(), 0..set_values().len()), 1..MAX_OPS).prop_flat_map(
        |ops| {
            concurrent_ids(ops.len()).prop_map(move |ids| {
                ids.into_iter()
                    .zip(&ops)
                    .map(|(id, &(add, value))| Logged {
                        id,
                        action: set_action(add, value),
                    })
                    .collect()
            })
        },
    )
}

// ---------------------------------------------------------------------------------------
// List

/// A reference of a concurrent list history: the head, the action id of any operation of
/// the history (an insert, a remove, earlier or later: unknown references must converge
/// too), or an id no operation has.
#[derive(Debug, Clone)]
enum Reference {
    Head,
    Op(Index),
    Missing,
}

fn reference() -> impl Strategy<Value = Reference> {
    prop_oneof![
        2 => Just(Reference::Head),
        6 => any::<Index>().prop_map(Reference::Op),
        1 => Just(Reference::Missing),
    ]
}

fn element_of(reference: &Reference, ids: &[OpId]) -> Value {
    match reference {
        Reference::Head => Value::Null,
        Reference::Op(index) => json!(ids[index.index(ids.len())].action_id()),
        Reference::Missing => json!("999 nobody 0"),
    }
}

fn list_history() -> impl Strategy<Value = Vec<Logged>> {
    let op = (
        prop_oneof![3 => Just(true), 1 => Just(false)],
        reference(),
        0i64..100,
    );
    proptest::collection::vec(op, 1..MAX_OPS).prop_flat_map(|ops| {
        concurrent_ids(ops.len()).prop_map(move |ids| {
            ops.iter()
                .zip(&ids)
                .map(|((insert, reference, value), id)| {
                    let action = if *insert {
                        json!({"type": "todo/insert", "after": element_of(reference, &ids), "value": value})
                    } else {
                        let element = match element_of(reference, &ids) {
                            Value::Null => json!("999 nobody 1"),
                            other => other,
                        };
                        json!({"type": "todo/remove", "element": element})
                    };
                    Logged {
                        id: id.clone(),
                        action,
                    }
                })
                .collect()
        })
    })
}

/// A single-writer list command: insert after an existing element (by position in the
/// model, tombstones included) or at the head, or remove an existing element.
#[derive(Debug, Clone)]
enum ListCommand {
    Insert(Option<Index>, i64),
    Remove(Index),
}

fn list_command() -> impl Strategy<Value = ListCommand> {
    prop_oneof![
        3 => (proptest::option::of(any::<Index>()), 0i64..100)
            .prop_map(|(after, value)| ListCommand::Insert(after, value)),
        1 => any::<Index>().prop_map(ListCommand::Remove),
    ]
}

// ---------------------------------------------------------------------------------------
// Arbitrary JSON

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let text = prop_oneof![
        Just("1 a 0".to_owned()),
        Just("x/add".to_owned()),
        "[0-9]{1,3} [a-z:]{0,3} -?[0-9]{1,2}",
        ".{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text.prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,6}", inner, 0..5)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Objects that look like actions: interesting types and the fields the parsers read, with
/// arbitrary values.
fn action_like_json() -> impl Strategy<Value = Value> {
    let types = prop_oneof![
        Just(json!("tasks/create")),
        Just(json!("tasks/changed")),
        Just(json!("tasks/deleted")),
        Just(json!("tags/add")),
        Just(json!("tags/remove")),
        Just(json!("todo/insert")),
        Just(json!("add")),
        Just(json!("/")),
        Just(json!("")),
        arbitrary_json(),
    ];
    let field = prop_oneof![
        Just("fields".to_owned()),
        Just("value".to_owned()),
        Just("after".to_owned()),
        Just("element".to_owned()),
        Just("delta".to_owned()),
        Just("id".to_owned()),
    ];
    (
        proptest::option::of(types),
        proptest::collection::btree_map(field, arbitrary_json(), 0..4),
    )
        .prop_map(|(action_type, fields)| {
            let mut action: Map<String, Value> = fields.into_iter().collect();
            if let Some(action_type) = action_type {
                action.insert("type".to_owned(), action_type);
            }
            Value::Object(action)
        })
}

fn parse_everything(action: &Value) {
    let _ = LwwOp::parse(action);
    let _ = CounterOp::parse(action, "delta");
    let _ = SetOp::parse(action);
    let _ = ListOp::parse(action);
    let id = sequential_id(1);
    for kind in ReducerKind::ALL {
        let mut state = new_state(kind);
        if apply(&mut state, action, &id).is_err() {
            assert_eq!(
                state,
                new_state(kind),
                "a rejected action changed the state"
            );
        }
        let _ = state.snapshot();
    }
}

// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn map_converges_under_any_order_and_duplication(
        (original, reordered) in map_history().prop_flat_map(with_reordering)
    ) {
        assert_converges(ReducerKind::LwwMap, &original, &reordered);
    }

    #[test]
    fn counter_converges_under_any_order_and_duplication(
        (original, reordered) in counter_history().prop_flat_map(with_reordering)
    ) {
        assert_converges(ReducerKind::Counter, &original, &reordered);
    }

    #[test]
    fn set_converges_under_any_order_and_duplication(
        (original, reordered) in set_history().prop_flat_map(with_reordering)
    ) {
        assert_converges(ReducerKind::Set, &original, &reordered);
    }

    #[test]
    fn list_converges_under_any_order_and_duplication(
        (original, reordered) in list_history().prop_flat_map(with_reordering)
    ) {
        assert_converges(ReducerKind::List, &original, &reordered);
    }

    #[test]
    fn single_writer_map_matches_a_btreemap(
        ops in proptest::collection::vec((map_op(), 0usize..4), 1..MAX_OPS),
        since in -1i64..(MAX_OPS as i64),
    ) {
        let mut state = new_state(ReducerKind::LwwMap);
        let mut model: BTreeMap<String, (Value, i64)> = BTreeMap::new();
        let mut deleted = false;
        for (position, (op, variant)) in ops.iter().enumerate() {
            let id = sequential_id(position);
            prop_assert!(apply(&mut state, &map_action(op, *variant), &id).is_ok());
            match op {
                None => {
                    deleted = true;
                    model.clear();
                }
                Some(writes) if !deleted => {
                    for &(field, value) in writes {
                        model.insert(FIELDS[field].to_owned(), (json!(value), id.time));
                    }
                }
                Some(_) => {}
            }
        }
        let expected = if deleted {
            json!({"deleted": true})
        } else {
            let fields: Map<String, Value> =
                model.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect();
            let times: Map<String, Value> =
                model.iter().map(|(k, (_, t))| (k.clone(), json!(t))).collect();
            json!({"deleted": false, "fields": fields, "times": times})
        };
        prop_assert_eq!(state.snapshot(), expected);
        let State::LwwMap(object) = &state else {
            return Err(TestCaseError::fail("not a map state"));
        };
        let since_model: Map<String, Value> = model
            .iter()
            .filter(|(_, (_, time))| *time > since)
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        prop_assert_eq!(object.changed_since(since), since_model);
        prop_assert_eq!(object.is_deleted(), deleted);
    }

    #[test]
    fn single_writer_counter_matches_a_sum(
        deltas in proptest::collection::vec(delta(), 1..MAX_OPS),
    ) {
        let mut counter = Counter::new();
        let mut sum: i128 = 0;
        for (position, &delta) in deltas.iter().enumerate() {
            let action = json!({"type": "post/like", "delta": delta});
            let op = counter.parse(&action);
            prop_assert_eq!(&op, &Ok(CounterOp { delta }));
            if let Ok(op) = op {
                counter.apply(&sequential_id(position), op);
            }
            sum += i128::from(delta);
        }
        let expected = i64::try_from(sum).unwrap_or(if sum < 0 { i64::MIN } else { i64::MAX });
        prop_assert_eq!(counter.value(), expected);
        prop_assert_eq!(counter.snapshot(), json!(expected));
        prop_assert_eq!(counter.applied_ops(), deltas.len());
    }

    #[test]
    fn single_writer_set_matches_a_set(
        ops in proptest::collection::vec((any::<bool>(), 0..set_values().len()), 1..MAX_OPS),
    ) {
        let mut set = AddWinsSet::new();
        let mut model: BTreeSet<usize> = BTreeSet::new();
        for (position, &(add, value)) in ops.iter().enumerate() {
            let op = SetOp::parse(&set_action(add, value));
            prop_assert!(op.is_ok());
            if let Ok(op) = op {
                set.apply(&sequential_id(position), op);
            }
            if add {
                model.insert(set_class(value));
            } else {
                model.remove(&set_class(value));
            }
        }
        for (value, json_value) in set_values().iter().enumerate() {
            prop_assert_eq!(set.contains(json_value), model.contains(&set_class(value)));
        }
        prop_assert_eq!(set.values().count(), model.len());
        prop_assert_eq!(set.snapshot().as_array().map(Vec::len), Some(model.len()));
    }

    #[test]
    fn single_writer_list_matches_a_vec(
        commands in proptest::collection::vec(list_command(), 1..MAX_OPS),
    ) {
        let mut list = RgaList::new();
        // (element id, value, removed) in list order, tombstones included.
        let mut model: Vec<(String, i64, bool)> = Vec::new();
        for (position, command) in commands.iter().enumerate() {
            let id = sequential_id(position);
            let action = match command {
                ListCommand::Insert(after, value) => {
                    let (index, after) = match after {
                        Some(after) if !model.is_empty() => {
                            let index = after.index(model.len());
                            (index + 1, json!(model[index].0))
                        }
                        _ => (0, Value::Null),
                    };
                    model.insert(index, (id.action_id(), *value, false));
                    json!({"type": "todo/insert", "after": after, "value": value})
                }
                ListCommand::Remove(element) if !model.is_empty() => {
                    let index = element.index(model.len());
                    model[index].2 = true;
                    json!({"type": "todo/remove", "element": model[index].0})
                }
                ListCommand::Remove(_) => continue,
            };
            let op = ListOp::parse(&action);
            prop_assert!(op.is_ok());
            if let Ok(op) = op {
                list.apply(&id, op);
            }
        }
        let expected: Vec<(String, Value)> = model
            .iter()
            .filter(|(_, _, removed)| !removed)
            .map(|(id, value, _)| (id.clone(), json!(value)))
            .collect();
        let actual: Vec<(String, Value)> = list
            .values()
            .into_iter()
            .map(|(id, value)| (id.to_owned(), value.clone()))
            .collect();
        prop_assert_eq!(actual, expected);
        prop_assert_eq!(list.buffered(), 0);
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_json(action in arbitrary_json()) {
        parse_everything(&action);
    }

    #[test]
    fn parsers_never_panic_on_action_like_json(action in action_like_json()) {
        parse_everything(&action);
    }
}
