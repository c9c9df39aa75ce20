//! One virtual Logux client: connecting (with the reconnect rules of `@logux/core` 0.10),
//! the `connect`/`connected` handshake, and a session loop that answers the server.
//!
//! What a client *does* (which actions it sends, what it counts) is a [`Workload`]: a
//! synchronous state machine fed messages and `now`, asked for frames to send. The loop here
//! does all the IO, so every scenario gets the same protocol behaviour:
//! every server `sync` is answered with `synced`, every `ping` with `pong`, `connected`,
//! `synced` and `pong` are awaited for at most the answer timeout (Logux's 70 s FIFO of
//! timers), and the client pings after 10 s without traffic like `@logux/client`.

use crate::net::{Connector, OpenError, Ws};
use crate::proto::{self, ServerMsg};
use crate::stats::ErrorCounts;
use futures_util::{FutureExt, SinkExt, StreamExt};
use rand::Rng;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Messages handled in one go before replies are flushed.
pub const READ_BATCH_MESSAGES_MAX: usize = 64;
/// How long a client waits for its close frame to go out at a mass disconnect.
pub const CLOSE_WAIT_MS: u64 = 1_000;

/// Settings and shared counters of every client of a scenario.
#[derive(Debug)]
pub struct ClientCtx {
    /// Opens sockets to the first `--url` (the only one outside `fanout`).
    pub connector: Arc<Connector>,
    /// One connector per `--url`; a workload picks one with [`Workload::url_index`].
    pub connectors: Vec<Arc<Connector>>,
    /// Bounds TCP connects + upgrades in flight.
    pub connect_slots: Arc<Semaphore>,
    /// Failures by type.
    pub errors: Arc<ErrorCounts>,
    /// The `token` sent in `connect`.
    pub token: String,
    /// The `subprotocol` sent in `connect`.
    pub subprotocol: u32,
    /// Wait for `connected`, `synced` and `pong` (Logux `timeout`, 70 s).
    pub answer_timeout: Duration,
    /// Silence after which a client sends `ping` (Logux client `ping`, 10 s).
    pub idle_ping: Duration,
    /// Connections past `connected` right now (for progress lines).
    pub open_sessions: AtomicI64,
    /// TCP connect attempts so far.
    pub connect_attempts: AtomicU64,
}

/// A stop signal shared by all clients (the mass disconnect, or the scenario deadline).
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// A signal and its sender.
    pub fn new() -> (watch::Sender<bool>, Stop) {
        let (tx, rx) = watch::channel(false);
        (tx, Stop(rx))
    }

    /// True once stop was sent.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once stop was sent (or its sender is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Runs `fut` unless stop comes first.
    pub async fn or<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = self.wait() => None,
            out = fut => Some(out),
        }
    }
}

/// A frame a workload wants sent.
#[derive(Debug)]
pub struct Outgoing {
    /// The JSON text.
    pub text: String,
    /// True for `sync` and `ping`: the server must answer it (a timer is started).
    pub expects_answer: bool,
}

/// What a client does on top of the protocol. Called from one task; no IO.
pub trait Workload {
    /// This client's node id.
    fn node_id(&self) -> &str;
    /// The highest server `added` seen, sent as `synced` in `connect`.
    fn last_received(&self) -> u64;
    /// Records a server `sync`'s `added`.
    fn set_last_received(&mut self, added: u64);
    /// Our own log position, sent in `ping`/`pong`.
    fn own_added(&self) -> u64;
    /// Which `--url` (index into `ClientCtx::connectors`, modulo their count) the next
    /// connect attempt goes to. Asked before every attempt.
    fn url_index(&self) -> usize {
        0
    }
    /// A connect attempt starts.
    fn on_attempt(&mut self, now: Instant);
    /// `connected` arrived: `base_time` and the server's node id apply from now on.
    fn on_connected(&mut self, base_time: i64, server_node: &str, now: Instant);
    /// The next frame to send now, if any.
    fn next_frame(&mut self, now: Instant) -> Option<Outgoing>;
    /// When `next_frame` may have something without a message arriving (rate limits).
    fn wake_at(&self) -> Option<Instant> {
        None
    }
    /// The pairs of a server `sync` (`synced` is sent by the loop).
    fn on_sync(&mut self, pairs: &[proto::Pair], now: Instant);
    /// A `synced` answer.
    fn on_synced(&mut self, added: u64, now: Instant);
    /// A `pong` answer.
    fn on_pong(&mut self, _now: Instant) {}
    /// The connection ended (any reason); unacknowledged work must be re-sent next time.
    fn on_closed(&mut self, _now: Instant) {}
    /// A fatal Logux error (`wrong-credentials`, `wrong-protocol`, `wrong-subprotocol`):
    /// a real client stops reconnecting for good, and so does this one.
    fn on_fatal(&mut self) {}
}

