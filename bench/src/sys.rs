//! What ferry-bench reads from /proc: its own CPU time and memory, the server's memory and
//! CPU time, and the open-file limit. Linux only, std only.

use std::time::Instant;

/// Clock ticks per second in /proc/*/stat (`USER_HZ`, 100 on every Linux build; reading the
/// real value needs `sysconf`, which std does not expose).
pub const CLOCK_TICKS_PER_S: f64 = 100.0;

/// User and system CPU seconds of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    /// User-mode seconds.
    pub user_s: f64,
    /// Kernel-mode seconds.
    pub sys_s: f64,
}

impl CpuTimes {
    /// Both together.
    pub fn total_s(&self) -> f64 {
        self.user_s + self.sys_s
    }

    /// `self - earlier`.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user_s: self.user_s - earlier.user_s,
            sys_s: self.sys_s - earlier.sys_s,
        }
    }
}

/// CPU times from `/proc/<pid>/stat` (`pid` = "self" for ours).
pub fn cpu_times(pid: &str) -> Option<CpuTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' come field 3 (state) onwards; utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(CpuTimes {
        user_s: utime / CLOCK_TICKS_PER_S,
        sys_s: stime / CLOCK_TICKS_PER_S,
    })
}

/// This process's CPU times (zero when /proc cannot be read).
pub fn own_cpu() -> CpuTimes {
    cpu_times("self").unwrap_or_default()
}

/// A `kB` field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`).
pub fn status_bytes(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = value.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// The resident set size of one process, in bytes.
pub fn rss_bytes_of(pid: u32) -> Option<u64> {
    status_bytes(&pid.to_string(), "VmRSS")
}

/// A set of measured processes (`--server-pid` given once or several times). `Copy`, so the
/// samplers and phases can hold it like a pid; the list lives for the whole run.
#[derive(Debug, Clone, Copy)]
pub struct Pids(&'static [u32]);

impl Pids {
    /// `None` for an empty list.
    pub fn new(pids: &[u32]) -> Option<Pids> {
        if pids.is_empty() {
            return None;
        }
        // One small allocation per run, kept until the process exits.
        Some(Pids(Box::leak(pids.to_vec().into_boxed_slice())))
    }

    /// The pids.
    pub fn list(&self) -> &'static [u32] {
        self.0
    }

    /// The first pid (the `pid` field of the summaries, as with a single `--server-pid`).
    pub fn first(&self) -> u32 {
        self.0[0]
    }
}

/// The summed resident set size of `pids`, in bytes (the readable ones; `None` if none is).
pub fn rss_bytes(pids: Pids) -> Option<u64> {
    let mut total = None;
    for pid in pids.list() {
        if let Some(bytes) = rss_bytes_of(*pid) {
            total = Some(total.unwrap_or(0) + bytes);
        }
    }
    total
}

/// CPU times of every pid of `pids` (`None` for one that cannot be read).
#[derive(Debug, Clone)]
pub struct CpuSnapshot(Vec<Option<CpuTimes>>);

/// Reads the CPU times of `pids`; `None` when not one of them can be read.
pub fn pids_cpu(pids: Pids) -> Option<CpuSnapshot> {
    let times: Vec<Option<CpuTimes>> = pids
        .list()
        .iter()
        .map(|pid| cpu_times(&pid.to_string()))
        .collect();
    times
        .iter()
        .any(Option::is_some)
        .then_some(CpuSnapshot(times))
}

impl CpuSnapshot {
    /// Per pid `self - earlier` (`None` for a pid unreadable at either end, e.g. one that
    /// was killed during the run: its CPU time is then missing from the sum).
    pub fn since_each(&self, earlier: &CpuSnapshot) -> Vec<Option<CpuTimes>> {
        self.0
            .iter()
            .zip(&earlier.0)
            .map(|(now, then)| match (now, then) {
                (Some(now), Some(then)) => Some(now.since(then)),
                _ => None,
            })
            .collect()
    }

    /// The sum over the pids readable at both ends.
    pub fn since(&self, earlier: &CpuSnapshot) -> CpuTimes {
        let mut sum = CpuTimes::default();
        for t in self.since_each(earlier).into_iter().flatten() {
            sum.user_s += t.user_s;
            sum.sys_s += t.sys_s;
        }
        sum
    }
}

/// Summed CPU seconds of the pids between two snapshots, for a summary (`null` when either
/// could not be read).
pub fn cpu_s_between(start: &Option<CpuSnapshot>, end: &Option<CpuSnapshot>) -> serde_json::Value {
    match (start, end) {
        (Some(a), Some(b)) => serde_json::json!(round3(b.since(a).total_s())),
        _ => serde_json::Value::Null,
    }
}

/// Each pid's CPU seconds between two snapshots, for a summary.
pub fn cpu_s_between_each(
    start: &Option<CpuSnapshot>,
    end: &Option<CpuSnapshot>,
) -> serde_json::Value {
    match (start, end) {
        (Some(a), Some(b)) => serde_json::json!(b
            .since_each(a)
            .into_iter()
            .map(|t| t.map(|t| round3(t.total_s())))
            .collect::<Vec<_>>()),
        _ => serde_json::Value::Null,
    }
}

/// CPU times of every thread of `pid`, summed by thread name (`/proc/<pid>/task/*/comm`),
/// e.g. `tokio-runtime-w`, `ferry-pipeline`. Threads that cannot be read are left out.
pub fn threads_cpu(pid: u32) -> std::collections::BTreeMap<String, CpuTimes> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let path = format!("{pid}/task/{tid}");
        let (Some(times), Ok(name)) = (
            cpu_times(&path),
            std::fs::read_to_string(format!("/proc/{path}/comm")),
        ) else {
            continue;
        };
        let sum: &mut CpuTimes = out.entry(name.trim().to_owned()).or_default();
        sum.user_s += times.user_s;
        sum.sys_s += times.sys_s;
    }
    out
}

