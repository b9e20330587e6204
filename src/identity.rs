//! The visitor's KISSmetrics identity: request `Cookie` headers in, a validated `VisitorId` out. No I/O.

use std::fmt;

use http::header::COOKIE;
use http::HeaderMap;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// The bytes that stay literal when an ID is put into a URL: ASCII letters, digits and `-._~`
/// (RFC 3986 "unreserved"). Everything else becomes `%XX` of its UTF-8 bytes.
const ID_ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The longest decoded ID we forward. KM's own IDs are far shorter; anything longer is more
/// likely an attack on the partner's URL length limits than an identity.
pub const MAX_ID_BYTES: usize = 255;

/// A visitor ID that has passed every check, with its URL form computed once per request.
#[derive(Clone, PartialEq, Eq)]
pub struct VisitorId {
    decoded: String,
    url_encoded: String,
}

/// Why a cookie value was not accepted as an identity. Used for logs and metrics, never shown
/// to the visitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Empty,
    TooLong,
    NotUtf8,
    ControlCharacter,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::TooLong => "too_long",
            Rejection::NotUtf8 => "not_utf8",
            Rejection::ControlCharacter => "control_character",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl VisitorId {
    /// Builds an ID from a raw cookie value as it travels on the wire: percent-decoded once
    /// (a `+` stays a `+`: cookies are not form data), then validated.
    pub fn from_cookie_value(raw: &str) -> Result<VisitorId, Rejection> {
        let decoded = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| Rejection::NotUtf8)?;
        VisitorId::new(&decoded)
    }

    /// Builds an ID from an already decoded value (the `rewrite` command's `--id`).
    pub fn new(decoded: &str) -> Result<VisitorId, Rejection> {
        if decoded.is_empty() {
            return Err(Rejection::Empty);
        }
        if decoded.len() > MAX_ID_BYTES {
            return Err(Rejection::TooLong);
        }
        if decoded.chars().any(char::is_control) {
            return Err(Rejection::ControlCharacter);
        }
        Ok(VisitorId {
            decoded: decoded.to_owned(),
            url_encoded: utf8_percent_encode(decoded, ID_ENCODE_SET).to_string(),
        })
    }

    /// A stand-in ID with given forms, for recording a rewrite whose output the real ID is
    /// spliced into later (see `splice`). Both forms must be plain ASCII that neither
    /// percent-encoding nor HTML escaping would change.
    pub(crate) fn stand_in(decoded: String, url_encoded: String) -> VisitorId {
        VisitorId {
            decoded,
            url_encoded,
        }
    }

    /// The ID as `KM.i()` would return it.
    pub fn as_str(&self) -> &str {
        &self.decoded
    }

    /// The ID percent-encoded for a query string; contains only `[A-Za-z0-9-._~%]`.
    pub fn url_encoded(&self) -> &str {
        &self.url_encoded
    }
}

/// IDs are personal data (a named ID is often an email address): keep them out of debug output.
impl fmt::Debug for VisitorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VisitorId({} bytes)", self.decoded.len())
    }
}

/// What a request's cookies said about the visitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A usable ID, and the name of the cookie it came from.
    Known { id: VisitorId, cookie: usize },
    /// None of the configured cookies was present with a value.
    Absent,
    /// The chosen cookie held a value that cannot be forwarded; the page goes through undecorated.
    Rejected(Rejection),
}

