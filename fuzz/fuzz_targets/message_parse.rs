//! Any bytes → `ferry::protocol::message::parse` on their UTF-8 text.
//!
//! Invariants: never panics; an error becomes a JSON `["error", type, ...]` frame whose echo
//! of the offending text is bounded; a message that parses parses as the same kind after a
//! JSON round trip (the validation depends on the JSON, not on its spelling); `sync` pairs have
//! the shapes the session relies on; `parse_limited` agrees with `parse` but for a `sync` over
//! its pair limit.

#![no_main]

use ferry::protocol::error::WRONG_FORMAT_ECHO_BYTES_MAX;
use ferry::protocol::message::{parse, parse_limited, Message};
use ferry::protocol::ProtocolError;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// An echoed text of `WRONG_FORMAT_ECHO_BYTES_MAX` bytes is at most six times longer once
/// JSON-escaped (`\u0000`), plus the frame around it.
const ERROR_FRAME_BYTES_MAX: usize = WRONG_FORMAT_ECHO_BYTES_MAX * 6 + 64;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse(text);
    match &parsed {
        Ok(message) => check_message(text, message),
        Err(error) => check_error(text, error),
    }
    check_limited(text, &parsed, data.len() % 4);
});

/// `parse_limited` agrees with `parse`, except that a `sync` over the pair limit is refused.
fn check_limited(text: &str, parsed: &Result<Message, ProtocolError>, limit: usize) {
    let limited = parse_limited(text, limit);
    match (parsed, &limited) {
        (Ok(Message::Sync { pairs, .. }), Err(ProtocolError::WrongFormat(echo)))
            if pairs.len() > limit =>
        {
            assert_eq!(
                echo,
                &format!(
                    "sync with {} actions is over the limit of {limit}",
                    pairs.len()
                )
            );
        }
        (Ok(_), _) => assert_eq!(&limited, parsed, "parse_limited({limit}) differs"),
        // A sync over the limit may be refused for the limit before its shapes are checked.
        (Err(_), Err(ProtocolError::WrongFormat(echo))) if echo.starts_with("sync with ") => {}
        (Err(_), _) => assert_eq!(&limited, parsed, "parse_limited({limit}) differs"),
    }
}

fn check_message(text: &str, message: &Message) {
    if let Message::Sync { pairs, .. } = message {
        for (action, meta) in pairs {
            assert!(
                matches!(action.get("type"), Some(Value::String(_))),
                "sync action without a string type accepted: {text}"
            );
            assert!(
                matches!(meta.get("time"), Some(Value::Number(_))),
                "sync meta without a numeric time accepted: {text}"
            );
            assert!(meta.contains_key("id"), "sync meta without id accepted");
        }
    }
    // serde_json's default float parsing is not correctly rounded, so a float may change in
    // the last digit on a round trip: compare the kind of message, not the numbers.
    let value: Value = serde_json::from_str(text).expect("a parsed message is JSON");
    let again = parse(&value.to_string()).unwrap_or_else(|error| {
        panic!("{text} parses, but not after a JSON round trip: {error:?}")
    });
    assert_eq!(
        std::mem::discriminant(&again),
        std::mem::discriminant(message),
        "another message after a JSON round trip of {text}"
    );
    if let (Message::Sync { pairs, .. }, Message::Sync { pairs: again, .. }) = (message, &again) {
        assert_eq!(pairs.len(), again.len());
    }
}

fn check_error(text: &str, error: &ProtocolError) {
    let frame = error.to_frame();
    let value: Value = serde_json::from_str(&frame).expect("error frames are JSON");
    assert_eq!(value[0], "error", "{frame}");
    assert_eq!(value[1], error.kind(), "{frame}");
    assert!(
        frame.len() <= ERROR_FRAME_BYTES_MAX,
        "an error frame of {} bytes echoes too much of the input",
        frame.len()
    );
    if let ProtocolError::WrongFormat(echo) = error {
        assert!(echo.len() <= WRONG_FORMAT_ECHO_BYTES_MAX);
        if serde_json::from_str::<Value>(text).is_err() {
            assert!(
                text.starts_with(echo.as_str()),
                "a non-JSON frame is echoed as received"
            );
        }
    }
}