/// Why a session (one connection) ended.
#[derive(Debug)]
pub enum End {
    /// The stop signal: the client closed on purpose.
    Stopped,
    /// The server closed the socket (or it broke) before `connected`.
    ClosedBeforeConnected,
    /// The server closed the socket (or it broke) after `connected`.
    Closed,
    /// The server sent `["error", type]` (and closes).
    ServerError(String),
    /// No answer within the answer timeout.
    Timeout(&'static str),
    /// Writing failed.
    WriteFailed,
    /// A frame from the server was not a Logux message.
    BadFrame,
}

impl End {
    /// The key under which this end is counted.
    pub fn kind(&self) -> String {
        match self {
            End::Stopped => "stopped".into(),
            End::ClosedBeforeConnected => "closed:before_connected".into(),
            End::Closed => "closed:by_server".into(),
            End::ServerError(kind) => format!("error:{kind}"),
            End::Timeout(what) => format!("timeout:{what}"),
            End::WriteFailed => "closed:write_failed".into(),
            End::BadFrame => "protocol:bad_frame".into(),
        }
    }

    /// True for the errors after which Logux clients stop reconnecting.
    fn is_fatal(&self) -> bool {
        matches!(self, End::ServerError(kind)
            if kind == "wrong-credentials" || kind == "wrong-protocol" || kind == "wrong-subprotocol")
    }
}

/// The delay before reconnecting after an open socket dropped: `@logux/core`'s `Reconnect`
/// resets its attempt counter when the socket opens, so this is 1000–1500 ms (10 % of the
/// time 900–950 ms), every time.
pub fn delay_after_drop_ms() -> u64 {
    backoff_ms(0)
}

/// `@logux/core` 0.10 `Reconnect#nextDelay` with `minDelay` 1000 and `maxDelay` 5000, for
/// `attempts` failed opens in a row (2000–3000, 4000–5000, then 5000).
pub fn backoff_ms(attempts: u32) -> u64 {
    let base = 1000.0 * 2f64.powi(attempts.min(16) as i32);
    let r: f64 = rand::thread_rng().gen();
    let mut dev = r * 0.5 * base;
    if (r * 10.0).floor() as i64 == 1 {
        dev = -dev;
    }
    (base + dev).min(5000.0) as u64
}

/// Runs one client until `stop`: connect, session, reconnect, like a real client.
pub async fn run<W: Workload>(ctx: &ClientCtx, w: &mut W, stop: &mut Stop) {
    // Failed opens in a row (reset when a socket opens), as in `Reconnect`.
    let mut failures: u32 = 0;
    loop {
        if stop.is_set() {
            return;
        }
        let Some(Ok(permit)) = stop.or(ctx.connect_slots.clone().acquire_owned()).await else {
            return;
        };
        w.on_attempt(Instant::now());
        ctx.connect_attempts.fetch_add(1, Ordering::Relaxed);
        let connector = &ctx.connectors[w.url_index() % ctx.connectors.len()];
        let Some(opened) = stop.or(connector.open()).await else {
            return;
        };
        drop(permit);
        let delay_ms = match opened {
            Err(error) => {
                ctx.errors.add(&error.kind());
                failures += 1;
                match error {
                    // Admission control: do what the server asks.
                    OpenError::Http {
                        status: 503,
                        retry_after_s: Some(s),
                    } => s.saturating_mul(1000),
                    // Any other refused upgrade: the client's back-off lands at its 5 s cap.
                    OpenError::Http { .. } => 5_000,
                    _ => backoff_ms(failures),
                }
            }
            Ok(ws) => {
                failures = 0;
                let end = session(ctx, w, ws, stop).await;
                w.on_closed(Instant::now());
                match end {
                    End::Stopped => return,
                    end => {
                        ctx.errors.add(&end.kind());
                        if end.is_fatal() {
                            w.on_fatal();
                            return;
                        }
                    }
                }
                delay_after_drop_ms()
            }
        };
        if stop
            .or(sleep(Duration::from_millis(delay_ms)))
            .await
            .is_none()
        {
            return;
        }
    }
}

/// One connection: handshake, then serve until it ends.
async fn session<W: Workload>(ctx: &ClientCtx, w: &mut W, mut ws: Ws, stop: &mut Stop) -> End {
    let connect = proto::connect_frame(w.node_id(), w.last_received(), &ctx.token, ctx.subprotocol);
    if ws.send(Message::text(connect)).await.is_err() {
        return End::WriteFailed;
    }
    let handshake = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => match proto::parse_server(text.as_str()) {
                    Ok(ServerMsg::Connected {
                        version,
                        server_node,
                        end,
                    }) => {
                        if version != i64::from(proto::PROTOCOL_VERSION) {
                            ctx.errors
                                .add(&format!("protocol:connected_version_{version}"));
                        }
                        return Ok((server_node, end));
                    }
                    Ok(ServerMsg::Error(kind)) => return Err(End::ServerError(kind)),
                    Ok(ServerMsg::Headers | ServerMsg::Debug) => {}
                    Ok(_) => ctx.errors.add("protocol:message_before_connected"),
                    Err(_) => return Err(End::BadFrame),
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    return Err(End::ClosedBeforeConnected)
                }
                Some(Ok(_)) => {}
            }
        }
    };
    let connected = tokio::select! {
        biased;
        _ = stop.wait() => Err(End::Stopped),
        out = timeout(ctx.answer_timeout, handshake) => out.unwrap_or(Err(End::Timeout("connected"))),
    };
    let (server_node, base_time) = match connected {
        Ok(connected) => connected,
        Err(End::Stopped) => {
            close(&mut ws).await;
            return End::Stopped;
        }
        Err(end) => return end,
    };
    ctx.open_sessions.fetch_add(1, Ordering::Relaxed);
    w.on_connected(base_time, &server_node, Instant::now());
    let end = serve(ctx, w, &mut ws, stop).await;
    ctx.open_sessions.fetch_sub(1, Ordering::Relaxed);
    if matches!(end, End::Stopped) {
        close(&mut ws).await;
    }
    end
}

