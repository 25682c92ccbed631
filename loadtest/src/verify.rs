//! The verdict on deliveries: every acknowledged click must have reached every endpoint
//! its link routes to, at least once. It owns matching acknowledgements against what the
//! sink recorded, the loss and latency figures, and per-group tallies; it must not wait or
//! talk to anything — it is a pure function of two records, so it is cheap to run again.

use crate::driver::Ack;
use crate::scenario::Routing;
use crate::sink::Recorder;
use hdrhistogram::Histogram;

/// Latencies are kept in microseconds up to an hour; longer ones are clamped.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;
/// How many lost (endpoint, id) pairs the report names.
const LOST_SAMPLES: usize = 20;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupTally {
    pub expected: u64,
    pub delivered: u64,
    /// The latest first arrival in the group.
    pub last_arrival_us: u64,
}

#[derive(Clone, Debug)]
pub struct Verification {
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub lost_samples: Vec<(u32, String)>,
    /// Acknowledged ids that arrived somewhere at all, each counted once.
    pub matched_ids: u64,
    /// Acknowledgements that named an id an earlier one named: two clicks answered with
    /// one id, whose one delivery would otherwise pass for both.
    pub reused_ids: u64,
    /// Deliveries of acknowledged clicks to endpoints whose filters do not take them.
    pub misrouted: u64,
    /// Send → first arrival, per (click, endpoint), in microseconds.
    pub latency: Histogram<u64>,
    /// Deliveries that arrived before the driver saw their acknowledgement.
    pub before_ack: u64,
    pub last_arrival_us: u64,
    /// Indexed like the `group_of` table given to [`verify`]'s groups.
    pub groups: Vec<GroupTally>,
}

