//! Listeners, connections and shutdown: accepts TCP connections on the plain and TLS listeners
//! (up to `limits.max_connections` at once), serves HTTP/1.1 and HTTP/2 (ALPN on TLS, prior
//! knowledge on plain) with the shared [`Proxy`], closes idle connections, runs the admin
//! listener, and drains in-flight requests when asked to stop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::config::Config;
use crate::metrics::{Gauge, Metrics};
use crate::proxy::{Connection, Proxy, Scheme};
use crate::tunnel::{ConnectionGuard, Lease, Tunnels};

/// How long a client may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests one HTTP/2 connection may have in flight (SETTINGS_MAX_CONCURRENT_STREAMS). hyper's
/// default is 200; 100 is what RFC 9113 recommends as the least to allow, and what browsers need
/// (they open about 6-10 page loads per connection, and sub-resources are rarely rewritten).
/// Each stream that is rewritten costs memory, so one connection must not claim hundreds.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// A bound, not yet running, proxy.
pub struct Server {
    /// The plain listener: one socket per worker, on one address (see [`bind_shared`]).
    plain: Vec<std::net::TcpListener>,
    tls: Vec<std::net::TcpListener>,
    admin: Option<TcpListener>,
    proxy: Arc<Proxy>,
    status: Arc<admin::Status>,
    workers: Workers,
}

async fn bind(addr: SocketAddr, what: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| cannot_listen(addr, what, e))
}

fn cannot_listen(addr: SocketAddr, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot listen for {what} on {addr}: {e}"))
}

/// A listener for each worker, all on one address (`SO_REUSEPORT`): the kernel spreads new
/// connections over them, as nginx's `reuseport` spreads them over its worker processes. (One
/// socket shared by every worker would let the first to wake accept a whole burst.) Port 0 picks
/// a free port for the first; the others join it. The address is first bound once without
/// `SO_REUSEPORT`, so that anything listening there, another kmi-proxy included, makes the bind
/// fail as it did with a single socket, instead of quietly sharing the port.
async fn bind_shared(
    addr: SocketAddr,
    what: &str,
    workers: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let fail = |e| cannot_listen(addr, what, e);
    let mut at = bind(addr, what).await?.local_addr()?;
    let mut listeners = Vec::with_capacity(workers);
    for _ in 0..workers.max(1) {
        let socket = if at.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(fail)?;
        socket.set_reuseaddr(true).map_err(fail)?;
        socket.set_reuseport(true).map_err(fail)?;
        socket.bind(at).map_err(fail)?;
        let listener = socket.listen(1024).map_err(fail)?;
        at = listener.local_addr()?;
        listeners.push(listener.into_std()?);
    }
    Ok(listeners)
}

/// The threads that serve client connections: each runs a tokio runtime of one worker thread,
/// accepts on its own socket of each listening address and serves every connection it accepted,
/// with its requests, their upstream connections and their bodies, to the end. A connection's
/// tasks never wake another thread, which on a work-stealing runtime cost a context switch for
/// most requests: with two workers instead of a two-thread runtime, a spliced corpus page took
/// 69 us of CPU instead of 77, and 16,064 requests/s instead of 13,721 (`benches/ab.sh`). The
/// admin listener, signals and shutdown stay on the caller's runtime.
///
/// Each worker's runtime is tokio's multi-thread scheduler with one thread, not the
/// current-thread one, for its LIFO slot: a task woken by the task running now runs next. The
/// origin connection's task reads a piece of the page and wakes the client connection's task,
/// which then sends that piece while it is still in the CPU's cache. On the current-thread
/// scheduler it ran after every other task ready at the time; with 256 connections the piece was
/// out of the cache by then, and the kernel's copy of it into the client's socket took 24 us per
/// page instead of 10 (`perf`, a page passed through). `benches/ab.sh` with `CONNS=256`: 10% less
/// CPU per page passed through and 6% less per page spliced; with 32 connections, the same.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    /// Cancelled when the server is done or dropped: each worker's runtime stops, dropping
    /// whatever it still runs.
    exit: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start(count: usize) -> io::Result<Workers> {
        let exit = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::with_capacity(count),
            exit: exit.clone(),
            threads: Vec::with_capacity(count),
        };
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(format!("kmi-worker-{i}"))
                .on_thread_start(move || crate::upstream::serve_as_worker(i))
                .enable_all()
                .build()?;
            workers.handles.push(runtime.handle().clone());
            let exit = exit.clone();
            // Holds the runtime until the exit; dropping it there waits for the worker's thread.
            let thread = std::thread::Builder::new()
                .name(format!("kmi-owner-{i}"))
                .spawn(move || runtime.block_on(exit.cancelled()))?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Stops every worker and waits for its thread to end.
    async fn stop(mut self) {
        self.exit.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.exit.cancel();
    }
}

