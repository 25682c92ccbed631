//! Storage faults, against the real daemon. Past `storage.max_bytes` ingest answers 503 with
//! `Retry-After` (and the socket answers `err`), and every click acknowledged before that is
//! still delivered, across a `kill -9` too. On a disk that really fills (a tmpfs, where
//! the test may mount one), ingest closes the same way under `storage.min_free` and
//! resumes without a restart; with no reserve, appends answer 503 with the write's error,
//! `/readyz` is unready, a stop whose last writes fail exits 1, and a log that sled
//! refuses to write stops the daemon (exit 1) once the disk has room again, for a restart
//! to reopen it; either way nothing acknowledged is lost. A data directory that cannot be created or opened
//! (as root, so through paths no permission bit can fix) stops `clickhook serve` with exit
//! code 1 and an error that names the path, never a panic. A corrupted data directory must
//! either stop the daemon with a clear error or lose nothing acknowledged; each kind of
//! damage tested here says which of the two happened. Damaged event bytes in a segment
//! file are found when delivery reads them, and become dead letters that say so. The
//! damage is done to real files on disk, never simulated inside the daemon.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// A loopback address where nothing listens yet.
fn free_addr() -> std::net::SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    addr
}

/// An endpoint that is down: its first failure opens the circuit for an hour, so the
/// events wait durably without spending attempts, and the next start sends them at once.
fn down_endpoint(addr: std::net::SocketAddr) -> String {
    endpoint("a", &format!("http://{addr}/a"), "")
        + "\n[retry]\nschedule = [\"50ms\"]\njitter = 0.0\n[breaker]\nfailures = 1\ncooldown = \"1h\"\n"
}

/// A click carrying about 2 KiB of metadata, so the log grows quickly.
fn fat_click(i: usize) -> String {
    format!(
        r#"{{"link":{{"id":"{i}","workspace_id":"w"}},"metadata":{{"pad":"{}"}}}}"#,
        "x".repeat(2048)
    )
}

/// The distinct click ids `sink` got at `/a`, sorted, and those of `accepted` among
/// them not.
fn delivered_and_lost<'a>(sink: &Sink, accepted: &'a [String]) -> (Vec<String>, Vec<&'a String>) {
    let mut delivered = sink.event_ids("/a");
    delivered.sort();
    delivered.dedup();
    let lost = accepted
        .iter()
        .filter(|id| delivered.binary_search(id).is_err())
        .collect();
    (delivered, lost)
}

/// Whether clicks refused with 503 may arrive after all.
#[derive(PartialEq)]
enum Refused {
    /// Nothing of them was stored (503 `unavailable`).
    NeverStored,
    /// Part of them may be stored (503 `storage failed`, a write that failed midway).
    MayBeStored,
}

