//! The byte layout of the sled log. Everything lives in one tree, with a one-byte prefix
//! per kind of record. Keys are big-endian so that sled's order is seq order. This file
//! must not do I/O.
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `b` | first seq | where a batch of events lies in a segment file, with its accepted_ms and count; or (before segment files) the batch itself |
//! | `q` | endpoint, first seq | a run of queue entries: (seq, attempts, due_ms, batch) each |
//! | `r` | first seq | a route record: the endpoints an append set's events were queued for, as (endpoint, count, seq offsets) |
//! | `d` | endpoint, seq | dead-letter JSON length, JSON, event record |
//! | `i` | client id | seq, accepted_ms |
//! | `j` | accepted_ms, seq | client id (expiry index of `i`) |
//! | `k` | endpoint id | endpoint key |
//! | `s` | setting name | setting bytes |
//! | `m` | name | counters (next seq, next endpoint key) |
//! | `p` | endpoint, seq | attempts, due_ms, batch (one entry per key: the layout before runs, read only to migrate it) |
//! | `e` | seq | accepted_ms, event JSON (one event per key: the layout before batches, read only to migrate it) |
//!
//! Events are stored in batches: an append's events go into one, with those of the
//! appends queued right behind it when they are small (single clicks), split past
//! [`BATCH_MAX_EVENTS`] or [`BATCH_MAX_BYTES`]; a revived event or one migrated from the
//! old layout is a batch of its own. The batch at key `k` holds seqs `k .. k + count`, so
//! the batch that may hold a seq is the one with the greatest key at or below it. sled's
//! cost is per key, not per byte, so a hundred clicks cost one insert instead of a hundred.
//! A batch's bytes go to a segment file of the log's own and sled keeps a
//! [`BatchPointer`] to them: sled's page cache then holds small pointers, not the event
//! bodies a draining backlog reads once. Batches stored inside sled, as before segment
//! files, are still read; a pointer's first byte ([`POINTER_TAG`]) tells them apart.
//!
//! An endpoint's queue is a sequence of runs. The run at key `k` holds entries with seqs in
//! `[k, next run's key)`, sorted, so the run that may hold a seq is the one with the
//! greatest key at or below it. Entries queued together (a set of appends past the
//! route records' bound, below) go into one run per endpoint (a run past twice `RUN_MAX`
//! entries is split), and delivery progress rewrites a run once for many entries,
//! instead of one sled write per entry.
//!
//! A fresh append writes no runs at first: one route record names, per endpoint, the
//! seqs of the set queued for it, and the log keeps those entries in memory
//! (`super::fresh`). The record goes once every entry in it is delivered or has moved
//! to its endpoint's runs (on a retry, a dead letter, a replay, or at close); at open,
//! the entries of the records left are moved to runs.

use super::{DeadLetter, EndpointKey, LogError, Pending, Seq};

pub const EVENT_BATCH: u8 = b'b';
/// Single events as stored before batches; migrated to batches at open.
pub const LEGACY_EVENT: u8 = b'e';
/// Events per batch at most.
pub const BATCH_MAX_EVENTS: usize = 256;
/// Event bytes per batch at most. With 48 KiB batches the 1,000,000-click backlog run
/// peaked at 1,015 MiB RSS (sled holds whole leaves of 16 values); with 8 KiB it peaked
/// at 159 MiB and still cut sled inserts per event about tenfold.
pub const BATCH_MAX_BYTES: usize = 8 * 1024;
pub const QUEUE_RUN: u8 = b'q';
pub const ROUTES: u8 = b'r';
/// Single queue entries as stored before runs; migrated to runs at open.
pub const LEGACY_PENDING: u8 = b'p';
pub const DEAD: u8 = b'd';
pub const CLIENT_ID: u8 = b'i';
pub const CLIENT_ID_EXPIRY: u8 = b'j';
pub const ENDPOINT_KEY: u8 = b'k';
pub const SETTING: u8 = b's';
pub const META_NEXT_SEQ: &[u8] = b"mseq";
pub const META_NEXT_ENDPOINT: &[u8] = b"mendpoint";
/// Written only after a failed write, to ask sled whether it still takes writes.
pub const META_WRITE_PROBE: &[u8] = b"mprobe";

