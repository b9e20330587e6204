//! The link script's file over HTTP (`[script] inject`, `[script] path`): a real origin and the
//! real proxy on `127.0.0.1:0`. What the file answers to GET under its current version, under a
//! stale or missing one, to HEAD, to a conditional GET and to other methods; that a reload moves
//! it to a new version; and that with `inject = false` its path is the origin's like any other.
//! (What the script does in a page is `tests/browser/script.rs`, in Chromium.)

mod support;

use support::*;

const PAGE: &str =
    "<!DOCTYPE html><html><head><title>Shop</title></head><body><a href=\"/x\">x</a></body></html>";

const INJECT: &str = "[script]\ninject = true";

/// An origin with a page at `/` and a file of its own at the script's default path, which it
/// must never be asked for while the proxy serves the script there.
async fn site() -> Origin {
    origin()
        .route("/", |_| Reply::html(PAGE))
        .route("/_kmi/links.js", |_| {
            Reply::ok()
                .header("content-type", "text/plain")
                .body("the origin's own file")
        })
        .start()
        .await
}

/// The script the proxy built for this configuration: its bytes and version.
fn script_of(extra: &str, origin: &Origin) -> kmi_proxy::script::Script {
    let config = config(extra, origin.addr);
    let script = config.script.as_ref().expect("the script is on");
    (**script).clone()
}

/// The `src` of the `<script>` tag the proxy wrote into the page.
async fn src_in_page(proxy: &kmi_proxy::server::Running) -> String {
    let rsp = get(proxy.addr, "/")
        .header("accept", "text/html")
        .send()
        .await;
    let page = text_of(rsp).await;
    let start = page
        .find("<script src=\"")
        .unwrap_or_else(|| panic!("no script tag in {page}"))
        + "<script src=\"".len();
    let end = start + page[start..].find('"').expect("the end of src");
    page[start..end].to_owned()
}

