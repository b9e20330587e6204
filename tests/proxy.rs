//! End to end: a real origin and the real proxy on `127.0.0.1:0`, spoken to over HTTP/1.1.
//!
//! Every test starts its own origin and proxy, so tests run in parallel and share nothing.

mod support;

use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A page with two partner links (one exact domain, one wildcard), one other site and one
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

/// `PAGE` as the proxy should send it to a visitor whose URL-encoded ID is `id`. The `&` before
/// the parameter is written as `&amp;`, which is what the browser reads as `&`.
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
    assert_ne!(
        page, PAGE,
        "the expected page must differ from the origin's"
    );
    page
}

/// An origin serving `PAGE` at `/`.
async fn shop() -> Origin {
    origin().route("/", |_| Reply::html(PAGE)).start().await
}

/// The page the proxy sends for these `Cookie` headers.
async fn page_with_cookies(proxy: &kmi_proxy::server::Running, cookies: &[&str]) -> String {
    let mut req = get(proxy.addr, "/");
    for c in cookies {
        req = req.cookie(c);
    }
    let rsp = req.send().await;
    assert_eq!(rsp.status(), 200, "cookies {cookies:?}");
    text_of(rsp).await
}

// 1. Which cookie is the ID ---------------------------------------------------------------------

#[tokio::test]
async fn named_id_beats_anonymous_whatever_the_order_and_across_cookie_headers() {
    let origin = shop().await;
    let proxy = proxy("", origin.addr).await;
    let cases: &[&[&str]] = &[
        &["km_ai=anon; km_ni=bob%40example.com"],
        &["km_ni=bob%40example.com; km_ai=anon"],
        &["km_ai=anon", "theme=dark; km_ni=bob%40example.com"],
        &["km_ni=bob%40example.com", "theme=dark; km_ai=anon"],
    ];
    for cookies in cases {
        assert_eq!(
            page_with_cookies(&proxy, cookies).await,
            decorated("bob%40example.com"),
            "cookies {cookies:?}"
        );
    }
    // Without a named ID, the anonymous one is used.
    assert_eq!(
        page_with_cookies(&proxy, &["theme=dark; km_ai=anon"]).await,
        decorated("anon")
    );
}

#[tokio::test]
async fn url_encoded_anonymous_id_is_decoded_once_and_re_encoded_in_the_link() {
    let origin = shop().await;
    let proxy = proxy("", origin.addr).await;
    let expected = decorated("Zk9%2BaB%2Fc3Q%3D%3D");
    assert_eq!(
        page_with_cookies(&proxy, &["km_ai=Zk9%2BaB%2Fc3Q%3D%3D"]).await,
        expected
    );
    // The same ID written without encoding (a `+` in a cookie is a plus, not a space).
    assert_eq!(
        page_with_cookies(&proxy, &["km_ai=Zk9+aB/c3Q=="]).await,
        expected
    );
}

#[tokio::test]
async fn identity_cookies_setting_can_leave_the_named_id_out() {
    let origin = shop().await;
    let proxy = proxy("[identity]\ncookies = [\"km_ai\"]\n", origin.addr).await;
    assert_eq!(
        page_with_cookies(&proxy, &["km_ni=bob%40example.com; km_ai=anon"]).await,
        decorated("anon")
    );
    assert_eq!(
        page_with_cookies(&proxy, &["km_ni=bob%40example.com"]).await,
        PAGE,
        "a named ID alone must not be used when only km_ai is configured"
    );
}

// 2. A hostile ID -------------------------------------------------------------------------------

