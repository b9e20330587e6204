//! Tunnels after a `101 Switching Protocols` (WebSocket): once both the client's and the origin's
//! connections have switched, bytes are copied both ways until either side closes. A tunnel is
//! accounted like the connection it came from: it keeps that connection's place under
//! `limits.max_connections` and in `open_connections`, closes after `timeouts.tunnel_idle` with no
//! byte either way, is waited for on shutdown like a request (and cut when the drain time is over),
//! and writes its access-log line when it closes, with the bytes each way.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;

/// What a client connection lends the tunnels it opens. Held by the tunnel task, so the
/// connection's accounting (its permit, the open-connection gauge) lasts until the tunnel closes.
pub type ConnectionGuard = Arc<dyn Send + Sync>;

/// Where tunnels run: the server's task tracker (shutdown waits for them) and its kill switch
/// (cancelled when the drain time is over).
#[derive(Clone)]
pub struct Tunnels {
    pub tracker: TaskTracker,
    pub kill: CancellationToken,
}

/// Everything a tunnel needs from the connection it was opened on.
#[derive(Clone)]
pub struct Lease {
    pub tunnels: Tunnels,
    pub guard: ConnectionGuard,
}

/// Bytes each way and when a byte last moved, shared by the two directions.
struct Activity {
    /// Client to origin.
    up: AtomicU64,
    /// Origin to client.
    down: AtomicU64,
    /// Milliseconds since `start` at the last byte either way.
    last: AtomicU64,
    start: Instant,
}

impl Activity {
    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Joins the client and the origin once both have switched, on the lease's tracker. `log` is
/// written when the tunnel closes.
pub fn spawn(
    lease: Option<Lease>,
    client: OnUpgrade,
    origin: OnUpgrade,
    idle: Duration,
    mut log: AccessLog,
) {
    let Some(Lease { tunnels, guard }) = lease else {
        // Without a server around it (a test calling the proxy directly) there is nothing to
        // account to; the tunnel still closes when idle.
        tokio::spawn(async move {
            run(client, origin, idle, CancellationToken::new(), &mut log).await;
        });
        return;
    };
    tunnels.tracker.spawn(async move {
        run(client, origin, idle, tunnels.kill, &mut log).await;
        drop(log);
        drop(guard);
    });
}

async fn run(
    client: OnUpgrade,
    origin: OnUpgrade,
    idle: Duration,
    kill: CancellationToken,
    log: &mut AccessLog,
) {
    let (client, origin) = tokio::select! {
        joined = async { tokio::join!(client, origin) } => match joined {
            (Ok(c), Ok(o)) => (c, o),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!("upgrade failed: {e}");
                log.body_outcome = "upgrade_failed";
                return;
            }
        },
        () = kill.cancelled() => {
            log.body_outcome = "shutdown";
            return;
        }
    };
    let activity = Arc::new(Activity {
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
        last: AtomicU64::new(0),
        start: Instant::now(),
    });
    let client = Metered {
        io: TokioIo::new(client),
        read: Direction::Up,
        activity: Arc::clone(&activity),
    };
    let origin = Metered {
        io: TokioIo::new(origin),
        read: Direction::Down,
        activity: Arc::clone(&activity),
    };
    let outcome = tokio::select! {
        copied = copy_both_ways(client, origin) => match copied {
            Ok(()) => "complete",
            Err(e) => {
                tracing::debug!("tunnel closed: {e}");
                "reset"
            }
        },
        () = idle_timeout(&activity, idle) => "idle",
        () = kill.cancelled() => "shutdown",
    };
    log.body_outcome = outcome;
    log.tunnel = Some((
        activity.up.load(Ordering::Relaxed),
        activity.down.load(Ordering::Relaxed),
    ));
    log.bytes_out = activity.down.load(Ordering::Relaxed);
    log.bytes_upstream = log.bytes_out;
}

/// How long the other direction may still run once one side has closed: long enough for a
/// close handshake's last frame, short enough that a side that never closes does not keep the
/// tunnel (and its connection's place) for ever.
const LINGER: Duration = Duration::from_secs(1);

/// Copies both ways; when one side has finished sending (and the other been told so), the other
/// direction gets [`LINGER`] to finish too.
async fn copy_both_ways<A, B>(client: A, origin: B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut origin_read, mut origin_write) = tokio::io::split(origin);
    let up = async {
        tokio::io::copy(&mut client_read, &mut origin_write).await?;
        origin_write.shutdown().await
    };
    let down = async {
        tokio::io::copy(&mut origin_read, &mut client_write).await?;
        client_write.shutdown().await
    };
    tokio::pin!(up, down);
    let rest = tokio::select! {
        done = &mut up => { done?; down.as_mut().left_future() }
        done = &mut down => { done?; up.as_mut().right_future() }
    };
    match tokio::time::timeout(LINGER, rest).await {
        Ok(done) => done,
        Err(_) => Ok(()),
    }
}

/// Completes once no byte has moved either way for `idle`.
async fn idle_timeout(activity: &Activity, idle: Duration) {
    loop {
        let quiet = activity.idle_for();
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Up,
    Down,
}

/// One side of a tunnel, counting the bytes read from it (which are the bytes copied to the
/// other side) and noting when anything moved.
struct Metered<T> {
    io: T,
    read: Direction,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            let counter = match self.read {
                Direction::Up => &self.activity.up,
                Direction::Down => &self.activity.down,
            };
            counter.fetch_add(n, Ordering::Relaxed);
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