fn histogram() -> Histogram<u64> {
    // Bounds are constants known valid for hdrhistogram (low >= 1, high >= 2 * low, 3 digits).
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// Checks every acknowledged click. `group_of[endpoint]` is the report group of each
/// endpoint, `groups` how many there are.
pub fn verify(acks: &[Ack], routing: &Routing, recorder: &Recorder, group_of: &[usize], groups: usize) -> Verification {
    let mut v = Verification {
        expected: 0,
        delivered: 0,
        lost: 0,
        lost_samples: Vec::new(),
        matched_ids: 0,
        reused_ids: 0,
        misrouted: 0,
        latency: histogram(),
        before_ack: 0,
        last_arrival_us: 0,
        groups: vec![GroupTally::default(); groups],
    };
    let mut seen = std::collections::HashSet::with_capacity(acks.len());
    for ack in acks {
        let first = seen.insert(&*ack.id);
        if !first {
            v.reused_ids += 1;
        }
        recorder.with_hits(&ack.id, |hits| {
            if first && !hits.is_empty() {
                v.matched_ids += 1;
            }
            v.misrouted += hits
                .iter()
                .filter(|h| !routing.may_receive(h.endpoint, ack.link))
                .count() as u64;
            for endpoint in routing.expected(ack.link) {
                v.expected += 1;
                let group = group_of.get(endpoint as usize).and_then(|g| v.groups.get_mut(*g));
                let hit = hits.iter().find(|h| h.endpoint == endpoint);
                match hit {
                    Some(h) => {
                        v.delivered += 1;
                        if h.first_us < ack.at_us {
                            v.before_ack += 1;
                        }
                        let latency = h.first_us.saturating_sub(ack.sent_us).clamp(1, MAX_LATENCY_US);
                        // In bounds by the clamp above, so recording cannot fail.
                        let _ = v.latency.record(latency);
                        v.last_arrival_us = v.last_arrival_us.max(h.first_us);
                        if let Some(g) = group {
                            g.expected += 1;
                            g.delivered += 1;
                            g.last_arrival_us = g.last_arrival_us.max(h.first_us);
                        }
                    }
                    None => {
                        v.lost += 1;
                        if v.lost_samples.len() < LOST_SAMPLES {
                            v.lost_samples.push((endpoint, ack.id.to_string()));
                        }
                        if let Some(g) = group {
                            g.expected += 1;
                        }
                    }
                }
            }
        });
    }
    v
}

/// Just the number of missing deliveries, for deciding whether to keep waiting.
pub fn count_missing(acks: &[Ack], routing: &Routing, recorder: &Recorder) -> u64 {
    acks.iter()
        .map(|ack| {
            recorder.with_hits(&ack.id, |hits| {
                routing
                    .expected(ack.link)
                    .filter(|e| !hits.iter().any(|h| h.endpoint == *e))
                    .count() as u64
            })
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{Plan, Scenario};

    fn ack(id: &str, link: u64, at_us: u64) -> Ack {
        Ack {
            id: id.into(),
            link,
            sent_us: at_us,
            at_us,
        }
    }

    #[test]
    fn counts_losses_latency_and_groups() {
        let plan = Plan::new(Scenario::SlowEndpoint);
        let routing = Routing::new(&plan);
        let group_of: Vec<usize> = plan
            .endpoints
            .iter()
            .map(|e| if e.group == "fast" { 0 } else { 1 })
            .collect();
        let r = Recorder::new();
        // "a": all nine healthy endpoints, 2 ms after its ack; plus the hung one, which is not required.
        for e in 0..10 {
            r.record(e, "a", 1_000 + 2_000);
        }
        // "b": eight of nine, one of them twice and one before its ack.
        for e in 0..8 {
            r.record(e, "b", 10_000 + 5_000);
        }
        r.record(0, "b", 20_000);
        r.record(8, "unknown", 1);
        let acks = [ack("a", 3, 1_000), ack("b", 4, 10_000), ack("c", 5, 12_000)];
        let v = verify(&acks, &routing, &r, &group_of, 2);
        assert_eq!(v.expected, 27);
        assert_eq!(v.delivered, 17);
        assert_eq!(v.lost, 10);
        assert_eq!(v.lost_samples[0], (8, "b".to_string()));
        assert_eq!(v.matched_ids, 2);
        assert_eq!(v.latency.len(), 17);
        assert!((1_990..=2_010).contains(&v.latency.value_at_quantile(0.5)));
        assert!((4_990..=5_010).contains(&v.latency.max()));
        assert_eq!(v.last_arrival_us, 15_000);
        assert_eq!(
            v.groups[0],
            GroupTally {
                expected: 27,
                delivered: 17,
                last_arrival_us: 15_000
            }
        );
        assert_eq!(v.groups[1], GroupTally::default());
        assert_eq!(count_missing(&acks, &routing, &r), 10);
        assert_eq!(r.duplicates(), 1);
        assert_eq!(r.distinct_ids() - v.matched_ids, 1);
    }

    /// Two clicks acknowledged with one id: the one delivery under it cannot stand for
    /// both, so the reuse is counted (and fails the run), and the id is matched once.
    #[test]
    fn an_id_acknowledged_for_two_clicks_is_counted_as_reused() {
        let plan = Plan::new(Scenario::Throughput);
        let routing = Routing::new(&plan);
        let r = Recorder::new();
        r.record(0, "x", 500);
        let v = verify(&[ack("x", 1, 100), ack("x", 2, 200)], &routing, &r, &[0], 1);
        assert_eq!(v.reused_ids, 1);
        assert_eq!(v.matched_ids, 1);
        assert_eq!(r.distinct_ids() - v.matched_ids, 0);
        let once = verify(&[ack("x", 1, 100)], &routing, &r, &[0], 1);
        assert_eq!(once.reused_ids, 0);
    }

    #[test]
    fn latency_runs_from_the_send_and_early_arrivals_are_counted() {
        let plan = Plan::new(Scenario::Throughput);
        let routing = Routing::new(&plan);
        let r = Recorder::new();
        r.record(0, "x", 500);
        let sent_at_400 = Ack {
            sent_us: 400,
            ..ack("x", 1, 900)
        };
        let v = verify(&[sent_at_400], &routing, &r, &[0], 1);
        assert_eq!((v.lost, v.before_ack), (0, 1));
        assert!((99..=101).contains(&v.latency.max()), "{}", v.latency.max());
    }

    #[test]
    fn a_delivery_to_an_endpoint_whose_filter_refuses_the_click_is_misrouted() {
        let plan = Plan::many_endpoints(3);
        let routing = Routing::new(&plan);
        let r = Recorder::new();
        r.record(1, "x", 10);
        r.record(2, "x", 10);
        let v = verify(&[ack("x", 1, 5)], &routing, &r, &[0, 0, 0], 1);
        assert_eq!((v.lost, v.misrouted), (0, 1));
    }
}
