//! Protocol errors and their one mapping onto Logux wire `error` messages.

use serde_json::{json, Number, Value};

/// An error that ends a connection with an `["error", type, options]` message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// The frame is not JSON or a message has the wrong shape; carries the offending text.
    #[error("wrong message format in {0}")]
    WrongFormat(String),
    /// The message type is not part of protocol 5.
    #[error("unknown message type {0}")]
    UnknownMessage(String),
    /// The client's protocol is older than ours.
    #[error("protocol {used} is older than {supported}")]
    WrongProtocol {
        /// Oldest protocol the server accepts.
        supported: u32,
        /// What the client sent, echoed as received.
        used: Number,
    },
    /// The client's application subprotocol is older than `min_subprotocol`.
    #[error("subprotocol {used} is older than {supported}")]
    WrongSubprotocol {
        /// Oldest subprotocol the server accepts.
        supported: u32,
        /// What the client sent (0 when missing).
        used: Value,
    },
    /// Authentication failed.
    #[error("wrong credentials")]
    WrongCredentials,
}

/// Longest offending text echoed back in a `wrong-format` error, so that a huge bad frame is
/// not sent back whole.
pub const WRONG_FORMAT_ECHO_BYTES_MAX: usize = 1024;

impl ProtocolError {
    /// A `wrong-format` error echoing `text`, cut to `WRONG_FORMAT_ECHO_BYTES_MAX` bytes.
    pub fn wrong_format(text: &str) -> ProtocolError {
        let mut end = text.len().min(WRONG_FORMAT_ECHO_BYTES_MAX);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        ProtocolError::WrongFormat(text[..end].to_owned())
    }

    /// An `unknown-message` error naming `name`, cut like a `wrong-format` echo, so that a
    /// huge message name is not sent back whole.
    pub fn unknown_message(name: &str) -> ProtocolError {
        match ProtocolError::wrong_format(name) {
            ProtocolError::WrongFormat(cut) => ProtocolError::UnknownMessage(cut),
            other => other,
        }
    }

    /// The wire frame for this error, exactly as `@logux/server` 0.14 sends it.
    pub fn to_frame(&self) -> String {
        let message = match self {
            ProtocolError::WrongFormat(text) => json!(["error", "wrong-format", text]),
            ProtocolError::UnknownMessage(kind) => json!(["error", "unknown-message", kind]),
            ProtocolError::WrongProtocol { supported, used } => {
                json!(["error", "wrong-protocol", {"supported": supported, "used": used}])
            }
            ProtocolError::WrongSubprotocol { supported, used } => {
                json!(["error", "wrong-subprotocol", {"supported": supported, "used": used}])
            }
            ProtocolError::WrongCredentials => json!(["error", "wrong-credentials"]),
        };
        message.to_string()
    }

    /// The wire `error` type, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolError::WrongFormat(_) => "wrong-format",
            ProtocolError::UnknownMessage(_) => "unknown-message",
            ProtocolError::WrongProtocol { .. } => "wrong-protocol",
            ProtocolError::WrongSubprotocol { .. } => "wrong-subprotocol",
            ProtocolError::WrongCredentials => "wrong-credentials",
        }
    }
}
