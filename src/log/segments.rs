//! The segment files that hold event batches' bytes, beside sled. The log's writer appends
//! batches to the newest segment and keeps a [`BatchPointer`] to each in sled; readers
//! `pread` a batch through its pointer, so bodies sit in the kernel's page cache rather
//! than in sled's, which cannot be kept small (see BENCHMARKS.md). A segment is deleted
//! once no pointer names it. This file owns the files only: it must not touch sled, and
//! decides nothing about which batches live.
//!
//! Durability follows sled's: [`SegmentWriter::sync`] runs before every sled flush, so a
//! flushed pointer never names bytes that a power cut can take back. Bytes written past
//! the last flushed pointer (a crash mid-group) are never named and are left in place:
//! every open starts a new segment, so nothing is ever written over.

use super::keys::{BatchPointer, BatchView};
use super::LogError;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The directory inside the log's directory that holds the segments.
pub const SEGMENT_DIR: &str = "events";
/// The size past which the writer starts a new segment. Disk comes back a whole segment
/// at a time, so smaller frees it sooner; larger means fewer files.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// The open segments, shared by the writer and every reader.
pub struct SegmentFiles {
    dir: PathBuf,
    files: RwLock<HashMap<u64, Arc<File>>>,
}

impl SegmentFiles {
    /// The batch value a pointer names, checked against its CRC; `None` when its segment
    /// is not open. Every segment a pointer names at open is open, and one is closed only
    /// after the last pointer naming it has left sled, so the caller tells a pointer
    /// removed meanwhile (a prune) from damage by looking it up again.
    pub fn read(&self, at: &BatchPointer) -> Result<Option<Vec<u8>>, LogError> {
        let Some(file) = self.files.read().map_err(table_poisoned)?.get(&at.segment).cloned() else {
            return Ok(None);
        };
        let mut bytes = vec![0u8; at.len as usize];
        file.read_exact_at(&mut bytes, at.offset).map_err(|e| {
            let what = format!(
                "{}: cannot read {} bytes at {}: {e}",
                self.path(at.segment).display(),
                at.len,
                at.offset
            );
            // A pointer past the file's end is damage; any other failure is the disk's.
            match e.kind() {
                std::io::ErrorKind::UnexpectedEof => LogError::Corrupt(what),
                _ => LogError::Storage(what),
            }
        })?;
        if crc32fast::hash(&bytes) != at.crc {
            return Err(LogError::Corrupt(format!(
                "{}: the event batch at {} does not match its checksum",
                self.path(at.segment).display(),
                at.offset
            )));
        }
        Ok(Some(bytes))
    }

    /// The error for a pointer that still names a segment that is not open.
    pub fn missing(&self, at: &BatchPointer) -> LogError {
        LogError::Corrupt(format!(
            "an event batch lies in segment {}, which is missing from {}",
            self.path(at.segment).display(),
            self.dir.display()
        ))
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:016x}.seg"))
    }

    fn insert(&self, segment: u64, file: Arc<File>) -> Result<(), LogError> {
        self.files.write().map_err(table_poisoned)?.insert(segment, file);
        Ok(())
    }

    fn remove(&self, segment: u64) -> Result<(), LogError> {
        self.files.write().map_err(table_poisoned)?.remove(&segment);
        Ok(())
    }
}

/// The writer's side: the segment being appended to, and how many live batches each
/// segment holds.
pub struct SegmentWriter {
    files: Arc<SegmentFiles>,
    segment_bytes: u64,
    current: u64,
    file: Arc<File>,
    len: u64,
    /// Segments written since the last [`sync`](Self::sync) (the current one and any it
    /// replaced), and whether the directory gained a file.
    unsynced: Vec<Arc<File>>,
    dir_unsynced: bool,
    live: BTreeMap<u64, u64>,
    /// Segments with no live batch left, deleted after the next sled flush: until then
    /// a crash could bring back the pointers that name them.
    doomed: Vec<u64>,
}

