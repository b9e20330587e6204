//! The access log: one line per request, written when the response body is done, through
//! `tracing`. The visitor ID is never logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::rewrite::RewriteStats;

/// Everything known about one request, filled in as it goes; logged on drop.
#[derive(Debug)]
pub struct AccessLog {
    pub method: http::Method,
    pub host: String,
    pub path: String,
    pub status: u16,
    pub started: Instant,
    pub upstream: Option<Duration>,
    pub bytes_out: u64,
    /// Why the page was or was not rewritten: `rewritten`, `no_id`, `not_html`, ...
    pub rewrite: &'static str,
    pub stats: Option<Arc<RewriteStats>>,
    /// How the body ended: `complete`, `upstream_error`, `client_gone`.
    pub body_outcome: &'static str,
}

impl AccessLog {
    pub fn start(method: http::Method, host: String, path: String) -> AccessLog {
        AccessLog {
            method,
            host,
            path,
            status: 0,
            started: Instant::now(),
            upstream: None,
            bytes_out: 0,
            rewrite: "-",
            stats: None,
            body_outcome: "complete",
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let links = self.stats.as_ref().map_or(0, |s| s.links_decorated());
        let bailed_out = self.stats.as_ref().is_some_and(|s| s.bailed_out());
        tracing::info!(
            target: "kmi_proxy::access",
            method = %self.method,
            host = %self.host,
            path = %self.path,
            status = self.status,
            bytes = self.bytes_out,
            upstream_ms = %Millis(self.upstream),
            total_ms = %Millis(Some(self.started.elapsed())),
            links_decorated = links,
            rewrite = self.rewrite,
            bailed_out,
            body = self.body_outcome,
        );
    }
}

/// A duration as milliseconds with three decimals, or `-` when there is none (no upstream call).
struct Millis(Option<Duration>);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(d) => write!(f, "{:.3}", d.as_secs_f64() * 1000.0),
            None => f.write_str("-"),
        }
    }
}
