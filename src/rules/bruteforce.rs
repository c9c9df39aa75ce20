//! The brute-force guard: addresses with recent failed authentications wait longer.

use dashmap::DashMap;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

/// How long a failed authentication counts against its address.
pub const BRUTEFORCE_FAILURE_WINDOW_MS: i64 = 3000;
/// Recent failures from one address that are not delayed at all (typos happen).
pub const BRUTEFORCE_FAILURES_FREE: usize = 3;
/// The delay after [`BRUTEFORCE_FAILURES_FREE`] failures; it doubles with each further one.
pub const BRUTEFORCE_DELAY_MS_BASE: u64 = 250;
/// The longest delay, so a client behind a busy shared address still gets in eventually.
pub const BRUTEFORCE_DELAY_MS_MAX: u64 = 5000;
/// Addresses tracked at once, bounding memory under a distributed attack.
pub const BRUTEFORCE_ADDRESSES_MAX: usize = 100_000;
/// Failures remembered per address: beyond this many the delay is already at its maximum.
const BRUTEFORCE_FAILURES_KEPT: usize = 8;

/// Slows down addresses with recent failed authentications, without ever refusing a
/// correct token (unlike the reference server, which answers `wrong-credentials`).
///
/// Refusing would lock out every user behind a shared proxy or NAT, and Logux clients stop
/// reconnecting for good after `wrong-credentials`; a delay costs an attacker the same time
/// without that collateral damage.
#[derive(Debug)]
pub struct BruteForceGuard {
    /// Recent failure times (ms) per address, oldest first, at most
    /// `BRUTEFORCE_FAILURES_KEPT` each.
    failures: DashMap<IpAddr, VecDeque<i64>>,
    /// Addresses tracked before evicting.
    addresses_max: usize,
}

impl Default for BruteForceGuard {
    fn default() -> BruteForceGuard {
        BruteForceGuard::with_addresses_max(BRUTEFORCE_ADDRESSES_MAX)
    }
}

impl BruteForceGuard {
    /// A guard tracking at most about `addresses_max` addresses (at least one).
    pub fn with_addresses_max(addresses_max: usize) -> BruteForceGuard {
        BruteForceGuard {
            failures: DashMap::new(),
            addresses_max: addresses_max.max(1),
        }
    }

    /// How long to wait before checking credentials from `ip`.
    pub fn delay_for(&self, ip: IpAddr, now_ms: i64) -> Duration {
        let recent = self
            .failures
            .get(&ip)
            .map_or(0, |times| recent_count(&times, now_ms));
        if recent == 0 {
            self.failures
                .remove_if(&ip, |_, times| recent_count(times, now_ms) == 0);
        }
        delay_after(recent)
    }

    /// Records a failed attempt from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now_ms: i64) {
        if !self.failures.contains_key(&ip) && self.failures.len() >= self.addresses_max {
            self.evict(now_ms);
        }
        let mut times = self.failures.entry(ip).or_default();
        times.retain(|&time| is_recent(time, now_ms));
        times.push_back(now_ms);
        while times.len() > BRUTEFORCE_FAILURES_KEPT {
            times.pop_front();
        }
    }

    /// Makes room: forgets expired addresses, then, if every address is still active, the
    /// tenth with the oldest latest failure (in one pass, so eviction stays cheap per insert).
    fn evict(&self, now_ms: i64) {
        self.failures
            .retain(|_, times| times.iter().any(|&time| is_recent(time, now_ms)));
        let len = self.failures.len();
        if len < self.addresses_max {
            return;
        }
        let target = (self.addresses_max - self.addresses_max / 10).min(self.addresses_max - 1);
        let excess = len - target;
        let mut latest: Vec<(i64, IpAddr)> = self
            .failures
            .iter()
            .map(|entry| {
                let last = entry.value().back().copied().unwrap_or(i64::MIN);
                (last, *entry.key())
            })
            .collect();
        if excess < latest.len() {
            latest.select_nth_unstable(excess);
        }
        for (_, ip) in latest.iter().take(excess) {
            self.failures.remove(ip);
        }
        tracing::warn!(
            evicted = excess,
            "brute-force guard is tracking too many addresses; forgot the oldest"
        );
    }
}

