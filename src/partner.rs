//! Partner host matching: domain patterns normalised once at load, then compared against the
//! host of a parsed URL. Pure: no I/O, no per-request parsing of the configuration.

use std::collections::HashMap;

use url::Host;

use crate::paths::PathPattern;

/// One operator-written domain pattern after normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    /// `partner.com`: that host only (ASCII, lower-case, punycode, no trailing dot).
    Exact(String),
    /// `*.partner.com`: any subdomain at any depth, not `partner.com` itself. Holds `partner.com`.
    Subdomains(String),
}

impl DomainPattern {
    /// Parses `partner.com`, `*.partner.com`, `bücher.example` or an IP literal. Errors say what
    /// is wrong in words an operator can act on.
    pub fn parse(pattern: &str) -> Result<DomainPattern, String> {
        let trimmed = pattern.trim();
        if trimmed.is_empty() {
            return Err("a domain pattern cannot be empty".into());
        }
        if trimmed.contains("://") || trimmed.contains('/') {
            return Err("write a host name only, without scheme or path".into());
        }
        let (wildcard, host) = match trimmed.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        if host.contains('*') {
            return Err(
                "`*` is only allowed as the whole first label, as in `*.partner.com`".into(),
            );
        }
        if host.contains(':') && !host.starts_with('[') {
            return Err("write the host without a port (ports never matter when matching)".into());
        }
        let normal = normalize(host)?;
        if wildcard {
            if !normal.contains('.') && !normal.starts_with('[') {
                return Err("`*.` needs at least a two-label domain after it".into());
            }
            if normal.starts_with('[') || normal.parse::<std::net::Ipv4Addr>().is_ok() {
                return Err("`*.` cannot be used with an IP address".into());
            }
            Ok(DomainPattern::Subdomains(normal))
        } else {
            Ok(DomainPattern::Exact(normal))
        }
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainPattern::Exact(h) => f.write_str(h),
            DomainPattern::Subdomains(h) => write!(f, "*.{h}"),
        }
    }
}

/// Lower-cases, applies IDNA (so `bücher.example` and `xn--bcher-kva.example` are the same
/// host) and drops one trailing dot, the same way the `url` crate treats a link's host.
fn normalize(host: &str) -> Result<String, String> {
    let host = host.strip_suffix('.').unwrap_or(host);
    match Host::parse(host) {
        Ok(Host::Domain(d)) => Ok(d),
        Ok(ip) => Ok(ip.to_string()),
        Err(e) => Err(format!("not a valid host name ({e})")),
    }
}

/// Index of a partner in the configuration, used to name it in logs and metrics.
pub type PartnerIndex = usize;

/// How a partner's links carry the ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The ID is written into the link in the page (the page is then one visitor's).
    #[default]
    Inline,
    /// The link points at the proxy's redirect path, the same for every visitor; the ID is added
    /// when the visitor clicks (the page stays cacheable).
    Redirect,
}

/// What a partner's configuration says beyond its domains.
#[derive(Debug, Clone, Default)]
pub struct PartnerRules {
    /// Also decorate forms whose action points at this partner.
    pub forms: bool,
    pub mode: Mode,
    /// When not empty, only links into these destination paths are decorated.
    pub paths: Vec<PathPattern>,
}

/// Every configured partner's patterns, arranged for a lookup per link.
#[derive(Debug, Clone, Default)]
pub struct PartnerSet {
    names: Vec<String>,
    patterns: Vec<Vec<DomainPattern>>,
    rules: Vec<PartnerRules>,
    exact: HashMap<String, PartnerIndex>,
    /// `(".partner.com", index)`, longest first so the most specific partner wins.
    suffixes: Vec<(String, PartnerIndex)>,
}

impl PartnerSet {
    /// Adds a partner. Patterns must already be parsed; a host listed twice keeps its first owner.
    pub fn push(&mut self, name: String, patterns: Vec<DomainPattern>) {
        let index = self.names.len();
        for p in &patterns {
            match p {
                DomainPattern::Exact(h) => {
                    self.exact.entry(h.clone()).or_insert(index);
                }
                DomainPattern::Subdomains(h) => self.suffixes.push((format!(".{h}"), index)),
            }
        }
        // Stable sort: equal lengths keep configuration order.
        self.suffixes
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        self.names.push(name);
        self.patterns.push(patterns);
        self.rules.push(PartnerRules::default());
    }

