//! Configuration: `config.toml` text in, a validated [`Config`] out. Parsing (serde + toml, unknown
//! keys rejected) is one step, validation into types the rest of the program trusts is another;
//! nothing after this module sees raw configuration, and nothing is re-parsed per request.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::decorate::DEFAULT_REDIRECT_PATH;
use crate::decorate::{Decorator, Existing};
use crate::partner::{DomainPattern, Mode, PartnerRules, PartnerSet};
use crate::paths::PathPattern;
use crate::request::Upgrades;
use crate::script::{self, Script};
use crate::tls;

/// The file as operators write it. Every table is optional except `upstream`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    listen_tls: Option<String>,
    upstream: Option<String>,
    upstream_ca: Option<String>,
    tls: Option<RawTls>,
    preserve_host: Option<bool>,
    via_upstream: Option<bool>,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    rewrite: RawRewrite,
    #[serde(default)]
    timeouts: RawTimeouts,
    shutdown_timeout: Option<String>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    limits: RawLimits,
    exclude_paths: Option<Vec<String>>,
    #[serde(default)]
    consent: RawConsent,
    #[serde(default)]
    redirect: RawRedirect,
    #[serde(default)]
    script: RawScript,
    upgrades: Option<Vec<String>>,
    #[serde(default)]
    partner: Vec<RawPartner>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    cookies: Option<Vec<String>>,
    param: Option<String>,
    existing: Option<Existing>,
    response_header: Option<String>,
    request_header: Option<String>,
    trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsent {
    cookie: Option<String>,
    contains: Option<String>,
    honor_gpc: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedirect {
    path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScript {
    inject: Option<bool>,
    path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRewrite {
    memory_limit: Option<i64>,
    cache_bytes: Option<i64>,
    fetch_recorded_uncompressed: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    client_header: Option<String>,
    client_idle: Option<String>,
    upstream_connect: Option<String>,
    upstream_response: Option<String>,
    upstream_body_idle: Option<String>,
    tunnel_idle: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<i64>,
    max_header_bytes: Option<i64>,
    max_rewrites: Option<i64>,
    workers: Option<i64>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (the default).
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    #[serde(default)]
    certificate: Vec<RawCertificate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    hosts: Vec<String>,
    cert: String,
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPartner {
    name: String,
    domains: Vec<String>,
    forms: Option<bool>,
    mode: Option<Mode>,
    paths: Option<Vec<String>>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_MEMORY_LIMIT: usize = 4 * 1024 * 1024;
pub const DEFAULT_CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Below this lol_html cannot hold even one `<a>` tag, so every page would bail out.
pub const MIN_MEMORY_LIMIT: usize = 4096;

/// The validated configuration. Cheap to share: the proxy holds it in an `Arc`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The plain HTTP listener (HTTP/1.1 and h2c prior knowledge).
    pub listen: Option<SocketAddr>,
    /// The TLS listener (ALPN h2 and http/1.1); always set together with `tls`.
    pub listen_tls: Option<SocketAddr>,
    pub tls: Option<TlsListener>,
    pub upstream: Upstream,
    /// Forward the client's `Host` (the default: origins route virtual hosts on it) rather than
    /// the upstream's own authority.
    pub preserve_host: bool,
    /// Add this hop to `Via` on requests to the origin. Off by default, as in nginx, Envoy and
    /// HAProxy: nginx's default `gzip_proxied off` stops compressing any request with `Via`.
    pub via_upstream: bool,
    /// Identity cookie names in precedence order.
    pub cookies: Vec<String>,
    /// Server-side identity: a response header the origin sets with this page's ID (removed
    /// before the client), and a request header a trusted front tier sets (removed before the
    /// origin; honoured only from `trusted_proxies`).
    pub response_header: Option<http::HeaderName>,
    pub request_header: Option<http::HeaderName>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Request paths whose pages are never rewritten.
    pub exclude_paths: Vec<PathPattern>,
    pub consent: Consent,
    pub decorator: Arc<Decorator>,
    /// lol_html's buffering limit per page, in bytes.
    pub memory_limit: usize,
    /// Bytes of recorded rewrites kept for splicing; 0 turns splicing off.
    pub cache_bytes: usize,
    /// Ask the origin for a recorded page uncompressed (`Accept-Encoding: identity`) and
    /// compress it for the client from the recording: the origin saves compressing every
    /// response, the link to it carries the page uncompressed. On by default: the proxy runs in
    /// front of its origin, on the same host or network; `false` for an origin across a WAN.
    pub fetch_recorded_uncompressed: bool,
    pub timeouts: Timeouts,
    pub limits: Limits,
    /// How long in-flight requests may run after SIGTERM before connections are dropped.
    pub shutdown_timeout: Duration,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// The protocols a client may switch to through the proxy (`Upgrade`); never `h2c`.
    pub upgrades: Upgrades,
    /// The click-time link script injected into rewritten pages (`[script] inject = true`),
    /// generated once from this configuration.
    pub script: Option<Arc<Script>>,
    /// Where the script is served (`[script] path`), kept when `inject` is off so `check` can
    /// print it.
    pub script_path: String,
}

/// Values from the environment that take precedence over the file, as containers are usually
/// configured (`KMI_PROXY_LISTEN`, `KMI_PROXY_UPSTREAM`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub listen: Option<String>,
    pub upstream: Option<String>,
}

impl Overrides {
    /// Reads `KMI_PROXY_LISTEN` and `KMI_PROXY_UPSTREAM`.
    pub fn from_env() -> Overrides {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Overrides {
            listen: var("KMI_PROXY_LISTEN"),
            upstream: var("KMI_PROXY_UPSTREAM"),
        }
    }
}

/// Where requests go.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// For `https://`: rustls client settings with the bundled roots plus `upstream_ca`.
    pub tls: Option<Arc<tls::ClientConfig>>,
    /// The `upstream_ca` file, as configured (for `check`).
    pub ca_file: Option<PathBuf>,
}

/// The TLS listener's certificates, loaded and checked at configuration time.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub server: Arc<tls::ServerConfig>,
    /// The default certificate's files, if any.
    pub default_files: Option<(PathBuf, PathBuf)>,
    /// `(hosts, cert, key)` of each SNI certificate.
    pub sni_files: Vec<(Vec<String>, PathBuf, PathBuf)>,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A client must send a request's headers within this; it also bounds how long an HTTP/1.1
    /// connection waits for its next request (hyper starts the same timer while it waits).
    pub client_header: Duration,
    /// A connection with no request in flight for this long is closed.
    pub client_idle: Duration,
    /// TCP connect (and TLS handshake) to the origin; past it the request fails with 502.
    pub upstream_connect: Duration,
    /// From the end of the request body to the origin's response headers; past it, 504. While the
    /// body is sent, also the longest the origin may leave a piece of it unread (504).
    pub upstream_response: Duration,
    /// The longest pause between two pieces of the origin's response body; past it the client's
    /// response ends in an error.
    pub upstream_body_idle: Duration,
    /// A tunnel (WebSocket) with no byte either way for this long is closed.
    pub tunnel_idle: Duration,
}

/// When a visitor's ID may be put into links.
#[derive(Debug, Clone, Default)]
pub struct Consent {
    /// Decorate only when this cookie is present ...
    pub cookie: Option<String>,
    /// ... and, if set, its percent-decoded value contains this token.
    pub contains: Option<String>,
    /// A request with `Sec-GPC: 1` (Global Privacy Control) is never decorated.
    pub honor_gpc: bool,
}

/// Resource limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Client connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// The largest request head accepted; a bigger one gets 431.
    pub max_header_bytes: usize,
    /// Pages rewritten at once across all connections; further ones queue (see
    /// `body::RewriteBudget`).
    pub max_rewrites: usize,
    /// Threads that serve client connections, each with a runtime of its own (see
    /// `server::Workers`); by default one per CPU the process may use.
    pub workers: usize,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_MAX_REWRITES: usize = 256;
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// One worker per CPU this process may run on (its affinity and cgroup quota count).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
/// hyper cannot read a request head into a buffer smaller than this.
pub const MIN_HEADER_BYTES: usize = 8192;

/// One thing wrong with the file: where, what value, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub value: String,
    pub message: String,
}

