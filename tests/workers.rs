//! The proxy's worker threads (`limits.workers`): connections spread over them, each serves what
//! it accepted, and none outlives the proxy, whether it was stopped or dropped. A test binary of its
//! own: it counts the process's threads by name, which other tests' proxies would disturb.

mod support;

use std::time::{Duration, Instant};

use support::*;

const PAGE: &str = "<!DOCTYPE html><html><body>\
                    <a href=\"https://checkout.partner.com/pay\">Pay</a>\
                    <a href=\"https://www.elsewhere.test/\">Elsewhere</a></body></html>\n";

/// The tests count threads of the whole process: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// This process's threads named like the proxy's workers.
fn worker_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task lists this process's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("kmi-worker-"))
        .count()
}

/// Waits up to five seconds for the worker threads to number `want`.
async fn workers_become(want: usize) -> usize {
    let start = Instant::now();
    loop {
        let now = worker_threads();
        if now == want || start.elapsed() > Duration::from_secs(5) {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn workers_serve_many_connections_at_once_and_end_with_the_proxy() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    runtime().block_on(many_connections_at_once());
}

async fn many_connections_at_once() {
    assert_eq!(worker_threads(), 0, "no proxy runs yet");
    let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
    let proxy = proxy("[limits]\nworkers = 3\n", origin.addr).await;
    assert_eq!(
        workers_become(3).await,
        3,
        "limits.workers = 3 starts three"
    );

    // 24 keep-alive connections, opened at once, each served once and kept open: every visitor
    // gets their own ID, and more than one worker holds connections.
    let addr = proxy.addr;
    let visits = (0..24).map(|i| {
        tokio::spawn(async move {
            let mut conn = connect(addr).await;
            let rsp = conn
                .send(get(addr, "/").cookie(&format!("km_ai=visitor{i}")))
                .await;
            assert_eq!(rsp.status(), 200);
            (conn, text_of(rsp).await)
        })
    });
    let mut open = Vec::new();
    for (i, visit) in visits.enumerate() {
        let (conn, page) = within("a page through the workers", visit)
            .await
            .expect("the visit");
        assert!(
            page.contains(&format!(
                "https://checkout.partner.com/pay?kmi=visitor{i}\""
            )),
            "visitor {i} got their own ID: {page}"
        );
        assert!(
            page.contains("href=\"https://www.elsewhere.test/\""),
            "{page}"
        );
        open.push(conn);
    }
    let metrics = proxy.handle.metrics_text();
    let per_worker: Vec<u64> = (0..3)
        .map(|w| {
            let line = format!("kmi_proxy_worker_connections{{worker=\"{w}\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&line))
                .unwrap_or_else(|| panic!("no {line:?} in the metrics:\n{metrics}"))
                .trim()
                .parse()
                .expect("a count")
        })
        .collect();
    assert_eq!(per_worker.iter().sum::<u64>(), 24, "{per_worker:?}");
    // The kernel hashes each connection to one worker's socket: not an even split, but all 24
    // on one worker would mean the others never accept (a chance of 3^-23 otherwise).
    assert!(
        per_worker.iter().filter(|&&n| n > 0).count() >= 2,
        "24 connections spread over the workers: {per_worker:?}"
    );
    for conn in open {
        conn.close().await;
    }

    within("the proxy to stop", proxy.stop()).await;
    assert_eq!(
        worker_threads(),
        0,
        "stop() returns once every worker has ended"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no worker's socket still listens on {addr}"
    );
}

#[test]
fn dropping_a_running_proxy_ends_its_workers() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(worker_threads(), 0, "no proxy runs yet");
    let runtime = runtime();
    let addr = runtime.block_on(async {
        let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
        let proxy = proxy("[limits]\nworkers = 2\n", origin.addr).await;
        assert_eq!(workers_become(2).await, 2);
        let rsp = get(proxy.addr, "/").cookie("km_ai=abc").send().await;
        assert!(text_of(rsp).await.contains("pay?kmi=abc\""));
        let addr = proxy.addr;
        // Dropped without stop(), as when a test or an embedding program ends its runtime.
        drop(proxy);
        addr
    });
    // The server's task dies with its runtime; its workers must not outlive it.
    drop(runtime);
    let start = Instant::now();
    while worker_threads() > 0 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(worker_threads(), 0, "the workers ended with the runtime");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "no worker's socket still listens on {addr}"
    );
}

#[test]
fn an_address_another_program_or_proxy_listens_on_is_refused_with_its_name() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A plain listener, without SO_REUSEPORT: the workers' sockets may not join it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("its address");
    let text = config_text_for("http://127.0.0.1:9", "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    let config = kmi_proxy::config::Config::parse(&text, "test configuration").expect("valid");
    let started = runtime().block_on(kmi_proxy::server::spawn(config));
    let Err(e) = started else {
        panic!("the proxy started on {addr}, where another socket listens");
    };
    assert!(
        e.to_string()
            .contains(&format!("cannot listen for HTTP on {addr}")),
        "{e}"
    );
    assert_eq!(worker_threads(), 0, "no worker started");

    // Nor may a second proxy join a running one's sockets: with SO_REUSEPORT it could, and two
    // proxies (say, two configurations) would quietly split the traffic.
    runtime().block_on(async {
        let first = proxy("[limits]\nworkers = 2\n", addr).await;
        let text = config_text_for("http://127.0.0.1:9", "").replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", first.addr),
        );
        let config = kmi_proxy::config::Config::parse(&text, "test configuration").expect("valid");
        let Err(e) = kmi_proxy::server::spawn(config).await else {
            panic!(
                "a second proxy started on {}, where the first listens",
                first.addr
            );
        };
        assert!(
            e.to_string()
                .contains(&format!("cannot listen for HTTP on {}", first.addr)),
            "{e}"
        );
        first.stop().await;
    });
}
