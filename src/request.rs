//! The client's request as the edge accepts it: one unambiguous authority (the request target's
//! own, else a single valid `Host`), one body framing (no transfer coding but a final `chunked`),
//! and the upgrade policy (only configured protocols are tunnelled; `h2c` never). Pure functions
//! over the request head: whatever they reject is the client's fault and answered 4xx/5xx with a
//! short public reason before anything reaches the origin.

use http::header::{HeaderValue, CONNECTION, HOST, TRANSFER_ENCODING, UPGRADE};
use http::uri::Authority;
use http::{HeaderMap, Method, StatusCode, Uri, Version};

/// A request the edge refuses, and why: the status, a short reason the client may see, and a
/// kind for the metrics (`kmi_proxy_client_errors{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
    pub kind: &'static str,
}

impl Rejection {
    const fn new(status: StatusCode, kind: &'static str, reason: &'static str) -> Rejection {
        Rejection {
            status,
            reason,
            kind,
        }
    }
}

/// The protocols a client may switch to through the proxy (`upgrades` in the configuration),
/// lower-cased names without versions. Never contains `h2c`: the proxy speaks HTTP/2 itself, and a
/// tunnelled HTTP/2 connection would carry requests the proxy never sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrades(Vec<String>);

/// The protocol that can never be tunnelled.
pub const H2C: &str = "h2c";

impl Upgrades {
    /// Builds the policy from configured names; `Err` names the first one that cannot be allowed.
    pub fn new(names: &[String]) -> Result<Upgrades, (String, &'static str)> {
        let mut allowed = Vec::new();
        for name in names {
            let lower = name.to_ascii_lowercase();
            if lower.is_empty() || !lower.bytes().all(is_token_byte) || lower.contains('/') {
                return Err((
                    name.clone(),
                    "not a protocol name such as \"websocket\" (a token, without a version)",
                ));
            }
            if lower == H2C {
                return Err((
                    name.clone(),
                    "h2c is never tunnelled: the proxy speaks HTTP/2 itself, and requests inside \
                     a tunnel would bypass every rule it applies",
                ));
            }
            if !allowed.contains(&lower) {
                allowed.push(lower);
            }
        }
        Ok(Upgrades(allowed))
    }

    pub fn names(&self) -> &[String] {
        &self.0
    }

    fn allows(&self, protocol: &str) -> bool {
        let name = protocol.split('/').next().unwrap_or("").trim();
        !name.eq_ignore_ascii_case(H2C) && self.0.iter().any(|p| p.eq_ignore_ascii_case(name))
    }
}

impl Default for Upgrades {
    /// WebSocket, which every browser application that needs a tunnel uses.
    fn default() -> Upgrades {
        Upgrades(vec!["websocket".to_owned()])
    }
}

/// What the edge learnt from an accepted request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The site the client asked for: the request target's authority (absolute form on
    /// HTTP/1.1, `:authority` on HTTP/2), else its `Host`. `None` when it named none (HTTP/1.0).
    pub authority: Option<Authority>,
    /// The `Upgrade` value to forward (only allowed protocols), when the client asked to switch
    /// to one the policy allows.
    pub upgrade: Option<HeaderValue>,
}

/// Checks a request head at the edge. The order matters only for which reason a request with
/// several faults gets; each fault alone is always refused.
pub fn accept(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
    upgrades: &Upgrades,
) -> Result<Accepted, Rejection> {
    if method == Method::CONNECT {
        return Err(Rejection::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "connect",
            "CONNECT is not supported: this is a reverse proxy",
        ));
    }
    let authority = authority(uri, version, headers)?;
    framing(version, headers)?;
    Ok(Accepted {
        authority,
        upgrade: upgrade(method, version, headers, upgrades),
    })
}

/// The authority the request names (RFC 9112 §3.2 and §3.2.2, RFC 9113 §8.3.1).
fn authority(
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
) -> Result<Option<Authority>, Rejection> {
    let mut hosts = headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "duplicate_host",
            "more than one Host header",
        ));
    }
    // An empty Host is what a client sends when the target has no authority (RFC 9110 §7.2).
    let host = match host.filter(|h| !h.is_empty()) {
        None => None,
        Some(h) => Some(parse_authority(h.as_bytes()).ok_or(Rejection::new(
            StatusCode::BAD_REQUEST,
            "invalid_host",
            "invalid Host header",
        ))?),
    };
    let target = match uri.authority() {
        None => None,
        Some(a) => {
            if let Some(scheme) = uri.scheme_str() {
                if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
                    return Err(Rejection::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_target",
                        "the request target must be an http or https URL",
                    ));
                }
            }
            Some(parse_authority(a.as_str().as_bytes()).ok_or(Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_target",
                "invalid authority in the request target",
            ))?)
        }
    };
    match (target, host) {
        (Some(t), Some(h)) if version == Version::HTTP_2 && !same_authority(&t, &h) => {
            // RFC 9113 §8.3.1: a Host that names another site than :authority is malformed.
            Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "host_mismatch",
                "Host does not match :authority",
            ))
        }
        // The target's authority replaces Host (RFC 9112 §3.2.2); on HTTP/2 :authority wins.
        (Some(t), _) => Ok(Some(t)),
        (None, Some(h)) => Ok(Some(h)),
        (None, None) if version == Version::HTTP_11 => Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "missing_host",
            "missing Host header",
        )),
        (None, None) => Ok(None),
    }
}

