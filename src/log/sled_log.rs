//! sled 0.34 behind [`ClickLog`]. One writer thread, fed by a crossbeam channel, owns
//! every write: it drains whatever is queued, applies it in order, flushes once (group
//! commit) and only then answers the waiting tickets, so nothing is acknowledged before
//! it is durable. Within a group, writes are ordered so that a crash keeping only a
//! prefix of them leaves nothing that hides or breaks acknowledged data. Readers go to
//! sled directly. It must not be called for writes from anywhere but through the channel.

use super::keys::{self, CLIENT_ID, DEAD, ENDPOINT_KEY, EVENT, PENDING, SETTING};
use super::{AppendOutcome, ClickLog, DeadLetter, EndpointKey, LogError, NewEvent, Pending, Seq, StoredEvent, Ticket};
use crate::config::FsyncMode;
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

type Reply<T> = oneshot::Sender<Result<T, LogError>>;

enum WriteOp {
    Append(Vec<NewEvent>, Reply<Vec<AppendOutcome>>),
    /// Raw key writes, answered (if `reply` is set) once applied, and once flushed when
    /// `durable`.
    Apply {
        writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        reply: Option<Reply<()>>,
        durable: bool,
    },
    Close(Reply<()>),
}

impl WriteOp {
    /// Delivery progress: writes nobody waits for and that need no flush of their own.
    fn is_progress(&self) -> bool {
        matches!(
            self,
            WriteOp::Apply {
                reply: None,
                durable: false,
                ..
            }
        )
    }
}

/// The sled-backed click log.
pub struct SledLog {
    db: sled::Db,
    tree: sled::Tree,
    tx: Sender<WriteOp>,
    writer: Mutex<Option<JoinHandle<()>>>,
    events: Arc<AtomicU64>,
    endpoint_keys: Mutex<()>,
}

#[derive(Debug, Clone, Copy)]
pub struct SledOptions {
    pub fsync: FsyncMode,
    pub fsync_interval: Duration,
    pub cache_capacity: u64,
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
        let next_seq = recover_next_seq(&tree)?;
        // sled recovers a damaged segment as the end of the log; the marker written beside
        // it says how far the log really went, so a short recovery stops the start.
        let marker = read_marker(path)?;
        if next_seq < marker {
            return Err(LogError::Corrupt(format!(
                "{}: the log recovered only up to event {} but events up to {} were stored: its files are \
                 damaged. Nothing was changed; restore the directory from a backup, or move it aside to start \
                 with an empty log",
                path.display(),
                next_seq.saturating_sub(1),
                marker.saturating_sub(1)
            )));
        }
        let count = tree.scan_prefix([EVENT]).keys().count() as u64;
        let events = Arc::new(AtomicU64::new(count));
        let (tx, rx) = crossbeam_channel::unbounded();
        let writer = Writer {
            db: db.clone(),
            tree: tree.clone(),
            rx,
            next_seq,
            options,
            events: events.clone(),
            dir: path.to_path_buf(),
            marker_written: marker,
            last_marker: Instant::now(),
        };
        let handle = std::thread::Builder::new()
            .name("clickhook-log-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| LogError::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok(Arc::new(SledLog {
            db,
            tree,
            tx,
            writer: Mutex::new(Some(handle)),
            events,
            endpoint_keys: Mutex::new(()),
        }))
    }

    /// Bytes sled reports on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn send(&self, op: WriteOp) {
        // A send fails only after close; the op's reply sender is dropped with it, and the
        // waiting ticket then reports the log closed.
        let _ = self.tx.send(op);
    }

    fn apply(&self, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>, durable: bool) -> Ticket<()> {
        let (reply, ticket) = oneshot::channel();
        self.send(WriteOp::Apply {
            writes,
            reply: Some(reply),
            durable,
        });
        ticket
    }
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

fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // Secrets live in the log: keep the directory and its files private to the daemon's user.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            let mode = if entry.path().is_dir() { 0o700 } else { 0o600 };
            let _ = std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode));
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