/// Everything wrong with one configuration file, reported at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {} problem{}",
            self.file,
            n,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            if p.key.is_empty() {
                write!(f, "\n  {}", p.message)?;
            } else {
                write!(f, "\n  {} = {}: {}", p.key, p.value, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Things that are valid but probably not what the operator wants, for `check` to print.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.cookies.iter().any(|c| c == "km_ni") {
            w.push(
                "identity.cookies forwards km_ni, KM's named identity, which is often an email address; \
                 cookies = [\"km_ai\"] forwards only the anonymous ID"
                    .to_owned(),
            );
        }
        if self.decorator.partners.is_empty() {
            w.push("no [[partner]] is configured: no link will ever be decorated".to_owned());
        }
        w
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            problems: vec![Problem {
                key: String::new(),
                value: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        Config::parse_with(&text, &file, &Overrides::from_env())
    }

    /// Parses and validates configuration text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, file, &Overrides::default())
    }

    /// Parses with environment overrides applied on top of the file.
    pub fn parse_with(
        text: &str,
        file: &str,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_owned(),
            problems: vec![Problem {
                key: String::new(),
                value: String::new(),
                message: e.to_string().trim_end().replace('\n', "\n  "),
            }],
        })?;
        if let Some(listen) = &overrides.listen {
            raw.listen = Some(listen.clone());
        }
        if let Some(upstream) = &overrides.upstream {
            raw.upstream = Some(upstream.clone());
        }
        let mut v = Validator {
            problems: Vec::new(),
            dir: Path::new(file)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        let config = v.config(raw);
        // A value that came from the environment is reported under the variable's name.
        for p in &mut v.problems {
            match p.key.as_str() {
                "listen" if overrides.listen.is_some() => p.key = "KMI_PROXY_LISTEN".into(),
                "upstream" if overrides.upstream.is_some() => p.key = "KMI_PROXY_UPSTREAM".into(),
                _ => {}
            }
        }
        match config {
            Some(c) if v.problems.is_empty() => Ok(c),
            _ => Err(ConfigError {
                file: file.to_owned(),
                problems: v.problems,
            }),
        }
    }
}

