//! Origins as deployments meet them: a real nginx over https and HTTP/2, an https origin that
//! accepts and never speaks, an origin that never reads an upload, and HTTP/2 clients whose
//! cookies are split over several fields. Each is a defect a review reproduced (issue 13 items
//! 1, 4 and 7); each test fails on the code before its fix.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::nginx::Nginx;
use support::pki::Ca;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NGINX_PAGE: &str = r#"<p><a href="https://checkout.partner.com/cart">cart</a></p>"#;

/// nginx 1.22 to 1.28 answer 400 to an HTTP/2 request that carries `Host` beside `:authority`;
/// the proxy must name the site in exactly one of them, for HTTP/1.1 and HTTP/2 clients alike.
#[tokio::test]
async fn an_https_nginx_origin_speaking_http2_serves_every_request() {
    let ca = Ca::new("Origin CA");
    let cert = ca.leaf(&["127.0.0.1"]);
    let body = format!(
        "    ssl_certificate {};\n    ssl_certificate_key {};\n\
         location = /who {{ default_type text/plain; \
         return 200 \"host=$host protocol=$server_protocol\\n\"; }}\n\
         location = /page {{ default_type text/html; return 200 '{NGINX_PAGE}'; }}\n",
        cert.cert_path.display(),
        cert.key_path.display()
    );
    let nginx = Nginx::start("ssl http2", &body, &[]).await;
    let proxy = proxy_to(
        &format!("https://{}", nginx.addr),
        &format!("upstream_ca = {}\n", toml_path(&ca.path)),
    )
    .await;
    for h2c in [false, true] {
        let mut req = get(proxy.addr, "/who").header("host", "www.site.test");
        if h2c {
            req = req.over_h2c();
        }
        let rsp = req.send().await;
        assert_eq!(
            rsp.status(),
            200,
            "h2c client {h2c}; nginx said:\n{}",
            nginx.error_log()
        );
        assert_eq!(
            text_of(rsp).await,
            "host=www.site.test protocol=HTTP/2.0\n",
            "nginx hears the site's name over HTTP/2"
        );
        let rsp = get(proxy.addr, "/page")
            .header("host", "www.site.test")
            .header("accept", "text/html")
            .cookie("km_ai=visitor")
            .send()
            .await;
        assert_eq!(rsp.status(), 200);
        assert_eq!(
            text_of(rsp).await,
            r#"<p><a href="https://checkout.partner.com/cart?kmi=visitor">cart</a></p>"#
        );
    }
}

/// Accepts connections and never writes a byte: a TLS handshake to it never completes.
async fn silent_listener() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

#[tokio::test]
async fn an_https_origin_that_never_completes_the_handshake_is_a_502_after_upstream_connect() {
    let silent = silent_listener().await;
    let proxy = proxy_to(
        &format!("https://{silent}"),
        &format!("[timeouts]\nupstream_connect = \"300ms\"\nupstream_response = \"20s\"\n{ADMIN}"),
    )
    .await;
    for method in ["GET", "POST"] {
        let started = Instant::now();
        let mut req = request(method, proxy.addr, "/").header("host", "www.site.test");
        if method == "POST" {
            req = req.body("name=value");
        }
        let rsp = req.send().await;
        let took = started.elapsed();
        assert_eq!(rsp.status(), 502, "{method}");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{method}: 502 after {took:?}, upstream_connect is 300ms"
        );
        assert_eq!(
            text_of(rsp).await,
            "502 Bad Gateway: cannot connect to the origin\n"
        );
    }
    let m = metrics_of(&proxy).await;
    assert_eq!(
        metric(&m, r#"kmi_proxy_upstream_errors_total{kind="timeout"}"#),
        Some(2.0),
        "{m}"
    );
}

/// Accepts connections, reads the request head and then nothing more.
async fn never_reading_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 256];
            let _ = stream.read(&mut head).await;
            held.push(stream);
        }
    });
    addr
}

