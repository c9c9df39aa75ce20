//! JSON helpers shared by the reducers: canonical text and action field access.

use super::CrdtError;
use crate::action::ActionId;
use serde_json::{Map, Value};

/// The canonical JSON text of a value: objects with their keys sorted (recursively), no
/// whitespace, numbers and strings as serde_json prints them.
///
/// The add-wins set compares values by this text, so `{"a":1,"b":2}` and `{"b":2,"a":1}` are
/// the same element, while `1` and `1.0` stay different elements (different JSON texts).
pub fn canonical_json(value: &Value) -> String {
    sorted(value).to_string()
}

/// A copy of `value` whose objects have their keys inserted in sorted order, so that printing
/// it (serde_json keeps insertion order here) gives the canonical text.
pub(crate) fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let mut out = Map::with_capacity(map.len());
            for key in keys {
                if let Some(inner) = map.get(key) {
                    out.insert(key.clone(), sorted(inner));
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// The action as an object, or `NotAnObject`.
pub(crate) fn object(action: &Value) -> Result<&Map<String, Value>, CrdtError> {
    action.as_object().ok_or(CrdtError::NotAnObject)
}

/// The part of the action's `type` after its last `/`, with the whole type for errors.
pub(crate) fn type_suffix<'a>(
    action: &'a Map<String, Value>,
    reducer: &'static str,
    expected: &'static str,
) -> Result<&'a str, CrdtError> {
    let action_type = action
        .get("type")
        .and_then(Value::as_str)
        .ok_or(CrdtError::MissingType)?;
    match action_type.rsplit_once('/') {
        Some((_, suffix)) => Ok(suffix),
        None => Err(unsupported(action_type, reducer, expected)),
    }
}

/// The error for an action type the reducer has no operation for.
pub(crate) fn unsupported(
    action_type: &str,
    reducer: &'static str,
    expected: &'static str,
) -> CrdtError {
    CrdtError::UnsupportedType {
        reducer,
        action_type: action_type.to_owned(),
        expected,
    }
}

/// A required field of the action.
pub(crate) fn required<'a>(
    action: &'a Map<String, Value>,
    field: &str,
) -> Result<&'a Value, CrdtError> {
    action.get(field).ok_or_else(|| CrdtError::MissingField {
        field: field.to_owned(),
    })
}

/// What an element id field must hold, for error messages.
const ELEMENT_ID: &str = "a Logux action id string \"<ms> <node> <seq>\"";

/// Parses an element id (a Logux action id) and renders it canonically, so that `"01 a 0"`
/// and `"1 a 0"` name the same element.
pub(crate) fn element_id(value: &Value, field: &str) -> Result<String, CrdtError> {
    value
        .as_str()
        .and_then(ActionId::parse)
        .map(|id| id.to_string())
        .ok_or_else(|| CrdtError::InvalidField {
            field: field.to_owned(),
            expected: ELEMENT_ID,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_recursively() {
        let a = json!({"b": [{"y": 1, "x": 2}], "a": null});
        let b = json!({"a": null, "b": [{"x": 2, "y": 1}]});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":null,"b":[{"x":2,"y":1}]}"#);
    }

    #[test]
    fn canonical_json_keeps_integer_and_float_apart() {
        assert_ne!(canonical_json(&json!(1)), canonical_json(&json!(1.0)));
    }

    #[test]
    fn element_ids_are_normalised() {
        assert_eq!(
            element_id(&json!("01 a 0"), "after"),
            Ok("1 a 0".to_owned())
        );
        assert!(element_id(&json!("nope"), "after").is_err());
        assert!(element_id(&json!(5), "after").is_err());
    }
}
