//! The pooled client to the origin. HTTP/1.1, or HTTP/2 when an `https://` origin offers it over
//! ALPN. Every connection goes to the configured upstream whatever authority a request carries,
//! so a request can name the site's own host (in `Host` for HTTP/1.1, `:authority` for HTTP/2)
//! while the socket goes to the origin server.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::Upstream;
use crate::tls;

/// How long an idle pooled connection to the origin is kept. Below the usual origin keep-alive
/// timeouts (nginx 75 s, Apache 5 s) so the proxy rarely reuses a connection the origin is closing.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub type Error = hyper_util::client::legacy::Error;

/// The most an HTTP/1.1 origin connection buffers of a response (hyper's default is 400 KiB).
pub const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

thread_local! {
    /// Which of the server's workers this thread is (`server::Workers`); 0 on any other thread.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as worker `index`: its requests use that worker's origin client.
pub fn serve_as_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// One origin client per worker: a worker's requests reuse only the connections it opened, whose
/// tasks run on its own runtime, so a response never crosses threads on its way through.
pub struct Origins(Vec<Origin>);

impl Origins {
    /// `workers` clients with pools of their own, dialling through one connector (its TLS
    /// configuration is made once).
    pub fn new(upstream: &Upstream, connect_timeout: Duration, workers: usize) -> Origins {
        let connector = FixedDestination::new(upstream, connect_timeout);
        Origins(
            (0..workers.max(1))
                .map(|_| Origin::new(connector.clone()))
                .collect(),
        )
    }

    /// This thread's worker's client.
    pub fn here(&self) -> &Origin {
        &self.0[WORKER.with(|w| w.get()) % self.0.len()]
    }
}

/// The origin client of one worker (see [`Origins`]).
#[derive(Clone)]
pub struct Origin {
    client: Client<FixedDestination, RequestBody>,
}

impl FixedDestination {
    fn new(upstream: &Upstream, connect_timeout: Duration) -> FixedDestination {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        // The https connector below decides per URI scheme; the plain one must accept https URIs.
        http.enforce_http(false);
        let tls_config = upstream
            .tls
            .as_deref()
            .cloned()
            .unwrap_or_else(|| tls::client_config(None));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let target = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .expect("scheme and authority were validated with the configuration");
        FixedDestination {
            inner: https,
            target,
            connect_timeout,
        }
    }
}

impl Origin {
    fn new(connector: FixedDestination) -> Origin {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            // hyper grows an HTTP/1.1 connection's read buffer to 400 KiB while reads fill it,
            // and keeps it while the response is paused: per stream in flight, that was most
            // of the proxy's memory. 64 KiB reads: the 119 KB corpus page arrives in three reads
            // rather than five (about 5 us of CPU less per request, `benches/load.sh`), and a
            // held stream stays within its bound (`cargo bench --bench pressure -- streams`).
            .http1_max_buf_size(UPSTREAM_READ_BUFFER)
            .timer(TokioTimer::new())
            .build(connector);
        Origin { client }
    }

    /// Sends a request whose URI is `scheme://<authority for the origin>/path`.
    pub fn request(
        &self,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, Error>> {
        self.client.request(req)
    }
}

/// A connector that dials the configured upstream for every URI. TLS server name and certificate
/// checks use the upstream's host, as `proxy_pass https://origin` does in nginx.
#[derive(Clone)]
struct FixedDestination {
    inner: HttpsConnector<HttpConnector>,
    target: Uri,
    /// Bounds the TCP connect and the TLS handshake together: an origin that accepts and never
    /// speaks TLS is as unreachable as one that never accepts.
    connect_timeout: Duration,
}

/// The origin did not complete the TCP connect and TLS handshake within `upstream_connect`.
#[derive(Debug)]
pub struct ConnectTimeout(pub Duration);

impl std::fmt::Display for ConnectTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connect and TLS handshake not done within {}",
            humantime::format_duration(self.0)
        )
    }
}

impl std::error::Error for ConnectTimeout {}

type Connecting = Pin<
    Box<
        dyn Future<Output = Result<MaybeHttpsStream<TokioIo<TcpStream>>, crate::body::BoxError>>
            + Send,
    >,
>;

