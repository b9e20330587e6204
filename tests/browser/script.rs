//! The injected click-time link script in real Chromium: links and forms that the page's own
//! scripts create after load (inserted, re-pointed, in a shadow root, a built form, a submit
//! button's `formaction`), activated
//! by real input events (click, middle click, Enter), reach the partner with `kmi` equal to the
//! ID the browser holds; `KM.i()` wins over the cookie; no cookie, no consent and Global Privacy
//! Control leave links alone; a strict nonce-based policy runs the script with no violation; a
//! policy that forbids it gets nothing injected, the page byte for byte as the origin sent it.
//! And the script's decorator agrees with the Rust `Decorator` over a table of hrefs and IDs.

use std::sync::Arc;

use kmi_proxy::config::Config;
use kmi_proxy::decorate::Outcome;
use kmi_proxy::identity::VisitorId;
use serde_json::{json, Value};
use url::Url;

use crate::support::{self, origin, Origin, Reply};
use crate::webdriver::{poll, Browser};
use crate::HOST_RULES;

const NONCE: &str = "n0nc3+R4nd/0m==";

/// The site's page: after load its script inserts a partner link (`#ins`), re-points a link
/// that pointed elsewhere (`#chg`), puts a partner link in an open shadow root (`#sh`), builds
/// a GET form to the partner (`#f`, submitted by `#fb`) and a form to another site whose submit
/// buttons send it to the partner instead (`formaction`: `#gb` as a GET, `#gp` as a POST by
/// `formmethod`); all with DOM calls only (no `innerHTML`, so Trusted Types have nothing to
/// object to). `head_extra` runs first; every policy violation the browser reports is kept in
/// `window.violations`.
fn site_page(partner_port: u16, nonce: Option<&str>, head_extra: &str) -> String {
    let n = nonce.map(|n| format!(" nonce=\"{n}\"")).unwrap_or_default();
    let partner = format!("http://checkout.partner.test:{partner_port}/land");
    format!(
        r#"<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Scripted links</title>
<script{n}>
window.violations = [];
document.addEventListener("securitypolicyviolation", function (e) {{
  window.violations.push(e.violatedDirective + " " + e.blockedURI);
}});
{head_extra}
</script>
</head><body>
<h1>Scripted links</h1>
<p><a id="chg" href="http://www.elsewhere.test:{partner_port}/land?case=chg">re-pointed</a></p>
<p id="slot"></p>
<div id="host"></div>
<script{n}>
addEventListener("load", function () {{
  setTimeout(function () {{
    var a = document.createElement("a");
    a.id = "ins"; a.href = "{partner}?case=ins"; a.textContent = "inserted";
    document.getElementById("slot").appendChild(a);
    document.getElementById("chg").href = "{partner}?case=chg";
    var root = document.getElementById("host").attachShadow({{ mode: "open" }});
    var s = document.createElement("a");
    s.href = "{partner}?case=shadow"; s.textContent = "in a shadow root";
    root.appendChild(s);
    var f = document.createElement("form");
    f.id = "f"; f.action = "{partner}"; f.method = "get";
    var i = document.createElement("input");
    i.type = "hidden"; i.name = "case"; i.value = "form"; f.appendChild(i);
    var b = document.createElement("button");
    b.id = "fb"; b.type = "submit"; b.textContent = "Send"; f.appendChild(b);
    document.body.appendChild(f);
    var g = document.createElement("form");
    g.action = "http://www.elsewhere.test:{partner_port}/land"; g.method = "get";
    var j = document.createElement("input");
    j.type = "hidden"; j.name = "case"; j.value = "formaction"; g.appendChild(j);
    var gb = document.createElement("button");
    gb.id = "gb"; gb.type = "submit"; gb.formAction = "{partner}"; gb.textContent = "Send";
    var gp = document.createElement("button");
    gp.id = "gp"; gp.type = "submit"; gp.formAction = "{partner}?case=formpost";
    gp.formMethod = "post"; gp.textContent = "Post";
    g.appendChild(gb); g.appendChild(gp);
    document.body.appendChild(g);
    document.body.setAttribute("data-ready", "yes");
  }}, 0);
}});
</script>
</body></html>
"#
    )
}

const PARTNER_PAGE: &str =
    "<!DOCTYPE html><html><head><title>Checkout</title></head><body>Checkout</body></html>";

