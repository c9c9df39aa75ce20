//! The Logux protocol 5 core: message validation, relative id/time encoding, and the
//! per-connection session state machine.
//!
//! Architecture invariant: nothing in `protocol/` does IO or reads the clock. A session is fed
//! frames and a `now`, and returns what to send and what to do.

pub mod codec;
pub mod error;
pub mod message;
pub mod session;

pub use error::ProtocolError;
pub use message::Message;
pub use session::{AuthRequest, IncomingEntry, IncomingSync, Output, Session, SessionConfig};

/// The Logux protocol version that released clients (`@logux/core` 0.10) speak.
pub const PROTOCOL_VERSION: u32 = 5;
/// The oldest protocol version Ferry accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 5;