struct Validator {
    problems: Vec<Problem>,
    /// Relative paths in the file are relative to the file's own directory.
    dir: PathBuf,
}

impl Validator {
    fn problem(
        &mut self,
        key: impl Into<String>,
        value: impl fmt::Debug,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            key: key.into(),
            value: format!("{value:?}"),
            message: message.into(),
        });
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        // With no listener named at all, the plain default; a TLS-only proxy leaves `listen` out.
        let listen_text = match (&raw.listen, &raw.listen_tls) {
            (None, None) => Some(DEFAULT_LISTEN.to_owned()),
            (l, _) => l.clone(),
        };
        let listen = listen_text.as_deref().and_then(|l| self.addr("listen", l));
        let listen_tls = raw
            .listen_tls
            .as_deref()
            .and_then(|l| self.addr("listen_tls", l));
        let tls = match (&raw.listen_tls, raw.tls) {
            (Some(_), Some(t)) => self.tls(t),
            (Some(l), None) => {
                self.problem("listen_tls", l, "needs a [tls] table with cert and key");
                None
            }
            (None, Some(_)) => {
                self.problem(
                    "tls",
                    "",
                    "a [tls] table needs listen_tls to say where to listen",
                );
                None
            }
            (None, None) => None,
        };
        let upstream_ca = raw.upstream_ca.and_then(|ca| {
            let path = self.path(&ca);
            match tls::load_roots(&path) {
                Ok(roots) => Some((path, roots)),
                Err(why) => {
                    self.problem("upstream_ca", &ca, why);
                    None
                }
            }
        });
        let upstream = match raw.upstream {
            None => {
                self.problem(
                    "upstream",
                    "",
                    "missing: the origin to proxy to, e.g. \"http://127.0.0.1:3000\"",
                );
                None
            }
            Some(u) => self.upstream(&u, upstream_ca),
        };
        let cookies = raw
            .identity
            .cookies
            .unwrap_or_else(|| vec!["km_ni".into(), "km_ai".into()]);
        if cookies.is_empty() {
            self.problem(
                "identity.cookies",
                &cookies,
                "list at least one cookie name",
            );
        }
        for (i, c) in cookies.iter().enumerate() {
            if c.is_empty() || !c.bytes().all(is_token_byte) {
                self.problem(
                    format!("identity.cookies[{i}]"),
                    c,
                    "not a valid cookie name",
                );
            }
        }
        let param = raw.identity.param.unwrap_or_else(|| "kmi".into());
        if param.is_empty()
            || !param
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        {
            self.problem(
                "identity.param",
                &param,
                "use only ASCII letters, digits and -._~ so the name needs no encoding in a URL",
            );
        }
        let memory_limit = match raw.rewrite.memory_limit {
            None => DEFAULT_MEMORY_LIMIT,
            Some(n) if n >= MIN_MEMORY_LIMIT as i64 => n as usize,
            Some(n) => {
                self.problem(
                    "rewrite.memory_limit",
                    n,
                    format!("must be at least {MIN_MEMORY_LIMIT} bytes (lol_html needs about 2.3 KiB to hold one link)"),
                );
                DEFAULT_MEMORY_LIMIT
            }
        };
        let cache_bytes = match raw.rewrite.cache_bytes {
            None => DEFAULT_CACHE_BYTES,
            Some(n) if n >= 0 => n as usize,
            Some(n) => {
                self.problem(
                    "rewrite.cache_bytes",
                    n,
                    "bytes of recorded pages to keep: 0 (splicing off) or more",
                );
                DEFAULT_CACHE_BYTES
            }
        };
        let t = raw.timeouts;
        let timeouts = Timeouts {
            client_header: self.duration("timeouts.client_header", t.client_header, 30),
            client_idle: self.duration("timeouts.client_idle", t.client_idle, 60),
            upstream_connect: self.duration("timeouts.upstream_connect", t.upstream_connect, 5),
            upstream_response: self.duration("timeouts.upstream_response", t.upstream_response, 30),
            upstream_body_idle: self.duration(
                "timeouts.upstream_body_idle",
                t.upstream_body_idle,
                60,
            ),
            tunnel_idle: self.duration("timeouts.tunnel_idle", t.tunnel_idle, 300),
        };
        let shutdown_timeout = self.duration("shutdown_timeout", raw.shutdown_timeout, 30);
        let limits = Limits {
            max_connections: self.count(
                "limits.max_connections",
                raw.limits.max_connections,
                1,
                DEFAULT_MAX_CONNECTIONS,
            ),
            max_header_bytes: self.count(
                "limits.max_header_bytes",
                raw.limits.max_header_bytes,
                MIN_HEADER_BYTES,
                DEFAULT_MAX_HEADER_BYTES,
            ),
            max_rewrites: self.count(
                "limits.max_rewrites",
                raw.limits.max_rewrites,
                1,
                DEFAULT_MAX_REWRITES,
            ),
            workers: self.count("limits.workers", raw.limits.workers, 1, default_workers()),
        };
        let admin = raw
            .admin
            .map(|a| a.listen.unwrap_or_else(|| "127.0.0.1:9090".to_owned()))
            .and_then(|a| self.addr("admin.listen", &a));
        let partners = self.partners(raw.partner);
        let redirect_path = raw
            .redirect
            .path
            .unwrap_or_else(|| DEFAULT_REDIRECT_PATH.to_owned());
        if let Err(why) = endpoint_path(&redirect_path) {
            self.problem(
                "redirect.path",
                &redirect_path,
                format!("{why}; a path of its own on this site, like \"/_kmi/out\""),
            );
        }
        let script_path = raw
            .script
            .path
            .unwrap_or_else(|| script::DEFAULT_PATH.to_owned());
        if let Err(why) = endpoint_path(&script_path) {
            self.problem(
                "script.path",
                &script_path,
                format!("{why}; a path of its own on this site, like \"/_kmi/links.js\""),
            );
        } else if script_path == redirect_path {
            self.problem(
                "script.path",
                &script_path,
                "redirect.path already answers this path; give the script a path of its own",
            );
        }
        let decorator = Arc::new(Decorator {
            partners,
            param,
            existing: raw.identity.existing.unwrap_or_default(),
            redirect_path,
        });
        let header = |v: &mut Validator, key: &str, name: Option<String>| {
            name.and_then(|n| match http::HeaderName::from_bytes(n.as_bytes()) {
                Ok(h) => Some(h),
                Err(_) => {
                    v.problem(key, &n, "not a valid header name");
                    None
                }
            })
        };
        let response_header = header(
            self,
            "identity.response_header",
            raw.identity.response_header,
        );
        let request_header = header(self, "identity.request_header", raw.identity.request_header);
        let mut trusted_proxies = Vec::new();
        for (i, cidr) in raw
            .identity
            .trusted_proxies
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            match cidr
                .parse::<ipnet::IpNet>()
                .or_else(|_| cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            {
                Ok(net) => trusted_proxies.push(net),
                Err(_) => self.problem(
                    format!("identity.trusted_proxies[{i}]"),
                    cidr,
                    "not an IP address or CIDR range like \"10.0.0.0/8\"",
                ),
            }
        }
        if request_header.is_some() && trusted_proxies.is_empty() {
            self.problem(
                "identity.trusted_proxies",
                "[]",
                "identity.request_header is only honoured from trusted front tiers: list their addresses",
            );
        }
        let mut exclude_paths = Vec::new();
        for (i, p) in raw.exclude_paths.unwrap_or_default().iter().enumerate() {
            match PathPattern::parse(p) {
                Ok(pattern) => exclude_paths.push(pattern),
                Err(why) => self.problem(format!("exclude_paths[{i}]"), p, why),
            }
        }
        let consent = Consent {
            cookie: raw.consent.cookie,
            contains: raw.consent.contains,
            honor_gpc: raw.consent.honor_gpc.unwrap_or(true),
        };
        if consent.contains.is_some() && consent.cookie.is_none() {
            self.problem(
                "consent.contains",
                consent.contains.as_deref().unwrap_or(""),
                "needs consent.cookie to say which cookie to look in",
            );
        }
        let script = raw
            .script
            .inject
            .unwrap_or(false)
            .then(|| Arc::new(Script::new(&decorator, &cookies, &consent, &script_path)));
        let upgrades = match raw.upgrades.as_deref().map(Upgrades::new) {
            None => Upgrades::default(),
            Some(Ok(u)) => u,
            Some(Err((name, why))) => {
                self.problem("upgrades", name, why);
                Upgrades::default()
            }
        };
        if (listen_text.is_some() && listen.is_none())
            || (raw.listen_tls.is_some() && (listen_tls.is_none() || tls.is_none()))
        {
            return None;
        }
        Some(Config {
            listen,
            listen_tls,
            tls,
            upstream: upstream?,
            preserve_host: raw.preserve_host.unwrap_or(true),
            via_upstream: raw.via_upstream.unwrap_or(false),
            cookies,
            response_header,
            request_header,
            trusted_proxies,
            exclude_paths,
            consent,
            decorator,
            memory_limit,
            cache_bytes,
            fetch_recorded_uncompressed: raw.rewrite.fetch_recorded_uncompressed.unwrap_or(true),
            timeouts,
            limits,
            shutdown_timeout,
            admin,
            log_format: raw.log.format.unwrap_or_default(),
            upgrades,
            script,
            script_path,
        })
    }

    fn addr(&mut self, key: &str, text: &str) -> Option<SocketAddr> {
        text.parse::<SocketAddr>()
            .map_err(|e| self.problem(key, text, format!("not an IP:port address ({e})")))
            .ok()
    }

    fn path(&self, text: &str) -> PathBuf {
        self.dir.join(text)
    }

    fn tls(&mut self, raw: RawTls) -> Option<TlsListener> {
        let mut ok = true;
        let mut load = |v: &mut Validator, key: &str, cert: &str, key_file: &str| {
            let (c, k) = (v.path(cert), v.path(key_file));
            match tls::load_cert(&c, &k) {
                Ok(loaded) => Some((loaded, c, k)),
                Err(why) => {
                    v.problem(key, cert, why);
                    ok = false;
                    None
                }
            }
        };
        let default = match (&raw.cert, &raw.key) {
            (Some(c), Some(k)) => load(self, "tls.cert", c, k),
            (None, None) => None,
            (Some(c), None) => {
                self.problem("tls.key", "", format!("missing: the private key for {c}"));
                return None;
            }
            (None, Some(k)) => {
                self.problem("tls.cert", "", format!("missing: the certificate for {k}"));
                return None;
            }
        };
        let mut sni = Vec::new();
        let mut sni_files = Vec::new();
        for (i, c) in raw.certificate.iter().enumerate() {
            if c.hosts.is_empty() {
                self.problem(
                    format!("tls.certificate[{i}].hosts"),
                    &c.hosts,
                    "list at least one host name",
                );
            }
            if let Some((loaded, cp, kp)) =
                load(self, &format!("tls.certificate[{i}].cert"), &c.cert, &c.key)
            {
                for h in &c.hosts {
                    sni.push((h.clone(), loaded.clone()));
                }
                sni_files.push((c.hosts.clone(), cp, kp));
            }
        }
        if default.is_none() && raw.certificate.is_empty() {
            self.problem(
                "tls",
                "",
                "give a default certificate (cert and key) or at least one [[tls.certificate]]",
            );
            return None;
        }
        if !ok {
            return None;
        }
        let default_files = default.as_ref().map(|(_, c, k)| (c.clone(), k.clone()));
        Some(TlsListener {
            server: tls::server_config(default.map(|(l, _, _)| l), sni),
            default_files,
            sni_files,
        })
    }

    fn upstream(
        &mut self,
        text: &str,
        ca: Option<(PathBuf, tls::RootCertStore)>,
    ) -> Option<Upstream> {
        let url = match url::Url::parse(text) {
            Ok(u) => u,
            Err(e) => {
                self.problem("upstream", text, format!("not a URL ({e})"));
                return None;
            }
        };
        let scheme = match url.scheme() {
            "http" => http::uri::Scheme::HTTP,
            "https" => http::uri::Scheme::HTTPS,
            _ => {
                self.problem("upstream", text, "use an http:// or https:// origin");
                return None;
            }
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            self.problem(
                "upstream",
                text,
                "give scheme, host and port only; request paths are forwarded as they are",
            );
            return None;
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.problem(
                "upstream",
                text,
                "credentials in the upstream URL are not supported",
            );
            return None;
        }
        let host = url.host_str()?;
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        match authority.parse() {
            Ok(authority) => {
                let tls = (scheme == http::uri::Scheme::HTTPS)
                    .then(|| Arc::new(tls::client_config(ca.as_ref().map(|(_, roots)| roots))));
                Some(Upstream {
                    scheme,
                    authority,
                    tls,
                    ca_file: ca.map(|(path, _)| path),
                })
            }
            Err(e) => {
                self.problem("upstream", text, format!("not a valid authority ({e})"));
                None
            }
        }
    }

    fn count(&mut self, key: &str, value: Option<i64>, min: usize, default: usize) -> usize {
        match value {
            None => default,
            Some(n) if n >= min as i64 => n as usize,
            Some(n) => {
                self.problem(key, n, format!("must be at least {min}"));
                default
            }
        }
    }

    fn duration(&mut self, key: &str, value: Option<String>, default_secs: u64) -> Duration {
        let Some(text) = value else {
            return Duration::from_secs(default_secs);
        };
        match humantime::parse_duration(&text) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.problem(key, &text, "must be longer than zero");
                Duration::from_secs(default_secs)
            }
            Err(e) => {
                self.problem(
                    key,
                    &text,
                    format!("not a duration such as \"5s\" or \"250ms\" ({e})"),
                );
                Duration::from_secs(default_secs)
            }
        }
    }

    fn partners(&mut self, raw: Vec<RawPartner>) -> PartnerSet {
        let mut set = PartnerSet::default();
        let mut names = std::collections::HashSet::new();
        for (i, p) in raw.into_iter().enumerate() {
            if p.name.trim().is_empty() {
                self.problem(
                    format!("partner[{i}].name"),
                    &p.name,
                    "give the partner a name (it labels logs and metrics)",
                );
            } else if !names.insert(p.name.clone()) {
                self.problem(
                    format!("partner[{i}].name"),
                    &p.name,
                    "another partner already has this name",
                );
            }
            if p.domains.is_empty() {
                self.problem(
                    format!("partner[{i}].domains"),
                    &p.domains,
                    "list at least one domain",
                );
            }
            let mut patterns = Vec::new();
            for (j, d) in p.domains.iter().enumerate() {
                match DomainPattern::parse(d) {
                    Ok(pattern) => patterns.push(pattern),
                    Err(why) => self.problem(format!("partner[{i}].domains[{j}]"), d, why),
                }
            }
            set.push(p.name, patterns);
            let mut paths = Vec::new();
            for (j, path) in p.paths.unwrap_or_default().iter().enumerate() {
                match PathPattern::parse(path) {
                    Ok(pattern) => paths.push(pattern),
                    Err(why) => self.problem(format!("partner[{i}].paths[{j}]"), path, why),
                }
            }
            let mode = p.mode.unwrap_or_default();
            let forms = p.forms.unwrap_or(false);
            if forms && mode == Mode::Redirect {
                self.problem(
                    format!("partner[{i}].forms"),
                    true,
                    "forms are decorated inline only: a redirect cannot carry a form's fields; use mode = \"inline\" for this partner",
                );
            }
            set.set_rules(PartnerRules { forms, mode, paths });
        }
        set
    }
}

