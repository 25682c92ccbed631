//! The result of a run, as data (serde, for `--json` and for tests that assert on it) and
//! as text for a person. It owns the pass rule — something was acknowledged, nothing
//! acknowledged was lost, every signature and timestamp was valid — and the wording of
//! the warnings that do not fail a run. It must not measure anything itself.

use crate::daemon::DaemonOutcome;
use crate::sink::SinkStats;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Deliveries measured.
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl LatencySummary {
    /// From a histogram of microseconds.
    pub fn from_micros(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// Endpoints of one kind ("fast", "hung", "flaky", "link") taken together.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupReport {
    pub name: String,
    pub endpoints: usize,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Deliveries per second from the first click sent to the group's last first arrival.
    pub delivery_rate: f64,
    pub requests: u64,
    pub answered_2xx: u64,
    pub answered_500: u64,
    pub hung: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BacklogReport {
    /// How long the sink was down while clicks were ingested.
    pub down_seconds: f64,
    /// From the sink coming up to the backlog's first delivery.
    pub first_delivery_after_up_seconds: f64,
    /// From the sink coming up to the last first arrival.
    pub drain_seconds: f64,
    pub drain_rate: f64,
    pub disk_bytes_before_drain: u64,
    pub disk_bytes_after_drain: u64,
    pub raw_click_bytes: u64,
    /// Disk use with the whole backlog stored, per byte of click JSON.
    pub disk_per_raw_byte: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonReport {
    /// `None` for an attached daemon whose pid was not given.
    pub pid: Option<u32>,
    /// From the daemon's start to the end of the run, its start included.
    pub cpu_seconds: Option<f64>,
    /// Of `cpu_seconds`, what the daemon spent before the first click: starting, and
    /// creating the scenario's endpoints (0.9–1.4 s for 10,000 of them). An attached daemon
    /// counts from its own start.
    pub startup_cpu_seconds: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    /// `None` for an attached daemon, which is left running.
    pub outcome: Option<DaemonOutcome>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub transport: String,
    pub connections: usize,
    pub batch: usize,
    pub rate_limit: Option<u64>,
    pub endpoints: usize,

    pub clicks_requested: u64,
    pub clicks_sent: u64,
    pub clicks_acknowledged: u64,
    pub clicks_rejected: u64,
    /// Ingest failures by kind (connects, 503s, rejections, unknown fates).
    pub ingest_errors: BTreeMap<String, u64>,
    /// First click sent to last acknowledgement.
    pub ingest_seconds: f64,
    pub ingest_rate: f64,
    pub raw_click_bytes: u64,

    pub expected_deliveries: u64,
    pub delivered: u64,
    /// First click sent to the last first arrival.
    pub delivery_seconds: f64,
    pub delivery_rate: f64,
    pub lost: u64,
    /// Up to 20 lost deliveries as `endpoint-index:event-id`.
    pub lost_samples: Vec<String>,
    pub duplicates: u64,
    /// Event ids delivered that were never acknowledged (requests whose fate was unknown).
    pub unexpected_ids: u64,
    /// Deliveries of acknowledged clicks to endpoints whose filters do not take them.
    pub misrouted: u64,
    /// Acknowledgements that named another id than the click's own (`--client-ids`).
    pub client_id_mismatches: u64,
    /// Acknowledgements that named an id an earlier acknowledgement named.
    pub reused_ack_ids: u64,
    pub bad_signatures: u64,
    pub stale_timestamps: u64,
    /// Send to first arrival, over every expected delivery: the daemon accepted each click
    /// between its send and its acknowledgement, so this bounds accepted → arrived from above.
    pub latency: LatencySummary,
    pub delivered_before_ack: u64,

    pub sink: SinkStats,
    pub groups: Vec<GroupReport>,
    pub backlog: Option<BacklogReport>,
    pub daemon: DaemonReport,
    pub loadtest_cpu_seconds: f64,
    pub wall_seconds: f64,
    /// The wait for deliveries ended at its deadline rather than with everything delivered.
    pub drain_timed_out: bool,
    /// Warnings that do not fail the run.
    pub problems: Vec<String>,
    /// What went wrong during the run itself (the daemon died, an endpoint could not be
    /// removed): each fails it.
    pub run_failures: Vec<String>,
    pub passed: bool,
}

/// "`n` `what`", when `n` is not 0.
fn counted(out: &mut Vec<String>, n: u64, what: &str) {
    if n > 0 {
        out.push(format!("{n} {what}"));
    }
}

/// "`want - have` of `want` `what`", when `have` falls short.
fn short_of(out: &mut Vec<String>, have: u64, want: u64, what: &str) {
    if have < want {
        out.push(format!("{} of {want} {what}", want - have));
    }
}

impl Report {
    /// Why the run fails; empty when it passes.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.clicks_acknowledged == 0 {
            f.push("no click was acknowledged".to_string());
        }
        counted(&mut f, self.lost, "acknowledged deliveries never arrived");
        counted(&mut f, self.bad_signatures, "requests had a bad signature");
        counted(
            &mut f,
            self.stale_timestamps,
            "requests had a timestamp more than 5 minutes off",
        );
        short_of(
            &mut f,
            self.clicks_acknowledged,
            self.clicks_sent,
            "sent clicks were not acknowledged",
        );
        counted(
            &mut f,
            self.misrouted,
            "deliveries went to endpoints whose filters do not take the click",
        );
        counted(
            &mut f,
            self.client_id_mismatches,
            "acknowledgements named another id than the click's own",
        );
        counted(
            &mut f,
            self.reused_ack_ids,
            "acknowledgements named an id another click was acknowledged with",
        );
        // A receiver deduplicates on `webhook-id`: an event sent under another id than
        // its own may be dropped there, or drop another.
        counted(
            &mut f,
            self.sink.id_mismatches,
            "single-event bodies had a data.id other than their webhook-id",
        );
        if let Some(o) = &self.daemon.outcome {
            if o.killed {
                f.push(format!(
                    "the daemon ignored SIGTERM for {:.1} s and was killed",
                    o.shutdown_seconds
                ));
            } else if o.exit_code != Some(0) {
                f.push(format!("the daemon exited with {:?} after SIGTERM, not 0", o.exit_code));
            }
        }
        f.extend(self.run_failures.iter().cloned());
        f
    }

    /// Fills `problems` and `passed` from the figures.
    pub fn conclude(&mut self) {
        let mut p = Vec::new();
        short_of(
            &mut p,
            self.clicks_sent,
            self.clicks_requested,
            "clicks were not sent (duration limit or ingest errors)",
        );
        counted(
            &mut p,
            self.unexpected_ids,
            "event ids arrived that were never acknowledged",
        );
        counted(
            &mut p,
            self.sink.header_problems,
            "requests lacked content-type application/json or a clickhook/ user agent",
        );
        counted(&mut p, self.sink.unparsable, "bodies had no readable event ids");
        counted(
            &mut p,
            self.sink.answered_404,
            "requests went to paths that are no endpoint",
        );
        if self.drain_timed_out {
            p.push("stopped waiting for deliveries at the drain timeout".to_string());
        }
        if let Some(o) = &self.daemon.outcome {
            if o.extra_stdout_lines > 0 {
                p.push(format!(
                    "daemon wrote {} lines to stdout after its ready line",
                    o.extra_stdout_lines
                ));
            }
            if o.stderr_error_lines > 0 {
                p.push(format!("daemon logged {} ERROR lines", o.stderr_error_lines));
            }
        }
        self.problems = p;
        self.passed = self.failures().is_empty();
    }

    pub fn to_json(&self) -> String {
        // A Report holds only strings, numbers, maps with string keys and options: it always serialises.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn render_text(&self) -> String {
        let mut t = String::new();
        // Writing into a String cannot fail; the Results below only exist for fmt::Write.
        let _ = writeln!(
            t,
            "scenario {}  transport {}  connections {}  batch {}  rate {}  endpoints {}",
            self.scenario,
            self.transport,
            self.connections,
            self.batch,
            self.rate_limit.map_or("max".to_string(), |r| format!("{r}/s")),
            self.endpoints
        );
        let _ = writeln!(
            t,
            "ingest     {} acknowledged of {} sent ({} requested), {} rejected, {:.1} s, {}/s",
            self.clicks_acknowledged,
            self.clicks_sent,
            self.clicks_requested,
            self.clicks_rejected,
            self.ingest_seconds,
            rate(self.ingest_rate)
        );
        for (kind, n) in &self.ingest_errors {
            let _ = writeln!(t, "           {n} × {kind}");
        }
        let _ = writeln!(
            t,
            "delivery   {} of {} expected, {:.1} s, {}/s",
            self.delivered,
            self.expected_deliveries,
            self.delivery_seconds,
            rate(self.delivery_rate)
        );
        let _ = writeln!(
            t,
            "verdict    lost {}  duplicates {}  bad signatures {}  stale timestamps {}  unexpected ids {}  misrouted {}",
            self.lost, self.duplicates, self.bad_signatures, self.stale_timestamps, self.unexpected_ids, self.misrouted
        );
        for s in &self.lost_samples {
            let _ = writeln!(t, "           lost {s}");
        }
        let l = &self.latency;
        let _ = writeln!(
            t,
            "latency    sent→arrival p50 {:.1} ms  p99 {:.1} ms  p99.9 {:.1} ms  max {:.1} ms  ({} measured, {} arrived before their ack was read)",
            l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count, self.delivered_before_ack
        );
        for g in &self.groups {
            let _ = writeln!(
                t,
                "group      {:<6} {} endpoints: {}/{} delivered, {} lost, {}/s; {} requests, {} 2xx, {} 500, {} hung",
                g.name,
                g.endpoints,
                g.delivered,
                g.expected,
                g.lost,
                rate(g.delivery_rate),
                g.requests,
                g.answered_2xx,
                g.answered_500,
                g.hung
            );
        }
        if let Some(b) = &self.backlog {
            let _ = writeln!(
                t,
                "backlog    down {:.1} s; first delivery {:.2} s after up; drained in {:.1} s at {}/s",
                b.down_seconds,
                b.first_delivery_after_up_seconds,
                b.drain_seconds,
                rate(b.drain_rate)
            );
            let _ = writeln!(
                t,
                "disk       {} with the backlog stored, {} after the drain, raw clicks {} ({:.2}× raw)",
                bytes(b.disk_bytes_before_drain),
                bytes(b.disk_bytes_after_drain),
                bytes(b.raw_click_bytes),
                b.disk_per_raw_byte
            );
        }
        let d = &self.daemon;
        let _ = writeln!(
            t,
            "daemon     cpu {}  peak rss {}{}",
            match (d.cpu_seconds, d.startup_cpu_seconds) {
                (Some(all), Some(start)) => format!("{:.1} s in the run (+{start:.1} s starting)", all - start),
                (Some(all), None) => format!("{all:.1} s"),
                _ => "-".to_string(),
            },
            d.peak_rss_bytes.map_or("-".to_string(), bytes),
            d.outcome.as_ref().map_or(String::new(), |o| format!(
                "  exit {}  shutdown {:.2} s  log errors {}  warnings {}",
                o.exit_code.map_or("signal".to_string(), |c| c.to_string()),
                o.shutdown_seconds,
                o.stderr_error_lines,
                o.stderr_warning_lines
            ))
        );
        let _ = writeln!(
            t,
            "loadtest   cpu {:.1} s  wall {:.1} s  sink requests {} (2xx {}, 500 {}, 401 {}, 410 {}, hung {}, reset {})",
            self.loadtest_cpu_seconds,
            self.wall_seconds,
            self.sink.requests,
            self.sink.answered_2xx,
            self.sink.answered_500,
            self.sink.answered_401,
            self.sink.answered_410,
            self.sink.hung,
            self.sink.reset
        );
        if let Some(o) = &d.outcome {
            for line in &o.log_samples {
                let _ = writeln!(t, "daemon log {line}");
            }
        }
        for p in &self.problems {
            let _ = writeln!(t, "warning    {p}");
        }
        match self.failures().as_slice() {
            [] => t.push_str("PASS\n"),
            fails => {
                for f in fails {
                    let _ = writeln!(t, "FAIL       {f}");
                }
            }
        }
        t
    }
}

/// `12345.6` → `12.3k`.
fn rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.1}k", r / 1000.0)
    } else {
        format!("{r:.0}")
    }
}

