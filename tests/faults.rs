//! Faults at the byte level: origins that break the HTTP they send (a head cut off, a reset in
//! the middle of a body, a wrong or contradictory `Content-Length`, broken chunked framing, a
//! 10 MiB attribute, a page that never ends) and clients that misbehave (garbage instead of a request, a request one
//! byte at a time, a client that walks away from an endless page). After every fault the proxy
//! must still serve the next request normally.
//!
//! The misbehaving origin is a plain `TcpListener` on `127.0.0.1:0` that reads a request head and
//! then writes exactly the bytes a test scripts; the misbehaving clients are plain `TcpStream`s.
//! As everywhere in this suite, nothing sleeps to synchronise (the one `sleep` paces a client) and
//! every wait is bounded by `within()`.
//!
//! Covered elsewhere, not repeated here:
//! - origin down (502), origin silent before its head (504), origin closing before answering
//!   (502): `tests/proxy.rs` `origin_down_is_a_502_with_a_one_line_reason_naming_the_upstream`,
//!   `silent_origin_is_a_504_and_the_proxy_carries_on`,
//!   `origin_hanging_up_before_answering_is_a_502`;
//! - an origin that stalls for ever after its head (`upstream_body_idle`) or before it
//!   (`upstream_response`): `tests/operations.rs`
//!   `stalled_origin_body_ends_the_response_in_an_error_after_upstream_body_idle` and
//!   `upstream_response_timeout_starts_after_a_slow_upload_and_catches_a_silent_origin`;
//! - an origin body broken off with an error (as hyper sees it) on a rewritten or passed-through
//!   body: `tests/proxy.rs` `origin_breaking_off_*`;
//! - a client hanging up mid-page while the origin is still sending, and the origin being let go:
//!   `tests/proxy.rs` `client_hanging_up_mid_page_releases_the_origin_and_the_proxy_carries_on`;
//! - slowloris (a head that never completes, or nothing at all): `tests/operations.rs`
//!   `slow_request_head_is_cut_off_after_client_header_while_others_are_served`,
//!   `connection_that_sends_nothing_is_cut_off_after_client_header`.

mod support;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use kmi_proxy::server::Running;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The healthy page the raw origin serves at `/`: two partner links, one other site, one
/// relative link.
const PAGE: &str = r#"<!DOCTYPE html>
<html><head><title>Shop</title></head>
<body>
<a href="https://checkout.partner.com/pay?order=42">Pay</a>
<a href="https://eu.shop.partner.net/cart">Cart</a>
<a href="https://www.elsewhere.test/">Elsewhere</a>
<a href="/local">Local</a>
</body></html>
"#;

/// `PAGE` as the proxy sends it to visitor `id`.
fn decorated(id: &str) -> String {
    let page = PAGE
        .replace(
            r#""https://checkout.partner.com/pay?order=42""#,
            &format!(r#""https://checkout.partner.com/pay?order=42&amp;kmi={id}""#),
        )
        .replace(
            r#""https://eu.shop.partner.net/cart""#,
            &format!(r#""https://eu.shop.partner.net/cart?kmi={id}""#),
        );
    assert_ne!(page, PAGE);
    page
}

/// Half a page: a partner link, then a paragraph cut off in the middle.
const HALF_PAGE: &str =
    "<!DOCTYPE html><html><body><a href=\"https://checkout.partner.com/\">Pay</a><p>Half a pa";

// ---------------------------------------------------------------------------------------------
// The raw origin
// ---------------------------------------------------------------------------------------------

/// A request as the raw origin read it off the socket.
#[derive(Debug, Clone)]
struct RawRequest {
    head: String,
    body: Vec<u8>,
}

impl RawRequest {
    fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    fn path(&self) -> &str {
        self.request_line().split(' ').nth(1).unwrap_or("")
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type Script = Box<dyn FnMut(TcpStream) -> BoxFuture + Send>;

/// Builds a raw origin: each route is a script that gets the connection once the request (head,
/// and body if it has a `Content-Length`) has been read, and writes whatever it likes. `/` serves
/// `PAGE` correctly (with `Connection: close`) unless a route replaces it; other paths get a 404.
struct RawOriginBuilder {
    routes: Vec<(String, Script)>,
}

fn raw_origin() -> RawOriginBuilder {
    RawOriginBuilder { routes: Vec::new() }
}

struct RawOrigin {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<RawRequest>>>,
}

impl RawOriginBuilder {
    fn route<F, Fut>(mut self, path: &str, mut script: F) -> RawOriginBuilder
    where
        F: FnMut(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.routes.push((
            path.to_owned(),
            Box::new(move |stream| Box::pin(script(stream)) as BoxFuture),
        ));
        self
    }

    async fn start(self) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the raw origin");
        let addr = listener.local_addr().expect("the raw origin's address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        let routes = Arc::new(Mutex::new(self.routes));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                let routes = Arc::clone(&routes);
                tokio::spawn(async move {
                    // A pooled client may open a connection it never uses.
                    let Some(request) = read_request(&mut stream).await else {
                        return;
                    };
                    let path = request.path().to_owned();
                    log.lock().unwrap().push(request);
                    let scripted = {
                        let mut routes = routes.lock().unwrap();
                        match routes.iter_mut().find(|(p, _)| *p == path) {
                            Some((_, script)) => Ok(script(stream)),
                            None => Err(stream),
                        }
                    };
                    match scripted {
                        Ok(script) => script.await,
                        Err(stream) if path == "/" => {
                            answer(
                                stream,
                                "200 OK",
                                "text/html; charset=utf-8",
                                PAGE.as_bytes(),
                            )
                            .await;
                        }
                        Err(stream) => {
                            answer(stream, "404 Not Found", "text/plain", b"no such route\n").await;
                        }
                    }
                });
            }
        });
        RawOrigin { addr, received }
    }
}

impl RawOrigin {
    fn requests(&self) -> Vec<RawRequest> {
        self.received.lock().unwrap().clone()
    }

    fn last_request(&self) -> RawRequest {
        self.requests()
            .pop()
            .expect("the raw origin has received no request")
    }
}

/// Reads one request: the head, then as many body bytes as its `Content-Length` says. `None` if
/// the connection ends first.
async fn read_request(stream: &mut TcpStream) -> Option<RawRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Some(RawRequest { head, body })
}

