//! The click-time link decorator the proxy injects into the pages it rewrites (`[script] inject`):
//! its JavaScript, generated once per configuration from the partners and identity settings, the
//! versioned URL it is served at, and the `<script>` tag written into a page. Pure.
//!
//! The script (`script/links.js`, written compact by hand; `compact` drops its comment lines and
//! indentation, so the source can explain itself at no cost to the page) decorates links and
//! forms that never passed through the rewriter (built by the page's own scripts) at the moment
//! the visitor activates them: `mousedown`, `auxclick`, `keydown` (Enter), `touchstart`, `click`
//! and `submit`, in the capture phase on `window`, following `composedPath()` into open shadow
//! roots. It applies the decorator's rules (exact and `*.` hosts, `paths`, `mode`, the
//! parameter's name, `existing`, the ID's percent-encoding, the fragment kept) to the URL the
//! browser resolved (for a form, its submit button's `formaction` if it has one), and reads the
//! ID in the browser: `KM.i()`, else the identity cookies, validated as the server validates
//! them, unless consent or Global Privacy Control says no.
//!
//! **The ID is never in the script or in the tag.** Both are the same bytes for every visitor,
//! which is what lets a recorded rewrite (see `splice`) replay them, and what lets the file be
//! cached by anyone.

use std::fmt::Write as _;

use std::sync::Arc;

use crate::config::Consent;
use crate::csp::{self, Blocked, Form, Placement};
use crate::decorate::{Decorator, Existing};
use crate::partner::{DomainPattern, Mode};

/// The script's code, with `KMI_CONFIG` standing for the configuration object.
const SOURCE: &str = include_str!("script/links.js");

/// Where the proxy serves the script unless `[script] path` says otherwise.
pub const DEFAULT_PATH: &str = "/_kmi/links.js";

/// One configuration's script: its bytes, their version and where they are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// The path the proxy answers with the script (never forwarded to the origin).
    pub path: String,
    /// The whole script, configuration included; ASCII, with no `</` or `<!--` in it, so it can
    /// also stand inline in a `<script>` element.
    pub js: String,
    /// A digest of `js`, in the file's URL (`?v=`) and its ETag: a reload that changes the
    /// script changes its URL, so the file can be cached for a year.
    pub version: String,
}

impl Script {
    /// The script for these settings.
    pub fn new(decorator: &Decorator, cookies: &[String], consent: &Consent, path: &str) -> Script {
        let js = compact(SOURCE).replace("KMI_CONFIG", &config_object(decorator, cookies, consent));
        let version = format!("{:016x}", fnv1a(js.as_bytes()));
        Script {
            path: path.to_owned(),
            js,
            version,
        }
    }

    /// The file's URL path with its version.
    pub fn src(&self) -> String {
        format!("{}?v={}", self.path, self.version)
    }

    /// The tag written into a page. `origin` is the page's own origin when a `<base href>` on
    /// another origin would take a root-relative `src` elsewhere (empty otherwise).
    pub fn tag(&self, placement: &Placement, origin: &str) -> String {
        let nonce = placement
            .nonce
            .as_ref()
            .map(|n| format!(" nonce=\"{n}\""))
            .unwrap_or_default();
        match placement.form {
            Form::File => format!("<script src=\"{origin}{}\"{nonce}></script>", self.src()),
            Form::Inline => format!("<script{nonce}>{}</script>", self.js),
        }
    }
}

/// What the rewriter needs to inject the script into one response.
#[derive(Debug, Clone)]
pub struct Injection {
    pub script: Arc<Script>,
    /// The enforced policies of the response's `Content-Security-Policy` header; the page's
    /// `<meta http-equiv>` policies are added as the rewriter meets them.
    pub policies: Vec<csp::Policy>,
    /// The page is XHTML: an inline script's `&&` and `<` would break it, so only the file.
    pub xml: bool,
}

/// What became of the script on one page: how it was written, or why it was not. The names are
/// the `result` label of `script_injections_total` and the access log's `script=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    File,
    FileNonce,
    Inline,
    InlineNonce,
    /// The page's `script-src-elem`, `script-src` or `default-src` allows none of the forms.
    BlockedScriptSrcElem,
    BlockedScriptSrc,
    BlockedDefaultSrc,
    /// A `sandbox` policy without `allow-scripts`: no script runs on the page at all.
    Sandboxed,
}

impl Injected {
    pub const ALL: [Injected; 8] = [
        Injected::File,
        Injected::FileNonce,
        Injected::Inline,
        Injected::InlineNonce,
        Injected::BlockedScriptSrcElem,
        Injected::BlockedScriptSrc,
        Injected::BlockedDefaultSrc,
        Injected::Sandboxed,
    ];

