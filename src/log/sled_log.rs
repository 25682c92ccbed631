//! sled 0.34 behind [`ClickLog`]. One writer thread, fed by a crossbeam channel, owns
//! every write: it drains whatever is queued, applies it in order, flushes once (group
//! commit) and only then answers the waiting tickets, so nothing is acknowledged before
//! it is durable. Small appends queued one after another are stored together, as one.
//! Within a group, writes are ordered so that a crash keeping only a prefix of them
//! leaves nothing that hides or breaks acknowledged data. Event batches' bytes go to the
//! log's segment files ([`super::segments`]), synced before each flush, and sled keeps a
//! pointer to each. An append's queue entries start as fresh entries in memory, behind
//! one route record ([`super::fresh`]), and move to per-endpoint queue runs only when
//! they get state of their own or the log closes (past a bound on what the records list,
//! appends write runs directly). Readers go to memory, then sled and the segments
//! directly, after a ring of the latest events and the event batch their thread read
//! last. It must not be called for writes from anywhere but through the channel, with one
//! exception: [`ClickLog::endpoint_key`] assigns a key directly, as its callers need the
//! key back at once, and no write through the channel touches the mapping or its counter.

use super::fresh::{FreshQueues, Listing};
use super::keys::{
    self, BatchRecord, BatchView, CLIENT_ID, DEAD, ENDPOINT_KEY, EVENT_BATCH, LEGACY_EVENT, LEGACY_PENDING, QUEUE_RUN,
    ROUTES, SETTING,
};
use super::segments::{SegmentFiles, SegmentWriter};
use super::{AppendOutcome, ClickLog, DeadLetter, EndpointKey, LogError, NewEvent, Pending, Seq, StoredEvent, Ticket};
use crate::config::FsyncMode;
use crate::said_seldom::RateLimited;
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How many queued operations one group commit takes at most, so one group's latency
/// stays bounded under a flood.
const MAX_OPS_PER_COMMIT: usize = 4096;
/// How often writes that nobody waits for are flushed under `fsync = "always"`.
const LAZY_FLUSH: Duration = Duration::from_millis(200);
/// How long delivery progress nobody waits for (delivered and rescheduled entries) may
/// wait to be applied with later writes. Workers hand over completions many times a
/// millisecond; gathered for this long they cost one commit of the writer, or ride along
/// with the next append, instead of one wake-up each. Only a crash in this window can
/// repeat those deliveries, which at-least-once allows and [`LAZY_FLUSH`] already allows
/// for longer.
const DEFER_PROGRESS: Duration = Duration::from_millis(10);

/// How long the writes of a failed group wait at most before they are tried again.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(1);

/// Entries per queue run an append writes, and half the size past which a rewritten run
/// is split: small enough that rewriting a run for a few completions stays cheap, large
/// enough that a batch of clicks costs one write per endpoint.
const RUN_MAX: usize = 256;

/// Queue entries the live route records may list, delivered or not; past it, appends'
/// entries go straight to queue runs. A record costs one sled write for a whole append
/// and its delivered entries none, where runs cost a write and a rewrite per endpoint
/// (for clicks spread over many endpoints, a run per click). The entries are held in
/// memory, 8 bytes each, which this bounds (2 MiB); it is twice [`FRESH_REPEAT_MAX`],
/// as records of clicks spread over many endpoints finish late and list delivered
/// entries beside their waiting ones: 39–58k delivered of 141–192k listed in a backlog
/// of 200,000 clicks over 10,000 endpoints.
pub const FRESH_LISTED_MAX: usize = 262_144;

/// Delivered entries the live route records may still list. A crash queues a live
/// record's delivered entries again, so this bounds what a crash can repeat; past it, the
/// writer rewrites the oldest records to list only their waiting entries, down to half.
pub const FRESH_REPEAT_MAX: usize = 131_072;

type Reply<T> = oneshot::Sender<Result<T, LogError>>;

enum WriteOp {
    Append(Vec<NewEvent>, Reply<Vec<AppendOutcome>>),
    /// Writes applied in order, answered (if `reply` is set) once applied, and once
    /// flushed when `durable`.
    Apply {
        steps: Vec<Step>,
        reply: Option<Reply<()>>,
        durable: bool,
    },
    /// Delivery progress of one endpoint (delivered entries leave, retried ones get new
    /// state): nobody waits for it and it needs no flush of its own, so the writer may
    /// hold it back and rewrite each run it touches once.
    Progress {
        endpoint: EndpointKey,
        changes: Vec<(Seq, Option<Pending>)>,
    },
    Close(Reply<()>),
    /// Keeps the writer inside its current group until the sender sends or goes, so a
    /// test can queue the operations of the next group.
    #[cfg(test)]
    Hold(std::sync::mpsc::Receiver<()>),
    /// Stops the writer as a crash right after a flush would: what was applied is
    /// durable, and the route records stay as they are, for the next open to recover.
    #[cfg(test)]
    Crash(Reply<()>),
    /// Fails the group it is in, as a storage error would.
    #[cfg(test)]
    Fail,
}

/// One write of an [`WriteOp::Apply`].
enum Step {
    /// A raw key write; `None` removes the key.
    Raw(Vec<u8>, Option<Vec<u8>>),
    /// Adds an entry to an endpoint's queue, or replaces the entry of the same seq.
    Put(EndpointKey, Pending),
    /// Takes an entry out of an endpoint's queue, if it is there.
    Remove(EndpointKey, Seq),
    /// Drops an endpoint's whole queue, fresh entries and runs, and its dead letters (it
    /// was deleted). The runs are listed here, in the writer, after every earlier write:
    /// a retry held back or still in the channel may yet start a run.
    ForgetEndpoint(EndpointKey),
}

impl Step {
    fn raw(writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Vec<Step> {
        writes.into_iter().map(|(k, v)| Step::Raw(k, v)).collect()
    }
}

impl WriteOp {
    fn is_progress(&self) -> bool {
        matches!(self, WriteOp::Progress { .. })
    }

    /// Whether the writer stops after this op's group.
    fn stops_writer(&self) -> bool {
        #[cfg(test)]
        if matches!(self, WriteOp::Crash(_)) {
            return true;
        }
        matches!(self, WriteOp::Close(_))
    }
}

/// The sled-backed click log.
pub struct SledLog {
    tree: sled::Tree,
    tx: Sender<WriteOp>,
    writer: Mutex<Option<JoinHandle<()>>>,
    events: Arc<AtomicU64>,
    recent: Arc<RecentEvents>,
    fresh: Arc<Mutex<FreshQueues>>,
    /// Held (shared) by a reader from its look at memory to the end of its look at sled,
    /// and by the writer while it queues appends straight into runs. Without it a reader
    /// could miss one append still on its way into memory and see a later one in sled,
    /// and its worker's cursor would pass the first for good.
    spilling: Arc<RwLock<()>>,
    segments: Arc<SegmentFiles>,
    /// This log's number in [`LAST_BATCH`].
    id: u64,
    endpoint_keys: Mutex<()>,
    /// Held by a prune from its look at what is pending until its deletions are applied,
    /// and by a revival or replay from its look at what exists until its writes are queued.
    /// Without it a prune planned beside a revival deletes the events the revival queues.
    maintenance: Arc<Mutex<()>>,
    /// "An endpoint keeps events past retention", from prunes.
    prune_held_warning: Arc<RateLimited>,
    /// "Records a prune cannot decode are kept", from prunes.
    prune_damaged_warning: Arc<RateLimited>,
    /// "Dead letters buried without the event's body".
    no_body_warning: RateLimited,
    /// Set by the writer while its writes fail; see [`ClickLog::write_failure`].
    write_failure: Arc<Mutex<Option<String>>>,
    /// Set once sled refused a probe write; see [`ClickLog::needs_reopen`].
    reopen_needed: Arc<Mutex<Option<String>>>,
    /// Tests stop the next prune between its plan and its writes: it tells the first
    /// sender, and goes on when the receiver gets a message.
    #[cfg(test)]
    prune_pause: Arc<Mutex<Option<Pause>>>,
    /// Tests stop the next `pending_after` with runs to read between its look at memory
    /// and its look at sled, as [`Self::prune_pause`] stops a prune.
    #[cfg(test)]
    read_pause: Mutex<Option<Pause>>,
    /// How many of the next `pending_after` calls fail, as a storage error would.
    #[cfg(test)]
    read_failures: std::sync::atomic::AtomicU32,
}

/// A test's stop: whoever reaches it tells the sender, and goes on once the receiver
/// gets a message.
#[cfg(test)]
type Pause = (std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>);

/// Stops here if a test set `hook`, once.
#[cfg(test)]
fn pause_at(hook: &Mutex<Option<Pause>>) {
    if let Some((reached, resume)) = lock(hook).take() {
        let _ = reached.send(());
        let _ = resume.recv();
    }
}

/// How many of the latest events [`RecentEvents`] keeps.
const RECENT_EVENTS: usize = 8192;

/// The latest events by seq, in a ring: delivery reads an event milliseconds after its
/// append, and finding it here spares a sled lookup (a tenth of a delivery thread's time).
/// An event's bytes never change, so a slot only has to be right about which seq it holds.
struct RecentEvents {
    slots: Box<[Mutex<Option<StoredEvent>>]>,
    /// Event batches removed so far; readers' cached batches are void once it moves.
    removals: AtomicU64,
}

impl RecentEvents {
    fn new() -> Self {
        RecentEvents {
            slots: (0..RECENT_EVENTS).map(|_| Mutex::new(None)).collect(),
            removals: AtomicU64::new(0),
        }
    }

    fn slot(&self, seq: Seq) -> &Mutex<Option<StoredEvent>> {
        &self.slots[(seq % RECENT_EVENTS as u64) as usize]
    }

    fn put(&self, event: StoredEvent) {
        if let Ok(mut slot) = self.slot(event.seq).lock() {
            *slot = Some(event);
        }
    }

    fn get(&self, seq: Seq) -> Option<StoredEvent> {
        let slot = self.slot(seq).lock().ok()?;
        slot.as_ref().filter(|ev| ev.seq == seq).cloned()
    }

    fn forget(&self, seq: Seq) {
        if let Ok(mut slot) = self.slot(seq).lock() {
            if slot.as_ref().is_some_and(|ev| ev.seq == seq) {
                *slot = None;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SledOptions {
    pub fsync: FsyncMode,
    pub fsync_interval: Duration,
    pub cache_capacity: u64,
    /// The size past which event batches go to a new segment file.
    pub segment_bytes: u64,
    /// [`FRESH_LISTED_MAX`], or less for tests (0: every append's entries go straight to
    /// runs).
    pub fresh_listed_max: usize,
    /// [`FRESH_REPEAT_MAX`], or less for tests.
    pub fresh_repeat_max: usize,
}

#[cfg(test)]
impl SledOptions {
    /// Small and flushed on every write, for tests.
    pub(crate) fn for_tests(segment_bytes: u64, fresh_listed_max: usize, fresh_repeat_max: usize) -> Self {
        SledOptions {
            fsync: FsyncMode::Always,
            fsync_interval: Duration::from_millis(50),
            cache_capacity: 1 << 20,
            segment_bytes,
            fresh_listed_max,
            fresh_repeat_max,
        }
    }
}

/// What a dead letter holds in place of the event's body when the event could not be
/// read at its burial; a click's body is always a JSON object.
const NO_BODY: &[u8] = b"null";

/// The event body a dead letter's record (acceptance time, then the body) holds, if it
/// holds one.
fn body_copy(record: &[u8]) -> Option<&[u8]> {
    record.get(8..).filter(|body| *body != NO_BODY)
}

/// The fresh entries (or the maintenance lock), whoever held the lock last: nothing
/// panics while holding it, and its state stays whole between calls.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SledLog {
    /// Opens (or creates) the log and recovers its counters. Fails with a clear error on
    /// an unreadable or corrupt directory rather than starting empty.
    pub fn open(path: &Path, options: SledOptions) -> Result<Arc<SledLog>, LogError> {
        std::fs::create_dir_all(path).map_err(|e| LogError::Storage(format!("{}: {e}", path.display())))?;
        restrict_permissions(path);
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(options.cache_capacity)
            // The writer flushes per batch (or per interval) itself.
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| LogError::Storage(format!("{}: {e}", path.display())))?;
        let tree = db.open_tree("log")?;
        // sled has created its files by now; give them the directory's privacy.
        restrict_permissions(path);
        let (next_seq, recorded) = recover_next_seq(&tree)?;
        // sled recovers a damaged segment as the end of the log; the marker written beside
        // it says how far the log really went, so a short recovery stops the start. The
        // recorded next seq is checked, not the events: it is written after a group's
        // events and queue runs, so a log cut anywhere inside the last group fails here
        // even when the group's small event pointers survived and its queue runs did not.
        let marker = read_marker(path)?;
        if recorded < marker {
            return Err(LogError::Corrupt(format!(
                "{}: the log recovered only up to event {} but events up to {} were stored: its files are \
                 damaged. Nothing was changed; restore the directory from a backup, or move it aside to start \
                 with an empty log",
                path.display(),
                recorded.saturating_sub(1),
                marker.saturating_sub(1)
            )));
        }
        migrate_single_events(&db, &tree)?;
        migrate_single_entries(&db, &tree)?;
        move_routes_to_runs(&db, &tree)?;
        let mut fresh = FreshQueues::default();
        for (ep, _) in endpoints_with_runs(&tree)? {
            fresh.runs_written(ep);
        }
        let fresh = Arc::new(Mutex::new(fresh));
        let spilling = Arc::new(RwLock::new(()));
        let mut count = 0u64;
        // Batches per segment, so a segment goes when its last batch does.
        let mut live = BTreeMap::new();
        for v in tree.scan_prefix([EVENT_BATCH]).values() {
            let v = v?;
            let batch = BatchRecord::decode(&v)?;
            count += batch.len() as u64;
            if let BatchRecord::InFile(at) = batch {
                *live.entry(at.segment).or_insert(0u64) += 1;
            }
        }
        let (segment_files, segment_writer) = SegmentWriter::open(path, live, options.segment_bytes)?;
        restrict_permissions(path);
        let events = Arc::new(AtomicU64::new(count));
        let recent = Arc::new(RecentEvents::new());
        let (tx, rx) = crossbeam_channel::unbounded();
        let write_failure = Arc::new(Mutex::new(None));
        let reopen_needed = Arc::new(Mutex::new(None));
        let writer = Writer {
            db,
            tree: tree.clone(),
            rx,
            next_seq,
            options,
            events: events.clone(),
            recent: recent.clone(),
            fresh: fresh.clone(),
            spilling: spilling.clone(),
            segments: segment_writer,
            dir: path.to_path_buf(),
            seq_recorded: recorded,
            marker_written: marker,
            last_marker: Instant::now(),
            failure_warning: RateLimited::new(STORAGE_WARN_EVERY_MS),
            write_failure: write_failure.clone(),
            appended_unflushed: false,
        };
        let handle = std::thread::Builder::new()
            .name("clickhook-log-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| LogError::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok(Arc::new(SledLog {
            tree,
            tx,
            writer: Mutex::new(Some(handle)),
            events,
            recent,
            fresh,
            spilling,
            segments: segment_files,
            id: NEXT_LOG_ID.fetch_add(1, Ordering::Relaxed),
            endpoint_keys: Mutex::new(()),
            maintenance: Arc::new(Mutex::new(())),
            prune_held_warning: Arc::new(RateLimited::new(HELD_PRUNE_WARN_EVERY_MS)),
            prune_damaged_warning: Arc::new(RateLimited::new(HELD_PRUNE_WARN_EVERY_MS)),
            no_body_warning: RateLimited::new(STORAGE_WARN_EVERY_MS),
            write_failure,
            reopen_needed,
            #[cfg(test)]
            prune_pause: Arc::new(Mutex::new(None)),
            #[cfg(test)]
            read_pause: Mutex::new(None),
            #[cfg(test)]
            read_failures: std::sync::atomic::AtomicU32::new(0),
        }))
    }

    /// The queue entries a replay of `[since_ms, until_ms)` puts back: one per retained
    /// event of the window that `wanted` admits, and one per event it cannot read.
    fn replayed(
        &self,
        endpoint: EndpointKey,
        since_ms: u64,
        until_ms: u64,
        wanted: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<Step>, LogError> {
        let mut steps = Vec::new();
        // Records that cannot be decoded: how many, and the first with its error.
        let mut damaged: Option<(u64, Seq, LogError)> = None;
        for kv in self.tree.scan_prefix([EVENT_BATCH]) {
            let (k, v) = kv?;
            let first = keys::u64_at(&k, 1)?;
            let batch = match BatchRecord::decode(&v) {
                Ok(batch) => batch,
                Err(e) => {
                    // Its time cannot be read, so no window can say its events belong: they
                    // are left out, and said. Queued, each would be buried as a dead letter
                    // for every replay of any window, past the endpoint's filters too.
                    damaged.get_or_insert((0, first, e)).0 += 1;
                    continue;
                }
            };
            if batch.accepted_ms() < since_ms || batch.accepted_ms() >= until_ms {
                continue;
            }
            for seq in first..first + batch.len() as u64 {
                let queue = match self.event(seq) {
                    Ok(ev) => ev.is_some_and(|ev| wanted(&ev.data)),
                    // Unreadable, it is queued all the same: delivery buries it as a dead
                    // letter that says why, where a failed replay would say nothing of it.
                    Err(_) => true,
                };
                if queue {
                    steps.push(Step::Put(endpoint, Pending::fresh(seq)));
                }
            }
        }
        if let Some((records, seq, error)) = damaged {
            tracing::warn!(
                endpoint_key = endpoint,
                records,
                seq,
                error = %error,
                "a replay left out event batches it cannot decode: their time is unknown"
            );
        }
        Ok(steps)
    }

    /// Whether the dead letter at `dead_key` exists and holds the event's body.
    fn holds_a_copy(&self, dead_key: &[u8]) -> bool {
        match self.tree.get(dead_key) {
            Ok(Some(v)) => keys::decode_dead(&v).is_ok_and(|(_, record)| body_copy(record).is_some()),
            _ => false,
        }
    }

    /// Makes the next `n` reads of a queue fail, as a storage error would.
    #[cfg(test)]
    pub(crate) fn fail_reads(&self, n: u32) {
        self.read_failures.store(n, Ordering::SeqCst);
    }

    /// Takes every endpoint key but those given, so the next new endpoint gets none.
    #[cfg(test)]
    pub(crate) fn exhaust_endpoint_keys(&self) {
        let end = u32::MAX.to_be_bytes();
        let _ = self.tree.insert(keys::META_NEXT_ENDPOINT, &end[..]);
    }

    /// Stops the writer at its next group until the returned sender sends or is dropped:
    /// appends submitted meanwhile are not durable, for tests of what waits for that.
    #[cfg(test)]
    pub(crate) fn hold_writer(&self) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel();
        self.send(WriteOp::Hold(held));
        release
    }

