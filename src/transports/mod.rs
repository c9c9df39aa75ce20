//! Transports: they move frames between sockets (or HTTP requests) and `server::connection`,
//! nothing more.
//!
//! Architecture invariant: `hyper` and `tungstenite` appear only here (the server API and the
//! back-end HTTP client included).

pub mod api;
pub mod common;
pub mod http;
pub mod http_client;
pub mod long_poll;
pub mod tls;
pub mod ws;
