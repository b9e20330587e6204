//! End to end over the transports: the TLS listener (HTTP/1.1 and HTTP/2 by ALPN, certificates by
//! SNI), `https://` origins with a private CA, h2c, content codings, WebSocket upgrades,
//! `Expect: 100-continue` and large uploads, ranges, redirects and revalidation.
//!
//! Every certificate is made at test time by a private CA (`support::pki`) in a temp dir of its
//! own. Every test starts its own origin and proxy on `127.0.0.1:0`.

mod support;

use std::hash::Hasher;
use std::io::{Read, Write};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Version;
use http_body_util::BodyExt;
use kmi_proxy::config::Config;
use support::websocket::{echo_origin, raw_handshake, SAMPLE_ACCEPT, SAMPLE_KEY};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A page with an absolute partner link, a scheme-relative one (it takes the page's scheme), a
/// link elsewhere and a local one.
const PAGE: &str = r#"<!DOCTYPE html>
<html><head><title>Shop</title></head>
<body>
<a href="https://checkout.partner.com/pay?order=42">Pay</a>
<a href="//checkout.partner.com/x">Checkout</a>
<a href="https://www.elsewhere.test/">Elsewhere</a>
<a href="/local">Local</a>
</body></html>
"#;

/// `PAGE` as a visitor whose URL-encoded ID is `id` gets it.
fn decorated(id: &str) -> String {
    PAGE.replace(
        r#""https://checkout.partner.com/pay?order=42""#,
        &format!(r#""https://checkout.partner.com/pay?order=42&amp;kmi={id}""#),
    )
    .replace(
        r#""//checkout.partner.com/x""#,
        &format!(r#""//checkout.partner.com/x?kmi={id}""#),
    )
}

/// An origin serving `PAGE` at `/`.
async fn shop() -> Origin {
    origin().route("/", |_| Reply::html(PAGE)).start().await
}

/// A browser's navigation to `path` on `www.site.test`: it asks for HTML.
fn navigate(addr: std::net::SocketAddr, path: &str) -> Req {
    get(addr, path)
        .header("host", "www.site.test")
        .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
}

// 1. The TLS listener ----------------------------------------------------------------------------

#[tokio::test]
async fn tls_listener_serves_the_decorated_page_over_http_1_1_and_http_2_by_alpn() {
    let ca = Ca::new("Test CA");
    let site = ca.leaf(&["www.site.test"]);
    let origin = shop().await;
    let proxy = proxy(
        &format!("via_upstream = true\n{}", tls_listener(&site)),
        origin.addr,
    )
    .await;
    let tls_addr = proxy.tls_addr.expect("the proxy has a TLS listener");

    let cases: [(&[&str], &str, Version, &str); 3] = [
        (&["http/1.1"], "http/1.1", Version::HTTP_11, "1.1 kmi-proxy"),
        (&["h2", "http/1.1"], "h2", Version::HTTP_2, "2 kmi-proxy"),
        (&["h2"], "h2", Version::HTTP_2, "2 kmi-proxy"),
    ];
    for (offered, alpn, version, via) in cases {
        let client = tls_client(&ca, "www.site.test").offering(offered);
        let rsp = navigate(tls_addr, "/")
            .cookie("km_ai=abc")
            .over_tls(&client)
            .send()
            .await;
        assert_eq!(rsp.status(), 200, "ALPN {offered:?}");
        assert_eq!(negotiated(&rsp).alpn.as_deref(), Some(alpn), "{offered:?}");
        assert_eq!(rsp.version(), version, "{offered:?}");
        assert_eq!(
            text_of(rsp).await,
            decorated("abc"),
            "ALPN {offered:?}: both partner links, the scheme-relative one too, are decorated"
        );
        let received = origin.last_request();
        assert_eq!(received.header("x-forwarded-proto"), Some("https"));
        assert_eq!(received.header("host"), Some("www.site.test"));
        assert_eq!(received.header("x-forwarded-host"), Some("www.site.test"));
        assert_eq!(received.header("via"), Some(via), "{offered:?}");
    }

    // A client that offers no ALPN at all speaks HTTP/1.1.
    let client = tls_client(&ca, "www.site.test").offering(&[]);
    let rsp = navigate(tls_addr, "/")
        .cookie("km_ai=abc")
        .over_tls(&client)
        .send()
        .await;
    assert_eq!(negotiated(&rsp).alpn, None);
    assert_eq!(rsp.version(), Version::HTTP_11);
    assert_eq!(text_of(rsp).await, decorated("abc"));

    // The plain listener still serves, and says so to the origin.
    let rsp = navigate(proxy.addr, "/").cookie("km_ai=abc").send().await;
    assert_eq!(text_of(rsp).await, decorated("abc"));
    assert_eq!(
        origin.last_request().header("x-forwarded-proto"),
        Some("http")
    );
}

// 2. Certificates by SNI -------------------------------------------------------------------------

#[tokio::test]
async fn each_server_name_gets_its_own_certificate() {
    // One CA per certificate: a handshake only verifies when the proxy picked the certificate
    // that CA signed. The default certificate is valid for every name, so a handshake that
    // fails against its CA shows the proxy did not fall back to it.
    let (ca_a, ca_b, ca_default) = (Ca::new("CA A"), Ca::new("CA B"), Ca::new("CA default"));
    let a = ca_a.leaf(&["a.site.test"]);
    let b = ca_b.leaf(&["b.site.test", "*.b.site.test"]);
    let default = ca_default.leaf(&[
        "www.site.test",
        "a.site.test",
        "b.site.test",
        "*.b.site.test",
        "127.0.0.1",
    ]);
    let sni = format!(
        "\n[[tls.certificate]]\nhosts = [\"a.site.test\"]\ncert = {}\nkey = {}\n\
         \n[[tls.certificate]]\nhosts = [\"b.site.test\", \"*.b.site.test\"]\ncert = {}\nkey = {}\n",
        toml_path(&a.cert_path),
        toml_path(&a.key_path),
        toml_path(&b.cert_path),
        toml_path(&b.key_path),
    );
    let origin = shop().await;
    let with_default = proxy(&format!("{}{sni}", tls_listener(&default)), origin.addr).await;
    let tls_addr = with_default.tls_addr.expect("a TLS listener");

    let cases = [
        (&ca_a, "a.site.test", &a),
        (&ca_a, "A.Site.Test", &a),
        (&ca_b, "b.site.test", &b),
        (&ca_b, "shop.b.site.test", &b),
        (&ca_default, "www.site.test", &default),
        // A client connecting by IP address sends no SNI at all.
        (&ca_default, "127.0.0.1", &default),
    ];
    for (ca, name, expected) in cases {
        let settled = tls_client(ca, name)
            .handshake(tls_addr)
            .await
            .unwrap_or_else(|e| panic!("handshake as {name}: {e}"));
        assert!(
            settled.certificate.as_ref() == Some(&expected.der),
            "{name} got another certificate than the one for {:?}",
            expected.names
        );
    }
    for name in ["a.site.test", "b.site.test", "shop.b.site.test"] {
        let fell_back = tls_client(&ca_default, name).handshake(tls_addr).await;
        assert!(
            fell_back.is_err(),
            "{name} was served the default certificate instead of its own"
        );
    }

    // And a request by name goes through with the decoration.
    for (ca, name) in [(&ca_a, "a.site.test"), (&ca_b, "shop.b.site.test")] {
        let rsp = get(tls_addr, "/")
            .header("host", name)
            .cookie("km_ai=abc")
            .over_tls(&tls_client(ca, name))
            .send()
            .await;
        assert_eq!(rsp.status(), 200, "{name}");
        assert_eq!(text_of(rsp).await, decorated("abc"), "{name}");
        assert_eq!(origin.last_request().header("host"), Some(name));
    }

    // Without a default certificate, a name nobody has a certificate for fails its handshake,
    // and the listener carries on for the names it has.
    let sni_only = proxy(
        &format!("listen_tls = \"127.0.0.1:0\"\n[tls]\n{sni}"),
        origin.addr,
    )
    .await;
    let sni_only = sni_only.tls_addr.expect("a TLS listener");
    assert!(tls_client(&ca_default, "www.site.test")
        .handshake(sni_only)
        .await
        .is_err());
    let settled = tls_client(&ca_a, "a.site.test")
        .handshake(sni_only)
        .await
        .expect("a.site.test still has its certificate");
    assert!(settled.certificate.as_ref() == Some(&a.der));
}

// 3. Bad TLS files -------------------------------------------------------------------------------

/// The error text of a configuration that must not load.
fn config_error(text: &str) -> String {
    match Config::parse(text, "test configuration") {
        Ok(_) => panic!("the configuration was accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn bad_tls_files_are_configuration_errors_naming_the_file() {
    let ca = Ca::new("Test CA");
    let site = ca.leaf(&["www.site.test"]);
    let other = ca.leaf(&["other.site.test"]);
    let missing = ca.dir().path().join("missing.pem");
    let garbage = ca.dir().write("garbage.pem", "this is not a PEM file\n");
    let origin = "127.0.0.1:9".parse().unwrap();
    let tls = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "listen_tls = \"127.0.0.1:0\"\n[tls]\ncert = {}\nkey = {}\n",
            toml_path(cert),
            toml_path(key)
        )
    };

    let cases = [
        (
            "missing certificate",
            tls(&missing, &site.key_path),
            &missing,
        ),
        ("missing key", tls(&site.cert_path, &missing), &missing),
        (
            "certificate without PEM",
            tls(&garbage, &site.key_path),
            &garbage,
        ),
        ("key without PEM", tls(&site.cert_path, &garbage), &garbage),
        // A certificate file holding only a key has no CERTIFICATE section either.
        (
            "key given as certificate",
            tls(&site.key_path, &site.key_path),
            &site.key_path,
        ),
        (
            "key of another certificate",
            tls(&site.cert_path, &other.key_path),
            &site.cert_path,
        ),
        (
            "SNI certificate missing",
            format!(
                "{}\n[[tls.certificate]]\nhosts = [\"a.site.test\"]\ncert = {}\nkey = {}\n",
                tls_listener(&site),
                toml_path(&missing),
                toml_path(&site.key_path)
            ),
            &missing,
        ),
        (
            "upstream_ca missing",
            format!("upstream_ca = {}\n", toml_path(&missing)),
            &missing,
        ),
        (
            "upstream_ca without PEM",
            format!("upstream_ca = {}\n", toml_path(&garbage)),
            &garbage,
        ),
    ];
    for (what, extra, path) in cases {
        let shown = config_error(&config_text(&extra, origin));
        assert!(
            shown.contains(&path.display().to_string()),
            "{what}: the error does not name {}:\n{shown}",
            path.display()
        );
    }

    // The mismatched pair names both files.
    let shown = config_error(&config_text(&tls(&site.cert_path, &other.key_path), origin));
    assert!(
        shown.contains(&other.key_path.display().to_string()),
        "{shown}"
    );

    // Control: the matching pair loads.
    Config::parse(
        &config_text(&tls(&site.cert_path, &site.key_path), origin),
        "t",
    )
    .expect("a matching certificate and key load");
}

// 4. An https:// origin with a private CA ---------------------------------------------------------

#[tokio::test]
async fn https_origin_with_a_private_ca_serves_over_http_2_when_offered() {
    let ca = Ca::new("Origin CA");
    let cert = ca.leaf(&["127.0.0.1"]);
    let trust = format!("upstream_ca = {}\n", toml_path(&ca.path));
    for (offered, version) in [
        (&["h2", "http/1.1"][..], Version::HTTP_2),
        (&["http/1.1"][..], Version::HTTP_11),
    ] {
        let origin = origin()
            .route("/", |_| Reply::html(PAGE))
            .over_tls_offering(&cert, offered)
            .start()
            .await;
        let proxy = proxy_to(&format!("https://{}", origin.addr), &trust).await;
        // An HTTP/1.1 client and an HTTP/2 (h2c) client both get the page.
        for h2c in [false, true] {
            let mut req = navigate(proxy.addr, "/").cookie("km_ai=abc");
            if h2c {
                req = req.over_h2c();
            }
            let rsp = req.send().await;
            assert_eq!(rsp.status(), 200, "origin offers {offered:?}, h2c {h2c}");
            assert_eq!(text_of(rsp).await, decorated("abc"), "{offered:?}");
            let received = origin.last_request();
            assert_eq!(
                received.version, version,
                "origin offering {offered:?} was spoken to in {:?}",
                received.version
            );
            assert_eq!(received.uri.path(), "/");
            // The site's name reaches the origin (the TLS name checked is the upstream's), in
            // exactly one place: `Host` on HTTP/1.1, `:authority` on HTTP/2 (nginx refuses a
            // request that carries both).
            if version == Version::HTTP_2 {
                assert_eq!(
                    received.uri.authority().map(|a| a.as_str()),
                    Some("www.site.test")
                );
                assert_eq!(received.header("host"), None, "Host beside :authority");
            } else {
                assert_eq!(received.header("host"), Some("www.site.test"));
            }
            assert_eq!(received.header("x-forwarded-proto"), Some("http"));
        }
    }
}

#[tokio::test]
async fn https_origin_with_a_bad_certificate_is_a_502_counted_as_tls() {
    let ca = Ca::new("Origin CA");
    let stranger = Ca::new("Unknown CA");
    let trust = format!("upstream_ca = {}\n", toml_path(&ca.path));
    let cases = [
        (
            "a certificate for another name",
            ca.leaf(&["elsewhere.test"]),
        ),
        (
            "a certificate from an unknown CA",
            stranger.leaf(&["127.0.0.1"]),
        ),
    ];
    for (what, cert) in cases {
        let origin = origin()
            .route("/", |_| Reply::html(PAGE))
            .over_tls(&cert)
            .start()
            .await;
        let proxy = proxy_to(
            &format!("https://{}", origin.addr),
            &format!("{trust}{ADMIN}"),
        )
        .await;
        for attempt in 1..=2 {
            let rsp = navigate(proxy.addr, "/").cookie("km_ai=abc").send().await;
            assert_eq!(rsp.status(), 502, "{what}, attempt {attempt}");
            let text = text_of(rsp).await;
            assert_eq!(
                text, "502 Bad Gateway: cannot establish a secure connection to the origin\n",
                "{what}: a public reason; the certificate problem goes to the log"
            );
        }
        let m = metrics_of(&proxy).await;
        assert_eq!(
            metric(&m, r#"kmi_proxy_upstream_errors_total{kind="tls"}"#),
            Some(2.0),
            "{what}: {m}"
        );
        assert!(
            origin.requests().is_empty(),
            "{what}: a request reached an origin whose certificate was refused"
        );
    }
}

// 5. h2c on the plain listener -------------------------------------------------------------------

#[tokio::test]
async fn h2c_prior_knowledge_gets_the_decorated_page() {
    let origin = shop().await;
    let proxy = proxy("via_upstream = true", origin.addr).await;
    let rsp = navigate(proxy.addr, "/")
        .cookie("km_ai=abc")
        .over_h2c()
        .send()
        .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.version(), Version::HTTP_2);
    assert_eq!(text_of(rsp).await, decorated("abc"));
    let received = origin.the_request();
    assert_eq!(received.version, Version::HTTP_11);
    assert_eq!(received.header("via"), Some("2 kmi-proxy"));
    assert_eq!(received.header("x-forwarded-proto"), Some("http"));
}

#[tokio::test]
async fn h2c_cookies_split_over_fields_are_one_identity_and_reach_the_origin_as_one_header() {
    let origin = shop().await;
    let proxy = proxy("", origin.addr).await;
    let rsp = navigate(proxy.addr, "/")
        .cookie("km_ai=anon")
        .cookie("theme=dark")
        .cookie("km_ni=bob%40example.com")
        .over_h2c()
        .send()
        .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        text_of(rsp).await,
        decorated("bob%40example.com"),
        "the named ID in the third field beats the anonymous one in the first"
    );
    assert_eq!(
        origin.the_request().header("cookie"),
        Some("km_ai=anon; theme=dark; km_ni=bob%40example.com")
    );
}

#[tokio::test]
async fn h2c_request_with_only_an_authority_reaches_the_origin_with_that_host() {
    let origin = shop().await;
    let proxy = proxy("", origin.addr).await;
    // `over_h2c` sends the `Host` given here as `:authority` and no `Host` field.
    let rsp = get(proxy.addr, "/")
        .header("host", "www.site.test:8443")
        .cookie("km_ai=abc")
        .over_h2c()
        .send()
        .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(text_of(rsp).await, decorated("abc"));
    let received = origin.the_request();
    assert_eq!(received.header("host"), Some("www.site.test:8443"));
    assert_eq!(
        received.header("x-forwarded-host"),
        Some("www.site.test:8443")
    );
}

// 6. Content codings -----------------------------------------------------------------------------

const CODINGS: [&str; 4] = ["gzip", "deflate", "br", "zstd"];

/// An encoder the origin drives part by part, flushing each part so it can be decoded at once.
enum Pack {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    Br(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

impl Pack {
    fn new(coding: &str) -> Pack {
        let level = flate2::Compression::default();
        match coding {
            "gzip" => Pack::Gzip(flate2::write::GzEncoder::new(Vec::new(), level)),
            "deflate" => Pack::Deflate(flate2::write::ZlibEncoder::new(Vec::new(), level)),
            "br" => Pack::Br(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                5,
                22,
            ))),
            "zstd" => Pack::Zstd(zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap()),
            other => panic!("no encoder for {other}"),
        }
    }

    /// Compresses and flushes one part; the bytes to send for it.
    fn part(&mut self, data: &[u8]) -> Bytes {
        fn run<W: Write>(w: &mut W, data: &[u8]) {
            w.write_all(data).unwrap();
            w.flush().unwrap();
        }
        let out = match self {
            Pack::Gzip(e) => {
                run(e, data);
                e.get_mut()
            }
            Pack::Deflate(e) => {
                run(e, data);
                e.get_mut()
            }
            Pack::Br(e) => {
                run(e.as_mut(), data);
                e.get_mut()
            }
            Pack::Zstd(e) => {
                run(e, data);
                e.get_mut()
            }
        };
        Bytes::from(std::mem::take(out))
    }

    /// Ends the stream; its last bytes.
    fn finish(self) -> Bytes {
        Bytes::from(match self {
            Pack::Gzip(e) => e.finish().unwrap(),
            Pack::Deflate(e) => e.finish().unwrap(),
            Pack::Br(e) => e.into_inner(),
            Pack::Zstd(e) => e.finish().unwrap(),
        })
    }
}

/// `data` compressed whole.
fn packed(coding: &str, data: &[u8]) -> Bytes {
    let mut p = Pack::new(coding);
    let mut out = p.part(data).to_vec();
    out.extend_from_slice(&p.finish());
    out.into()
}

/// A whole compressed body decoded with the libraries' reading decoders (strict about the end).
fn unpacked(coding: &str, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    match coding {
        "gzip" => flate2::read::GzDecoder::new(data).read_to_end(&mut out)?,
        "deflate" => flate2::read::ZlibDecoder::new(data).read_to_end(&mut out)?,
        "br" => brotli::Decompressor::new(data, 4096).read_to_end(&mut out)?,
        "zstd" => return zstd::stream::decode_all(data),
        other => panic!("no decoder for {other}"),
    };
    Ok(out)
}

/// A decoder the client feeds as frames arrive, giving back what each completes.
enum Unpack {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
    Br(Box<brotli::DecompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
}

impl Unpack {
    fn new(coding: &str) -> Unpack {
        match coding {
            "gzip" => Unpack::Gzip(flate2::write::GzDecoder::new(Vec::new())),
            "deflate" => Unpack::Deflate(flate2::write::ZlibDecoder::new(Vec::new())),
            "br" => Unpack::Br(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096))),
            "zstd" => Unpack::Zstd(zstd::stream::write::Decoder::new(Vec::new()).unwrap()),
            other => panic!("no decoder for {other}"),
        }
    }

    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        fn run<W: Write>(w: &mut W, data: &[u8]) {
            w.write_all(data).expect("a valid compressed stream");
            w.flush().expect("a valid compressed stream");
        }
        let out = match self {
            Unpack::Gzip(d) => {
                run(d, data);
                d.get_mut()
            }
            Unpack::Deflate(d) => {
                run(d, data);
                d.get_mut()
            }
            Unpack::Br(d) => {
                run(d.as_mut(), data);
                d.get_mut()
            }
            Unpack::Zstd(d) => {
                run(d, data);
                d.get_mut()
            }
        };
        std::mem::take(out)
    }
}