/// A correct response with `Content-Length` and `Connection: close`; then the origin closes.
async fn answer(mut stream: TcpStream, status: &str, content_type: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let _ = stream.shutdown().await;
}

/// Closes with a TCP RST instead of a FIN: `SO_LINGER` 0, then close.
fn reset(stream: TcpStream) {
    stream.set_zero_linger().expect("set SO_LINGER to 0");
    drop(stream);
}

/// Waits until the peer closes or resets the connection, ignoring anything it sends.
async fn wait_for_close(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// A script that writes `bytes` and then keeps the connection open until the proxy lets go of
/// it, so that a response the proxy judges broken is broken by its bytes, not by a close.
fn writes_then_waits(bytes: impl Into<Bytes>) -> impl FnMut(TcpStream) -> BoxFuture + Send {
    let bytes = bytes.into();
    move |mut stream| {
        let bytes = bytes.clone();
        Box::pin(async move {
            if stream.write_all(&bytes).await.is_ok() {
                wait_for_close(&mut stream).await;
            }
        })
    }
}

/// How a [`breaks_off`] script ends its connection.
#[derive(Clone, Copy)]
enum Ending {
    /// TCP RST (`SO_LINGER` 0).
    Reset,
    /// An orderly close (FIN).
    Close,
}

/// A script that writes `bytes`, waits for the gate (if any) and then ends the connection.
fn breaks_off(
    bytes: impl Into<Bytes>,
    gate: Option<Gate>,
    ending: Ending,
) -> impl FnMut(TcpStream) -> BoxFuture + Send {
    let bytes = bytes.into();
    move |mut stream| {
        let bytes = bytes.clone();
        let gate = gate.clone();
        Box::pin(async move {
            let _ = stream.write_all(&bytes).await;
            if let Some(gate) = gate {
                gate.pass().await;
            }
            match ending {
                Ending::Reset => reset(stream),
                Ending::Close => {
                    let _ = stream.shutdown().await;
                    drop(stream);
                }
            }
        })
    }
}

/// Holds origin scripts at one point until the test lets them on, one script per [`Gate::open`]:
/// so that a fault happens after the client has seen the response head, not before.
#[derive(Clone)]
struct Gate {
    tx: mpsc::UnboundedSender<()>,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<()>>>,
}

fn gate() -> Gate {
    let (tx, rx) = mpsc::unbounded_channel();
    Gate {
        tx,
        rx: Arc::new(tokio::sync::Mutex::new(rx)),
    }
}

impl Gate {
    fn open(&self) {
        let _ = self.tx.send(());
    }

    async fn pass(&self) {
        self.rx.lock().await.recv().await;
    }
}

/// One chunk of chunked framing.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A browser-like request for `path` from visitor `abc`, closing the connection afterwards.
fn raw_get(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: www.site.test\r\nAccept: text/html\r\n\
         Cookie: km_ai=abc\r\nConnection: close\r\n\r\n"
    )
}

/// Splits what a raw client read into the response head and the bytes after it.
fn parse_response(bytes: &[u8]) -> RawResponse {
    let split = find(bytes, b"\r\n\r\n").unwrap_or_else(|| {
        panic!(
            "no complete response head in {:?}",
            String::from_utf8_lossy(bytes)
        )
    });
    RawResponse {
        head: String::from_utf8(bytes[..split].to_vec()).expect("an ASCII head"),
        body: bytes[split + 4..].to_vec(),
    }
}

/// Decodes as much chunked framing as `body` holds: the data of the chunks that arrived, and
/// whether the last chunk (`0\r\n`, which ends the body) was among them.
fn dechunk_partial(body: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let Some(line_end) = find(rest, b"\r\n") else {
            return (out, false);
        };
        let line = String::from_utf8_lossy(&rest[..line_end]);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("not a chunk size line: {line:?}"));
        rest = &rest[line_end + 2..];
        if size == 0 {
            return (out, true);
        }
        if rest.len() < size + 2 {
            out.extend_from_slice(&rest[..size.min(rest.len())]);
            return (out, false);
        }
        out.extend_from_slice(&rest[..size]);
        assert_eq!(&rest[size..size + 2], b"\r\n", "chunk not followed by CRLF");
        rest = &rest[size + 2..];
    }
}

