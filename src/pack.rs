//! A recording's output compressed once, in pieces that can be put together for any visitor:
//! the static bytes between ID slots (and between checkpoints, where a replay sends) as raw
//! deflate that ends byte-aligned on a sync flush, each with its CRC-32 and length. A visitor's
//! gzip response is then a header, the packed pieces with the visitor's ID between them in
//! stored blocks, an empty final block and a trailer whose CRC is combined from the pieces'
//! (`crc32_combine`, as zlib does it): no compression work proportional to the page.
//!
//! Why the pieces concatenate. A sync flush ends a deflate block and pads the stream to a byte
//! boundary without ending it, so what follows may be any block; each static run (the bytes
//! between two slots) is compressed by a compressor reset at its start, so no match reaches back
//! past the run into bytes (the ID) that differ from one visitor to the next. Pure CPU work.

use bytes::Bytes;

/// The CRC-32 polynomial, reflected (gzip, zlib, PNG).
const POLY: u32 = 0xedb8_8320;

/// `a * b mod p(x)` over GF(2), both reflected (zlib's `multmodp`).
fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                break;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// `x^(8 * len) mod p(x)`: the operator that moves a CRC past `len` bytes
/// (zlib's `crc32_combine_gen64`).
pub fn crc32_shift(len: u64) -> u32 {
    // x^(2^k) mod p(x) for k = 3.. by repeated squaring, multiplied in for each bit of len.
    let mut square = 1u32 << 30; // x^1
    for _ in 0..3 {
        square = multmodp(square, square);
    }
    let mut p = 1u32 << 31; // x^0
    let mut n = len;
    while n != 0 {
        if n & 1 != 0 {
            p = multmodp(square, p);
        }
        square = multmodp(square, square);
        n >>= 1;
    }
    p
}

/// The CRC-32 of `A ++ B` from the CRC of `A`, the CRC of `B` and `crc32_shift(len(B))`.
pub fn crc32_combine(crc_a: u32, crc_b: u32, shift_b: u32) -> u32 {
    multmodp(shift_b, crc_a) ^ crc_b
}

/// One static piece of a recording's output, compressed.
#[derive(Debug, Clone)]
pub struct Packed {
    /// The compressed bytes: raw deflate blocks ending on a sync flush (byte-aligned, no final
    /// block), or brotli meta-blocks ending on a byte boundary without ending the stream.
    pub data: Bytes,
    /// CRC-32 of the bytes it decodes to (what a gzip trailer needs).
    pub crc: u32,
    /// How many bytes it decodes to.
    pub len: u64,
    /// `crc32_shift(len)`.
    pub shift: u32,
}

/// A piece of the output between two cuts: packed static bytes, or the ID slot starting there.
#[derive(Debug, Clone)]
pub enum Piece {
    Static(Packed),
    Slot,
}

/// Deflate's window: no match reaches further back.
const DEFLATE_WINDOW: usize = 32 * 1024;

/// How the output will look to the client for IDs of given lengths, so that compression may
/// reach back across a slot instead of starting afresh after it: every slot taken as `lens[i]`
/// bytes of `filler`, a byte value found nowhere in the output. A match copies earlier bytes
/// equal to the bytes it encodes, which are static output and so never `filler`: no match can
/// take a byte from a slot, and with the slot as long as the visitor's ID every distance across
/// it is the distance in the client's stream. A pack made with a shape is valid only for IDs of
/// those lengths.
#[derive(Debug, Clone, Copy)]
pub struct Shape<'a> {
    pub filler: u8,
    /// The ID's length in each slot, in slot order.
    pub lens: &'a [usize],
}

/// A byte value that does not occur in `data`, if there is one.
pub fn absent_byte(data: &[u8]) -> Option<u8> {
    let mut seen = [false; 256];
    for &b in data {
        seen[usize::from(b)] = true;
    }
    // Prefer a control byte: real pages rarely hold one.
    (0..=255u8).find(|&b| !seen[usize::from(b)])
}

