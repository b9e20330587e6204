//! Content codings (gzip, deflate, br, zstd) as synchronous, chunk-at-a-time decoders and encoders,
//! so a compressed page can be decoded, rewritten and re-encoded as it streams. Pure CPU work over
//! byte slices; the body adapter drives them.

use std::io::Write;

use bytes::Bytes;
use http::header::CONTENT_ENCODING;
use http::HeaderMap;

/// A single content coding the rewriter can undo and redo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// HTTP's "deflate" is the zlib format (RFC 9110 §8.4.1.2).
    Deflate,
    Brotli,
    Zstd,
}

/// What the `Content-Encoding` header says about a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    One(Coding),
    /// Unknown or stacked codings: the body is passed through untouched.
    Unsupported,
}

impl Coding {
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
        }
    }
}

/// Reads every `Content-Encoding` field of a response.
pub fn of(headers: &HeaderMap) -> Encoding {
    let mut codings = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|v| {
            v.to_str()
                .map(|s| s.split(',').collect::<Vec<_>>())
                .unwrap_or_else(|_| vec!["\u{0}"])
        })
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
    let Some(first) = codings.next() else {
        return Encoding::Identity;
    };
    if codings.next().is_some() {
        return Encoding::Unsupported;
    }
    let coding = match first.to_ascii_lowercase().as_str() {
        "gzip" | "x-gzip" => Coding::Gzip,
        "deflate" => Coding::Deflate,
        "br" => Coding::Brotli,
        "zstd" => Coding::Zstd,
        _ => return Encoding::Unsupported,
    };
    Encoding::One(coding)
}

/// A decoder that takes compressed chunks and gives back what they decode to so far.
pub struct Decoder {
    kind: DecoderKind,
    /// An empty body is an empty page, not a truncated stream, whatever the coding says.
    saw_input: bool,
}

enum DecoderKind {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
    Zstd(Box<ZstdDecoder>),
}

/// zstd's writer does not say whether the last frame was complete; its raw decoder's hint does
/// (0 once a frame has been decoded and flushed), so the raw decoder is driven here to tell a
/// truncated body from a whole one.
struct ZstdDecoder {
    raw: zstd::stream::raw::Decoder<'static>,
    /// Whether the input so far ends exactly at the end of a frame.
    frame_complete: bool,
    saw_input: bool,
    scratch: Vec<u8>,
}

impl ZstdDecoder {
    fn write(&mut self, chunk: &[u8]) -> std::io::Result<Vec<u8>> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut decoded = Vec::new();
        let mut input = InBuffer::around(chunk);
        if !chunk.is_empty() {
            self.saw_input = true;
        }
        loop {
            let mut output = OutBuffer::around(&mut self.scratch[..]);
            let hint = self.raw.run(&mut input, &mut output)?;
            let produced = output.pos();
            decoded.extend_from_slice(&self.scratch[..produced]);
            if !chunk.is_empty() {
                self.frame_complete = hint == 0;
            }
            if input.pos() == chunk.len() && produced < self.scratch.len() {
                return Ok(decoded);
            }
        }
    }
}

fn truncated(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("{what} body ended before the end of its compressed stream"),
    )
}

impl Decoder {
    pub fn new(coding: Coding) -> Decoder {
        let kind = match coding {
            Coding::Gzip => DecoderKind::Gzip(flate2::write::GzDecoder::new(Vec::new())),
            Coding::Deflate => DecoderKind::Deflate(flate2::write::ZlibDecoder::new(Vec::new())),
            Coding::Brotli => DecoderKind::Brotli(Box::new(brotli::DecompressorWriter::new(
                Vec::new(),
                8 * 1024,
            ))),
            Coding::Zstd => DecoderKind::Zstd(Box::new(ZstdDecoder {
                raw: zstd::stream::raw::Decoder::new().expect("zstd decoder allocation"),
                frame_complete: false,
                saw_input: false,
                scratch: vec![0; 32 * 1024],
            })),
        };
        Decoder {
            kind,
            saw_input: false,
        }
    }

