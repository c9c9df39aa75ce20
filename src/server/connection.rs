//! One client connection, whatever the transport: reads frames into the protocol session,
//! runs authentication, hands actions to the pipeline worker, and writes the outbox.
//!
//! Transports adapt their sockets to a `Stream` of `Inbound` and a `Sink` of text frames.

use super::admission::HeavyPermit;
use super::hub::{ConnHandle, Outbound};
use super::pipeline::Worker;
use super::Server;
use crate::action::Entry;
use crate::metrics::ConnectionGauge;
use crate::peer::Peer;
use crate::protocol::{AuthRequest, IncomingSync, Output, ProtocolError, Session};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::collections::{HashSet, VecDeque};
use std::fmt::Display;
use std::future::{pending, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, AcquireError, OwnedSemaphorePermit, TryAcquireError};
use tokio::time::{sleep_until, Instant};

/// How long a connection may take at shutdown to answer the `sync`s it already received.
pub const SHUTDOWN_CONNECTION_DRAIN_MS: u64 = 3_000;

/// One `sync` for the worker: when it arrived, its actions, and its shares of the budgets
/// (released when the worker is done with it).
/// Boxed: a channel allocates its slots in blocks of 32, and an idle connection's jobs
/// channel then costs 32 pointers instead of 32 whole jobs.
pub type Job = Box<(Instant, IncomingSync, SyncBudget)>;

/// A `sync`'s shares of the budgets it is held against until its actions are durable: this
/// connection's queue (`PIPELINE_QUEUE_ACTIONS_MAX`) and, for a frame larger than
/// `BACKLOG_FREE_FRAME_BYTES_MAX`, the server's backlog (`limits.pipeline_backlog_bytes`).
#[derive(Debug)]
pub struct SyncBudget {
    _queue: OwnedSemaphorePermit,
    _backlog: Option<OwnedSemaphorePermit>,
}

/// `sync` frames up to this size are not held against `limits.pipeline_backlog_bytes`: a
/// subscription or the action or two a connected client sends must not wait behind other
/// clients' offline backlogs (a subscription queued behind a whole storm would read its
/// channel's history only after the storm, mostly from disk). What such frames hold is
/// bounded per connection (`PIPELINE_QUEUE_SYNCS_MAX`, `APPENDS_IN_FLIGHT_MAX`).
pub const BACKLOG_FREE_FRAME_BYTES_MAX: usize = 1024;

/// How long the final close may wait for the client to take the close frame.
pub const CLOSE_WAIT_MS: u64 = 1_000;

/// How long one write to a client may stall (it does not read) before it is disconnected.
pub const WRITE_STALL_MS: u64 = 10_000;

/// Actions (pairs of all queued `sync` messages) one client may have waiting for its worker:
/// the queue is bounded by content, not only by message count.
pub const PIPELINE_QUEUE_ACTIONS_MAX: u32 = 100_000;

/// Text frames of at least this many bytes are handled inside `block_in_place`: a
/// weeks-offline client's backlog in one `sync` (tens of MB) takes its worker thread for
/// hundreds of ms, and the other connections on that worker must not wait for it.
pub const LARGE_FRAME_BYTES: usize = 256 * 1024;

/// Largest `sync` frame of deliveries, estimated from the actions' JSON and
/// `DELIVERY_META_BYTES` per meta: actions queued back to back for one client go out in one
/// frame up to this size (protocol 5 allows any number of action/meta pairs per `sync`).
pub const DELIVERY_FRAME_BYTES_MAX: usize = 256 * 1024;

/// The estimated size of one delivered action's meta in a `sync` frame.
const DELIVERY_META_BYTES: usize = 96;

/// Most frames the connection writes before one flush of the socket.
pub const FLUSH_FRAMES_MAX: usize = 256;

/// Live deliveries a connection may hold while a catch-up is open, per slot of its outbox
/// (`[limits] outbox_len`); past that the client is disconnected (without an error) and
/// catches up on reconnect.
pub const HELD_PER_OUTBOX_SLOT_MAX: usize = 16;

/// `sync` messages of one client waiting for its pipeline worker.
pub const PIPELINE_QUEUE_SYNCS_MAX: usize = 16;