/// Sends a close frame (bounded wait) and drops the socket.
async fn close(ws: &mut Ws) {
    let _ = timeout(Duration::from_millis(CLOSE_WAIT_MS), ws.close(None)).await;
}

/// What one received frame asks of the loop.
enum Step {
    Continue,
    End(End),
}

/// The steady state of a connection.
async fn serve<W: Workload>(ctx: &ClientCtx, w: &mut W, ws: &mut Ws, stop: &mut Stop) -> End {
    // Deadlines of sent `sync`/`ping` frames still waiting for `synced`/`pong`, oldest first.
    let mut answers_due: VecDeque<Instant> = VecDeque::new();
    let mut last_io = Instant::now();
    loop {
        // Send whatever the workload has, then flush once.
        let now = Instant::now();
        let mut fed = false;
        while let Some(out) = w.next_frame(now) {
            if out.expects_answer {
                answers_due.push_back(now + ctx.answer_timeout);
            }
            if ws.feed(Message::text(out.text)).await.is_err() {
                return End::WriteFailed;
            }
            fed = true;
        }
        if fed {
            if ws.flush().await.is_err() {
                return End::WriteFailed;
            }
            last_io = Instant::now();
        }
        let answer_deadline = answers_due.front().copied();
        let ping_at = last_io + ctx.idle_ping;
        let wake_at = w.wake_at();
        tokio::select! {
            biased;
            _ = stop.wait() => return End::Stopped,
            message = ws.next() => {
                last_io = Instant::now();
                let mut step = handle(ctx, w, ws, message, &mut answers_due).await;
                let mut handled = 1;
                // Handle what is already there before flushing the replies.
                while matches!(step, Step::Continue) && handled < READ_BATCH_MESSAGES_MAX {
                    match ws.next().now_or_never() {
                        Some(message) => {
                            step = handle(ctx, w, ws, message, &mut answers_due).await;
                            handled += 1;
                        }
                        None => break,
                    }
                }
                if let Step::End(end) = step {
                    return end;
                }
                if ws.flush().await.is_err() {
                    return End::WriteFailed;
                }
            }
            _ = sleep_until(answer_deadline.unwrap_or(now)), if answer_deadline.is_some() => {
                return End::Timeout("answer");
            }
            _ = sleep_until(ping_at) => {
                answers_due.push_back(Instant::now() + ctx.answer_timeout);
                if ws.send(Message::text(proto::ping_frame(w.own_added()))).await.is_err() {
                    return End::WriteFailed;
                }
                last_io = Instant::now();
            }
            _ = sleep_until(wake_at.unwrap_or(now)), if wake_at.is_some() => {}
        }
    }
}