#[tokio::test]
async fn hostile_id_is_percent_encoded_inside_the_href_never_markup() {
    let origin = shop().await;
    let proxy = proxy("", origin.addr).await;
    let page =
        page_with_cookies(&proxy, &["km_ai=%22%3E%3Cscript%3Ealert(1)%3C%2Fscript%3E"]).await;
    assert!(!page.contains("<script>alert"), "markup injected:\n{page}");
    assert_eq!(
        page,
        decorated("%22%3E%3Cscript%3Ealert%281%29%3C%2Fscript%3E")
    );

    // The same value sent without any encoding must not get through either.
    let page = page_with_cookies(&proxy, &[r#"km_ai="><script>alert(1)</script>"#]).await;
    assert!(!page.contains("<script>alert"), "markup injected:\n{page}");
    assert_eq!(
        page,
        decorated("%22%3E%3Cscript%3Ealert%281%29%3C%2Fscript%3E")
    );
}

// 3. IDs that are not used ----------------------------------------------------------------------

#[tokio::test]
async fn unusable_or_missing_ids_leave_the_page_byte_identical() {
    let origin = shop().await;
    let proxy = proxy("", origin.addr).await;
    let too_long = format!("km_ai={}", "x".repeat(256));
    let cases: &[&[&str]] = &[
        &[],
        &["theme=dark"],
        &["km_ai="],
        &["km_ai=\"\""],
        &[&too_long],
        &["km_ai=a%0D%0Ab"],
        &["km_ai=a%00b"],
        &["km_ai=%FF"],
        // A named ID that is unusable does not fall back to the anonymous one.
        &["km_ni=%00; km_ai=anon"],
    ];
    for cookies in cases {
        let rsp = {
            let mut req = get(proxy.addr, "/");
            for c in *cookies {
                req = req.cookie(c);
            }
            req.send().await
        };
        assert_eq!(rsp.status(), 200);
        assert_eq!(
            header(&rsp, "content-length"),
            Some(PAGE.len().to_string().as_str()),
            "an untouched page keeps its length; cookies {cookies:?}"
        );
        let body = body_of(rsp).await;
        assert_same_bytes(&body, PAGE.as_bytes(), &format!("cookies {cookies:?}"));
    }
    // Control: a usable ID at the longest allowed length does change the page.
    let longest = "x".repeat(255);
    assert_eq!(
        page_with_cookies(&proxy, &[&format!("km_ai={longest}")]).await,
        decorated(&longest)
    );
}

// 4. What is not HTML passes through ------------------------------------------------------------

#[tokio::test]
async fn binary_and_json_bodies_pass_through_byte_identical_with_their_length() {
    let blob = noise(4 * 1024 * 1024 + 17, 1);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(noise(3 * 1024 * 1024, 2));
    // JSON that happens to hold markup with a partner link: still not a page.
    let mut json = String::from("[");
    for i in 0..20_000 {
        json.push_str(&format!(
            r#"{{"n":{i},"html":"<a href=\"https://checkout.partner.com/p{i}\">x</a>"}},"#
        ));
    }
    json.push_str("null]");
    let served = [
        ("/blob", "application/octet-stream", Bytes::from(blob)),
        ("/image.png", "image/png", Bytes::from(png)),
        ("/data.json", "application/json", Bytes::from(json)),
    ];
    let mut builder = origin();
    for (path, content_type, bytes) in served.clone() {
        builder = builder.route(path, move |_| {
            Reply::ok()
                .header("content-type", content_type)
                .body(bytes.clone())
        });
    }
    let origin = builder.start().await;
    let proxy = proxy("", origin.addr).await;

    for (path, content_type, bytes) in served {
        let rsp = get(proxy.addr, path).cookie("km_ai=abc").send().await;
        assert_eq!(rsp.status(), 200, "{path}");
        assert_eq!(header(&rsp, "content-type"), Some(content_type), "{path}");
        assert_eq!(
            header(&rsp, "content-length"),
            Some(bytes.len().to_string().as_str()),
            "{path} keeps its Content-Length"
        );
        assert_eq!(header(&rsp, "vary"), None, "{path}");
        let body = body_of(rsp).await;
        assert_same_bytes(&body, &bytes, path);
    }
}

#[tokio::test]
async fn streamed_binary_body_passes_through_byte_identical() {
    let (feed, body) = channel();
    let mut body = Some(body);
    let origin = origin()
        .route("/stream.bin", move |_| {
            Reply::ok()
                .header("content-type", "application/octet-stream")
                .stream(body.take().expect("requested once"))
        })
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;
    let data = noise(2 * 1024 * 1024, 3);
    let parts: Vec<Bytes> = data.chunks(61_440).map(Bytes::copy_from_slice).collect();
    let sender = tokio::spawn(async move {
        for part in parts {
            feed.part(part).await;
        }
        feed.finish();
    });
    let rsp = get(proxy.addr, "/stream.bin")
        .cookie("km_ai=abc")
        .send()
        .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(header(&rsp, "content-length"), None);
    let body = body_of(rsp).await;
    sender.await.unwrap();
    assert_same_bytes(&body, &data, "streamed binary");
}

// 5. Request bodies and methods -----------------------------------------------------------------

/// An origin that stores whatever is sent to `/upload`.
async fn store() -> Origin {
    origin()
        .route("/upload", |req| {
            Reply::ok()
                .header("content-type", "text/plain")
                .body(format!("{} {} bytes\n", req.method, req.body.len()))
        })
        .start()
        .await
}

#[tokio::test]
async fn streamed_post_body_reaches_the_origin_byte_identical() {
    let origin = store().await;
    let proxy = proxy("", origin.addr).await;
    let data = noise(3 * 1024 * 1024 + 5, 4);
    let (feed, body) = channel();
    let parts: Vec<Bytes> = data.chunks(65_536).map(Bytes::copy_from_slice).collect();
    let sender = tokio::spawn(async move {
        for part in parts {
            feed.part(part).await;
        }
        feed.finish();
    });
    let rsp = request("POST", proxy.addr, "/upload")
        .header("content-type", "application/octet-stream")
        .stream(body)
        .send()
        .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(text_of(rsp).await, format!("POST {} bytes\n", data.len()));
    sender.await.unwrap();

    let received = origin.the_request();
    assert_eq!(received.method, "POST");
    assert_eq!(received.body_error, None);
    assert_eq!(
        received.header("content-type"),
        Some("application/octet-stream")
    );
    assert_same_bytes(&received.body, &data, "POST body at the origin");
}

#[tokio::test]
async fn post_with_content_length_keeps_its_length_and_bytes() {
    let origin = store().await;
    let proxy = proxy("", origin.addr).await;
    let data = Bytes::from(noise(2 * 1024 * 1024, 5));
    let rsp = request("POST", proxy.addr, "/upload")
        .body(data.clone())
        .send()
        .await;
    assert_eq!(rsp.status(), 200);
    body_of(rsp).await;
    let received = origin.the_request();
    assert_eq!(
        received.header("content-length"),
        Some(data.len().to_string().as_str())
    );
    assert_same_bytes(&received.body, &data, "POST body at the origin");
}

#[tokio::test]
async fn put_patch_and_delete_are_forwarded_with_their_bodies() {
    let origin = store().await;
    let proxy = proxy("", origin.addr).await;
    for (method, body) in [
        ("PUT", &b"{\"name\":\"new\"}"[..]),
        ("PATCH", b"{\"name\":\"changed\"}"),
        ("DELETE", b""),
        ("OPTIONS", b""),
    ] {
        let rsp = request(method, proxy.addr, "/upload?item=7")
            .body(Bytes::from_static(body))
            .send()
            .await;
        assert_eq!(rsp.status(), 200, "{method}");
        assert_eq!(
            text_of(rsp).await,
            format!("{method} {} bytes\n", body.len())
        );
        let received = origin.last_request();
        assert_eq!(received.method, method);
        assert_eq!(received.uri.path_and_query().unwrap(), "/upload?item=7");
        assert_eq!(&received.body[..], body, "{method}");
    }
    assert_eq!(origin.requests().len(), 4);
}

// 6. HEAD and bodiless statuses -----------------------------------------------------------------

#[tokio::test]
async fn head_gets_the_headers_its_get_would_get_without_a_body() {
    let origin = origin()
        .route("/", |_| {
            Reply::html(PAGE)
                .header("cache-control", "public, max-age=60")
                .header("etag", "\"v1\"")
        })
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;
    let ask = |method: &str| {
        format!(
            "{method} / HTTP/1.1\r\nHost: www.site.test\r\nCookie: km_ai=abc\r\n\
             Connection: close\r\n\r\n"
        )
    };
    let head = raw(proxy.addr, &ask("HEAD")).await;
    let get = raw(proxy.addr, &ask("GET")).await;
    assert_eq!(head.status(), 200, "{}", head.head);
    assert!(head.body.is_empty(), "HEAD got a body: {:?}", head.body);
    assert_eq!(origin.requests()[0].method, "HEAD");
    // A cache that stores the HEAD's headers must not learn that the decorated page is public,
    // nor a strong validator that the GET does not have (RFC 9110 §9.3.2).
    for field in [
        "content-type",
        "cache-control",
        "etag",
        "vary",
        "content-length",
    ] {
        assert_eq!(
            head.header(field),
            get.header(field),
            "{field}: HEAD\n{}\nGET\n{}",
            head.head,
            get.head
        );
    }
    assert_eq!(head.header("cache-control"), Some("max-age=60, private"));
    assert_eq!(head.header("etag"), Some("W/\"v1\""));
}

#[tokio::test]
async fn no_content_not_modified_and_not_found_pass_through() {
    let origin = origin()
        .route("/gone", |_| Reply::status(204).header("x-origin", "204"))
        .route("/cached", |_| {
            Reply::status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "public, max-age=60")
        })
        .route("/missing", |_| {
            Reply::status(404)
                .header("content-type", "text/html")
                .body(PAGE)
        })
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;

    let rsp = get(proxy.addr, "/gone").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 204);
    assert_eq!(header(&rsp, "x-origin"), Some("204"));
    assert!(body_of(rsp).await.is_empty());

    let rsp = get(proxy.addr, "/cached")
        .cookie("km_ai=abc")
        .header("if-none-match", "\"v1\"")
        .send()
        .await;
    assert_eq!(rsp.status(), 304);
    assert_eq!(
        origin.last_request().header("if-none-match"),
        Some("\"v1\"")
    );
    // Only that the validator comes back is asserted: whether a 304 for a page that would be
    // decorated should get the same cache-safety headers as the page is left open.
    let etag = header(&rsp, "etag").expect("the 304 carries the ETag");
    assert!(etag.ends_with("\"v1\""), "{etag}");
    assert!(body_of(rsp).await.is_empty());

    let rsp = get(proxy.addr, "/missing").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 404);
    let body = body_of(rsp).await;
    assert_same_bytes(&body, PAGE.as_bytes(), "404 page");
}

