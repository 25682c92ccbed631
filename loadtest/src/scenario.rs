//! The six scenarios of the load test as data: which endpoints exist, what each one's sink
//! script is, which of them must receive every click, how clicks spread over links, and
//! the retry and breaker settings the generated daemon config uses. It owns the defaults
//! of each scenario and the routing rule (which endpoints a click on link `n` must reach);
//! it must not start anything.

use crate::sink::Behavior;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// One fast endpoint.
    Throughput,
    /// Every click to 10 fast endpoints.
    Fanout,
    /// 9 fast endpoints and 1 that hangs past its 1 s timeout.
    SlowEndpoint,
    /// 10,000 link-level endpoints (`links = ["<n>"]`), clicks spread over the links.
    ManyEndpoints,
    /// Clicks ingested while the sink is down; then it comes up and the backlog drains.
    Backlog,
    /// 30 % of attempts answered 500; everything must still arrive.
    Flaky,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Throughput,
        Scenario::Fanout,
        Scenario::SlowEndpoint,
        Scenario::ManyEndpoints,
        Scenario::Backlog,
        Scenario::Flaky,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Fanout => "fanout",
            Scenario::SlowEndpoint => "slow-endpoint",
            Scenario::ManyEndpoints => "many-endpoints",
            Scenario::Backlog => "backlog",
            Scenario::Flaky => "flaky",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scenario::ALL.into_iter().find(|sc| sc.name() == s).ok_or_else(|| {
            let names: Vec<_> = Scenario::ALL.iter().map(|s| s.name()).collect();
            format!("unknown scenario {s:?}; one of {}", names.join(", "))
        })
    }
}

/// One endpoint of a scenario.
#[derive(Clone, Debug)]
pub struct EndpointPlan {
    /// Which group of the report it counts in ("fast", "hung", "flaky", "link").
    pub group: &'static str,
    /// Link ids it is filtered to (`links = […]`); empty = every click.
    pub links: Vec<u64>,
    pub behavior: Behavior,
    /// Whether every matching click must reach it (false for the hung endpoint).
    pub expect: bool,
    /// Per-endpoint `timeout` in the config.
    pub timeout: Option<&'static str>,
}

/// Everything a scenario fixes before a run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub scenario: Scenario,
    pub endpoints: Vec<EndpointPlan>,
    /// Clicks go to links `0..links`.
    pub links: u64,
    pub clicks: u64,
    pub connections: usize,
    pub batch: usize,
    pub retry_schedule: Vec<&'static str>,
    pub breaker_failures: u32,
    pub breaker_cooldown: &'static str,
    pub delivery_timeout: &'static str,
    /// The sink's listener is down while clicks are ingested (backlog).
    pub sink_down_during_ingest: bool,
    pub drain_timeout: Duration,
}

/// Endpoints of `many-endpoints` unless `--endpoints` says otherwise.
const MANY_ENDPOINTS: u32 = 10_000;

const SHORT_RETRY: [&str; 5] = ["100ms", "200ms", "500ms", "1s", "2s"];
/// Long enough in steps that breaker probes against a down sink cannot exhaust an event's
/// attempts during a long ingest, short enough in total that stragglers drain in minutes.
pub const BACKLOG_RETRY: [&str; 10] = ["100ms", "200ms", "500ms", "1s", "2s", "5s", "10s", "20s", "30s", "1m"];

fn fast() -> EndpointPlan {
    EndpointPlan {
        group: "fast",
        links: vec![],
        behavior: Behavior::default(),
        expect: true,
        timeout: None,
    }
}

impl Plan {
    pub fn new(scenario: Scenario) -> Plan {
        let base = Plan {
            scenario,
            endpoints: vec![fast()],
            links: 1000,
            clicks: 100_000,
            connections: 16,
            batch: 1,
            retry_schedule: SHORT_RETRY.to_vec(),
            breaker_failures: 20,
            breaker_cooldown: "1s",
            delivery_timeout: "5s",
            sink_down_during_ingest: false,
            drain_timeout: Duration::from_secs(120),
        };
        match scenario {
            Scenario::Throughput => base,
            Scenario::Fanout => Plan {
                endpoints: (0..10).map(|_| fast()).collect(),
                clicks: 20_000,
                ..base
            },
            Scenario::SlowEndpoint => {
                let mut endpoints: Vec<_> = (0..9).map(|_| fast()).collect();
                endpoints.push(EndpointPlan {
                    group: "hung",
                    links: vec![],
                    behavior: Behavior::hang(),
                    expect: false,
                    timeout: Some("1s"),
                });
                Plan {
                    endpoints,
                    clicks: 20_000,
                    ..base
                }
            }
            Scenario::ManyEndpoints => Plan::many_endpoints(MANY_ENDPOINTS),
            Scenario::Backlog => Plan {
                clicks: 1_000_000,
                connections: 8,
                batch: 100,
                retry_schedule: BACKLOG_RETRY.to_vec(),
                sink_down_during_ingest: true,
                drain_timeout: Duration::from_secs(900),
                ..base
            },
            Scenario::Flaky => Plan {
                endpoints: vec![EndpointPlan {
                    group: "flaky",
                    behavior: Behavior::flaky(0.3, 3),
                    ..fast()
                }],
                clicks: 10_000,
                ..base
            },
        }
    }

