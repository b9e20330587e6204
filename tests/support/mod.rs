//! Test harness: a real origin and the real proxy, both on `127.0.0.1:0`, and clients that speak
//! HTTP to them. Written to read like sentences:
//!
//! ```ignore
//! let origin = origin().route("/", |_| Reply::html(PAGE)).start().await;
//! let proxy = proxy("", origin.addr).await;
//! let rsp = get(proxy.addr, "/").cookie("km_ai=abc").send().await;
//! let page = body_of(rsp).await;
//! ```
//!
//! Nothing here sleeps to synchronise: ordering comes from channels, and every wait is bounded by
//! [`within`] so that a broken proxy fails a test instead of hanging it.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod nginx;
pub mod pki;
pub mod websocket;

pub use pki::{Ca, Leaf};

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, COOKIE, HOST};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kmi_proxy::config::Config;
use kmi_proxy::server::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upper bound on any single wait in a test. Generous: it only exists so that a proxy that
/// deadlocks or buffers fails clearly instead of hanging the test run.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Awaits `f`, or panics naming `what` once [`PATIENCE`] has passed.
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, f).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {PATIENCE:?}: {what}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies under the test's control
// ---------------------------------------------------------------------------------------------

/// A body whose parts the test sends one at a time through a [`Feed`]. Ends when the feed is
/// dropped (or [`Feed::finish`]ed); breaks off with an error on [`Feed::fail`].
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
}

/// The sending side of a [`ChannelBody`].
pub struct Feed {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
}

/// A body the test feeds part by part. Capacity one: a part waits until the previous one has
/// been taken by whoever reads the body.
pub fn channel() -> (Feed, ChannelBody) {
    let (tx, rx) = mpsc::channel(1);
    (Feed { tx }, ChannelBody { rx })
}

impl Feed {
    /// Sends one part; `false` when the reader has dropped the body.
    pub async fn send(&self, part: impl Into<Bytes>) -> bool {
        self.tx.send(Ok(part.into())).await.is_ok()
    }

    /// Sends one part, panicking if the reader is gone.
    pub async fn part(&self, part: impl Into<Bytes>) {
        assert!(
            within("sending a body part", self.send(part)).await,
            "the body's reader went away before this part could be sent"
        );
    }

    /// Ends the body normally.
    pub fn finish(self) {}

    /// Breaks the body off: the reader gets an error instead of an end.
    pub async fn fail(self) {
        let _ = self
            .tx
            .send(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the test broke the body off",
            )))
            .await;
    }

    /// Completes once the reader has dropped the body.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|part| part.map(|r| r.map(Frame::data)))
    }
}

fn boxed<B>(body: B) -> BoxBody<Bytes, BoxError>
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

// ---------------------------------------------------------------------------------------------
// The origin
// ---------------------------------------------------------------------------------------------

/// A request as the origin received it, body read to its end.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Set when the request body broke off instead of ending.
    pub body_error: Option<String>,
    /// Trailer fields that came after the body, if any.
    pub trailers: Option<HeaderMap>,
}

impl Received {
    /// The single value of a header, as text; panics if it is repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut all = self.headers.get_all(name).iter();
        let first = all.next()?;
        assert!(
            all.next().is_none(),
            "the origin got several {name} headers: {:?}",
            self.headers
        );
        Some(first.to_str().expect("a text header"))
    }
}

