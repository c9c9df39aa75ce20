//! Opening WebSocket connections to a loopback server: the URL check, the pool of loopback
//! source addresses, and the TCP connect + HTTP upgrade with small buffers.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

/// A client WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Initial read buffer of one client socket (tungstenite's default is 128 KiB, which would
/// be 2 GB at 15,000 connections). It grows for larger frames.
pub const WS_READ_BUFFER_BYTES: usize = 4 * 1024;
/// Bytes gathered before a write reaches the socket; every batch is flushed anyway.
pub const WS_WRITE_BUFFER_BYTES: usize = 8 * 1024;
/// Largest frame accepted from a server (a catch-up or history `sync` can be large).
pub const WS_MESSAGE_BYTES_MAX: usize = 64 << 20;
/// Largest outgoing backlog before writes fail instead of buffering more.
pub const WS_WRITE_BACKLOG_BYTES_MAX: usize = 64 << 20;

/// Where to connect, checked to be loopback.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given, used for the upgrade request.
    pub url: String,
    /// The server address.
    pub addr: SocketAddrV4,
}

/// Parses `ws://HOST[:PORT][/path]` and refuses anything but an IPv4 loopback host.
pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url.strip_prefix("ws://").ok_or_else(|| {
        format!("--url {url:?}: only ws:// URLs are supported (no TLS on loopback)")
    })?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(format!("--url {url:?}: user info is not supported"));
    }
    if authority.starts_with('[') {
        return Err(format!(
            "--url {url:?}: IPv6 is not supported; use 127.0.0.1 (several IPv4 loopback source \
             addresses are how ferry-bench gets past the ephemeral port limit)"
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("--url {url:?}: bad port {port:?}"))?,
        ),
        None => (authority, 80),
    };
    let ip = if host.eq_ignore_ascii_case("localhost") {
        Ipv4Addr::LOCALHOST
    } else {
        host.parse::<Ipv4Addr>()
            .map_err(|_| format!("--url {url:?}: host {host:?} is not an IPv4 address"))?
    };
    if !ip.is_loopback() {
        return Err(format!(
            "--url {url:?}: refusing non-loopback address {ip}; ferry-bench only drives servers \
             on this machine"
        ));
    }
    let url = if rest.len() == authority.len() {
        format!("{url}/")
    } else {
        url.to_owned()
    };
    Ok(Target {
        url,
        addr: SocketAddrV4::new(ip, port),
    })
}

/// Loopback source addresses 127.0.0.1 .. 127.0.0.N, used in turn.
///
/// Each source address has its own range of ephemeral ports (28,232 here), and a port stays
/// taken for 60 s in TIME_WAIT after the side that closed first. Moving to the next address
/// every `rotate_every` connections, and at once on `EADDRNOTAVAIL`/`EADDRINUSE`, keeps
/// repeated storms from running out of ports.
#[derive(Debug)]
pub struct SourcePool {
    /// The addresses.
    addrs: Vec<Ipv4Addr>,
    /// Connections per address before moving on.
    rotate_every: u64,
    /// Connections handed out so far.
    count: AtomicU64,
    /// Extra steps taken because an address ran out of ports.
    bump: AtomicUsize,
}

impl SourcePool {
    /// `count` addresses from 127.0.0.1 (at most 254).
    pub fn new(count: u8, rotate_every: u64) -> SourcePool {
        let count = count.clamp(1, 254);
        SourcePool {
            addrs: (1..=count).map(|n| Ipv4Addr::new(127, 0, 0, n)).collect(),
            rotate_every: rotate_every.max(1),
            count: AtomicU64::new(0),
            bump: AtomicUsize::new(0),
        }
    }

    /// How many addresses the pool has.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// The address for the next connection.
    fn pick(&self) -> Ipv4Addr {
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        let step = (n / self.rotate_every) as usize + self.bump.load(Ordering::Relaxed);
        self.addrs[step % self.addrs.len()]
    }

    /// `addr` ran out of ports: move every later connection on to the next address.
    fn exhausted(&self, addr: Ipv4Addr) {
        let n = self.count.load(Ordering::Relaxed);
        let step = (n / self.rotate_every) as usize + self.bump.load(Ordering::Relaxed);
        if self.addrs[step % self.addrs.len()] == addr {
            self.bump.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Times an address was skipped because it ran out of ports.
    pub fn exhaustions(&self) -> usize {
        self.bump.load(Ordering::Relaxed)
    }
}

/// Why a connection could not be opened. `kind()` names it in the error counts.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Nothing listens (or the listen queue refused us).
    #[error("connection refused")]
    Refused,
    /// The TCP connect or the upgrade took longer than the connect timeout.
    #[error("connect timed out")]
    Timeout,
    /// Every source address is out of ephemeral ports.
    #[error("no loopback source address has a free port")]
    AddrExhausted,
    /// The connection was reset or closed during the upgrade.
    #[error("connection reset during the upgrade")]
    Reset,
    /// Another socket error.
    #[error("socket error: {0}")]
    Io(std::io::Error),
    /// The server answered the upgrade with an HTTP status other than 101.
    #[error("upgrade refused with HTTP {status}")]
    Http {
        /// The status.
        status: u16,
        /// `Retry-After` in seconds, if the server sent one.
        retry_after_s: Option<u64>,
    },
    /// Another WebSocket handshake failure.
    #[error("websocket handshake failed: {0}")]
    Handshake(String),
}

impl OpenError {
    /// The key under which this failure is counted.
    pub fn kind(&self) -> String {
        match self {
            OpenError::Refused => "connect:refused".into(),
            OpenError::Timeout => "connect:timeout".into(),
            OpenError::AddrExhausted => "connect:no_source_port".into(),
            OpenError::Reset => "connect:reset".into(),
            OpenError::Io(e) => format!("connect:io:{:?}", e.kind()),
            OpenError::Http { status, .. } => format!("upgrade:http_{status}"),
            OpenError::Handshake(_) => "upgrade:failed".into(),
        }
    }
}

fn is_port_shortage(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::AddrNotAvailable | ErrorKind::AddrInUse
    )
}

