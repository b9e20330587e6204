//! One request through the origin and back: the request is cleaned and forwarded, the response is
//! classified (rewrite or pass through, and why), given cache-safe headers and streamed back.
//! Upgrades (WebSocket) are tunnelled once the origin agrees.

use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{
    HeaderName, HeaderValue, ACCEPT, ACCEPT_ENCODING, ACCEPT_RANGES, CACHE_CONTROL, CONNECTION,
    CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, EXPECT, HOST,
    IF_RANGE, LOCATION, RANGE, UPGRADE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use url::Url;

use crate::access_log::AccessLog;
use crate::body::{self, ResponseBody, RewriteBudget};
use crate::coding::{self, Coding};
use crate::config::Config;
use crate::decorate::Outcome;
use crate::headers;
use crate::identity::{self, Identity, VisitorId};
use crate::metrics::Metrics;
use crate::rewrite::{self, Charset, Page};
use crate::script::{Injection, Script};
use crate::splice::{self, Recordings, Splicer};
use crate::upstream::{self, Origins, RequestBody, UpstreamBody};
use crate::{consent, csp, paths, request, tunnel};
use arc_swap::ArcSwap;

const REFRESH: HeaderName = HeaderName::from_static("refresh");

/// The scheme the client used to reach the proxy, which is the scheme of the page's URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Reads one setting of a configuration, as text to compare and report.
type ReadSetting = fn(&Config) -> String;

/// Shared by every connection: the current configuration with its origin client, and the metrics.
pub struct Proxy {
    /// Swapped whole on reload; each request keeps the snapshot it started with, so in-flight
    /// requests finish with the configuration they began under.
    current: ArcSwap<Snapshot>,
    metrics: Arc<Metrics>,
    /// Pages being rewritten at once, across every connection (see [`RewriteBudget`]).
    rewrites: RewriteBudget,
}

/// A configuration and the origin client built for it.
pub struct Snapshot {
    pub config: Arc<Config>,
    origins: Origins,
    /// Recorded rewrites of this configuration: a reload starts with none, so a recording never
    /// outlives the settings it was made under.
    recordings: Option<Arc<Recordings>>,
}

impl Snapshot {
    fn new(config: Arc<Config>, metrics: &Arc<Metrics>) -> Snapshot {
        let origins = Origins::new(
            &config.upstream,
            config.timeouts.upstream_connect,
            config.limits.workers,
        );
        let recordings = Recordings::new(config.cache_bytes, Arc::clone(metrics));
        Snapshot {
            config,
            origins,
            recordings,
        }
    }
}

/// Why a response is or is not rewritten. The names appear in the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Rewrite, reading the page with this charset, undoing and redoing this content coding.
    Rewrite(Charset, Option<Coding>),
    /// Not a page the rewriter could ever touch (not HTML, or a status without a page).
    NotRewritable(&'static str),
    /// A page the rewriter could touch, but not this time.
    PageNotRewritten(&'static str),
}

/// Decides from the request and the response head alone, before any body byte. `id` says whether
/// there is an ID that may be used (else why not); `rewrites_without_id` is true when some
/// partner's links change for every visitor (`mode = "redirect"`).
pub fn decide(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
    id: Result<(), &'static str>,
    rewrites_without_id: bool,
) -> Decision {
    if !status.is_success()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::PARTIAL_CONTENT
    {
        return Decision::NotRewritable("status");
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("text/html")
        && !mime.eq_ignore_ascii_case("application/xhtml+xml")
    {
        return Decision::NotRewritable("not_html");
    }
    if method == Method::HEAD {
        return Decision::PageNotRewritten("head");
    }
    if let Err(why) = id {
        if !rewrites_without_id {
            return Decision::PageNotRewritten(why);
        }
    }
    if has_directive(headers, "no-transform") {
        return Decision::PageNotRewritten("no_transform");
    }
    let coding = match coding::of(headers) {
        coding::Encoding::Identity => None,
        coding::Encoding::One(c) => Some(c),
        // Unknown or stacked codings go through untouched rather than corrupted.
        coding::Encoding::Unsupported => return Decision::PageNotRewritten("content_encoding"),
    };
    match rewrite::charset_of(content_type) {
        Ok(charset) => Decision::Rewrite(charset, coding),
        Err(_) => Decision::PageNotRewritten("charset"),
    }
}

fn has_directive(headers: &HeaderMap, directive: &str) -> bool {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case(directive))
}

/// The connection a request arrived on, as the request path needs it.
pub struct Connection {
    /// The client's address (X-Forwarded-For, trusted front tiers).
    pub client: SocketAddr,
    /// The scheme the client used, which is the page's scheme.
    pub scheme: Scheme,
    /// Where a tunnel opened on this connection runs and whose accounting it keeps; `None`
    /// outside a server.
    pub tunnels: Option<tunnel::Lease>,
}

/// One request on its way through the phases: what the request filter learnt, and the
/// access-log record that goes with the response.
struct Exchange {
    log: AccessLog,
    /// The site the client named (target authority, else Host); see [`request::accept`].
    authority: Option<String>,
    path_and_query: String,
    method: Method,
    identity: Identity,
    consent: Result<(), &'static str>,
    /// The path is in `exclude_paths`: nothing on this page is decorated.
    excluded: bool,
    /// The protocols to ask the origin for, and the client's side of the switch.
    upgrade: Option<(HeaderValue, hyper::upgrade::OnUpgrade)>,
    /// This visitor's links would be decorated on this page, whatever the client accepts: an ID
    /// usable with consent, a partner decorated inline, a path not excluded.
    decorates: bool,
    /// A page that would be decorated for this visitor (its 304 must stay private too).
    decorated_page: bool,
    /// The origin is asked for the whole page (no Range), since it may be rewritten.
    whole_page: bool,
    /// The URL the browser has for this page; relative links resolve against it.
    page: Url,
    /// The packed coding this client prefers, from its `Accept-Encoding`: a page the origin
    /// sent uncompressed is sent in it when a recording answers it (no compression per visitor).
    accepts: Option<Coding>,
    /// The origin was asked for this page uncompressed (`rewrite.fetch_recorded_uncompressed`):
    /// the proxy compresses it in the client's coding whatever path it takes.
    uncompressed: bool,
}

/// Which wait ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timeout {
    /// The origin left a piece of the request body unread for `upstream_response`.
    Send,
    /// No response head within `upstream_response` of the request being sent.
    Response,
}

enum Failure {
    Error(upstream::Error),
    Timeout(Timeout),
}

/// Whether a request could be answered with a page the proxy would rewrite: a GET for HTML (a
/// browser navigation says so in `Accept`), or its HEAD, which gets the same headers. Such requests ask the origin
/// for the whole page, since a byte range of a page that is then rewritten would not fit together.
fn may_be_rewritten(method: &Method, headers: &HeaderMap) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && headers
            .get_all(ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|a| a.contains("text/html") || a.contains("application/xhtml+xml"))
}

