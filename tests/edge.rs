//! The edge as a security team probes it, over raw sockets and the h2 client: what the origin
//! may receive from the proxy (one framing, one authority, no tunnel but WebSocket) and how
//! refused requests are answered (the right status, a short public reason, blamed on the
//! client). Each probe is followed by a normal request on the same connection and on a fresh one,
//! so a probe that desynchronises the connection, or smuggles a second request through, fails.
//!
//! The probe table (`PROBES`) is data: one line per request shape from the request-smuggling
//! literature (CL/TE combinations, obfuscated codings, chunk extensions, bare LF, request-line
//! oddities), each with the status RFC 9112 calls for.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::*;

/// A page whose relative link resolves to a partner only when the page's own host is one.
const RELATIVE_LINK_PAGE: &str = r#"<p><a href="/buy">buy</a></p>"#;

/// Responses read off one connection: each head and its body, until the server closes it.
async fn responses(stream: &mut TcpStream) -> Vec<RawResponse> {
    let mut all = Vec::new();
    within("the responses, read to the close", async {
        let _ = stream.read_to_end(&mut all).await;
    })
    .await;
    let mut out = Vec::new();
    let mut rest = &all[..];
    while let Some(split) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..split]).into_owned();
        rest = &rest[split + 4..];
        let probe = RawResponse {
            head: head.clone(),
            body: Vec::new(),
        };
        let body_len = if probe
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
        {
            chunked_len(rest)
        } else {
            probe
                .header("content-length")
                .map_or(0, |n| n.parse::<usize>().expect("a length"))
        };
        let body_len = body_len.min(rest.len());
        out.push(RawResponse {
            head,
            body: rest[..body_len].to_vec(),
        });
        rest = &rest[body_len..];
    }
    out
}