#[cfg(test)]
pub fn legacy_event(seq: Seq) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LEGACY_EVENT;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn event_batch(first: Seq) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = EVENT_BATCH;
    k[1..].copy_from_slice(&first.to_be_bytes());
    k
}

/// A batch value: accepted_ms, count, then each event's end offset (u32, from the start
/// of the event bytes), then the event bytes one after another.
pub fn batch_value<'a>(accepted_ms: u64, events: impl ExactSizeIterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let count = events.len();
    let bytes: usize = events.clone().map(<[u8]>::len).sum();
    let mut v = Vec::with_capacity(12 + 4 * count + bytes);
    v.extend_from_slice(&accepted_ms.to_be_bytes());
    v.extend_from_slice(&(count as u32).to_be_bytes());
    let mut end = 0u32;
    for e in events.clone() {
        end += e.len() as u32;
        v.extend_from_slice(&end.to_be_bytes());
    }
    for e in events {
        v.extend_from_slice(e);
    }
    v
}

/// The first byte of a [`BatchPointer`]'s value. A batch stored inside sled starts with
/// its accepted_ms, whose first byte stays 0 until 2^56 ms (over two million years) after
/// 1970.
pub const POINTER_TAG: u8 = 0xff;
const POINTER_LEN: usize = 37;

/// Where a batch value lies in the segment files, with what prune, replay and recovery
/// need to know of it without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPointer {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    /// CRC-32 of the batch value: a torn or overwritten segment is refused, not misread.
    pub crc: u32,
    pub accepted_ms: u64,
    pub count: u32,
}

impl BatchPointer {
    pub fn encode(&self) -> [u8; POINTER_LEN] {
        let mut v = [0u8; POINTER_LEN];
        v[0] = POINTER_TAG;
        v[1..9].copy_from_slice(&self.segment.to_be_bytes());
        v[9..17].copy_from_slice(&self.offset.to_be_bytes());
        v[17..21].copy_from_slice(&self.len.to_be_bytes());
        v[21..25].copy_from_slice(&self.crc.to_be_bytes());
        v[25..33].copy_from_slice(&self.accepted_ms.to_be_bytes());
        v[33..37].copy_from_slice(&self.count.to_be_bytes());
        v
    }

    fn decode(value: &[u8]) -> Result<Self, LogError> {
        if value.len() != POINTER_LEN {
            return Err(LogError::Corrupt(format!(
                "a batch pointer of {} bytes, not {POINTER_LEN}",
                value.len()
            )));
        }
        Ok(BatchPointer {
            segment: u64_at(value, 1)?,
            offset: u64_at(value, 9)?,
            len: u32_at(value, 17)?,
            crc: u32_at(value, 21)?,
            accepted_ms: u64_at(value, 25)?,
            count: u32_at(value, 33)?,
        })
    }
}

/// A `b` value: a batch in a segment file, or one stored inside sled.
pub enum BatchRecord<'a> {
    InFile(BatchPointer),
    Inline(BatchView<'a>),
}

impl<'a> BatchRecord<'a> {
    pub fn decode(value: &'a [u8]) -> Result<Self, LogError> {
        if value.first() == Some(&POINTER_TAG) {
            BatchPointer::decode(value).map(BatchRecord::InFile)
        } else {
            BatchView::decode(value).map(BatchRecord::Inline)
        }
    }

    /// Events in the batch.
    pub fn len(&self) -> usize {
        match self {
            BatchRecord::InFile(p) => p.count as usize,
            BatchRecord::Inline(view) => view.len(),
        }
    }

