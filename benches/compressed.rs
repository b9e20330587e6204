//! Compressed pages per visitor: what a gzip or brotli response costs when it is answered from a
//! recording, against today's decode → rewrite → encode pipeline, on every corpus page. One
//! criterion group per page and coding (`cloudflare.com.html gzip`, `... br`), over the same
//! page in the proxy's 16 KiB frames:
//!
//! - `pipeline`: the per-visitor path without splicing. The origin's compressed page is decoded
//!   (`coding::Decoder`, slice by slice as `body.rs` does), rewritten by the uncached rewriter
//!   (`PageRewriter`) and compressed again (`Encoder::new(coding)`), output by output.
//! - `spliced`: the page answered from its recording through `Splicer::write_encoded` /
//!   `end_encoded`, the origin's body verified decoded: the decoded page is fed in 16 KiB chunks
//!   and the decoding itself is not measured (see `spliced_decoding`).
//! - `spliced_wire`: the origin sent the recorded compressed bytes again, and they are compared
//!   as they are (`Splicer::compressed`, `write_wire`, `end_wire`), nothing decoded.
//! - `spliced_decoding`: `spliced` with the decoding of the origin's body included, as the proxy
//!   runs when the origin's compressed bytes differ from the recorded ones but its page does not.
//!
//! Before a contender is measured, its response is read with the reference decoders (flate2's
//! `GzDecoder`, `brotli::Decompressor`) and must be exactly the uncached rewriter's output for
//! the same visitor ID, and a spliced response's `SpliceReport` must say it was spliced and how
//! it was verified (`decoded` or `compressed`); every measured iteration checks the report
//! again. A bench of the wrong path panics.
//!
//! After the run it prints, per page and coding, from criterion's estimates of this run: each
//! contender's MiB/s of HTML, spliced / pipeline throughput against the target
//! (>= 10x), and the size of the spliced response against the whole decorated page compressed
//! once with the settings of a recording's packed pieces (gzip at `pack::PACK_LEVEL`, brotli at
//! `pack::PACK_BROTLI_QUALITY` and `PACK_BROTLI_WINDOW`), with whether it is within 5%.
//!
//! Full run:        cargo bench --bench compressed
//! Quick (for CI):  cargo bench --bench compressed -- --quick
//! One page only:   cargo bench --bench compressed -- cloudflare
//!
//! The pages and their partners are `rewrite.rs`'s (`benches/common/pages.rs`); the origin's
//! compressed page is `transport.rs`'s (`benches/common/codings.rs`: gzip level 6, brotli
//! quality 9).

#[path = "common/codings.rs"]
mod codings;
mod common;
#[path = "common/estimates.rs"]
mod estimates;
#[path = "common/pages.rs"]
mod pages;

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use kmi_proxy::coding::{Coding, Decoder, Encoder};
use kmi_proxy::identity::VisitorId;
use kmi_proxy::metrics::Metrics;
use kmi_proxy::pack::{PACK_BROTLI_QUALITY, PACK_BROTLI_WINDOW, PACK_LEVEL};
use kmi_proxy::rewrite::PageRewriter;
use kmi_proxy::splice::{Path, Recordings, SpliceReport, Splicer, WireStep};

use estimates::Estimates;
use pages::{subjects, Subject};

/// The proxy sees the origin's body in frames of about this size.
const CHUNK: usize = 16 * 1024;

/// The visitor measured: a decoded `km_ai` value of the usual shape (base64, so it needs
/// encoding in a URL).
const ID: &str = "Zk9+aB/c3Q==";
/// The visitor whose request records each page: another one, so that every slot of the
/// recording must be filled with the measured visitor's ID.
const FIRST: &str = "someone-else";

const CODINGS: [Coding; 2] = [Coding::Gzip, Coding::Brotli];

const CONTENDERS: [&str; 4] = ["pipeline", "spliced", "spliced_wire", "spliced_decoding"];

/// One page in one coding, with what its contenders must send and the recordings they replay.
struct Case<'a> {
    s: &'a Subject,
    coding: Coding,
    /// The origin's compressed page.
    origin: Vec<u8>,
    /// The uncached rewriter's output for [`ID`]: what every response must decode to.
    expected: Vec<u8>,
    /// Recorded from a decoded page, with no compressed body: replays are verified decoded.
    plain: Arc<Recordings>,
    /// Recorded from the origin's compressed body as the proxy records it: a replay in the same
    /// coding compares compressed bytes.
    wire: Arc<Recordings>,
}

impl Case<'_> {
    fn group(&self) -> String {
        format!("{} {}", self.s.name, self.coding.as_str())
    }
}

