//! Content Security Policy, as far as the injected link script needs it: the enforced policies of
//! a page (the `Content-Security-Policy` header, each `<meta http-equiv>`), and whether a
//! parser-inserted `<script>` the proxy adds would run under all of them, as a same-origin file or
//! inline, with or without one of the policy's own nonces. Pure: no I/O, no HTML.
//!
//! The proxy never changes a policy: it never adds `'unsafe-inline'`, a hash or a host. It only
//! picks the form of tag the page's policy already lets run, and injects nothing when there is
//! none. `Content-Security-Policy-Report-Only` enforces nothing and is never read.

use url::Url;

/// One policy: its directives in order, names lower-cased, values split on whitespace. Where a
/// policy names a directive twice, the first one counts (CSP3 §2.2.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    directives: Vec<(String, Vec<String>)>,
}

/// The directives that decide a `<script>` element, most specific first (CSP3's fallback list).
const SCRIPT_DIRECTIVES: [&str; 3] = ["script-src-elem", "script-src", "default-src"];

impl Policy {
    /// Parses one serialized policy. `from_meta`: a `<meta>` policy, where `sandbox` (and the
    /// reporting and framing directives) are ignored by browsers.
    pub fn parse(text: &str, from_meta: bool) -> Policy {
        let mut directives: Vec<(String, Vec<String>)> = Vec::new();
        for directive in text.split(';') {
            let mut tokens = directive.split_ascii_whitespace();
            let Some(name) = tokens.next() else { continue };
            if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                continue;
            }
            let name = name.to_ascii_lowercase();
            if from_meta && name == "sandbox" {
                continue;
            }
            if directives.iter().any(|(n, _)| *n == name) {
                continue;
            }
            directives.push((name, tokens.map(str::to_owned).collect()));
        }
        Policy { directives }
    }

    fn directive(&self, name: &str) -> Option<&[String]> {
        self.directives
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The source list that governs script elements, and the directive it came from; `None` when
    /// the policy says nothing about scripts.
    fn script_list(&self) -> Option<(&'static str, &[String])> {
        SCRIPT_DIRECTIVES
            .iter()
            .find_map(|&d| self.directive(d).map(|list| (d, list)))
    }

    /// A `sandbox` directive without `allow-scripts`: no script runs at all.
    fn sandboxes_scripts(&self) -> bool {
        self.directive("sandbox").is_some_and(|flags| {
            !flags
                .iter()
                .any(|f| f.eq_ignore_ascii_case("allow-scripts"))
        })
    }
}

/// Every enforced policy in the `Content-Security-Policy` header values given (a header may carry
/// several policies separated by commas, and a response several headers).
pub fn from_headers<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Policy> {
    values
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(|p| Policy::parse(p, false))
        .filter(|p| !p.directives.is_empty())
        .collect()
}

/// Whether any of the policies allows scripts by a nonce: then the tag the proxy writes may carry
/// that nonce, which a server sends anew with every response.
pub fn names_nonce(policies: &[Policy]) -> bool {
    policies
        .iter()
        .filter_map(Policy::script_list)
        .any(|(_, list)| list.iter().any(|s| nonce_of(s).is_some()))
}

/// The two forms the script can take in a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `<script src="/_kmi/links.js?v=...">`, the same-origin file the proxy serves.
    File,
    /// `<script>...</script>` with the script's text.
    Inline,
}

/// How the tag is written so that the page's policies let it run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub form: Form,
    /// One of the policy's own nonces, copied onto the tag.
    pub nonce: Option<String>,
}

/// Why no tag is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// A header policy sandboxes the page without `allow-scripts`.
    Sandbox,
    /// This directive allows neither the file nor inline script, with or without a nonce.
    Directive(&'static str),
}

