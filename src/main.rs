//! The `kmi-proxy` command: run the proxy, check a configuration, rewrite a page, or run the demo.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kmi_proxy::config::Config;
use kmi_proxy::config::LogFormat;
use kmi_proxy::identity::VisitorId;
use kmi_proxy::rewrite::{self, Charset, Page};
use kmi_proxy::server::{Handle, Server};

#[derive(Parser)]
#[command(
    version,
    about = "A streaming reverse proxy that carries a KISSmetrics visitor ID to partner sites"
)]
struct Cli {
    /// The configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "KMI_PROXY_CONFIG",
        default_value = "config.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and print the effective settings.
    Check,
    /// Rewrite an HTML page from stdin to stdout, as the proxy would for a visitor with this ID.
    Rewrite {
        /// The visitor ID, decoded (as `KM.i()` returns it).
        #[arg(long)]
        id: String,
        /// The page's URL: relative links resolve against it.
        #[arg(long, default_value = "http://localhost/")]
        url: String,
        /// The page's Content-Type header, which may name its charset.
        #[arg(long, default_value = "text/html")]
        content_type: String,
    },
    /// Start a demo origin and the proxy in front of it.
    Demo {
        /// Where the proxy listens; if taken, a free port is used instead.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

fn main() -> std::process::ExitCode {
    fix_mmap_threshold();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmi-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc's malloc serves blocks of 128 KiB and more with their own mappings, but once such a
/// block is freed it raises that threshold to the block's size, and from then on blocks that size
/// come from the heap, where freed memory stays resident. A compressed page's decoder holds such
/// a block (a brotli ring buffer is 128 KiB for a 119 KB page) and gives it back when its origin
/// pauses (`coding::Decoder::park`): with the threshold fixed, that memory leaves the process.
/// Measured by `cargo bench --bench pressure -- streams`: a held brotli stream 296 KiB with the
/// moving threshold, 194 KiB with it fixed.
///
/// Fixing that threshold also fixes the trim threshold at its default, 128 KiB: a heap whose free
/// top passes it is given back to the kernel, and a response's buffers (eight 16 KiB slices of a
/// spliced page) are about that much. So nearly every request gave back pages that the next one
/// faulted in again: 0.6 page faults per request on the corpus page. At 1 MiB they are kept
/// (0.01 faults per request), for about 4% more requests/s with an ID and without
/// (`benches/ab.sh`), and at most 1 MiB of free heap per malloc arena.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn fix_mmap_threshold() {
    // SAFETY: mallopt only sets one of malloc's tunables; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_mmap_threshold() {}

fn run(cli: Cli) -> Result<()> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let config = Config::load(&cli.config)?;
            init_logging(config.log_format);
            runtime()?.block_on(serve(config, cli.config))
        }
        Command::Check => {
            let config = Config::load(&cli.config)?;
            for warning in config.warnings() {
                eprintln!("kmi-proxy: warning: {warning}");
            }
            // `check | head` closes the pipe early: that is the reader's choice, not an error.
            match write!(std::io::stdout().lock(), "{config}") {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(e).context("writing stdout")
                }
                _ => Ok(()),
            }
        }
        Command::Rewrite {
            id,
            url,
            content_type,
        } => {
            let config = Config::load(&cli.config)?;
            let id = VisitorId::new(&id)
                .map_err(|why| anyhow::anyhow!("--id is not usable as a visitor ID: {why}"))?;
            let url =
                url::Url::parse(&url).with_context(|| format!("--url {url:?} is not a URL"))?;
            let charset: Charset = rewrite::charset_of(&content_type).map_err(|e| {
                anyhow::anyhow!(
                    "--content-type names a charset the rewriter cannot handle: {}",
                    e.0
                )
            })?;
            let mut input = Vec::new();
            std::io::stdin()
                .read_to_end(&mut input)
                .context("reading stdin")?;
            let page = Page {
                url,
                charset,
                memory_limit: config.memory_limit,
                // As the proxy injects it into a page whose response has no policy header.
                script: config.script.as_ref().map(|script| {
                    Arc::new(kmi_proxy::script::Injection {
                        script: Arc::clone(script),
                        policies: Vec::new(),
                        xml: false,
                    })
                }),
            };
            let (out, stats) = rewrite::rewrite_chunks(
                Arc::clone(&config.decorator),
                id,
                page,
                &input,
                &[64 * 1024],
            );
            std::io::stdout()
                .write_all(&out)
                .context("writing stdout")?;
            eprintln!("kmi-proxy: {} link(s) decorated", stats.links_decorated());
            Ok(())
        }
        Command::Demo { listen } => {
            init_logging(LogFormat::Text);
            runtime()?.block_on(demo(listen))
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`), as text or JSON lines.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Colours in the log only for a person reading a terminal who has not asked for none
/// (`NO_COLOR`, https://no-color.org/): never escape codes in a file, a pipe or a journal (and
/// formatting them into every access line cost the proxy about 7% of its throughput).
fn colours() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").map_or(true, |v| v.is_empty())
}

async fn serve(config: Config, path: PathBuf) -> Result<()> {
    // Installed before anything is announced, so a SIGHUP sent as soon as the proxy says it is
    // listening reloads rather than kills it.
    let signals = Signals::install()?;
    let upstream = config.upstream.to_string();
    let server = Server::bind(config).await?;
    if let Some(addr) = server.local_addr() {
        tracing::info!("kmi-proxy listening on http://{addr} for {upstream}");
    }
    if let Some(addr) = server.tls_local_addr() {
        tracing::info!("kmi-proxy listening on https://{addr} for {upstream}");
    }
    if let Some(addr) = server.admin_local_addr() {
        tracing::info!("admin endpoints on http://{addr}/metrics, /healthz, /readyz");
    }
    let handle = server.handle();
    server.run(signals.handle(handle, path)).await;
    tracing::info!("kmi-proxy stopped");
    Ok(())
}

/// The signals the proxy acts on.
struct Signals {
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    #[cfg(not(unix))]
    fn install() -> Result<Signals> {
        Ok(Signals {})
    }

    /// Handles signals until one asks for shutdown: SIGHUP reloads the configuration file (an
    /// invalid file is refused and the running configuration kept), SIGTERM and SIGINT return.
    async fn handle(mut self, handle: Handle, path: PathBuf) {
        #[cfg(unix)]
        loop {
            tokio::select! {
                _ = self.hup.recv() => reload(&handle, &path),
                _ = self.term.recv() => break,
                _ = self.int.recv() => break,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            let _ = (&mut self, handle, path);
        }
        tracing::info!(
            "shutting down: readiness fails, no new connections, draining in-flight requests"
        );
    }
}

fn reload(handle: &Handle, path: &std::path::Path) {
    match Config::load(path) {
        Ok(config) => {
            for warning in handle.reload(config) {
                tracing::warn!("{warning}");
            }
            tracing::info!("configuration reloaded from {}", path.display());
        }
        Err(e) => {
            handle.reload_refused();
            tracing::error!("configuration reload refused, keeping the running one: {e}");
        }
    }
}

async fn demo(listen: SocketAddr) -> Result<()> {
    let origin = kmi_proxy::demo::start_origin()
        .await
        .context("starting the demo origin")?;
    let server = match Server::bind(kmi_proxy::demo::config(listen, origin)?).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("{e}; using a free port instead");
            let any = SocketAddr::new(listen.ip(), 0);
            Server::bind(kmi_proxy::demo::config(any, origin)?).await?
        }
    };
    let addr = server
        .local_addr()
        .context("the demo has a plain listener")?;
    println!("kmi-proxy demo: origin on http://{origin}, proxy on http://{addr}");
    println!();
    println!("  Open http://{addr}/ in a browser (it sets a km_ai cookie and reloads), or run:");
    println!();
    println!(
        "  curl -s -H 'Cookie: km_ai=Zk9%2BaB%2Fc3Q%3D%3D' http://{addr}/ | grep partner.example"
    );
    println!();
    println!(
        "  Partner links gain kmi=Zk9%2BaB%2Fc3Q%3D%3D; other links are untouched. Ctrl-C stops."
    );
    server.run(shutdown_signal()).await;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down: no new connections, draining in-flight requests");
}
