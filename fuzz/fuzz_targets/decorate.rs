//! `Decorator::decorate` on an arbitrary href and an arbitrary visitor ID.
//!
//! Input: `SEL ID '\n' HREF`, all UTF-8 (other inputs are skipped).
//! - `SEL`, one byte: its low 4 bits pick the base URL (`BASES[low % BASES.len()]`); bit `0x40`
//!   set means `existing = "replace"`, clear means `existing = "keep"`. So `0`..`6` are keep with
//!   base 0..6, `@`, `A`..`F` are replace with base 0..6.
//! - `ID`: everything up to the first `\n`. A `\n` can never be part of a valid ID (a control
//!   character), so nothing is lost by using it as the separator. Without any `\n` the whole rest
//!   is the href and the ID is `Zk9+aB/c3Q==`.
//! - `HREF`: everything after the first `\n`, as is (it may contain more newlines).
//!
//! Checked:
//! - never a panic, whatever the href, ID and base;
//! - `decorate` only ever answers `Decorated`, `AlreadyPresent` or `NotPartner`;
//! - IDs that `VisitorId::new` refuses are not decorated with (there is no `VisitorId`), so the
//!   invariants below cover exactly the IDs it accepts;
//! - when the answer is `Decorated { href: out, partner }`:
//!   - the original `href` resolves with the `url` crate against the base (a link the `url` crate
//!     cannot parse is never a partner link), and so does `out`;
//!   - both resolved URLs have the same scheme, user info, host, port, path and fragment;
//!   - the query pairs of the resolved `out` (as `Url::query_pairs` reads them: split on `&`,
//!     `+` is a space, percent-decoded) are the resolved original's pairs in order, with exactly
//!     one `kmi` pair whose value is the ID: appended at the end (`keep`, where the original has
//!     no `kmi`), or in place of the first `kmi` with every later `kmi` dropped (`replace`);
//!   - `out` is on the same partner (`partner_of`), and decorating `out` again gives
//!     `AlreadyPresent` (`keep`) or `out` itself (`replace`): decoration is idempotent;
//! - when the answer is `AlreadyPresent` (only with `keep`), the resolved original has a `kmi`
//!   pair as the `url` crate reads it.
//! - `NotPartner`: nothing more to check.
//!
//! No exceptions. Three bugs this target found in `src/decorate.rs` are fixed and pinned by unit
//! tests and by the `known-bug-*` seeds: an href that inherits its base's query (`#top`, ``,
//! `https:`) lost that query, a query ending in `?` (`?q=why?`) swallowed the ID, and dropping a
//! later `kmi` (`replace`) left a value's trailing C0 controls at the end of the href, where the
//! parser strips them.
#![no_main]

use kmi_proxy::decorate::{Decorator, Existing, Outcome};
use kmi_proxy::identity::VisitorId;
use kmi_proxy::partner::{DomainPattern, PartnerRules, PartnerSet};
use kmi_proxy::paths::PathPattern;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use url::Url;

const PARAM: &str = "kmi";
const DEFAULT_ID: &str = "Zk9+aB/c3Q==";

/// The pages a link can be found on: not a partner, partner pages with and without a query
/// (one already carrying `kmi`), an IDN partner, and two bases no http(s) link can be relative to.
const BASES: [&str; 7] = [
    "https://www.site.com/dir/page.html?p=1",
    "https://checkout.partner.com/app/",
    "https://checkout.partner.com/doc?x=1&y=2#top",
    "http://shop.partner.net:8080/a/b?kmi=old",
    "https://xn--bcher-kva.example/",
    "file:///tmp/page.html",
    "data:text/html,hello",
];

struct Setup {
    keep: Decorator,
    replace: Decorator,
    bases: Vec<Url>,
}