impl Identity {
    pub fn id(&self) -> Option<&VisitorId> {
        match self {
            Identity::Known { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// Finds the identity in every `Cookie` header of a request. `names` is in precedence order
/// (`km_ni` before `km_ai`, as `KM.i()` does), whatever order the cookies appear in. The first
/// name with a non-empty value decides: if that value is unusable the visitor has no ID for
/// this request rather than silently falling back to a different identity.
pub fn from_headers(headers: &HeaderMap, names: &[String]) -> Identity {
    // One slot per configured name: the first non-empty occurrence of that cookie. Browsers
    // send the most specific cookie first when two share a name.
    let mut found: Vec<Option<&str>> = vec![None; names.len()];
    for (name, raw) in cookie_pairs(headers) {
        if let Some(slot) = names.iter().position(|n| n == name) {
            found[slot].get_or_insert(raw);
        }
    }
    match found
        .iter()
        .enumerate()
        .find_map(|(i, v)| v.map(|v| (i, v)))
    {
        None => Identity::Absent,
        Some((cookie, raw)) => match VisitorId::from_cookie_value(raw) {
            Ok(id) => Identity::Known { id, cookie },
            Err(why) => Identity::Rejected(why),
        },
    }
}

/// Every `name=value` pair with a non-empty value in every `Cookie` header, in order, values as
/// sent (quotes stripped, not decoded). A malformed pair (no `=`, empty name) is skipped; the rest
/// of the header still counts.
pub fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| cookie::Cookie::split_parse(v).flatten())
        .filter_map(|pair| Some((pair.name_raw()?, strip_quotes(pair.value_raw()?))))
        .filter(|(_, raw)| !raw.is_empty())
}

/// An identity given as a header value (server-side identity), not URL-encoded.
pub fn from_header_value(value: &http::HeaderValue) -> Identity {
    match value.to_str() {
        Ok(v) => match VisitorId::new(v.trim()) {
            Ok(id) => Identity::Known {
                id,
                cookie: usize::MAX,
            },
            Err(why) => Identity::Rejected(why),
        },
        Err(_) => Identity::Rejected(Rejection::NotUtf8),
    }
}

/// RFC 6265 allows a cookie value in double quotes; the quotes are not part of the value.
fn strip_quotes(raw: &str) -> &str {
    raw.strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in cookies {
            h.append(COOKIE, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    fn names() -> Vec<String> {
        vec!["km_ni".into(), "km_ai".into()]
    }

    fn id_of(cookies: &[&str]) -> Option<String> {
        from_headers(&headers(cookies), &names())
            .id()
            .map(|i| i.as_str().to_owned())
    }

    #[test]
    fn anonymous_id_is_percent_decoded_once() {
        assert_eq!(
            id_of(&["km_ai=Zk9%2BaB%2Fc3Q%3D%3D"]).as_deref(),
            Some("Zk9+aB/c3Q==")
        );
        // Decoding once means an encoded percent sign stays encoded-looking.
        assert_eq!(id_of(&["km_ai=a%2541"]).as_deref(), Some("a%41"));
    }

    #[test]
    fn unencoded_value_is_taken_as_is_and_plus_is_not_space() {
        assert_eq!(
            id_of(&["km_ai=Zk9+aB/c3Q=="]).as_deref(),
            Some("Zk9+aB/c3Q==")
        );
    }

    #[test]
    fn named_beats_anonymous_whatever_the_order() {
        assert_eq!(
            id_of(&["km_ai=anon; km_ni=bob%40example.com"]).as_deref(),
            Some("bob@example.com")
        );
        assert_eq!(
            id_of(&["km_ai=anon", "other=1; km_ni=bob"]).as_deref(),
            Some("bob")
        );
    }

    #[test]
    fn empty_named_falls_back_to_anonymous() {
        assert_eq!(id_of(&["km_ni=; km_ai=anon"]).as_deref(), Some("anon"));
    }

    #[test]
    fn first_occurrence_of_a_name_wins() {
        assert_eq!(
            id_of(&["km_ai=first; km_ai=second"]).as_deref(),
            Some("first")
        );
    }

    #[test]
    fn unusable_values_are_rejected_with_a_reason() {
        let cases = [
            ("km_ai=a%0Db", Rejection::ControlCharacter),
            ("km_ai=a%00b", Rejection::ControlCharacter),
            ("km_ai=a%C2%85b", Rejection::ControlCharacter),
            ("km_ai=%FF%FE", Rejection::NotUtf8),
        ];
        for (cookie, why) in cases {
            assert_eq!(
                from_headers(&headers(&[cookie]), &names()),
                Identity::Rejected(why),
                "{cookie}"
            );
        }
        let long = format!("km_ai={}", "x".repeat(256));
        assert_eq!(
            from_headers(&headers(&[&long]), &names()),
            Identity::Rejected(Rejection::TooLong)
        );
        let max = format!("km_ai={}", "x".repeat(255));
        assert!(from_headers(&headers(&[&max]), &names()).id().is_some());
    }

    #[test]
    fn no_cookie_is_absent() {
        assert_eq!(from_headers(&headers(&[]), &names()), Identity::Absent);
        assert_eq!(
            from_headers(&headers(&["km_ai_x=1; xkm_ai=2"]), &names()),
            Identity::Absent
        );
    }

    #[test]
    fn url_form_keeps_only_unreserved_characters() {
        let id = VisitorId::new("\"><script>alert(1)</script> é+/=~").unwrap();
        assert_eq!(
            id.url_encoded(),
            "%22%3E%3Cscript%3Ealert%281%29%3C%2Fscript%3E%20%C3%A9%2B%2F%3D~"
        );
    }

    #[test]
    fn debug_output_never_shows_the_id() {
        let id = VisitorId::new("bob@example.com").unwrap();
        assert!(!format!("{id:?}").contains("bob"));
    }
}