/// Brings up the receiver of [`down_endpoint`] at `addr`, starts the stopped daemon
/// again, and checks that every acknowledged click arrives (and, for refusals that store
/// nothing, nothing else).
async fn restart_and_expect_every_acknowledged(
    d: &mut Daemon,
    addr: std::net::SocketAddr,
    accepted: &[String],
    refused: Refused,
) {
    let sink = Sink::start_on(addr).await;
    d.spawn();
    let got = sink.wait_for("/a", accepted.len(), WAIT).await;
    let (delivered, lost) = delivered_and_lost(&sink, accepted);
    eprintln!(
        "acknowledged {}, delivered {} ({} requests), lost {}",
        accepted.len(),
        delivered.len(),
        got.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "{} acknowledged clicks lost: {lost:?}", lost.len());
    if refused == Refused::NeverStored {
        assert_eq!(
            delivered.len(),
            accepted.len(),
            "nothing refused with 503 was delivered"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_bytes_ingest_answers_503_and_loses_nothing_already_accepted() {
    let addr = free_addr();
    let cfg = config_text(&down_endpoint(addr)).replace("path = \"data\"", "path = \"data\"\nmax_bytes = \"96KiB\"");
    let mut d = Daemon::start(&cfg);
    let url = format!("{}/v1/clicks", d.http);
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut accepted: Vec<String> = Vec::new();
    let mut refused = None;
    let deadline = Instant::now() + WAIT;
    let mut i = 0;
    while refused.is_none() && Instant::now() < deadline {
        let req = hyper::Request::post(&url)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(fat_click(i))))
            .unwrap();
        i += 1;
        let resp = client.request(req).await.unwrap();
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        match status {
            202 => accepted.push(v["ids"][0].as_str().unwrap().to_string()),
            503 => refused = Some((retry_after, v)),
            other => panic!("ingest answered {other}: {v}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (retry_after, body) = refused.expect("ingest must answer 503 once the data dir is over max_bytes");
    eprintln!("{} clicks accepted before the 503: {body}", accepted.len());
    assert!(!accepted.is_empty(), "some clicks fit before the limit");
    let retry_after: u64 = retry_after
        .expect("a 503 carries Retry-After")
        .parse()
        .expect("Retry-After in seconds");
    assert!(
        (1..=5).contains(&retry_after),
        "Retry-After of 1-5 s, got {retry_after}"
    );
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("max_bytes")),
        "the 503 says why: {body}"
    );

    // The socket refuses the line too, and says so, rather than dropping it.
    {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let stream = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
        let (read, mut write) = stream.into_split();
        write
            .write_all(format!("{}\n", fat_click(9999)).as_bytes())
            .await
            .unwrap();
        write.shutdown().await.unwrap();
        let reply = BufReader::new(read).lines().next_line().await.unwrap();
        let reply = reply.expect("the socket answers the line");
        assert!(
            reply.starts_with("err "),
            "over max_bytes the socket answers err: {reply}"
        );
        let counted = d
            .metric_until(
                "clickhook_ingest_rejected_total{source=\"unix\",reason=\"unavailable\"}",
                |v| v >= 1.0,
            )
            .await;
        assert_eq!(counted, 1.0, "counted as unavailable, not as an invalid click");
    }

    // Crash, bring the endpoint up, restart: everything acknowledged arrives.
    d.kill9();
    restart_and_expect_every_acknowledged(&mut d, addr, &accepted, Refused::NeverStored).await;
}

/// `clickhook serve` on a config whose storage path cannot work: exit 1, the path named,
/// no panic.
fn assert_clear_start_failure(storage_path: &str, dir: &Path, expect_in_error: &str) {
    let cfg = config_text("").replace("path = \"data\"", &format!("path = \"{storage_path}\""));
    std::fs::write(dir.join("config.toml"), cfg).unwrap();
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(dir.join("config.toml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stderr.contains("panicked"),
        "{storage_path}: a panic instead of an error:\n{stderr}"
    );
    assert!(
        !stdout.starts_with("ready"),
        "{storage_path}: the daemon must not start:\n{stdout}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{storage_path}: an unusable data directory exits 1:\n{stderr}"
    );
    assert!(
        stderr.contains(expect_in_error),
        "{storage_path}: the error must name the path ({expect_in_error}):\n{stderr}"
    );
}

#[test]
fn an_unusable_data_directory_is_a_clear_start_error_even_as_root() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where a parent directory should be: mkdir fails (ENOTDIR) for root too.
    std::fs::write(dir.path().join("plain-file"), b"not a directory").unwrap();
    let under_file = dir.path().join("plain-file").join("data");
    assert_clear_start_failure(under_file.to_str().unwrap(), dir.path(), under_file.to_str().unwrap());
    // The storage path itself is a regular file.
    let file = dir.path().join("plain-file");
    assert_clear_start_failure(file.to_str().unwrap(), dir.path(), file.to_str().unwrap());
    // procfs takes no new directories, whoever asks.
    assert_clear_start_failure(
        "/proc/clickhook-no-such/data",
        dir.path(),
        "/proc/clickhook-no-such/data",
    );
}

/// How a data directory was damaged between two runs.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// None: the control, which shows the restart delivers everything when nothing is damaged.
    Nothing,
    /// Random bytes over the whole `conf` file.
    ConfGarbage,
    /// Random bytes over 2,000 bytes in the middle of the `db` file.
    DbMiddleGarbage,
    /// Random bytes over the whole `db` file.
    DbAllGarbage,
    /// The `db` file cut to half its length.
    DbTruncated,
    /// The event segment files deleted.
    SegmentsGone,
}

/// The event segment files of a data directory.
fn segment_files(data: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(data.join("events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg") && std::fs::metadata(p).unwrap().len() > 0)
        .collect()
}

fn damage(data: &Path, how: Damage) {
    use rand::RngCore;
    use std::io::{Seek, SeekFrom, Write};
    let (name, from, len) = match how {
        Damage::Nothing => return,
        Damage::ConfGarbage => ("conf", 0.0, 1.0),
        Damage::DbMiddleGarbage => ("db", 0.5, 0.0),
        Damage::DbAllGarbage => ("db", 0.0, 1.0),
        Damage::SegmentsGone => {
            let files = segment_files(data);
            assert!(!files.is_empty(), "the clicks went to a segment file");
            for f in files {
                std::fs::remove_file(f).unwrap();
            }
            return;
        }
        Damage::DbTruncated => {
            let f = std::fs::OpenOptions::new().write(true).open(data.join("db")).unwrap();
            let size = f.metadata().unwrap().len();
            f.set_len(size / 2).unwrap();
            return;
        }
    };
    let path = data.join(name);
    let size = std::fs::metadata(&path).unwrap().len();
    let start = (size as f64 * from) as u64;
    let n = if len > 0.0 { size } else { 2000.min(size - start) };
    let mut garbage = vec![0u8; n as usize];
    rand::thread_rng().fill_bytes(&mut garbage);
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(start)).unwrap();
    f.write_all(&garbage).unwrap();
    f.sync_all().unwrap();
}

