//! The HTTP listener: one port for `GET /health`, `GET /metrics`, WebSocket upgrades on any
//! path, and the long-poll endpoints under `/lp/`.

use super::long_poll::{self, LongPoll};
use crate::server::connection::Peer;
use crate::server::Server;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE, COOKIE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long an HTTP connection may take to send its request headers.
pub const HTTP_HEADER_READ_TIMEOUT_MS: u64 = 10_000;

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

/// Accepts connections until shutdown starts.
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    serve_with(listener, server, ServeOptions::default()).await;
}

/// [`serve`] with options.
pub async fn serve_with(listener: TcpListener, server: Arc<Server>, options: ServeOptions) {
    let long_poll = LongPoll::new(server.clone(), options.peer_observer.clone());
    let permits = Arc::new(Semaphore::new(server.config.limits.connections_max));
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
        let permit = permits.clone().try_acquire_owned().ok();
        let server = server.clone();
        let long_poll = long_poll.clone();
        let observer = options.peer_observer.clone();
        tokio::spawn(async move {
            let over_limit = permit.is_none();
            let service = service_fn(move |request: Request<Incoming>| {
                let server = server.clone();
                let long_poll = long_poll.clone();
                let observer = observer.clone();
                async move {
                    if long_poll::is_long_poll_path(request.uri().path())
                        && !super::ws::is_upgrade(&request)
                    {
                        let response = long_poll.handle(request, remote, over_limit).await;
                        return Ok::<_, Infallible>(response);
                    }
                    Ok(route(request, server, remote, over_limit, observer))
                }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_millis(HTTP_HEADER_READ_TIMEOUT_MS));
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(error) = connection.await {
                tracing::debug!(%error, "http connection ended with an error");
            }
            drop(permit);
        });
    }
}

fn route(
    request: Request<Incoming>,
    server: Arc<Server>,
    remote: SocketAddr,
    over_limit: bool,
    observer: Option<PeerObserver>,
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
        let peer = peer_from_headers(request.headers(), remote, "ws");
        if let Some(observer) = &observer {
            observer(&peer);
        }
        return super::ws::upgrade(request, server, peer);
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