/// What the origin answers to one request.
pub struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: BoxBody<Bytes, BoxError>,
    /// Awaited before the response head is sent.
    hold: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Reply {
    pub fn status(code: u16) -> Reply {
        Reply {
            status: StatusCode::from_u16(code).expect("a valid status"),
            headers: HeaderMap::new(),
            body: boxed(Empty::new()),
            hold: None,
        }
    }

    pub fn ok() -> Reply {
        Reply::status(200)
    }

    /// 200, `text/html; charset=utf-8`, this page.
    pub fn html(page: impl Into<Bytes>) -> Reply {
        Reply::ok()
            .header("content-type", "text/html; charset=utf-8")
            .body(page)
    }

    /// A reply that never sends its head: the origin accepts the request and goes quiet.
    pub fn never() -> Reply {
        let mut reply = Reply::ok();
        reply.hold = Some(Box::pin(std::future::pending()));
        reply
    }

    /// Adds a header (repeating a name adds another field).
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.append(
            HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
            HeaderValue::from_str(value).expect("a header value"),
        );
        self
    }

    /// A complete body: hyper sends it with `Content-Length`.
    pub fn body(mut self, bytes: impl Into<Bytes>) -> Reply {
        self.body = boxed(Full::new(bytes.into()));
        self
    }

    /// A body sent as these frames, one after another, chunked.
    pub fn parts(mut self, parts: Vec<Bytes>) -> Reply {
        let frames = futures_util::stream::iter(
            parts.into_iter().map(|p| Ok::<_, BoxError>(Frame::data(p))),
        );
        self.body = boxed(http_body_util::StreamBody::new(frames));
        self
    }

    /// A body the test sends part by part (chunked, unless a `Content-Length` header is given).
    pub fn stream(mut self, body: ChannelBody) -> Reply {
        self.body = boxed(body);
        self
    }

    fn into_response(self) -> Response<BoxBody<Bytes, BoxError>> {
        let mut rsp = Response::new(self.body);
        *rsp.status_mut() = self.status;
        *rsp.headers_mut() = self.headers;
        rsp
    }
}

type Handler = Box<dyn FnMut(&Received) -> Reply + Send>;

/// Builds an origin: routes by exact path, each a closure from the received request to a reply.
#[derive(Default)]
pub struct OriginBuilder {
    routes: Vec<(String, Handler)>,
    /// Serve over TLS with this configuration (ALPN picks HTTP/2 or HTTP/1.1).
    tls: Option<Arc<rustls::ServerConfig>>,
}

pub fn origin() -> OriginBuilder {
    OriginBuilder::default()
}

/// A running origin. Every request it receives is recorded, in order, before it is answered.
pub struct Origin {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl OriginBuilder {
    pub fn route(
        mut self,
        path: &str,
        handler: impl FnMut(&Received) -> Reply + Send + 'static,
    ) -> OriginBuilder {
        self.routes.push((path.to_owned(), Box::new(handler)));
        self
    }

    /// Serves over TLS with this certificate, offering ALPN `h2` then `http/1.1`.
    pub fn over_tls(self, leaf: &Leaf) -> OriginBuilder {
        self.over_tls_offering(leaf, &["h2", "http/1.1"])
    }

    /// Serves over TLS with this certificate, offering these ALPN protocols.
    pub fn over_tls_offering(mut self, leaf: &Leaf, alpn: &[&str]) -> OriginBuilder {
        self.tls = Some(pki::server_config(leaf, alpn));
        self
    }

    /// Binds `127.0.0.1:0` and serves until the test ends: HTTP/1.1, or over TLS (see
    /// [`OriginBuilder::over_tls`]) HTTP/2 or HTTP/1.1 as the client's ALPN says.
    pub async fn start(self) -> Origin {
        let tls = self.tls.map(tokio_rustls::TlsAcceptor::from);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the origin");
        let addr = listener.local_addr().expect("the origin's address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let routes = Arc::new(Mutex::new(self.routes));
        let log = Arc::clone(&received);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let routes = Arc::clone(&routes);
                let log = Arc::clone(&log);
                let service = service_fn(move |req: Request<Incoming>| {
                    let routes = Arc::clone(&routes);
                    let log = Arc::clone(&log);
                    async move {
                        let (parts, body) = req.into_parts();
                        let (body, body_error, trailers) = match body.collect().await {
                            Ok(c) => {
                                let trailers = c.trailers().cloned();
                                (c.to_bytes(), None, trailers)
                            }
                            Err(e) => (Bytes::new(), Some(e.to_string()), None),
                        };
                        let received = Received {
                            method: parts.method,
                            uri: parts.uri,
                            version: parts.version,
                            headers: parts.headers,
                            body,
                            body_error,
                            trailers,
                        };
                        log.lock().unwrap().push(received.clone());
                        let reply = {
                            let mut routes = routes.lock().unwrap();
                            match routes
                                .iter_mut()
                                .find(|(path, _)| path == received.uri.path())
                            {
                                Some((_, handler)) => handler(&received),
                                None => Reply::status(404)
                                    .header("content-type", "text/plain")
                                    .body("no such route on the test origin\n"),
                            }
                        };
                        let mut reply = reply;
                        if let Some(hold) = reply.hold.take() {
                            hold.await;
                        }
                        Ok::<_, Infallible>(reply.into_response())
                    }
                });
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            // A client that rejects the certificate ends here, as it should.
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                        }
                    }
                });
            }
        });
        Origin { addr, received }
    }
}