#[tokio::test]
async fn under_the_pages_url_the_file_is_javascript_cached_for_a_year() {
    let site = site().await;
    let proxy = proxy(INJECT, site.addr).await;
    let script = script_of(INJECT, &site);
    let src = src_in_page(&proxy).await;
    assert_eq!(src, format!("/_kmi/links.js?v={}", script.version));

    let rsp = get(proxy.addr, &src)
        .cookie("km_ai=the-visitor")
        .send()
        .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        header(&rsp, "content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(header(&rsp, "x-content-type-options"), Some("nosniff"));
    assert_eq!(
        header(&rsp, "cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    let etag = format!("\"{}\"", script.version);
    assert_eq!(header(&rsp, "etag"), Some(etag.as_str()));
    assert_eq!(
        header(&rsp, "content-length"),
        Some(script.js.len().to_string().as_str())
    );
    // The same for every visitor: nothing varies by cookie, and the ID is not in it.
    assert_eq!(header(&rsp, "vary"), None);
    assert_eq!(header(&rsp, "set-cookie"), None);
    let body = text_of(rsp).await;
    assert_eq!(body, script.js);
    assert!(!body.contains("the-visitor"));
    assert!(
        site.requests().iter().all(|r| r.uri.path() == "/"),
        "the origin was asked for the script: {:?}",
        site.requests()
    );
}

/// A page cached from before a reload names the old version; a URL without one was typed or
/// guessed. Both get today's script, but only for as long as it takes to ask again (`no-cache`:
/// a cache may keep it and revalidate with the ETag), so no cache pins today's bytes for a year
/// under a URL that does not name them.
#[tokio::test]
async fn a_stale_or_missing_version_gets_the_current_script_revalidated_every_time() {
    let site = site().await;
    let proxy = proxy(INJECT, site.addr).await;
    let script = script_of(INJECT, &site);
    let stale = format!("/_kmi/links.js?v={:016x}", 0);
    let other = format!("/_kmi/links.js?x=1&v={}x", script.version);
    for path in ["/_kmi/links.js", "/_kmi/links.js?", &stale, &other] {
        let rsp = get(proxy.addr, path).send().await;
        assert_eq!(rsp.status(), 200, "{path}");
        assert_eq!(header(&rsp, "cache-control"), Some("no-cache"), "{path}");
        assert_eq!(
            header(&rsp, "etag"),
            Some(format!("\"{}\"", script.version).as_str()),
            "{path}"
        );
        assert_eq!(text_of(rsp).await, script.js, "{path}");
    }
    // The version among other parameters still names these bytes.
    let rsp = get(
        proxy.addr,
        &format!("/_kmi/links.js?a=b&v={}", script.version),
    )
    .send()
    .await;
    assert_eq!(
        header(&rsp, "cache-control"),
        Some("public, max-age=31536000, immutable")
    );
}

#[tokio::test]
async fn head_gives_the_headers_and_no_body() {
    let site = site().await;
    let proxy = proxy(INJECT, site.addr).await;
    let script = script_of(INJECT, &site);
    let rsp = request("HEAD", proxy.addr, &script.src()).send().await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(
        header(&rsp, "content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(header(&rsp, "x-content-type-options"), Some("nosniff"));
    assert_eq!(
        header(&rsp, "cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    assert_eq!(
        header(&rsp, "etag"),
        Some(format!("\"{}\"", script.version).as_str())
    );
    assert_eq!(
        header(&rsp, "content-length"),
        Some(script.js.len().to_string().as_str()),
        "HEAD says how long the GET body is"
    );
    assert!(body_of(rsp).await.is_empty());
    assert!(site.requests().is_empty(), "{:?}", site.requests());
}

#[tokio::test]
async fn a_conditional_get_with_the_etag_is_304_and_any_other_gets_the_file() {
    let site = site().await;
    let proxy = proxy(INJECT, site.addr).await;
    let script = script_of(INJECT, &site);
    let etag = format!("\"{}\"", script.version);
    for matching in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
        "*".to_owned(),
    ] {
        for method in ["GET", "HEAD"] {
            let rsp = request(method, proxy.addr, &script.src())
                .header("if-none-match", &matching)
                .send()
                .await;
            assert_eq!(rsp.status(), 304, "{method} If-None-Match: {matching}");
            assert_eq!(header(&rsp, "etag"), Some(etag.as_str()));
            assert_eq!(
                header(&rsp, "cache-control"),
                Some("public, max-age=31536000, immutable")
            );
            assert!(body_of(rsp).await.is_empty(), "a 304 has no body");
        }
    }
    for other in ["\"0000000000000000\"", "W/\"other\"", ""] {
        let rsp = get(proxy.addr, &script.src())
            .header("if-none-match", other)
            .send()
            .await;
        assert_eq!(rsp.status(), 200, "If-None-Match: {other}");
        assert_eq!(text_of(rsp).await, script.js);
    }
}

/// A configuration that changes the script changes its version: the page names the new URL,
/// the old URL is stale (revalidated) and the old ETag no longer matches.
#[tokio::test]
async fn a_reload_that_changes_the_script_moves_it_to_a_new_version() {
    let site = site().await;
    let proxy = proxy(INJECT, site.addr).await;
    let before = script_of(INJECT, &site);
    let changed = "[identity]\nparam = \"kmx\"\n[script]\ninject = true";
    let after = script_of(changed, &site);
    assert_ne!(before.version, after.version);
    let warnings = proxy.handle.reload(config(changed, site.addr));
    assert!(warnings.is_empty(), "{warnings:?}");

    assert_eq!(src_in_page(&proxy).await, after.src());
    let rsp = get(proxy.addr, &before.src())
        .header("if-none-match", &format!("\"{}\"", before.version))
        .send()
        .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(header(&rsp, "cache-control"), Some("no-cache"));
    assert_eq!(text_of(rsp).await, after.js);
}

/// The path is the proxy's: a method other than GET or HEAD is refused (405, naming the two it
/// answers), not passed to the origin, which never sees the path while the script is on.
#[tokio::test]
async fn other_methods_are_refused_and_never_reach_the_origin() {
    let site = site().await;
    let proxy = proxy(INJECT, site.addr).await;
    let script = script_of(INJECT, &site);
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let rsp = request(method, proxy.addr, &script.src())
            .header("content-type", "text/plain")
            .body("a body")
            .send()
            .await;
        assert_eq!(rsp.status(), 405, "{method}");
        assert_eq!(header(&rsp, "allow"), Some("GET, HEAD"), "{method}");
        assert_eq!(header(&rsp, "cache-control"), Some("no-store"), "{method}");
        let text = text_of(rsp).await;
        assert!(text.contains("GET"), "{method}: {text}");
    }
    assert!(site.requests().is_empty(), "{:?}", site.requests());
}

/// With the script off nothing is injected and the path is the origin's, whatever the method.
#[tokio::test]
async fn with_inject_off_the_path_goes_to_the_origin() {
    let site = site().await;
    let off = "[script]\ninject = false";
    let proxy = proxy(off, site.addr).await;
    assert!(config(off, site.addr).script.is_none());
    let rsp = get(proxy.addr, "/")
        .header("accept", "text/html")
        .send()
        .await;
    assert_eq!(text_of(rsp).await, PAGE, "nothing is injected");
    for method in ["GET", "POST"] {
        let rsp = request(method, proxy.addr, "/_kmi/links.js?v=1")
            .send()
            .await;
        assert_eq!(rsp.status(), 200, "{method}");
        assert_eq!(text_of(rsp).await, "the origin's own file", "{method}");
    }
    let asked: Vec<_> = site
        .requests()
        .into_iter()
        .filter(|r| r.uri.path() == "/_kmi/links.js")
        .map(|r| r.method)
        .collect();
    assert_eq!(asked, ["GET", "POST"]);
}