    /// `many-endpoints` with `count` link-level endpoints, one per link, so that each
    /// click goes to one of them and the clicks spread evenly over all.
    pub fn many_endpoints(count: u32) -> Plan {
        Plan {
            endpoints: (0..count)
                .map(|n| EndpointPlan {
                    group: "link",
                    links: vec![u64::from(n)],
                    ..fast()
                })
                .collect(),
            links: u64::from(count),
            clicks: 50_000,
            scenario: Scenario::ManyEndpoints,
            ..Plan::new(Scenario::Throughput)
        }
    }

    /// Report groups in first-seen order.
    pub fn groups(&self) -> Vec<&'static str> {
        let mut groups: Vec<&'static str> = Vec::new();
        for e in &self.endpoints {
            if !groups.contains(&e.group) {
                groups.push(e.group);
            }
        }
        groups
    }
}

/// Which endpoints must receive a click on link `n` (SPEC §2: both filters hold; empty
/// holds for all). Only endpoints that are expected to receive are listed.
#[derive(Clone, Debug)]
pub struct Routing {
    unfiltered: Vec<u32>,
    by_link: Vec<Vec<u32>>,
    endpoints: usize,
    /// Every endpoint's link filter (empty: all), expected to receive or not.
    filters: Vec<Vec<u64>>,
}

impl Routing {
    pub fn new(plan: &Plan) -> Routing {
        let mut unfiltered = Vec::new();
        let mut by_link = vec![Vec::new(); plan.links as usize];
        for (i, e) in plan.endpoints.iter().enumerate() {
            if !e.expect {
                continue;
            }
            if e.links.is_empty() {
                unfiltered.push(i as u32);
            }
            for &l in &e.links {
                if let Some(slot) = by_link.get_mut(l as usize) {
                    slot.push(i as u32);
                }
            }
        }
        Routing {
            unfiltered,
            by_link,
            endpoints: plan.endpoints.len(),
            filters: plan.endpoints.iter().map(|e| e.links.clone()).collect(),
        }
    }

    /// Whether a click on link `link` may reach `endpoint` at all (its filter takes it),
    /// whether or not the endpoint must receive it.
    pub fn may_receive(&self, endpoint: u32, link: u64) -> bool {
        self.filters
            .get(endpoint as usize)
            .is_some_and(|links| links.is_empty() || links.contains(&link))
    }

    pub fn expected(&self, link: u64) -> impl Iterator<Item = u32> + '_ {
        let filtered = self.by_link.get(link as usize).map(Vec::as_slice).unwrap_or(&[]);
        self.unfiltered.iter().chain(filtered).copied()
    }

    pub fn expected_count(&self, link: u64) -> u64 {
        (self.unfiltered.len() + self.by_link.get(link as usize).map_or(0, Vec::len)) as u64
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Scenario::ALL {
            assert_eq!(s.name().parse::<Scenario>(), Ok(s));
        }
        assert!("nope".parse::<Scenario>().unwrap_err().contains("slow-endpoint"));
    }

    #[test]
    fn routing_follows_each_scenario() {
        let r = Routing::new(&Plan::new(Scenario::Fanout));
        assert_eq!(r.expected(5).count(), 10);
        let r = Routing::new(&Plan::new(Scenario::SlowEndpoint));
        assert_eq!(r.expected(5).collect::<Vec<_>>(), (0..9).collect::<Vec<_>>());
        let p = Plan::new(Scenario::ManyEndpoints);
        let r = Routing::new(&p);
        assert_eq!(r.expected(1234).collect::<Vec<_>>(), vec![1234]);
        assert_eq!(r.expected_count(9_999), 1);
        assert_eq!(r.expected_count(10_000), 0);
        assert_eq!(p.groups(), vec!["link"]);
        assert_eq!(Plan::new(Scenario::SlowEndpoint).groups(), vec!["fast", "hung"]);
        let p = Plan::many_endpoints(100);
        assert_eq!(p.scenario, Scenario::ManyEndpoints);
        assert_eq!((p.endpoints.len(), p.links), (100, 100));
        let r = Routing::new(&p);
        assert_eq!(r.expected(99).collect::<Vec<_>>(), vec![99]);
        assert_eq!(r.expected_count(100), 0);
        assert!(r.may_receive(99, 99) && !r.may_receive(99, 98) && !r.may_receive(100, 99));
        let hung = Routing::new(&Plan::new(Scenario::SlowEndpoint));
        assert!(
            hung.may_receive(9, 5),
            "the hung endpoint is routed to, though not expected to receive"
        );
    }

    #[test]
    fn flaky_fails_less_often_than_its_schedule_retries() {
        let p = Plan::new(Scenario::Flaky);
        let cap = p.endpoints[0].behavior.max_failures_per_event as usize;
        assert!(cap > 0 && cap < p.retry_schedule.len() + 1);
    }
}