/// A spliced response and how the splicer says it was made.
struct Response {
    body: Vec<u8>,
    report: Arc<SpliceReport>,
}

/// What the body adapter sees of a compressed origin body (`body.rs`): each frame as it comes,
/// then each slice the decoder gives for it with the decoder's progress after that call (compressed
/// bytes used, page bytes given); an empty slice ends the frame.
enum Seen<'a> {
    Frame(&'a [u8]),
    Slice(Bytes, u64, u64),
}

/// The origin's compressed body in the proxy's frames through `coding::Decoder`, ending with the
/// decoder's check that the stream was complete.
fn decode_origin(coding: Coding, origin: &[u8], mut seen: impl FnMut(Seen<'_>)) {
    let mut decoder = Decoder::new(coding);
    for frame in origin.chunks(CHUNK) {
        seen(Seen::Frame(frame));
        let mut rest = frame;
        loop {
            let plain = decoder
                .decode(&mut rest)
                .expect("the origin's body decodes");
            let done = plain.is_empty();
            seen(Seen::Slice(plain, decoder.compressed(), decoder.decoded()));
            if done {
                break;
            }
        }
    }
    decoder.finish().expect("the origin's body is complete");
}

/// The contender `pipeline`: decode, rewrite, encode, for one visitor.
fn pipeline(case: &Case<'_>, id: &VisitorId) -> Vec<u8> {
    let s = case.s;
    let mut rewriter =
        PageRewriter::new(Arc::clone(&s.decorator), Some(id.clone()), s.page.clone());
    let mut encoder = Encoder::new(case.coding);
    let mut body = Vec::with_capacity(case.origin.len() * 2);
    decode_origin(case.coding, &case.origin, |seen| {
        if let Seen::Slice(plain, ..) = seen {
            let out = rewriter.write(&plain);
            // As the splicer's parse does: an empty flush would still cost bytes on the wire.
            if !out.is_empty() {
                body.extend_from_slice(&encoder.write(&out).expect("encoding"));
            }
        }
    });
    let last = rewriter.end();
    if !last.is_empty() {
        body.extend_from_slice(&encoder.write(&last).expect("encoding"));
    }
    body.extend_from_slice(&encoder.finish().expect("encoding"));
    body
}

/// Where a response verified decoded gets its decoded page from.
#[derive(Clone, Copy)]
enum Input {
    /// The page itself, in 16 KiB chunks: the contender `spliced`.
    Page,
    /// The origin's compressed body decoded as `body.rs` decodes it, the decoder's progress
    /// given to the splicer too: the contender `spliced_decoding`. Its frames are not given
    /// (`wire_taken`), so neither the recording nor a replay ever keeps the compressed body, and
    /// every response is verified decoded, as for an origin whose compressed bytes change.
    Origin,
    /// As `Origin`, with the frames given: a recording made from it keeps the compressed body
    /// (the recording `spliced_wire` compares with).
    Frames,
}

/// A response from `store` verified on the decoded page, through `write_encoded` /
/// `end_encoded`. The first call on an empty store records the page instead: from
/// [`Input::Page`] with no compressed body (none is given to the splicer), from
/// [`Input::Origin`] with it.
fn decoded(case: &Case<'_>, id: &VisitorId, store: &Arc<Recordings>, input: Input) -> Response {
    let mut splicer = case.s.splicer(id, store);
    assert!(
        !splicer.compressed(case.coding),
        "{}: a page to verify decoded would be compared compressed",
        case.group()
    );
    let mut encoder = Encoder::new(case.coding);
    let mut body = Vec::with_capacity(case.origin.len() * 2);
    let mut write = |splicer: &mut Splicer, plain: &[u8]| {
        let out = splicer
            .write_encoded(plain, &mut encoder)
            .expect("encoding");
        body.extend_from_slice(&out);
    };
    match input {
        Input::Page => {
            for chunk in case.s.bytes.chunks(CHUNK) {
                write(&mut splicer, chunk);
            }
        }
        Input::Origin | Input::Frames => {
            decode_origin(case.coding, &case.origin, |seen| match seen {
                Seen::Frame(frame) => {
                    if matches!(input, Input::Frames) {
                        splicer.wire_taken(frame);
                    }
                }
                Seen::Slice(plain, used, given) => {
                    splicer.wire_mark(used, given);
                    if !plain.is_empty() {
                        write(&mut splicer, &plain);
                    }
                }
            })
        }
    }
    body.extend_from_slice(&splicer.end_encoded(&mut encoder).expect("encoding"));
    Response {
        body,
        report: splicer.report(),
    }
}

/// The contender `spliced_wire`: the origin's compressed frames compared with the recorded ones,
/// as `body.rs` does while they are equal. A frame that differs panics: the bench would
/// otherwise measure a decode.
fn spliced_wire(case: &Case<'_>, id: &VisitorId) -> Response {
    let mut splicer = case.s.splicer(id, &case.wire);
    assert!(
        splicer.compressed(case.coding),
        "{}: the recording holds no compressed body to compare",
        case.group()
    );
    let mut encoder = Encoder::new(case.coding);
    let mut body = Vec::with_capacity(case.origin.len() * 2);
    let mut take = |step: WireStep| match step {
        WireStep::Verified(out) => body.extend_from_slice(&out),
        WireStep::Decode { .. } => panic!(
            "{}: the origin's compressed bytes differ from the recorded ones",
            case.group()
        ),
    };
    for frame in case.origin.chunks(CHUNK) {
        take(splicer.write_wire(frame, &mut encoder).expect("encoding"));
    }
    take(splicer.end_wire(&mut encoder).expect("encoding"));
    Response {
        body,
        report: splicer.report(),
    }
}

/// Panics unless the response was spliced from a recording and verified `how`.
fn assert_replayed(case: &Case<'_>, contender: &str, r: &Response, how: &str) {
    assert!(
        r.report.path() == Path::Spliced && r.report.verified() == Some(how),
        "{} {contender}: served {} (verified {:?}), not spliced and verified {how}",
        case.group(),
        r.report.path().as_str(),
        r.report.verified(),
    );
}

/// Panics unless `body` reads, with the reference decoder, as the uncached rewriter's page.
fn assert_decodes(case: &Case<'_>, contender: &str, body: &[u8]) {
    let page = codings::decompress(case.coding, body)
        .unwrap_or_else(|e| panic!("{} {contender}: not a valid response: {e}", case.group()));
    if page != case.expected {
        let at = page
            .iter()
            .zip(&case.expected)
            .position(|(a, b)| a != b)
            .unwrap_or(page.len().min(case.expected.len()));
        panic!(
            "{} {contender}: decodes to {} bytes that differ from the uncached rewriter's {} at \
             byte {at}",
            case.group(),
            page.len(),
            case.expected.len()
        );
    }
}

/// Compressed sizes of one page in one coding, for the summary.
struct Sizes {
    group: String,
    page: usize,
    pipeline: usize,
    spliced: usize,
    spliced_wire: usize,
    /// The whole decorated page compressed once at the pack's level.
    once: usize,
    /// How `once` was compressed, in words.
    once_how: String,
}

/// Records the page, checks every contender once, and returns the case ready to be measured.
fn prepare<'a>(s: &'a Subject, coding: Coding, id: &VisitorId) -> (Case<'a>, Sizes) {
    let store = || Recordings::new(64 << 20, Arc::new(Metrics::new())).expect("a store");
    let (expected, stats) = s.rewrite(id, CHUNK);
    let case = Case {
        s,
        coding,
        origin: codings::origin(coding, &s.bytes),
        expected,
        plain: store(),
        wire: store(),
    };
    if s.name == "cloudflare.com.html" {
        assert!(
            stats.links_decorated() > 0,
            "no link decorated in {}",
            s.name
        );
    }

    let pipelined = pipeline(&case, id);
    assert_decodes(&case, "pipeline", &pipelined);

    // The first request records the page; every later one is spliced.
    let first = VisitorId::new(FIRST).unwrap();
    for (store, recorded) in [
        (
            &case.plain,
            decoded(&case, &first, &case.plain, Input::Page),
        ),
        (
            &case.wire,
            decoded(&case, &first, &case.wire, Input::Frames),
        ),
    ] {
        assert!(
            recorded.report.path() == Path::Recorded && store.held().0 == 1,
            "{}: the first request did not record the page (it was {})",
            case.group(),
            recorded.report.path().as_str()
        );
    }

    let plain = decoded(&case, id, &case.plain, Input::Page);
    assert_decodes(&case, "spliced", &plain.body);
    assert_replayed(&case, "spliced", &plain, "decoded");
    let wire = spliced_wire(&case, id);
    assert_decodes(&case, "spliced_wire", &wire.body);
    assert_replayed(&case, "spliced_wire", &wire, "compressed");
    let decoding = decoded(&case, id, &case.plain, Input::Origin);
    assert_decodes(&case, "spliced_decoding", &decoding.body);
    assert_replayed(&case, "spliced_decoding", &decoding, "decoded");

    let (once, once_how) = match coding {
        Coding::Gzip => (
            codings::gzip(&case.expected, PACK_LEVEL),
            format!("gzip level {PACK_LEVEL}"),
        ),
        _ => (
            codings::brotli(&case.expected, PACK_BROTLI_QUALITY, PACK_BROTLI_WINDOW),
            format!("brotli quality {PACK_BROTLI_QUALITY}, window 2^{PACK_BROTLI_WINDOW}"),
        ),
    };
    let sizes = Sizes {
        group: case.group(),
        page: s.bytes.len(),
        pipeline: pipelined.len(),
        spliced: plain.body.len(),
        spliced_wire: wire.body.len(),
        once: once.len(),
        once_how,
    };
    (case, sizes)
}

