//! The daemon under test as a child process: it owns writing its `config.toml` (SPEC §2
//! keys only, loopback listeners on port 0), starting `clickhook serve`, learning the ports
//! from the single `ready …` line on stdout, draining both pipes for the whole run, and
//! stopping it with SIGTERM. It must never signal any process but the one it started, and
//! must not block on a pipe: a daemon whose stderr fills up would stall and skew the run.

use crate::Error;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

const TAIL_LINES: usize = 200;
/// ERROR and WARN lines kept verbatim for the report.
const LOG_SAMPLES: usize = 10;

/// One `[[endpoints]]` table of the generated config.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigEndpoint {
    pub id: String,
    pub url: String,
    pub secret: String,
    pub links: Vec<String>,
    pub timeout: Option<String>,
    /// `max_concurrency` of the endpoint; `None` keeps the daemon's default.
    pub max_concurrency: Option<usize>,
}

/// What the generated config sets; everything else keeps the daemon's defaults.
#[derive(Clone, Debug)]
pub struct DaemonSettings {
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    /// `storage.fsync`: "always" or "interval"; `None` keeps the daemon's default.
    pub fsync: Option<String>,
    pub delivery_timeout: String,
    pub retry_schedule: Vec<String>,
    pub breaker_failures: u32,
    pub breaker_cooldown: String,
    pub endpoints: Vec<ConfigEndpoint>,
}

/// TOML basic string: quotes, backslashes and control characters escaped.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(items: &[String]) -> String {
    format!("[{}]", items.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", "))
}

/// The config file text for these settings.
pub fn render_config(s: &DaemonSettings) -> String {
    let mut t = String::with_capacity(256 + s.endpoints.len() * 200);
    // Writing into a String cannot fail; the Results below only exist for fmt::Write.
    let _ = writeln!(t, "[storage]\npath = {}", quote(&s.data_dir.to_string_lossy()));
    if let Some(fsync) = &s.fsync {
        let _ = writeln!(t, "fsync = {}", quote(fsync));
    }
    let _ = writeln!(t, "\n[ingest.http]\nlisten = \"127.0.0.1:0\"");
    let _ = writeln!(t, "\n[ingest.unix]\npath = {}", quote(&s.socket.to_string_lossy()));
    let _ = writeln!(t, "\n[admin]\nlisten = \"127.0.0.1:0\"");
    let _ = writeln!(
        t,
        "\n[delivery]\ntimeout = {}\nallow_private_networks = true",
        quote(&s.delivery_timeout)
    );
    let _ = writeln!(t, "\n[retry]\nschedule = {}", list(&s.retry_schedule));
    let _ = writeln!(
        t,
        "\n[breaker]\nfailures = {}\ncooldown = {}",
        s.breaker_failures,
        quote(&s.breaker_cooldown)
    );
    for e in &s.endpoints {
        let _ = writeln!(
            t,
            "\n[[endpoints]]\nid = {}\nurl = {}\nsecret = {}\ninclude_bots = true",
            quote(&e.id),
            quote(&e.url),
            quote(&e.secret)
        );
        if !e.links.is_empty() {
            let _ = writeln!(t, "links = {}", list(&e.links));
        }
        if let Some(timeout) = &e.timeout {
            let _ = writeln!(t, "timeout = {}", quote(timeout));
        }
        if let Some(n) = e.max_concurrency {
            let _ = writeln!(t, "max_concurrency = {n}");
        }
    }
    t
}

/// The addresses announced by `ready ingest_http=… admin=… unix=<path or ->`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    pub ingest_http: SocketAddr,
    pub admin: SocketAddr,
    pub unix: Option<PathBuf>,
}

pub fn parse_ready(line: &str) -> Option<Ready> {
    let rest = line.trim_end().strip_prefix("ready ")?;
    let (mut http, mut admin, mut unix) = (None, None, None);
    for field in rest.split(' ').filter(|f| !f.is_empty()) {
        let (key, value) = field.split_once('=')?;
        match key {
            "ingest_http" => http = value.parse().ok(),
            "admin" => admin = value.parse().ok(),
            "unix" => unix = Some((value != "-").then(|| PathBuf::from(value))),
            _ => {}
        }
    }
    Some(Ready {
        ingest_http: http?,
        admin: admin?,
        unix: unix?,
    })
}