    pub fn accepted_ms(&self) -> u64 {
        match self {
            BatchRecord::InFile(p) => p.accepted_ms,
            BatchRecord::Inline(view) => view.accepted_ms,
        }
    }
}

/// A decoded view of a batch value.
pub struct BatchView<'a> {
    pub accepted_ms: u64,
    ends: &'a [u8],
    data: &'a [u8],
}

impl<'a> BatchView<'a> {
    pub fn decode(value: &'a [u8]) -> Result<Self, LogError> {
        let accepted_ms = u64_at(value, 0)?;
        let count = u32_at(value, 8)? as usize;
        let ends = value
            .get(12..12 + 4 * count)
            .ok_or_else(|| LogError::Corrupt(format!("event batch too short for its {count} offsets")))?;
        let data = &value[12 + 4 * count..];
        let view = BatchView {
            accepted_ms,
            ends,
            data,
        };
        // The last offset must be the end of the value, or the batch is torn or not
        // ours. That the offsets rise is checked per event, by `get`: a batch is decoded
        // for every event read from it, so this must not cost a pass over all of them.
        if count > 0 && view.end(count - 1) != data.len() {
            return Err(LogError::Corrupt(format!(
                "event batch of {count} events ends at {}, its value at {}",
                view.end(count - 1),
                data.len()
            )));
        }
        Ok(view)
    }

    pub fn len(&self) -> usize {
        self.ends.len() / 4
    }

    fn end(&self, i: usize) -> usize {
        let b = &self.ends[4 * i..4 * i + 4];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    /// The `i`th event's bytes; `None` past the end.
    pub fn get(&self, i: usize) -> Result<Option<&'a [u8]>, LogError> {
        if i >= self.len() {
            return Ok(None);
        }
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        self.data
            .get(start..self.end(i))
            .map(Some)
            .ok_or_else(|| LogError::Corrupt(format!("event batch offset {i} out of order or range")))
    }
}

pub fn queue(prefix: u8, ep: EndpointKey, seq: Seq) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = prefix;
    k[1..5].copy_from_slice(&ep.to_be_bytes());
    k[5..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn queue_prefix(prefix: u8, ep: EndpointKey) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[0] = prefix;
    k[1..].copy_from_slice(&ep.to_be_bytes());
    k
}

pub fn prefixed(prefix: u8, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1);
    k.push(prefix);
    k.extend_from_slice(name);
    k
}

pub fn client_id_expiry(accepted_ms: u64, seq: Seq) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = CLIENT_ID_EXPIRY;
    k[1..9].copy_from_slice(&accepted_ms.to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The `N` bytes at `at`, or an error naming where a record is too short.
fn bytes_at<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], LogError> {
    bytes
        .get(at..at + N)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| LogError::Corrupt(format!("expected {N} bytes at {at} of a {}-byte record", bytes.len())))
}

pub fn u32_at(bytes: &[u8], at: usize) -> Result<u32, LogError> {
    bytes_at(bytes, at).map(u32::from_be_bytes)
}

pub fn u64_at(bytes: &[u8], at: usize) -> Result<u64, LogError> {
    bytes_at(bytes, at).map(u64::from_be_bytes)
}

pub fn seq_of_queue_key(key: &[u8]) -> Result<Seq, LogError> {
    u64_at(key, 5)
}

pub fn endpoint_of_queue_key(key: &[u8]) -> Result<EndpointKey, LogError> {
    u32_at(key, 1)
}

pub fn event_record(accepted_ms: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + data.len());
    v.extend_from_slice(&accepted_ms.to_be_bytes());
    v.extend_from_slice(data);
    v
}

pub fn pending_value(p: &Pending) -> [u8; 20] {
    let mut v = [0u8; 20];
    v[..4].copy_from_slice(&p.attempts.to_be_bytes());
    v[4..12].copy_from_slice(&p.due_ms.to_be_bytes());
    v[12..].copy_from_slice(&p.batch.to_be_bytes());
    v
}

