//! WebSocket transport: upgrades an HTTP request and adapts the socket to the connection's
//! frame stream and sink.

use super::common::{self, HttpError};
use crate::peer::Peer;
use crate::protocol::ProtocolError;
use crate::server::connection::{self, Inbound};
use crate::server::Server;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::upgrade::Parts;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The `"transport"` of WebSocket peers in logs and metrics.
pub const TRANSPORT: &str = "ws";
/// Initial read buffer per connection; tungstenite's 128 KiB default costs over 1 GiB at
/// 10,000 connections. It grows for large frames.
pub const WS_READ_BUFFER_BYTES: usize = 512;
/// Bytes gathered before a write reaches the socket (frames are flushed per batch anyway).
pub const WS_WRITE_BUFFER_BYTES: usize = 8 * 1024;
/// Largest frames' worth of bytes that may wait to be written to one socket: room for a frame
/// of `frame_bytes_max` while the previous one is still being written.
pub const WS_PENDING_WRITE_FRAMES_MAX: usize = 2;
/// The least of that cap, so that small `frame_bytes_max` settings do not turn batches of
/// small frames into write errors.
pub const WS_PENDING_WRITE_BYTES_MIN: usize = 1024 * 1024;

/// True when the request asks for a WebSocket upgrade.
pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    let has_token = |name, token: &str| {
        request
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|part| part.trim().eq_ignore_ascii_case(token))
    };
    has_token(UPGRADE, "websocket") && has_token(CONNECTION, "upgrade")
}

/// Answers the upgrade with 101 and runs the Logux connection on the upgraded socket. `peer`
/// carries the upgrade request's address, headers and cookies.
pub fn upgrade(
    request: Request<Incoming>,
    server: Arc<Server>,
    peer: Peer,
    slot: super::http::Slot,
) -> Result<Response<String>, HttpError> {
    let Some(key) = request.headers().get(SEC_WEBSOCKET_KEY) else {
        return Err(HttpError::bad_request("missing Sec-WebSocket-Key"));
    };
    let accept = derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        // The connection counts against `connections_max` and the per-address limit for as
        // long as this task runs.
        let _slot = slot;
        let upgraded = match hyper::upgrade::on(request).await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "websocket upgrade failed");
                return;
            }
        };
        // Take the socket back from hyper: its 8 KiB HTTP read buffer would otherwise stay
        // allocated for the connection's lifetime (shared by the upgrade's leftover bytes),
        // which is most of an idle connection's memory.
        // The connection future is boxed once here, so this task's own state stays small.
        let connection = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => reclaimed(parts, server, peer),
            Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
                Ok(parts) => reclaimed(parts, server, peer),
                Err(upgraded) => Box::pin(serve_socket(
                    TokioIo::new(upgraded),
                    Vec::new(),
                    server,
                    peer,
                )),
            },
        };
        connection.await;
    });
    let mut response = common::empty(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept) {
        headers.insert(SEC_WEBSOCKET_ACCEPT, value);
    }
    Ok(response)
}

type Served = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The connection over the socket hyper gave back, with the bytes hyper read past the upgrade
/// request copied out so that hyper's read buffer is freed now.
fn reclaimed<T>(parts: Parts<TokioIo<T>>, server: Arc<Server>, peer: Peer) -> Served
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Parts { io, read_buf, .. } = parts;
    let read = read_buf.to_vec();
    drop(read_buf);
    Box::pin(serve_socket(io.into_inner(), read, server, peer))
}

/// Runs the Logux connection over an upgraded socket; `read` holds bytes the HTTP layer read
/// past the upgrade request.
async fn serve_socket<T>(io: T, read: Vec<u8>, server: Arc<Server>, peer: Peer)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let frame_bytes_max = server.config.limits.frame_bytes_max;
    let config = WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_write_buffer_size(
            frame_bytes_max
                .saturating_mul(WS_PENDING_WRITE_FRAMES_MAX)
                .max(WS_PENDING_WRITE_BYTES_MIN),
        )
        .max_message_size(Some(frame_bytes_max))
        .max_frame_size(Some(frame_bytes_max));
    let socket = if read.is_empty() {
        WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await
    } else {
        WebSocketStream::from_partially_read(io, read, Role::Server, Some(config)).await
    };
    let (sink, stream) = socket.split();
    // A close frame or a read error ends the stream; control frames are skipped.
    let incoming = stream
        .map(move |message| step(message, frame_bytes_max))
        .take_while(|step| std::future::ready(!matches!(step, Step::End)))
        .filter_map(|step| async move {
            match step {
                Step::Frame(inbound) => Some(inbound),
                Step::Skip | Step::End => None,
            }
        });
    // Type-erased, so that the connection code is compiled once for every socket type.
    let incoming: IncomingFrames = Box::pin(incoming);
    let outgoing: OutgoingFrames = Box::pin(
        sink.with(|frame: String| async move { Ok::<_, WsError>(Message::Text(frame.into())) }),
    );
    connection::run(server, incoming, outgoing, peer).await;
}

type IncomingFrames = std::pin::Pin<Box<dyn futures_util::Stream<Item = Inbound> + Send>>;
type OutgoingFrames = std::pin::Pin<Box<dyn futures_util::Sink<String, Error = WsError> + Send>>;

/// One read from the socket, as the connection sees it.
enum Step {
    Frame(Inbound),
    Skip,
    End,
}

fn step(message: Result<Message, WsError>, frame_bytes_max: usize) -> Step {
    match message {
        Ok(Message::Text(text)) => Step::Frame(Inbound::Text(text.to_string())),
        Ok(Message::Binary(bytes)) => Step::Frame(match String::from_utf8(bytes.to_vec()) {
            Ok(text) => Inbound::Text(text),
            Err(_) => Inbound::Invalid(ProtocolError::wrong_format("binary frame is not UTF-8")),
        }),
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Step::Skip,
        Ok(Message::Close(_)) => Step::End,
        Err(WsError::Capacity(CapacityError::MessageTooLong { size, .. })) => {
            Step::Frame(Inbound::Invalid(ProtocolError::wrong_format(&format!(
                "frame of {size} bytes is over the limit of {frame_bytes_max} bytes"
            ))))
        }
        Err(WsError::Utf8(_)) => Step::Frame(Inbound::Invalid(ProtocolError::wrong_format(
            "text frame is not UTF-8",
        ))),
        Err(error) => {
            tracing::debug!(%error, "websocket read failed");
            Step::End
        }
    }
}