impl Proxy {
    pub fn new(config: Arc<Config>) -> Proxy {
        let metrics = Arc::new(Metrics::new());
        Proxy {
            rewrites: RewriteBudget::new(config.limits.max_rewrites, body::REWRITE_WAIT),
            current: ArcSwap::from_pointee(Snapshot::new(config, &metrics)),
            metrics,
        }
    }

    /// The configuration new requests use.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.current.load().config)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Makes `config` the configuration of every request from now on. Settings that only take
    /// effect at start-up (listeners, limits, log format) are returned as warnings to report.
    pub fn reload(&self, config: Config) -> Vec<String> {
        let old = self.config();
        // Settings read once when the server starts: a change needs a restart.
        let start_only: [(&str, ReadSetting); 10] = [
            ("listen", |c| format!("{:?}", c.listen)),
            ("listen_tls", |c| format!("{:?}", c.listen_tls)),
            ("admin.listen", |c| format!("{:?}", c.admin)),
            ("limits.max_connections", |c| {
                c.limits.max_connections.to_string()
            }),
            ("limits.max_header_bytes", |c| {
                c.limits.max_header_bytes.to_string()
            }),
            ("limits.max_rewrites", |c| c.limits.max_rewrites.to_string()),
            ("limits.workers", |c| c.limits.workers.to_string()),
            ("timeouts.client_header", |c| {
                format!("{:?}", c.timeouts.client_header)
            }),
            ("timeouts.client_idle", |c| {
                format!("{:?}", c.timeouts.client_idle)
            }),
            ("log.format", |c| format!("{:?}", c.log_format)),
        ];
        let restart = start_only
            .iter()
            .filter_map(|(what, read)| {
                let (before, after) = (read(&old), read(&config));
                (before != after).then(|| {
                    format!(
                        "{what} changed from {before} to {after}: restart kmi-proxy to apply it"
                    )
                })
            })
            .collect();
        self.current
            .store(Arc::new(Snapshot::new(Arc::new(config), &self.metrics)));
        Metrics::reason(&self.metrics.config_reloads, "ok");
        restart
    }

    /// Counts a reload that was refused because the new file was invalid.
    pub fn reload_refused(&self) {
        Metrics::reason(&self.metrics.config_reloads, "invalid");
    }

