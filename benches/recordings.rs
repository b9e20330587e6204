//! Memory of the recordings: the real proxy (the `kmi-proxy` binary, a child process) in front of
//! an origin in this process that serves the corpus marketing page at every path, swept by a
//! visitor with an ID over many distinct URLs. Each URL is recorded once, so the store fills to
//! `rewrite.cache_bytes` and then evicts; the proxy's RSS must stay within its idle RSS plus
//! `cache_bytes` plus 16 MiB, and the bench prints the RSS per recorded byte.
//!
//! Run:    cargo bench --bench recordings
//! Quick:  KMI_SWEEP_URLS=2000 cargo bench --bench recordings
//!
//! Exits non-zero when the bound is broken, when a response is not the decorated page, or when
//! the second request for a URL was not spliced. Linux only (`/proc/<pid>/status`).

#[allow(dead_code)] // `most_linked_host` is for the other benches; this one knows its page.
mod common;
#[path = "common/process.rs"]
mod process;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, COOKIE, HOST};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use process::{ProxyProcess, Scratch};

const CACHE_BYTES: u64 = 32 * 1024 * 1024;
const SLACK_MIB: f64 = 16.0;
const CONNECTIONS: usize = 8;

async fn start_origin(page: Bytes) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let page = page.clone();
            let service = service_fn(move |_req| {
                let page = page.clone();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header(CONTENT_TYPE, "text/html; charset=utf-8")
                            .body(Full::new(page))
                            .expect("a response"),
                    )
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}

/// The proxy under test and its admin listener.
struct Proxy {
    process: ProxyProcess,
    admin: SocketAddr,
}

impl Proxy {
    fn start(dir: &std::path::Path, origin: SocketAddr, partner: &str) -> Result<Proxy, String> {
        let admin = process::free_port()?;
        let process = ProxyProcess::start(
            dir,
            |addr| {
                format!(
                    "listen = \"{addr}\"\nupstream = \"http://{origin}\"\n\n\
                     [rewrite]\ncache_bytes = {CACHE_BYTES}\n\n[admin]\nlisten = \"{admin}\"\n\n\
                     [[partner]]\nname = \"p\"\ndomains = [\"{partner}\"]\n"
                )
            },
            "warn",
        )?;
        Ok(Proxy { process, admin })
    }
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
    cookie: bool,
) -> Result<Bytes, String> {
    let mut req = Request::builder()
        .uri(path)
        .header(HOST, addr.to_string())
        .header("accept", "text/html");
    if cookie {
        req = req.header(COOKIE, "km_ai=Zk9%2BaB%2Fc3Q%3D%3D");
    }
    sender
        .ready()
        .await
        .map_err(|e| format!("GET {path}: the connection closed: {e}"))?;
    let rsp = sender
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    if !rsp.status().is_success() {
        return Err(format!("GET {path}: {}", rsp.status()));
    }
    Ok(rsp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET {path} body: {e}"))?
        .to_bytes())
}

