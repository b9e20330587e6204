//! Throughput through the whole proxy, in process, per transport: an origin (hyper, HTTP/1.1)
//! serves a real page as `text/html`, plain or pre-compressed; the proxy (`server::spawn`, with a
//! TLS listener whose certificate rcgen makes at start) sits in front of it; keep-alive clients
//! carrying a `km_ai` cookie fetch the page over and over, and every response is checked: status
//! 200, and the decoded page equal to the page as the proxy's rewriter decorates it in process.
//!
//! Modes: plain HTTP/1.1, TLS HTTP/1.1, TLS HTTP/2, h2c, and over plain HTTP/1.1 a gzip and a br
//! page (the proxy decodes, rewrites and re-encodes; the client decodes). For each, one line:
//! requests/s, MB/s of decoded HTML delivered, p50/p99 latency (request sent to body checked).
//! HTTP/1.1 modes use CONCURRENCY connections, one request at a time each; HTTP/2 modes use
//! H2_CONNECTIONS connections carrying CONCURRENCY streams between them.
//!
//! Then "rewrite only", without sockets: decode → `PageRewriter` → encode (the crate's own
//! `coding::{Decoder, Encoder}`, decoding in bounded slices) over the page in 16 KiB chunks, repeated for about a second, for
//! identity, gzip and br.
//!
//! Origin, proxy and clients share one process and its cores: the figures compare transports with
//! each other, they are not the proxy's capacity on a machine of its own.
//!
//! Run:    cargo bench --bench transport
//! Knobs:  KMI_TRANSPORT_REQUESTS=500 (requests per mode, default 2000),
//!         KMI_CORPUS=dir (uses cloudflare.com.html there, else the first *.html page).
//! Exits non-zero if any request fails or any page comes back other than expected. Under
//! `cargo test --benches` (no `--bench` argument) it runs 64 requests per mode as a smoke test.

#[path = "common/codings.rs"]
mod codings;
mod common;
#[path = "../tests/support/pki.rs"]
mod pki;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, COOKIE, HOST};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kmi_proxy::coding::{Coding, Decoder, Encoder};
use kmi_proxy::config::Config;
use kmi_proxy::identity::VisitorId;
use kmi_proxy::rewrite::{charset_of, Page, PageRewriter};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use common::{corpus_dir, most_linked_host};

/// Requests in flight at once in every mode.
const CONCURRENCY: usize = 16;
/// HTTP/2 connections; the streams are spread over them.
const H2_CONNECTIONS: usize = 2;
/// The proxy sees the origin's body in frames of about this size.
const CHUNK: usize = 16 * 1024;
/// How long each "rewrite only" pipeline runs.
const REWRITE_ONLY_FOR: Duration = Duration::from_secs(1);

/// `km_ai` as the browser sends it; its decoded value `Zk9+aB/c3Q==` is the visitor ID.
const ID_COOKIE: &str = "km_ai=Zk9%2BaB%2Fc3Q%3D%3D";
const ID: &str = "Zk9+aB/c3Q==";
/// The parameter as a decorated link carries it.
const ID_IN_URL: &str = "kmi=Zk9%2BaB%2Fc3Q%3D%3D";
const CONTENT_TYPE_HTML: &str = "text/html; charset=utf-8";

/// The page and how it is served and decorated.
struct Site {
    name: String,
    page: Bytes,
    /// The host the page is served as (requests name it; relative links resolve against it).
    host: String,
    partners: Vec<String>,
}

/// Partners for the known corpus page: hosts some of its links point at.
const CLOUDFLARE_PARTNERS: &[&str] = &[
    "dash.cloudflare.com",
    "support.cloudflare.com",
    "community.cloudflare.com",
];

fn site() -> Result<Site, String> {
    let dir = corpus_dir();
    let preferred = dir.join("cloudflare.com.html");
    let path = if preferred.is_file() {
        preferred
    } else {
        let mut pages: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| {
                format!(
                    "the corpus {} cannot be read ({e}); set KMI_CORPUS to a directory of .html pages",
                    dir.display()
                )
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "html"))
            .collect();
        pages.sort();
        pages.into_iter().next().ok_or_else(|| {
            format!(
                "the corpus {} has no .html page; set KMI_CORPUS",
                dir.display()
            )
        })?
    };
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let page = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let (host, partners) = if name == "cloudflare.com.html" {
        (
            "www.cloudflare.com".to_owned(),
            CLOUDFLARE_PARTNERS.iter().map(|p| p.to_string()).collect(),
        )
    } else {
        let host = most_linked_host(&page)
            .ok_or_else(|| format!("{name} has no absolute link to use as a partner"))?;
        ("www.site.test".to_owned(), vec![host])
    };
    Ok(Site {
        name,
        page: page.into(),
        host,
        partners,
    })
}

