//! Parse once, splice per visitor. A rewritten page is the same bytes for every visitor but the
//! ID, so the first rewrite of a URL is recorded (input, output with the ID as slots, and
//! checkpoints "after input byte k, the output up to n was out"), and later responses with the
//! same bytes are verified as they stream and answered from the recording with this visitor's
//! ID in the slots, with no parse at all. On the first byte that differs, a fresh rewriter is fed
//! the recorded prefix and then the live bytes, and the output already sent is dropped from its
//! output: nothing is lost, duplicated or reordered.
//!
//! Why that is exact. The recording is made by a normal rewrite with a random stand-in ID (the
//! sentinel) whose two forms (URL-encoded for links, HTML-escaped for a form's hidden input) are
//! plain ASCII that no escaping changes, so the output for a real ID is the recorded output with
//! each sentinel replaced by the real ID's form. lol_html never takes output back: what it had
//! written after input [0, k) is a prefix of its final output for *any* continuation, and its
//! final output does not depend on how the input was chunked. So for a live body whose first k
//! bytes equal the recording's, the recorded output up to checkpoint k is a prefix of what the
//! uncached rewriter would send, and a fresh rewriter fed the same bytes produces that prefix
//! again before anything new. Nothing is ever spliced into bytes that were not compared, byte for
//! byte, with the recorded input. `tests/splice.rs` holds this to the uncached rewriter.
//!
//! Everything else that could change the output is part of the recording's key or of its store:
//! the store belongs to one configuration snapshot (a reload starts an empty one), and the key
//! holds the page URL, the response's Content-Type and whether there is an ID at all.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use memchr::memmem;

use crate::coding::{Coding, Encoder};
use crate::decorate::Decorator;
use crate::identity::VisitorId;
use crate::metrics::Metrics;
use crate::pack::{self, Pack, PackKind};
use crate::rewrite::{Page, PageRewriter, RewriteStats};
use crate::segments::Segments;

/// `kmi` and 32 hex digits: what every sentinel starts with.
const STEM_LEN: usize = 35;
/// A sentinel is its stem and one byte naming the form: `u` (links) or `h` (hidden inputs).
const SENTINEL_LEN: usize = STEM_LEN + 1;

/// After this many divergences in a row, a URL is not recorded for [`UNSTABLE_FOR`]: a page that
/// changes on every request (a nonce in its head) then costs what it cost before splicing.
const MAX_MISSES: u32 = 3;

/// A recording has a checkpoint at least every this many input bytes.
const CHECKPOINT_EVERY: usize = 8 * 1024;
/// A replay sends a run of recorded bytes at least this long as a slice of the recording, and a
/// shorter one copied (see [`Recording::splice`]).
const SHARE_MIN: usize = 512;
const UNSTABLE_FOR: Duration = Duration::from_secs(30);

/// The two forms an ID takes in a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Percent-encoded, in a link's query.
    Url,
    /// HTML-escaped, as a form's hidden input value.
    Html,
}

/// A random stand-in for the visitor's ID, one per recording. It never leaves the proxy: every
/// byte sent has it replaced by the visitor's own ID.
#[derive(Clone, Copy)]
struct Sentinel {
    stem: [u8; STEM_LEN],
}

impl Sentinel {
    fn random() -> Sentinel {
        // 128 bits from std's per-process random SipHash keys (seeded by the OS), fresh keys
        // per call: nobody outside can predict a sentinel to plant it in a page.
        let mut stem = [0u8; STEM_LEN];
        stem[..3].copy_from_slice(b"kmi");
        let hex = b"0123456789abcdef";
        for half in 0..2 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(half);
            let bits = h.finish();
            for i in 0..16 {
                stem[3 + half * 16 + i] = hex[((bits >> (i * 4)) & 0xf) as usize];
            }
        }
        Sentinel { stem }
    }

    fn stem(&self) -> &str {
        std::str::from_utf8(&self.stem).expect("ASCII")
    }

    /// The ID the recording rewrite runs with.
    fn id(&self) -> VisitorId {
        VisitorId::stand_in(format!("{}h", self.stem()), format!("{}u", self.stem()))
    }
}

/// The visitor's ID in both forms, ready to splice.
#[derive(Clone)]
struct Forms {
    url: Bytes,
    html: Bytes,
}

impl Forms {
    fn of(id: Option<&VisitorId>) -> Forms {
        match id {
            Some(id) => Forms {
                url: Bytes::copy_from_slice(id.url_encoded().as_bytes()),
                html: Bytes::from(crate::rewrite::ascii_attribute(id.as_str())),
            },
            None => Forms {
                url: Bytes::new(),
                html: Bytes::new(),
            },
        }
    }

    fn get(&self, form: Form) -> &Bytes {
        match form {
            Form::Url => &self.url,
            Form::Html => &self.html,
        }
    }
}

/// One recorded rewrite: shared, read-only, by every request that replays it.
pub struct Recording {
    sentinel: Sentinel,
    input: Bytes,
    /// The rewriter's output with the sentinel in the slots.
    output: Bytes,
    /// Where the sentinels are in `output`, in order.
    slots: Vec<(usize, Form)>,
    /// `(k, n)`: after input `[0, k)` the output `[0, n)` was out. Both never decrease, and `n`
    /// is never inside a slot. The output after the end of input is all of `output`.
    checkpoints: Vec<(usize, usize)>,
    /// Links decorated, per partner, for the access log and the metrics.
    links: Vec<usize>,
    /// Divergences in a row up to this recording.
    misses: AtomicU32,
    /// The output packed, per coding and per length of the visitor's ID (see [`pack::Shape`]),
    /// each made when a response that needs it first replays the page.
    packs: Packs,
    /// The origin's compressed body, when the page came compressed: a later response in the
    /// same coding is compared with it as it arrives, with no decoding at all.
    wire: Option<Wire>,
    /// The origin's body in another coding than `wire`'s, learnt from a replay in that coding
    /// that was verified decoded to the page's end: later ones are compared compressed too.
    learnt: [OnceLock<Wire>; 4],
    /// A replay is learning the body in this coding; no other needs to.
    learning: [AtomicBool; 4],
}

/// The index of a coding among a recording's compressed bodies.
fn coding_index(coding: Coding) -> usize {
    match coding {
        Coding::Gzip => 0,
        Coding::Deflate => 1,
        Coding::Brotli => 2,
        Coding::Zstd => 3,
    }
}

/// How many packed variants (coding and ID lengths) a recording keeps before it falls back to
/// one pack per coding that fits any ID. Anonymous IDs mostly share a length or two.
const PACK_VARIANTS: usize = 6;
/// Packed pieces end at checkpoints at least this far apart in the output, and closer near its
/// start (see `pack_cuts`).
const PACK_CUT_EVERY: usize = 32 * 1024;
/// Where the first packed piece may end.
const PACK_FIRST_CUT: usize = 4 * 1024;

/// A recording's packed outputs. Set once each, read without locks.
#[derive(Default)]
struct Packs {
    /// The byte values the output does not use, for shaped packs' stand-ins.
    absent: OnceLock<Vec<u8>>,
    shaped: [OnceLock<Variant>; PACK_VARIANTS],
    any_gzip: OnceLock<Pack>,
    any_brotli: OnceLock<Pack>,
}

struct Variant {
    kind: PackKind,
    lens: (usize, usize),
    pack: Pack,
}