async fn connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn run() -> Result<(), String> {
    let urls: usize = std::env::var("KMI_SWEEP_URLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::args().any(|a| a == "--bench") {
            10_000
        } else {
            300
        });
    let page_path = common::corpus_dir().join("cloudflare.com.html");
    let page = Bytes::from(
        std::fs::read(&page_path).map_err(|e| format!("{}: {e}", page_path.display()))?,
    );
    // The page's own cross-site links, as benches/load.sh configures them.
    let partner = "dash.cloudflare.com\", \"support.cloudflare.com\", \"community.cloudflare.com";
    let dir = Scratch::new("recordings-bench")?;
    let result = process::runtime()?.block_on(async {
        let origin = start_origin(page.clone())
            .await
            .map_err(|e| format!("origin: {e}"))?;
        let proxy = Proxy::start(dir.path(), origin, partner)?;
        let idle = proxy.process.status_mib("VmRSS")?;
        // One URL twice: recorded, then spliced, and both the same decorated page.
        let mut sender = connect(proxy.process.addr).await?;
        let first = get(&mut sender, proxy.process.addr, "/check", true).await?;
        let second = get(&mut sender, proxy.process.addr, "/check", true).await?;
        let decorated = first
            .windows(b"kmi=Zk9".len())
            .any(|w| w == b"kmi=Zk9");
        if first != second || !decorated {
            let at = first.iter().zip(second.iter()).position(|(a, b)| a != b);
            return Err(format!(
                "the spliced page ({} bytes) differs from the recorded one ({} bytes) at {at:?}, or is not decorated (origin {} bytes): {:?}",
                second.len(),
                first.len(),
                page.len(),
                at.map(|i| String::from_utf8_lossy(&second[i.saturating_sub(80)..(i + 80).min(second.len())]).into_owned())
            ));
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..CONNECTIONS {
            let addr = proxy.process.addr;
            let expected = first.len();
            tasks.push(tokio::spawn(async move {
                let mut sender = connect(addr).await?;
                for i in (c..urls).step_by(CONNECTIONS) {
                    let body = get(&mut sender, addr, &format!("/sweep/{i}?v={i}"), true).await?;
                    if body.len() != expected {
                        return Err(format!("/sweep/{i}: {} bytes, not {expected}", body.len()));
                    }
                }
                Ok::<_, String>(())
            }));
        }
        for t in tasks {
            t.await.map_err(|e| format!("a client task: {e}"))??;
        }
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = proxy.process.status_mib("VmRSS")?;
        let peak = proxy.process.status_mib("VmHWM")?;
        let mut admin = connect(proxy.admin).await?;
        let metrics = get(&mut admin, proxy.admin, "/metrics", false).await?;
        let metrics = String::from_utf8_lossy(&metrics).into_owned();
        Ok::<_, String>((idle, after, peak, took, metrics))
    });
    drop(dir);
    let (idle, after, peak, took, metrics) = result?;
    let held = metric(&metrics, "kmi_proxy_recordings");
    let held_bytes = metric(&metrics, "kmi_proxy_recording_bytes");
    let recorded = metric(&metrics, "kmi_proxy_pages_total{reason=\"recorded\"}");
    let spliced = metric(&metrics, "kmi_proxy_pages_total{reason=\"spliced\"}");
    let bound = idle + CACHE_BYTES as f64 / (1024.0 * 1024.0) + SLACK_MIB;
    println!(
        "{urls} distinct URLs of a {} byte page in {:.1} s ({:.0} req/s, {CONNECTIONS} connections)",
        page.len(),
        took.as_secs_f64(),
        urls as f64 / took.as_secs_f64()
    );
    println!(
        "pages recorded {recorded}, spliced {spliced}; recordings held {held}, {:.1} MiB (cache_bytes {} MiB)",
        held_bytes / (1024.0 * 1024.0),
        CACHE_BYTES >> 20
    );
    println!(
        "RSS idle {idle:.1} MiB, after the sweep {after:.1} MiB, peak {peak:.1} MiB; bound idle + cache_bytes + {SLACK_MIB} MiB = {bound:.1} MiB"
    );
    if held_bytes > 0.0 {
        println!(
            "RSS per recorded byte: {:.2} ((RSS after - idle) / recording bytes)",
            (after - idle) * 1024.0 * 1024.0 / held_bytes
        );
    }
    let mut problems = Vec::new();
    if peak > bound {
        problems.push(format!("peak RSS {peak:.1} MiB is above {bound:.1} MiB"));
    }
    if spliced < 1.0 {
        problems.push("the repeated URL was not spliced".to_owned());
    }
    if held_bytes > CACHE_BYTES as f64 {
        problems.push(format!(
            "the store holds {held_bytes} bytes, over cache_bytes"
        ));
    }
    process::outcome(problems)
}

fn main() -> ExitCode {
    process::exit("recordings", run())
}
