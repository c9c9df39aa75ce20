//! The HTTP listener: one port for `GET /health`, WebSocket upgrades on any path, and (later)
//! metrics and long-poll endpoints.

use crate::server::Server;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
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

/// Accepts connections until shutdown starts.
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    let permits = Arc::new(Semaphore::new(server.config.limits.connections_max));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = server.shutdown_signal.notified() => break,
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
        tokio::spawn(async move {
            let over_limit = permit.is_none();
            let service = service_fn(move |request| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(route(request, server, remote, over_limit)) }
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
        return super::ws::upgrade(request, server, remote);
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