impl Packs {
    fn weight(&self) -> usize {
        self.shaped
            .iter()
            .filter_map(|c| c.get())
            .map(|v| v.pack.weight())
            .sum::<usize>()
            + self.any_gzip.get().map_or(0, Pack::weight)
            + self.any_brotli.get().map_or(0, Pack::weight)
    }
}

/// Where packed pieces end, from the checkpoints `(input, output)`: fewer cuts than checkpoints,
/// since each ends a compressed block and a new block costs its code tables (about 30 bytes of
/// brotli each on the corpus page). A replay sends only up to a cut, so they come closer where
/// the page starts, for its head to leave early: after about 4, 8 and 16 KiB, then every 32 KiB.
fn pack_cuts(checkpoints: &[(usize, usize)]) -> Vec<usize> {
    let mut cuts: Vec<usize> = Vec::new();
    for &(_, n) in checkpoints {
        let last = cuts.last().copied().unwrap_or(0);
        if n >= last + last.clamp(PACK_FIRST_CUT, PACK_CUT_EVERY) {
            cuts.push(n);
        }
    }
    cuts
}

/// What stands for the ID in each form's slots while a pack for IDs of `lens` (percent-encoded,
/// HTML-escaped) is compressed, from the byte values the output lacks: a different byte at each
/// offset of each form when there are enough (faithful stand-ins, see `pack::Shape`), else one
/// byte per form. Never the same stand-in for both forms, whose IDs differ. `None` when the
/// output leaves too few byte values.
fn stand_ins(
    absent: &[u8],
    slots: &[(usize, Form)],
    lens: (usize, usize),
) -> Option<(Vec<u8>, Vec<u8>)> {
    let used = |f: Form| slots.iter().any(|&(_, form)| form == f);
    let url = if used(Form::Url) { lens.0 } else { 0 };
    let html = if used(Form::Html) { lens.1 } else { 0 };
    if absent.len() >= url + html {
        Some((absent[..url].to_vec(), absent[url..url + html].to_vec()))
    } else if absent.len() >= 2 {
        Some((vec![absent[0]; url], vec![absent[1]; html]))
    } else if absent.len() == 1 && (url == 0 || html == 0) {
        Some((vec![absent[0]; url], vec![absent[0]; html]))
    } else {
        None
    }
}

/// An origin's compressed body as recorded.
struct Wire {
    coding: Coding,
    bytes: Bytes,
    /// `(c, p)`: the decoder had given the page's `[0, p)` once it had used the compressed
    /// `[0, c)`. Both never decrease; the last is the whole body and the whole page.
    marks: Vec<(usize, usize)>,
}

/// In `pairs`, increasing in both, the second of the last pair whose first is at most `x`; 0 if
/// there is none.
fn second_at_or_before(pairs: &[(usize, usize)], x: usize) -> usize {
    let i = pairs.partition_point(|&(first, _)| first <= x);
    if i == 0 {
        0
    } else {
        pairs[i - 1].1
    }
}

impl Wire {
    /// How much of the page compressed bytes `[0, c)` determine: decoding is a function of the
    /// bytes used, so equal compressed prefixes decode to equal page prefixes.
    fn page_at(&self, c: usize) -> usize {
        second_at_or_before(&self.marks, c)
    }
}

/// A compressed body being recorded beside the page.
struct WireRecorder {
    coding: Coding,
    bytes: BytesMut,
    marks: Vec<(usize, usize)>,
}

impl WireRecorder {
    fn new(coding: Coding) -> WireRecorder {
        WireRecorder {
            coding,
            bytes: BytesMut::new(),
            marks: Vec::new(),
        }
    }

    /// The decoder has used `compressed` bytes and given `decoded` bytes of page so far.
    fn mark(&mut self, compressed: u64, decoded: u64) {
        let mark = (compressed as usize, decoded as usize);
        if self.marks.last() != Some(&mark) {
            self.marks.push(mark);
        }
    }

    /// The body as recorded, usable only if its last mark is the whole body and the whole
    /// page of `page_len` bytes.
    fn finish(self, page_len: usize) -> Option<Wire> {
        (self.marks.last() == Some(&(self.bytes.len(), page_len))).then(|| Wire {
            coding: self.coding,
            bytes: Bytes::copy_from_slice(&self.bytes),
            marks: self.marks,
        })
    }
}

impl Recording {
    /// The origin's compressed body in `coding`, if one is known.
    fn wire_in(&self, coding: Coding) -> Option<&Wire> {
        self.wire
            .as_ref()
            .filter(|w| w.coding == coding)
            .or_else(|| self.learnt[coding_index(coding)].get())
    }

    /// Memory held, for the store's budget.
    fn weight(&self) -> usize {
        self.input.len()
            + self.output.len()
            + self.slots.len() * 16
            + self.checkpoints.len() * 16
            + self.links.len() * 8
            + self.packs.weight()
            + self
                .wire
                .iter()
                .chain(self.learnt.iter().filter_map(OnceLock::get))
                .map(|w| w.bytes.len() + w.marks.len() * 16)
                .sum::<usize>()
            + 256
    }

    /// The output packed for `kind` and IDs of these lengths (percent-encoded, HTML-escaped);
    /// true beside it when this call made it.
    fn pack(&self, kind: PackKind, lens: (usize, usize)) -> (&Pack, bool) {
        // Called for every packed send of every replay: the slots and cuts a pack is made
        // from are worked out only when one is made.
        let build = |shape: Option<pack::Shape<'_>>| {
            let slots: Vec<(usize, usize)> = self
                .slots
                .iter()
                .map(|&(at, _)| (at, SENTINEL_LEN))
                .collect();
            let cuts = pack_cuts(&self.checkpoints);
            Pack::new(kind, &self.output, &slots, &cuts, shape)
        };
        let absent = self
            .packs
            .absent
            .get_or_init(|| pack::absent_bytes(&self.output));
        if let Some((url, html)) = stand_ins(absent, &self.slots, lens) {
            for cell in &self.packs.shaped {
                let mut made = false;
                let variant = cell.get_or_init(|| {
                    made = true;
                    let per_slot: Vec<&[u8]> = self
                        .slots
                        .iter()
                        .map(|&(_, form)| match form {
                            Form::Url => &url[..],
                            Form::Html => &html[..],
                        })
                        .collect();
                    let shape = pack::Shape {
                        stand_ins: &per_slot,
                    };
                    Variant {
                        kind,
                        lens,
                        pack: build(Some(shape)),
                    }
                });
                if variant.kind == kind && variant.lens == lens {
                    return (&variant.pack, made);
                }
            }
        }
        // Every variant taken (or a page that uses all 256 byte values): one pack per coding
        // that is valid for any ID, each run compressed afresh.
        let cell = match kind {
            PackKind::Gzip => &self.packs.any_gzip,
            PackKind::Brotli => &self.packs.any_brotli,
        };
        let mut made = false;
        let pack = cell.get_or_init(|| {
            made = true;
            build(None)
        });
        (pack, made)
    }

    /// The output `[from, to)` for a visitor: the recorded bytes between slots as slices of
    /// `output` (this request's handle on [`Recording::output`]), the visitor's ID in the slots.
    /// A run of recorded bytes shorter than [`SHARE_MIN`] is copied, with the IDs beside it, into
    /// a small buffer instead: cheaper than a slice of its own in the frame.
    fn splice(&self, output: &Bytes, from: usize, to: usize, forms: &Forms) -> Segments {
        let first = self.slots.partition_point(|&(at, _)| at < from);
        let slots = &self.slots[first..];
        if !matches!(slots.first(), Some(&(at, _)) if at < to) {
            return output.slice(from..to).into();
        }
        let mut out = Segments::default();
        // Room for a few IDs and the short runs beside them, in one allocation: each part split
        // off it leaves the rest of the room to the next.
        let mut small = BytesMut::with_capacity(4 * SHARE_MIN);
        let recorded = |a: usize, b: usize, small: &mut BytesMut, out: &mut Segments| {
            if b - a >= SHARE_MIN {
                out.push(small.split().freeze());
                out.push(output.slice(a..b));
            } else {
                small.extend_from_slice(&output[a..b]);
            }
        };
        let mut at = from;
        for &(slot, form) in slots.iter().take_while(|&&(s, _)| s < to) {
            recorded(at, slot, &mut small, &mut out);
            small.extend_from_slice(forms.get(form));
            at = slot + SENTINEL_LEN;
        }
        recorded(at, to, &mut small, &mut out);
        out.push(small.freeze());
        out
    }

    /// The output known once input `[0, verified)` matched: the last checkpoint at or before it.
    fn covered(&self, verified: usize) -> usize {
        second_at_or_before(&self.checkpoints, verified)
    }
}