/// Panics unless a raw HTTP/1.1 response (read until the proxy closed) is visibly incomplete: a
/// chunked body without its last chunk, or fewer bytes than its `Content-Length`. A 502 passes
/// when `may_be_502`.
fn assert_visibly_incomplete(rsp: &RawResponse, what: &str, may_be_502: bool) {
    if may_be_502 && rsp.status() == 502 {
        return;
    }
    assert_eq!(rsp.status(), 200, "{what}: {}", rsp.head);
    let chunked = rsp
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
    if chunked {
        let (data, ended) = dechunk_partial(&rsp.body);
        assert!(
            !ended,
            "{what}: the chunked body ended with its terminator, as if complete ({} bytes): {:?}",
            data.len(),
            String::from_utf8_lossy(&data)
        );
    } else if let Some(length) = rsp.header("content-length") {
        let length: usize = length.parse().expect("a numeric Content-Length");
        assert!(
            rsp.body.len() < length,
            "{what}: all {length} bytes of the Content-Length arrived: {:?}",
            String::from_utf8_lossy(&rsp.body)
        );
    } else {
        panic!(
            "{what}: a response delimited by the close looks complete to the client:\n{}",
            rsp.head
        );
    }
}

/// Requests `path` over HTTP/1.1 and h2c with hyper's client, and over a raw HTTP/1.1 socket.
/// Each time the response must fail visibly: a 200 whose body ends in an error (for the raw
/// socket: without its last chunk, or short of its length), or a 502 when `may_be_502`.
///
/// With a gate, the gate is opened once the response head has arrived, so the origin's fault
/// comes after it. Without one, the fault may come before the proxy has sent anything; then the
/// proxy may also close the connection (or reset the HTTP/2 stream) without a response at all,
/// which is an error for the client too.
async fn assert_every_client_sees_a_broken_body(
    proxy: &Running,
    path: &str,
    gate: Option<&Gate>,
    may_be_502: bool,
) {
    for protocol in ["HTTP/1.1", "HTTP/2"] {
        let what = format!("{path} over {protocol}");
        let mut req = get(proxy.addr, path)
            .cookie("km_ai=abc")
            .header("accept", "text/html");
        if protocol == "HTTP/2" {
            req = req.over_h2c();
        }
        let rsp = match (req.try_send().await, gate) {
            (Ok(rsp), _) => rsp,
            // Closed (or the stream reset) before any response: an error for the client.
            (Err(_), None) => continue,
            (Err(e), Some(_)) => panic!("{what}: no response head: {e}"),
        };
        if let Some(gate) = gate {
            gate.open();
        }
        if may_be_502 && rsp.status() == 502 {
            let text = text_of(rsp).await;
            assert_eq!(text.lines().count(), 1, "{what}: {text:?}");
            continue;
        }
        assert_eq!(rsp.status(), 200, "{what}");
        if let Ok(body) = try_body_of(rsp).await {
            panic!(
                "{what}: the client got a complete-looking body from a broken origin response: {:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    let what = format!("{path} over a raw HTTP/1.1 socket");
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
    client
        .write_all(raw_get(path).as_bytes())
        .await
        .expect("send the request");
    let rsp = match gate {
        Some(gate) => {
            let head = read_head(&mut client).await;
            gate.open();
            let (body, _) = read_until_closed(&mut client).await;
            RawResponse {
                head: head.trim_end().to_owned(),
                body,
            }
        }
        None => {
            let (bytes, _) = read_until_closed(&mut client).await;
            if bytes.is_empty() {
                // Closed before any response: an error for the client.
                return;
            }
            parse_response(&bytes)
        }
    };
    assert_visibly_incomplete(&rsp, &what, may_be_502);
}

/// The proxy serves the healthy page, decorated, to a new client.
async fn assert_serves_normally(proxy: &Running, after: &str) {
    let rsp = get(proxy.addr, "/")
        .cookie("km_ai=abc")
        .header("accept", "text/html")
        .send()
        .await;
    assert_eq!(rsp.status(), 200, "the healthy page after {after}");
    assert_eq!(
        text_of(rsp).await,
        decorated("abc"),
        "the healthy page after {after}"
    );
}

// 1. The origin breaks off inside its response head ---------------------------------------------

#[tokio::test]
async fn origin_breaking_off_or_garbling_its_response_head_is_a_502_with_a_one_line_reason() {
    const HALF_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/ht";
    let origin = raw_origin()
        .route("/reset", breaks_off(HALF_HEAD, None, Ending::Reset))
        .route("/close", breaks_off(HALF_HEAD, None, Ending::Close))
        // Not HTTP at all, and the connection stays open: the proxy must not wait for more.
        .route(
            "/not-http",
            writes_then_waits(&b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..]),
        )
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;

    for path in ["/reset", "/close", "/not-http"] {
        let rsp = get(proxy.addr, path)
            .cookie("km_ai=abc")
            .header("accept", "text/html")
            .send()
            .await;
        assert_eq!(rsp.status(), 502, "{path}");
        assert_eq!(
            header(&rsp, "content-type"),
            Some("text/plain; charset=utf-8"),
            "{path}"
        );
        assert_eq!(header(&rsp, "cache-control"), Some("no-store"), "{path}");
        let text = text_of(rsp).await;
        assert_eq!(text.lines().count(), 1, "{path}: one line: {text:?}");
        assert!(text.ends_with('\n'), "{path}: {text:?}");
        assert!(
            text.starts_with("502 Bad Gateway: "),
            "{path}: a status and a reason: {text:?}"
        );
        assert!(
            !text.contains("127.0.0.1") && !text.contains(&origin.addr.port().to_string()),
            "{path}: the origin's address is the log's, not the client's: {text:?}"
        );
        assert_serves_normally(&proxy, path).await;
    }
}

/// An origin that closes inside its response head, with a RST or a FIN, has reset the exchange:
/// `upstream_errors_total{kind="reset"}`. (The proxy's `describe` means to count hyper's
/// "connection closed before message completed" as `reset` too.) Bytes that are not HTTP at all
/// are `other`.
#[tokio::test]
async fn origin_closing_inside_its_response_head_is_counted_as_a_reset() {
    const HALF_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/ht";
    let origin = raw_origin()
        .route("/reset", breaks_off(HALF_HEAD, None, Ending::Reset))
        .route("/close", breaks_off(HALF_HEAD, None, Ending::Close))
        .route(
            "/not-http",
            writes_then_waits(&b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..]),
        )
        .start()
        .await;
    let proxy = proxy(ADMIN, origin.addr).await;
    let mut counted = Vec::new();
    for path in ["/reset", "/close", "/not-http"] {
        let rsp = get(proxy.addr, path).cookie("km_ai=abc").send().await;
        assert_eq!(rsp.status(), 502, "{path}");
        let reason = text_of(rsp).await;
        let m = metrics_of(&proxy).await;
        let kinds: Vec<String> = ["reset", "other"]
            .into_iter()
            .map(|kind| {
                let series = format!("kmi_proxy_upstream_errors_total{{kind=\"{kind}\"}}");
                format!("{kind} {}", metric(&m, &series).unwrap_or(0.0))
            })
            .collect();
        counted.push(format!(
            "after {path} ({}): {}",
            reason.trim_end(),
            kinds.join(", ")
        ));
    }
    let m = metrics_of(&proxy).await;
    assert_eq!(
        (
            metric(&m, r#"kmi_proxy_upstream_errors_total{kind="reset"}"#),
            metric(&m, r#"kmi_proxy_upstream_errors_total{kind="other"}"#),
        ),
        (Some(2.0), Some(1.0)),
        "expected /reset and /close counted as reset, /not-http as other:\n{}",
        counted.join("\n")
    );
}

// 2. The origin resets the connection in the middle of a body -----------------------------------

#[tokio::test]
async fn origin_resetting_mid_body_is_an_error_for_every_client_never_a_complete_response() {
    let gate = gate();
    let html = "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n";
    let blob = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n";
    let with_length = |head: &str| format!("{head}Content-Length: 100000\r\n\r\n{HALF_PAGE}");
    // A complete chunk, then the first bytes of a 1 KiB chunk.
    let chunked = |head: &str| {
        let mut bytes = format!("{head}Transfer-Encoding: chunked\r\n\r\n").into_bytes();
        bytes.extend(chunk(HALF_PAGE.as_bytes()));
        bytes.extend_from_slice(b"400\r\nthe next chunk, cut sho");
        bytes
    };
    // Neither length nor chunks: the body runs to the close, and a reset is no proper close.
    let to_the_close = |head: &str| format!("{head}\r\n{HALF_PAGE}");
    let g = || Some(gate.clone());
    let origin = raw_origin()
        .route(
            "/page-length",
            breaks_off(with_length(html), g(), Ending::Reset),
        )
        .route(
            "/page-chunked",
            breaks_off(chunked(html), g(), Ending::Reset),
        )
        .route(
            "/page-to-close",
            breaks_off(to_the_close(html), g(), Ending::Reset),
        )
        .route(
            "/blob-length",
            breaks_off(with_length(blob), g(), Ending::Reset),
        )
        .route(
            "/blob-chunked",
            breaks_off(chunked(blob), g(), Ending::Reset),
        )
        .route(
            "/blob-to-close",
            breaks_off(to_the_close(blob), g(), Ending::Reset),
        )
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;

    for path in [
        "/page-length",
        "/page-chunked",
        "/page-to-close",
        "/blob-length",
        "/blob-chunked",
        "/blob-to-close",
    ] {
        assert_every_client_sees_a_broken_body(&proxy, path, Some(&gate), false).await;
        assert_serves_normally(&proxy, path).await;
    }
}

// 3. The origin's Content-Length is wrong -------------------------------------------------------

#[tokio::test]
async fn origin_sending_less_than_its_content_length_then_closing_is_an_error_for_the_client() {
    let body = "<p>a page that says it is a thousand bytes long</p>".repeat(3);
    let short = |content_type: &str| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: 1000\r\n\r\n\
             {HALF_PAGE}{body}"
        )
    };
    let origin = raw_origin()
        .route(
            "/page",
            breaks_off(short("text/html; charset=utf-8"), None, Ending::Close),
        )
        .route(
            "/blob",
            breaks_off(short("application/octet-stream"), None, Ending::Close),
        )
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;
    for path in ["/page", "/blob"] {
        assert_every_client_sees_a_broken_body(&proxy, path, None, false).await;
        assert_serves_normally(&proxy, path).await;
    }
}

/// What the raw origin sends after a short body, hoping the proxy reads it as the answer to its
/// next request on the same connection (response splitting / desynchronisation).
const SMUGGLED: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                        Content-Length: 33\r\n\r\n<p>smuggled: not the origin's</p>";

/// A rewritten page whose `Content-Length` covers this much...
const SHORT_PAGE: &str = "<p><a href=\"https://checkout.partner.com/a\">A</a></p>";
/// ...but the origin sends this after it.
const EXTRA_HTML: &str = "<a href=\"https://checkout.partner.com/extra\">Extra</a>";

#[tokio::test]
async fn bytes_past_the_origins_content_length_never_reach_a_client() {
    // Each connection reports what the proxy did with it after the response: `None` for a close
    // or reset (the connection was thrown away), `Some(bytes)` if it sent another request on it.
    let (after_tx, mut after) = mpsc::unbounded_channel::<Option<Vec<u8>>>();
    let then_report = move |response: Vec<u8>| {
        let after_tx = after_tx.clone();
        move |mut stream: TcpStream| {
            let response = response.clone();
            let after_tx = after_tx.clone();
            async move {
                // One write: the extra bytes are there as soon as the declared ones are.
                let _ = stream.write_all(&response).await;
                let mut buf = [0u8; 4096];
                let next = match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => None,
                    Ok(n) => Some(buf[..n].to_vec()),
                };
                let _ = after_tx.send(next);
            }
        }
    };
    let blob = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 5\r\n\r\n\
         hello{SMUGGLED}"
    );
    let page = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\r\n\
         {SHORT_PAGE}{EXTRA_HTML}{SMUGGLED}",
        SHORT_PAGE.len()
    );
    let origin = raw_origin()
        .route("/blob", then_report(blob.into_bytes()))
        .route("/page", then_report(page.into_bytes()))
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;
    let page_decorated = SHORT_PAGE.replace("/a\"", "/a?kmi=abc\"");

    for (path, expected) in [("/blob", "hello"), ("/page", page_decorated.as_str())] {
        // hyper's client, and a raw socket that sees every byte the proxy sends.
        let rsp = get(proxy.addr, path)
            .cookie("km_ai=abc")
            .header("accept", "text/html")
            .send()
            .await;
        assert_eq!(rsp.status(), 200, "{path}");
        let body = body_of(rsp).await;
        assert_eq!(String::from_utf8_lossy(&body), expected, "{path}");
        let next = within("the proxy to let go of the connection", after.recv()).await;
        assert_eq!(
            next.flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
            None,
            "{path}: the proxy sent another request on a connection with bytes left over"
        );
        assert_serves_normally(&proxy, path).await;

        let raw = raw(proxy.addr, &raw_get(path)).await;
        assert_eq!(raw.status(), 200, "{path} (raw)");
        let body = if raw.header("transfer-encoding").is_some() {
            raw.dechunked()
        } else {
            assert_eq!(
                raw.header("content-length"),
                Some(expected.len().to_string().as_str())
            );
            raw.body.clone()
        };
        assert_eq!(String::from_utf8_lossy(&body), expected, "{path} (raw)");
        if raw.header("transfer-encoding").is_none() {
            // Nothing on the wire after the declared length.
            assert_eq!(raw.body.len(), expected.len(), "{path} (raw)");
        }
        let next = within("the proxy to let go of the connection", after.recv()).await;
        assert!(
            next.flatten().is_none(),
            "{path} (raw): the proxy reused a connection with bytes left over"
        );
        assert_serves_normally(&proxy, &format!("{path} (raw)")).await;
    }
    for r in origin.requests() {
        assert!(
            matches!(r.path(), "/" | "/blob" | "/page"),
            "unexpected request at the origin: {r:?}"
        );
    }
}