/// How many times `needle` occurs in `haystack`.
fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

// ---------------------------------------------------------------------------------------------
// Origin and proxy
// ---------------------------------------------------------------------------------------------

fn decompress(coding: Option<Coding>, data: &[u8]) -> std::io::Result<Vec<u8>> {
    match coding {
        None => Ok(data.to_vec()),
        Some(c) => codings::decompress(c, data),
    }
}

/// An HTTP/1.1 origin serving the page at `/`, gzip-compressed at `/gzip` and br at `/br`.
async fn start_origin(page: Bytes) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let gzip = Bytes::from(codings::origin(Coding::Gzip, &page));
    let br = Bytes::from(codings::origin(Coding::Brotli, &page));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (page, gzip, br) = (page.clone(), gzip.clone(), br.clone());
            let service = service_fn(move |req: Request<Incoming>| {
                let (body, coding) = match req.uri().path() {
                    "/gzip" => (gzip.clone(), Some("gzip")),
                    "/br" => (br.clone(), Some("br")),
                    _ => (page.clone(), None),
                };
                async move {
                    let mut rsp = Response::new(Full::new(body));
                    rsp.headers_mut()
                        .insert(CONTENT_TYPE, CONTENT_TYPE_HTML.parse().unwrap());
                    if let Some(c) = coding {
                        rsp.headers_mut()
                            .insert(CONTENT_ENCODING, c.parse().unwrap());
                    }
                    Ok::<_, Infallible>(rsp)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn proxy_config(site: &Site, origin: SocketAddr, cert: &pki::Leaf) -> Result<Config, String> {
    let text = format!(
        r#"
listen = "127.0.0.1:0"
listen_tls = "127.0.0.1:0"
upstream = "http://{origin}"

[tls]
cert = {cert}
key = {key}

[[partner]]
name = "bench"
domains = {partners}
"#,
        cert = toml::Value::String(cert.cert_path.display().to_string()),
        key = toml::Value::String(cert.key_path.display().to_string()),
        partners = toml::Value::Array(
            site.partners
                .iter()
                .map(|p| toml::Value::String(p.clone()))
                .collect()
        ),
    );
    Config::parse(&text, "transport bench").map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    Plain,
    Tls,
}

#[derive(Clone, Copy)]
struct Mode {
    label: &'static str,
    wire: Wire,
    version: Version,
    coding: Option<Coding>,
}

const MODES: [Mode; 6] = [
    Mode {
        label: "plain HTTP/1.1",
        wire: Wire::Plain,
        version: Version::HTTP_11,
        coding: None,
    },
    Mode {
        label: "TLS HTTP/1.1",
        wire: Wire::Tls,
        version: Version::HTTP_11,
        coding: None,
    },
    Mode {
        label: "TLS HTTP/2",
        wire: Wire::Tls,
        version: Version::HTTP_2,
        coding: None,
    },
    Mode {
        label: "h2c",
        wire: Wire::Plain,
        version: Version::HTTP_2,
        coding: None,
    },
    Mode {
        label: "HTTP/1.1 gzip",
        wire: Wire::Plain,
        version: Version::HTTP_11,
        coding: Some(Coding::Gzip),
    },
    Mode {
        label: "HTTP/1.1 br",
        wire: Wire::Plain,
        version: Version::HTTP_11,
        coding: Some(Coding::Brotli),
    },
];

/// What every client task shares in one mode.
struct Run {
    mode: Mode,
    host: String,
    expected: Bytes,
    /// Requests handed out so far; a task stops once it reaches `total`.
    next: AtomicUsize,
    total: usize,
    latencies: Mutex<Vec<Duration>>,
    failures: Mutex<Vec<String>>,
}

impl Run {
    fn take(&self) -> bool {
        self.next.fetch_add(1, Ordering::Relaxed) < self.total
    }

    fn request(&self) -> Request<Empty<Bytes>> {
        let path = match self.mode.coding {
            None => "/",
            Some(Coding::Gzip) => "/gzip",
            Some(_) => "/br",
        };
        let mut builder = Request::get(path);
        if self.mode.version == Version::HTTP_2 {
            // HTTP/2 names the site in `:authority`, no Host field.
            let scheme = match self.mode.wire {
                Wire::Plain => "http",
                Wire::Tls => "https",
            };
            builder =
                Request::get(format!("{scheme}://{}{path}", self.host)).version(Version::HTTP_2);
        } else {
            builder = builder.header(HOST, &self.host);
        }
        builder = builder
            .header(COOKIE, ID_COOKIE)
            .header(ACCEPT, "text/html,application/xhtml+xml,*/*;q=0.8");
        if let Some(c) = self.mode.coding {
            builder = builder.header(ACCEPT_ENCODING, c.as_str());
        }
        builder.body(Empty::new()).expect("a valid request")
    }

    /// Checks one response; the problem, if any.
    async fn check(&self, rsp: Response<Incoming>) -> Result<(), String> {
        if rsp.status() != StatusCode::OK {
            return Err(format!("status {}", rsp.status()));
        }
        let coding = rsp
            .headers()
            .get(CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if coding.as_deref() != self.mode.coding.map(Coding::as_str) {
            return Err(format!("content-encoding {coding:?}"));
        }
        let body = rsp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let page =
            decompress(self.mode.coding, &body).map_err(|e| format!("decoding the body: {e}"))?;
        if page != self.expected {
            return Err(format!(
                "the page differs from the expected decorated page ({} bytes, expected {})",
                page.len(),
                self.expected.len()
            ));
        }
        Ok(())
    }

    fn record(&self, latencies: Vec<Duration>, failure: Option<String>) {
        self.latencies.lock().unwrap().extend(latencies);
        if let Some(f) = failure {
            self.failures.lock().unwrap().push(f);
        }
    }
}

async fn connect(
    addr: SocketAddr,
    tls: Option<(&tokio_rustls::TlsConnector, &str)>,
) -> Result<Box<dyn Io>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(Box::new(tcp)),
        Some((connector, name)) => {
            let name = rustls_pki_types::ServerName::try_from(name.to_owned())
                .map_err(|e| format!("server name: {e}"))?;
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            Ok(Box::new(stream))
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One HTTP/1.1 keep-alive connection sending requests one after another.
async fn h1_client(run: Arc<Run>, io: Box<dyn Io>) {
    let mut latencies = Vec::new();
    let failure = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
        tokio::spawn(conn);
        while run.take() {
            let started = Instant::now();
            sender
                .ready()
                .await
                .map_err(|e| format!("connection: {e}"))?;
            let rsp = sender
                .send_request(run.request())
                .await
                .map_err(|e| format!("request: {e}"))?;
            run.check(rsp).await?;
            latencies.push(started.elapsed());
        }
        Ok::<(), String>(())
    }
    .await
    .err();
    run.record(latencies, failure);
}

/// One HTTP/2 stream at a time on a shared connection.
async fn h2_stream(
    run: Arc<Run>,
    mut sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
) {
    let mut latencies = Vec::new();
    let failure = async {
        while run.take() {
            let started = Instant::now();
            sender
                .ready()
                .await
                .map_err(|e| format!("connection: {e}"))?;
            let rsp = sender
                .send_request(run.request())
                .await
                .map_err(|e| format!("request: {e}"))?;
            run.check(rsp).await?;
            latencies.push(started.elapsed());
        }
        Ok::<(), String>(())
    }
    .await
    .err();
    run.record(latencies, failure);
}

struct Outcome {
    requests: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    failures: Vec<String>,
}

async fn measure(
    mode: Mode,
    requests: usize,
    site: &Site,
    expected: &Bytes,
    addrs: (SocketAddr, SocketAddr),
    tls: &tokio_rustls::TlsConnector,
) -> Outcome {
    let run = Arc::new(Run {
        mode,
        host: site.host.clone(),
        expected: expected.clone(),
        next: AtomicUsize::new(0),
        total: requests,
        latencies: Mutex::new(Vec::with_capacity(requests)),
        failures: Mutex::new(Vec::new()),
    });
    let (addr, tls_name) = match mode.wire {
        Wire::Plain => (addrs.0, None),
        Wire::Tls => (addrs.1, Some((tls, site.host.as_str()))),
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    if mode.version == Version::HTTP_2 {
        for _ in 0..H2_CONNECTIONS {
            let io = match connect(addr, tls_name).await {
                Ok(io) => io,
                Err(e) => {
                    run.record(Vec::new(), Some(e));
                    continue;
                }
            };
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
            {
                Ok((sender, conn)) => {
                    tokio::spawn(conn);
                    for _ in 0..CONCURRENCY / H2_CONNECTIONS {
                        tasks.push(tokio::spawn(h2_stream(Arc::clone(&run), sender.clone())));
                    }
                }
                Err(e) => run.record(Vec::new(), Some(format!("HTTP/2 handshake: {e}"))),
            }
        }
    } else {
        for _ in 0..CONCURRENCY {
            match connect(addr, tls_name).await {
                Ok(io) => tasks.push(tokio::spawn(h1_client(Arc::clone(&run), io))),
                Err(e) => run.record(Vec::new(), Some(e)),
            }
        }
    }
    for t in tasks {
        if let Err(e) = t.await {
            run.record(Vec::new(), Some(format!("client task: {e}")));
        }
    }
    let elapsed = started.elapsed();
    let mut latencies = std::mem::take(&mut *run.latencies.lock().unwrap());
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    let mut failures = std::mem::take(&mut *run.failures.lock().unwrap());
    if latencies.len() != requests {
        failures.push(format!(
            "{} of {requests} requests completed",
            latencies.len()
        ));
    }
    Outcome {
        requests: latencies.len(),
        elapsed,
        p50: at(0.50),
        p99: at(0.99),
        failures,
    }
}

// ---------------------------------------------------------------------------------------------
// Rewrite only
// ---------------------------------------------------------------------------------------------

/// One page through decode → rewrite → encode, as the proxy's body adapter drives it.
fn pipeline(config: &Config, site: &Site, coding: Option<Coding>, input: &[u8]) -> Vec<u8> {
    let page = Page {
        url: url::Url::parse(&format!("http://{}/", site.host)).expect("a page URL"),
        charset: charset_of(CONTENT_TYPE_HTML).expect("UTF-8"),
        script: None,
        memory_limit: config.memory_limit,
    };
    let id = VisitorId::new(ID).expect("a valid ID");
    let mut rewriter = PageRewriter::new(Arc::clone(&config.decorator), Some(id), page);
    let mut codec = coding.map(|c| (Decoder::new(c), Encoder::new(c)));
    let mut out = Vec::with_capacity(input.len() + input.len() / 8);
    for chunk in input.chunks(CHUNK) {
        match &mut codec {
            None => out.extend_from_slice(&rewriter.write(chunk)),
            Some((decoder, encoder)) => {
                // Slice by slice, as the body adapter decodes.
                let mut rest = chunk;
                loop {
                    let plain = decoder.decode(&mut rest).expect("a valid compressed page");
                    if plain.is_empty() {
                        break;
                    }
                    let rewritten = rewriter.write(&plain);
                    if !rewritten.is_empty() {
                        out.extend_from_slice(&encoder.write(&rewritten).expect("encoding"));
                    }
                }
            }
        }
    }
    match &mut codec {
        None => out.extend_from_slice(&rewriter.end()),
        Some((decoder, encoder)) => {
            decoder.finish().expect("a complete compressed page");
            let last = rewriter.end();
            if !last.is_empty() {
                out.extend_from_slice(&encoder.write(&last).expect("encoding"));
            }
            out.extend_from_slice(&encoder.finish().expect("encoding"));
        }
    }
    out
}

/// MB/s of decoded HTML through the pipeline, after checking one run's output.
fn rewrite_only(
    config: &Config,
    site: &Site,
    coding: Option<Coding>,
    expected: &[u8],
    budget: Duration,
) -> Result<f64, String> {
    let input = match coding {
        None => site.page.clone(),
        Some(c) => codings::origin(c, &site.page).into(),
    };
    let once = pipeline(config, site, coding, &input);
    let decoded = decompress(coding, &once).map_err(|e| format!("decoding: {e}"))?;
    if decoded != expected {
        return Err("the in-process pipeline's page differs from the expected page".into());
    }
    let started = Instant::now();
    let mut pages = 0u64;
    while started.elapsed() < budget || pages == 0 {
        std::hint::black_box(pipeline(config, site, coding, std::hint::black_box(&input)));
        pages += 1;
    }
    Ok(pages as f64 * site.page.len() as f64 / started.elapsed().as_secs_f64() / 1e6)
}

// ---------------------------------------------------------------------------------------------

fn requests_per_mode(benching: bool) -> Result<usize, String> {
    match std::env::var("KMI_TRANSPORT_REQUESTS") {
        Ok(v) => v
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("KMI_TRANSPORT_REQUESTS={v:?} is not a positive number")),
        Err(_) => Ok(if benching { 2000 } else { 64 }),
    }
}

fn run() -> Result<(), String> {
    // `cargo bench` passes `--bench`; without it this is `cargo test --benches`: a smoke run.
    let benching = std::env::args().any(|a| a == "--bench");
    let requests = requests_per_mode(benching)?;
    let site = site()?;
    let ca = pki::Ca::new("kmi transport bench CA");
    let cert = ca.leaf(&[site.host.as_str()]);
    let connector =
        tokio_rustls::TlsConnector::from(pki::client_config(ca.roots(), &["h2", "http/1.1"]));
    let h1_connector =
        tokio_rustls::TlsConnector::from(pki::client_config(ca.roots(), &["http/1.1"]));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting tokio: {e}"))?;
    let mut problems = Vec::new();
    runtime.block_on(async {
        let origin = start_origin(site.page.clone())
            .await
            .map_err(|e| format!("starting the origin: {e}"))?;
        let config = proxy_config(&site, origin, &cert)?;
        let expected = Bytes::from(pipeline(&config, &site, None, &site.page));
        let decorated = count(&expected, ID_IN_URL.as_bytes());
        println!(
            "{}: {} bytes, {decorated} links decorated for partners {:?} ({} bytes); \
             {requests} requests per mode, {CONCURRENCY} in flight ({H2_CONNECTIONS} connections \
             for HTTP/2)",
            site.name,
            site.page.len(),
            site.partners,
            expected.len(),
        );
        if decorated == 0 {
            return Err("no link of the page is decorated: nothing would be measured".to_owned());
        }
        let proxy = kmi_proxy::server::spawn(config)
            .await
            .map_err(|e| format!("starting the proxy: {e}"))?;
        let addrs = (proxy.addr, proxy.tls_addr.ok_or("no TLS listener")?);
        for mode in MODES {
            let tls = if mode.version == Version::HTTP_2 {
                &connector
            } else {
                &h1_connector
            };
            let o = measure(mode, requests, &site, &expected, addrs, tls).await;
            let secs = o.elapsed.as_secs_f64();
            println!(
                "{:<16} {:>8.0} req/s {:>8.1} MB/s   p50 {:>6.2} ms   p99 {:>6.2} ms   ({} requests in {:.2} s)",
                mode.label,
                o.requests as f64 / secs,
                o.requests as f64 * expected.len() as f64 / secs / 1e6,
                o.p50.as_secs_f64() * 1e3,
                o.p99.as_secs_f64() * 1e3,
                o.requests,
                secs,
            );
            for f in o.failures.iter().take(5) {
                problems.push(format!("{}: {f}", mode.label));
            }
            if o.failures.len() > 5 {
                problems.push(format!(
                    "{}: ... and {} more failures",
                    mode.label,
                    o.failures.len() - 5
                ));
            }
        }
        proxy.stop().await;
        Ok::<_, String>(())
    })?;

    // The same configuration the proxy ran with, for the in-process pipelines.
    let config = proxy_config(&site, "127.0.0.1:9".parse().unwrap(), &cert)?;
    let expected = pipeline(&config, &site, None, &site.page);
    let budget = if benching {
        REWRITE_ONLY_FOR
    } else {
        Duration::from_millis(100)
    };
    for (label, coding) in [
        ("identity", None),
        ("gzip", Some(Coding::Gzip)),
        ("br", Some(Coding::Brotli)),
    ] {
        match rewrite_only(&config, &site, coding, &expected, budget) {
            Ok(mb) => println!(
                "rewrite only {label:<8} {mb:>8.1} MB/s (decode → rewrite → encode, {} KiB chunks)",
                CHUNK / 1024
            ),
            Err(e) => problems.push(format!("rewrite only {label}: {e}")),
        }
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n  "))
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("transport bench FAILED:\n  {e}");
            ExitCode::FAILURE
        }
    }
}
