//! Identity beyond links, end to end with a real origin and the real proxy: forms, the click-time
//! redirect (`mode = "redirect"`, `/_kmi/out`) and its open-redirect defences, what stays
//! cacheable, consent and Global Privacy Control, `exclude_paths`, a partner's `paths`, the
//! server-side identity headers (precedence and stripping both ways) and `check`'s `km_ni`
//! warning.
//!
//! Each test writes its whole configuration (the shared harness always adds an inline partner,
//! and several tests here need a proxy whose partners are all redirect-mode).

mod support;

use std::net::SocketAddr;

use http::Response;
use hyper::body::Incoming;
use kmi_proxy::config::Config;
use kmi_proxy::server::Running;
use support::*;

// ---------------------------------------------------------------------------------------------
// Configuration and pages
// ---------------------------------------------------------------------------------------------

/// An inline partner that also decorates its forms.
const INLINE: &str = r#"
[[partner]]
name = "checkout"
domains = ["checkout.partner.com"]
forms = true
"#;

/// A click-time redirect partner.
const REDIRECT: &str = r#"
[[partner]]
name = "outbound"
domains = ["go.partner.org"]
mode = "redirect"
"#;

/// Starts the proxy in front of `origin` with `settings` (top-level keys first, then tables).
async fn start(origin: &Origin, settings: &str) -> Running {
    start_on("127.0.0.1:0", origin, settings).await
}

/// [`start`], listening on `listen`.
async fn start_on(listen: &str, origin: &Origin, settings: &str) -> Running {
    let text = format!(
        "listen = \"{listen}\"\nupstream = \"http://{}\"\n{settings}",
        origin.addr
    );
    let config = Config::parse(&text, "identity test configuration")
        .unwrap_or_else(|e| panic!("the test configuration is invalid: {e}\n{text}"));
    kmi_proxy::server::spawn(config)
        .await
        .expect("start the proxy")
}

/// A proxy with one inline partner (with forms) and one redirect partner, and `settings` first.
async fn mixed(origin: &Origin, settings: &str) -> Running {
    start(origin, &format!("{settings}\n{INLINE}\n{REDIRECT}")).await
}

/// A page with an inline partner link, a GET form to that partner, a redirect-mode partner link
/// (with a fragment) and a local link.
const PAGE: &str = r#"<!DOCTYPE html>
<html><head><title>Shop</title></head>
<body>
<a href="https://checkout.partner.com/pay?order=42">Pay</a>
<form action="https://checkout.partner.com/find"><input name="q"></form>
<a href="https://go.partner.org/deal#terms">Deal</a>
<a href="/local">Local</a>
</body></html>
"#;

/// `PAGE` with its redirect-mode link pointing at the proxy, as every visitor gets it.
const REDIRECTED_LINK: &str = r#""/_kmi/out?to=https%3A%2F%2Fgo.partner.org%2Fdeal%23terms""#;

/// The visitor's ID as the link carries it (percent-encoded) and as a form field holds it.
#[derive(Clone, Copy)]
struct Id {
    encoded: &'static str,
    decoded: &'static str,
}

const ABC: Id = Id {
    encoded: "abc",
    decoded: "abc",
};

/// `page` as the proxy should send it: redirect-mode links always rewritten (when `redirect`),
/// inline links and forms decorated when there is a usable `id`.
fn expected(page: &str, id: Option<Id>, redirect: bool) -> String {
    let mut out = page.to_owned();
    if redirect {
        out = out.replace(r#""https://go.partner.org/deal#terms""#, REDIRECTED_LINK);
    }
    if let Some(id) = id {
        out = out
            .replace(
                r#""https://checkout.partner.com/pay?order=42""#,
                &format!(
                    r#""https://checkout.partner.com/pay?order=42&amp;kmi={}""#,
                    id.encoded
                ),
            )
            .replace(
                r#"<input name="q"></form>"#,
                &format!(
                    r#"<input name="q"><input type="hidden" name="kmi" value="{}"></form>"#,
                    id.decoded
                ),
            );
    }
    out
}

/// An origin serving `PAGE` at `/` and `/admin/page` (cacheable, with a strong validator), a 302
/// into the inline partner at `/admin/login` and `/login`, and JSON at `/data.json`.
async fn shop() -> Origin {
    fn cacheable(page: &str) -> Reply {
        Reply::html(page.to_owned())
            .header("cache-control", "public, max-age=60, s-maxage=600")
            .header("etag", "\"v1\"")
            .header("vary", "Accept-Encoding")
    }
    origin()
        .route("/", |_| cacheable(PAGE))
        .route("/admin/page", |_| cacheable(PAGE))
        .route("/admin", |_| cacheable(PAGE))
        .route("/administrator", |_| cacheable(PAGE))
        .route("/admin/login", |_| {
            Reply::status(302).header("location", "https://checkout.partner.com/sso")
        })
        .route("/login", |_| {
            Reply::status(302).header("location", "https://checkout.partner.com/sso")
        })
        .route("/data.json", |_| {
            Reply::ok()
                .header("content-type", "application/json")
                .body("{\"a\":1}")
        })
        .start()
        .await
}

/// A page request and its response, read whole.
struct Got {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        let mut all = self.headers.get_all(name).iter();
        let first = all.next()?;
        assert!(
            all.next().is_none(),
            "several {name} headers: {:?}",
            self.headers
        );
        Some(first.to_str().expect("a text header"))
    }
}