    pub fn of(decision: &Result<Placement, Blocked>) -> Injected {
        match decision {
            Ok(Placement {
                form: Form::File,
                nonce,
            }) => {
                if nonce.is_some() {
                    Injected::FileNonce
                } else {
                    Injected::File
                }
            }
            Ok(Placement {
                form: Form::Inline,
                nonce,
            }) => {
                if nonce.is_some() {
                    Injected::InlineNonce
                } else {
                    Injected::Inline
                }
            }
            Err(Blocked::Sandbox) => Injected::Sandboxed,
            Err(Blocked::Directive("script-src-elem")) => Injected::BlockedScriptSrcElem,
            Err(Blocked::Directive("default-src")) => Injected::BlockedDefaultSrc,
            Err(Blocked::Directive(_)) => Injected::BlockedScriptSrc,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Injected::File => "file",
            Injected::FileNonce => "file_nonce",
            Injected::Inline => "inline",
            Injected::InlineNonce => "inline_nonce",
            Injected::BlockedScriptSrcElem => "csp_forbids_script_src_elem",
            Injected::BlockedScriptSrc => "csp_forbids_script_src",
            Injected::BlockedDefaultSrc => "csp_forbids_default_src",
            Injected::Sandboxed => "csp_sandbox",
        }
    }

    pub fn index(self) -> usize {
        Injected::ALL.iter().position(|&i| i == self).unwrap_or(0)
    }
}

/// `links.js` as it is sent: its comment lines (`//` first on the line) dropped, every line
/// trimmed, the lines joined. The source is written for this (a comment on a line of its own,
/// statements ended by `;` or `}`, no literal across lines), so the join changes no token; where
/// two lines would run two words together, a line break stays between them.
fn compact(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    for line in source.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("//") {
            continue;
        }
        let word =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || "_$".contains(c));
        if word(out.chars().last()) && word(line.chars().next()) {
            out.push('\n');
        }
        out.push_str(line);
    }
    out
}

/// The configuration object the script reads, as a JavaScript literal:
/// - `h`: one entry `[host, redirect, forms, paths]` per partner host pattern, in the order
///   `PartnerSet::match_host` tries them (exact hosts, then `*.` suffixes longest first). `host`
///   is a regular expression for the host without its trailing dot, `redirect` 1 for
///   `mode = "redirect"`, `forms` 1 when the partner's forms are decorated, `paths` a regular
///   expression for the URL paths the partner's links are decorated on (`/$/`, any, without
///   `paths`). A partner's rules are repeated for each of its hosts: one lookup finds both.
/// - `n` the parameter, `x` 1 for `existing = "replace"`, `r` the redirect path with `?to=`;
/// - `c` the identity cookies in order, `k` the consent cookie, `t` its token, `g` GPC honoured.
fn config_object(decorator: &Decorator, cookies: &[String], consent: &Consent) -> String {
    let partners = &decorator.partners;
    let mut exact: Vec<(&str, usize)> = Vec::new();
    let mut suffixes = Vec::new();
    for i in 0..partners.len() {
        for pattern in partners.patterns(i) {
            match pattern {
                DomainPattern::Exact(h) => {
                    if !exact.iter().any(|(e, _)| e == h) {
                        exact.push((h, i));
                    }
                }
                DomainPattern::Subdomains(h) => suffixes.push((h.as_str(), i)),
            }
        }
    }
    // Stable: equal lengths keep the configuration's order, as `PartnerSet` does.
    suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    let entry = |host: String, i: usize| {
        let r = partners.rules(i);
        let paths = if r.paths.is_empty() {
            "/$/".to_owned()
        } else {
            let list: Vec<String> = r.paths.iter().map(|p| regex_text(p.as_str())).collect();
            format!("/^(?:{})$/", list.join("|"))
        };
        format!(
            "[{host},{},{},{paths}]",
            u8::from(r.mode == Mode::Redirect),
            u8::from(r.forms && r.mode == Mode::Inline)
        )
    };
    let hosts: Vec<String> = exact
        .iter()
        .map(|&(h, i)| entry(format!("/^{}$/", regex_text(h)), i))
        // A `*.` pattern matches a host with at least one character before `.suffix`.
        .chain(
            suffixes
                .iter()
                .map(|&(h, i)| entry(format!("/.\\.{}$/", regex_text(h)), i)),
        )
        .collect();
    let cookies: Vec<String> = cookies.iter().map(|c| js_string(c)).collect();
    format!(
        "{{h:[{}],n:{},x:{},r:{},c:[{}],k:{},t:{},g:{}}}",
        hosts.join(","),
        js_string(&decorator.param),
        u8::from(decorator.existing == Existing::Replace),
        js_string(&format!("{}?to=", decorator.redirect_path)),
        cookies.join(","),
        js_string(consent.cookie.as_deref().unwrap_or("")),
        js_string(consent.contains.as_deref().unwrap_or("")),
        u8::from(consent.honor_gpc),
    )
}

