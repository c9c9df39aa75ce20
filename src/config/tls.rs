//! `[tls]`: serve `wss://` and `https://` directly.

use serde::Deserialize;
use std::path::PathBuf;

/// `[tls]`: certificate chain and private key, PEM files (read by `transports::tls`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain (leaf first).
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}
