//! Property tests of the pure core: which links count as partner links, what decoration does to a
//! partner URL (checked with the `url` crate as an independent reader), the URL form of an ID, and
//! that the encoding sniffer's answer does not depend on how a page's bytes arrive.
//!
//! Case counts are kept moderate so the file runs in a few seconds in a debug build; raise them
//! for a longer hunt with `PROPTEST_CASES=20000 cargo test --test properties`.

use kmi_proxy::charset::{self, Charset};
use kmi_proxy::decorate::{Decorator, Existing, Outcome};
use kmi_proxy::identity::{VisitorId, MAX_ID_BYTES};
use kmi_proxy::partner::{DomainPattern, PartnerSet};
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use proptest::prelude::*;
use proptest::test_runner::Config;
use url::Url;

/// The page every non-relative link is found on: not a partner itself.
const PAGE: &str = "https://www.site.com/dir/page.html?p=1";

/// `partner.com` exactly, and every subdomain of `partner.net` (but not `partner.net` itself).
fn decorator() -> Decorator {
    let mut partners = PartnerSet::default();
    partners.push(
        "p".into(),
        ["partner.com", "*.partner.net"]
            .iter()
            .map(|p| DomainPattern::parse(p).unwrap())
            .collect(),
    );
    Decorator {
        partners,
        param: "kmi".into(),
        existing: Existing::Keep,
        ..Decorator::default()
    }
}

/// The independent oracle: what a browser would navigate to, and whether that host is a partner
/// by the plain reading of the two patterns above.
fn is_partner_link(href: &str, base: &Url) -> bool {
    let Ok(url) = base.join(href) else {
        return false;
    };
    if !matches!(url.scheme(), "http" | "https") {
        return false;
    }
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    host == "partner.com" || (host.ends_with(".partner.net") && host.len() > ".partner.net".len())
}

fn page() -> Url {
    Url::parse(PAGE).unwrap()
}

/// `n` cases, unless `PROPTEST_CASES` asks for another number.
fn cases(n: u32) -> Config {
    let from_env = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    Config {
        cases: from_env.unwrap_or(n),
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Any ID `VisitorId::new` accepts: non-empty, at most 255 bytes, no control characters. Mostly
/// short base64-looking IDs and e-mail addresses (what KM sends), plus arbitrary Unicode.
fn visitor_id() -> impl Strategy<Value = VisitorId> {
    prop_oneof![
        "[A-Za-z0-9+/=]{1,40}",
        "[a-z0-9._%+-]{1,20}@[a-z0-9-]{1,12}\\.[a-z]{2,4}",
        "[^\\p{Cc}]{1,80}",
        // Up to the byte limit, cut at a character boundary.
        "[^\\p{Cc}]{1,255}".prop_map(|s| truncate(s, MAX_ID_BYTES)),
        "[\\x20-\\x7e]{250,255}",
    ]
    .prop_filter_map("not a valid visitor ID", |s| VisitorId::new(&s).ok())
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A piece of text as a page might have written it inside a query, path or fragment: arbitrary
/// Unicode, percent-encoded in one of the ways found in the wild.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    /// `application/x-www-form-urlencoded`: space as `+`, only `*-._` and alphanumerics literal.
    Form,
    /// Every non-alphanumeric byte as `%XX`, space as `%20`.
    Strict,
}

fn encode(text: &str, how: Encoding) -> String {
    match how {
        Encoding::Form => url::form_urlencoded::byte_serialize(text.as_bytes()).collect(),
        Encoding::Strict => utf8_percent_encode(text, NON_ALPHANUMERIC).to_string(),
    }
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![Just(Encoding::Form), Just(Encoding::Strict)]
}

/// Raw text for a name, value, segment or fragment: mostly ASCII with the characters that mean
/// something in URLs (`& = ? # + % /`), and some arbitrary Unicode.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z0-9 &=?#+%/:@._~-]{0,12}",
        1 => "[^\\p{Cc}]{0,8}",
        1 => ".{0,6}",
    ]
}

/// One query pair, written encoded, whose decoded name is not `kmi`. The value may be absent
/// (`?flag`), in which case `query_pairs` reads it as empty.
fn query_pair() -> impl Strategy<Value = (String, String, String)> {
    (text(), text(), encoding(), any::<bool>())
        .prop_filter("named like the parameter", |(name, ..)| name != "kmi")
        .prop_map(|(name, value, how, bare)| {
            let written = if bare && value.is_empty() && !name.is_empty() {
                encode(&name, how)
            } else {
                format!("{}={}", encode(&name, how), encode(&value, how))
            };
            (written, name, value)
        })
}