/// What the daemon wrote besides its ready line.
#[derive(Default)]
struct Output {
    tail: Mutex<VecDeque<String>>,
    errors: AtomicU64,
    warnings: AtomicU64,
    extra_stdout: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Output {
    fn sample(&self, line: &str) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() < LOG_SAMPLES {
            samples.push(line.chars().take(400).collect());
        }
    }

    fn push(&self, line: String) {
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

/// How the daemon's log and exit looked.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DaemonOutcome {
    /// Exit code after SIGTERM; `None` when a signal ended it.
    pub exit_code: Option<i32>,
    /// It did not exit within the grace period and was killed.
    pub killed: bool,
    pub shutdown_seconds: f64,
    pub stderr_error_lines: u64,
    pub stderr_warning_lines: u64,
    /// Lines on stdout after the ready line, which the contract says never come.
    pub extra_stdout_lines: u64,
    /// The first ERROR and WARN lines of its log.
    pub log_samples: Vec<String>,
}

/// A running `clickhook serve`. Dropping it kills the process.
pub struct Daemon {
    child: Child,
    pid: u32,
    pub ready: Ready,
    output: Arc<Output>,
}

async fn drain<R: AsyncRead + Unpin>(
    pipe: R,
    output: Arc<Output>,
    is_stdout: bool,
    mut ready: Option<oneshot::Sender<String>>,
) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if is_stdout {
            if let Some(tx) = ready.take_if(|_| line.starts_with("ready ")) {
                let _ = tx.send(line);
                continue;
            }
            output.extra_stdout.fetch_add(1, Relaxed);
            output.push(format!("[stdout] {line}"));
            continue;
        }
        if line.contains("ERROR") {
            output.errors.fetch_add(1, Relaxed);
            output.sample(&line);
        } else if line.contains("WARN") {
            output.warnings.fetch_add(1, Relaxed);
            output.sample(&line);
        }
        output.push(line);
    }
}