/// The codings a recording's output can be packed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackKind {
    Gzip,
    Brotli,
}

/// Compresses one static run piece by piece: each piece ends on a byte boundary without ending
/// the stream (gzip: a sync flush; brotli: a flush in the catable, bare-stream mode of
/// [`brotli_piece`]), and may refer back to the earlier pieces of its run, never before it.
enum RunCompressor {
    Gzip(Box<flate2::Compress>),
    Brotli(Box<BrotliRun>),
}

impl RunCompressor {
    /// A compressor for a run that `dictionary` precedes (as the client will have it, at
    /// least wherever a match can reach; see [`Shape`]).
    fn new(kind: PackKind, dictionary: &[u8], shaped: bool) -> RunCompressor {
        match kind {
            PackKind::Gzip => {
                let mut c = flate2::Compress::new(flate2::Compression::new(PACK_LEVEL), false);
                if !dictionary.is_empty() {
                    let from = dictionary.len().saturating_sub(DEFLATE_WINDOW);
                    c.set_dictionary(&dictionary[from..])
                        .expect("a dictionary before any input");
                }
                RunCompressor::Gzip(Box::new(c))
            }
            PackKind::Brotli => {
                let mut b = BrotliRun::new(PACK_BROTLI_QUALITY, PACK_BROTLI_WINDOW, None);
                if !dictionary.is_empty() {
                    // The encoder itself keeps only what its window can reach.
                    b.state.set_custom_dictionary(dictionary.len(), dictionary);
                }
                if shaped {
                    b.use_static_dictionary();
                }
                RunCompressor::Brotli(Box::new(b))
            }
        }
    }

    /// The next piece of the run; `last` when the run ends with it.
    fn piece(&mut self, data: &[u8], last: bool) -> Vec<u8> {
        match self {
            RunCompressor::Gzip(c) => sync_flushed(c, data),
            RunCompressor::Brotli(b) => b.piece(data, last),
        }
    }
}

/// A brotli encoder in catable, bare-stream mode: see [`brotli_piece`].
pub struct BrotliRun {
    state: brotli::enc::encode::BrotliEncoderStateStruct<brotli::enc::StandardAlloc>,
}

impl BrotliRun {
    /// `size_hint`: the run's length, when known, lets the encoder size its tables to it.
    pub fn new(quality: u32, window: u32, size_hint: Option<usize>) -> BrotliRun {
        use brotli::enc::encode::{BrotliEncoderParameter as P, BrotliEncoderStateStruct};
        let mut state = BrotliEncoderStateStruct::new(brotli::enc::StandardAlloc::default());
        state.set_parameter(P::BROTLI_PARAM_QUALITY, quality);
        state.set_parameter(P::BROTLI_PARAM_LGWIN, window);
        state.set_parameter(P::BROTLI_PARAM_CATABLE, 1);
        state.set_parameter(P::BROTLI_PARAM_BARE_STREAM, 1);
        if let Some(hint) = size_hint {
            state.set_parameter(P::BROTLI_PARAM_SIZE_HINT, hint.min(1 << 30) as u32);
        }
        BrotliRun { state }
    }

    /// Lets the run refer to brotli's built-in dictionary of words, which catable mode (and a
    /// custom dictionary) turn off. A reference to it is a distance past everything the
    /// decoder has seen, `min(position, window)`, so it decodes to the same word only where the
    /// encoder's position is the client's: true of a shaped run, whose custom dictionary is the
    /// client's whole view before it (a first run starts at the stream's start), never of an
    /// unshaped one. On the corpus page it brings a shaped brotli pack from 110.5% to 105.8% of
    /// the whole page compressed once. The setting takes once the encoder is initialised (by
    /// its first call), which would otherwise reset it.
    fn use_static_dictionary(&mut self) {
        use brotli::enc::encode::BrotliEncoderOperation as Op;
        let mut out = Vec::new();
        self.pump(Op::BROTLI_OPERATION_PROCESS, &[], &mut out);
        debug_assert!(out.is_empty(), "initialising wrote {} bytes", out.len());
        self.state.params.use_dictionary = true;
    }

