//! Compressed pages from real origins, end to end (issue 13): the gzip and deflate variants
//! browsers read, bodies that do not decode at all, decompression bombs, the rewrite budget, the
//! cache fields a CDN obeys, how a complete pass-through from an HTTP/2 origin is logged, and the
//! bound on requests in flight per HTTP/2 connection.
//!
//! Every origin speaks HTTP/1.1 on plain TCP or, over TLS with a private CA, HTTP/2; every client
//! speaks HTTP/1.1 or h2c to the proxy. The access log is captured from `tracing` (one global
//! JSON subscriber for this test binary) where a test needs to read it.

mod support;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http_body_util::BodyExt;
use support::*;
use tokio::sync::Notify;

const PAGE: &str = r#"<!DOCTYPE html>
<html><head><title>Shop</title></head>
<body>
<a href="https://checkout.partner.com/pay?order=42">Pay</a>
<a href="https://www.elsewhere.test/">Elsewhere</a>
</body></html>
"#;

fn decorated(id: &str) -> String {
    PAGE.replace(
        r#""https://checkout.partner.com/pay?order=42""#,
        &format!(r#""https://checkout.partner.com/pay?order=42&amp;kmi={id}""#),
    )
}

fn navigate(addr: std::net::SocketAddr, path: &str) -> Req {
    get(addr, path)
        .header("host", "www.site.test")
        .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// What a browser makes of a body in this coding (the proxy re-encodes in the origin's coding).
fn read_as_browser(coding: &str, body: &[u8]) -> String {
    let mut out = Vec::new();
    match coding {
        "gzip" => flate2::read::MultiGzDecoder::new(body).read_to_end(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(body).read_to_end(&mut out),
        "br" => brotli::Decompressor::new(body, 4096).read_to_end(&mut out),
        other => panic!("no decoder for {other}"),
    }
    .unwrap_or_else(|e| panic!("the client cannot decode the {coding} page: {e}"));
    String::from_utf8(out).expect("UTF-8")
}

/// The origins every case runs against: HTTP/1.1 on plain TCP, and HTTP/2 over TLS.
struct Origins {
    h1: Origin,
    h2: Origin,
    trust: String,
    _ca: Ca,
}

impl Origins {
    async fn serving(
        path: &str,
        reply: impl Fn() -> Reply + Send + Sync + Clone + 'static,
    ) -> Origins {
        let ca = Ca::new("Origin CA");
        let cert = ca.leaf(&["127.0.0.1"]);
        let r1 = reply.clone();
        let h1 = origin().route(path, move |_| r1()).start().await;
        let h2 = origin()
            .route(path, move |_| reply())
            .over_tls_offering(&cert, &["h2"])
            .start()
            .await;
        Origins {
            h1,
            h2,
            trust: format!("upstream_ca = {}\n", toml_path(&ca.path)),
            _ca: ca,
        }
    }

    /// A proxy in front of each origin, named for messages.
    async fn proxies(&self, extra: &str) -> Vec<(&'static str, kmi_proxy::server::Running)> {
        vec![
            ("HTTP/1.1 origin", proxy(extra, self.h1.addr).await),
            (
                "HTTP/2 origin",
                proxy_to(
                    &format!("https://{}", self.h2.addr),
                    &format!("{}{extra}", self.trust),
                )
                .await,
            ),
        ]
    }
}

#[tokio::test]
async fn gzip_and_deflate_variants_that_browsers_read_are_decorated() {
    let page = PAGE.as_bytes();
    let (head, tail) = page.split_at(page.len() / 2);
    let mut two_members = gzip(head);
    two_members.extend(gzip(tail));
    let mut stray_newline = gzip(page);
    stray_newline.push(b'\n');
    let mut trailing_garbage = gzip(page);
    trailing_garbage.extend_from_slice(b"\r\n<!-- 0.0021s -->\r\n");
    let cases: [(&str, &str, Vec<u8>); 5] = [
        ("two gzip members", "gzip", two_members),
        ("gzip and a stray newline", "gzip", stray_newline),
        ("gzip and trailing text", "gzip", trailing_garbage),
        ("raw deflate", "deflate", raw_deflate(page)),
        ("zlib deflate", "deflate", zlib(page)),
    ];
    for (what, coding, body) in cases {
        let body = Bytes::from(body);
        let origins = Origins::serving("/", move || {
            Reply::html(body.clone()).header("content-encoding", coding)
        })
        .await;
        for (origin_kind, proxy) in origins.proxies("").await {
            for h2c in [false, true] {
                let what = format!("{what}, {origin_kind}, h2c {h2c}");
                let mut req = navigate(proxy.addr, "/")
                    .header("accept-encoding", "gzip, deflate, br")
                    .cookie("km_ai=abc");
                if h2c {
                    req = req.over_h2c();
                }
                let rsp = req.send().await;
                assert_eq!(rsp.status(), 200, "{what}");
                assert_eq!(header(&rsp, "content-encoding"), Some(coding), "{what}");
                let body = try_body_of(rsp)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: the page broke off: {e}"));
                assert_eq!(read_as_browser(coding, &body), decorated("abc"), "{what}");
            }
        }
    }
}

#[tokio::test]
async fn a_body_that_does_not_decode_goes_out_as_the_origin_sent_it() {
    // A misconfigured origin labels plain HTML as gzip; another sends bytes that are no brotli.
    let cases: [(&str, &str, &[u8]); 3] = [
        ("plain HTML labelled gzip", "gzip", PAGE.as_bytes()),
        ("plain HTML labelled deflate", "deflate", PAGE.as_bytes()),
        (
            "noise labelled br",
            "br",
            b"\xff\xff\xff\xff not brotli at all",
        ),
    ];
    for (what, coding, body) in cases {
        let body = Bytes::from_static(body);
        let served = body.clone();
        let origins = Origins::serving("/", move || {
            Reply::html(served.clone()).header("content-encoding", coding)
        })
        .await;
        for (origin_kind, proxy) in origins.proxies("").await {
            for h2c in [false, true] {
                let what = format!("{what}, {origin_kind}, h2c {h2c}");
                let mut req = navigate(proxy.addr, "/").cookie("km_ai=abc");
                if h2c {
                    req = req.over_h2c();
                }
                let rsp = req.send().await;
                assert_eq!(rsp.status(), 200, "{what}");
                assert_eq!(header(&rsp, "content-encoding"), Some(coding), "{what}");
                let got = try_body_of(rsp)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: an error instead of the page: {e}"));
                assert_same_bytes(&got, &body, &what);
            }
        }
    }
}

/// 64 MiB of zeros as brotli: a few kilobytes that inflate past the proxy's cap.
fn brotli_bomb() -> Bytes {
    let zeros = vec![0u8; 1 << 20];
    let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, 1, 24);
    for _ in 0..64 {
        e.write_all(&zeros).unwrap();
    }
    Bytes::from(e.into_inner())
}

#[tokio::test]
async fn a_decompression_bomb_fails_cleanly_and_other_requests_are_still_served() {
    let bomb = brotli_bomb();
    assert!(bomb.len() < 64 * 1024, "the bomb is {} bytes", bomb.len());
    let served = bomb.clone();
    let origin = origin()
        .route("/bomb", move |_| {
            Reply::html(served.clone()).header("content-encoding", "br")
        })
        .route("/", |_| Reply::html(PAGE))
        .start()
        .await;
    let proxy = proxy(ADMIN, origin.addr).await;
    // Two bombs at once, read as fast as the proxy sends, and a plain page beside them.
    let bombs: Vec<_> = (0..2)
        .map(|i| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut req = navigate(addr, "/bomb").cookie("km_ai=abc");
                if i == 1 {
                    req = req.over_h2c();
                }
                let rsp = req.send().await;
                assert_eq!(rsp.status(), 200);
                let mut body = rsp.into_body();
                let mut received = 0usize;
                loop {
                    match within("the bomb's next frame", body.frame()).await {
                        Some(Ok(frame)) => {
                            received += frame.data_ref().map_or(0, |d| d.len());
                        }
                        Some(Err(_)) => return Err(received),
                        None => return Ok(received),
                    }
                }
            })
        })
        .collect();
    let rsp = navigate(proxy.addr, "/").cookie("km_ai=abc").send().await;
    assert_eq!(
        text_of(rsp).await,
        decorated("abc"),
        "the plain page beside the bombs"
    );
    for bomb in bombs {
        match within("a bomb's response", bomb)
            .await
            .expect("the client task")
        {
            Ok(n) => panic!("a bomb came back as a complete response of {n} bytes"),
            // What was sent before the cap is the re-encoded zeros: a small, bounded amount.
            Err(n) => assert!(n < 1 << 20, "{n} compressed bytes sent before the cap"),
        }
    }
    let metrics = metrics_of(&proxy).await;
    assert_eq!(
        metric(
            &metrics,
            "kmi_proxy_upstream_errors_total{kind=\"decompression_bomb\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn pages_past_the_rewrite_budget_wait_their_turn_and_are_still_decorated() {
    // One rewrite at a time: the first page is held mid-body by the origin while the second
    // waits for the slot; once the first ends, the second is decorated too.
    let (feed, body) = channel();
    let mut body = Some(body);
    let origin = origin()
        .route("/slow", move |_| {
            Reply::ok()
                .header("content-type", "text/html; charset=utf-8")
                .stream(body.take().expect("requested once"))
        })
        .route("/", |_| Reply::html(PAGE))
        .start()
        .await;
    let proxy = proxy("[limits]\nmax_rewrites = 1\n", origin.addr).await;
    let slow = navigate(proxy.addr, "/slow")
        .cookie("km_ai=abc")
        .send()
        .await;
    feed.part(&PAGE.as_bytes()[..40]).await;
    // The second page's head goes out at once; its body waits for the slot the first one holds.
    let waiting = navigate(proxy.addr, "/").cookie("km_ai=abc").send().await;
    feed.part(&PAGE.as_bytes()[40..]).await;
    feed.finish();
    assert_eq!(text_of(slow).await, decorated("abc"));
    assert_eq!(
        text_of(waiting).await,
        decorated("abc"),
        "the page that waited"
    );
}

#[tokio::test]
async fn a_page_that_waits_too_long_for_a_rewrite_goes_out_unmodified() {
    let (_feed, body) = channel();
    let mut body = Some(body);
    let origin = origin()
        .route("/stuck", move |_| {
            Reply::ok()
                .header("content-type", "text/html; charset=utf-8")
                .stream(body.take().expect("requested once"))
        })
        .route("/", |_| Reply::html(PAGE))
        .start()
        .await;
    let proxy = proxy("[limits]\nmax_rewrites = 1\n", origin.addr).await;
    // The only slot is taken by a page whose origin never finishes it.
    let _stuck = navigate(proxy.addr, "/stuck")
        .cookie("km_ai=abc")
        .send()
        .await;
    let rsp = navigate(proxy.addr, "/").cookie("km_ai=abc").send().await;
    assert_eq!(text_of(rsp).await, PAGE, "not decorated, but whole");
}

#[tokio::test]
async fn a_page_compressed_by_the_proxy_that_waits_too_long_still_goes_out_whole() {
    // An uncompressed page answered from its recording is sent compressed in the client's
    // coding; when it cannot get a rewrite slot in time it goes out as the origin sent it,
    // and since its head already said gzip, the origin's bytes are compressed too.
    let (_feed, body) = channel();
    let mut body = Some(body);
    let origin = origin()
        .route("/stuck", move |_| {
            Reply::ok()
                .header("content-type", "text/html; charset=utf-8")
                .stream(body.take().expect("requested once"))
        })
        .route("/", |_| Reply::html(PAGE))
        .start()
        .await;
    let proxy = proxy("[limits]\nmax_rewrites = 1\n", origin.addr).await;
    let first = navigate(proxy.addr, "/").cookie("km_ai=abc").send().await;
    assert_eq!(text_of(first).await, decorated("abc"), "recorded");
    let _stuck = navigate(proxy.addr, "/stuck")
        .cookie("km_ai=abc")
        .send()
        .await;
    let rsp = navigate(proxy.addr, "/")
        .header("accept-encoding", "gzip")
        .cookie("km_ai=abc")
        .send()
        .await;
    assert_eq!(header(&rsp, "content-encoding"), Some("gzip"));
    let raw = body_of(rsp).await;
    let mut page = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&raw[..]), &mut page)
        .expect("a whole gzip stream");
    assert_eq!(page, PAGE, "not decorated, but whole");
}

