//! What the listener's HTTP surfaces share: answers with a body type, the one error type and
//! its rendering, the admission checks a new connection passes, refusal counting, body reading,
//! and the `Peer` of a request.
//!
//! The listener has three surfaces: its own endpoints and WebSocket upgrades (`http.rs`,
//! `ws.rs`), the long-poll endpoints under `/lp/` (`long_poll.rs`) and the server API under
//! `/api/` (`api.rs`).
//!
//! # Error answers
//!
//! Every refused request is an [`HttpError`], and [`HttpError::into_response`] is the only
//! place that turns one into a response. Its [`ErrorCode`] fixes the status and whether a
//! `Retry-After` goes with it (only [`ErrorCode::Busy`] has one). The body follows the
//! [`Surface`]; it is the one thing that differs, because each is a published contract:
//!
//! - `/lp/` (the long-poll client parses it): `application/json`
//!   `{"error": "<code>", "message": "<why>", ...details}`, `<code>` being [`ErrorCode::wire`];
//! - `/api/` (back-ends read `error` as the reason, README "Server API"): `application/json`
//!   `{"error": "<why>"}`;
//! - everything else (curl, Prometheus, a browser's failed WebSocket): `text/plain;
//!   charset=utf-8`, `<why>` and a newline.
//!
//! `<why>` is a lowercase sentence fragment that names what failed. Headers that belong to the
//! surface rather than to the error (CORS and `Cache-Control` on `/lp/`) are added by it.

use crate::metrics::Metrics;
use crate::peer::Peer;
use crate::server::Server;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, ALLOW, CONTENT_TYPE, COOKIE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;

/// The `Content-Type` of plain-text answers.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
/// The `Content-Type` of JSON answers.
pub const APPLICATION_JSON: &str = "application/json";

/// Sees every `Peer` a transport creates, before its connection starts: a seam for tests that
/// check what reaches auth.
pub type PeerObserver = Arc<dyn Fn(&Peer) + Send + Sync>;

/// An answer with `body` and a `Content-Type`.
fn with_type(status: StatusCode, body: String, content_type: &'static str) -> Response<String> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A plain-text answer.
pub fn plain(status: StatusCode, body: &str) -> Response<String> {
    with_type(status, body.to_owned(), TEXT_PLAIN)
}

/// A JSON answer; `body` is already serialized.
pub fn json(status: StatusCode, body: String) -> Response<String> {
    with_type(status, body, APPLICATION_JSON)
}

/// An answer without a body (`204`, `101`).
pub fn empty(status: StatusCode) -> Response<String> {
    let mut response = Response::new(String::new());
    *response.status_mut() = status;
    response
}

/// Which contract an error answer's body follows (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `/health`, `/metrics`, `/`, WebSocket upgrades and unknown paths: plain text.
    Listener,
    /// `/lp/`: JSON with a code and a message.
    LongPoll,
    /// `/api/`: JSON with the message as `error`.
    Api,
}

/// What kind of error an answer reports: it fixes the status, and its wire text is the
/// long-poll `error` code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// `400`: the request is malformed.
    BadRequest,
    /// `401`: the server API's credentials are missing or wrong.
    Unauthorized,
    /// `403`: the `Origin` is not allowed.
    Forbidden,
    /// `404`: no such endpoint.
    NotFound,
    /// `404`: the server API is not configured.
    Disabled,
    /// `405`: the endpoint wants another method (the error names it in `Allow`).
    MethodNotAllowed,
    /// `408`: the body did not arrive in time.
    Timeout,
    /// `409`: a long-poll `send` skips frames.
    Gap,
    /// `410`: the long-poll session does not exist (any more).
    Gone,
    /// `413`: the body is over its limit.
    TooLarge,
    /// `500`: stored data cannot be read back.
    Internal,
    /// `503` with `Retry-After`: a limit is reached; retry later.
    Busy,
    /// `503` without `Retry-After`: shutting down, or the log cannot serve now.
    Unavailable,
}

