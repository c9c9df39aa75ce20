//! An operation-based counter: every increment and decrement counts exactly once.

use super::json::object;
use super::{Applied, CrdtError, OpId};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use std::collections::BTreeMap;

/// The action field holding the delta unless the counter is built with another one.
pub const DEFAULT_DELTA_FIELD: &str = "delta";

/// One counter operation: add `delta` (negative to decrement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterOp {
    /// The signed amount to add.
    pub delta: i64,
}

impl CounterOp {
    /// Parses `{type: <any>, <field>: <integer>}`. The delta must be a JSON integer in the
    /// i64 range; floats (even `1.0`), strings and missing deltas are errors.
    pub fn parse(action: &Value, field: &str) -> Result<CounterOp, CrdtError> {
        let action = object(action)?;
        let delta = action
            .get(field)
            .ok_or_else(|| CrdtError::MissingField {
                field: field.to_owned(),
            })?
            .as_i64()
            .ok_or_else(|| CrdtError::InvalidField {
                field: field.to_owned(),
                expected: "an integer between -2^63 and 2^63-1",
            })?;
        Ok(CounterOp { delta })
    }
}

/// A counter that sums the deltas of all distinct operations.
///
/// It remembers every applied operation as `(ms, seq) -> delta` under its node, so a
/// re-applied action id is ignored: 24 bytes of payload per operation plus the node id once
/// per node (about 20 JSON bytes per operation when serialized). That is the price of exact
/// idempotence without causal delivery: Logux action ids are sparse in `ms`, so a per-node
/// high-water mark could not tell a duplicate from a late out-of-order operation.
///
/// The sum is kept exactly (i128, which cannot overflow for fewer than 2^64 operations) and
/// clamped to i64 only when read, so the value does not depend on the order of application
/// (a running saturating sum would).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "CounterRepr")]
pub struct Counter {
    /// Name of the action field holding the delta; persisted so the state knows how to read
    /// its own actions.
    field: String,
    /// Applied operations: node → (ms, seq) → delta.
    applied: BTreeMap<String, BTreeMap<(i64, u64), i64>>,
    /// The exact sum of all applied deltas; derived from `applied`, not serialized.
    total: i128,
}

impl Default for Counter {
    fn default() -> Counter {
        Counter::new()
    }
}

impl Counter {
    /// A zero counter reading its deltas from the `delta` field.
    pub fn new() -> Counter {
        Counter::with_field(DEFAULT_DELTA_FIELD)
    }

    /// A zero counter reading its deltas from another action field.
    pub fn with_field(field: &str) -> Counter {
        Counter {
            field: field.to_owned(),
            applied: BTreeMap::new(),
            total: 0,
        }
    }

    /// The action field this counter reads deltas from.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Parses an action with this counter's delta field.
    pub fn parse(&self, action: &Value) -> Result<CounterOp, CrdtError> {
        CounterOp::parse(action, &self.field)
    }

    /// Adds the delta unless this action id (`ms`, `node`, `seq`) was applied before. A
    /// repeated id with a different delta (never produced by a Logux log, which stores one
    /// action per id) keeps the greater delta, so even that converges.
    pub fn apply(&mut self, op_id: &OpId, op: CounterOp) -> Applied {
        let ops = self.applied.entry(op_id.node.clone()).or_default();
        match ops.get_mut(&(op_id.ms, op_id.seq)) {
            Some(existing) if *existing >= op.delta => Applied::NoEffect,
            Some(existing) => {
                self.total += i128::from(op.delta) - i128::from(*existing);
                *existing = op.delta;
                Applied::Changed
            }
            None => {
                ops.insert((op_id.ms, op_id.seq), op.delta);
                self.total += i128::from(op.delta);
                Applied::Changed
            }
        }
    }

    /// The counter value: the exact sum of the deltas, clamped to the i64 range.
    pub fn value(&self) -> i64 {
        i64::try_from(self.total).unwrap_or(if self.total < 0 { i64::MIN } else { i64::MAX })
    }

    /// How many distinct operations have been applied (what the idempotence state holds).
    pub fn applied_ops(&self) -> usize {
        self.applied.values().map(BTreeMap::len).sum()
    }

    /// The compact state for a resyncing client: just the value, a JSON number.
    pub fn snapshot(&self) -> Value {
        Value::from(self.value())
    }
}

/// The serialized form: `{"field": "delta", "applied": {"<node>": [[ms, seq, delta], ...]}}`.
#[derive(Deserialize)]
struct CounterRepr {
    /// See [`Counter::field`].
    field: String,
    /// Applied operations per node as `[ms, seq, delta]` triples.
    applied: BTreeMap<String, Vec<(i64, u64, i64)>>,
}