#[tokio::test]
async fn decorated_pages_are_not_storable_by_any_shared_cache() {
    let origin = origin()
        .route("/", |_| {
            Reply::html(PAGE)
                .header("cache-control", "public, max-age=60")
                .header("cdn-cache-control", "public, max-age=600")
                .header("cloudflare-cdn-cache-control", "max-age=86400")
                .header("surrogate-control", "max-age=3600")
                .header("edge-control", "!no-store, max-age=1h")
                .header("x-accel-expires", "600")
        })
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;
    let rsp = navigate(proxy.addr, "/").cookie("km_ai=abc").send().await;
    for (name, value) in [
        ("cache-control", "max-age=60, private"),
        ("cdn-cache-control", "max-age=600, private"),
        ("cloudflare-cdn-cache-control", "max-age=86400, private"),
        ("surrogate-control", "no-store"),
        ("edge-control", "no-store"),
        ("x-accel-expires", "0"),
    ] {
        assert_eq!(header(&rsp, name), Some(value), "{name}");
    }
    assert_eq!(text_of(rsp).await, decorated("abc"));
    // Without an ID the page is the same for everyone, and its fields stay as the origin set them.
    let rsp = navigate(proxy.addr, "/").send().await;
    assert_eq!(
        header(&rsp, "cdn-cache-control"),
        Some("public, max-age=600")
    );
    assert_eq!(header(&rsp, "surrogate-control"), Some("max-age=3600"));
}