/// One site behind the proxy with the script on, a partner, and a browser.
struct Env {
    browser: Browser,
    partner: Origin,
    proxy: kmi_proxy::server::Running,
    site_url: String,
    /// Kept for as long as the test runs: it serves the site.
    _site: Origin,
}

async fn env(extra: &str, page: impl Fn(u16) -> String, csp: Option<&'static str>) -> Env {
    let partner = origin()
        .route("/land", |_| Reply::html(PARTNER_PAGE))
        .start()
        .await;
    let page = page(partner.addr.port());
    let site = origin()
        .route("/", move |_| {
            let reply = Reply::html(page.clone());
            match csp {
                Some(policy) => reply.header("content-security-policy", policy),
                None => reply,
            }
        })
        .start()
        .await;
    let text = format!(
        "listen = \"127.0.0.1:0\"\nupstream = \"http://{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[script]\ninject = true\n{extra}\n[[partner]]\nname = \"checkout\"\ndomains = [\"checkout.partner.test\"]\nforms = true\n",
        site.addr
    );
    let config = Config::parse(&text, "script test").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let proxy = kmi_proxy::server::spawn(config)
        .await
        .expect("start the proxy");
    let browser = Browser::start(HOST_RULES).await;
    let site_url = format!("http://www.site.test:{}/", proxy.addr.port());
    Env {
        browser,
        partner,
        proxy,
        site_url,
        _site: site,
    }
}

/// How a visitor activates the element that `locate` (a script returning it) finds.
#[derive(Clone, Copy, Debug)]
enum Activation {
    Click,
    MiddleClick,
    Enter,
}