/// Controls a running proxy from outside: reloads, and the metrics.
#[derive(Clone)]
pub struct Handle {
    proxy: Arc<Proxy>,
}

impl Handle {
    /// Applies a new, already validated configuration to new requests; returns the settings that
    /// need a restart to take effect.
    pub fn reload(&self, config: Config) -> Vec<String> {
        self.proxy.reload(config)
    }

    /// Records that a reload was refused (the file was invalid; the old configuration stays).
    pub fn reload_refused(&self) {
        self.proxy.reload_refused();
    }

    pub fn metrics_text(&self) -> String {
        self.proxy.metrics().render()
    }
}

impl Server {
    /// Binds the configured listeners (port 0 picks a free port; see [`Server::local_addr`]).
    pub async fn bind(config: Config) -> io::Result<Server> {
        let count = config.limits.workers;
        let plain = match config.listen {
            Some(addr) => bind_shared(addr, "HTTP", count).await?,
            None => Vec::new(),
        };
        let tls = match (config.listen_tls, &config.tls) {
            (Some(addr), Some(_)) => bind_shared(addr, "HTTPS", count).await?,
            _ => Vec::new(),
        };
        let workers = Workers::start(count)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {count} workers: {e}")))?;
        let admin = match config.admin {
            Some(addr) => Some(bind(addr, "the admin endpoints").await?),
            None => None,
        };
        let proxy = Arc::new(Proxy::new(Arc::new(config)));
        let status = Arc::new(admin::Status {
            metrics: Arc::clone(proxy.metrics()),
            draining: false.into(),
        });
        Ok(Server {
            plain,
            tls,
            admin,
            proxy,
            status,
            workers,
        })
    }

    /// The plain HTTP listener's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.plain.first().and_then(|l| l.local_addr().ok())
    }

    /// The TLS listener's address.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls.first().and_then(|l| l.local_addr().ok())
    }

    /// The admin listener's address.
    pub fn admin_local_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn handle(&self) -> Handle {
        Handle {
            proxy: Arc::clone(&self.proxy),
        }
    }

    /// Serves until `shutdown` completes; then `/readyz` fails, the listeners close, and in-flight
    /// requests get up to `shutdown_timeout` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let config = self.proxy.config();
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.timeouts.client_header)
            .max_buf_size(config.limits.max_header_bytes);
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .max_header_list_size(
                u32::try_from(config.limits.max_header_bytes).unwrap_or(u32::MAX),
            );
        let kill = CancellationToken::new();
        let shared = Arc::new(Shared {
            http,
            proxy: Arc::clone(&self.proxy),
            stop: stop.clone(),
            connections: connections.clone(),
            kill: kill.clone(),
            first_request: config
                .timeouts
                .client_header
                .min(config.timeouts.client_idle),
            permits: Arc::new(Semaphore::new(config.limits.max_connections)),
            client_idle: config.timeouts.client_idle,
        });
        let admin_stop = CancellationToken::new();
        if let Some(listener) = self.admin {
            tokio::spawn(admin::serve(
                listener,
                Arc::clone(&self.status),
                admin_stop.clone(),
            ));
        }
        let mut accept_loops = Vec::new();
        // Each address has one socket per worker, in worker order.
        let workers = || self.workers.handles.iter().enumerate();
        let listeners = (self.plain.into_iter().map(|l| (l, Scheme::Http)))
            .zip(workers())
            .chain((self.tls.into_iter().map(|l| (l, Scheme::Https))).zip(workers()));
        for ((listener, scheme), (index, worker)) in listeners {
            let shared = Arc::clone(&shared);
            accept_loops.push(worker.spawn(async move {
                // Registered with the worker's own reactor, so its connections live there.
                match TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(listener, scheme, shared, index).await,
                    Err(e) => tracing::error!("a worker cannot accept connections: {e}"),
                }
            }));
        }

        shutdown.await;
        self.status.draining.store(true, Ordering::SeqCst);
        stop.cancel();
        for l in accept_loops {
            let _ = l.await;
        }
        connections.close();
        let drain = self.proxy.config().shutdown_timeout;
        tokio::select! {
            () = connections.wait() => {}
            () = tokio::time::sleep(drain) => {
                tracing::warn!("shutdown timeout reached; closing remaining connections");
                kill.cancel();
                connections.wait().await;
            }
        }
        admin_stop.cancel();
        self.workers.stop().await;
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
    /// Cancelled when the drain time is over: connections still open are dropped.
    kill: CancellationToken,
    /// One permit per open client connection. A worker's accept loop waits for a permit before it
    /// serves the connection it accepted and before it accepts another, so past the limit new
    /// connections wait (in the kernel's backlog, and one per worker in its accept loop) instead
    /// of being served badly.
    permits: Arc<Semaphore>,
    client_idle: Duration,
    /// Until its first request, a connection gets this long (the client header timeout): hyper's
    /// own header timer only starts once it has seen the first bytes.
    first_request: Duration,
}