/// A JavaScript string literal that is ASCII and safe inside a `<script>` element: quotes,
/// backslashes, `<`, `>`, `&`, controls and everything non-ASCII as `\uXXXX`.
fn js_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for unit in text.encode_utf16() {
        match unit {
            0x20..=0x7e if !matches!(unit as u8, b'"' | b'\\' | b'<' | b'>' | b'&') => {
                out.push(unit as u8 as char)
            }
            _ => {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out.push('"');
    out
}

/// A host or a path pattern (`/checkout/*`) as the text of a JavaScript regular expression
/// matching the same strings: `*` is any run of characters, everything else itself (letters and
/// digits as they are, other ASCII escaped with `\`, the rest as `\uXXXX`, and never `<`, `>`
/// or `&`, so the literal can stand inline in a page).
fn regex_text(pattern: &str) -> String {
    let mut out = String::new();
    for unit in pattern.encode_utf16() {
        match unit {
            0x2a => out.push_str("[^]*"),
            0x30..=0x39 | 0x41..=0x5a | 0x61..=0x7a => out.push(unit as u8 as char),
            0x21..=0x7e if !matches!(unit as u8, b'<' | b'>' | b'&') => {
                out.push('\\');
                out.push(unit as u8 as char);
            }
            _ => {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

/// FNV-1a, 64 bits: a stable digest for the script's version (not a security boundary: the
/// version only has to change when the bytes do).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn script(extra: &str) -> Script {
        let text = format!(
            "upstream = \"http://127.0.0.1:1\"\n[script]\ninject = true\n{extra}\n[[partner]]\nname = \"checkout\"\ndomains = [\"checkout.partner.com\", \"*.partner.net\"]\n"
        );
        let config = Config::parse(&text, "t").unwrap();
        config.script.as_deref().cloned().unwrap()
    }

    /// The bound: under 2 KB as served, with one typical partner (an exact host and a
    /// wildcard). `kmi-proxy check` prints the size for any configuration.
    #[test]
    fn the_script_is_small() {
        let whole = script("").js.len();
        assert!(whole < 2048, "the script with one partner is {whole} bytes");
    }

    #[test]
    fn compacting_drops_comments_and_layout_and_keeps_words_apart() {
        let source =
            "// a comment\n(()=>{\n  // another\n  let\n  a=1,\n  b=2;\n  return a\n}\n)()\n";
        assert_eq!(compact(source), "(()=>{let\na=1,b=2;return a})()");
        let js = compact(SOURCE);
        assert!(
            !js.contains("//"),
            "a comment or a line break was left in: {js}"
        );
        assert!(!js.contains("\n  "), "indentation was left in");
    }

    #[test]
    fn the_script_can_stand_inline_and_names_one_global() {
        let s = script("[consent]\ncookie = \"c</script>\"\ncontains = \"<!--é\"");
        assert!(s.js.is_ascii());
        for bad in ["</", "<!--", "<script", "KMI_CONFIG"] {
            assert!(
                !s.js.to_ascii_lowercase().contains(bad),
                "{bad} in {}",
                s.js
            );
        }
        assert_eq!(s.js.matches("w.KMIProxy").count(), 1);
    }

    #[test]
    fn the_version_follows_the_bytes() {
        let a = script("");
        assert_eq!(a, script(""));
        let b = script("[identity]\nparam = \"kmx\"");
        assert_ne!(a.version, b.version);
        assert_eq!(a.src(), format!("/_kmi/links.js?v={}", a.version));
    }

    #[test]
    fn tags_carry_only_the_policy_nonce() {
        let s = script("");
        let file = Placement {
            form: Form::File,
            nonce: Some("abc+/=".into()),
        };
        assert_eq!(
            s.tag(&file, ""),
            format!("<script src=\"{}\" nonce=\"abc+/=\"></script>", s.src())
        );
        let inline = Placement {
            form: Form::Inline,
            nonce: None,
        };
        assert_eq!(s.tag(&inline, ""), format!("<script>{}</script>", s.js));
    }

    #[test]
    fn hosts_are_listed_in_the_order_they_are_matched_with_their_partners_rules() {
        // This partner comes first, before `checkout` (exact `checkout.partner.com`, `*.partner.net`).
        let s = script(
            "[[partner]]\nname = \"shop\"\ndomains = [\"*.shop.partner.net\", \"a.partner.net\"]\nmode = \"redirect\"\npaths = [\"/b/*\", \"/c\"]\n",
        );
        let start = s.js.find("h:[").expect("the host list") + 3;
        let end = start + s.js[start..].find("]],").expect("its end") + 1;
        assert_eq!(
            &s.js[start..end],
            "[/^a\\.partner\\.net$/,1,0,/^(?:\\/b\\/[^]*|\\/c)$/],\
             [/^checkout\\.partner\\.com$/,0,0,/$/],\
             [/.\\.shop\\.partner\\.net$/,1,0,/^(?:\\/b\\/[^]*|\\/c)$/],\
             [/.\\.partner\\.net$/,0,0,/$/]"
        );
    }

    #[test]
    fn literals_are_escaped() {
        assert_eq!(js_string("a\"\\<é"), "\"a\\u0022\\u005c\\u003c\\u00e9\"");
        assert_eq!(regex_text("/a-b/*.x"), "\\/a\\-b\\/[^]*\\.x");
    }
}