#[tokio::test]
async fn compressed_page_is_decorated_and_streamed_back_in_the_same_coding() {
    let first = "<!DOCTYPE html><html><body><p>Intro</p>\
                 <a href=\"https://checkout.partner.com/pay\">Pay</a><p>Loading";
    let second = " the rest...</p><a href=\"https://x.partner.net/\">More</a></body></html>\n";
    let link = "<a href=\"https://checkout.partner.com/pay?kmi=abc\">";
    let expected = format!("{first}{second}")
        .replace(
            "https://checkout.partner.com/pay\"",
            "https://checkout.partner.com/pay?kmi=abc\"",
        )
        .replace(
            "https://x.partner.net/\"",
            "https://x.partner.net/?kmi=abc\"",
        );
    let accept_encoding = "gzip, deflate, br, zstd;q=0.9, identity;q=0.1";

    for coding in CODINGS {
        let (feed, body) = channel();
        let mut body = Some(body);
        let origin = origin()
            .route("/", move |_| {
                Reply::ok()
                    .header("content-type", "text/html; charset=utf-8")
                    .header("content-encoding", coding)
                    .header("vary", "Accept-Encoding")
                    .stream(body.take().expect("requested once"))
            })
            .start()
            .await;
        let proxy = proxy("", origin.addr).await;
        let rsp = navigate(proxy.addr, "/")
            .header("accept-encoding", accept_encoding)
            .cookie("km_ai=abc")
            .send()
            .await;
        assert_eq!(rsp.status(), 200, "{coding}");
        assert_eq!(header(&rsp, "content-encoding"), Some(coding));
        assert_eq!(header(&rsp, "content-length"), None, "{coding}");
        assert_eq!(
            header(&rsp, "vary"),
            Some("Accept-Encoding, Cookie, Sec-GPC")
        );
        assert_eq!(
            origin.the_request().header("accept-encoding"),
            Some(accept_encoding),
            "the client's Accept-Encoding reaches the origin as sent"
        );

        let mut pack = Pack::new(coding);
        feed.part(pack.part(first.as_bytes())).await;

        // The rest of the page is held back until the decorated link has arrived and decoded.
        let mut body = rsp.into_body();
        let mut unpack = Unpack::new(coding);
        let mut compressed = Vec::new();
        let mut decoded = Vec::new();
        while !contains(&decoded, link.as_bytes()) {
            let frame = within(
                &format!(
                    "the decorated link, {coding}-compressed, while the origin holds back the \
                     rest (does the proxy buffer compressed pages?); decoded so far {:?}",
                    String::from_utf8_lossy(&decoded)
                ),
                body.frame(),
            )
            .await
            .expect("the body ended before the link")
            .expect("a body frame");
            if let Ok(data) = frame.into_data() {
                compressed.extend_from_slice(&data);
                decoded.extend(unpack.feed(&data));
            }
        }

        feed.part(pack.part(second.as_bytes())).await;
        feed.part(pack.finish()).await;
        feed.finish();
        let rest = within("the rest of the page", body.collect())
            .await
            .expect("the rest of the page")
            .to_bytes();
        compressed.extend_from_slice(&rest);
        let page = unpacked(coding, &compressed)
            .unwrap_or_else(|e| panic!("{coding}: the client cannot decode the page: {e}"));
        assert_eq!(String::from_utf8(page).unwrap(), expected, "{coding}");
    }
}