async fn read(rsp: Response<Incoming>) -> Got {
    let status = rsp.status().as_u16();
    let headers = rsp.headers().clone();
    let body = text_of(rsp).await;
    Got {
        status,
        headers,
        body,
    }
}

/// `GET path` with these request headers (`("cookie", ...)`, `("sec-gpc", "1")`, ...).
async fn fetch(proxy: &Running, path: &str, headers: &[(&str, &str)]) -> Got {
    fetch_at(proxy.addr, path, headers).await
}

/// [`fetch`] from the proxy listening at `addr`.
async fn fetch_at(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = get(addr, path);
    for (name, value) in headers {
        req = req.also(name, value);
    }
    read(req.send().await).await
}

// ---------------------------------------------------------------------------------------------
// Forms and redirect-mode links through the proxy
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn forms_and_inline_links_get_the_id_and_redirect_links_point_at_the_proxy() {
    let origin = shop().await;
    let proxy = mixed(&origin, "").await;
    let got = fetch(&proxy, "/", &[("cookie", "km_ai=abc")]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, expected(PAGE, Some(ABC), true));

    // A hostile ID: percent-encoded in the link, HTML-escaped in the form field.
    let got = fetch(
        &proxy,
        "/",
        &[("cookie", "km_ai=%22%3E%3Cb%3Ex%26amp%3B%27")],
    )
    .await;
    assert!(!got.body.contains("<b>x"), "markup injected:\n{}", got.body);
    let hostile = Id {
        encoded: "%22%3E%3Cb%3Ex%26amp%3B%27",
        decoded: "&quot;&gt;&lt;b&gt;x&amp;amp;'",
    };
    assert_eq!(got.body, expected(PAGE, Some(hostile), true));
}

#[tokio::test]
async fn redirect_links_are_rewritten_for_a_visitor_without_an_id_too() {
    let origin = shop().await;
    let proxy = mixed(&origin, "").await;
    let got = fetch(&proxy, "/", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, expected(PAGE, None, true));
    // A cookie that is not an identity changes nothing.
    let got = fetch(&proxy, "/", &[("cookie", "theme=dark")]).await;
    assert_eq!(got.body, expected(PAGE, None, true));
}

// ---------------------------------------------------------------------------------------------
// The click-time redirect
// ---------------------------------------------------------------------------------------------

/// The form-urlencoded `to` query for a destination.
fn to(destination: &str) -> String {
    let encoded: String = url::form_urlencoded::byte_serialize(destination.as_bytes()).collect();
    format!("/_kmi/out?to={encoded}")
}

/// Asserts `got` is the click-time redirect to `location`, uncacheable and with the referrer
/// policy.
#[track_caller]
fn assert_redirect(got: &Got, location: &str, what: &str) {
    assert_eq!(got.status, 302, "{what}: {}", got.body);
    assert_eq!(got.header("location"), Some(location), "{what}");
    assert_eq!(got.header("cache-control"), Some("no-store"), "{what}");
    assert_eq!(
        got.header("referrer-policy"),
        Some("strict-origin-when-cross-origin"),
        "{what}"
    );
}

#[tokio::test]
async fn outbound_redirect_adds_the_visitors_id_to_the_destination() {
    let origin = shop().await;
    let proxy = mixed(&origin, "").await;
    // The link a page carries: the fragment stays last.
    let got = fetch(
        &proxy,
        "/_kmi/out?to=https%3A%2F%2Fgo.partner.org%2Fdeal%23terms",
        &[("cookie", "km_ai=abc")],
    )
    .await;
    assert_redirect(&got, "https://go.partner.org/deal?kmi=abc#terms", "with ID");
    assert_eq!(got.body, "", "a 302 needs no body");

    for (destination, location, cookie) in [
        (
            "https://go.partner.org/deal?id=7&src=site",
            "https://go.partner.org/deal?id=7&src=site&kmi=Zk9%2BaB%2Fc3Q%3D%3D",
            "km_ai=Zk9%2BaB%2Fc3Q%3D%3D",
        ),
        (
            "https://go.partner.org/",
            "https://go.partner.org/?kmi=bob%40example.com",
            "km_ai=anon; km_ni=bob%40example.com",
        ),
        // Inline partners' hosts are partners too.
        (
            "http://checkout.partner.com:8080/pay",
            "http://checkout.partner.com:8080/pay?kmi=abc",
            "km_ai=abc",
        ),
        // `existing = "keep"` (the default): the link's own kmi stays.
        (
            "https://go.partner.org/?kmi=page",
            "https://go.partner.org/?kmi=page",
            "km_ai=abc",
        ),
    ] {
        let got = fetch(&proxy, &to(destination), &[("cookie", cookie)]).await;
        assert_redirect(&got, location, destination);
    }
    assert!(
        origin.requests().is_empty(),
        "the redirect path reached the origin: {:#?}",
        origin.requests()
    );
}