// 7. Hop-by-hop and forwarding headers ----------------------------------------------------------

#[tokio::test]
async fn hop_by_hop_request_headers_stop_at_the_proxy() {
    let origin = origin()
        .route("/echo", |_| Reply::ok().body("ok"))
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;
    let rsp = raw(
        proxy.addr,
        "GET /echo HTTP/1.1\r\n\
         Host: www.site.test\r\n\
         Connection: close, X-Secret\r\n\
         X-Secret: client-only\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\n\
         TE: trailers\r\n\
         Trailer: X-Checksum\r\n\
         Upgrade: websocket\r\n\
         Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
         Authorization: Bearer end-to-end\r\n\
         X-Kept: yes\r\n\
         \r\n",
    )
    .await;
    assert_eq!(rsp.status(), 200, "{}", rsp.head);
    let received = origin.the_request();
    for gone in [
        "x-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    ] {
        assert_eq!(
            received.header(gone),
            None,
            "{gone} reached the origin: {:?}",
            received.headers
        );
    }
    assert!(
        received.headers.get_all("connection").iter().all(|v| !v
            .to_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("secret")),
        "{:?}",
        received.headers
    );
    assert_eq!(received.header("authorization"), Some("Bearer end-to-end"));
    assert_eq!(received.header("x-kept"), Some("yes"));
}

