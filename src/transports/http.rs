//! The HTTP listener: one port for `GET /health`, `GET /metrics`, WebSocket upgrades on any
//! path, and the long-poll endpoints under `/lp/`.

use super::long_poll::{self, LongPoll};
use crate::peer::Peer;
use crate::server::Server;
use dashmap::DashMap;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE, COOKIE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long an HTTP connection may take to send its request headers.
pub const HTTP_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Accepted connections whose first HTTP request is being read at once. Each holds hyper's
/// read buffer (8-16 KiB) until then; in a reconnect storm thousands of sockets arrive
/// together, and without this bound those buffers, not the connections, set the memory
/// peak. Connections beyond it wait (accepted, with no buffer) for their turn.
pub const HTTP_FIRST_REQUESTS_IN_FLIGHT_MAX: usize = 256;

/// True when the request's `Origin` may open a WebSocket: no allow-list, no `Origin`
/// header (not a browser), or an origin on the list.
pub fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    match headers
        .get(hyper::header::ORIGIN)
        .map(|value| value.to_str())
    {
        None => true,
        Some(Ok(origin)) => allowed.iter().any(|entry| entry == origin || entry == "*"),
        Some(Err(_)) => false,
    }
}

/// A plain-text response.
pub fn plain(status: StatusCode, body: &str) -> Response<String> {
    let mut response = Response::new(body.to_owned());
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A 503 with a jittered `Retry-After`: Logux clients back off further after a refused
/// upgrade than after a closed socket.
pub fn busy(body: &str) -> Response<String> {
    let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, body);
    let seconds = crate::server::admission::Admission::retry_after_seconds();
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response
            .headers_mut()
            .insert(hyper::header::RETRY_AFTER, value);
    }
    response
}

/// Sees every `Peer` a transport creates, before its connection starts: a seam for tests that
/// check what reaches auth.
pub type PeerObserver = Arc<dyn Fn(&Peer) + Send + Sync>;

/// Options of [`serve_with`].
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// Called with every new peer (WebSocket upgrades and long-poll sessions).
    pub peer_observer: Option<PeerObserver>,
}

/// The `Peer` of a connection opened by a request with these headers: the TCP address, every
/// header whose value is visible ASCII, and the cookies of the `Cookie` headers.
pub fn peer_from_headers(headers: &HeaderMap, remote: SocketAddr, transport: &'static str) -> Peer {
    let list = headers
        .iter()
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    let cookies = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            let name = name.trim();
            let value = value.trim();
            // RFC 6265 allows a value in double quotes; the quotes are not part of it.
            let value = value
                .strip_prefix('"')
                .and_then(|inner| inner.strip_suffix('"'))
                .unwrap_or(value);
            (!name.is_empty()).then(|| (name.to_owned(), value.to_owned()))
        })
        .collect();
    let mut peer = Peer::new(remote.ip(), transport);
    peer.headers = Arc::new(list);
    peer.cookies = Arc::new(cookies);
    peer
}

/// Pending connections the kernel queues for `accept` (tokio's default is 128; a reconnect
/// storm overflows that, and dropped SYNs cost clients 1 s retransmission delays).
pub const LISTEN_BACKLOG: u32 = 4_096;

/// How long a TLS handshake may take.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Holds a connection's share of `connections_max` and of its address's
/// `connections_per_address_max` until the last clone is dropped.
pub type Slot = Arc<dyn Send + Sync>;

/// Counts open connections per IP address.
#[derive(Debug, Default)]
pub struct AddressCounts(DashMap<IpAddr, usize>);

/// One connection of one address; uncounts itself on drop.
struct AddressGuard {
    counts: Arc<AddressCounts>,
    addr: IpAddr,
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        if let Some(mut count) = self.counts.0.get_mut(&self.addr) {
            *count = count.saturating_sub(1);
        }
        self.counts.0.remove_if(&self.addr, |_, count| *count == 0);
    }
}

impl AddressCounts {
    /// Counts a new connection from `addr`, unless it already has `max`.
    fn enter(self: &Arc<Self>, addr: IpAddr, max: usize) -> Option<AddressGuard> {
        let mut count = self.0.entry(addr).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressGuard {
            counts: Arc::clone(self),
            addr,
        })
    }
}

/// What a connection holds while it is open.
struct Held {
    _global: Option<OwnedSemaphorePermit>,
    _address: Option<AddressGuard>,
}

/// Binds `addr` with a listen backlog of `LISTEN_BACKLOG`.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts connections until shutdown starts.
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    serve_with(listener, server, ServeOptions::default()).await;
}

