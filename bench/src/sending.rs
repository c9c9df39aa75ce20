//! A client's own actions on their way to the server, shared by `fanout`, `acks` and
//! `backlog`: sent in `sync` frames of up to `batch` actions, with at most `window` frames
//! waiting for `synced` (optionally at a steady rate), re-sent with the same ids on the next
//! connection when their `synced` never came, and answered once by `logux/processed` or
//! `logux/undo`. It times each action from its first send to its `synced` and to its answer.
//!
//! No IO and no socket: a scenario's [`crate::client::Workload`] asks it for frames and feeds it
//! the answers.

use crate::client::Outgoing;
use crate::proto::{self, IdGen, SyncFrame};
use crate::stats::ErrorCounts;
use std::time::Duration;
use tokio::time::Instant;

/// One own action.
#[derive(Debug, Clone)]
pub struct Act {
    /// Id `ms`.
    pub ms: u64,
    /// Id `seq`.
    pub seq: u32,
    /// Our log position.
    pub added: u64,
    /// Wall clock when first sent, µs (0 = not sent yet).
    pub sent_us: u64,
    /// `added` of the `sync` it went out in on this connection (0 = not sent).
    pub in_sync: u64,
    /// Got `synced`.
    pub synced: bool,
    /// Times `logux/processed`/`undo` arrived.
    pub answers: u8,
}

/// What an answer (`logux/processed` or `logux/undo`) was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// None of our actions.
    Unknown,
    /// The first `logux/processed` of an action.
    Processed,
    /// The first `logux/undo` of an action.
    Undone,
    /// A second (or later) answer for one action.
    Duplicate,
}

/// How a client sends its actions.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Actions to send in all.
    pub total: usize,
    /// Most `sync` frames without `synced`.
    pub window: usize,
    /// Most actions in one `sync` frame.
    pub batch: usize,
    /// Time between two new frames, if rate-limited.
    pub interval: Option<Duration>,
}

/// A client's own actions and what became of them.
#[derive(Debug)]
pub struct Sending {
    /// How to send.
    pace: Pace,
    /// Id generator (also for other own actions, like a subscribe: [`Sending::next_id`]).
    ids: IdGen,
    /// Our log position.
    pub own_added: u64,
    /// Every action created so far, in id and `added` order.
    pub acts: Vec<Act>,
    /// `sync` frames without `synced` on this connection.
    in_flight: usize,
    /// Unacknowledged actions must be re-sent on this connection.
    resend: bool,
    /// Earliest time of the next new frame when rate-limited.
    next_send_at: Instant,
    /// Actions answered with processed.
    pub processed: usize,
    /// Actions answered with undo.
    pub undone: usize,
    /// Answers beyond the first for one action.
    pub duplicated_answers: u64,
    /// Actions that got `synced`.
    pub synced: usize,
    /// First send to `synced`, µs, one per action.
    pub synced_latencies_us: Vec<u32>,
    /// First send to `logux/processed`/`undo`, µs, one per action.
    pub answer_latencies_us: Vec<u32>,
    /// When the last action got `synced`.
    pub last_synced: Option<Instant>,
    /// When the last action was answered.
    pub last_answered: Option<Instant>,
}

fn us_u32(us: u64) -> u32 {
    us.min(u64::from(u32::MAX)) as u32
}

impl Sending {
    /// Nothing created yet.
    pub fn new(pace: Pace) -> Sending {
        Sending {
            pace,
            ids: IdGen::default(),
            own_added: 0,
            acts: Vec::with_capacity(pace.total),
            in_flight: 0,
            resend: false,
            next_send_at: Instant::now(),
            processed: 0,
            undone: 0,
            duplicated_answers: 0,
            synced: 0,
            synced_latencies_us: Vec::with_capacity(pace.total),
            answer_latencies_us: Vec::with_capacity(pace.total),
            last_synced: None,
            last_answered: None,
        }
    }

    /// The id (`ms`, `seq`) and `added` of a new own action created at `now_ms`.
    pub fn next_id(&mut self, now_ms: u64) -> (u64, u32, u64) {
        let (ms, seq) = self.ids.next(now_ms);
        self.own_added += 1;
        (ms, seq, self.own_added)
    }

    fn create(&mut self, now_ms: u64) {
        let (ms, seq, added) = self.next_id(now_ms);
        self.acts.push(Act {
            ms,
            seq,
            added,
            sent_us: 0,
            in_sync: 0,
            synced: false,
            answers: 0,
        });
    }

