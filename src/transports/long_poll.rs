//! HTTP long-poll transport: the same Logux session as a WebSocket one, carried by plain HTTP
//! requests under `/lp/`, for clients that cannot open a WebSocket.
//!
//! Each session runs one `connection::run` task, exactly like a socket: this module only feeds
//! it the frames of `send` requests (through a bounded channel) and keeps the frames it writes
//! until a `poll` hands them out and a later `poll` acknowledges them. There is no protocol
//! logic here.
//!
//! Retries are safe in both directions. The client numbers its frames from 1 and a `send`
//! names the number of its first frame (`seq`); the session applies only the frames it has not
//! received yet and answers how many it has (`received`), so a repeated `send` is applied once
//! and a gap is refused. The session numbers its own frames from 1 and keeps them until a
//! `poll?ack=N` says the client has the first N, so a repeated `poll` returns the same frames.
//!
//! A session with no request for `session_expiry_ms` is closed as a dropped socket would be:
//! the connection's frame stream ends, so the hub unsubscribes it and forgets its client.
//! The exact HTTP contract is in README.md ("Long-poll transport").

use super::common::{self, Busy, ErrorCode, HttpError, PeerObserver, Rejection, Surface};
use crate::metrics::Metrics;
use crate::protocol::ProtocolError;
use crate::server::connection::{self, Inbound};
use crate::server::Server;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::stream;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS,
    ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS, CACHE_CONTROL, CONTENT_LENGTH, ORIGIN,
    VARY,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::{sleep_until, Instant};

/// Every long-poll endpoint starts with this path.
pub const LONG_POLL_PATH_PREFIX: &str = "/lp/";
/// Frames of `send` requests queued for a session's connection task; a full queue makes the
/// `send` wait, which is the backpressure on a client that sends faster than it is served.
pub const INBOUND_QUEUE_FRAMES_MAX: usize = 64;
/// A `poll` answer stops adding frames past this many bytes (it always carries at least one
/// frame), so one answer never holds a whole catch-up in memory twice.
pub const POLL_RESPONSE_BYTES_MAX: usize = 1024 * 1024;
/// Time a client has to send a request body once its headers arrived.
pub const BODY_READ_TIMEOUT_MS: u64 = 60_000;
/// Random bytes in a session id (hex-encoded): the id is the only credential of a session.
pub const SESSION_ID_BYTES: usize = 16;
/// How long browsers may cache a CORS preflight answer.
pub const CORS_MAX_AGE_SECONDS: u64 = 600;

/// The `"transport"` of long-poll peers in logs and metrics.
const TRANSPORT: &str = "long-poll";

/// Long-poll sessions of one listener.
pub struct LongPoll {
    /// Shared server state; the configuration's `[long_poll]` section sets the limits.
    server: Arc<Server>,
    /// Open sessions by id, including ended ones whose last frames are not acknowledged yet.
    sessions: DashMap<String, Arc<Session>>,
    /// Sessions counted against `sessions_max`; reserved before a session is created so that
    /// concurrent `open`s cannot exceed the limit.
    reserved: AtomicUsize,
    /// Sees every `Peer` created (tests).
    observer: Option<PeerObserver>,
}

impl std::fmt::Debug for LongPoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LongPoll")
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

/// One long-poll session: the HTTP side of one `connection::run` task.
struct Session {
    /// Outgoing frames and request bookkeeping, behind a lock never held across an `await`.
    state: Mutex<State>,
    /// Wakes waiting polls: frames were queued, the connection ended, or a newer poll came.
    changed: Notify,
    /// Wakes the session task: the client asked to close.
    wake_task: Notify,
    /// The incoming side, locked for a whole `send` so that retried sends apply in order and
    /// once.
    inbound: tokio::sync::Mutex<InboundSide>,
    /// Set to end the connection's frame stream (expiry, `close`), as a closed socket does.
    stop: watch::Sender<bool>,
}