/// Builds a recording while a page is rewritten with the sentinel.
struct Recorder {
    input: BytesMut,
    output: BytesMut,
    checkpoints: Vec<(usize, usize)>,
    /// Past this many bytes (input and output) the page is not recorded.
    limit: usize,
    /// Divergences in a row before this page.
    misses: u32,
    /// The origin's compressed body, for a recording made from the first byte of a
    /// compressed response.
    wire: Option<WireRecorder>,
}

impl Recorder {
    fn new(limit: usize, misses: u32) -> Recorder {
        Recorder {
            input: BytesMut::new(),
            output: BytesMut::new(),
            checkpoints: Vec::new(),
            limit,
            misses,
            wire: None,
        }
    }

    fn held(&self) -> usize {
        self.input.len() + self.output.len() + self.wire.as_ref().map_or(0, |w| w.bytes.len())
    }

    /// Whether the page is still small enough to record; false drops what was held.
    fn fits(&mut self, more: usize) -> bool {
        if self.held() + more > self.limit {
            self.input = BytesMut::new();
            self.output = BytesMut::new();
            self.wire = None;
            self.limit = 0;
            return false;
        }
        true
    }

    fn finish(mut self, sentinel: Sentinel, stats: &RewriteStats) -> Option<Recording> {
        if self.limit == 0 || stats.bailed_out() {
            return None;
        }
        // A page that already contains the sentinel's stem cannot tell its own bytes from slots.
        if memmem::find(&self.input, &sentinel.stem).is_some() {
            return None;
        }
        // Exact-size copies: the buffers grew by doubling, and a recording kept for minutes should
        // hold its bytes, not up to twice as much (the store weighs lengths). Input and output
        // share one allocation: for a page of more than 64 KB that is past malloc's mmap
        // threshold, so an evicted recording leaves the process whole instead of leaving a hole
        // in some worker's heap (`cargo bench --bench recordings`: RSS per recorded byte 1.74
        // with two copies on two workers' heaps, 1.27 with one).
        let mut both = BytesMut::with_capacity(self.input.len() + self.output.len());
        both.extend_from_slice(&self.input);
        both.extend_from_slice(&self.output);
        let mut output = both.freeze();
        let input = output.split_to(self.input.len());
        let mut slots = Vec::new();
        for at in memmem::find_iter(&output, &sentinel.stem) {
            match output.get(at + STEM_LEN) {
                Some(b'u') => slots.push((at, Form::Url)),
                Some(b'h') => slots.push((at, Form::Html)),
                _ => return None,
            }
        }
        // Output known after input [0, k) is known after any longer prefix too, so `n` may be
        // carried forward; and a checkpoint inside a slot moves back to the slot's start: half
        // an ID is never sent.
        let mut known = 0;
        for cp in &mut self.checkpoints {
            known = known.max(cp.1);
            cp.1 = known;
        }
        for cp in &mut self.checkpoints {
            let i = slots.partition_point(|&(at, _)| at < cp.1);
            if i > 0 {
                let (at, _) = slots[i - 1];
                if cp.1 < at + SENTINEL_LEN {
                    cp.1 = at;
                }
            }
        }
        let wire = self.wire.take().and_then(|w| w.finish(self.input.len()));
        Some(Recording {
            sentinel,
            input,
            output,
            slots,
            checkpoints: self.checkpoints,
            links: stats.counts(),
            misses: AtomicU32::new(self.misses),
            packs: Packs::default(),
            wire,
            learnt: Default::default(),
            learning: Default::default(),
        })
    }
}

/// Replaces sentinels in a stream of output with the visitor's ID, holding back the end of a
/// chunk that could be the start of a sentinel split across two chunks.
struct Substitute {
    sentinel: Sentinel,
    forms: Forms,
    held: Vec<u8>,
}

impl Substitute {
    fn push(&mut self, chunk: &[u8], out: &mut BytesMut) {
        let joined;
        let data: &[u8] = if self.held.is_empty() {
            chunk
        } else {
            self.held.extend_from_slice(chunk);
            joined = std::mem::take(&mut self.held);
            &joined
        };
        let mut at = 0;
        for found in memmem::find_iter(data, &self.sentinel.stem) {
            if found < at {
                continue;
            }
            let form = match data.get(found + STEM_LEN) {
                Some(b'u') => Form::Url,
                Some(b'h') => Form::Html,
                Some(_) => continue,
                None => {
                    // The form byte is in the next chunk.
                    out.extend_from_slice(&data[at..found]);
                    self.held = data[found..].to_vec();
                    return;
                }
            };
            out.extend_from_slice(&data[at..found]);
            out.extend_from_slice(self.forms.get(form));
            at = found + SENTINEL_LEN;
        }
        let rest = &data[at..];
        let keep = (1..=rest.len().min(STEM_LEN - 1))
            .rev()
            .find(|&n| rest[rest.len() - n..] == self.sentinel.stem[..n])
            .unwrap_or(0);
        out.extend_from_slice(&rest[..rest.len() - keep]);
        self.held = rest[rest.len() - keep..].to_vec();
    }

    fn finish(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&std::mem::take(&mut self.held));
    }
}

/// Which path served a page, for the access log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Path {
    /// Parsed, with no recording (splicing off, the URL unstable, or the page too large).
    Parsed = 0,
    /// Parsed with the sentinel and recorded for the next visitors.
    Recorded = 1,
    /// Answered from a recording, every byte verified.
    Spliced = 2,
    /// Answered from a recording up to a difference, then parsed.
    Diverged = 3,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Parsed => "parsed",
            Path::Recorded => "recorded",
            Path::Spliced => "spliced",
            Path::Diverged => "diverged",
        }
    }
}

/// What one page's splicer tells the access log: the path, and where a replay diverged.
#[derive(Debug, Default)]
pub struct SpliceReport {
    path: AtomicU8,
    diverged_at: AtomicUsize,
    /// For a compressed page from a recording: 1 compared compressed, 2 decoded.
    verified: AtomicU8,
}

impl SpliceReport {
    pub fn path(&self) -> Path {
        match self.path.load(Ordering::Relaxed) {
            1 => Path::Recorded,
            2 => Path::Spliced,
            3 => Path::Diverged,
            _ => Path::Parsed,
        }
    }

