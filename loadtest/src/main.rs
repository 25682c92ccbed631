//! Command line of the load generator: one subcommand per scenario, plus `sink`, which only
//! runs the verifying sink so that `wrk` can be pointed at it. It owns argument parsing,
//! printing the report (text or `--json`) and the exit code: 0 passed, 1 failed (loss or
//! bad signatures), 2 could not run. It must not hold any logic the library lacks: tests
//! drive the same code through `clickhook_loadtest::run`.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use clickhook_loadtest::baseline;
use clickhook_loadtest::clicks::ClickFactory;
use clickhook_loadtest::clock::{rfc3339, unix_now};
use clickhook_loadtest::signature::{generate_secret, SigningKey};
use clickhook_loadtest::{
    run, Attach, Behavior, Clock, Mode, Scenario, ScenarioOptions, Sink, SinkEndpoint, SinkOptions, SinkScript,
    Transport,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "clickhook-loadtest",
    version,
    about = "Load and fault generator for clickhook"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One fast endpoint: the ingest and delivery ceiling.
    Throughput(RunArgs),
    /// Every click to 10 endpoints.
    Fanout(RunArgs),
    /// 9 fast endpoints and 1 that hangs past its 1 s timeout; the healthy rate must hold.
    SlowEndpoint(RunArgs),
    /// 10,000 link-level endpoints, clicks spread over their links.
    ManyEndpoints(RunArgs),
    /// Clicks (default 1,000,000) ingested while the sink is down, then drained.
    Backlog(RunArgs),
    /// 30 % of attempts answered 500; everything must still arrive.
    Flaky(RunArgs),
    /// Only the verifying sink, for pointing `wrk` (or a daemon) at it.
    Sink(SinkArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The clickhook binary to start [default: this workspace's daemon, built in release
    /// first, so that a missing or stale binary is never what gets measured].
    #[arg(long)]
    daemon_bin: Option<PathBuf>,
    /// Attach to a running daemon's HTTP ingest instead of starting one (needs --admin-url).
    #[arg(long)]
    ingest_url: Option<String>,
    /// Attach to a running daemon's ingest socket instead of starting one (needs --admin-url).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Admin API of the running daemon, used to create the run's endpoints.
    #[arg(long)]
    admin_url: Option<String>,
    #[arg(long)]
    admin_token: Option<String>,
    #[arg(long)]
    ingest_token: Option<String>,
    /// Pid of the running daemon, to sample its CPU and memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Clicks to send (default per scenario).
    #[arg(long)]
    clicks: Option<u64>,
    /// Clicks per second; default as fast as acknowledgements allow.
    #[arg(long)]
    rate: Option<u64>,
    #[arg(long)]
    connections: Option<usize>,
    /// Clicks per request (JSON array) or per socket write.
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long, default_value = "http")]
    transport: Transport,
    /// Ingest time limit, e.g. 30s or 5m.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// How long to wait for deliveries after ingest.
    #[arg(long, value_parser = parse_duration)]
    drain_timeout: Option<Duration>,
    /// storage.fsync of the started daemon: always or interval.
    #[arg(long)]
    fsync: Option<String>,
    /// Give every click its own idempotency key and check the acknowledged ids against them.
    #[arg(long)]
    client_ids: bool,
    /// `max_concurrency` of every endpoint the run creates (the daemon's default is 32);
    /// set it to wrk's connection count to compare like with like.
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Link-level endpoints of many-endpoints (default 10,000), to see how delivery
    /// scales with the number of endpoints the clicks spread over.
    #[arg(long)]
    endpoints: Option<u32>,
    /// Spread clicks over links 0..N (default per scenario: one per endpoint in
    /// many-endpoints). With --links 1 every click goes to one link-level endpoint and
    /// the rest only sit in the routing index.
    #[arg(long)]
    links: Option<u64>,
    /// No progress line on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// The sink waits this long before every answer, e.g. 5ms.
    #[arg(long, value_parser = parse_duration)]
    sink_latency: Option<Duration>,
    /// Fraction (0-1) of attempts the sink answers 500, at most 3 times per event.
    #[arg(long)]
    sink_fail_rate: Option<f64>,
    /// Add this many endpoints, taking every click, that answer 410 Gone.
    #[arg(long, default_value_t = 0)]
    gone: u32,
    /// Take the sink down this long after ingest starts (needs --sink-down-for).
    #[arg(long, value_parser = parse_duration, requires = "sink_down_for")]
    sink_down_at: Option<Duration>,
    /// How long the sink stays down (connections refused) before it comes back.
    #[arg(long, value_parser = parse_duration, requires = "sink_down_at")]
    sink_down_for: Option<Duration>,
}