/// Frames going to the client and what the session task needs to decide on expiry.
struct State {
    /// Frames not acknowledged yet; `frames[0]` has number `first`.
    frames: VecDeque<String>,
    /// The number of `frames[0]` (numbers start at 1).
    first: u64,
    /// The connection task finished: no more frames will be added.
    ended: bool,
    /// The client asked to close.
    close_requested: bool,
    /// Increased by every poll; a waiting poll whose number is no longer current answers at
    /// once, so a retried poll never waits behind a lost one.
    poll_generation: u64,
    /// Requests of this session being answered now; a session never expires during one.
    requests_in_flight: usize,
    /// When the last request started or ended.
    last_request: Instant,
}

impl State {
    /// The number the next frame will get.
    fn next_number(&self) -> u64 {
        self.first + self.frames.len() as u64
    }

    /// Forgets the frames the client has (numbers up to `ack`).
    fn acknowledge(&mut self, ack: u64) {
        while self.first <= ack && self.frames.pop_front().is_some() {
            self.first += 1;
        }
    }
}

/// The incoming side of a session.
struct InboundSide {
    /// Frames to the connection task.
    tx: mpsc::Sender<Inbound>,
    /// How many client frames were accepted: the number of the last one.
    received: u64,
}

/// Counts a request as in flight until dropped (also when hyper drops the handler because
/// the client went away).
struct RequestGuard<'a>(&'a Session);

impl<'a> RequestGuard<'a> {
    fn enter(session: &'a Session) -> Self {
        let mut state = session.lock();
        state.requests_in_flight += 1;
        state.last_request = Instant::now();
        RequestGuard(session)
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.requests_in_flight = state.requests_in_flight.saturating_sub(1);
        state.last_request = Instant::now();
    }
}

impl Session {
    fn new(tx: mpsc::Sender<Inbound>, stop: watch::Sender<bool>) -> Session {
        Session {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                first: 1,
                ended: false,
                close_requested: false,
                poll_generation: 0,
                requests_in_flight: 0,
                last_request: Instant::now(),
            }),
            changed: Notify::new(),
            wake_task: Notify::new(),
            inbound: tokio::sync::Mutex::new(InboundSide { tx, received: 0 }),
            stop,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mark_ended(&self) {
        self.lock().ended = true;
        self.changed.notify_waiters();
    }

    /// When the session expires if nothing happens; while a request is in flight, the time of
    /// the next check.
    fn expiry_deadline(&self, expiry: Duration) -> Instant {
        let state = self.lock();
        if state.requests_in_flight > 0 {
            Instant::now() + expiry
        } else {
            state.last_request + expiry
        }
    }

    fn is_expired(&self, expiry: Duration) -> bool {
        let state = self.lock();
        state.requests_in_flight == 0 && state.last_request + expiry <= Instant::now()
    }
}

/// `send`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    /// The number of `messages[0]` in the client's numbering (from 1).
    seq: u64,
    /// Frames: a string is a frame's exact text; any other JSON value is sent as its compact
    /// JSON text.
    messages: Vec<serde_json::Value>,
}

/// `poll`'s answer.
#[derive(Serialize)]
struct PollAnswer<'a> {
    /// The number of `messages[0]`.
    first: u64,
    /// Frames' texts, in order.
    messages: Vec<&'a str>,
    /// The connection has ended and these are its last frames.
    closed: bool,
}

/// `open`'s answer.
#[derive(Serialize)]
struct OpenAnswer<'a> {
    session: &'a str,
    hold_ms: u64,
    expiry_ms: u64,
}

/// `send`'s answer.
#[derive(Serialize)]
struct SendAnswer {
    received: u64,
    closed: bool,
}

