//! The streaming rewriter (`rewrite::rewrite_chunks`, the proxy's own code path) on arbitrary
//! bytes, cut into arbitrary chunks.
//!
//! Input: `SEL N SIZES[N] HTML`, binary:
//! - `SEL`, one byte of settings:
//!   - bit `0x01`: the decorator has partners (the fixtures' three inline partners, plus
//!     `redirect.partner.org` in `mode = "redirect"` and `forms.partner.org` with `forms = true`);
//!     clear: a decorator with no partner at all, so no link can ever be a partner link;
//!   - bit `0x02`: there is a visitor ID (clear: none, only redirect partners' links change);
//!   - bit `0x04`: the hostile ID of `fixtures/rewrite/hostile-id.toml` instead of `Zk9+aB/c3Q==`;
//!   - bits `0x18`: the Content-Type charset: none (sniffed, `<meta charset>` may switch),
//!     UTF-8, windows-1252, Shift_JIS;
//!   - bit `0x20`: the page is on a partner (`https://shop.partner.net/catalog/`) instead of
//!     `https://www.site.test/page/index.html`;
//!   - bit `0x40`: the smallest memory limit (4096 bytes, lol_html may bail out) instead of the
//!     default 4 MiB (which no fuzz input reaches);
//!   - bit `0x80`: `existing = "replace"` instead of `"keep"`.
//! - `N`: how many chunk sizes follow, `N % 16`.
//! - `SIZES`: one byte each, the sizes of the chunks, cycled (zeros are skipped; all zero or
//!   `N = 0` means one chunk).
//! - `HTML`: the rest, arbitrary bytes.
//!
//! Checked:
//! - never a panic;
//! - when neither run hit the memory limit, the streamed output (the chunk sizes above) equals the
//!   one-shot output (a single chunk) byte for byte, with the same per-partner link counts; with
//!   the 4 MiB limit, no run ever bails out;
//! - output == input byte for byte, with no link counted, whenever no link can change: the
//!   decorator has no partners, or the input contains neither `href` nor `action` (ASCII case
//!   insensitive, the only attributes the rewriter ever writes or reads a link from). This holds
//!   for both runs, bail-out or not.
#![no_main]

use std::sync::{Arc, OnceLock};

mod common;

use common::HOSTILE_ID;
use kmi_proxy::decorate::Decorator;
use kmi_proxy::identity::VisitorId;
use kmi_proxy::rewrite::{rewrite_chunks, Charset, Page};
use libfuzzer_sys::fuzz_target;
use url::Url;

const SMALL_LIMIT: usize = 4096;
const DEFAULT_LIMIT: usize = 4 * 1024 * 1024;

struct Setup {
    none: Arc<Decorator>,
    keep: Arc<Decorator>,
    replace: Arc<Decorator>,
    plain_id: VisitorId,
    hostile_id: VisitorId,
    pages: [Url; 2],
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let (keep, replace) = common::decorators();
        Setup {
            none: Arc::new(Decorator::default()),
            keep: Arc::new(keep),
            replace: Arc::new(replace),
            plain_id: VisitorId::new("Zk9+aB/c3Q==").unwrap(),
            hostile_id: VisitorId::new(HOSTILE_ID).unwrap(),
            pages: [
                Url::parse("https://www.site.test/page/index.html").unwrap(),
                Url::parse("https://shop.partner.net/catalog/").unwrap(),
            ],
        }
    })
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

fuzz_target!(|data: &[u8]| {
    let [sel, n, rest @ ..] = data else {
        return;
    };
    let n = usize::from(*n % 16).min(rest.len());
    let (sizes, html) = rest.split_at(n);
    let sizes: Vec<usize> = sizes.iter().map(|&s| usize::from(s)).collect();

    let setup = setup();
    let has_partners = sel & 0x01 != 0;
    let decorator = match (has_partners, sel & 0x80 != 0) {
        (false, _) => &setup.none,
        (true, false) => &setup.keep,
        (true, true) => &setup.replace,
    };
    let id = match (sel & 0x02 != 0, sel & 0x04 != 0) {
        (false, _) => None,
        (true, false) => Some(setup.plain_id.clone()),
        (true, true) => Some(setup.hostile_id.clone()),
    };
    let charset = match (sel >> 3) & 0x03 {
        0 => Charset::Sniffed,
        1 => Charset::Declared(encoding_rs::UTF_8),
        2 => Charset::Declared(encoding_rs::WINDOWS_1252),
        _ => Charset::Declared(encoding_rs::SHIFT_JIS),
    };
    let small_limit = sel & 0x40 != 0;
    let page = Page {
        url: setup.pages[usize::from(sel & 0x20 != 0)].clone(),
        charset,
        script: None,
        memory_limit: if small_limit {
            SMALL_LIMIT
        } else {
            DEFAULT_LIMIT
        },
    };

    let (one_shot, one_stats) =
        rewrite_chunks(Arc::clone(decorator), id.clone(), page.clone(), html, &[]);
    let (streamed, streamed_stats) = rewrite_chunks(Arc::clone(decorator), id, page, html, &sizes);

    let bailed = one_stats.bailed_out() || streamed_stats.bailed_out();
    if !small_limit {
        assert!(!bailed, "bailed out under the 4 MiB limit");
    }
    if !bailed {
        assert!(
            one_shot == streamed,
            "streamed output (chunks {sizes:?}) differs from one-shot output\n one-shot: {:?}\n streamed: {:?}",
            String::from_utf8_lossy(&one_shot),
            String::from_utf8_lossy(&streamed)
        );
        assert_eq!(
            one_stats.links_by_partner().collect::<Vec<_>>(),
            streamed_stats.links_by_partner().collect::<Vec<_>>(),
            "link counts differ between one-shot and streamed (chunks {sizes:?})"
        );
    }
    if !has_partners
        || !(contains_ignore_case(html, b"href") || contains_ignore_case(html, b"action"))
    {
        for (name, out, stats) in [
            ("one-shot", &one_shot, &one_stats),
            ("streamed", &streamed, &streamed_stats),
        ] {
            assert!(
                out.as_slice() == html,
                "{name} output changed a page where no link can change (chunks {sizes:?})\n  input: {:?}\n output: {:?}",
                String::from_utf8_lossy(html),
                String::from_utf8_lossy(out)
            );
            assert_eq!(stats.links_decorated(), 0, "{name}");
        }
    }
});