    /// Compresses `data` and flushes to a byte boundary (or, when `last`, finishes the run,
    /// still without ending the stream).
    pub fn piece(&mut self, data: &[u8], last: bool) -> Vec<u8> {
        use brotli::enc::encode::BrotliEncoderOperation as Op;
        let mut out = Vec::with_capacity(data.len() / 3 + 64);
        self.pump(Op::BROTLI_OPERATION_PROCESS, data, &mut out);
        let end = if last {
            Op::BROTLI_OPERATION_FINISH
        } else {
            Op::BROTLI_OPERATION_FLUSH
        };
        self.pump(end, &[], &mut out);
        out
    }

    fn pump(
        &mut self,
        op: brotli::enc::encode::BrotliEncoderOperation,
        input: &[u8],
        out: &mut Vec<u8>,
    ) {
        use brotli::enc::encode::BrotliEncoderOperation as Op;
        let mut buf = [0u8; 8192];
        let (mut avail_in, mut in_at) = (input.len(), 0);
        loop {
            let (mut avail_out, mut out_at, mut total) = (buf.len(), 0, None);
            let ok = self.state.compress_stream(
                op,
                &mut avail_in,
                input,
                &mut in_at,
                &mut avail_out,
                &mut buf,
                &mut out_at,
                &mut total,
                &mut |_, _, _, _| (),
            );
            assert!(ok, "the brotli encoder refused its own parameters");
            out.extend_from_slice(&buf[..out_at]);
            let done = match op {
                Op::BROTLI_OPERATION_FINISH => self.state.is_finished(),
                _ => avail_in == 0 && !self.state.has_more_output(),
            };
            if done {
                return;
            }
        }
    }
}

impl Drop for BrotliRun {
    fn drop(&mut self) {
        brotli::enc::encode::BrotliEncoderDestroyInstance(&mut self.state);
    }
}

/// A recording's output in compressed pieces: `pieces[i]` covers output `[cuts[i], cuts[i + 1])`.
#[derive(Debug)]
pub struct Pack {
    cuts: Vec<usize>,
    /// The output's length: where the last piece ends.
    end: usize,
    pieces: Vec<Piece>,
    bytes: usize,
}

/// The gzip level of packed pieces: compressed once per recording, not once per visitor, so the
/// level nginx and gzip default to rather than the per-visitor encoder's faster one.
pub const PACK_LEVEL: u32 = 6;