impl Origin {
    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The only request received so far.
    pub fn the_request(&self) -> Received {
        let all = self.requests();
        assert_eq!(
            all.len(),
            1,
            "expected the origin to receive exactly one request, got {all:#?}"
        );
        all.into_iter().next().unwrap()
    }

    /// The most recent request received.
    pub fn last_request(&self) -> Received {
        self.requests()
            .pop()
            .expect("the origin has received no request")
    }
}

/// An origin that accepts each connection, reads the request and closes without a word.
pub async fn hanging_up_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            drop(stream);
        }
    });
    addr
}

/// An address nothing listens on: bound, then released.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    addr
}

// ---------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------

/// The configuration every test starts from: the proxy on a free port in front of `origin`,
/// partners `checkout.partner.com` and `*.partner.net`. `extra` goes after the top-level keys
/// and before the partner table, so it may hold top-level keys followed by tables.
pub fn config_text(extra: &str, origin: SocketAddr) -> String {
    config_text_for(&format!("http://{origin}"), extra)
}

/// [`config_text`] with any upstream URL (`https://...` for a TLS origin).
pub fn config_text_for(upstream: &str, extra: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
upstream = "{upstream}"
{extra}

[[partner]]
name = "checkout"
domains = ["checkout.partner.com", "*.partner.net"]
"#
    )
}

/// The configuration of [`config_text`], validated.
pub fn config(extra: &str, origin: SocketAddr) -> Config {
    let text = config_text(extra, origin);
    Config::parse(&text, "test configuration")
        .unwrap_or_else(|e| panic!("the test configuration is invalid: {e}\n{text}"))
}

/// Starts the real proxy (the same `server::spawn` the binary uses) in front of `origin`.
pub async fn proxy(extra: &str, origin: SocketAddr) -> Running {
    proxy_to(&format!("http://{origin}"), extra).await
}

/// Starts the real proxy in front of any upstream URL (`https://127.0.0.1:port` for a TLS origin).
pub async fn proxy_to(upstream: &str, extra: &str) -> Running {
    let text = config_text_for(upstream, extra);
    let config = Config::parse(&text, "test configuration")
        .unwrap_or_else(|e| panic!("the test configuration is invalid: {e}\n{text}"));
    kmi_proxy::server::spawn(config)
        .await
        .expect("start the proxy")
}

/// Configuration for the TLS listener with this default certificate: top-level `listen_tls`,
/// then the `[tls]` table, so it goes last in `extra` (before any other table).
pub fn tls_listener(leaf: &Leaf) -> String {
    format!(
        "listen_tls = \"127.0.0.1:0\"\n[tls]\ncert = {}\nkey = {}\n",
        toml_path(&leaf.cert_path),
        toml_path(&leaf.key_path)
    )
}

/// A path as a TOML string.
pub fn toml_path(path: &std::path::Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// How a [`Req`] reaches the proxy.
#[derive(Clone)]
enum Transport {
    /// HTTP/1.1 over plain TCP.
    Http1,
    /// HTTP/2 with prior knowledge over plain TCP (h2c).
    H2c,
    /// TLS; HTTP/2 if the server picks `h2` by ALPN, else HTTP/1.1.
    Tls(TlsClient),
}

/// A TLS client that trusts one CA and names one server (SNI and certificate check).
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    name: rustls_pki_types::ServerName<'static>,
}

/// What a TLS handshake settled, attached to each response sent over TLS (see [`negotiated`]).
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub alpn: Option<String>,
    /// The certificate the server presented (the leaf).
    pub certificate: Option<rustls_pki_types::CertificateDer<'static>>,
}

/// A TLS client trusting only `ca`, connecting with server name `name`, offering ALPN `h2` and
/// `http/1.1`.
pub fn tls_client(ca: &Ca, name: &str) -> TlsClient {
    TlsClient {
        config: pki::client_config(ca.roots(), &["h2", "http/1.1"]),
        name: rustls_pki_types::ServerName::try_from(name.to_owned()).expect("a server name"),
    }
}

