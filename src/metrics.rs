//! The proxy's Prometheus metrics: one registry per running proxy (so tests in one process do not
//! share counters), recorded once per request when its access-log record ends, and rendered in
//! the text exposition format for `GET /metrics` on the admin listener.

use prometheus_client::encoding::{text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    /// `1xx` ... `5xx`.
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartnerLabels {
    pub partner: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `upstream_to_proxy` (response bytes read from the origin) or `proxy_to_client`.
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// The worker thread's index, from 0 (see `limits.workers`).
    pub worker: String,
}

/// Request and upstream latencies: 1 ms to about 33 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16)
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// `rewritten`, or the reason a response was passed through (`no_id`, `not_html`, ...).
    pub responses: Family<ReasonLabels, Counter>,
    pub links_decorated: Family<PartnerLabels, Counter>,
    pub ids_rejected: Family<ReasonLabels, Counter>,
    pub upstream_errors: Family<KindLabels, Counter>,
    pub client_errors: Family<KindLabels, Counter>,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub bytes: Family<DirectionLabels, Counter>,
    pub open_connections: Gauge,
    pub worker_connections: Family<WorkerLabels, Gauge>,
    /// Rewritten pages by the path that served them: parsed, recorded, spliced, diverged.
    pub pages: Family<ReasonLabels, Counter>,
    pub pages_verified: Family<ReasonLabels, Counter>,
    /// Where a replay met its first differing byte, in input bytes.
    pub divergence_offset: Histogram,
    pub recordings: Gauge,
    pub recording_bytes: Gauge,
    pub rewriter_bailouts: Counter,
    /// Pages given the link script, by how (`file`, `file_nonce`, `inline`, `inline_nonce`), or
    /// the policy that kept it out (`csp_forbids_script_src`, `csp_sandbox`, ...).
    pub script_injections: Family<ResultLabels, Counter>,
    pub config_reloads: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// The `worker_connections` gauge of one worker, to count its connections without a lookup
    /// each time.
    pub fn on_worker(&self, worker: usize) -> Gauge {
        self.worker_connections
            .get_or_create(&WorkerLabels {
                worker: worker.to_string(),
            })
            .clone()
    }

    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kmi_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by method and status class",
            requests.clone(),
        );
        let responses = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "responses",
            "Responses by rewrite outcome: rewritten, or why the page was passed through",
            responses.clone(),
        );
        let links_decorated = Family::<PartnerLabels, Counter>::default();
        registry.register(
            "links_decorated",
            "Links decorated, by partner name",
            links_decorated.clone(),
        );
        let ids_rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "ids_rejected",
            "Identity cookies that could not be used, by reason",
            ids_rejected.clone(),
        );
        let upstream_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed upstream requests by kind (connect, timeout, tls, reset, body_idle, other)",
            upstream_errors.clone(),
        );
        let client_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "client_errors",
            "Requests refused or broken off by the client's fault, by kind (duplicate_host, \
             transfer_coding, body_malformed, ...)",
            client_errors.clone(),
        );
        let request_duration = Histogram::new(latency_buckets());
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response body",
            request_duration.clone(),
        );
        let upstream_duration = Histogram::new(latency_buckets());
        registry.register(
            "upstream_duration_seconds",
            "Time from sending a request to the origin to its response headers",
            upstream_duration.clone(),
        );
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "body_bytes",
            "Response body bytes, from the origin and to clients",
            bytes.clone(),
        );
        let pages = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "pages",
            "Rewritten pages by the path that served them (parsed, recorded, spliced, diverged)",
            pages.clone(),
        );
        let pages_verified = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "pages_verified",
            "Compressed pages answered from a recording, by how the origin's body was compared \
             with it: compressed (no decoding) or decoded",
            pages_verified.clone(),
        );
        let divergence_offset = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(64.0, 4.0, 10),
        );
        registry.register(
            "divergence_offset_bytes",
            "Input offset of the first byte where a page differed from its recording",
            divergence_offset.clone(),
        );
        let recordings = Gauge::default();
        registry.register(
            "recordings",
            "Recorded pages held for splicing (current configuration)",
            recordings.clone(),
        );
        let recording_bytes = Gauge::default();
        registry.register(
            "recording_bytes",
            "Bytes held by recorded pages (current configuration)",
            recording_bytes.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections open now",
            open_connections.clone(),
        );
        let worker_connections = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "worker_connections",
            "Client connections open now on each worker thread",
            worker_connections.clone(),
        );
        let rewriter_bailouts = Counter::default();
        registry.register(
            "rewriter_bailouts",
            "Pages where the rewriter hit its memory limit and passed the rest through",
            rewriter_bailouts.clone(),
        );
        let script_injections = Family::<ResultLabels, Counter>::default();
        registry.register(
            "script_injections",
            "Rewritten pages by what became of the link script: how it was written, or the \
             Content-Security-Policy that kept it out",
            script_injections.clone(),
        );
        let config_reloads = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads by result (ok, invalid)",
            config_reloads.clone(),
        );
        Metrics {
            registry,
            requests,
            responses,
            links_decorated,
            ids_rejected,
            upstream_errors,
            client_errors,
            request_duration,
            upstream_duration,
            bytes,
            open_connections,
            worker_connections,
            pages,
            pages_verified,
            divergence_offset,
            recordings,
            recording_bytes,
            rewriter_bailouts,
            script_injections,
            config_reloads,
        }
    }

    pub fn reason(family: &Family<ReasonLabels, Counter>, reason: &str) {
        family
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn add_bytes(&self, direction: &str, n: u64) {
        if n > 0 {
            self.bytes
                .get_or_create(&DirectionLabels {
                    direction: direction.to_owned(),
                })
                .inc_by(n);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// `2xx` for 204 and so on.
pub fn status_class(status: u16) -> String {
    format!("{}xx", status / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_with_labels() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                method: "GET".into(),
                class: status_class(204),
            })
            .inc();
        Metrics::reason(&m.responses, "no_id");
        m.add_bytes("proxy_to_client", 10);
        m.request_duration.observe(0.003);
        let text = m.render();
        assert!(
            text.contains("kmi_proxy_requests_total{method=\"GET\",class=\"2xx\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kmi_proxy_responses_total{reason=\"no_id\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kmi_proxy_body_bytes_total{direction=\"proxy_to_client\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("kmi_proxy_request_duration_seconds_bucket{le=\"0.004\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
