//! Rewriting throughput on real pages, in one criterion group per page so the report puts the
//! contenders side by side over the same bytes and chunks:
//!
//! - `kmi_rewrite`: the proxy's rewriter (`rewrite_chunks`, partner links decorated);
//! - `lol_html_no_handlers`: lol_html with no handlers at all (the performance issue's baseline);
//! - `lol_html_noop_handler`: lol_html with the rewriter's own selectors and settings and a handler
//!   that does nothing: what lol_html costs for this job before any of ours;
//! - `kmi_spliced`: the same page answered from its recording (`splice`): every byte compared
//!   with the recorded input, the recorded output sent with this visitor's ID in its slots. Its
//!   output is checked equal to `kmi_rewrite`'s before it is measured.
//!
//! After the run it prints, per page, the rewriter's throughput as a fraction of each baseline
//! (from criterion's estimates under `target/criterion`, or `$CRITERION_HOME`).
//!
//! Full run:        cargo bench --bench rewrite
//! Quick (for CI):  cargo bench --bench rewrite -- --quick
//!   (or, with fixed short times: cargo bench --bench rewrite -- --warm-up-time 1 --measurement-time 2)
//! One page only:   cargo bench --bench rewrite -- cloudflare
//!
//! The pages are every `*.html` in `$KMI_CORPUS`, by default `../shared/corpus` beside this crate.
//! The three known pages get partners that match some of their links; any other page gets the
//! host its absolute links point at most often. Before a page is measured, the number of links
//! the rewriter decorated in it is printed, so a reader sees that real work was done.

mod common;
#[path = "common/estimates.rs"]
mod estimates;
#[path = "common/pages.rs"]
mod pages;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, Criterion, Throughput};
use kmi_proxy::config::DEFAULT_MEMORY_LIMIT;
use kmi_proxy::identity::VisitorId;
use kmi_proxy::metrics::Metrics;
use kmi_proxy::rewrite::selectors;
use kmi_proxy::splice::Recordings;

use estimates::Estimates;
use pages::{subjects, Subject};

/// The proxy sees the origin's body in frames of about this size.
const CHUNK: usize = 16 * 1024;

/// A decoded `km_ai` value of the usual shape (base64, so it needs encoding in a URL).
const ID: &str = "Zk9+aB/c3Q==";

/// The contender: the proxy's own rewriter, as it runs for one page.
fn rewrite(s: &Subject, id: &VisitorId) -> (Vec<u8>, usize) {
    let (out, stats) = s.rewrite(id, CHUNK);
    (out, stats.links_decorated())
}

/// The spliced path: a recording of this page already in `store`, the page fed in the proxy's
/// chunks.
fn spliced(s: &Subject, id: &VisitorId, store: &Arc<Recordings>) -> Vec<u8> {
    let mut splicer = s.splicer(id, store);
    let mut out = Vec::with_capacity(s.bytes.len() + s.bytes.len() / 8);
    for chunk in s.bytes.chunks(CHUNK) {
        out.extend_from_slice(&splicer.write(chunk));
    }
    out.extend_from_slice(&splicer.end());
    out
}

/// The baseline: lol_html parsing the same bytes in the same chunks with nothing to do.
fn baseline(input: &[u8]) -> Vec<u8> {
    lol_html_pass(lol_html::Settings::default(), input)
}

/// The floor: lol_html with the rewriter's selectors and settings (a page without a declared
/// charset, as these are fed) and a handler that does nothing.
fn noop_handler(input: &[u8]) -> Vec<u8> {
    let settings = lol_html::Settings::new()
        .append_element_content_handler(lol_html::element!(selectors(false), |_el| Ok(())))
        .with_adjust_charset_on_meta_tag(true)
        .with_strict(false)
        .with_memory_settings(
            lol_html::MemorySettings::new()
                .with_max_allowed_memory_usage(DEFAULT_MEMORY_LIMIT)
                .with_graceful_bail_out_on_memory_limit_exceeded(true),
        );
    lol_html_pass(settings, input)
}