impl From<CounterRepr> for Counter {
    fn from(repr: CounterRepr) -> Counter {
        let mut counter = Counter::with_field(&repr.field);
        for (node, ops) in repr.applied {
            for (ms, seq, delta) in ops {
                let op_id = OpId {
                    time: 0,
                    node: node.clone(),
                    seq,
                    ms,
                };
                counter.apply(&op_id, CounterOp { delta });
            }
        }
        counter
    }
}

impl Serialize for Counter {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut state = serializer.serialize_struct("Counter", 2)?;
        state.serialize_field("field", &self.field)?;
        state.serialize_field("applied", &AppliedRef(&self.applied))?;
        state.end()
    }
}

/// Serializes the applied map without copying it.
struct AppliedRef<'a>(&'a BTreeMap<String, BTreeMap<(i64, u64), i64>>);

impl Serialize for AppliedRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(node, ops)| (node, NodeOpsRef(ops))))
    }
}

/// Serializes one node's operations as `[ms, seq, delta]` triples.
struct NodeOpsRef<'a>(&'a BTreeMap<(i64, u64), i64>);

impl Serialize for NodeOpsRef<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|(&(ms, seq), &delta)| (ms, seq, delta)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(node: &str, seq: u64) -> OpId {
        OpId {
            time: 100,
            node: node.to_owned(),
            seq,
            ms: 100,
        }
    }

    #[test]
    fn every_increment_and_decrement_counts() {
        let mut c = Counter::new();
        c.apply(&id("a", 0), CounterOp { delta: 5 });
        c.apply(&id("b", 0), CounterOp { delta: -2 });
        c.apply(&id("a", 1), CounterOp { delta: 1 });
        assert_eq!(c.value(), 4);
        assert_eq!(c.snapshot(), json!(4));
    }

    #[test]
    fn applying_the_same_op_id_twice_has_no_effect() {
        let mut c = Counter::new();
        assert_eq!(
            c.apply(&id("a", 0), CounterOp { delta: 3 }),
            Applied::Changed
        );
        assert_eq!(
            c.apply(&id("a", 0), CounterOp { delta: 3 }),
            Applied::NoEffect
        );
        assert_eq!(c.value(), 3);
        assert_eq!(c.applied_ops(), 1);
    }

    #[test]
    fn duplicate_id_is_recognised_whatever_its_meta_time() {
        let mut c = Counter::new();
        c.apply(&id("a", 0), CounterOp { delta: 3 });
        let mut later = id("a", 0);
        later.time = 999;
        assert_eq!(c.apply(&later, CounterOp { delta: 3 }), Applied::NoEffect);
        assert_eq!(c.value(), 3);
    }

    #[test]
    fn value_saturates_at_i64_bounds_independently_of_order() {
        let mut up_first = Counter::new();
        up_first.apply(&id("a", 0), CounterOp { delta: i64::MAX });
        up_first.apply(&id("a", 1), CounterOp { delta: i64::MAX });
        assert_eq!(up_first.value(), i64::MAX);
        up_first.apply(&id("a", 2), CounterOp { delta: i64::MIN });
        let mut down_first = Counter::new();
        down_first.apply(&id("a", 2), CounterOp { delta: i64::MIN });
        down_first.apply(&id("a", 0), CounterOp { delta: i64::MAX });
        down_first.apply(&id("a", 1), CounterOp { delta: i64::MAX });
        assert_eq!(up_first.value(), i64::MAX - 1);
        assert_eq!(up_first, down_first);
    }

    #[test]
    fn parses_the_delta_from_the_configured_field() {
        let c = Counter::with_field("likes");
        assert_eq!(
            c.parse(&json!({"type": "post/like", "likes": -1})),
            Ok(CounterOp { delta: -1 })
        );
        assert!(c.parse(&json!({"type": "post/like", "delta": 1})).is_err());
    }

    #[test]
    fn rejects_non_integer_deltas() {
        for action in [
            json!(null),
            json!({"type": "x"}),
            json!({"delta": 1.5}),
            json!({"delta": 1.0}),
            json!({"delta": "1"}),
            json!({"delta": u64::MAX}),
        ] {
            assert!(CounterOp::parse(&action, "delta").is_err(), "{action}");
        }
    }

    #[test]
    fn state_round_trips_through_serde_compactly() {
        let mut c = Counter::with_field("n");
        c.apply(&id("a", 0), CounterOp { delta: 2 });
        c.apply(&id("a", 1), CounterOp { delta: -7 });
        let value = serde_json::to_value(&c).unwrap_or_default();
        assert_eq!(
            value,
            json!({"field": "n", "applied": {"a": [[100, 0, 2], [100, 1, -7]]}})
        );
        let back: Result<Counter, _> = serde_json::from_value(value);
        assert_eq!(back.ok(), Some(c));
    }
}