impl SegmentWriter {
    /// Opens the segments under `log_dir`. `live` counts the batches that sled's pointers
    /// name in each segment; a segment named by none (left by a crash, or emptied by a
    /// prune just before one) is deleted. Writing goes to a new segment.
    pub fn open(
        log_dir: &Path,
        live: BTreeMap<u64, u64>,
        segment_bytes: u64,
    ) -> Result<(Arc<SegmentFiles>, SegmentWriter), LogError> {
        let dir = log_dir.join(SEGMENT_DIR);
        let storage = |e: std::io::Error, what: &Path| LogError::Storage(format!("{}: {e}", what.display()));
        std::fs::create_dir_all(&dir).map_err(|e| storage(e, &dir))?;
        let files = Arc::new(SegmentFiles {
            dir: dir.clone(),
            files: RwLock::new(HashMap::new()),
        });
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| storage(e, &dir))? {
            let entry = entry.map_err(|e| storage(e, &dir))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            found.push(id);
        }
        for &id in live.keys() {
            if !found.contains(&id) {
                return Err(LogError::Corrupt(format!(
                    "{}: the log names event segment {id:016x}.seg, which is not there. Nothing was changed; \
                     restore the directory from a backup, or move it aside to start with an empty log",
                    dir.display()
                )));
            }
        }
        for &id in &found {
            let path = files.path(id);
            if live.contains_key(&id) {
                let file = File::open(&path).map_err(|e| storage(e, &path))?;
                files.insert(id, Arc::new(file))?;
            } else {
                std::fs::remove_file(&path).map_err(|e| storage(e, &path))?;
            }
        }
        let current = found.iter().max().map_or(1, |id| id + 1);
        let file = create_segment(&files.path(current))?;
        files.insert(current, file.clone())?;
        Ok((
            files.clone(),
            SegmentWriter {
                files,
                segment_bytes,
                current,
                file,
                len: 0,
                unsynced: Vec::new(),
                dir_unsynced: true,
                live,
                doomed: Vec::new(),
            },
        ))
    }

    /// Appends batch values ([`super::keys::batch_value`]) one after another and returns where
    /// each went, in order, with the accepted_ms and count read from its header. They land
    /// in one segment, a new one when the current is full. On an error nothing is named:
    /// the next write goes over the failed one's bytes.
    pub fn append<B: AsRef<[u8]>>(&mut self, batches: &[B]) -> Result<Vec<BatchPointer>, LogError> {
        let total: u64 = batches.iter().map(|v| v.as_ref().len() as u64).sum();
        if self.len > 0 && self.len + total > self.segment_bytes {
            self.rotate()?;
        }
        let mut bytes = Vec::with_capacity(total as usize);
        let mut pointers = Vec::with_capacity(batches.len());
        for value in batches {
            let value = value.as_ref();
            let view = BatchView::decode(value)?;
            pointers.push(BatchPointer {
                segment: self.current,
                offset: self.len + bytes.len() as u64,
                len: value.len() as u32,
                crc: crc32fast::hash(value),
                accepted_ms: view.accepted_ms,
                count: view.len() as u32,
            });
            bytes.extend_from_slice(value);
        }
        self.file
            .write_all_at(&bytes, self.len)
            .map_err(|e| LogError::Storage(format!("{}: {e}", self.files.path(self.current).display())))?;
        self.len += total;
        if !self.unsynced.iter().any(|f| Arc::ptr_eq(f, &self.file)) {
            self.unsynced.push(self.file.clone());
        }
        *self.live.entry(self.current).or_insert(0) += batches.len() as u64;
        Ok(pointers)
    }

    fn rotate(&mut self) -> Result<(), LogError> {
        let next = self.current + 1;
        let file = create_segment(&self.files.path(next))?;
        self.files.insert(next, file.clone())?;
        let old = self.current;
        self.current = next;
        self.file = file;
        self.len = 0;
        self.dir_unsynced = true;
        if self.live.get(&old).copied().unwrap_or(0) == 0 {
            self.doomed.push(old);
        }
        Ok(())
    }

    /// A pointer to a batch in `segment` was removed from sled.
    pub fn release(&mut self, segment: u64) {
        if let Some(n) = self.live.get_mut(&segment) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.live.remove(&segment);
                if segment != self.current {
                    self.doomed.push(segment);
                }
            }
        }
    }

    /// Makes every segment byte written so far durable; call before flushing sled. A
    /// file whose sync fails stays listed, so the next flush tries it again.
    pub fn sync(&mut self) -> Result<(), LogError> {
        while let Some(file) = self.unsynced.last() {
            file.sync_data()
                .map_err(|e| LogError::Storage(format!("{}: {e}", self.files.dir.display())))?;
            self.unsynced.pop();
        }
        if self.dir_unsynced {
            File::open(&self.files.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| LogError::Storage(format!("{}: {e}", self.files.dir.display())))?;
            self.dir_unsynced = false;
        }
        Ok(())
    }

    /// Deletes the segments no pointer names any more; call after a sled flush.
    pub fn delete_unnamed(&mut self) {
        for segment in self.doomed.drain(..) {
            let path = self.files.path(segment);
            // A reader holding the file still reads it; the pointer that led it there is
            // gone, so it finds nothing to deliver either way.
            let removed = self.files.remove(segment);
            if let Err(e) = removed.and_then(|_| {
                std::fs::remove_file(&path).map_err(|e| LogError::Storage(format!("{}: {e}", path.display())))
            }) {
                tracing::warn!(error = %e, "cannot delete an emptied event segment; it is retried at the next open");
            }
        }
    }

    /// The segments open, in order.
    #[cfg(test)]
    pub fn segments(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .files
            .files
            .read()
            .map(|f| f.keys().copied().collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }
}

