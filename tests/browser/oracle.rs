//! Chromium as the oracle of page reading: every page is loaded straight from the origin and
//! through kmi-proxy in one browser session, and what Chromium's own parser and URL resolver make
//! of the two is compared link by link. The proxy must read each page as the browser does: a
//! link it changed must be the browser's link plus exactly one `kmi` on a partner host; every
//! other link, the document's encoding and base, and the whole document apart from link targets
//! must be the same.
//!
//! Pages: the rewrite fixtures that run with the shared partner configuration (a sidecar that
//! sets nothing but `content_type`, which the origin sends), and the real pages of the corpus
//! (`$KMI_CORPUS`, by default `../shared/corpus`), each with its most linked host as a partner.
//! A partner link the proxy leaves alone fails the test unless the page marks it with
//! `data-left-alone="why"` (a fixture can; a corpus page cannot).
//!
//! The origin sends `Content-Security-Policy: default-src 'none'`: no page script runs and
//! nothing else is fetched, so each document is exactly what the parser built from the bytes.
//! WebDriver's own scripts are not subject to the page's policy.

use std::path::{Path, PathBuf};

use kmi_proxy::config::Config;
use kmi_proxy::decorate::Decorator;
use serde::Deserialize;
use url::Url;

use crate::common;
use crate::support::{origin, Reply};
use crate::webdriver::Browser;

const ID: &str = "Zk9+aB/c3Q==";
const PARAM: &str = "kmi";
const SITE: &str = "www.site.test";
const NO_SUBRESOURCES: &str = "default-src 'none'";

/// One page the origin serves at `/oracle/<path>`.
struct Served {
    /// Where it came from, for failure messages.
    source: String,
    path: String,
    content_type: String,
    body: Vec<u8>,
    /// Whether it may mark partner links as left alone on purpose.
    may_mark: bool,
}

/// What Chromium made of one page.
#[derive(Debug, Deserialize, PartialEq)]
struct Reading {
    charset: String,
    base: String,
    /// `[local name, resolved href, data-left-alone]` of every `a[href]` and `area[href]`.
    links: Vec<(String, String, Option<String>)>,
    /// The document with every `a`/`area` href blanked.
    dom: String,
}

/// Collects a [`Reading`]. HTML links in the document are read through `.href` (Chromium's
/// resolution, in the document's encoding); others (SVG `a`, links in template contents, which
/// are in no document) are resolved against `document.baseURI`.
const READ_PAGE: &str = r#"
var ns = 'http://www.w3.org/1999/xhtml';
function links(root) {
    var found = Array.prototype.slice.call(root.querySelectorAll('a[href], area[href]'));
    Array.prototype.forEach.call(root.querySelectorAll('template'), function (t) {
        if (t.content) { found = found.concat(links(t.content)); }
    });
    return found;
}
var read = links(document).map(function (el) {
    var href = el.getAttribute('href');
    if (el.namespaceURI === ns && el.ownerDocument === document) {
        href = el.href;
    } else {
        try { href = new URL(href, document.baseURI).href; } catch (e) {}
    }
    return [el.localName, href, el.getAttribute('data-left-alone')];
});
var clone = document.documentElement.cloneNode(true);
links(clone).forEach(function (el) { el.setAttribute('href', ''); });
return { charset: document.characterSet, base: document.baseURI, links: read, dom: clone.outerHTML };
"#;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/rewrite")
}