/// The partners of `fixtures/rewrite/config.toml`, plus one that only counts under `/only/`.
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let mut partners = PartnerSet::default();
        let mut push = |name: &str, patterns: &[&str]| {
            partners.push(
                name.into(),
                patterns
                    .iter()
                    .map(|p| DomainPattern::parse(p).unwrap())
                    .collect(),
            )
        };
        push(
            "checkout",
            &["checkout.partner.com", "yoursite.3rd-party-checkout.com"],
        );
        push("network", &["*.partner.net"]);
        push("books", &["bücher.example"]);
        push("paths", &["paths.partner.org"]);
        partners.set_rules(PartnerRules {
            paths: vec![PathPattern::parse("/only/*").unwrap()],
            ..PartnerRules::default()
        });
        let keep = Decorator {
            partners,
            param: PARAM.into(),
            existing: Existing::Keep,
            ..Decorator::default()
        };
        let replace = Decorator {
            existing: Existing::Replace,
            ..keep.clone()
        };
        Setup {
            keep,
            replace,
            bases: BASES.iter().map(|b| Url::parse(b).unwrap()).collect(),
        }
    })
}

fn pairs(url: &Url) -> Vec<(String, String)> {
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(rest) = std::str::from_utf8(rest) else {
        return;
    };
    let (raw_id, href) = rest.split_once('\n').unwrap_or((DEFAULT_ID, rest));
    let setup = setup();
    let base = &setup.bases[usize::from(sel & 0x0f) % setup.bases.len()];
    let replace = sel & 0x40 != 0;
    let decorator = if replace { &setup.replace } else { &setup.keep };
    let Ok(id) = VisitorId::new(raw_id) else {
        return;
    };

    match decorator.decorate(href, base, &id) {
        Outcome::NotPartner => {}
        Outcome::AlreadyPresent { .. } => {
            assert!(!replace, "AlreadyPresent with existing = replace");
            let original = base
                .join(href)
                .expect("a link the url crate cannot parse is not a partner link");
            assert!(
                original.query_pairs().any(|(k, _)| k == PARAM),
                "AlreadyPresent, but the url crate reads no `{PARAM}` in {:?} (resolved {})",
                href,
                original
            );
        }
        Outcome::Decorated { href: out, partner } => {
            let original = base
                .join(href)
                .expect("a link the url crate cannot parse is not a partner link");
            let decorated = base
                .join(&out)
                .unwrap_or_else(|e| panic!("decorated {out:?} does not parse: {e}"));
            let context = format!(
                "href {href:?} on {base} -> {out:?}\n  original resolves to  {original}\n  decorated resolves to {decorated}"
            );

            assert_eq!(original.scheme(), decorated.scheme(), "{context}");
            assert_eq!(original.username(), decorated.username(), "{context}");
            assert_eq!(original.password(), decorated.password(), "{context}");
            assert_eq!(original.host(), decorated.host(), "{context}");
            assert_eq!(original.port(), decorated.port(), "{context}");
            assert_eq!(original.path(), decorated.path(), "{context}");
            assert_eq!(original.fragment(), decorated.fragment(), "{context}");

            assert_eq!(
                decorator.partner_of(&out, base),
                Some(partner),
                "partner changed: {context}"
            );
            // The original's pairs in order; `kmi` appended (keep) or in place of the first
            // `kmi` with the later ones dropped (replace).
            let ours = (PARAM.to_owned(), id.as_str().to_owned());
            let mut expected = Vec::new();
            let mut placed = false;
            for pair in pairs(&original) {
                if pair.0 != PARAM {
                    expected.push(pair);
                } else if !replace {
                    panic!("Decorated with keep, but the original has `{PARAM}`: {context}");
                } else if !placed {
                    expected.push(ours.clone());
                    placed = true;
                }
            }
            if !placed {
                expected.push(ours);
            }
            assert_eq!(pairs(&decorated), expected, "query pairs: {context}");

            match decorator.decorate(&out, base, &id) {
                Outcome::AlreadyPresent { partner: p } if !replace => {
                    assert_eq!(p, partner, "{context}")
                }
                Outcome::Decorated {
                    href: again,
                    partner: p,
                } if replace => {
                    assert_eq!(again, out, "replace is not idempotent: {context}");
                    assert_eq!(p, partner, "{context}");
                }
                other => panic!("decorating again gave {other:?}: {context}"),
            }
        }
        other => panic!("decorate answered {other:?}"),
    }
});