    /// Sets the rules of the partner added last.
    pub fn set_rules(&mut self, rules: PartnerRules) {
        if let Some(last) = self.rules.last_mut() {
            *last = rules;
        }
    }

    pub fn rules(&self, index: PartnerIndex) -> &PartnerRules {
        &self.rules[index]
    }

    /// Whether any partner's links carry the ID inside the page (so a page can differ by visitor).
    pub fn any_inline(&self) -> bool {
        self.rules.iter().any(|r| r.mode == Mode::Inline)
    }

    /// Whether any partner uses the click-time redirect (pages are rewritten for every visitor).
    pub fn any_redirect(&self) -> bool {
        self.rules.iter().any(|r| r.mode == Mode::Redirect)
    }

    /// Whether any partner wants its forms decorated.
    pub fn any_forms(&self) -> bool {
        self.rules.iter().any(|r| r.forms && r.mode == Mode::Inline)
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn name(&self, index: PartnerIndex) -> &str {
        &self.names[index]
    }

    pub fn patterns(&self, index: PartnerIndex) -> &[DomainPattern] {
        &self.patterns[index]
    }

    /// The partner owning `host`, where `host` is as the `url` crate gives it for a parsed
    /// http(s) URL: ASCII, lower-case, punycode. A trailing dot is ignored here.
    pub fn match_host(&self, host: &str) -> Option<PartnerIndex> {
        let host = host.strip_suffix('.').unwrap_or(host);
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        self.suffixes
            .iter()
            .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .map(|&(_, i)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(patterns: &[&str]) -> PartnerSet {
        let mut s = PartnerSet::default();
        let parsed = patterns
            .iter()
            .map(|p| DomainPattern::parse(p).unwrap())
            .collect();
        s.push("p".into(), parsed);
        s
    }

    #[test]
    fn exact_pattern_matches_that_host_only() {
        let s = set(&["partner.com"]);
        assert_eq!(s.match_host("partner.com"), Some(0));
        assert_eq!(s.match_host("partner.com."), Some(0));
        for other in [
            "www.partner.com",
            "evilpartner.com",
            "partner.com.evil.com",
            "partner.co",
        ] {
            assert_eq!(s.match_host(other), None, "{other}");
        }
    }

    #[test]
    fn wildcard_matches_any_depth_but_not_the_apex() {
        let s = set(&["*.partner.com"]);
        assert_eq!(s.match_host("a.partner.com"), Some(0));
        assert_eq!(s.match_host("a.b.partner.com"), Some(0));
        assert_eq!(s.match_host("partner.com"), None);
        assert_eq!(s.match_host("evilpartner.com"), None);
        assert_eq!(s.match_host("a.partner.com.evil.com"), None);
    }

    #[test]
    fn patterns_are_normalised() {
        assert_eq!(
            DomainPattern::parse("Bücher.Example.").unwrap(),
            DomainPattern::Exact("xn--bcher-kva.example".into())
        );
        assert_eq!(
            DomainPattern::parse("*.XN--BCHER-KVA.example").unwrap(),
            DomainPattern::Subdomains("xn--bcher-kva.example".into())
        );
    }

    #[test]
    fn bad_patterns_say_why() {
        for bad in [
            "",
            "https://partner.com",
            "partner.com/x",
            "a.*.com",
            "partner.com:443",
            "*.com.",
            "*.1.2.3.4",
        ] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn most_specific_partner_wins() {
        let mut s = PartnerSet::default();
        s.push(
            "broad".into(),
            vec![DomainPattern::parse("*.partner.com").unwrap()],
        );
        s.push(
            "narrow".into(),
            vec![DomainPattern::parse("*.pay.partner.com").unwrap()],
        );
        assert_eq!(s.match_host("x.pay.partner.com"), Some(1));
        assert_eq!(s.match_host("x.partner.com"), Some(0));
    }
}
