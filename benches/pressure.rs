//! The real proxy under pressure, measured from outside: the `kmi-proxy` binary runs as a child
//! process in front of an origin in this process, and its memory is read from `/proc`.
//!
//! * `bombs`: two decompression bombs at once (brotli, 1.6 KB that inflate to
//!   `KMI_BOMB_MIB` MiB of zeros, 2048 by default), one over HTTP/1.1 and one over h2c, read as fast
//!   as the proxy sends, while a small page is requested every 50 ms beside them. Prints the
//!   proxy's peak RSS (`VmHWM`) and the slowest small request.
//! * `streams`: `KMI_STREAMS` (200) requests for the 119 KB Cloudflare corpus page on
//!   `KMI_STREAM_CONNECTIONS` (1) h2c connection(s), in identity, gzip and brotli, each held by
//!   the origin halfway through its compressed body. Prints the RSS the held streams add once
//!   they have settled (past `body::PARK_AFTER`, when a paused decoder gives its state back), per
//!   stream in flight (at most 100 per connection: the proxy's `SETTINGS_MAX_CONCURRENT_STREAMS`),
//!   then releases them and checks every page came back decorated. A fresh proxy per coding, so
//!   memory freed by one run cannot hide the next one's cost. The origin compresses as nginx does
//!   by default (gzip level 6; brotli quality 6 with a 512 KiB window, or
//!   `KMI_ORIGIN_BROTLI=quality,lgwin`). The same page passed through without an ID is measured
//!   first, as the baseline a rewrite adds to.
//!
//! Run:    cargo bench --bench pressure               (both)
//!         cargo bench --bench pressure -- bombs
//!         cargo bench --bench pressure -- streams
//!
//! Exits non-zero if the peak RSS of the bombs reaches 256 MiB, a small request took a second or
//! more, a bomb came back as a complete response, or a held page came back undecorated or broken.
//! The target of 200 KiB per held stream is printed as met or NOT met. Under `cargo test --benches` (no `--bench` argument) it runs a
//! smoke version (a 64 MiB bomb, 20 streams). Linux only: it reads `/proc/<pid>/status`.

// Only the corpus directory is needed here.
#[allow(dead_code)]
mod common;
#[path = "common/process.rs"]
mod process;

use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE, COOKIE, HOST};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use process::{ProxyProcess, Scratch};

const ID_COOKIE: &str = "km_ai=Zk9%2BaB%2Fc3Q%3D%3D";
const DECORATED: &str = "kmi=Zk9%2BaB%2Fc3Q%3D%3D";
const BOMB_RSS_LIMIT_MIB: f64 = 256.0;
const SLOWEST_ALLOWED: Duration = Duration::from_secs(1);
const PER_STREAM_LIMIT_KIB: f64 = 200.0;
/// The proxy's `MAX_STREAMS_PER_CONNECTION`.
const STREAMS_PER_CONNECTION: usize = 100;

const SMALL_PAGE: &str = "<!DOCTYPE html><html><body>\
<a href=\"https://dash.cloudflare.com/login\">Log in</a></body></html>\n";

// ---------------------------------------------------------------------------------------------
// The proxy as a child process
// ---------------------------------------------------------------------------------------------

/// Starts the proxy in front of `origin`, partners the page's three cross-site hosts.
fn start_proxy(dir: &Path, origin: SocketAddr) -> Result<ProxyProcess, String> {
    ProxyProcess::start(
        dir,
        |addr| {
            format!(
                "listen = \"{addr}\"\nupstream = \"http://{origin}\"\n\n\
                 [[partner]]\nname = \"cloudflare\"\n\
                 domains = [\"dash.cloudflare.com\", \"support.cloudflare.com\", \
                 \"community.cloudflare.com\"]\n"
            )
        },
        "error",
    )
}

// ---------------------------------------------------------------------------------------------
// The origin
// ---------------------------------------------------------------------------------------------

