//! The waiting room: admits authenticated clients at a steady rate during reconnect storms.
//!
//! Facts about unchanged Logux clients shape it: a client waits up to 70 s for `connected`
//! after sending `connect`; a socket that opens and then closes makes it retry in 1-1.5 s; an
//! upgrade refused at HTTP pushes it towards a 5 s back-off; fatal errors stop it for good.
//! So Ferry accepts the upgrade, reads `connect`, and holds `connected` while it is busy:
//!
//! - a token bucket (`handshakes_per_second`, `handshake_burst`) paces admissions;
//! - clients far behind the log (`heavy_resync_actions`) are heavy: at most
//!   `heavy_resyncs_max` of their catch-ups run at once, and light clients are admitted past
//!   waiting heavy ones, so cheap clients are never stuck behind expensive ones;
//! - nobody waits past `admission_deadline_ms`: the socket is then closed without an error
//!   and the client comes back 1-1.5 s later (with the client's own jitter);
//! - when `waiting_room_max` clients wait, new upgrades get HTTP 503 with a jittered
//!   `Retry-After`, which also moves Logux clients to their longer back-off.
//!
//! Connected clients are never queued here: only handshakes are.

use crate::config::Limits;
use crate::metrics::Metrics;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

/// Lowest and highest `Retry-After` seconds sent with a 503 when the waiting room is full.
pub const RETRY_AFTER_SECONDS_RANGE: (u64, u64) = (5, 10);

/// Why a client was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// It waited `admission_deadline_ms`.
    #[error("admission deadline passed")]
    Deadline,
}

/// Holds one of the `heavy_resyncs_max` slots until the client's catch-up is sent.
#[derive(Debug)]
pub struct HeavyPermit {
    admission: Arc<Admission>,
}

impl Drop for HeavyPermit {
    fn drop(&mut self) {
        let mut inner = self.admission.lock();
        inner.heavy_running = inner.heavy_running.saturating_sub(1);
        drop(inner);
        self.admission.wake.notify_one();
    }
}

/// Counts a client as waiting for as long as it is inside `admit`, even if the future is
/// dropped.
struct WaitingGuard<'a>(&'a Admission);

impl<'a> WaitingGuard<'a> {
    fn enter(admission: &'a Admission) -> Self {
        admission.waiting.fetch_add(1, Ordering::Relaxed);
        admission.metrics.waiting_room.inc();
        WaitingGuard(admission)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.waiting_room.dec();
    }
}

struct Waiter {
    ready: oneshot::Sender<Option<HeavyPermit>>,
}

#[derive(Default)]
struct Inner {
    light: VecDeque<Waiter>,
    heavy: VecDeque<Waiter>,
    heavy_running: usize,
    tokens: f64,
    refilled: Option<Instant>,
}