/// A partner URL split into the parts the properties talk about.
#[derive(Debug, Clone)]
struct PartnerUrl {
    /// Scheme, authority and path exactly as written (everything before `?` or `#`).
    before_query: String,
    /// `None`: no `?` at all. `Some` with no pairs: a bare `?` (or `?&`).
    query: Option<Query>,
    /// Without the `#`.
    fragment: Option<String>,
}

#[derive(Debug, Clone)]
struct Query {
    /// The pairs as written, with their decoded name and value.
    pairs: Vec<(String, String, String)>,
    trailing_ampersand: bool,
}

impl PartnerUrl {
    fn href(&self) -> String {
        let mut s = self.before_query.clone();
        if let Some(q) = &self.query {
            s.push('?');
            let written: Vec<&str> = q.pairs.iter().map(|(w, ..)| w.as_str()).collect();
            s.push_str(&written.join("&"));
            if q.trailing_ampersand {
                s.push('&');
            }
        }
        if let Some(f) = &self.fragment {
            s.push('#');
            s.push_str(f);
        }
        s
    }

    fn decoded_pairs(&self) -> Vec<(String, String)> {
        self.query
            .iter()
            .flat_map(|q| q.pairs.iter())
            // `?=` is a pair with an empty name and value; an empty pair is not written at all.
            .map(|(_, n, v)| (n.clone(), v.clone()))
            .collect()
    }
}

fn partner_host() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("partner.com".to_owned()),
        Just("partner.com.".to_owned()),
        "([a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?\\.){1,3}partner\\.net",
    ]
    .prop_flat_map(|host| {
        // Random case, as pages write hosts in any case.
        proptest::collection::vec(any::<bool>(), host.len()).prop_map(move |upper| {
            host.chars()
                .zip(upper)
                .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
                .collect::<String>()
        })
    })
}

fn partner_url() -> impl Strategy<Value = PartnerUrl> {
    let scheme = prop_oneof!["https", "http", "HTTPS", "Http"];
    let userinfo = proptest::option::weighted(0.1, "[a-z0-9]{1,6}(:[a-z0-9]{0,6})?@");
    let port = proptest::option::weighted(0.3, 1u16..=65535);
    let segments = proptest::collection::vec((text(), encoding()), 0..4);
    let trailing_slash = any::<bool>();
    let query = proptest::option::weighted(
        0.8,
        (proptest::collection::vec(query_pair(), 0..5), any::<bool>()),
    );
    let fragment = proptest::option::weighted(0.4, (text(), any::<bool>()));
    (
        scheme,
        userinfo,
        partner_host(),
        port,
        segments,
        trailing_slash,
        query,
        fragment,
    )
        .prop_map(
            |(scheme, userinfo, host, port, segments, slash, query, fragment)| {
                let mut before = format!("{scheme}://{}{host}", userinfo.unwrap_or_default());
                if let Some(p) = port {
                    before.push_str(&format!(":{p}"));
                }
                for (seg, how) in &segments {
                    before.push('/');
                    before.push_str(&encode(seg, *how));
                }
                if slash {
                    before.push('/');
                }
                PartnerUrl {
                    before_query: before,
                    query: query.map(|(pairs, trailing_ampersand)| Query {
                        pairs,
                        trailing_ampersand,
                    }),
                    // A fragment may hold anything, even `?`, `#` and `kmi=`: written raw or
                    // encoded.
                    fragment: fragment.map(|(f, raw)| {
                        if raw {
                            f.replace(|c: char| c.is_control() || c == ' ', "")
                        } else {
                            encode(&f, Encoding::Strict)
                        }
                    }),
                }
            },
        )
}

/// A host that is a partner by no reading: random labels, plus the lookalikes an attacker (or an
/// unlucky site) would write.
fn other_host() -> impl Strategy<Value = String> {
    prop_oneof![
        "([a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\\.){1,4}[a-z]{2,6}",
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
        // partner.com.evil.com, evilpartner.com, partner.com-x.io, a.partner.net.evil, partner.net
        (
            "(evil|www|x-|)",
            prop_oneof!["partner.com", "partner.net", "PARTNER.NET"],
            "(\\.evil\\.com|-evil\\.com|\\.co|\\.|evil|)"
        )
            .prop_map(|(a, p, b)| format!("{a}{p}{b}")),
        "[a-z]{1,5}\\.partner\\.(net|com)\\.[a-z]{2,5}",
        Just("partner.net".to_owned()),
        Just("partner.co".to_owned()),
        Just("partnercom".to_owned()),
    ]
}