    fn send(&self, op: WriteOp) {
        // A send fails only after close; the op's reply sender is dropped with it, and the
        // waiting ticket then reports the log closed.
        let _ = self.tx.send(op);
    }

    fn apply(&self, steps: Vec<Step>, durable: bool) -> Ticket<()> {
        apply_via(&self.tx, steps, durable)
    }
}

/// Queues `steps` to the writer; the ticket resolves once they are applied (and durable,
/// if asked). A failed send drops the reply, and the ticket then reports the log closed.
fn apply_via(tx: &Sender<WriteOp>, steps: Vec<Step>, durable: bool) -> Ticket<()> {
    let (reply, ticket) = oneshot::channel();
    let _ = tx.send(WriteOp::Apply {
        steps,
        reply: Some(reply),
        durable,
    });
    ticket
}

impl Drop for SledLog {
    fn drop(&mut self) {
        let (reply, _ticket) = oneshot::channel();
        let _ = self.tx.send(WriteOp::Close(reply));
        if let Ok(mut guard) = self.writer.lock() {
            if let Some(handle) = guard.take() {
                let _ = handle.join();
            }
        }
    }
}

/// Secrets live in the log: keeps the directory and its files private to the daemon's
/// user. A failure does not stop the start (the log works as well), but it is said: the
/// secrets may be readable by others.
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let restrict = |path: &Path, mode: u32| {
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot make the log's file private to this user");
        }
    };
    restrict(path, 0o700);
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot list the log's files to make them private to this user");
            return;
        }
    };
    for entry in entries {
        match entry {
            Ok(entry) => {
                let path = entry.path();
                restrict(&path, if path.is_dir() { 0o700 } else { 0o600 });
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot list the log's files to make them private to this user")
            }
        }
    }
}

/// The file beside sled's that records the next seq as of a past flush.
const MARKER_FILE: &str = "clickhook.seq";