impl ErrorCode {
    /// The status of answers with this code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound | ErrorCode::Disabled => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Timeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::Gap => StatusCode::CONFLICT,
            ErrorCode::Gone => StatusCode::GONE,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Busy | ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The code's text in long-poll answers (README, "Long-poll transport").
    pub fn wire(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Disabled => "disabled",
            ErrorCode::MethodNotAllowed => "method-not-allowed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Gap => "gap",
            ErrorCode::Gone => "gone",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::Internal => "internal",
            ErrorCode::Busy => "busy",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// An HTTP error answer of any surface. Handlers return it; the surface renders it with
/// [`HttpError::into_response`], so a failure is always an answer and never tears down the
/// connection.
#[derive(Debug, thiserror::Error)]
#[error("{} ({}): {message}", code.status(), code.wire())]
pub struct HttpError {
    /// What kind of error it is: the status and `Retry-After`.
    code: ErrorCode,
    /// Why, for the client.
    message: String,
    /// The methods the endpoint accepts, for `405`'s `Allow`.
    allow: Option<&'static str>,
    /// More fields of a JSON body, after `error` and `message` (long-poll `gap`).
    details: Vec<(&'static str, Value)>,
}

impl HttpError {
    /// An error of kind `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> HttpError {
        HttpError {
            code,
            message: message.into(),
            allow: None,
            details: Vec::new(),
        }
    }

    /// A `400`.
    pub fn bad_request(message: impl Into<String>) -> HttpError {
        HttpError::new(ErrorCode::BadRequest, message)
    }

    /// A busy `503` with `Retry-After`.
    pub fn busy(busy: Busy) -> HttpError {
        HttpError::new(ErrorCode::Busy, busy.message())
    }

    /// Names the methods the endpoint accepts, in `Allow` (for a `405`).
    pub fn with_allow(mut self, allow: &'static str) -> HttpError {
        self.allow = Some(allow);
        self
    }

    /// Adds a field to a JSON body.
    pub fn with_detail(mut self, name: &'static str, value: impl Into<Value>) -> HttpError {
        self.details.push((name, value.into()));
        self
    }

    /// What kind of error it is.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The answer, with the body of `surface`.
    pub fn into_response(self, surface: Surface) -> Response<String> {
        let status = self.code.status();
        let mut response = match surface {
            Surface::Listener => plain(status, &format!("{}\n", self.message)),
            Surface::Api => json(
                status,
                serde_json::json!({ "error": self.message }).to_string(),
            ),
            Surface::LongPoll => {
                let mut body = serde_json::Map::new();
                body.insert("error".to_owned(), self.code.wire().into());
                body.insert("message".to_owned(), self.message.into());
                for (name, value) in self.details {
                    body.insert(name.to_owned(), value);
                }
                json(status, Value::Object(body).to_string())
            }
        };
        let headers = response.headers_mut();
        if self.code == ErrorCode::Busy {
            let seconds = crate::server::admission::Admission::retry_after_seconds();
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(allow) = self.allow {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// Reads a whole request body of at most `max` bytes.
pub async fn read_body(body: Incoming, max: usize) -> Result<Bytes, HttpError> {
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(too_large(max)),
        Err(error) => Err(HttpError::bad_request(format!(
            "reading the body failed: {error}"
        ))),
    }
}

/// The `413` of a body over `max` bytes.
pub fn too_large(max: usize) -> HttpError {
    HttpError::new(
        ErrorCode::TooLarge,
        format!("the body is over the limit of {max} bytes"),
    )
}

/// Why a transport refused a connection or a request: one variant per
/// `ferry_rejections_total` reason the transports count, so that each reason has one
/// spelling (README, "Long-poll transport", lists those of long-poll).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Shutdown has started.
    ShuttingDown,
    /// The TCP connection is over `connections_max` or `connections_per_address_max`.
    ConnectionsMax,
    /// The admission waiting room is full.
    WaitingRoomFull,
    /// A browser's `Origin` is not on `allowed_origins`.
    Origin,
    /// `long_poll.sessions_max` sessions are open.
    LongPollSessionsMax,
    /// A long-poll request names a session that does not exist (any more).
    LongPollUnknownSession,
    /// A long-poll body is over `long_poll.body_bytes_max`.
    LongPollBodyTooLarge,
    /// A long-poll `send` skips client frames.
    LongPollGap,
    /// A long-poll client left more than `long_poll.queue_frames_max` frames unacknowledged.
    LongPollQueueFull,
}

impl Rejection {
    /// The `reason` label of `ferry_rejections_total`.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::ShuttingDown => "shutting_down",
            Rejection::ConnectionsMax => "connections_max",
            Rejection::WaitingRoomFull => "waiting_room_full",
            Rejection::Origin => "origin",
            Rejection::LongPollSessionsMax => "long_poll_sessions_max",
            Rejection::LongPollUnknownSession => "long_poll_unknown_session",
            Rejection::LongPollBodyTooLarge => "long_poll_body_too_large",
            Rejection::LongPollGap => "long_poll_gap",
            Rejection::LongPollQueueFull => "long_poll_queue_full",
        }
    }

    /// Counts this refusal in `ferry_rejections_total`.
    pub fn count(self, metrics: &Metrics) {
        metrics.rejections.with_label_values(&[self.label()]).inc();
    }
}

/// The checks every new connection passes before it gets a `Peer`, a WebSocket upgrade and a
/// long-poll `open` alike, in this order. A refusal is counted; it is always a busy answer, so
/// clients come back after a `Retry-After`.
pub fn admit(server: &Server, over_limit: bool) -> Result<(), HttpError> {
    let refused = if server.is_shutting_down() {
        Busy::ShuttingDown
    } else if over_limit {
        Busy::ConnectionsMax
    } else if server.admission.is_full() {
        Busy::WaitingRoomFull
    } else {
        return Ok(());
    };
    Err(refused.refuse(&server.metrics))
}

/// A refusal answered with a busy 503 and `Retry-After`: the client may succeed later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Shutdown has started.
    ShuttingDown,
    /// The TCP connection is over a connection limit.
    ConnectionsMax,
    /// The admission waiting room is full.
    WaitingRoomFull,
    /// `long_poll.sessions_max` sessions are open.
    LongPollSessionsMax,
}

impl Busy {
    /// How the refusal is counted.
    pub fn rejection(self) -> Rejection {
        match self {
            Busy::ShuttingDown => Rejection::ShuttingDown,
            Busy::ConnectionsMax => Rejection::ConnectionsMax,
            Busy::WaitingRoomFull => Rejection::WaitingRoomFull,
            Busy::LongPollSessionsMax => Rejection::LongPollSessionsMax,
        }
    }