/// Handles one read from the socket; replies are fed, not flushed.
async fn handle<W: Workload>(
    ctx: &ClientCtx,
    w: &mut W,
    ws: &mut Ws,
    message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    answers_due: &mut VecDeque<Instant>,
) -> Step {
    let text = match message {
        Some(Ok(Message::Text(text))) => text,
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Step::End(End::Closed),
        Some(Ok(_)) => return Step::Continue,
    };
    let now = Instant::now();
    let reply = match proto::parse_server(text.as_str()) {
        Err(_) => return Step::End(End::BadFrame),
        Ok(ServerMsg::Sync { added, pairs }) => {
            w.on_sync(&pairs, now);
            if added > w.last_received() {
                w.set_last_received(added);
            }
            Some(proto::synced_frame(added))
        }
        Ok(ServerMsg::Synced(added)) => {
            answers_due.pop_front();
            w.on_synced(added, now);
            None
        }
        Ok(ServerMsg::Ping) => Some(proto::pong_frame(w.own_added())),
        Ok(ServerMsg::Pong) => {
            answers_due.pop_front();
            w.on_pong(now);
            None
        }
        Ok(ServerMsg::Error(kind)) => return Step::End(End::ServerError(kind)),
        Ok(ServerMsg::Debug) => {
            ctx.errors.add("debug");
            None
        }
        Ok(ServerMsg::Headers) => None,
        Ok(ServerMsg::Connected { .. }) => {
            ctx.errors.add("protocol:second_connected");
            None
        }
        Ok(ServerMsg::Unknown(kind)) => {
            ctx.errors.add(&format!("protocol:unknown_message:{kind}"));
            None
        }
    };
    if let Some(reply) = reply {
        if ws.feed(Message::text(reply)).await.is_err() {
            return Step::End(End::WriteFailed);
        }
    }
    Step::Continue
}

/// Wall-clock time in µs since the epoch (action ids and `sent_at_ms` use the wall clock).
pub fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Wall-clock time in ms since the epoch.
pub fn wall_ms() -> u64 {
    wall_us() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_follow_logux() {
        for _ in 0..1000 {
            let d = delay_after_drop_ms();
            assert!((500..=1500).contains(&d), "{d}");
            let d = backoff_ms(1);
            assert!((1000..=3000).contains(&d), "{d}");
            assert_eq!(backoff_ms(3), 5000);
        }
    }
}