/// The fixtures that run with the shared configuration as they are: no sidecar, or one that only
/// sets `content_type`.
fn fixture_pages() -> Vec<Served> {
    let dir = fixtures_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|entry| {
            let name = entry.expect("a directory entry").file_name();
            name.to_str()?.strip_suffix(".src.html").map(str::to_owned)
        })
        .collect();
    names.sort();
    let mut pages = Vec::new();
    for name in names {
        let sidecar = dir.join(format!("{name}.toml"));
        let mut content_type = "text/html".to_owned();
        if sidecar.exists() {
            let text = std::fs::read_to_string(&sidecar)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", sidecar.display()));
            let table: toml::Table = text
                .parse()
                .unwrap_or_else(|e| panic!("{}: {e}", sidecar.display()));
            if table.keys().any(|k| k != "content_type") {
                continue;
            }
            if let Some(ct) = table.get("content_type").and_then(|v| v.as_str()) {
                content_type = ct.to_owned();
            }
        }
        let file = dir.join(format!("{name}.src.html"));
        pages.push(Served {
            source: format!("fixtures/rewrite/{name}.src.html"),
            path: format!("fixture/{name}.html"),
            content_type,
            body: std::fs::read(&file)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display())),
            may_mark: true,
        });
    }
    assert!(
        pages.len() >= 40,
        "only {} fixtures run with the shared configuration: the oracle would test too little",
        pages.len()
    );
    pages
}