pub fn routes(first: Seq) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = ROUTES;
    k[1..].copy_from_slice(&first.to_be_bytes());
    k
}

/// A route record's value: for each endpoint, its key, how many seqs, and each seq as
/// its offset from the record's first seq (u32: a set holds far fewer events).
pub fn routes_value<'a>(first: Seq, queues: impl Iterator<Item = (EndpointKey, &'a [Seq])>) -> Vec<u8> {
    let mut v = Vec::new();
    for (ep, seqs) in queues {
        v.extend_from_slice(&ep.to_be_bytes());
        v.extend_from_slice(&(seqs.len() as u32).to_be_bytes());
        for seq in seqs {
            v.extend_from_slice(&((seq - first) as u32).to_be_bytes());
        }
    }
    v
}

pub fn decode_routes(first: Seq, value: &[u8]) -> Result<Vec<(EndpointKey, Vec<Seq>)>, LogError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < value.len() {
        let ep = u32_at(value, at)?;
        let n = u32_at(value, at + 4)? as usize;
        at += 8;
        let mut seqs = Vec::with_capacity(n.min(value.len() / 4));
        for _ in 0..n {
            seqs.push(first + u64::from(u32_at(value, at)?));
            at += 4;
        }
        out.push((ep, seqs));
    }
    Ok(out)
}

/// Bytes of one entry in a run.
pub const RUN_ENTRY: usize = 28;

pub fn run_value(entries: &[Pending]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * RUN_ENTRY);
    for p in entries {
        v.extend_from_slice(&p.seq.to_be_bytes());
        v.extend_from_slice(&pending_value(p));
    }
    v
}

pub fn decode_run(value: &[u8]) -> Result<Vec<Pending>, LogError> {
    if value.len() % RUN_ENTRY != 0 {
        return Err(LogError::Corrupt(format!(
            "a queue run of {} bytes is not a whole number of {RUN_ENTRY}-byte entries",
            value.len()
        )));
    }
    value
        .chunks_exact(RUN_ENTRY)
        .map(|e| pending_from(u64_at(e, 0)?, &e[8..]))
        .collect()
}

/// Entries in a run, without decoding them.
pub fn run_len(value: &[u8]) -> usize {
    value.len() / RUN_ENTRY
}

pub fn decode_pending(key: &[u8], value: &[u8]) -> Result<Pending, LogError> {
    pending_from(seq_of_queue_key(key)?, value)
}

/// The entry for `seq` from its [`pending_value`] bytes.
fn pending_from(seq: Seq, value: &[u8]) -> Result<Pending, LogError> {
    Ok(Pending {
        seq,
        attempts: u32_at(value, 0)?,
        due_ms: u64_at(value, 4)?,
        batch: u64_at(value, 12)?,
    })
}

pub fn dead_value(letter: &DeadLetter, event_record: &[u8]) -> Result<Vec<u8>, LogError> {
    let meta = serde_json::to_vec(letter).map_err(|e| LogError::Corrupt(e.to_string()))?;
    let mut v = Vec::with_capacity(4 + meta.len() + event_record.len());
    v.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    v.extend_from_slice(&meta);
    v.extend_from_slice(event_record);
    Ok(v)
}

