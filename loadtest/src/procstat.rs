//! Resource use of the daemon under test, read from `/proc/<pid>/stat` (CPU time) and
//! `/proc/<pid>/status` (`VmHWM`, `VmRSS`), sampled every 100 ms while the run lasts. It owns
//! parsing those files and keeping the last and peak values; it must not signal or wait on
//! the process: a sample that fails only means the process is gone.

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcSample {
    /// User plus system CPU time since the process started.
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    /// The kernel's high-water mark of resident memory.
    pub peak_rss_bytes: u64,
}

/// Reads one sample of `pid` now.
pub fn sample(pid: u32) -> std::io::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let ticks = clock_ticks();
    let (utime, stime) = parse_stat_times(&stat).ok_or_else(|| bad_data("/proc/<pid>/stat"))?;
    Ok(ProcSample {
        cpu_seconds: (utime + stime) as f64 / ticks,
        rss_bytes: status_kib(&status, "VmRSS:").unwrap_or(0) * 1024,
        peak_rss_bytes: status_kib(&status, "VmHWM:").unwrap_or(0) * 1024,
    })
}

fn bad_data(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unexpected format of {what}"))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant of the running system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime and stime (fields 14 and 15). The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from after its last `)`.
pub fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After the name come state (field 3) … utime is field 14, i.e. the 12th field here.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// A `Key:   1234 kB` line of /proc/<pid>/status, in KiB.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Samples a process every 100 ms in the background until dropped.
pub struct Sampler {
    latest: Arc<Mutex<Option<ProcSample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling `pid`, with a first sample taken now.
    pub fn start(pid: u32) -> Sampler {
        let latest = Arc::new(Mutex::new(sample(pid).ok()));
        let shared = latest.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Ok(s) = sample(pid) else { return };
                let mut slot = shared.lock().unwrap_or_else(|e| e.into_inner());
                let peak = slot.map_or(0, |p| p.peak_rss_bytes).max(s.peak_rss_bytes);
                *slot = Some(ProcSample {
                    peak_rss_bytes: peak,
                    ..s
                });
            }
        });
        Sampler { latest, task }
    }

    /// The newest sample, with the peak over all samples so far.
    pub fn latest(&self) -> Option<ProcSample> {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Waits until `pid` spends under `share` of one core over a `window`, for at most
/// `limit`; says whether it got there. A daemon with 10,000 endpoints is still busy for
/// some 0.3 s after its ready line (each worker's first look at its queue), and a run
/// that started then would charge that to its first second of ingest.
pub async fn wait_until_quiet(pid: u32, window: Duration, share: f64, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let Ok(mut before) = sample(pid) else { return false };
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(window).await;
        let Ok(now) = sample(pid) else { return false };
        if now.cpu_seconds - before.cpu_seconds < share * window.as_secs_f64() {
            return true;
        }
        before = now;
    }
    false
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_an_awkward_name() {
        let stat = "4242 (click (hook) x) S 1 4242 4242 0 -1 4194560 1523 0 0 0 250 75 0 0 20 0 9 0 12345 \
                    1000000 2000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat_times(stat), Some((250, 75)));
        assert_eq!(parse_stat_times("garbage"), None);
    }

    #[test]
    fn parses_status_sizes() {
        let status = "Name:\tclickhook\nVmPeak:\t  900000 kB\nVmHWM:\t   81234 kB\nVmRSS:\t   80000 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), Some(81_234));
        assert_eq!(status_kib(status, "VmRSS:"), Some(80_000));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[tokio::test]
    async fn waits_for_a_busy_process_and_not_for_an_idle_one() {
        let mut idle = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let mut busy = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let window = Duration::from_millis(200);
        let limit = Duration::from_secs(1);
        let idle_quiet = wait_until_quiet(idle.id(), window, 0.05, limit).await;
        let busy_quiet = wait_until_quiet(busy.id(), window, 0.05, limit).await;
        let _ = (idle.kill(), busy.kill(), idle.wait(), busy.wait());
        assert!(idle_quiet, "a sleeping process is quiet");
        assert!(!busy_quiet, "a spinning process is not");
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.peak_rss_bytes >= s.rss_bytes && s.rss_bytes > 0, "{s:?}");
    }
}