/// What `page`'s policies allow for a script at `script_path` on the page's own origin: the first
/// of the file, the file with a nonce, inline, inline with a nonce that every policy lets run.
/// The file comes first: its bytes are the same for every visitor and every response.
/// `inline_ok` is false where inline text cannot be written (an XHTML page).
pub fn decide(
    policies: &[Policy],
    page: &Url,
    script_path: &str,
    inline_ok: bool,
) -> Result<Placement, Blocked> {
    if policies.iter().any(Policy::sandboxes_scripts) {
        return Err(Blocked::Sandbox);
    }
    let script = page.join(script_path).unwrap_or_else(|_| page.clone());
    let mut nonces: Vec<&str> = Vec::new();
    for (_, list) in policies.iter().filter_map(Policy::script_list) {
        for n in list.iter().filter_map(|s| nonce_of(s)) {
            if !nonces.contains(&n) {
                nonces.push(n);
            }
        }
    }
    let mut candidates = Vec::with_capacity(2 + 2 * nonces.len());
    let forms: &[Form] = if inline_ok {
        &[Form::File, Form::Inline]
    } else {
        &[Form::File]
    };
    for &form in forms {
        candidates.push(Placement { form, nonce: None });
        for n in &nonces {
            candidates.push(Placement {
                form,
                nonce: Some((*n).to_owned()),
            });
        }
    }
    let runs = |p: &Placement| {
        policies.iter().all(|policy| match policy.script_list() {
            None => true,
            Some((_, list)) => allows(list, p, page, &script),
        })
    };
    if let Some(p) = candidates.into_iter().find(|p| runs(p)) {
        return Ok(p);
    }
    // Name the directive that refuses the plain file, for the log.
    let file = Placement {
        form: Form::File,
        nonce: None,
    };
    let directive = policies
        .iter()
        .filter_map(Policy::script_list)
        .find(|(_, list)| !allows(list, &file, page, &script))
        .map_or("script-src", |(d, _)| d);
    Err(Blocked::Directive(directive))
}

/// Whether a source list lets a parser-inserted script element run (CSP3 §6.7.2.3, "does element
/// match source list"): a matching nonce always; else, unless `'strict-dynamic'` (which ignores
/// hosts, `'self'` and `'unsafe-inline'` for such scripts), a file by its URL, and inline text by
/// `'unsafe-inline'` when the list has no nonce or hash (which switch it off).
fn allows(list: &[String], placement: &Placement, page: &Url, script: &Url) -> bool {
    if let Some(n) = &placement.nonce {
        if list.iter().any(|s| nonce_of(s) == Some(n.as_str())) {
            return true;
        }
    }
    if has_keyword(list, "'strict-dynamic'") {
        return false;
    }
    match placement.form {
        Form::File => list.iter().any(|s| source_matches(s, page, script)),
        Form::Inline => {
            has_keyword(list, "'unsafe-inline'")
                && !list.iter().any(|s| nonce_of(s).is_some() || is_hash(s))
        }
    }
}

fn has_keyword(list: &[String], keyword: &str) -> bool {
    list.iter().any(|s| s.eq_ignore_ascii_case(keyword))
}

/// The value of a `'nonce-...'` source, when it is a well-formed base64 value (only those can be
/// copied into an attribute as they are).
fn nonce_of(source: &str) -> Option<&str> {
    let quoted = source.strip_prefix('\'')?.strip_suffix('\'')?;
    let prefix = quoted.get(..6)?;
    if !prefix.eq_ignore_ascii_case("nonce-") {
        return None;
    }
    let value = &quoted[6..];
    let body = value.trim_end_matches('=');
    let well_formed = !body.is_empty()
        && value.len() - body.len() <= 2
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/-_".contains(&b));
    well_formed.then_some(value)
}

fn is_hash(source: &str) -> bool {
    let lower = source.to_ascii_lowercase();
    ["'sha256-", "'sha384-", "'sha512-"]
        .iter()
        .any(|p| lower.starts_with(p))
}

/// Whether a source expression matches `script` (on the page's origin), CSP3 §6.7.2.
fn source_matches(source: &str, page: &Url, script: &Url) -> bool {
    let lower = source.to_ascii_lowercase();
    if lower == "'self'" {
        return script.origin() == page.origin();
    }
    if lower.starts_with('\'') {
        return false;
    }
    if lower == "*" {
        return matches!(script.scheme(), "http" | "https");
    }
    if let Some(scheme) = lower.strip_suffix(':') {
        return scheme_matches(scheme, script.scheme());
    }
    let (scheme, rest) = match lower.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, lower.as_str()),
    };
    if let Some(s) = scheme {
        if !scheme_matches(s, script.scheme()) {
            return false;
        }
    } else if !scheme_matches(page.scheme(), script.scheme()) {
        return false;
    }
    let host_end = rest.find([':', '/']).unwrap_or(rest.len());
    let host = &rest[..host_end];
    let after = &rest[host_end..];
    let (port, path) = match after.strip_prefix(':') {
        Some(p) => {
            let end = p.find('/').unwrap_or(p.len());
            (Some(&p[..end]), &p[end..])
        }
        None => (None, after),
    };
    let Some(script_host) = script.host_str() else {
        return false;
    };
    let host_ok = match host.strip_prefix("*.") {
        Some(suffix) => {
            script_host.len() > suffix.len() + 1
                && script_host.ends_with(suffix)
                && script_host.as_bytes()[script_host.len() - suffix.len() - 1] == b'.'
        }
        None => host == "*" || host == script_host,
    };
    let script_port = script.port_or_known_default();
    let port_ok = match port {
        Some("*") => true,
        Some(p) => p.parse::<u16>().ok() == script_port,
        // No port: the scheme's default (an http default also allows https's, the upgrade).
        None => {
            script.port().is_none()
                || (scheme == Some("http")
                    && script.scheme() == "https"
                    && script_port == Some(443))
        }
    };
    let path_ok = path.is_empty()
        || if path.ends_with('/') {
            script.path().starts_with(path)
        } else {
            script.path() == path
        };
    host_ok && port_ok && path_ok
}