/// Splits a dead-letter value into its metadata and the copy of the event record.
pub fn decode_dead(value: &[u8]) -> Result<(DeadLetter, &[u8]), LogError> {
    let len = u32_at(value, 0)? as usize;
    let meta = value
        .get(4..4 + len)
        .ok_or_else(|| LogError::Corrupt("dead letter shorter than its header".into()))?;
    let letter = serde_json::from_slice(meta).map_err(|e| LogError::Corrupt(e.to_string()))?;
    Ok((letter, &value[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keys_sort_by_endpoint_then_seq() {
        assert!(queue(QUEUE_RUN, 1, 255) < queue(QUEUE_RUN, 1, 256));
        assert!(queue(QUEUE_RUN, 1, u64::MAX) < queue(QUEUE_RUN, 2, 0));
    }

    #[test]
    fn route_records_round_trip_and_refuse_a_torn_value() {
        let queues: [(EndpointKey, &[Seq]); 2] = [(3, &[100, 101, 140]), (9, &[100])];
        let v = routes_value(100, queues.iter().copied());
        let back = decode_routes(100, &v).unwrap();
        assert_eq!(back, vec![(3, vec![100, 101, 140]), (9, vec![100])]);
        assert!(decode_routes(100, &v[..v.len() - 1]).is_err());
        assert!(decode_routes(100, &[]).unwrap().is_empty());
    }

    #[test]
    fn pending_round_trips() {
        let p = Pending {
            seq: 7,
            attempts: 3,
            due_ms: 99,
            batch: 5,
        };
        assert_eq!(
            decode_pending(&queue(LEGACY_PENDING, 4, 7), &pending_value(&p)).unwrap(),
            p
        );
        let run = [Pending::fresh(3), p];
        let v = run_value(&run);
        assert_eq!(run_len(&v), 2);
        assert_eq!(decode_run(&v).unwrap(), run);
        assert!(decode_run(&v[1..]).is_err(), "a torn run is refused, not misread");
    }

    #[test]
    fn batches_round_trip_and_refuse_bad_offsets() {
        let events: [&[u8]; 3] = [b"{\"a\":1}", b"", b"{}"];
        let v = batch_value(42, events.iter().copied());
        let view = BatchView::decode(&v).unwrap();
        assert_eq!(view.accepted_ms, 42);
        assert_eq!(view.len(), 3);
        assert_eq!(view.get(0).unwrap(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(view.get(1).unwrap(), Some(&b""[..]));
        assert_eq!(view.get(2).unwrap(), Some(&b"{}"[..]));
        assert_eq!(view.get(3).unwrap(), None);
        assert!(BatchView::decode(&v[..v.len() - 1]).is_err(), "a torn batch is refused");
        assert!(BatchView::decode(&v[..10]).is_err());
        // Offsets that fall back are refused when the event behind them is read.
        let mut bad = v.clone();
        bad[16..20].copy_from_slice(&3u32.to_be_bytes());
        let view = BatchView::decode(&bad).unwrap();
        assert!(view.get(1).is_err());
    }

    #[test]
    fn batch_pointers_round_trip_and_are_told_from_inline_batches() {
        let p = BatchPointer {
            segment: 3,
            offset: 1 << 40,
            len: 8000,
            crc: 0xdead_beef,
            accepted_ms: 1_790_000_000_000,
            count: 170,
        };
        let v = p.encode();
        match BatchRecord::decode(&v).unwrap() {
            BatchRecord::InFile(back) => assert_eq!(back, p),
            BatchRecord::Inline(_) => panic!("a pointer read as an inline batch"),
        }
        assert!(BatchRecord::decode(&v[..36]).is_err(), "a torn pointer is refused");
        let inline = batch_value(1_790_000_000_000, [&b"{}"[..]].into_iter());
        let record = BatchRecord::decode(&inline).unwrap();
        assert!(matches!(record, BatchRecord::Inline(_)));
        assert_eq!((record.len(), record.accepted_ms()), (1, 1_790_000_000_000));
    }

    #[test]
    fn dead_letter_round_trips_with_its_event_copy() {
        let d = DeadLetter {
            seq: 1,
            event_id: "e".into(),
            attempts: 4,
            dead_at_ms: 10,
            accepted_ms: 5,
            last_status: Some(500),
            last_error: None,
        };
        let rec = event_record(5, b"{}");
        let v = dead_value(&d, &rec).unwrap();
        let (back, ev) = decode_dead(&v).unwrap();
        assert_eq!(back, d);
        assert_eq!(ev, &rec[..]);
    }
}
