//! Listeners, connections and shutdown: accepts TCP connections, serves HTTP/1.1 on each with the
//! shared [`Proxy`], and drains in-flight requests when asked to stop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::proxy::Proxy;

/// How long a client may take to send a request's headers before the connection is closed
/// (a slowloris defence).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long in-flight requests may run after a shutdown signal before connections are dropped.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A bound, not yet running, proxy.
pub struct Server {
    listener: TcpListener,
    proxy: Arc<Proxy>,
}

impl Server {
    /// Binds `config.listen` (port 0 picks a free port; see [`Server::local_addr`]).
    pub async fn bind(config: Config) -> io::Result<Server> {
        let listener = TcpListener::bind(config.listen).await.map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen))
        })?;
        Ok(Server {
            listener,
            proxy: Arc::new(Proxy::new(Arc::new(config))),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes, then stops accepting and gives in-flight requests up to
    /// `drain` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>, drain: Duration) {
        let graceful = GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        tokio::pin!(shutdown);
        loop {
            let (stream, client) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let proxy = Arc::clone(&self.proxy);
            let service = service_fn(move |req| {
                let proxy = Arc::clone(&proxy);
                async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, client).await) }
            });
            let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    // Clients that hang up or send garbage are their business, not an error of ours.
                    tracing::debug!(%client, "connection ended: {e}");
                }
            });
        }
        drop(self.listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(drain) => tracing::warn!("shutdown timeout reached; closing remaining connections"),
        }
    }
}

/// A proxy running on a background task, for tests and the demo.
pub struct Running {
    pub addr: SocketAddr,
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
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(
        async {
            let _ = stopped.await;
        },
        SHUTDOWN_TIMEOUT,
    ));
    Ok(Running {
        addr,
        stop: Some(stop),
        task,
    })
}
