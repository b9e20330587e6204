//! A real browser, end to end: Debian's headless Chromium, driven through chromedriver
//! (WebDriver), visits a site served through kmi-proxy, gets its KISSmetrics cookie from the
//! page's own script the way KM's library sets it, reloads, clicks the partner link like a user,
//! and the partner page's script finds the same ID in `kmi`.
//!
//! Two sites on loopback, told apart by name (`--host-resolver-rules` maps `*.test` to
//! 127.0.0.1):
//! - `www.site.test:<proxy port>`: a test origin behind the real proxy, partner
//!   `checkout.partner.test` configured;
//! - `checkout.partner.test:<partner port>`: a plain test origin, not behind the proxy, whose page
//!   reads `kmi` with `URLSearchParams` as KM's URL API would.
//!
//! If `/usr/bin/chromium` or `/usr/bin/chromedriver` is missing the test installs them with
//! apt-get when it runs as root, and fails with the command to run otherwise (see
//! `browser/webdriver.rs`). Run with `cargo test --test browser`.
//!
//! `browser/script.rs` covers the injected click-time link script (`[script] inject`): links and
//! forms built by the page's scripts, KM's `KM.i()`, consent, GPC and Content Security Policy.
//!
//! The last test is the oracle of page reading: the fixtures and the corpus pages, each loaded
//! straight from the origin and through the proxy, compared link by link as Chromium resolves
//! them (`browser/oracle.rs`).

#[path = "../benches/common/mod.rs"]
mod common;
#[path = "browser/oracle.rs"]
mod oracle;
#[path = "browser/script.rs"]
mod script;
mod support;
#[path = "browser/webdriver.rs"]
mod webdriver;

use std::time::Instant;

use kmi_proxy::config::Config;
use support::{origin, Reply};
use webdriver::{poll, Browser};

/// Every `.test` name the browser looks up is this machine.
const HOST_RULES: &str = "MAP *.test 127.0.0.1";

/// The site's page. Its script does what KM's library does on a first visit: with no identity
/// cookie yet, it writes one (`encodeURIComponent`, `path=/`). The proxy only sees the cookie from
/// the next request on. One partner link, and two links that must never be decorated: another
/// site, and the partner's parent domain (the partner pattern is exact).
fn site_page(cookie: &str, id: &str, partner_port: u16) -> String {
    let id_literal = serde_json::to_string(id)
        .expect("a JSON string")
        .replace("</", "<\\/");
    format!(
        r#"<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>The site</title>
<script>
(function () {{
  var known = document.cookie.split("; ").some(function (c) {{
    return c.indexOf("km_ai=") === 0 || c.indexOf("km_ni=") === 0;
  }});
  if (!known) {{
    document.cookie = "{cookie}=" + encodeURIComponent({id_literal}) + "; path=/";
  }}
}})();
</script>
</head>
<body>
<h1>The site</h1>
<p><a id="go" href="http://checkout.partner.test:{partner_port}/land">Go to checkout</a></p>
<p><a id="elsewhere" href="http://www.elsewhere.test:{partner_port}/land">Somewhere else</a></p>
<p><a id="parent" href="http://partner.test:{partner_port}/land">The partner's parent domain</a></p>
</body></html>
"#
    )
}

/// The partner's landing page: what its script finds in `kmi` goes into `<pre id="kmi">`, and
/// `data-found` says whether there was a `kmi` at all.
const PARTNER_PAGE: &str = r#"<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Checkout</title></head>
<body>
<h1>Checkout</h1>
<pre id="kmi"></pre>
<script>
  var kmi = new URLSearchParams(location.search).get("kmi");
  var out = document.getElementById("kmi");
  out.textContent = kmi === null ? "" : kmi;
  out.setAttribute("data-found", kmi === null ? "no" : "yes");
  document.title = "Checkout: " + kmi;
</script>
</body></html>
"#;

/// The links of the site's page as the browser holds them: `(id, href)`.
async fn hrefs(browser: &Browser) -> Vec<(String, String)> {
    let value = browser
        .script(
            "return ['go', 'elsewhere', 'parent'].map(function (id) {
                 return [id, document.getElementById(id).href];
             });",
        )
        .await;
    serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("the page's links are not [id, href] pairs ({e}): {value}"))
}