/// The waiting room shared by all connections.
pub struct Admission {
    rate_per_second: f64,
    burst: f64,
    heavy_resync_actions: u64,
    heavy_resyncs_max: usize,
    waiting_room_max: usize,
    deadline: Duration,
    inner: Mutex<Inner>,
    /// Clients inside `admit` that have not been admitted or refused yet.
    waiting: AtomicUsize,
    /// Wakes the dispatcher: a waiter arrived or a heavy slot was freed.
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("waiting", &self.waiting())
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// A waiting room with the `[limits]` settings; starts its dispatcher task.
    pub fn start(limits: &Limits, metrics: Arc<Metrics>) -> Arc<Admission> {
        let admission = Arc::new(Admission {
            rate_per_second: limits.handshakes_per_second as f64,
            burst: limits.handshake_burst as f64,
            heavy_resync_actions: limits.heavy_resync_actions,
            heavy_resyncs_max: limits.heavy_resyncs_max,
            waiting_room_max: limits.waiting_room_max,
            deadline: Duration::from_millis(limits.admission_deadline_ms),
            inner: Mutex::new(Inner {
                tokens: limits.handshake_burst as f64,
                ..Inner::default()
            }),
            waiting: AtomicUsize::new(0),
            wake: Arc::new(Notify::new()),
            metrics,
        });
        let weak = Arc::downgrade(&admission);
        let notify = admission.wake.clone();
        tokio::spawn(async move {
            while let Some(admission) = weak.upgrade() {
                let pause = admission.dispatch();
                // Dropping the strong handle lets the dispatcher end with the waiting room.
                drop(admission);
                let wake = notify.notified();
                match pause {
                    Some(pause) => {
                        let _ = tokio::time::timeout(pause, wake).await;
                    }
                    None => wake.await,
                }
            }
        });
        admission
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Clients waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// True when new connections should be refused with 503.
    pub fn is_full(&self) -> bool {
        self.waiting() >= self.waiting_room_max
    }

    /// A jittered `Retry-After` in seconds for a 503.
    pub fn retry_after_seconds() -> u64 {
        use rand::Rng;
        let (low, high) = RETRY_AFTER_SECONDS_RANGE;
        rand::thread_rng().gen_range(low..=high)
    }

    /// Is a client `behind` positions behind the head a heavy resync? New clients
    /// (`synced` 0) only get what is targeted at them, which is usually little: light.
    pub fn is_heavy(&self, synced: u64, head: u64) -> bool {
        synced > 0 && head.saturating_sub(synced) > self.heavy_resync_actions
    }

    fn refill(&self, inner: &mut Inner) {
        let now = Instant::now();
        let elapsed = inner
            .refilled
            .map_or(0.0, |then| now.duration_since(then).as_secs_f64());
        inner.refilled = Some(now);
        inner.tokens = (inner.tokens + elapsed * self.rate_per_second).min(self.burst);
    }

    /// Waits until the client may proceed. Heavy clients get a permit to hold until their
    /// catch-up is sent.
    pub async fn admit(
        self: &Arc<Self>,
        heavy: bool,
    ) -> Result<Option<HeavyPermit>, AdmissionError> {
        let started = Instant::now();
        let kind = if heavy { "heavy" } else { "light" };
        let receiver = {
            let mut inner = self.lock();
            self.refill(&mut inner);
            let queue_empty = inner.light.is_empty() && (heavy || inner.heavy.is_empty());
            let slot_free = !heavy || inner.heavy_running < self.heavy_resyncs_max;
            if queue_empty && slot_free && inner.tokens >= 1.0 {
                inner.tokens -= 1.0;
                let permit = heavy.then(|| {
                    inner.heavy_running += 1;
                    HeavyPermit {
                        admission: self.clone(),
                    }
                });
                drop(inner);
                self.metrics
                    .admission_wait
                    .with_label_values(&[kind])
                    .observe(0.0);
                return Ok(permit);
            }
            let (ready, receiver) = oneshot::channel();
            let waiter = Waiter { ready };
            if heavy {
                inner.heavy.push_back(waiter);
            } else {
                inner.light.push_back(waiter);
            }
            receiver
        };
        let counted = WaitingGuard::enter(self);
        self.wake.notify_one();
        let result = tokio::time::timeout(self.deadline, receiver).await;
        drop(counted);
        match result {
            Ok(Ok(permit)) => {
                self.metrics
                    .admission_wait
                    .with_label_values(&[kind])
                    .observe(started.elapsed().as_secs_f64());
                Ok(permit)
            }
            // A dropped sender means the waiting room is gone (shutdown): treat as a deadline.
            Ok(Err(_)) | Err(_) => {
                self.metrics
                    .rejections
                    .with_label_values(&["admission_deadline"])
                    .inc();
                Err(AdmissionError::Deadline)
            }
        }
    }

    /// Admits as many waiters as tokens and heavy slots allow; returns how long to wait for
    /// the next token when some are still waiting, `None` when nobody waits.
    fn dispatch(self: &Arc<Self>) -> Option<Duration> {
        let mut inner = self.lock();
        self.refill(&mut inner);
        loop {
            // Waiters whose connection gave up are skipped without using a token.
            while inner.light.front().is_some_and(|w| w.ready.is_closed()) {
                inner.light.pop_front();
            }
            while inner.heavy.front().is_some_and(|w| w.ready.is_closed()) {
                inner.heavy.pop_front();
            }
            if inner.light.is_empty() && inner.heavy.is_empty() {
                return None;
            }
            if inner.tokens < 1.0 {
                let missing = 1.0 - inner.tokens;
                return Some(Duration::from_secs_f64(missing / self.rate_per_second));
            }
            if let Some(waiter) = inner.light.pop_front() {
                if waiter.ready.send(None).is_ok() {
                    inner.tokens -= 1.0;
                }
                continue;
            }
            if inner.heavy_running >= self.heavy_resyncs_max {
                // Only heavy clients wait and every slot is taken: a released permit wakes us.
                return None;
            }
            if let Some(waiter) = inner.heavy.pop_front() {
                inner.heavy_running += 1;
                let permit = HeavyPermit {
                    admission: self.clone(),
                };
                match waiter.ready.send(Some(permit)) {
                    Ok(()) => inner.tokens -= 1.0,
                    Err(Some(permit)) => {
                        // Its drop would lock `inner` again: undo by hand and forget it.
                        inner.heavy_running -= 1;
                        std::mem::forget(permit);
                    }
                    Err(None) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: u64, burst: u64, heavy_max: usize) -> Limits {
        Limits {
            handshakes_per_second: rate,
            handshake_burst: burst,
            heavy_resyncs_max: heavy_max,
            heavy_resync_actions: 100,
            admission_deadline_ms: 2_000,
            ..Limits::default()
        }
    }

    #[tokio::test]
    async fn admits_a_burst_at_once_then_paces_at_the_rate() {
        let admission = Admission::start(&limits(100, 5, 1), Arc::new(Metrics::new()));
        let started = Instant::now();
        for _ in 0..5 {
            admission.admit(false).await.expect("admitted");
        }
        assert!(started.elapsed() < Duration::from_millis(50));
        for _ in 0..10 {
            admission.admit(false).await.expect("admitted");
        }
        // Ten more tokens at 100 per second take about 100 ms.
        assert!(
            started.elapsed() >= Duration::from_millis(80),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn light_clients_pass_heavy_ones_that_wait_for_a_slot() {
        let admission = Admission::start(&limits(10_000, 100, 1), Arc::new(Metrics::new()));
        let first = admission
            .admit(true)
            .await
            .expect("admitted")
            .expect("permit");
        let waiting_heavy = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(true).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting_heavy.is_finished(),
            "second heavy waits for the slot"
        );
        admission
            .admit(false)
            .await
            .expect("light admitted past the heavy one");
        drop(first);
        let second = waiting_heavy.await.expect("task").expect("admitted");
        assert!(second.is_some());
    }

    #[tokio::test]
    async fn a_waiter_past_the_deadline_is_refused_without_blocking_others() {
        let mut settings = limits(1, 1, 1);
        settings.admission_deadline_ms = 100;
        let admission = Admission::start(&settings, Arc::new(Metrics::new()));
        admission.admit(false).await.expect("the burst token");
        assert_eq!(
            admission.admit(false).await.err(),
            Some(AdmissionError::Deadline)
        );
        assert_eq!(admission.waiting(), 0);
    }

    #[test]
    fn new_clients_are_light_and_far_behind_ones_heavy() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let admission = Admission::start(&limits(10, 10, 1), Arc::new(Metrics::new()));
            assert!(!admission.is_heavy(0, 1_000_000));
            assert!(!admission.is_heavy(999_950, 1_000_000));
            assert!(admission.is_heavy(1, 1_000_000));
        });
    }
}