/// The length of a complete chunked body at the start of `bytes` (framing included).
fn chunked_len(bytes: &[u8]) -> usize {
    let mut at = 0;
    loop {
        let Some(line) = bytes[at..].windows(2).position(|w| w == b"\r\n") else {
            return bytes.len();
        };
        let size_text = String::from_utf8_lossy(&bytes[at..at + line]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .expect("a hex chunk size from the proxy");
        at += line + 2;
        if size == 0 {
            return (at + 2).min(bytes.len());
        }
        at += size + 2;
    }
}

/// An origin that records every request and answers 200 with a short text body.
async fn recording_origin() -> Origin {
    origin()
        .route("/probe", |_| Reply::ok().body("probe answered"))
        .route("/follow", |_| Reply::ok().body("follow answered"))
        .route("/", |_| Reply::ok().body("root"))
        .route("/smuggled", |_| Reply::ok().body("SMUGGLED"))
        .start()
        .await
}

const FOLLOW: &str = "GET /follow HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n";

/// One request shape and what RFC 9112 says the proxy must answer.
struct Probe {
    name: &'static str,
    request: &'static str,
    /// The status the probe itself must get.
    status: u16,
}

const PROBES: &[Probe] = &[
    Probe {
        name: "plain GET (control)",
        request: "GET /probe HTTP/1.1\r\nHost: site.test\r\n\r\n",
        status: 200,
    },
    Probe {
        name: "duplicate Host",
        request: "GET /probe HTTP/1.1\r\nHost: site.test\r\nHost: evil.test\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "duplicate identical Host",
        request: "GET /probe HTTP/1.1\r\nHost: site.test\r\nHost: site.test\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "Host with user information",
        request: "GET /probe HTTP/1.1\r\nHost: user@site.test\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "Host with a path",
        request: "GET /probe HTTP/1.1\r\nHost: site.test/x\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "no Host on HTTP/1.1",
        request: "GET /probe HTTP/1.1\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "absolute-form target with another scheme",
        request: "GET ftp://site.test/probe HTTP/1.1\r\nHost: site.test\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "CONNECT",
        request: "CONNECT site.test:443 HTTP/1.1\r\nHost: site.test:443\r\n\r\n",
        status: 405,
    },
    Probe {
        name: "gzip, chunked",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
                  5\r\nhello\r\n0\r\n\r\n",
        status: 501,
    },
    Probe {
        name: "chunked, chunked (inner framing smuggled as the body)",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked, chunked\r\n\r\n\
                  2c\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: site.test\r\n\r\n\r\n0\r\n\r\n",
        status: 501,
    },
    Probe {
        name: "two Transfer-Encoding fields",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: identity\r\n\
                  Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        status: 501,
    },
    Probe {
        name: "coding other than chunked last",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n\
                  0\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "obfuscated coding (xchunked)",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: xchunked\r\n\r\n\
                  0\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "space before the colon",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding : chunked\r\n\r\n\
                  0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: site.test\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "Content-Length and Transfer-Encoding (CL.TE)",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nContent-Length: 4\r\n\
                  Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: site.test\r\n\r\n",
        // hyper reads the body as chunked (TE wins, RFC 9112 §6.3) and closes the connection
        // after the response, so what follows the body is never read as a request.
        status: 200,
    },
    Probe {
        name: "Transfer-Encoding then Content-Length (TE.CL)",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\
                  Content-Length: 30\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: site.test\r\n\r\n",
        status: 200,
    },
    Probe {
        name: "two different Content-Lengths",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        status: 400,
    },
    Probe {
        name: "a list of Content-Lengths",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nContent-Length: 5, 6\r\n\r\nhello!",
        status: 400,
    },
    Probe {
        name: "negative Content-Length",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nContent-Length: -1\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "signed Content-Length",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nContent-Length: +5\r\n\r\nhello",
        status: 400,
    },
    Probe {
        name: "chunk extensions",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5;name=value\r\nhello\r\n0;last\r\n\r\n",
        status: 200,
    },
    Probe {
        name: "chunk size overflow",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                  10000000000000001\r\nx\r\n0\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "malformed chunk size",
        request: "POST /probe HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                  zz\r\nhello\r\n0\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "obs-fold in a header",
        request: "GET /probe HTTP/1.1\r\nHost: site.test\r\nX-Folded: a\r\n b\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "bare LF line endings",
        request: "GET /probe HTTP/1.1\nHost: site.test\n\n",
        status: 200,
    },
    Probe {
        name: "HTTP/1.0 with Transfer-Encoding",
        request: "POST /probe HTTP/1.0\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        status: 400,
    },
    Probe {
        // RFC 9110 §2.5 would have a server read HTTP/1.2 as 1.1; hyper's parser refuses any
        // minor version it does not know, which is the safe side of that rule.
        name: "unknown HTTP minor version",
        request: "GET /probe HTTP/1.2\r\nHost: site.test\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "HTTP/2.0 in an HTTP/1 request line",
        request: "GET /probe HTTP/2.0\r\nHost: site.test\r\n\r\n",
        status: 400,
    },
    Probe {
        name: "NUL in a header value",
        request: "GET /probe HTTP/1.1\r\nHost: site.test\r\nX-Nul: a\0b\r\n\r\n",
        status: 400,
    },
];

/// Every probe, then a normal request on the same connection and one on a fresh connection.
/// Whatever the probe did, the origin only ever sees `/probe` (when the probe is accepted) and
/// `/follow`, each with exactly one Host and no framing but a single `chunked`.
#[tokio::test]
async fn probes_get_the_status_the_rfc_asks_for_and_smuggle_nothing() {
    let origin = recording_origin().await;
    let proxy = proxy("", origin.addr).await;
    let mut problems = Vec::new();
    for probe in PROBES {
        let before = origin.requests().len();
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        let mut bytes = probe.request.as_bytes().to_vec();
        bytes.extend_from_slice(FOLLOW.as_bytes());
        stream.write_all(&bytes).await.expect("write the probe");
        let got = responses(&mut stream).await;
        let received: Vec<_> = origin.requests().split_off(before);
        let paths: Vec<&str> = received.iter().map(|r| r.uri.path()).collect();

        match got.first() {
            None => problems.push(format!("{}: no response at all", probe.name)),
            Some(first) if first.status() != probe.status => problems.push(format!(
                "{}: status {} where {} is due\n{}",
                probe.name,
                first.status(),
                probe.status,
                first.head
            )),
            Some(_) => {}
        }
        if got.len() > 2 {
            problems.push(format!(
                "{}: {} responses to two requests",
                probe.name,
                got.len()
            ));
        }
        // The follow-up on the same connection is either answered as itself, or the connection
        // was closed after a probe whose framing could not be trusted. Never anything else.
        if let Some(second) = got.get(1) {
            if second.status() != 200 || second.body != b"follow answered" {
                problems.push(format!(
                    "{}: the request after the probe got {:?}",
                    probe.name, second.head
                ));
            }
        }
        if paths.iter().any(|p| *p != "/probe" && *p != "/follow") {
            problems.push(format!("{}: the origin received {paths:?}", probe.name));
        }
        if probe.status >= 400 && paths.contains(&"/probe") {
            problems.push(format!(
                "{}: refused with {}, yet the origin received it",
                probe.name, probe.status
            ));
        }
        for r in &received {
            if r.headers.get_all("host").iter().count() != 1 {
                problems.push(format!("{}: origin got Host {:?}", probe.name, r.headers));
            }
            if r.headers.contains_key("transfer-encoding") && r.version == http::Version::HTTP_11 {
                let te = r.headers.get_all("transfer-encoding").iter().count();
                let value = r.headers["transfer-encoding"].to_str().unwrap_or("");
                if te != 1 || !value.eq_ignore_ascii_case("chunked") {
                    problems.push(format!(
                        "{}: origin got framing {:?}",
                        probe.name, r.headers
                    ));
                }
            }
            if r.body_error.is_none() && contains(&r.body, b"GET /smuggled") {
                problems.push(format!(
                    "{}: a smuggled request reached the origin as a body",
                    probe.name
                ));
            }
        }
        if probe.status >= 400 {
            let text = String::from_utf8_lossy(&got[0].body).into_owned();
            if text.contains("127.0.0.1") || text.contains(&origin.addr.port().to_string()) {
                problems.push(format!("{}: the reason discloses {text:?}", probe.name));
            }
        }
        // A fresh connection is served normally after every probe.
        let fresh = raw(proxy.addr, FOLLOW).await;
        if fresh.status() != 200 {
            problems.push(format!(
                "{}: a fresh connection afterwards got {}",
                probe.name,
                fresh.status()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test]
async fn refused_requests_are_counted_as_client_errors_not_upstream_ones() {
    let origin = recording_origin().await;
    let proxy = proxy(ADMIN, origin.addr).await;
    let dup = raw(
        proxy.addr,
        "GET /probe HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(dup.status(), 400);
    assert!(
        String::from_utf8_lossy(&dup.body).contains("Host"),
        "a one-line reason naming the problem: {:?}",
        String::from_utf8_lossy(&dup.body)
    );
    let te = raw(
        proxy.addr,
        "POST /probe HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\
         Connection: close\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(te.status(), 501);
    let body = raw(
        proxy.addr,
        "POST /probe HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    .await;
    assert_eq!(body.status(), 400, "{}", body.head);
    let text = String::from_utf8_lossy(&body.body).into_owned();
    assert!(
        !text.contains("127.0.0.1") && !text.contains(&origin.addr.port().to_string()),
        "the origin's address must not reach the client: {text:?}"
    );
    let m = metrics_of(&proxy).await;
    let kind = |k: &str| {
        metric(
            &m,
            &format!("kmi_proxy_client_errors_total{{kind=\"{k}\"}}"),
        )
    };
    assert_eq!(kind("duplicate_host"), Some(1.0), "{m}");
    assert_eq!(kind("transfer_coding"), Some(1.0), "{m}");
    assert_eq!(kind("body_malformed"), Some(1.0), "{m}");
    assert!(
        !m.contains("kmi_proxy_upstream_errors_total{"),
        "a client's fault is no upstream error:\n{m}"
    );
}

#[tokio::test]
async fn the_request_target_authority_wins_over_host() {
    let origin = origin()
        .route("/p", |_| Reply::html(RELATIVE_LINK_PAGE))
        .start()
        .await;
    let proxy = proxy("exclude_paths = [\"/never\"]", origin.addr).await;
    // The target names a partner's host: the page is that host's, so its relative link is a
    // partner link, and the origin hears the target's authority, not the Host.
    let rsp = raw(
        proxy.addr,
        "GET http://checkout.partner.com/p HTTP/1.1\r\nHost: site.test\r\n\
         Accept: text/html\r\nCookie: km_ai=visitor\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(rsp.status(), 200);
    let got = origin.last_request();
    assert_eq!(got.header("host"), Some("checkout.partner.com"));
    assert_eq!(got.header("x-forwarded-host"), Some("checkout.partner.com"));
    let page = String::from_utf8(rsp.dechunked()).unwrap();
    assert!(page.contains("/buy?kmi=visitor"), "{page}");

    // The other way round: the target names the site, Host a partner. The link stays.
    let rsp = raw(
        proxy.addr,
        "GET http://site.test/p HTTP/1.1\r\nHost: checkout.partner.com\r\n\
         Accept: text/html\r\nCookie: km_ai=visitor\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(origin.last_request().header("host"), Some("site.test"));
    let page = String::from_utf8(rsp.dechunked()).unwrap();
    assert!(page.contains(r#"href="/buy""#), "{page}");
}

/// Sends one HTTP/2 request with these pseudo-header and header values.
async fn h2_request(addr: SocketAddr, uri: &str, host: Option<&str>) -> http::Response<Bytes> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an h2c handshake");
    tokio::spawn(connection);
    let mut req = http::Request::builder()
        .uri(uri)
        .version(http::Version::HTTP_2)
        .header("accept", "text/html")
        .header("cookie", "km_ai=visitor");
    if let Some(host) = host {
        req = req.header("host", host);
    }
    let rsp = within(
        "an h2 response",
        sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("a response");
    let (parts, body) = rsp.into_parts();
    let body = within("an h2 body", body.collect())
        .await
        .expect("a body")
        .to_bytes();
    http::Response::from_parts(parts, body)
}

#[tokio::test]
async fn on_http2_authority_wins_and_a_disagreeing_host_is_malformed() {
    let origin = origin()
        .route("/p", |_| Reply::html(RELATIVE_LINK_PAGE))
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;
    let rsp = h2_request(proxy.addr, "http://other.example/p", Some("site.test")).await;
    assert_eq!(rsp.status(), 400, "{:?}", rsp.body());
    assert!(
        origin.requests().is_empty(),
        "a malformed request reached the origin"
    );

    let rsp = h2_request(proxy.addr, "http://checkout.partner.com/p", None).await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        origin.last_request().header("host"),
        Some("checkout.partner.com")
    );
    assert!(contains(rsp.body(), b"/buy?kmi=visitor"));

    // The same name in both (any case) is fine.
    let rsp = h2_request(
        proxy.addr,
        "http://checkout.partner.com/p",
        Some("Checkout.Partner.com"),
    )
    .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        origin.last_request().header("x-forwarded-host"),
        Some("checkout.partner.com")
    );
}

/// An origin that answers every request with `101` to `protocol` and records every byte it
/// reads after that, as a careless origin behind a proxy would.
async fn switching_origin(protocol: &'static str) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let after = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&after);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read_u8().await {
                        Ok(b) => head.push(b),
                        Err(_) => return,
                    }
                }
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, after)
}

const H2C_UPGRADE: &str =
    "GET / HTTP/1.1\r\nHost: site.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
     Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";

#[tokio::test]
async fn h2c_upgrade_is_proxied_as_a_plain_request_and_never_tunnelled() {
    // An origin that would switch: it never hears the Upgrade, so the request is a plain one.
    let origin = recording_origin().await;
    let front = proxy("", origin.addr).await;
    let mut stream = TcpStream::connect(front.addr).await.expect("connect");
    let mut bytes = H2C_UPGRADE.as_bytes().to_vec();
    bytes.extend_from_slice(FOLLOW.as_bytes());
    stream.write_all(&bytes).await.expect("write");
    let got = responses(&mut stream).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].status(), 200, "{}", got[0].head);
    assert_eq!(got[1].body, b"follow answered");
    let first = &origin.requests()[0];
    for field in ["upgrade", "http2-settings", "connection"] {
        assert!(
            !first.headers.contains_key(field),
            "the origin got {field}: {:?}",
            first.headers
        );
    }

    // An origin that switches anyway gets no tunnel: the client gets a 502, and the bytes it
    // sends next (an HTTP/2 preface and a request with a forged header) never reach the origin.
    let (switching, after) = switching_origin("h2c").await;
    let careless = proxy("", switching).await;
    let mut stream = TcpStream::connect(careless.addr).await.expect("connect");
    stream.write_all(H2C_UPGRADE.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
    let _ = stream
        .write_all(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET /x HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
        )
        .await;
    // The proxy answers (or closes) the bytes itself; a fresh request is served, and the
    // switching origin read nothing after its 101.
    let fresh = raw(careless.addr, FOLLOW).await;
    assert_eq!(fresh.status(), 502, "the origin switches every request");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        after.lock().unwrap().is_empty(),
        "bytes reached the origin through a tunnel: {:?}",
        String::from_utf8_lossy(&after.lock().unwrap())
    );
}

#[tokio::test]
async fn an_upgrade_policy_without_websocket_proxies_the_handshake_as_a_request() {
    let origin = recording_origin().await;
    let proxy = proxy("upgrades = []", origin.addr).await;
    let rsp = raw(
        proxy.addr,
        "GET /probe HTTP/1.1\r\nHost: site.test\r\nConnection: Upgrade, close\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(rsp.status(), 200);
    assert!(!origin.the_request().headers.contains_key("upgrade"));
}

#[test]
fn h2c_cannot_be_configured() {
    let text = config_text(
        "upgrades = [\"websocket\", \"h2c\"]",
        "127.0.0.1:9".parse().unwrap(),
    );
    let err = kmi_proxy::config::Config::parse(&text, "edge.toml").unwrap_err();
    let shown = err.to_string();
    assert!(
        shown.contains("upgrades = \"h2c\"") && shown.contains("never tunnelled"),
        "{shown}"
    );
}