    /// Counts the refusal and makes its answer.
    pub fn refuse(self, metrics: &Metrics) -> HttpError {
        self.rejection().count(metrics);
        HttpError::busy(self)
    }

    /// The reason the answer gives.
    pub fn message(self) -> &'static str {
        match self {
            Busy::ShuttingDown => "the server is shutting down",
            Busy::ConnectionsMax => "too many connections",
            Busy::WaitingRoomFull => "the waiting room is full, retry later",
            Busy::LongPollSessionsMax => "too many long-poll sessions",
        }
    }
}

/// The `Peer` of a connection opened by a request with these headers: the TCP address, every
/// header whose value is visible ASCII, and the cookies of the `Cookie` headers. `observer`
/// sees it before the connection starts.
pub fn peer_from_headers(
    headers: &HeaderMap,
    remote: SocketAddr,
    transport: &'static str,
    observer: Option<&PeerObserver>,
) -> Peer {
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
        .filter_map(cookie_pair)
        .collect();
    let mut peer = Peer::new(remote.ip(), transport);
    peer.headers = Arc::new(list);
    peer.cookies = Arc::new(cookies);
    if let Some(observer) = observer {
        observer(&peer);
    }
    peer
}

/// One `name=value` of a `Cookie` header, trimmed; `None` without a name.
fn cookie_pair(pair: &str) -> Option<(String, String)> {
    let (name, value) = pair.split_once('=')?;
    let name = name.trim();
    let value = value.trim();
    // RFC 6265 allows a value in double quotes; the quotes are not part of it.
    let value = value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(value);
    (!name.is_empty()).then(|| (name.to_owned(), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status, `Content-Type`, `Retry-After`, `Allow` and body of an error's answer.
    fn check(error: HttpError, surface: Surface, expected: (u16, &str, bool, Option<&str>, &str)) {
        let response = error.into_response(surface);
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|value: &HeaderValue| value.to_str().ok())
        };
        let actual = (
            response.status().as_u16(),
            header(CONTENT_TYPE).unwrap_or_default(),
            header(RETRY_AFTER).is_some(),
            header(ALLOW),
            response.body().as_str(),
        );
        assert_eq!(actual, expected);
    }

    #[test]
    fn long_poll_errors_are_json_with_a_code_a_message_and_details() {
        let gap = HttpError::new(ErrorCode::Gap, "frames are missing before seq 3")
            .with_detail("expected", 2)
            .with_detail("received", 1);
        check(
            gap,
            Surface::LongPoll,
            (
                409,
                APPLICATION_JSON,
                false,
                None,
                r#"{"error":"gap","message":"frames are missing before seq 3","expected":2,"received":1}"#,
            ),
        );
        let wrong_method =
            HttpError::new(ErrorCode::MethodNotAllowed, "use GET").with_allow("GET, OPTIONS");
        check(
            wrong_method,
            Surface::LongPoll,
            (
                405,
                APPLICATION_JSON,
                false,
                Some("GET, OPTIONS"),
                r#"{"error":"method-not-allowed","message":"use GET"}"#,
            ),
        );
    }

    #[test]
    fn busy_answers_carry_retry_after_on_every_surface() {
        check(
            HttpError::busy(Busy::LongPollSessionsMax),
            Surface::LongPoll,
            (
                503,
                APPLICATION_JSON,
                true,
                None,
                r#"{"error":"busy","message":"too many long-poll sessions"}"#,
            ),
        );
        check(
            HttpError::busy(Busy::ConnectionsMax),
            Surface::Listener,
            (503, TEXT_PLAIN, true, None, "too many connections\n"),
        );
    }

    #[test]
    fn api_errors_are_json_with_the_message_as_error() {
        check(
            HttpError::bad_request("the body is not JSON"),
            Surface::Api,
            (
                400,
                APPLICATION_JSON,
                false,
                None,
                r#"{"error":"the body is not JSON"}"#,
            ),
        );
        check(
            HttpError::new(ErrorCode::Unavailable, "the log cannot serve this now"),
            Surface::Api,
            (
                503,
                APPLICATION_JSON,
                false,
                None,
                r#"{"error":"the log cannot serve this now"}"#,
            ),
        );
    }

    #[test]
    fn listener_errors_are_plain_text_lines() {
        check(
            HttpError::new(ErrorCode::Forbidden, "origin not allowed"),
            Surface::Listener,
            (403, TEXT_PLAIN, false, None, "origin not allowed\n"),
        );
    }

    #[test]
    fn cookies_are_trimmed_and_unquoted() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("a=1; b=\"two\""));
        headers.append(COOKIE, HeaderValue::from_static(" =x;c = 3 "));
        let remote = SocketAddr::from(([127, 0, 0, 1], 9));
        let peer = peer_from_headers(&headers, remote, "ws", None);
        let cookies: Vec<(&str, &str)> = peer
            .cookies
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        assert_eq!(cookies, [("a", "1"), ("b", "two"), ("c", "3")]);
    }

    /// Architecture invariant: only this module builds a response from scratch or sets a
    /// status, so every error answer goes through `HttpError::into_response`.
    #[test]
    fn only_this_module_builds_responses() {
        let sources = [
            ("http.rs", include_str!("http.rs")),
            ("long_poll.rs", include_str!("long_poll.rs")),
            ("ws.rs", include_str!("ws.rs")),
            ("api.rs", include_str!("api.rs")),
        ];
        for (file, source) in sources {
            for forbidden in ["Response::new(", "status_mut()", "StatusCode::from_u16"] {
                assert!(
                    !source.contains(forbidden),
                    "{file} uses {forbidden}: build answers with transports::common"
                );
            }
        }
    }
}
