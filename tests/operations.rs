//! Operating the proxy: the admin endpoints and metrics, graceful shutdown, configuration reloads
//! (in-process, and by SIGHUP to the real binary), the log format, environment overrides, and the
//! timeouts and limits that protect it from slow or greedy clients and origins.
//!
//! Every test starts its own origin and proxy (or `kmi-proxy` process) on `127.0.0.1:0`. Timeouts
//! under test are a few hundred milliseconds; waits for them are bounded by `within()` and the
//! measured times are checked against the setting.

mod support;

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use kmi_proxy::config::{Config, Overrides};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A page with two links to the partner "checkout" (one exact domain, one wildcard), one to
/// another site and one relative link.
const PAGE: &str = r#"<!DOCTYPE html>
<html><head><title>Shop</title></head>
<body>
<a href="https://checkout.partner.com/pay?order=42">Pay</a>
<a href="https://eu.shop.partner.net/cart">Cart</a>
<a href="https://www.elsewhere.test/">Elsewhere</a>
<a href="/local">Local</a>
</body></html>
"#;

/// `PAGE` with the two "checkout" links decorated for `id`.
fn decorated(id: &str) -> String {
    PAGE.replace(
        r#""https://checkout.partner.com/pay?order=42""#,
        &format!(r#""https://checkout.partner.com/pay?order=42&amp;kmi={id}""#),
    )
    .replace(
        r#""https://eu.shop.partner.net/cart""#,
        &format!(r#""https://eu.shop.partner.net/cart?kmi={id}""#),
    )
}

/// `PAGE` as decorated when the only partner is `www.elsewhere.test` (see [`elsewhere_only`]).
fn decorated_elsewhere(id: &str) -> String {
    PAGE.replace(
        r#""https://www.elsewhere.test/""#,
        &format!(r#""https://www.elsewhere.test/?kmi={id}""#),
    )
}

/// A configuration file whose only partner is "elsewhere" (`www.elsewhere.test`): the page's
/// checkout links are no longer partner links, its third link is.
fn elsewhere_only(extra: &str, origin: std::net::SocketAddr) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
upstream = "http://{origin}"
{extra}

[[partner]]
name = "elsewhere"
domains = ["www.elsewhere.test"]
"#
    )
}

/// A route handler that answers the first request with `body`, fed by the test part by part.
fn streamed(content_type: &'static str, body: ChannelBody) -> impl FnMut(&Received) -> Reply {
    let mut body = Some(body);
    move |_| {
        Reply::ok()
            .header("content-type", content_type)
            .stream(body.take().expect("requested once"))
    }
}

/// The page the proxy (or binary) at `addr` serves to visitor `abc`.
async fn page_from(addr: std::net::SocketAddr) -> String {
    let rsp = get(addr, "/").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 200);
    text_of(rsp).await
}

/// Reads body frames until `needle` has arrived; returns everything read so far.
async fn read_until(body: &mut hyper::body::Incoming, needle: &str) -> Vec<u8> {
    let mut received = Vec::new();
    while !contains(&received, needle.as_bytes()) {
        let frame = within(&format!("{needle:?} in the response body"), body.frame())
            .await
            .unwrap_or_else(|| {
                panic!(
                    "the body ended before {needle:?}: {:?}",
                    String::from_utf8_lossy(&received)
                )
            })
            .expect("a body frame");
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
        }
    }
    received
}

/// The first part of a streamed page (a checkout link) and the rest (a checkout link, and a link
/// to `www.elsewhere.test`).
const FIRST: &str = "<!DOCTYPE html><html><body>\
                     <a href=\"https://checkout.partner.com/a\">A</a><p>Loading";
const REST: &str = " the rest</p><a href=\"https://x.partner.net/b\">B</a>\
                    <a href=\"https://www.elsewhere.test/c\">C</a></body></html>\n";

/// `FIRST` and `REST` as decorated with the "checkout" partner: links A and B, not C.
fn streamed_page_decorated(id: &str) -> String {
    format!("{FIRST}{REST}")
        .replace("/a\"", &format!("/a?kmi={id}\""))
        .replace("/b\"", &format!("/b?kmi={id}\""))
}

// 1. Admin endpoints and metrics ----------------------------------------------------------------