#[tokio::test]
async fn codings_the_proxy_cannot_undo_and_bodies_it_must_not_touch_pass_through_byte_identical() {
    let html = "text/html; charset=utf-8";
    let gzip_page = packed("gzip", PAGE.as_bytes());
    let stacked = packed("br", &packed("gzip", PAGE.as_bytes()));
    let script = format!(
        "document.write('{}');",
        PAGE.replace('\n', " ").replace('\'', "\\'")
    );
    let cases: Vec<(&str, &str, &str, &str, Bytes)> = vec![
        ("stacked codings", html, "gzip, br", "", stacked),
        (
            "an unknown coding",
            html,
            "compress",
            "",
            Bytes::from(noise(3000, 7)),
        ),
        (
            "no-transform",
            html,
            "gzip",
            "public, no-transform",
            gzip_page,
        ),
        (
            "compressed script",
            "application/javascript",
            "gzip",
            "",
            packed("gzip", script.as_bytes()),
        ),
        (
            "compressed JSON",
            "application/json",
            "br",
            "",
            packed(
                "br",
                br#"{"html":"<a href=\"https://checkout.partner.com/\">x</a>"}"#,
            ),
        ),
    ];
    for (what, content_type, coding, cache_control, body) in cases {
        let served = body.clone();
        let origin = origin()
            .route("/", move |_| {
                let mut reply = Reply::ok()
                    .header("content-type", content_type)
                    .header("content-encoding", coding);
                if !cache_control.is_empty() {
                    reply = reply.header("cache-control", cache_control);
                }
                reply.body(served.clone())
            })
            .start()
            .await;
        let proxy = proxy("", origin.addr).await;
        let rsp = navigate(proxy.addr, "/")
            .header("accept-encoding", "gzip, br")
            .cookie("km_ai=abc")
            .send()
            .await;
        assert_eq!(rsp.status(), 200, "{what}");
        assert_eq!(header(&rsp, "content-encoding"), Some(coding), "{what}");
        assert_eq!(
            header(&rsp, "content-length"),
            Some(body.len().to_string().as_str()),
            "{what}: an untouched body keeps its length"
        );
        let received = body_of(rsp).await;
        assert_same_bytes(&received, &body, what);
    }
}