    /// Serves one request. Never fails: every problem becomes a response with a status and a
    /// reason. The phases, in order: the request filter (the edge's checks, identity, the
    /// redirect endpoint), the upstream request, sending it (timeouts, and blame when it fails),
    /// the response head (what is rewritten, cache safety) and the body.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        conn: &Connection,
    ) -> Response<ResponseBody> {
        let snapshot = self.current.load_full();
        let config = &snapshot.config;
        let (req, mut exchange) = match self.request_filter(config, req, conn) {
            Ok(pair) => pair,
            Err(response) => return response,
        };
        // A page recorded lately is asked for uncompressed where the configuration says so:
        // the recording's packed pieces compress it for the client at no cost.
        // (Not for HEAD, whose origin answer would then not say how the GET is compressed.)
        exchange.uncompressed = config.fetch_recorded_uncompressed
            && exchange.method == Method::GET
            && exchange.decorates
            && exchange.accepts.is_some()
            && snapshot
                .recordings
                .as_ref()
                .is_some_and(|r| r.has_page(exchange.page.as_str(), true));
        let upstream_req = Self::upstream_request(config, req, conn, &exchange);
        let (response, mut exchange) = match Self::send(&snapshot, upstream_req, exchange).await {
            Ok(pair) => pair,
            Err(response) => return response,
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Self::switch_protocols(config, response, conn, exchange);
        }
        let (response, decision) = self.response_head(config, response, &mut exchange);
        self.response_body(&snapshot, response, decision, exchange)
    }

    /// Phase 1, the request filter: refuses what the edge does not accept (4xx/5xx, the
    /// client's fault), reads the visitor's identity, and answers the click-time redirect itself.
    #[allow(clippy::result_large_err)]
    fn request_filter(
        &self,
        config: &Config,
        mut req: Request<Incoming>,
        conn: &Connection,
    ) -> Result<(Request<Incoming>, Exchange), Response<ResponseBody>> {
        let accepted = request::accept(
            req.method(),
            req.uri(),
            req.version(),
            req.headers(),
            &config.upgrades,
        );
        let authority = accepted
            .as_ref()
            .ok()
            .and_then(|a| a.authority.as_ref())
            .map(|a| a.as_str().to_owned());
        let path_and_query = req
            .uri()
            .path_and_query()
            .filter(|pq| !pq.as_str().is_empty())
            .map_or_else(|| "/".to_owned(), |pq| pq.to_string());
        let mut log = AccessLog::start(
            req.method().clone(),
            authority.clone().unwrap_or_default(),
            req.uri().path().to_owned(),
            Arc::clone(&self.metrics),
            Arc::clone(&config.decorator),
        );
        let accepted = match accepted {
            Ok(a) => a,
            Err(rejection) => {
                log.client_error = Some(rejection.kind);
                tracing::debug!(client = %conn.client, kind = rejection.kind, "request refused");
                return Err(error_response(rejection.status, rejection.reason, log));
            }
        };
        let mut identity = identity::from_headers(req.headers(), &config.cookies);
        // A trusted front tier may tell the proxy who the visitor is; anyone else's claim is
        // ignored (and the header never reaches the origin either way).
        if let Some(name) = &config.request_header {
            let trusted = config
                .trusted_proxies
                .iter()
                .any(|net| net.contains(&conn.client.ip().to_canonical()));
            if let Some(v) = req.headers_mut().remove(name) {
                if trusted {
                    identity = identity::from_header_value(&v);
                }
            }
            // Every field of that name goes, not only the first.
            while req.headers_mut().remove(name).is_some() {}
        }
        let consent = consent::allows(&config.consent, req.headers());
        if req.uri().path() == config.decorator.redirect_path {
            let id = usable_id(&identity, consent).ok();
            return Err(outbound_redirect(config, &req, id, log));
        }
        if let Some(script) = config
            .script
            .as_ref()
            .filter(|s| req.uri().path() == s.path)
        {
            return Err(serve_script(script, &req, log));
        }
        let excluded = paths::any_matches(&config.exclude_paths, req.uri().path());
        let method = req.method().clone();
        let upgrade = accepted
            .upgrade
            .map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
        let partners = &config.decorator.partners;
        let html_get = !excluded && may_be_rewritten(&method, req.headers());
        let decorates = !excluded && usable_id(&identity, consent).is_ok() && partners.any_inline();
        // A page decorated for this visitor (its 304 must stay private too).
        let decorated_page = html_get && decorates;
        // A page that will be rewritten at all asks the origin for the whole page: a range of a
        // page that is then rewritten would not fit together.
        let whole_page = decorated_page || (html_get && rewrites_without_id(config));
        let page = page_url(conn.scheme, authority.as_deref(), &path_and_query, config);
        let accepts = coding::preferred(req.headers().get_all(ACCEPT_ENCODING));
        Ok((
            req,
            Exchange {
                log,
                authority,
                path_and_query,
                method,
                identity,
                consent,
                excluded,
                upgrade,
                decorates,
                decorated_page,
                whole_page,
                page,
                accepts,
                uncompressed: false,
            },
        ))
    }

    /// Phase 2, the upstream request: hop-by-hop fields out, forwarding fields in, the site's
    /// authority in the URI only (hyper sends it as `Host` on HTTP/1.1 and as `:authority` on
    /// HTTP/2, never both), the upgrade only if the policy allowed it.
    fn upstream_request(
        config: &Config,
        req: Request<Incoming>,
        conn: &Connection,
        exchange: &Exchange,
    ) -> Request<Incoming> {
        let (mut parts, body) = req.into_parts();
        let upstream = &config.upstream.authority;
        let host = match (config.preserve_host, &exchange.authority) {
            (true, Some(host)) => host.as_str(),
            _ => upstream.as_str(),
        };
        parts.uri = Uri::builder()
            .scheme(config.upstream.scheme.clone())
            .authority(host)
            .path_and_query(exchange.path_and_query.as_str())
            .build()
            .or_else(|_| {
                // The edge accepted both; should the pair still not make a URI, the origin
                // gets its own authority rather than nothing.
                Uri::builder()
                    .scheme(config.upstream.scheme.clone())
                    .authority(upstream.clone())
                    .path_and_query(exchange.path_and_query.as_str())
                    .build()
            })
            .unwrap_or_else(|_| Uri::from_static("/"));
        let client_version = parts.version;
        parts.version = http::Version::HTTP_11;
        let h = &mut parts.headers;
        headers::remove_hop_by_hop(h);
        // The authority travels in the URI; a `Host` beside it would be a second, possibly
        // different, name for the site (and nginx refuses `Host` next to `:authority`).
        h.remove(HOST);
        // The proxy answered any `100-continue` itself; the origin gets the body straight away.
        h.remove(EXPECT);
        // HTTP/2 clients may split cookies over several fields; an HTTP/1.1 origin must get one
        // (RFC 9113 §8.2.3), and one is also valid HTTP/2.
        join_cookies(h);
        headers::append_list(h, headers::X_FORWARDED_FOR, &conn.client.ip().to_string());
        h.insert(
            headers::X_FORWARDED_PROTO,
            HeaderValue::from_static(conn.scheme.as_str()),
        );
        match exchange.authority.as_deref().map(HeaderValue::from_str) {
            Some(Ok(v)) => {
                h.insert(headers::X_FORWARDED_HOST, v);
            }
            // A client's own X-Forwarded-Host must not pass for the proxy's word.
            _ => {
                h.remove(headers::X_FORWARDED_HOST);
            }
        }
        if config.via_upstream {
            headers::add_via(h, client_version);
        }
        if let Some((protocol, _)) = &exchange.upgrade {
            h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(UPGRADE, protocol.clone());
        }
        if exchange.whole_page {
            h.remove(RANGE);
            h.remove(IF_RANGE);
        }
        if exchange.uncompressed {
            h.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        Request::from_parts(parts, body)
    }

    /// Phase 3: sends the request and waits for the response head within the timeouts. A
    /// failure is blamed on the side that caused it: a broken request body is the client's
    /// (400), anything else the origin's (502 or 504). The client sees a short public reason;
    /// the origin's address and the library's words go to the log and the metrics.
    async fn send(
        snapshot: &Snapshot,
        upstream_req: Request<Incoming>,
        mut exchange: Exchange,
    ) -> Result<(Response<Incoming>, Exchange), Response<ResponseBody>> {
        let config = &snapshot.config;
        let (upstream_req, body_sent, upload) = {
            let (parts, body) = upstream_req.into_parts();
            let (body, sent, upload) = RequestBody::new(body);
            (Request::from_parts(parts, body), sent, upload)
        };
        let started = Instant::now();
        let response = snapshot.origins.here().request(upstream_req);
        // The wait for the origin's answer starts once the request body has been sent: a slow
        // upload is the client's pace, not a slow origin. While it is being sent, the origin
        // may not leave a piece of it unread for longer than the same timeout.
        let limit = config.timeouts.upstream_response;
        let deadline = async {
            tokio::pin!(body_sent);
            let check = (limit / 4).max(Duration::from_millis(10));
            loop {
                tokio::select! {
                    _ = &mut body_sent => break,
                    () = tokio::time::sleep(check) => {
                        if upload.origin_stalled_for() >= limit {
                            return Timeout::Send;
                        }
                    }
                }
            }
            tokio::time::sleep(limit).await;
            Timeout::Response
        };
        let result = tokio::select! {
            r = response => Ok(r),
            t = deadline => Err(t),
        };
        exchange.log.upstream = Some(started.elapsed());
        let failure = match result {
            Ok(Ok(r)) => return Ok((r, exchange)),
            Ok(Err(e)) => Failure::Error(e),
            Err(t) => Failure::Timeout(t),
        };
        Err(blame(config, failure, &upload, exchange.log))
    }

    /// The origin answered `101`: the tunnel opens only for a protocol the policy allowed and
    /// the client asked for. Any other switch is refused with a 502 and the origin's connection
    /// dropped, so no byte flows that the proxy did not agree to.
    fn switch_protocols(
        config: &Config,
        mut response: Response<Incoming>,
        conn: &Connection,
        mut exchange: Exchange,
    ) -> Response<ResponseBody> {
        exchange.log.status = response.status().as_u16();
        let answered = response.headers().get(UPGRADE).cloned();
        let Some((asked, client_upgrade)) = exchange.upgrade.take() else {
            return origin_fault(
                config,
                "upgrade",
                "switched protocols unasked",
                exchange.log,
            );
        };
        if !request::switched_as_asked(&asked, answered.as_ref()) {
            return origin_fault(
                config,
                "upgrade",
                "switched to a protocol that was not asked for",
                exchange.log,
            );
        }
        let origin_upgrade = hyper::upgrade::on(&mut response);
        let origin_version = response.version();
        let headers = response.headers_mut();
        headers::remove_hop_by_hop(headers);
        headers::add_via(headers, origin_version);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(p) = answered {
            headers.insert(UPGRADE, p);
        }
        let mut log = exchange.log;
        log.rewrite = "upgrade";
        tunnel::spawn(
            conn.tunnels.clone(),
            client_upgrade,
            origin_upgrade,
            config.timeouts.tunnel_idle,
            log,
        );
        let (parts, _) = response.into_parts();
        Response::from_parts(parts, ResponseBody::empty())
    }

    /// Phase 4, the response head: hop-by-hop fields out, `Via`, server-side identity,
    /// decorated redirects, and the decision whether the body is rewritten, with the cache
    /// headers that decision needs. A HEAD gets the head its GET would get.
    fn response_head(
        &self,
        config: &Config,
        mut response: Response<Incoming>,
        exchange: &mut Exchange,
    ) -> (Response<Incoming>, Decision) {
        let status = response.status();
        exchange.log.status = status.as_u16();
        // `Via` names the protocol the message arrived over: the origin's, for a response.
        let origin_version = response.version();
        let headers = response.headers_mut();
        if headers.contains_key(http::header::TRANSFER_ENCODING) {
            // A message with both framings is delimited by Transfer-Encoding (RFC 9112 §6.3); its
            // Content-Length is wrong and must not reach the client with the re-framed body.
            headers.remove(CONTENT_LENGTH);
        }
        headers::remove_hop_by_hop(headers);
        headers::add_via(headers, origin_version);
        if status == StatusCode::NOT_MODIFIED && exchange.decorated_page {
            // A 304 updates the headers of the copy a cache holds (RFC 9111 §4.3.4). For a page
            // that was decorated, it must not undo `private` and the weak ETag.
            vary_on_identity(headers, config);
            headers::make_private(headers);
        }
        // Server-side identity: the origin knows who this is; the header never reaches the client.
        if let Some(v) = config
            .response_header
            .as_ref()
            .and_then(|name| headers.remove(name))
        {
            exchange.identity = identity::from_header_value(&v);
        }
        if let Identity::Rejected(why) = &exchange.identity {
            exchange.log.id_rejected = Some(why.as_str());
        }
        let id = usable_id(&exchange.identity, exchange.consent);
        if !exchange.excluded {
            Self::decorate_redirects(config, headers, &exchange.page, id.ok());
        }
        let partners = &config.decorator.partners;
        // A HEAD is decided as its GET would be, so both say the same about caching.
        let as_get = if exchange.method == Method::HEAD {
            Method::GET
        } else {
            exchange.method.clone()
        };
        let mut decision = decide(
            &as_get,
            status,
            headers,
            id.map(|_| ()),
            rewrites_without_id(config),
        );
        if exchange.excluded && !matches!(decision, Decision::NotRewritable(_)) {
            decision = Decision::PageNotRewritten("excluded");
        }
        if !exchange.excluded
            && !matches!(decision, Decision::NotRewritable(_))
            && partners.any_inline()
        {
            // The same URL may be decorated for another visitor: caches must key on Cookie (and
            // on Global Privacy Control when it is honoured) even when this one was not.
            vary_on_identity(headers, config);
        }
        if let Decision::Rewrite(_, None) = decision {
            // An uncompressed page may go out compressed when a recording answers it: caches
            // must key on Accept-Encoding, for this response and its HEAD alike.
            headers::vary_on(headers, "Accept-Encoding");
        }
        if let Decision::Rewrite(..) = decision {
            // Only inline partners put the ID into the page; redirect-mode links are the same
            // for everyone, so such a page keeps its cache headers, but not a strong ETag: its
            // bytes are no longer the origin's.
            if id.is_ok() && partners.any_inline() {
                headers::make_private(headers);
            } else {
                headers::weaken_etag(headers);
            }
            // The rewritten length is unknown up front, and anything describing the origin's
            // exact bytes no longer holds.
            headers.remove(CONTENT_LENGTH);
            headers.remove(ACCEPT_RANGES);
            for name in ["content-md5", "digest", "repr-digest", "content-digest"] {
                headers.remove(name);
            }
            if exchange.method == Method::HEAD {
                decision = Decision::PageNotRewritten("head");
            }
        }
        (response, decision)
    }

    /// Phase 5, the body: streamed through the rewriter or passed through untouched.
    fn response_body(
        &self,
        snapshot: &Snapshot,
        response: Response<Incoming>,
        decision: Decision,
        exchange: Exchange,
    ) -> Response<ResponseBody> {
        let config = &snapshot.config;
        let mut log = exchange.log;
        let (mut parts, body) = response.into_parts();
        let upstream = UpstreamBody::new(body, config.timeouts.upstream_body_idle);
        let body = match decision {
            Decision::Rewrite(charset, coding) => {
                log.rewrite = "rewritten";
                let partners = &config.decorator.partners;
                let id = usable_id(&exchange.identity, exchange.consent)
                    .ok()
                    .filter(|_| partners.any_inline())
                    .cloned();
                // The recording of this page, if any: its key holds everything besides the
                // configuration that can change the rewriter's output.
                let content_type = parts
                    .headers
                    .get(CONTENT_TYPE)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default();
                let script = config.script.as_ref().map(|script| {
                    Arc::new(Injection {
                        script: Arc::clone(script),
                        policies: csp::from_headers(
                            parts
                                .headers
                                .get_all(CONTENT_SECURITY_POLICY)
                                .iter()
                                .filter_map(|v| v.to_str().ok()),
                        ),
                        xml: is_xhtml(&content_type),
                    })
                });
                // The recording of this page, if any: its key holds everything besides the
                // configuration that can change the rewriter's output. With the script on, that
                // includes the response's policy, which decides the injected tag: it goes into
                // the key beside the Content-Type. A policy with a nonce is a new one with
                // every response, so such a page is parsed each time, never recorded: a replay
                // would carry another response's nonce.
                let store = snapshot
                    .recordings
                    .as_ref()
                    .filter(|_| {
                        !script
                            .as_ref()
                            .is_some_and(|s| csp::names_nonce(&s.policies))
                    })
                    .map(|store| {
                        let mut variant = content_type.clone();
                        if script.is_some() {
                            for v in parts.headers.get_all(CONTENT_SECURITY_POLICY) {
                                variant.push_str("\ncsp: ");
                                variant.push_str(&String::from_utf8_lossy(v.as_bytes()));
                            }
                        }
                        let key = splice::Key::new(exchange.page.as_str(), &variant, id.is_some());
                        (Arc::clone(store), key)
                    });
                let page = Page {
                    url: exchange.page,
                    charset,
                    memory_limit: config.memory_limit,
                    script,
                };
                let rewriter = Splicer::new(Arc::clone(&config.decorator), id, page, store);
                log.stats = Some(rewriter.stats());
                log.splice = Some(rewriter.report());
                // An uncompressed page answered from a recording goes out in the client's
                // coding: the recording's packed pieces make it free (`Vary` says so already).
                let encode = match coding {
                    // Asked for uncompressed: compressed here on every path, so that putting
                    // the proxy in front changes nothing about what the client receives.
                    None if exchange.uncompressed => exchange.accepts,
                    None => exchange.accepts.filter(|_| rewriter.replays()),
                    Some(_) => None,
                };
                if let Some(c) = encode {
                    parts
                        .headers
                        .insert(CONTENT_ENCODING, HeaderValue::from_static(c.as_str()));
                    log.encoded = Some(c.as_str());
                }
                ResponseBody::rewrite(upstream, rewriter, coding, encode, &self.rewrites, log)
            }
            Decision::NotRewritable(why) | Decision::PageNotRewritten(why) => {
                log.rewrite = why;
                ResponseBody::passthrough(upstream, log)
            }
        };
        Response::from_parts(parts, body)
    }
    /// A redirect into a partner's site keeps the visitor's identity like a link does: `Location`
    /// and `Refresh` get the same matching and encoding (relative ones resolve against the page).
    fn decorate_redirects(
        config: &Config,
        headers: &mut HeaderMap,
        page: &Url,
        id: Option<&VisitorId>,
    ) {
        let decorator = &config.decorator;
        let mut partner_seen = false;
        let mut decorated = false;
        if let Some(location) = headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        {
            if decorator.partner_of(&location, page).is_some() {
                partner_seen = true;
                if let Some(Outcome::Decorated { href, .. }) =
                    id.map(|id| decorator.decorate(&location, page, id))
                {
                    if let Ok(v) = HeaderValue::from_str(&href) {
                        headers.insert(LOCATION, v);
                        decorated = true;
                    }
                }
            }
        }
        if let Some(refresh) = headers
            .get(REFRESH)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        {
            if let Some(url_range) = refresh_url(&refresh) {
                let target = &refresh[url_range.clone()];
                if decorator.partner_of(target, page).is_some() {
                    partner_seen = true;
                    if let Some(Outcome::Decorated { href, .. }) =
                        id.map(|id| decorator.decorate(target, page, id))
                    {
                        let new = format!(
                            "{}{}{}",
                            &refresh[..url_range.start],
                            href,
                            &refresh[url_range.end..]
                        );
                        if let Ok(v) = HeaderValue::from_str(&new) {
                            headers.insert(REFRESH, v);
                            decorated = true;
                        }
                    }
                }
            }
        }
        if partner_seen {
            vary_on_identity(headers, config);
        }
        if decorated {
            headers::make_private(headers);
        }
    }
}

