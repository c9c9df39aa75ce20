//! Transports: they move frames between sockets (or HTTP requests) and `server::connection`,
//! nothing more.
//!
//! Architecture invariant: `hyper` and `tungstenite` appear only here.

pub mod http;
pub mod long_poll;
pub mod tls;
pub mod ws;
