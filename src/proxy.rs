//! One request through the origin and back: the request is cleaned and forwarded, the response is
//! classified (rewrite or pass through, and why), given cache-safe headers and streamed back.

use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{
    HeaderValue, ACCEPT_RANGES, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HOST,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use url::Url;

use crate::access_log::AccessLog;
use crate::body::ResponseBody;
use crate::config::Config;
use crate::headers;
use crate::identity::{self, Identity};
use crate::rewrite::{self, Charset, Page, PageRewriter};

/// How long an idle pooled connection to the origin is kept. Below the usual origin keep-alive
/// timeouts (nginx 75 s, Apache 5 s is the outlier) so the proxy rarely reuses a connection the
/// origin is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Shared by every connection: the configuration and the pooled client to the origin.
pub struct Proxy {
    config: Arc<Config>,
    client: Client<HttpConnector, Incoming>,
}

/// Why a response is or is not rewritten. The names appear in the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Rewrite(Charset),
    /// Not a page the rewriter could ever touch (not HTML, or a status without a page).
    NotRewritable(&'static str),
    /// A page the rewriter could touch, but not this time.
    PageNotRewritten(&'static str),
}

/// Decides from the request and the response head alone, before any body byte.
pub fn decide(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
    identity: &Identity,
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
    match identity {
        Identity::Absent => return Decision::PageNotRewritten("no_id"),
        Identity::Rejected(_) => return Decision::PageNotRewritten("id_rejected"),
        Identity::Known { .. } => {}
    }
    let encoded = headers.get_all(CONTENT_ENCODING).iter().any(|v| {
        v.to_str()
            .map_or(true, |v| !v.trim().eq_ignore_ascii_case("identity"))
    });
    if encoded {
        // Compressed pages go through untouched rather than corrupted.
        return Decision::PageNotRewritten("content_encoding");
    }
    match rewrite::charset_of(content_type) {
        Ok(charset) => Decision::Rewrite(charset),
        Err(_) => Decision::PageNotRewritten("charset"),
    }
}

impl Proxy {
    pub fn new(config: Arc<Config>) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.timeouts.upstream_connect));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Proxy { config, client }
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Serves one request. Never fails: every problem becomes a response with a status and a reason.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ResponseBody> {
        let config = &self.config;
        let client_host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |pq| pq.to_string());
        let mut log = AccessLog::start(
            req.method().clone(),
            client_host.clone().unwrap_or_default(),
            req.uri().path().to_owned(),
        );
        let identity = identity::from_headers(req.headers(), &config.cookies);
        let method = req.method().clone();

        let upstream_req =
            match self.upstream_request(req, client, client_host.as_deref(), &path_and_query) {
                Ok(r) => r,
                Err(reason) => return error_response(StatusCode::BAD_REQUEST, &reason, log),
            };

        let sent = Instant::now();
        let result = tokio::time::timeout(
            config.timeouts.upstream_response,
            self.client.request(upstream_req),
        )
        .await;
        log.upstream = Some(sent.elapsed());
        let mut response = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let reason = format!("upstream {}: {}", config.upstream, describe(&e));
                tracing::warn!(target: "kmi_proxy::upstream", %reason);
                return error_response(StatusCode::BAD_GATEWAY, &reason, log);
            }
            Err(_) => {
                let reason = format!(
                    "upstream {} sent no response within {}",
                    config.upstream,
                    humantime::format_duration(config.timeouts.upstream_response)
                );
                tracing::warn!(target: "kmi_proxy::upstream", %reason);
                return error_response(StatusCode::GATEWAY_TIMEOUT, &reason, log);
            }
        };

        let status = response.status();
        log.status = status.as_u16();
        // `Via` names the protocol the message arrived over: the origin's, for a response.
        let origin_version = response.version();
        let headers = response.headers_mut();
        headers::remove_hop_by_hop(headers);
        headers::add_via(headers, origin_version);
        let decision = decide(&method, status, headers, &identity);
        if !matches!(decision, Decision::NotRewritable(_)) {
            // The same URL may be decorated for another visitor: caches must key on Cookie even
            // when this response was not rewritten.
            headers::vary_on_cookie(headers);
        }
        let (parts, body) = response.into_parts();
        let mut response = Response::from_parts(parts, ());
        let body = match (decision, identity.id()) {
            (Decision::Rewrite(charset), Some(id)) => {
                log.rewrite = "rewritten";
                let headers = response.headers_mut();
                headers::make_private(headers);
                // The rewritten length is unknown up front, and anything describing the origin's
                // exact bytes no longer holds.
                for name in [CONTENT_LENGTH, ACCEPT_RANGES] {
                    headers.remove(name);
                }
                for name in ["content-md5", "digest", "repr-digest", "content-digest"] {
                    headers.remove(name);
                }
                let page = Page {
                    url: page_url(client_host.as_deref(), &path_and_query, config),
                    charset,
                    memory_limit: config.memory_limit,
                };
                let rewriter = PageRewriter::new(Arc::clone(&config.decorator), id.clone(), page);
                log.stats = Some(rewriter.stats());
                ResponseBody::rewrite(body, rewriter, log)
            }
            (Decision::Rewrite(_), None) => unreachable!("decide() only rewrites with an ID"),
            (Decision::NotRewritable(why) | Decision::PageNotRewritten(why), _) => {
                log.rewrite = why;
                ResponseBody::passthrough(body, log)
            }
        };
        response.map(|()| body)
    }

    fn upstream_request(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
        client_host: Option<&str>,
        path_and_query: &str,
    ) -> Result<Request<Incoming>, String> {
        let config = &self.config;
        let (mut parts, body) = req.into_parts();
        parts.uri = Uri::builder()
            .scheme(config.upstream.scheme.clone())
            .authority(config.upstream.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| format!("cannot forward this request target: {e}"))?;
        // The origin sees HTTP/1.1 from us whatever the client spoke.
        let client_version = parts.version;
        parts.version = http::Version::HTTP_11;
        let h = &mut parts.headers;
        headers::remove_hop_by_hop(h);
        let host = match (config.preserve_host, client_host) {
            (true, Some(host)) => host.to_owned(),
            _ => config.upstream.authority.to_string(),
        };
        h.insert(
            HOST,
            HeaderValue::from_str(&host).map_err(|_| "invalid Host header".to_owned())?,
        );
        headers::append_list(h, headers::X_FORWARDED_FOR, &client.ip().to_string());
        h.insert(headers::X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        if let Some(Ok(v)) = client_host.map(HeaderValue::from_str) {
            h.insert(headers::X_FORWARDED_HOST, v);
        }
        headers::add_via(h, client_version);
        Ok(Request::from_parts(parts, body))
    }
}

