//! Relative id/time encoding of `sync` meta (protocol 5, §5 of the protocol notes).
//!
//! On the wire every `meta.id` and `meta.time` is relative to the connection's `baseTime`
//! (the `end` of `connected`). Short id forms are used only for the sender's own node id.

use crate::action::{ActionId, Entry};
use serde_json::{Number, Value};

/// The largest integer a JavaScript client represents exactly (2^53 - 1).
pub const JS_SAFE_INTEGER_MAX: i64 = 9_007_199_254_740_991;

/// Why an incoming meta could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A number is not an integer within the JavaScript safe range.
    NotSafeInteger,
    /// The decoded id is not a valid `"<ms> <nodeId> <seq>"` (for example a node id with a space).
    BadId,
}

/// Reads a JSON number as an integer in the JavaScript safe range.
pub fn safe_integer(number: &Number) -> Option<i64> {
    let value = match number.as_i64() {
        Some(value) => value,
        None => {
            let float = number.as_f64()?;
            if float.fract() != 0.0 || !float.is_finite() {
                return None;
            }
            // The range check below rejects anything a cast could have clipped.
            float as i64
        }
    };
    (-JS_SAFE_INTEGER_MAX..=JS_SAFE_INTEGER_MAX)
        .contains(&value)
        .then_some(value)
}

fn int(value: &Value) -> Result<i64, DecodeError> {
    match value {
        Value::Number(number) => safe_integer(number).ok_or(DecodeError::NotSafeInteger),
        _ => Err(DecodeError::NotSafeInteger),
    }
}

fn shifted(relative: i64, base_time: i64) -> Result<i64, DecodeError> {
    relative
        .checked_add(base_time)
        .filter(|value| value.abs() <= JS_SAFE_INTEGER_MAX)
        .ok_or(DecodeError::NotSafeInteger)
}

/// Decodes a wire `meta.id` sent by `remote_node` into an absolute action id.
pub fn decode_id(id: &Value, base_time: i64, remote_node: &str) -> Result<ActionId, DecodeError> {
    let (shift, node, seq) = match id {
        Value::Number(_) => (int(id)?, remote_node.to_owned(), 0),
        Value::Array(parts) => match parts.as_slice() {
            [shift, seq] => (int(shift)?, remote_node.to_owned(), int(seq)?),
            [shift, Value::String(node), seq] => (int(shift)?, node.clone(), int(seq)?),
            _ => return Err(DecodeError::BadId),
        },
        _ => return Err(DecodeError::BadId),
    };
    let seq = u64::try_from(seq).map_err(|_| DecodeError::BadId)?;
    if node.is_empty() || node.contains(' ') {
        return Err(DecodeError::BadId);
    }
    Ok(ActionId {
        ms: shifted(shift, base_time)?,
        node,
        seq,
    })
}

/// Decodes a wire `meta.time` (the server never applies a time fix).
pub fn decode_time(time: &Value, base_time: i64) -> Result<i64, DecodeError> {
    shifted(int(time)?, base_time)
}

/// Writes a stored entry's meta, as JSON, for a peer whose `baseTime` is `base_time`.
/// `local_node` is this server's node id: only its actions use the short id forms.
/// Written straight into the frame: this runs once per recipient of every action.
pub fn write_meta(out: &mut String, entry: &Entry, base_time: i64, local_node: &str) {
    out.push_str("{\"id\":");
    write_id(out, &entry.meta.id, base_time, local_node);
    out.push_str(",\"time\":");
    push_int(out, entry.meta.time.saturating_sub(base_time));
    out.push_str(",\"subprotocol\":");
    push_int(out, entry.meta.subprotocol);
    out.push('}');
}

