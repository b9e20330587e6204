//! `identity::from_headers` on arbitrary `Cookie` headers.
//!
//! Input: arbitrary bytes, split at every `\n` into header values (a `\n` is never valid inside a
//! header value, so nothing is lost). Each piece that `HeaderValue::from_bytes` accepts becomes
//! one `Cookie` header, in order; the others are dropped, as hyper would refuse them. Plain cookie
//! headers such as `km_ai=Zk9%2BaB%2Fc3Q%3D%3D; km_ni=bob%40example.com` are valid inputs.
//!
//! The same headers are read with three cookie-name lists: `km_ni, km_ai` (the default),
//! `km_ai` alone, and none. Also `identity::from_header_value` on each header value.
//!
//! Checked:
//! - never a panic;
//! - a `Known` ID satisfies the `VisitorId` rules: non-empty, at most 255 bytes, no control
//!   character; its `url_encoded()` holds only `[A-Za-z0-9._~%-]` and percent-decodes back to the
//!   ID exactly;
//! - `Known { cookie }` names a configured cookie that is present (per `cookie_pairs`) and no
//!   cookie earlier in the precedence list is; `Absent` exactly when no configured cookie is
//!   present; `Rejected` only when one is.
#![no_main]

use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};
use kmi_proxy::identity::{self, Identity, VisitorId, MAX_ID_BYTES};
use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode_str;

fn check_id(id: &VisitorId, context: &str) {
    let s = id.as_str();
    assert!(!s.is_empty(), "empty ID: {context}");
    assert!(
        s.len() <= MAX_ID_BYTES,
        "ID of {} bytes: {context}",
        s.len()
    );
    assert!(
        !s.chars().any(char::is_control),
        "control character in ID {s:?}: {context}"
    );
    let enc = id.url_encoded();
    assert!(
        enc.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'%' | b'-')),
        "url_encoded {enc:?} has a character outside [A-Za-z0-9._~%-]: {context}"
    );
    assert_eq!(
        percent_decode_str(enc).decode_utf8().as_deref(),
        Ok(s),
        "url_encoded does not decode back to the ID: {context}"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for piece in data.split(|&b| b == b'\n') {
        if let Ok(value) = HeaderValue::from_bytes(piece) {
            if let Some(id) = identity::from_header_value(&value).id() {
                check_id(id, "from_header_value");
            }
            headers.append(COOKIE, value);
        }
    }
    let context = format!("{headers:?}");

    let lists: [&[&str]; 3] = [&["km_ni", "km_ai"], &["km_ai"], &[]];
    for list in lists {
        let names: Vec<String> = list.iter().map(|n| n.to_string()).collect();
        let present = |name: &str| identity::cookie_pairs(&headers).any(|(n, _)| n == name);
        match identity::from_headers(&headers, &names) {
            Identity::Known { id, cookie } => {
                assert!(cookie < names.len(), "cookie index {cookie}: {context}");
                assert!(
                    present(&names[cookie]),
                    "{} not present: {context}",
                    names[cookie]
                );
                for earlier in &names[..cookie] {
                    assert!(
                        !present(earlier),
                        "{earlier} present but not chosen: {context}"
                    );
                }
                check_id(&id, &context);
            }
            Identity::Absent => {
                for name in &names {
                    assert!(!present(name), "{name} present but Absent: {context}");
                }
            }
            Identity::Rejected(_) => {
                assert!(
                    names.iter().any(|n| present(n)),
                    "Rejected with no configured cookie present: {context}"
                );
            }
        }
    }
});
