//! Header rules of a proxy, as pure functions over `HeaderMap`: hop-by-hop removal (RFC 9110
//! §7.6.1), forwarding headers, and the cache-safety changes a decorated page needs.

use http::header::{
    HeaderName, HeaderValue, CACHE_CONTROL, CONNECTION, ETAG, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE, VARY, VIA,
};
use http::{HeaderMap, Version};

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The name this proxy gives itself in `Via`.
pub const VIA_NAME: &str = "kmi-proxy";

/// Removes every hop-by-hop field: those named in `Connection`, then the fixed list.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        TE,
        TRANSFER_ENCODING,
        UPGRADE,
        TRAILER,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
}

/// Appends a `Via` entry for this hop, keeping earlier ones.
pub fn add_via(headers: &mut HeaderMap, version: Version) {
    let protocol = match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    };
    append_list(headers, VIA, &format!("{protocol} {VIA_NAME}"));
}

/// Appends `item` to a comma-separated list header, folding existing fields into one line.
pub fn append_list(headers: &mut HeaderMap, name: HeaderName, item: &str) {
    let mut joined = String::new();
    for v in headers.get_all(&name) {
        if let Ok(v) = v.to_str() {
            if !v.trim().is_empty() {
                joined.push_str(v.trim());
                joined.push_str(", ");
            }
        }
    }
    joined.push_str(item);
    if let Ok(value) = HeaderValue::from_str(&joined) {
        headers.insert(name, value);
    }
}

/// Adds `Cookie` to `Vary` unless it is already there (or `Vary: *` already covers it).
pub fn vary_on_cookie(headers: &mut HeaderMap) {
    vary_on(headers, "Cookie");
}

/// Adds `field` to `Vary` unless it is already there (or `Vary: *` already covers it).
pub fn vary_on(headers: &mut HeaderMap, field: &str) {
    let covered = headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|f| f.trim() == "*" || f.trim().eq_ignore_ascii_case(field));
    if !covered {
        append_list(headers, VARY, field);
    }
}

/// Makes a response that carries one visitor's ID unfit for shared caches: `public` and
/// `s-maxage` go, `private` is added, other directives stay. A strong `ETag` becomes weak, so a
/// conditional request cannot get a 304 that revalidates another visitor's copy as this one's.
///
/// Fields aimed at one kind of cache override `Cache-Control` there, so each one present is made
/// non-storable in its own syntax: the `CDN-Cache-Control` family (RFC 9213, and vendor forms
/// such as `Cloudflare-CDN-Cache-Control`) like `Cache-Control`; `Surrogate-Control` (Fastly,
/// Akamai, Varnish) and Akamai's `Edge-Control` become `no-store`; nginx's `X-Accel-Expires`
/// becomes 0, which disables its cache. Absent ones are not added: without them each cache falls
/// back to `Cache-Control`.
pub fn make_private(headers: &mut HeaderMap) {
    let targeted: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            name.ends_with("cache-control") && name != CACHE_CONTROL.as_str()
        })
        .cloned()
        .collect();
    for name in targeted {
        private_directives(headers, name);
    }
    private_directives(headers, CACHE_CONTROL);
    for (name, never) in [
        ("surrogate-control", "no-store"),
        ("edge-control", "no-store"),
        ("x-accel-expires", "0"),
    ] {
        if headers.contains_key(name) {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(never),
            );
        }
    }
    weaken_etag(headers);
}

/// Makes a strong `ETag` weak: the bytes are no longer the origin's, though what they say is
/// equivalent (RFC 9110 §8.8.1).
pub fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(etag) = headers.get(ETAG).and_then(|v| v.to_str().ok()) {
        if !etag.starts_with("W/") {
            match HeaderValue::from_str(&format!("W/{etag}")) {
                Ok(weak) => headers.insert(ETAG, weak),
                Err(_) => headers.remove(ETAG),
            };
        }
    }
}