/// The corpus pages, and the host each links to most (its partner here).
fn corpus_pages() -> (Vec<Served>, Vec<String>) {
    let dir = common::corpus_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "the browser oracle reads the corpus of real pages in {} ({e}); \
             set KMI_CORPUS to a directory of .html pages",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "html"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .html pages in {}", dir.display());
    let mut pages = Vec::new();
    let mut hosts = Vec::new();
    for file in files {
        let body =
            std::fs::read(&file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(host) = common::most_linked_host(&body) {
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
        pages.push(Served {
            source: file.display().to_string(),
            path: format!("corpus/{name}"),
            content_type: "text/html".to_owned(),
            body,
            may_mark: false,
        });
    }
    (pages, hosts)
}

/// The fixtures' partners, the corpus hosts as partners, the ID from the `km_ai` cookie.
fn config(upstream: std::net::SocketAddr, corpus_hosts: &[String]) -> Config {
    let shared_path = fixtures_dir().join("config.toml");
    let shared = std::fs::read_to_string(&shared_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", shared_path.display()));
    let mut table: toml::Table = shared.parse().expect("the shared fixture configuration");
    table.insert("listen".into(), "127.0.0.1:0".into());
    table.insert("upstream".into(), format!("http://{upstream}").into());
    let mut identity = toml::Table::new();
    identity.insert("cookies".into(), vec!["km_ai"].into());
    table.insert("identity".into(), identity.into());
    let partners = table
        .get_mut("partner")
        .and_then(|p| p.as_array_mut())
        .expect("config.toml has [[partner]] entries");
    for (i, host) in corpus_hosts.iter().enumerate() {
        let mut partner = toml::Table::new();
        partner.insert("name".into(), format!("corpus-{i}").into());
        partner.insert("domains".into(), vec![host.as_str()].into());
        partners.push(partner.into());
    }
    let text = toml::to_string(&table).expect("serialise the configuration");
    Config::parse(&text, "the browser oracle's configuration")
        .unwrap_or_else(|e| panic!("the oracle's configuration is invalid: {e}\n{text}"))
}

/// Runs the oracle over every page; panics with every difference found.
pub async fn run(host_rules: &str) {
    let started = std::time::Instant::now();
    let mut pages = fixture_pages();
    let fixtures = pages.len();
    let (corpus, corpus_hosts) = corpus_pages();
    pages.extend(corpus);

    let mut builder = origin().route("/", |_| Reply::html("<!doctype html><title>start</title>"));
    for page in &pages {
        let (body, content_type) = (page.body.clone(), page.content_type.clone());
        builder = builder.route(&format!("/oracle/{}", page.path), move |_| {
            Reply::ok()
                .header("content-type", &content_type)
                .header("content-security-policy", NO_SUBRESOURCES)
                .body(body.clone())
        });
    }
    let site = builder.start().await;
    let config = config(site.addr, &corpus_hosts);
    let decorator = std::sync::Arc::clone(&config.decorator);
    let proxy = kmi_proxy::server::spawn(config)
        .await
        .expect("start the proxy");

    let direct = format!("http://{SITE}:{}", site.addr.port());
    let proxied = format!("http://{SITE}:{}", proxy.addr.port());
    let browser = Browser::start(host_rules).await;
    // The cookie is the host's, whatever the port: the proxy sees it, the origin ignores it.
    browser.go(&format!("{direct}/")).await;
    browser
        .script(&format!(
            "document.cookie = 'km_ai=' + encodeURIComponent({}) + '; path=/'; return null;",
            serde_json::to_string(ID).unwrap()
        ))
        .await;

    let mut failures = Vec::new();
    let (mut links, mut decorated, mut compressed_replays) = (0, 0, 0);
    for page in &pages {
        let direct_reading = read(&browser, &format!("{direct}/oracle/{}", page.path)).await;
        let url = format!("{proxied}/oracle/{}", page.path);
        // The first read records the page; the second is answered from the recording, and
        // since the origin sends it uncompressed and Chromium accepts gzip (brotli only over
        // https), it comes as the recording's packed gzip pieces: Chromium must read that one
        // alike too.
        let mut readings = [read(&browser, &url).await, read(&browser, &url).await];
        let sizes = browser.script(BODY_SIZES).await;
        let (encoded, decoded) = (sizes[0].as_f64(), sizes[1].as_f64());
        if matches!((encoded, decoded), (Some(e), Some(d)) if e > 0.0 && e < d * 0.8) {
            compressed_replays += 1;
        }
        links += direct_reading.links.len();
        let mut problems = Vec::new();
        for (i, proxied_reading) in readings.iter_mut().enumerate() {
            // The two differ in the origin's port only; relative links take it from the page.
            proxied_reading.base = proxied_reading.base.replace(&proxied, &direct);
            for link in &mut proxied_reading.links {
                link.1 = link.1.replace(&proxied, &direct);
            }
            let mut counted = 0;
            for problem in compare(
                &decorator,
                page,
                &direct_reading,
                proxied_reading,
                &mut counted,
            ) {
                problems.push(format!("read {}: {problem}", i + 1));
            }
            if i == 0 {
                decorated += counted;
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{} (served as {:?}):\n  {}",
                page.source,
                page.content_type,
                problems.join("\n  ")
            ));
        }
    }
    browser.quit().await;

    assert!(
        failures.is_empty(),
        "Chromium reads {} of {} pages differently through the proxy:\n\n{}",
        failures.len(),
        pages.len(),
        failures.join("\n\n")
    );
    // Pages read a second time came compressed from their recording (all but pages too large
    // to record).
    assert!(
        compressed_replays * 10 >= pages.len() * 8,
        "only {compressed_replays} of {} pages came compressed from a recording",
        pages.len()
    );
    // A run that decorated nothing would prove nothing.
    assert!(
        decorated > 100,
        "only {decorated} links were decorated in {} pages",
        pages.len()
    );
    eprintln!(
        "browser oracle: {} pages ({fixtures} fixtures, {} corpus), {links} links, {decorated} \
         decorated, {compressed_replays} read again spliced and compressed, all read alike, in \
         {:.1?}",
        pages.len(),
        pages.len() - fixtures,
        started.elapsed()
    );
}

/// The last navigation's body as it came over the wire and as it was decoded.
const BODY_SIZES: &str = "const n = performance.getEntriesByType('navigation')[0]; \
     return [n.encodedBodySize, n.decodedBodySize];";

async fn read(browser: &Browser, url: &str) -> Reading {
    browser.go(url).await;
    let value = browser.script(READ_PAGE).await;
    let reading: Reading = serde_json::from_value(value)
        .unwrap_or_else(|e| panic!("{url}: the page reading is not what the script returns: {e}"));
    reading
}

/// Every way the proxied reading differs from the direct one other than the allowed one; counts
/// the decorated links into `decorated`.
fn compare(
    decorator: &Decorator,
    page: &Served,
    direct: &Reading,
    proxied: &Reading,
    decorated: &mut usize,
) -> Vec<String> {
    let mut problems = Vec::new();
    if direct.charset != proxied.charset {
        problems.push(format!(
            "document encoding: {} directly, {} through the proxy",
            direct.charset, proxied.charset
        ));
    }
    if direct.base != proxied.base {
        problems.push(format!(
            "base URL: {} directly, {} through the proxy",
            direct.base, proxied.base
        ));
    }
    if direct.links.len() != proxied.links.len() {
        problems.push(format!(
            "{} links directly, {} through the proxy",
            direct.links.len(),
            proxied.links.len()
        ));
        return problems;
    }
    for (i, (d, p)) in direct.links.iter().zip(&proxied.links).enumerate() {
        let (tag, d_href, mark) = d;
        let p_href = &p.1;
        let link = format!("link {} (<{tag}>, {d_href:?})", i + 1);
        if d_href == p_href {
            let partner = Url::parse(d_href)
                .ok()
                .filter(|u| decorator.partner_host(u).is_some() && !has_param(u));
            match (partner, mark) {
                (Some(_), None) => problems.push(format!(
                    "{link}: a partner link as Chromium reads it, left alone by the proxy"
                )),
                (Some(_), Some(_)) if !page.may_mark => {
                    problems.push(format!("{link}: marked data-left-alone in a corpus page"))
                }
                _ => {}
            }
            continue;
        }
        match decoration(decorator, d_href, p_href) {
            Ok(()) => *decorated += 1,
            Err(why) => problems.push(format!("{link}: through the proxy {p_href:?}: {why}")),
        }
    }
    if direct.dom != proxied.dom {
        let at = direct
            .dom
            .bytes()
            .zip(proxied.dom.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(direct.dom.len().min(proxied.dom.len()));
        let around = |s: &str| {
            let bytes = &s.as_bytes()[at.saturating_sub(60)..(at + 60).min(s.len())];
            String::from_utf8_lossy(bytes).into_owned()
        };
        problems.push(format!(
            "the documents differ beyond link targets at byte {at}: directly {:?}, through the \
             proxy {:?}",
            around(&direct.dom),
            around(&proxied.dom)
        ));
    }
    problems
}

fn has_param(url: &Url) -> bool {
    url.query_pairs().any(|(k, _)| k == PARAM)
}

/// `Ok` when `proxied` is `direct` with exactly one `kmi=<ID>` added to its query, on a partner
/// host, and nothing else changed (the raw query pairs are compared, not their decoding).
fn decoration(decorator: &Decorator, direct: &str, proxied: &str) -> Result<(), String> {
    let d =
        Url::parse(direct).map_err(|e| format!("Chromium's direct href does not parse: {e}"))?;
    let p = Url::parse(proxied).map_err(|e| format!("does not parse: {e}"))?;
    if decorator.partner_host(&p).is_none() {
        return Err("changed, but not on a partner host".into());
    }
    let without_query = |u: &Url| {
        let mut u = u.clone();
        u.set_query(None);
        u
    };
    if without_query(&d) != without_query(&p) {
        return Err("changed outside the query".into());
    }
    if has_param(&d) {
        return Err("the page's link already had a kmi".into());
    }
    let pairs = |u: &Url| -> Vec<String> {
        u.query()
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let (d_pairs, mut p_pairs) = (pairs(&d), pairs(&p));
    let added: Vec<usize> = p_pairs
        .iter()
        .enumerate()
        .filter(|(_, pair)| pair.split('=').next() == Some(PARAM))
        .map(|(i, _)| i)
        .collect();
    let [one] = added[..] else {
        return Err(format!("{} kmi pairs, not one", added.len()));
    };
    let pair = p_pairs.remove(one);
    let value = pair.split_once('=').map(|(_, v)| v).unwrap_or_default();
    let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
    if value != ID {
        return Err(format!("kmi is {value:?}, not the visitor's ID {ID:?}"));
    }
    if p_pairs != d_pairs {
        return Err(format!(
            "the other query pairs changed: {d_pairs:?} directly, {p_pairs:?} through the proxy"
        ));
    }
    Ok(())
}