/// RFC 9110 token characters, which is what a cookie name may contain.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The effective configuration in the file's own syntax, for `kmi-proxy check`.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decorator;
        if let Some(l) = self.listen {
            writeln!(f, "listen = \"{l}\"")?;
        }
        if let Some(l) = self.listen_tls {
            writeln!(f, "listen_tls = \"{l}\"")?;
        }
        writeln!(f, "upstream = \"{}\"", self.upstream)?;
        if let Some(ca) = &self.upstream.ca_file {
            writeln!(f, "upstream_ca = {:?}", ca.display().to_string())?;
        }
        writeln!(f, "preserve_host = {}", self.preserve_host)?;
        writeln!(
            f,
            "shutdown_timeout = \"{}\"",
            humantime::format_duration(self.shutdown_timeout)
        )?;
        let excluded: Vec<&str> = self.exclude_paths.iter().map(PathPattern::as_str).collect();
        writeln!(f, "exclude_paths = {excluded:?}")?;
        writeln!(f, "\n[identity]")?;
        writeln!(f, "cookies = {:?}", self.cookies)?;
        if let Some(h) = &self.response_header {
            writeln!(f, "response_header = {:?}", h.as_str())?;
        }
        if let Some(h) = &self.request_header {
            writeln!(f, "request_header = {:?}", h.as_str())?;
        }
        let trusted: Vec<String> = self
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        writeln!(f, "trusted_proxies = {trusted:?}")?;
        writeln!(f, "param = \"{}\"", d.param)?;
        let existing = match d.existing {
            Existing::Keep => "keep",
            Existing::Replace => "replace",
        };
        writeln!(f, "existing = \"{existing}\"")?;
        writeln!(f, "\n[rewrite]\nmemory_limit = {}", self.memory_limit)?;
        writeln!(f, "cache_bytes = {}", self.cache_bytes)?;
        writeln!(
            f,
            "fetch_recorded_uncompressed = {}",
            self.fetch_recorded_uncompressed
        )?;
        writeln!(f, "\n[consent]")?;
        if let Some(c) = &self.consent.cookie {
            writeln!(f, "cookie = {c:?}")?;
        }
        if let Some(c) = &self.consent.contains {
            writeln!(f, "contains = {c:?}")?;
        }
        writeln!(f, "honor_gpc = {}", self.consent.honor_gpc)?;
        writeln!(f, "\n[redirect]\npath = {:?}", d.redirect_path)?;
        writeln!(f, "\n[script]")?;
        match &self.script {
            Some(s) => writeln!(
                f,
                "# Rewritten pages get <script src=\"{}\"> ({} bytes, the same for every visitor;\n\
                 # the ID is read in the browser at click time) where their Content-Security-Policy\n\
                 # lets it run; elsewhere nothing is injected.\ninject = true",
                s.src(),
                s.js.len()
            )?,
            None => writeln!(
                f,
                "# Links that the page's own scripts create are not decorated.\ninject = false"
            )?,
        }
        writeln!(f, "path = {:?}", self.script_path)?;
        let t = &self.timeouts;
        writeln!(f, "\n[timeouts]")?;
        for (key, value) in [
            ("client_header", t.client_header),
            ("client_idle", t.client_idle),
            ("upstream_connect", t.upstream_connect),
            ("upstream_response", t.upstream_response),
            ("upstream_body_idle", t.upstream_body_idle),
        ] {
            writeln!(f, "{key} = \"{}\"", humantime::format_duration(value))?;
        }
        writeln!(f, "\n[limits]")?;
        writeln!(f, "max_connections = {}", self.limits.max_connections)?;
        writeln!(f, "max_header_bytes = {}", self.limits.max_header_bytes)?;
        writeln!(f, "max_rewrites = {}", self.limits.max_rewrites)?;
        writeln!(f, "workers = {}", self.limits.workers)?;
        writeln!(f, "\n[log]")?;
        let format = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        writeln!(f, "format = \"{format}\"")?;
        if let Some(admin) = self.admin {
            writeln!(f, "\n[admin]\nlisten = \"{admin}\"")?;
        }
        if let Some(tls) = &self.tls {
            writeln!(f, "\n[tls]")?;
            if let Some((c, k)) = &tls.default_files {
                writeln!(
                    f,
                    "cert = {:?}\nkey = {:?}",
                    c.display().to_string(),
                    k.display().to_string()
                )?;
            }
            for (hosts, c, k) in &tls.sni_files {
                writeln!(
                    f,
                    "\n[[tls.certificate]]\nhosts = {hosts:?}\ncert = {:?}\nkey = {:?}",
                    c.display().to_string(),
                    k.display().to_string()
                )?;
            }
        }
        for i in 0..d.partners.len() {
            let domains: Vec<String> = d
                .partners
                .patterns(i)
                .iter()
                .map(|p| p.to_string())
                .collect();
            let rules = d.partners.rules(i);
            let mode = match rules.mode {
                Mode::Inline => "inline",
                Mode::Redirect => "redirect",
            };
            let paths: Vec<&str> = rules.paths.iter().map(PathPattern::as_str).collect();
            writeln!(
                f,
                "\n[[partner]]\nname = {:?}\ndomains = {:?}\nforms = {}\nmode = {mode:?}\npaths = {paths:?}",
                d.partners.name(i),
                domains,
                rules.forms
            )?;
        }
        Ok(())
    }
}