impl TlsClient {
    /// Offers these ALPN protocols instead (none: the server picks HTTP/1.1).
    pub fn offering(mut self, alpn: &[&str]) -> TlsClient {
        let mut config = (*self.config).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        self.config = Arc::new(config);
        self
    }

    /// Connects and completes the handshake; the error if the handshake fails.
    pub async fn connect(
        &self,
        addr: SocketAddr,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        within("a TLS handshake", async {
            let tcp = TcpStream::connect(addr).await?;
            tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
                .connect(self.name.clone(), tcp)
                .await
        })
        .await
    }

    /// Connects, completes the handshake and says what it settled.
    pub async fn handshake(&self, addr: SocketAddr) -> io::Result<Negotiated> {
        self.connect(addr).await.map(|s| negotiated_on(&s))
    }
}

fn negotiated_on(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> Negotiated {
    let session = stream.get_ref().1;
    Negotiated {
        alpn: session
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        certificate: session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned()),
    }
}

/// What the TLS handshake of the connection a response came over settled.
pub fn negotiated<B>(rsp: &Response<B>) -> &Negotiated {
    rsp.extensions()
        .get::<Negotiated>()
        .expect("a response sent over TLS")
}

/// A request about to be sent with hyper's HTTP/1 client, on a connection of its own.
pub struct Req {
    addr: SocketAddr,
    request: Request<BoxBody<Bytes, BoxError>>,
    transport: Transport,
}

pub fn request(method: &str, addr: SocketAddr, path: &str) -> Req {
    let mut request = Request::new(boxed(Empty::new()));
    *request.method_mut() = Method::from_bytes(method.as_bytes()).expect("a method");
    *request.uri_mut() = path.parse().expect("a request path");
    // hyper's connection-level client sends no Host of its own; a browser would send this one.
    request.headers_mut().insert(
        HOST,
        HeaderValue::from_str(&addr.to_string()).expect("host"),
    );
    Req {
        addr,
        request,
        transport: Transport::Http1,
    }
}

pub fn get(addr: SocketAddr, path: &str) -> Req {
    request("GET", addr, path)
}

impl Req {
    /// Sets a header, replacing any earlier value (use [`Req::also`] to repeat a name).
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
            HeaderValue::from_str(value).expect("a header value"),
        );
        self
    }

    /// Adds another field with this name.
    pub fn also(mut self, name: &str, value: &str) -> Req {
        self.request.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
            HeaderValue::from_str(value).expect("a header value"),
        );
        self
    }

    /// Adds a `Cookie` header (a second call adds a second header).
    pub fn cookie(self, cookies: &str) -> Req {
        self.also(COOKIE.as_str(), cookies)
    }

    /// A complete body, sent with `Content-Length`.
    pub fn body(mut self, bytes: impl Into<Bytes>) -> Req {
        *self.request.body_mut() = boxed(Full::new(bytes.into()));
        self
    }

    /// A body the test sends part by part, chunked.
    pub fn stream(mut self, body: ChannelBody) -> Req {
        *self.request.body_mut() = boxed(body);
        self
    }

    /// Removes a header (every field with this name).
    pub fn without(mut self, name: &str) -> Req {
        self.request.headers_mut().remove(name);
        self
    }

    /// Sends with HTTP/2 prior knowledge over plain TCP (h2c). The `Host` header becomes the
    /// `:authority` (a browser sends no `Host` over HTTP/2).
    pub fn over_h2c(mut self) -> Req {
        self.transport = Transport::H2c;
        self
    }

    /// Sends over TLS with this client: HTTP/2 if ALPN settles on `h2`, else HTTP/1.1. The
    /// response carries what the handshake settled (see [`negotiated`]).
    pub fn over_tls(mut self, client: &TlsClient) -> Req {
        self.transport = Transport::Tls(client.clone());
        self
    }

    /// Sends the request on a connection of its own and waits for the response head.
    pub async fn send(self) -> Response<Incoming> {
        self.try_send().await.expect("a response from the proxy")
    }

    /// Sends the request and waits for the response head, or the error that came instead (the
    /// proxy closed the connection or reset the stream without a response).
    pub async fn try_send(self) -> Result<Response<Incoming>, hyper::Error> {
        let what = format!(
            "the response head to {} {}",
            self.request.method(),
            self.request.uri()
        );
        let Req {
            addr,
            request,
            transport,
        } = self;
        within(&what, async move {
            match transport {
                Transport::Http1 => {
                    let stream = TcpStream::connect(addr)
                        .await
                        .expect("connect to the proxy");
                    send_http1(stream, request).await
                }
                Transport::H2c => {
                    let stream = TcpStream::connect(addr)
                        .await
                        .expect("connect to the proxy");
                    send_http2(stream, "http", request).await
                }
                Transport::Tls(client) => {
                    let stream = client.connect(addr).await.expect("a TLS handshake");
                    let settled = negotiated_on(&stream);
                    let mut rsp = if settled.alpn.as_deref() == Some("h2") {
                        send_http2(stream, "https", request).await
                    } else {
                        send_http1(stream, request).await
                    }?;
                    rsp.extensions_mut().insert(settled);
                    Ok(rsp)
                }
            }
        })
        .await
    }
}