/// The origin's framing contradicts itself: `Transfer-Encoding: chunked` with a `Content-Length`
/// that disagrees (shorter or longer than the chunked body), or two different `Content-Length`
/// fields. Chunked framing overrides a length (RFC 9112 §6.3), and an intermediary that forwards
/// such a message "MUST first remove the received Content-Length field". Whatever the proxy
/// does (forward the chunked body whole, or fail), it must never hand a client a body that looks
/// complete but is not the origin's.
#[tokio::test]
async fn origin_with_contradictory_framing_is_never_passed_off_as_a_shorter_body() {
    const BODY: &str = "0123456789";
    let chunked_with_length = |length: usize| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {length}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
             a\r\n{BODY}\r\n0\r\n\r\n"
        )
    };
    let two_lengths = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 5\r\n\
         Content-Length: 10\r\nConnection: close\r\n\r\n{BODY}"
    );
    let origin = raw_origin()
        .route(
            "/chunked-and-shorter-length",
            breaks_off(chunked_with_length(5), None, Ending::Close),
        )
        .route(
            "/chunked-and-longer-length",
            breaks_off(chunked_with_length(100), None, Ending::Close),
        )
        .route("/two-lengths", breaks_off(two_lengths, None, Ending::Close))
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;

    for path in [
        "/chunked-and-shorter-length",
        "/chunked-and-longer-length",
        "/two-lengths",
    ] {
        for protocol in ["HTTP/1.1", "HTTP/2"] {
            let what = format!("{path} over {protocol}");
            let mut req = get(proxy.addr, path).cookie("km_ai=abc");
            if protocol == "HTTP/2" {
                req = req.over_h2c();
            }
            // No response at all, a 502, or an error in the body are all failures the client
            // can see; only a body that ends cleanly has to be the origin's.
            if let Ok(rsp) = req.try_send().await {
                let status = rsp.status();
                let length = header(&rsp, "content-length").map(str::to_owned);
                if let (200, Ok(body)) = (status.as_u16(), try_body_of(rsp).await) {
                    assert_eq!(
                        String::from_utf8_lossy(&body),
                        BODY,
                        "{what}: the client got a complete-looking body (Content-Length \
                         {length:?}) that is not the origin's"
                    );
                } else {
                    assert!(status == 200 || status == 502, "{what}: {status}");
                }
            }
            assert_serves_normally(&proxy, &what).await;
        }

        let what = format!("{path} over a raw HTTP/1.1 socket");
        let raw = raw(proxy.addr, &raw_get(path)).await;
        if raw.status() != 502 {
            assert_eq!(raw.status(), 200, "{what}");
            let complete_body = if raw.header("transfer-encoding").is_some() {
                let (data, ended) = dechunk_partial(&raw.body);
                ended.then_some(data)
            } else {
                let length: usize = raw
                    .header("content-length")
                    .expect("a Content-Length or chunks")
                    .parse()
                    .expect("a numeric Content-Length");
                (raw.body.len() >= length).then(|| raw.body[..length].to_vec())
            };
            if let Some(body) = complete_body {
                assert_eq!(
                    String::from_utf8_lossy(&body),
                    BODY,
                    "{what}: a complete-looking body that is not the origin's\n{}",
                    raw.head
                );
            }
        }
        assert_serves_normally(&proxy, &what).await;
    }
}

