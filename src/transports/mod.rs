//! Transports: they move frames between sockets (or HTTP requests) and `server::connection`,
//! nothing more.
//!
//! Architecture invariant: `hyper` and `tungstenite` appear only here (the server API
//! included) and in the back-end hook client, `backend/http_client.rs`.
//!
//! Architecture invariant: error answers of every HTTP surface (the listener's endpoints and
//! WebSocket upgrades, long-poll, the server API) are `common::HttpError`s, turned into
//! responses only by `HttpError::into_response`; the body rule is in `common`'s doc, and a
//! test there checks that no other module builds a response from scratch.

pub mod api;
pub mod common;
pub mod http;
pub mod long_poll;
pub mod tls;
pub mod ws;