async fn send_http1<I>(
    io: I,
    request: Request<BoxBody<Bytes, BoxError>>,
) -> Result<Response<Incoming>, hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("HTTP/1 handshake");
    tokio::spawn(async move {
        // Errors on the connection surface through the response or its body.
        let _ = connection.await;
    });
    sender.send_request(request).await
}

/// HTTP/2 carries the authority in the request's URI (`:authority`), taken from `Host`.
async fn send_http2<I>(
    io: I,
    scheme: &str,
    mut request: Request<BoxBody<Bytes, BoxError>>,
) -> Result<Response<Incoming>, hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let authority = request
        .headers_mut()
        .remove(HOST)
        .map(|h| h.to_str().expect("a text Host").to_owned())
        .expect("a Host header to become :authority");
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    *request.uri_mut() = format!("{scheme}://{authority}{path}")
        .parse()
        .expect("an absolute URI");
    *request.version_mut() = Version::HTTP_2;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.send_request(request).await
}

/// The whole body, or the error it ended with.
pub async fn try_body_of(rsp: Response<Incoming>) -> Result<Bytes, hyper::Error> {
    within("the response body", rsp.into_body().collect())
        .await
        .map(|c| c.to_bytes())
}

/// The whole body; panics if it broke off.
pub async fn body_of(rsp: Response<Incoming>) -> Bytes {
    try_body_of(rsp).await.expect("a complete response body")
}

/// The whole body as UTF-8 text.
pub async fn text_of(rsp: Response<Incoming>) -> String {
    String::from_utf8(body_of(rsp).await.to_vec()).expect("a UTF-8 body")
}

/// The single value of a response header as text, if present.
pub fn header<'a, B>(rsp: &'a Response<B>, name: &str) -> Option<&'a str> {
    let mut all = rsp.headers().get_all(name).iter();
    let first = all.next()?;
    assert!(
        all.next().is_none(),
        "several {name} headers: {:?}",
        rsp.headers()
    );
    Some(first.to_str().expect("a text header"))
}

/// A response read off a raw socket: the head exactly as sent, and the rest of the bytes.
#[derive(Debug)]
pub struct RawResponse {
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {:?}", self.head))
    }

    /// Header lines as (name, value), in order, names as sent.
    pub fn fields(&self) -> Vec<(&str, &str)> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n, v.trim()))
            .collect()
    }

    /// Every value of a header, case-insensitive name.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.fields()
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    /// The single value of a header; panics if repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(all.len() <= 1, "several {name} fields in\n{}", self.head);
        all.first().copied()
    }

    /// The body with chunked framing removed; panics on bad framing.
    pub fn dechunked(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = &self.body[..];
        loop {
            let line_end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a chunk size line");
            let size_text = std::str::from_utf8(&rest[..line_end]).expect("chunk size");
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .expect("hex chunk size");
            rest = &rest[line_end + 2..];
            if size == 0 {
                return out;
            }
            out.extend_from_slice(&rest[..size]);
            assert_eq!(&rest[size..size + 2], b"\r\n", "chunk not followed by CRLF");
            rest = &rest[size + 2..];
        }
    }
}

/// Reads a response head (through its blank line) byte by byte, so that nothing after it is
/// consumed: what follows (a body, an upgraded protocol, the final response after a `100
/// Continue`) is still to be read from the stream.
pub async fn read_head(stream: &mut TcpStream) -> String {
    within("a response head", async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let byte = stream.read_u8().await.unwrap_or_else(|e| {
                panic!(
                    "the connection ended inside a response head ({e}): {:?}",
                    String::from_utf8_lossy(&head)
                )
            });
            head.push(byte);
        }
        String::from_utf8(head).expect("an ASCII response head")
    })
    .await
}