/// The endpoint a path names.
enum Endpoint<'a> {
    Open,
    Send(&'a str),
    Poll(&'a str),
    Close(&'a str),
}

fn endpoint(path: &str) -> Option<Endpoint<'_>> {
    let rest = path.strip_prefix(LONG_POLL_PATH_PREFIX)?;
    if rest == "open" {
        return Some(Endpoint::Open);
    }
    let (id, action) = rest.split_once('/')?;
    match action {
        "send" => Some(Endpoint::Send(id)),
        "poll" => Some(Endpoint::Poll(id)),
        "close" => Some(Endpoint::Close(id)),
        _ => None,
    }
}

/// True for paths this module answers.
pub fn is_long_poll_path(path: &str) -> bool {
    path.starts_with(LONG_POLL_PATH_PREFIX)
}

impl LongPoll {
    /// Sessions for one listener. `observer` sees every peer created (tests).
    pub fn new(server: Arc<Server>, observer: Option<PeerObserver>) -> Arc<LongPoll> {
        Arc::new(LongPoll {
            server,
            sessions: DashMap::new(),
            reserved: AtomicUsize::new(0),
            observer,
        })
    }

    /// Sessions open now (including ended ones not yet collected).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Answers one request under `/lp/`. `over_limit` is true when the TCP connection is over
    /// `connections_max`.
    pub async fn handle(
        self: &Arc<Self>,
        request: Request<Incoming>,
        remote: SocketAddr,
        over_limit: bool,
    ) -> Response<String> {
        let origin = request
            .headers()
            .get(ORIGIN)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let preflight = request.method() == Method::OPTIONS;
        let requested_headers = request
            .headers()
            .get(ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned();
        let mut response = match self.dispatch(request, remote, over_limit).await {
            Ok(response) => response,
            Err(error) => error.into_response(Surface::LongPoll),
        };
        let headers = response.headers_mut();
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        self.cors(origin.as_deref(), preflight, requested_headers, headers);
        response
    }

    async fn dispatch(
        self: &Arc<Self>,
        request: Request<Incoming>,
        remote: SocketAddr,
        over_limit: bool,
    ) -> Result<Response<String>, HttpError> {
        let path = request.uri().path().to_owned();
        let Some(endpoint) = endpoint(&path) else {
            return Err(HttpError::new(
                ErrorCode::NotFound,
                "no such long-poll endpoint",
            ));
        };
        let method = request.method().clone();
        if method == Method::OPTIONS {
            return Ok(common::empty(StatusCode::NO_CONTENT));
        }
        let (expected, allow) = match endpoint {
            Endpoint::Poll(_) => (Method::GET, "GET, OPTIONS"),
            Endpoint::Open | Endpoint::Send(_) | Endpoint::Close(_) => {
                (Method::POST, "POST, OPTIONS")
            }
        };
        if method != expected {
            return Err(
                HttpError::new(ErrorCode::MethodNotAllowed, format!("use {expected}"))
                    .with_allow(allow),
            );
        }
        match endpoint {
            Endpoint::Open => self.open(&request, remote, over_limit),
            Endpoint::Send(id) => {
                let session = self.find(id)?;
                self.send(&session, request).await
            }
            Endpoint::Poll(id) => {
                let session = self.find(id)?;
                self.poll(&session, request.uri().query()).await
            }
            Endpoint::Close(id) => {
                let session = self.find(id)?;
                session.lock().close_requested = true;
                session.wake_task.notify_one();
                Ok(common::empty(StatusCode::NO_CONTENT))
            }
        }
    }

    fn find(&self, id: &str) -> Result<Arc<Session>, HttpError> {
        match self.sessions.get(id) {
            Some(session) => Ok(session.clone()),
            None => {
                Rejection::LongPollUnknownSession.count(&self.server.metrics);
                Err(HttpError::new(
                    ErrorCode::Gone,
                    "unknown or expired session: open a new one",
                ))
            }
        }
    }

    fn open(
        self: &Arc<Self>,
        request: &Request<Incoming>,
        remote: SocketAddr,
        over_limit: bool,
    ) -> Result<Response<String>, HttpError> {
        let server = &self.server;
        common::admit(server, over_limit)?;
        let config = &server.config.long_poll;
        if self.reserved.fetch_add(1, Ordering::AcqRel) >= config.sessions_max {
            self.reserved.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy::LongPollSessionsMax.refuse(&server.metrics));
        }
        let id = new_session_id();
        let peer =
            common::peer_from_headers(request.headers(), remote, TRANSPORT, self.observer.as_ref());
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE_FRAMES_MAX);
        let (stop, stopped) = watch::channel(false);
        let session = Arc::new(Session::new(tx, stop));
        self.sessions.insert(id.clone(), session.clone());
        server.metrics.long_poll_sessions.inc();
        let registered = Registered {
            long_poll: self.clone(),
            id: id.clone(),
        };
        let incoming = frame_stream(rx, stopped);
        let outgoing = FrameSink {
            session: session.clone(),
            batch: Vec::new(),
            queue_frames_max: config.queue_frames_max,
            metrics: server.metrics.clone(),
        };
        let connection = connection::run(server.clone(), incoming, outgoing, peer);
        let expiry = Duration::from_millis(config.session_expiry_ms);
        tokio::spawn(run_session(session, connection, expiry, registered));
        let answer = OpenAnswer {
            session: &id,
            hold_ms: config.poll_hold_ms,
            expiry_ms: config.session_expiry_ms,
        };
        Ok(common::json(StatusCode::OK, to_json(&answer)))
    }

    async fn send(
        &self,
        session: &Session,
        request: Request<Incoming>,
    ) -> Result<Response<String>, HttpError> {
        let _guard = RequestGuard::enter(session);
        let body = self
            .read_body(request, self.server.config.long_poll.body_bytes_max)
            .await?;
        let body: SendBody = serde_json::from_slice(&body).map_err(|error| {
            HttpError::bad_request(format!(
                "the body must be {{\"seq\": N, \"messages\": [...]}}: {error}"
            ))
        })?;
        if body.seq == 0 {
            return Err(HttpError::bad_request("seq starts at 1"));
        }
        let frame_bytes_max = self.server.config.limits.frame_bytes_max;
        let mut inbound = session.inbound.lock().await;
        let expected = inbound.received + 1;
        if body.seq > expected {
            Rejection::LongPollGap.count(&self.server.metrics);
            return Err(HttpError::new(
                ErrorCode::Gap,
                format!("frames are missing before seq {}", body.seq),
            )
            .with_detail("expected", expected)
            .with_detail("received", inbound.received));
        }
        // Frames up to `received` were applied by an earlier copy of this request.
        let skip = usize::try_from(expected - body.seq).unwrap_or(usize::MAX);
        let mut closed = false;
        for message in body.messages.into_iter().skip(skip) {
            let text = match message {
                serde_json::Value::String(text) => text,
                other => other.to_string(),
            };
            let frame = if text.len() > frame_bytes_max {
                Inbound::Invalid(ProtocolError::wrong_format(&format!(
                    "frame of {} bytes is over the limit of {frame_bytes_max} bytes",
                    text.len()
                )))
            } else {
                Inbound::Text(text)
            };
            // Like writes to a socket the server closed, frames after the end are dropped:
            // the client learns about the close from its poll, with the last frames.
            if !closed && (*session.stop.borrow() || inbound.tx.send(frame).await.is_err()) {
                closed = true;
            }
            inbound.received += 1;
        }
        let closed = closed || session.lock().ended;
        let answer = SendAnswer {
            received: inbound.received,
            closed,
        };
        Ok(common::json(StatusCode::OK, to_json(&answer)))
    }

    async fn poll(
        &self,
        session: &Session,
        query: Option<&str>,
    ) -> Result<Response<String>, HttpError> {
        let _guard = RequestGuard::enter(session);
        let ack = match query_value(query, "ack") {
            None => 0,
            Some(text) => text
                .parse::<u64>()
                .map_err(|_| HttpError::bad_request("ack must be a non-negative integer"))?,
        };
        let generation = {
            let mut state = session.lock();
            if ack >= state.next_number() {
                return Err(HttpError::bad_request(format!(
                    "ack {ack} is beyond the last frame sent ({})",
                    state.next_number() - 1
                )));
            }
            state.acknowledge(ack);
            state.poll_generation += 1;
            state.poll_generation
        };
        // An older poll of this session (the client gave up on it) answers now.
        session.changed.notify_waiters();
        let deadline =
            Instant::now() + Duration::from_millis(self.server.config.long_poll.poll_hold_ms);
        loop {
            let changed = session.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = session.lock();
                if !state.frames.is_empty() || state.ended || state.poll_generation != generation {
                    return Ok(poll_answer(&state));
                }
            }
            tokio::select! {
                _ = changed => {}
                _ = sleep_until(deadline) => return Ok(poll_answer(&session.lock())),
            }
        }
    }

    /// Reads a body of at most `max` bytes within `BODY_READ_TIMEOUT_MS`.
    async fn read_body(&self, request: Request<Incoming>, max: usize) -> Result<Bytes, HttpError> {
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        let read = if declared.is_some_and(|length| length > max as u64) {
            Err(common::too_large(max))
        } else {
            let body = common::read_body(request.into_body(), max);
            match tokio::time::timeout(Duration::from_millis(BODY_READ_TIMEOUT_MS), body).await {
                Ok(read) => read,
                Err(_) => Err(HttpError::new(
                    ErrorCode::Timeout,
                    "the body did not arrive in time",
                )),
            }
        };
        if read
            .as_ref()
            .is_err_and(|error| error.code() == ErrorCode::TooLarge)
        {
            Rejection::LongPollBodyTooLarge.count(&self.server.metrics);
        }
        read
    }

    /// Adds CORS headers for an allowed `Origin`: the origin itself with credentials when it
    /// is listed, `*` without credentials when only `"*"` matches.
    fn cors(
        &self,
        origin: Option<&str>,
        preflight: bool,
        requested_headers: Option<HeaderValue>,
        headers: &mut hyper::HeaderMap,
    ) {
        let allowed = &self.server.config.long_poll.cors_origins;
        if allowed.is_empty() {
            return;
        }
        headers.append(VARY, HeaderValue::from_static("Origin"));
        let Some(origin) = origin else {
            return;
        };
        if allowed.iter().any(|listed| listed == origin) {
            let Ok(value) = HeaderValue::from_str(origin) else {
                return;
            };
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, value);
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        } else if allowed.iter().any(|listed| listed == "*") {
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        } else {
            return;
        }
        headers.insert(
            ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Retry-After"),
        );
        if preflight {
            headers.insert(
                ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            headers.insert(
                ACCESS_CONTROL_ALLOW_HEADERS,
                requested_headers.unwrap_or(HeaderValue::from_static("Content-Type")),
            );
            headers.insert(
                ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from(CORS_MAX_AGE_SECONDS),
            );
            headers.append(
                VARY,
                HeaderValue::from_static("Access-Control-Request-Headers"),
            );
        }
    }
}

