//! Transports: they move frames between sockets (or HTTP requests) and `server::connection`,
//! nothing more.
//!
//! Architecture invariant: `hyper` and `tungstenite` appear only here (the server API
//! included) and in the back-end hook client, `backend/http_client.rs`.

pub mod api;
pub mod http;
pub mod long_poll;
pub mod tls;
pub mod ws;