impl tower_service::Service<Uri> for FixedDestination {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = crate::body::BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, _requested: Uri) -> Self::Future {
        let connecting = self.inner.call(self.target.clone());
        let limit = self.connect_timeout;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(Box::new(ConnectTimeout(limit)) as crate::body::BoxError),
            }
        })
    }
}

/// The origin's response body, with a limit on how long it may pause between frames: a stalled
/// origin ends the client's response with an error instead of holding it open for ever.
pub struct UpstreamBody {
    inner: Incoming,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Data bytes received so far, for the access log and metrics.
    pub received: u64,
}

/// The origin paused its body longer than `timeouts.upstream_body_idle`.
#[derive(Debug)]
pub struct BodyIdle(pub Duration);

impl std::fmt::Display for BodyIdle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "upstream sent nothing for {}",
            humantime::format_duration(self.0)
        )
    }
}

impl std::error::Error for BodyIdle {}

impl UpstreamBody {
    pub fn new(inner: Incoming, idle: Duration) -> UpstreamBody {
        UpstreamBody {
            inner,
            idle,
            timer: None,
            received: 0,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(t) = this.timer.as_mut() {
                    t.as_mut().reset(tokio::time::Instant::now() + this.idle);
                }
                if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                    this.received += data.map_or(0, |d| d.len() as u64);
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdle(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client's request body on its way to the origin. It tells the request path three things:
/// when it has been sent in full (the wait for the origin's response starts then, so a slow upload
/// is not mistaken for a slow origin), whether the client broke it (a malformed or cut-off body is
/// the client's fault, never the origin's), and how long the origin has left a piece unread.
pub struct RequestBody {
    inner: Incoming,
    sent: Option<tokio::sync::oneshot::Sender<()>>,
    upload: Arc<Upload>,
}

/// What the request path can see of an upload in progress.
#[derive(Debug, Default)]
pub struct Upload {
    /// Set when the client's body failed: `body_malformed` or `body_incomplete`.
    client_error: std::sync::OnceLock<&'static str>,
    /// When the last piece was handed to the origin's connection while it has not asked for the
    /// next one yet, in milliseconds since `epoch` plus one (0: not waiting on the origin).
    handed_at: AtomicU64,
    epoch: std::sync::OnceLock<std::time::Instant>,
}

impl Upload {
    /// The client's fault, if its body broke.
    pub fn client_error(&self) -> Option<&'static str> {
        self.client_error.get().copied()
    }

    /// How long the origin has held a piece of the body without asking for the next: the time
    /// it has not been reading. Zero while the proxy waits for the client instead.
    pub fn origin_stalled_for(&self) -> Duration {
        match (self.handed_at.load(Ordering::Relaxed), self.epoch.get()) {
            (0, _) | (_, None) => Duration::ZERO,
            (at, Some(epoch)) => epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(at - 1)),
        }
    }

    fn handed(&self) {
        let epoch = self.epoch.get_or_init(std::time::Instant::now);
        let at = epoch.elapsed().as_millis() as u64 + 1;
        self.handed_at.store(at, Ordering::Relaxed);
    }
}

impl RequestBody {
    /// The body, a receiver that completes once it has been sent, and its upload state.
    pub fn new(inner: Incoming) -> (RequestBody, tokio::sync::oneshot::Receiver<()>, Arc<Upload>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let upload = Arc::new(Upload::default());
        let mut body = RequestBody {
            inner,
            sent: Some(tx),
            upload: Arc::clone(&upload),
        };
        if body.inner.is_end_stream() {
            body.signal();
        }
        (body, rx, upload)
    }

    fn signal(&mut self) {
        if let Some(tx) = self.sent.take() {
            let _ = tx.send(());
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // Asked for the next piece: whatever the origin held, it has read.
        self.upload.handed_at.store(0, Ordering::Relaxed);
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Err(e))) => {
                let kind = if e.is_incomplete_message() {
                    "body_incomplete"
                } else {
                    "body_malformed"
                };
                let _ = self.upload.client_error.set(kind);
                true
            }
            Poll::Ready(Some(Ok(_))) => {
                let end = self.inner.is_end_stream();
                if !end {
                    self.upload.handed();
                }
                end
            }
            Poll::Pending => false,
        };
        if ended {
            self.signal();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.signal();
    }
}
