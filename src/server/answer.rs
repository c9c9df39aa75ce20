//! The answers to a client's action, built in one place: `logux/processed` and `logux/undo`
//! with the reason's wire text, and the metric label each outcome is counted under.

use serde_json::{json, Map, Value};

/// Why an action is undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UndoReason {
    /// The rules or an `access` hook refused it.
    Denied,
    /// The object or channel does not exist (an `access` hook, a deleted SyncMap).
    NotFound,
    /// A subscription or unsubscription without a valid channel.
    WrongChannel,
    /// No rule allows this type, or a client sent a server-only `logux/` type.
    UnknownType,
    /// The back-end gave no answer, or no back-end is configured for a hooked rule.
    Error,
    /// A reason the back-end's `process` answer named.
    Backend(String),
}

impl UndoReason {
    /// The `reason` of the `logux/undo` action.
    pub fn wire(&self) -> &str {
        match self {
            UndoReason::Denied => "denied",
            UndoReason::NotFound => "notFound",
            UndoReason::WrongChannel => "wrongChannel",
            UndoReason::UnknownType => "unknownType",
            UndoReason::Error => "error",
            UndoReason::Backend(reason) => reason,
        }
    }

    /// The reason for a wire text, e.g. a back-end's `process` answer: a text of the known
    /// reasons is that reason, any other is `Backend`.
    pub fn from_wire(text: String) -> UndoReason {
        match text.as_str() {
            "denied" => UndoReason::Denied,
            "notFound" => UndoReason::NotFound,
            "wrongChannel" => UndoReason::WrongChannel,
            "unknownType" => UndoReason::UnknownType,
            "error" => UndoReason::Error,
            _ => UndoReason::Backend(text),
        }
    }

    /// The `outcome` label of `ferry_actions_received_total`.
    pub fn metric(&self) -> &'static str {
        match self {
            UndoReason::Denied => "denied",
            UndoReason::NotFound => "not_found",
            UndoReason::WrongChannel => "wrong_channel",
            UndoReason::UnknownType => "unknown_type",
            UndoReason::Error => "error",
            UndoReason::Backend(_) => "undone",
        }
    }
}

/// The `outcome` label of `ferry_actions_received_total` for a processed action.
pub const PROCESSED_METRIC: &str = "processed";

/// `{"id": <id>, "type": "logux/processed"}`.
pub fn processed(id: &str) -> Value {
    json!({"id": id, "type": "logux/processed"})
}

/// `{"action": <action>, "id": <id>, "reason": <reason>, "type": "logux/undo"}`, keys in the
/// order `@logux/server` sends them.
pub fn undo(action: &Value, id: &str, reason: &UndoReason) -> Value {
    let mut undo = Map::new();
    undo.insert("action".into(), action.clone());
    undo.insert("id".into(), json!(id));
    undo.insert("reason".into(), json!(reason.wire()));
    undo.insert("type".into(), json!("logux/undo"));
    Value::Object(undo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_have_the_wire_shape_of_logux_server() {
        assert_eq!(
            processed("1 10:a 0").to_string(),
            r#"{"id":"1 10:a 0","type":"logux/processed"}"#
        );
        let undo = undo(&json!({"type": "a"}), "1 10:a 0", &UndoReason::NotFound);
        assert_eq!(
            undo.to_string(),
            r#"{"action":{"type":"a"},"id":"1 10:a 0","reason":"notFound","type":"logux/undo"}"#
        );
    }

    #[test]
    fn every_reason_has_a_wire_text_and_a_metric_label() {
        let reasons = [
            (UndoReason::Denied, "denied", "denied"),
            (UndoReason::NotFound, "notFound", "not_found"),
            (UndoReason::WrongChannel, "wrongChannel", "wrong_channel"),
            (UndoReason::UnknownType, "unknownType", "unknown_type"),
            (UndoReason::Error, "error", "error"),
            (UndoReason::Backend("paid".into()), "paid", "undone"),
        ];
        for (reason, wire, metric) in reasons {
            assert_eq!((reason.wire(), reason.metric()), (wire, metric));
            assert_eq!(UndoReason::from_wire(wire.to_owned()), reason);
        }
    }
}
