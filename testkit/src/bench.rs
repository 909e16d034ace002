//! What every benchmark program reports: medians, percentiles and the load
//! the machine was under (its 2 cores are shared, so every number is quoted
//! with the load average next to it).

/// The middle value (the upper one of an even count); `values` must not be empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The nearest-rank percentile `p` (0.0–1.0) of already sorted values; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The 1-, 5- and 15-minute load averages, "?" where `/proc` has none.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

/// CPU time spent by the machine and by each part of the system between
/// two samples, read from `/proc`: the same-run measure of what one unit of
/// work costs, and so of the most this machine can do at that cost.
///
/// Parts are named by process name for the servers (`postgres`,
/// `nats-server`, `redis-server`) and by thread name for this process (a
/// benchmark running services in-process gives each its own runtime with
/// named threads, e.g. `svc-commands`, `bench-client`).
#[derive(Debug, Clone, Default)]
pub struct CpuSample {
    /// Busy and total jiffies of the whole machine.
    busy: u64,
    total: u64,
    /// Jiffies per process of other programs, keyed by pid (a pid that
    /// appears between two samples started from zero).
    processes: std::collections::HashMap<u32, (String, u64)>,
    /// Jiffies per thread of this process, keyed by tid.
    threads: std::collections::HashMap<u32, (String, u64)>,
}

/// The CPU one interval cost, in milliseconds per part.
#[derive(Debug, Clone)]
pub struct CpuSpent {
    pub machine_busy_ms: f64,
    pub machine_total_ms: f64,
    pub parts: Vec<(String, f64)>,
}

/// Clock ticks per second of `/proc` times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// utime + stime of a `/proc/<pid>/stat` line, and the name in parentheses.
fn stat_times(line: &str) -> Option<(String, u64)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let name = line.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = line.get(close + 2..)?.split_whitespace().collect();
    // after the name: state is field 3, utime 14 and stime 15 (1-based)
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

fn entries(dir: &str) -> std::collections::HashMap<u32, (String, u64)> {
    let mut found = std::collections::HashMap::new();
    let Ok(listing) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in listing.flatten() {
        let Some(id) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(line) = std::fs::read_to_string(entry.path().join("stat"))
            && let Some(times) = stat_times(&line)
        {
            found.insert(id, times);
        }
    }
    found
}

impl CpuSample {
    pub fn now() -> Self {
        let (busy, total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let cpu: Vec<u64> = stat
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal
                let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
                let total: u64 = cpu.iter().take(8).sum();
                Some((total.saturating_sub(idle), total))
            })
            .unwrap_or((0, 0));
        let own = std::process::id();
        let mut processes = entries("/proc");
        processes.remove(&own);
        Self {
            busy,
            total,
            processes,
            threads: entries("/proc/self/task"),
        }
    }

    /// What was spent since `earlier`, per part; parts under 0.5 % of the
    /// machine's busy time are summed as "other".
    pub fn since(&self, earlier: &CpuSample) -> CpuSpent {
        let ms = |ticks: u64| ticks as f64 * 1_000.0 / TICKS_PER_SECOND;
        let mut parts: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
        for (now, then) in [(&self.processes, &earlier.processes), (&self.threads, &earlier.threads)] {
            for (id, (name, ticks)) in now {
                let before = then.get(id).map_or(0, |(_, t)| *t);
                // thread names such as "svc-query" or "tokio-rt-worker"
                *parts.entry(name.clone()).or_default() += ticks.saturating_sub(before);
            }
        }
        let busy = self.busy.saturating_sub(earlier.busy);
        let mut other = 0;
        let mut named = Vec::new();
        for (name, ticks) in parts {
            if ticks * 200 < busy {
                other += ticks;
            } else {
                named.push((name, ms(ticks)));
            }
        }
        named.sort_by(|a, b| b.1.total_cmp(&a.1));
        if other > 0 {
            named.push(("other".to_owned(), ms(other)));
        }
        CpuSpent {
            machine_busy_ms: ms(busy),
            machine_total_ms: ms(self.total.saturating_sub(earlier.total)),
            parts: named,
        }
    }
}

impl CpuSpent {
    /// "`total` ms of CPU per `unit` (postgres 1.2, …)" for `units` units.
    pub fn per_unit(&self, units: f64, unit: &str) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|(name, ms)| format!("{name} {:.2}", ms / units))
            .collect();
        format!(
            "{:.2} ms of CPU per {unit} ({}; machine {:.0} % busy)",
            self.machine_busy_ms / units,
            parts.join(", "),
            100.0 * self.machine_busy_ms / self.machine_total_ms.max(1.0)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles_pick_the_expected_values() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.5), 51.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&sorted, 1.0), 100.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn cpu_spent_by_this_thread_is_counted_under_its_name() {
        let before = CpuSample::now();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let running = stop.clone();
        let worker = std::thread::Builder::new()
            .name("cpu-burner".to_owned())
            .spawn(move || {
                let mut x = 0u64;
                while !running.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                x
            })
            .expect("thread");
        // sample while the thread still exists: an exited thread leaves /proc
        std::thread::sleep(std::time::Duration::from_millis(300));
        let after = CpuSample::now();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = worker.join();
        let spent = after.since(&before);
        let burner = spent
            .parts
            .iter()
            .find(|(name, _)| name == "cpu-burner")
            .map(|(_, ms)| *ms);
        assert!(burner.is_some_and(|ms| ms >= 100.0), "{spent:?}");
        assert!(spent.machine_busy_ms >= 100.0, "{spent:?}");
        assert!(
            stat_times("1 (a (b) c) S 0 0 0 0 0 0 0 0 0 0 7 5 0").is_some_and(|(name, t)| name == "a (b) c" && t == 12)
        );
    }
}