// The access log ---------------------------------------------------------------------------------

/// Every access-log line written in this test binary, and a signal on each write.
struct Captured {
    text: Mutex<Vec<u8>>,
    written: Notify,
}

struct CaptureWriter(Arc<Captured>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.text.lock().unwrap().extend_from_slice(buf);
        self.0.written.notify_waiters();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn access_log() -> Arc<Captured> {
    static LOG: OnceLock<Arc<Captured>> = OnceLock::new();
    Arc::clone(LOG.get_or_init(|| {
        let captured = Arc::new(Captured {
            text: Mutex::new(Vec::new()),
            written: Notify::new(),
        });
        let writer = Arc::clone(&captured);
        tracing_subscriber::fmt()
            .json()
            .with_env_filter("kmi_proxy::access=info")
            .with_writer(move || CaptureWriter(Arc::clone(&writer)))
            .init();
        captured
    }))
}

/// The access-log line for `path`, once it has been written.
async fn log_line_for(log: &Captured, path: &str) -> serde_json::Value {
    within(&format!("the access-log line for {path}"), async {
        loop {
            let written = log.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            let text = String::from_utf8_lossy(&log.text.lock().unwrap()).into_owned();
            if let Some(line) = text.lines().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["fields"]["path"] == path).then_some(v)
            }) {
                return line;
            }
            written.await;
        }
    })
    .await
}