/// The URL the browser has for this page; relative links resolve against it.
fn page_url(host: Option<&str>, path_and_query: &str, config: &Config) -> Url {
    let host = host.map_or_else(|| config.upstream.authority.to_string(), str::to_owned);
    Url::parse(&format!("http://{host}{path_and_query}"))
        .or_else(|_| {
            Url::parse(&format!(
                "http://{}{path_and_query}",
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
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

/// A one-line reason for a failed upstream request: the innermost cause, which is the one that
/// says what happened ("Connection refused", "connect timeout", "connection reset").
fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.source();
    let mut last = None;
    while let Some(c) = cause {
        last = Some(c);
        cause = c.source();
    }
    let detail = last.map_or_else(|| e.to_string(), |c| c.to_string());
    if e.is_connect() {
        format!("cannot connect ({detail})")
    } else {
        format!("request failed ({detail})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::VisitorId;

    fn known() -> Identity {
        Identity::Known {
            id: VisitorId::new("x").unwrap(),
            cookie: 0,
        }
    }

    fn html(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        h
    }

    #[test]
    fn only_successful_html_pages_with_an_id_are_rewritten() {
        let get = Method::GET;
        let ok = StatusCode::OK;
        assert_eq!(
            decide(&get, ok, &html("text/html"), &known()),
            Decision::Rewrite(Charset::Sniffed)
        );
        assert_eq!(
            decide(
                &get,
                ok,
                &html("Application/XHTML+XML; charset=utf-8"),
                &known()
            ),
            Decision::Rewrite(Charset::Declared(encoding_rs::UTF_8))
        );
        assert_eq!(
            decide(&get, ok, &html("application/json"), &known()),
            Decision::NotRewritable("not_html")
        );
        assert_eq!(
            decide(&get, ok, &html("text/htmlx"), &known()),
            Decision::NotRewritable("not_html")
        );
        for status in [204, 206, 301, 304, 404, 500] {
            let s = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                decide(&get, s, &html("text/html"), &known()),
                Decision::NotRewritable("status"),
                "{status}"
            );
        }
        assert_eq!(
            decide(&Method::HEAD, ok, &html("text/html"), &known()),
            Decision::PageNotRewritten("head")
        );
        assert_eq!(
            decide(&get, ok, &html("text/html"), &Identity::Absent),
            Decision::PageNotRewritten("no_id")
        );
        let mut gz = html("text/html");
        gz.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(
            decide(&get, ok, &gz, &known()),
            Decision::PageNotRewritten("content_encoding")
        );
        gz.insert(CONTENT_ENCODING, HeaderValue::from_static("identity"));
        assert_eq!(
            decide(&get, ok, &gz, &known()),
            Decision::Rewrite(Charset::Sniffed)
        );
        assert_eq!(
            decide(&get, ok, &html("text/html; charset=utf-16"), &known()),
            Decision::PageNotRewritten("charset")
        );
    }
}