/// One lol_html pass over `input` in the proxy's chunk size.
fn lol_html_pass(settings: lol_html::Settings<'_, '_>, input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 8);
    let mut rewriter = lol_html::HtmlRewriter::new(settings, |c: &[u8]| out.extend_from_slice(c));
    for chunk in input.chunks(CHUNK) {
        rewriter.write(chunk).expect("lol_html failed");
    }
    rewriter.end().expect("lol_html failed");
    out
}

const CONTENDERS: [&str; 4] = [
    "kmi_rewrite",
    "lol_html_no_handlers",
    "lol_html_noop_handler",
    "kmi_spliced",
];

fn bench_rewrite(c: &mut Criterion) {
    let id = VisitorId::new(ID).unwrap();
    for s in subjects() {
        let (out, decorated) = rewrite(&s, &id);
        println!(
            "{}: {} bytes, {} link(s) decorated for partners {}, output {} bytes",
            s.name,
            s.bytes.len(),
            decorated,
            s.partners(),
            out.len()
        );
        if s.name == "cloudflare.com.html" {
            assert!(decorated > 0, "no link decorated in {}", s.name);
        }
        assert_eq!(
            baseline(&s.bytes),
            s.bytes,
            "lol_html without handlers changed {}",
            s.name
        );

        assert_eq!(
            noop_handler(&s.bytes),
            s.bytes,
            "lol_html with a no-op handler changed {}",
            s.name
        );

        // The first request records the page; every later one is spliced. The visitor differs,
        // so the recording's stand-in must be replaced by this visitor's ID everywhere.
        let store = Recordings::new(64 << 20, Arc::new(Metrics::new())).expect("a store");
        let first = VisitorId::new("someone-else").unwrap();
        let _ = spliced(&s, &first, &store);
        assert_eq!(store.held().0, 1, "{} was not recorded", s.name);
        assert_eq!(
            spliced(&s, &id, &store),
            out,
            "the spliced {} differs from the rewritten one",
            s.name
        );

        let mut group = c.benchmark_group(&s.name);
        group.throughput(Throughput::Bytes(s.bytes.len() as u64));
        group.bench_function(CONTENDERS[0], |b| b.iter(|| black_box(rewrite(&s, &id))));
        group.bench_function(CONTENDERS[1], |b| {
            b.iter(|| black_box(baseline(black_box(&s.bytes))))
        });
        group.bench_function(CONTENDERS[2], |b| {
            b.iter(|| black_box(noop_handler(black_box(&s.bytes))))
        });
        group.bench_function(CONTENDERS[3], |b| {
            b.iter(|| black_box(spliced(&s, &id, &store)))
        });
        group.finish();
    }
}

/// Per page: MiB/s of each contender and the rewriter's share of each baseline.
fn print_ratios(estimates: &Estimates) {
    println!("\n== rewriter throughput as a fraction of lol_html's (means of this run) ==");
    for s in subjects() {
        let mibs: Vec<Option<f64>> = CONTENDERS
            .iter()
            .map(|f| {
                estimates
                    .mean_ns(&s.name, f)
                    .map(|ns| s.bytes.len() as f64 / (ns / 1e9) / (1 << 20) as f64)
            })
            .collect();
        let show = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.0} MiB/s"));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "?".to_owned(),
        };
        println!(
            "{}: kmi_rewrite {}, no handlers {}, no-op handler {}, kmi_spliced {}; kmi / no handlers = {}, kmi / no-op handler = {}, spliced / no handlers = {} (target >= 3)",
            s.name,
            show(mibs[0]),
            show(mibs[1]),
            show(mibs[2]),
            show(mibs[3]),
            ratio(mibs[0], mibs[1]),
            ratio(mibs[0], mibs[2]),
            ratio(mibs[3], mibs[1]),
        );
    }
}

criterion_group!(benches, bench_rewrite);

fn main() {
    let estimates = Estimates::from_now();
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo test --benches` runs this binary without measuring: nothing to report then.
    if !std::env::args().any(|a| a == "--test" || a == "--list") {
        print_ratios(&estimates);
    }
}
