//! The newest durable entries, kept in memory.
//!
//! Readers of recent history (a subscription right after a storm, a reconnecting client's
//! catch-up) mostly ask for entries committed seconds ago. Serving those from the `Arc`s the
//! writer already holds skips a sled lookup and a decode of the stored record per entry; in a
//! 5,000-client storm those two were a quarter of the pipeline thread. Older entries come from
//! sled as before, so the window changes speed, never answers.

use crate::action::Entry;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Estimated memory of a kept entry beyond its stored JSON: the `Arc`ed `Entry` itself (a
/// 256-byte allocation) and the heap blocks of its meta and action text.
pub(super) const ENTRY_OVERHEAD_BYTES: usize = 320;

/// Estimated bytes a kept entry takes in memory, from the length of its stored JSON. Kept
/// entries hold their action as text only (`Entry::keep_json_only`), so the action and the
/// meta's strings take about what their JSON does.
pub(super) fn estimated_bytes(json_len: usize) -> usize {
    ENTRY_OVERHEAD_BYTES.saturating_add(json_len)
}

/// Whether readers are likely to ask for `entry` again soon: channel entries are read by every
/// subscription to their channel, and entries for users by each of their connections. An
/// entry only for some clients or nodes (the `logux/processed` answer to a client's action)
/// is read only when that client reconnects, so keeping it would halve what the window holds
/// for everybody else.
fn rereads_likely(entry: &Entry) -> bool {
    !entry.meta.channels.is_empty() || !entry.meta.users.is_empty()
}

/// The newest entries likely to be read again (see `rereads_likely`), ascending by `added`,
/// within a memory budget.
pub(super) struct RecentEntries {
    /// The budget; 0 keeps nothing.
    bytes_max: usize,
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    /// `(added, entry, estimated bytes)`, ascending by `added`.
    entries: VecDeque<(u64, Arc<Entry>, usize)>,
    /// Sum of the estimated bytes.
    bytes: usize,
}

impl RecentEntries {
    /// An empty window with a budget of `bytes_max`.
    pub(super) fn new(bytes_max: usize) -> RecentEntries {
        RecentEntries {
            bytes_max,
            window: Mutex::new(Window::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds entries that were just made durable, each with its estimated size, and forgets
    /// the oldest ones beyond the budget. Entries must come in ascending `added`, above every
    /// entry already kept; one that does not is not kept.
    pub(super) fn push(&self, entries: &[Arc<Entry>], sizes: &[usize]) {
        if self.bytes_max == 0 {
            return;
        }
        let mut window = self.lock();
        for (entry, &size) in entries.iter().zip(sizes) {
            if !rereads_likely(entry) {
                continue;
            }
            let added = entry.meta.added;
            if window
                .entries
                .back()
                .is_some_and(|(last, _, _)| *last >= added)
            {
                continue;
            }
            window.entries.push_back((added, Arc::clone(entry), size));
            window.bytes = window.bytes.saturating_add(size);
        }
        while window.bytes > self.bytes_max {
            let Some((_, _, size)) = window.entries.pop_front() else {
                break;
            };
            window.bytes = window.bytes.saturating_sub(size);
        }
    }

    /// The kept entry at `added`, if it is in the window.
    pub(super) fn get(&self, added: u64) -> Option<Arc<Entry>> {
        let window = self.lock();
        let (first, _, _) = window.entries.front()?;
        if added < *first {
            return None;
        }
        // Positions are dense unless an append failed, so the offset is almost always right.
        let guess = usize::try_from(added - first).ok()?;
        let index = match window.entries.get(guess) {
            Some((at, _, _)) if *at == added => guess,
            _ => window
                .entries
                .binary_search_by_key(&added, |(at, _, _)| *at)
                .ok()?,
        };
        window
            .entries
            .get(index)
            .map(|(_, entry, _)| Arc::clone(entry))
    }

    /// Forgets the entries with `added < before` (retention removed them).
    pub(super) fn remove_before(&self, before: u64) {
        let mut window = self.lock();
        let cut = window
            .entries
            .partition_point(|(added, _, _)| *added < before);
        let freed: usize = window.entries.drain(..cut).map(|(_, _, size)| size).sum();
        window.bytes = window.bytes.saturating_sub(freed);
    }

    /// Number of entries kept (tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::Meta;
    use serde_json::json;

    fn entry(added: u64) -> Arc<Entry> {
        Arc::new(Entry::new(
            json!({ "type": "a" }),
            Meta {
                id: format!("{added} n 0"),
                added,
                channels: vec!["room".to_owned()],
                ..Meta::default()
            },
        ))
    }

    #[test]
    fn answers_only_for_clients_are_not_kept() {
        let recent = RecentEntries::new(1_000);
        let mut answer = Entry::clone(&entry(2));
        answer.meta.channels.clear();
        answer.meta.clients = vec!["10:a".to_owned()];
        let mut for_user = Entry::clone(&entry(3));
        for_user.meta.channels.clear();
        for_user.meta.users = vec!["10".to_owned()];
        recent.push(&[entry(1), Arc::new(answer), Arc::new(for_user)], &[10; 3]);
        assert!(recent.get(1).is_some());
        assert!(recent.get(2).is_none(), "read from storage instead");
        assert!(recent.get(3).is_some());
    }

    #[test]
    fn finds_kept_entries_with_and_without_gaps() {
        let recent = RecentEntries::new(1_000);
        let entries = [entry(3), entry(4), entry(6), entry(7)];
        recent.push(&entries, &[10; 4]);
        for added in [3, 4, 6, 7] {
            assert_eq!(recent.get(added).map(|e| e.meta.added), Some(added));
        }
        for added in [1, 2, 5, 8] {
            assert!(recent.get(added).is_none(), "{added}");
        }
    }

    #[test]
    fn forgets_the_oldest_entries_beyond_the_budget() {
        let recent = RecentEntries::new(25);
        let entries: Vec<_> = (1..=5).map(entry).collect();
        recent.push(&entries, &[10; 5]);
        assert_eq!(recent.len(), 2);
        assert!(recent.get(3).is_none());
        assert!(recent.get(4).is_some() && recent.get(5).is_some());
    }

    #[test]
    fn a_zero_budget_keeps_nothing_and_old_positions_are_refused() {
        let none = RecentEntries::new(0);
        none.push(&[entry(1)], &[1]);
        assert!(none.get(1).is_none());

        let recent = RecentEntries::new(100);
        recent.push(&[entry(5)], &[1]);
        recent.push(&[entry(4), entry(6)], &[1, 1]);
        assert!(
            recent.get(4).is_none(),
            "an entry below the newest is not kept"
        );
        assert!(recent.get(6).is_some());
    }

    #[test]
    fn retention_removes_entries_from_the_window() {
        let recent = RecentEntries::new(1_000);
        let entries: Vec<_> = (1..=4).map(entry).collect();
        recent.push(&entries, &[10; 4]);
        recent.remove_before(3);
        assert!(recent.get(2).is_none());
        assert_eq!(recent.get(3).map(|e| e.meta.added), Some(3));
        assert_eq!(recent.len(), 2);
    }
}