// 4. Invalid chunked encoding from the origin ---------------------------------------------------

#[tokio::test]
async fn origin_with_broken_chunked_framing_is_an_error_or_a_502_and_the_proxy_carries_on() {
    let head = |content_type: &str| {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes()
    };
    let html = || head("text/html; charset=utf-8");
    let good_chunk = chunk(HALF_PAGE.as_bytes());
    let cat = |parts: &[&[u8]]| parts.concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Not a hexadecimal size, first thing in the body.
        (
            "/zz-first",
            cat(&[&html(), b"zz\r\n<p>never</p>\r\n0\r\n\r\n"]),
        ),
        // A good chunk, then not a size.
        (
            "/zz-later",
            cat(&[&html(), &good_chunk, b"zz\r\n<p>never</p>\r\n0\r\n\r\n"]),
        ),
        // Chunk data not followed by CRLF.
        (
            "/no-crlf",
            cat(&[&html(), b"5\r\nhelloXX3\r\nabc\r\n0\r\n\r\n"]),
        ),
        // A size that does not fit in 64 bits.
        (
            "/overflow",
            cat(&[&html(), &good_chunk, b"1ffffffffffffffff\r\nx\r\n"]),
        ),
        // Passed through, not rewritten.
        (
            "/blob-zz",
            cat(&[&head("application/octet-stream"), &good_chunk, b"zz\r\n"]),
        ),
    ];
    let mut builder = raw_origin();
    for (path, bytes) in &cases {
        builder = builder.route(path, writes_then_waits(bytes.clone()));
    }
    let origin = builder.start().await;
    let proxy = proxy("", origin.addr).await;
    for (path, _) in &cases {
        assert_every_client_sees_a_broken_body(&proxy, path, None, true).await;
        assert_serves_normally(&proxy, path).await;
    }
}

