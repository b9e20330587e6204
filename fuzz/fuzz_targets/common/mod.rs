//! What the page fuzz targets (`rewrite`, `splice`) share: the partners their decorators know and
//! the hostile visitor ID, so both exercise the same link shapes.

use kmi_proxy::decorate::{Decorator, Existing};
use kmi_proxy::partner::{DomainPattern, Mode, PartnerRules, PartnerSet};

/// Quotes, markup, `&kmi=`, a fragment, non-ASCII and a percent sign: every escaping at once.
pub const HOSTILE_ID: &str = "A-z._~0\"><script>alert(1)</script>&kmi=x#é 😀 %41+";

/// The fixtures' three inline partners, plus `redirect.partner.org` in `mode = "redirect"` and
/// `forms.partner.org` with `forms = true`: decorators with `existing = "keep"` and `"replace"`.
pub fn decorators() -> (Decorator, Decorator) {
    let mut partners = PartnerSet::default();
    let mut push = |name: &str, patterns: &[&str], rules: PartnerRules| {
        partners.push(
            name.into(),
            patterns
                .iter()
                .map(|p| DomainPattern::parse(p).unwrap())
                .collect(),
        );
        partners.set_rules(rules);
    };
    push(
        "checkout",
        &["checkout.partner.com", "yoursite.3rd-party-checkout.com"],
        PartnerRules::default(),
    );
    push("network", &["*.partner.net"], PartnerRules::default());
    push("books", &["bücher.example"], PartnerRules::default());
    push(
        "redirect",
        &["redirect.partner.org"],
        PartnerRules {
            mode: Mode::Redirect,
            ..PartnerRules::default()
        },
    );
    push(
        "forms",
        &["forms.partner.org"],
        PartnerRules {
            forms: true,
            ..PartnerRules::default()
        },
    );
    let keep = Decorator {
        partners,
        param: "kmi".into(),
        existing: Existing::Keep,
        ..Decorator::default()
    };
    let replace = Decorator {
        existing: Existing::Replace,
        ..keep.clone()
    };
    (keep, replace)
}