#[tokio::test]
async fn hop_by_hop_response_headers_stop_at_the_proxy() {
    let origin = origin()
        .route("/", |_| {
            Reply::html(PAGE)
                .header("connection", "X-Secret")
                .header("x-secret", "origin-only")
                .header("keep-alive", "timeout=5, max=100")
                .header("proxy-authenticate", "Basic realm=\"origin\"")
                .header("proxy-connection", "keep-alive")
                .header("trailer", "X-Checksum")
                .header("upgrade", "h2c")
                .header("x-kept", "yes")
                .header("via", "1.0 origin-cache")
        })
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;
    for cookie in ["", "Cookie: km_ai=abc\r\n"] {
        let rsp = raw(
            proxy.addr,
            &format!("GET / HTTP/1.1\r\nHost: www.site.test\r\n{cookie}Connection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(rsp.status(), 200, "{}", rsp.head);
        for gone in [
            "x-secret",
            "keep-alive",
            "proxy-authenticate",
            "proxy-connection",
            "trailer",
            "upgrade",
        ] {
            assert!(
                rsp.all(gone).is_empty(),
                "{gone} reached the client ({cookie:?}):\n{}",
                rsp.head
            );
        }
        for connection in rsp.all("connection") {
            assert!(
                !connection.to_ascii_lowercase().contains("secret"),
                "{}",
                rsp.head
            );
        }
        assert_eq!(rsp.header("x-kept"), Some("yes"));
        assert_eq!(
            rsp.header("via"),
            Some("1.0 origin-cache, 1.1 kmi-proxy"),
            "{}",
            rsp.head
        );
    }
}

#[tokio::test]
async fn forwarding_headers_tell_the_origin_who_asked() {
    let origin = origin()
        .route("/echo", |_| Reply::ok().body("ok"))
        .start()
        .await;
    let proxy = proxy("via_upstream = true", origin.addr).await;
    let rsp = get(proxy.addr, "/echo")
        .header("host", "www.site.test")
        .header("x-forwarded-for", "1.2.3.4")
        .header("via", "1.0 corporate-proxy")
        .send()
        .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(header(&rsp, "via"), Some("1.1 kmi-proxy"));
    body_of(rsp).await;

    let received = origin.the_request();
    assert_eq!(received.header("host"), Some("www.site.test"));
    assert_eq!(
        received.header("x-forwarded-for"),
        Some("1.2.3.4, 127.0.0.1")
    );
    assert_eq!(received.header("x-forwarded-proto"), Some("http"));
    assert_eq!(received.header("x-forwarded-host"), Some("www.site.test"));
    assert_eq!(
        received.header("via"),
        Some("1.0 corporate-proxy, 1.1 kmi-proxy")
    );
}

#[tokio::test]
async fn http_1_0_client_gets_a_whole_page_and_via_names_each_hops_protocol() {
    let origin = shop().await;
    let proxy = proxy("via_upstream = true", origin.addr).await;
    let rsp = raw(
        proxy.addr,
        "GET / HTTP/1.0\r\nHost: www.site.test\r\nCookie: km_ai=abc\r\n\r\n",
    )
    .await;
    assert!(rsp.head.starts_with("HTTP/1.0 200 "), "{}", rsp.head);
    // No chunked framing for HTTP/1.0: the page ends when the connection does.
    assert_eq!(rsp.header("transfer-encoding"), None, "{}", rsp.head);
    assert_eq!(
        String::from_utf8(rsp.body.clone()).unwrap(),
        decorated("abc")
    );
    // The request the proxy received was HTTP/1.0; the response it received was HTTP/1.1
    // (RFC 9110 section 7.6.3: Via names the protocol of the message as received).
    assert_eq!(origin.the_request().header("via"), Some("1.0 kmi-proxy"));
    assert_eq!(
        rsp.header("via"),
        Some("1.1 kmi-proxy"),
        "the response came from the origin over HTTP/1.1\n{}",
        rsp.head
    );
}

#[tokio::test]
async fn host_is_the_clients_unless_preserve_host_is_false() {
    let origin = origin()
        .route("/echo", |_| Reply::ok().body("ok"))
        .start()
        .await;
    let preserving = proxy("", origin.addr).await;
    let rewriting = proxy("preserve_host = false", origin.addr).await;

    let rsp = get(preserving.addr, "/echo")
        .header("host", "www.site.test")
        .send()
        .await;
    body_of(rsp).await;
    assert_eq!(origin.last_request().header("host"), Some("www.site.test"));

    let rsp = get(rewriting.addr, "/echo")
        .header("host", "www.site.test")
        .send()
        .await;
    body_of(rsp).await;
    let received = origin.last_request();
    assert_eq!(
        received.header("host"),
        Some(origin.addr.to_string().as_str())
    );
    assert_eq!(received.header("x-forwarded-host"), Some("www.site.test"));
}

// 8. Cache safety -------------------------------------------------------------------------------

/// An origin whose page is cacheable by anyone, with a strong validator.
async fn cacheable_shop() -> Origin {
    origin()
        .route("/", |_| {
            Reply::html(PAGE)
                .header("cache-control", "public, max-age=60, s-maxage=600")
                .header("etag", "\"v1\"")
                .header("vary", "Accept-Encoding")
        })
        .route("/data.json", |_| {
            Reply::ok()
                .header("content-type", "application/json")
                .header("cache-control", "public, max-age=60")
                .header("etag", "\"j1\"")
                .header("vary", "Accept-Encoding")
                .body("{\"a\":1}")
        })
        .start()
        .await
}

#[tokio::test]
async fn rewritten_page_is_private_weakly_tagged_and_varies_on_cookie() {
    let origin = cacheable_shop().await;
    let proxy = proxy("", origin.addr).await;
    let rsp = raw(
        proxy.addr,
        "GET / HTTP/1.1\r\nHost: www.site.test\r\nCookie: km_ai=abc\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(rsp.status(), 200, "{}", rsp.head);
    assert_eq!(
        rsp.header("vary"),
        Some("Accept-Encoding, Cookie, Sec-GPC"),
        "{}",
        rsp.head
    );
    assert_eq!(rsp.header("cache-control"), Some("max-age=60, private"));
    assert_eq!(rsp.header("etag"), Some("W/\"v1\""));
    assert_eq!(rsp.header("content-length"), None, "{}", rsp.head);
    assert_eq!(rsp.header("transfer-encoding"), Some("chunked"));
    assert_eq!(
        String::from_utf8(rsp.dechunked()).unwrap(),
        decorated("abc")
    );
}

#[tokio::test]
async fn page_without_id_varies_on_cookie_but_keeps_its_cache_headers() {
    let origin = cacheable_shop().await;
    let proxy = proxy("", origin.addr).await;
    let rsp = raw(
        proxy.addr,
        "GET / HTTP/1.1\r\nHost: www.site.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(rsp.status(), 200, "{}", rsp.head);
    assert_eq!(rsp.header("vary"), Some("Accept-Encoding, Cookie, Sec-GPC"));
    assert_eq!(
        rsp.header("cache-control"),
        Some("public, max-age=60, s-maxage=600")
    );
    assert_eq!(rsp.header("etag"), Some("\"v1\""));
    assert_eq!(
        rsp.header("content-length"),
        Some(PAGE.len().to_string().as_str())
    );
    assert_same_bytes(&rsp.body, PAGE.as_bytes(), "page without ID");
}

#[tokio::test]
async fn json_response_keeps_its_vary_and_cache_headers() {
    let origin = cacheable_shop().await;
    let proxy = proxy("", origin.addr).await;
    let rsp = raw(
        proxy.addr,
        "GET /data.json HTTP/1.1\r\nHost: www.site.test\r\nCookie: km_ai=abc\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(rsp.status(), 200, "{}", rsp.head);
    assert_eq!(rsp.header("vary"), Some("Accept-Encoding"));
    assert_eq!(rsp.header("cache-control"), Some("public, max-age=60"));
    assert_eq!(rsp.header("etag"), Some("\"j1\""));
    assert_eq!(rsp.body, b"{\"a\":1}");
}

// 9. Origin failures ----------------------------------------------------------------------------

#[tokio::test]
async fn origin_down_is_a_502_with_a_one_line_public_reason() {
    let dead = closed_port().await;
    let proxy = proxy("", dead).await;
    for attempt in 1..=2 {
        let rsp = get(proxy.addr, "/").cookie("km_ai=abc").send().await;
        assert_eq!(rsp.status(), 502, "attempt {attempt}");
        assert_eq!(
            header(&rsp, "content-type"),
            Some("text/plain; charset=utf-8")
        );
        let text = text_of(rsp).await;
        assert_eq!(
            text.lines().count(),
            1,
            "one line, attempt {attempt}: {text:?}"
        );
        assert_eq!(text, "502 Bad Gateway: cannot connect to the origin\n");
        assert!(
            !text.contains(&dead.port().to_string()),
            "the origin's address is for the log, not the client: {text:?}"
        );
    }
}

#[tokio::test]
async fn origin_hanging_up_before_answering_is_a_502() {
    let origin = hanging_up_origin().await;
    let proxy = proxy("", origin).await;
    for attempt in 1..=2 {
        let rsp = get(proxy.addr, "/").cookie("km_ai=abc").send().await;
        assert_eq!(rsp.status(), 502, "attempt {attempt}");
        assert_eq!(header(&rsp, "cache-control"), Some("no-store"));
        let text = text_of(rsp).await;
        assert_eq!(text.lines().count(), 1, "{text:?}");
        assert!(
            text.starts_with("502 Bad Gateway: ") && !text.contains(&origin.port().to_string()),
            "{text:?}"
        );
    }
}

#[tokio::test]
async fn silent_origin_is_a_504_and_the_proxy_carries_on() {
    let origin = origin()
        .route("/slow", |_| Reply::never())
        .route("/", |_| Reply::html(PAGE))
        .start()
        .await;
    let proxy = proxy("[timeouts]\nupstream_response = \"200ms\"\n", origin.addr).await;

    let started = Instant::now();
    let rsp = get(proxy.addr, "/slow").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 504);
    assert!(
        started.elapsed().as_millis() >= 200,
        "504 before the timeout: {:?}",
        started.elapsed()
    );
    let text = text_of(rsp).await;
    assert_eq!(text.lines().count(), 1, "{text:?}");
    assert_eq!(
        text,
        "504 Gateway Timeout: the origin did not answer in time\n"
    );

    // The next request is served normally.
    let rsp = get(proxy.addr, "/").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(text_of(rsp).await, decorated("abc"));
}

// 10. Streaming ---------------------------------------------------------------------------------

#[tokio::test]
async fn decorated_link_reaches_the_client_before_the_origin_finishes_the_page() {
    let (feed, body) = channel();
    let mut body = Some(body);
    let origin = origin()
        .route("/", move |_| {
            Reply::ok()
                .header("content-type", "text/html; charset=utf-8")
                .stream(body.take().expect("requested once"))
        })
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;

    let first = "<!DOCTYPE html><html><body><p>Intro</p>\
                 <a href=\"https://checkout.partner.com/pay\">Pay</a><p>Loading";
    let second = " the rest...</p><a href=\"https://x.partner.net/\">More</a></body></html>\n";
    let link = "<a href=\"https://checkout.partner.com/pay?kmi=abc\">";

    let rsp = get(proxy.addr, "/").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 200);
    let mut body = rsp.into_body();
    feed.part(first).await;

    // The second part is held back until the decorated link has arrived: a proxy that buffers
    // the page never sends it, and this read times out.
    let mut received = Vec::new();
    while !contains(&received, link.as_bytes()) {
        let frame = within(
            "the decorated link while the origin holds back the rest of the page \
             (does the proxy buffer whole pages?)",
            body.frame(),
        )
        .await
        .expect("the body ended before the link")
        .expect("a body frame");
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
        }
    }

    feed.part(second).await;
    feed.finish();
    let rest = within("the rest of the page", body.collect())
        .await
        .expect("the rest of the page")
        .to_bytes();
    received.extend_from_slice(&rest);
    let expected = format!("{first}{second}")
        .replace(
            "https://checkout.partner.com/pay\"",
            "https://checkout.partner.com/pay?kmi=abc\"",
        )
        .replace(
            "https://x.partner.net/\"",
            "https://x.partner.net/?kmi=abc\"",
        );
    assert_eq!(String::from_utf8(received).unwrap(), expected);
}

#[tokio::test]
async fn large_page_is_rewritten_whole_without_losing_a_byte() {
    let mut page = String::from("<!DOCTYPE html><html><body>\n");
    let mut expected = page.clone();
    let filler = "<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit. ü ✓</p>\n".repeat(40);
    for i in 0..800 {
        page.push_str(&filler);
        expected.push_str(&filler);
        page.push_str(&format!(
            "<a href=\"https://checkout.partner.com/item/{i}\">{i}</a>\n<a href=\"/local/{i}\">l</a>\n"
        ));
        expected.push_str(&format!(
            "<a href=\"https://checkout.partner.com/item/{i}?kmi=abc\">{i}</a>\n<a href=\"/local/{i}\">l</a>\n"
        ));
    }
    page.push_str("</body></html>\n");
    expected.push_str("</body></html>\n");
    assert!(page.len() > 2 * 1024 * 1024);
    let served = Bytes::from(page);
    let origin = origin()
        .route("/", move |_| Reply::html(served.clone()))
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;
    let rsp = get(proxy.addr, "/").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 200);
    let body = body_of(rsp).await;
    assert_same_bytes(&body, expected.as_bytes(), "large rewritten page");
}

// 11. The client goes away ----------------------------------------------------------------------

#[tokio::test]
async fn client_hanging_up_mid_page_releases_the_origin_and_the_proxy_carries_on() {
    let (feed, body) = channel();
    let mut body = Some(body);
    let origin = origin()
        .route("/long", move |_| {
            Reply::ok()
                .header("content-type", "text/html")
                .stream(body.take().expect("requested once"))
        })
        .route("/", |_| Reply::html(PAGE))
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;
    let part = Bytes::from(
        "<p>paragraph <a href=\"https://checkout.partner.com/x\">x</a></p>\n".repeat(256),
    );

    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET /long HTTP/1.1\r\nHost: www.site.test\r\nCookie: km_ai=abc\r\n\r\n")
        .await
        .unwrap();
    feed.part(Bytes::from_static(b"<!DOCTYPE html><html><body>\n"))
        .await;
    feed.part(part.clone()).await;
    let mut first = [0u8; 64];
    let n = within("the first bytes of the response", client.read(&mut first))
        .await
        .unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &first[..n]);
    drop(client);

    // The origin keeps sending; once the proxy notices the client is gone it must let go of the
    // origin's response instead of reading it to the end for nobody.
    within(
        "the proxy to drop the origin's response after the client hung up",
        async { while feed.send(part.clone()).await {} },
    )
    .await;

    let rsp = get(proxy.addr, "/").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(text_of(rsp).await, decorated("abc"));
}

