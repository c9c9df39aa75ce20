//! Ferry: a Logux-compatible action-log sync server.

pub mod action;
pub mod backend;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod crdt;
pub mod log;
pub mod metrics;
pub mod peer;
pub mod protocol;
pub mod rules;
pub mod run;
pub mod server;
pub mod transports;