    /// The input offset of the first differing byte, for a diverged replay.
    pub fn diverged_at(&self) -> Option<usize> {
        (self.path() == Path::Diverged).then(|| self.diverged_at.load(Ordering::Relaxed))
    }

    /// How a compressed page answered from a recording was compared with it: `compressed`
    /// (the origin's bytes were the recorded ones, nothing decoded) or `decoded`.
    pub fn verified(&self) -> Option<&'static str> {
        match self.verified.load(Ordering::Relaxed) {
            1 => Some("compressed"),
            2 => Some("decoded"),
            _ => None,
        }
    }

    fn set(&self, path: Path) {
        self.path.store(path as u8, Ordering::Relaxed);
    }
}

/// What identifies a recording within one configuration's store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The page URL (scheme, host, path, query): relative links resolve against it.
    pub url: String,
    /// The response's Content-Type, which carries the charset.
    pub content_type: String,
    /// Whether the page was rewritten for a visitor with an ID (without one, only redirect-mode
    /// links change).
    pub with_id: bool,
}

impl Key {
    pub fn new(url: &str, content_type: &str, with_id: bool) -> Key {
        Key {
            url: url.to_owned(),
            content_type: content_type.to_owned(),
            with_id,
        }
    }
}

#[derive(Clone)]
enum Entry {
    /// A recording and its weight when inserted: quick_cache weighs an entry again when it is
    /// replaced, and a recording grows (its packs) after insertion, so the entry keeps the
    /// figure it was inserted with.
    Page(Arc<Recording>, usize),
    /// Diverged too often: parse without recording until then.
    Unstable(Instant),
    /// A compressed page diverged after this many recordings in a row: the next request
    /// records it again from its first byte.
    Retry { misses: u32 },
    /// One request is recording this page (`token` names it): the others parse without
    /// recording meanwhile, so a burst of first visitors holds one copy of the page, not one
    /// each. Expires, in case the recording request never finishes.
    Recording { until: Instant, token: u64 },
}

impl Entry {
    fn page(recording: Arc<Recording>) -> Entry {
        let weight = recording.weight();
        Entry::Page(recording, weight)
    }
}

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<Key, Entry> for Weight {
    fn weight(&self, key: &Key, entry: &Entry) -> u64 {
        let entry = match entry {
            Entry::Page(_, weight) => *weight,
            Entry::Unstable(_) | Entry::Recording { .. } | Entry::Retry { .. } => 64,
        };
        (key.url.len() + key.content_type.len() + entry) as u64
    }
}

/// The recordings of one configuration snapshot, bounded by `rewrite.cache_bytes` (quick_cache
/// evicts by weight); a page larger than a sixteenth of that is never recorded.
pub struct Recordings {
    cache: quick_cache::sync::Cache<Key, Entry, Weight>,
    /// Pages (URL, and whether with an ID) recorded at least once lately, by a keyed hash: a
    /// hint at request time, before the response's Content-Type completes the key. A stale or
    /// colliding hint costs one uncompressed fetch from the origin, nothing else.
    recorded: quick_cache::sync::Cache<u64, ()>,
    hasher: std::collections::hash_map::RandomState,
    page_limit: usize,
    metrics: Arc<Metrics>,
}

/// What a request should do for its page.
enum Lookup {
    Replay(Arc<Recording>),
    /// Record it; the claim's token.
    Record(u64, u32),
    Parse,
}

/// How many recently recorded pages [`Recordings::has_page`] remembers (16 bytes each).
const RECORDED_HINTS: usize = 64 * 1024;

/// How long a claim to record a page holds when its request never finishes.
const RECORDING_FOR: Duration = Duration::from_secs(10);

impl Recordings {
    /// A store of at most `bytes`; `None` when splicing is off (`cache_bytes = 0`).
    pub fn new(bytes: usize, metrics: Arc<Metrics>) -> Option<Arc<Recordings>> {
        if bytes == 0 {
            return None;
        }
        metrics.recordings.set(0);
        metrics.recording_bytes.set(0);
        Some(Arc::new(Recordings {
            cache: quick_cache::sync::Cache::with_weighter(
                (bytes / (64 * 1024)).max(16),
                bytes as u64,
                Weight,
            ),
            recorded: quick_cache::sync::Cache::new(RECORDED_HINTS),
            hasher: std::collections::hash_map::RandomState::new(),
            page_limit: bytes / 16,
            metrics,
        }))
    }

    fn hint(&self, url: &str, with_id: bool) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one((url, with_id))
    }

    /// Whether the page at `url` has been recorded lately (for some Content-Type): the origin
    /// may then be asked for it uncompressed, since a replay compresses it for free.
    pub fn has_page(&self, url: &str, with_id: bool) -> bool {
        self.recorded.get(&self.hint(url, with_id)).is_some()
    }

    fn lookup(&self, key: &Key) -> Lookup {
        let now = Instant::now();
        match self.cache.get(key) {
            Some(Entry::Page(r, _)) => Lookup::Replay(r),
            Some(Entry::Unstable(until)) | Some(Entry::Recording { until, .. }) if now < until => {
                Lookup::Parse
            }
            Some(Entry::Retry { misses }) => Lookup::Record(self.claim(key), misses),
            _ => Lookup::Record(self.claim(key), 0),
        }
    }

    /// Marks `key` as being recorded by the caller; returns the claim's token.
    fn claim(&self, key: &Key) -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let token = NEXT.fetch_add(1, Ordering::Relaxed);
        let until = Instant::now() + RECORDING_FOR;
        self.cache
            .insert(key.clone(), Entry::Recording { until, token });
        token
    }

    /// Claims `key` for re-recording after a replay of `old` diverged, unless another request
    /// already replaced `old`.
    fn claim_after(&self, key: &Key, old: &Arc<Recording>) -> Option<u64> {
        match self.cache.get(key) {
            Some(Entry::Page(current, _)) if Arc::ptr_eq(&current, old) => Some(self.claim(key)),
            _ => None,
        }
    }

    /// Gives up the claim `token` on `key` if it still stands.
    fn release(&self, key: &Key, token: u64) {
        self.cache.remove_if(
            key,
            |e| matches!(e, Entry::Recording { token: t, .. } if *t == token),
        );
    }

    fn insert(&self, key: Key, entry: Entry) {
        self.cache.insert(key, entry);
        self.metrics.recordings.set(self.cache.len() as i64);
        self.metrics.recording_bytes.set(self.cache.weight() as i64);
    }

    /// Weighs `key`'s entry again if it still is `recording` (which has grown a pack).
    fn reweigh(&self, key: &Key, recording: &Recording) {
        if let Some(Entry::Page(current, _)) = self.cache.get(key) {
            if std::ptr::eq(Arc::as_ptr(&current), recording) {
                self.insert(key.clone(), Entry::page(current));
            }
        }
    }

    /// Recordings held and their bytes.
    pub fn held(&self) -> (usize, u64) {
        (self.cache.len(), self.cache.weight())
    }
}