#[derive(Args)]
struct SinkArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Endpoints /ep/0 … /ep/N-1, all with the same secret.
    #[arg(long, default_value_t = 1)]
    endpoints: usize,
    /// whsec_ secret requests must be signed with; generated when absent.
    #[arg(long)]
    secret: Option<String>,
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    latency: Duration,
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Never answer.
    #[arg(long)]
    hang: bool,
    /// Answer 410 Gone.
    #[arg(long, conflicts_with = "hang")]
    gone: bool,
    /// Go down (connections refused) this long after starting (needs --down-for).
    #[arg(long, value_parser = parse_duration, requires = "down_for")]
    down_after: Option<Duration>,
    /// How long to stay down before coming back.
    #[arg(long, value_parser = parse_duration, requires = "down_after")]
    down_for: Option<Duration>,
    /// Answer with connection: close.
    #[arg(long)]
    no_keep_alive: bool,
    /// Accept any webhook-timestamp (a fixed wrk request stays valid past 5 minutes).
    #[arg(long)]
    no_timestamp_check: bool,
    /// Stop after this long.
    #[arg(long = "for", value_parser = parse_duration, default_value = "10m")]
    run_for: Duration,
    /// Write a wrk Lua script sending to /ep/0, signed, the body the daemon delivers for one click.
    #[arg(long)]
    wrk_script: Option<PathBuf>,
}

/// `250ms`, `30s`, `5m`, `1h`; a bare number is seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 250ms, 30s or 5m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{text:?}: unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Throughput(a) => scenario(Scenario::Throughput, a),
        Command::Fanout(a) => scenario(Scenario::Fanout, a),
        Command::SlowEndpoint(a) => scenario(Scenario::SlowEndpoint, a),
        Command::ManyEndpoints(a) => scenario(Scenario::ManyEndpoints, a),
        Command::Backlog(a) => scenario(Scenario::Backlog, a),
        Command::Flaky(a) => scenario(Scenario::Flaky, a),
        Command::Sink(a) => sink(a).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("clickhook-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Builds this workspace's daemon (release) and returns the path cargo reports for it
/// (wherever a target directory or target triple put it). Cargo finds nothing to do when
/// it is up to date.
fn build_workspace_daemon() -> anyhow::Result<PathBuf> {
    let Some(root) = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .filter(|r| r.join("Cargo.toml").exists())
    else {
        bail!("the workspace this load generator was built in is gone: pass --daemon-bin");
    };
    // `cargo run` says which cargo it is; run bare, the one on the PATH.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = std::process::Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "--message-format=json-render-diagnostics",
            "-p",
            "clickhook",
            "--bin",
            "clickhook",
        ])
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| {
            format!(
                "running {} to build the daemon; or pass --daemon-bin",
                Path::new(&cargo).display()
            )
        })?;
    if !output.status.success() {
        bail!(
            "building the daemon (cargo build --release -p clickhook) failed ({}); or pass --daemon-bin",
            output.status
        );
    }
    built_daemon(&String::from_utf8_lossy(&output.stdout))
        .context("cargo built the daemon but named no executable for it; pass --daemon-bin")
}

/// The daemon's executable among cargo's JSON messages.
fn built_daemon(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "clickhook")
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

fn scenario(scenario: Scenario, a: RunArgs) -> anyhow::Result<bool> {
    let attach = if a.ingest_url.is_some() || a.socket.is_some() || a.admin_url.is_some() {
        let Some(admin_url) = a.admin_url else {
            bail!("attaching to a running daemon needs --admin-url: the run's endpoints are created through it");
        };
        Some(Attach {
            ingest_url: a.ingest_url,
            socket: a.socket,
            admin_url,
            admin_token: a.admin_token,
            ingest_token: a.ingest_token,
            pid: a.pid,
        })
    } else {
        None
    };
    let daemon_bin = match (&attach, a.daemon_bin) {
        (_, Some(bin)) => bin,
        // Attached, nothing is started.
        (Some(_), None) => PathBuf::new(),
        (None, None) => build_workspace_daemon()?,
    };
    let options = ScenarioOptions {
        scenario,
        daemon_bin,
        attach,
        clicks: a.clicks,
        rate: a.rate,
        connections: a.connections,
        batch: a.batch,
        transport: a.transport,
        duration: a.duration,
        drain_timeout: a.drain_timeout,
        fsync: a.fsync,
        client_ids: a.client_ids,
        max_concurrency: a.max_concurrency,
        endpoints: a.endpoints,
        links: a.links,
        progress: !a.quiet,
        sink: SinkScript {
            latency: a.sink_latency,
            fail_rate: a.sink_fail_rate,
            gone: a.gone,
            outage: a.sink_down_at.zip(a.sink_down_for),
        },
        ..ScenarioOptions::default()
    };
    let report = run(options).context(format!("scenario {scenario}"))?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.render_text());
    }
    Ok(report.passed)
}