/// The connection's incoming frames: what `send` requests queue, until the session stops.
fn frame_stream(
    rx: mpsc::Receiver<Inbound>,
    stopped: watch::Receiver<bool>,
) -> impl futures_util::Stream<Item = Inbound> + Unpin {
    Box::pin(stream::unfold(
        (rx, stopped),
        |(mut rx, mut stopped)| async move {
            // Frames already queued are delivered before a stop ends the stream, so a
            // client's last frames before `close` still reach the connection.
            let item = tokio::select! {
                biased;
                item = rx.recv() => item,
                _ = stopped.wait_for(|stop| *stop) => None,
            };
            item.map(|item| (item, (rx, stopped)))
        },
    ))
}

/// The connection's outgoing frames: gathered while the connection writes a batch and
/// queued in the session for polls on each flush, so that a waiting poll answers with the
/// whole batch (`headers` with `connected`, say) instead of only its first frame. A queue that
/// would exceed `queue_frames_max` fails the flush, which closes the connection as a slow
/// consumer.
struct FrameSink {
    session: Arc<Session>,
    /// Frames written since the last flush.
    batch: Vec<String>,
    queue_frames_max: usize,
    metrics: Arc<Metrics>,
}

impl FrameSink {
    fn publish(&mut self) -> Result<(), &'static str> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut state = self.session.lock();
        if state.ended {
            return Err("long-poll session ended");
        }
        if state.frames.len() + self.batch.len() > self.queue_frames_max {
            drop(state);
            // The connection closes now; its client catches up from the log after reconnecting.
            self.batch.clear();
            tracing::warn!(
                "long-poll client left too many frames unacknowledged, disconnecting slow consumer"
            );
            Rejection::LongPollQueueFull.count(&self.metrics);
            self.metrics.slow_consumers.inc();
            return Err("long-poll queue full");
        }
        state.frames.extend(self.batch.drain(..));
        drop(state);
        self.session.changed.notify_waiters();
        Ok(())
    }
}