/// Sends these exact bytes on a new connection and reads until the server closes it, so the
/// request should say `Connection: close`.
pub async fn raw(addr: SocketAddr, request: &str) -> RawResponse {
    within("a raw response read to the end", async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write the request");
        let mut all = Vec::new();
        stream
            .read_to_end(&mut all)
            .await
            .expect("read the response");
        let split = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| {
                panic!(
                    "no complete response head in {:?}",
                    String::from_utf8_lossy(&all)
                )
            });
        RawResponse {
            head: String::from_utf8(all[..split].to_vec()).expect("an ASCII head"),
            body: all[split + 4..].to_vec(),
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*): binary content that is never mistaken for
/// text, reproducible from the seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Asserts two byte strings are equal without printing megabytes when they are not.
#[track_caller]
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if actual == expected {
        return;
    }
    let at = actual
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(actual.len().min(expected.len()));
    let window = |b: &[u8]| {
        String::from_utf8_lossy(&b[at.saturating_sub(40)..(at + 40).min(b.len())]).into_owned()
    };
    panic!(
        "{what}: {} bytes received, {} expected; first difference at byte {at}:\n  received …{:?}…\n  expected …{:?}…",
        actual.len(),
        expected.len(),
        window(actual),
        window(expected),
    );
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Operations: the admin listener, connections kept open, raw sockets
// ---------------------------------------------------------------------------------------------

/// `extra` for [`proxy`] that turns the admin listener on, on a free port.
pub const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";

/// The admin listener's address; panics if the proxy was started without one.
pub fn admin_of(proxy: &Running) -> SocketAddr {
    proxy
        .admin_addr
        .expect("the proxy was started with an [admin] table")
}

/// `GET /metrics` on the proxy's admin listener: the exposition text.
pub async fn metrics_of(proxy: &Running) -> String {
    let rsp = get(admin_of(proxy), "/metrics").send().await;
    assert_eq!(rsp.status(), 200, "GET /metrics");
    text_of(rsp).await
}

/// The value of one series in an exposition text, such as
/// `kmi_proxy_links_decorated_total{partner="checkout"}`; `None` when the series is absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        let value = value.split(' ').next().unwrap_or(value);
        Some(
            value
                .parse()
                .unwrap_or_else(|_| panic!("not a sample value in {line:?}")),
        )
    })
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<BoxBody<Bytes, BoxError>>),
    Http2(hyper::client::conn::http2::SendRequest<BoxBody<Bytes, BoxError>>),
}

/// A client connection the test keeps open across requests: HTTP/1.1 keep-alive, or HTTP/2 with
/// prior knowledge (h2c).
pub struct Conn {
    addr: SocketAddr,
    sender: Sender,
    ended: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

/// Opens an HTTP/1.1 connection; no request is sent yet.
pub async fn connect(addr: SocketAddr) -> Conn {
    within("an HTTP/1.1 connection to the proxy", async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1 handshake");
        Conn {
            addr,
            sender: Sender::Http1(sender),
            ended: tokio::spawn(connection),
        }
    })
    .await
}

/// Opens an HTTP/2 connection over plain TCP (prior knowledge, as `curl --http2-prior-knowledge`).
pub async fn connect_h2c(addr: SocketAddr) -> Conn {
    within("an h2c connection to the proxy", async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .expect("HTTP/2 handshake");
        Conn {
            addr,
            sender: Sender::Http2(sender),
            ended: tokio::spawn(connection),
        }
    })
    .await
}

impl Conn {
    /// Sends a request on this connection and waits for the response head.
    pub async fn send(&mut self, req: Req) -> Response<Incoming> {
        let mut request = req.request;
        let what = format!(
            "the response head to {} {} on a kept-open connection",
            request.method(),
            request.uri()
        );
        let addr = self.addr;
        within(&what, async {
            match &mut self.sender {
                Sender::Http1(sender) => {
                    sender.ready().await.expect("the connection is usable");
                    sender.send_request(request).await
                }
                Sender::Http2(sender) => {
                    // HTTP/2 names the site in `:authority`, from an absolute URI.
                    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
                    *request.uri_mut() = format!("http://{addr}{path}").parse().expect("a URI");
                    request.headers_mut().remove(HOST);
                    sender.ready().await.expect("the connection is usable");
                    sender.send_request(request).await
                }
            }
            .expect("a response from the proxy")
        })
        .await
    }