// 6. A 10 MiB attribute -------------------------------------------------------------------------

#[tokio::test]
async fn a_10_mib_attribute_passes_through_whole_once_the_rewriter_bails_out() {
    let before =
        "<!DOCTYPE html><html><body>\n<a href=\"https://checkout.partner.com/before\">Before</a>\n";
    let huge = format!(
        "<a href=\"https://checkout.partner.com/{}\">Huge</a>\n",
        "x".repeat(10 * 1024 * 1024)
    );
    let after = "<a href=\"https://checkout.partner.com/after\">After</a>\n</body></html>\n";
    let page = Bytes::from(format!("{before}{huge}{after}"));
    // The link before the huge tag is decorated; at the huge tag the rewriter passes the rest of
    // the page through unmodified, so the later partner link stays as it is.
    let expected = format!(
        "{}{huge}{after}",
        before.replace("/before\"", "/before?kmi=abc\"")
    );
    let served = page.clone();
    let origin = raw_origin()
        .route("/huge", move |stream| {
            let served = served.clone();
            async move { answer(stream, "200 OK", "text/html; charset=utf-8", &served).await }
        })
        .start()
        .await;
    let proxy = proxy(ADMIN, origin.addr).await;

    let rsp = get(proxy.addr, "/huge")
        .cookie("km_ai=abc")
        .header("accept", "text/html")
        .send()
        .await;
    assert_eq!(rsp.status(), 200);
    let body = body_of(rsp).await;
    assert_eq!(
        body.len(),
        page.len() + "?kmi=abc".len(),
        "one link decorated, no byte lost or added"
    );
    assert_same_bytes(
        &body,
        expected.as_bytes(),
        "the page with a 10 MiB attribute",
    );

    let m = metrics_of(&proxy).await;
    assert_eq!(
        metric(&m, "kmi_proxy_rewriter_bailouts_total"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"kmi_proxy_links_decorated_total{partner="checkout"}"#),
        Some(1.0),
        "{m}"
    );
    assert_serves_normally(&proxy, "the 10 MiB attribute").await;
}

// 7. A page that never ends, and a client that stops reading it ---------------------------------

/// The start of the endless page, then its part repeated for ever: a paragraph of text with a
/// partner link.
const ENDLESS_START: &str = "<!DOCTYPE html><html><body>\n";

fn endless_part() -> String {
    format!(
        "<p>{}<a href=\"https://checkout.partner.com/item\">Item</a></p>\n",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(16)
    )
}

fn endless_part_decorated() -> String {
    endless_part().replace("/item\"", "/item?kmi=abc\"")
}

/// A script that sends a chunked page with partner links for ever, until a write fails; then it
/// reports the bytes written and the error.
fn endless(
    report: mpsc::UnboundedSender<(u64, io::Error)>,
) -> impl FnMut(TcpStream) -> BoxFuture + Send {
    let start = [
        &b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
           Transfer-Encoding: chunked\r\n\r\n"[..],
        &chunk(ENDLESS_START.as_bytes()),
    ]
    .concat();
    let part = Bytes::from(chunk(endless_part().repeat(16).as_bytes()));
    move |mut stream| {
        let report = report.clone();
        let start = start.clone();
        let part = part.clone();
        Box::pin(async move {
            let mut written = 0u64;
            let mut result = stream.write_all(&start).await;
            while result.is_ok() {
                written += part.len() as u64;
                result = stream.write_all(&part).await;
            }
            let _ = report.send((written, result.unwrap_err()));
        })
    }
}

/// Checks that `data` is the endless page decorated, cut off anywhere.
#[track_caller]
fn assert_endless_page_decorated(data: &[u8], what: &str) {
    assert!(
        data.starts_with(ENDLESS_START.as_bytes()),
        "{what}: {:?}",
        String::from_utf8_lossy(&data[..data.len().min(100)])
    );
    let part = endless_part_decorated();
    let rest = &data[ENDLESS_START.len()..];
    let expected: Vec<u8> = part.bytes().cycle().take(rest.len()).collect();
    assert_same_bytes(rest, &expected, what);
}

#[tokio::test]
async fn client_leaving_an_endless_page_makes_the_proxy_let_go_of_the_origin() {
    let (report, mut failed) = mpsc::unbounded_channel();
    let origin = raw_origin()
        .route("/endless", endless(report))
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;

    // HTTP/1.1: read 4 MiB of the page, decorated, then hang up.
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
    client
        .write_all(raw_get("/endless").as_bytes())
        .await
        .expect("send the request");
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let mut body = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    within("4 MiB of the endless page", async {
        while body.len() < 4 * 1024 * 1024 {
            let n = client.read(&mut buf).await.expect("read the endless page");
            assert!(n > 0, "the proxy ended the endless page");
            body.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let (data, ended) = dechunk_partial(&body);
    assert!(!ended);
    assert!(data.len() > 4 * 1024 * 1024 - 64 * 1024);
    assert_endless_page_decorated(&data, "the endless page over HTTP/1.1");
    drop(client);
    // The proxy must stop reading the origin (and close its connection), so the origin's writes
    // fail; a proxy that kept reading for nobody, or kept the connection open, fails this wait.
    let (written, error) = within(
        "the origin's writes to fail after the HTTP/1.1 client hung up",
        failed.recv(),
    )
    .await
    .expect("a report from the origin");
    assert!(
        matches!(
            error.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ),
        "the origin wrote {written} bytes, then {error}"
    );
    assert_serves_normally(&proxy, "the HTTP/1.1 client leaving the endless page").await;

    // HTTP/2: the client cancels the stream (RST_STREAM) and keeps the connection, so only the
    // stream tells the proxy nobody is reading any more.
    let mut conn = connect_h2c(proxy.addr).await;
    let rsp = conn
        .send(
            get(proxy.addr, "/endless")
                .cookie("km_ai=abc")
                .header("accept", "text/html"),
        )
        .await;
    assert_eq!(rsp.status(), 200);
    let mut body = rsp.into_body();
    let mut data = Vec::new();
    while data.len() < 2 * 1024 * 1024 {
        let frame = within("2 MiB of the endless page over HTTP/2", body.frame())
            .await
            .expect("the endless page ended")
            .expect("a body frame");
        if let Ok(bytes) = frame.into_data() {
            data.extend_from_slice(&bytes);
        }
    }
    assert_endless_page_decorated(&data, "the endless page over HTTP/2");
    drop(body);
    let (written, error) = within(
        "the origin's writes to fail after the HTTP/2 client cancelled the stream",
        failed.recv(),
    )
    .await
    .expect("a report from the origin");
    assert!(
        matches!(
            error.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ),
        "the origin wrote {written} bytes, then {error}"
    );
    // The same HTTP/2 connection goes on serving.
    let rsp = conn
        .send(
            get(proxy.addr, "/")
                .cookie("km_ai=abc")
                .header("accept", "text/html"),
        )
        .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(text_of(rsp).await, decorated("abc"));
    conn.close().await;
    assert_serves_normally(&proxy, "the HTTP/2 client cancelling the endless page").await;
}

// 9. Garbage instead of a request ---------------------------------------------------------------

#[tokio::test]
async fn garbage_instead_of_a_request_gets_a_400_or_a_close_never_a_hang() {
    let origin = raw_origin().start().await;
    let proxy = proxy("", origin.addr).await;
    // The start of a TLS ClientHello (record type 22, TLS 1.0 record, 512 bytes), then noise.
    let mut client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec();
    client_hello.extend(noise(500, 7));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a TLS ClientHello on the plain port", client_hello),
        ("GET without a target or version", b"GET\r\n\r\n".to_vec()),
        ("two words", b"hello world\r\n\r\n".to_vec()),
        ("NUL bytes", vec![0; 64]),
        (
            "control characters",
            b"\x01\x02\x03 \x04 \x05\r\n\r\n".to_vec(),
        ),
        (
            "an unknown HTTP version",
            b"GET / HTTP/7.1\r\nHost: www.site.test\r\n\r\n".to_vec(),
        ),
        (
            "a header line without a colon",
            b"GET / HTTP/1.1\r\nHost: www.site.test\r\nno colon here\r\n\r\n".to_vec(),
        ),
    ];
    for (what, bytes) in cases {
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        // The proxy may answer and close before reading it all; a failed write is fine.
        let _ = client.write_all(&bytes).await;
        // Bounded by PATIENCE (10 s), well under the default client_header (30 s): the proxy
        // must answer the garbage, not wait for the rest of a head.
        let (answer, _) = read_until_closed(&mut client).await;
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.1 400 "),
            "{what}: {:?}",
            String::from_utf8_lossy(&answer)
        );
        assert_serves_normally(&proxy, what).await;
    }
    let requests = origin.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.request_line() == "GET / HTTP/1.1"),
        "garbage reached the origin: {requests:#?}"
    );
}