impl Daemon {
    /// Runs `<bin> serve --config <config>` in `dir` and waits up to `timeout` for its ready line.
    pub async fn start(bin: &Path, config: &Path, dir: &Path, timeout: Duration) -> Result<Daemon, Error> {
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| Error::Spawn {
                bin: bin.to_path_buf(),
                error,
            })?;
        let pid = child.id().ok_or_else(|| Error::NotReady {
            reason: "exited at once".into(),
            stderr_tail: String::new(),
        })?;
        let output = Arc::new(Output::default());
        let (tx, rx) = oneshot::channel();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(drain(out, output.clone(), true, Some(tx)));
        }
        let stderr_drain = child
            .stderr
            .take()
            .map(|err| tokio::spawn(drain(err, output.clone(), false, None)));
        // A daemon that dies at start says why on stderr; its exit can be seen before that
        // pipe is read to the end, so finish reading it before quoting it.
        let not_ready = |reason: String| async {
            if let Some(d) = stderr_drain {
                let _ = tokio::time::timeout(Duration::from_secs(2), d).await;
            }
            Error::NotReady {
                reason,
                stderr_tail: tail_of(&output),
            }
        };
        let line = tokio::select! {
            line = rx => match line {
                Ok(line) => line,
                Err(_) => {
                    let status = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                    return Err(not_ready(format!("stdout closed before the ready line ({status:?})")).await);
                }
            },
            status = child.wait() => {
                return Err(not_ready(format!("exited before ready: {}", describe(status.ok()))).await);
            }
            _ = tokio::time::sleep(timeout) => {
                return Err(not_ready(format!("no ready line within {timeout:?}")).await);
            }
        };
        let Some(ready) = parse_ready(&line) else {
            return Err(not_ready(format!("cannot read the ready line {line:?}")).await);
        };
        if !ready.ingest_http.ip().is_loopback() || !ready.admin.ip().is_loopback() {
            return Err(not_ready(format!("announced a non-loopback address: {line:?}")).await);
        }
        Ok(Daemon {
            child,
            pid,
            ready,
            output,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The last stderr lines, for error messages.
    pub fn stderr_tail(&self) -> String {
        tail_of(&self.output)
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then up to `grace` for a clean exit, then SIGKILL.
    pub async fn stop(mut self, grace: Duration) -> DaemonOutcome {
        let started = Instant::now();
        if let Ok(pid) = i32::try_from(self.pid) {
            if matches!(self.child.try_wait(), Ok(None)) {
                // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet
                // (try_wait just saw it running), so the pid cannot have been reused.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let mut killed = false;
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                killed = true;
                let _ = self.child.start_kill();
                self.child.wait().await.ok()
            }
        };
        // Let the drain tasks pick up the last lines written before exit.
        tokio::time::sleep(Duration::from_millis(50)).await;
        DaemonOutcome {
            exit_code: status.and_then(|s| s.code()),
            killed,
            shutdown_seconds: started.elapsed().as_secs_f64(),
            stderr_error_lines: self.output.errors.load(Relaxed),
            stderr_warning_lines: self.output.warnings.load(Relaxed),
            extra_stdout_lines: self.output.extra_stdout.load(Relaxed),
            log_samples: self.output.samples.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

fn tail_of(output: &Output) -> String {
    let tail = output.tail.lock().unwrap_or_else(|e| e.into_inner());
    tail.iter()
        .skip(tail.len().saturating_sub(40))
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
}

fn describe(status: Option<ExitStatus>) -> String {
    status.map_or_else(|| "unknown status".to_string(), |s| s.to_string())
}

/// Bytes a directory tree occupies on disk (allocated blocks, not apparent sizes).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ready_line() {
        let r =
            parse_ready("ready ingest_http=127.0.0.1:4100 admin=127.0.0.1:4101 unix=/tmp/x/clickhook.sock\n").unwrap();
        assert_eq!(r.ingest_http, "127.0.0.1:4100".parse().unwrap());
        assert_eq!(r.admin, "127.0.0.1:4101".parse().unwrap());
        assert_eq!(r.unix, Some(PathBuf::from("/tmp/x/clickhook.sock")));
        let r = parse_ready("ready ingest_http=127.0.0.1:1 admin=127.0.0.1:2 unix=-").unwrap();
        assert_eq!(r.unix, None);
        assert!(parse_ready("ready admin=127.0.0.1:2 unix=-").is_none());
        assert!(parse_ready("listening on 127.0.0.1:1").is_none());
    }

    #[test]
    fn config_is_valid_toml_with_the_spec_keys() {
        let settings = DaemonSettings {
            data_dir: PathBuf::from("/tmp/t \"x\"/data"),
            socket: PathBuf::from("/tmp/t/clickhook.sock"),
            fsync: Some("always".into()),
            delivery_timeout: "5s".into(),
            retry_schedule: vec!["100ms".into(), "1s".into()],
            breaker_failures: 20,
            breaker_cooldown: "1s".into(),
            endpoints: vec![
                ConfigEndpoint {
                    id: "ep-0".into(),
                    url: "http://127.0.0.1:9/ep/0".into(),
                    secret: "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".into(),
                    links: vec![],
                    timeout: None,
                    max_concurrency: Some(64),
                },
                ConfigEndpoint {
                    id: "ep-1".into(),
                    url: "http://127.0.0.1:9/ep/1".into(),
                    secret: "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".into(),
                    links: vec!["17".into()],
                    timeout: Some("1s".into()),
                    max_concurrency: None,
                },
            ],
        };
        let v: toml::Value = toml::from_str(&render_config(&settings)).unwrap();
        assert_eq!(v["storage"]["path"].as_str(), Some("/tmp/t \"x\"/data"));
        assert_eq!(v["ingest"]["http"]["listen"].as_str(), Some("127.0.0.1:0"));
        assert_eq!(v["ingest"]["unix"]["path"].as_str(), Some("/tmp/t/clickhook.sock"));
        assert_eq!(v["admin"]["listen"].as_str(), Some("127.0.0.1:0"));
        assert_eq!(v["delivery"]["allow_private_networks"].as_bool(), Some(true));
        assert_eq!(v["retry"]["schedule"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["breaker"]["cooldown"].as_str(), Some("1s"));
        let eps = v["endpoints"].as_array().unwrap();
        assert_eq!(eps.len(), 2);
        assert!(eps[0].get("links").is_none());
        assert_eq!(eps[1]["links"][0].as_str(), Some("17"));
        assert_eq!(eps[1]["timeout"].as_str(), Some("1s"));
        assert_eq!(eps[0]["max_concurrency"].as_integer(), Some(64));
        assert!(eps[1].get("max_concurrency").is_none());
        assert_eq!(eps[1]["include_bots"].as_bool(), Some(true));
    }

    #[test]
    fn disk_usage_counts_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/f"), vec![1u8; 10_000]).unwrap();
        assert!(disk_usage(dir.path()) >= 10_000);
    }
}