/// One page's rewrite: parsed, recorded, or spliced from a recording. Feed it with
/// [`Splicer::write`] and finish with [`Splicer::end`], as a [`PageRewriter`].
pub struct Splicer {
    mode: Mode,
    /// How to make a rewriter for this page: for a plain parse, a recording, or a divergence.
    decorator: Arc<Decorator>,
    page: Page,
    forms: Forms,
    id: Option<VisitorId>,
    /// Where a finished recording goes.
    store: Option<(Arc<Recordings>, Key)>,
    /// This request's claim to record the page, released if it never finishes.
    claim: Option<u64>,
    stats: Arc<RewriteStats>,
    report: Arc<SpliceReport>,
    /// The response's content coding, once the body has said (see [`Splicer::compressed`]).
    coding: Option<Coding>,
}

/// What comparing compressed bytes with a recording gave.
pub enum WireStep {
    /// Every byte so far equal: send this.
    Verified(Bytes),
    /// The bytes differ (or the body ended early): send `out`, then decode `redo` (the recorded
    /// compressed bytes up to the difference) and the live bytes from the difference on, and
    /// give the page to [`Splicer::write_encoded`] after its first `skip` bytes (already
    /// verified).
    Decode {
        out: Bytes,
        redo: Bytes,
        /// Where in the frame the live bytes to decode start.
        from: usize,
        skip: u64,
    },
}

enum Mode {
    /// A normal rewrite with the real ID.
    Parse(Box<PageRewriter>),
    /// A rewrite with the sentinel: its output, less what was already sent, with the real ID.
    Live(Box<Live>),
    /// Comparing the live body with a recording.
    Replay(Replay),
    /// Between states, and after the end.
    Done,
}

struct Live {
    rewriter: PageRewriter,
    /// Replaces the sentinel (the rewriter's stand-in ID) with the visitor's ID.
    substitute: Substitute,
    /// Bytes of the sentinel output still to drop: what a replay had already sent.
    skip: usize,
    recorder: Option<Recorder>,
}

/// A replay recording the origin's compressed body in a coding its recording lacks.
struct Learning {
    recording: Arc<Recording>,
    index: usize,
    wire: WireRecorder,
}

impl Learning {
    /// Claims the learning of `coding` for `recording`, unless it is known or being learnt.
    fn claim(recording: &Arc<Recording>, coding: Coding) -> Option<Learning> {
        let index = coding_index(coding);
        if recording.learnt[index].get().is_some() {
            return None;
        }
        recording.learning[index]
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        Some(Learning {
            recording: Arc::clone(recording),
            index,
            wire: WireRecorder::new(coding),
        })
    }

    /// The page was verified to its end: keep the body if its marks cover it all. True when
    /// the recording changed (the store must weigh it again).
    fn finish(mut self) -> bool {
        let coding = self.wire.coding;
        let wire = std::mem::replace(&mut self.wire, WireRecorder::new(coding));
        match wire.finish(self.recording.input.len()) {
            Some(wire) => self.recording.learnt[self.index].set(wire).is_ok(),
            None => false,
        }
    }
}

impl Drop for Learning {
    fn drop(&mut self) {
        self.recording.learning[self.index].store(false, Ordering::Release);
    }
}

struct Replay {
    recording: Arc<Recording>,
    /// This request's own handle on the recording's output: its slices count their references
    /// here rather than on the recording's, which every worker's requests share (an atomic
    /// count that two CPUs write bounces between their caches).
    output: Bytes,
    /// Compressed bytes compared equal with the recording's so far, while the live body is
    /// compared compressed (see [`Splicer::compressed`]).
    wire: Option<usize>,
    /// The compressed body being recorded while it is verified decoded, for a coding the
    /// recording has no body in yet (the claim is given back when this is dropped).
    learning: Option<Learning>,
    /// Input bytes compared equal so far.
    verified: usize,
    /// Output (in the recording's coordinates) sent so far.
    sent: usize,
}

impl Splicer {
    /// The rewrite for one page: from `store` when it holds this page, recorded into it when it
    /// does not, a plain parse when there is no store (or the URL keeps changing).
    pub fn new(
        decorator: Arc<Decorator>,
        id: Option<VisitorId>,
        page: Page,
        store: Option<(Arc<Recordings>, Key)>,
    ) -> Splicer {
        let stats = RewriteStats::shared(decorator.partners.len());
        let mut splicer = Splicer {
            mode: Mode::Done,
            forms: Forms::of(id.as_ref()),
            decorator,
            page,
            id,
            store,
            claim: None,
            stats,
            report: Arc::new(SpliceReport::default()),
            coding: None,
        };
        let lookup = match &splicer.store {
            None => Lookup::Parse,
            Some((store, key)) => store.lookup(key),
        };
        splicer.mode = match lookup {
            Lookup::Parse => {
                splicer.report.set(Path::Parsed);
                Mode::Parse(Box::new(splicer.rewriter(splicer.id.clone())))
            }
            Lookup::Record(token, misses) => {
                splicer.claim = Some(token);
                splicer.report.set(Path::Recorded);
                let limit = splicer.store.as_ref().map_or(0, |(s, _)| s.page_limit);
                splicer.live(Sentinel::random(), 0, Some(Recorder::new(limit, misses)))
            }
            Lookup::Replay(recording) => {
                splicer.report.set(Path::Spliced);
                Mode::Replay(Replay {
                    output: Bytes::from_owner(recording.output.clone()),
                    recording,
                    wire: None,
                    learning: None,
                    verified: 0,
                    sent: 0,
                })
            }
        };
        splicer
    }

    fn rewriter(&self, id: Option<VisitorId>) -> PageRewriter {
        PageRewriter::with_stats(
            Arc::clone(&self.decorator),
            id,
            self.page.clone(),
            Arc::clone(&self.stats),
        )
    }

    fn live(&self, sentinel: Sentinel, skip: usize, recorder: Option<Recorder>) -> Mode {
        // Without an ID there is nothing to stand in for: the sentinel never appears.
        let id = self.id.as_ref().map(|_| sentinel.id());
        Mode::Live(Box::new(Live {
            rewriter: self.rewriter(id),
            substitute: Substitute {
                sentinel,
                forms: self.forms.clone(),
                held: Vec::new(),
            },
            skip,
            recorder,
        }))
    }

    /// Links decorated and whether the rewriter bailed out, shared with the access log.
    pub fn stats(&self) -> Arc<RewriteStats> {
        Arc::clone(&self.stats)
    }

    /// Which path served the page, shared with the access log.
    pub fn report(&self) -> Arc<SpliceReport> {
        Arc::clone(&self.report)
    }

    /// Feeds one chunk of the page; returns the output that is ready.
    pub fn write(&mut self, chunk: &[u8]) -> Bytes {
        self.write_segments(chunk).into_bytes()
    }

    /// [`Splicer::write`], the output as a frame of several byte strings: a replay's are
    /// slices of the recording, with the visitor's ID between them.
    pub fn write_segments(&mut self, chunk: &[u8]) -> Segments {
        match &mut self.mode {
            Mode::Parse(rewriter) => rewriter.write(chunk).into(),
            Mode::Live(live) => live.write(chunk).into(),
            Mode::Replay(replay) => {
                let rest = &replay.recording.input[replay.verified..];
                let same = common_prefix(chunk, rest);
                if same == chunk.len() {
                    replay.verified += same;
                    let to = replay.recording.covered(replay.verified);
                    return self.send_recorded(to);
                }
                let verified = replay.verified + same;
                let before = {
                    let to = replay.recording.covered(verified);
                    self.send_recorded(to)
                };
                let mut out = before;
                out.push(self.diverge(verified, &chunk[same..]));
                out
            }
            Mode::Done => Segments::default(),
        }
    }