    /// Creates every action now, unsent, as an offline client has them when it comes back;
    /// they go out as re-sends (up to `batch` per frame) on each connection.
    pub fn create_offline(&mut self, now_ms: u64) {
        while self.acts.len() < self.pace.total {
            self.create(now_ms);
        }
    }

    /// Every action is created.
    pub fn all_created(&self) -> bool {
        self.acts.len() >= self.pace.total
    }

    /// Every action got `synced` and an answer.
    pub fn all_answered(&self) -> bool {
        self.all_created() && self.synced >= self.pace.total && self.answered() >= self.pace.total
    }

    /// Actions answered once (processed or undone).
    pub fn answered(&self) -> usize {
        self.processed + self.undone
    }

    /// A connection is established: unacknowledged actions are re-sent on it.
    pub fn on_connected(&mut self) {
        self.resend = true;
    }

    /// The connection ended: nothing is in flight any more.
    pub fn on_closed(&mut self) {
        for act in &mut self.acts {
            act.in_sync = 0;
        }
        self.in_flight = 0;
        self.resend = false;
    }

    /// The next `sync` frame: first what an earlier connection sent without `synced` (or
    /// what was created offline), then, when `may_send_new`, new actions as the window and
    /// the rate allow. `action(i, sent_us)` is the JSON of action `i` first sent at
    /// `sent_us` (wall µs).
    pub fn next_frame(
        &mut self,
        now: Instant,
        base_time: i64,
        may_send_new: bool,
        action: impl Fn(usize, u64) -> String,
    ) -> Option<Outgoing> {
        let mut picked: Vec<usize> = Vec::new();
        if self.resend {
            picked.extend(
                self.acts
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| !a.synced && a.in_sync == 0)
                    .map(|(i, _)| i)
                    .take(self.pace.batch),
            );
            if picked.is_empty() {
                self.resend = false;
            }
        }
        if picked.is_empty() {
            if !may_send_new || self.all_created() || self.in_flight >= self.pace.window {
                return None;
            }
            if let Some(interval) = self.pace.interval {
                if now < self.next_send_at {
                    return None;
                }
                // A steady rate; after a stall (window full), no burst of catch-up sends.
                self.next_send_at += interval;
                if self.next_send_at <= now {
                    self.next_send_at = now + interval;
                }
            }
            let first = self.acts.len();
            let count = self.pace.batch.min(self.pace.total - first);
            let now_ms = crate::client::wall_ms();
            for _ in 0..count {
                self.create(now_ms);
            }
            picked.extend(first..first + count);
        }
        let last = *picked.last()?;
        let added = self.acts[last].added;
        let sent_us = crate::client::wall_us();
        let mut frame = SyncFrame::new(added);
        for i in picked {
            let act = &mut self.acts[i];
            if act.sent_us == 0 {
                act.sent_us = sent_us;
            }
            act.in_sync = added;
            let (ms, seq, first_sent) = (act.ms, act.seq, act.sent_us);
            frame.push(&action(i, first_sent), &proto::own_meta(ms, seq, base_time));
        }
        self.in_flight += 1;
        Some(Outgoing {
            text: frame.finish(),
            expects_answer: true,
        })
    }

    /// When [`Sending::next_frame`] may have a new frame without an answer arriving (the
    /// rate), if it is waiting for time rather than for the window.
    pub fn wake_at(&self) -> Option<Instant> {
        if self.all_created() || self.in_flight >= self.pace.window {
            return None;
        }
        self.pace.interval.map(|_| self.next_send_at)
    }

    /// A `synced`: false when no frame of ours waits for this number (a subscribe's, or a
    /// second `synced` for one frame).
    pub fn on_synced(&mut self, added: u64, now: Instant, now_us: u64) -> bool {
        let Ok(last) = self.acts.binary_search_by(|a| a.added.cmp(&added)) else {
            return false;
        };
        if self.acts[last].in_sync != added {
            return false;
        }
        // The frame's actions are the ones before `last` that went out in it.
        for act in self.acts[..=last].iter_mut().rev() {
            if act.in_sync != added {
                break;
            }
            act.in_sync = 0;
            if !act.synced {
                act.synced = true;
                self.synced += 1;
                self.synced_latencies_us
                    .push(us_u32(now_us.saturating_sub(act.sent_us)));
            }
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        self.last_synced = Some(now);
        true
    }

    /// A `logux/processed` (`undo` false) or `logux/undo` for our action `ms`/`seq`.
    pub fn on_answer(
        &mut self,
        ms: u64,
        seq: u32,
        undo: bool,
        now: Instant,
        now_us: u64,
    ) -> Answer {
        let Ok(i) = self
            .acts
            .binary_search_by(|a| (a.ms, a.seq).cmp(&(ms, seq)))
        else {
            return Answer::Unknown;
        };
        let act = &mut self.acts[i];
        act.answers = act.answers.saturating_add(1);
        if act.answers > 1 {
            self.duplicated_answers += 1;
            return Answer::Duplicate;
        }
        self.answer_latencies_us
            .push(us_u32(now_us.saturating_sub(act.sent_us)));
        self.last_answered = Some(now);
        if undo {
            self.undone += 1;
            Answer::Undone
        } else {
            self.processed += 1;
            Answer::Processed
        }
    }

    /// Actions `..n` all got `synced` and an answer.
    pub fn first_answered(&self, n: usize) -> bool {
        self.acts[..n.min(self.acts.len())]
            .iter()
            .all(|a| a.synced && a.answers > 0)
    }
}

