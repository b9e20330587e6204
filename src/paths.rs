//! URL path patterns as operators write them (`/admin/*`, `/checkout/*`): `*` matches any run of
//! characters, `/` included; anything else matches itself. Used for `exclude_paths` and for a
//! partner's `paths`. Pure.

use std::fmt;

use wildmatch::WildMatch;

/// A validated path pattern.
#[derive(Clone)]
pub struct PathPattern {
    text: String,
    matcher: WildMatch,
}

impl PathPattern {
    /// Parses a pattern; it must start with `/`, since it is matched against a URL's path.
    pub fn parse(text: &str) -> Result<PathPattern, String> {
        if !text.starts_with('/') {
            return Err("a path pattern starts with `/`, like \"/checkout/*\"".into());
        }
        if text.contains(['?', '#']) {
            return Err("a path pattern matches the path only: leave out `?` and `#`".into());
        }
        // wildmatch would read `?` as a wildcard; it was refused above, so only `*` is special.
        Ok(PathPattern {
            text: text.to_owned(),
            matcher: WildMatch::new(text),
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        self.matcher.matches(path)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PathPattern({:?})", self.text)
    }
}

/// Whether any of `patterns` matches `path`.
pub fn any_matches(patterns: &[PathPattern], path: &str) -> bool {
    patterns.iter().any(|p| p.matches(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_matches_any_depth_and_the_rest_is_literal() {
        let p = PathPattern::parse("/admin/*").unwrap();
        assert!(p.matches("/admin/"));
        assert!(p.matches("/admin/users/7"));
        assert!(!p.matches("/admin"));
        assert!(!p.matches("/administrator"));
        assert!(!p.matches("/x/admin/"));
        let exact = PathPattern::parse("/checkout").unwrap();
        assert!(exact.matches("/checkout"));
        assert!(!exact.matches("/checkout/"));
        let mid = PathPattern::parse("/shop/*/pay").unwrap();
        assert!(mid.matches("/shop/eu/pay"));
        assert!(!mid.matches("/shop/eu/pay/now"));
    }

    #[test]
    fn patterns_must_be_paths() {
        for bad in ["admin/*", "", "/a?b", "/a#b"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad:?}");
        }
    }
}