/// A reader or the writer panicked while holding the segment table.
fn table_poisoned<T>(_: T) -> LogError {
    LogError::Storage("segment table lock poisoned".into())
}

fn create_segment(path: &Path) -> Result<Arc<File>, LogError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(Arc::new)
        .map_err(|e| LogError::Storage(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::super::keys;
    use super::*;

    /// A batch of one event of `len` bytes `n`, accepted at 1,000 + `n`.
    fn batch(n: u8, len: usize) -> Vec<u8> {
        keys::batch_value(1_000 + n as u64, [&vec![n; len][..]].into_iter())
    }

    #[test]
    fn batches_read_back_through_their_pointers_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (files, mut writer) = SegmentWriter::open(dir.path(), BTreeMap::new(), 100).unwrap();
        let first = writer.append(&[batch(1, 40), batch(2, 40)]).unwrap();
        // Two 56-byte batches in; 56 more would pass 100, so the next append starts segment 2.
        let second = writer.append(&[batch(3, 40)]).unwrap();
        assert_eq!((first[0].segment, first[1].offset), (1, 56));
        assert_eq!((second[0].segment, second[0].offset), (2, 0));
        assert_eq!(
            (first[1].accepted_ms, first[1].count),
            (1_002, 1),
            "read from the header"
        );
        writer.sync().unwrap();
        for (p, n) in first.iter().chain(&second).zip([1u8, 2, 3]) {
            assert_eq!(files.read(p).unwrap(), Some(batch(n, 40)));
        }
        assert_eq!(writer.segments(), vec![1, 2]);
    }

    #[test]
    fn a_damaged_or_missing_batch_is_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let (files, mut writer) = SegmentWriter::open(dir.path(), BTreeMap::new(), 1 << 20).unwrap();
        let p = writer.append(&[batch(7, 64)]).unwrap()[0];
        let path = dir.path().join(SEGMENT_DIR).join(format!("{:016x}.seg", p.segment));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"x", 10).unwrap();
        assert!(matches!(files.read(&p), Err(LogError::Corrupt(_))));
        let past_end = BatchPointer { offset: 1_000, ..p };
        assert!(matches!(files.read(&past_end), Err(LogError::Corrupt(_))));
        let elsewhere = BatchPointer { segment: 9, ..p };
        assert_eq!(
            files.read(&elsewhere).unwrap(),
            None,
            "a segment that is not open is told apart"
        );
    }

    #[test]
    fn a_segment_goes_once_no_pointer_names_it_and_sled_has_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let (_files, mut writer) = SegmentWriter::open(dir.path(), BTreeMap::new(), 50).unwrap();
        let a = writer.append(&[batch(1, 40)]).unwrap()[0];
        let b = writer.append(&[batch(2, 40)]).unwrap()[0];
        assert_eq!((a.segment, b.segment), (1, 2));
        writer.release(a.segment);
        assert_eq!(writer.segments(), vec![1, 2], "kept until sled has flushed the removal");
        writer.delete_unnamed();
        assert_eq!(writer.segments(), vec![2]);
        assert!(!dir.path().join(SEGMENT_DIR).join("0000000000000001.seg").exists());
        // The segment being written stays even when empty.
        writer.release(b.segment);
        writer.delete_unnamed();
        assert_eq!(writer.segments(), vec![2]);
    }

    #[test]
    fn opening_deletes_segments_nothing_names_and_refuses_a_named_one_that_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let named = {
            let (_files, mut writer) = SegmentWriter::open(dir.path(), BTreeMap::new(), 50).unwrap();
            let named = writer.append(&[batch(1, 40)]).unwrap()[0];
            writer.append(&[batch(2, 40)]).unwrap();
            writer.sync().unwrap();
            named
        };
        let (files, writer) = SegmentWriter::open(dir.path(), BTreeMap::from([(1, 1)]), 50).unwrap();
        // Segment 2 was named by nothing; writing goes on in a new segment 3.
        assert_eq!(writer.segments(), vec![1, 3]);
        assert_eq!(files.read(&named).unwrap(), Some(batch(1, 40)));
        drop((files, writer));
        let err = SegmentWriter::open(dir.path(), BTreeMap::from([(2, 1)]), 50)
            .err()
            .unwrap();
        assert!(err.to_string().contains("0000000000000002.seg"), "{err}");
    }
}
