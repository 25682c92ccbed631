//! The log's fresh entries: what appends queued lately, kept in memory as (endpoint, seq)
//! pairs, each append set's pairs backed by one durable route record instead of a queue
//! run per endpoint in sled. A delivered pair leaves memory without a write, and a record
//! goes once none of its pairs is left. A pair that is retried, buried or queued again
//! moves to its endpoint's runs, and so does every pair still waiting when the log
//! closes. The records alive may list only so many pairs; past that, appends write runs
//! as before. A crash delivers the delivered pairs a live record still lists again, so
//! past a bound on those the oldest records are rewritten to list only their waiting
//! pairs. This file owns only that bookkeeping and must not do I/O: the writer writes
//! what it says, and every change to it is the writer's.

use super::{EndpointKey, Seq};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// Fresh pairs of every endpoint, the records that list them, and which endpoints may
/// have queue runs in sled.
#[derive(Default)]
pub(super) struct FreshQueues {
    /// Each endpoint's waiting seqs, ascending.
    queues: HashMap<EndpointKey, VecDeque<Seq>>,
    /// Live route records by first seq.
    records: BTreeMap<Seq, Record>,
    /// Pairs the live records list, delivered or not.
    listed: usize,
    /// Pairs the live records list that still wait: `listed - waiting` are delivered
    /// ones a crash would queue again.
    waiting: usize,
    /// Records with nothing left waiting, for the writer to remove.
    finished: Vec<Seq>,
    /// Endpoints that may have queue runs: readers skip sled for the others.
    with_runs: HashSet<EndpointKey>,
}

/// A route record's pairs: each endpoint with its seqs, ascending.
pub(super) type Listing = Vec<(EndpointKey, Vec<Seq>)>;

struct Record {
    last: Seq,
    /// Pairs listed per endpoint.
    endpoints: Vec<(EndpointKey, usize)>,
    waiting: usize,
}

impl Record {
    fn listed(&self) -> usize {
        self.endpoints.iter().map(|(_, n)| n).sum()
    }
}

/// The pairs of `record` (at `first`) still waiting in `queues`.
fn waiting_in<'a>(
    queues: &'a HashMap<EndpointKey, VecDeque<Seq>>,
    first: Seq,
    record: &'a Record,
) -> impl Iterator<Item = (EndpointKey, Seq)> + 'a {
    record.endpoints.iter().flat_map(move |(ep, _)| {
        queues
            .get(ep)
            .into_iter()
            .flat_map(move |queue| queue.range(span(queue, first, record.last)).map(move |s| (*ep, *s)))
    })
}

/// The positions of `deque`'s seqs within `[lo, hi]`.
fn span(deque: &VecDeque<Seq>, lo: Seq, hi: Seq) -> std::ops::Range<usize> {
    deque.partition_point(|s| *s < lo)..deque.partition_point(|s| *s <= hi)
}