// 10. A request one byte at a time --------------------------------------------------------------

#[tokio::test]
async fn request_sent_one_byte_at_a_time_gets_the_decorated_page() {
    let origin = raw_origin().start().await;
    let proxy = proxy("", origin.addr).await;
    let form = "q=caf%C3%A9&n=1";
    let requests = [
        raw_get("/"),
        format!(
            "POST / HTTP/1.1\r\nHost: www.site.test\r\nAccept: text/html\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
             Cookie: km_ai=abc\r\nConnection: close\r\n\r\n{form}",
            form.len()
        ),
    ];
    for request in requests {
        let what = request.lines().next().unwrap_or("").to_owned();
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        client.set_nodelay(true).expect("TCP_NODELAY");
        within("the request, one byte at a time", async {
            for byte in request.as_bytes() {
                client
                    .write_all(std::slice::from_ref(byte))
                    .await
                    .expect("send one byte");
                client.flush().await.expect("flush");
                // The client's pace, not synchronisation: each byte its own segment and, most
                // likely, its own read on the proxy's side.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        let (bytes, error) = read_until_closed(&mut client).await;
        assert!(error.is_none(), "{what}: {error:?}");
        let rsp = parse_response(&bytes);
        assert_eq!(rsp.status(), 200, "{what}: {}", rsp.head);
        assert_eq!(
            String::from_utf8(rsp.dechunked()).expect("UTF-8"),
            decorated("abc"),
            "{what}"
        );
        let seen = origin.last_request();
        assert_eq!(seen.request_line(), what);
        if what.starts_with("POST") {
            assert_eq!(String::from_utf8_lossy(&seen.body), form, "{what}");
        }
    }
    assert_serves_normally(&proxy, "requests sent one byte at a time").await;
}