/// Whether `path` can be one of the proxy's own endpoints (`redirect.path`, `script.path`): the
/// proxy compares it with the request's path as sent and writes it into pages (the script tag's
/// `src`, redirect links), so it must be a path a browser requests exactly as written and that
/// reads the same inside an HTML attribute. Hence only RFC 3986 path characters that no browser
/// changes: letters, digits, `-._~!$'()*+,;=:@` and `/`. Not `%` (an escape may be decoded or
/// re-encoded on the way), `&` (a character reference in an attribute), `"`, `<`, `>`, `\`,
/// whitespace, controls or non-ASCII; no `.` or `..` segment (browsers remove them) and no `//`
/// at the start (a `src` of `//host/...` names another site).
fn endpoint_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("a path starts with `/`".into());
    }
    if path == "/" {
        return Err("`/` is the site's home page".into());
    }
    if let Some(c) = path
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "-._~!$'()*+,;=:@/".contains(c)))
    {
        return Err(format!(
            "{c:?} cannot be in it (only letters, digits and -._~!$'()*+,;=:@/)"
        ));
    }
    if path.starts_with("//") {
        return Err("`//` at the start would name another host".into());
    }
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err("browsers remove `.` and `..` segments before they ask".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        Config::parse(text, "test.toml").unwrap_err().problems
    }

    #[test]
    fn minimal_file_gets_the_defaults() {
        let c = Config::parse(
            "listen = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:3000\"",
            "t",
        )
        .unwrap();
        assert_eq!(
            c.listen.map(|l| l.to_string()).as_deref(),
            Some(DEFAULT_LISTEN)
        );
        assert!(c.listen_tls.is_none() && c.tls.is_none());
        assert_eq!(c.cookies, ["km_ni", "km_ai"]);
        assert_eq!(c.decorator.param, "kmi");
        assert_eq!(c.decorator.existing, Existing::Keep);
        assert!(c.preserve_host);
        assert_eq!(c.upstream.to_string(), "http://127.0.0.1:3000");
    }

    #[test]
    fn every_problem_is_reported_with_key_and_value() {
        let p = problems(
            r#"
            listen = "localhost"
            upstream = "ftp://origin"
            [identity]
            param = "k m i"
            cookies = []
            [timeouts]
            upstream_connect = "soon"
            [[partner]]
            name = "a"
            domains = ["https://x.com", "*.ok.com"]
            [[partner]]
            name = "a"
            domains = []
            "#,
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "listen",
                "upstream",
                "identity.cookies",
                "identity.param",
                "timeouts.upstream_connect",
                "partner[0].domains[0]",
                "partner[1].name",
                "partner[1].domains",
            ]
        );
        assert_eq!(p[5].value, "\"https://x.com\"");
        let shown = ConfigError {
            file: "test.toml".into(),
            problems: p,
        }
        .to_string();
        assert!(shown.starts_with("test.toml: 8 problems"), "{shown}");
        assert!(
            shown.contains("partner[0].domains[0] = \"https://x.com\": write a host name only"),
            "{shown}"
        );
    }

    #[test]
    fn environment_overrides_the_file_and_is_named_in_errors() {
        let text = "listen = \"127.0.0.1:1\"\nupstream = \"http://a\"\n";
        let env = Overrides {
            listen: Some("0.0.0.0:8081".into()),
            upstream: Some("https://origin.internal:8443".into()),
        };
        let c = Config::parse_with(text, "t", &env).unwrap();
        assert_eq!(c.listen.unwrap().to_string(), "0.0.0.0:8081");
        assert_eq!(c.upstream.to_string(), "https://origin.internal:8443");
        let bad = Overrides {
            listen: Some("nowhere".into()),
            upstream: None,
        };
        let e = Config::parse_with(text, "t", &bad).unwrap_err();
        assert_eq!(e.problems[0].key, "KMI_PROXY_LISTEN");
        assert_eq!(e.problems[0].value, "\"nowhere\"");
    }

    #[test]
    fn operations_settings_are_validated() {
        let p = problems(
            "upstream = \"http://a\"\nshutdown_timeout = \"0s\"\n[admin]\nlisten = \"x\"\n[limits]\nmax_connections = 0\nmax_header_bytes = 100\n[log]\nformat = \"xml\"\n",
        );
        assert!(p[0].message.contains("xml"), "{p:?}");
        let p = problems(
            "upstream = \"http://a\"\nshutdown_timeout = \"0s\"\n[admin]\nlisten = \"x\"\n[limits]\nmax_connections = 0\nmax_header_bytes = 100\nworkers = 0\n",
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "shutdown_timeout",
                "limits.max_connections",
                "limits.max_header_bytes",
                "limits.workers",
                "admin.listen"
            ]
        );
        assert_eq!(p[3].value, "0");
        assert!(p[3].message.contains("at least 1"), "{:?}", p[3]);
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let p = problems(
            "listen = \"127.0.0.1:1\"\nupstream = \"http://a\"\n[identity]\ncookie = [\"x\"]\n",
        );
        assert!(
            p[0].message.contains("unknown field `cookie`"),
            "{:?}",
            p[0]
        );
        let p = problems("listen = \"127.0.0.1:1\"\nupstream = \"http://a\"\n[identity]\nexisting = \"overwrite\"\n");
        assert!(p[0].message.contains("overwrite"), "{:?}", p[0]);
    }

    /// `[script] path` and `[redirect] path` are paths the proxy answers and writes into pages
    /// (the tag's `src`, the redirect links): one a browser would request exactly as written.
    #[test]
    fn an_endpoint_path_must_be_one_a_browser_requests_as_written() {
        for (key, other) in [("script", "redirect"), ("redirect", "script")] {
            // The other endpoint somewhere none of these paths are.
            let other = format!("upstream = \"http://a\"\n[{other}]\npath = \"/_kmi/other\"\n");
            for bad in [
                "_kmi/links.js",
                "",
                "/",
                "/_kmi/links.js?v=1",
                "/_kmi/links.js#x",
                "/_kmi/links .js",
                "/_kmi/links\t.js",
                "/_kmi/links.js\n",
                "/_kmi/\u{7f}.js",
                "/_kmi/links\".js",
                "/_kmi/<links>.js",
                "/_kmi/links.js&amp",
                "/_kmi\\links.js",
                "/_kmi/l%69nks.js",
                "/_kmi/lïnks.js",
                "/_kmi/`{|}^.js",
                "//cdn.example/links.js",
                "/_kmi/./links.js",
                "/_kmi/../links.js",
                "/_kmi/..",
            ] {
                let value = toml::Value::String(bad.into());
                let text = format!("{other}[{key}]\npath = {value}\n");
                let p = Config::parse(&text, "t")
                    .map(|_| ())
                    .expect_err(&format!("{key}.path = {bad:?} was accepted"));
                assert_eq!(p.problems.len(), 1, "{key}.path = {bad:?}: {p}");
                assert_eq!(p.problems[0].key, format!("{key}.path"), "{bad:?}");
                assert_eq!(p.problems[0].value, format!("{bad:?}"));
            }
            for good in [
                "/_kmi/links.js",
                "/a",
                "/_kmi/",
                "/k-m_i.~/l!$'()*+,;=:@.js",
                "/.well-known/kmi/links.js",
                "/_kmi/links..js",
            ] {
                let value = toml::Value::String(good.into());
                let text = format!("{other}[{key}]\npath = {value}\n");
                if let Err(e) = Config::parse(&text, "t") {
                    panic!("{key}.path = {good:?} was refused: {e}");
                }
            }
        }
    }

    #[test]
    fn fetching_recorded_pages_uncompressed_is_on_unless_turned_off() {
        let base = "upstream = \"http://127.0.0.1:1\"\n[[partner]]\nname = \"p\"\ndomains = [\"p.example\"]\n";
        assert!(
            Config::parse(base, "t")
                .unwrap()
                .fetch_recorded_uncompressed
        );
        let off = format!("{base}[rewrite]\nfetch_recorded_uncompressed = false\n");
        let c = Config::parse(&off, "t").unwrap();
        assert!(!c.fetch_recorded_uncompressed);
        // `check` shows it, and what it shows means the same.
        assert!(c
            .to_string()
            .contains("fetch_recorded_uncompressed = false"));
        assert!(
            !Config::parse(&c.to_string(), "t")
                .unwrap()
                .fetch_recorded_uncompressed
        );
        let bad = format!("{base}[rewrite]\nfetch_recorded_uncompressed = \"yes\"\n");
        let e = Config::parse(&bad, "t").unwrap_err().to_string();
        assert!(e.contains("fetch_recorded_uncompressed"), "{e}");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../config.toml");
        let c = Config::parse(text, "config.toml").unwrap();
        assert!(!c.decorator.partners.is_empty());
        // What `check` prints is itself a valid file with the same meaning.
        let again = Config::parse(&c.to_string(), "effective").unwrap();
        assert_eq!(again.to_string(), c.to_string());
    }
}