    /// Whether a recording answers this page (so far: a divergence may still hand it to the
    /// parser). Compressing such a page costs nothing per visitor with a packed coding.
    pub fn replays(&self) -> bool {
        matches!(self.mode, Mode::Replay(_))
    }

    /// Feeds one chunk of the page; returns the output that is ready, through `encoder`. A
    /// replay into a gzip stream sends the recording's packed pieces (compressed once per
    /// recording) with the visitor's ID between them; every other path compresses its output.
    pub fn write_encoded(&mut self, chunk: &[u8], encoder: &mut Encoder) -> std::io::Result<Bytes> {
        let Mode::Replay(replay) = &mut self.mode else {
            return encode(self.write(chunk), encoder);
        };
        if encoder.takes_packed().is_none() {
            return encode(self.write(chunk), encoder);
        }
        let rest = &replay.recording.input[replay.verified..];
        let same = common_prefix(chunk, rest);
        let verified = replay.verified + same;
        replay.verified = verified;
        let to = replay.recording.covered(verified);
        let before = self.send_packed(to, encoder);
        if same == chunk.len() {
            return Ok(before);
        }
        let after = encode(self.diverge(verified, &chunk[same..]), encoder)?;
        Ok(join(before, after))
    }

    /// Ends the page through `encoder` (see [`Splicer::write_encoded`]), the compressed
    /// stream's end included.
    pub fn end_encoded(&mut self, encoder: &mut Encoder) -> std::io::Result<Bytes> {
        if let Mode::Replay(replay) = &self.mode {
            if encoder.takes_packed().is_some() && replay.verified == replay.recording.input.len() {
                let recording = Arc::clone(&replay.recording);
                let out = self.send_packed(recording.output.len(), encoder);
                recording.misses.store(0, Ordering::Relaxed);
                self.stats.add(&recording.links);
                self.end_learning();
                self.mode = Mode::Done;
                return Ok(join(out, encoder.finish()?));
            }
        }
        let out = encode(self.end(), encoder)?;
        Ok(join(out, encoder.finish()?))
    }

    /// The body says the response is compressed with `coding`, before its first byte. A
    /// recording made now keeps the compressed body too; a replay of a recording whose body came
    /// in the same coding compares compressed bytes ([`Splicer::write_wire`]) and returns true.
    pub fn compressed(&mut self, coding: Coding) -> bool {
        self.coding = Some(coding);
        match &mut self.mode {
            Mode::Live(live) => {
                if let Some(r) = live.recorder.as_mut().filter(|r| r.input.is_empty()) {
                    r.wire = Some(WireRecorder::new(coding));
                }
                false
            }
            Mode::Replay(replay) => {
                let same = replay.recording.wire_in(coding).is_some();
                if same {
                    replay.wire = Some(0);
                } else {
                    replay.learning = Learning::claim(&replay.recording, coding);
                }
                let how = if same { 1 } else { 2 };
                self.report.verified.store(how, Ordering::Relaxed);
                same
            }
            Mode::Parse(_) | Mode::Done => false,
        }
    }

    /// Compressed bytes the body took from the origin, for a recording of them.
    pub fn wire_taken(&mut self, compressed: &[u8]) {
        if let Mode::Replay(replay) = &mut self.mode {
            if let Some(l) = &mut replay.learning {
                // No larger than the page it decodes to: anything else is not worth keeping.
                if l.wire.bytes.len() + compressed.len() <= replay.recording.input.len() {
                    l.wire.bytes.extend_from_slice(compressed);
                } else {
                    replay.learning = None;
                }
            }
        }
        if let Mode::Live(live) = &mut self.mode {
            if let Some(r) = &mut live.recorder {
                if r.wire.is_some() && r.fits(compressed.len()) {
                    if let Some(w) = &mut r.wire {
                        w.bytes.extend_from_slice(compressed);
                    }
                }
            }
        }
    }

    /// The decoder has used `compressed` bytes and given `decoded` bytes of page so far.
    pub fn wire_mark(&mut self, compressed: u64, decoded: u64) {
        let recording = match &mut self.mode {
            Mode::Replay(replay) => replay.learning.as_mut().map(|l| &mut l.wire),
            Mode::Live(live) => live.recorder.as_mut().and_then(|r| r.wire.as_mut()),
            _ => None,
        };
        if let Some(w) = recording {
            w.mark(compressed, decoded);
        }
    }

    /// Compares a frame of the compressed body with the recording's and sends the output the
    /// verified bytes determine, through `encoder`. Only after [`Splicer::compressed`] said yes.
    pub fn write_wire(&mut self, frame: &[u8], encoder: &mut Encoder) -> std::io::Result<WireStep> {
        let Mode::Replay(replay) = &mut self.mode else {
            return Err(std::io::Error::other(
                "compressed replay without a recording",
            ));
        };
        let coding = self.coding.unwrap_or(Coding::Gzip);
        let (Some(at), Some(wire)) = (replay.wire, replay.recording.wire_in(coding)) else {
            return Err(std::io::Error::other(
                "compressed replay without a recording",
            ));
        };
        let same = common_prefix(frame, &wire.bytes[at..]);
        let at = at + same;
        replay.wire = Some(at);
        replay.verified = replay.verified.max(wire.page_at(at));
        let to = replay.recording.covered(replay.verified);
        let out = self.send_through(to, encoder)?;
        if same == frame.len() {
            return Ok(WireStep::Verified(out));
        }
        Ok(self.leave_wire(out, same))
    }

    /// Ends a body compared compressed: the whole page, if the body was the recorded one to its
    /// last byte; otherwise what to decode.
    pub fn end_wire(&mut self, encoder: &mut Encoder) -> std::io::Result<WireStep> {
        let Mode::Replay(replay) = &self.mode else {
            return Err(std::io::Error::other(
                "compressed replay without a recording",
            ));
        };
        let coding = self.coding.unwrap_or(Coding::Gzip);
        let whole = matches!(
            (replay.wire, replay.recording.wire_in(coding)),
            (Some(at), Some(w)) if at == w.bytes.len()
        );
        if whole && replay.verified == replay.recording.input.len() {
            return self.end_encoded(encoder).map(WireStep::Verified);
        }
        Ok(self.leave_wire(Bytes::new(), 0))
    }

    /// From comparing compressed bytes to comparing decoded ones.
    fn leave_wire(&mut self, out: Bytes, from: usize) -> WireStep {
        let Mode::Replay(replay) = &mut self.mode else {
            unreachable!("only a replay compares compressed bytes");
        };
        let at = replay.wire.take().unwrap_or(0);
        self.report.verified.store(2, Ordering::Relaxed);
        let coding = self.coding.unwrap_or(Coding::Gzip);
        let redo = replay
            .recording
            .wire_in(coding)
            .map_or_else(Bytes::new, |w| w.bytes.slice(..at));
        WireStep::Decode {
            out,
            redo,
            from,
            skip: replay.verified as u64,
        }
    }

    /// The recording's output up to `to`, through `encoder`: packed pieces where it takes them.
    fn send_through(&mut self, to: usize, encoder: &mut Encoder) -> std::io::Result<Bytes> {
        if encoder.takes_packed().is_some() {
            Ok(self.send_packed(to, encoder))
        } else {
            let plain = self.send_recorded(to).into_bytes();
            encode(plain, encoder)
        }
    }