/// The proxy in front of an origin that sends `parts` of a `coding`-compressed page with a
/// `Content-Length` of exactly their sum, then ends the body cleanly. The test feeds the parts.
async fn cut_page_origin(coding: &'static str, length: usize) -> (Origin, Feed) {
    let (feed, body) = channel();
    let mut body = Some(body);
    let origin = origin()
        .route("/", move |_| {
            Reply::ok()
                .header("content-type", "text/html; charset=utf-8")
                .header("content-encoding", coding)
                .header("content-length", &length.to_string())
                .stream(body.take().expect("requested once"))
        })
        .start()
        .await;
    (origin, feed)
}

#[tokio::test]
async fn truncated_compressed_page_ends_the_clients_response_with_an_error() {
    let first = decorated("x").repeat(4);
    let second = decorated("y").repeat(4);
    for coding in CODINGS {
        // Two flushed sections, so the first decodes (and goes out) before the second arrives.
        let mut pack = Pack::new(coding);
        let section = pack.part(first.as_bytes());
        let mut rest = pack.part(second.as_bytes()).to_vec();
        rest.extend_from_slice(&pack.finish());
        for (cut, h2c) in [
            (rest.len() / 2, false),
            (rest.len() - 3, false),
            (rest.len() - 3, true),
        ] {
            let what = format!(
                "{coding}, second section cut to {cut} of {} bytes, h2c {h2c}",
                rest.len()
            );
            let (origin, feed) = cut_page_origin(coding, section.len() + cut).await;
            let proxy = proxy("", origin.addr).await;
            feed.part(section.clone()).await;
            let mut req = navigate(proxy.addr, "/").cookie("km_ai=abc");
            if h2c {
                req = req.over_h2c();
            }
            let rsp = req.send().await;
            assert_eq!(rsp.status(), 200, "{what}");
            assert_eq!(header(&rsp, "content-encoding"), Some(coding), "{what}");
            feed.part(Bytes::copy_from_slice(&rest[..cut])).await;
            feed.finish();
            if let Ok(body) = try_body_of(rsp).await {
                panic!(
                    "{what}: the client got a complete-looking response ({} bytes) for a \
                     truncated compressed page",
                    body.len()
                );
            }
        }
    }
}