/// What the origin serves. `/held` sends the first half of `held` and waits for `release`.
#[derive(Clone)]
struct Pages {
    small: Bytes,
    bomb: Bytes,
    whole: Bytes,
    held: Bytes,
    coding: Option<&'static str>,
    release: watch::Receiver<bool>,
    held_started: Arc<AtomicUsize>,
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn page(body: OriginBody, coding: Option<&str>) -> Response<OriginBody> {
    let mut rsp = Response::builder().header(CONTENT_TYPE, "text/html; charset=utf-8");
    if let Some(c) = coding {
        rsp = rsp.header(CONTENT_ENCODING, c);
    }
    rsp.body(body).expect("a valid response")
}

async fn start_origin(pages: Pages) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let pages = pages.clone();
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let pages = pages.clone();
                async move {
                    let full = |b: &Bytes| Full::new(b.clone()).boxed();
                    Ok::<_, Infallible>(match req.uri().path() {
                        "/bomb" => page(full(&pages.bomb), Some("br")),
                        "/whole" => page(full(&pages.whole), pages.coding),
                        "/held" => {
                            pages.held_started.fetch_add(1, Ordering::SeqCst);
                            let (first, second) = pages.held.split_at(pages.held.len() / 2);
                            let (first, second) = (
                                Bytes::copy_from_slice(first),
                                Bytes::copy_from_slice(second),
                            );
                            let release = pages.release.clone();
                            let parts = futures_util::stream::unfold(0, move |step| {
                                let (first, second) = (first.clone(), second.clone());
                                let mut release = release.clone();
                                async move {
                                    match step {
                                        0 => Some((first, 1)),
                                        1 => {
                                            let _ = release.wait_for(|r| *r).await;
                                            Some((second, 2))
                                        }
                                        _ => None,
                                    }
                                }
                            });
                            let body = StreamBody::new(futures_util::StreamExt::map(parts, |b| {
                                Ok::<_, Infallible>(hyper::body::Frame::data(b))
                            }));
                            page(BodyExt::boxed(body), pages.coding)
                        }
                        _ => page(full(&pages.small), None),
                    })
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

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header(HOST, "www.cloudflare.com")
        .header("accept", "text/html")
        .header(COOKIE, ID_COOKIE)
        .body(Empty::new())
        .expect("a valid request")
}

/// Paths under `/plain/` are requested without an identity cookie: the page passes through.
fn without_cookie(mut req: Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
    req.headers_mut().remove(COOKIE);
    req
}

async fn h1(
    proxy: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn h2c(
    proxy: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("h2c handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// An h2 request on a connection's sender: the URI carries the authority.
fn get_h2(path: &str) -> Request<Empty<Bytes>> {
    let mut req = get(&format!("http://www.cloudflare.com{path}"));
    req.headers_mut().remove(HOST);
    *req.version_mut() = Version::HTTP_2;
    req
}

/// What a browser makes of a body in this coding.
fn decoded(coding: Option<&str>, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match coding {
        None => out.extend_from_slice(body),
        Some("gzip") => {
            flate2::read::MultiGzDecoder::new(body)
                .read_to_end(&mut out)
                .map_err(|e| format!("gzip: {e}"))?;
        }
        Some("br") => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .map_err(|e| format!("br: {e}"))?;
        }
        Some(other) => return Err(format!("no decoder for {other}")),
    }
    Ok(out)
}

fn encoded(coding: Option<&str>, page: &[u8]) -> Bytes {
    match coding {
        None => Bytes::copy_from_slice(page),
        // What origins typically send: nginx's gzip at level 6, ngx_brotli's defaults (quality
        // 6, a 512 KiB window; `KMI_ORIGIN_BROTLI=quality,lgwin` changes them). The proxy's
        // brotli decoder holds a ring buffer as large as the origin's stream needs.
        Some("gzip") => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            e.write_all(page).expect("gzip");
            e.finish().expect("gzip").into()
        }
        Some("br") => {
            let (quality, lgwin) = origin_brotli();
            let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, quality, lgwin);
            e.write_all(page).expect("br");
            e.into_inner().into()
        }
        Some(other) => panic!("no encoder for {other}"),
    }
}

/// The origin's brotli quality and window bits: `KMI_ORIGIN_BROTLI`, by default ngx_brotli's 6,19.
fn origin_brotli() -> (u32, u32) {
    std::env::var("KMI_ORIGIN_BROTLI")
        .ok()
        .and_then(|v| {
            let (q, w) = v.split_once(',')?;
            Some((q.trim().parse().ok()?, w.trim().parse().ok()?))
        })
        .unwrap_or((6, 19))
}

// ---------------------------------------------------------------------------------------------
// Bombs
// ---------------------------------------------------------------------------------------------

fn bomb(mib: u64) -> Bytes {
    let zeros = vec![0u8; 1 << 20];
    let mut e = brotli::CompressorWriter::new(Vec::new(), 1 << 16, 5, 24);
    for _ in 0..mib {
        e.write_all(&zeros).expect("brotli");
    }
    e.into_inner().into()
}

/// Reads a bomb's response as fast as it comes: the compressed bytes received, and whether it
/// ended in an error (as it must) or looked complete.
async fn read_bomb(rsp: Response<hyper::body::Incoming>) -> (u64, bool) {
    let mut body = rsp.into_body();
    let mut n = 0;
    loop {
        match body.frame().await {
            Some(Ok(f)) => n += f.data_ref().map_or(0, |d| d.len() as u64),
            Some(Err(_)) => return (n, true),
            None => return (n, false),
        }
    }
}

/// `timed`: hold the small requests to [`SLOWEST_ALLOWED`] (not in the smoke run, whose debug
/// build on a busy machine says nothing about the release binary's latency).
async fn bombs(dir: &Path, mib: u64, timed: bool) -> Result<Vec<String>, String> {
    let made = Instant::now();
    let bomb = bomb(mib);
    println!(
        "== bombs: two brotli bombs of {} bytes (each inflates to {mib} MiB of zeros; made in {:.1} s) ==",
        bomb.len(),
        made.elapsed().as_secs_f64()
    );
    let (_tx, release) = watch::channel(true);
    let origin = start_origin(Pages {
        small: Bytes::from_static(SMALL_PAGE.as_bytes()),
        bomb,
        whole: Bytes::new(),
        held: Bytes::new(),
        coding: None,
        release,
        held_started: Arc::default(),
    })
    .await
    .map_err(|e| format!("starting the origin: {e}"))?;
    let proxy = start_proxy(dir, origin)?;
    let before = proxy.status_kib("VmHWM")?;
    let started = Instant::now();
    let one = tokio::spawn({
        let addr = proxy.addr;
        async move {
            let mut s = h1(addr).await?;
            let rsp = s
                .send_request(get("/bomb"))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(read_bomb(rsp).await)
        }
    });
    let two = tokio::spawn({
        let addr = proxy.addr;
        async move {
            let mut s = h2c(addr).await?;
            let rsp = s
                .send_request(get_h2("/bomb"))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(read_bomb(rsp).await)
        }
    });
    // Small requests beside the bombs, each on a new connection, until both bombs are done.
    let mut latencies = Vec::new();
    while !(one.is_finished() && two.is_finished()) || latencies.len() < 5 {
        let t = Instant::now();
        let mut s = h1(proxy.addr).await?;
        let rsp = s
            .send_request(get("/small"))
            .await
            .map_err(|e| e.to_string())?;
        let status = rsp.status();
        let body = rsp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if status != StatusCode::OK || !String::from_utf8_lossy(&body).contains(DECORATED) {
            return Err(format!(
                "a small request got {status} and an undecorated page"
            ));
        }
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bombs_done = started.elapsed();
    let outcomes = [
        one.await.map_err(|e| e.to_string())??,
        two.await.map_err(|e| e.to_string())??,
    ];
    let peak = proxy.status_kib("VmHWM")?;
    latencies.sort();
    let slowest = *latencies.last().expect("at least five");
    let median = latencies[latencies.len() / 2];
    println!("proxy peak RSS before: {:.1} MiB", before as f64 / 1024.0);
    println!(
        "proxy peak RSS with two bombs at once: {:.1} MiB (limit {BOMB_RSS_LIMIT_MIB} MiB)",
        peak as f64 / 1024.0
    );
    for (name, (bytes, failed)) in ["HTTP/1.1", "h2c"].iter().zip(outcomes) {
        println!(
            "bomb over {name}: {} after {bytes} compressed bytes to the client",
            if failed {
                "ended in an error"
            } else {
                "came back COMPLETE"
            }
        );
    }
    println!(
        "small requests beside them: {} in {:.2} s, median {:.1} ms, slowest {:.1} ms",
        latencies.len(),
        bombs_done.as_secs_f64(),
        median.as_secs_f64() * 1e3,
        slowest.as_secs_f64() * 1e3
    );
    let mut problems = Vec::new();
    if peak as f64 / 1024.0 >= BOMB_RSS_LIMIT_MIB {
        problems.push(format!("peak RSS {:.1} MiB", peak as f64 / 1024.0));
    }
    if timed && slowest >= SLOWEST_ALLOWED {
        problems.push(format!("a small request took {slowest:?}"));
    }
    if outcomes.iter().any(|&(_, failed)| !failed) {
        problems.push("a bomb came back as a complete response".into());
    }
    Ok(problems)
}

// ---------------------------------------------------------------------------------------------
// Held streams
// ---------------------------------------------------------------------------------------------

async fn streams(
    dir: &Path,
    html: &Bytes,
    coding: Option<&'static str>,
    n: usize,
    connections: usize,
    cookie: bool,
) -> Result<Vec<String>, String> {
    let name = match (coding, cookie) {
        (_, false) => "no ID (passed through)",
        (None, true) => "identity",
        (Some(c), true) => c,
    };
    let request = move |path: &str| {
        let req = get_h2(path);
        if cookie {
            req
        } else {
            without_cookie(req)
        }
    };
    let held = encoded(coding, html);
    let (release_tx, release) = watch::channel(false);
    let held_started = Arc::new(AtomicUsize::new(0));
    let origin = start_origin(Pages {
        small: Bytes::from_static(SMALL_PAGE.as_bytes()),
        bomb: Bytes::new(),
        whole: held.clone(),
        held: held.clone(),
        coding,
        release,
        held_started: Arc::clone(&held_started),
    })
    .await
    .map_err(|e| format!("starting the origin: {e}"))?;
    let proxy = start_proxy(dir, origin)?;

    // Warm-up: whole pages in this coding over h2c, so per-thread state and the allocator's
    // arenas exist before the baseline is read.
    let mut warm = h2c(proxy.addr).await?;
    let mut links = 0;
    for _ in 0..20 {
        let rsp = warm
            .send_request(request("/whole"))
            .await
            .map_err(|e| e.to_string())?;
        let body = rsp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let page = decoded(coding, &body)?;
        links = String::from_utf8_lossy(&page).matches(DECORATED).count();
    }
    if (links == 0) == cookie {
        return Err(format!(
            "{name}: the warm-up page came back with {links} decorated links"
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = proxy.status_kib("VmRSS")?;

    let first_data = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let sender = h2c(proxy.addr).await?;
        for _ in (c..n).step_by(connections) {
            let mut sender = sender.clone();
            let first_data = Arc::clone(&first_data);
            let req = request("/held");
            tasks.push(tokio::spawn(async move {
                let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                let mut body = rsp.into_body();
                let mut bytes = Vec::new();
                let mut first = true;
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| format!("a held page broke off: {e}"))?;
                    if let Ok(data) = frame.into_data() {
                        if first {
                            first_data.fetch_add(1, Ordering::SeqCst);
                            first = false;
                        }
                        bytes.extend_from_slice(&data);
                    }
                }
                Ok::<_, String>(bytes)
            }));
        }
    }
    // Every stream the proxy lets in flight has reached the origin's pause and sent its first
    // bytes; then the proxy settles.
    let in_flight_max = n.min(STREAMS_PER_CONNECTION * connections);
    let deadline = Instant::now() + Duration::from_secs(60);
    while first_data.load(Ordering::SeqCst) < in_flight_max {
        if Instant::now() > deadline {
            return Err(format!(
                "{name}: only {} of {in_flight_max} streams got their first bytes in 60 s",
                first_data.load(Ordering::SeqCst)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Settled: past the pause after which a compressed page's decoder gives its state back.
    tokio::time::sleep(kmi_proxy::body::PARK_AFTER + Duration::from_millis(250)).await;
    let in_flight = held_started.load(Ordering::SeqCst);
    let held_rss = proxy.status_kib("VmRSS")?;
    release_tx.send_replace(true);
    let mut decorated = 0;
    for t in tasks {
        let body = t.await.map_err(|e| e.to_string())??;
        let page = decoded(coding, &body)?;
        if String::from_utf8_lossy(&page).matches(DECORATED).count() == links {
            decorated += 1;
        }
    }
    let added = held_rss.saturating_sub(baseline);
    let per = added as f64 / in_flight.max(1) as f64;
    println!(
        "{name:>8}: {n} streams on {connections} h2c connection(s), {in_flight} in flight at once; \
         RSS {:.1} -> {:.1} MiB (+{:.1} MiB) = {per:.0} KiB per stream in flight; \
         {decorated}/{n} answered with {links} links decorated",
        baseline as f64 / 1024.0,
        held_rss as f64 / 1024.0,
        added as f64 / 1024.0,
    );
    // The issue's target is printed, not asserted: a figure on a shared machine moves by about
    // 20 KiB between runs, and a bench that fails on noise would hide a real failure.
    if cookie {
        println!(
            "{name:>8}: target of {PER_STREAM_LIMIT_KIB} KiB per stream in flight {}",
            if per <= PER_STREAM_LIMIT_KIB {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    let mut problems = Vec::new();
    if decorated != n {
        problems.push(format!("{name}: {decorated} of {n} pages decorated"));
    }
    Ok(problems)
}

fn env_number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{name}={v:?} is not a positive number")),
        Err(_) => Ok(default),
    }
}

fn run() -> Result<(), String> {
    // `cargo bench` passes `--bench`; without it this is `cargo test --benches`: a smoke run.
    let benching = std::env::args().any(|a| a == "--bench");
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |what: &str| only.is_empty() || only.iter().any(|a| a == what);
    let bomb_mib = env_number("KMI_BOMB_MIB", if benching { 2048 } else { 64 })?;
    let n = env_number("KMI_STREAMS", if benching { 200 } else { 20 })? as usize;
    let connections = env_number("KMI_STREAM_CONNECTIONS", 1)? as usize;
    let scratch = Scratch::new("pressure-bench")?;
    let dir = scratch.path().to_path_buf();
    let problems = process::runtime()?.block_on(async {
        let mut problems = Vec::new();
        if wanted("bombs") {
            problems.extend(bombs(&dir, bomb_mib, benching).await?);
        }
        if wanted("streams") {
            let site = common::corpus_dir().join("cloudflare.com.html");
            let html = Bytes::from(
                std::fs::read(&site).map_err(|e| format!("reading {}: {e}", site.display()))?,
            );
            println!(
                "== streams: {} ({} bytes), held halfway through its body by the origin ==",
                site.display(),
                html.len()
            );
            // The baseline first: the same page passed through (no ID), which no rewrite costs.
            problems.extend(streams(&dir, &html, None, n, connections, false).await?);
            for coding in [None, Some("gzip"), Some("br")] {
                problems.extend(streams(&dir, &html, coding, n, connections, true).await?);
            }
        }
        Ok::<_, String>(problems)
    });
    drop(scratch);
    let _ = std::io::stdout().flush();
    let problems = problems?;
    process::outcome(problems)
}

fn main() -> ExitCode {
    process::exit("pressure", run())
}