/// Rewrites one field with `Cache-Control` syntax: without `public` and `s-maxage`, with
/// `private`. A value that is not text becomes plain `private`.
fn private_directives(headers: &mut HeaderMap, name: HeaderName) {
    let mut directives: Vec<String> = headers
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter(|d| {
            let directive = d.split('=').next().unwrap_or_default().trim();
            !directive.eq_ignore_ascii_case("public") && !directive.eq_ignore_ascii_case("s-maxage")
        })
        .map(str::to_owned)
        .collect();
    if !directives.iter().any(|d| d.eq_ignore_ascii_case("private")) {
        directives.push("private".into());
    }
    let value = HeaderValue::from_str(&directives.join(", "))
        .unwrap_or_else(|_| HeaderValue::from_static("private"));
    headers.insert(name, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_fields_and_connection_listed_ones_go() {
        let mut h = map(&[
            ("connection", "close, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("trailer", "x"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic eA=="),
            ("x-kept", "1"),
            ("authorization", "Bearer t"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept", "authorization"]);
    }

    #[test]
    fn via_and_lists_append() {
        let mut h = map(&[("via", "1.0 fred"), ("via", "1.1 p.example")]);
        add_via(&mut h, Version::HTTP_11);
        assert_eq!(h[VIA], "1.0 fred, 1.1 p.example, 1.1 kmi-proxy");
        let mut h = HeaderMap::new();
        add_via(&mut h, Version::HTTP_10);
        assert_eq!(h[VIA], "1.0 kmi-proxy");
    }

    #[test]
    fn vary_gets_cookie_once() {
        let mut h = map(&[("vary", "Accept-Encoding")]);
        vary_on_cookie(&mut h);
        assert_eq!(h[VARY], "Accept-Encoding, Cookie");
        vary_on_cookie(&mut h);
        assert_eq!(h[VARY], "Accept-Encoding, Cookie");
        let mut star = map(&[("vary", "*")]);
        vary_on_cookie(&mut star);
        assert_eq!(star[VARY], "*");
    }

    #[test]
    fn private_replaces_public_and_s_maxage() {
        let mut h = map(&[
            ("cache-control", "public, max-age=60, S-MAXAGE=600"),
            ("etag", "\"abc\""),
        ]);
        make_private(&mut h);
        assert_eq!(h[CACHE_CONTROL], "max-age=60, private");
        assert_eq!(h[ETAG], "W/\"abc\"");

        let mut none = HeaderMap::new();
        make_private(&mut none);
        assert_eq!(none[CACHE_CONTROL], "private");

        let mut already = map(&[("cache-control", "private, no-cache"), ("etag", "W/\"x\"")]);
        make_private(&mut already);
        assert_eq!(already[CACHE_CONTROL], "private, no-cache");
        assert_eq!(already[ETAG], "W/\"x\"");
    }

    #[test]
    fn targeted_cache_fields_become_private_or_no_store() {
        let mut h = map(&[
            ("cdn-cache-control", "public, max-age=600"),
            (
                "cloudflare-cdn-cache-control",
                "max-age=86400, s-maxage=86400",
            ),
            ("surrogate-control", "max-age=3600"),
            ("edge-control", "!no-store, max-age=1h"),
            ("x-accel-expires", "600"),
            ("x-cache-control-note", "kept"),
        ]);
        make_private(&mut h);
        assert_eq!(h["cdn-cache-control"], "max-age=600, private");
        assert_eq!(h["cloudflare-cdn-cache-control"], "max-age=86400, private");
        assert_eq!(h["surrogate-control"], "no-store");
        assert_eq!(h["edge-control"], "no-store");
        assert_eq!(h["x-accel-expires"], "0");
        assert_eq!(h["x-cache-control-note"], "kept");
        assert_eq!(h[CACHE_CONTROL], "private");
        // Absent targeted fields are not invented.
        let mut plain = HeaderMap::new();
        make_private(&mut plain);
        assert_eq!(plain.len(), 1, "{plain:?}");
    }
}
