//! Transports: they move frames between sockets and `server::connection`, nothing more.
//!
//! Architecture invariant: `hyper` and `tungstenite` appear only here.

pub mod http;
pub mod ws;