impl futures_util::Sink<String> for FrameSink {
    type Error = &'static str;

    fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, frame: String) -> Result<(), Self::Error> {
        self.get_mut().batch.push(frame);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(self.get_mut().publish())
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(self.get_mut().publish())
    }
}

/// One session's task: runs the connection, and ends it like a closed socket when the session
/// expires or the client closes it. The session stays registered after the connection ends
/// until its last frames are collected, it expires, or the client closes it.
async fn run_session(
    session: Arc<Session>,
    connection: impl std::future::Future<Output = ()>,
    expiry: Duration,
    registered: Registered,
) {
    tokio::pin!(connection);
    let mut running = true;
    loop {
        let deadline = session.expiry_deadline(expiry);
        tokio::select! {
            _ = &mut connection, if running => {
                running = false;
                session.mark_ended();
            }
            _ = sleep_until(deadline) => {
                if session.is_expired(expiry) {
                    tracing::debug!("long-poll session expired");
                    break;
                }
            }
            _ = session.wake_task.notified() => {
                if session.lock().close_requested {
                    break;
                }
            }
        }
    }
    // End the frame stream, as a closed socket does, and let the connection unregister from
    // the hub.
    session.stop.send_replace(true);
    if running {
        connection.await;
    }
    session.mark_ended();
    drop(registered);
}