/// Joins split `Cookie` fields with `; ` as raw bytes: a cookie value that is not visible ASCII
/// (UTF-8 sent raw, say) is the origin's to judge, not the proxy's to drop.
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(COOKIE).iter().count() < 2 {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, v);
    }
}

/// The byte range of the URL in a `Refresh` value such as `5; url=https://example.com/`.
fn refresh_url(value: &str) -> Option<std::ops::Range<usize>> {
    let after_delay = value.find([';', ','])? + 1;
    let rest = &value[after_delay..];
    let trimmed = rest.trim_start();
    let mut start = after_delay + (rest.len() - trimmed.len());
    if trimmed.len() >= 3 && trimmed[..3].eq_ignore_ascii_case("url") {
        let after = trimmed[3..].trim_start();
        let after_eq = after.strip_prefix('=')?;
        start = value.len() - after_eq.trim_start().len();
    }
    let mut end = value.len();
    if let Some(q @ ('"' | '\'')) = value[start..].chars().next() {
        start += 1;
        end = value[start..].find(q).map_or(end, |i| start + i);
    }
    (start < end).then_some(start..end)
}

/// A response that may carry a visitor's ID varies on what decides it: the cookies, and Global
/// Privacy Control when it is honoured.
fn vary_on_identity(headers: &mut HeaderMap, config: &Config) {
    headers::vary_on_cookie(headers);
    if config.consent.honor_gpc {
        headers::vary_on(headers, "Sec-GPC");
    }
}