/// The id (`ms`, `seq`) of our action that a `logux/processed` (`undo` false) or
/// `logux/undo` answers; an undo's reason is counted as `undo:<reason>`. `None`, counted as
/// `unknown_processed`, for an id of another node or none.
pub fn own_answer(
    action: &proto::Action,
    undo: bool,
    node_id: &str,
    errors: &ErrorCounts,
) -> Option<(u64, u32)> {
    if undo {
        errors.add(&format!("undo:{}", action.reason().unwrap_or("none")));
    }
    match proto::parse_action_id(action.id().unwrap_or("")) {
        Some(p) if p.node == node_id => Some((p.ms, p.seq)),
        _ => {
            errors.add("unknown_processed");
            None
        }
    }
}

/// Every client's samples of one kind, as µs for [`crate::stats::summary_ms`].
pub fn gather_us<'a>(samples: impl Iterator<Item = &'a [u32]>) -> Vec<u64> {
    samples.flatten().map(|us| u64::from(*us)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(total: usize, window: usize, batch: usize) -> Pace {
        Pace {
            total,
            window,
            batch,
            interval: None,
        }
    }

    fn act_json(i: usize, _sent: u64) -> String {
        format!("{{\"i\":{i}}}")
    }

    #[test]
    fn the_window_bounds_frames_without_synced() {
        let mut s = Sending::new(pace(5, 2, 2));
        let now = Instant::now();
        let a = s.next_frame(now, 0, true, act_json).expect("first frame");
        assert!(a.text.starts_with("[\"sync\",2,{\"i\":0},"), "{}", a.text);
        assert!(s.next_frame(now, 0, true, act_json).is_some());
        assert!(
            s.next_frame(now, 0, true, act_json).is_none(),
            "window full"
        );
        assert!(s.on_synced(2, now, 0));
        assert!(!s.on_synced(2, now, 0), "a second synced for one frame");
        assert_eq!(s.synced, 2);
        let c = s.next_frame(now, 0, true, act_json).expect("last frame");
        assert!(c.text.starts_with("[\"sync\",5,{\"i\":4},"), "{}", c.text);
        assert!(s.all_created());
        assert!(s.next_frame(now, 0, true, act_json).is_none());
    }

    #[test]
    fn unacknowledged_actions_are_re_sent_once_per_connection_with_their_ids() {
        let mut s = Sending::new(pace(3, 10, 10));
        let now = Instant::now();
        s.create_offline(1_000);
        assert!(
            s.next_frame(now, 0, false, act_json).is_none(),
            "not connected yet"
        );
        s.on_connected();
        let first = s.next_frame(now, 1_000, false, act_json).expect("backlog");
        assert_eq!(
            first.text,
            r#"["sync",3,{"i":0},{"id":0,"time":0},{"i":1},{"id":[0,1],"time":0},{"i":2},{"id":[0,2],"time":0}]"#
        );
        assert!(s.next_frame(now, 1_000, false, act_json).is_none());
        s.on_closed();
        s.on_connected();
        assert!(
            s.next_frame(now, 1_000, false, act_json).is_some(),
            "re-sent"
        );
        assert!(s.on_synced(3, now, 0));
        assert_eq!(s.on_answer(1_000, 1, false, now, 0), Answer::Processed);
        assert_eq!(s.on_answer(1_000, 1, false, now, 0), Answer::Duplicate);
        assert_eq!(s.on_answer(1_000, 9, false, now, 0), Answer::Unknown);
        assert_eq!(s.on_answer(1_000, 0, true, now, 0), Answer::Undone);
        assert!(!s.all_answered());
        assert_eq!(s.on_answer(1_000, 2, false, now, 0), Answer::Processed);
        assert!(s.all_answered());
        assert_eq!(s.duplicated_answers, 1);
    }
}