fn read_marker(dir: &Path) -> Result<Seq, LogError> {
    match std::fs::read_to_string(dir.join(MARKER_FILE)) {
        Ok(text) => text.trim().parse().map_err(|_| {
            LogError::Corrupt(format!(
                "{}: {MARKER_FILE} holds {:?}, not a number",
                dir.display(),
                text.trim()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(LogError::Storage(format!("{}: {e}", dir.join(MARKER_FILE).display()))),
    }
}

/// Replaces the marker atomically and durably (temp file, fsync, rename, fsync the dir).
fn write_marker(dir: &Path, next_seq: Seq) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{MARKER_FILE}.tmp"));
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?
    };
    f.write_all(next_seq.to_string().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(MARKER_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Moves queue entries stored one per key (the layout before runs) into runs, then
/// removes them and flushes. A crash part way repeats it at the next open: putting an
/// entry into a run that already holds it changes nothing.
fn migrate_single_entries(db: &sled::Db, tree: &sled::Tree) -> Result<(), LogError> {
    let mut changes = Vec::new();
    let mut old_keys = Vec::new();
    for kv in tree.scan_prefix([LEGACY_PENDING]) {
        let (k, v) = kv?;
        let ep = keys::endpoint_of_queue_key(&k)?;
        let p = keys::decode_pending(&k, &v)?;
        changes.push(((ep, p.seq), QueueChange::Put(p)));
        old_keys.push(k);
    }
    if changes.is_empty() {
        return Ok(());
    }
    tracing::info!(entries = changes.len(), "moving queue entries into runs");
    apply_queue_changes(tree, changes)?;
    for k in old_keys {
        tree.remove(k)?;
    }
    db.flush()?;
    Ok(())
}

/// Moves the entries of the route records left by the last run (a crash, or a close that
/// failed) into runs, then removes the records and flushes. An entry already in a run
/// (moved there before the crash, its record not yet removed) keeps its state there;
/// entries delivered before the crash come back, which at-least-once allows.
fn move_routes_to_runs(db: &sled::Db, tree: &sled::Tree) -> Result<(), LogError> {
    let mut entries = Vec::new();
    let mut records = Vec::new();
    for kv in tree.scan_prefix([ROUTES]) {
        let (k, v) = kv?;
        let first = keys::u64_at(&k, 1)?;
        for (ep, seqs) in keys::decode_routes(first, &v)? {
            entries.extend(seqs.into_iter().map(|seq| (ep, seq)));
        }
        records.push(first);
    }
    if records.is_empty() {
        return Ok(());
    }
    tracing::info!(
        entries = entries.len(),
        "queueing the entries of the last run's route records"
    );
    queue_in_runs(tree, entries, &records)?;
    db.flush()?;
    Ok(())
}

/// Puts fresh `entries` into their endpoints' runs (an entry a run already holds keeps
/// its state there), then removes the route records at `records`: the runs first, so a
/// crash between keeps every entry somewhere.
fn queue_in_runs(tree: &sled::Tree, entries: Vec<(EndpointKey, Seq)>, records: &[Seq]) -> Result<(), LogError> {
    let changes: BTreeMap<_, _> = entries
        .into_iter()
        .map(|(ep, seq)| ((ep, seq), QueueChange::Add(Pending::fresh(seq))))
        .collect();
    apply_queue_changes(tree, changes)?;
    for first in records {
        tree.remove(&keys::routes(*first)[..])?;
    }
    Ok(())
}

/// The oldest seq some endpoint still waits for: nothing at or after it may be pruned.
/// Dead letters carry their own copy and hold nothing back. The endpoints come from the
/// runs themselves, not from the id mapping, and a key or run it cannot read is an error,
/// never a skip: a skipped endpoint would let its pending events go.
fn low_water(tree: &sled::Tree) -> Result<(Seq, Option<EndpointKey>), LogError> {
    let mut low_water = Seq::MAX;
    let mut held_by = None;
    // Route records go in seq order as their entries do, so the oldest holds the oldest.
    if let Some(k) = tree.scan_prefix([ROUTES]).keys().next() {
        low_water = keys::u64_at(&k?, 1)?;
    }
    for (ep, first_run) in endpoints_with_runs(tree)? {
        // A run's entries are sorted, and each begins with its seq.
        let oldest = keys::u64_at(&first_run, 0)?;
        if oldest < low_water || oldest == low_water && held_by.is_none() {
            low_water = oldest;
            held_by = Some(ep);
        }
    }
    Ok((low_water, held_by))
}

/// What a prune writes, and what it could not remove.
struct PrunePlan {
    steps: Vec<Step>,
    /// Events that go.
    pruned: u64,
    /// The seq whose pending entry keeps events past retention, if one does, with its
    /// endpoint when a queue run names it (a route record does not).
    held_at: Option<(Option<EndpointKey>, Seq)>,
    /// Records that cannot be decoded, kept as they are: how many, and what the first is
    /// with its error.
    damaged: Option<(u64, String)>,
}

impl PrunePlan {
    fn kept_damaged(&mut self, what: impl FnOnce() -> String) {
        self.damaged.get_or_insert_with(|| (0, what())).0 += 1;
    }
}

/// The writes of a prune at `cutoff` (accepted before it): whole event batches below the
/// low water, and expired client ids; with how many events go.
fn prune_plan(tree: &sled::Tree, cutoff: u64) -> Result<PrunePlan, LogError> {
    let (low_water, holder) = low_water(tree)?;
    let mut writes = Vec::new();
    let mut plan = PrunePlan {
        steps: Vec::new(),
        pruned: 0,
        held_at: None,
        damaged: None,
    };
    // Whole batches go, once their last event may. A record that cannot be decoded says
    // neither when it came nor how far it goes, so nothing says it may go; the batches
    // after it still may, and a prune that stopped there would let the disk fill.
    for kv in tree.scan_prefix([EVENT_BATCH]) {
        let (k, v) = kv?;
        let (first, batch) = match (keys::u64_at(&k, 1), BatchRecord::decode(&v)) {
            (Ok(first), Ok(batch)) => (first, batch),
            (Err(e), _) => {
                plan.kept_damaged(|| format!("an event batch key of {} bytes: {e}", k.len()));
                continue;
            }
            (Ok(first), Err(e)) => {
                plan.kept_damaged(|| format!("the event batch at seq {first}: {e}"));
                continue;
            }
        };
        let last = first + (batch.len() as u64).saturating_sub(1);
        if batch.accepted_ms() >= cutoff {
            break;
        }
        if last >= low_water {
            plan.held_at = Some((holder, low_water));
            break;
        }
        writes.push((k.to_vec(), None));
        plan.pruned += batch.len() as u64;
    }
    for kv in tree.scan_prefix([keys::CLIENT_ID_EXPIRY]) {
        let (k, id) = kv?;
        let accepted = match keys::u64_at(&k, 1) {
            Ok(accepted) => accepted,
            Err(e) => {
                plan.kept_damaged(|| format!("a client id expiry key of {} bytes: {e}", k.len()));
                continue;
            }
        };
        if accepted >= cutoff {
            break;
        }
        writes.push((keys::prefixed(CLIENT_ID, &id), None));
        writes.push((k.to_vec(), None));
    }
    plan.steps = Step::raw(writes);
    Ok(plan)
}

/// The id an endpoint key was assigned to, for the operator's eyes.
fn endpoint_id_of(tree: &sled::Tree, key: EndpointKey) -> Option<String> {
    tree.scan_prefix([ENDPOINT_KEY])
        .flatten()
        .find_map(|(k, v)| (v.as_ref() == key.to_be_bytes()).then(|| String::from_utf8_lossy(&k[1..]).into_owned()))
}

/// The endpoint that keeps events past retention, and its oldest waiting seq, from where
/// a prune stopped: the queue run it names, or else (a recent route record held it) the
/// endpoint whose in-memory entries go back furthest.
fn holder((in_run, seq): (Option<EndpointKey>, Seq), fresh: &Mutex<FreshQueues>) -> Option<(EndpointKey, Seq)> {
    match in_run {
        Some(ep) => Some((ep, seq)),
        None => lock(fresh).oldest_waiting(),
    }
}

/// How often at most a failing write, or a burial without the event's body, is logged.
const STORAGE_WARN_EVERY_MS: u64 = 10_000;

/// How often at most a prune says what keeps events past retention: an endpoint that
/// waits for an older one, or records it cannot decode (each prune finds them again).
const HELD_PRUNE_WARN_EVERY_MS: u64 = 3_600_000;

/// Every endpoint with a queue run, with its first run (its oldest entries); one seek
/// per endpoint.
fn endpoints_with_runs(tree: &sled::Tree) -> Result<Vec<(EndpointKey, sled::IVec)>, LogError> {
    let mut out = Vec::new();
    let mut from = Bound::Included(vec![QUEUE_RUN]);
    while let Some(kv) = tree.range((from, Bound::Excluded(vec![QUEUE_RUN + 1]))).next() {
        let (k, first_run) = kv?;
        let ep = keys::endpoint_of_queue_key(&k)?;
        out.push((ep, first_run));
        from = match ep.checked_add(1) {
            Some(next) => Bound::Included(keys::queue_prefix(QUEUE_RUN, next).to_vec()),
            None => break,
        };
    }
    Ok(out)
}

/// The next seq to assign: past every stored event and the recorded counter. Also returns
/// the recorded counter alone.
fn recover_next_seq(tree: &sled::Tree) -> Result<(Seq, Seq), LogError> {
    let stored = tree
        .get(keys::META_NEXT_SEQ)?
        .map(|v| keys::u64_at(&v, 0))
        .transpose()?
        .unwrap_or(1);
    let last_batch = match tree.scan_prefix([EVENT_BATCH]).next_back() {
        Some(kv) => {
            let (k, v) = kv?;
            keys::u64_at(&k, 1)? + BatchRecord::decode(&v)?.len() as u64
        }
        None => 1,
    };
    // Events of a log not yet moved into batches count too (they move after this check).
    let last_single = match tree.scan_prefix([LEGACY_EVENT]).keys().next_back() {
        Some(k) => keys::u64_at(&k?, 1)? + 1,
        None => 1,
    };
    Ok((stored.max(last_batch).max(last_single), stored))
}

/// Moves events stored one per key (the layout before batches) into batches of one, at
/// the same seq, then removes them and flushes. Batches of one never overlap another
/// batch, so a crash part way and a second run are harmless.
fn migrate_single_events(db: &sled::Db, tree: &sled::Tree) -> Result<(), LogError> {
    let mut moved = 0u64;
    for kv in tree.scan_prefix([LEGACY_EVENT]) {
        let (k, v) = kv?;
        let seq = keys::u64_at(&k, 1)?;
        let accepted_ms = keys::u64_at(&v, 0)?;
        tree.insert(
            &keys::event_batch(seq)[..],
            keys::batch_value(accepted_ms, [&v[8..]].into_iter()),
        )?;
        tree.remove(k)?;
        moved += 1;
    }
    if moved > 0 {
        tracing::info!(events = moved, "moved events into batches");
        db.flush()?;
    }
    Ok(())
}

/// The event at `seq`, read from the batch with the greatest key at or below it.
fn find_event(tree: &sled::Tree, segments: &SegmentFiles, seq: Seq) -> Result<Option<StoredEvent>, LogError> {
    match find_batch(tree, segments, seq)? {
        Some((first, value)) => event_in_batch(first, &value, seq),
        None => Ok(None),
    }
}

/// A batch value, as sled holds it (stored before segment files) or as read from its
/// segment.
enum BatchBytes {
    Sled(sled::IVec),
    Segment(Vec<u8>),
}

impl std::ops::Deref for BatchBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            BatchBytes::Sled(v) => v,
            BatchBytes::Segment(v) => v,
        }
    }
}

/// The batch that would hold `seq`, with its first seq. Its bytes are read from its
/// segment only when `seq` is in it.
fn find_batch(tree: &sled::Tree, segments: &SegmentFiles, seq: Seq) -> Result<Option<(Seq, BatchBytes)>, LogError> {
    match find_batch_record(tree, seq)? {
        Some((first, value)) => load_batch(tree, segments, first, value, seq),
        None => Ok(None),
    }
}

/// The bytes of the batch record `value`, found at `first` for `seq`.
fn load_batch(
    tree: &sled::Tree,
    segments: &SegmentFiles,
    first: Seq,
    value: sled::IVec,
    seq: Seq,
) -> Result<Option<(Seq, BatchBytes)>, LogError> {
    match BatchRecord::decode(&value)? {
        // `first <= seq`: the record was looked up at or below it.
        BatchRecord::InFile(at) if seq - first < u64::from(at.count) => match segments.read(&at)? {
            Some(bytes) => Ok(Some((first, BatchBytes::Segment(bytes)))),
            // Its segment is closed: pruned since the lookup, unless the pointer is still there.
            None if tree.get(keys::event_batch(first))?.is_some_and(|now| now == value) => Err(segments.missing(&at)),
            None => Ok(None),
        },
        BatchRecord::InFile(_) => Ok(None),
        BatchRecord::Inline(_) => Ok(Some((first, BatchBytes::Sled(value)))),
    }
}

/// The `b` record with the greatest key at or below `seq`, with its first seq.
fn find_batch_record(tree: &sled::Tree, seq: Seq) -> Result<Option<(Seq, sled::IVec)>, LogError> {
    // The first event of a batch (every event, when clicks come one per request) is a
    // point read away.
    if let Some(v) = tree.get(keys::event_batch(seq))? {
        return Ok(Some((seq, v)));
    }
    let Some(kv) = tree
        .range(&keys::event_batch(0)[..]..=&keys::event_batch(seq)[..])
        .next_back()
    else {
        return Ok(None);
    };
    let (k, v) = kv?;
    Ok(Some((keys::u64_at(&k, 1)?, v)))
}

fn event_in_batch(first: Seq, value: &[u8], seq: Seq) -> Result<Option<StoredEvent>, LogError> {
    let view = BatchView::decode(value)?;
    let Some(at) = seq.checked_sub(first) else {
        return Ok(None);
    };
    Ok(view.get(at as usize)?.map(|data| StoredEvent {
        seq,
        accepted_ms: view.accepted_ms,
        data: Bytes::copy_from_slice(data),
    }))
}

/// The event batch a thread read last. A worker reads a batch's events one after another,
/// and the endpoints of a shard read the same events, so the next read is usually in it.
struct LastBatch {
    log: u64,
    /// [`RecentEvents::removals`] when it was read: any removal since voids it.
    removals: u64,
    first: Seq,
    value: BatchBytes,
}

thread_local! {
    static LAST_BATCH: std::cell::RefCell<Option<LastBatch>> = const { std::cell::RefCell::new(None) };
}

/// Tells logs apart in [`LAST_BATCH`], which outlives any one of them.
static NEXT_LOG_ID: AtomicU64 = AtomicU64::new(1);

struct Writer {
    db: sled::Db,
    tree: sled::Tree,
    rx: Receiver<WriteOp>,
    next_seq: Seq,
    options: SledOptions,
    events: Arc<AtomicU64>,
    recent: Arc<RecentEvents>,
    fresh: Arc<Mutex<FreshQueues>>,
    spilling: Arc<RwLock<()>>,
    segments: SegmentWriter,
    dir: std::path::PathBuf,
    /// The next seq sled records: `next_seq` as of the last group that wrote its events
    /// whole. A failed group advances `next_seq` (its seqs are not given back) but not
    /// this, and the marker must never run ahead of sled's record.
    seq_recorded: Seq,
    /// The next seq the marker file records, and when it was last written.
    marker_written: Seq,
    last_marker: Instant,
    /// "A write group failed" and "flushing the log failed", said at most every
    /// [`STORAGE_WARN_EVERY_MS`] while writes keep failing.
    failure_warning: RateLimited,
    /// The last failure of a group or a flush, until appends are written and flushed.
    write_failure: Arc<Mutex<Option<String>>>,
    /// Appends written since the last flush or failure: the flush after them, if it
    /// succeeds, clears [`Self::write_failure`]. Delivery progress alone does not: it
    /// touches sled's memory only, not the segment files that appends need.
    appended_unflushed: bool,
}

/// Events at most in one [`AppendSet`], unless one append alone has more. An append of
/// a 100-click request is a set of its own; single clicks gather. Sets of up to 256
/// (the largest batch) took the backlog's peak RSS from 133–137 to 160 MiB, over its
/// 150 MB line.
const APPEND_SET_MAX: usize = 128;

/// The appends of one group that follow each other (delivery progress between them
/// aside), stored together: one batch of events and one route record for all of them.
/// Clicks sent one per request arrive one append each, and stored one by one they cost a
/// batch and a record per click, for the writer to write and for delivery to read.
struct AppendSet {
    /// The accepted time of every event in the set.
    now: u64,
    /// Each endpoint's seqs in the set, ascending.
    queued: BTreeMap<EndpointKey, Vec<Seq>>,
    stored: Vec<StoredEvent>,
    client_ids: Vec<(Vec<u8>, Vec<u8>)>,
    /// Client ids earlier in this set (not in sled until it is written).
    ids_here: HashSet<String>,
}

impl AppendSet {
    fn new() -> Self {
        AppendSet {
            now: super::now_ms(),
            queued: BTreeMap::new(),
            stored: Vec::new(),
            client_ids: Vec::new(),
            ids_here: HashSet::new(),
        }
    }
}

/// Replies held until the batch they belong to is durable.
enum Waiting {
    Append(Reply<Vec<AppendOutcome>>, Vec<AppendOutcome>),
    Apply(Reply<()>),
    Close(Reply<()>),
}

impl Writer {
    fn run(mut self) {
        let mut last_flush = Instant::now();
        // Something applied since the last flush (delivery progress, retry state).
        let mut dirty = false;
        // Writes nobody waits for are flushed at least this often, so a crash repeats
        // little delivered work.
        let lazy_interval = match self.options.fsync {
            FsyncMode::Always => LAZY_FLUSH,
            FsyncMode::Interval => self.options.fsync_interval,
        };
        // Writes nobody waits for, held back in arrival order: delivery progress for up to
        // DEFER_PROGRESS, and what a failed group carried (progress, dead letters) for
        // about RETRY_FAILED_AFTER more, until `deferred_until`.
        let mut deferred: Vec<WriteOp> = Vec::new();
        let mut deferred_until: Option<Instant> = None;
        loop {
            let deadline = [dirty.then(|| last_flush + lazy_interval), deferred_until]
                .into_iter()
                .flatten()
                .min();
            let first = match deadline {
                Some(deadline) => match self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(op) => Some(op),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match self.rx.recv() {
                    Ok(op) => Some(op),
                    Err(_) => break,
                },
            };
            // Held-back progress goes first, so every key sees its writes in order.
            let mut ops = std::mem::take(&mut deferred);
            if let Some(op) = first {
                ops.push(op);
                while ops.len() < MAX_OPS_PER_COMMIT {
                    match self.rx.try_recv() {
                        Ok(op) => ops.push(op),
                        Err(_) => break,
                    }
                }
            }
            if !ops.is_empty() && ops.len() < MAX_OPS_PER_COMMIT && ops.iter().all(WriteOp::is_progress) {
                let until = *deferred_until.get_or_insert_with(|| Instant::now() + DEFER_PROGRESS);
                if Instant::now() < until {
                    deferred = ops;
                    continue;
                }
            }
            deferred_until = None;
            let closing = ops.iter().any(WriteOp::stops_writer);
            // A close is answered after the last try below, with what it wrote: the group's
            // own answer would say "failed" for writes that the try then makes. Only a close
            // gives what failed that try: a crash (tests stop the writer so) leaves it as a
            // crash would.
            let mut close_replies = Vec::new();
            for op in ops.iter_mut() {
                if let WriteOp::Close(reply) = op {
                    close_replies.push(std::mem::replace(reply, oneshot::channel().0));
                }
            }
            let applied_any = !ops.is_empty();
            let appends = ops.iter().any(|op| matches!(op, WriteOp::Append(..)));
            let mut group_error = None;
            let (waiting, needs_flush) = match self.commit(ops) {
                Ok(committed) => committed,
                Err((e, retry)) => {
                    group_error = Some(e.clone());
                    if let Some(times) = self.failure_warning.due(super::now_ms()) {
                        tracing::error!(error = %e, groups = times, "a write group failed; its appends were refused, and its delivery progress and dead letters are tried again");
                    }
                    if !retry.is_empty() {
                        // Tried again with the next group that carries more than progress,
                        // or else after a pause, so a failing disk is not hammered in a
                        // loop; on close, once more before the writer stops.
                        deferred = retry;
                        deferred_until = Some(Instant::now() + RETRY_FAILED_AFTER + DEFER_PROGRESS);
                    }
                    (Vec::new(), false)
                }
            };
            dirty |= applied_any;
            let flush_now = closing
                || (self.options.fsync == FsyncMode::Always && needs_flush)
                || (dirty && last_flush.elapsed() >= lazy_interval);
            let result = if flush_now {
                last_flush = Instant::now();
                dirty = false;
                let flushed = self.flush();
                match &flushed {
                    Ok(()) => self.update_marker(closing),
                    Err(e) => {
                        // Waiters get the error; what nobody waits for (acknowledged under
                        // `interval`, or delivery progress) is flushed again next time.
                        if let Some(times) = self.failure_warning.due(super::now_ms()) {
                            tracing::error!(error = %e, times, "flushing the log failed");
                        }
                        dirty = true;
                    }
                }
                flushed
            } else {
                Ok(())
            };
            match group_error.as_ref().or(result.as_ref().err()) {
                Some(e) => {
                    *lock(&self.write_failure) = Some(e.to_string());
                    self.appended_unflushed = false;
                }
                None => {
                    self.appended_unflushed |= appends;
                    if flush_now && self.appended_unflushed {
                        *lock(&self.write_failure) = None;
                        self.appended_unflushed = false;
                    }
                }
            }
            for w in waiting {
                match w {
                    Waiting::Append(reply, outcomes) => {
                        let _ = reply.send(result.clone().map(|_| outcomes));
                    }
                    Waiting::Apply(reply) | Waiting::Close(reply) => {
                        let _ = reply.send(result.clone());
                    }
                }
            }
            if closing {
                let mut outcome = match group_error {
                    Some(e) => Err(e),
                    None => result,
                };
                if !close_replies.is_empty() && outcome.is_err() {
                    outcome = self.finish(std::mem::take(&mut deferred));
                }
                for reply in close_replies {
                    let _ = reply.send(outcome.clone());
                }
                return;
            }
        }
        // Every sender is gone: nobody waits for what this writes.
        let _ = self.finish(deferred);
    }

    /// The writer stops with work left: what was held back (a failed group's writes among
    /// it) gets its last try, the entries still waiting in memory move to runs, and all is
    /// flushed. Nothing runs after this, so each failure is said here; what one leaves
    /// undone, the next open finds as after a crash.
    fn finish(&mut self, deferred: Vec<WriteOp>) -> Result<(), LogError> {
        let mut outcome = Ok(());
        if !deferred.is_empty() {
            if let Err((e, abandoned)) = self.commit(deferred) {
                tracing::error!(
                    error = %e,
                    writes = abandoned.len(),
                    "a write group failed as the log closed, and its delivery progress and dead letters are not tried again: their queue entries stay as the log last held them, so after the restart delivered events are sent again and dead letters are retried before they are buried again"
                );
                outcome = Err(e);
            }
        }
        if let Err(e) = self.move_to_runs() {
            tracing::error!(error = %e, "cannot move the queue entries waiting in memory to runs as the log closes: the next start queues them again from their route records, with those delivered since");
            outcome = outcome.and(Err(e));
        }
        match self.flush() {
            Ok(()) => self.update_marker(true),
            Err(e) => {
                tracing::error!(error = %e, "the last flush of the log failed: what was written since the flush before may be lost, as in a crash");
                outcome = outcome.and(Err(e));
            }
        }
        outcome
    }

    /// Segments first, so a flushed pointer never names bytes a power cut can take back;
    /// segments emptied by what sled now holds go after.
    fn flush(&mut self) -> Result<(), LogError> {
        self.segments.sync()?;
        self.db.flush()?;
        self.segments.delete_unnamed();
        Ok(())
    }

    /// Records the flushed position in the marker file, at most every [`LAZY_FLUSH`] (and
    /// on close): it only has to lag behind what sled holds, never run ahead of it.
    fn update_marker(&mut self, closing: bool) {
        let recorded = self.seq_recorded;
        if recorded <= self.marker_written || (!closing && self.last_marker.elapsed() < LAZY_FLUSH) {
            return;
        }
        match write_marker(&self.dir, recorded) {
            Ok(()) => {
                self.marker_written = recorded;
                self.last_marker = Instant::now();
            }
            Err(e) => tracing::warn!(error = %e, "cannot update the log's position marker"),
        }
    }

    /// Applies one group of operations, in order. Returns the replies to send once
    /// durable and whether anything in the group asked for durability; or, when the group
    /// failed (its waiters are told), why, and the writes nobody waits for (delivery
    /// progress, dead letters) to try again: each sets a queue entry to a state, so
    /// writing it twice does no harm.
    fn commit(&mut self, ops: Vec<WriteOp>) -> Result<(Vec<Waiting>, bool), (LogError, Vec<WriteOp>)> {
        let mut waiting = Vec::with_capacity(ops.len());
        let mut needs_flush = false;
        let mut counts = EventCounts::default();
        let seq_before = self.next_seq;
        // Delivery progress of the whole group, gathered so that each queue run it touches
        // is rewritten once. Appends only add new seqs in new runs, so progress (which only
        // names seqs acknowledged earlier) may pass them; any other write is a barrier.
        let mut progress: BTreeMap<(EndpointKey, Seq), Option<Pending>> = BTreeMap::new();
        // Appends in a row are gathered and written at the next barrier or at the end.
        let mut appends: Option<AppendSet> = None;
        let mut closing = false;
        let mut result = Ok(());
        let mut again = Vec::new();
        for op in ops {
            if result.is_err() {
                // The group failed: what is left needs its waiter answered, or another try.
                match op {
                    WriteOp::Append(_, reply) => waiting.push(Waiting::Append(reply, Vec::new())),
                    WriteOp::Apply { reply: Some(reply), .. } => waiting.push(Waiting::Apply(reply)),
                    op @ (WriteOp::Apply { reply: None, .. } | WriteOp::Progress { .. }) => again.push(op),
                    WriteOp::Close(reply) => waiting.push(Waiting::Close(reply)),
                    #[cfg(test)]
                    WriteOp::Crash(reply) => waiting.push(Waiting::Close(reply)),
                    #[cfg(test)]
                    WriteOp::Hold(_) | WriteOp::Fail => {}
                }
                continue;
            }
            match op {
                WriteOp::Append(events, reply) => {
                    needs_flush = true;
                    let mut outcomes = Vec::with_capacity(events.len());
                    if appends
                        .as_ref()
                        .is_some_and(|set| set.stored.len() + events.len() > APPEND_SET_MAX)
                    {
                        result = self.write_gathered(&mut appends);
                    }
                    let set = appends.get_or_insert_with(AppendSet::new);
                    result = result.and_then(|_| self.gather(set, events, &mut outcomes, &mut counts));
                    waiting.push(Waiting::Append(reply, outcomes));
                }
                WriteOp::Progress { endpoint, changes } => {
                    for (seq, change) in changes {
                        progress.insert((endpoint, seq), change);
                    }
                }
                WriteOp::Apply { steps, reply, durable } => {
                    needs_flush |= durable;
                    result = self
                        .write_pending(&mut appends, &mut progress)
                        .and_then(|_| self.apply_steps(&steps, &mut counts));
                    match reply {
                        Some(reply) => waiting.push(Waiting::Apply(reply)),
                        None if result.is_err() => again.push(WriteOp::Apply {
                            steps,
                            reply: None,
                            durable,
                        }),
                        None => {}
                    }
                }
                WriteOp::Close(reply) => {
                    closing = true;
                    waiting.push(Waiting::Close(reply));
                }
                #[cfg(test)]
                WriteOp::Hold(release) => {
                    let _ = release.recv();
                }
                #[cfg(test)]
                WriteOp::Crash(reply) => waiting.push(Waiting::Close(reply)),
                #[cfg(test)]
                WriteOp::Fail => result = Err(LogError::Storage("a failure for the test".into())),
            }
        }
        if result.is_ok() {
            // On close every entry still waiting moves to its run: a record left behind
            // would queue again, at the next open, the entries delivered since.
            result = self.write_pending(&mut appends, &mut progress).and_then(|_| {
                if closing {
                    self.move_to_runs()
                } else {
                    Ok(())
                }
            });
        }
        if result.is_ok() && self.next_seq != seq_before {
            result = self
                .tree
                .insert(keys::META_NEXT_SEQ, &self.next_seq.to_be_bytes()[..])
                .map(|_| self.seq_recorded = self.next_seq)
                .map_err(LogError::from);
        }
        // What was written is counted whether or not the group failed later on.
        self.events.fetch_add(counts.appended, Ordering::Relaxed);
        self.events.fetch_sub(
            counts.removed.min(self.events.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        match result {
            Ok(()) => Ok((waiting, needs_flush)),
            Err(e) => {
                // Part of the group may be stored: its seqs are not given back (a later
                // event must not land on a stored one), and every waiter fails. Progress
                // not yet written goes first into the list to try again, being the oldest.
                let mut retry: Vec<WriteOp> = Vec::new();
                // Sorted by endpoint first: one op per endpoint.
                for ((ep, seq), change) in progress {
                    match retry.last_mut() {
                        Some(WriteOp::Progress { endpoint, changes }) if *endpoint == ep => changes.push((seq, change)),
                        _ => retry.push(WriteOp::Progress {
                            endpoint: ep,
                            changes: vec![(seq, change)],
                        }),
                    }
                }
                retry.extend(again);
                // Before the waiters hear of it: a refused client may ask `/readyz` at once.
                *lock(&self.write_failure) = Some(e.to_string());
                for w in waiting {
                    match w {
                        Waiting::Append(reply, _) => {
                            let _ = reply.send(Err(e.clone()));
                        }
                        Waiting::Apply(reply) | Waiting::Close(reply) => {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
                Err((e, retry))
            }
        }
    }

    fn write_gathered(&mut self, appends: &mut Option<AppendSet>) -> Result<(), LogError> {
        match appends.take() {
            Some(set) => self.write_appends(set),
            None => Ok(()),
        }
    }

    /// Gives one append's events their seqs and adds them to `set`, to be stored with
    /// the rest of the set by [`Self::write_appends`].
    fn gather(
        &mut self,
        set: &mut AppendSet,
        events: Vec<NewEvent>,
        outcomes: &mut Vec<AppendOutcome>,
        counts: &mut EventCounts,
    ) -> Result<(), LogError> {
        let AppendSet {
            now,
            queued,
            stored,
            client_ids,
            ids_here,
        } = set;
        let now = *now;
        for ev in events {
            let client_key = if ev.client_id {
                let key = keys::prefixed(CLIENT_ID, ev.id.as_bytes());
                if self.tree.contains_key(&key)? || !ids_here.insert(ev.id.clone()) {
                    outcomes.push(AppendOutcome::Duplicate);
                    continue;
                }
                Some(key)
            } else {
                None
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            counts.appended += 1;
            for ep in &ev.endpoints {
                let seqs = queued.entry(*ep).or_default();
                // An endpoint named twice still gets one entry.
                if seqs.last() != Some(&seq) {
                    seqs.push(seq);
                }
            }
            if let Some(key) = client_key {
                let mut v = seq.to_be_bytes().to_vec();
                v.extend_from_slice(&now.to_be_bytes());
                client_ids.push((key, v));
                client_ids.push((keys::client_id_expiry(now, seq).to_vec(), ev.id.as_bytes().to_vec()));
            }
            stored.push(StoredEvent {
                seq,
                accepted_ms: now,
                data: Bytes::from(ev.data),
            });
            outcomes.push(AppendOutcome::Stored(seq));
        }
        Ok(())
    }

    /// Stores a set of appends: their events, then one route record for their queue
    /// entries, then their client ids. A crash that keeps only part of this
    /// (unacknowledged) set can leave an event nobody delivers, but never a client id
    /// that would make the client's retry a duplicate of an event that is not there.
    fn write_appends(&mut self, set: AppendSet) -> Result<(), LogError> {
        let AppendSet {
            now,
            queued,
            stored,
            client_ids,
            ..
        } = set;
        // The events first, in batches of consecutive seqs: their bytes to a segment, then
        // a pointer to each into sled.
        let mut batches = Vec::new();
        let mut rest = &stored[..];
        while !rest.is_empty() {
            let mut n = 0;
            let mut bytes = 0;
            while n < rest.len()
                && n < keys::BATCH_MAX_EVENTS
                && (n == 0 || bytes + rest[n].data.len() <= keys::BATCH_MAX_BYTES)
            {
                bytes += rest[n].data.len();
                n += 1;
            }
            let (batch, later) = rest.split_at(n);
            batches.push(keys::batch_value(now, batch.iter().map(|e| &e.data[..])));
            rest = later;
        }
        if !batches.is_empty() {
            let pointers = self.segments.append(&batches)?;
            let mut first = stored[0].seq;
            for at in pointers {
                self.tree.insert(&keys::event_batch(first)[..], &at.encode()[..])?;
                first += u64::from(at.count);
            }
        }
        if let (Some(first), Some(last)) = (stored.first(), stored.last()) {
            self.queue_set(first.seq, last.seq, &queued)?;
        }
        for ev in stored {
            self.recent.put(ev);
        }
        for (k, v) in client_ids {
            self.tree.insert(k, v)?;
        }
        Ok(())
    }

    /// Queues a stored set's entries (its seqs `first..=last`): in memory behind one route
    /// record, or, while the live records list all they may (a backlog behind a receiver
    /// that is down), straight into runs.
    fn queue_set(&mut self, first: Seq, last: Seq, queued: &BTreeMap<EndpointKey, Vec<Seq>>) -> Result<(), LogError> {
        let entries: usize = queued.values().map(Vec::len).sum();
        if entries == 0 {
            return Ok(());
        }
        let queues = || queued.iter().map(|(ep, seqs)| (*ep, &seqs[..]));
        let room = lock(&self.fresh).listed() + entries <= self.options.fresh_listed_max;
        if room {
            self.tree
                .insert(&keys::routes(first)[..], keys::routes_value(first, queues()))?;
            lock(&self.fresh).add(first, last, queues());
            return Ok(());
        }
        // Poisoning cannot leave the unit value wrong.
        let _spilling = self.spilling.write().unwrap_or_else(PoisonError::into_inner);
        {
            let mut fresh = lock(&self.fresh);
            for (ep, _) in queues() {
                fresh.runs_written(ep);
            }
        }
        // The seqs are the largest yet, so each run starts past every run of its
        // endpoint, and none needs reading.
        for (ep, seqs) in queues() {
            for chunk in seqs.chunks(RUN_MAX) {
                let entries: Vec<Pending> = chunk.iter().map(|s| Pending::fresh(*s)).collect();
                self.tree
                    .insert(&keys::queue(QUEUE_RUN, ep, chunk[0])[..], keys::run_value(&entries))?;
            }
        }
        Ok(())
    }

    /// Writes what a group gathered so far: its appends, then its delivery progress, which
    /// is left in `progress` if the write fails (for another try) and cleared if not.
    fn write_pending(
        &mut self,
        appends: &mut Option<AppendSet>,
        progress: &mut BTreeMap<(EndpointKey, Seq), Option<Pending>>,
    ) -> Result<(), LogError> {
        self.write_gathered(appends)?;
        self.change_queues(progress)?;
        progress.clear();
        Ok(())
    }

    /// Applies steps in order. Queue changes in a row go to their runs together, so a
    /// replay or revival rewrites each run once rather than once per entry.
    fn apply_steps(&mut self, steps: &[Step], counts: &mut EventCounts) -> Result<(), LogError> {
        let mut queued: BTreeMap<(EndpointKey, Seq), Option<Pending>> = BTreeMap::new();
        for step in steps {
            match step {
                Step::Put(ep, p) => {
                    queued.insert((*ep, p.seq), Some(*p));
                }
                Step::Remove(ep, seq) => {
                    queued.insert((*ep, *seq), None);
                }
                Step::Raw(k, v) => {
                    self.change_queues(&std::mem::take(&mut queued))?;
                    self.raw_write(k, v.as_deref(), counts)?;
                }
                Step::ForgetEndpoint(ep) => {
                    self.change_queues(&std::mem::take(&mut queued))?;
                    self.forget_endpoint(*ep)?;
                }
            }
        }
        self.change_queues(&queued)
    }

    /// Applies queue changes to fresh entries and runs. A delivered fresh entry only
    /// leaves memory. An entry given state (retried, queued again) goes to its run, and
    /// leaves memory only after that write, so a reader (memory first, then sled) sees it
    /// once or twice between, never not at all.
    fn change_queues(&mut self, changes: &BTreeMap<(EndpointKey, Seq), Option<Pending>>) -> Result<(), LogError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut to_runs = Vec::new();
        let mut leaving = Vec::new();
        {
            let mut fresh = lock(&self.fresh);
            for (&(ep, seq), &change) in changes {
                match change {
                    // A delivered fresh entry has no run to leave; an endpoint without
                    // runs has nothing to take it out of.
                    None => {
                        if !fresh.take(ep, seq) && fresh.may_have_runs(ep) {
                            to_runs.push(((ep, seq), QueueChange::Remove));
                        }
                    }
                    Some(p) => {
                        fresh.runs_written(ep);
                        to_runs.push(((ep, seq), QueueChange::Put(p)));
                        if fresh.contains(ep, seq) {
                            leaving.push((ep, seq));
                        }
                    }
                }
            }
        }
        let emptied = apply_queue_changes(&self.tree, to_runs)?;
        {
            let mut fresh = lock(&self.fresh);
            for (ep, seq) in leaving {
                fresh.take(ep, seq);
            }
        }
        self.remove_finished_records()?;
        self.compact_records()?;
        self.note_emptied(emptied)
    }

    /// Rewrites the oldest route records without their delivered entries once more of
    /// those are listed than a crash may repeat.
    fn compact_records(&mut self) -> Result<(), LogError> {
        let rewrites = {
            let mut fresh = lock(&self.fresh);
            if fresh.repeatable() <= self.options.fresh_repeat_max {
                return Ok(());
            }
            fresh.compact(self.options.fresh_repeat_max / 2)
        };
        for (first, listing) in rewrites {
            self.write_record(first, &listing)?;
        }
        Ok(())
    }

    /// Writes the route record at `first` as `listing`, replacing what it listed.
    fn write_record(&self, first: Seq, listing: &Listing) -> Result<(), LogError> {
        let value = keys::routes_value(first, listing.iter().map(|(ep, seqs)| (*ep, &seqs[..])));
        self.tree.insert(&keys::routes(first)[..], value)?;
        Ok(())
    }

    fn remove_finished_records(&mut self) -> Result<(), LogError> {
        let finished = lock(&self.fresh).take_finished();
        for first in finished {
            self.tree.remove(&keys::routes(first)[..])?;
        }
        Ok(())
    }

    /// An endpoint whose last run went no longer sends readers to sled.
    fn note_emptied(&mut self, emptied: Vec<EndpointKey>) -> Result<(), LogError> {
        for ep in emptied {
            if self
                .tree
                .scan_prefix(keys::queue_prefix(QUEUE_RUN, ep))
                .next()
                .is_none()
            {
                lock(&self.fresh).runs_gone(ep);
            }
        }
        Ok(())
    }

    /// Moves the waiting entries of every live route record to runs (the log closes).
    fn move_to_runs(&mut self) -> Result<(), LogError> {
        let (records, entries) = {
            let mut fresh = lock(&self.fresh);
            let (records, entries): (Vec<Seq>, Vec<_>) = fresh.waiting_records().into_iter().unzip();
            let entries: Vec<(EndpointKey, Seq)> = entries.into_iter().flatten().collect();
            for (ep, _) in &entries {
                fresh.runs_written(*ep);
            }
            (records, entries)
        };
        if records.is_empty() {
            return Ok(());
        }
        queue_in_runs(&self.tree, entries, &records)?;
        let mut fresh = lock(&self.fresh);
        for first in records {
            fresh.moved(first);
        }
        Ok(())
    }

    /// Drops a deleted endpoint's runs, dead letters and fresh entries, and its name from
    /// the route records that others still wait on, so a restart does not queue them again.
    fn forget_endpoint(&mut self, ep: EndpointKey) -> Result<(), LogError> {
        for prefix in [QUEUE_RUN, DEAD] {
            for k in self.tree.scan_prefix(keys::queue_prefix(prefix, ep)).keys() {
                self.tree.remove(k?)?;
            }
        }
        let rewrite = lock(&self.fresh).forget(ep);
        for first in rewrite {
            let key = keys::routes(first);
            if let Some(v) = self.tree.get(&key[..])? {
                let kept: Listing = keys::decode_routes(first, &v)?
                    .into_iter()
                    .filter(|(e, _)| *e != ep)
                    .collect();
                self.write_record(first, &kept)?;
            }
        }
        self.remove_finished_records()
    }

    /// One key written as given, except an event batch: its bytes go to a segment and
    /// sled gets a pointer, and a removed batch's segment learns it has one batch fewer.
    fn raw_write(&mut self, key: &[u8], value: Option<&[u8]>, counts: &mut EventCounts) -> Result<(), LogError> {
        if key.first() != Some(&EVENT_BATCH) {
            match value {
                Some(v) => self.tree.insert(key, v)?,
                None => self.tree.remove(key)?,
            };
            return Ok(());
        }
        let first = keys::u64_at(key, 1)?;
        match value {
            Some(v) => {
                let at = self.segments.append(&[v])?[0];
                if let Some(old) = self.tree.insert(key, &at.encode()[..])? {
                    self.released(&old)?;
                } else {
                    counts.appended += u64::from(at.count);
                }
            }
            None => {
                if let Some(old) = self.tree.remove(key)? {
                    let n = self.released(&old)? as u64;
                    // Removed events must not be read back from the ring or a reader's
                    // cached batch either.
                    self.recent.removals.fetch_add(1, Ordering::Release);
                    for seq in first..first + n {
                        self.recent.forget(seq);
                    }
                    counts.removed += n;
                }
            }
        }
        Ok(())
    }

    /// A batch record left sled: its segment holds one live batch fewer. Returns its
    /// event count.
    fn released(&mut self, old: &[u8]) -> Result<usize, LogError> {
        let batch = BatchRecord::decode(old)?;
        if let BatchRecord::InFile(at) = batch {
            self.segments.release(at.segment);
        }
        Ok(batch.len())
    }
}

/// Events stored and removed by a group, for the event gauge.
#[derive(Default)]
struct EventCounts {
    appended: u64,
    removed: u64,
}

/// One change to an endpoint's queue runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueChange {
    /// The entry, replacing any of the same seq.
    Put(Pending),
    /// The entry, unless the run already holds its seq.
    Add(Pending),
    Remove,
}

/// Applies queue changes, in endpoint and seq order, to the runs that hold (or are to
/// hold) their seqs, rewriting each touched run once. Single-key writes, so a crash keeps
/// every run whole: at worst a prefix of the changes. Returns the endpoints a run was
/// removed from (it was emptied).
fn apply_queue_changes(
    tree: &sled::Tree,
    changes: impl IntoIterator<Item = ((EndpointKey, Seq), QueueChange)>,
) -> Result<Vec<EndpointKey>, LogError> {
    let mut emptied = Vec::new();
    let mut open: Option<OpenRun> = None;
    for ((ep, seq), change) in changes {
        let adds = change != QueueChange::Remove;
        let covered = match open.as_mut() {
            Some(run) => run.covers(tree, ep, seq, adds)?,
            None => false,
        };
        if !covered {
            if let Some(run) = open.take() {
                run.write(tree, &mut emptied)?;
            }
            open = match OpenRun::find(tree, ep, seq)? {
                Some(run) => Some(run),
                // Nothing to take out of a run that is not there.
                None if !adds => continue,
                None => Some(OpenRun::start(tree, ep, seq)?),
            };
        }
        if let Some(run) = open.as_mut() {
            run.change(seq, change);
        }
    }
    if let Some(run) = open {
        run.write(tree, &mut emptied)?;
    }
    Ok(emptied)
}

/// A queue run read for rewriting, with the key range it covers.
struct OpenRun {
    ep: EndpointKey,
    key: Seq,
    /// The key of the endpoint's next run, which bounds this one's seqs (`Some(None)`:
    /// there is none), once looked up.
    next: Option<Option<Seq>>,
    entries: Vec<Pending>,
    dirty: bool,
}

impl OpenRun {
    /// The run whose range holds `seq`: the one with the greatest key at or below it.
    fn find(tree: &sled::Tree, ep: EndpointKey, seq: Seq) -> Result<Option<OpenRun>, LogError> {
        // A run keyed at the seq itself is the common case (the head of an append's run,
        // or a single click's), and a point read is cheaper than a reverse scan.
        let (key, value) = match tree.get(keys::queue(QUEUE_RUN, ep, seq))? {
            Some(v) => (seq, v),
            None => {
                let lo = keys::queue(QUEUE_RUN, ep, 0);
                let hi = keys::queue(QUEUE_RUN, ep, seq);
                let Some(kv) = tree.range(&lo[..]..=&hi[..]).next_back() else {
                    return Ok(None);
                };
                let (k, v) = kv?;
                (keys::seq_of_queue_key(&k)?, v)
            }
        };
        Ok(Some(OpenRun {
            ep,
            key,
            next: None,
            entries: keys::decode_run(&value)?,
            dirty: false,
        }))
    }

    /// A new run at `seq`, which no run's range holds yet.
    fn start(tree: &sled::Tree, ep: EndpointKey, seq: Seq) -> Result<OpenRun, LogError> {
        Ok(OpenRun {
            ep,
            key: seq,
            next: Some(next_run_key(tree, ep, seq)?),
            entries: Vec::new(),
            dirty: true,
        })
    }

    /// Whether `seq` (at or after every seq this run was asked about) falls in its range.
    /// Past the run's last entry only a put can land here, so only then is the next
    /// run's key looked up; a removal there belongs to a later run or to none.
    fn covers(&mut self, tree: &sled::Tree, ep: EndpointKey, seq: Seq, put: bool) -> Result<bool, LogError> {
        if ep != self.ep || seq < self.key {
            return Ok(false);
        }
        if self.entries.last().is_some_and(|last| seq <= last.seq) {
            return Ok(true);
        }
        if !put {
            return Ok(false);
        }
        let next = match self.next {
            Some(next) => next,
            None => *self.next.insert(next_run_key(tree, ep, self.key)?),
        };
        Ok(next.is_none_or(|next| seq < next))
    }

    fn change(&mut self, seq: Seq, change: QueueChange) {
        match (self.entries.binary_search_by_key(&seq, |p| p.seq), change) {
            (Ok(at), QueueChange::Put(p)) => {
                if self.entries[at] != p {
                    self.entries[at] = p;
                    self.dirty = true;
                }
            }
            (Ok(_), QueueChange::Add(_)) | (Err(_), QueueChange::Remove) => {}
            (Err(at), QueueChange::Put(p) | QueueChange::Add(p)) => {
                self.entries.insert(at, p);
                self.dirty = true;
            }
            (Ok(at), QueueChange::Remove) => {
                self.entries.remove(at);
                self.dirty = true;
            }
        }
    }

    /// Writes the run back: removed when empty (its endpoint then goes into `emptied`),
    /// split when it grew past twice [`RUN_MAX`].
    fn write(self, tree: &sled::Tree, emptied: &mut Vec<EndpointKey>) -> Result<(), LogError> {
        if !self.dirty {
            return Ok(());
        }
        if self.entries.is_empty() {
            tree.remove(&keys::queue(QUEUE_RUN, self.ep, self.key)[..])?;
            if emptied.last() != Some(&self.ep) {
                emptied.push(self.ep);
            }
            return Ok(());
        }
        if self.entries.len() <= 2 * RUN_MAX {
            tree.insert(
                &keys::queue(QUEUE_RUN, self.ep, self.key)[..],
                keys::run_value(&self.entries),
            )?;
            return Ok(());
        }
        // All parts in one atomic sled batch: a crash between separate writes would keep
        // either the first part alone (losing the rest) or the old whole run beside new
        // parts (entries in two runs, one copy never removed).
        let mut parts = sled::Batch::default();
        for (i, chunk) in self.entries.chunks(RUN_MAX).enumerate() {
            // The first part keeps the run's key; the others start at their first seq.
            let key = if i == 0 { self.key } else { chunk[0].seq };
            parts.insert(&keys::queue(QUEUE_RUN, self.ep, key)[..], keys::run_value(chunk));
        }
        tree.apply_batch(parts)?;
        Ok(())
    }
}

/// An endpoint's queue entries after `after`, in seq order. `between_reads` runs between
/// its two reads of the tree, where the writer may add a run; tests use it to do so.
fn read_pending(
    tree: &sled::Tree,
    endpoint: EndpointKey,
    after: Option<Seq>,
    limit: usize,
    between_reads: impl FnOnce(),
) -> Result<Vec<Pending>, LogError> {
    let from = match after {
        Some(Seq::MAX) => return Ok(Vec::new()),
        Some(s) => s + 1,
        None => 0,
    };
    let mut out = Vec::new();
    // The run that starts at or before `from` may still hold seqs from it on.
    let first = tree
        .range(&keys::queue(QUEUE_RUN, endpoint, 0)[..]..=&keys::queue(QUEUE_RUN, endpoint, from)[..])
        .next_back()
        .transpose()?;
    between_reads();
    // Unless the first read returned the run at `from`, the second starts at `from`
    // itself: a run the writer adds there between the reads would otherwise be passed
    // over, and the worker's cursor moved beyond it.
    let from_key = keys::queue(QUEUE_RUN, endpoint, from).to_vec();
    let later_start = match &first {
        Some((k, _)) if k.as_ref() == &from_key[..] => Bound::Excluded(from_key),
        _ => Bound::Included(from_key),
    };
    let later = tree.range((later_start, run_range_end(endpoint)));
    // Seqs must rise through the page: if the writer split the first run between the
    // reads, its old copy and the new parts overlap, and the overlap is read once.
    let mut next = from;
    for kv in first.map(Ok).into_iter().chain(later) {
        let (_, v) = kv?;
        for p in keys::decode_run(&v)? {
            if p.seq >= next {
                if out.len() == limit {
                    return Ok(out);
                }
                next = p.seq.saturating_add(1);
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// The first `limit` entries of two seq-ordered pages, the runs' entry winning where both
/// hold a seq (an entry caught moving from memory to its run).
fn merge_pending(runs: Vec<Pending>, fresh: Vec<Seq>, limit: usize) -> Vec<Pending> {
    let mut out = Vec::with_capacity(limit.min(runs.len() + fresh.len()));
    let mut runs = runs.into_iter().peekable();
    let mut fresh = fresh.into_iter().peekable();
    while out.len() < limit {
        let next = match (runs.peek(), fresh.peek()) {
            (Some(p), Some(&s)) if p.seq == s => {
                fresh.next();
                runs.next()
            }
            (Some(p), Some(&s)) if p.seq < s => runs.next(),
            (_, Some(_)) => fresh.next().map(Pending::fresh),
            (Some(_), None) => runs.next(),
            (None, None) => None,
        };
        match next {
            Some(p) => out.push(p),
            None => break,
        }
    }
    out
}

fn next_run_key(tree: &sled::Tree, ep: EndpointKey, after: Seq) -> Result<Option<Seq>, LogError> {
    let from = Bound::Excluded(keys::queue(QUEUE_RUN, ep, after).to_vec());
    match tree.range((from, run_range_end(ep))).next() {
        Some(kv) => Ok(Some(keys::seq_of_queue_key(&kv?.0)?)),
        None => Ok(None),
    }
}

/// The bound just past an endpoint's runs.
fn run_range_end(ep: EndpointKey) -> Bound<Vec<u8>> {
    match ep.checked_add(1) {
        Some(next) => Bound::Excluded(keys::queue_prefix(QUEUE_RUN, next).to_vec()),
        None => Bound::Excluded(vec![QUEUE_RUN + 1]),
    }
}

impl ClickLog for SledLog {
    fn append(&self, events: Vec<NewEvent>) -> Ticket<Vec<AppendOutcome>> {
        let (reply, ticket) = oneshot::channel();
        self.send(WriteOp::Append(events, reply));
        ticket
    }

    fn event(&self, seq: Seq) -> Result<Option<StoredEvent>, LogError> {
        if let Some(ev) = self.recent.get(seq) {
            return Ok(Some(ev));
        }
        let removals = self.recent.removals.load(Ordering::Acquire);
        let cached = LAST_BATCH.with(|last| match &*last.borrow() {
            Some(b) if b.log == self.id && b.removals == removals && seq >= b.first => {
                event_in_batch(b.first, &b.value, seq).transpose()
            }
            _ => None,
        });
        if let Some(ev) = cached {
            return ev.map(Some);
        }
        let Some((first, value)) = find_batch(&self.tree, &self.segments, seq)? else {
            return Ok(None);
        };
        let ev = event_in_batch(first, &value, seq)?;
        LAST_BATCH.with(|last| {
            *last.borrow_mut() = Some(LastBatch {
                log: self.id,
                removals,
                first,
                value,
            })
        });
        Ok(ev)
    }

    fn pending_after(&self, endpoint: EndpointKey, after: Option<Seq>, limit: usize) -> Result<Vec<Pending>, LogError> {
        #[cfg(test)]
        if self
            .read_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(LogError::Storage("a failure for the test".into()));
        }
        {
            let fresh = lock(&self.fresh);
            if !fresh.may_have_runs(endpoint) {
                // Memory alone: a spill writes runs only after marking them here.
                return Ok(fresh
                    .after(endpoint, after, limit)
                    .into_iter()
                    .map(Pending::fresh)
                    .collect());
            }
        }
        // Memory first: an entry moving to a run is written there before it leaves memory.
        let _reading = self.spilling.read().unwrap_or_else(PoisonError::into_inner);
        let fresh = lock(&self.fresh).after(endpoint, after, limit);
        #[cfg(test)]
        pause_at(&self.read_pause);
        let stored = read_pending(&self.tree, endpoint, after, limit, || {})?;
        Ok(merge_pending(stored, fresh, limit))
    }

    fn count_pending(&self, endpoint: EndpointKey) -> Result<u64, LogError> {
        let (mut n, with_runs) = {
            let fresh = lock(&self.fresh);
            (fresh.count(endpoint) as u64, fresh.may_have_runs(endpoint))
        };
        if with_runs {
            for v in self.tree.scan_prefix(keys::queue_prefix(QUEUE_RUN, endpoint)).values() {
                n += keys::run_len(&v?) as u64;
            }
        }
        Ok(n)
    }

    fn delivered(&self, endpoint: EndpointKey, seqs: &[Seq]) {
        self.send(WriteOp::Progress {
            endpoint,
            changes: seqs.iter().map(|s| (*s, None)).collect(),
        });
    }

    fn reschedule(&self, endpoint: EndpointKey, entries: &[Pending]) {
        self.send(WriteOp::Progress {
            endpoint,
            changes: entries.iter().map(|p| (p.seq, Some(*p))).collect(),
        });
    }

    fn bury(&self, endpoint: EndpointKey, letters: Vec<DeadLetter>) {
        let mut steps = Vec::with_capacity(letters.len() * 2);
        let mut leave = Vec::with_capacity(letters.len());
        // A letter keeps the event's body so that it outlives pruning; an event that cannot
        // be read any more is buried with `null` there (its error says why), and said in a
        // warning at most every 10 s: a damaged segment can bury thousands, one by one.
        let mut no_copy: Option<(u64, String)> = None;
        for letter in letters {
            let dead_key = keys::queue(DEAD, endpoint, letter.seq);
            let record = match self.event(letter.seq) {
                Ok(Some(ev)) => keys::event_record(ev.accepted_ms, &ev.data),
                // A letter buried before (a replay sent it again) may hold the only copy
                // of the body: it is kept as it is rather than replaced by none.
                Err(_) | Ok(None) if self.holds_a_copy(&dead_key) => {
                    leave.push(Step::Remove(endpoint, letter.seq));
                    continue;
                }
                unreadable => {
                    no_copy.get_or_insert_with(|| {
                        let why = match unreadable {
                            Err(e) => e.to_string(),
                            _ => "no longer in the log".to_owned(),
                        };
                        (letter.seq, why)
                    });
                    keys::event_record(letter.accepted_ms, NO_BODY)
                }
            };
            match keys::dead_value(&letter, &record) {
                Ok(v) => {
                    steps.push(Step::Raw(dead_key.to_vec(), Some(v)));
                    leave.push(Step::Remove(endpoint, letter.seq));
                }
                Err(e) => {
                    tracing::error!(error = %e, seq = letter.seq, "cannot encode a dead letter; it stays pending")
                }
            }
        }
        if let Some((seq, why)) = no_copy {
            if let Some(calls) = self.no_body_warning.due(super::now_ms()) {
                tracing::warn!(
                    endpoint_key = endpoint,
                    burials = calls,
                    seq,
                    error = %why,
                    "dead letters buried without the event's body: it cannot be read"
                );
            }
        }
        // Every dead letter is written before any entry leaves the queue, so a crash
        // between keeps each event somewhere.
        steps.extend(leave);
        // Dead letters are few and what an operator looks at next: applied (and flushed)
        // at once rather than held back with delivery progress.
        self.send(WriteOp::Apply {
            steps,
            reply: None,
            durable: true,
        });
    }

    fn dead_letters(&self, endpoint: EndpointKey, limit: usize) -> Result<Vec<DeadLetter>, LogError> {
        self.tree
            .scan_prefix(keys::queue_prefix(DEAD, endpoint))
            .values()
            .take(limit)
            .map(|v| {
                v.map_err(LogError::from)
                    .and_then(|v| keys::decode_dead(&v).map(|(d, _)| d))
            })
            .collect()
    }

    fn count_dead(&self, endpoint: EndpointKey) -> Result<u64, LogError> {
        let mut n = 0;
        for k in self.tree.scan_prefix(keys::queue_prefix(DEAD, endpoint)).keys() {
            k?;
            n += 1;
        }
        Ok(n)
    }

    fn revive_dead(&self, endpoint: EndpointKey) -> Ticket<usize> {
        let (reply, ticket) = oneshot::channel();
        let _planning = lock(&self.maintenance);
        let mut steps = Vec::new();
        let mut requeue = Vec::new();
        let mut buried = Vec::new();
        // Letters that stay dead, and why the first of them does.
        let mut kept: Option<(u64, Seq, String)> = None;
        for kv in self.tree.scan_prefix(keys::queue_prefix(DEAD, endpoint)) {
            let (k, v) = match kv {
                Ok(kv) => kv,
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                    return ticket;
                }
            };
            let (letter, record) = match keys::decode_dead(&v) {
                Ok(x) => x,
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return ticket;
                }
            };
            // The event may have been pruned meanwhile: restore it from the copy. A letter
            // stays dead when it holds no copy and the event is gone, or when the event's
            // batch cannot be read: restoring one event there would hide the batch's
            // others, and queueing it would bury it again without its body, losing the
            // letter's copy.
            let copy = body_copy(record);
            let stays = match (find_event(&self.tree, &self.segments, letter.seq), copy) {
                (Ok(Some(_)), _) => None,
                (Ok(None), Some(json)) => {
                    let accepted_ms = keys::u64_at(record, 0).unwrap_or(letter.accepted_ms);
                    steps.push(Step::Raw(
                        keys::event_batch(letter.seq).to_vec(),
                        Some(keys::batch_value(accepted_ms, [json].into_iter())),
                    ));
                    None
                }
                (Ok(None), None) => Some("buried without its body, and no longer in the log".to_owned()),
                (Err(e), _) => Some(format!("its event cannot be read: {e}")),
            };
            if let Some(why) = stays {
                let (count, _, _) = kept.get_or_insert((0, letter.seq, why));
                *count += 1;
                continue;
            }
            requeue.push(Step::Put(endpoint, Pending::fresh(letter.seq)));
            buried.push(Step::Raw(k.to_vec(), None));
        }
        if let Some((count, seq, why)) = kept {
            tracing::warn!(
                endpoint_key = endpoint,
                kept = count,
                seq,
                error = %why,
                "dead letters not replayed: they stay in the dead list"
            );
        }
        let n = requeue.len();
        // Events restored, then queued again, and only then the dead letters go, so a crash
        // anywhere between keeps each event somewhere.
        steps.extend(requeue);
        steps.extend(buried);
        forward(self.apply(steps, true), reply, n);
        ticket
    }

    fn replay_window(
        &self,
        endpoint: EndpointKey,
        since_ms: u64,
        until_ms: u64,
        wanted: &dyn Fn(&[u8]) -> bool,
    ) -> Ticket<usize> {
        let (reply, ticket) = oneshot::channel();
        let _planning = lock(&self.maintenance);
        let steps = match self.replayed(endpoint, since_ms, until_ms, wanted) {
            Ok(steps) => steps,
            Err(e) => {
                let _ = reply.send(Err(e));
                return ticket;
            }
        };
        let n = steps.len();
        forward(self.apply(steps, true), reply, n);
        ticket
    }

    fn endpoint_key(&self, endpoint_id: &str) -> Result<EndpointKey, LogError> {
        // Assignment is rare (startup, admin) and must not race with itself.
        let _guard = self
            .endpoint_keys
            .lock()
            .map_err(|_| LogError::Storage("endpoint key lock poisoned".into()))?;
        let key = keys::prefixed(ENDPOINT_KEY, endpoint_id.as_bytes());
        if let Some(v) = self.tree.get(&key)? {
            let b: [u8; 4] = v
                .as_ref()
                .try_into()
                .map_err(|_| LogError::Corrupt("endpoint key".into()))?;
            return Ok(u32::from_be_bytes(b));
        }
        let next = match self.tree.get(keys::META_NEXT_ENDPOINT)? {
            Some(v) => {
                let b: [u8; 4] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| LogError::Corrupt("endpoint counter".into()))?;
                u32::from_be_bytes(b)
            }
            None => 1,
        };
        // Wrapped, the counter would hand out key 0 and then the keys of live endpoints.
        let after = next.checked_add(1).ok_or_else(|| {
            LogError::Storage(format!(
                "cannot assign endpoint {endpoint_id:?} a key: every key up to {next} is taken"
            ))
        })?;
        let mut batch = sled::Batch::default();
        batch.insert(key, &next.to_be_bytes()[..]);
        batch.insert(keys::META_NEXT_ENDPOINT, &after.to_be_bytes()[..]);
        // No flush of its own: the mapping only matters once queue entries use the key, and
        // those are written (and flushed) after it, which persists it too.
        self.tree.apply_batch(batch)?;
        Ok(next)
    }

    fn forget_endpoint(&self, endpoint: EndpointKey) -> Ticket<()> {
        self.apply(vec![Step::ForgetEndpoint(endpoint)], true)
    }

    fn get_setting(&self, name: &str) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self
            .tree
            .get(keys::prefixed(SETTING, name.as_bytes()))?
            .map(|v| v.to_vec()))
    }

    fn put_setting(&self, name: &str, value: Option<Vec<u8>>) -> Ticket<()> {
        self.apply(vec![Step::Raw(keys::prefixed(SETTING, name.as_bytes()), value)], true)
    }

    fn settings_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, LogError> {
        self.tree
            .scan_prefix(keys::prefixed(SETTING, prefix.as_bytes()))
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k[1..]).into_owned(), v.to_vec()))
            })
            .collect()
    }

    fn prune(&self, now_ms: u64, retention_ms: u64) -> Ticket<u64> {
        let (reply, ticket) = oneshot::channel();
        let cutoff = now_ms.saturating_sub(retention_ms);
        let tree = self.tree.clone();
        let tx = self.tx.clone();
        let maintenance = self.maintenance.clone();
        let warning = self.prune_held_warning.clone();
        let damaged_warning = self.prune_damaged_warning.clone();
        let fresh = self.fresh.clone();
        #[cfg(test)]
        let pause = self.prune_pause.clone();
        // Off the caller's thread: the plan scans every queue, and waits on the writer.
        let spawned = std::thread::Builder::new()
            .name("clickhook-prune".into())
            .spawn(move || {
                let apply = |steps| apply_via(&tx, steps, false).blocking_recv().unwrap_or(Err(LogError::Closed));
                let result = (|| {
                    let _planning = lock(&maintenance);
                    // Revivals and replays queued before this prune are applied first, so
                    // the low water counts their entries.
                    apply(Vec::new())?;
                    let plan = prune_plan(&tree, cutoff)?;
                    if let Some((count, first)) = &plan.damaged {
                        if let Some(prunes) = damaged_warning.due(now_ms) {
                            tracing::warn!(
                                records = count,
                                prunes,
                                first = %first,
                                "records that cannot be decoded are kept past retention: the log is damaged, and a damaged event batch makes the next start refuse it"
                            );
                        }
                    }
                    #[cfg(test)]
                    pause_at(&pause);
                    apply(plan.steps)?;
                    // Hourly at most: naming the endpoint may scan every in-memory queue.
                    let held = plan.held_at.filter(|_| warning.due(now_ms).is_some());
                    if let Some((ep, seq)) = held.and_then(|held| holder(held, &fresh)) {
                        let endpoint = endpoint_id_of(&tree, ep).unwrap_or_else(|| format!("#{ep}"));
                        tracing::warn!(
                            endpoint = %endpoint,
                            seq,
                            "events past retention are kept: this endpoint still waits for an older one (a disabled endpoint keeps its queue); pruning resumes once it is delivered or dead-lettered, or the endpoint is deleted"
                        );
                    }
                    Ok(plan.pruned)
                })();
                let _ = reply.send(result);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a prune");
        }
        ticket
    }

    fn event_count(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    fn write_failure(&self) -> Option<String> {
        lock(&self.write_failure).clone()
    }

    fn needs_reopen(&self) -> Option<String> {
        // sled 0.34 keeps the I/O error of a failed write of its own (a flush, or one of
        // its threads writing a full buffer) and answers every later write with it until
        // the database is opened again (its global error is reset only in
        // `PageCache::start`), so room on the disk alone does not help. A flush does not
        // say so once nothing new waits to be written; an insert always does. Asked only
        // while writes fail: a failure of the segment files alone passes.
        let mut known = lock(&self.reopen_needed);
        if known.is_none() && lock(&self.write_failure).is_some() {
            if let Err(e) = self.tree.insert(keys::META_WRITE_PROBE, &[][..]) {
                let e = LogError::from(e).to_string();
                tracing::error!(error = %e, "sled takes no more writes until the log is opened again");
                *known = Some(e);
            }
        }
        known.clone()
    }

    fn close(&self) -> Ticket<()> {
        let (reply, ticket) = oneshot::channel();
        self.send(WriteOp::Close(reply));
        ticket
    }
}

/// Resolves `reply` with `value` once `inner` (a raw apply) has.
fn forward<T: Send + 'static>(inner: Ticket<()>, reply: Reply<T>, value: T) {
    std::thread::spawn(move || {
        let result = match inner.blocking_recv() {
            Ok(Ok(())) => Ok(value),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(LogError::Closed),
        };
        let _ = reply.send(result);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Arc<SledLog> {
        open_with_segments_of(dir, super::super::segments::SEGMENT_BYTES)
    }

    fn open_with_segments_of(dir: &Path, segment_bytes: u64) -> Arc<SledLog> {
        open_with(dir, segment_bytes, FRESH_LISTED_MAX)
    }

    /// A log whose queue entries move to runs once the route records list more than
    /// `fresh_listed_max` (0: at the end of every group).
    fn open_with(dir: &Path, segment_bytes: u64, fresh_listed_max: usize) -> Arc<SledLog> {
        open_bounded(dir, segment_bytes, fresh_listed_max, FRESH_REPEAT_MAX)
    }

    /// The same, with the route records listing at most `fresh_repeat_max` delivered
    /// entries.
    fn open_bounded(dir: &Path, segment_bytes: u64, fresh_listed_max: usize, fresh_repeat_max: usize) -> Arc<SledLog> {
        SledLog::open(
            dir,
            SledOptions::for_tests(segment_bytes, fresh_listed_max, fresh_repeat_max),
        )
        .unwrap()
    }

    /// A log whose appends' queue entries go straight to runs.
    fn open_runs_only(dir: &Path) -> Arc<SledLog> {
        open_with(dir, super::super::segments::SEGMENT_BYTES, 0)
    }

    /// The segment files in a log's directory, by name.
    fn segment_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join(super::super::segments::SEGMENT_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn event(id: &str, client: bool, endpoints: Vec<EndpointKey>) -> NewEvent {
        let data = format!(r#"{{"id":"{id}","timestamp":"2025-01-01T00:00:00Z"}}"#).into_bytes();
        NewEvent {
            id: id.into(),
            client_id: client,
            data,
            endpoints,
        }
    }

    #[tokio::test]
    async fn append_queues_per_endpoint_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            let out = log
                .append(vec![event("a", false, vec![1, 2]), event("b", false, vec![2])])
                .await
                .unwrap()
                .unwrap();
            assert_eq!(out, vec![AppendOutcome::Stored(1), AppendOutcome::Stored(2)]);
            assert_eq!(log.pending_after(1, None, 10).unwrap().len(), 1);
            assert_eq!(
                log.pending_after(2, None, 10)
                    .unwrap()
                    .iter()
                    .map(|p| p.seq)
                    .collect::<Vec<_>>(),
                vec![1, 2]
            );
            assert_eq!(log.pending_after(2, Some(1), 10).unwrap().len(), 1);
        }
        let log = open(dir.path());
        assert_eq!(log.count_pending(2).unwrap(), 2);
        assert_eq!(log.event_count(), 2);
        let out = log.append(vec![event("c", false, vec![])]).await.unwrap().unwrap();
        assert_eq!(out, vec![AppendOutcome::Stored(3)], "seqs continue after a reopen");
        assert_eq!(&log.event(1).unwrap().unwrap().data[..8], br#"{"id":"a"#);
    }

    #[tokio::test]
    async fn client_ids_dedupe_within_a_batch_and_across_batches() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let out = log
            .append(vec![event("x", true, vec![1]), event("x", true, vec![1])])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out, vec![AppendOutcome::Stored(1), AppendOutcome::Duplicate]);
        let out = log.append(vec![event("x", true, vec![1])]).await.unwrap().unwrap();
        assert_eq!(out, vec![AppendOutcome::Duplicate]);
        assert_eq!(log.count_pending(1).unwrap(), 1);
    }

    #[tokio::test]
    async fn delivery_retry_state_dead_letters_and_revival() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.append(vec![event("a", false, vec![1]), event("b", false, vec![1])])
            .await
            .unwrap()
            .unwrap();
        log.reschedule(
            1,
            &[Pending {
                seq: 1,
                attempts: 2,
                due_ms: 99,
                batch: 7,
            }],
        );
        log.bury(
            1,
            vec![DeadLetter {
                seq: 2,
                event_id: "b".into(),
                attempts: 3,
                dead_at_ms: 5,
                accepted_ms: 1,
                last_status: Some(500),
                last_error: None,
            }],
        );
        log.put_setting("sync", Some(vec![1])).await.unwrap().unwrap();
        let pending = log.pending_after(1, None, 10).unwrap();
        assert_eq!(
            pending,
            vec![Pending {
                seq: 1,
                attempts: 2,
                due_ms: 99,
                batch: 7
            }]
        );
        assert_eq!(log.count_dead(1).unwrap(), 1);
        assert_eq!(log.dead_letters(1, 10).unwrap()[0].event_id, "b");
        assert_eq!(log.revive_dead(1).await.unwrap().unwrap(), 1);
        assert_eq!(log.count_dead(1).unwrap(), 0);
        assert_eq!(log.pending_after(1, Some(1), 10).unwrap(), vec![Pending::fresh(2)]);
        log.delivered(1, &[1, 2]);
        log.put_setting("sync", None).await.unwrap().unwrap();
        assert_eq!(log.count_pending(1).unwrap(), 0);
    }

    #[tokio::test]
    async fn prune_keeps_what_an_endpoint_still_needs() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let k = log.endpoint_key("ep").unwrap();
        log.append(vec![event("a", true, vec![])]).await.unwrap().unwrap();
        log.append(vec![event("b", false, vec![k]), event("c", false, vec![])])
            .await
            .unwrap()
            .unwrap();
        let later = super::super::now_ms() + 10_000;
        // Only "a" is older than the pending "b"; "c" is in b's batch and stays too.
        assert_eq!(log.prune(later, 1_000).await.unwrap().unwrap(), 1);
        assert!(log.event(1).unwrap().is_none());
        assert!(log.event(2).unwrap().is_some());
        // The client id "a" expired with retention: it may be stored again.
        let out = log.append(vec![event("a", true, vec![])]).await.unwrap().unwrap();
        assert!(matches!(out[0], AppendOutcome::Stored(_)));
        log.delivered(k, &[2]);
        // Completions are not awaited; a durable write behind it orders the test.
        log.put_setting("sync", None).await.unwrap().unwrap();
        // "b", "c" and the second "a" are all past retention now.
        assert_eq!(log.prune(later, 1_000).await.unwrap().unwrap(), 3);
        assert_eq!(log.event_count(), 0);
    }

    #[tokio::test]
    async fn a_prune_names_the_endpoint_whose_pending_entry_keeps_events_past_retention() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_runs_only(dir.path());
        let held = log.endpoint_key("held").unwrap();
        let other = log.endpoint_key("other").unwrap();
        log.append(vec![event("a", false, vec![held])]).await.unwrap().unwrap();
        log.append(vec![event("b", false, vec![other])]).await.unwrap().unwrap();
        log.delivered(other, &[2]);
        log.put_setting("sync", None).await.unwrap().unwrap();
        let later = super::super::now_ms() + 10_000;
        let plan = prune_plan(&log.tree, later).unwrap();
        assert_eq!(plan.pruned, 0, "event 1 is pending, and 2 comes after it");
        assert_eq!(plan.held_at, Some((Some(held), 1)));
        assert_eq!(endpoint_id_of(&log.tree, held).as_deref(), Some("held"));
        // Within retention nothing is held back: nothing was due to go.
        assert_eq!(prune_plan(&log.tree, 0).unwrap().held_at, None);
        log.delivered(held, &[1]);
        log.put_setting("sync", None).await.unwrap().unwrap();
        let plan = prune_plan(&log.tree, later).unwrap();
        assert_eq!((plan.pruned, plan.held_at), (2, None));
    }

    /// A dead letter of `seq` after three attempts, the last answered 500.
    fn letter(seq: Seq, event_id: &str) -> DeadLetter {
        DeadLetter {
            seq,
            event_id: event_id.into(),
            attempts: 3,
            dead_at_ms: 5,
            accepted_ms: 1,
            last_status: Some(500),
            last_error: None,
        }
    }

    /// A log with events "a" and "b" (seqs 1 and 2) queued for endpoint `ep`.
    async fn two_events_for_one_endpoint() -> (tempfile::TempDir, Arc<SledLog>, EndpointKey) {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let k = log.endpoint_key("ep").unwrap();
        log.append(vec![event("a", false, vec![k]), event("b", false, vec![k])])
            .await
            .unwrap()
            .unwrap();
        (dir, log, k)
    }

    #[tokio::test]
    async fn the_progress_and_dead_letters_of_a_failed_write_group_are_written_later() {
        let (_dir, log, k) = two_events_for_one_endpoint().await;
        // A delivery, a burial and a failure in one group.
        let release = log.hold_writer();
        log.delivered(k, &[1]);
        log.bury(k, vec![letter(2, "b")]);
        log.send(WriteOp::Fail);
        let refused = log.put_setting("after", Some(vec![1]));
        release.send(()).unwrap();
        assert!(
            refused.await.unwrap().is_err(),
            "a waiter in the failed group hears of it"
        );
        // Nothing is sent again by delivery: the writer tries its own writes again with the
        // next group, or alone after a pause.
        log.put_setting("sync", None).await.unwrap().unwrap();
        assert_eq!(log.pending_after(k, None, 10).unwrap(), vec![], "1 delivered, 2 buried");
        assert_eq!(log.count_dead(k).unwrap(), 1);
        assert_eq!(log.dead_letters(k, 10).unwrap()[0].event_id, "b");
        // Alone: a failed group with only progress in it is written without another write.
        let (_dir, log, k) = two_events_for_one_endpoint().await;
        let release = log.hold_writer();
        log.delivered(k, &[1, 2]);
        log.send(WriteOp::Fail);
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.pending_after(k, None, 10).unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the progress is never written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_failed_group_is_the_write_failure_until_appends_are_written_and_flushed() {
        let (_dir, log, k) = two_events_for_one_endpoint().await;
        assert_eq!(log.write_failure(), None);
        let release = log.hold_writer();
        log.send(WriteOp::Fail);
        let refused = log.put_setting("after", Some(vec![1]));
        release.send(()).unwrap();
        assert!(refused.await.unwrap().is_err());
        let failure = log
            .write_failure()
            .expect("the failure is kept once its waiter heard of it");
        assert!(failure.contains("a failure for the test"), "{failure}");
        // Writes that do not append (settings, delivery progress) do not say that appends
        // would be written again.
        log.put_setting("next", Some(vec![2])).await.unwrap().unwrap();
        log.delivered(k, &[1]);
        log.put_setting("sync", None).await.unwrap().unwrap();
        assert!(log.write_failure().is_some(), "cleared by writes that do not append");
        log.append(vec![event("c", false, vec![k])]).await.unwrap().unwrap();
        assert_eq!(log.write_failure(), None, "appends written and flushed clear it");
    }

    /// A failed append keeps its seqs taken but leaves sled's record of the next seq as
    /// it was; the position marker must follow the record, or the next start would read
    /// the log as cut short and refuse it.
    #[tokio::test]
    async fn a_failed_append_before_a_clean_close_leaves_a_log_that_opens() {
        let (dir, log, k) = two_events_for_one_endpoint().await;
        let release = log.hold_writer();
        let refused = log.append(vec![event("c", false, vec![k])]);
        log.send(WriteOp::Fail);
        release.send(()).unwrap();
        assert!(refused.await.unwrap().is_err());
        // Delivery progress still goes through, and the close flushes.
        log.delivered(k, &[1]);
        log.close().await.unwrap().unwrap();
        drop(log);
        let log = open(dir.path());
        assert_eq!(log.pending_after(k, None, 10).unwrap().len(), 1, "event 2 still waits");
        let out = log.append(vec![event("d", false, vec![k])]).await.unwrap().unwrap();
        assert!(matches!(out[0], AppendOutcome::Stored(seq) if seq > 2), "{out:?}");
    }

    /// The group that holds the close fails: the writer stops after it, so its delivery
    /// progress gets its one more try then, and the close's move of the waiting entries to
    /// runs with it.
    #[tokio::test]
    async fn the_progress_of_a_failed_closing_group_is_written_before_the_writer_stops() {
        let (dir, log, k) = two_events_for_one_endpoint().await;
        let release = log.hold_writer();
        log.delivered(k, &[1]);
        log.send(WriteOp::Fail);
        let closed = log.close();
        release.send(()).unwrap();
        // Answered after the last try, which wrote what the failed group held.
        let closed = closed.await.unwrap();
        assert!(closed.is_ok(), "{closed:?}");
        drop(log);
        let log = open(dir.path());
        assert_eq!(
            log.pending_after(k, None, 10).unwrap(),
            vec![Pending::fresh(2)],
            "event 1 was delivered"
        );
    }

    #[tokio::test]
    async fn a_prune_held_by_entries_still_in_memory_names_their_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let held = log.endpoint_key("held").unwrap();
        let other = log.endpoint_key("other").unwrap();
        log.append(vec![event("a", false, vec![held, other])])
            .await
            .unwrap()
            .unwrap();
        log.delivered(other, &[1]);
        log.put_setting("sync", None).await.unwrap().unwrap();
        let plan = prune_plan(&log.tree, super::super::now_ms() + 10_000).unwrap();
        assert_eq!(
            plan.held_at,
            Some((None, 1)),
            "a route record, not a run, holds event 1"
        );
        assert_eq!(holder(plan.held_at.unwrap(), &log.fresh), Some((held, 1)));
    }

    /// A batch record that cannot be decoded says neither when its events came nor how
    /// many there are: a prune keeps it, says so, and goes on past it.
    #[tokio::test]
    async fn a_prune_keeps_a_batch_record_it_cannot_decode_and_prunes_those_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.append(vec![event("a", false, vec![])]).await.unwrap().unwrap();
        log.append(vec![event("b", false, vec![])]).await.unwrap().unwrap();
        log.tree.insert(keys::event_batch(1), &[1u8, 2][..]).unwrap();
        let later = super::super::now_ms() + 10_000;
        let plan = prune_plan(&log.tree, later).unwrap();
        let (count, first) = plan.damaged.unwrap();
        assert_eq!(count, 1);
        assert!(first.contains("seq 1"), "{first}");
        assert_eq!(log.prune(later, 1_000).await.unwrap().unwrap(), 1, "event 2 goes");
        assert!(
            log.tree.get(keys::event_batch(1)).unwrap().is_some(),
            "the damaged record stays"
        );
        assert!(log.tree.get(keys::event_batch(2)).unwrap().is_none());
    }

    /// A revival that plans while a prune has planned but not yet written must wait for
    /// it: else it finds the event still there, does not restore it, and the prune then
    /// deletes it under the entry it queued.
    #[tokio::test]
    async fn a_revival_waits_for_a_prune_between_its_plan_and_its_writes() {
        let (_dir, log, k) = one_event_done_with(true).await;
        let (planned_tx, planned) = std::sync::mpsc::channel();
        let (resume, resume_rx) = std::sync::mpsc::channel();
        *log.prune_pause.lock().unwrap() = Some((planned_tx, resume_rx));
        let pruned = log.prune(super::super::now_ms() + 10_000, 1_000);
        planned.recv().unwrap();
        let reviving = {
            let log = log.clone();
            std::thread::spawn(move || log.revive_dead(k))
        };
        // Time for a revival that did not wait to plan and queue its writes.
        std::thread::sleep(Duration::from_millis(200));
        resume.send(()).unwrap();
        assert_eq!(
            pruned.await.unwrap().unwrap(),
            1,
            "the prune planned before the revival"
        );
        assert_eq!(reviving.join().unwrap().await.unwrap().unwrap(), 1);
        assert_queued_again_and_kept(&log, k, "the revival restored the event from its letter");
    }

    /// Near the memory's bound one append can go to memory and the next straight to a run.
    /// A reader that looked at memory before the first and at sled after the second would
    /// return the second alone, and its worker's cursor would pass the first for good.
    #[tokio::test]
    async fn a_reader_never_sees_an_append_in_a_run_without_the_one_before_it_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_with(dir.path(), super::super::segments::SEGMENT_BYTES, 3);
        let four = |tag: &str, n: usize| (0..n).map(|i| event(&format!("{tag}{i}"), false, vec![1])).collect();
        // More than memory takes: seqs 1..=4 go to a run, so readers look in sled too.
        log.append(four("old", 4)).await.unwrap().unwrap();
        assert_eq!(run_keys(&log, 1), vec![1]);
        let (reached_tx, reached) = std::sync::mpsc::channel();
        let (resume, resume_rx) = std::sync::mpsc::channel();
        *log.read_pause.lock().unwrap() = Some((reached_tx, resume_rx));
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || log.pending_after(1, Some(4), 10))
        };
        reached.recv().unwrap();
        // Seqs 5 and 6 fit in memory; 7 and 8 do not, and go to a run.
        log.append(four("a", 2)).await.unwrap().unwrap();
        let mut spilled = log.append(four("b", 2));
        // Time for the spill to land, where nothing holds it back.
        let landed = tokio::time::timeout(Duration::from_millis(300), &mut spilled)
            .await
            .is_ok();
        resume.send(()).unwrap();
        let seen: Vec<Seq> = reader.join().unwrap().unwrap().iter().map(|p| p.seq).collect();
        assert!(
            seen.first().is_none_or(|s| *s == 5),
            "the reader saw {seen:?}, past seqs still on their way into memory"
        );
        if !landed {
            spilled.await.unwrap().unwrap();
        }
        let all: Vec<Seq> = log
            .pending_after(1, Some(4), 10)
            .unwrap()
            .iter()
            .map(|p| p.seq)
            .collect();
        assert_eq!(all, vec![5, 6, 7, 8]);
    }

    /// A log whose one event ("a", seq 1) went to `ep` and was delivered there, or buried
    /// (`dead`): nothing waits for it, and a prune past retention may take it.
    async fn one_event_done_with(dead: bool) -> (tempfile::TempDir, Arc<SledLog>, EndpointKey) {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let k = log.endpoint_key("ep").unwrap();
        log.append(vec![event("a", false, vec![k])]).await.unwrap().unwrap();
        if dead {
            log.bury(k, vec![letter(1, "a")]);
        } else {
            log.delivered(k, &[1]);
        }
        log.put_setting("sync", None).await.unwrap().unwrap();
        (dir, log, k)
    }

    /// Event 1 is queued for `k` again, and its body is there to send.
    fn assert_queued_again_and_kept(log: &SledLog, k: EndpointKey, why: &str) {
        assert_eq!(
            log.pending_after(k, None, 10).unwrap(),
            vec![Pending::fresh(1)],
            "{why}"
        );
        let ev = log.event(1).unwrap();
        assert!(ev.is_some_and(|ev| ev.data.starts_with(br#"{"id":"a""#)), "{why}");
    }

    /// A dead letter revived, and a window replayed, while a prune is planned: the prune
    /// must see the entries queued again, or it deletes the events they need.
    #[tokio::test]
    async fn a_prune_racing_a_revival_or_a_replay_keeps_the_events_they_queue() {
        for replay in [false, true] {
            let (_dir, log, k) = one_event_done_with(!replay).await;
            let release = log.hold_writer();
            let queued = if replay {
                log.replay_window(k, 0, u64::MAX, &|_| true)
            } else {
                log.revive_dead(k)
            };
            let pruned = log.prune(super::super::now_ms() + 10_000, 1_000);
            release.send(()).unwrap();
            assert_eq!(queued.await.unwrap().unwrap(), 1);
            assert_eq!(
                pruned.await.unwrap().unwrap(),
                0,
                "replay {replay}: event 1 is pending again"
            );
            assert_queued_again_and_kept(&log, k, &format!("replay {replay}: the event is kept"));
        }
    }

    #[tokio::test]
    async fn held_back_delivery_progress_is_applied_without_a_later_write() {
        let (_dir, log, k) = two_events_for_one_endpoint().await;
        log.delivered(k, &[1]);
        log.reschedule(
            k,
            &[Pending {
                seq: 2,
                attempts: 1,
                due_ms: 42,
                batch: 0,
            }],
        );
        // Nothing else is written: the writer must apply the progress on its own.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pending = log.pending_after(k, None, 10).unwrap();
            if pending.len() == 1 && pending[0].attempts == 1 {
                assert_eq!(pending[0].seq, 2);
                assert_eq!(pending[0].due_ms, 42);
                break;
            }
            assert!(Instant::now() < deadline, "progress still not applied: {pending:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn prune_keeps_a_pending_event_whatever_damage_hides_its_queue() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_runs_only(dir.path());
        let k = log.endpoint_key("ep").unwrap();
        log.append(vec![event("pending", false, vec![k])])
            .await
            .unwrap()
            .unwrap();
        let later = super::super::now_ms() + 10_000;
        // A damaged id mapping hides nothing: the queue's runs name their endpoint.
        log.tree
            .insert(keys::prefixed(ENDPOINT_KEY, b"ep"), &[1u8, 2][..])
            .unwrap();
        assert_eq!(log.prune(later, 1_000).await.unwrap().unwrap(), 0);
        assert!(log.event(1).unwrap().is_some(), "the pending event stays");
        // A run that cannot be read stops the prune rather than being passed over.
        log.tree.insert(keys::queue(QUEUE_RUN, k, 1), &[1u8, 2][..]).unwrap();
        assert!(
            log.prune(later, 1_000).await.unwrap().is_err(),
            "an unreadable run stops the prune"
        );
        assert!(log.event(1).unwrap().is_some(), "the pending event stays");
    }

    /// A fresh log holding `n` events (`e0`, `e1`, …) routed nowhere.
    async fn log_with_events(n: usize) -> (tempfile::TempDir, Arc<SledLog>) {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let events = (0..n).map(|i| event(&format!("e{i}"), false, vec![])).collect();
        log.append(events).await.unwrap().unwrap();
        (dir, log)
    }

    fn run_keys(log: &SledLog, ep: EndpointKey) -> Vec<Seq> {
        log.tree
            .scan_prefix(keys::queue_prefix(QUEUE_RUN, ep))
            .keys()
            .map(|k| keys::seq_of_queue_key(&k.unwrap()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn entries_moved_to_runs_take_one_run_per_endpoint_and_progress_rewrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_runs_only(dir.path());
        let events = (0..600).map(|i| event(&format!("e{i}"), false, vec![1, 2])).collect();
        log.append(events).await.unwrap().unwrap();
        // 600 entries per endpoint in runs of RUN_MAX, not 600 keys.
        assert_eq!(run_keys(&log, 1), vec![1, 257, 513]);
        assert_eq!(log.count_pending(2).unwrap(), 600);
        // Pages start inside a run and cross into the next.
        let page = log.pending_after(1, Some(250), 10).unwrap();
        assert_eq!(
            page.iter().map(|p| p.seq).collect::<Vec<_>>(),
            (251..261).collect::<Vec<_>>()
        );
        log.delivered(1, &(1..=300).collect::<Vec<_>>());
        log.reschedule(
            1,
            &[Pending {
                seq: 400,
                attempts: 1,
                due_ms: 9,
                batch: 3,
            }],
        );
        log.put_setting("sync", None).await.unwrap().unwrap();
        // The emptied first run is gone; the second keeps its key though its head went.
        assert_eq!(run_keys(&log, 1), vec![257, 513]);
        assert_eq!(log.pending_after(1, None, 1).unwrap(), vec![Pending::fresh(301)]);
        assert_eq!(log.pending_after(1, Some(399), 1).unwrap()[0].attempts, 1);
        assert_eq!(log.count_pending(1).unwrap(), 300);
        assert_eq!(
            log.count_pending(2).unwrap(),
            600,
            "other endpoints' runs are untouched"
        );
    }

    #[tokio::test]
    async fn the_latest_events_are_read_from_memory_and_older_ones_from_sled() {
        let (_dir, log) = log_with_events(RECENT_EVENTS + 10).await;
        let last = (RECENT_EVENTS + 10) as Seq;
        // The first ones, long out of the ring, come from sled ...
        assert_eq!(
            &log.event(1).unwrap().unwrap().data[..],
            br#"{"id":"e0","timestamp":"2025-01-01T00:00:00Z"}"#
        );
        assert_eq!(
            &log.event(300).unwrap().unwrap().data[..],
            br#"{"id":"e299","timestamp":"2025-01-01T00:00:00Z"}"#
        );
        // ... and with sled's batches taken away behind the log's back, the latest is
        // still served from the ring.
        for k in log.tree.scan_prefix([EVENT_BATCH]).keys() {
            log.tree.remove(k.unwrap()).unwrap();
        }
        assert_eq!(
            &log.event(last).unwrap().unwrap().data[..],
            br#"{"id":"e8201","timestamp":"2025-01-01T00:00:00Z"}"#
        );
        assert!(log.event(last + 1).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_run_added_between_the_two_reads_of_a_page_is_not_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.append(vec![event("a", false, vec![1])]).await.unwrap().unwrap();
        // The worker has seen seq 1. While it reads the next page, the writer stores
        // seqs 2 and 3 as runs of their own.
        let page = read_pending(&log.tree, 1, Some(1), 10, || {
            for seq in [2, 3] {
                log.tree
                    .insert(
                        &keys::queue(QUEUE_RUN, 1, seq)[..],
                        keys::run_value(&[Pending::fresh(seq)]),
                    )
                    .unwrap();
            }
        })
        .unwrap();
        assert_eq!(page.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn a_run_split_between_the_two_reads_of_a_page_is_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let entries: Vec<Pending> = (1..=6).map(Pending::fresh).collect();
        log.tree
            .insert(&keys::queue(QUEUE_RUN, 1, 1)[..], keys::run_value(&entries))
            .unwrap();
        // After seq 1, the first read gets the whole run at 1; then the writer splits it
        // at 4, and the second read finds the part at 4.
        let page = read_pending(&log.tree, 1, Some(1), 10, || {
            let mut split = sled::Batch::default();
            split.insert(&keys::queue(QUEUE_RUN, 1, 1)[..], keys::run_value(&entries[..3]));
            split.insert(&keys::queue(QUEUE_RUN, 1, 4)[..], keys::run_value(&entries[3..]));
            log.tree.apply_batch(split).unwrap();
        })
        .unwrap();
        assert_eq!(page.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![2, 3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn a_threads_cached_batch_serves_neighbours_until_a_prune() {
        let (_dir, log) = log_with_events(RECENT_EVENTS + 100).await;
        // Seqs 1 and 2 are out of the ring and in one batch: the second read comes from
        // the batch the first one left with this thread.
        assert_eq!(&log.event(1).unwrap().unwrap().data[..9], br#"{"id":"e0"#);
        for k in log.tree.scan_prefix([EVENT_BATCH]).keys() {
            log.tree.remove(k.unwrap()).unwrap();
        }
        assert_eq!(&log.event(2).unwrap().unwrap().data[..9], br#"{"id":"e1"#);
        // A prune through the log voids it.
        let (_dir, log) = log_with_events(RECENT_EVENTS + 100).await;
        assert!(log.event(1).unwrap().is_some());
        let later = super::super::now_ms() + 10_000;
        assert!(log.prune(later, 1_000).await.unwrap().unwrap() > 0);
        assert!(
            log.event(2).unwrap().is_none(),
            "a pruned event is not served from a cached batch"
        );
    }

    #[tokio::test]
    async fn an_append_stores_its_events_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            let events = (0..600).map(|i| event(&format!("e{i}"), false, vec![])).collect();
            log.append(events).await.unwrap().unwrap();
            log.append(vec![event("late", false, vec![])]).await.unwrap().unwrap();
            let firsts: Vec<Seq> = log
                .tree
                .scan_prefix([EVENT_BATCH])
                .keys()
                .map(|k| keys::u64_at(&k.unwrap(), 1).unwrap())
                .collect();
            // Test events are 46-48 bytes: about 170 fit in BATCH_MAX_BYTES, so 600 take
            // four batches, and the next append starts a batch of its own.
            assert_eq!(firsts, vec![1, 173, 343, 513, 601]);
        }
        // Reopened, the log counts events, continues seqs and reads from sled alone.
        let log = open(dir.path());
        assert_eq!(log.event_count(), 601);
        assert_eq!(&log.event(600).unwrap().unwrap().data[..10], br#"{"id":"e59"#);
        assert_eq!(&log.event(601).unwrap().unwrap().data[..11], br#"{"id":"late"#);
        assert!(log.event(602).unwrap().is_none());
        let out = log.append(vec![event("next", false, vec![])]).await.unwrap().unwrap();
        assert_eq!(out, vec![AppendOutcome::Stored(602)]);
    }

    #[tokio::test]
    async fn event_bodies_go_to_segment_files_and_sled_keeps_a_pointer_to_each_batch() {
        let (dir, log) = log_with_events(600).await;
        let mut body_bytes = 0;
        for v in log.tree.scan_prefix([EVENT_BATCH]).values() {
            let v = v.unwrap();
            match BatchRecord::decode(&v).unwrap() {
                BatchRecord::InFile(at) => body_bytes += u64::from(at.len),
                BatchRecord::Inline(_) => panic!("an event batch was stored inside sled"),
            }
        }
        let files = segment_files(dir.path());
        assert_eq!(files.len(), 1);
        let seg = dir.path().join(super::super::segments::SEGMENT_DIR).join(&files[0]);
        assert_eq!(std::fs::metadata(seg).unwrap().len(), body_bytes);
        assert!(body_bytes > 600 * 46, "every event's bytes are in the segment");
        drop(log);
        // Reopened, the old segment is read, and writing goes on in a new one.
        let log = open(dir.path());
        assert_eq!(&log.event(1).unwrap().unwrap().data[..9], br#"{"id":"e0"#);
        assert_eq!(&log.event(600).unwrap().unwrap().data[..11], br#"{"id":"e599"#);
        log.append(vec![event("next", false, vec![])]).await.unwrap().unwrap();
        assert_eq!(segment_files(dir.path()).len(), 2);
        assert_eq!(&log.event(601).unwrap().unwrap().data[..11], br#"{"id":"next"#);
    }

    #[tokio::test]
    async fn a_segment_file_is_deleted_once_every_batch_in_it_is_pruned() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 4 KiB: each append of 60 events (about 2.9 KiB) fills one.
        let log = open_with_segments_of(dir.path(), 4096);
        let k = log.endpoint_key("ep").unwrap();
        for round in 0..4 {
            let to = if round == 3 { vec![k] } else { vec![] };
            let events = (0..60)
                .map(|i| event(&format!("r{round}e{i}"), false, to.clone()))
                .collect();
            log.append(events).await.unwrap().unwrap();
        }
        assert_eq!(segment_files(dir.path()).len(), 4);
        let later = super::super::now_ms() + 10_000;
        // The last append is still pending for its endpoint: its segment stays.
        assert_eq!(log.prune(later, 1_000).await.unwrap().unwrap(), 180);
        // Emptied segments go after the next flush, which a durable write forces.
        log.put_setting("sync", None).await.unwrap().unwrap();
        assert_eq!(segment_files(dir.path()), vec!["0000000000000004.seg".to_string()]);
        assert!(log.event(1).unwrap().is_none());
        assert_eq!(&log.event(181).unwrap().unwrap().data[..11], br#"{"id":"r3e0"#);
        drop(log);
        // Reopened, the remaining segment still serves its events.
        let log = open_with_segments_of(dir.path(), 4096);
        assert_eq!(log.event_count(), 60);
        assert_eq!(&log.event(240).unwrap().unwrap().data[..12], br#"{"id":"r3e59"#);
    }

    #[tokio::test]
    async fn batches_stored_inside_sled_before_segment_files_are_still_read_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            let old: [&[u8]; 2] = [br#"{"id":"old1"}"#, br#"{"id":"old2"}"#];
            log.tree
                .insert(&keys::event_batch(1)[..], keys::batch_value(1_000, old.into_iter()))
                .unwrap();
            log.tree.insert(keys::META_NEXT_SEQ, &3u64.to_be_bytes()[..]).unwrap();
            log.tree.flush().unwrap();
        }
        let log = open(dir.path());
        assert_eq!(log.event_count(), 2);
        let ev = log.event(2).unwrap().unwrap();
        assert_eq!((&ev.data[..], ev.accepted_ms), (&br#"{"id":"old2"}"#[..], 1_000));
        let out = log.append(vec![event("new", false, vec![])]).await.unwrap().unwrap();
        assert_eq!(out, vec![AppendOutcome::Stored(3)]);
        let later = super::super::now_ms() + 10_000;
        assert_eq!(log.prune(later, 1_000).await.unwrap().unwrap(), 3);
        assert!(log.event(2).unwrap().is_none() && log.event(3).unwrap().is_none());
    }

    #[tokio::test]
    async fn appends_queued_together_share_one_batch_and_one_route_record() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let release = log.hold_writer();
        // Ten single-click appends (and a client id seen twice) wait behind the held group
        // and are taken as the next group.
        let mut tickets: Vec<_> = (0..10)
            .map(|i| log.append(vec![event(&format!("c{i}"), true, vec![7, 8])]))
            .collect();
        tickets.push(log.append(vec![event("c3", true, vec![7])]));
        release.send(()).unwrap();
        let mut outcomes = Vec::new();
        for t in tickets {
            outcomes.extend(t.await.unwrap().unwrap());
        }
        let seqs: Vec<Seq> = (1..=10).collect();
        let mut want: Vec<AppendOutcome> = seqs.iter().map(|s| AppendOutcome::Stored(*s)).collect();
        want.push(AppendOutcome::Duplicate);
        assert_eq!(outcomes, want);
        assert_eq!(find_batch_record(&log.tree, 10).unwrap().unwrap().0, 1, "one batch");
        assert_eq!(log.tree.scan_prefix([ROUTES]).count(), 1, "one route record");
        for ep in [7, 8] {
            assert!(run_keys(&log, ep).is_empty(), "no queue run for endpoint {ep}");
            let pending: Vec<Seq> = log
                .pending_after(ep, None, 100)
                .unwrap()
                .iter()
                .map(|p| p.seq)
                .collect();
            assert_eq!(pending, seqs);
        }
        for seq in seqs {
            let ev = log.event(seq).unwrap().unwrap();
            assert_eq!(ev.data, Bytes::from(event(&format!("c{}", seq - 1), true, vec![]).data));
        }
        // Two 100-click appends in one group stay a batch each: sets stop at APPEND_SET_MAX.
        let release = log.hold_writer();
        let hundred = |tag: &str| (0..100).map(|i| event(&format!("{tag}{i}"), false, vec![7])).collect();
        let tickets = [log.append(hundred("x")), log.append(hundred("y"))];
        release.send(()).unwrap();
        for t in tickets {
            t.await.unwrap().unwrap();
        }
        assert_eq!(find_batch_record(&log.tree, 110).unwrap().unwrap().0, 11);
        assert_eq!(find_batch_record(&log.tree, 210).unwrap().unwrap().0, 111);
    }

    #[tokio::test]
    async fn fresh_entries_are_read_from_memory_and_a_deleted_endpoint_stays_gone_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let events = (0..5).map(|i| event(&format!("e{i}"), false, vec![1, 2])).collect();
        log.append(events).await.unwrap().unwrap();
        assert!(run_keys(&log, 1).is_empty() && run_keys(&log, 2).is_empty());
        // Delivered fresh entries leave memory and write nothing to the queues.
        log.delivered(2, &[1, 2]);
        log.forget_endpoint(1).await.unwrap().unwrap();
        assert_eq!(log.count_pending(1).unwrap(), 0);
        assert_eq!(log.count_pending(2).unwrap(), 3);
        assert!(run_keys(&log, 2).is_empty());
        crash_log(log).await;
        let log = open(dir.path());
        assert!(
            log.pending_after(1, None, 10).unwrap().is_empty(),
            "the deleted endpoint's entries stay gone"
        );
        // The crash brings back what endpoint 2 had delivered: the record still listed it.
        assert_eq!(
            log.pending_after(2, None, 10).unwrap(),
            (1..=5).map(Pending::fresh).collect::<Vec<_>>()
        );
        assert_eq!(
            run_keys(&log, 2),
            vec![1],
            "the record's entries are queued in runs at open"
        );
    }

    #[tokio::test]
    async fn forgetting_an_endpoint_drops_the_runs_and_dead_letters_of_writes_still_held_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let events = (0..3).map(|i| event(&format!("e{i}"), false, vec![1])).collect();
        log.append(events).await.unwrap().unwrap();
        // A worker's last writes before it stopped, still waiting for the writer (held
        // here) when the delete asks to forget the endpoint.
        let release = log.hold_writer();
        log.reschedule(
            1,
            &[Pending {
                seq: 1,
                attempts: 1,
                due_ms: 99,
                batch: 0,
            }],
        );
        log.bury(1, vec![letter(2, "e1")]);
        let forgotten = log.forget_endpoint(1);
        release.send(()).unwrap();
        forgotten.await.unwrap().unwrap();
        assert!(run_keys(&log, 1).is_empty(), "a retry's run outlived the delete");
        assert_eq!(log.count_dead(1).unwrap(), 0);
        assert_eq!(log.count_pending(1).unwrap(), 0);
        // Nothing holds pruning back: every event goes.
        assert_eq!(log.prune(u64::MAX / 2, 0).await.unwrap().unwrap(), 3);
    }

    #[tokio::test]
    async fn records_drop_their_delivered_entries_past_what_a_crash_may_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let reopen = || open_bounded(dir.path(), super::super::segments::SEGMENT_BYTES, FRESH_LISTED_MAX, 2);
        let log = reopen();
        let events = (0..5).map(|i| event(&format!("e{i}"), false, vec![1, 2])).collect();
        log.append(events).await.unwrap().unwrap();
        log.delivered(2, &[1, 2]);
        log.put_setting("sync", None).await.unwrap().unwrap();
        assert_eq!(
            lock(&log.fresh).repeatable(),
            2,
            "two delivered entries may stay listed"
        );
        log.delivered(2, &[3, 4]);
        log.put_setting("sync", None).await.unwrap().unwrap();
        // Four were past the bound: the record now lists only what waits.
        assert_eq!(lock(&log.fresh).repeatable(), 0);
        assert_eq!(lock(&log.fresh).listed(), 6);
        assert!(run_keys(&log, 1).is_empty() && run_keys(&log, 2).is_empty());
        crash_log(log).await;
        let log = reopen();
        assert_eq!(log.pending_after(2, None, 10).unwrap(), vec![Pending::fresh(5)]);
        assert_eq!(
            log.pending_after(1, None, 10).unwrap(),
            (1..=5).map(Pending::fresh).collect::<Vec<_>>(),
            "nothing waiting is lost"
        );
    }

    #[tokio::test]
    async fn records_rewritten_without_delivered_entries_make_room_for_later_appends() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_bounded(dir.path(), super::super::segments::SEGMENT_BYTES, 10, 4);
        let events = (0..5).map(|i| event(&format!("e{i}"), false, vec![1, 2])).collect();
        log.append(events).await.unwrap().unwrap();
        log.delivered(2, &[1, 2, 3, 4, 5]);
        log.put_setting("sync", None).await.unwrap().unwrap();
        assert_eq!(lock(&log.fresh).listed(), 5, "endpoint 1's five still wait");
        let events = (5..10).map(|i| event(&format!("e{i}"), false, vec![1])).collect();
        log.append(events).await.unwrap().unwrap();
        assert!(run_keys(&log, 1).is_empty(), "the second append fits beside the first");
        assert_eq!(log.pending_after(1, None, 20).unwrap().len(), 10);
    }

    #[tokio::test]
    async fn a_damaged_segment_is_reported_as_corrupt_not_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let events = (0..RECENT_EVENTS + 10)
            .map(|i| event(&format!("e{i}"), false, vec![]))
            .collect();
        log.append(events).await.unwrap().unwrap();
        let seg = dir
            .path()
            .join(super::super::segments::SEGMENT_DIR)
            .join(&segment_files(dir.path())[0]);
        let file = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"XXXX", 20).unwrap();
        // Seq 1 is long out of the ring: it is read from the segment, and refused.
        assert!(matches!(log.event(1), Err(LogError::Corrupt(_))));
    }

    /// A dead letter is replayed only where its event can be delivered: one buried without
    /// its body whose event is gone, and one whose batch is damaged, stay dead, the second
    /// with its copy of the body. Queued again, each would be buried again without a body.
    #[tokio::test]
    async fn dead_letters_whose_events_cannot_be_read_stay_dead_on_replay() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let events = (0..RECENT_EVENTS + 10)
            .map(|i| event(&format!("e{i}"), false, vec![1]))
            .collect();
        log.append(events).await.unwrap().unwrap();
        let never_stored = 10_000_000;
        let letter = |seq| DeadLetter {
            seq,
            event_id: format!("e{seq}"),
            attempts: 3,
            dead_at_ms: 5,
            accepted_ms: 1,
            last_status: Some(500),
            last_error: None,
        };
        log.bury(1, vec![letter(1), letter(never_stored)]);
        log.put_setting("sync", None).await.unwrap().unwrap();
        let body_of = |seq| {
            let v = log.tree.get(keys::queue(DEAD, 1, seq)).unwrap().unwrap();
            keys::decode_dead(&v).unwrap().1[8..].to_vec()
        };
        assert_ne!(body_of(1), NO_BODY, "seq 1 was read at its burial");
        assert_eq!(body_of(never_stored), NO_BODY);
        let seg = dir
            .path()
            .join(super::super::segments::SEGMENT_DIR)
            .join(&segment_files(dir.path())[0]);
        let file = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"XXXX", 20).unwrap();
        // This thread keeps the batch it read at the burial; another reads the segment.
        let reader = log.clone();
        let read = std::thread::spawn(move || reader.event(1)).join().unwrap();
        assert!(matches!(read, Err(LogError::Corrupt(_))), "{read:?}");

        assert_eq!(log.revive_dead(1).await.unwrap().unwrap(), 0, "nothing replayed");
        assert_eq!(log.count_dead(1).unwrap(), 2, "both letters stay dead");
        assert_ne!(body_of(1), NO_BODY, "with the copy of the body");
        let queued: Vec<Seq> = log
            .pending_after(1, None, RECENT_EVENTS + 20)
            .unwrap()
            .iter()
            .map(|p| p.seq)
            .collect();
        assert!(
            !queued.contains(&1) && !queued.contains(&never_stored),
            "neither is queued again"
        );
        // Buried again unread (as delivery does an event a window's replay queued), on a
        // thread that never read its batch, the letter keeps its copy.
        let (again, buried) = (letter(1), log.clone());
        std::thread::spawn(move || buried.bury(1, vec![again])).join().unwrap();
        log.put_setting("sync", None).await.unwrap().unwrap();
        assert_ne!(body_of(1), NO_BODY, "a second burial keeps the copy");
        assert_eq!(log.count_dead(1).unwrap(), 2);
    }

    /// A batch record that cannot be decoded hides its events' time: no window says they
    /// belong, so a replay leaves them out (and says so) and still takes the batches
    /// around it.
    #[tokio::test]
    async fn a_replay_leaves_out_a_batch_record_it_cannot_decode() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let k = log.endpoint_key("ep").unwrap();
        log.append(vec![event("a", false, vec![]), event("b", false, vec![])])
            .await
            .unwrap()
            .unwrap();
        log.append(vec![event("c", false, vec![])]).await.unwrap().unwrap();
        assert!(
            log.tree.get(keys::event_batch(3)).unwrap().is_some(),
            "c is a batch of its own"
        );
        log.tree.insert(keys::event_batch(1), &[1u8, 2][..]).unwrap();
        assert_eq!(log.replay_window(k, 0, 1, &|_| true).await.unwrap().unwrap(), 0);
        assert!(log.pending_after(k, None, 10).unwrap().is_empty());
        let all = log.replay_window(k, 0, u64::MAX, &|_| true).await.unwrap().unwrap();
        assert_eq!(all, 1, "c, whose batch reads");
        assert_eq!(log.pending_after(k, None, 10).unwrap(), vec![Pending::fresh(3)]);
    }

    #[tokio::test]
    async fn a_batch_pruned_between_its_lookup_and_its_read_is_absent_not_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 1 KiB, so the first append's segment is closed once pruned.
        let log = open_with_segments_of(dir.path(), 1024);
        log.append(vec![event("a", false, vec![])]).await.unwrap().unwrap();
        log.append((0..30).map(|i| event(&format!("b{i}"), false, vec![])).collect())
            .await
            .unwrap()
            .unwrap();
        // A reader looks up seq 1's pointer ...
        let (first, value) = find_batch_record(&log.tree, 1).unwrap().unwrap();
        // ... then the batch is pruned and its segment deleted before the reader reads it.
        let later = super::super::now_ms() + 10_000;
        assert_eq!(log.prune(later, 1_000).await.unwrap().unwrap(), 31);
        log.put_setting("sync", None).await.unwrap().unwrap();
        assert!(load_batch(&log.tree, &log.segments, first, value.clone(), 1)
            .unwrap()
            .is_none());
        // A pointer still in sled whose segment is not open is damage, and says so.
        log.tree.insert(&keys::event_batch(first)[..], value.clone()).unwrap();
        let err = load_batch(&log.tree, &log.segments, first, value, 1).err().unwrap();
        assert!(err.to_string().contains(".seg"), "{err}");
    }

    #[tokio::test]
    async fn events_stored_one_per_key_move_into_batches_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            for seq in [1u64, 2, 5] {
                let record = keys::event_record(1_000 + seq, format!("{{\"id\":\"old{seq}\"}}").as_bytes());
                log.tree.insert(&keys::legacy_event(seq)[..], record).unwrap();
            }
            log.tree.flush().unwrap();
        }
        let log = open(dir.path());
        assert_eq!(log.event_count(), 3);
        let ev = log.event(5).unwrap().unwrap();
        assert_eq!((&ev.data[..], ev.accepted_ms), (&br#"{"id":"old5"}"#[..], 1_005));
        assert!(log.event(3).unwrap().is_none());
        assert_eq!(log.tree.scan_prefix([LEGACY_EVENT]).count(), 0);
        let out = log.append(vec![event("new", false, vec![])]).await.unwrap().unwrap();
        assert_eq!(
            out,
            vec![AppendOutcome::Stored(6)],
            "seqs continue after the moved events"
        );
    }

    #[tokio::test]
    async fn entries_stored_one_per_key_move_into_runs_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            log.append(vec![
                event("a", false, vec![]),
                event("b", false, vec![]),
                event("c", false, vec![]),
            ])
            .await
            .unwrap()
            .unwrap();
            // Queue entries as the layout before runs stored them.
            for (ep, p) in [
                (4, Pending::fresh(1)),
                (
                    4,
                    Pending {
                        seq: 3,
                        attempts: 2,
                        due_ms: 5,
                        batch: 6,
                    },
                ),
                (5, Pending::fresh(2)),
            ] {
                log.tree
                    .insert(
                        &keys::queue(LEGACY_PENDING, ep, p.seq)[..],
                        &keys::pending_value(&p)[..],
                    )
                    .unwrap();
            }
            log.tree.flush().unwrap();
        }
        let log = open(dir.path());
        assert_eq!(
            log.pending_after(4, None, 10).unwrap(),
            vec![
                Pending::fresh(1),
                Pending {
                    seq: 3,
                    attempts: 2,
                    due_ms: 5,
                    batch: 6
                }
            ]
        );
        assert_eq!(log.pending_after(5, None, 10).unwrap(), vec![Pending::fresh(2)]);
        assert_eq!(log.tree.scan_prefix([LEGACY_PENDING]).count(), 0);
    }

    #[derive(Debug, Clone)]
    enum QueueOp {
        Append {
            n: usize,
            to: Vec<EndpointKey>,
        },
        Deliver {
            ep: EndpointKey,
            pick: Vec<usize>,
        },
        Retry {
            ep: EndpointKey,
            pick: usize,
            attempts: u32,
        },
        Replay {
            ep: EndpointKey,
        },
        /// Close and open again; or stop as a crash would, and open again.
        Reopen {
            crash: bool,
        },
    }

    fn queue_op() -> impl proptest::strategy::Strategy<Value = QueueOp> {
        use proptest::prelude::*;
        let ep = 1u32..4;
        prop_oneof![
            (1usize..700, proptest::collection::vec(1u32..4, 0..3)).prop_map(|(n, to)| QueueOp::Append { n, to }),
            (ep.clone(), proptest::collection::vec(0usize..1000, 0..400))
                .prop_map(|(ep, pick)| QueueOp::Deliver { ep, pick }),
            (ep.clone(), 0usize..1000, 1u32..9).prop_map(|(ep, pick, attempts)| QueueOp::Retry { ep, pick, attempts }),
            ep.prop_map(|ep| QueueOp::Replay { ep }),
            any::<bool>().prop_map(|crash| QueueOp::Reopen { crash }),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]
        /// Whatever appends, completions, retries, replays, restarts and crashes do to
        /// the fresh entries and the runs, each endpoint's queue reads back as the plain
        /// set of entries it should be, page by page (after a crash, with at most
        /// `fresh_repeat_max` entries delivered before it back, as fresh), and every run
        /// stays within its key range. Once everything is delivered no route record is
        /// left.
        #[test]
        fn queues_read_back_as_their_model(
            ops in proptest::collection::vec(queue_op(), 1..12),
            fresh_listed_max in proptest::prop_oneof![
                proptest::strategy::Just(0usize),
                1usize..1500,
                proptest::strategy::Just(FRESH_LISTED_MAX),
            ],
            fresh_repeat_max in proptest::prop_oneof![
                proptest::strategy::Just(0usize),
                1usize..300,
                proptest::strategy::Just(FRESH_REPEAT_MAX),
            ],
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let reopen = || {
                    open_bounded(dir.path(), super::super::segments::SEGMENT_BYTES, fresh_listed_max, fresh_repeat_max)
                };
                let mut log = reopen();
                let mut model: BTreeMap<EndpointKey, BTreeMap<Seq, Pending>> = BTreeMap::new();
                let mut delivered: BTreeMap<EndpointKey, HashSet<Seq>> = BTreeMap::new();
                let mut next = 1u64;
                for op in ops {
                    match op {
                        QueueOp::Append { n, to } => {
                            let events = (0..n).map(|i| event(&format!("e{i}"), false, to.clone())).collect();
                            log.append(events).await.unwrap().unwrap();
                            for seq in next..next + n as u64 {
                                for ep in &to {
                                    model.entry(*ep).or_default().insert(seq, Pending::fresh(seq));
                                }
                            }
                            next += n as u64;
                        }
                        QueueOp::Deliver { ep, pick } => {
                            let queue = model.entry(ep).or_default();
                            let seqs: Vec<Seq> = queue.keys().copied().collect();
                            let mut done: Vec<Seq> = pick.iter().filter_map(|i| seqs.get(*i).copied()).collect();
                            done.sort_unstable();
                            done.dedup();
                            for s in &done {
                                queue.remove(s);
                            }
                            delivered.entry(ep).or_default().extend(&done);
                            log.delivered(ep, &done);
                        }
                        QueueOp::Retry { ep, pick, attempts } => {
                            let queue = model.entry(ep).or_default();
                            if let Some(seq) = queue.keys().nth(pick).copied() {
                                let p = Pending { seq, attempts, due_ms: 7, batch: 0 };
                                queue.insert(seq, p);
                                log.reschedule(ep, &[p]);
                            }
                        }
                        QueueOp::Replay { ep } => {
                            log.replay_window(ep, 0, u64::MAX, &|_| true).await.unwrap().unwrap();
                            let queue = model.entry(ep).or_default();
                            for seq in 1..next {
                                queue.insert(seq, Pending::fresh(seq));
                            }
                        }
                        QueueOp::Reopen { crash } => {
                            log.put_setting("sync", None).await.unwrap().unwrap();
                            if crash {
                                crash_log(log).await;
                            } else {
                                log.close().await.unwrap().unwrap();
                                drop(log);
                            }
                            log = reopen();
                            assert_eq!(log.tree.scan_prefix([ROUTES]).count(), 0, "records are queued at open");
                            let mut repeated = 0;
                            for ep in 1..4 {
                                let queue = model.entry(ep).or_default();
                                let got = read_all(&log, ep);
                                for p in &got {
                                    match queue.get(&p.seq) {
                                        Some(want) => assert_eq!(p, want, "endpoint {ep}"),
                                        None => {
                                            assert!(crash, "a close brings back nothing delivered");
                                            assert_eq!(*p, Pending::fresh(p.seq));
                                            assert!(delivered[&ep].contains(&p.seq), "only what was delivered comes back");
                                            repeated += 1;
                                        }
                                    }
                                }
                                for seq in queue.keys() {
                                    assert!(got.iter().any(|p| p.seq == *seq), "endpoint {ep} lost {seq}");
                                }
                                *queue = got.into_iter().map(|p| (p.seq, p)).collect();
                            }
                            assert!(
                                repeated <= fresh_repeat_max,
                                "a crash repeated {repeated} deliveries, past {fresh_repeat_max}"
                            );
                        }
                    }
                }
                log.put_setting("sync", None).await.unwrap().unwrap();
                for ep in 1..4 {
                    let want: Vec<Pending> = model.get(&ep).map(|q| q.values().copied().collect()).unwrap_or_default();
                    let got = read_all(&log, ep);
                    assert_eq!(got, want, "endpoint {ep}");
                    assert_eq!(log.count_pending(ep).unwrap(), want.len() as u64);
                    let keys = run_keys(&log, ep);
                    for (i, kv) in log.tree.scan_prefix(keys::queue_prefix(QUEUE_RUN, ep)).enumerate() {
                        let run = keys::decode_run(&kv.unwrap().1).unwrap();
                        assert!(!run.is_empty(), "empty runs are removed");
                        assert!(run.len() <= 2 * RUN_MAX);
                        assert!(run[0].seq >= keys[i]);
                        if let Some(next_key) = keys.get(i + 1) {
                            assert!(run.last().unwrap().seq < *next_key, "run {} spills into the next", keys[i]);
                        }
                    }
                }
                for (ep, queue) in &model {
                    log.delivered(*ep, &queue.keys().copied().collect::<Vec<_>>());
                }
                log.put_setting("sync", None).await.unwrap().unwrap();
                assert_eq!(log.tree.scan_prefix([ROUTES]).count(), 0, "no record outlives its entries");
                for ep in 1..4 {
                    assert!(run_keys(&log, ep).is_empty());
                    assert_eq!(log.count_pending(ep).unwrap(), 0);
                }
            });
        }
    }

    /// Stops the log as a crash right after a flush would, and lets it go.
    async fn crash_log(log: Arc<SledLog>) {
        let (reply, stopped) = oneshot::channel();
        log.send(WriteOp::Crash(reply));
        stopped.await.unwrap().unwrap();
    }

    /// An endpoint's whole queue, read a page at a time as a worker does.
    fn read_all(log: &SledLog, ep: EndpointKey) -> Vec<Pending> {
        let mut got = Vec::new();
        let mut cursor = None;
        loop {
            let page = log.pending_after(ep, cursor, 97).unwrap();
            cursor = page.last().map(|p| p.seq).or(cursor);
            let last = page.len() < 97;
            got.extend(page);
            if last {
                return got;
            }
        }
    }

    #[test]
    fn endpoint_keys_are_stable() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let a = log.endpoint_key("a").unwrap();
        let b = log.endpoint_key("b").unwrap();
        assert_ne!(a, b);
        drop(log);
        let log = open(dir.path());
        assert_eq!(log.endpoint_key("a").unwrap(), a);
        assert_ne!(log.endpoint_key("c").unwrap(), b);
    }

    /// A counter at its end is an error, not a wrap: wrapped, it would hand out key 0 and
    /// then the keys of live endpoints.
    #[test]
    fn endpoint_keys_run_out_with_an_error_not_a_wrapped_counter() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let a = log.endpoint_key("a").unwrap();
        let end = u32::MAX.to_be_bytes();
        log.tree.insert(keys::META_NEXT_ENDPOINT, &end[..]).unwrap();
        let err = log.endpoint_key("b").unwrap_err();
        assert!(matches!(err, LogError::Storage(_)), "{err}");
        assert_eq!(log.endpoint_key("a").unwrap(), a, "a key given stays");
        let counter = log.tree.get(keys::META_NEXT_ENDPOINT).unwrap().unwrap();
        assert_eq!(&counter[..], &end[..], "the counter is left as it was");
        assert!(log.tree.get(keys::prefixed(ENDPOINT_KEY, b"b")).unwrap().is_none());
    }
}
