//! Where the CPU went during each phase: CPU time of every process between
//! two snapshots of `/proc`, grouped by who it is (a sluice role, this bench,
//! one of the servers, anything else), beside the machine's total busy time
//! from `/proc/stat`. On a 2-core machine shared by the stack, the roles and
//! the load generator, this is the first thing that explains a figure.
//!
//! Processes that start and end between two snapshots (a compiler job) are
//! not seen one by one; their time shows in `other`, the busy time no seen
//! process accounts for.
//!
//! Each phase also records the noise around it: the load average at its start
//! and end, and CPU time stolen by the hypervisor (a run on a busy host says
//! so instead of passing its figures off as the machine's). And what the
//! kernel's pressure stall information says: the share of the phase in which
//! some runnable task waited for a CPU, and in which some task waited for
//! the disk. A step that falls behind while the CPUs are not all busy waited
//! on something; the I/O share says whether it was the disk.

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;

/// Linux reports process times in USER_HZ ticks, fixed at 100 by its ABI.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds by group over one phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseCpu {
    pub phase: String,
    pub seconds: f64,
    /// Busy CPU seconds of the whole machine (all cores).
    pub busy: f64,
    /// CPU seconds per group, largest first; `other` is busy time that no
    /// named group accounts for.
    pub by: Vec<(String, f64)>,
    /// CPU seconds the hypervisor gave to someone else (steal; not in `busy`).
    pub steal: f64,
    /// Share of the phase (0 to 1) in which some runnable task waited for a
    /// CPU, and in which some task waited for I/O (`/proc/pressure`); `None`
    /// where the kernel has no pressure stall information.
    pub cpu_pressure: Option<f64>,
    pub io_pressure: Option<f64>,
    /// 1-minute load average at the phase's start and end.
    pub load_average_start: f64,
    pub load_average_end: f64,
    /// Peak RSS of each role process (and the bench) within the phase, MiB.
    pub peak_rss_mib: Vec<(String, f64)>,
}

impl PhaseCpu {
    /// CPU µs per operation by group, for `operations` done in the phase.
    pub fn micros_per(&self, operations: u64) -> Vec<(String, f64)> {
        let n = operations.max(1) as f64;
        self.by.iter().map(|(who, s)| (who.clone(), s * 1e6 / n)).collect()
    }
}

/// The sluice roles' process ids, named.
pub type Roles = Vec<(u32, &'static str)>;

pub struct Snapshot {
    at: Instant,
    busy_ticks: u64,
    steal_ticks: u64,
    /// Total µs of "some" stall for CPU and for I/O.
    cpu_stall_us: Option<u64>,
    io_stall_us: Option<u64>,
    load_average: f64,
    processes: HashMap<u32, (String, u64)>,
}

impl Snapshot {
    pub fn take(roles: &Roles) -> Self {
        let mut processes = HashMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
                if let Some(ticks) = process_ticks(pid) {
                    processes.insert(pid, (label(pid, roles), ticks));
                }
            }
        }
        let (busy_ticks, steal_ticks) = machine_ticks().unwrap_or((0, 0));
        Self {
            at: Instant::now(),
            busy_ticks,
            steal_ticks,
            cpu_stall_us: stall_micros("cpu"),
            io_stall_us: stall_micros("io"),
            load_average: load_average(),
            processes,
        }
    }

    /// CPU seconds by group from `self` to `later`.
    pub fn until(&self, later: &Snapshot, phase: &str) -> PhaseCpu {
        let mut by: HashMap<String, f64> = HashMap::new();
        for (pid, (label, ticks)) in &later.processes {
            let before = self.processes.get(pid).map_or(0, |(_, t)| *t);
            let spent = ticks.saturating_sub(before) as f64 / TICKS_PER_SECOND;
            if spent > 0.0 {
                *by.entry(label.clone()).or_default() += spent;
            }
        }
        let busy = later.busy_ticks.saturating_sub(self.busy_ticks) as f64 / TICKS_PER_SECOND;
        let seen: f64 = by.values().sum();
        *by.entry("other".into()).or_default() += (busy - seen).max(0.0);
        let mut by: Vec<(String, f64)> = by.into_iter().filter(|(_, s)| *s >= 0.01).collect();
        by.sort_by(|a, b| b.1.total_cmp(&a.1));
        let seconds = later.at.duration_since(self.at).as_secs_f64();
        let share = |before: Option<u64>, after: Option<u64>| {
            Some((after?.saturating_sub(before?) as f64 / 1e6 / seconds.max(1e-3)).clamp(0.0, 1.0))
        };
        PhaseCpu {
            phase: phase.to_owned(),
            seconds,
            busy,
            by,
            steal: later.steal_ticks.saturating_sub(self.steal_ticks) as f64 / TICKS_PER_SECOND,
            cpu_pressure: share(self.cpu_stall_us, later.cpu_stall_us),
            io_pressure: share(self.io_stall_us, later.io_stall_us),
            load_average_start: self.load_average,
            load_average_end: later.load_average,
            peak_rss_mib: Vec::new(),
        }
    }
}