#[tokio::test]
async fn a_complete_pass_through_from_an_http2_origin_is_logged_complete() {
    let log = access_log();
    // The origin streams its body with a Content-Length and sends END_STREAM only when the test
    // says: the proxy has the whole declared body before the stream's end arrives.
    let (feed, body) = channel();
    let body = Mutex::new(Some(body));
    let ca = Ca::new("Origin CA");
    let cert = ca.leaf(&["127.0.0.1"]);
    let data = "a stylesheet, not a page\n".repeat(40);
    let length = data.len().to_string();
    let origin = origin()
        .route("/site.css", move |_| {
            Reply::ok()
                .header("content-type", "text/css")
                .header("content-length", &length)
                .stream(body.lock().unwrap().take().expect("requested once"))
        })
        .over_tls_offering(&cert, &["h2"])
        .start()
        .await;
    let trust = format!("upstream_ca = {}\n", toml_path(&ca.path));
    let proxy = proxy_to(&format!("https://{}", origin.addr), &trust).await;
    let rsp = get(proxy.addr, "/site.css")
        .header("host", "www.site.test")
        .send()
        .await;
    feed.part(data.clone()).await;
    assert_eq!(text_of(rsp).await, data);
    let line = log_line_for(&log, "/site.css").await;
    feed.finish();
    assert_eq!(line["fields"]["body"], "complete", "{line}");
    assert_eq!(line["fields"]["status"], 200, "{line}");
}