impl Pack {
    /// Packs `output` for `kind`, whose slots are `slots` (start, length), cutting it at every
    /// slot edge and at `cuts` (the offsets a replay sends up to; each outside any slot).
    ///
    /// With a `shape`, each run is compressed with the client's view of the output before it as
    /// a dictionary (see [`Shape`]); without, each run starts afresh, valid for an ID of any
    /// length.
    pub fn new(
        kind: PackKind,
        output: &[u8],
        slots: &[(usize, usize)],
        cuts: &[usize],
        shape: Option<Shape<'_>>,
    ) -> Pack {
        debug_assert!(shape.map_or(true, |s| s.lens.len() == slots.len()));
        let mut edges: Vec<usize> = Vec::with_capacity(cuts.len() + slots.len() * 2 + 2);
        edges.push(0);
        edges.push(output.len());
        edges.extend(cuts.iter().copied().filter(|&c| c <= output.len()));
        for &(at, len) in slots {
            edges.push(at);
            edges.push(at + len);
        }
        edges.sort_unstable();
        edges.dedup();
        let mut pieces = Vec::with_capacity(edges.len());
        let mut bytes = 0;
        let mut slot = slots.iter().peekable();
        // A run starts at the beginning and after every slot: its compressor knows nothing
        // before it but the shaped output, so no match reaches back into an ID.
        let mut run: Option<RunCompressor> = None;
        // The output as the client will see it, with fillers for IDs: built only with a shape.
        let mut seen: Vec<u8> = Vec::new();
        let mut slot_index = 0;
        let pairs: Vec<(usize, usize)> = edges.windows(2).map(|p| (p[0], p[1])).collect();
        for (i, &(from, to)) in pairs.iter().enumerate() {
            while slot.peek().is_some_and(|&&(at, len)| at + len <= from) {
                slot.next();
            }
            if slot.peek().is_some_and(|&&(at, _)| at == from) {
                pieces.push(Piece::Slot);
                run = None;
                if let Some(shape) = shape {
                    let len = shape.lens[slot_index];
                    seen.resize(seen.len() + len, shape.filler);
                }
                slot_index += 1;
                continue;
            }
            let c = run.get_or_insert_with(|| RunCompressor::new(kind, &seen, shape.is_some()));
            let data = &output[from..to];
            if shape.is_some() {
                seen.extend_from_slice(data);
            }
            // The run ends at the end of the output or where a slot starts.
            let last = match pairs.get(i + 1) {
                None => true,
                Some(&(next, _)) => slots.binary_search_by_key(&next, |&(at, _)| at).is_ok(),
            };
            let compressed = c.piece(data, last);
            if last {
                run = None;
            }
            bytes += compressed.len();
            pieces.push(Piece::Static(Packed {
                data: Bytes::from(compressed),
                crc: crc32fast::hash(data),
                len: data.len() as u64,
                shift: crc32_shift(data.len() as u64),
            }));
        }
        edges.pop();
        Pack {
            cuts: edges,
            end: output.len(),
            pieces,
            bytes,
        }
    }

    /// [`Pack::new`] for gzip.
    pub fn gzip(output: &[u8], slots: &[(usize, usize)], cuts: &[usize]) -> Pack {
        Pack::new(PackKind::Gzip, output, slots, cuts, None)
    }

    /// The pieces covering output `[from, to)`; both must be cuts.
    pub fn range(&self, from: usize, to: usize) -> &[Piece] {
        let a = self.cuts.partition_point(|&c| c < from);
        let b = self.cuts.partition_point(|&c| c < to);
        debug_assert!(self.cuts.get(a) == Some(&from) || from == to);
        &self.pieces[a..b]
    }

    /// The last place a piece ends at or before `at`.
    pub fn floor(&self, at: usize) -> usize {
        if at >= self.end {
            return self.end;
        }
        let i = self.cuts.partition_point(|&c| c <= at);
        if i == 0 {
            0
        } else {
            self.cuts[i - 1]
        }
    }

    /// Memory held, for the store's budget.
    pub fn weight(&self) -> usize {
        self.bytes + self.pieces.len() * std::mem::size_of::<Piece>() + self.cuts.len() * 8
    }

    /// Compressed bytes of the static pieces.
    pub fn compressed_len(&self) -> usize {
        self.bytes
    }
}

/// `data` through `c` (not reset), ending on a sync flush.
pub fn sync_flushed(c: &mut flate2::Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 3 + 64);
    let start = c.total_in();
    loop {
        out.reserve(data.len() / 3 + 64);
        let used = (c.total_in() - start) as usize;
        c.compress_vec(&data[used..], &mut out, flate2::FlushCompress::Sync)
            .expect("deflate into a growing buffer cannot fail");
        let done = (c.total_in() - start) as usize == data.len();
        // A flush is complete once it left spare room in the output.
        if done && out.len() < out.capacity() {
            return out;
        }
    }
}