// 12. The origin breaks off ---------------------------------------------------------------------

/// Serves a page at `/` whose body the test breaks off after `first`, with these extra headers.
async fn breaking_origin(
    content_type: &'static str,
    content_length: Option<usize>,
) -> (Origin, Feed) {
    let (feed, body) = channel();
    let mut body = Some(body);
    let origin = origin()
        .route("/", move |_| {
            let mut reply = Reply::ok().header("content-type", content_type);
            if let Some(n) = content_length {
                reply = reply.header("content-length", &n.to_string());
            }
            reply.stream(body.take().expect("requested once"))
        })
        .start()
        .await;
    (origin, feed)
}

async fn assert_broken_page_is_an_error(content_type: &'static str, content_length: Option<usize>) {
    let what = format!("{content_type}, content-length {content_length:?}");
    let (origin, feed) = breaking_origin(content_type, content_length).await;
    let proxy = proxy("", origin.addr).await;
    let rsp = get(proxy.addr, "/").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 200, "{what}");
    feed.part(
        "<!DOCTYPE html><html><body><a href=\"https://checkout.partner.com/\">Pay</a><p>Half a pa",
    )
    .await;
    feed.fail().await;
    // Any error will do: what matters is that the response does not end cleanly.
    if let Ok(body) = try_body_of(rsp).await {
        panic!(
            "{what}: the client got a complete-looking page from a broken origin body: {:?}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[tokio::test]
async fn origin_breaking_off_a_rewritten_page_with_a_length_is_an_error_for_the_client() {
    assert_broken_page_is_an_error("text/html", Some(100_000)).await;
}

#[tokio::test]
async fn origin_breaking_off_a_chunked_rewritten_page_is_an_error_for_the_client() {
    assert_broken_page_is_an_error("text/html", None).await;
}

#[tokio::test]
async fn origin_breaking_off_a_passed_through_body_is_an_error_for_the_client() {
    assert_broken_page_is_an_error("application/octet-stream", Some(100_000)).await;
    assert_broken_page_is_an_error("application/octet-stream", None).await;
}
