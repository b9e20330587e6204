//! Splicing against the parser: a page is recorded, then the same page or a changed one is
//! answered from the recording, in arbitrary chunks, for another visitor; every answer must be
//! byte for byte what the uncached rewriter produces for that request.
//!
//! Input: `SEL OP POS_HI POS_LO BYTE N SIZES[N] HTML`, binary:
//! - Partners: those of the `rewrite` target (`common::decorators`).
//! - `SEL`: bit `0x01` the recorded visit has an ID; bit `0x02` the later visits do; bit `0x04`
//!   the later ID is the hostile one; bits `0x18` the charset (none, UTF-8, windows-1252,
//!   Shift_JIS); bit `0x20` the later visits go through a gzip encoder, or a brotli one with bit
//!   `0x40` (a replay then sends the recording's packed pieces), and are read back by flate2 or
//!   brotli's decoder; bit `0x80` `existing = "replace"`.
//! - `OP % 4`, `POS`, `BYTE`: how the second page differs from the first: not at all, byte `POS`
//!   replaced by `BYTE`, cut at `POS`, or `BYTE` inserted at `POS` (`POS` modulo the length + 1).
//! - `N`, `SIZES`: chunk sizes for the later visits, as in the `rewrite` target.
//! - `HTML`: the first page.
//!
//! Checked: never a panic; the first visit (recorded), the changed page (spliced or diverged)
//! and the first page again (spliced from whichever recording is held) each equal the uncached
//! rewrite of the same bytes for the same visitor, unless the uncached rewrite bailed out.
#![no_main]

use std::sync::{Arc, OnceLock};

mod common;

use common::HOSTILE_ID;
use kmi_proxy::coding::{Coding, Encoder};
use kmi_proxy::decorate::Decorator;
use kmi_proxy::identity::VisitorId;
use kmi_proxy::metrics::Metrics;
use kmi_proxy::rewrite::{rewrite_chunks, Charset, Page};
use kmi_proxy::splice::{Key, Recordings, Splicer};
use libfuzzer_sys::fuzz_target;
use url::Url;


struct Setup {
    keep: Arc<Decorator>,
    replace: Arc<Decorator>,
    first: VisitorId,
    plain: VisitorId,
    hostile: VisitorId,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let (keep, replace) = common::decorators();
        Setup {
            keep: Arc::new(keep),
            replace: Arc::new(replace),
            first: VisitorId::new("first-visitor").unwrap(),
            plain: VisitorId::new("Zk9+aB/c3Q==").unwrap(),
            hostile: VisitorId::new(HOSTILE_ID).unwrap(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let [sel, op, pos_hi, pos_lo, byte, n, rest @ ..] = data else {
        return;
    };
    let n = usize::from(*n % 16).min(rest.len());
    let (sizes, html) = rest.split_at(n);
    let sizes: Vec<usize> = sizes.iter().map(|&s| usize::from(s)).collect();
    let setup = setup();
    let decorator = if sel & 0x80 != 0 {
        &setup.replace
    } else {
        &setup.keep
    };
    let first_id = (sel & 0x01 != 0).then(|| setup.first.clone());
    let later_id = match (sel & 0x02 != 0, sel & 0x04 != 0) {
        (false, _) => None,
        (true, false) => Some(setup.plain.clone()),
        (true, true) => Some(setup.hostile.clone()),
    };
    let gzip = sel & 0x20 != 0;
    let coding = if sel & 0x40 != 0 {
        Coding::Brotli
    } else {
        Coding::Gzip
    };
    let (charset, content_type) = match (sel >> 3) & 0x03 {
        0 => (Charset::Sniffed, "text/html"),
        1 => (Charset::Declared(encoding_rs::UTF_8), "text/html; charset=utf-8"),
        2 => (
            Charset::Declared(encoding_rs::WINDOWS_1252),
            "text/html; charset=windows-1252",
        ),
        _ => (
            Charset::Declared(encoding_rs::SHIFT_JIS),
            "text/html; charset=shift_jis",
        ),
    };
    let page = Page {
        url: Url::parse("https://www.site.test/page/index.html").unwrap(),
        charset,
        script: None,
        memory_limit: 4 * 1024 * 1024,
    };
    let pos = (usize::from(*pos_hi) << 8 | usize::from(*pos_lo)) % (html.len() + 1);
    let mut changed = html.to_vec();
    match op % 4 {
        0 => {}
        1 if pos < changed.len() => changed[pos] = *byte,
        1 => changed.push(*byte),
        2 => changed.truncate(pos),
        _ => changed.insert(pos, *byte),
    }

    let store = Recordings::new(1 << 20, Arc::new(Metrics::new())).unwrap();
    for (input, id, chunks) in [
        (html, &first_id, &[][..]),
        (&changed[..], &later_id, &sizes[..]),
        (html, &later_id, &sizes[..]),
    ] {
        let (want, stats) = rewrite_chunks(
            Arc::clone(decorator),
            id.clone(),
            page.clone(),
            input,
            &[],
        );
        let key = Key::new(page.url.as_str(), content_type, id.is_some());
        let mut splicer = Splicer::new(
            Arc::clone(decorator),
            id.clone(),
            page.clone(),
            Some((Arc::clone(&store), key)),
        );
        let mut got = Vec::new();
        let mut wire = Vec::new();
        let mut encoder = Encoder::new(coding);
        let mut at = 0;
        let mut cycle = chunks.iter().filter(|&&c| c > 0).cycle();
        while at < input.len() {
            let len = match cycle.next() {
                Some(&c) => c.min(input.len() - at),
                None => input.len() - at,
            };
            if gzip {
                wire.extend_from_slice(
                    &splicer
                        .write_encoded(&input[at..at + len], &mut encoder)
                        .unwrap(),
                );
            } else {
                got.extend_from_slice(&splicer.write(&input[at..at + len]));
            }
            at += len;
        }
        if gzip {
            wire.extend_from_slice(&splicer.end_encoded(&mut encoder).unwrap());
            if coding == Coding::Gzip {
                let mut reader = flate2::read::GzDecoder::new(&wire[..]);
                std::io::Read::read_to_end(&mut reader, &mut got)
                    .expect("the spliced gzip stream is valid, CRC and length included");
                assert!(reader.into_inner().is_empty(), "bytes after the gzip member");
            } else {
                let mut reader = brotli::Decompressor::new(&wire[..], 4096);
                std::io::Read::read_to_end(&mut reader, &mut got)
                    .expect("the spliced brotli stream is valid");
            }
        } else {
            got.extend_from_slice(&splicer.end());
        }
        if stats.bailed_out() {
            continue;
        }
        assert!(
            got == want,
            "{} differs from the uncached rewrite\n   got: {:?}\n  want: {:?}",
            splicer.report().path().as_str(),
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want)
        );
    }
});