// The HTTP/2 stream bound ------------------------------------------------------------------------

#[tokio::test]
async fn an_http2_connection_may_have_at_most_100_requests_in_flight() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    let proxy = proxy("", origin.addr).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // The client preface and an empty SETTINGS frame, then the server's SETTINGS frame: a 9-byte
    // header (length, type 4, flags, stream 0) and 6-byte parameters.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let settings = within("the proxy's SETTINGS frame", async {
        loop {
            let mut head = [0u8; 9];
            stream.read_exact(&mut head).await.unwrap();
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            stream.read_exact(&mut payload).await.unwrap();
            // Type 4 is SETTINGS; flag 1 is an acknowledgement, which carries none.
            if head[3] == 4 && head[4] & 1 == 0 {
                return payload;
            }
        }
    })
    .await;
    let max_streams = settings.chunks(6).find_map(|p| {
        (u16::from_be_bytes([p[0], p[1]]) == 3)
            .then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
    });
    assert_eq!(max_streams, Some(100), "SETTINGS_MAX_CONCURRENT_STREAMS");
}

/// A page of `n` sections, each with a partner link and text that repeats across the page, so
/// the origin's compressor reaches back across the points where it pauses.
fn long_page(n: usize) -> String {
    let mut page = String::from("<!DOCTYPE html><html><head><title>Shop</title></head><body>\n");
    for i in 0..n {
        page.push_str(&format!(
            "<section><h2>Offer {i}</h2><p>Our partner handles checkout for every order in \
             this shop, so the link below goes to their site.</p>\
             <a href=\"https://checkout.partner.com/pay?order={i}\">Pay for order {i}</a></section>\n"
        ));
    }
    page.push_str("</body></html>\n");
    page
}

fn brotli_as_nginx(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = brotli::CompressorWriter::new(&mut out, 4096, 6, 19);
    w.write_all(data).unwrap();
    drop(w);
    out
}

/// An origin that pauses longer than the proxy waits before giving a decoder's state back
/// (`body::PARK_AFTER`), three times in one compressed page: the page that reaches the client is
/// exactly the decorated page, whatever the decoder had to rebuild at each pause.
#[tokio::test]
async fn a_compressed_page_whose_origin_pauses_mid_body_is_still_exact() {
    let page = long_page(300);
    let expected = page.replace(
        "\">Pay for order",
        "&amp;kmi=visitor%40example.com\">Pay for order",
    );
    assert_eq!(expected.matches("kmi=").count(), 300);
    let pause = kmi_proxy::body::PARK_AFTER * 2;
    for (coding, body) in [
        ("br", brotli_as_nginx(page.as_bytes())),
        ("gzip", gzip(page.as_bytes())),
        ("deflate", zlib(page.as_bytes())),
    ] {
        let (feed, channel_body) = channel();
        let channel_body = Mutex::new(Some(channel_body));
        let origin = origin()
            .route("/paused", move |_| {
                Reply::ok()
                    .header("content-type", "text/html; charset=utf-8")
                    .header("content-encoding", coding)
                    .stream(channel_body.lock().unwrap().take().expect("requested once"))
            })
            .start()
            .await;
        let proxy = proxy("", origin.addr).await;
        let request = navigate(proxy.addr, "/paused")
            .header("accept-encoding", coding)
            .cookie("km_ni=visitor%40example.com")
            .send();
        let sending = async {
            for part in body.chunks(body.len() / 4 + 1) {
                feed.part(Bytes::copy_from_slice(part)).await;
                tokio::time::sleep(pause).await;
            }
            feed.finish();
        };
        let (rsp, ()) = tokio::join!(request, sending);
        assert_eq!(rsp.status(), 200, "{coding}");
        assert_eq!(rsp.headers()["content-encoding"], coding);
        let bytes = within("the paused page", rsp.into_body().collect())
            .await
            .unwrap_or_else(|e| panic!("{coding}: the page broke off: {e}"))
            .to_bytes();
        assert!(
            read_as_browser(coding, &bytes) == expected,
            "{coding}: the page differs from the decorated page"
        );
    }
}
