//! Whether a request allows the visitor's ID to be put into links: the operator's consent cookie
//! (present, and holding a token when one is configured) and Global Privacy Control. Pure.

use http::HeaderMap;
use percent_encoding::percent_decode_str;

use crate::config::Consent;
use crate::identity;

/// The header a browser sends when the user turned on Global Privacy Control.
pub const SEC_GPC: &str = "sec-gpc";

/// `Ok` when the request allows decoration, else the reason (`gpc`, `no_consent`) for the log.
pub fn allows(consent: &Consent, headers: &HeaderMap) -> Result<(), &'static str> {
    if consent.honor_gpc
        && headers
            .get(SEC_GPC)
            .is_some_and(|v| v.as_bytes().trim_ascii() == b"1")
    {
        return Err("gpc");
    }
    let Some(name) = &consent.cookie else {
        return Ok(());
    };
    let Some((_, raw)) = identity::cookie_pairs(headers).find(|(n, _)| n == name) else {
        return Err("no_consent");
    };
    match &consent.contains {
        None => Ok(()),
        Some(token)
            if percent_decode_str(raw)
                .decode_utf8_lossy()
                .contains(token.as_str()) =>
        {
            Ok(())
        }
        Some(_) => Err("no_consent"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn consent(cookie: Option<&str>, contains: Option<&str>, gpc: bool) -> Consent {
        Consent {
            cookie: cookie.map(Into::into),
            contains: contains.map(Into::into),
            honor_gpc: gpc,
        }
    }

    #[test]
    fn no_consent_settings_allow_everything_but_gpc() {
        let c = consent(None, None, true);
        assert_eq!(allows(&c, &headers(&[])), Ok(()));
        assert_eq!(allows(&c, &headers(&[("sec-gpc", "1")])), Err("gpc"));
        assert_eq!(allows(&c, &headers(&[("sec-gpc", "0")])), Ok(()));
        assert_eq!(
            allows(&consent(None, None, false), &headers(&[("sec-gpc", "1")])),
            Ok(())
        );
    }

    #[test]
    fn consent_cookie_must_be_present_and_hold_the_token() {
        let c = consent(Some("cookie_consent"), Some("analytics"), true);
        assert_eq!(allows(&c, &headers(&[])), Err("no_consent"));
        assert_eq!(
            allows(&c, &headers(&[("cookie", "cookie_consent=marketing")])),
            Err("no_consent")
        );
        assert_eq!(
            allows(
                &c,
                &headers(&[("cookie", "a=1; cookie_consent=necessary%2Canalytics")])
            ),
            Ok(())
        );
        let present = consent(Some("cookie_consent"), None, true);
        assert_eq!(
            allows(&present, &headers(&[("cookie", "cookie_consent=yes")])),
            Ok(())
        );
        assert_eq!(
            allows(
                &present,
                &headers(&[("cookie", "cookie_consent=yes"), ("sec-gpc", "1")])
            ),
            Err("gpc")
        );
    }
}