/// A source's scheme allows the script's: the same, or `http` allowing `https` (CSP3's upgrade).
fn scheme_matches(source: &str, script: &str) -> bool {
    source == script || (source == "http" && script == "https")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "/_kmi/links.js";

    fn page() -> Url {
        Url::parse("https://www.site.com/pricing").unwrap()
    }

    fn decide_headers(headers: &[&str], metas: &[&str]) -> Result<Placement, Blocked> {
        let mut policies = from_headers(headers.iter().copied());
        policies.extend(metas.iter().map(|m| Policy::parse(m, true)));
        decide(&policies, &page(), SCRIPT, true)
    }

    fn file() -> Result<Placement, Blocked> {
        Ok(Placement {
            form: Form::File,
            nonce: None,
        })
    }

    fn with_nonce(form: Form, n: &str) -> Result<Placement, Blocked> {
        Ok(Placement {
            form,
            nonce: Some(n.into()),
        })
    }

    #[test]
    fn no_policy_or_one_without_script_rules_takes_the_file() {
        assert_eq!(decide_headers(&[], &[]), file());
        assert_eq!(
            decide_headers(&["img-src 'self'; frame-ancestors 'none'"], &[]),
            file()
        );
        assert_eq!(decide_headers(&["upgrade-insecure-requests"], &[]), file());
    }

    #[test]
    fn self_and_matching_hosts_allow_the_file() {
        for policy in [
            "default-src 'self'",
            "script-src 'self' https://cdn.example.com",
            "script-src https://www.site.com",
            "script-src https://*.site.com",
            "script-src https:",
            // `http:` allows `https:` too (CSP3's upgrade).
            "script-src http:",
            "script-src *",
            "script-src www.site.com/_kmi/",
            "script-src http://www.site.com",
            "script-src https://www.site.com:443/_kmi/links.js",
            // GitHub-style: default-src 'none' with script-src naming hosts.
            "default-src 'none'; script-src 'self' github.githubassets.com",
        ] {
            assert_eq!(decide_headers(&[policy], &[]), file(), "{policy}");
        }
    }

    #[test]
    fn hosts_that_are_not_this_origin_do_not() {
        for policy in [
            "script-src https://cdn.example.com",
            "script-src https://*.www.site.com",
            "script-src https://www.site.com:8443",
            "script-src https://www.site.com/static/",
            "script-src ws:",
            "script-src 'none'",
            "default-src 'none'",
        ] {
            assert_eq!(
                decide_headers(&[policy], &[]),
                Err(Blocked::Directive(if policy.starts_with("default") {
                    "default-src"
                } else {
                    "script-src"
                })),
                "{policy}"
            );
        }
    }

    #[test]
    fn the_most_specific_script_directive_decides() {
        assert_eq!(
            decide_headers(&["default-src 'none'; script-src-elem 'self'"], &[]),
            file()
        );
        assert_eq!(
            decide_headers(&["script-src 'self'; script-src-elem 'none'"], &[]),
            Err(Blocked::Directive("script-src-elem"))
        );
        // The first of a duplicated directive counts.
        assert_eq!(
            decide_headers(&["script-src 'none'; script-src 'self'"], &[]),
            Err(Blocked::Directive("script-src"))
        );
    }

    #[test]
    fn a_strict_nonce_policy_gets_its_nonce_on_the_file() {
        // Google's recommended strict CSP.
        let strict = "object-src 'none'; script-src 'nonce-r4nd0m+/==' 'unsafe-inline' 'strict-dynamic' https: http:; base-uri 'none'; require-trusted-types-for 'script'";
        assert_eq!(
            decide_headers(&[strict], &[]),
            with_nonce(Form::File, "r4nd0m+/==")
        );
        // A nonce policy without 'self': the nonce lets the same-origin file run.
        assert_eq!(
            decide_headers(&["script-src 'nonce-abc123'"], &[]),
            with_nonce(Form::File, "abc123")
        );
        // With 'self' too, no nonce is needed, so the tag is the same for every response.
        assert_eq!(
            decide_headers(&["script-src 'self' 'nonce-abc123'"], &[]),
            file()
        );
        // 'strict-dynamic' ignores 'self': only the nonce runs.
        assert_eq!(
            decide_headers(&["script-src 'self' 'strict-dynamic' 'nonce-xyz'"], &[]),
            with_nonce(Form::File, "xyz")
        );
        assert_eq!(
            decide_headers(&["script-src 'self' 'strict-dynamic'"], &[]),
            Err(Blocked::Directive("script-src"))
        );
        assert!(names_nonce(&from_headers([strict])));
        assert!(!names_nonce(&from_headers(["script-src 'self'"])));
    }

    #[test]
    fn malformed_nonces_are_never_copied() {
        assert_eq!(
            decide_headers(&["script-src 'nonce-a\"b'"], &[]),
            Err(Blocked::Directive("script-src"))
        );
        assert_eq!(
            decide_headers(&["script-src 'nonce-'"], &[]),
            Err(Blocked::Directive("script-src"))
        );
    }

    #[test]
    fn inline_only_where_unsafe_inline_is_in_force() {
        // No 'self' but 'unsafe-inline' and no nonce or hash: inline is what the policy allows.
        assert_eq!(
            decide_headers(&["script-src 'unsafe-inline' https://cdn.example.com"], &[]),
            Ok(Placement {
                form: Form::Inline,
                nonce: None
            })
        );
        // A hash switches 'unsafe-inline' off; the proxy never adds its own hash.
        assert_eq!(
            decide_headers(
                &["script-src 'unsafe-inline' 'sha256-AAAA' https://cdn.example.com"],
                &[]
            ),
            Err(Blocked::Directive("script-src"))
        );
    }

    #[test]
    fn xhtml_never_gets_inline_text() {
        let policies = from_headers(["script-src 'unsafe-inline'"]);
        assert_eq!(
            decide(&policies, &page(), SCRIPT, false),
            Err(Blocked::Directive("script-src"))
        );
    }

    #[test]
    fn every_policy_must_allow_it() {
        // Two headers, or two policies in one header: both are enforced.
        assert_eq!(
            decide_headers(
                &["script-src 'self'", "script-src https://cdn.example.com"],
                &[]
            ),
            Err(Blocked::Directive("script-src"))
        );
        assert_eq!(
            decide_headers(&["script-src 'self', default-src 'none'"], &[]),
            Err(Blocked::Directive("default-src"))
        );
        assert_eq!(
            decide_headers(&["script-src 'self', img-src 'none'"], &[]),
            file()
        );
        // A header allowing 'self' and a meta policy requiring a nonce: the nonce on the file.
        assert_eq!(
            decide_headers(&["script-src 'self'"], &["script-src 'nonce-m3ta'"]),
            with_nonce(Form::File, "m3ta")
        );
        assert_eq!(
            decide_headers(&[], &["default-src 'none'"]),
            Err(Blocked::Directive("default-src"))
        );
    }

    #[test]
    fn sandbox_without_scripts_blocks_but_not_from_meta() {
        assert_eq!(decide_headers(&["sandbox"], &[]), Err(Blocked::Sandbox));
        assert_eq!(
            decide_headers(&["sandbox allow-forms"], &[]),
            Err(Blocked::Sandbox)
        );
        assert_eq!(
            decide_headers(&["sandbox allow-scripts allow-same-origin"], &[]),
            file()
        );
        assert_eq!(decide_headers(&[], &["sandbox"]), file());
    }

    #[test]
    fn directive_names_are_case_insensitive_and_keywords_too() {
        assert_eq!(decide_headers(&["Script-Src 'SELF'"], &[]), file());
        assert_eq!(
            decide_headers(&["SCRIPT-SRC 'none'"], &[]),
            Err(Blocked::Directive("script-src"))
        );
    }
}