/// [`serve`] with options.
pub async fn serve_with(listener: TcpListener, server: Arc<Server>, options: ServeOptions) {
    let long_poll = LongPoll::new(server.clone(), options.peer_observer.clone());
    let permits = Arc::new(Semaphore::new(server.config.limits.connections_max));
    let first_requests = Arc::new(Semaphore::new(HTTP_FIRST_REQUESTS_IN_FLIGHT_MAX));
    let addresses = Arc::new(AddressCounts::default());
    let per_address_max = server.config.limits.connections_per_address_max;
    let tls = match &server.config.tls {
        Some(settings) => match super::tls::acceptor(&settings.cert, &settings.key) {
            Ok(acceptor) => Some(acceptor),
            Err(error) => {
                tracing::error!(%error, "TLS is configured but cannot be set up; not serving");
                return;
            }
        },
        None => None,
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = server.shut_down() => break,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and similar: wait a little instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if server.is_shutting_down() {
            break;
        }
        let _ = stream.set_nodelay(true);
        let global = permits.clone().try_acquire_owned().ok();
        let address = addresses.enter(remote.ip(), per_address_max);
        let over_limit = global.is_none() || address.is_none();
        let slot: Slot = Arc::new(Held {
            _global: global,
            _address: address,
        });
        let connection = Accepted {
            server: server.clone(),
            long_poll: long_poll.clone(),
            observer: options.peer_observer.clone(),
            remote,
            over_limit,
            slot,
            first_requests: first_requests.clone(),
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => connection.serve(stream).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS),
                        acceptor.accept(stream),
                    );
                    match handshake.await {
                        Ok(Ok(stream)) => connection.serve(stream).await,
                        Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// One accepted TCP (or TLS) connection.
struct Accepted {
    server: Arc<Server>,
    long_poll: Arc<LongPoll>,
    observer: Option<PeerObserver>,
    remote: SocketAddr,
    over_limit: bool,
    slot: Slot,
    /// Bounds the connections reading their first request (`HTTP_FIRST_REQUESTS_IN_FLIGHT_MAX`).
    first_requests: Arc<Semaphore>,
}

impl Accepted {
    /// Serves HTTP/1.1 on `io`, with upgrades.
    async fn serve<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Accepted {
            server,
            long_poll,
            observer,
            remote,
            over_limit,
            slot,
            first_requests,
        } = self;
        // Held until the first request's head is read; the semaphore is never closed.
        let first_request = Arc::new(std::sync::Mutex::new(
            first_requests.acquire_owned().await.ok(),
        ));
        let service = service_fn(move |request: Request<Incoming>| {
            if let Ok(mut permit) = first_request.lock() {
                permit.take();
            }
            let server = server.clone();
            let long_poll = long_poll.clone();
            let observer = observer.clone();
            let slot = slot.clone();
            async move {
                if super::api::is_api_path(request.uri().path()) {
                    return Ok(super::api::handle(request, server).await);
                }
                if long_poll::is_long_poll_path(request.uri().path())
                    && !super::ws::is_upgrade(&request)
                {
                    let response = long_poll.handle(request, remote, over_limit).await;
                    return Ok::<_, Infallible>(response);
                }
                Ok(route(request, server, remote, over_limit, observer, slot))
            }
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_millis(HTTP_HEADER_READ_TIMEOUT_MS));
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        if let Err(error) = connection.await {
            tracing::debug!(%error, "http connection ended with an error");
        }
    }
}

fn route(
    request: Request<Incoming>,
    server: Arc<Server>,
    remote: SocketAddr,
    over_limit: bool,
    observer: Option<PeerObserver>,
    slot: Slot,
) -> Response<String> {
    if server.is_shutting_down() {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "The server is shutting down\n",
        );
    }
    if super::ws::is_upgrade(&request) {
        if over_limit {
            server
                .metrics
                .rejections
                .with_label_values(&["connections_max"])
                .inc();
            return busy("Too many connections\n");
        }
        if server.admission.is_full() {
            server
                .metrics
                .rejections
                .with_label_values(&["waiting_room_full"])
                .inc();
            return busy("The waiting room is full, retry later\n");
        }
        if !origin_allowed(&server.config.allowed_origins, request.headers()) {
            server
                .metrics
                .rejections
                .with_label_values(&["origin"])
                .inc();
            return plain(StatusCode::FORBIDDEN, "Origin not allowed\n");
        }
        let peer = peer_from_headers(request.headers(), remote, "ws");
        if let Some(observer) = &observer {
            observer(&peer);
        }
        return super::ws::upgrade(request, server, peer, slot);
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/health") => plain(StatusCode::OK, "Ferry: OK\n"),
        (&Method::GET, "/metrics") => {
            let mut response = plain(StatusCode::OK, &server.render_metrics());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (&Method::GET, "/") => plain(
            StatusCode::OK,
            "Ferry, a Logux sync server. Connect a Logux client over WebSocket to this address.\n",
        ),
        _ => plain(StatusCode::NOT_FOUND, "Not found\n"),
    }
}