/// Whether pages are rewritten for visitors without a usable ID too: redirect-mode links and the
/// link script are the same for everyone (the script reads the ID in the browser, where the
/// visitor may have one by the time they click).
fn rewrites_without_id(config: &Config) -> bool {
    config.decorator.partners.any_redirect() || config.script.is_some()
}

fn is_xhtml(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/xhtml+xml"))
}

/// The link script, `GET <script.path>`: the same bytes for every visitor. Under its current
/// version (`?v=`, which the injected tag names) it may be cached for a year, since a
/// configuration that changes it changes the URL. Under any other URL (a stale version from a
/// page cached before a reload, or none) it is today's script marked `no-cache`: a cache may keep
/// it but asks again each time, so no old URL pins these bytes. The ETag is the version; an
/// `If-None-Match` naming it (weakly, or `*`) gets 304. HEAD gets the headers GET would, with the
/// length; any other method 405.
fn serve_script(
    script: &Script,
    req: &Request<Incoming>,
    mut log: AccessLog,
) -> Response<ResponseBody> {
    log.rewrite = "script";
    // The path is the proxy's while the script is on: other methods are refused here rather
    // than passed to the origin, which never sees this path.
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut refused = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "the link script answers GET and HEAD only",
            log,
        );
        refused
            .headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return refused;
    }
    let etag = format!("\"{}\"", script.version);
    let current = req.uri().query().is_some_and(|q| {
        url::form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "v" && v == script.version)
    });
    let unchanged = req
        .headers()
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().trim_start_matches("W/") == etag || t.trim() == "*");
    let (status, body) = if unchanged {
        (StatusCode::NOT_MODIFIED, bytes::Bytes::new())
    } else if req.method() == Method::HEAD {
        (StatusCode::OK, bytes::Bytes::new())
    } else {
        (StatusCode::OK, bytes::Bytes::from(script.js.clone()))
    };
    log.status = status.as_u16();
    let mut response = Response::new(ResponseBody::full(body, log));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static(if current {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(http::header::ETAG, v);
    }
    if req.method() == Method::HEAD && !unchanged {
        h.insert(CONTENT_LENGTH, HeaderValue::from(script.js.len()));
    }
    response
}