#[tokio::test]
async fn compressed_page_cut_short_in_its_only_frame_is_an_error_for_the_client() {
    for coding in CODINGS {
        let whole = packed(coding, decorated("x").repeat(20).as_bytes());
        for cut in [whole.len() / 2, whole.len() - 3] {
            let what = format!("{coding} cut to {cut} of {} bytes", whole.len());
            let served = whole.slice(..cut);
            let origin = origin()
                .route("/", move |_| {
                    Reply::html(served.clone()).header("content-encoding", coding)
                })
                .start()
                .await;
            let proxy = proxy("", origin.addr).await;
            // The proxy may find the end before it sends anything: then the connection closes
            // without a response, which is an error for the client too.
            let Ok(rsp) = navigate(proxy.addr, "/")
                .cookie("km_ai=abc")
                .try_send()
                .await
            else {
                continue;
            };
            assert_eq!(rsp.status(), 200, "{what}");
            if let Ok(body) = try_body_of(rsp).await {
                // A body that fails before it decodes to anything goes out as the origin sent
                // it (issue 13): the client's own decoder then sees the same truncation.
                assert_eq!(
                    body,
                    whole.slice(..cut),
                    "{what}: the client got a complete-looking response that is neither an \
                     error nor the origin's bytes"
                );
            }
        }
    }
}