    /// Decodes one chunk; returns the bytes it completed (possibly none).
    pub fn write(&mut self, chunk: &[u8]) -> std::io::Result<Bytes> {
        self.saw_input |= !chunk.is_empty();
        match &mut self.kind {
            DecoderKind::Gzip(d) => {
                // The writers hold decoded bytes internally until flushed.
                d.write_all(chunk)?;
                d.flush()?;
                Ok(std::mem::take(d.get_mut()).into())
            }
            DecoderKind::Deflate(d) => {
                // The writers hold decoded bytes internally until flushed.
                d.write_all(chunk)?;
                d.flush()?;
                Ok(std::mem::take(d.get_mut()).into())
            }
            DecoderKind::Brotli(d) => {
                // The writers hold decoded bytes internally until flushed.
                d.write_all(chunk)?;
                d.flush()?;
                Ok(std::mem::take(d.get_mut()).into())
            }
            DecoderKind::Zstd(d) => Ok(d.write(chunk)?.into()),
        }
    }

    /// Ends the stream: the last bytes, or an error if the compressed stream was cut short.
    pub fn finish(&mut self) -> std::io::Result<Bytes> {
        if !self.saw_input {
            return Ok(Bytes::new());
        }
        match &mut self.kind {
            DecoderKind::Gzip(d) => {
                d.try_finish().map_err(|_| truncated("gzip"))?;
                Ok(std::mem::take(d.get_mut()).into())
            }
            DecoderKind::Deflate(d) => {
                d.try_finish().map_err(|_| truncated("deflate"))?;
                Ok(std::mem::take(d.get_mut()).into())
            }
            DecoderKind::Brotli(d) => {
                d.close().map_err(|_| truncated("br"))?;
                Ok(std::mem::take(d.get_mut()).into())
            }
            DecoderKind::Zstd(d) => {
                if d.saw_input && !d.frame_complete {
                    return Err(truncated("zstd"));
                }
                Ok(Bytes::new())
            }
        }
    }
}

/// An encoder that compresses chunks and flushes after each, so the client receives bytes as soon
/// as the origin sends them rather than when a compression block fills.
pub struct Encoder(EncoderKind);