/// An authority a site can have: `host[:port]`, no user information, a non-empty host.
fn parse_authority(bytes: &[u8]) -> Option<Authority> {
    if bytes.contains(&b'@') {
        return None;
    }
    let a = Authority::try_from(bytes).ok()?;
    // `host()` keeps an IPv6 literal's brackets; what follows it is empty or `:port`.
    let port = &a.as_str()[a.host().len()..];
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.is_empty() || p.parse::<u16>().is_ok());
    (!a.host().is_empty() && port_ok).then_some(a)
}

fn same_authority(a: &Authority, b: &Authority) -> bool {
    a.as_str().eq_ignore_ascii_case(b.as_str())
}

/// One framing only: a `Transfer-Encoding` must be exactly one `chunked` (RFC 9112 §6.1: a coding
/// the proxy does not implement gets 501). hyper has already refused those whose last coding is
/// not `chunked`, dropped a `Content-Length` sent beside it, and refused it on HTTP/1.0.
fn framing(version: Version, headers: &HeaderMap) -> Result<(), Rejection> {
    if version == Version::HTTP_2 || !headers.contains_key(TRANSFER_ENCODING) {
        return Ok(());
    }
    let mut codings = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    let only_chunked = codings
        .next()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none();
    if only_chunked {
        Ok(())
    } else {
        Err(Rejection::new(
            StatusCode::NOT_IMPLEMENTED,
            "transfer_coding",
            "unsupported transfer coding (only chunked is accepted)",
        ))
    }
}

/// The protocols to ask the origin to switch to: those the client offered (an `Upgrade` header
/// and `upgrade` among the `Connection` tokens, on an HTTP/1.1 GET) that the policy allows.
/// Anything else is dropped with the other hop-by-hop fields and the request proxied as usual.
fn upgrade(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    upgrades: &Upgrades,
) -> Option<HeaderValue> {
    if version != Version::HTTP_11 || method != Method::GET {
        return None;
    }
    let connection_says_upgrade = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_says_upgrade {
        return None;
    }
    let offered: Vec<&str> = headers
        .get_all(UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| upgrades.allows(p))
        .collect();
    if offered.is_empty() {
        return None;
    }
    HeaderValue::from_str(&offered.join(", ")).ok()
}

/// Whether the origin's `101` switched to a protocol the proxy asked for on the client's behalf.
pub fn switched_as_asked(asked: &HeaderValue, answered: Option<&HeaderValue>) -> bool {
    let Some(answered) = answered.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let answered = answered.trim();
    asked
        .to_str()
        .unwrap_or("")
        .split(',')
        .any(|p| p.trim().eq_ignore_ascii_case(answered))
}

