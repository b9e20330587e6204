//! WebSocket tunnels are accounted like the connections they came from: counted in
//! `open_connections` and under `max_connections` until they close, closed when idle for
//! `timeouts.tunnel_idle`, drained (not cut) on shutdown until `shutdown_timeout`, forwarded with
//! the same header rules as any request, and logged with their bytes each way when they close.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::websocket::echo_origin;
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn open_tunnel(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> Ws {
    let stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to the proxy");
    let mut request = http::Request::builder()
        .uri("ws://www.site.test/chat")
        .header("host", "www.site.test")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        );
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (ws, rsp) = within(
        "the WebSocket handshake through the proxy",
        tokio_tungstenite::client_async(request.body(()).unwrap(), MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("a WebSocket handshake");
    assert_eq!(rsp.status(), 101);
    ws
}

async fn echo(ws: &mut Ws, text: &str) {
    within("sending", ws.send(Message::text(text)))
        .await
        .expect("send");
    let echoed = within("the echo", ws.next())
        .await
        .expect("the tunnel ended before the echo")
        .expect("a message");
    assert_eq!(echoed, Message::text(text));
}

/// Waits until the tunnel is closed from the proxy's side: the stream ends or errors.
async fn closed(ws: &mut Ws, what: &str) {
    within(what, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(m)) if m.is_close() => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
}

async fn open_connections(proxy: &kmi_proxy::server::Running) -> f64 {
    let m = metrics_of(proxy).await;
    metric(&m, "kmi_proxy_open_connections").expect("the open_connections gauge")
}

/// Polls the gauge until it reads `want` (each read is an event, not a sleep to synchronise).
async fn gauge_reaches(proxy: &kmi_proxy::server::Running, want: f64) {
    within(&format!("open_connections to reach {want}"), async {
        while open_connections(proxy).await != want {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_tunnel_counts_as_an_open_connection_until_it_closes() {
    let echo_origin = echo_origin().await;
    let proxy = proxy(ADMIN, echo_origin.addr).await;
    let mut ws = open_tunnel(proxy.addr, &[]).await;
    echo(&mut ws, "hello").await;
    // The HTTP connection has handed its socket to the tunnel; the tunnel holds its place.
    assert_eq!(open_connections(&proxy).await, 1.0);
    within("closing", ws.close(None)).await.expect("close");
    gauge_reaches(&proxy, 0.0).await;
}

#[tokio::test]
async fn a_tunnel_holds_its_place_under_max_connections() {
    let echo_origin = echo_origin().await;
    let proxy = proxy(
        &format!("[limits]\nmax_connections = 1\n{ADMIN}"),
        echo_origin.addr,
    )
    .await;
    let mut ws = open_tunnel(proxy.addr, &[]).await;
    echo(&mut ws, "holding the only place").await;
    let addr = proxy.addr;
    let mut second = tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (ws, _) = tokio_tungstenite::client_async("ws://www.site.test/chat", stream)
            .await
            .expect("a handshake once the place is free");
        ws
    });
    // The one fixed wait in this file: "not served yet" has no event to wait for.
    let early = tokio::time::timeout(Duration::from_millis(500), &mut second).await;
    assert!(
        early.is_err(),
        "a second connection was served while a tunnel held max_connections = 1"
    );
    within("closing", ws.close(None)).await.expect("close");
    let mut ws2 = within("the second connection to be served", second)
        .await
        .expect("the second client");
    within("sending", ws2.send(Message::text("now")))
        .await
        .expect("send");
    let _ = within("closing", ws2.close(None)).await;
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_tunnel_idle_and_a_busy_one_is_not() {
    let echo_origin = echo_origin().await;
    let proxy = proxy(
        &format!("[timeouts]\ntunnel_idle = \"400ms\"\n{ADMIN}"),
        echo_origin.addr,
    )
    .await;
    let mut ws = open_tunnel(proxy.addr, &[]).await;
    // Busy for three times the idle limit: each message resets it.
    for i in 0..6 {
        echo(&mut ws, &format!("message {i}")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Quiet: the proxy closes it.
    closed(&mut ws, "the idle tunnel to be closed").await;
    gauge_reaches(&proxy, 0.0).await;
}

#[tokio::test]
async fn shutdown_drains_a_tunnel_until_shutdown_timeout_then_closes_it() {
    let echo_origin = echo_origin().await;
    let proxy = proxy("shutdown_timeout = \"1500ms\"", echo_origin.addr).await;
    let mut ws = open_tunnel(proxy.addr, &[]).await;
    echo(&mut ws, "before").await;
    let mut stopping = tokio::spawn(proxy.stop());
    // The proxy is draining: the tunnel still works, and the stop waits for it.
    echo(&mut ws, "while draining").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut stopping)
            .await
            .is_err(),
        "the proxy stopped at once with a tunnel open"
    );
    within("the stop to finish after shutdown_timeout", stopping)
        .await
        .expect("the stop");
    closed(&mut ws, "the tunnel to be closed at the end of the drain").await;
}

#[tokio::test]
async fn the_handshake_gets_the_forwarding_rules_of_any_request() {
    let echo_origin = echo_origin().await;
    let proxy = proxy(
        "[identity]\nrequest_header = \"X-KM-Identity\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n",
        echo_origin.addr,
    )
    .await;
    let mut ws = open_tunnel(
        proxy.addr,
        &[
            ("x-km-identity", "forged"),
            ("x-forwarded-for", "203.0.113.9"),
        ],
    )
    .await;
    echo(&mut ws, "x").await;
    let _ = within("closing", ws.close(None)).await;
    let handshake = &echo_origin.handshakes()[0];
    assert!(!handshake.contains_key("x-km-identity"), "{handshake:?}");
    assert_eq!(handshake["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert!(
        !handshake.contains_key("via"),
        "no Via upstream by default (via_upstream = false)"
    );
    assert_eq!(handshake["x-forwarded-host"], "www.site.test");
    assert_eq!(handshake["host"], "www.site.test");
}

#[tokio::test]
async fn a_closed_tunnel_writes_one_access_line_with_its_bytes_each_way() {
    let echo_origin = echo_origin().await;
    let dir = TempDir::new("tunnel-log");
    let file = dir.file("config.toml", &config_text("", echo_origin.addr));
    let mut kmi = binary(&file).start().await;
    let mut ws = open_tunnel(kmi.addr, &[]).await;
    echo(&mut ws, &"x".repeat(1000)).await;
    within("closing", ws.close(None)).await.expect("close");
    let line = kmi
        .log_line("the tunnel's access line", |l| {
            l.contains("kmi_proxy::access") && l.contains("status=101")
        })
        .await;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {line}"))
            .trim_matches('"')
            .to_owned()
    };
    assert_eq!(field("rewrite"), "upgrade", "{line}");
    assert_eq!(field("body"), "complete", "{line}");
    // A 1000-byte text frame each way (masked from the client, plain from the origin), and
    // the close handshake.
    let up: u64 = field("tunnel_up").parse().unwrap();
    let down: u64 = field("tunnel_down").parse().unwrap();
    assert!((1000..1100).contains(&up), "{line}");
    assert!((1000..1100).contains(&down), "{line}");
    assert_eq!(
        kmi.log()
            .iter()
            .filter(|l| l.contains("kmi_proxy::access"))
            .count(),
        1,
        "one line per tunnel, none for its 101 before it closed"
    );
}