/// Whether a failure at `time` still counts at `now_ms`.
fn is_recent(time: i64, now_ms: i64) -> bool {
    now_ms.saturating_sub(time) < BRUTEFORCE_FAILURE_WINDOW_MS
}

fn recent_count(times: &VecDeque<i64>, now_ms: i64) -> usize {
    times
        .iter()
        .filter(|&&time| is_recent(time, now_ms))
        .count()
}

/// 0 below [`BRUTEFORCE_FAILURES_FREE`], then 250 ms doubling per failure, capped at 5 s.
fn delay_after(recent: usize) -> Duration {
    let Some(extra) = recent.checked_sub(BRUTEFORCE_FAILURES_FREE) else {
        return Duration::ZERO;
    };
    // Beyond 2^16 the cap is long reached; bounding the shift keeps it from overflowing.
    let factor = 1u64 << extra.min(16);
    let ms = BRUTEFORCE_DELAY_MS_BASE
        .saturating_mul(factor)
        .min(BRUTEFORCE_DELAY_MS_MAX);
    Duration::from_millis(ms)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn brute_force_delay_grows_after_three_failures() {
        let guard = BruteForceGuard::default();
        let expected_ms = [0, 0, 0, 250, 500, 1000, 2000, 4000, 5000, 5000, 5000];
        for (failures, &ms) in expected_ms.iter().enumerate() {
            let now = failures as i64 * 10;
            assert_eq!(
                guard.delay_for(ip(1), now),
                Duration::from_millis(ms),
                "after {failures} failures"
            );
            guard.record_failure(ip(1), now);
        }
        assert_eq!(
            guard.delay_for(ip(2), 200),
            Duration::ZERO,
            "other addresses"
        );
        assert_eq!(delay_after(BRUTEFORCE_FAILURES_KEPT).as_millis(), 5000);
        assert_eq!(delay_after(usize::MAX).as_millis(), 5000);
    }

    #[test]
    fn brute_force_failures_expire_after_three_seconds() {
        let guard = BruteForceGuard::default();
        for now in [0, 1000, 2000, 2500] {
            guard.record_failure(ip(1), now);
        }
        assert_eq!(guard.delay_for(ip(1), 2999), Duration::from_millis(500));
        assert_eq!(guard.delay_for(ip(1), 3000), Duration::from_millis(250));
        assert_eq!(guard.delay_for(ip(1), 4000), Duration::ZERO);
        assert_eq!(guard.delay_for(ip(1), 5499), Duration::ZERO);
        assert_eq!(guard.delay_for(ip(1), 5500), Duration::ZERO);
        assert!(guard.failures.is_empty(), "expired addresses are forgotten");
    }

    #[test]
    fn brute_force_memory_is_bounded() {
        let guard = BruteForceGuard::with_addresses_max(10);
        for last in 0..10 {
            guard.record_failure(ip(last), 0);
        }
        // All expired: they are dropped to make room.
        guard.record_failure(ip(100), 10_000);
        assert_eq!(guard.failures.len(), 1);
        // All active: the oldest are dropped.
        for last in 0..9 {
            guard.record_failure(ip(last), 10_001 + i64::from(last));
        }
        assert_eq!(guard.failures.len(), 10);
        guard.record_failure(ip(200), 10_100);
        assert!(guard.failures.len() <= 10);
        assert!(
            !guard.failures.contains_key(&ip(100)),
            "the oldest goes first"
        );
        assert!(guard.failures.contains_key(&ip(200)));
        assert!(guard.failures.contains_key(&ip(8)));
    }
}