#[tokio::test]
async fn a_redirect_link_in_a_page_leads_to_the_destination_the_page_wrote() {
    // Each link as the page writes it, and where the browser must end up (plus kmi).
    let links = [
        (
            "https://go.partner.org/s?q=a+b&amp;t=%2B#x",
            "https://go.partner.org/s?q=a+b&t=%2B&kmi=abc#x",
        ),
        (
            "https://go.partner.org/caf%C3%A9/\u{fc}?x=\u{fc}",
            "https://go.partner.org/caf%C3%A9/%C3%BC?x=%C3%BC&kmi=abc",
        ),
        (
            "https://GO.Partner.org./deal",
            "https://go.partner.org./deal?kmi=abc",
        ),
        (
            "//go.partner.org/deal?",
            "http://go.partner.org/deal?kmi=abc",
        ),
    ];
    let page: String = links
        .iter()
        .map(|(href, _)| format!("<a href=\"{href}\">x</a>\n"))
        .collect();
    let origin = origin()
        .route("/", move |_| Reply::html(page.clone()))
        .start()
        .await;
    let proxy = mixed(&origin, "").await;
    let got = fetch(&proxy, "/", &[("cookie", "km_ai=abc")]).await;
    let hrefs: Vec<String> = got
        .body
        .split("href=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().replace("&amp;", "&"))
        .collect();
    assert_eq!(hrefs.len(), links.len(), "{}", got.body);
    for (href, (written, location)) in hrefs.iter().zip(links) {
        assert!(href.starts_with("/_kmi/out?to="), "{written}: {href}");
        let got = fetch(&proxy, href, &[("cookie", "km_ai=abc")]).await;
        assert_redirect(&got, location, written);
    }
    assert_eq!(origin.requests().len(), 1, "{:#?}", origin.requests());
}

#[tokio::test]
async fn outbound_redirect_without_an_id_or_with_gpc_carries_no_id() {
    let origin = shop().await;
    let proxy = mixed(&origin, "").await;
    let path = to("https://go.partner.org/deal?x=1#terms");
    let plain = "https://go.partner.org/deal?x=1#terms";
    let cases: [(&str, &[(&str, &str)]); 5] = [
        ("no cookie", &[]),
        ("no identity cookie", &[("cookie", "theme=dark")]),
        ("empty identity cookie", &[("cookie", "km_ai=")]),
        ("GPC", &[("cookie", "km_ai=abc"), ("sec-gpc", "1")]),
        ("an unusable ID", &[("cookie", "km_ai=%00bad")]),
    ];
    for (what, headers) in cases {
        let got = fetch(&proxy, &path, headers).await;
        assert_redirect(&got, plain, what);
    }
    // `Sec-GPC: 0` is no objection.
    let got = fetch(&proxy, &path, &[("cookie", "km_ai=abc"), ("sec-gpc", "0")]).await;
    assert_redirect(
        &got,
        "https://go.partner.org/deal?x=1&kmi=abc#terms",
        "Sec-GPC: 0",
    );
    assert!(origin.requests().is_empty(), "{:#?}", origin.requests());
}

#[tokio::test]
async fn outbound_redirect_refuses_every_destination_that_is_not_a_partner() {
    let origin = shop().await;
    let proxy = mixed(&origin, "").await;
    // Destinations, form-urlencoded into `to` by the test.
    let destinations = [
        "https://evil.example/",
        "//evil.example",
        "//evil.example/https://go.partner.org/",
        "/\\evil.example",
        "https://partner.com.evil.example/",
        "https://go.partner.org.evil.example/",
        "https://checkout.partner.com.evil.example/pay",
        "https://evilgo.partner.org/",
        "https://partner.org/",
        "https://evil.example\\@go.partner.org",
        "https://evil.example\\@checkout.partner.com",
        "https://checkout.partner.com@evil.example/",
        "https://go.partner.org:443@evil.example/",
        "https://go.partner.org%2F@evil.example/",
        "https://evil.example#@go.partner.org",
        "https://evil.example/?next=https://go.partner.org/",
        "https://evil.example/go.partner.org",
        "https%3A%2F%2Fevil.example%2F",
        "https%3A%2F%2Fgo.partner.org%2F",
        "javascript:alert(1)",
        "JavaScript:alert(document.domain)//https://go.partner.org/",
        "data:text/html,<script>alert(1)</script>",
        "ftp://go.partner.org/",
        "go.partner.org/deal",
        "/deal",
        "",
        " ",
    ];
    let mut refused = Vec::new();
    for destination in destinations {
        refused.push((destination.to_owned(), to(destination)));
    }
    // Queries written as an attacker would, not through the test's encoder.
    for query in [
        "to=https://evil.example/",
        "to=//evil.example",
        "to=%2F%2Fevil.example",
        "to=https%3A%2F%2Fevil.example%2F",
        "to=https%253A%252F%252Fevil.example%252F",
        "to=https%3A%2F%2Fevil.example%5C%40checkout.partner.com",
        "to=https://checkout.partner.com@evil.example/",
        "to=javascript:alert(1)",
        "to=javascript%3Aalert%281%29",
        "to=",
        "to",
        "",
        "from=https://go.partner.org/",
        "To=https://go.partner.org/",
        "to=https://evil.example/&to=https://go.partner.org/",
        "to=https:%2F%2Fevil.example",
        "to=%09https://evil.example/",
    ] {
        let path = if query.is_empty() {
            "/_kmi/out".to_owned()
        } else {
            format!("/_kmi/out?{query}")
        };
        refused.push((query.to_owned(), path));
    }
    let mut failures = Vec::new();
    for (what, path) in &refused {
        let got = fetch(&proxy, path, &[("cookie", "km_ai=abc")]).await;
        if got.status != 400 || got.header("location").is_some() {
            failures.push(format!(
                "{what:?} ({path}): {} location {:?}",
                got.status,
                got.header("location")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "not refused with 400:\n  {}",
        failures.join("\n  ")
    );
    assert!(
        origin.requests().is_empty(),
        "the redirect path reached the origin: {:#?}",
        origin.requests()
    );
}

#[tokio::test]
async fn outbound_redirect_cannot_be_used_to_inject_headers() {
    let origin = shop().await;
    let proxy = mixed(&origin, "").await;
    // CR and LF in the destination: the URL parser drops them, so nothing splits the header.
    let got = fetch(
        &proxy,
        "/_kmi/out?to=https%3A%2F%2Fgo.partner.org%2F%0D%0ASet-Cookie%3A%20a%3Db",
        &[("cookie", "km_ai=abc")],
    )
    .await;
    assert_redirect(
        &got,
        "https://go.partner.org/Set-Cookie:%20a=b?kmi=abc",
        "CR LF",
    );
    assert_eq!(got.header("set-cookie"), None, "{:?}", got.headers);
    assert!(origin.requests().is_empty(), "{:#?}", origin.requests());
}

#[tokio::test]
async fn outbound_redirect_answers_get_and_head_only_and_never_asks_the_origin() {
    let origin = shop().await;
    let proxy = mixed(&origin, "").await;
    let path = to("https://go.partner.org/deal");
    let rsp = request("HEAD", proxy.addr, &path)
        .cookie("km_ai=abc")
        .send()
        .await;
    let got = read(rsp).await;
    assert_redirect(&got, "https://go.partner.org/deal?kmi=abc", "HEAD");
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let rsp = request(method, proxy.addr, &path)
            .cookie("km_ai=abc")
            .body("a=1")
            .send()
            .await;
        let got = read(rsp).await;
        assert_eq!(got.status, 405, "{method}: {}", got.body);
        assert_eq!(got.header("location"), None, "{method}");
    }
    assert!(origin.requests().is_empty(), "{:#?}", origin.requests());
}

#[tokio::test]
async fn redirect_path_is_configurable_and_the_default_path_then_belongs_to_the_origin() {
    let origin = origin()
        .route("/", |_| Reply::html(PAGE))
        .route("/_kmi/out", |_| Reply::html("the origin's own page\n"))
        .start()
        .await;
    let proxy = mixed(&origin, "[redirect]\npath = \"/go\"\n").await;
    let got = fetch(&proxy, "/", &[]).await;
    assert_eq!(
        got.body,
        expected(PAGE, None, true).replace("\"/_kmi/out?", "\"/go?")
    );
    let got = fetch(
        &proxy,
        &to("https://go.partner.org/deal").replace("/_kmi/out", "/go"),
        &[("cookie", "km_ai=abc")],
    )
    .await;
    assert_redirect(&got, "https://go.partner.org/deal?kmi=abc", "/go");
    let got = fetch(&proxy, &to("https://go.partner.org/deal"), &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "the origin's own page\n");
    assert_eq!(origin.requests().len(), 2, "{:#?}", origin.requests());
}

#[tokio::test]
async fn outbound_redirect_respects_consent() {
    let origin = shop().await;
    let proxy = mixed(
        &origin,
        "[consent]\ncookie = \"cookie_consent\"\ncontains = \"analytics\"\n",
    )
    .await;
    let path = to("https://go.partner.org/deal");
    let with = "https://go.partner.org/deal?kmi=abc";
    let without = "https://go.partner.org/deal";
    for (cookie, location) in [
        ("km_ai=abc; cookie_consent=necessary%2Canalytics", with),
        ("km_ai=abc", without),
        ("km_ai=abc; cookie_consent=necessary", without),
    ] {
        let got = fetch(&proxy, &path, &[("cookie", cookie)]).await;
        assert_redirect(&got, location, cookie);
    }
}

// ---------------------------------------------------------------------------------------------
// What stays cacheable
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_page_whose_partners_are_all_redirect_mode_keeps_its_cache_headers() {
    let origin = shop().await;
    let proxy = start(&origin, REDIRECT).await;
    let page = expected(PAGE, None, true);
    for (what, headers) in [
        ("no ID", &[][..]),
        ("an ID", &[("cookie", "km_ai=abc")][..]),
        ("another ID", &[("cookie", "km_ni=bob%40example.com")][..]),
    ] {
        let got = fetch(&proxy, "/", headers).await;
        assert_eq!(got.status, 200, "{what}");
        assert_eq!(got.body, page, "{what}: the same page for every visitor");
        assert_eq!(
            got.header("cache-control"),
            Some("public, max-age=60, s-maxage=600"),
            "{what}"
        );
        // The rewritten bytes are no longer the origin's: the validator stays, but weak.
        assert_eq!(got.header("etag"), Some("W/\"v1\""), "{what}");
        assert_eq!(got.header("vary"), Some("Accept-Encoding"), "{what}");
    }
}

#[tokio::test]
async fn a_page_with_an_inline_partner_varies_on_cookie_and_is_private_once_decorated() {
    let origin = shop().await;
    let proxy = mixed(&origin, "").await;

    let got = fetch(&proxy, "/", &[]).await;
    assert_eq!(got.body, expected(PAGE, None, true));
    assert_eq!(
        got.header("cache-control"),
        Some("public, max-age=60, s-maxage=600")
    );
    assert_eq!(got.header("etag"), Some("W/\"v1\""), "rewritten, so weak");
    assert_eq!(got.header("vary"), Some("Accept-Encoding, Cookie, Sec-GPC"));

    let got = fetch(&proxy, "/", &[("cookie", "km_ai=abc")]).await;
    assert_eq!(got.body, expected(PAGE, Some(ABC), true));
    assert_eq!(got.header("cache-control"), Some("max-age=60, private"));
    assert_eq!(got.header("etag"), Some("W/\"v1\""));
    assert_eq!(got.header("vary"), Some("Accept-Encoding, Cookie, Sec-GPC"));
}

#[tokio::test]
async fn a_page_rewritten_for_every_visitor_is_asked_for_whole() {
    // A range of the origin's bytes cannot be combined with the rewritten page the same strong
    // ETag stands for, so a GET for HTML must not pass `Range` on when the page will be
    // rewritten: with redirect-mode partners that is every visitor's page, not only one with an ID.
    let origin = origin()
        .route("/", |r| {
            if r.headers.contains_key("range") {
                Reply::status(206)
                    .header("content-type", "text/html; charset=utf-8")
                    .header("etag", "\"v1\"")
                    .header("content-range", &format!("bytes 0-9/{}", PAGE.len()))
                    .body(&PAGE.as_bytes()[..10])
            } else {
                Reply::html(PAGE).header("etag", "\"v1\"")
            }
        })
        .start()
        .await;
    let navigation = [
        ("accept", "text/html,application/xhtml+xml"),
        ("range", "bytes=0-9"),
        ("if-range", "\"v1\""),
    ];
    let redirect_only = start(&origin, REDIRECT).await;
    let mixed = mixed(&origin, "").await;
    let mut failures = Vec::new();
    for (what, proxy, cookie, id) in [
        ("mixed partners, with an ID", &mixed, "km_ai=abc", Some(ABC)),
        ("mixed partners, without an ID", &mixed, "theme=dark", None),
        ("redirect partners only", &redirect_only, "km_ai=abc", None),
    ] {
        let mut headers = navigation.to_vec();
        headers.push(("cookie", cookie));
        let got = fetch(proxy, "/", &headers).await;
        let asked = origin.last_request();
        if asked.headers.contains_key("range") || asked.headers.contains_key("if-range") {
            failures.push(format!(
                "{what}: the origin was asked for a range ({:?}); the client got {} {:?}",
                asked.headers, got.status, got.body
            ));
            continue;
        }
        assert_eq!(got.status, 200, "{what}");
        assert_eq!(got.body, expected(PAGE, id, true), "{what}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Consent and Global Privacy Control
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn consent_cookie_with_its_token_is_needed_for_decoration() {
    let origin = shop().await;
    let proxy = mixed(
        &origin,
        "[consent]\ncookie = \"cookie_consent\"\ncontains = \"analytics\"\n",
    )
    .await;
    let cases: [(&str, &str, Option<Id>); 6] = [
        (
            "consent with the token (percent-encoded list)",
            "km_ai=abc; cookie_consent=necessary%2Canalytics",
            Some(ABC),
        ),
        (
            "consent cookie in a second place",
            "cookie_consent=analytics; km_ai=abc",
            Some(ABC),
        ),
        ("no consent cookie", "km_ai=abc", None),
        (
            "the token missing",
            "km_ai=abc; cookie_consent=necessary%2Cmarketing",
            None,
        ),
        (
            "an empty consent cookie",
            "km_ai=abc; cookie_consent=",
            None,
        ),
        (
            "the token in another cookie",
            "km_ai=abc; other=analytics; cookie_consent=none",
            None,
        ),
    ];
    for (what, cookie, id) in cases {
        let got = fetch(&proxy, "/", &[("cookie", cookie)]).await;
        assert_eq!(got.status, 200, "{what}");
        assert_eq!(got.body, expected(PAGE, id, true), "{what}");
        assert_eq!(
            got.header("vary"),
            Some("Accept-Encoding, Cookie, Sec-GPC"),
            "{what}: the page may be decorated for another request"
        );
        let private = got.header("cache-control") == Some("max-age=60, private");
        assert_eq!(private, id.is_some(), "{what}: {:?}", got.headers);
    }
}

#[tokio::test]
async fn consent_cookie_alone_is_enough_without_a_token() {
    let origin = shop().await;
    let proxy = mixed(&origin, "[consent]\ncookie = \"cookie_consent\"\n").await;
    let got = fetch(&proxy, "/", &[("cookie", "km_ai=abc; cookie_consent=yes")]).await;
    assert_eq!(got.body, expected(PAGE, Some(ABC), true));
    let got = fetch(&proxy, "/", &[("cookie", "km_ai=abc")]).await;
    assert_eq!(got.body, expected(PAGE, None, true));
}

#[tokio::test]
async fn global_privacy_control_turns_decoration_off() {
    let origin = shop().await;
    let proxy = mixed(
        &origin,
        "[consent]\ncookie = \"cookie_consent\"\ncontains = \"analytics\"\n",
    )
    .await;
    let consented = "km_ai=abc; cookie_consent=analytics";
    let got = fetch(&proxy, "/", &[("cookie", consented), ("sec-gpc", "1")]).await;
    assert_eq!(
        got.body,
        expected(PAGE, None, true),
        "GPC: no ID in the page, redirect links still rewritten"
    );
    assert_eq!(got.header("vary"), Some("Accept-Encoding, Cookie, Sec-GPC"));
    assert_eq!(
        got.header("cache-control"),
        Some("public, max-age=60, s-maxage=600")
    );
    let got = fetch(&proxy, "/", &[("cookie", consented), ("sec-gpc", "0")]).await;
    assert_eq!(got.body, expected(PAGE, Some(ABC), true), "Sec-GPC: 0");

    // Without any [consent] table GPC is honoured all the same.
    let proxy = mixed(&origin, "").await;
    let got = fetch(&proxy, "/", &[("cookie", "km_ai=abc"), ("sec-gpc", "1")]).await;
    assert_eq!(got.body, expected(PAGE, None, true));
}

#[tokio::test]
async fn honor_gpc_false_decorates_despite_gpc_and_does_not_vary_on_it() {
    let origin = shop().await;
    let proxy = mixed(&origin, "[consent]\nhonor_gpc = false\n").await;
    let got = fetch(&proxy, "/", &[("cookie", "km_ai=abc"), ("sec-gpc", "1")]).await;
    assert_eq!(got.body, expected(PAGE, Some(ABC), true));
    assert_eq!(got.header("vary"), Some("Accept-Encoding, Cookie"));
    let got = fetch(&proxy, "/", &[]).await;
    assert_eq!(got.body, expected(PAGE, None, true));
    assert_eq!(got.header("vary"), Some("Accept-Encoding, Cookie"));
    let got = fetch(
        &proxy,
        &to("https://go.partner.org/deal"),
        &[("cookie", "km_ai=abc"), ("sec-gpc", "1")],
    )
    .await;
    assert_redirect(&got, "https://go.partner.org/deal?kmi=abc", "GPC ignored");
}

// ---------------------------------------------------------------------------------------------
// exclude_paths and a partner's paths
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn excluded_paths_pass_through_untouched() {
    let origin = shop().await;
    let proxy = mixed(&origin, "exclude_paths = [\"/admin/*\"]\n").await;
    for headers in [&[("cookie", "km_ai=abc")][..], &[][..]] {
        let got = fetch(&proxy, "/admin/page", headers).await;
        assert_eq!(got.status, 200);
        assert_eq!(
            got.body, PAGE,
            "{headers:?}: byte for byte, redirect links too"
        );
        assert_eq!(
            got.header("cache-control"),
            Some("public, max-age=60, s-maxage=600")
        );
        assert_eq!(got.header("etag"), Some("\"v1\""));
        assert_eq!(got.header("vary"), Some("Accept-Encoding"), "no Vary added");
        assert_eq!(
            got.header("content-length"),
            Some(PAGE.len().to_string().as_str())
        );
    }
    // Paths the pattern does not match are rewritten as usual.
    for path in ["/admin", "/administrator", "/"] {
        let got = fetch(&proxy, path, &[("cookie", "km_ai=abc")]).await;
        assert_eq!(got.body, expected(PAGE, Some(ABC), true), "{path}");
    }
}

#[tokio::test]
async fn a_redirect_from_an_excluded_path_is_untouched_too() {
    let origin = shop().await;
    let proxy = mixed(&origin, "exclude_paths = [\"/admin/*\"]\n").await;
    let got = fetch(&proxy, "/admin/login", &[("cookie", "km_ai=abc")]).await;
    assert_eq!(got.status, 302);
    assert_eq!(
        got.header("location"),
        Some("https://checkout.partner.com/sso"),
        "an excluded path's response passes through untouched"
    );
    assert_eq!(got.header("vary"), None, "no Vary added: {:?}", got.headers);
    assert_eq!(got.header("cache-control"), None, "{:?}", got.headers);
    // The same redirect elsewhere is decorated.
    let got = fetch(&proxy, "/login", &[("cookie", "km_ai=abc")]).await;
    assert_eq!(
        got.header("location"),
        Some("https://checkout.partner.com/sso?kmi=abc")
    );
}

#[tokio::test]
async fn partner_paths_limit_decoration_and_the_redirects_id() {
    const PAGE: &str = "<a href=\"https://pay.partner.org/checkout/step1\">in</a>\n\
                        <a href=\"https://pay.partner.org/about\">out</a>\n\
                        <a href=\"https://go.partner.org/deals/spring\">deal</a>\n\
                        <a href=\"https://go.partner.org/about\">about</a>\n";
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    let proxy = start(
        &origin,
        r#"
[[partner]]
name = "pay"
domains = ["pay.partner.org"]
paths = ["/checkout/*"]

[[partner]]
name = "outbound"
domains = ["go.partner.org"]
mode = "redirect"
paths = ["/deals/*"]
"#,
    )
    .await;
    let got = fetch(&proxy, "/", &[("cookie", "km_ai=abc")]).await;
    assert_eq!(
        got.body,
        "<a href=\"https://pay.partner.org/checkout/step1?kmi=abc\">in</a>\n\
         <a href=\"https://pay.partner.org/about\">out</a>\n\
         <a href=\"/_kmi/out?to=https%3A%2F%2Fgo.partner.org%2Fdeals%2Fspring\">deal</a>\n\
         <a href=\"https://go.partner.org/about\">about</a>\n"
    );
    let got = fetch(
        &proxy,
        &to("https://go.partner.org/deals/spring"),
        &[("cookie", "km_ai=abc")],
    )
    .await;
    assert_redirect(
        &got,
        "https://go.partner.org/deals/spring?kmi=abc",
        "in paths",
    );
    // A hand-made redirect outside the partner's paths goes to its host, but without the ID.
    let got = fetch(
        &proxy,
        &to("https://go.partner.org/about"),
        &[("cookie", "km_ai=abc")],
    )
    .await;
    assert_redirect(&got, "https://go.partner.org/about", "outside paths");
}

// ---------------------------------------------------------------------------------------------
// Server-side identity
// ---------------------------------------------------------------------------------------------

const RESPONSE_HEADER: &str = "[identity]\nresponse_header = \"X-KM-Identity\"\n";

/// An origin that names the visitor in `X-KM-Identity` on every response, and records what it
/// received.
async fn identifying_shop(id: &'static str) -> Origin {
    origin()
        .route("/", move |_| Reply::html(PAGE).header("x-km-identity", id))
        .route("/admin/page", move |_| {
            Reply::html(PAGE).header("x-km-identity", id)
        })
        .route("/data.json", move |_| {
            Reply::ok()
                .header("content-type", "application/json")
                .header("x-km-identity", id)
                .body("{}")
        })
        .route("/missing", move |_| {
            Reply::status(404)
                .header("content-type", "text/html")
                .header("x-km-identity", id)
                .body("<a href=\"https://checkout.partner.com/\">x</a>")
        })
        .start()
        .await
}

#[tokio::test]
async fn response_header_names_the_visitor_beats_cookies_and_never_reaches_the_client() {
    let origin = identifying_shop("srv@example.com").await;
    let proxy = mixed(&origin, RESPONSE_HEADER).await;
    let srv = Id {
        encoded: "srv%40example.com",
        decoded: "srv@example.com",
    };
    for (what, cookie) in [
        ("no cookie", None),
        (
            "an identity cookie",
            Some("km_ai=abc; km_ni=bob%40example.com"),
        ),
    ] {
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("cookie", *c)).collect();
        let got = fetch(&proxy, "/", &headers).await;
        assert_eq!(got.body, expected(PAGE, Some(srv), true), "{what}");
        assert_eq!(got.header("x-km-identity"), None, "{what}");
        assert_eq!(got.header("cache-control"), Some("private"), "{what}");
    }
    // Consent still decides: with GPC the origin's ID is not used either.
    let got = fetch(&proxy, "/", &[("sec-gpc", "1")]).await;
    assert_eq!(got.body, expected(PAGE, None, true));
    assert_eq!(got.header("x-km-identity"), None);
}

#[tokio::test]
async fn response_header_is_removed_from_every_response() {
    let origin = identifying_shop("srv").await;
    let proxy = mixed(
        &origin,
        &format!("exclude_paths = [\"/admin/*\"]\n{RESPONSE_HEADER}"),
    )
    .await;
    for path in ["/data.json", "/admin/page", "/missing"] {
        let got = fetch(&proxy, path, &[("cookie", "km_ai=abc")]).await;
        assert_eq!(
            got.header("x-km-identity"),
            None,
            "{path}: {:?}",
            got.headers
        );
    }
    let rsp = request("HEAD", proxy.addr, "/").send().await;
    assert_eq!(header(&rsp, "x-km-identity"), None, "HEAD");
}

/// The proxy trusting the test's client (`127.0.0.1`) for `X-KM-Identity`, or not.
fn request_header(trusted: &str) -> String {
    format!("[identity]\nrequest_header = \"X-KM-Identity\"\ntrusted_proxies = [\"{trusted}\"]\n")
}

#[tokio::test]
async fn trusted_request_header_beats_cookies_and_never_reaches_the_origin() {
    let origin = shop().await;
    let proxy = mixed(&origin, &request_header("127.0.0.1/32")).await;
    let front = Id {
        encoded: "front%2B1",
        decoded: "front+1",
    };
    let got = fetch(
        &proxy,
        "/",
        &[("x-km-identity", "front+1"), ("cookie", "km_ai=abc")],
    )
    .await;
    assert_eq!(got.body, expected(PAGE, Some(front), true));
    let got = fetch(&proxy, "/", &[("x-km-identity", "front+1")]).await;
    assert_eq!(got.body, expected(PAGE, Some(front), true), "no cookie");
    // At the click-time redirect too.
    let got = fetch(
        &proxy,
        &to("https://go.partner.org/deal"),
        &[("x-km-identity", "front+1"), ("cookie", "km_ai=abc")],
    )
    .await;
    assert_redirect(&got, "https://go.partner.org/deal?kmi=front%2B1", "trusted");

    let requests = origin.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    for r in requests {
        assert_eq!(r.header("x-km-identity"), None, "{:?}", r.headers);
    }
}

#[tokio::test]
async fn untrusted_request_header_is_ignored_and_never_reaches_the_origin() {
    let origin = shop().await;
    let proxy = mixed(&origin, &request_header("10.0.0.0/8")).await;
    let got = fetch(
        &proxy,
        "/",
        &[("x-km-identity", "forged"), ("cookie", "km_ai=abc")],
    )
    .await;
    assert_eq!(
        got.body,
        expected(PAGE, Some(ABC), true),
        "the cookie decides"
    );
    let got = fetch(&proxy, "/", &[("x-km-identity", "forged")]).await;
    assert_eq!(got.body, expected(PAGE, None, true), "no ID at all");
    let got = fetch(
        &proxy,
        &to("https://go.partner.org/deal"),
        &[("x-km-identity", "forged")],
    )
    .await;
    assert_redirect(&got, "https://go.partner.org/deal", "untrusted");
    // Nor on a request that is not for a page.
    let got = fetch(&proxy, "/data.json", &[("x-km-identity", "forged")]).await;
    assert_eq!(got.status, 200);

    let requests = origin.requests();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    for r in requests {
        assert_eq!(
            r.header("x-km-identity"),
            None,
            "{} {}: {:?}",
            r.method,
            r.uri,
            r.headers
        );
    }
}

#[tokio::test]
async fn response_header_beats_a_trusted_request_header() {
    let origin = identifying_shop("srv").await;
    let proxy = mixed(
        &origin,
        "[identity]\nresponse_header = \"X-KM-Identity\"\nrequest_header = \"X-Front-Identity\"\n\
         trusted_proxies = [\"127.0.0.1/32\"]\n",
    )
    .await;
    let srv = Id {
        encoded: "srv",
        decoded: "srv",
    };
    let got = fetch(
        &proxy,
        "/",
        &[("x-front-identity", "front"), ("cookie", "km_ai=abc")],
    )
    .await;
    assert_eq!(got.body, expected(PAGE, Some(srv), true));
    assert_eq!(got.header("x-km-identity"), None);
    let r = origin.the_request();
    assert_eq!(r.header("x-front-identity"), None, "{:?}", r.headers);
}

#[tokio::test]
async fn trusted_proxies_match_ipv4_clients_of_a_dual_stack_listener() {
    // `listen = "[::]:8080"` accepts IPv4 clients too, as IPv4-mapped IPv6 addresses
    // (::ffff:10.1.2.3); they are still the IPv4 addresses `trusted_proxies` lists.
    let probe = std::net::TcpListener::bind("[::]:0").and_then(|l| {
        let port = l.local_addr()?.port();
        std::net::TcpStream::connect(("127.0.0.1", port)).map(|_| ())
    });
    // Never a silent skip: a host without dual-stack sockets cannot show this behaviour.
    if let Err(e) = probe {
        panic!("this test needs a dual-stack IPv6 socket ([::]:0 accepting 127.0.0.1; sysctl net.ipv6.bindv6only=0): {e}");
    }
    let origin = shop().await;
    let proxy = start_on(
        "[::]:0",
        &origin,
        &format!("{}\n{INLINE}\n{REDIRECT}", request_header("127.0.0.1/32")),
    )
    .await;
    let v4 = SocketAddr::from(([127, 0, 0, 1], proxy.addr.port()));
    let front = Id {
        encoded: "front",
        decoded: "front",
    };
    let got = fetch_at(v4, "/", &[("x-km-identity", "front")]).await;
    assert_eq!(got.body, expected(PAGE, Some(front), true));
}

// ---------------------------------------------------------------------------------------------
// `check`
// ---------------------------------------------------------------------------------------------

/// Runs `kmi-proxy check` on this configuration: (success, stderr).
fn check(config: &str) -> (bool, String) {
    let dir = TempDir::new("identity-check");
    let path = dir.file("config.toml", config);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kmi-proxy"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env_remove("KMI_PROXY_CONFIG")
        .env_remove("KMI_PROXY_LISTEN")
        .env_remove("KMI_PROXY_UPSTREAM")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run kmi-proxy check");
    (
        out.status.success(),
        String::from_utf8(out.stderr).expect("UTF-8 stderr"),
    )
}

#[test]
fn check_warns_when_the_named_id_cookie_is_forwarded() {
    let base = "upstream = \"http://127.0.0.1:3000\"\n";
    let partner = "\n[[partner]]\nname = \"p\"\ndomains = [\"p.example\"]\n";
    for (what, identity) in [
        (
            "both cookies",
            "[identity]\ncookies = [\"km_ni\", \"km_ai\"]\n",
        ),
        ("km_ni alone", "[identity]\ncookies = [\"km_ni\"]\n"),
        ("the default cookies", ""),
    ] {
        let (ok, stderr) = check(&format!("{base}{identity}{partner}"));
        assert!(ok, "{what}: check failed: {stderr}");
        let warning = stderr
            .lines()
            .find(|l| l.contains("warning") && l.contains("km_ni"));
        assert!(warning.is_some(), "{what}: no km_ni warning in {stderr:?}");
    }
    let (ok, stderr) = check(&format!(
        "{base}[identity]\ncookies = [\"km_ai\"]\n{partner}"
    ));
    assert!(ok, "{stderr}");
    assert!(
        !stderr.contains("km_ni"),
        "km_ai alone must not warn about km_ni: {stderr:?}"
    );
    assert!(
        !stderr.contains("warning"),
        "no warning expected: {stderr:?}"
    );
}