fn non_partner_href() -> impl Strategy<Value = String> {
    let path = "(/[a-zA-Z0-9%._~-]{0,10}){0,3}";
    // Query and fragment may mention partners: only the host counts.
    let tail = prop_oneof![
        Just(String::new()),
        Just("?next=https://partner.com/".to_owned()),
        Just("#@partner.com".to_owned()),
        Just("?u=a.partner.net&x=1#frag".to_owned()),
        "(\\?[a-z0-9=&%]{0,12})?(#[a-z0-9?#]{0,8})?",
    ];
    let scheme = prop_oneof!["https", "http", "HTTPS"];
    prop_oneof![
        (scheme.clone(), other_host(), path, tail.clone())
            .prop_map(|(s, h, p, t)| format!("{s}://{h}{p}{t}")),
        // Userinfo and delimiter tricks: the partner name is before an `@` or after the host.
        (scheme.clone(), other_host(), tail.clone())
            .prop_map(|(s, h, t)| format!("{s}://partner.com@{h}/{t}")),
        (scheme.clone(), other_host()).prop_map(|(s, h)| format!("{s}://a.partner.net:pw@{h}/")),
        (scheme.clone(), other_host()).prop_map(|(s, h)| format!("{s}://{h}\\@partner.com/")),
        (scheme.clone(), other_host()).prop_map(|(s, h)| format!("{s}://{h}#@partner.com")),
        (scheme.clone(), other_host()).prop_map(|(s, h)| format!("{s}://{h}?@partner.com")),
        (scheme, other_host()).prop_map(|(s, h)| format!("{s}://{h}/partner.com")),
        // Other schemes that name a partner.
        prop_oneof![
            Just("javascript:location='https://partner.com/'".to_owned()),
            Just("mailto:a@partner.com".to_owned()),
            Just("ftp://partner.com/".to_owned()),
            Just("data:text/html,https://partner.com/".to_owned()),
            Just("ws://partner.com/".to_owned()),
            Just("file://partner.com/x".to_owned()),
        ],
        // Relative links stay on the (non-partner) page's host.
        "(/|\\./|\\.\\./)?[a-z0-9._-]{0,12}(\\?[a-z=&]{0,8})?(#[a-z]{0,6})?",
    ]
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(512))]

    /// A link to any other host is left alone, whatever its shape.
    #[test]
    fn non_partner_links_are_never_changed(href in non_partner_href(), id in visitor_id()) {
        let base = page();
        prop_assume!(!is_partner_link(&href, &base));
        prop_assert_eq!(decorator().decorate(&href, &base, &id), Outcome::NotPartner);
    }

    /// For any string at all, the decorator's idea of "partner link" is the browser's.
    #[test]
    fn arbitrary_strings_are_decorated_only_when_they_reach_a_partner(
        href in prop_oneof![
            3 => ".{0,40}",
            1 => "[ \t\n]{0,2}(https?:)?(//)?[a-z.]{0,12}(partner\\.(com|net))?[/?#@:.a-z0-9]{0,10}",
        ],
        base in prop_oneof![Just(PAGE), Just("https://x.partner.net/app/")],
        id in visitor_id(),
    ) {
        let base = Url::parse(base).unwrap();
        let outcome = decorator().decorate(&href, &base, &id);
        let partner = is_partner_link(&href, &base);
        prop_assert_eq!(
            !matches!(outcome, Outcome::NotPartner),
            partner,
            "href {:?} resolves to {:?}",
            href,
            base.join(&href).map(String::from)
        );
    }

    /// The decorator answers most links from their text before any URL parsing; for the shapes
    /// where text and parser could disagree (case, userinfo, ports, backslashes, missing
    /// slashes, percent signs, punycode, IPv4 in any notation, trailing dots, tabs, bases on
    /// other schemes) its verdict is still the parser's.
    #[test]
    fn the_text_pre_check_agrees_with_the_parser(
        prefix in prop_oneof![
            Just(""), Just("https://"), Just("HTTP://"), Just("hTtPs://"), Just("//"), Just("http:"),
            Just("https:/"), Just("https:///"), Just("/\\"), Just("\\\\"), Just("http:\\\\"),
            Just("ht\ttps://"), Just("/"), Just("./"),
        ],
        userinfo in prop_oneof![Just(""), Just("partner.com@"), Just("a:b@"), Just("x@y@")],
        host in "[a-zA-Z0-9.%_-]{0,4}(partner\\.(com|net)|PARTNER\\.NET|pArTnEr\\.CoM|xn--[a-z0-9-]{1,8}|0x[0-9a-fA-F]{0,3}|[0-9]{1,3}|%2e|\\.\\.)?\\.?",
        port in prop_oneof![Just(""), Just(":443"), Just(":"), Just(":x"), Just(":99999")],
        tail in prop_oneof![Just(""), Just("/"), Just("\\x"), Just("?a"), Just("#b"), Just("/p@q"), Just("\n/")],
        base in prop_oneof![
            Just(PAGE), Just("https://x.partner.net/app/"), Just("http://partner.com./"),
            Just("ftp://x.partner.net/"), Just("https://PARTNER.com:8443/d/"),
        ],
        id in visitor_id(),
    ) {
        let href = format!("{prefix}{userinfo}{host}{port}{tail}");
        let base = Url::parse(base).unwrap();
        let outcome = decorator().decorate(&href, &base, &id);
        prop_assert_eq!(
            !matches!(outcome, Outcome::NotPartner),
            is_partner_link(&href, &base),
            "href {:?} against {} resolves to {:?}",
            href,
            base,
            base.join(&href).map(String::from)
        );
    }

    /// Decoration adds exactly one `kmi=<id>` at the end of the query and changes nothing else:
    /// as read by the `url` crate, and byte for byte in the text the page wrote.
    #[test]
    fn partner_links_gain_exactly_one_parameter(
        link in partner_url(),
        id in visitor_id(),
        space_before in "[ \t\n]{0,2}",
        space_after in "[ \t\n]{0,2}",
    ) {
        let href = link.href();
        let written = format!("{space_before}{href}{space_after}");
        let decorated = match decorator().decorate(&written, &page(), &id) {
            Outcome::Decorated { href, .. } => href,
            other => return Err(TestCaseError::fail(format!("{written:?}: {other:?}"))),
        };

        // Whitespace around the URL stays outside it.
        let inner = decorated
            .strip_prefix(space_before.as_str())
            .and_then(|d| d.strip_suffix(space_after.as_str()));
        prop_assert!(inner.is_some(), "whitespace moved: {:?}", decorated);
        let inner = inner.unwrap();

        // Byte for byte: the text before the query, then `?`, and the fragment.
        let expected_start = format!("{}?", link.before_query);
        prop_assert!(
            inner.starts_with(&expected_start),
            "{:?} does not start with {:?}", inner, expected_start
        );
        match &link.fragment {
            Some(f) => {
                let hash = format!("#{f}");
                prop_assert!(inner.ends_with(&hash), "{:?} lost fragment {:?}", inner, hash);
                prop_assert_eq!(inner.find('#'), Some(inner.len() - hash.len()));
            }
            None => prop_assert!(!inner.contains('#')),
        }

        // Read by the url crate: same pairs in the same order, plus exactly one kmi = the ID.
        let before = Url::parse(&href).unwrap();
        let after = Url::parse(&decorated);
        prop_assert!(after.is_ok(), "{:?} does not parse: {:?}", decorated, after);
        let after = after.unwrap();
        let mut expected = link.decoded_pairs();
        expected.push(("kmi".to_owned(), id.as_str().to_owned()));
        let got: Vec<(String, String)> = after.query_pairs().into_owned().collect();
        prop_assert_eq!(&got, &expected, "decorated {:?}", decorated);
        prop_assert_eq!(got.iter().filter(|(n, _)| n == "kmi").count(), 1);
        prop_assert_eq!(after.fragment(), before.fragment());
        prop_assert_eq!(after.host_str(), before.host_str());
        prop_assert_eq!(after.port(), before.port());
        prop_assert_eq!(after.path(), before.path());
        prop_assert_eq!(after.username(), before.username());
    }

    /// The same for links relative to a partner page (scheme-relative, absolute-path and
    /// path-relative): they stay relative, and what they resolve to gains exactly one parameter.
    #[test]
    fn relative_partner_links_stay_relative(
        link in partner_url(),
        form in 0..3usize,
        id in visitor_id(),
    ) {
        let absolute = link.href();
        let base = Url::parse("https://app.partner.net/a/b/page?p=1#top").unwrap();
        let after_scheme = &absolute[absolute.find("//").unwrap()..];
        let relative = match form {
            0 => after_scheme.to_owned(),
            1 => {
                let authority = &after_scheme[2..];
                authority[authority.find(['/', '?', '#']).unwrap_or(authority.len())..].to_owned()
            }
            _ => format!("x/{}", &after_scheme[2..]),
        };
        // An empty href and a fragment-only href point at the page itself: not this property.
        prop_assume!(!relative.is_empty() && !relative.starts_with('#'));
        // A path that starts with `//` (an empty first segment) would read as scheme-relative.
        prop_assume!(form != 1 || !relative.starts_with("//"));
        let decorated = match decorator().decorate(&relative, &base, &id) {
            Outcome::Decorated { href, .. } => href,
            other => return Err(TestCaseError::fail(format!("{relative:?}: {other:?}"))),
        };
        prop_assert!(!decorated.contains("://"), "became absolute: {:?}", decorated);
        let before = base.join(&relative).unwrap();
        let after = base.join(&decorated).unwrap();
        let mut expected: Vec<(String, String)> = before.query_pairs().into_owned().collect();
        expected.push(("kmi".to_owned(), id.as_str().to_owned()));
        let got: Vec<(String, String)> = after.query_pairs().into_owned().collect();
        prop_assert_eq!(got, expected);
        prop_assert_eq!(after.fragment(), before.fragment());
        prop_assert_eq!(after.path(), before.path());
        prop_assert_eq!(after.host_str(), before.host_str());
    }

    /// A link that already names the parameter (in any encoding of its name) is kept as written
    /// with `existing = "keep"`, and carries exactly one, this visitor's, with `"replace"`.
    #[test]
    fn existing_parameter_is_kept_or_replaced_once(
        link in partner_url(),
        name in prop_oneof!["kmi", "k%6Di", "%6B%6D%69", "km%69"],
        values in proptest::collection::vec("[a-zA-Z0-9%+]{0,6}", 1..3),
        at in any::<prop::sample::Index>(),
        id in visitor_id(),
    ) {
        let mut link = link;
        let query = link.query.get_or_insert(Query { pairs: vec![], trailing_ampersand: false });
        for v in &values {
            let i = at.index(query.pairs.len() + 1);
            query.pairs.insert(i, (format!("{name}={v}"), "kmi".into(), v.clone()));
        }
        let href = link.href();
        let kept = decorator().decorate(&href, &page(), &id);
        prop_assert!(matches!(kept, Outcome::AlreadyPresent { .. }), "{:?}: {:?}", href, kept);

        let replacing = Decorator { existing: Existing::Replace, ..decorator() };
        let decorated = match replacing.decorate(&href, &page(), &id) {
            Outcome::Decorated { href, .. } => href,
            other => return Err(TestCaseError::fail(format!("{href:?}: {other:?}"))),
        };
        let after = Url::parse(&decorated).unwrap();
        let before = Url::parse(&href).unwrap();
        let others = |u: &Url| -> Vec<(String, String)> {
            u.query_pairs().into_owned().filter(|(n, _)| n != "kmi").collect()
        };
        prop_assert_eq!(others(&after), others(&before));
        let ids: Vec<String> = after
            .query_pairs()
            .filter(|(n, _)| n == "kmi")
            .map(|(_, v)| v.into_owned())
            .collect();
        prop_assert_eq!(ids, vec![id.as_str().to_owned()]);
        prop_assert_eq!(after.fragment(), before.fragment());
        prop_assert!(decorated.starts_with(&link.before_query));
    }
}