/// A non-final stored deflate block holding `data` (at most 65,535 bytes), for a byte-aligned
/// stream: the visitor's ID between packed pieces.
pub fn stored_block(data: &[u8], out: &mut Vec<u8>) {
    for part in data.chunks(0xffff) {
        let len = part.len() as u16;
        out.push(0); // BFINAL 0, BTYPE 00, padding to the byte
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(part);
    }
}

/// Brotli quality of packed pieces: compressed once per recording, so a good one (nginx's
/// `brotli_comp_level` defaults to 6); the per-visitor encoder stays at quality 1.
pub const PACK_BROTLI_QUALITY: u32 = 6;
/// The window packed brotli streams declare and use (2^n bytes); also what a client allocates.
pub const PACK_BROTLI_WINDOW: u32 = 19;

/// The start of a brotli stream that declares a `2^window` window, padded to a byte with an
/// empty metadata block, so that byte-aligned pieces ([`brotli_piece`]) may follow.
pub fn brotli_header(window: u32) -> [u8; 2] {
    debug_assert!((18..=24).contains(&window));
    // WBITS: bit 0 set, then (window - 17) in three bits. Then a metadata meta-block: ISLAST 0,
    // MNIBBLES 3 (metadata), a reserved 0, MSKIPBYTES 0 (no metadata), zero bits to the byte.
    let wbits = 1 | ((window as u8 - 17) << 1);
    [wbits | (3 << 5), 0]
}

/// The last byte of a brotli stream: an empty meta-block with ISLAST and ISLASTEMPTY set.
pub const BROTLI_END: u8 = 0x03;

/// `data` as one or more brotli meta-blocks that start and end on a byte boundary, do not end
/// the stream, and refer to nothing before their own start: the brotli encoder's "catable" and
/// "bare stream" mode, which writes the first two bytes uncompressed (so literal contexts never
/// depend on the bytes before), never reuses a distance from before and uses no dictionary
/// (whose addressing depends on the position in the stream). Such pieces, between
/// [`brotli_header`] and [`BROTLI_END`], make one valid stream in any order and with any bytes
/// between them sent as [`brotli_stored`].
pub fn brotli_piece(data: &[u8], quality: u32, window: u32) -> Vec<u8> {
    if data.is_empty() {
        return Vec::new();
    }
    BrotliRun::new(quality, window, Some(data.len())).piece(data, true)
}

