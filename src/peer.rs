//! What transports know about the other end of a connection, for authentication and
//! back-end hooks. A leaf module: it imports nothing of the crate.

use std::net::IpAddr;
use std::sync::Arc;

/// Facts about the peer that transports know and auth may use.
#[derive(Clone)]
pub struct Peer {
    /// The TCP peer address (proxies' `X-Forwarded-For` is not trusted).
    pub addr: IpAddr,
    /// `"ws"` or `"long-poll"`, for logs and metrics.
    pub transport: &'static str,
    /// Headers of the request that opened the connection (the WebSocket upgrade, the
    /// long-poll `open`), names lowercased, in order, so auth can use them like
    /// `@logux/server`'s `client.httpHeaders`. Values that are not visible ASCII are left out.
    pub headers: Arc<Vec<(String, String)>>,
    /// Cookies of that request's `Cookie` headers, `(name, value)` in order, so auth can use a
    /// session cookie like `@logux/server`'s authenticator does.
    pub cookies: Arc<Vec<(String, String)>>,
}

impl Peer {
    /// A peer known only by address (in-memory transports and tests).
    pub fn new(addr: IpAddr, transport: &'static str) -> Peer {
        Peer {
            addr,
            transport,
            headers: Arc::default(),
            cookies: Arc::default(),
        }
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The first value of cookie `name` (case-sensitive, as cookie names are).
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Shows header and cookie names only: their values may be credentials.
impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |list: &[(String, String)]| -> Vec<String> {
            list.iter().map(|(name, _)| name.clone()).collect()
        };
        f.debug_struct("Peer")
            .field("addr", &self.addr)
            .field("transport", &self.transport)
            .field("headers", &names(&self.headers))
            .field("cookies", &names(&self.cookies))
            .finish()
    }
}
