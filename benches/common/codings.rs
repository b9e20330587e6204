//! Whole bodies through the reference implementations of the content codings (flate2 and the
//! brotli crate), never through the proxy's own: an origin's pre-compressed page, a page
//! compressed once as a yardstick, and a client reading what the proxy sent. Included by
//! `transport.rs` and `compressed.rs` with `#[path]`.

use std::io::{Read, Write};

use kmi_proxy::coding::Coding;

/// `page` compressed once, as an origin with pre-compressed assets serves it: gzip at level 6,
/// brotli at quality 9 with brotli's default window (4 MiB).
pub fn origin(coding: Coding, page: &[u8]) -> Vec<u8> {
    match coding {
        Coding::Gzip => gzip(page, 6),
        Coding::Brotli => brotli(page, 9, 22),
        other => unreachable!("no origin body in {other:?}"),
    }
}

/// One gzip member of `data` at `level`.
pub fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    e.write_all(data).expect("writing to memory");
    e.finish().expect("writing to memory")
}

/// One brotli stream of `data` at `quality` with a window of 2^`window` bytes.
pub fn brotli(data: &[u8], quality: u32, window: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = brotli::CompressorWriter::new(&mut out, 4096, quality, window);
    e.write_all(data).expect("writing to memory");
    drop(e);
    out
}

/// What a client reads from `body` in `coding`: an error unless `body` is exactly one complete
/// stream (for gzip: one member, its CRC and length right, nothing after it; the brotli reader
/// refuses a cut stream and bytes after its end by itself).
pub fn decompress(coding: Coding, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len() * 6);
    match coding {
        Coding::Gzip => {
            let mut d = flate2::bufread::GzDecoder::new(body);
            d.read_to_end(&mut out)?;
            let after = d.into_inner().len();
            if after > 0 {
                return Err(std::io::Error::other(format!(
                    "{after} bytes after the gzip member"
                )));
            }
        }
        Coding::Brotli => {
            brotli::Decompressor::new(body, 4096).read_to_end(&mut out)?;
        }
        other => unreachable!("not read: {other:?}"),
    }
    Ok(out)
}