/// One visitor: a fresh browser (fresh cookie jar) whose ID, set as `cookie` by the page, must
/// arrive on the partner's page exactly as `id`.
async fn journey(cookie: &str, id: &str) {
    let started = Instant::now();

    let partner = origin()
        .route("/land", |_| Reply::html(PARTNER_PAGE))
        .start()
        .await;
    let partner_port = partner.addr.port();
    let page = site_page(cookie, id, partner_port);
    let site = origin()
        .route("/", move |_| Reply::html(page.clone()))
        .start()
        .await;
    // The relaxed setup: any Host the browser sends is forwarded (preserve_host is the default)
    // and names the page; only the partner is configured.
    let text = format!(
        r#"
listen = "127.0.0.1:0"
upstream = "http://{}"

[identity]
cookies = ["km_ni", "km_ai"]

[[partner]]
name = "checkout"
domains = ["checkout.partner.test"]
"#,
        site.addr
    );
    let config = Config::parse(&text, "browser test configuration")
        .unwrap_or_else(|e| panic!("the browser test configuration is invalid: {e}\n{text}"));
    let proxy = kmi_proxy::server::spawn(config)
        .await
        .expect("start the proxy");

    let browser = Browser::start(HOST_RULES).await;
    let site_url = format!("http://www.site.test:{}/", proxy.addr.port());
    let partner_host = format!("checkout.partner.test:{partner_port}");

    // First visit: no cookie went out with the request, so the link is as the origin wrote it;
    // the page's script has now set the cookie.
    browser.go(&site_url).await;
    let jar = browser.script_string("return document.cookie;").await;
    assert!(
        jar.contains(&format!("{cookie}=")),
        "the page's script did not set {cookie}: document.cookie is {jar:?}\n{}",
        browser.logs()
    );
    for (link, href) in hrefs(&browser).await {
        assert!(
            !href.contains("kmi="),
            "#{link} was decorated on the first visit, before any cookie was sent: {href}"
        );
    }

    // Second visit: the cookie goes with the request and the proxy decorates the partner link.
    browser.reload().await;
    let to_page: Vec<_> = site
        .requests()
        .into_iter()
        .filter(|r| r.uri.path() == "/")
        .collect();
    assert_eq!(
        to_page.len(),
        2,
        "the site's origin should have served the page twice, through the proxy: {to_page:#?}"
    );
    let sent = to_page[1].header("cookie").unwrap_or_default().to_owned();
    assert!(
        sent.contains(&format!("{cookie}=")),
        "the reload did not carry {cookie} to the origin (Cookie: {sent:?})"
    );
    let links = hrefs(&browser).await;
    for (link, href) in &links {
        if link == "go" {
            assert!(
                href.contains("kmi="),
                "the partner link #go was not decorated on the reload (Cookie: {sent:?}): {href}"
            );
            assert!(
                href.starts_with(&format!("http://{partner_host}/land?")),
                "the partner link #go points elsewhere after decoration: {href}"
            );
        } else {
            assert!(
                !href.contains("kmi="),
                "the non-partner link #{link} was decorated: {href}"
            );
        }
    }

    // The user clicks through to the partner.
    let go = browser
        .find("#go")
        .await
        .unwrap_or_else(|e| panic!("no #go link on the site's page: {e}"));
    browser.click(&go).await;
    let found = poll("the partner page to read kmi", || {
        let (browser, partner_host) = (&browser, &partner_host);
        async move {
            let host = browser.script_string("return location.host;").await;
            if host != *partner_host {
                return Err(format!("the browser is on {host}"));
            }
            browser
                .find("#kmi[data-found]")
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    let url = browser.script_string("return location.href;").await;
    assert_eq!(
        browser.attribute(&found, "data-found").await.as_deref(),
        Some("yes"),
        "the partner page has no kmi parameter: {url}"
    );
    let kmi = browser.property(&found, "textContent").await;
    assert_eq!(
        kmi.as_str(),
        Some(id),
        "the partner page's script read a different kmi from {url}"
    );

    // And the partner's server got the same ID in its query string.
    let landings: Vec<_> = partner
        .requests()
        .into_iter()
        .filter(|r| r.uri.path() == "/land")
        .collect();
    assert_eq!(
        landings.len(),
        1,
        "the partner should have been visited once: {landings:#?}"
    );
    let landing = &landings[0];
    let query = landing.uri.query().unwrap_or_default();
    let from_query: Vec<String> = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "kmi")
        .map(|(_, v)| v.into_owned())
        .collect();
    assert_eq!(
        from_query,
        [id],
        "the partner's server got a different kmi in {:?}",
        landing.uri
    );

    browser.quit().await;
    eprintln!(
        "{cookie}={id:?}: reached the partner as {url} in {:.1?}",
        started.elapsed()
    );
}

/// KM's anonymous ID is Base64: `+`, `/` and `=` must survive the cookie and the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_base64_id_reaches_the_partner_page() {
    journey("km_ai", "Zk9+aB/c3Q==").await;
}

/// A named identity (set by KM's `identify`), typically an email address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_id_with_at_sign_reaches_the_partner_page() {
    journey("km_ni", "bob@example.com").await;
}

/// Non-ASCII letters, spaces and the characters that mean something in a URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_that_needs_encoding_reaches_the_partner_page() {
    journey("km_ai", "é & ü ?#%").await;
}

/// Chromium reads every fixture page and every corpus page the same through the proxy as
/// straight from the origin, apart from partner links gaining exactly one `kmi` (see
/// `browser/oracle.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_reads_every_page_alike_through_the_proxy() {
    oracle::run(HOST_RULES).await;
}
