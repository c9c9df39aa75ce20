//! Counting and summarising: error counts by type and latency percentiles.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Failures and notable events, counted by a short type name (`connect:refused`,
/// `error:wrong-format`, `undo:denied`, ...).
#[derive(Debug, Default)]
pub struct ErrorCounts {
    /// The counts.
    counts: Mutex<BTreeMap<String, u64>>,
}

impl ErrorCounts {
    /// Counts one `kind`.
    pub fn add(&self, kind: &str) {
        self.add_n(kind, 1);
    }

    /// Counts `n` of `kind`.
    pub fn add_n(&self, kind: &str, n: u64) {
        if n == 0 {
            return;
        }
        // A poisoned lock only means another task panicked while counting; keep counting.
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(kind) {
            Some(count) => *count += n,
            None => {
                counts.insert(kind.to_owned(), n);
            }
        }
    }

    /// Total of all counts.
    pub fn total(&self) -> u64 {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }

    /// `{kind: count}`.
    pub fn to_json(&self) -> Value {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        Value::Object(counts.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
    }
}

/// The value at quantile `q` (0..=1) of sorted `values`, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Microseconds as milliseconds with 3 decimals.
pub fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// `{count, p50, p90, p99, max}` in ms of durations given in µs (sorts `values`).
pub fn summary_ms(values: &mut [u64], quantiles: &[(&str, f64)]) -> Value {
    values.sort_unstable();
    let mut out = serde_json::Map::new();
    out.insert("count".into(), json!(values.len()));
    for (name, q) in quantiles {
        out.insert(
            (*name).into(),
            if values.is_empty() {
                Value::Null
            } else {
                json!(us_to_ms(quantile(values, *q)))
            },
        );
    }
    out.insert(
        "max".into(),
        values.last().map_or(Value::Null, |v| json!(us_to_ms(*v))),
    );
    Value::Object(out)
}

/// p50, p90, p99.
pub const P50_P90_P99: &[(&str, f64)] = &[("p50", 0.5), ("p90", 0.9), ("p99", 0.99)];
/// p50, p99.
pub const P50_P99: &[(&str, f64)] = &[("p50", 0.5), ("p99", 0.99)];
/// p50, p99, p999.
pub const P50_P99_P999: &[(&str, f64)] = &[("p50", 0.5), ("p99", 0.99), ("p999", 0.999)];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&[7], 0.999), 7);
        assert_eq!(quantile(&[], 0.5), 0);
        let mut v = vec![3000, 1000, 2000];
        assert_eq!(
            summary_ms(&mut v, P50_P99),
            json!({"count": 3, "p50": 2.0, "p99": 3.0, "max": 3.0})
        );
    }

    #[test]
    fn errors_are_counted_by_kind() {
        let e = ErrorCounts::default();
        e.add("a");
        e.add_n("a", 2);
        e.add("b");
        e.add_n("c", 0);
        assert_eq!(e.to_json(), json!({"a": 3, "b": 1}));
        assert_eq!(e.total(), 4);
    }
}
