//! WebSocket transport: upgrades an HTTP request and adapts the socket to the connection's
//! frame stream and sink.

use super::common::{self, HttpError};
use crate::peer::Peer;
use crate::protocol::ProtocolError;
use crate::server::connection::{self, Inbound};
use crate::server::Server;
use bytes::Bytes;
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
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, Utf8Bytes};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The `"transport"` of WebSocket peers in logs and metrics.
pub const TRANSPORT: &str = "ws";
/// Initial read buffer per connection; tungstenite's 128 KiB default costs over 1 GiB at
/// 10,000 connections. It grows for large frames.
pub const WS_READ_BUFFER_BYTES: usize = 512;
/// Bytes gathered before a write reaches the socket (frames are flushed per batch anyway).
/// The write buffer keeps the capacity it once needed, about this plus one frame
/// (`WS_SEND_FRAME_BYTES_MAX`), for the connection's lifetime.
pub const WS_WRITE_BUFFER_BYTES: usize = 4 * 1024;
/// Largest WebSocket frame sent: a longer message goes out as one text frame and continuation
/// frames of at most this size (clients join them; it is still one Logux message). tungstenite
/// copies every frame into the socket's write buffer, and that buffer keeps the capacity of
/// the largest one for the connection's lifetime. Unsplit, a subscription's history (tens of
/// KB) left the write buffers of 15,000 storming connections holding 8-12 KB each (heaptrack:
/// 121-180 MB); split, with `WS_WRITE_BUFFER_BYTES` at 4 KiB, 4.5 KB each (67 MB).
pub const WS_SEND_FRAME_BYTES_MAX: usize = 4 * 1024;
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
    let outgoing: OutgoingFrames = Box::pin(sink.with_flat_map(|frame: String| {
        futures_util::stream::iter(Fragments::new(frame, WS_SEND_FRAME_BYTES_MAX))
    }));
    connection::run(server, incoming, outgoing, peer).await;
}

type IncomingFrames = std::pin::Pin<Box<dyn futures_util::Stream<Item = Inbound> + Send>>;
type OutgoingFrames = std::pin::Pin<Box<dyn futures_util::Sink<String, Error = WsError> + Send>>;

/// The WebSocket frames of one text message: the message itself when it has at most `max`
/// bytes, otherwise a text frame and continuation frames of at most `max` bytes each (cut at
/// character boundaries, so each frame is UTF-8 on its own too), the last one final.
struct Fragments {
    text: Bytes,
    /// Bytes of `text` already in frames.
    sent: usize,
    max: usize,
}

impl Fragments {
    fn new(text: String, max: usize) -> Fragments {
        Fragments {
            text: Bytes::from(text),
            sent: 0,
            max: max.max(MAX_UTF8_CHAR_BYTES),
        }
    }
}

/// Longest UTF-8 encoding of one character.
const MAX_UTF8_CHAR_BYTES: usize = 4;

impl Iterator for Fragments {
    type Item = Result<Message, WsError>;

    fn next(&mut self) -> Option<Self::Item> {
        let len = self.text.len();
        if self.sent == 0 && len <= self.max {
            self.sent = len.max(1);
            let text = std::mem::take(&mut self.text);
            return Some(Ok(match Utf8Bytes::try_from(text) {
                Ok(text) => Message::Text(text),
                // Never: the bytes came from a `String`.
                Err(_) => Message::Text(Utf8Bytes::default()),
            }));
        }
        if self.sent >= len {
            return None;
        }
        let mut end = (self.sent + self.max).min(len);
        // Back to the start of a character (at most 3 continuation bytes).
        while end < len && end > self.sent + 1 && (self.text[end] & 0xC0) == 0x80 {
            end -= 1;
        }
        let opcode = if self.sent == 0 {
            OpCode::Data(OpData::Text)
        } else {
            OpCode::Data(OpData::Continue)
        };
        let payload = self.text.slice(self.sent..end);
        self.sent = end;
        Some(Ok(Message::Frame(Frame::message(
            payload,
            opcode,
            end == len,
        ))))
    }
}

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The frames of `text` cut at `max`: (opcode, final, payload).
    fn frames_of(text: &str, max: usize) -> Vec<(OpCode, bool, Vec<u8>)> {
        Fragments::new(text.to_owned(), max)
            .map(|message| match message.expect("a frame") {
                Message::Text(text) => (OpCode::Data(OpData::Text), true, text.as_bytes().to_vec()),
                Message::Frame(frame) => (
                    frame.header().opcode,
                    frame.header().is_final,
                    frame.payload().to_vec(),
                ),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_long_message_goes_out_in_frames_of_at_most_the_limit_cut_between_characters() {
        // 3-byte characters, so a cut at a multiple of 4096 would split one.
        let text = format!("[\"sync\",1,\"{}\"]", "語".repeat(5_000));
        let frames = frames_of(&text, WS_SEND_FRAME_BYTES_MAX);
        assert!(frames.len() >= 4, "{} frames", frames.len());
        let last = frames.len() - 1;
        for (i, (opcode, is_final, payload)) in frames.iter().enumerate() {
            let expected = if i == 0 {
                OpCode::Data(OpData::Text)
            } else {
                OpCode::Data(OpData::Continue)
            };
            assert_eq!(*opcode, expected, "frame {i}");
            assert_eq!(*is_final, i == last, "frame {i}");
            assert!(payload.len() <= WS_SEND_FRAME_BYTES_MAX, "frame {i}");
            assert!(
                std::str::from_utf8(payload).is_ok(),
                "frame {i} cuts a character"
            );
        }
        let joined: Vec<u8> = frames.into_iter().flat_map(|(_, _, p)| p).collect();
        assert_eq!(joined, text.as_bytes());
    }

    #[test]
    fn a_message_within_the_limit_is_one_text_message() {
        for text in ["", r#"["pong",0]"#, &"x".repeat(WS_SEND_FRAME_BYTES_MAX)] {
            assert_eq!(
                frames_of(text, WS_SEND_FRAME_BYTES_MAX),
                vec![(OpCode::Data(OpData::Text), true, text.as_bytes().to_vec())]
            );
        }
    }
}