#[tokio::test]
async fn admin_endpoints_answer_and_metrics_count_each_kind_of_request_without_the_id() {
    const JSON: &str = r#"{"links":["https://checkout.partner.com/"]}"#;
    let origin = origin()
        .route("/", |_| Reply::html(PAGE))
        .route("/data.json", |_| {
            Reply::ok()
                .header("content-type", "application/json")
                .body(JSON)
        })
        .start()
        .await;
    let proxy = proxy(ADMIN, origin.addr).await;
    let admin = admin_of(&proxy);

    for probe in ["/healthz", "/readyz"] {
        let rsp = get(admin, probe).send().await;
        assert_eq!(rsp.status(), 200, "{probe}");
        body_of(rsp).await;
    }
    let rsp = get(admin, "/metrics").send().await;
    assert_eq!(rsp.status(), 200);
    let content_type = header(&rsp, "content-type").expect("a content type");
    assert!(
        content_type.starts_with("application/openmetrics-text")
            || content_type.starts_with("text/plain; version=0.0.4"),
        "not a Prometheus or OpenMetrics text type: {content_type}"
    );
    let text = text_of(rsp).await;
    // Labelled families appear with their first sample; the gauge is there from the start.
    assert!(
        text.contains("# TYPE kmi_proxy_open_connections gauge"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");

    // One request of each kind; every body read to its end, which is when metrics are recorded.
    const ID: &str = "visitor-7f3a9c";
    let (mut from_origin, mut to_client) = (0, 0);
    let page = body_of(
        get(proxy.addr, "/")
            .cookie(&format!("km_ai={ID}"))
            .send()
            .await,
    )
    .await;
    assert_eq!(page, decorated(ID));
    from_origin += PAGE.len();
    to_client += page.len();

    // The JSON goes over a connection kept open, so one connection is open while scraping.
    let mut kept_open = connect(proxy.addr).await;
    let json = body_of(
        kept_open
            .send(get(proxy.addr, "/data.json").cookie(&format!("km_ai={ID}")))
            .await,
    )
    .await;
    assert_eq!(json, JSON);
    from_origin += JSON.len();
    to_client += json.len();

    for cookie in [None, Some("km_ai=%00")] {
        let mut req = get(proxy.addr, "/");
        if let Some(c) = cookie {
            req = req.cookie(c);
        }
        let page = body_of(req.send().await).await;
        assert_eq!(page, PAGE, "cookie {cookie:?}");
        from_origin += PAGE.len();
        to_client += page.len();
    }

    // The origin goes down: a new configuration with nothing listening at the upstream address
    // (a reload gets a fresh connection pool, so the next request must connect).
    let down = config(ADMIN, closed_port().await);
    assert_eq!(proxy.handle.reload(down), Vec::<String>::new());
    let rsp = get(proxy.addr, "/")
        .cookie(&format!("km_ai={ID}"))
        .send()
        .await;
    assert_eq!(rsp.status(), 502);
    to_client += body_of(rsp).await.len();

    let m = metrics_of(&proxy).await;
    for (series, value) in [
        (r#"kmi_proxy_requests_total{method="GET",class="2xx"}"#, 4),
        (r#"kmi_proxy_requests_total{method="GET",class="5xx"}"#, 1),
        (r#"kmi_proxy_responses_total{reason="rewritten"}"#, 1),
        (r#"kmi_proxy_responses_total{reason="not_html"}"#, 1),
        (r#"kmi_proxy_responses_total{reason="no_id"}"#, 1),
        (r#"kmi_proxy_responses_total{reason="id_rejected"}"#, 1),
        (r#"kmi_proxy_responses_total{reason="error"}"#, 1),
        (r#"kmi_proxy_links_decorated_total{partner="checkout"}"#, 2),
        (
            r#"kmi_proxy_ids_rejected_total{reason="control_character"}"#,
            1,
        ),
        (r#"kmi_proxy_upstream_errors_total{kind="connect"}"#, 1),
        (r#"kmi_proxy_config_reloads_total{reason="ok"}"#, 1),
        ("kmi_proxy_request_duration_seconds_count", 5),
        (r#"kmi_proxy_request_duration_seconds_bucket{le="+Inf"}"#, 5),
        ("kmi_proxy_upstream_duration_seconds_count", 5),
        (
            r#"kmi_proxy_upstream_duration_seconds_bucket{le="+Inf"}"#,
            5,
        ),
        (
            r#"kmi_proxy_body_bytes_total{direction="upstream_to_proxy"}"#,
            from_origin,
        ),
        (
            r#"kmi_proxy_body_bytes_total{direction="proxy_to_client"}"#,
            to_client,
        ),
    ] {
        assert_eq!(metric(&m, series), Some(value as f64), "{series} in\n{m}");
    }
    for histogram in [
        "kmi_proxy_request_duration_seconds",
        "kmi_proxy_upstream_duration_seconds",
    ] {
        let buckets = m
            .lines()
            .filter(|l| l.starts_with(&format!("{histogram}_bucket{{le=")))
            .count();
        assert!(buckets > 2, "{histogram} has buckets:\n{m}");
        assert!(
            metric(&m, &format!("{histogram}_sum")).is_some(),
            "{histogram}_sum in\n{m}"
        );
    }
    let open = metric(&m, "kmi_proxy_open_connections").expect("the open connections gauge");
    assert!(open >= 1.0, "a connection is open while scraping:\n{m}");
    assert!(!m.contains("7f3a9c"), "the visitor ID is in /metrics:\n{m}");
    kept_open.close().await;
}

// 2. Graceful shutdown --------------------------------------------------------------------------

#[tokio::test]
async fn draining_fails_readiness_refuses_new_connections_and_lets_the_streaming_page_finish() {
    let (feed, body) = channel();
    let origin = origin()
        .route("/long", streamed("text/html", body))
        .start()
        .await;
    let proxy = proxy(ADMIN, origin.addr).await;
    let (addr, admin) = (proxy.addr, admin_of(&proxy));

    let rsp = get(addr, "/long").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 200);
    let mut body = rsp.into_body();
    feed.part(FIRST).await;
    let mut received = read_until(&mut body, "checkout.partner.com/a?kmi=abc").await;

    // Shut down (as SIGTERM does) while the page is still streaming.
    let stopping = tokio::spawn(proxy.stop());
    within("/readyz to fail once draining starts", async {
        loop {
            let rsp = get(admin, "/readyz").send().await;
            let status = rsp.status();
            body_of(rsp).await;
            if status == 503 {
                break;
            }
            assert_eq!(status, 200, "/readyz is ready or draining");
        }
    })
    .await;
    let refused = within("new connections to be refused", async {
        loop {
            // A connection that slipped into the backlog before the listener closed is dropped
            // with it, and while the workers' sockets close one by one a connection may be reset
            // by one that is closing; try again until the port itself refuses.
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() != std::io::ErrorKind::ConnectionReset => break e,
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        !stopping.is_finished(),
        "stop() returned while a response was still streaming"
    );

    // The origin finishes the page: the client gets all of it, decorated, and the drain ends.
    feed.part(REST).await;
    feed.finish();
    let rest = within("the rest of the page", body.collect())
        .await
        .expect("the rest of the page after shutdown began")
        .to_bytes();
    received.extend_from_slice(&rest);
    assert_eq!(
        String::from_utf8(received).unwrap(),
        streamed_page_decorated("abc")
    );
    within("stop() to return once the page is done", stopping)
        .await
        .expect("the stopping task");
}

#[tokio::test]
async fn stop_cuts_off_a_response_still_running_when_shutdown_timeout_ends() {
    let (feed, body) = channel();
    let origin = origin()
        .route("/long", streamed("text/html", body))
        .start()
        .await;
    let proxy = proxy("shutdown_timeout = \"300ms\"\n", origin.addr).await;
    let rsp = get(proxy.addr, "/long").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 200);
    let mut body = rsp.into_body();
    feed.part(FIRST).await;
    read_until(&mut body, "checkout.partner.com/a?kmi=abc").await;

    // The origin never finishes the page; shutdown waits shutdown_timeout for it, no longer.
    let started = Instant::now();
    within("stop() to return after shutdown_timeout", proxy.stop()).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(4),
        "stop() returned after {elapsed:?}, shutdown_timeout is 300ms"
    );
    // "How long in-flight requests may run after SIGTERM before connections are dropped": once
    // stop() has returned, the unfinished response is cut off, not left running.
    let bound = Duration::from_secs(2);
    match tokio::time::timeout(bound, body.collect()).await {
        Ok(Err(_)) => {}
        Ok(Ok(rest)) => panic!(
            "the unfinished page ended as if complete after the drain: {:?}",
            rest.to_bytes()
        ),
        Err(_) => panic!(
            "the connection was still open {bound:?} after stop() returned \
             (shutdown_timeout 300ms): the proxy keeps serving after it has stopped"
        ),
    }
    within(
        "the proxy to let go of the origin's response",
        feed.closed(),
    )
    .await;
}

// 3. Reload in-process --------------------------------------------------------------------------

#[tokio::test]
async fn reload_applies_to_new_requests_while_a_streaming_page_keeps_the_old_partners() {
    let (feed, body) = channel();
    let origin = origin()
        .route("/", |_| Reply::html(PAGE))
        .route("/long", streamed("text/html", body))
        .start()
        .await;
    let proxy = proxy("", origin.addr).await;

    let rsp = get(proxy.addr, "/long").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 200);
    let mut long = rsp.into_body();
    feed.part(FIRST).await;
    let mut received = read_until(&mut long, "checkout.partner.com/a?kmi=abc").await;

    let text = elsewhere_only("", origin.addr);
    let new = Config::parse(&text, "reloaded").expect("a valid configuration");
    let warnings = proxy.handle.reload(new);
    assert!(warnings.is_empty(), "{warnings:?}");

    // New requests use the new partner list.
    let page = text_of(get(proxy.addr, "/").cookie("km_ai=abc").send().await).await;
    assert_eq!(page, decorated_elsewhere("abc"));

    // The page that started before the reload ends under the old list: its later checkout link
    // is decorated, its link to the new partner is not.
    feed.part(REST).await;
    feed.finish();
    let rest = within("the rest of the page", long.collect())
        .await
        .expect("the rest of the page")
        .to_bytes();
    received.extend_from_slice(&rest);
    assert_eq!(
        String::from_utf8(received).unwrap(),
        streamed_page_decorated("abc")
    );

    // A setting that needs a restart is reported, not silently ignored.
    let moved = Overrides {
        listen: Some("127.0.0.1:1".into()),
        upstream: None,
    };
    let new = Config::parse_with(&text, "reloaded", &moved).expect("a valid configuration");
    let warnings = proxy.handle.reload(new);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("listen") && warnings[0].contains("restart"),
        "{warnings:?}"
    );
    // ... and the proxy goes on serving where it listens.
    let page = text_of(get(proxy.addr, "/").cookie("km_ai=abc").send().await).await;
    assert_eq!(page, decorated_elsewhere("abc"));
}

/// Every setting a reload cannot apply must be reported; none may be silently ignored.
#[tokio::test]
async fn reload_of_client_idle_applies_or_is_reported() {
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    let proxy = proxy("", origin.addr).await;
    // Served once, so the server is running with its first configuration.
    assert_eq!(page_from(proxy.addr).await, decorated("abc"));
    let warnings = proxy
        .handle
        .reload(config("[timeouts]\nclient_idle = \"300ms\"\n", origin.addr));
    if warnings.iter().any(|w| w.contains("client_idle")) {
        return;
    }
    // Not reported, so it must apply: a connection opened after the reload and left idle is
    // closed after about 300 ms (the default would be 60 s).
    let mut idle = TcpStream::connect(proxy.addr).await.expect("connect");
    let bound = Duration::from_secs(4);
    let closed = tokio::time::timeout(bound, read_until_closed(&mut idle)).await;
    assert!(
        closed.is_ok(),
        "reload returned {warnings:?} (nothing about client_idle), yet a new connection idle for \
         {bound:?} was not closed with client_idle = 300ms: the new value is silently ignored"
    );
}

// 4. The binary: signals, log format, environment -----------------------------------------------

#[tokio::test]
async fn sighup_with_a_good_file_changes_decoration() {
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    let dir = TempDir::new("sighup-good");
    let file = dir.file("config.toml", &config_text("", origin.addr));
    let mut kmi = binary(&file).start().await;
    assert_eq!(page_from(kmi.addr).await, decorated("abc"));

    dir.file("config.toml", &elsewhere_only("", origin.addr));
    kmi.signal("HUP");
    kmi.log_line("saying the configuration was reloaded", |l| {
        l.contains("configuration reloaded") && l.contains(file.to_str().unwrap())
    })
    .await;
    assert_eq!(page_from(kmi.addr).await, decorated_elsewhere("abc"));
}

#[tokio::test]
async fn sighup_with_a_bad_file_keeps_the_running_configuration_and_logs_the_file() {
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    let dir = TempDir::new("sighup-bad");
    let file = dir.file("config.toml", &config_text("", origin.addr));
    let mut kmi = binary(&file).start().await;
    assert_eq!(page_from(kmi.addr).await, decorated("abc"));

    dir.file(
        "config.toml",
        &elsewhere_only("[timeouts]\nclient_idle = \"soon\"\n", origin.addr),
    );
    kmi.signal("HUP");
    let line = kmi
        .log_line("refusing the reload", |l| l.contains("reload refused"))
        .await;
    assert!(
        line.contains("ERROR") && line.contains(file.to_str().unwrap()),
        "the error names the file: {line}"
    );
    // Still the old partner list.
    assert_eq!(page_from(kmi.addr).await, decorated("abc"));
}

#[tokio::test]
async fn sigterm_during_a_streaming_page_lets_it_finish_and_exits_0() {
    let (feed, body) = channel();
    let origin = origin()
        .route("/long", streamed("text/html", body))
        .start()
        .await;
    let dir = TempDir::new("sigterm");
    let file = dir.file("config.toml", &config_text("", origin.addr));
    let mut kmi = binary(&file).start().await;

    let rsp = get(kmi.addr, "/long").cookie("km_ai=abc").send().await;
    assert_eq!(rsp.status(), 200);
    let mut body = rsp.into_body();
    feed.part(FIRST).await;
    let mut received = read_until(&mut body, "checkout.partner.com/a?kmi=abc").await;

    kmi.signal("TERM");
    kmi.log_line("saying it is shutting down", |l| {
        l.contains("shutting down")
    })
    .await;
    feed.part(REST).await;
    feed.finish();
    let rest = within("the rest of the page", body.collect())
        .await
        .expect("the rest of the page after SIGTERM")
        .to_bytes();
    received.extend_from_slice(&rest);
    assert_eq!(
        String::from_utf8(received).unwrap(),
        streamed_page_decorated("abc")
    );
    let status = kmi.exit_status().await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test]
async fn sigterm_with_a_response_that_never_ends_exits_after_shutdown_timeout() {
    let (feed, body) = channel();
    let origin = origin()
        .route("/long", streamed("text/html", body))
        .start()
        .await;
    let dir = TempDir::new("sigterm-timeout");
    let file = dir.file(
        "config.toml",
        &config_text("shutdown_timeout = \"300ms\"\n", origin.addr),
    );
    let mut kmi = binary(&file).start().await;
    let rsp = get(kmi.addr, "/long").cookie("km_ai=abc").send().await;
    let mut body = rsp.into_body();
    feed.part(FIRST).await;
    read_until(&mut body, "checkout.partner.com/a?kmi=abc").await;

    let started = Instant::now();
    kmi.signal("TERM");
    kmi.log_line("warning that the shutdown timeout was reached", |l| {
        l.contains("shutdown timeout reached")
    })
    .await;
    let status = kmi.exit_status().await;
    let elapsed = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(4),
        "exited {elapsed:?} after SIGTERM, shutdown_timeout is 300ms"
    );
    assert!(
        within("the cut-off page to end", body.collect())
            .await
            .is_err(),
        "the cut-off page must not look complete"
    );
    drop(feed);
}

/// Asks `kmi` for the page as visitor `visitor-7f3a9c`, checks it came back decorated, and
/// returns the access line the request logged.
async fn access_line_of_a_decorated_request(kmi: &mut Binary) -> String {
    let rsp = get(kmi.addr, "/")
        .cookie("km_ai=visitor-7f3a9c")
        .send()
        .await;
    assert_eq!(text_of(rsp).await, decorated("visitor-7f3a9c"));
    kmi.log_line("from the access log", |l| l.contains("kmi_proxy::access"))
        .await
}

/// A log that goes to a file or a pipe (as under systemd, Docker or a log shipper) carries no
/// terminal colour codes, though nobody set `NO_COLOR`.
#[tokio::test]
async fn a_log_read_from_a_pipe_has_no_colour_codes() {
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    let dir = TempDir::new("plain-log");
    let file = dir.file("config.toml", &config_text("", origin.addr));
    let mut kmi = binary(&file).env("NO_COLOR", "").start().await;
    let line = access_line_of_a_decorated_request(&mut kmi).await;
    assert!(line.contains("status=200"), "{line}");
    for line in kmi.log() {
        assert!(!line.contains('\x1b'), "an escape code in {line:?}");
    }
}

#[tokio::test]
async fn json_log_format_writes_access_lines_as_json_without_the_visitor_id() {
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    let dir = TempDir::new("json-log");
    let file = dir.file(
        "config.toml",
        &config_text("[log]\nformat = \"json\"\n", origin.addr),
    );
    let mut kmi = binary(&file).start().await;
    let line = access_line_of_a_decorated_request(&mut kmi).await;
    assert!(
        line.starts_with('{') && line.ends_with('}'),
        "a JSON object: {line}"
    );
    for field in [
        r#""status":200"#,
        r#""method":"GET""#,
        r#""links_decorated":2"#,
        r#""rewrite":"rewritten""#,
    ] {
        assert!(line.contains(field), "{field} in {line}");
    }
    for line in kmi.log() {
        assert!(line.starts_with('{'), "every line is JSON: {line}");
        assert!(!line.contains("7f3a9c"), "the visitor ID is logged: {line}");
    }
}

#[tokio::test]
async fn environment_overrides_listen_and_upstream_of_the_file() {
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    let nowhere = closed_port().await;
    let listen = closed_port().await;
    let dir = TempDir::new("env");
    let file = dir.file(
        "config.toml",
        &format!(
            "listen = \"127.0.0.1:1\"\nupstream = \"http://{nowhere}\"\n\n\
             [[partner]]\nname = \"checkout\"\ndomains = [\"checkout.partner.com\", \"*.partner.net\"]\n"
        ),
    );
    let kmi = binary(&file)
        .env("KMI_PROXY_LISTEN", &listen.to_string())
        .env("KMI_PROXY_UPSTREAM", &format!("http://{}", origin.addr))
        .start()
        .await;
    assert_eq!(kmi.addr, listen, "listening where KMI_PROXY_LISTEN says");
    // The page comes from the origin KMI_PROXY_UPSTREAM names, not the file's dead upstream.
    assert_eq!(page_from(listen).await, decorated("abc"));
    assert_eq!(origin.requests().len(), 1);
}

// 5. Slow clients -------------------------------------------------------------------------------

#[tokio::test]
async fn slow_request_head_is_cut_off_after_client_header_while_others_are_served() {
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    let proxy = proxy("[timeouts]\nclient_header = \"300ms\"\n", origin.addr).await;

    let mut slow = TcpStream::connect(proxy.addr).await.expect("connect");
    let started = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send half a head");

    // Meanwhile another client is served.
    assert_eq!(page_from(proxy.addr).await, decorated("abc"));

    let (bytes, _) = read_until_closed(&mut slow).await;
    let elapsed = started.elapsed();
    assert!(
        !contains(&bytes, b"200 OK"),
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(
        elapsed >= Duration::from_millis(250),
        "closed before client_header: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "closed long after client_header (300ms): {elapsed:?}"
    );
}

/// The other slowloris: connect and send nothing at all. `client_header` is documented as "a
/// client must send a request's headers within this (slowloris defence)"; zero bytes are not a
/// request head within 300 ms either.
#[tokio::test]
async fn connection_that_sends_nothing_is_cut_off_after_client_header() {
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    // client_idle is left at its default (60 s): only the header timer can close it in time.
    let proxy = proxy("[timeouts]\nclient_header = \"300ms\"\n", origin.addr).await;
    let mut silent = TcpStream::connect(proxy.addr).await.expect("connect");
    let started = Instant::now();
    let bound = Duration::from_secs(4);
    let Ok((bytes, _)) = tokio::time::timeout(bound, read_until_closed(&mut silent)).await else {
        panic!(
            "a connection that sent nothing was still open after {bound:?}; \
             client_header is 300ms"
        );
    };
    assert!(
        bytes.is_empty() || bytes.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before client_header: {:?}",
        started.elapsed()
    );
    // The proxy serves the next client as usual.
    assert_eq!(page_from(proxy.addr).await, decorated("abc"));
}

// 6. Idle connections ---------------------------------------------------------------------------

#[tokio::test]
async fn idle_connections_are_closed_after_client_idle_on_http1_and_http2() {
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    // The header timer (which also bounds an HTTP/1.1 wait for the next request) is set far above
    // client_idle, so a close around 300 ms is client_idle's doing.
    let proxy = proxy(
        "[timeouts]\nclient_idle = \"300ms\"\nclient_header = \"8s\"\n",
        origin.addr,
    )
    .await;
    let soon_enough = Duration::from_secs(4);

    // A connection that never sends a request.
    let mut silent = TcpStream::connect(proxy.addr).await.expect("connect");
    let started = Instant::now();
    let (bytes, _) = read_until_closed(&mut silent).await;
    let elapsed = started.elapsed();
    assert!(bytes.is_empty(), "{:?}", String::from_utf8_lossy(&bytes));
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < soon_enough,
        "HTTP/1.1 without a request closed after {elapsed:?}, client_idle is 300ms"
    );

    // HTTP/1.1 and HTTP/2 keep-alive connections after one request each. The proxy's idle clock
    // starts as the response body ends, a moment before the client has read all of it.
    for protocol in ["HTTP/1.1", "HTTP/2"] {
        let mut conn = match protocol {
            "HTTP/1.1" => connect(proxy.addr).await,
            _ => connect_h2c(proxy.addr).await,
        };
        let rsp = conn.send(get(proxy.addr, "/").cookie("km_ai=abc")).await;
        let version = rsp.version();
        let expected = match protocol {
            "HTTP/1.1" => http::Version::HTTP_11,
            _ => http::Version::HTTP_2,
        };
        assert_eq!(version, expected, "{protocol}");
        assert_eq!(text_of(rsp).await, decorated("abc"), "{protocol}");
        let started = Instant::now();
        let ended = conn.closed_by_proxy().await;
        let elapsed = started.elapsed();
        assert!(
            ended.is_ok(),
            "{protocol} ({version:?}) closed cleanly: {ended:?}"
        );
        assert!(
            elapsed >= Duration::from_millis(250) && elapsed < soon_enough,
            "{protocol} ({version:?}) idle connection closed after {elapsed:?}, client_idle is 300ms"
        );
    }
}

// 7. A stalled origin body ----------------------------------------------------------------------

#[tokio::test]
async fn stalled_origin_body_ends_the_response_in_an_error_after_upstream_body_idle() {
    let (page_feed, page) = channel();
    let (blob_feed, blob) = channel();
    let origin = origin()
        .route("/page", streamed("text/html", page))
        .route("/blob", streamed("application/octet-stream", blob))
        .start()
        .await;
    let proxy = proxy(
        &format!("[timeouts]\nupstream_body_idle = \"300ms\"\n{ADMIN}"),
        origin.addr,
    )
    .await;

    for (n, (path, feed)) in [("/page", &page_feed), ("/blob", &blob_feed)]
        .into_iter()
        .enumerate()
    {
        let rsp = get(proxy.addr, path).cookie("km_ai=abc").send().await;
        assert_eq!(rsp.status(), 200, "{path}");
        let started = Instant::now();
        // Half a page, then the origin goes quiet (the feed stays open: no end, no error).
        feed.part(FIRST).await;
        let result = try_body_of(rsp).await;
        let elapsed = started.elapsed();
        assert!(
            result.is_err(),
            "{path}: a stalled origin body ended as if complete: {result:?}"
        );
        assert!(
            elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(4),
            "{path}: the response broke off after {elapsed:?}, upstream_body_idle is 300ms"
        );
        let m = metrics_of(&proxy).await;
        assert_eq!(
            metric(&m, r#"kmi_proxy_upstream_errors_total{kind="body_idle"}"#),
            Some((n + 1) as f64),
            "after {path}:\n{m}"
        );
    }
    drop((page_feed, blob_feed));
}

// 8. The upstream response timeout --------------------------------------------------------------

#[tokio::test]
async fn upstream_response_timeout_starts_after_a_slow_upload_and_catches_a_silent_origin() {
    let origin = origin()
        .route("/upload", |req| {
            Reply::ok()
                .header("content-type", "text/plain")
                .body(format!("{} bytes\n", req.body.len()))
        })
        .route("/silent", |_| Reply::never())
        .start()
        .await;
    let proxy = proxy("[timeouts]\nupstream_response = \"300ms\"\n", origin.addr).await;

    // The upload takes longer than upstream_response; the origin answers as soon as it has it.
    let (feed, body) = channel();
    let started = Instant::now();
    let uploader = tokio::spawn(async move {
        for part in ["one,", "two,", "three,", "four"] {
            feed.part(part).await;
            // The client's pace, which is what this test is about (not synchronisation).
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        feed.finish();
    });
    let rsp = request("POST", proxy.addr, "/upload")
        .header("content-type", "text/plain")
        .stream(body)
        .send()
        .await;
    assert_eq!(
        rsp.status(),
        200,
        "a slow upload to a fast origin is not a 504"
    );
    assert_eq!(text_of(rsp).await, "18 bytes\n");
    assert!(started.elapsed() >= Duration::from_millis(600));
    uploader.await.unwrap();

    let started = Instant::now();
    let rsp = get(proxy.addr, "/silent").send().await;
    assert_eq!(rsp.status(), 504);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(4),
        "504 after {elapsed:?}, upstream_response is 300ms"
    );
}

// 9. The connection cap -------------------------------------------------------------------------

#[tokio::test]
async fn connection_past_max_connections_waits_until_another_closes() {
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    let proxy = proxy(
        &format!("[limits]\nmax_connections = 2\n{ADMIN}"),
        origin.addr,
    )
    .await;

    // Two keep-alive connections, each served once, so both hold a place.
    let mut first = connect(proxy.addr).await;
    let mut second = connect(proxy.addr).await;
    for conn in [&mut first, &mut second] {
        let rsp = conn.send(get(proxy.addr, "/").cookie("km_ai=abc")).await;
        assert_eq!(text_of(rsp).await, decorated("abc"));
    }

    let addr = proxy.addr;
    let mut third = tokio::spawn(async move {
        let mut conn = connect(addr).await;
        let rsp = conn.send(get(addr, "/").cookie("km_ai=abc")).await;
        let page = text_of(rsp).await;
        conn.close().await;
        page
    });
    // The one fixed wait in this file: it checks that the third request is "not served yet";
    // no event could show that something did not happen.
    let early = tokio::time::timeout(Duration::from_millis(500), &mut third).await;
    assert!(
        early.is_err(),
        "a third connection was served while max_connections = 2 were open: {early:?}"
    );

    first.close().await;
    let page = within(
        "the third connection to be served once the first closed",
        third,
    )
    .await
    .expect("the third client");
    assert_eq!(page, decorated("abc"));

    second.close().await;
    // The proxy is still up and serving.
    assert_eq!(page_from(proxy.addr).await, decorated("abc"));
    let rsp = get(admin_of(&proxy), "/healthz").send().await;
    assert_eq!(rsp.status(), 200);
}

// 10. The request head size limit ---------------------------------------------------------------

#[tokio::test]
async fn oversized_request_head_gets_431_and_the_next_connection_is_served() {
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    let proxy = proxy("[limits]\nmax_header_bytes = 8192\n", origin.addr).await;

    let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: www.site.test\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    // The proxy may answer and close before reading all of it; a failed write is fine.
    let _ = client.write_all(big.as_bytes()).await;
    let (bytes, _) = read_until_closed(&mut client).await;
    assert!(
        bytes.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(
        origin.requests().is_empty(),
        "an oversized head reached the origin"
    );

    assert_eq!(page_from(proxy.addr).await, decorated("abc"));
}