fn sink(a: SinkArgs) -> anyhow::Result<()> {
    if a.endpoints == 0 {
        bail!("--endpoints must be at least 1");
    }
    if !(0.0..=1.0).contains(&a.fail_rate) {
        bail!("--fail-rate must be between 0 and 1");
    }
    let secret = a.secret.unwrap_or_else(generate_secret);
    let behavior = Behavior {
        mode: match (a.hang, a.gone) {
            (true, _) => Mode::Hang,
            (_, true) => Mode::Gone,
            _ => Mode::Answer,
        },
        latency: a.latency,
        fail_rate: a.fail_rate,
        keep_alive: !a.no_keep_alive,
        ..Behavior::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let clock = Clock::new();
        let endpoints = (0..a.endpoints)
            .map(|_| SinkEndpoint {
                secret: secret.clone(),
                behavior,
            })
            .collect();
        let options = SinkOptions {
            listen: a.listen,
            check_timestamps: !a.no_timestamp_check,
            ..SinkOptions::new(endpoints, clock)
        };
        let sink = Sink::start(options).await?;
        if let Some(path) = &a.wrk_script {
            std::fs::write(path, wrk_script(&secret)?).with_context(|| format!("writing {}", path.display()))?;
        }
        println!(
            "sink http://{} endpoints=/ep/0../ep/{} secret={secret}",
            sink.addr(),
            a.endpoints - 1
        );
        if let (Some(after), Some(period)) = (a.down_after, a.down_for) {
            let outage = sink.outage(after, period);
            tokio::spawn(async move {
                if let Ok(Err(e)) = outage.await {
                    eprintln!("the scripted outage: {e}");
                }
            });
        }
        let until = Instant::now() + a.run_for;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::signal::ctrl_c() => break,
            }
            if Instant::now() >= until {
                break;
            }
            let s = sink.stats();
            if s.requests != last {
                eprintln!(
                    "requests {} (+{}/s)  2xx {}  500 {}  401 {}  events {}  unique {}  dup {}",
                    s.requests,
                    s.requests - last,
                    s.answered_2xx,
                    s.answered_500,
                    s.answered_401,
                    s.events_delivered,
                    sink.recorder().unique(),
                    sink.recorder().duplicates()
                );
                last = s.requests;
            }
        }
        sink.shutdown();
        println!("{}", serde_json::to_string_pretty(&sink.stats())?);
        Ok(())
    })
}

/// A wrk script posting to /ep/0 the body the daemon delivers for one click, signed. Its
/// timestamp is now, so it stays valid for 5 minutes unless the sink skips that check.
fn wrk_script(secret: &str) -> anyhow::Result<String> {
    let key = SigningKey::from_secret(secret)?;
    let factory = ClickFactory::new(1000, "wrk", false, rfc3339(unix_now()));
    let id = baseline::BASELINE_ID;
    let body = baseline::delivered_body(&factory, id).context("the baseline click lost its shape")?;
    let ts = unix_now().to_string();
    let sig = key.sign(id, &ts, body.as_bytes());
    Ok(format!(
        "wrk.method = \"POST\"\nwrk.path = \"/ep/0\"\nwrk.body = [==[{body}]==]\n\
         wrk.headers[\"content-type\"] = \"application/json\"\n\
         wrk.headers[\"user-agent\"] = \"clickhook/wrk\"\n\
         wrk.headers[\"webhook-id\"] = \"{id}\"\n\
         wrk.headers[\"webhook-timestamp\"] = \"{ts}\"\n\
         wrk.headers[\"webhook-signature\"] = \"{sig}\"\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_is_where_cargo_says_it_put_it() {
        let messages = [
            r#"{"reason":"compiler-artifact","target":{"name":"clickhook","kind":["lib"]},"executable":null}"#,
            "not json",
            r#"{"reason":"compiler-artifact","target":{"name":"other","kind":["bin"]},"executable":"/t/release/other"}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"clickhook","kind":["bin"]},"executable":"/t/x86_64-unknown-linux-gnu/release/clickhook"}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        assert_eq!(
            built_daemon(&messages),
            Some(PathBuf::from("/t/x86_64-unknown-linux-gnu/release/clickhook"))
        );
        assert_eq!(built_daemon(r#"{"reason":"build-finished","success":true}"#), None);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn wrk_script_carries_a_valid_signature() {
        let secret = generate_secret();
        let script = wrk_script(&secret).unwrap();
        let body = script.split("[==[").nth(1).unwrap().split("]==]").next().unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["data"]["id"], baseline::BASELINE_ID);
        let header = |name: &str| {
            let start = script.find(&format!("[\"{name}\"] = \"")).unwrap() + name.len() + 8;
            script[start..].split('"').next().unwrap().to_string()
        };
        let key = SigningKey::from_secret(&secret).unwrap();
        assert!(key.verify(
            &header("webhook-id"),
            &header("webhook-timestamp"),
            body.as_bytes(),
            &header("webhook-signature")
        ));
    }

    #[test]
    fn cli_shape_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["x", "slow-endpoint", "--clicks", "10", "--transport", "unix", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::SlowEndpoint(RunArgs {
                clicks: Some(10),
                json: true,
                ..
            })
        ));
    }
}
