//! Peak memory of the real proxy while it streams one very large page: an origin in this process
//! streams a generated 256 MiB catalogue page (generated on the fly, never held), the
//! `kmi-proxy` binary runs as a child process in front of it, and a client reads the decorated
//! page through the proxy counting bytes and decorated links as they pass (never keeping them).
//! The proxy's `VmHWM` (peak resident set) is then read from `/proc`.
//!
//! Run:    cargo bench --bench memory
//! Quick:  KMI_MEMORY_PAGE_MIB=16 cargo bench --bench memory
//!
//! Exits non-zero if the proxy's peak RSS reaches 64 MiB or the page came back wrong (not the
//! input length plus exactly the bytes the decorations add, or not every partner link decorated).
//! Under `cargo test --benches` (no `--bench` argument) it runs once on a 4 MiB page as a smoke test.
//! Linux only: it reads `/proc/<pid>/status`.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

#[path = "common/process.rs"]
mod process;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use process::{ProxyProcess, Scratch};

/// The proxy must stay below this however large the page.
const RSS_LIMIT_MIB: f64 = 64.0;

/// `km_ai` as the browser sends it; its decoded value `Zk9+aB/c3Q==` goes into links encoded as
/// [`ID_IN_URL`].
const ID_COOKIE: &str = "Zk9%2BaB%2Fc3Q%3D%3D";
const ID_IN_URL: &str = "Zk9%2BaB%2Fc3Q%3D%3D";

const HEAD: &str = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<title>Catalogue</title>\n<link rel=\"stylesheet\" href=\"/static/site.css\">\n</head>\n<body>\n\
<main class=\"catalogue\">\n";
const FOOT: &str = "</main>\n</body>\n</html>\n";

/// One product card, repeated to fill the page. Partners are `checkout.partner.com` and
/// `*.partner.net`: three links here point at them (one with a query, one without, one
/// scheme-relative with a fragment); the others are local, other sites, a lookalike, a `mailto:`,
/// and partner URLs inside a script and a comment, which are not links. The decorated tags have
/// single spaces between attributes, so the rewriter's re-serialisation of a changed start tag
/// adds nothing but the parameter.
const BLOCK: &str = r##"<article class="product" id="p-4711">
  <header>
    <h2 class="product__title"><a href="/products/4711" class="product__link">Walnut desk organiser &mdash; large</a></h2>
    <p class="product__meta">Sold by <a href="https://www.example.org/sellers/woodworks" rel="nofollow">Woodworks &amp; Co.</a> &middot; 4.6 <span class="stars" aria-label="4.6 out of 5">&#9733;&#9733;&#9733;&#9733;&#9734;</span></p>
  </header>
  <img src="/img/4711-640.jpg" srcset="/img/4711-640.jpg 1x, /img/4711-1280.jpg 2x" alt="A walnut desk organiser with three compartments" width="640" height="480" loading="lazy">
  <p>Hand-finished walnut with felt-lined trays. Ships in 2&ndash;3 days. See the <a href="https://www.example.org/care-guide#wood">care guide</a> or write to <a href="mailto:help@partner.com">help@partner.com</a>.</p>
  <ul class="product__actions">
    <li><a class="button button--primary" href="https://checkout.partner.com/cart/add?item=4711&amp;qty=1" data-track="buy">Buy now</a></li>
    <li><a href="https://shop.partner.net/compare/4711" data-track="compare">Compare prices</a></li>
    <li><a href="//help.partner.net/returns#window" data-track="returns">Returns</a></li>
    <li><a href="https://partner.com.lookalike.example/deal" rel="nofollow">Not a partner</a></li>
  </ul>
  <script>window.dataLayer&&dataLayer.push({"event":"impression","sku":"4711","html":"<a href=\"https://checkout.partner.com/\">"});</script>
  <!-- legacy: <a href="https://checkout.partner.com/old">old cart</a> -->
</article>
"##;

/// Partner links per block, and what decorating them adds: `&amp;kmi=<id>` to the one with a
/// query (the rewriter writes `&` as `&amp;`), `?kmi=<id>` to the two without.
const DECORATED_PER_BLOCK: u64 = 3;
const GROWTH_PER_BLOCK: u64 = ("&amp;kmi=".len() + 2 * "?kmi=".len() + 3 * ID_IN_URL.len()) as u64;

/// Blocks per frame the origin sends: frames of about 80 KiB.
const BLOCKS_PER_FRAME: u64 = 48;