fn write_id(out: &mut String, id: &str, base_time: i64, local_node: &str) {
    match ActionId::parts(id) {
        Some((ms, node, seq)) => {
            let shift = ms.saturating_sub(base_time);
            if node == local_node {
                if seq == 0 {
                    push_int(out, shift);
                } else {
                    out.push('[');
                    push_int(out, shift);
                    out.push(',');
                    push_int(out, seq);
                    out.push(']');
                }
            } else {
                out.push('[');
                push_int(out, shift);
                out.push(',');
                push_str(out, node);
                out.push(',');
                push_int(out, seq);
                out.push(']');
            }
        }
        // Stored ids are validated before they are stored; this arm keeps a corrupt record
        // from taking a connection down.
        None => {
            out.push_str("[0,");
            push_str(out, id);
            out.push_str(",0]");
        }
    }
}

fn push_int(out: &mut String, value: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(value));
}

/// A JSON string literal; node ids rarely need escaping, so that case goes through serde.
fn push_str(out: &mut String, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        out.push_str(&Value::from(text).to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::Meta;

    use serde_json::json;

    const BASE: i64 = 1_795_423_671_273;

    fn encode_meta(entry: &Entry, base_time: i64, local_node: &str) -> Value {
        let mut out = String::new();
        write_meta(&mut out, entry, base_time, local_node);
        serde_json::from_str(&out).expect("valid JSON")
    }

    fn entry(id: &str, time: i64) -> Entry {
        Entry::new(
            json!({"type": "a"}),
            Meta {
                id: id.into(),
                time,
                subprotocol: 1,
                ..Meta::default()
            },
        )
    }

    #[test]
    fn decodes_every_wire_id_form() {
        let node = "10:abc:tab";
        assert_eq!(
            decode_id(&json!(-31), BASE, node).map(|id| id.to_string()),
            Ok(format!("{} 10:abc:tab 0", BASE - 31))
        );
        assert_eq!(
            decode_id(&json!([5, 2]), BASE, node).map(|id| id.to_string()),
            Ok(format!("{} 10:abc:tab 2", BASE + 5))
        );
        assert_eq!(
            decode_id(&json!([-313, "10:abc:other", 0]), BASE, node).map(|id| id.to_string()),
            Ok(format!("{} 10:abc:other 0", BASE - 313))
        );
    }

    #[test]
    fn rejects_ids_that_would_not_round_trip() {
        let node = "10:abc:tab";
        assert_eq!(
            decode_id(&json!([1, "a b", 0]), BASE, node),
            Err(DecodeError::BadId)
        );
        assert_eq!(
            decode_id(&json!([1, 2.5]), BASE, node),
            Err(DecodeError::NotSafeInteger)
        );
        assert_eq!(
            decode_id(&json!([1, -2]), BASE, node),
            Err(DecodeError::BadId)
        );
        assert_eq!(
            decode_id(&json!(1e300), BASE, node),
            Err(DecodeError::NotSafeInteger)
        );
        assert_eq!(
            decode_id(&json!(JS_SAFE_INTEGER_MAX), BASE, node),
            Err(DecodeError::NotSafeInteger)
        );
    }

    #[test]
    fn encodes_own_ids_short_and_foreign_ids_long() {
        let local = "server:abc";
        let own = entry(&format!("{} server:abc 0", BASE + 7), BASE + 7);
        assert_eq!(
            encode_meta(&own, BASE, local),
            json!({"id": 7, "time": 7, "subprotocol": 1})
        );
        let own_seq = entry(&format!("{} server:abc 1", BASE + 154), BASE + 154);
        assert_eq!(encode_meta(&own_seq, BASE, local)["id"], json!([154, 1]));
        let foreign = entry(&format!("{} 10:bb1:t1 0", BASE + 667), BASE + 667);
        assert_eq!(
            encode_meta(&foreign, BASE, local)["id"],
            json!([667, "10:bb1:t1", 0])
        );
    }

    #[test]
    fn node_ids_that_need_escaping_stay_valid_json() {
        let odd = entry(&format!("{} 10:\"q\\\u{1}:t 3", BASE - 5), BASE - 5);
        assert_eq!(
            encode_meta(&odd, BASE, "server:abc")["id"],
            json!([-5, "10:\"q\\\u{1}:t", 3])
        );
        let corrupt = entry("not an id", BASE);
        assert_eq!(
            encode_meta(&corrupt, BASE, "server:abc")["id"],
            json!([0, "not an id", 0])
        );
    }
}