#[tokio::test]
async fn an_origin_that_never_reads_an_upload_is_a_504_not_a_hang() {
    let origin = never_reading_origin().await;
    let proxy = proxy("[timeouts]\nupstream_response = \"500ms\"\n", origin).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: www.site.test\r\nContent-Length: 1073741824\r\n\r\n",
        )
        .await
        .expect("write the head");
    let (mut read, mut write) = stream.into_split();
    // The client uploads as fast as the proxy takes it; the origin reads none of it.
    let uploader = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        while write.write_all(&chunk).await.is_ok() {}
    });
    let started = Instant::now();
    let head = within("the proxy's answer to a stalled upload", async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(read.read_u8().await.expect("a response head"));
        }
        String::from_utf8(head).unwrap()
    })
    .await;
    assert!(head.starts_with("HTTP/1.1 504 "), "{head}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "504 after {:?}",
        started.elapsed()
    );
    uploader.abort();
}

#[tokio::test]
async fn split_http2_cookies_reach_the_origin_joined_with_every_byte() {
    let origin = origin()
        .route("/", |_| Reply::ok().body("ok"))
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an h2c handshake");
    tokio::spawn(connection);
    let raw_utf8 = http::HeaderValue::from_bytes("name=José".as_bytes()).unwrap();
    let req = http::Request::builder()
        .uri("http://www.site.test/")
        .version(http::Version::HTTP_2)
        .header("cookie", "a=1")
        .header("cookie", raw_utf8)
        .header("cookie", "km_ai=visitor")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let rsp = within("an h2 response", sender.send_request(req))
        .await
        .expect("a response");
    assert_eq!(rsp.status(), 200);
    let _ = rsp.into_body().collect().await;
    let got = origin.the_request();
    let cookies: Vec<&[u8]> = got
        .headers
        .get_all("cookie")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    assert_eq!(
        cookies,
        vec!["a=1; name=José; km_ai=visitor".as_bytes()],
        "one Cookie field with every pair, bytes as sent"
    );
}

/// nginx's default `gzip_proxied off` stops compressing any request that carries `Via`: the
/// proxy must not add one upstream by default, or putting it in front of a site makes every
/// page, stylesheet and script travel uncompressed.
#[tokio::test]
async fn behind_the_proxy_an_nginx_origin_with_default_gzip_still_compresses() {
    let page = format!(
        "<!doctype html><title>t</title>{}<a href=\"https://checkout.partner.com/cart\">cart</a>",
        "<p>filler paragraph for the compressor</p>".repeat(50)
    );
    let css = "body { color: black; }\n".repeat(100);
    let body = "    root {dir};\n    types { text/html html; text/css css; }\n\
                gzip on;\n    gzip_types text/css;\n\
                location / { try_files $uri =404; }\n";
    let nginx = Nginx::start(
        "",
        body,
        &[("page.html", page.as_bytes()), ("site.css", css.as_bytes())],
    )
    .await;
    let proxy = proxy("", nginx.addr).await;
    for (path, cookie) in [
        ("/page.html", Some("km_ai=visitor")),
        ("/page.html", None),
        ("/site.css", Some("km_ai=visitor")),
    ] {
        let mut req = get(proxy.addr, path)
            .header("host", "www.site.test")
            .header("accept", "text/html,text/css")
            .header("accept-encoding", "gzip");
        if let Some(c) = cookie {
            req = req.cookie(c);
        }
        let rsp = req.send().await;
        assert_eq!(rsp.status(), 200, "{path}");
        assert_eq!(
            header(&rsp, "content-encoding"),
            Some("gzip"),
            "{path} with cookie {cookie:?} arrived uncompressed"
        );
        let compressed = body_of(rsp).await;
        let mut plain = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::MultiGzDecoder::new(&compressed[..]),
            &mut plain,
        )
        .expect("a gzip body");
        if path == "/page.html" && cookie.is_some() {
            assert!(
                contains(&plain, b"/cart?kmi=visitor"),
                "{path} not decorated"
            );
        }
    }
}