/// The page as the origin will send it: sizes only, its bytes are made as they are sent.
#[derive(Clone, Copy)]
struct Plan {
    total: u64,
    blocks: u64,
    padding: u64,
}

impl Plan {
    fn new(total: u64) -> Plan {
        let fixed = (HEAD.len() + FOOT.len()) as u64;
        assert!(
            total > fixed + BLOCK.len() as u64,
            "the page must hold at least one block"
        );
        let blocks = (total - fixed) / BLOCK.len() as u64;
        Plan {
            total,
            blocks,
            padding: total - fixed - blocks * BLOCK.len() as u64,
        }
    }

    fn expected_out(&self) -> u64 {
        self.total + self.blocks * GROWTH_PER_BLOCK
    }

    fn expected_links(&self) -> u64 {
        self.blocks * DECORATED_PER_BLOCK
    }
}

/// The origin's response body: the head, then frames of blocks that all share one buffer, then
/// whitespace padding to the exact size and the foot.
struct PageBody {
    head: Option<Bytes>,
    frame: Bytes,
    full_frames: u64,
    last_frame: Option<Bytes>,
    foot: Option<Bytes>,
}

impl PageBody {
    fn new(plan: Plan) -> PageBody {
        let frame = Bytes::from(BLOCK.repeat(BLOCKS_PER_FRAME as usize));
        let rest = (plan.blocks % BLOCKS_PER_FRAME) as usize * BLOCK.len();
        let mut foot = "\n".repeat(plan.padding as usize);
        foot.push_str(FOOT);
        PageBody {
            head: Some(Bytes::from_static(HEAD.as_bytes())),
            last_frame: (rest > 0).then(|| frame.slice(..rest)),
            frame,
            full_frames: plan.blocks / BLOCKS_PER_FRAME,
            foot: Some(Bytes::from(foot)),
        }
    }
}

impl Body for PageBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let next = if let Some(head) = self.head.take() {
            Some(head)
        } else if self.full_frames > 0 {
            self.full_frames -= 1;
            Some(self.frame.clone())
        } else if let Some(last) = self.last_frame.take() {
            Some(last)
        } else {
            self.foot.take()
        };
        Poll::Ready(next.map(|b| Ok(Frame::data(b))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Serves the page on every request until the process ends.
async fn start_origin(plan: Plan) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service_fn(move |_req| async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header(CONTENT_TYPE, "text/html; charset=utf-8")
                        .header(CONTENT_LENGTH, plan.total)
                        .body(PageBody::new(plan))
                        .expect("a valid response"),
                )
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Ok(addr)
}

/// Starts the proxy in front of `origin`, with the catalogue's partners.
fn start_proxy(dir: &Path, origin: SocketAddr) -> Result<ProxyProcess, String> {
    ProxyProcess::start(
        dir,
        |addr| {
            format!(
                "listen = \"{addr}\"\nupstream = \"http://{origin}\"\n\n\
                 [identity]\ncookies = [\"km_ai\"]\n\n\
                 [[partner]]\nname = \"shop\"\ndomains = [\"checkout.partner.com\", \"*.partner.net\"]\n"
            )
        },
        "warn",
    )
}

/// Counts the occurrences of `needle` in a stream of chunks without keeping them: a match is
/// counted in the chunk where it ends, with the previous `needle.len() - 1` bytes kept to see
/// matches that straddle two chunks.
struct Occurrences {
    needle: &'static str,
    tail: Vec<u8>,
    count: u64,
}

impl Occurrences {
    fn new(needle: &'static str) -> Occurrences {
        Occurrences {
            needle,
            tail: Vec::new(),
            count: 0,
        }
    }

    fn feed(&mut self, chunk: &str) {
        let keep = self.needle.len() - 1;
        let head = &chunk.as_bytes()[..chunk.len().min(keep)];
        let mut seam = std::mem::take(&mut self.tail);
        seam.extend_from_slice(head);
        self.count += count_in(&seam, self.needle) + chunk.matches(self.needle).count() as u64;
        // The seam's matches all started in the old tail; the new tail is the last bytes seen.
        if chunk.len() >= keep {
            self.tail = chunk.as_bytes()[chunk.len() - keep..].to_vec();
        } else {
            let start = seam.len().saturating_sub(keep);
            self.tail = seam[start..].to_vec();
        }
    }
}

/// Matches in a seam that are not wholly inside its chunk part. The seam is ASCII-only whenever a
/// match could be in it, since the page is ASCII.
fn count_in(seam: &[u8], needle: &str) -> u64 {
    seam.windows(needle.len())
        .filter(|w| *w == needle.as_bytes())
        .count() as u64
}

/// What came back through the proxy.
struct Received {
    status: StatusCode,
    bytes: u64,
    decorated: u64,
    any_kmi: u64,
    elapsed: Duration,
}

async fn fetch(proxy: SocketAddr) -> Result<Received, String> {
    let stream = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connecting to the proxy: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with the proxy: {e}"))?;
    tokio::spawn(connection);
    let request = Request::get("/catalogue")
        .header(HOST, proxy.to_string())
        .header(COOKIE, format!("theme=dark; km_ai={ID_COOKIE}"))
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let started = Instant::now();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("requesting the page: {e}"))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut decorated = Occurrences::new(DECORATED_NEEDLE);
    let mut any_kmi = Occurrences::new("kmi=");
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the page after {bytes} bytes: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        // The page is ASCII, so every chunk must be too, wherever the proxy split it.
        let text = std::str::from_utf8(&data)
            .ok()
            .filter(|t| t.is_ascii())
            .ok_or_else(|| format!("non-ASCII bytes after {bytes} bytes"))?;
        decorated.feed(text);
        any_kmi.feed(text);
        bytes += data.len() as u64;
    }
    Ok(Received {
        status,
        bytes,
        decorated: decorated.count,
        any_kmi: any_kmi.count,
        elapsed: started.elapsed(),
    })
}

