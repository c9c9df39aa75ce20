//! The HTTP listener: one port for `GET /health`, `GET /metrics`, WebSocket upgrades on any
//! path, and the long-poll endpoints under `/lp/`.

use super::common::{self, ErrorCode, HttpError, PeerObserver, Rejection, Surface};
use super::long_poll::{self, LongPoll};
use crate::server::Server;
use dashmap::DashMap;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

/// How long an HTTP connection may take to send its request headers.
pub const HTTP_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Accepted connections whose first HTTP request is being read at once. Each holds hyper's
/// read buffer (8-16 KiB) until then; in a reconnect storm thousands of sockets arrive
/// together, and without this bound those buffers, not the connections, set the memory
/// peak. Connections beyond it wait (accepted, with no buffer) for their turn.
pub const HTTP_FIRST_REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Pending connections the kernel queues for `accept` (tokio's default is 128; a reconnect
/// storm overflows that, and dropped SYNs cost clients 1 s retransmission delays).
pub const LISTEN_BACKLOG_MAX: u32 = 4_096;
/// Pause after a failed `accept` (out of file descriptors, say), so that the loop waits for
/// connections to close instead of spinning on the error.
pub const ACCEPT_ERROR_BACKOFF_MS: u64 = 50;
/// How long a TLS handshake may take.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// The `Content-Type` of `GET /metrics`: Prometheus' text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

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

/// Options of [`serve_with`].
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// Called with every new peer (WebSocket upgrades and long-poll sessions).
    pub peer_observer: Option<PeerObserver>,
}

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

/// Binds `addr` with a listen backlog of `LISTEN_BACKLOG_MAX`.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG_MAX)
}

/// Accepts connections until shutdown starts.
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    serve_with(listener, server, ServeOptions::default()).await;
}

/// [`serve`] with options.
pub async fn serve_with(listener: TcpListener, server: Arc<Server>, options: ServeOptions) {
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
    let shared = Shared {
        long_poll: LongPoll::new(server.clone(), options.peer_observer.clone()),
        permits: Arc::new(Semaphore::new(server.config.limits.connections_max)),
        first_requests: Arc::new(Semaphore::new(HTTP_FIRST_REQUESTS_IN_FLIGHT_MAX)),
        addresses: Arc::new(AddressCounts::default()),
        observer: options.peer_observer,
        server,
    };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shared.server.shut_down() => break,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                continue;
            }
        };
        if shared.server.is_shutting_down() {
            break;
        }
        let _ = stream.set_nodelay(true);
        tokio::spawn(shared.accepted(remote).serve_stream(stream, tls.clone()));
    }
}

/// What every connection of one listener shares.
struct Shared {
    server: Arc<Server>,
    /// The long-poll sessions of this listener.
    long_poll: Arc<LongPoll>,
    /// Bounds open connections (`connections_max`).
    permits: Arc<Semaphore>,
    /// Bounds the connections reading their first request (`HTTP_FIRST_REQUESTS_IN_FLIGHT_MAX`).
    first_requests: Arc<Semaphore>,
    /// Bounds open connections per address (`connections_per_address_max`).
    addresses: Arc<AddressCounts>,
    /// Sees every new peer (tests).
    observer: Option<PeerObserver>,
}

impl Shared {
    /// A connection from `remote`, holding its shares of the connection limits if they were
    /// free. One over a limit is still served, so that it gets a 503 instead of a reset.
    fn accepted(&self, remote: SocketAddr) -> Accepted {
        let global = self.permits.clone().try_acquire_owned().ok();
        let per_address_max = self.server.config.limits.connections_per_address_max;
        let address = self.addresses.enter(remote.ip(), per_address_max);
        let over_limit = global.is_none() || address.is_none();
        Accepted {
            server: self.server.clone(),
            long_poll: self.long_poll.clone(),
            observer: self.observer.clone(),
            remote,
            over_limit,
            slot: Arc::new(Held {
                _global: global,
                _address: address,
            }),
            first_requests: self.first_requests.clone(),
        }
    }
}