/// How many recently sent positions a connection remembers to avoid sending an action twice
/// when a catch-up and a live delivery overlap.
pub const RECENT_SENT_POSITIONS_MAX: usize = 4_096;

/// What a transport hands the connection.
#[derive(Debug)]
pub enum Inbound {
    /// One text frame.
    Text(String),
    /// A frame the transport could not accept (too large, not UTF-8).
    Invalid(ProtocolError),
}

/// How authentication and admission ended.
#[derive(Debug)]
enum AuthResult {
    /// Credentials are good and the waiting room let the client in; heavy clients hold a
    /// permit until their catch-up is sent.
    Admitted(Option<HeavyPermit>),
    /// Wrong credentials.
    Denied,
    /// The back-end's auth hook refused the client's subprotocol.
    WrongSubprotocol,
    /// The client waited too long: close without an error so it simply retries.
    NotAdmitted,
}

/// Remembers the last positions sent, to drop a second copy of the same action.
#[derive(Debug, Default)]
struct RecentlySent {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

impl RecentlySent {
    /// Records `added`; false when it was sent recently.
    fn insert(&mut self, added: u64) -> bool {
        if !self.set.insert(added) {
            return false;
        }
        self.order.push_back(added);
        if self.order.len() > RECENT_SENT_POSITIONS_MAX {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// Why a connection starts a pipeline worker.
enum WorkerStart {
    /// Just authenticated: the connect catch-up, with the handshake's heavy-resync slot.
    First(Option<HeavyPermit>),
    /// The previous worker retired (or is retiring): this `sync` goes to a new one.
    Successor(Job),
}

/// The state of one connection's task.
struct Connection {
    server: Arc<Server>,
    peer: Peer,
    session: Session,
    handle: Option<Arc<ConnHandle>>,
    outbox: Option<mpsc::Receiver<Outbound>>,
    jobs: Option<mpsc::Sender<Job>>,
    /// Permits for the actions queued for the worker (`PIPELINE_QUEUE_ACTIONS_MAX`).
    pipeline_budget: Arc<tokio::sync::Semaphore>,
    /// The pipeline worker, awaited at shutdown so in-flight `sync`s are answered. It
    /// retires when it has nothing to do (then this is `None`, and so is `jobs`); the next
    /// `sync` starts a successor.
    worker: Option<tokio::task::JoinHandle<()>>,
    /// The client's subprotocol and its `synced` from `connect`, for successor workers.
    subprotocol: u32,
    connect_synced: u64,
    auth: Option<oneshot::Receiver<AuthResult>>,
    /// Open catch-ups; live entries are held while any is open.
    catchups_open: usize,
    held: Vec<Arc<Entry>>,
    recent: RecentlySent,
    /// Highest position sent by a catch-up or covered by a snapshot.
    catchup_max: u64,
    /// `sync`s received but not yet handed to the worker, oldest first, each with the time it
    /// arrived and its share of the server's backlog. While any waits (the worker's queue or
    /// the action budget is full), nothing more is read from the socket: that is the
    /// backpressure on a client that sends faster than its actions are stored. The
    /// connection never awaits the worker's queue, so it keeps writing the answers the
    /// worker produces and its timers keep running.
    waiting: VecDeque<(Instant, IncomingSync, Option<OwnedSemaphorePermit>)>,
    /// A `sync` frame kept as text until the server's backlog has room for it; nothing more
    /// is read meanwhile (see `Parked`).
    parked: Option<Parked>,
    /// Entries to send in the next `sync` frame: deliveries queued back to back go out in
    /// one frame, up to `DELIVERY_FRAME_BYTES_MAX` (estimated).
    coalesced: Vec<Arc<Entry>>,
    coalesced_bytes: usize,
    /// Frames to write before the next flush.
    pending_frames: Vec<String>,
    close: bool,
}

/// A `sync` frame that did not fit in the server's backlog (`limits.pipeline_backlog_bytes`):
/// kept as text, which costs a fraction of the decoded and judged actions, until its share is
/// free. The share is asked for once, so parked connections get it in the order they parked.
struct Parked {
    text: String,
    /// When it arrived: the time the session decodes it at, and the `sync` latency's start.
    now_ms: i64,
    arrived: Instant,
    share: Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>,
}

/// Runs one connection until it closes.
pub async fn run<S, K, E>(server: Arc<Server>, mut incoming: S, mut outgoing: K, peer: Peer)
where
    S: Stream<Item = Inbound> + Unpin + Send + 'static,
    K: Sink<String, Error = E> + Unpin + Send + 'static,
    E: Display,
{
    let limits = &server.config.limits;
    let handshake_deadline = Instant::now() + Duration::from_millis(limits.handshake_timeout_ms);
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    let mut idle_deadline = Instant::now() + idle;
    let mut gauge = ConnectionGauge::new(&server.metrics, peer.transport, "handshaking");
    let mut conn = Connection::new(server.clone(), peer);
    loop {
        let handle = conn.handle.clone();
        let deadline = if conn.session.is_handshaking() {
            handshake_deadline.min(idle_deadline)
        } else {
            idle_deadline
        };
        tokio::select! {
            biased;
            _ = kicked(handle.as_deref()) => {
                conn.close = true;
            }
            _ = server.shut_down() => {
                conn.close = true;
            }
            result = auth_result(&mut conn.auth) => {
                conn.auth = None;
                conn.finish_auth(result);
                if conn.handle.is_some() {
                    gauge.set("admitted");
                }
            }
            _ = worker_finished(&mut conn.worker) => {
                // Dropping the handle frees the finished task.
                conn.worker = None;
                conn.jobs = None;
            }
            item = next_outbound(&mut conn.outbox) => {
                match item {
                    Some(item) => conn.outbound_burst(item),
                    None => conn.close = true,
                }
            }
            _ = room_for_waiting(&conn.waiting, &conn.pipeline_budget, conn.jobs.as_ref()),
                if !conn.waiting.is_empty() => {}
            share = parked_share(&mut conn.parked), if conn.parked.is_some() => {
                // The client was not idle: the server held its frame.
                idle_deadline = Instant::now() + idle;
                conn.unpark(share);
            }
            frame = incoming.next(), if conn.waiting.is_empty() && conn.parked.is_none() => {
                idle_deadline = Instant::now() + idle;
                conn.inbound(frame);
            }
            _ = sleep_until(deadline), if conn.parked.is_none() => {
                tracing::debug!(addr = %conn.peer.addr, "closing a connection that sent nothing in time");
                if conn.session.is_handshaking() {
                    server.metrics.handshakes.with_label_values(&["timeout"]).inc();
                }
                conn.close = true;
            }
        }
        conn.dispatch_waiting();
        conn.flush_coalesced();
        if !conn.pending_frames.is_empty() {
            // Traffic in either direction keeps a connection alive, as the Logux ping timer
            // does: a client busy receiving a long catch-up sends no ping.
            idle_deadline = Instant::now() + idle;
            if !conn.write_pending(&mut outgoing).await {
                conn.close = true;
            }
        }
        if conn.close {
            break;
        }
    }
    conn.finish(incoming, outgoing).await;
}

impl Connection {
    fn new(server: Arc<Server>, peer: Peer) -> Connection {
        Connection {
            session: Session::new(server.session_config.clone()),
            server,
            peer,
            handle: None,
            outbox: None,
            jobs: None,
            pipeline_budget: Arc::new(tokio::sync::Semaphore::new(
                PIPELINE_QUEUE_ACTIONS_MAX as usize,
            )),
            worker: None,
            subprotocol: 0,
            connect_synced: 0,
            auth: None,
            catchups_open: 0,
            held: Vec::new(),
            recent: RecentlySent::default(),
            catchup_max: 0,
            waiting: VecDeque::new(),
            parked: None,
            coalesced: Vec::new(),
            coalesced_bytes: 0,
            pending_frames: Vec::new(),
            close: false,
        }
    }

    /// One frame from the client, or its end (`None`).
    fn inbound(&mut self, frame: Option<Inbound>) {
        let outputs = match frame {
            Some(Inbound::Text(text)) => {
                let now = self.server.clock.now_ms();
                let Some(share) = self.backlog_share(&text) else {
                    return self.park(text, now);
                };
                let outputs = self.receive(&text, now);
                return self.execute_charged(outputs, Instant::now(), share);
            }
            Some(Inbound::Invalid(error)) => self.session.fail(error),
            None => {
                self.close = true;
                return;
            }
        };
        self.execute(outputs);
    }

    /// The frame's share of the server's backlog: `Some(None)` when it needs none (not a
    /// `sync`, a small one, or before authentication, when the session queues it within its
    /// own limit), `None` when the backlog has no room for it now.
    fn backlog_share(&self, text: &str) -> Option<Option<OwnedSemaphorePermit>> {
        if self.handle.is_none()
            || text.len() <= BACKLOG_FREE_FRAME_BYTES_MAX
            || !crate::protocol::message::may_be_sync(text)
        {
            return Some(None);
        }
        match Arc::clone(&self.server.backlog).try_acquire_many_owned(self.backlog_cost(text)) {
            Ok(share) => Some(Some(share)),
            Err(TryAcquireError::NoPermits) => None,
            // Never closed; a closed budget would only mean there is nothing to hold.
            Err(TryAcquireError::Closed) => Some(None),
        }
    }

    /// A frame's share of the backlog: its length, at most the whole backlog (a frame larger
    /// than the backlog waits until the pipeline is otherwise empty).
    fn backlog_cost(&self, text: &str) -> u32 {
        let whole = self.server.config.limits.pipeline_backlog_bytes;
        u32::try_from(text.len().min(whole)).unwrap_or(u32::MAX)
    }

    /// Decodes and judges one text frame. A large one is handled inside `block_in_place` on a
    /// multi-thread runtime, so the runtime hands this worker's other connections to another
    /// thread meanwhile.
    fn receive(&mut self, text: &str, now_ms: i64) -> Vec<Output> {
        let session = &mut self.session;
        if text.len() >= LARGE_FRAME_BYTES && may_block_in_place() {
            tokio::task::block_in_place(|| session.receive(text, now_ms))
        } else {
            session.receive(text, now_ms)
        }
    }

    /// Keeps a `sync` frame undecoded until the backlog has room for it.
    fn park(&mut self, text: String, now_ms: i64) {
        let cost = self.backlog_cost(&text);
        let share = Arc::clone(&self.server.backlog).acquire_many_owned(cost);
        self.parked = Some(Parked {
            text,
            now_ms,
            arrived: Instant::now(),
            share: Box::pin(share),
        });
    }

    /// The parked frame's share is free: decode it now, as if it had just arrived.
    fn unpark(&mut self, share: Result<OwnedSemaphorePermit, AcquireError>) {
        let Some(parked) = self.parked.take() else {
            return;
        };
        let outputs = self.receive(&parked.text, parked.now_ms);
        self.execute_charged(outputs, parked.arrived, share.ok());
    }

    /// Takes `item` and what is already queued behind it, so one flush carries many frames.
    fn outbound_burst(&mut self, item: Outbound) {
        self.outbound(item);
        while self.pending_frames.len() < FLUSH_FRAMES_MAX {
            match self.outbox.as_mut().map(mpsc::Receiver::try_recv) {
                Some(Ok(item)) => self.outbound(item),
                _ => break,
            }
        }
    }

    /// After the loop: drains at shutdown, unregisters, and closes the socket.
    async fn finish<S, K, E>(mut self, incoming: S, mut outgoing: K)
    where
        S: Stream<Item = Inbound> + Unpin + Send + 'static,
        K: Sink<String, Error = E> + Unpin + Send + 'static,
        E: Display,
    {
        let server = Arc::clone(&self.server);
        let conn = &mut self;
        let shutting_down = server.is_shutting_down();
        if shutting_down {
            // Shutdown waits for the hub to empty, so the socket is closed before unregistering.
            conn.drain(&mut outgoing).await;
            close_socket(&mut outgoing).await;
        }
        if let Some(handle) = conn.handle.take() {
            server.hub.unregister(&handle);
        }
        if !shutting_down {
            // Closing a socket (the close frame, the close syscall) costs tens of microseconds;
            // when a network blip drops thousands of clients at once, that work would stand in
            // line in front of the connected clients' pings. The pipeline runtime, at its lower
            // priority, does it instead.
            server.spawn_pipeline(async move {
                close_socket(&mut outgoing).await;
                drop(incoming);
            });
        }
    }
}

/// Sends the close and lets the socket go; a client that does not read cannot take the close
/// frame either, so this does not wait for it longer than `CLOSE_WAIT_MS`.
async fn close_socket<K, E>(outgoing: &mut K)
where
    K: Sink<String, Error = E> + Unpin,
    E: Display,
{
    match tokio::time::timeout(Duration::from_millis(CLOSE_WAIT_MS), outgoing.close()).await {
        Ok(Err(error)) => tracing::debug!(%error, "closing a connection failed"),
        Err(_) => tracing::debug!("a client did not take the close; dropping the socket"),
        Ok(Ok(())) => {}
    }
}

async fn kicked(handle: Option<&ConnHandle>) {
    match handle {
        Some(handle) => loop {
            if handle.is_kicked() {
                return;
            }
            handle.kick_signal.notified().await;
        },
        None => pending().await,
    }
}

/// Authentication by the back-end's `auth` hook: `Ok(true)` allowed, `Ok(false)` wrong
/// credentials; a back-end without an answer closes the socket without an error (the client
/// retries), never `wrong-credentials`, which would stop it for good.
async fn hook_auth(
    backend: &crate::backend::Backend,
    request: &AuthRequest,
    peer: &Peer,
) -> Result<bool, AuthResult> {
    use crate::backend::{Decision, HookContext};
    use crate::config::Hook;
    let context = HookContext {
        ids: &request.ids,
        subprotocol: request.subprotocol,
        peer: Some(peer),
    };
    let mut body = context.body(
        Hook::Auth,
        &backend.config.auth_headers,
        &backend.config.auth_cookies,
    );
    body.insert("token".into(), serde_json::json!(request.token));
    match backend
        .decide(Hook::Auth, &serde_json::Value::Object(body))
        .await
    {
        Ok(Decision::Allowed) => Ok(true),
        Ok(Decision::Denied | Decision::NotFound) => Ok(false),
        Ok(Decision::WrongSubprotocol) => Err(AuthResult::WrongSubprotocol),
        Err(_) => Err(AuthResult::NotAdmitted),
    }
}

async fn auth_result(auth: &mut Option<oneshot::Receiver<AuthResult>>) -> AuthResult {
    match auth {
        Some(receiver) => receiver.await.unwrap_or(AuthResult::NotAdmitted),
        None => pending().await,
    }
}

async fn worker_finished(worker: &mut Option<tokio::task::JoinHandle<()>>) {
    match worker {
        Some(handle) => {
            let _ = handle.await;
        }
        None => pending().await,
    }
}

/// Resolves once the oldest waiting `sync` may fit: the action budget has its share and the
/// worker's queue has a slot (or is closed, and a successor will take it). Only the connection
/// task takes budget and slots, so the room seen here is still there for `dispatch_waiting`.
async fn room_for_waiting(
    waiting: &VecDeque<(Instant, IncomingSync, Option<OwnedSemaphorePermit>)>,
    budget: &tokio::sync::Semaphore,
    jobs: Option<&mpsc::Sender<Job>>,
) {
    let Some((_, sync, _)) = waiting.front() else {
        return pending().await;
    };
    if budget
        .acquire_many(Connection::budget_of(sync))
        .await
        .is_err()
    {
        return pending().await;
    }
    if let Some(jobs) = jobs {
        let _ = jobs.reserve().await;
    }
}

/// Resolves with the parked frame's share of the backlog; pending forever when none is parked.
async fn parked_share(parked: &mut Option<Parked>) -> Result<OwnedSemaphorePermit, AcquireError> {
    match parked {
        Some(parked) => parked.share.as_mut().await,
        None => pending().await,
    }
}

async fn next_outbound(outbox: &mut Option<mpsc::Receiver<Outbound>>) -> Option<Outbound> {
    match outbox {
        Some(receiver) => receiver.recv().await,
        None => pending().await,
    }
}

impl Connection {
    fn execute(&mut self, outputs: Vec<Output>) {
        self.execute_charged(outputs, Instant::now(), None);
    }

    /// Like `execute`, for the outputs of one frame that arrived at `arrived` and holds
    /// `share` of the server's backlog (given to the `sync` it decoded to, if any).
    fn execute_charged(
        &mut self,
        outputs: Vec<Output>,
        arrived: Instant,
        mut share: Option<OwnedSemaphorePermit>,
    ) {
        for output in outputs {
            match output {
                Output::Frame(frame) => self.push_frame(frame),
                Output::Error(error) => {
                    let metrics = &self.server.metrics;
                    metrics
                        .protocol_errors
                        .with_label_values(&[error.kind()])
                        .inc();
                    if self.handle.is_none() {
                        let result = error.kind().replace('-', "_");
                        metrics.handshakes.with_label_values(&[&result]).inc();
                    }
                    self.push_frame(error.to_frame());
                }
                Output::Close => self.close = true,
                Output::Authenticate(request) => self.start_auth(request),
                Output::Actions(sync) => {
                    if self.handle.is_some() {
                        self.waiting.push_back((arrived, sync, share.take()));
                    }
                }
            }
        }
        self.dispatch_waiting();
    }

    /// The share of the queue budget a `sync` takes.
    fn budget_of(sync: &IncomingSync) -> u32 {
        u32::try_from(sync.entries.len())
            .unwrap_or(u32::MAX)
            .clamp(1, PIPELINE_QUEUE_ACTIONS_MAX)
    }

    /// Hands waiting `sync`s to the worker, in order, as far as its queue and the action
    /// budget allow, without waiting; a retired worker gets a successor.
    fn dispatch_waiting(&mut self) {
        while let Some((_, sync, _)) = self.waiting.front() {
            let budget = Arc::clone(&self.pipeline_budget);
            let Ok(permit) = budget.try_acquire_many_owned(Self::budget_of(sync)) else {
                return;
            };
            let slot = match self.jobs.clone() {
                Some(jobs) => match jobs.try_reserve_owned() {
                    Ok(slot) => Some(slot),
                    Err(mpsc::error::TrySendError::Full(_)) => return,
                    Err(mpsc::error::TrySendError::Closed(_)) => None,
                },
                None => None,
            };
            let Some((received, sync, backlog)) = self.waiting.pop_front() else {
                return;
            };
            let shares = SyncBudget {
                _queue: permit,
                _backlog: backlog,
            };
            let job: Job = Box::new((received, sync, shares));
            let job = match slot {
                Some(slot) => {
                    slot.send(job);
                    continue;
                }
                None => job,
            };
            // The worker retired (or is retiring): a successor takes the job.
            self.start_worker(WorkerStart::Successor(job));
        }
    }

    /// Writes and flushes the pending frames; false when the peer is gone, does not read
    /// (the write stalls for `WRITE_STALL_MS`), or the hub kicked the connection meanwhile.
    async fn write_pending<K, E>(&mut self, outgoing: &mut K) -> bool
    where
        K: Sink<String, Error = E> + Unpin,
    {
        self.flush_coalesced();
        let frames = std::mem::take(&mut self.pending_frames);
        let handle = self.handle.clone();
        let write = async {
            for frame in frames {
                if outgoing.feed(frame).await.is_err() {
                    return false;
                }
            }
            outgoing.flush().await.is_ok()
        };
        tokio::select! {
            written = write => written,
            _ = kicked(handle.as_deref()) => false,
            _ = tokio::time::sleep(Duration::from_millis(WRITE_STALL_MS)) => {
                tracing::warn!(addr = %self.peer.addr, "a client stopped reading; disconnecting it");
                self.server.metrics.slow_consumers.inc();
                false
            }
        }
    }

    /// Shutdown: reads nothing more, lets the worker finish the `sync`s it already has, and
    /// sends their `synced` answers, within `SHUTDOWN_CONNECTION_DRAIN_MS`.
    async fn drain<K, E>(&mut self, outgoing: &mut K)
    where
        K: Sink<String, Error = E> + Unpin,
    {
        // Without a sender the worker stops after the jobs already queued.
        self.jobs.take();
        let Some(mut worker) = self.worker.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_millis(SHUTDOWN_CONNECTION_DRAIN_MS);
        let mut worker_done = false;
        loop {
            tokio::select! {
                item = next_outbound(&mut self.outbox) => match item {
                    Some(item) => self.outbound(item),
                    None => break,
                },
                _ = &mut worker, if !worker_done => worker_done = true,
                _ = sleep_until(deadline) => break,
            }
            if worker_done {
                while let Some(Ok(item)) = self.outbox.as_mut().map(mpsc::Receiver::try_recv) {
                    self.outbound(item);
                }
            }
            if !self.write_pending(outgoing).await || worker_done {
                break;
            }
        }
    }

    fn start_auth(&mut self, request: AuthRequest) {
        let (tx, rx) = oneshot::channel();
        let server = self.server.clone();
        let addr = self.peer.addr;
        let peer = self.peer.clone();
        tokio::spawn(async move {
            let delay = server.bruteforce.delay_for(addr, server.clock.now_ms());
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let now = server.clock.now_ms();
            let verdict = match server.backend.as_ref().filter(|b| b.config.auth) {
                Some(backend) => hook_auth(backend, &request, &peer).await,
                None => Ok(server.auth.check(
                    request.ids.user_id.as_deref(),
                    request.token.as_deref(),
                    now,
                )),
            };
            let ok = match verdict {
                Ok(ok) => ok,
                Err(result) => {
                    let _ = tx.send(result);
                    return;
                }
            };
            let result = if ok {
                let heavy = server.admission.is_heavy(request.synced, server.log.head());
                match server.admission.admit(heavy).await {
                    Ok(permit) => AuthResult::Admitted(permit),
                    Err(_) => AuthResult::NotAdmitted,
                }
            } else {
                server.bruteforce.record_failure(addr, now);
                AuthResult::Denied
            };
            // The connection may be gone already; nothing to do then.
            let _ = tx.send(result);
        });
        self.auth = Some(rx);
    }

    fn finish_auth(&mut self, result: AuthResult) {
        let permit = match result {
            AuthResult::Admitted(permit) => permit,
            AuthResult::WrongSubprotocol => {
                let outputs = self.session.auth_wrong_subprotocol();
                self.execute(outputs);
                return;
            }
            AuthResult::Denied => {
                tracing::info!(addr = %self.peer.addr, transport = self.peer.transport, "authentication failed");
                let outputs = self.session.auth_failed();
                self.execute(outputs);
                return;
            }
            AuthResult::NotAdmitted => {
                tracing::debug!(addr = %self.peer.addr, "not admitted before the deadline; closing so the client retries");
                self.server
                    .metrics
                    .handshakes
                    .with_label_values(&["not_admitted"])
                    .inc();
                self.close = true;
                return;
            }
        };
        let Some(remote) = self.session.remote_pending().cloned() else {
            return;
        };
        let limits = &self.server.config.limits;
        let (outbox_tx, outbox_rx) = mpsc::channel(limits.outbox_len);
        // The first worker's connect catch-up is open from the moment the hub can deliver:
        // it closes it with `CatchupDone` (or the connection closes).
        self.catchups_open += 1;
        let handle = self.server.hub.register(remote.ids.clone(), outbox_tx);
        if let Some(kicks) = &self.server.kicks {
            kicks.announce(&remote.ids.client_id);
        }
        self.handle = Some(handle);
        self.outbox = Some(outbox_rx);
        self.subprotocol = remote.subprotocol;
        self.connect_synced = remote.synced;
        self.start_worker(WorkerStart::First(permit));
        self.server
            .metrics
            .handshakes
            .with_label_values(&["ok"])
            .inc();
        tracing::debug!(node = %remote.ids.node_id, transport = self.peer.transport, "client authenticated");
        let outputs = self.session.authenticated(self.server.clock.now_ms());
        self.execute(outputs);
    }

    /// Starts a pipeline worker with a fresh queue. The first one sends the connect
    /// catch-up; a successor waits for the worker before it, so `sync`s are still handled in
    /// order.
    fn start_worker(&mut self, start: WorkerStart) {
        let Some(handle) = self.handle.clone() else {
            return;
        };
        let (jobs_tx, jobs_rx) = mpsc::channel(PIPELINE_QUEUE_SYNCS_MAX);
        let worker = match start {
            WorkerStart::First(permit) => {
                Worker::new(self.server.clone(), handle, self.connect_synced, permit)
            }
            WorkerStart::Successor(job) => {
                // A fresh queue has room for one job.
                let _ = jobs_tx.try_send(job);
                Worker::new(self.server.clone(), handle, self.connect_synced, None).successor()
            }
        }
        .with_client(self.peer.clone(), self.subprotocol);
        let previous = self.worker.take();
        self.worker = Some(self.server.spawn_pipeline(worker.run(jobs_rx, previous)));
        self.jobs = Some(jobs_tx);
    }

    fn outbound(&mut self, item: Outbound) {
        match item {
            Outbound::Entries(entries) => {
                if self.catchups_open > 0 {
                    self.held.extend(entries);
                    let held_max = self.server.config.limits.outbox_len * HELD_PER_OUTBOX_SLOT_MAX;
                    if self.held.len() > held_max {
                        tracing::warn!(
                            "too many live actions held during a catch-up, disconnecting"
                        );
                        self.close = true;
                    }
                } else {
                    self.send_entries(entries, false);
                }
            }
            Outbound::CatchupPending => self.catchups_open += 1,
            Outbound::Catchup(entries) => self.send_entries(entries, true),
            Outbound::CatchupDone => {
                self.catchups_open = self.catchups_open.saturating_sub(1);
                if self.catchups_open == 0 && !self.held.is_empty() {
                    let mut held = std::mem::take(&mut self.held);
                    held.sort_by_key(|entry| entry.meta.added);
                    self.send_entries(held, false);
                }
            }
            Outbound::Absorbed(positions) => {
                for added in positions {
                    self.recent.insert(added);
                    self.catchup_max = self.catchup_max.max(added);
                }
            }
            Outbound::Synced(added) => self.push_frame(Session::synced_frame(&added)),
            Outbound::Frame(frame) => self.push_frame(frame),
        }
    }

    /// Sends entries, dropping second copies. Only positions up to the highest one a catch-up
    /// covered can be repeats (live deliveries come once each, in order), so only those pay
    /// for the bookkeeping.
    fn send_entries(&mut self, entries: Vec<Arc<Entry>>, from_catchup: bool) {
        let fresh: Vec<_> = entries
            .into_iter()
            // Unstored server actions (snapshots) have no position and are never repeats.
            .filter(|entry| {
                let added = entry.meta.added;
                if added == 0 {
                    true
                } else if from_catchup {
                    self.catchup_max = self.catchup_max.max(added);
                    self.recent.insert(added)
                } else {
                    added > self.catchup_max || self.recent.insert(added)
                }
            })
            .collect();
        self.server
            .metrics
            .actions_delivered
            .inc_by(fresh.len() as u64);
        for entry in fresh {
            self.coalesced_bytes += entry.action_json().len() + DELIVERY_META_BYTES;
            self.coalesced.push(entry);
            if self.coalesced_bytes >= DELIVERY_FRAME_BYTES_MAX {
                self.flush_coalesced();
            }
        }
    }

    /// Turns the coalesced entries into one `sync` frame.
    fn flush_coalesced(&mut self) {
        if self.coalesced.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut self.coalesced);
        self.coalesced_bytes = 0;
        if let Some(frame) = self.session.sync_frame(&entries) {
            self.pending_frames.push(frame);
        }
    }

    /// Queues a frame after the deliveries already queued.
    fn push_frame(&mut self, frame: String) {
        self.flush_coalesced();
        self.pending_frames.push(frame);
    }
}

/// Whether `block_in_place` works here: only on a multi-thread runtime (it panics on a
/// current-thread one, which tests and embedders may use).
fn may_block_in_place() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}