#[tokio::test]
async fn empty_compressed_page_is_a_complete_empty_response() {
    // An origin may send `Content-Encoding` on an empty body (a page with nothing in it yet, a
    // framework that sets the header before it knows the length). Without an ID the client gets
    // that empty 200; with one it must get a complete response too, whose body decodes to
    // nothing, not a connection closed without an answer.
    let mut problems = Vec::new();
    for coding in CODINGS {
        let origin = origin()
            .route("/", move |_| {
                Reply::html("").header("content-encoding", coding)
            })
            .start()
            .await;
        let proxy = proxy("", origin.addr).await;
        for cookie in ["theme=dark", "km_ai=abc"] {
            let what = format!("{coding}, cookie {cookie}");
            let rsp = match navigate(proxy.addr, "/").cookie(cookie).try_send().await {
                Ok(rsp) => rsp,
                Err(e) => {
                    problems.push(format!("{what}: no response at all ({e})"));
                    continue;
                }
            };
            if rsp.status() != 200 {
                problems.push(format!("{what}: status {}", rsp.status()));
                continue;
            }
            match try_body_of(rsp).await {
                Err(e) => problems.push(format!("{what}: the body broke off ({e})")),
                Ok(body) if body.is_empty() => {}
                Ok(body) => match unpacked(coding, &body) {
                    Ok(page) if page.is_empty() => {}
                    Ok(page) => problems.push(format!("{what}: decodes to {page:?}")),
                    Err(e) => problems.push(format!("{what}: does not decode ({e})")),
                },
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// 7. WebSocket -----------------------------------------------------------------------------------

#[tokio::test]
async fn websocket_echo_round_trips_through_the_proxy() {
    let echo = echo_origin().await;
    let proxy = proxy("", echo.addr).await;
    let stream = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect to the proxy");
    let (mut ws, rsp) = within(
        "the WebSocket handshake through the proxy",
        tokio_tungstenite::client_async("ws://www.site.test/chat", stream),
    )
    .await
    .expect("a WebSocket handshake");
    assert_eq!(rsp.status(), 101);

    let binary = Bytes::from(noise(200_000, 3));
    for message in [
        Message::text("hello through the proxy"),
        Message::Binary(binary),
        Message::text("ü ✓ and again"),
    ] {
        within("sending a message", ws.send(message.clone()))
            .await
            .expect("send");
        let echoed = within("the echo", ws.next())
            .await
            .expect("the stream ended before the echo")
            .expect("a message");
        assert_eq!(echoed, message);
    }
    within("closing", ws.close(None)).await.expect("close");

    let handshakes = echo.handshakes();
    assert_eq!(handshakes.len(), 1);
    assert_eq!(handshakes[0]["upgrade"], "websocket");
    assert_eq!(handshakes[0]["host"], "www.site.test");
}

#[tokio::test]
async fn websocket_with_firefox_connection_header_upgrades() {
    let echo = echo_origin().await;
    let proxy = proxy("", echo.addr).await;
    let (head, stream) = raw_handshake(
        proxy.addr,
        &format!(
            "GET /chat HTTP/1.1\r\nHost: www.site.test\r\nUser-Agent: Firefox\r\n\
             Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {SAMPLE_KEY}\r\n\
             Cookie: km_ai=abc\r\n\r\n"
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let accept = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-accept"))
        })
        .map(|(_, v)| v.trim());
    assert_eq!(accept, Some(SAMPLE_ACCEPT), "{head}");

    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    for text in ["first", "second"] {
        within("sending", ws.send(Message::text(text)))
            .await
            .expect("send");
        let echoed = within("the echo", ws.next())
            .await
            .expect("an echo")
            .expect("a message");
        assert_eq!(echoed, Message::text(text));
    }
    let _ = within("closing", ws.close(None)).await;
}

#[tokio::test]
async fn websocket_through_the_tls_listener() {
    let ca = Ca::new("Test CA");
    let site = ca.leaf(&["www.site.test"]);
    let echo = echo_origin().await;
    let proxy = proxy(&tls_listener(&site), echo.addr).await;
    let tls_addr = proxy.tls_addr.expect("a TLS listener");
    // A browser opens WebSockets on an HTTP/1.1 connection.
    let stream = tls_client(&ca, "www.site.test")
        .offering(&["http/1.1"])
        .connect(tls_addr)
        .await
        .expect("a TLS handshake");
    let (mut ws, rsp) = within(
        "the WebSocket handshake through the TLS listener",
        tokio_tungstenite::client_async("wss://www.site.test/chat", stream),
    )
    .await
    .expect("a WebSocket handshake");
    assert_eq!(rsp.status(), 101);
    within("sending", ws.send(Message::text("over TLS")))
        .await
        .expect("send");
    let echoed = within("the echo", ws.next())
        .await
        .expect("an echo")
        .expect("a message");
    assert_eq!(echoed, Message::text("over TLS"));
    let _ = within("closing", ws.close(None)).await;
    assert_eq!(echo.handshakes()[0]["x-forwarded-proto"], "https");
}

// 8. Request bodies ------------------------------------------------------------------------------

/// An origin that answers `/upload` with the number of bytes it received.
async fn upload_sink() -> Origin {
    origin()
        .route("/upload", |r| {
            Reply::ok()
                .header("content-type", "text/plain")
                .body(format!("received {} bytes", r.body.len()))
        })
        .start()
        .await
}

#[tokio::test]
async fn expect_100_continue_gets_a_continue_then_the_body_goes_through() {
    let origin = upload_sink().await;
    let proxy = proxy("", origin.addr).await;
    let body = "name=value&x=".to_owned() + &"y".repeat(10_000);
    let mut stream = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect");
    stream
        .write_all(
            format!(
                "POST /upload HTTP/1.1\r\nHost: www.site.test\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
                 Expect: 100-continue\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // No body byte is sent until the proxy says to go on.
    let interim = read_head(&mut stream).await;
    assert!(interim.starts_with("HTTP/1.1 100 "), "{interim}");
    stream.write_all(body.as_bytes()).await.unwrap();
    let final_head = read_head(&mut stream).await;
    assert!(final_head.starts_with("HTTP/1.1 200 "), "{final_head}");
    let mut rest = Vec::new();
    within("the response body", stream.read_to_end(&mut rest))
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&rest),
        format!("received {} bytes", body.len())
    );

    let received = origin.the_request();
    assert_same_bytes(&received.body, body.as_bytes(), "the uploaded form");
    assert_eq!(
        received.header("expect"),
        None,
        "the proxy answered the expectation itself"
    );
}

#[tokio::test]
async fn chunked_upload_with_trailers_goes_through() {
    let origin = upload_sink().await;
    let proxy = proxy("", origin.addr).await;
    let rsp = raw(
        proxy.addr,
        "POST /upload HTTP/1.1\r\nHost: www.site.test\r\nTransfer-Encoding: chunked\r\n\
         Trailer: X-Checksum\r\nTE: trailers\r\nConnection: close\r\n\r\n\
         5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n",
    )
    .await;
    assert_eq!(rsp.status(), 200, "{}", rsp.head);
    let received = origin.the_request();
    assert_eq!(received.body_error, None);
    assert_eq!(&received.body[..], b"hello world");
    // Whether the trailer field itself is forwarded is up to the proxy; if it is, intact.
    if let Some(trailers) = &received.trailers {
        if let Some(v) = trailers.get("x-checksum") {
            assert_eq!(v, "42");
        }
    }
}

/// Length and a 64-bit hash (SipHash with fixed keys) of bytes as they pass, so 64 MiB need not
/// be held twice.
#[derive(Default)]
struct Checksum {
    hash: std::collections::hash_map::DefaultHasher,
    len: u64,
}

impl Checksum {
    fn add(&mut self, bytes: &[u8]) {
        self.hash.write(bytes);
        self.len += bytes.len() as u64;
    }

    fn of(bytes: &[u8]) -> (u64, u64) {
        let mut c = Checksum::default();
        c.add(bytes);
        c.value()
    }

    fn value(&self) -> (u64, u64) {
        (self.len, self.hash.finish())
    }
}

#[tokio::test]
async fn a_64_mib_streamed_upload_reaches_the_origin_byte_identical() {
    streamed_upload_reaches_the_origin_byte_identical(64, false).await;
}

#[tokio::test]
async fn a_16_mib_streamed_upload_over_h2c_reaches_the_origin_byte_identical() {
    streamed_upload_reaches_the_origin_byte_identical(16, true).await;
}

async fn streamed_upload_reaches_the_origin_byte_identical(mib: u64, h2c: bool) {
    const PART: usize = 1024 * 1024;
    let origin = upload_sink().await;
    let proxy = proxy("", origin.addr).await;
    let (feed, body) = channel();
    let sender = tokio::spawn(async move {
        // Parts of a few sizes so frame boundaries fall anywhere.
        let mut sent = Checksum::default();
        for i in 0..mib {
            let part = noise(PART - (i as usize % 3) * 4099, i);
            sent.add(&part);
            feed.part(part).await;
        }
        sent.value()
    });
    let mut req = request("POST", proxy.addr, "/upload")
        .header("content-type", "application/octet-stream")
        .stream(body);
    if h2c {
        req = req.over_h2c();
    }
    let rsp = req.send().await;
    let sent = within("the sender", sender).await.expect("the sender");
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        text_of(rsp).await,
        format!("received {} bytes", sent.0),
        "the origin's count"
    );
    let received = origin.the_request();
    assert_eq!(received.body_error, None);
    assert_eq!(
        Checksum::of(&received.body),
        sent,
        "length and checksum of the upload at the origin"
    );
}

// 9. Ranges --------------------------------------------------------------------------------------

/// A slice of `PAGE` holding its first partner link, as a 206 answer carries it.
fn partial() -> (String, &'static str) {
    let start = PAGE.find("<a href=\"https://checkout").unwrap();
    let end = start + PAGE[start..].find("</a>").unwrap() + 4;
    (
        format!("bytes {start}-{}/{}", end - 1, PAGE.len()),
        &PAGE[start..end],
    )
}

/// An origin that honours any `Range` with the same slice of the page, and one path that always
/// answers 206.
async fn ranged_shop() -> Origin {
    let (content_range, slice) = partial();
    let always = content_range.clone();
    origin()
        .route("/", move |r| {
            if r.headers.contains_key("range") {
                Reply::status(206)
                    .header("content-type", "text/html; charset=utf-8")
                    .header("content-range", &content_range)
                    .body(slice)
            } else {
                Reply::html(PAGE).header("accept-ranges", "bytes")
            }
        })
        .route("/always-partial", move |_| {
            Reply::status(206)
                .header("content-type", "text/html; charset=utf-8")
                .header("content-range", &always)
                .body(slice)
        })
        .start()
        .await
}

#[tokio::test]
async fn range_on_a_navigation_with_an_id_asks_the_origin_for_the_whole_page() {
    let origin = ranged_shop().await;
    let proxy = proxy("", origin.addr).await;
    let rsp = navigate(proxy.addr, "/")
        .cookie("km_ai=abc")
        .header("range", "bytes=0-99")
        .header("if-range", "\"v1\"")
        .send()
        .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(header(&rsp, "accept-ranges"), None, "a rewritten page");
    assert_eq!(text_of(rsp).await, decorated("abc"));
    let received = origin.the_request();
    assert_eq!(received.header("range"), None);
    assert_eq!(received.header("if-range"), None);
}

#[tokio::test]
async fn range_is_forwarded_without_an_id_or_for_other_than_html_and_206_is_never_rewritten() {
    let origin = ranged_shop().await;
    let proxy = proxy("", origin.addr).await;
    let (content_range, slice) = partial();
    let cases = [
        ("no ID", navigate(proxy.addr, "/")),
        (
            "an image request",
            get(proxy.addr, "/")
                .header("accept", "image/avif,image/webp,*/*")
                .cookie("km_ai=abc"),
        ),
        (
            "no Accept",
            get(proxy.addr, "/").without("accept").cookie("km_ai=abc"),
        ),
    ];
    for (what, req) in cases {
        let rsp = req
            .header("range", "bytes=0-99")
            .header("if-range", "\"v1\"")
            .send()
            .await;
        assert_eq!(rsp.status(), 206, "{what}");
        assert_eq!(header(&rsp, "content-range"), Some(content_range.as_str()));
        let body = body_of(rsp).await;
        assert_same_bytes(&body, slice.as_bytes(), what);
        let received = origin.last_request();
        assert_eq!(received.header("range"), Some("bytes=0-99"), "{what}");
        assert_eq!(received.header("if-range"), Some("\"v1\""), "{what}");
    }

    // A 206 the origin sends to a navigation with an ID anyway is passed through untouched.
    let rsp = navigate(proxy.addr, "/always-partial")
        .cookie("km_ai=abc")
        .send()
        .await;
    assert_eq!(rsp.status(), 206);
    assert_eq!(
        header(&rsp, "content-length"),
        Some(slice.len().to_string().as_str())
    );
    assert_same_bytes(&body_of(rsp).await, slice.as_bytes(), "unasked-for 206");
}

// 10. Redirects ----------------------------------------------------------------------------------

async fn redirecting_shop() -> Origin {
    let redirect = |to: &'static str| {
        move |_: &Received| {
            Reply::status(302)
                .header("location", to)
                .header("cache-control", "public, max-age=300")
        }
    };
    origin()
        .route(
            "/to-partner",
            redirect("https://checkout.partner.com/pay?x=1"),
        )
        .route(
            "/to-partner-relative",
            redirect("//checkout.partner.com/pay"),
        )
        .route(
            "/to-elsewhere",
            redirect("https://www.elsewhere.test/pay?x=1"),
        )
        .route("/to-local", redirect("/basket"))
        .route("/refresh", |_| {
            Reply::html(PAGE).header("refresh", "0; url=https://checkout.partner.com/")
        })
        .start()
        .await
}

/// A response head read off a raw socket, for exact header values.
async fn head_of(addr: std::net::SocketAddr, path: &str, cookie: Option<&str>) -> RawResponse {
    let cookie = cookie.map_or_else(String::new, |c| format!("Cookie: {c}\r\n"));
    raw(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: www.site.test\r\nAccept: text/html\r\n{cookie}\
             Connection: close\r\n\r\n"
        ),
    )
    .await
}

#[tokio::test]
async fn redirect_to_a_partner_carries_the_id_and_becomes_private() {
    let origin = redirecting_shop().await;
    let proxy = proxy("", origin.addr).await;
    for (path, location) in [
        (
            "/to-partner",
            "https://checkout.partner.com/pay?x=1&kmi=abc",
        ),
        ("/to-partner-relative", "//checkout.partner.com/pay?kmi=abc"),
    ] {
        let rsp = head_of(proxy.addr, path, Some("km_ai=abc")).await;
        assert_eq!(rsp.status(), 302, "{}", rsp.head);
        assert_eq!(rsp.header("location"), Some(location), "{}", rsp.head);
        assert_eq!(
            rsp.header("cache-control"),
            Some("max-age=300, private"),
            "{}",
            rsp.head
        );
        assert_eq!(rsp.header("vary"), Some("Cookie, Sec-GPC"), "{}", rsp.head);
    }
}

#[tokio::test]
async fn redirect_elsewhere_is_unchanged_and_without_an_id_only_varies() {
    let origin = redirecting_shop().await;
    let proxy = proxy("", origin.addr).await;
    for path in ["/to-elsewhere", "/to-local"] {
        let rsp = head_of(proxy.addr, path, Some("km_ai=abc")).await;
        assert_eq!(rsp.status(), 302, "{}", rsp.head);
        let expected = if path == "/to-local" {
            "/basket"
        } else {
            "https://www.elsewhere.test/pay?x=1"
        };
        assert_eq!(rsp.header("location"), Some(expected), "{}", rsp.head);
        assert_eq!(
            rsp.header("cache-control"),
            Some("public, max-age=300"),
            "{}",
            rsp.head
        );
        assert_eq!(rsp.header("vary"), None, "{}", rsp.head);
    }

    let rsp = head_of(proxy.addr, "/to-partner", None).await;
    assert_eq!(rsp.status(), 302, "{}", rsp.head);
    assert_eq!(
        rsp.header("location"),
        Some("https://checkout.partner.com/pay?x=1")
    );
    assert_eq!(rsp.header("cache-control"), Some("public, max-age=300"));
    assert_eq!(
        rsp.header("vary"),
        Some("Cookie, Sec-GPC"),
        "another visitor would get a decorated redirect\n{}",
        rsp.head
    );
}

#[tokio::test]
async fn refresh_header_to_a_partner_carries_the_id() {
    let origin = redirecting_shop().await;
    let proxy = proxy("", origin.addr).await;
    let rsp = head_of(proxy.addr, "/refresh", Some("km_ai=abc")).await;
    assert_eq!(rsp.status(), 200, "{}", rsp.head);
    assert_eq!(
        rsp.header("refresh"),
        Some("0; url=https://checkout.partner.com/?kmi=abc"),
        "{}",
        rsp.head
    );
    assert!(
        rsp.header("cache-control")
            .is_some_and(|c| c.contains("private")),
        "{}",
        rsp.head
    );
    assert_eq!(
        rsp.header("vary"),
        Some("Cookie, Sec-GPC, Accept-Encoding"),
        "{}",
        rsp.head
    );
    assert_eq!(
        String::from_utf8(rsp.dechunked()).unwrap(),
        decorated("abc")
    );

    let rsp = head_of(proxy.addr, "/refresh", None).await;
    assert_eq!(
        rsp.header("refresh"),
        Some("0; url=https://checkout.partner.com/")
    );
    assert_eq!(rsp.header("vary"), Some("Cookie, Sec-GPC"), "{}", rsp.head);
}

// 11. Revalidation -------------------------------------------------------------------------------

#[tokio::test]
async fn not_modified_for_a_page_with_an_id_stays_private_and_varies_on_cookie() {
    let origin = origin()
        .route("/", |r| {
            if r.headers.contains_key("if-none-match") {
                Reply::status(304)
                    .header("etag", "\"v1\"")
                    .header("cache-control", "public, max-age=60")
            } else {
                Reply::html(PAGE)
                    .header("etag", "\"v1\"")
                    .header("cache-control", "public, max-age=60")
            }
        })
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;

    let rsp = navigate(proxy.addr, "/").cookie("km_ai=abc").send().await;
    assert_eq!(header(&rsp, "etag"), Some("W/\"v1\""));
    body_of(rsp).await;

    let rsp = navigate(proxy.addr, "/")
        .cookie("km_ai=abc")
        .header("if-none-match", "W/\"v1\"")
        .send()
        .await;
    assert_eq!(rsp.status(), 304);
    let cache_control = header(&rsp, "cache-control").unwrap_or_default();
    assert!(
        cache_control.split(',').any(|d| d.trim() == "private")
            && !cache_control.contains("public"),
        "{cache_control:?}"
    );
    assert!(
        header(&rsp, "vary").is_some_and(|v| v.contains("Cookie")),
        "{:?}",
        rsp.headers()
    );
    assert_eq!(header(&rsp, "etag"), Some("W/\"v1\""));
    assert!(body_of(rsp).await.is_empty());
}
