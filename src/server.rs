//! Listeners, connections and shutdown: accepts TCP connections on the plain and TLS listeners,
//! serves HTTP/1.1 and HTTP/2 (ALPN on TLS, prior knowledge on plain) with the shared [`Proxy`],
//! and drains in-flight requests when asked to stop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::proxy::{Proxy, Scheme};

/// How long a client may take to send a request's headers before the connection is closed
/// (a slowloris defence).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long in-flight requests may run after a shutdown signal before connections are dropped.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A bound, not yet running, proxy.
pub struct Server {
    plain: Option<TcpListener>,
    tls: Option<(TcpListener, TlsAcceptor)>,
    proxy: Arc<Proxy>,
}

async fn bind(addr: SocketAddr, what: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen for {what} on {addr}: {e}")))
}

impl Server {
    /// Binds the configured listeners (port 0 picks a free port; see [`Server::local_addr`]).
    pub async fn bind(config: Config) -> io::Result<Server> {
        let plain = match config.listen {
            Some(addr) => Some(bind(addr, "HTTP").await?),
            None => None,
        };
        let tls = match (config.listen_tls, &config.tls) {
            (Some(addr), Some(tls)) => Some((
                bind(addr, "HTTPS").await?,
                TlsAcceptor::from(Arc::clone(&tls.server)),
            )),
            _ => None,
        };
        Ok(Server {
            plain,
            tls,
            proxy: Arc::new(Proxy::new(Arc::new(config))),
        })
    }

    /// The plain HTTP listener's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.plain.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The TLS listener's address.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then stops accepting and gives in-flight requests up to
    /// `drain` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>, drain: Duration) {
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        http.http2().timer(TokioTimer::new());
        let shared = Arc::new(Shared {
            http,
            proxy: self.proxy,
            stop: stop.clone(),
            connections: connections.clone(),
        });
        let mut accept_loops = Vec::new();
        if let Some(listener) = self.plain {
            accept_loops.push(tokio::spawn(accept_loop(
                listener,
                None,
                Arc::clone(&shared),
            )));
        }
        if let Some((listener, acceptor)) = self.tls {
            accept_loops.push(tokio::spawn(accept_loop(
                listener,
                Some(acceptor),
                Arc::clone(&shared),
            )));
        }
        shutdown.await;
        stop.cancel();
        for l in accept_loops {
            let _ = l.await;
        }
        connections.close();
        tokio::select! {
            () = connections.wait() => {}
            () = tokio::time::sleep(drain) => tracing::warn!("shutdown timeout reached; closing remaining connections"),
        }
    }
}

/// What every connection task needs.
struct Shared {
    http: auto::Builder<TokioExecutor>,
    proxy: Arc<Proxy>,
    /// Cancelled on shutdown: accept loops stop, connections finish their requests and close.
    stop: CancellationToken,
    /// Every connection task, so shutdown can wait for them to drain.
    connections: TaskTracker,
}

async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shared.stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let task_shared = Arc::clone(&shared);
        let tls = tls.clone();
        shared.connections.spawn(async move {
            match tls {
                None => serve(TokioIo::new(stream), client, Scheme::Http, &task_shared).await,
                Some(acceptor) => match handshake(&acceptor, stream).await {
                    Ok(tls_stream) => {
                        serve(
                            TokioIo::new(tls_stream),
                            client,
                            Scheme::Https,
                            &task_shared,
                        )
                        .await
                    }
                    Err(e) => tracing::debug!(%client, "TLS handshake failed: {e}"),
                },
            }
        });
    }
}

async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
}

async fn serve<I>(io: TokioIo<I>, client: SocketAddr, scheme: Scheme, shared: &Shared)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let proxy = Arc::clone(&shared.proxy);
    let service = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, client, scheme).await) }
    });
    let connection = shared.http.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shared.stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        // Clients that hang up or send garbage are their business, not an error of ours.
        tracing::debug!(%client, "connection ended: {e}");
    }
}

/// A proxy running on a background task, for tests and the demo.
pub struct Running {
    /// The plain listener's address (the TLS one's when there is no plain listener).
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting and waits for the server to drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Binds and starts a proxy on the current tokio runtime.
pub async fn spawn(config: Config) -> io::Result<Running> {
    let server = Server::bind(config).await?;
    let tls_addr = server.tls_local_addr();
    let addr = server
        .local_addr()
        .or(tls_addr)
        .ok_or_else(|| io::Error::other("no listener configured"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(
        async {
            let _ = stopped.await;
        },
        SHUTDOWN_TIMEOUT,
    ));
    Ok(Running {
        addr,
        tls_addr,
        stop: Some(stop),
        task,
    })
}