    /// Closes the connection from the client's side and waits until it is gone.
    pub async fn close(self) {
        drop(self.sender);
        let _ = within("the client's connection to close", self.ended).await;
    }

    /// Waits, with the connection left open on the client's side, until the proxy ends it;
    /// `Ok` for a clean close (end of stream, or GOAWAY on HTTP/2).
    pub async fn closed_by_proxy(self) -> Result<(), hyper::Error> {
        let Conn { sender, ended, .. } = self;
        let result = within("the proxy to close the connection", ended)
            .await
            .expect("the connection task");
        drop(sender);
        result
    }
}

/// Reads until the other side closes the connection (end of stream or reset): the bytes that
/// came, and the error the connection ended with, if any.
pub async fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, Option<io::Error>) {
    within("the proxy to close the connection", async {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return (all, None),
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) => return (all, Some(e)),
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

/// A directory of its own under the system temp dir, removed when dropped.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "kmi-proxy-test-{label}-{}-{}-{nanos}",
            std::process::id(),
            COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir(path)
    }

    /// Writes (or overwrites) a file in the directory.
    pub fn file(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write a temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `kmi-proxy` binary about to run with `--config <file>`.
pub struct BinaryBuilder {
    cmd: std::process::Command,
}

/// The real binary, with nothing inherited from the environment that could change its mind.
pub fn binary(config: &std::path::Path) -> BinaryBuilder {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kmi-proxy"));
    cmd.arg("--config")
        .arg(config)
        .env_remove("KMI_PROXY_CONFIG")
        .env_remove("KMI_PROXY_LISTEN")
        .env_remove("KMI_PROXY_UPSTREAM")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    BinaryBuilder { cmd }
}

impl BinaryBuilder {
    pub fn env(mut self, name: &str, value: &str) -> BinaryBuilder {
        self.cmd.env(name, value);
        self
    }

    /// Starts the process and waits for the log line saying where it listens: from then on it
    /// accepts connections.
    pub async fn start(mut self) -> Binary {
        let mut child = self.cmd.spawn().expect("start kmi-proxy");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let all = Arc::clone(&log);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                all.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut binary = Binary {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            pid: child.id(),
            child: Some(child),
            lines,
            log,
        };
        let line = binary
            .log_line("where it listens", |l| l.contains("listening on http://"))
            .await;
        let addr = line
            .split("listening on http://")
            .nth(1)
            .and_then(|rest| rest.split([' ', '"']).next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        binary.addr = addr;
        binary
    }
}

/// A running `kmi-proxy` process whose log (stderr) is read line by line as it comes. Killed
/// when dropped, so a failing test leaves nothing behind.
pub struct Binary {
    /// The plain listener, as the process logged it.
    pub addr: SocketAddr,
    pub pid: u32,
    child: Option<std::process::Child>,
    lines: mpsc::UnboundedReceiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Binary {
    /// Sends a signal (`"HUP"`, `"TERM"`) with `kill`.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid);
    }

    /// Waits for the next log line that satisfies `wanted` and returns it; panics with the log so
    /// far if the process ends or [`PATIENCE`] passes first.
    pub async fn log_line(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let lines = &mut self.lines;
        let found = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.recv().await {
                if wanted(&line) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            Ok(None) => panic!(
                "kmi-proxy closed its log without a line {what}; log:\n{}",
                self.log().join("\n")
            ),
            Err(_) => panic!(
                "timed out after {PATIENCE:?} waiting for a log line {what}; log:\n{}",
                self.log().join("\n")
            ),
        }
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the process to exit on its own.
    pub async fn exit_status(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the process is ours");
        let waited =
            tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || child.wait())).await;
        match waited {
            Ok(Ok(Ok(status))) => status,
            other => {
                let _ = std::process::Command::new("kill")
                    .arg("-KILL")
                    .arg(self.pid.to_string())
                    .status();
                panic!(
                    "kmi-proxy did not exit ({other:?}); log:\n{}",
                    self.log().join("\n")
                );
            }
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
