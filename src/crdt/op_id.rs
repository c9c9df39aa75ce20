//! `OpId`: the total order of operations, Logux's `isFirstOlder` on an action's meta.

use crate::action::ActionId;
use serde::{Deserialize, Serialize};

/// The identity and position in the total order of one operation (one logged action).
///
/// Operations are ordered by `time`, then `node` (byte-wise, which equals JavaScript's string
/// comparison for node ids without characters above U+FFFF), then `seq`, then `ms`: the order
/// of Logux's `isFirstOlder`, so every node sorts the same actions the same way. The derived
/// `Ord` relies on the field order below; do not reorder the fields.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId {
    /// `meta.time`: the creation time in ms on the server's clock, the primary sort key.
    pub time: i64,
    /// The node id from the action id, the first tie-breaker between equal times.
    pub node: String,
    /// The sequence number from the action id, the tie-breaker within one node.
    pub seq: u64,
    /// The ms part of the action id (the author's own clock), the last tie-breaker.
    pub ms: i64,
}

impl OpId {
    /// Builds the OpId of a logged action from its meta: the action id
    /// `"<ms> <node> <seq>"` and `meta.time`. Returns `None` for a malformed action id.
    pub fn from_meta(id: &str, time: i64) -> Option<OpId> {
        let parsed = ActionId::parse(id)?;
        Some(OpId {
            time,
            node: parsed.node,
            seq: parsed.seq,
            ms: parsed.ms,
        })
    }

    /// The Logux action id `"<ms> <node> <seq>"` of this operation. It names the operation
    /// (duplicates are recognised by it) and is the element id of a list insert.
    pub fn action_id(&self) -> String {
        format!("{} {} {}", self.ms, self.node, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(time: i64, node: &str, seq: u64, ms: i64) -> OpId {
        OpId {
            time,
            node: node.to_owned(),
            seq,
            ms,
        }
    }

    #[test]
    fn from_meta_parses_the_action_id_and_keeps_meta_time() {
        let id = OpId::from_meta("1700 10:abc:tab 3", 2000);
        assert_eq!(id, Some(op(2000, "10:abc:tab", 3, 1700)));
    }

    #[test]
    fn from_meta_rejects_malformed_ids() {
        for bad in ["", "1 a", "x a 0", "1  0", "1 a 0 extra", "1 a -1"] {
            assert_eq!(OpId::from_meta(bad, 0), None, "{bad:?}");
        }
    }

    #[test]
    fn orders_by_time_then_node_then_seq_then_ms() {
        assert!(op(1, "z", 9, 9) < op(2, "a", 0, 0), "time first");
        assert!(op(1, "a", 9, 9) < op(1, "b", 0, 0), "then node");
        assert!(op(1, "a", 1, 9) < op(1, "a", 2, 0), "then seq");
        assert!(op(1, "a", 1, 1) < op(1, "a", 1, 2), "then ms");
    }

    #[test]
    fn action_id_round_trips_through_from_meta() {
        let id = op(5, "server:x", 7, 4);
        assert_eq!(id.action_id(), "4 server:x 7");
        assert_eq!(OpId::from_meta(&id.action_id(), 5), Some(id));
    }
}