/// RFC 9110 §5.6.2 `tchar`.
pub fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn check(
        uri: &str,
        version: Version,
        pairs: &[(&str, &str)],
    ) -> Result<Accepted, &'static str> {
        accept(
            &Method::GET,
            &uri.parse().unwrap(),
            version,
            &head(pairs),
            &Upgrades::default(),
        )
        .map_err(|r| r.kind)
    }

    fn authority_of(uri: &str, version: Version, pairs: &[(&str, &str)]) -> Option<String> {
        check(uri, version, pairs)
            .unwrap()
            .authority
            .map(|a| a.to_string())
    }

    #[test]
    fn the_target_authority_beats_host() {
        let v11 = Version::HTTP_11;
        assert_eq!(
            authority_of("/p", v11, &[("host", "site.test")]).as_deref(),
            Some("site.test")
        );
        assert_eq!(
            authority_of("http://other.example/p", v11, &[("host", "site.test")]).as_deref(),
            Some("other.example")
        );
        assert_eq!(
            authority_of("https://other.example:8443/p", v11, &[]).as_deref(),
            Some("other.example:8443")
        );
        let h2 = Version::HTTP_2;
        assert_eq!(
            authority_of("https://site.test/p", h2, &[]).as_deref(),
            Some("site.test")
        );
        assert_eq!(
            authority_of("https://Site.Test/p", h2, &[("host", "site.test")]).as_deref(),
            Some("Site.Test")
        );
        assert_eq!(
            check("https://other.example/p", h2, &[("host", "site.test")]),
            Err("host_mismatch")
        );
        assert_eq!(
            authority_of("/p", Version::HTTP_10, &[]),
            None,
            "HTTP/1.0 may leave Host out"
        );
    }

    #[test]
    fn bad_hosts_are_refused() {
        let v11 = Version::HTTP_11;
        assert_eq!(
            check("/", v11, &[("host", "a.test"), ("host", "a.test")]),
            Err("duplicate_host")
        );
        assert_eq!(check("/", v11, &[]), Err("missing_host"));
        assert_eq!(check("/", v11, &[("host", "")]), Err("missing_host"));
        for bad in [
            "a b",
            "user@a.test",
            "a.test/x",
            "a.test:port",
            ":80",
            "a.test?",
        ] {
            assert_eq!(
                check("/", v11, &[("host", bad)]),
                Err("invalid_host"),
                "{bad}"
            );
        }
        assert_eq!(
            check("ftp://a.test/x", v11, &[("host", "a.test")]),
            Err("invalid_target")
        );
        assert!(check("/", v11, &[("host", "[::1]:8080")]).is_ok());
        let connect = accept(
            &Method::CONNECT,
            &"a.test:443".parse().unwrap(),
            v11,
            &head(&[("host", "a.test:443")]),
            &Upgrades::default(),
        );
        assert_eq!(connect.unwrap_err().status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn only_a_single_chunked_coding_is_accepted() {
        let v11 = Version::HTTP_11;
        let host = ("host", "a.test");
        for ok in ["chunked", "Chunked", " chunked ", "chunked,"] {
            assert!(
                check("/", v11, &[host, ("transfer-encoding", ok)]).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "gzip, chunked",
            "chunked, chunked",
            "identity, chunked",
            "chunked;x=1",
        ] {
            assert_eq!(
                check("/", v11, &[host, ("transfer-encoding", bad)]),
                Err("transfer_coding"),
                "{bad}"
            );
        }
        assert_eq!(
            check(
                "/",
                v11,
                &[
                    host,
                    ("transfer-encoding", "gzip"),
                    ("transfer-encoding", "chunked")
                ]
            ),
            Err("transfer_coding")
        );
    }

    #[test]
    fn only_allowed_protocols_are_upgraded() {
        let v11 = Version::HTTP_11;
        let host = ("host", "a.test");
        let up = |pairs: &[(&str, &str)]| check("/", v11, pairs).unwrap().upgrade;
        assert_eq!(
            up(&[
                host,
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "websocket")
            ])
            .unwrap(),
            "websocket"
        );
        assert!(
            up(&[host, ("upgrade", "websocket")]).is_none(),
            "no Connection: upgrade"
        );
        assert!(up(&[host, ("connection", "upgrade"), ("upgrade", "h2c")]).is_none());
        assert_eq!(
            up(&[
                host,
                ("connection", "upgrade"),
                ("upgrade", "h2c, WebSocket")
            ])
            .unwrap(),
            "WebSocket"
        );
        assert!(up(&[host, ("connection", "upgrade"), ("upgrade", "TLS/1.2")]).is_none());
        let h2c_allowed = Upgrades(vec!["h2c".into()]);
        assert!(
            !h2c_allowed.allows("h2c"),
            "h2c is refused even if smuggled in"
        );
    }

    #[test]
    fn the_policy_refuses_h2c_and_bad_names() {
        assert!(Upgrades::new(&["websocket".into(), "WebSocket".into()]).is_ok());
        assert_eq!(
            Upgrades::new(&["H2C".into()]).unwrap_err().0,
            "H2C".to_owned()
        );
        assert!(Upgrades::new(&["web socket".into()]).is_err());
        assert!(Upgrades::new(&["websocket/13".into()]).is_err());
        assert!(Upgrades::new(&[]).unwrap().names().is_empty());
    }

    #[test]
    fn a_101_must_name_a_protocol_that_was_asked_for() {
        let asked = HeaderValue::from_static("websocket");
        assert!(switched_as_asked(
            &asked,
            Some(&HeaderValue::from_static("WebSocket"))
        ));
        assert!(!switched_as_asked(
            &asked,
            Some(&HeaderValue::from_static("h2c"))
        ));
        assert!(!switched_as_asked(&asked, None));
    }
}