enum EncoderKind {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

/// Compression levels: fast ones, since a page is compressed once per visitor rather than once
/// per deploy (nginx defaults gzip to 1; these trade a little size for throughput).
const GZIP_LEVEL: u32 = 4;
const BROTLI_QUALITY: u32 = 4;
const ZSTD_LEVEL: i32 = 3;

impl Encoder {
    pub fn new(coding: Coding) -> Encoder {
        let level = flate2::Compression::new(GZIP_LEVEL);
        Encoder(match coding {
            Coding::Gzip => EncoderKind::Gzip(flate2::write::GzEncoder::new(Vec::new(), level)),
            Coding::Deflate => {
                EncoderKind::Deflate(flate2::write::ZlibEncoder::new(Vec::new(), level))
            }
            Coding::Brotli => EncoderKind::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                8 * 1024,
                BROTLI_QUALITY,
                22,
            ))),
            Coding::Zstd => EncoderKind::Zstd(
                zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)
                    .expect("zstd encoder allocation"),
            ),
        })
    }

    /// Compresses one chunk and flushes; returns the compressed bytes ready to send.
    pub fn write(&mut self, chunk: &[u8]) -> std::io::Result<Bytes> {
        fn run<W: Write>(w: &mut W, chunk: &[u8]) -> std::io::Result<()> {
            w.write_all(chunk)?;
            w.flush()
        }
        let out = match &mut self.0 {
            EncoderKind::Gzip(e) => {
                run(e, chunk)?;
                e.get_mut()
            }
            EncoderKind::Deflate(e) => {
                run(e, chunk)?;
                e.get_mut()
            }
            EncoderKind::Brotli(e) => {
                run(e.as_mut(), chunk)?;
                e.get_mut()
            }
            EncoderKind::Zstd(e) => {
                run(e, chunk)?;
                e.get_mut()
            }
        };
        Ok(std::mem::take(out).into())
    }

    /// Ends the compressed stream and returns its last bytes.
    pub fn finish(&mut self) -> std::io::Result<Bytes> {
        let out = match &mut self.0 {
            EncoderKind::Gzip(e) => {
                e.try_finish()?;
                e.get_mut()
            }
            EncoderKind::Deflate(e) => {
                e.try_finish()?;
                e.get_mut()
            }
            EncoderKind::Brotli(e) => {
                e.flush()?;
                // Dropping a brotli writer is what ends its stream; swap in an empty one to do so.
                let done = std::mem::replace(
                    e.as_mut(),
                    brotli::CompressorWriter::new(Vec::new(), 1, 0, 10),
                );
                return Ok(done.into_inner().into());
            }
            EncoderKind::Zstd(e) => {
                e.do_finish()?;
                e.get_mut()
            }
        };
        Ok(std::mem::take(out).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Coding; 4] = [Coding::Gzip, Coding::Deflate, Coding::Brotli, Coding::Zstd];

    fn page() -> Vec<u8> {
        (0..2000)
            .flat_map(|i| {
                format!("<p>line {i} <a href=\"https://x.example/{i}\">x</a></p>\n").into_bytes()
            })
            .collect()
    }

    fn encode(coding: Coding, input: &[u8], chunk: usize) -> Vec<u8> {
        let mut e = Encoder::new(coding);
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            out.extend_from_slice(&e.write(c).unwrap());
        }
        out.extend_from_slice(&e.finish().unwrap());
        out
    }

    fn decode(coding: Coding, input: &[u8], chunk: usize) -> std::io::Result<Vec<u8>> {
        let mut d = Decoder::new(coding);
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            out.extend_from_slice(&d.write(c)?);
        }
        out.extend_from_slice(&d.finish()?);
        Ok(out)
    }

    #[test]
    fn every_coding_round_trips_in_any_chunking() {
        let input = page();
        for coding in ALL {
            for chunk in [1, 7, 4096, usize::MAX] {
                // Flushing per byte would make the encoded form huge and the test slow; the
                // encoder sees realistic chunks, the decoder every split.
                let encoded = encode(coding, &input, chunk.clamp(512, input.len()));
                assert_eq!(
                    decode(coding, &encoded, chunk.min(encoded.len())).unwrap(),
                    input,
                    "{coding:?} chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn flushing_makes_bytes_available_per_chunk() {
        for coding in ALL {
            let mut e = Encoder::new(coding);
            let first = e
                .write(b"<a href=\"https://x.example/\">first</a>")
                .unwrap();
            let mut d = Decoder::new(coding);
            let decoded = d.write(&first).unwrap();
            assert_eq!(
                &decoded[..],
                b"<a href=\"https://x.example/\">first</a>",
                "{coding:?}"
            );
        }
    }

    #[test]
    fn an_empty_body_is_an_empty_page_for_every_coding() {
        // Regression: gzip, deflate and br reported an empty body as a truncated stream, and the
        // proxy then closed the connection without a response.
        for coding in ALL {
            assert!(decode(coding, b"", 1).unwrap().is_empty(), "{coding:?}");
        }
    }

    #[test]
    fn a_truncated_stream_is_an_error() {
        let input = page();
        for coding in ALL {
            let encoded = encode(coding, &input, input.len());
            let cut = &encoded[..encoded.len() - 12];
            assert!(
                decode(coding, cut, 100).is_err(),
                "{coding:?} truncated stream accepted"
            );
        }
    }

    #[test]
    fn content_encoding_header_is_read() {
        let mut h = HeaderMap::new();
        assert_eq!(of(&h), Encoding::Identity);
        h.insert(CONTENT_ENCODING, "GZIP".parse().unwrap());
        assert_eq!(of(&h), Encoding::One(Coding::Gzip));
        h.insert(CONTENT_ENCODING, "identity".parse().unwrap());
        assert_eq!(of(&h), Encoding::Identity);
        h.insert(CONTENT_ENCODING, "gzip, br".parse().unwrap());
        assert_eq!(of(&h), Encoding::Unsupported);
        h.insert(CONTENT_ENCODING, "compress".parse().unwrap());
        assert_eq!(of(&h), Encoding::Unsupported);
    }
}