/// `data` as uncompressed brotli meta-blocks (of at most 65,536 bytes), starting and ending on
/// a byte boundary: the visitor's ID between packed pieces. Nothing for empty `data`.
pub fn brotli_stored(data: &[u8], out: &mut Vec<u8>) {
    for part in data.chunks(0x1_0000) {
        // ISLAST 0, MNIBBLES 0 (four nibbles), MLEN - 1 in 16 bits, ISUNCOMPRESSED 1: 20 bits,
        // then zero bits to the byte.
        let v = ((part.len() as u32 - 1) << 3) | (1 << 19);
        out.extend_from_slice(&v.to_le_bytes()[..3]);
        out.extend_from_slice(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn crc_combine_matches_the_crc_of_the_whole() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for cut in [0, 1, 7, 100, 2500, 4999, 5000] {
            let (a, b) = data.split_at(cut);
            let combined = crc32_combine(
                crc32fast::hash(a),
                crc32fast::hash(b),
                crc32_shift(b.len() as u64),
            );
            assert_eq!(combined, crc32fast::hash(&data), "cut at {cut}");
        }
    }

    fn gzip_of(pack: &Pack, output: &[u8], slots: &[(usize, usize)], id: &[u8]) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
        let (mut crc, mut len) = (0u32, 0u64);
        let mut slot = slots.iter();
        for piece in pack.range(0, output.len()) {
            match piece {
                Piece::Static(p) => {
                    out.extend_from_slice(&p.data);
                    crc = crc32_combine(crc, p.crc, p.shift);
                    len += p.len;
                }
                Piece::Slot => {
                    slot.next().expect("a slot");
                    stored_block(id, &mut out);
                    crc = crc32_combine(crc, crc32fast::hash(id), crc32_shift(id.len() as u64));
                    len += id.len() as u64;
                }
            }
        }
        out.extend_from_slice(&[0x03, 0x00]);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out
    }

    #[test]
    fn packed_pieces_with_any_id_between_them_are_one_valid_gzip_member() {
        let unit = b"<p>The same words again and again, so that matches reach back. </p>\n";
        let mut output = Vec::new();
        let mut slots = Vec::new();
        for i in 0..40 {
            output.extend_from_slice(unit);
            if i % 9 == 4 {
                slots.push((output.len(), 10));
                output.extend_from_slice(b"SENTINEL!!");
            }
        }
        let cuts: Vec<usize> = (1..6).map(|i| i * output.len() / 6).collect();
        let cuts: Vec<usize> = cuts
            .into_iter()
            .filter(|&c| !slots.iter().any(|&(at, l)| c > at && c < at + l))
            .collect();
        let pack = Pack::gzip(&output, &slots, &cuts);
        for id in [&b""[..], b"a", b"visitor%40example.com", &[b'x'; 700][..]] {
            let gz = gzip_of(&pack, &output, &slots, id);
            let mut got = Vec::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_end(&mut got)
                .expect("a valid gzip member, CRC and length included");
            assert_eq!(
                got,
                with_id(&output, &slots, id),
                "id of {} bytes",
                id.len()
            );
        }
    }

    #[test]
    fn bare_brotli_pieces_with_any_bytes_between_them_are_one_valid_stream() {
        for (quality, window) in [(2, 16), (PACK_BROTLI_QUALITY, PACK_BROTLI_WINDOW)] {
            let page = std::fs::read("../shared/corpus/cloudflare.com.html")
                .unwrap_or_else(|_| b"<p>fallback words, words and words</p>".repeat(3000));
            let cuts = [
                0,
                1,
                2,
                3,
                700,
                701,
                5000,
                40_000,
                page.len() / 2,
                page.len(),
            ];
            for id in [&b"a"[..], b"visitor%40example.com", &[b'x'; 700][..]] {
                let mut stream = brotli_header(PACK_BROTLI_WINDOW).to_vec();
                let mut want = Vec::new();
                for pair in cuts.windows(2) {
                    let data = &page[pair[0]..pair[1]];
                    stream.extend_from_slice(&brotli_piece(data, quality, window));
                    want.extend_from_slice(data);
                    brotli_stored(id, &mut stream);
                    want.extend_from_slice(id);
                }
                stream.push(BROTLI_END);
                let mut got = Vec::new();
                brotli::Decompressor::new(&stream[..], 4096)
                    .read_to_end(&mut got)
                    .expect("a valid brotli stream");
                assert_eq!(got.len(), want.len());
                assert!(got == want, "quality {quality}, id of {} bytes", id.len());
            }
        }
    }

    fn brotli_of(pack: &Pack, output: &[u8], id: &[u8]) -> Vec<u8> {
        let mut out = brotli_header(PACK_BROTLI_WINDOW).to_vec();
        for piece in pack.range(0, output.len()) {
            match piece {
                Piece::Static(p) => out.extend_from_slice(&p.data),
                Piece::Slot => brotli_stored(id, &mut out),
            }
        }
        out.push(BROTLI_END);
        out
    }

    #[test]
    fn a_brotli_pack_with_any_id_in_its_slots_is_one_valid_stream() {
        let page = std::fs::read("../shared/corpus/cloudflare.com.html")
            .unwrap_or_else(|_| b"<a href=\"https://x.example/\">words</a>".repeat(3000));
        // Slots every few kilobytes, cuts between them and right beside them.
        let mut slots = Vec::new();
        let mut at = 3;
        while at + 40 < page.len() {
            slots.push((at, 17));
            at += 1 + (at * 7919) % 9000;
        }
        let mut cuts = Vec::new();
        for &(s, l) in &slots {
            cuts.extend([s.saturating_sub(1), s + l + 1, s + l + 2000]);
        }
        cuts.retain(|&c| c <= page.len() && !slots.iter().any(|&(s, l)| c > s && c < s + l));
        let pack = Pack::new(PackKind::Brotli, &page, &slots, &cuts, None);
        for id in [&b"a"[..], b"visitor%40example.com", &[b'x'; 700][..]] {
            let stream = brotli_of(&pack, &page, id);
            let mut got = Vec::new();
            brotli::Decompressor::new(&stream[..], 4096)
                .read_to_end(&mut got)
                .expect("a valid brotli stream");
            assert!(
                got == with_id(&page, &slots, id),
                "id of {} bytes",
                id.len()
            );
        }
        // A pack is worth keeping only if it compresses like a whole-page encoder would.
        let whole = brotli_piece(&page, PACK_BROTLI_QUALITY, PACK_BROTLI_WINDOW).len();
        assert!(
            pack.compressed_len() < page.len() / 3,
            "{} of {}",
            pack.compressed_len(),
            whole
        );
    }

    /// The pack's stream for `id` in every slot, in either coding.
    fn stream_of(kind: PackKind, pack: &Pack, output: &[u8], id: &[u8]) -> Vec<u8> {
        match kind {
            PackKind::Brotli => brotli_of(pack, output, id),
            PackKind::Gzip => {
                let slots: Vec<(usize, usize)> = pack
                    .range(0, output.len())
                    .iter()
                    .filter(|p| matches!(p, Piece::Slot))
                    .map(|_| (0, 0))
                    .collect();
                gzip_of(pack, output, &slots, id)
            }
        }
    }

    fn decode(kind: PackKind, stream: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        match kind {
            PackKind::Gzip => flate2::read::GzDecoder::new(stream).read_to_end(&mut got),
            PackKind::Brotli => brotli::Decompressor::new(stream, 4096).read_to_end(&mut got),
        }
        .expect("a valid stream");
        got
    }

    /// The corpus page with a slot in place of every partner-like link's end, as a recording
    /// has them, and cuts every 8 KiB as its checkpoints.
    fn recorded_page() -> (Vec<u8>, Vec<(usize, usize)>, Vec<usize>) {
        let page = std::fs::read("../shared/corpus/cloudflare.com.html")
            .unwrap_or_else(|_| b"<a href=\"https://x.example/a\">words</a> ".repeat(3000));
        let (mut output, mut slots) = (Vec::new(), Vec::new());
        for (i, part) in page.split(|&b| b == b'"').enumerate() {
            output.extend_from_slice(part);
            if part.starts_with(b"https://") && i % 4 == 1 {
                output.extend_from_slice(b"?kmi=");
                slots.push((output.len(), 17));
                output.extend_from_slice(b"\x01SENTINEL-STEM-1");
            }
            output.push(b'"');
        }
        let cuts: Vec<usize> = (1..output.len() / 32768)
            .map(|i| i * 32768)
            .filter(|&c| !slots.iter().any(|&(s, l)| c > s && c < s + l))
            .collect();
        (output, slots, cuts)
    }

    fn with_id(output: &[u8], slots: &[(usize, usize)], id: &[u8]) -> Vec<u8> {
        let mut want = Vec::new();
        let mut at = 0;
        for &(s, l) in slots {
            want.extend_from_slice(&output[at..s]);
            want.extend_from_slice(id);
            at = s + l;
        }
        want.extend_from_slice(&output[at..]);
        want
    }

    #[test]
    fn a_shaped_pack_reaches_across_slots_and_compresses_like_the_whole_page() {
        let (output, slots, cuts) = recorded_page();
        assert!(slots.len() > 5, "a page with slots");
        let filler = absent_byte(&output).expect("a byte the page does not use");
        for kind in [PackKind::Gzip, PackKind::Brotli] {
            for id in [&b"Zk9%2BaB%2Fc3Q%3D%3D"[..], b"a", &[b'q'; 300][..]] {
                let lens = vec![id.len(); slots.len()];
                let shape = Shape {
                    filler,
                    lens: &lens,
                };
                let pack = Pack::new(kind, &output, &slots, &cuts, Some(shape));
                let stream = stream_of(kind, &pack, &output, id);
                let want = with_id(&output, &slots, id);
                assert!(
                    decode(kind, &stream) == want,
                    "{kind:?}, id of {}",
                    id.len()
                );
                // Against compressing the decorated page once, whole, at the same level.
                let whole = match kind {
                    PackKind::Gzip => {
                        let mut e = flate2::write::GzEncoder::new(
                            Vec::new(),
                            flate2::Compression::new(PACK_LEVEL),
                        );
                        std::io::Write::write_all(&mut e, &want).unwrap();
                        e.finish().unwrap().len()
                    }
                    PackKind::Brotli => {
                        let mut e = brotli::CompressorWriter::new(
                            Vec::new(),
                            4096,
                            PACK_BROTLI_QUALITY,
                            PACK_BROTLI_WINDOW,
                        );
                        std::io::Write::write_all(&mut e, &want).unwrap();
                        e.into_inner().len()
                    }
                };
                let unshaped = stream_of(
                    kind,
                    &Pack::new(kind, &output, &slots, &cuts, None),
                    &output,
                    id,
                )
                .len();
                let nocuts = stream_of(
                    kind,
                    &Pack::new(kind, &output, &slots, &[], Some(shape)),
                    &output,
                    id,
                )
                .len();
                eprintln!(
                    "{kind:?} id {}: {} slots {} cuts: shaped {} no cuts {nocuts} unshaped {unshaped} whole {whole} ({:+.1}%)",
                    id.len(), slots.len(), cuts.len(),
                    stream.len(),
                    (stream.len() as f64 / whole as f64 - 1.0) * 100.0
                );
                // Each slot still ends a compressed block (the ID is stored between blocks), and
                // a new block costs its code tables: brotli's more than deflate's. Measured
                // here with 21 slots: gzip +5%, brotli +9% for a 20-byte ID (+13% before shaped
                // runs could use brotli's built-in dictionary).
                assert!(stream.len() < unshaped, "{kind:?}: shaping gained nothing");
                let bound = match kind {
                    PackKind::Gzip => 108,
                    PackKind::Brotli => 111,
                };
                if output.len() > 50_000 && id.len() <= 20 {
                    assert!(
                        stream.len() * 100 <= whole * bound,
                        "{kind:?}: {} bytes against {whole} for the whole page",
                        stream.len()
                    );
                }
            }
        }
    }

    #[test]
    fn a_shaped_pack_is_only_valid_for_its_lengths() {
        // The reason a pack is kept per ID length: another length shifts every distance that
        // reaches across a slot, and the stream decodes to something else (or not at all).
        let (output, slots, cuts) = recorded_page();
        let filler = absent_byte(&output).unwrap();
        let lens = vec![20; slots.len()];
        let shape = Shape {
            filler,
            lens: &lens,
        };
        let pack = Pack::new(PackKind::Gzip, &output, &slots, &cuts, Some(shape));
        let id = [b'z'; 21];
        let stream = stream_of(PackKind::Gzip, &pack, &output, &id);
        let mut got = Vec::new();
        let read = flate2::read::GzDecoder::new(&stream[..]).read_to_end(&mut got);
        assert!(read.is_err() || got != with_id(&output, &slots, &id));
    }

    #[test]
    fn absent_byte_finds_a_byte_the_data_lacks() {
        assert_eq!(absent_byte(b""), Some(0));
        assert_eq!(absent_byte(&[0, 1, 3]), Some(2));
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(absent_byte(&all), None);
    }
}
