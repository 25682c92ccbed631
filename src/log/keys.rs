//! The byte layout of the sled log. Everything lives in one tree, with a one-byte prefix
//! per kind of record. Keys are big-endian so that sled's order is seq order. This file
//! must not do I/O.
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `e` | seq | accepted_ms, event JSON |
//! | `q` | endpoint, first seq | a run of queue entries: (seq, attempts, due_ms, batch) each |
//! | `d` | endpoint, seq | dead-letter JSON length, JSON, event record |
//! | `i` | client id | seq, accepted_ms |
//! | `j` | accepted_ms, seq | client id (expiry index of `i`) |
//! | `k` | endpoint id | endpoint key |
//! | `s` | setting name | setting bytes |
//! | `m` | name | counters (next seq, next endpoint key) |
//! | `p` | endpoint, seq | attempts, due_ms, batch (one entry per key: the layout before runs, read only to migrate it) |
//!
//! An endpoint's queue is a sequence of runs. The run at key `k` holds entries with seqs in
//! `[k, next run's key)`, sorted, so the run that may hold a seq is the one with the
//! greatest key at or below it. One append writes one run per endpoint, and delivery
//! progress rewrites a run once for many entries, instead of one sled write per entry.

use super::{DeadLetter, EndpointKey, LogError, Pending, Seq};

pub const EVENT: u8 = b'e';
pub const QUEUE_RUN: u8 = b'q';
/// Single queue entries as stored before runs; migrated to runs at open.
pub const LEGACY_PENDING: u8 = b'p';
pub const DEAD: u8 = b'd';
pub const CLIENT_ID: u8 = b'i';
pub const CLIENT_ID_EXPIRY: u8 = b'j';
pub const ENDPOINT_KEY: u8 = b'k';
pub const SETTING: u8 = b's';
pub const META_NEXT_SEQ: &[u8] = b"mseq";
pub const META_NEXT_ENDPOINT: &[u8] = b"mendpoint";

pub fn event(seq: Seq) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = EVENT;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
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

pub fn u64_at(bytes: &[u8], at: usize) -> Result<u64, LogError> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| LogError::Corrupt(format!("expected 8 bytes at {at} of a {}-byte record", bytes.len())))
}

pub fn seq_of_queue_key(key: &[u8]) -> Result<Seq, LogError> {
    u64_at(key, 5)
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
        .map(|e| {
            let attempts = u32::from_be_bytes([e[8], e[9], e[10], e[11]]);
            Ok(Pending {
                seq: u64_at(e, 0)?,
                attempts,
                due_ms: u64_at(e, 12)?,
                batch: u64_at(e, 20)?,
            })
        })
        .collect()
}

/// Entries in a run, without decoding them.
pub fn run_len(value: &[u8]) -> usize {
    value.len() / RUN_ENTRY
}

pub fn decode_pending(key: &[u8], value: &[u8]) -> Result<Pending, LogError> {
    let seq = seq_of_queue_key(key)?;
    let attempts = value
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| LogError::Corrupt("short pending entry".into()))?;
    Ok(Pending {
        seq,
        attempts,
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
    let len = value
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| LogError::Corrupt("short dead letter".into()))? as usize;
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