/// `{thread name: CPU seconds}` between two [`threads_cpu`] readings, busiest first, for a
/// summary (threads that used none are left out).
pub fn threads_cpu_between(
    start: &std::collections::BTreeMap<String, CpuTimes>,
    end: &std::collections::BTreeMap<String, CpuTimes>,
) -> serde_json::Value {
    let mut used: Vec<(&String, f64)> = end
        .iter()
        .map(|(name, t)| {
            let before = start.get(name).copied().unwrap_or_default();
            (name, round3(t.since(&before).total_s()))
        })
        .filter(|(_, s)| *s > 0.0)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    serde_json::Value::Object(
        used.into_iter()
            .map(|(name, s)| (name.clone(), serde_json::json!(s)))
            .collect(),
    )
}

/// The first measured process's per-thread CPU from a start, for a summary's
/// `threads_cpu_s` (see [`threads_cpu_between`]).
#[derive(Debug)]
pub struct ThreadsMeter {
    /// The process.
    pid: u32,
    /// Its threads at the start.
    start: std::collections::BTreeMap<String, CpuTimes>,
}

impl ThreadsMeter {
    /// Starts measuring the first of `pids`.
    pub fn start(pids: Pids) -> ThreadsMeter {
        ThreadsMeter {
            pid: pids.first(),
            start: threads_cpu(pids.first()),
        }
    }

    /// `{thread name: CPU seconds}` since the start, busiest first.
    pub fn json(&self) -> serde_json::Value {
        threads_cpu_between(&self.start, &threads_cpu(self.pid))
    }
}

/// The soft and hard "Max open files" limits of this process (`None` = unlimited).
#[derive(Debug, Clone, Copy)]
pub struct FdLimits {
    /// The soft limit, the one that applies.
    pub soft: Option<u64>,
    /// The hard limit. Raising the soft limit to it needs `setrlimit`, which std does not have.
    pub hard: Option<u64>,
}

/// Reads `/proc/self/limits`.
pub fn fd_limits() -> FdLimits {
    let parse = |s: &str| s.parse::<u64>().ok();
    let text = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Max open files") {
            let mut parts = rest.split_whitespace();
            let soft = parts.next().and_then(parse);
            let hard = parts.next().and_then(parse);
            return FdLimits { soft, hard };
        }
    }
    FdLimits {
        soft: None,
        hard: None,
    }
}

/// File descriptors ferry-bench keeps for itself (runtime, stdio, /proc reads) on top of
/// one per connection.
pub const FD_MARGIN: u64 = 64;

/// The generator's CPU use over a run.
#[derive(Debug)]
pub struct CpuMeter {
    /// CPU times at the start.
    start_cpu: CpuTimes,
    /// Wall clock at the start.
    start: Instant,
}

impl CpuMeter {
    /// Starts measuring.
    pub fn start() -> CpuMeter {
        CpuMeter {
            start_cpu: cpu_times("self").unwrap_or_default(),
            start: Instant::now(),
        }
    }

    /// `{"cpu_user_s", "cpu_sys_s", "cpu_pct_of_wall", "wall_s", "peak_rss_bytes"}` so far.
    pub fn report(&self) -> serde_json::Value {
        let cpu = cpu_times("self").unwrap_or_default().since(&self.start_cpu);
        let wall = self.start.elapsed().as_secs_f64();
        let pct = if wall > 0.0 {
            100.0 * cpu.total_s() / wall
        } else {
            0.0
        };
        serde_json::json!({
            "cpu_user_s": round3(cpu.user_s),
            "cpu_sys_s": round3(cpu.sys_s),
            "cpu_pct_of_wall": round3(pct),
            "wall_s": round3(wall),
            "peak_rss_bytes": status_bytes("self", "VmHWM"),
        })
    }
}

/// Rounds to 3 decimals for the JSON summary.
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_readable() {
        assert!(cpu_times("self").is_some());
        assert!(status_bytes("self", "VmRSS").unwrap_or(0) > 0);
        assert!(fd_limits().soft.is_some() || fd_limits().hard.is_none());
    }
}