fn bytes(b: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if b as f64 >= 1024.0 * MIB {
        format!("{:.2} GiB", b as f64 / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", b as f64 / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Report {
        let mut r = Report {
            scenario: "throughput".into(),
            transport: "http".into(),
            connections: 16,
            batch: 1,
            endpoints: 1,
            clicks_requested: 100,
            clicks_sent: 100,
            clicks_acknowledged: 100,
            expected_deliveries: 100,
            delivered: 100,
            daemon: DaemonReport {
                pid: Some(7),
                cpu_seconds: Some(1.5),
                startup_cpu_seconds: Some(0.25),
                peak_rss_bytes: Some(50 << 20),
                outcome: Some(DaemonOutcome {
                    exit_code: Some(0),
                    ..DaemonOutcome::default()
                }),
            },
            ..Report::default()
        };
        r.conclude();
        r
    }

    #[test]
    fn passes_only_without_loss_or_bad_signatures() {
        let r = good();
        assert!(r.passed && r.problems.is_empty(), "{:?}", r.problems);
        assert!(r.render_text().ends_with("PASS\n"));

        let mut lost = good();
        lost.lost = 3;
        lost.conclude();
        assert!(!lost.passed);
        assert!(lost
            .render_text()
            .contains("FAIL       3 acknowledged deliveries never arrived"));

        let mut sig = good();
        sig.bad_signatures = 1;
        sig.conclude();
        assert!(!sig.passed);

        let mut none = Report::default();
        none.conclude();
        assert!(!none.passed, "a run that acknowledged nothing proves nothing");
    }

    #[test]
    fn warnings_do_not_fail() {
        let mut r = good();
        r.duplicates = 5;
        r.unexpected_ids = 2;
        r.daemon.outcome = Some(DaemonOutcome {
            exit_code: Some(0),
            extra_stdout_lines: 1,
            ..DaemonOutcome::default()
        });
        r.conclude();
        assert!(r.passed);
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
        assert!(r.render_text().contains("warning    daemon wrote 1 lines to stdout"));
    }

    #[test]
    fn misrouting_unacknowledged_clicks_wrong_ids_and_a_bad_exit_fail() {
        let fails = |change: fn(&mut Report)| {
            let mut r = good();
            change(&mut r);
            r.conclude();
            assert!(!r.passed, "{:?}", r.failures());
            r.failures()
        };
        assert!(fails(|r| r.misrouted = 1)[0].contains("filters do not take"));
        assert!(fails(|r| r.clicks_sent += 1)[0].contains("were not acknowledged"));
        assert!(fails(|r| r.client_id_mismatches = 2)[0].contains("another id"));
        assert!(fails(|r| r.reused_ack_ids = 1)[0].contains("another click was acknowledged with"));
        assert!(fails(|r| r.sink.id_mismatches = 1)[0].contains("other than their webhook-id"));
        assert!(fails(|r| r.run_failures.push("the daemon exited during the run".into()))[0].contains("exited"));
        let exit = fails(|r| {
            r.daemon.outcome = Some(DaemonOutcome {
                exit_code: Some(1),
                ..DaemonOutcome::default()
            })
        });
        assert!(exit[0].contains("exited with Some(1)"), "{exit:?}");
    }

    #[test]
    fn the_daemon_line_keeps_its_start_apart_from_the_run() {
        let r = good();
        let text = r.render_text();
        assert!(
            text.contains("daemon     cpu 1.2 s in the run (+0.2 s starting)"),
            "{text}"
        );
        let mut attached = good();
        attached.daemon.startup_cpu_seconds = None;
        assert!(attached.render_text().contains("daemon     cpu 1.5 s  "));
    }

    #[test]
    fn json_round_trips() {
        let mut r = good();
        r.backlog = Some(BacklogReport {
            raw_click_bytes: 600,
            disk_bytes_before_drain: 1200,
            ..Default::default()
        });
        r.ingest_errors.insert("503, retried".into(), 2);
        let back: Report = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back, r);
        assert!(r.render_text().contains("2 × 503, retried"));
    }

    #[test]
    fn latency_summary_in_milliseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let s = LatencySummary::from_micros(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p99_ms - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.p999_ms - 999.0).abs() < 1.5, "{s:?}");
        assert_eq!(
            LatencySummary::from_micros(&Histogram::new(3).unwrap()),
            LatencySummary::default()
        );
        assert_eq!(rate(12_345.0), "12.3k");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