/// One accepted TCP (or TLS) connection.
struct Accepted {
    server: Arc<Server>,
    long_poll: Arc<LongPoll>,
    observer: Option<PeerObserver>,
    remote: SocketAddr,
    /// The connection is over `connections_max` or `connections_per_address_max`: it may
    /// use `/health` and the like, but may not open a Logux connection.
    over_limit: bool,
    /// Its shares of the connection limits, handed on to an upgraded socket.
    slot: Slot,
    /// Bounds the connections reading their first request (`HTTP_FIRST_REQUESTS_IN_FLIGHT_MAX`).
    first_requests: Arc<Semaphore>,
}

impl Accepted {
    /// Serves the TCP stream, after a TLS handshake when `tls` is set.
    async fn serve_stream(self, stream: TcpStream, tls: Option<TlsAcceptor>) {
        let Some(acceptor) = tls else {
            return self.serve(stream).await;
        };
        let handshake = tokio::time::timeout(
            Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS),
            acceptor.accept(stream),
        );
        match handshake.await {
            Ok(Ok(stream)) => self.serve(stream).await,
            Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
            Err(_) => tracing::debug!("TLS handshake timed out"),
        }
    }

    /// Serves HTTP/1.1 on `io`, with upgrades.
    async fn serve<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // Held until the first request's head is read; the semaphore is never closed.
        let first_request = Arc::new(std::sync::Mutex::new(
            self.first_requests.clone().acquire_owned().await.ok(),
        ));
        let connection = Arc::new(self);
        let service = service_fn(move |request: Request<Incoming>| {
            if let Ok(mut permit) = first_request.lock() {
                permit.take();
            }
            let connection = connection.clone();
            async move { Ok::<_, Infallible>(connection.answer(request).await) }
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

    /// Answers one request of this connection.
    async fn answer(&self, request: Request<Incoming>) -> Response<String> {
        let path = request.uri().path();
        if super::api::is_api_path(path) {
            return super::api::handle(request, self.server.clone()).await;
        }
        if long_poll::is_long_poll_path(path) && !super::ws::is_upgrade(&request) {
            return self
                .long_poll
                .handle(request, self.remote, self.over_limit)
                .await;
        }
        self.route(request)
            .unwrap_or_else(|error| error.into_response(Surface::Listener))
    }

    /// Answers the listener's own endpoints and WebSocket upgrades.
    fn route(&self, request: Request<Incoming>) -> Result<Response<String>, HttpError> {
        let server = &self.server;
        if server.is_shutting_down() {
            // Every path, `/health` included, so that load balancers stop sending clients.
            return Err(HttpError::new(
                ErrorCode::Unavailable,
                "the server is shutting down",
            ));
        }
        if super::ws::is_upgrade(&request) {
            return self.upgrade(request);
        }
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/health") => Ok(common::plain(StatusCode::OK, "Ferry: OK\n")),
            (&Method::GET, "/ready") => match server.readiness() {
                Ok(()) => Ok(common::plain(StatusCode::OK, "Ferry: ready\n")),
                Err(why) => Ok(common::plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("Ferry: not ready: {why}\n"),
                )),
            },
            (&Method::GET, "/metrics") => {
                let mut response = common::plain(StatusCode::OK, &server.render_metrics());
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(PROMETHEUS_TEXT),
                );
                Ok(response)
            }
            (&Method::GET, "/") => Ok(common::plain(
                StatusCode::OK,
                "Ferry, a Logux sync server. Connect a Logux client over WebSocket to this address.\n",
            )),
            _ => Err(HttpError::new(ErrorCode::NotFound, "not found")),
        }
    }

    /// Admits a WebSocket upgrade and hands the socket to `ws`.
    fn upgrade(&self, request: Request<Incoming>) -> Result<Response<String>, HttpError> {
        let server = &self.server;
        common::admit(server, self.over_limit)?;
        if !origin_allowed(&server.config.allowed_origins, request.headers()) {
            Rejection::Origin.count(&server.metrics);
            return Err(HttpError::new(ErrorCode::Forbidden, "origin not allowed"));
        }
        let peer = common::peer_from_headers(
            request.headers(),
            self.remote,
            super::ws::TRANSPORT,
            self.observer.as_ref(),
        );
        super::ws::upgrade(request, server.clone(), peer, self.slot.clone())
    }
}