proptest! {
    #![proptest_config(cases(1024))]

    /// The URL form of an ID uses only unreserved characters and `%`, and decodes back to the ID.
    #[test]
    fn url_encoded_id_is_unreserved_and_round_trips(id in visitor_id()) {
        let encoded = id.url_encoded();
        prop_assert!(
            encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~%-".contains(&b)),
            "{:?}", encoded
        );
        let decoded = percent_decode_str(encoded).decode_utf8();
        prop_assert_eq!(decoded.as_deref(), Ok(id.as_str()));
        // Every `%` starts a two-digit escape, so no reader can take it another way.
        for (i, _) in encoded.match_indices('%') {
            let hex = encoded.get(i + 1..i + 3).unwrap_or("");
            prop_assert!(hex.len() == 2 && hex.bytes().all(|b| b.is_ascii_hexdigit()), "{:?}", encoded);
        }
    }

    /// `VisitorId::new` accepts exactly the non-empty strings of at most 255 bytes without
    /// control characters.
    #[test]
    fn visitor_id_accepts_exactly_the_valid_strings(s in prop_oneof![".{0,10}", "\\PC{0,300}", "[\\x00-\\x7f]{0,8}"]) {
        let valid = !s.is_empty() && s.len() <= MAX_ID_BYTES && !s.chars().any(char::is_control);
        prop_assert_eq!(VisitorId::new(&s).is_ok(), valid, "{:?}", s);
    }
}