/// The ID to use for this request, or why there is none.
fn usable_id<'a>(
    identity: &'a Identity,
    consent: Result<(), &'static str>,
) -> Result<&'a VisitorId, &'static str> {
    match identity {
        Identity::Known { id, .. } => consent.map(|()| id),
        Identity::Absent => Err("no_id"),
        Identity::Rejected(_) => Err("id_rejected"),
    }
}

/// The click-time redirect of `mode = "redirect"` partners: `GET <redirect.path>?to=<url>` answers
/// 302 to `<url>` with `kmi=` added for this visitor. Only to an absolute http(s) URL on a
/// configured partner's host (anything else is 400), so it can never serve as an open redirect.
fn outbound_redirect(
    config: &Config,
    req: &Request<Incoming>,
    id: Option<&VisitorId>,
    mut log: AccessLog,
) -> Response<ResponseBody> {
    log.rewrite = "outbound_redirect";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "the partner redirect answers GET only",
            log,
        );
    }
    let to = req.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "to")
            .map(|(_, v)| v.into_owned())
    });
    let Some(to) = to else {
        return error_response(StatusCode::BAD_REQUEST, "missing ?to=<partner URL>", log);
    };
    let decorator = &config.decorator;
    let destination = match url::Url::parse(to.trim()) {
        Ok(url) if decorator.partner_host(&url).is_some() => url,
        Ok(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "the destination is not a configured partner",
                log,
            )
        }
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "the destination must be an absolute http(s) URL",
                log,
            )
        }
    };
    let location = match id.map(|id| decorator.decorate(destination.as_str(), &destination, id)) {
        Some(Outcome::Decorated { href, partner }) => {
            log.count_link(partner);
            href
        }
        _ => destination.to_string(),
    };
    let Ok(location) = HeaderValue::from_str(&location) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "the destination cannot be sent as a Location",
            log,
        );
    };
    log.status = StatusCode::FOUND.as_u16();
    let mut response = Response::new(ResponseBody::full(bytes::Bytes::new(), log));
    *response.status_mut() = StatusCode::FOUND;
    let h = response.headers_mut();
    h.insert(LOCATION, location);
    // One visitor's redirect: never stored, and the partner learns only this site's origin.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("strict-origin-when-cross-origin"),
    );
    response
}