/// utime + stime of a process (all its threads), in ticks.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count
    // from the last ')'. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Busy ticks of all CPUs (everything but idle, iowait and steal), and
/// steal ticks.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = cpu.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let busy = values.iter().take(7).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    Some((busy, values.get(7).copied().unwrap_or(0)))
}

/// Total µs some task stalled on `resource` (`cpu`, `io`), from the "some"
/// line of `/proc/pressure/<resource>`.
fn stall_micros(resource: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/pressure/{resource}")).ok()?;
    some_total(&text)
}

/// The `total=` of the "some" line of a pressure file.
fn some_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace().find_map(|f| f.strip_prefix("total="))?.parse().ok()
}

/// The 1-minute load average (0 where /proc has none).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
}

/// The share of the machine's CPUs busy over `span` (0 to 1), measured now:
/// the noise guard's look before a run starts.
pub async fn busy_share(span: std::time::Duration) -> f64 {
    let before = machine_ticks().unwrap_or((0, 0)).0;
    tokio::time::sleep(span).await;
    let after = machine_ticks().unwrap_or((0, 0)).0;
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    (after.saturating_sub(before) as f64 / TICKS_PER_SECOND / span.as_secs_f64() / cpus).clamp(0.0, 1.0)
}

/// Who a process is: a role, this bench, a server of the stack, or other.
fn label(pid: u32, roles: &Roles) -> String {
    if let Some((_, role)) = roles.iter().find(|(p, _)| *p == pid) {
        return (*role).to_owned();
    }
    if pid == std::process::id() {
        return "bench".into();
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.trim();
    if comm == "beam.smp" || comm.starts_with("erl_child") || comm == "epmd" {
        return "rabbitmq".into();
    }
    if comm == "java" {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        for (marker, name) in [
            ("CassandraDaemon", "cassandra"),
            ("kafka.Kafka", "kafka"),
            ("quarkus-run.jar", "registry"),
            ("apicurio", "registry"),
        ] {
            if cmdline.contains(marker) {
                return name.into();
            }
        }
    }
    "other".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cpu_time_and_the_machines() {
        let roles = vec![];
        let before = Snapshot::take(&roles);
        let mut x = 0u64;
        let until = Instant::now() + std::time::Duration::from_millis(60);
        while Instant::now() < until {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert!(x != 1);
        let phase = before.until(&Snapshot::take(&roles), "spin");
        assert!(phase.busy > 0.0, "{phase:?}");
        assert!(phase.by.iter().any(|(who, s)| who == "bench" && *s > 0.0), "{phase:?}");
        if std::path::Path::new("/proc/pressure/cpu").exists() {
            assert!(phase.cpu_pressure.is_some_and(|p| (0.0..=1.0).contains(&p)), "{phase:?}");
        }
    }

    #[test]
    fn reads_the_some_total_of_a_pressure_file() {
        let text = "some avg10=0.41 avg60=0.76 avg300=1.77 total=366629009\n\
                    full avg10=0.40 avg60=0.20 avg300=0.17 total=101268337\n";
        assert_eq!(some_total(text), Some(366_629_009));
        assert_eq!(some_total("full avg10=0.00 total=5\n"), None);
    }
}
