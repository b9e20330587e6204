//! The per-request record: filled in as the request goes, and on drop (when the response body is
//! done) written as one access-log line through `tracing` and added to the metrics. The visitor
//! ID is never logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::decorate::Decorator;
use crate::metrics::{self, Metrics, PartnerLabels, RequestLabels};
use crate::partner::PartnerIndex;
use crate::rewrite::RewriteStats;
use crate::splice::SpliceReport;

/// Everything known about one request; logged and counted on drop.
pub struct AccessLog {
    pub method: http::Method,
    pub host: String,
    pub path: String,
    pub status: u16,
    pub started: Instant,
    pub upstream: Option<Duration>,
    pub bytes_out: u64,
    pub bytes_upstream: u64,
    /// Why the page was or was not rewritten: `rewritten`, `no_id`, `not_html`, ...
    pub rewrite: &'static str,
    pub stats: Option<Arc<RewriteStats>>,
    /// For a rewritten page: which path served it (parsed, recorded, spliced, diverged).
    pub splice: Option<Arc<SpliceReport>>,
    /// How the body ended: `complete`, `upstream_error`, `client_gone`.
    pub body_outcome: &'static str,
    /// The kind of upstream failure, if the origin could not be reached or broke off.
    pub upstream_error: Option<&'static str>,
    /// The kind of a fault in the client's request (a refused head, a malformed body).
    pub client_error: Option<&'static str>,
    /// For a tunnel (WebSocket): bytes client to origin and origin to client.
    pub tunnel: Option<(u64, u64)>,
    /// Why the visitor's identity cookie was not usable, if it was not.
    pub id_rejected: Option<&'static str>,
    /// The coding the proxy compressed an uncompressed page in, if it did.
    pub encoded: Option<&'static str>,
    /// A link decorated outside a page (a click-time redirect), by partner.
    redirected_to: Option<PartnerIndex>,
    metrics: Arc<Metrics>,
    decorator: Arc<Decorator>,
    /// Held while the request is in flight; tells the connection it is not idle.
    _activity: Option<Box<dyn Send + Sync>>,
}

impl AccessLog {
    pub fn start(
        method: http::Method,
        host: String,
        path: String,
        metrics: Arc<Metrics>,
        decorator: Arc<Decorator>,
    ) -> AccessLog {
        AccessLog {
            method,
            host,
            path,
            status: 0,
            started: Instant::now(),
            upstream: None,
            bytes_out: 0,
            bytes_upstream: 0,
            rewrite: "-",
            stats: None,
            splice: None,
            body_outcome: "complete",
            upstream_error: None,
            client_error: None,
            tunnel: None,
            id_rejected: None,
            encoded: None,
            redirected_to: None,
            metrics,
            decorator,
            _activity: None,
        }
    }

    /// Counts a decoration made outside a page, such as a click-time redirect.
    pub fn count_link(&mut self, partner: PartnerIndex) {
        self.redirected_to = Some(partner);
    }

    /// Keeps `guard` alive until the response is done.
    pub fn hold(&mut self, guard: Box<dyn Send + Sync>) {
        self._activity = Some(guard);
    }

    fn record_metrics(&self) {
        let m = &self.metrics;
        m.requests
            .get_or_create(&RequestLabels {
                method: self.method.as_str().to_owned(),
                class: metrics::status_class(self.status),
            })
            .inc();
        Metrics::reason(&m.responses, self.rewrite);
        if let Some(why) = self.id_rejected {
            Metrics::reason(&m.ids_rejected, why);
        }
        if let Some(kind) = self.upstream_error {
            m.upstream_errors
                .get_or_create(&metrics::KindLabels {
                    kind: kind.to_owned(),
                })
                .inc();
        }
        if let Some(kind) = self.client_error {
            m.client_errors
                .get_or_create(&metrics::KindLabels {
                    kind: kind.to_owned(),
                })
                .inc();
        }
        m.request_duration
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(d) = self.upstream {
            m.upstream_duration.observe(d.as_secs_f64());
        }
        m.add_bytes("upstream_to_proxy", self.bytes_upstream);
        m.add_bytes("proxy_to_client", self.bytes_out);
        if let Some(partner) = self.redirected_to {
            m.links_decorated
                .get_or_create(&PartnerLabels {
                    partner: self.decorator.partners.name(partner).to_owned(),
                })
                .inc();
        }
        if let Some(report) = &self.splice {
            Metrics::reason(&m.pages, report.path().as_str());
            if let Some(how) = report.verified() {
                Metrics::reason(&m.pages_verified, how);
            }
            if let Some(at) = report.diverged_at() {
                m.divergence_offset.observe(at as f64);
            }
        }
        if let Some(stats) = &self.stats {
            for (partner, n) in stats.links_by_partner().filter(|&(_, n)| n > 0) {
                m.links_decorated
                    .get_or_create(&PartnerLabels {
                        partner: self.decorator.partners.name(partner).to_owned(),
                    })
                    .inc_by(n as u64);
            }
            if stats.bailed_out() {
                m.rewriter_bailouts.inc();
            }
            if let Some(script) = stats.script() {
                m.script_injections
                    .get_or_create(&metrics::ResultLabels {
                        result: script.as_str().to_owned(),
                    })
                    .inc();
            }
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.record_metrics();
        let links = self.stats.as_ref().map_or(0, |s| s.links_decorated());
        let bailed_out = self.stats.as_ref().is_some_and(|s| s.bailed_out());
        // What became of the link script: how it went in, or the policy that kept it out.
        let script = self
            .stats
            .as_ref()
            .and_then(|s| s.script())
            .map_or("-", |s| s.as_str());
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
            splice = self.splice.as_ref().map_or("-", |r| r.path().as_str()),
            verified = self.splice.as_ref().and_then(|r| r.verified()).unwrap_or("-"),
            encoded = self.encoded.unwrap_or("-"),
            bailed_out,
            script,
            body = self.body_outcome,
            error = self.upstream_error.or(self.client_error).unwrap_or("-"),
            tunnel_up = %Count(self.tunnel.map(|(up, _)| up)),
            tunnel_down = %Count(self.tunnel.map(|(_, down)| down)),
        );
    }
}

/// A count, or `-` where there is none (a tunnel's bytes, on a plain request).
struct Count(Option<u64>);

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("-"),
        }
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