/// A daemon whose endpoint at `addr` is down, given 40 clicks in one request and then
/// stopped cleanly; with the ids it acknowledged.
async fn forty_clicks_stored_and_stopped(addr: std::net::SocketAddr) -> (Daemon, Vec<String>) {
    let mut d = Daemon::start(&config_text(&down_endpoint(addr)));
    let body = format!(
        "[{}]",
        (0..40)
            .map(|i| click(&i.to_string(), "w"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (status, v) = d.post(&body, "application/json").await;
    assert_eq!(status, 202, "{v}");
    let accepted: Vec<String> = accepted_ids(&v);
    assert_eq!(d.terminate(), 0, "clean stop:\n{}", d.logs());
    (d, accepted)
}

/// Accepts 40 clicks for a down endpoint, stops cleanly, damages the data directory, and
/// starts again with the endpoint up. Passes when the start fails with exit 1 and an error
/// naming the data directory, or when every acknowledged click is still delivered.
async fn corrupted_data_dir(how: Damage) {
    let addr = free_addr();
    let (d, accepted) = forty_clicks_stored_and_stopped(addr).await;
    let data = d.dir.path().join("data");
    damage(&data, how);

    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(d.config_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sink = Sink::start_on(addr).await;
    // Give it time to either fail or deliver, then stop it either way.
    let pid = out.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut child = out;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        let mut got = sink.event_ids("/a");
        got.sort();
        got.dedup();
        if got.len() >= accepted.len() || Instant::now() > deadline {
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "{how:?}: a panic instead of an error:\n{stderr}"
    );
    match status {
        Some(s) => {
            eprintln!(
                "{how:?}: the daemon refused to start (exit {:?}): {}",
                s.code(),
                stderr.trim()
            );
            assert_eq!(
                s.code(),
                Some(1),
                "{how:?}: a damaged data directory exits 1:\n{stderr}"
            );
            assert!(
                stderr.contains(data.to_str().unwrap()),
                "{how:?}: the error names the data directory:\n{stderr}"
            );
        }
        None => {
            let (delivered, lost) = delivered_and_lost(&sink, &accepted);
            eprintln!(
                "{how:?}: the daemon started and recovered; acknowledged {}, delivered {}, lost {}",
                accepted.len(),
                delivered.len(),
                lost.len()
            );
            assert!(
                lost.is_empty(),
                "{how:?}: the daemon started on a damaged data directory without an error and lost {} of {} \
                 acknowledged clicks",
                lost.len(),
                accepted.len()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undamaged_data_directory_delivers_everything_after_the_restart() {
    corrupted_data_dir(Damage::Nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_conf_file_is_a_clear_start_error() {
    corrupted_data_dir(Damage::ConfGarbage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_middle_of_the_db_file_loses_nothing_silently() {
    corrupted_data_dir(Damage::DbMiddleGarbage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_db_file_of_garbage_loses_nothing_silently() {
    corrupted_data_dir(Damage::DbAllGarbage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_db_file_loses_nothing_silently() {
    corrupted_data_dir(Damage::DbTruncated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_event_segments_are_a_clear_start_error() {
    corrupted_data_dir(Damage::SegmentsGone).await;
}

/// Garbage over the start of the event segment. The daemon still starts (sled's records
/// are whole), the clicks of the damaged batch become dead letters whose error names the
/// damage, and the rest are delivered: none is dropped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_an_event_segment_turns_its_clicks_into_dead_letters_that_say_so() {
    use std::os::unix::fs::FileExt;
    let addr = free_addr();
    let (mut d, _) = forty_clicks_stored_and_stopped(addr).await;
    let files = segment_files(&d.dir.path().join("data"));
    assert_eq!(files.len(), 1);
    let f = std::fs::OpenOptions::new().write(true).open(&files[0]).unwrap();
    f.write_all_at(&[0x5a; 100], 0).unwrap();
    drop(f);

    let sink = Sink::start_on(addr).await;
    d.spawn();
    // Jobs of the damaged batch are read (and buried) one after another: wait until every
    // click is accounted for, one way or the other.
    let deadline = Instant::now() + WAIT;
    let (dead, delivered) = loop {
        let dead = d.metric("clickhook_dead_letters_total{endpoint=\"a\"}").await;
        let dead = if dead.is_nan() { 0 } else { dead as usize };
        let mut delivered = sink.event_ids("/a");
        delivered.sort();
        delivered.dedup();
        if dead + delivered.len() >= 40 || Instant::now() > deadline {
            break (dead, delivered.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        dead > 0 && delivered > 0 && dead + delivered == 40,
        "only the damaged batch is lost to delivery, and none silently: {dead} dead, {delivered} delivered"
    );
    // The count moves when a letter is handed to the log's writer; the list, once written.
    let letters = loop {
        let (s, letters) = d.admin_get("/v1/endpoints/a/dead").await;
        assert_eq!(s, 200);
        let letters = letters.as_array().unwrap().clone();
        if letters.len() >= dead || Instant::now() > deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letters.len(), dead, "{letters:?}");
    for l in &letters {
        let error = l["last_error"].as_str().unwrap();
        assert!(error.contains("checksum") && error.contains(".seg"), "{error}");
    }
    let logs = d.logs();
    assert!(
        logs.contains("dead letters buried without the event's body"),
        "the operator is told that letters lack their bodies: {logs}"
    );
}

/// A tmpfs mounted for one test: a disk that really fills. Unmounted on drop.
struct SmallDisk {
    at: std::path::PathBuf,
}

impl SmallDisk {
    /// `None` where this process may not mount (it needs root with `CAP_SYS_ADMIN`).
    fn mount(at: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        mounted.then(|| SmallDisk { at: at.to_path_buf() })
    }

    /// Makes room: the same disk, with its files, `size` large.
    fn grow(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// A daemon whose data directory is on a fresh tmpfs of `size`, with `min_free` and the
/// endpoint of [`down_endpoint`]; `None` (the test says it is skipped) where no tmpfs
/// can be mounted. The temporary directory holding the mount point goes last.
fn daemon_on_small_disk(
    size: &str,
    min_free: &str,
) -> Option<(tempfile::TempDir, SmallDisk, std::net::SocketAddr, Daemon)> {
    let room = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&room.path().join("disk"), size) else {
        eprintln!("SKIPPED: this process cannot mount a tmpfs (root with CAP_SYS_ADMIN needed), so no disk can fill");
        return None;
    };
    let addr = free_addr();
    let data = disk.at.join("data");
    let cfg = config_text(&down_endpoint(addr)).replace(
        "path = \"data\"",
        &format!("path = \"{}\"\nmin_free = \"{min_free}\"", data.display()),
    );
    let d = Daemon::start(&cfg);
    Some((room, disk, addr, d))
}

/// Posts batches of `per_request` clicks of 2 KiB, `pause` apart, until one is refused:
/// the clicks acknowledged before, and the refusal's body.
async fn fill_until_refused(d: &Daemon, per_request: usize, pause: Duration) -> (Vec<String>, serde_json::Value) {
    let mut accepted: Vec<String> = Vec::new();
    let deadline = Instant::now() + WAIT;
    for i in 0.. {
        assert!(Instant::now() < deadline, "no refusal within {WAIT:?}");
        let batch: Vec<String> = (0..per_request).map(|j| fat_click(i * per_request + j)).collect();
        let (status, body) = d.post(&format!("[{}]", batch.join(",")), "application/json").await;
        match status {
            202 => accepted.extend(accepted_ids(&body)),
            503 => return (accepted, body),
            other => panic!("ingest answered {other}: {body}"),
        }
        tokio::time::sleep(pause).await;
    }
    unreachable!("the loop ends in a refusal or a panic")
}

/// Asserts that the daemon still runs `while_what` (checked after `wait`).
async fn assert_still_running(d: &mut Daemon, wait: Duration, while_what: &str) {
    tokio::time::sleep(wait).await;
    assert_eq!(
        d.exit_code_within(Duration::ZERO),
        None,
        "the daemon stopped while {while_what}:\n{}",
        d.logs()
    );
}

/// The disk under the data directory fills up (a real filesystem, no `max_bytes`): ingest
/// answers 503 saying the write failed, `/readyz` says the log's writes fail, a stop
/// whose last writes fail exits 1 and says so, and once the disk has room again a restart
/// delivers every click acknowledged before, and ingest accepts clicks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_unready_and_loses_nothing_acknowledged() {
    // Without the reserve, as when another process fills the disk between two looks.
    let Some((_room, disk, addr, mut d)) = daemon_on_small_disk("6m", "0B") else {
        return;
    };

    let (mut accepted, refused) = fill_until_refused(&d, 10, Duration::ZERO).await;
    eprintln!("{} clicks accepted before the 503: {refused}", accepted.len());
    assert!(!accepted.is_empty(), "clicks fit before the disk filled");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("storage failed") && error.contains("No space left on device"),
        "the 503 says the write failed, and why: {refused}"
    );
    let (status, ready) = raw_request("GET", &format!("{}/readyz", d.admin), "", &[]).await;
    assert_eq!(status, 503, "not ready while writes fail: {ready}");
    assert!(ready.contains("writes to the log fail"), "{ready}");
    assert!(ready.contains("No space left on device"), "{ready}");
    let counted = d
        .metric("clickhook_ingest_rejected_total{source=\"http\",reason=\"storage\"}")
        .await;
    // Over HTTP a refused request counts once.
    assert!(counted >= 1.0, "the refused request counts under storage: {counted}");
    // The socket refuses lines the same way, and says why. A click may still fit in pages
    // a failed write left allocated, so 128 KiB of them are sent; those acknowledged must
    // arrive too.
    {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let stream = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
        let (read, mut write) = stream.into_split();
        let lines: String = (0..64).map(|i| fat_click(9_000_000 + i) + "\n").collect();
        write.write_all(lines.as_bytes()).await.unwrap();
        write.shutdown().await.unwrap();
        let mut replies = BufReader::new(read).lines();
        let mut refused = 0;
        while let Some(reply) = replies.next_line().await.unwrap() {
            if let Some(id) = reply.strip_prefix("ok ") {
                accepted.push(id.to_string());
            } else {
                assert!(
                    reply.starts_with("err unavailable: storage failed") && reply.contains("No space left on device"),
                    "{reply}"
                );
                refused += 1;
            }
        }
        assert!(refused > 0, "64 clicks of 2 KiB fit on the full disk");
        let counted = d
            .metric("clickhook_ingest_rejected_total{source=\"unix\",reason=\"storage\"}")
            .await;
        assert_eq!(counted, refused as f64, "each refused line counts under storage");
    }

    // A stop on the full disk: if its last writes fail, the exit code says so.
    let code = d.terminate();
    let logs = d.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    // The log writer's own words for each way its close can fail.
    let close_failed = [
        "the last flush of the log failed",
        "a write group failed as the log closed",
        "cannot move the queue entries waiting in memory to runs",
    ]
    .iter()
    .any(|said| logs.contains(said));
    assert_eq!(
        code,
        if close_failed { 1 } else { 0 },
        "exit 1 exactly when the close failed:\n{logs}"
    );
    if close_failed {
        assert!(logs.contains("the log's last writes as it closed failed"), "{logs}");
    }
    eprintln!("stopped on the full disk with exit code {code}");

    // Room again, the receiver up, a restart: everything acknowledged arrives.
    disk.grow("64m");
    restart_and_expect_every_acknowledged(&mut d, addr, &accepted, Refused::MayBeStored).await;
    let (status, body) = d.post(&fat_click(1_000_000), "application/json").await;
    assert_eq!(status, 202, "ingest takes clicks again: {body}");
    let (status, ready) = raw_request("GET", &format!("{}/readyz", d.admin), "", &[]).await;
    assert_eq!(status, 200, "{ready}");
    drop(d);
}

/// Under `storage.min_free` free on the log's disk, ingest answers 503 `unavailable`
/// before the disk fills (which would stop sled until a restart), and resumes by itself
/// once there is room again; what it acknowledged arrives, across a `kill -9` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_min_free_ingest_answers_503_and_resumes_without_a_restart() {
    let Some((_room, disk, addr, mut d)) = daemon_on_small_disk("8m", "4MiB") else {
        return;
    };
    // Paced, so the reserve outlasts the second between two looks at the disk.
    let (mut accepted, refused) = fill_until_refused(&d, 5, Duration::from_millis(10)).await;
    assert!(!accepted.is_empty(), "clicks fit before the reserve");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(error.contains("storage.min_free"), "the 503 says why: {refused}");
    let logs = d.logs();
    assert!(!logs.contains("No space left on device"), "the disk filled:\n{logs}");
    let (status, ready) = raw_request("GET", &format!("{}/readyz", d.admin), "", &[]).await;
    assert_eq!(status, 200, "the log still writes; only ingest waits: {ready}");

    // Room again: ingest resumes by itself.
    disk.grow("64m");
    let resumed = Instant::now() + WAIT;
    loop {
        let (status, body) = d.post(&fat_click(0), "application/json").await;
        if status == 202 {
            accepted.extend(accepted_ids(&body));
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < resumed, "ingest did not resume: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    d.kill9();
    restart_and_expect_every_acknowledged(&mut d, addr, &accepted, Refused::NeverStored).await;
}

/// sled refuses every write after a failed write of its own until it is opened again, so
/// once the disk has room again and takes writes (not while it is full, nor read-only)
/// the daemon stops itself (exit 1, saying why) for the service manager to start it
/// again; the restart delivers everything acknowledged and takes clicks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_stuck_after_a_full_disk_stops_the_daemon_once_the_disk_has_room() {
    let Some((_room, disk, addr, mut d)) = daemon_on_small_disk("6m", "0B") else {
        return;
    };
    let (accepted, _) = fill_until_refused(&d, 10, Duration::ZERO).await;
    // Endpoints created through the API are durable settings: sled flushes them, on the
    // full disk, until one flush fails.
    let mut failed = None;
    for i in 0..50 {
        let (status, body) = d
            .admin_request(
                "POST",
                "/v1/endpoints",
                serde_json::json!({"id": format!("extra-{i}"), "url": "http://127.0.0.1:9/"}),
            )
            .await;
        if status >= 500 {
            failed = Some(body);
            break;
        }
    }
    let failed = failed.expect("creating endpoints on a full disk fails within 50 tries");
    eprintln!("refused on the full disk: {failed}");
    // Housekeeping's probe finds sled refusing writes within a second or two.
    let probed = Instant::now() + WAIT;
    while !d.logs().contains("sled takes no more writes") {
        assert!(Instant::now() < probed, "sled still takes writes:\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The disk full, the daemon stays up (answering 503): a restart would not help yet.
    assert_still_running(&mut d, Duration::from_secs(7), "its disk was still full").await;

    // Room, but no file can be written in the data directory (as on a read-only disk,
    // which cannot be remounted so under a daemon writing to it): a directory stands
    // where the daemon's write probe goes. A restart could not open the log, so it stays.
    let probe = disk.at.join("data").join(".clickhook-write-probe");
    std::fs::create_dir(&probe).unwrap();
    disk.grow("64m");
    assert_still_running(&mut d, Duration::from_secs(7), "its data directory took no writes").await;

    std::fs::remove_dir(&probe).unwrap();
    let code = d.exit_code_within(WAIT);
    let logs = d.logs();
    assert_eq!(code, Some(1), "the daemon stops for its stuck log:\n{logs}");
    assert!(logs.contains("stopped to reopen the log"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");

    restart_and_expect_every_acknowledged(&mut d, addr, &accepted, Refused::MayBeStored).await;
    let (status, body) = d.post(&fat_click(1_000_000), "application/json").await;
    assert_eq!(status, 202, "ingest takes clicks again: {body}");
}