fn bench(c: &mut Criterion) -> Vec<Sizes> {
    let id = VisitorId::new(ID).unwrap();
    let mut sizes = Vec::new();
    for s in subjects() {
        for coding in CODINGS {
            let (case, size) = prepare(&s, coding, &id);
            println!(
                "{}: {} bytes of HTML, {} compressed by the origin; the decorated page is {} bytes \
                 for partners {}",
                case.group(),
                s.bytes.len(),
                case.origin.len(),
                case.expected.len(),
                s.partners(),
            );
            let mut group = c.benchmark_group(case.group());
            group.throughput(Throughput::Bytes(s.bytes.len() as u64));
            group.bench_function(CONTENDERS[0], |b| {
                b.iter(|| black_box(pipeline(&case, &id)))
            });
            group.bench_function(CONTENDERS[1], |b| {
                b.iter(|| {
                    let r = decoded(&case, &id, &case.plain, Input::Page);
                    assert_replayed(&case, CONTENDERS[1], &r, "decoded");
                    black_box(r.body)
                })
            });
            group.bench_function(CONTENDERS[2], |b| {
                b.iter(|| {
                    let r = spliced_wire(&case, &id);
                    assert_replayed(&case, CONTENDERS[2], &r, "compressed");
                    black_box(r.body)
                })
            });
            group.bench_function(CONTENDERS[3], |b| {
                b.iter(|| {
                    let r = decoded(&case, &id, &case.plain, Input::Origin);
                    assert_replayed(&case, CONTENDERS[3], &r, "decoded");
                    black_box(r.body)
                })
            });
            group.finish();
            sizes.push(size);
        }
    }
    sizes
}