    /// Sends the recording's output up to `to` as packed gzip pieces.
    fn send_packed(&mut self, to: usize, encoder: &mut Encoder) -> Bytes {
        let Mode::Replay(replay) = &mut self.mode else {
            return Bytes::new();
        };
        if to <= replay.sent {
            return Bytes::new();
        }
        let Some(kind) = encoder.takes_packed() else {
            return Bytes::new();
        };
        let recording = &replay.recording;
        let lens = (self.forms.url.len(), self.forms.html.len());
        let (pack, made) = recording.pack(kind, lens);
        // Packed pieces end at fewer places than the checkpoints: up to the last one covered.
        let to = pack.floor(to);
        if to <= replay.sent {
            return Bytes::new();
        }
        if made {
            // The store weighs an entry when it is inserted: weigh it again with its pack.
            if let Some((store, key)) = &self.store {
                store.reweigh(key, recording);
            }
        }
        let (forms, slots) = (&self.forms, &recording.slots);
        let out = encoder.packed(pack.range(replay.sent, to), |i| forms.get(slots[i].1));
        replay.sent = to;
        out
    }

    /// Ends the page; returns the last output.
    pub fn end(&mut self) -> Bytes {
        self.end_segments().into_bytes()
    }

    /// [`Splicer::end`], the output as a frame of several byte strings (see
    /// [`Splicer::write_segments`]).
    pub fn end_segments(&mut self) -> Segments {
        let out = match &mut self.mode {
            Mode::Parse(rewriter) => rewriter.end().into(),
            Mode::Live(_) => {
                let Mode::Live(mut live) = std::mem::replace(&mut self.mode, Mode::Done) else {
                    unreachable!()
                };
                let out = live.end();
                self.store_recording(*live);
                return out.into();
            }
            Mode::Replay(replay) => {
                if replay.verified == replay.recording.input.len() {
                    let recording = Arc::clone(&replay.recording);
                    let out = self.send_recorded(recording.output.len());
                    recording.misses.store(0, Ordering::Relaxed);
                    self.stats.add(&recording.links);
                    self.end_learning();
                    self.mode = Mode::Done;
                    return out;
                }
                // The live body is shorter than the recording.
                let verified = replay.verified;
                let mut out = Segments::from(self.diverge(verified, &[]));
                out.append(self.end_segments());
                return out;
            }
            Mode::Done => Segments::default(),
        };
        self.mode = Mode::Done;
        out
    }

    /// A replay verified to the page's end keeps the compressed body it learnt, if any.
    fn end_learning(&mut self) {
        let Mode::Replay(replay) = &mut self.mode else {
            return;
        };
        let Some(learning) = replay.learning.take() else {
            return;
        };
        let recording = Arc::clone(&replay.recording);
        if learning.finish() {
            if let Some((store, key)) = &self.store {
                store.reweigh(key, &recording);
            }
        }
    }

    /// Sends the recording's output up to `to`.
    fn send_recorded(&mut self, to: usize) -> Segments {
        let Mode::Replay(replay) = &mut self.mode else {
            return Segments::default();
        };
        if to <= replay.sent {
            return Segments::default();
        }
        let out = replay
            .recording
            .splice(&replay.output, replay.sent, to, &self.forms);
        replay.sent = to;
        out
    }

    /// The live body differs from the recording at input byte `at`: a fresh rewriter with the
    /// recording's sentinel is fed the recorded `[0, at)` and then `rest`, and what the replay
    /// already sent is dropped from its output.
    fn diverge(&mut self, at: usize, rest: &[u8]) -> Bytes {
        let Mode::Replay(replay) = std::mem::replace(&mut self.mode, Mode::Done) else {
            return Bytes::new();
        };
        let recording = replay.recording;
        self.report.set(Path::Diverged);
        self.report.diverged_at.store(at, Ordering::Relaxed);
        let misses = recording.misses.load(Ordering::Relaxed) + 1;
        let claimed = match &self.store {
            Some((store, key)) if misses >= MAX_MISSES => {
                store.insert(key.clone(), Entry::Unstable(Instant::now() + UNSTABLE_FOR));
                None
            }
            // A compressed page is recorded again from its first byte, by the next request, so
            // that its compressed body is recorded too (this request has not kept it).
            Some((store, key)) if self.coding.is_some() => {
                if store.claim_after(key, &recording).is_some() {
                    store.insert(key.clone(), Entry::Retry { misses });
                }
                None
            }
            // Of the requests replaying the old recording, the first to diverge re-records.
            Some((store, key)) => store
                .claim_after(key, &recording)
                .map(|token| (token, store.page_limit)),
            None => None,
        };
        let recorder = claimed.map(|(token, limit)| {
            self.claim = Some(token);
            let mut r = Recorder::new(limit, misses);
            // The recorded checkpoints up to the difference hold for the new page too.
            r.checkpoints = recording
                .checkpoints
                .iter()
                .copied()
                .take_while(|&(k, _)| k <= at)
                .collect();
            r
        });
        self.mode = self.live(recording.sentinel, replay.sent, recorder);
        let Mode::Live(live) = &mut self.mode else {
            unreachable!()
        };
        let mut out = BytesMut::new();
        out.extend_from_slice(&live.feed(&recording.input[..at], false));
        out.extend_from_slice(&live.feed(rest, true));
        out.freeze()
    }

    fn store_recording(&mut self, live: Live) {
        let Some((store, key)) = &self.store else {
            return;
        };
        let Some(token) = self.claim.take() else {
            return;
        };
        match live
            .recorder
            .and_then(|r| r.finish(live.substitute.sentinel, &self.stats))
        {
            Some(recording) => {
                store.recorded.insert(store.hint(&key.url, key.with_id), ());
                store.insert(key.clone(), Entry::page(Arc::new(recording)));
            }
            None => store.release(key, token),
        }
    }
}

impl Drop for Splicer {
    fn drop(&mut self) {
        // A page that never ended (the client left, the origin broke off) is not recorded, and
        // the next request may try.
        if let (Some((store, key)), Some(token)) = (&self.store, self.claim.take()) {
            store.release(key, token);
        }
    }
}

impl Live {
    fn write(&mut self, chunk: &[u8]) -> Bytes {
        self.feed(chunk, true)
    }

    /// Feeds input to the sentinel rewriter; `checkpoint` records where the output stood after
    /// it (the recorded prefix before a divergence is fed without one: the old checkpoints
    /// up to there are kept instead).
    fn feed(&mut self, input: &[u8], checkpoint: bool) -> Bytes {
        if self.recorder.is_none() {
            let raw = self.rewriter.write(input);
            return self.emit(raw, false);
        }
        // Recorded in pieces, with a checkpoint after each: a replay can then stream as finely
        // as the live body arrives, whatever the chunking of the recorded response was.
        let mut out = BytesMut::new();
        for piece in input.chunks(CHECKPOINT_EVERY) {
            let raw = self.rewriter.write(piece);
            if let Some(r) = &mut self.recorder {
                if r.fits(piece.len() + raw.len()) {
                    r.input.extend_from_slice(piece);
                    r.output.extend_from_slice(&raw);
                    if checkpoint {
                        r.checkpoints.push((r.input.len(), r.output.len()));
                    }
                } else {
                    self.recorder = None;
                }
            }
            out.extend_from_slice(&self.emit(raw, false));
        }
        out.freeze()
    }

    fn end(&mut self) -> Bytes {
        let raw = self.rewriter.end();
        if let Some(r) = &mut self.recorder {
            if r.fits(raw.len()) {
                r.output.extend_from_slice(&raw);
            } else {
                self.recorder = None;
            }
        }
        self.emit(raw, true)
    }