/// The URL the browser has for this page; relative links resolve against it.
fn page_url(scheme: Scheme, host: Option<&str>, path_and_query: &str, config: &Config) -> Url {
    let s = scheme.as_str();
    let host = host.map_or_else(|| config.upstream.authority.to_string(), str::to_owned);
    Url::parse(&format!("{s}://{host}{path_and_query}"))
        .or_else(|_| {
            Url::parse(&format!(
                "{s}://{}{path_and_query}",
                config.upstream.authority
            ))
        })
        .unwrap_or_else(|_| Url::parse("http://localhost/").expect("static URL"))
}

/// A plain-text error page with a one-line reason. Never cached: the next request may succeed.
fn error_response(status: StatusCode, reason: &str, mut log: AccessLog) -> Response<ResponseBody> {
    log.status = status.as_u16();
    log.rewrite = "error";
    let text = format!(
        "{} {}: {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        reason
    );
    let mut response = Response::new(ResponseBody::full(text, log));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The response for a failed exchange with the origin, blamed on the side that caused it.
fn blame(
    config: &Config,
    failure: Failure,
    upload: &upstream::Upload,
    mut log: AccessLog,
) -> Response<ResponseBody> {
    // A body the client broke fails the upstream request too; it is still the client's fault.
    if let Some(kind) = upload.client_error() {
        log.client_error = Some(kind);
        tracing::debug!(target: "kmi_proxy::client", kind, "the client's request body broke off");
        let reason = if kind == "body_incomplete" {
            "incomplete request body"
        } else {
            "malformed request body"
        };
        return error_response(StatusCode::BAD_REQUEST, reason, log);
    }
    match failure {
        Failure::Error(e) => {
            let (kind, detail) = describe(&e);
            let reason = match kind {
                "connect" | "timeout" => "cannot connect to the origin",
                "tls" => "cannot establish a secure connection to the origin",
                "reset" => "the origin closed the connection",
                _ => "invalid response from the origin",
            };
            log.upstream_error = Some(kind);
            tracing::warn!(target: "kmi_proxy::upstream", upstream = %config.upstream, kind, %detail);
            error_response(StatusCode::BAD_GATEWAY, reason, log)
        }
        Failure::Timeout(t) => {
            let limit = humantime::format_duration(config.timeouts.upstream_response);
            let (kind, reason, detail) = match t {
                Timeout::Send => (
                    "send_timeout",
                    "the origin did not read the request in time",
                    format!("left the request body unread for {limit}"),
                ),
                Timeout::Response => (
                    "timeout",
                    "the origin did not answer in time",
                    format!("sent no response within {limit}"),
                ),
            };
            log.upstream_error = Some(kind);
            tracing::warn!(target: "kmi_proxy::upstream", upstream = %config.upstream, kind, %detail);
            error_response(StatusCode::GATEWAY_TIMEOUT, reason, log)
        }
    }
}

/// A response from the origin that the proxy will not pass on: 502, blamed on the origin.
fn origin_fault(
    config: &Config,
    kind: &'static str,
    detail: &str,
    mut log: AccessLog,
) -> Response<ResponseBody> {
    log.upstream_error = Some(kind);
    tracing::warn!(target: "kmi_proxy::upstream", upstream = %config.upstream, kind, detail);
    error_response(
        StatusCode::BAD_GATEWAY,
        "invalid response from the origin",
        log,
    )
}

/// The kind of an upstream failure (for metrics: connect, timeout, tls, reset, other) and the
/// detail for the log: the innermost cause, which is the one that says what happened
/// ("Connection refused", a certificate problem).
fn describe(e: &upstream::Error) -> (&'static str, String) {
    let mut kind = if e.is_connect() { "connect" } else { "other" };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.source();
    let mut last = None;
    while let Some(c) = cause {
        if crate::tls::is_tls_error(c) {
            kind = "tls";
        } else if c.is::<upstream::ConnectTimeout>() {
            kind = "timeout";
        } else if c
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message() || h.is_closed())
        {
            // The origin closed the connection before its response was complete.
            kind = "reset";
        } else if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            match io.kind() {
                TimedOut => kind = "timeout",
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
                    if kind != "tls" =>
                {
                    kind = "reset"
                }
                _ => {}
            }
        }
        last = Some(c);
        cause = c.source();
    }
    let detail = last.map_or_else(|| e.to_string(), |c| c.to_string());
    let detail = if e.is_connect() {
        format!("cannot connect ({detail})")
    } else {
        format!("request failed ({detail})")
    };
    (kind, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn html(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        h
    }

    #[test]
    fn only_successful_html_pages_with_an_id_are_rewritten() {
        let get = Method::GET;
        let ok = StatusCode::OK;
        let utf8 = Charset::Declared(encoding_rs::UTF_8);
        assert_eq!(
            decide(&get, ok, &html("text/html"), Ok(()), false),
            Decision::Rewrite(Charset::Sniffed, None)
        );
        assert_eq!(
            decide(
                &get,
                ok,
                &html("Application/XHTML+XML; charset=utf-8"),
                Ok(()),
                false
            ),
            Decision::Rewrite(utf8, None)
        );
        assert_eq!(
            decide(&get, ok, &html("application/json"), Ok(()), false),
            Decision::NotRewritable("not_html")
        );
        assert_eq!(
            decide(&get, ok, &html("text/htmlx"), Ok(()), false),
            Decision::NotRewritable("not_html")
        );
        for status in [204, 206, 301, 304, 404, 500] {
            let s = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                decide(&get, s, &html("text/html"), Ok(()), false),
                Decision::NotRewritable("status"),
                "{status}"
            );
        }
        assert_eq!(
            decide(&Method::HEAD, ok, &html("text/html"), Ok(()), false),
            Decision::PageNotRewritten("head")
        );
        assert_eq!(
            decide(&get, ok, &html("text/html"), Err("no_id"), false),
            Decision::PageNotRewritten("no_id")
        );
        let mut h = html("text/html");
        h.insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_static("gzip"),
        );
        assert_eq!(
            decide(&get, ok, &h, Ok(()), false),
            Decision::Rewrite(Charset::Sniffed, Some(Coding::Gzip))
        );
        h.insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_static("gzip, br"),
        );
        assert_eq!(
            decide(&get, ok, &h, Ok(()), false),
            Decision::PageNotRewritten("content_encoding")
        );
        h.insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert_eq!(
            decide(&get, ok, &h, Ok(()), false),
            Decision::Rewrite(Charset::Sniffed, None)
        );
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("public, No-Transform"),
        );
        assert_eq!(
            decide(&get, ok, &h, Ok(()), false),
            Decision::PageNotRewritten("no_transform")
        );
        assert_eq!(
            decide(&get, ok, &html("text/html; charset=utf-16"), Ok(()), false),
            Decision::PageNotRewritten("charset")
        );
    }

    #[test]
    fn redirect_partners_rewrite_pages_without_an_id() {
        let get = Method::GET;
        let ok = StatusCode::OK;
        assert_eq!(
            decide(&get, ok, &html("text/html"), Err("no_id"), true),
            Decision::Rewrite(Charset::Sniffed, None)
        );
        assert_eq!(
            decide(&get, ok, &html("text/html"), Err("gpc"), false),
            Decision::PageNotRewritten("gpc")
        );
        assert_eq!(
            decide(&Method::HEAD, ok, &html("text/html"), Err("no_id"), true),
            Decision::PageNotRewritten("head")
        );
    }

    #[test]
    fn refresh_url_is_found_in_its_forms() {
        for (value, url) in [
            ("5; url=https://p.example/x", "https://p.example/x"),
            ("0;URL='https://p.example/x'", "https://p.example/x"),
            ("3, https://p.example/x", "https://p.example/x"),
            ("1; url = \"/x\"", "/x"),
        ] {
            let r = refresh_url(value).unwrap();
            assert_eq!(&value[r], url, "{value}");
        }
        assert!(refresh_url("5").is_none());
    }

    #[test]
    fn split_cookies_are_joined() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1"));
        h.append(COOKIE, HeaderValue::from_static("km_ai=x"));
        join_cookies(&mut h);
        assert_eq!(
            h.get_all(COOKIE).iter().collect::<Vec<_>>(),
            ["a=1; km_ai=x"]
        );
    }
}