/// Per page and coding: throughput, the speed target and its size target.
fn print_summary(estimates: &Estimates, sizes: &[Sizes]) {
    println!("\n== compressed responses from a recording against the per-visitor pipeline (means of this run) ==");
    for z in sizes {
        let mibs: Vec<Option<f64>> = CONTENDERS
            .iter()
            .map(|f| {
                estimates
                    .mean_ns(&z.group, f)
                    .map(|ns| z.page as f64 / (ns / 1e9) / (1 << 20) as f64)
            })
            .collect();
        if mibs.iter().all(Option::is_none) {
            continue; // left out by a filter
        }
        let show = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.0} MiB/s"));
        let ratio = |a: Option<f64>| match (a, mibs[0]) {
            (Some(a), Some(p)) if p > 0.0 => {
                let r = a / p;
                format!("{r:.1}x ({})", if r >= 10.0 { "met" } else { "NOT met" })
            }
            _ => "?".to_owned(),
        };
        let share = |n: usize| {
            let pct = 100.0 * n as f64 / z.once as f64;
            let met = if pct <= 105.0 { "met" } else { "NOT met" };
            format!("{n} bytes = {pct:.1}% (within 5%: {met})")
        };
        println!(
            "{}: pipeline {}, spliced {}, spliced_wire {}, spliced_decoding {}\n  \
             throughput / pipeline (target >= 10x): spliced {}, spliced_wire {}, spliced_decoding {}\n  \
             size against the whole decorated page compressed once ({}, {} bytes): spliced {}, \
             spliced_wire {}; pipeline {} bytes",
            z.group,
            show(mibs[0]),
            show(mibs[1]),
            show(mibs[2]),
            show(mibs[3]),
            ratio(mibs[1]),
            ratio(mibs[2]),
            ratio(mibs[3]),
            z.once_how,
            z.once,
            share(z.spliced),
            share(z.spliced_wire),
            z.pipeline,
        );
    }
}

fn main() {
    let estimates = Estimates::from_now();
    let mut c = Criterion::default().configure_from_args();
    let sizes = bench(&mut c);
    c.final_summary();
    // `cargo test --benches` runs this binary without measuring: nothing to report then.
    if !std::env::args().any(|a| a == "--test" || a == "--list") {
        print_summary(&estimates, &sizes);
    }
}