/// Regression: an href of only whitespace means the page itself, like an empty one. On a page
/// whose own host (or `<base href>`) is a partner, `decorate` once sliced `href[start..end]` with
/// `start > end` and panicked, which in the proxy aborted the response mid-page.
#[test]
fn whitespace_only_href_on_a_partner_page() {
    let id = VisitorId::new("abc").unwrap();
    let base = Url::parse("https://partner.com/doc").unwrap();
    for href in [" ", "\t", "\n \r\n"] {
        let outcome = std::panic::catch_unwind(|| decorator().decorate(href, &base, &id));
        assert!(outcome.is_ok(), "decorate({href:?}) panicked");
    }
}

/// Pages as the encoding sniffer meets them: markup that looks like declarations (metas with and
/// without labels, comments, attributes quoting a meta), links and forms (which end the wait),
/// byte order marks, and arbitrary bytes.
fn page_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"<meta charset=".to_vec()),
        Just(b"<meta http-equiv=content-type content='text/html; charset=".to_vec()),
        Just(b"<META CHARSET=\"".to_vec()),
        Just(b"<meta charset=euc-kr>".to_vec()),
        Just(b"<a href=x>".to_vec()),
        Just(b"<FORM".to_vec()),
        Just(b"</a>".to_vec()),
        Just(b"<!--".to_vec()),
        Just(b"-->".to_vec()),
        Just(b"<p title='".to_vec()),
        Just(b"'".to_vec()),
        Just(b"\"".to_vec()),
        Just(b">".to_vec()),
        Just(b" ".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        Just(b"\xFF\xFE".to_vec()),
        prop::sample::select(vec![
            "utf-8",
            "euc-kr",
            "x-user-defined",
            "utf-16",
            "klingon"
        ])
        .prop_map(|l| l.as_bytes().to_vec()),
        Just(b"x".repeat(300)),
        prop::collection::vec(any::<u8>(), 0..8),
    ];
    // Text before the markup, to put declarations around the end of the prescan's 1024 bytes.
    let filler = prop::sample::select(vec![0usize, 0, 990, 1010, 1030]);
    (filler, prop::collection::vec(piece, 0..24))
        .prop_map(|(filler, pieces)| [b"x".repeat(filler), pieces.concat()].concat())
}

proptest! {
    #![proptest_config(cases(2048))]

    /// What the sniffer decides from the first bytes it is the answer for the whole page: the
    /// rewriter holds bytes only until `sniff` answers, so an answer from a prefix must never
    /// differ from the one the whole page gives, or the same page would be read differently
    /// depending on how the origin's bytes arrive.
    #[test]
    fn sniffing_decides_from_a_prefix_what_the_whole_page_decides(
        page in page_bytes(),
        cut in any::<prop::sample::Index>(),
        declared in prop::sample::select(vec![
            Charset::Sniffed,
            Charset::Xml,
            Charset::Declared(encoding_rs::WINDOWS_1252),
        ]),
    ) {
        let whole = charset::sniff(declared, &page, true);
        prop_assert!(whole.is_some(), "a whole page always decides");
        let cut = cut.index(page.len() + 1);
        if let Some(early) = charset::sniff(declared, &page[..cut], false) {
            prop_assert_eq!(early, whole.unwrap(), "decided after {} of {} bytes", cut, page.len());
        }
        // Never more than the prescan's window is needed.
        if page.len() >= charset::PRESCAN_BYTES {
            prop_assert!(charset::sniff(declared, &page, false).is_some());
        }
    }
}