impl Env {
    /// Loads the site's page fresh and waits for its script to have built the links.
    async fn load(&self) {
        self.browser.go(&self.site_url).await;
        poll("the page's script to build its links", || async {
            match self.browser.find("body[data-ready]").await {
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    }

    async fn set_cookie(&self, cookie: &str) {
        self.browser
            .script_with(
                "document.cookie = arguments[0] + '; path=/'; return document.cookie;",
                json!([cookie]),
            )
            .await;
    }

    /// Activates the element and returns the `kmi` values the partner's server got with the
    /// landing request of `case`.
    async fn activate(&self, locate: &str, how: Activation, case: &str) -> Vec<String> {
        let rect = self
            .browser
            .script(&format!(
                "var el = (function () {{ {locate} }})(); el.scrollIntoView();
                 if ({enter}) {{ el.focus(); return [0, 0]; }}
                 var r = el.getBoundingClientRect();
                 return [Math.round(r.left + r.width / 2), Math.round(r.top + r.height / 2)];",
                enter = matches!(how, Activation::Enter)
            ))
            .await;
        let (x, y) = (rect[0].as_i64().unwrap_or(0), rect[1].as_i64().unwrap_or(0));
        let actions = match how {
            Activation::Enter => json!([{ "type": "key", "id": "keyboard", "actions": [
                { "type": "keyDown", "value": "\u{E007}" },
                { "type": "keyUp", "value": "\u{E007}" }
            ]}]),
            Activation::Click | Activation::MiddleClick => {
                let button = if matches!(how, Activation::MiddleClick) {
                    1
                } else {
                    0
                };
                json!([{ "type": "pointer", "id": "mouse", "parameters": { "pointerType": "mouse" },
                "actions": [
                    { "type": "pointerMove", "origin": "viewport", "x": x, "y": y },
                    { "type": "pointerDown", "button": button },
                    { "type": "pointerUp", "button": button }
                ]}])
            }
        };
        self.browser.actions(actions).await;
        let landing = poll(
            &format!("the partner to be reached ({case}, {how:?})"),
            || async {
                self.partner
                    .requests()
                    .into_iter()
                    .filter(|r| r.uri.path() == "/land")
                    .find(|r| {
                        url::form_urlencoded::parse(r.uri.query().unwrap_or_default().as_bytes())
                            .any(|(k, v)| k == "case" && v == case)
                    })
                    .ok_or_else(|| format!("no landing for {case} yet"))
            },
        )
        .await;
        url::form_urlencoded::parse(landing.uri.query().unwrap_or_default().as_bytes())
            .filter(|(k, _)| k == "kmi")
            .map(|(_, v)| v.into_owned())
            .collect()
    }

    async fn metrics(&self) -> String {
        let admin = self.proxy.admin_addr.expect("an admin listener");
        support::text_of(support::get(admin, "/metrics").send().await).await
    }
}

const INS: &str = "return document.getElementById('ins');";
const CHG: &str = "return document.getElementById('chg');";
const SHADOW: &str = "return document.getElementById('host').shadowRoot.querySelector('a');";
const FORM_BUTTON: &str = "return document.getElementById('fb');";
const FORMACTION_GET: &str = "return document.getElementById('gb');";
const FORMACTION_POST: &str = "return document.getElementById('gp');";

const ID: &str = "Zk9+aB/c3Q==";
const COOKIE: &str = "km_ai=Zk9%2BaB%2Fc3Q%3D%3D";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_and_forms_that_scripts_create_reach_the_partner_with_the_id() {
    let env = env("", |port| site_page(port, None, ""), None).await;
    env.load().await;
    // The cookie is set in the browser after the page was served: only the script can know it.
    env.set_cookie(COOKIE).await;
    for (locate, how, case) in [
        (INS, Activation::Click, "ins"),
        (CHG, Activation::Click, "chg"),
        (SHADOW, Activation::Click, "shadow"),
        (FORM_BUTTON, Activation::Click, "form"),
        (FORMACTION_GET, Activation::Click, "formaction"),
        (FORMACTION_POST, Activation::Click, "formpost"),
    ] {
        env.load().await;
        let kmi = env.activate(locate, how, case).await;
        assert_eq!(kmi, [ID], "{case}: the partner got kmi {kmi:?}");
    }
    // Middle click (a new tab) and Enter, on fresh landings of their own.
    env.load().await;
    env.browser
        .script("document.getElementById('ins').href += '-middle'; return 0;")
        .await;
    let kmi = env
        .activate(INS, Activation::MiddleClick, "ins-middle")
        .await;
    assert_eq!(kmi, [ID], "middle click: the partner got kmi {kmi:?}");
    env.load().await;
    env.browser
        .script("document.getElementById('ins').href += '-enter'; return 0;")
        .await;
    let kmi = env.activate(INS, Activation::Enter, "ins-enter").await;
    assert_eq!(kmi, [ID], "Enter: the partner got kmi {kmi:?}");
    assert!(
        env.metrics()
            .await
            .contains("kmi_proxy_script_injections_total{result=\"file\"}"),
        "the injection was not counted"
    );
    env.browser.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn km_i_wins_over_the_cookie() {
    let stub = "window.KM = { i: function () { return 'signed.up@example.com'; } };";
    let env = env("", move |port| site_page(port, None, stub), None).await;
    env.load().await;
    env.set_cookie(COOKIE).await;
    env.load().await;
    let kmi = env.activate(INS, Activation::Click, "ins").await;
    assert_eq!(kmi, ["signed.up@example.com"]);
    env.browser.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cookie_no_consent_and_gpc_leave_links_alone() {
    // No cookie at all.
    let env1 = env("", |port| site_page(port, None, ""), None).await;
    env1.load().await;
    let kmi = env1.activate(INS, Activation::Click, "ins").await;
    assert!(kmi.is_empty(), "no cookie, yet kmi {kmi:?}");
    env1.browser.quit().await;

    // A consent cookie is required: without it nothing, with it the ID.
    let env2 = env(
        "[consent]\ncookie = \"cc\"\ncontains = \"analytics\"",
        |port| site_page(port, None, ""),
        None,
    )
    .await;
    env2.load().await;
    env2.set_cookie(COOKIE).await;
    env2.set_cookie("cc=necessary").await;
    env2.load().await;
    let kmi = env2.activate(INS, Activation::Click, "ins").await;
    assert!(kmi.is_empty(), "no consent, yet kmi {kmi:?}");
    // Back on the site (the click left for the partner) to set the cookie there.
    env2.load().await;
    env2.set_cookie("cc=necessary%2Canalytics").await;
    env2.load().await;
    env2.browser
        .script("document.getElementById('ins').href += '-consented'; return 0;")
        .await;
    let kmi = env2.activate(INS, Activation::Click, "ins-consented").await;
    assert_eq!(kmi, [ID], "with consent the ID should go");
    env2.browser.quit().await;

    // Global Privacy Control, as a browser that has it on reports it.
    let gpc = "Object.defineProperty(navigator, 'globalPrivacyControl', { value: true });";
    let env3 = env("", move |port| site_page(port, None, gpc), None).await;
    env3.load().await;
    env3.set_cookie(COOKIE).await;
    env3.load().await;
    let kmi = env3.activate(INS, Activation::Click, "ins").await;
    assert!(kmi.is_empty(), "GPC on, yet kmi {kmi:?}");
    env3.browser.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_nonce_policy_runs_the_script_without_a_violation() {
    let policy: &'static str = Box::leak(
        format!(
            "object-src 'none'; script-src 'nonce-{NONCE}' 'strict-dynamic' https: 'unsafe-inline'; \
             base-uri 'none'; require-trusted-types-for 'script'"
        )
        .into_boxed_str(),
    );
    let env = env("", |port| site_page(port, Some(NONCE), ""), Some(policy)).await;
    env.load().await;
    env.set_cookie(COOKIE).await;
    env.load().await;
    let ran = env.browser.script("return typeof window.KMIProxy;").await;
    assert_eq!(
        ran,
        json!("object"),
        "the script did not run under the nonce"
    );
    let kmi = env.activate(INS, Activation::Click, "ins").await;
    assert_eq!(kmi, [ID]);
    env.load().await;
    let violations = env.browser.script("return window.violations;").await;
    assert_eq!(violations, json!([]), "the browser reported violations");
    assert!(env
        .metrics()
        .await
        .contains("kmi_proxy_script_injections_total{result=\"file_nonce\"}"));
    env.browser.quit().await;
}

/// Not in the browser: the bytes. A policy that lets neither the file nor inline text run gets
/// nothing injected, and the page leaves the proxy exactly as the origin sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_forbids_the_script_gets_the_page_byte_for_byte() {
    let page = site_page(1, None, "");
    let served = page.clone();
    let site = origin()
        .route("/", move |_| {
            Reply::html(served.clone()).header(
                "content-security-policy",
                "default-src 'none'; script-src 'sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA='",
            )
        })
        .start()
        .await;
    let proxy = support::proxy(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[script]\ninject = true\n[[partner]]\nname = \"p\"\ndomains = [\"checkout.partner.test\"]\n",
        site.addr,
    )
    .await;
    let rsp = support::get(proxy.addr, "/")
        .header("accept", "text/html")
        .cookie(COOKIE)
        .send()
        .await;
    assert_eq!(support::body_of(rsp).await, page.as_bytes());
    let admin = proxy.admin_addr.expect("an admin listener");
    let metrics = support::text_of(support::get(admin, "/metrics").send().await).await;
    assert!(
        metrics.contains("kmi_proxy_script_injections_total{result=\"csp_forbids_script_src\"} 1"),
        "{metrics}"
    );
}

/// The script's decorator and the Rust `Decorator` agree: the same hrefs, against the same base,
/// with the same IDs, under `existing = "keep"` and `"replace"`, give the same URL (as the
/// browser resolves what each wrote) or both leave the link alone. The partners overlap where
/// the order of host matching decides (an exact host of a redirect partner inside another
/// partner's wildcard) and one has two `paths`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_script_and_the_rust_decorator_agree() {
    let page = origin()
        .route("/dir/page", |_| {
            Reply::html("<!DOCTYPE html><html><head><title>t</title></head><body></body></html>")
        })
        .start()
        .await;
    let browser = Browser::start(HOST_RULES).await;
    let base = format!("http://www.site.test:{}/dir/page?x=1", page.addr.port());
    browser.go(&base).await;
    let hrefs = [
        "https://checkout.partner.test",
        "https://checkout.partner.test/",
        "https://checkout.partner.test/?a=1",
        "https://checkout.partner.test/?",
        "https://checkout.partner.test/?a=1&",
        "https://checkout.partner.test/p#f?x",
        "https://checkout.partner.test/p?a#f",
        "https://checkout.partner.test/q?why?",
        "HTTPS://CHECKOUT.PARTNER.TEST:8443/P%20Q?B=%41",
        "https://checkout.partner.test/?kmi=old",
        "https://checkout.partner.test/?kmi=old&b=2&kmi=older",
        "https://checkout.partner.test/?k%6Di=old&b",
        "https://checkout.partner.test/?kmi",
        "https://checkout.partner.test/?a=1&kmi=x#frag",
        "https://checkout.partner.test./a",
        "//checkout.partner.test/a b",
        "https://checkout.partner.test/é?q=é",
        "https://x.y.partner.net/a",
        "https://partner.net/a",
        "https://shop.example/checkout/pay?x=1",
        "https://shop.example/other",
        "https://shop.example/cart",
        "https://shop.example/cart/",
        "https://shop.example/cartx",
        "https://out.partner.net/x",
        "https://a.out.partner.net/x",
        "https://go.redirect.test/land?x=1 2",
        "https://go.redirect.test/l!a'n(d)~*?q=!'()~*",
        "http://www.elsewhere.test/",
        "mailto:a@checkout.partner.test",
        "relative/path?kmi=1",
        "ftp://checkout.partner.test/",
    ];
    let ids = ["Zk9+aB/c3Q==", "bob@example.com", "é & ü ?#%", "a!'()*~b"];
    let base_url = Url::parse(&base).expect("the base");
    for existing in ["keep", "replace"] {
        let text = format!(
            r#"
upstream = "http://127.0.0.1:1"
[identity]
existing = "{existing}"
[script]
inject = true
[[partner]]
name = "checkout"
domains = ["checkout.partner.test", "*.partner.net"]
[[partner]]
name = "shop"
domains = ["shop.example"]
paths = ["/checkout/*", "/cart"]
[[partner]]
name = "out"
domains = ["go.redirect.test", "out.partner.net"]
mode = "redirect"
"#
        );
        let config = Config::parse(&text, "agreement").expect("a valid configuration");
        let script = Arc::clone(config.script.as_ref().expect("the script"));
        let mut cases = Vec::new();
        for href in hrefs {
            for id in ids {
                let visitor = VisitorId::new(id).expect("a valid ID");
                let rust = match config.decorator.decorate_link(
                    href,
                    &base_url,
                    encoding_rs::UTF_8,
                    Some(&visitor),
                ) {
                    Outcome::Decorated { href, .. } | Outcome::Redirected { href, .. } => {
                        Some(href)
                    }
                    _ => None,
                };
                cases.push(json!([href, id, rust]));
            }
        }
        let results = browser
            .script_with(
                "(0, eval)(arguments[0]);
                 return arguments[1].map(function (c) {
                   var resolved;
                   try { resolved = new URL(c[0], document.baseURI).href; } catch (e) { return [null, null]; }
                   var js = window.KMIProxy.href(resolved, c[1]);
                   var rust = c[2] === null ? null : new URL(c[2], document.baseURI).href;
                   return [js === undefined ? null : js, rust];
                 });",
                json!([script.js, cases]),
            )
            .await;
        let results = results.as_array().expect("an array of results");
        assert_eq!(results.len(), cases.len());
        for (case, result) in cases.iter().zip(results) {
            assert_eq!(
                result[0], result[1],
                "existing = {existing}: href {} with ID {}: script {} but Rust {}",
                case[0], case[1], result[0], result[1]
            );
        }
        let decorated = results.iter().filter(|r| r[1] != Value::Null).count();
        assert!(
            decorated > 40,
            "too few decorated cases to mean anything: {decorated}"
        );
    }
    browser.quit().await;
}

/// Not in the browser: a policy with a nonce is new with every response, so a page whose tag
/// carries it is never replayed from another response's recording, even when the page's bytes
/// are the same: each response's tag carries that response's own nonce. (Two things hold this:
/// the policy is part of the recording's key, and a nonce policy is never recorded; the test
/// fails only when both are gone, the second being what keeps such pages out of the cache.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_gets_its_own_nonce_even_where_pages_are_spliced() {
    let served = std::sync::atomic::AtomicUsize::new(0);
    let site = origin()
        .route("/", move |_| {
            let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Reply::html(
                "<!DOCTYPE html><html><head><title>t</title></head><body>same</body></html>",
            )
            .header(
                "content-security-policy",
                &format!("script-src 'nonce-r{n}'"),
            )
        })
        .start()
        .await;
    let proxy = support::proxy(
        "[script]\ninject = true\n[[partner]]\nname = \"p\"\ndomains = [\"checkout.partner.test\"]\n",
        site.addr,
    )
    .await;
    for n in 0..3 {
        let rsp = support::get(proxy.addr, "/")
            .header("accept", "text/html")
            .cookie(COOKIE)
            .send()
            .await;
        let body = support::text_of(rsp).await;
        assert!(
            body.contains(&format!("nonce=\"r{n}\"></script></head>")),
            "response {n} does not carry its own nonce: {body}"
        );
    }
}
