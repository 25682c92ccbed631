//! The `clickhook` binary: argument parsing, logging setup, signal handling and exit
//! codes (0 clean, 2 bad config or arguments, 1 anything else). Everything else lives in
//! the library; this file must not contain daemon logic.

use anyhow::Context;
use clap::{Parser, Subcommand};
use clickhook::client::Resend;
use clickhook::config::Config;
use clickhook::Control;
use mimalloc::MiMalloc;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(
    name = "clickhook",
    version,
    about = "Turns URL-shortener clicks into durable, signed, retried webhooks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground.
    Serve {
        #[arg(long, env = "CLICKHOOK_CONFIG", default_value = "config.toml")]
        config: PathBuf,
    },
    /// Validate the config; exit 0, or print what is wrong and exit 2.
    CheckConfig {
        #[arg(long, env = "CLICKHOOK_CONFIG", default_value = "config.toml")]
        config: PathBuf,
    },
    /// Stream NDJSON clicks from FILE (or stdin) into a running daemon.
    Send {
        #[arg(long, conflicts_with = "url")]
        socket: Option<String>,
        /// The ingest base URL, e.g. http://127.0.0.1:8080
        #[arg(long)]
        url: Option<String>,
        /// Bearer token for HTTP ingest.
        #[arg(long, env = "CLICKHOOK_TOKEN")]
        token: Option<String>,
        file: Option<PathBuf>,
    },
    /// List the endpoints of a running daemon.
    Endpoints {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show an endpoint's delivery stats.
    Stats {
        #[command(flatten)]
        admin: AdminArgs,
        endpoint: String,
    },
    /// List an endpoint's dead letters.
    Dead {
        #[command(flatten)]
        admin: AdminArgs,
        endpoint: String,
    },
    /// Send an endpoint's dead letters again, or every click accepted in a time window.
    Replay {
        #[command(flatten)]
        admin: AdminArgs,
        endpoint: String,
        /// RFC 3339; with --until replays the window instead of the dead letters.
        #[arg(long, requires = "until")]
        since: Option<String>,
        #[arg(long, requires = "since")]
        until: Option<String>,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The admin base URL.
    #[arg(long, env = "CLICKHOOK_ADMIN", default_value = "http://127.0.0.1:9090")]
    admin: String,
    /// The admin bearer token, when `admin.token` is set.
    #[arg(long, env = "CLICKHOOK_ADMIN_TOKEN")]
    token: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load_to_start(&config) {
            Ok(c) => {
                println!("{}: ok ({} endpoints)", config.display(), c.endpoints.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => {
            let config = match Config::load_to_start(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(&config);
            match serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("clickhook: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Send {
            socket,
            url,
            token,
            file,
        } => match send(socket, url, token, file) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("clickhook send: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Endpoints { admin } => operate(admin, "GET", "/v1/endpoints".into(), None, print_endpoints),
        Command::Stats { admin, endpoint } => operate(
            admin,
            "GET",
            format!("/v1/endpoints/{endpoint}/stats"),
            None,
            print_json,
        ),
        Command::Dead { admin, endpoint } => {
            operate(admin, "GET", format!("/v1/endpoints/{endpoint}/dead"), None, print_json)
        }
        Command::Replay {
            admin,
            endpoint,
            since,
            until,
        } => {
            let body = match (since, until) {
                (Some(since), Some(until)) => serde_json::json!({ "since": since, "until": until }),
                _ => serde_json::json!({ "dead": true }),
            };
            operate(
                admin,
                "POST",
                format!("/v1/endpoints/{endpoint}/replay"),
                Some(body),
                print_json,
            )
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Raises the soft open-files limit to the hard one: every endpoint keeps its own pool of
/// connections, and the common default soft limit of 1024 would refuse connections past
/// about a thousand endpoints (under systemd, LimitNOFILE sets both).
fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::warn!(soft = limit.rlim_cur, "cannot raise the open-files limit");
            }
        }
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            tracing::info!(open_files = limit.rlim_cur, "open-files limit");
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let listeners = clickhook::bind(&config).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(forward_signals(tx));
        clickhook::run(config, listeners, rx).await?;
        Ok(())
    })
}

async fn forward_signals(tx: tokio::sync::mpsc::Sender<Control>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        let msg = tokio::select! {
            _ = term.recv() => Control::Shutdown,
            _ = int.recv() => Control::Shutdown,
            _ = hup.recv() => Control::Reload,
        };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
}

fn send(
    socket: Option<String>,
    url: Option<String>,
    token: Option<String>,
    file: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match &file {
            Some(path) => match tokio::fs::File::open(path).await {
                Ok(f) => Box::new(f),
                Err(e) => {
                    // A FILE that cannot be read is a bad argument (exit 2), not a failure.
                    eprintln!("clickhook send: {}: {e}", path.display());
                    return Ok(ExitCode::from(2));
                }
            },
            None => Box::new(tokio::io::stdin()),
        };
        let report = match (socket, url) {
            (_, Some(url)) => {
                match clickhook::client::send_http(&url, token.as_deref(), input, Resend::default()).await {
                    // A URL that can never be posted to is a bad argument (exit 2), not a
                    // failure; it is refused before any input is read.
                    Err(e @ clickhook::client::ClientError::BadUrl(..)) => {
                        eprintln!("clickhook send: {e}");
                        return Ok(ExitCode::from(2));
                    }
                    sent => sent?,
                }
            }
            (socket, None) => {
                let socket = socket.unwrap_or_else(|| "clickhook.sock".into());
                clickhook::client::send_unix(&socket, input, Resend::default()).await?
            }
        };
        for e in &report.errors {
            eprintln!("rejected {e}");
        }
        if report.resent > 0 {
            eprintln!("sent again {} lines refused as unavailable", report.resent);
        }
        println!("acknowledged {} rejected {}", report.acknowledged, report.rejected);
        if let Some(why) = &report.cut_short {
            eprintln!("stopped early: {why}");
        }
        Ok(if report.rejected > 0 || report.cut_short.is_some() {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        })
    })
}

/// Runs one admin call and prints its answer; a non-2xx answer exits 1 with its error.
fn operate(
    admin: AdminArgs,
    method: &str,
    path: String,
    body: Option<serde_json::Value>,
    print: fn(&serde_json::Value),
) -> ExitCode {
    let call =
        async { clickhook::client::admin_request(&admin.admin, admin.token.as_deref(), method, &path, body).await };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(call).map_err(anyhow::Error::from));
    match result {
        Ok((status, value)) if (200..300).contains(&status) => {
            print(&value);
            ExitCode::SUCCESS
        }
        Ok((status, value)) => {
            eprintln!("clickhook: {status}: {}", value.get("error").unwrap_or(&value));
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("clickhook: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

fn print_endpoints(value: &serde_json::Value) {
    println!("{:<24} {:<10} {:<8} {:<7} URL", "ID", "FORMAT", "ENABLED", "SOURCE");
    for ep in value.as_array().into_iter().flatten() {
        let text = |k: &str| ep[k].as_str().map(str::to_string).unwrap_or_else(|| ep[k].to_string());
        println!(
            "{:<24} {:<10} {:<8} {:<7} {}",
            text("id"),
            text("format"),
            text("enabled"),
            text("source"),
            text("url")
        );
    }
}