fn recover_next_seq(tree: &sled::Tree) -> Result<Seq, LogError> {
    let stored = tree
        .get(keys::META_NEXT_SEQ)?
        .map(|v| keys::u64_at(&v, 0))
        .transpose()?
        .unwrap_or(1);
    let last_event = match tree.scan_prefix([EVENT]).keys().next_back() {
        Some(k) => keys::u64_at(&k?, 1)? + 1,
        None => 1,
    };
    Ok(stored.max(last_event))
}

struct Writer {
    db: sled::Db,
    tree: sled::Tree,
    rx: Receiver<WriteOp>,
    next_seq: Seq,
    options: SledOptions,
    events: Arc<AtomicU64>,
    dir: std::path::PathBuf,
    /// The next seq the marker file records, and when it was last written.
    marker_written: Seq,
    last_marker: Instant,
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
        // Delivery progress held back for up to DEFER_PROGRESS, in arrival order, and when
        // the first of it arrived.
        let mut deferred: Vec<WriteOp> = Vec::new();
        let mut deferred_since: Option<Instant> = None;
        loop {
            let deadline = [
                dirty.then(|| last_flush + lazy_interval),
                deferred_since.map(|since| since + DEFER_PROGRESS),
            ]
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
                let since = *deferred_since.get_or_insert_with(Instant::now);
                if since.elapsed() < DEFER_PROGRESS {
                    deferred = ops;
                    continue;
                }
            }
            deferred_since = None;
            let closing = ops.iter().any(|op| matches!(op, WriteOp::Close(_)));
            let applied_any = !ops.is_empty();
            let (waiting, needs_flush) = self.commit(ops);
            dirty |= applied_any;
            let flush_now = closing
                || (self.options.fsync == FsyncMode::Always && needs_flush)
                || (dirty && last_flush.elapsed() >= lazy_interval);
            let result = if flush_now {
                last_flush = Instant::now();
                dirty = false;
                let flushed = self.db.flush().map(|_| ()).map_err(LogError::from);
                if flushed.is_ok() {
                    self.update_marker(closing);
                }
                flushed
            } else {
                Ok(())
            };
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
                return;
            }
        }
        // Every sender is gone: apply what was held back before the last flush.
        if !deferred.is_empty() {
            let _ = self.commit(deferred);
        }
        let _ = self.db.flush();
    }

    /// Records the flushed position in the marker file, at most every [`LAZY_FLUSH`] (and
    /// on close): it only has to lag behind what sled holds, never run ahead of it.
    fn update_marker(&mut self, closing: bool) {
        if self.next_seq == self.marker_written || (!closing && self.last_marker.elapsed() < LAZY_FLUSH) {
            return;
        }
        match write_marker(&self.dir, self.next_seq) {
            Ok(()) => {
                self.marker_written = self.next_seq;
                self.last_marker = Instant::now();
            }
            Err(e) => tracing::warn!(error = %e, "cannot update the log's position marker"),
        }
    }

    /// Applies one group of operations, in order. Returns the replies to send once
    /// durable, and whether anything in the group asked for durability.
    fn commit(&mut self, ops: Vec<WriteOp>) -> (Vec<Waiting>, bool) {
        let mut batch = OrderedWrites::default();
        let mut waiting = Vec::with_capacity(ops.len());
        let mut needs_flush = false;
        let mut appended = 0u64;
        let mut removed_events = 0u64;
        // Client ids seen earlier in this same batch (sled does not see them yet).
        let mut batch_ids: HashMap<String, ()> = HashMap::new();
        let seq_before = self.next_seq;
        let mut failed: Option<LogError> = None;
        for op in ops {
            match op {
                WriteOp::Append(events, reply) => {
                    needs_flush = true;
                    let now = super::now_ms();
                    let mut outcomes = Vec::with_capacity(events.len());
                    for ev in events {
                        if ev.client_id {
                            let key = keys::prefixed(CLIENT_ID, ev.id.as_bytes());
                            let known = match self.tree.contains_key(&key) {
                                Ok(k) => k,
                                Err(e) => {
                                    failed = Some(e.into());
                                    false
                                }
                            };
                            if known || batch_ids.contains_key(&ev.id) {
                                outcomes.push(AppendOutcome::Duplicate);
                                continue;
                            }
                            batch_ids.insert(ev.id.clone(), ());
                        }
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        // The event and its queue entries first, the client id last: a crash
                        // that keeps only part of an (unacknowledged) group can leave an
                        // event nobody delivers, but never a client id that would make the
                        // client's retry a duplicate of an event that is not there.
                        batch.insert(&keys::event(seq)[..], keys::event_record(now, &ev.data));
                        let fresh = keys::pending_value(&Pending::fresh(seq));
                        for ep in &ev.endpoints {
                            batch.insert(&keys::queue(PENDING, *ep, seq)[..], &fresh[..]);
                        }
                        if ev.client_id {
                            let mut v = seq.to_be_bytes().to_vec();
                            v.extend_from_slice(&now.to_be_bytes());
                            batch.insert(keys::prefixed(CLIENT_ID, ev.id.as_bytes()), v);
                            batch.insert(&keys::client_id_expiry(now, seq)[..], ev.id.as_bytes());
                        }
                        appended += 1;
                        outcomes.push(AppendOutcome::Stored(seq));
                    }
                    waiting.push(Waiting::Append(reply, outcomes));
                }
                WriteOp::Apply { writes, reply, durable } => {
                    needs_flush |= durable;
                    for (k, v) in writes {
                        if k.first() == Some(&EVENT) {
                            match &v {
                                None => removed_events += 1,
                                Some(_) => appended += 1,
                            }
                        }
                        match v {
                            Some(v) => batch.insert(k, v),
                            None => batch.remove(k),
                        }
                    }
                    if let Some(reply) = reply {
                        waiting.push(Waiting::Apply(reply));
                    }
                }
                WriteOp::Close(reply) => waiting.push(Waiting::Close(reply)),
            }
        }
        if self.next_seq != seq_before {
            batch.insert(keys::META_NEXT_SEQ, &self.next_seq.to_be_bytes()[..]);
        }
        let result = match failed {
            Some(e) => Err(e),
            None => batch.apply(&self.tree),
        };
        match result {
            Ok(()) => {
                self.events.fetch_add(appended, Ordering::Relaxed);
                self.events.fetch_sub(
                    removed_events.min(self.events.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                (waiting, needs_flush)
            }
            Err(e) => {
                // Part of the group may be stored: its seqs are not given back (a later
                // event must not land on a stored one), and every waiter fails.
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
                (Vec::new(), false)
            }
        }
    }
}

/// One group's writes, applied in order as single-key operations. Not a `sled::Batch`:
/// sled 0.34 takes an exclusive lock over the whole tree for a batch, stalling every
/// delivery thread's reads while it lasts, and seals and writes its log buffer after each
/// one. Durability comes from the flush that follows the group, atomicity where it
/// matters from the order of the writes.
#[derive(Default)]
struct OrderedWrites(Vec<(sled::IVec, Option<sled::IVec>)>);

impl OrderedWrites {
    fn insert(&mut self, key: impl Into<sled::IVec>, value: impl Into<sled::IVec>) {
        self.0.push((key.into(), Some(value.into())));
    }

    fn remove(&mut self, key: impl Into<sled::IVec>) {
        self.0.push((key.into(), None));
    }

    fn apply(self, tree: &sled::Tree) -> Result<(), LogError> {
        for (key, value) in self.0 {
            match value {
                Some(value) => tree.insert(key, value)?,
                None => tree.remove(key)?,
            };
        }
        Ok(())
    }
}

impl ClickLog for SledLog {
    fn append(&self, events: Vec<NewEvent>) -> Ticket<Vec<AppendOutcome>> {
        let (reply, ticket) = oneshot::channel();
        self.send(WriteOp::Append(events, reply));
        ticket
    }

    fn event(&self, seq: Seq) -> Result<Option<StoredEvent>, LogError> {
        let Some(rec) = self.tree.get(keys::event(seq))? else {
            return Ok(None);
        };
        let accepted_ms = keys::u64_at(&rec, 0)?;
        Ok(Some(StoredEvent {
            seq,
            accepted_ms,
            data: Bytes::copy_from_slice(&rec[8..]),
        }))
    }

    fn pending_after(&self, endpoint: EndpointKey, after: Option<Seq>, limit: usize) -> Result<Vec<Pending>, LogError> {
        let start = match after {
            Some(s) if s == Seq::MAX => return Ok(Vec::new()),
            Some(s) => keys::queue(PENDING, endpoint, s + 1),
            None => keys::queue(PENDING, endpoint, 0),
        };
        let end = keys::queue_prefix(PENDING, endpoint + 1);
        let range = if endpoint == EndpointKey::MAX {
            self.tree.range(start.to_vec()..vec![PENDING + 1])
        } else {
            self.tree.range(start.to_vec()..end.to_vec())
        };
        range
            .take(limit)
            .map(|kv| {
                kv.map_err(LogError::from)
                    .and_then(|(k, v)| keys::decode_pending(&k, &v))
            })
            .collect()
    }

    fn count_pending(&self, endpoint: EndpointKey) -> Result<u64, LogError> {
        Ok(self
            .tree
            .scan_prefix(keys::queue_prefix(PENDING, endpoint))
            .keys()
            .count() as u64)
    }

    fn delivered(&self, endpoint: EndpointKey, seqs: &[Seq]) {
        let writes = seqs
            .iter()
            .map(|s| (keys::queue(PENDING, endpoint, *s).to_vec(), None))
            .collect();
        self.send(WriteOp::Apply {
            writes,
            reply: None,
            durable: false,
        });
    }

    fn reschedule(&self, endpoint: EndpointKey, entries: &[Pending]) {
        let writes = entries
            .iter()
            .map(|p| {
                (
                    keys::queue(PENDING, endpoint, p.seq).to_vec(),
                    Some(keys::pending_value(p).to_vec()),
                )
            })
            .collect();
        self.send(WriteOp::Apply {
            writes,
            reply: None,
            durable: false,
        });
    }

    fn bury(&self, endpoint: EndpointKey, letters: Vec<DeadLetter>) {
        let mut writes = Vec::with_capacity(letters.len() * 2);
        for letter in letters {
            let record = match self.tree.get(keys::event(letter.seq)) {
                Ok(Some(r)) => r.to_vec(),
                _ => keys::event_record(letter.accepted_ms, b"null"),
            };
            match keys::dead_value(&letter, &record) {
                Ok(v) => {
                    writes.push((keys::queue(DEAD, endpoint, letter.seq).to_vec(), Some(v)));
                    writes.push((keys::queue(PENDING, endpoint, letter.seq).to_vec(), None));
                }
                Err(e) => {
                    tracing::error!(error = %e, seq = letter.seq, "cannot encode a dead letter; it stays pending")
                }
            }
        }
        // Dead letters are few and what an operator looks at next: applied (and flushed)
        // at once rather than held back with delivery progress.
        self.send(WriteOp::Apply {
            writes,
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
        Ok(self.tree.scan_prefix(keys::queue_prefix(DEAD, endpoint)).keys().count() as u64)
    }

    fn revive_dead(&self, endpoint: EndpointKey) -> Ticket<usize> {
        let (reply, ticket) = oneshot::channel();
        let mut writes = Vec::new();
        let mut n = 0;
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
            // The event may have been pruned meanwhile: restore it from the copy.
            if !self.tree.contains_key(keys::event(letter.seq)).unwrap_or(false) {
                writes.push((keys::event(letter.seq).to_vec(), Some(record.to_vec())));
            }
            writes.push((
                keys::queue(PENDING, endpoint, letter.seq).to_vec(),
                Some(fresh_value(letter.seq)),
            ));
            writes.push((k.to_vec(), None));
            n += 1;
        }
        forward(self.apply(writes, true), reply, n);
        ticket
    }

    fn replay_window(&self, endpoint: EndpointKey, since_ms: u64, until_ms: u64) -> Ticket<usize> {
        let (reply, ticket) = oneshot::channel();
        let mut writes = Vec::new();
        for kv in self.tree.scan_prefix([EVENT]) {
            let (k, v) = match kv {
                Ok(kv) => kv,
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                    return ticket;
                }
            };
            let (Ok(seq), Ok(accepted)) = (keys::u64_at(&k, 1), keys::u64_at(&v, 0)) else {
                continue;
            };
            if accepted >= since_ms && accepted < until_ms {
                writes.push((keys::queue(PENDING, endpoint, seq).to_vec(), Some(fresh_value(seq))));
            }
        }
        let n = writes.len();
        forward(self.apply(writes, true), reply, n);
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
        let mut batch = sled::Batch::default();
        batch.insert(key, &next.to_be_bytes()[..]);
        batch.insert(keys::META_NEXT_ENDPOINT, &(next + 1).to_be_bytes()[..]);
        // No flush of its own: the mapping only matters once queue entries use the key, and
        // those are written (and flushed) after it, which persists it too.
        self.tree.apply_batch(batch)?;
        Ok(next)
    }

    fn forget_endpoint(&self, endpoint: EndpointKey) -> Ticket<()> {
        let mut writes = Vec::new();
        for prefix in [PENDING, DEAD] {
            for k in self
                .tree
                .scan_prefix(keys::queue_prefix(prefix, endpoint))
                .keys()
                .flatten()
            {
                writes.push((k.to_vec(), None));
            }
        }
        self.apply(writes, true)
    }

    fn get_setting(&self, name: &str) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self
            .tree
            .get(keys::prefixed(SETTING, name.as_bytes()))?
            .map(|v| v.to_vec()))
    }

    fn put_setting(&self, name: &str, value: Option<Vec<u8>>) -> Ticket<()> {
        self.apply(vec![(keys::prefixed(SETTING, name.as_bytes()), value)], true)
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
        // Nothing at or after the oldest pending entry of any endpoint may go: it is still
        // to be delivered. Dead letters carry their own copy and do not hold events back.
        let mut low_water = Seq::MAX;
        let mut endpoint_firsts = Vec::new();
        for k in self.tree.scan_prefix([ENDPOINT_KEY]).values().flatten() {
            if let Ok(b) = <[u8; 4]>::try_from(k.as_ref()) {
                endpoint_firsts.push(u32::from_be_bytes(b));
            }
        }
        for ep in endpoint_firsts {
            if let Some(Ok((k, _))) = self.tree.scan_prefix(keys::queue_prefix(PENDING, ep)).next() {
                if let Ok(seq) = keys::seq_of_queue_key(&k) {
                    low_water = low_water.min(seq);
                }
            }
        }
        let mut writes = Vec::new();
        let mut pruned = 0u64;
        for kv in self.tree.scan_prefix([EVENT]) {
            let Ok((k, v)) = kv else { break };
            let (Ok(seq), Ok(accepted)) = (keys::u64_at(&k, 1), keys::u64_at(&v, 0)) else {
                continue;
            };
            if seq >= low_water || accepted >= cutoff {
                break;
            }
            writes.push((k.to_vec(), None));
            pruned += 1;
        }
        for kv in self.tree.scan_prefix([keys::CLIENT_ID_EXPIRY]) {
            let Ok((k, id)) = kv else { break };
            let Ok(accepted) = keys::u64_at(&k, 1) else { continue };
            if accepted >= cutoff {
                break;
            }
            writes.push((keys::prefixed(CLIENT_ID, &id), None));
            writes.push((k.to_vec(), None));
        }
        forward(self.apply(writes, false), reply, pruned);
        ticket
    }

    fn event_count(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    fn close(&self) -> Ticket<()> {
        let (reply, ticket) = oneshot::channel();
        self.send(WriteOp::Close(reply));
        ticket
    }
}

fn fresh_value(seq: Seq) -> Vec<u8> {
    keys::pending_value(&Pending::fresh(seq)).to_vec()
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
        let options = SledOptions {
            fsync: FsyncMode::Always,
            fsync_interval: Duration::from_millis(50),
            cache_capacity: 1 << 20,
        };
        SledLog::open(dir, options).unwrap()
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
        log.append(vec![
            event("a", true, vec![]),
            event("b", false, vec![k]),
            event("c", false, vec![]),
        ])
        .await
        .unwrap()
        .unwrap();
        let later = super::super::now_ms() + 10_000;
        // Only "a" is older than the pending "b"; "c" is newer and stays too.
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
    async fn held_back_delivery_progress_is_applied_without_a_later_write() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let k = log.endpoint_key("ep").unwrap();
        log.append(vec![event("a", false, vec![k]), event("b", false, vec![k])])
            .await
            .unwrap()
            .unwrap();
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
}