impl FreshQueues {
    /// Adds the record at `first` (whose seqs run to `last`) and its pairs. Its seqs are
    /// newer than every pair already here.
    pub fn add<'a>(&mut self, first: Seq, last: Seq, queues: impl Iterator<Item = (EndpointKey, &'a [Seq])>) {
        let mut endpoints = Vec::new();
        let mut waiting = 0;
        for (ep, seqs) in queues {
            if seqs.is_empty() {
                continue;
            }
            self.queues.entry(ep).or_default().extend(seqs.iter().copied());
            endpoints.push((ep, seqs.len()));
            waiting += seqs.len();
        }
        if waiting == 0 {
            return;
        }
        self.listed += waiting;
        self.waiting += waiting;
        self.records.insert(
            first,
            Record {
                last,
                endpoints,
                waiting,
            },
        );
    }

    pub fn contains(&self, ep: EndpointKey, seq: Seq) -> bool {
        self.queues.get(&ep).is_some_and(|q| q.binary_search(&seq).is_ok())
    }

    /// Takes a pair out (delivered, or moved to a run); false if it is not here.
    pub fn take(&mut self, ep: EndpointKey, seq: Seq) -> bool {
        let Some(queue) = self.queues.get_mut(&ep) else {
            return false;
        };
        let Ok(at) = queue.binary_search(&seq) else {
            return false;
        };
        queue.remove(at);
        if queue.is_empty() {
            self.queues.remove(&ep);
        }
        let Some((&first, record)) = self.records.range_mut(..=seq).next_back() else {
            return true;
        };
        if seq <= record.last {
            record.waiting = record.waiting.saturating_sub(1);
            self.waiting = self.waiting.saturating_sub(1);
            if record.waiting == 0 {
                self.listed = self.listed.saturating_sub(record.listed());
                self.records.remove(&first);
                self.finished.push(first);
            }
        }
        true
    }

    /// Records left with nothing waiting since the last call.
    pub fn take_finished(&mut self) -> Vec<Seq> {
        std::mem::take(&mut self.finished)
    }

    /// Up to `limit` waiting seqs of `ep` after `after`.
    pub fn after(&self, ep: EndpointKey, after: Option<Seq>, limit: usize) -> Vec<Seq> {
        let Some(queue) = self.queues.get(&ep) else {
            return Vec::new();
        };
        let from = match after {
            Some(a) => queue.partition_point(|s| *s <= a),
            None => 0,
        };
        queue.range(from..).take(limit).copied().collect()
    }

    /// The endpoint with the oldest waiting pair, and that pair's seq.
    pub fn oldest_waiting(&self) -> Option<(EndpointKey, Seq)> {
        self.queues
            .iter()
            .filter_map(|(ep, queue)| queue.front().map(|seq| (*ep, *seq)))
            .min_by_key(|(_, seq)| *seq)
    }

    pub fn count(&self, ep: EndpointKey) -> usize {
        self.queues.get(&ep).map_or(0, VecDeque::len)
    }

    pub fn may_have_runs(&self, ep: EndpointKey) -> bool {
        self.with_runs.contains(&ep)
    }

    /// Called before a run of `ep` is written.
    pub fn runs_written(&mut self, ep: EndpointKey) {
        self.with_runs.insert(ep);
    }

    /// Called once the writer has seen that `ep` has no run left.
    pub fn runs_gone(&mut self, ep: EndpointKey) {
        self.with_runs.remove(&ep);
    }

    /// Every live record with its waiting pairs, to move them to runs.
    pub fn waiting_records(&self) -> Vec<(Seq, Vec<(EndpointKey, Seq)>)> {
        self.records
            .iter()
            .map(|(&first, record)| (first, waiting_in(&self.queues, first, record).collect()))
            .collect()
    }

    /// Drops the record at `first` and the pairs still waiting in it: they are in runs now.
    pub fn moved(&mut self, first: Seq) {
        let Some(record) = self.records.remove(&first) else {
            return;
        };
        self.listed = self.listed.saturating_sub(record.listed());
        self.waiting = self.waiting.saturating_sub(record.waiting);
        for (ep, _) in &record.endpoints {
            if let Some(queue) = self.queues.get_mut(ep) {
                queue.drain(span(queue, first, record.last));
                if queue.is_empty() {
                    self.queues.remove(ep);
                }
            }
        }
    }

    /// Drops every pair of `ep` (the endpoint was deleted) and returns the records that
    /// still list it and have other pairs waiting, for the writer to rewrite without it;
    /// those left with nothing waiting go to [`Self::take_finished`].
    pub fn forget(&mut self, ep: EndpointKey) -> Vec<Seq> {
        // The writer has removed its runs just before.
        self.queues.remove(&ep);
        self.with_runs.remove(&ep);
        let mut rewrite = Vec::new();
        for (&first, record) in self.records.iter_mut() {
            let Some(at) = record.endpoints.iter().position(|(e, _)| *e == ep) else {
                continue;
            };
            let (_, listed) = record.endpoints.remove(at);
            self.listed = self.listed.saturating_sub(listed);
            let waiting = waiting_in(&self.queues, first, record).count();
            self.waiting = self.waiting.saturating_sub(record.waiting) + waiting;
            record.waiting = waiting;
            if record.waiting == 0 {
                self.finished.push(first);
            } else {
                rewrite.push(first);
            }
        }
        for first in &self.finished {
            if let Some(record) = self.records.remove(first) {
                self.listed = self.listed.saturating_sub(record.listed());
            }
        }
        rewrite
    }

    /// Entries the live records list, delivered or not.
    pub fn listed(&self) -> usize {
        self.listed
    }

    /// Delivered entries the live records still list: what a crash would deliver again.
    pub fn repeatable(&self) -> usize {
        self.listed.saturating_sub(self.waiting)
    }

    /// Has the oldest records that list delivered entries list only their waiting ones,
    /// until at most `keep` delivered entries stay listed, and returns each of them as it
    /// now stands, for the writer to rewrite. A record kept alive by one slow endpoint
    /// would otherwise hold all its delivered entries up for a crash to repeat.
    pub fn compact(&mut self, keep: usize) -> Vec<(Seq, Listing)> {
        let mut rewrites = Vec::new();
        for (&first, record) in self.records.iter_mut() {
            if self.listed.saturating_sub(self.waiting) <= keep {
                break;
            }
            if record.listed() == record.waiting {
                continue;
            }
            let mut queues: Listing = Vec::new();
            for (ep, seq) in waiting_in(&self.queues, first, record) {
                match queues.last_mut() {
                    Some((last, seqs)) if *last == ep => seqs.push(seq),
                    _ => queues.push((ep, vec![seq])),
                }
            }
            // Only delivered pairs go: what waits stays as counted.
            debug_assert_eq!(queues.iter().map(|(_, seqs)| seqs.len()).sum::<usize>(), record.waiting);
            self.listed = self
                .listed
                .saturating_sub(record.listed().saturating_sub(record.waiting));
            record.endpoints = queues.iter().map(|(ep, seqs)| (*ep, seqs.len())).collect();
            rewrites.push((first, queues));
        }
        rewrites
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_two_records() -> FreshQueues {
        let mut f = FreshQueues::default();
        f.add(1, 3, [(7, &[1u64, 2, 3][..]), (8, &[2u64][..])].into_iter());
        f.add(4, 5, [(7, &[4u64, 5][..])].into_iter());
        f
    }

    #[test]
    fn pages_come_in_seq_order_after_a_cursor() {
        let f = with_two_records();
        assert_eq!(f.after(7, None, 10), vec![1, 2, 3, 4, 5]);
        assert_eq!(f.after(7, Some(2), 2), vec![3, 4]);
        assert_eq!(f.after(9, None, 10), Vec::<Seq>::new());
        assert_eq!(f.count(7), 5);
        assert_eq!(f.listed(), 6);
    }

    #[test]
    fn a_record_finishes_when_its_last_pair_is_taken() {
        let mut f = with_two_records();
        assert!(f.take(7, 1) && f.take(7, 2) && f.take(7, 3));
        assert!(!f.take(7, 3), "a pair is taken once");
        assert!(f.take_finished().is_empty(), "endpoint 8 still waits for seq 2");
        assert!(f.take(8, 2));
        assert_eq!(f.take_finished(), vec![1]);
        assert_eq!(f.listed(), 2);
        assert!(!f.contains(8, 2));
    }

    #[test]
    fn records_move_out_with_only_their_waiting_pairs() {
        let mut f = with_two_records();
        assert!(f.take(7, 2));
        let out = f.waiting_records();
        assert_eq!(out, vec![(1, vec![(7, 1), (7, 3), (8, 2)]), (4, vec![(7, 4), (7, 5)])]);
        f.moved(1);
        assert_eq!(f.after(7, None, 10), vec![4, 5]);
        assert_eq!(f.count(8), 0);
        assert_eq!(f.listed(), 2);
        assert!(f.take_finished().is_empty(), "a moved record is not also finished");
    }

    #[test]
    fn forgetting_an_endpoint_finishes_or_rewrites_the_records_that_list_it() {
        let mut f = with_two_records();
        assert_eq!(f.forget(7), vec![1], "record 1 still waits for endpoint 8");
        assert_eq!(f.take_finished(), vec![4]);
        assert_eq!(f.listed(), 1);
        assert!(f
            .waiting_records()
            .iter()
            .all(|(_, pairs)| pairs.iter().all(|(ep, _)| *ep != 7)));
        assert!(f.take(8, 2));
        assert_eq!(f.take_finished(), vec![1]);
    }

    #[test]
    fn compacting_drops_delivered_pairs_from_the_oldest_records_down_to_what_is_kept() {
        let mut f = with_two_records();
        assert!(f.take(7, 1) && f.take(7, 3) && f.take(7, 4));
        assert_eq!((f.listed(), f.repeatable()), (6, 3));
        assert_eq!(
            f.compact(1),
            vec![(1, vec![(7, vec![2]), (8, vec![2])])],
            "the oldest record is enough to come down to one"
        );
        assert_eq!((f.listed(), f.repeatable()), (4, 1));
        assert_eq!(f.compact(0), vec![(4, vec![(7, vec![5])])]);
        assert_eq!((f.listed(), f.repeatable()), (3, 0));
        assert!(f.compact(0).is_empty());
        assert_eq!(f.after(7, None, 10), vec![2, 5], "waiting pairs stay");
        assert!(f.take(7, 2) && f.take(8, 2));
        assert_eq!(f.take_finished(), vec![1]);
        assert_eq!((f.listed(), f.repeatable()), (1, 0));
    }

    #[test]
    fn delivered_pairs_stay_counted_when_an_endpoint_is_forgotten() {
        let mut f = FreshQueues::default();
        f.add(
            1,
            2,
            [(7, &[1u64, 2][..]), (8, &[1u64, 2][..]), (9, &[1u64][..])].into_iter(),
        );
        assert!(f.take(8, 1) && f.take(8, 2));
        assert_eq!((f.listed(), f.repeatable()), (5, 2));
        assert!(f.forget(9).contains(&1), "record 1 is rewritten without endpoint 9");
        assert_eq!(
            (f.listed(), f.repeatable()),
            (4, 2),
            "endpoint 8's two are still listed"
        );
        assert_eq!(f.compact(0), vec![(1, vec![(7, vec![1, 2])])]);
        assert_eq!((f.listed(), f.repeatable()), (2, 0));
    }

    #[test]
    fn runs_are_tracked_per_endpoint() {
        let mut f = FreshQueues::default();
        assert!(!f.may_have_runs(3));
        f.runs_written(3);
        assert!(f.may_have_runs(3));
        f.runs_gone(3);
        assert!(!f.may_have_runs(3));
    }
}
