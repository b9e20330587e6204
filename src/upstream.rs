//! The pooled client to the origin. HTTP/1.1, or HTTP/2 when an `https://` origin offers it over
//! ALPN. Every connection goes to the configured upstream whatever authority a request carries,
//! so a request can name the site's own host (in `Host` for HTTP/1.1, `:authority` for HTTP/2)
//! while the socket goes to the origin server.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
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

/// The origin client shared by every connection.
#[derive(Clone)]
pub struct Origin {
    client: Client<FixedDestination, Incoming>,
}

impl Origin {
    pub fn new(upstream: &Upstream, connect_timeout: Duration) -> Origin {
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
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(FixedDestination {
                inner: https,
                target,
            });
        Origin { client }
    }

    /// Sends a request whose URI is `scheme://<authority for the origin>/path`.
    pub fn request(
        &self,
        req: Request<Incoming>,
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
}

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
        Box::pin(self.inner.call(self.target.clone()))
    }
}