    /// The sentinel output, less what was already sent, with the real ID in it.
    fn emit(&mut self, raw: Bytes, last: bool) -> Bytes {
        let dropped = self.skip.min(raw.len());
        self.skip -= dropped;
        let mut out = BytesMut::with_capacity(raw.len() - dropped + 64);
        self.substitute.push(&raw[dropped..], &mut out);
        if last {
            self.substitute.finish(&mut out);
        }
        out.freeze()
    }
}

/// Plain output through the page's encoder (nothing for nothing: an empty flush still costs
/// bytes on the wire).
fn encode(plain: Bytes, encoder: &mut Encoder) -> std::io::Result<Bytes> {
    if plain.is_empty() {
        Ok(Bytes::new())
    } else {
        encoder.write(&plain)
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    if a[..n] == b[..n] {
        return n;
    }
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(n)
}

fn join(a: Bytes, b: Bytes) -> Bytes {
    if a.is_empty() {
        return b;
    }
    if b.is_empty() {
        return a;
    }
    let mut out = BytesMut::with_capacity(a.len() + b.len());
    out.extend_from_slice(&a);
    out.extend_from_slice(&b);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn substituted(chunks: &[&[u8]], sentinel: Sentinel) -> Vec<u8> {
        let mut s = Substitute {
            sentinel,
            forms: Forms {
                url: Bytes::from_static(b"ID%40u"),
                html: Bytes::from_static(b"ID&amp;h"),
            },
            held: Vec::new(),
        };
        let mut out = BytesMut::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
        out.to_vec()
    }

    #[test]
    fn sentinels_are_replaced_wherever_the_chunks_split_them() {
        let sentinel = Sentinel::random();
        let stem = sentinel.stem().to_owned();
        let text = format!("<a href=\"x?kmi={stem}u\">{stem}h and {stem}x kmi{stem}u</a>k");
        let expected = format!("<a href=\"x?kmi=ID%40u\">ID&amp;h and {stem}x kmiID%40u</a>k");
        let bytes = text.as_bytes();
        for split in 0..bytes.len() {
            for split2 in split..bytes.len() {
                let got = substituted(
                    &[&bytes[..split], &bytes[split..split2], &bytes[split2..]],
                    sentinel,
                );
                assert_eq!(
                    String::from_utf8(got).unwrap(),
                    expected,
                    "{split} {split2}"
                );
            }
        }
    }

    #[test]
    fn a_checkpoint_inside_a_slot_moves_back_to_its_start() {
        let sentinel = Sentinel::random();
        let output = format!("<a href=\"x?kmi={}u\">", sentinel.stem());
        let slot = output.find(sentinel.stem()).unwrap();
        let mut r = Recorder::new(1 << 20, 0);
        r.input.extend_from_slice(b"<a href=\"x\">");
        r.output.extend_from_slice(output.as_bytes());
        r.checkpoints = vec![(5, slot + 3), (9, slot - 1), (12, output.len())];
        let stats = crate::rewrite::RewriteStats::shared(0);
        let rec = r.finish(sentinel, &stats).expect("recorded");
        assert_eq!(rec.slots, vec![(slot, Form::Url)]);
        // Inside the slot: back to its start; a later, smaller one is raised to what is known.
        assert_eq!(
            rec.checkpoints,
            vec![(5, slot), (9, slot), (12, output.len())]
        );
        let forms = Forms::of(Some(&VisitorId::new("v@x").unwrap()));
        let spliced = |to| rec.splice(&rec.output, 0, to, &forms).into_bytes();
        assert_eq!(spliced(slot), &output.as_bytes()[..slot]);
        assert_eq!(spliced(output.len()), &b"<a href=\"x?kmi=v%40x\">"[..]);
    }

    /// Runs of recorded bytes around the slots just shorter than, as long as and longer than
    /// what is sent as a slice: every range between two slots' edges reads as the recorded
    /// output with the visitor's ID in each slot, in either form.
    #[test]
    fn a_splice_is_the_recorded_output_with_the_id_in_its_slots() {
        let sentinel = Sentinel::random();
        let stem = sentinel.stem().to_string();
        let runs = [
            0,
            1,
            SHARE_MIN - 1,
            SHARE_MIN,
            SHARE_MIN + 1,
            3 * SHARE_MIN,
            7,
        ];
        let mut output = String::new();
        let mut wanted = String::new();
        let id = VisitorId::new("v@x \"<&>").unwrap();
        let forms = Forms::of(Some(&id));
        let mut edges = vec![0];
        for (i, &run) in runs.iter().enumerate() {
            let filler: String = (0..run)
                .map(|j| (b'a' + ((i + j) % 26) as u8) as char)
                .collect();
            output.push_str(&filler);
            wanted.push_str(&filler);
            edges.push(output.len());
            if i + 1 < runs.len() {
                let (mark, form) = if i % 2 == 0 {
                    ("u", Form::Url)
                } else {
                    ("h", Form::Html)
                };
                output.push_str(&format!("{stem}{mark}"));
                wanted.push_str(std::str::from_utf8(forms.get(form)).unwrap());
                edges.push(output.len());
            }
        }
        let mut r = Recorder::new(1 << 20, 0);
        r.input.extend_from_slice(b"<p>");
        r.output.extend_from_slice(output.as_bytes());
        r.checkpoints = vec![(3, output.len())];
        let stats = crate::rewrite::RewriteStats::shared(0);
        let rec = r.finish(sentinel, &stats).expect("recorded");
        assert_eq!(rec.slots.len(), runs.len() - 1);
        let handle = Bytes::from_owner(rec.output.clone());
        let whole = rec.splice(&handle, 0, output.len(), &forms);
        assert_eq!(whole.len(), wanted.len());
        assert_eq!(whole.into_bytes(), wanted.as_bytes());
        // Sent piece by piece, from one slot's edge to a later one, it is the same.
        for (a, &from) in edges.iter().enumerate() {
            for &to in &edges[a..] {
                let mut joined = Vec::new();
                joined.extend_from_slice(&rec.splice(&handle, 0, from, &forms).into_bytes());
                joined.extend_from_slice(&rec.splice(&handle, from, to, &forms).into_bytes());
                joined
                    .extend_from_slice(&rec.splice(&handle, to, output.len(), &forms).into_bytes());
                assert_eq!(joined, wanted.as_bytes(), "cut at {from} and {to}");
            }
        }
    }

    #[test]
    fn a_page_containing_the_sentinel_is_not_recorded() {
        let sentinel = Sentinel::random();
        let mut r = Recorder::new(1 << 20, 0);
        r.input
            .extend_from_slice(format!("<p>{}</p>", sentinel.stem()).as_bytes());
        let stats = crate::rewrite::RewriteStats::shared(0);
        assert!(r.finish(sentinel, &stats).is_none());
    }

    #[test]
    fn sentinels_differ_and_look_like_nothing_escaping_changes() {
        let a = Sentinel::random();
        let b = Sentinel::random();
        assert_ne!(a.stem, b.stem);
        let id = a.id();
        assert_eq!(id.url_encoded(), format!("{}u", a.stem()));
        assert_eq!(crate::rewrite::ascii_attribute(id.as_str()), id.as_str());
        assert!(a.stem().bytes().all(|c| c.is_ascii_alphanumeric()));
    }
}