/// Keeps a session registered and counted until its task ends (also on a panic).
struct Registered {
    long_poll: Arc<LongPoll>,
    id: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if self.long_poll.sessions.remove(&self.id).is_some() {
            self.long_poll.server.metrics.long_poll_sessions.dec();
        }
        self.long_poll.reserved.fetch_sub(1, Ordering::AcqRel);
    }
}

fn poll_answer(state: &State) -> Response<String> {
    let mut bytes = 0;
    let mut messages = Vec::new();
    for frame in &state.frames {
        if !messages.is_empty() && bytes + frame.len() > POLL_RESPONSE_BYTES_MAX {
            break;
        }
        bytes += frame.len();
        messages.push(frame.as_str());
    }
    let closed = state.ended && messages.len() == state.frames.len();
    let answer = PollAnswer {
        first: state.first,
        messages,
        closed,
    };
    common::json(StatusCode::OK, to_json(&answer))
}

fn new_session_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; SESSION_ID_BYTES];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The value of `name` in a query string (no percent-decoding: values are numbers).
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs of numbers and strings cannot fail.
    serde_json::to_string(value).unwrap_or_else(|error| {
        tracing::error!(%error, "serializing a long-poll answer failed");
        String::from("{}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_endpoints() {
        assert!(matches!(endpoint("/lp/open"), Some(Endpoint::Open)));
        assert!(matches!(
            endpoint("/lp/abc/send"),
            Some(Endpoint::Send("abc"))
        ));
        assert!(matches!(
            endpoint("/lp/abc/poll"),
            Some(Endpoint::Poll("abc"))
        ));
        assert!(matches!(
            endpoint("/lp/abc/close"),
            Some(Endpoint::Close("abc"))
        ));
        assert!(endpoint("/lp/abc/other").is_none());
        assert!(endpoint("/lp/").is_none());
        assert!(endpoint("/open").is_none());
    }

    #[test]
    fn query_values_are_found_by_name() {
        assert_eq!(query_value(Some("x=1&ack=42"), "ack"), Some("42"));
        assert_eq!(query_value(Some("ack"), "ack"), None);
        assert_eq!(query_value(None, "ack"), None);
    }

    #[test]
    fn acknowledging_drops_only_frames_up_to_the_number() {
        let mut state = State {
            frames: VecDeque::from(vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]),
            first: 5,
            ended: false,
            close_requested: false,
            poll_generation: 0,
            requests_in_flight: 0,
            last_request: Instant::now(),
        };
        state.acknowledge(3);
        assert_eq!((state.first, state.frames.len()), (5, 3));
        state.acknowledge(6);
        assert_eq!((state.first, state.frames.len()), (7, 1));
        assert_eq!(state.next_number(), 8);
        state.acknowledge(100);
        assert_eq!((state.first, state.frames.len()), (8, 0));
    }

    #[test]
    fn session_ids_are_long_and_different() {
        let a = new_session_id();
        assert_eq!(a.len(), SESSION_ID_BYTES * 2);
        assert_ne!(a, new_session_id());
    }
}
