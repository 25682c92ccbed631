//! The `clickhook` binary: argument parsing, logging setup, signal handling and exit
//! codes (0 clean, 2 bad config or arguments, 1 anything else). Everything else lives in
//! the library; this file must not contain daemon logic.

use anyhow::Context;
use clap::{Parser, Subcommand};
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
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
            let config = match Config::load(&config) {
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

fn serve(config: Config) -> anyhow::Result<()> {
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
            Some(path) => Box::new(
                tokio::fs::File::open(path)
                    .await
                    .with_context(|| format!("{}", path.display()))?,
            ),
            None => Box::new(tokio::io::stdin()),
        };
        let report = match (socket, url) {
            (_, Some(url)) => clickhook::client::send_http(&url, token.as_deref(), input).await?,
            (socket, None) => {
                let socket = socket.unwrap_or_else(|| "clickhook.sock".into());
                clickhook::client::send_unix(&socket, input).await?
            }
        };
        for e in &report.errors {
            eprintln!("rejected {e}");
        }
        println!("acknowledged {} rejected {}", report.acknowledged, report.rejected);
        Ok(if report.rejected > 0 {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        })
    })
}