async fn accept_loop(listener: TcpListener, scheme: Scheme, shared: Arc<Shared>, worker: usize) {
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
        // Accepted first, then served once there is room: with a permit taken before accepting,
        // an idle worker would hold the last place while a busy one's socket queued the
        // connection. Past the limit, this loop accepts nothing more until a place frees up.
        let permit = tokio::select! {
            permit = Arc::clone(&shared.permits).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
            () = shared.stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let task_shared = Arc::clone(&shared);
        shared.connections.spawn(async move {
            let open: ConnectionGuard =
                Arc::new(Open::new(permit, task_shared.proxy.metrics(), worker));
            match scheme {
                Scheme::Http => {
                    serve(TokioIo::new(stream), client, scheme, &task_shared, open).await
                }
                Scheme::Https => match handshake(&task_shared.proxy, stream).await {
                    Ok(tls_stream) => {
                        serve(TokioIo::new(tls_stream), client, scheme, &task_shared, open).await
                    }
                    Err(e) => tracing::debug!(%client, "TLS handshake failed: {e}"),
                },
            }
        });
    }
}

/// One open client connection's accounting: its permit under `limits.max_connections` and its
/// place in the `open_connections` gauge. Shared by the connection and any tunnel opened on it,
/// and released when the last of them ends.
struct Open {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
    /// The accepting worker's `worker_connections` gauge.
    on_worker: Gauge,
}

impl Open {
    fn new(permit: OwnedSemaphorePermit, metrics: &Metrics, worker: usize) -> Open {
        let on_worker = metrics.on_worker(worker);
        metrics.open_connections.inc();
        on_worker.inc();
        Open {
            _permit: permit,
            open: metrics.open_connections.clone(),
            on_worker,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.open.dec();
        self.on_worker.dec();
    }
}

/// Completes a TLS handshake with the certificates of the current configuration, so a reload can
/// rotate them.
async fn handshake(
    proxy: &Proxy,
    stream: TcpStream,
) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let config = proxy.config();
    let tls = config
        .tls
        .as_ref()
        .ok_or_else(|| io::Error::other("the configuration no longer has a [tls] table"))?;
    let acceptor = TlsAcceptor::from(Arc::clone(&tls.server));
    tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
}

/// Whether a connection has requests in flight, and since when it has had none.
struct Activity {
    in_flight: AtomicUsize,
    /// Requests seen on this connection so far.
    requests: AtomicUsize,
    idle_since: Mutex<Instant>,
}

/// Held by a request's access-log record until its response body is done.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        activity.requests.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

/// Completes once the connection has had no request in flight for `idle`, or for `first` before
/// its first request.
async fn idle_for(activity: &Activity, first: Duration, idle: Duration) {
    let check = (first.min(idle) / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(check).await;
        let since = *activity
            .idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let limit = if activity.requests.load(Ordering::SeqCst) == 0 {
            first
        } else {
            idle
        };
        if activity.in_flight.load(Ordering::SeqCst) == 0 && since.elapsed() >= limit {
            return;
        }
    }
}

async fn serve<I>(
    io: TokioIo<I>,
    client: SocketAddr,
    scheme: Scheme,
    shared: &Shared,
    open: ConnectionGuard,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        requests: AtomicUsize::new(0),
        idle_since: Mutex::new(Instant::now()),
    });
    let proxy = Arc::clone(&shared.proxy);
    let service_activity = Arc::clone(&activity);
    let conn = Arc::new(Connection {
        client,
        scheme,
        tunnels: Some(Lease {
            tunnels: Tunnels {
                tracker: shared.connections.clone(),
                kill: shared.kill.clone(),
            },
            guard: open,
        }),
    });
    let service = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let conn = Arc::clone(&conn);
        let in_flight = InFlight::start(&service_activity);
        async move {
            let mut response = proxy.handle(req, &conn).await;
            response.body_mut().hold(Box::new(in_flight));
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let connection = shared.http.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shared.stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => result,
                // Past the drain time the connection is dropped with whatever it still had.
                () = shared.kill.cancelled() => Ok(()),
            }
        }
        () = idle_for(&activity, shared.first_request, shared.client_idle) => {
            tracing::debug!(%client, "closing an idle connection");
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => result,
                () = shared.kill.cancelled() => Ok(()),
            }
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
    pub admin_addr: Option<SocketAddr>,
    pub handle: Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Begins shutdown (as SIGTERM does) and waits for the server to drain.
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
    let admin_addr = server.admin_local_addr();
    let addr = server
        .local_addr()
        .or(tls_addr)
        .ok_or_else(|| io::Error::other("no listener configured"))?;
    let handle = server.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Ok(Running {
        addr,
        tls_addr,
        admin_addr,
        handle,
        stop: Some(stop),
        task,
    })
}