fn io_error(error: std::io::Error) -> OpenError {
    match error.kind() {
        ErrorKind::ConnectionRefused => OpenError::Refused,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::UnexpectedEof => {
            OpenError::Reset
        }
        ErrorKind::TimedOut => OpenError::Timeout,
        _ => OpenError::Io(error),
    }
}

/// Opens client WebSockets to the target from the source pool.
#[derive(Debug)]
pub struct Connector {
    /// The server.
    pub target: Target,
    /// Source addresses (shared by the connectors of one run).
    pub sources: std::sync::Arc<SourcePool>,
    /// Deadline for the TCP connect plus the HTTP upgrade.
    pub connect_timeout: Duration,
}

impl Connector {
    /// The tungstenite settings for client sockets: small buffers, large frames allowed.
    fn ws_config() -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER_BYTES)
            .write_buffer_size(WS_WRITE_BUFFER_BYTES)
            .max_write_buffer_size(WS_WRITE_BACKLOG_BYTES_MAX)
            .max_message_size(Some(WS_MESSAGE_BYTES_MAX))
            .max_frame_size(Some(WS_MESSAGE_BYTES_MAX))
    }

    /// One TCP connect + upgrade, from a loopback source address bound here.
    pub async fn open(&self) -> Result<Ws, OpenError> {
        tokio::time::timeout(self.connect_timeout, self.open_inner())
            .await
            .unwrap_or(Err(OpenError::Timeout))
    }

    async fn open_inner(&self) -> Result<Ws, OpenError> {
        let mut stream = None;
        // Try each source address at most once when ports run short.
        for _ in 0..self.sources.len() {
            let source = self.sources.pick();
            let socket = TcpSocket::new_v4().map_err(OpenError::Io)?;
            if let Err(error) = socket.bind(SocketAddr::new(source.into(), 0)) {
                if is_port_shortage(&error) {
                    self.sources.exhausted(source);
                    continue;
                }
                return Err(OpenError::Io(error));
            }
            match socket.connect(SocketAddr::V4(self.target.addr)).await {
                Ok(connected) => {
                    stream = Some(connected);
                    break;
                }
                Err(error) if is_port_shortage(&error) => {
                    self.sources.exhausted(source);
                    continue;
                }
                Err(error) => return Err(io_error(error)),
            }
        }
        let stream = stream.ok_or(OpenError::AddrExhausted)?;
        let _ = stream.set_nodelay(true);
        match tokio_tungstenite::client_async_with_config(
            self.target.url.as_str(),
            stream,
            Some(Self::ws_config()),
        )
        .await
        {
            Ok((ws, _response)) => Ok(ws),
            Err(WsError::Http(response)) => Err(OpenError::Http {
                status: response.status().as_u16(),
                retry_after_s: response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok()),
            }),
            Err(WsError::Io(error)) => Err(io_error(error)),
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Err(OpenError::Reset),
            Err(WsError::Protocol(error)) if error.to_string().contains("closed") => {
                Err(OpenError::Reset)
            }
            Err(other) => Err(OpenError::Handshake(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_ws_urls_are_accepted() {
        let t = parse_url("ws://127.0.0.1:31337/").expect("loopback");
        assert_eq!(t.addr.to_string(), "127.0.0.1:31337");
        assert_eq!(t.url, "ws://127.0.0.1:31337/");
        let t = parse_url("ws://localhost:9").expect("localhost");
        assert_eq!(t.addr.to_string(), "127.0.0.1:9");
        assert_eq!(t.url, "ws://localhost:9/");
        assert!(parse_url("ws://127.1.2.3:5/x").is_ok());
        assert!(parse_url("ws://10.0.0.1:31337/").is_err());
        assert!(parse_url("ws://example.com/").is_err());
        assert!(parse_url("wss://127.0.0.1/").is_err());
        assert!(parse_url("http://127.0.0.1/").is_err());
        assert!(parse_url("ws://[::1]:5/").is_err());
    }

    #[test]
    fn sources_rotate_and_skip_exhausted_addresses() {
        let pool = SourcePool::new(3, 2);
        let picks: Vec<_> = (0..6).map(|_| pool.pick().octets()[3]).collect();
        assert_eq!(picks, [1, 1, 2, 2, 3, 3]);
        let next = pool.pick();
        assert_eq!(next.octets()[3], 1);
        pool.exhausted(next);
        assert_eq!(pool.pick().octets()[3], 2);
        assert_eq!(pool.exhaustions(), 1);
    }
}