const DECORATED_NEEDLE: &str = "kmi=Zk9%2BaB%2Fc3Q%3D%3D";

fn page_mib() -> Result<u64, String> {
    // `cargo bench` passes `--bench`; without it this is `cargo test --benches`: a smoke run.
    let benching = std::env::args().any(|a| a == "--bench");
    match std::env::var("KMI_MEMORY_PAGE_MIB") {
        Ok(v) => v
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("KMI_MEMORY_PAGE_MIB={v:?} is not a positive number of MiB")),
        Err(_) => Ok(if benching { 256 } else { 4 }),
    }
}

fn run() -> Result<(), String> {
    assert_eq!(DECORATED_NEEDLE, format!("kmi={ID_IN_URL}"));
    let mib = page_mib()?;
    let plan = Plan::new(mib * 1024 * 1024);
    let dir = Scratch::new("memory-bench")?;
    let outcome = process::runtime()?.block_on(async {
        let origin = start_origin(plan)
            .await
            .map_err(|e| format!("starting the origin: {e}"))?;
        let proxy = start_proxy(dir.path(), origin)?;
        let idle = proxy.status_mib("VmHWM")?;
        let got = fetch(proxy.addr).await?;
        let peak = proxy.status_mib("VmHWM")?;
        drop(proxy);
        Ok::<_, String>((idle, got, peak))
    });
    drop(dir);
    let (idle, got, peak) = outcome?;

    let mb_per_s = got.bytes as f64 / got.elapsed.as_secs_f64() / 1e6;
    println!(
        "page of {mib} MiB: {} bytes in, {} bytes out, {} links decorated, {:.2} s",
        plan.total,
        got.bytes,
        got.decorated,
        got.elapsed.as_secs_f64()
    );
    println!("proxy peak RSS before the request: {idle:.1} MiB");
    println!("peak RSS: {peak:.1} MiB for a {mib} MiB page (throughput {mb_per_s:.0} MB/s)");
    let _ = std::io::stdout().flush();

    let mut problems = Vec::new();
    if got.status != StatusCode::OK {
        problems.push(format!("status {} instead of 200", got.status));
    }
    if got.bytes != plan.expected_out() {
        problems.push(format!(
            "{} bytes received, expected {} ({} in + {} blocks x {GROWTH_PER_BLOCK} bytes of decoration)",
            got.bytes,
            plan.expected_out(),
            plan.total,
            plan.blocks
        ));
    }
    if got.decorated != plan.expected_links() || got.any_kmi != plan.expected_links() {
        problems.push(format!(
            "{} links carry this visitor's kmi and {} carry any kmi; expected {}",
            got.decorated,
            got.any_kmi,
            plan.expected_links()
        ));
    }
    if peak >= RSS_LIMIT_MIB {
        problems.push(format!(
            "peak RSS {peak:.1} MiB is not below {RSS_LIMIT_MIB} MiB"
        ));
    }
    process::outcome(problems)
}

fn main() -> ExitCode {
    process::exit("memory", run())
}
