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
    /// Raw deflate blocks ending on a sync flush (byte-aligned, no final block).
    pub deflate: Bytes,
    /// CRC-32 of the bytes it decodes to.
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

/// A recording's output in gzip pieces: `pieces[i]` covers output `[cuts[i], cuts[i + 1])`.
#[derive(Debug)]
pub struct Pack {
    cuts: Vec<usize>,
    pieces: Vec<Piece>,
    bytes: usize,
}

/// The gzip level of packed pieces: compressed once per recording, not once per visitor, so the
/// level nginx and gzip default to rather than the per-visitor encoder's faster one.
pub const PACK_LEVEL: u32 = 6;

impl Pack {
    /// Packs `output`, whose slots are `slots` (start, length), cutting it at every slot edge and
    /// at `cuts` (the offsets a replay sends up to; each outside any slot).
    pub fn gzip(output: &[u8], slots: &[(usize, usize)], cuts: &[usize]) -> Pack {
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
        let mut compress = flate2::Compress::new(flate2::Compression::new(PACK_LEVEL), false);
        let mut pieces = Vec::with_capacity(edges.len());
        let mut bytes = 0;
        let mut slot = slots.iter().peekable();
        // A run starts at the beginning and after every slot: the compressor forgets all before.
        let mut fresh_run = true;
        for pair in edges.windows(2) {
            let (from, to) = (pair[0], pair[1]);
            while slot.peek().is_some_and(|&&(at, len)| at + len <= from) {
                slot.next();
            }
            if slot.peek().is_some_and(|&&(at, _)| at == from) {
                pieces.push(Piece::Slot);
                fresh_run = true;
                continue;
            }
            if fresh_run {
                compress.reset();
                fresh_run = false;
            }
            let data = &output[from..to];
            let deflate = sync_flushed(&mut compress, data);
            bytes += deflate.len();
            pieces.push(Piece::Static(Packed {
                deflate: Bytes::from(deflate),
                crc: crc32fast::hash(data),
                len: data.len() as u64,
                shift: crc32_shift(data.len() as u64),
            }));
        }
        edges.pop();
        Pack {
            cuts: edges,
            pieces,
            bytes,
        }
    }

    /// The pieces covering output `[from, to)`; both must be cuts.
    pub fn range(&self, from: usize, to: usize) -> &[Piece] {
        let a = self.cuts.partition_point(|&c| c < from);
        let b = self.cuts.partition_point(|&c| c < to);
        debug_assert!(self.cuts.get(a) == Some(&from) || from == to);
        &self.pieces[a..b]
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
    debug_assert!(data.len() <= 0xffff);
    let len = data.len() as u16;
    out.push(0); // BFINAL 0, BTYPE 00, padding to the byte
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
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
                    out.extend_from_slice(&p.deflate);
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
            let mut want = Vec::new();
            let mut at = 0;
            for &(s, l) in &slots {
                want.extend_from_slice(&output[at..s]);
                want.extend_from_slice(id);
                at = s + l;
            }
            want.extend_from_slice(&output[at..]);
            assert_eq!(got, want, "id of {} bytes", id.len());
        }
    }
}
