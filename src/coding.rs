//! Content codings (gzip, deflate, br, zstd) as synchronous decoders that give back bounded
//! slices and encoders that flush per chunk, so a compressed page can be decoded, rewritten and
//! re-encoded as it streams without any step holding more than a slice of it. Pure CPU work over
//! byte slices; the body adapter drives them.

use std::cell::RefCell;
use std::fmt;
use std::io::Write;

use bytes::Bytes;
use http::header::CONTENT_ENCODING;
use http::HeaderMap;

use crate::pack::{PackKind, Piece, GZIP_HEADER};

/// A single content coding the rewriter can undo and redo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// HTTP's "deflate" is the zlib format (RFC 9110 §8.4.1.2); some servers send raw deflate
    /// under the same name, and browsers read both, so the decoder does too.
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

/// The coding to compress a page in for a client whose request said `accept` (every
/// `Accept-Encoding` field), among those a recording is packed for: brotli, then gzip, the
/// client's q-values first (RFC 9110 section 12.5.3: `*` stands for any coding not named, `q=0`
/// refuses one, `x-gzip` is gzip). `None` when the client accepts neither.
pub fn preferred<'a>(accept: impl IntoIterator<Item = &'a http::HeaderValue>) -> Option<Coding> {
    let (mut br, mut gzip, mut any) = (None::<u32>, None::<u32>, None::<u32>);
    for field in accept {
        let Ok(field) = field.to_str() else { continue };
        for item in field.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut q = 1000;
            for param in parts {
                let Some((k, v)) = param.split_once('=') else {
                    continue;
                };
                if k.trim().eq_ignore_ascii_case("q") {
                    q = qvalue(v.trim()).unwrap_or(0);
                }
            }
            let slot = match name.as_str() {
                "br" => &mut br,
                "gzip" | "x-gzip" => &mut gzip,
                "*" => &mut any,
                _ => continue,
            };
            // Named twice: the higher weight counts.
            *slot = Some(slot.map_or(q, |old| old.max(q)));
        }
    }
    let (br, gzip) = (br.or(any).unwrap_or(0), gzip.or(any).unwrap_or(0));
    if br == 0 && gzip == 0 {
        None
    } else if br >= gzip {
        Some(Coding::Brotli)
    } else {
        Some(Coding::Gzip)
    }
}

/// A q-value in thousandths: `0`, `1`, `0.5`, `0.125`; `None` if it is not one.
fn qvalue(v: &str) -> Option<u32> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole = match int {
        "0" => 0,
        "1" => 1000,
        _ => return None,
    };
    let frac: u32 = format!("{frac:0<3}").parse().ok()?;
    let q = whole + frac;
    (q <= 1000).then_some(q)
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

/// The most decoded bytes one call to [`Decoder::decode`] gives back. The rewriter and the encoder
/// each see at most this much at a time, whatever ratio the compressed input has.
pub const SLICE: usize = 16 * 1024;

/// A body may always decode to this much, however well it compressed ...
pub const BOMB_FLOOR: u64 = 16 * 1024 * 1024;
/// ... and beyond it, to at most this many times its compressed size. Real HTML compresses 5 to
/// 20 times (highly repetitive generated pages under brotli perhaps 50 to 100); a decompression
/// bomb is thousands to millions of times. Past both bounds the response fails (see
/// [`DecodeErrorKind::Bomb`]) instead of the proxy spending CPU on gigabytes of nothing.
pub const MAX_RATIO: u64 = 100;

/// Why a compressed body could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// Not a valid stream in the coding its `Content-Encoding` names.
    Corrupt,
    /// The body ended before the end of its compressed stream.
    Truncated,
    /// It inflated past [`BOMB_FLOOR`] and more than [`MAX_RATIO`] times its compressed size.
    Bomb,
}

impl DecodeErrorKind {
    /// The name in the access log and `upstream_errors_total{kind}`.
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeErrorKind::Corrupt => "corrupt_encoding",
            DecodeErrorKind::Truncated => "truncated_encoding",
            DecodeErrorKind::Bomb => "decompression_bomb",
        }
    }
}

/// A compressed body that could not be decoded, with what was wrong in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub kind: DecodeErrorKind,
    pub message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DecodeError {}

fn corrupt(coding: Coding, why: impl fmt::Display) -> DecodeError {
    DecodeError {
        kind: DecodeErrorKind::Corrupt,
        message: format!("{} body is not valid: {why}", coding.as_str()),
    }
}

fn truncated(coding: Coding) -> DecodeError {
    DecodeError {
        kind: DecodeErrorKind::Truncated,
        message: format!(
            "{} body ended before the end of its compressed stream",
            coding.as_str()
        ),
    }
}

/// A decoder keeps the compressed bytes it has used while there are at most this many ...
pub const PARK_COMPRESSED: usize = 64 * 1024;
/// ... and they decode to at most this many, so that when its origin pauses it can give its
/// state back ([`Decoder::park`]) and rebuild it later by decoding them again. A brotli decoder's
/// ring buffer and tables cost 130-150 KiB on a 119 KB page (an inflater about 43 KiB); the
/// compressed bytes of a page that size are 10 to 30 KB, and decoding them again takes about a
/// millisecond, paid once per pause. Past either bound the decoder keeps its state.
pub const PARK_DECODED: u64 = 1024 * 1024;

/// A decoder that takes compressed bytes and gives back what they decode to, one bounded slice
/// at a time.
pub struct Decoder {
    coding: Coding,
    state: State,
    /// An empty body is an empty page, not a truncated stream, whatever the coding says.
    saw_input: bool,
    compressed: u64,
    decoded: u64,
    /// Every compressed byte used so far, while within [`PARK_COMPRESSED`] and
    /// [`PARK_DECODED`]: what rebuilds a parked decoder.
    replay: Option<Vec<u8>>,
    /// The last call gave back nothing: every byte given has been used and decoded.
    drained: bool,
}

type BrotliState = brotli::BrotliState<
    brotli::enc::StandardAlloc,
    brotli::enc::StandardAlloc,
    brotli::enc::StandardAlloc,
>;

enum State {
    Gzip(Box<Gzip>),
    /// `deflate` before its first two bytes say whether it is zlib-wrapped or raw.
    Sniffing(Option<u8>),
    Flate(Box<flate2::Decompress>),
    Brotli(Box<BrotliState>),
    Zstd {
        raw: Box<zstd::stream::raw::Decoder<'static>>,
        /// The last call filled its output: more may be waiting without more input.
        pending: bool,
        /// The input so far ends exactly at the end of a frame.
        frame_complete: bool,
    },
    /// The compressed stream has ended; anything after it is ignored, as browsers do.
    Done,
    /// State given back while the origin pauses; `replay` rebuilds it (see [`Decoder::park`]).
    Parked,
}

/// One step: input bytes used, output bytes made.
type Step = (usize, usize);

impl Decoder {
    pub fn new(coding: Coding) -> Decoder {
        let state = match coding {
            Coding::Gzip => State::Gzip(Box::new(Gzip::new())),
            Coding::Deflate => State::Sniffing(None),
            Coding::Brotli => {
                let mut state = BrotliState::new(
                    brotli::enc::StandardAlloc::default(),
                    brotli::enc::StandardAlloc::default(),
                    brotli::enc::StandardAlloc::default(),
                );
                // Large-window brotli (windows past 16 MiB) is not the HTTP `br` coding (RFC 7932
                // §9.1); refusing it keeps a body from making the decoder hold up to 1 GiB.
                state.large_window = false;
                State::Brotli(Box::new(state))
            }
            Coding::Zstd => {
                let mut raw = zstd::stream::raw::Decoder::new().expect("zstd decoder allocation");
                // RFC 9659: `zstd` in HTTP uses windows of at most 8 MiB, and browsers refuse
                // larger ones; zstd's own limit (128 MiB) would let a body claim that much.
                raw.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(23))
                    .expect("a window limit zstd accepts");
                State::Zstd {
                    raw: Box::new(raw),
                    pending: false,
                    frame_complete: false,
                }
            }
        };
        Decoder {
            coding,
            state,
            saw_input: false,
            compressed: 0,
            decoded: 0,
            replay: Some(Vec::new()),
            drained: true,
        }
    }

    /// Decoded bytes given back so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    /// Compressed bytes used so far.
    pub fn compressed(&self) -> u64 {
        self.compressed
    }

    /// Gives back the decoder's state (windows, ring buffers, tables) while the body pauses,
    /// keeping only the compressed bytes used so far; the next call rebuilds it by decoding them
    /// again and dropping that output, which is exactly what was already given back. Does
    /// nothing (and returns false) unless the decoder is drained, holds state, and is within
    /// [`PARK_COMPRESSED`] and [`PARK_DECODED`].
    pub fn park(&mut self) -> bool {
        let holds_state = matches!(
            self.state,
            State::Gzip(_) | State::Flate(_) | State::Brotli(_) | State::Zstd { .. }
        );
        if !(self.drained && holds_state && self.replay.is_some()) {
            return false;
        }
        self.state = State::Parked;
        if let Some(replay) = &mut self.replay {
            replay.shrink_to_fit();
        }
        true
    }

    /// Whether [`Decoder::park`] would give the state back now.
    pub fn can_park(&self) -> bool {
        self.drained
            && self.replay.is_some()
            && matches!(
                self.state,
                State::Gzip(_) | State::Flate(_) | State::Brotli(_) | State::Zstd { .. }
            )
    }

    /// Rebuilds a parked decoder's state from the compressed bytes it had used.
    fn unpark(&mut self) -> Result<(), DecodeError> {
        let replay = self.replay.take().unwrap_or_default();
        let mut fresh = Decoder::new(self.coding);
        fresh.replay = None;
        let mut input = &replay[..];
        let mut scratch = vec![0u8; SLICE];
        let mut made = 0u64;
        loop {
            let (used, out) = fresh.step(input, &mut scratch)?;
            input = &input[used..];
            made += out as u64;
            if used == 0 && out == 0 {
                break;
            }
        }
        if made != self.decoded || !input.is_empty() {
            // Decoding is deterministic; this would be a bug, and the page must not go on
            // from a state that differs from the one it was parked in.
            return Err(corrupt(self.coding, "the decoder could not be rebuilt"));
        }
        self.state = fresh.state;
        self.replay = Some(replay);
        Ok(())
    }

    /// Decodes from the front of `input`, advancing it past what was used, and returns at most
    /// [`SLICE`] bytes. An empty result means every byte of `input` has been used and nothing more
    /// comes out without more input; otherwise call again (with the rest, or with nothing).
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Bytes, DecodeError> {
        self.saw_input |= !input.is_empty();
        if matches!(self.state, State::Parked) {
            if input.is_empty() {
                return Ok(Bytes::new());
            }
            self.unpark()?;
        }
        let mut out = vec![0u8; SLICE];
        loop {
            let (used, made) = self.step(input, &mut out)?;
            if let Some(replay) = &mut self.replay {
                if replay.len() + used <= PARK_COMPRESSED
                    && self.decoded + made as u64 <= PARK_DECODED
                {
                    replay.extend_from_slice(&input[..used]);
                } else {
                    self.replay = None;
                }
            }
            if matches!(self.state, State::Done) {
                self.replay = None;
            }
            *input = &input[used..];
            self.compressed += used as u64;
            if made > 0 {
                self.drained = false;
                self.decoded += made as u64;
                if self.decoded > BOMB_FLOOR && self.decoded > self.compressed * MAX_RATIO {
                    return Err(DecodeError {
                        kind: DecodeErrorKind::Bomb,
                        message: format!(
                            "{} body inflated to more than {} MiB at over {MAX_RATIO} times its \
                             compressed size ({} bytes)",
                            self.coding.as_str(),
                            BOMB_FLOOR >> 20,
                            self.compressed
                        ),
                    });
                }
                out.truncate(made);
                return Ok(out.into());
            }
            if used == 0 {
                if !input.is_empty() && !matches!(self.state, State::Done) {
                    // Every step uses input or makes output unless it is starved of input; a
                    // decoder that did neither would otherwise drop the rest of the body.
                    return Err(corrupt(self.coding, "the decoder made no progress"));
                }
                *input = &[];
                self.drained = true;
                return Ok(Bytes::new());
            }
        }
    }

    /// Ends the stream: an error if the compressed stream was cut short. Call it once
    /// [`Decoder::decode`] has given back everything.
    pub fn finish(&mut self) -> Result<(), DecodeError> {
        if !self.saw_input {
            return Ok(());
        }
        if matches!(self.state, State::Parked) {
            self.unpark()?;
        }
        let complete = match &self.state {
            State::Done => true,
            State::Gzip(g) => g.may_end(),
            State::Zstd { frame_complete, .. } => *frame_complete,
            State::Sniffing(_) | State::Flate(_) | State::Brotli(_) | State::Parked => false,
        };
        if complete {
            Ok(())
        } else {
            Err(truncated(self.coding))
        }
    }

    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<Step, DecodeError> {
        let coding = self.coding;
        match &mut self.state {
            State::Done => Ok((input.len(), 0)),
            State::Parked => {
                self.unpark()?;
                self.step(input, out)
            }
            State::Gzip(g) => {
                let step = g.step(input, out)?;
                if g.ignoring() {
                    self.state = State::Done;
                }
                Ok(step)
            }
            State::Sniffing(first) => {
                let (a, b) = match (*first, input) {
                    (_, []) => return Ok((0, 0)),
                    (None, [a]) => {
                        *first = Some(*a);
                        return Ok((1, 0));
                    }
                    (None, [a, b, ..]) => (*a, *b),
                    (Some(a), [b, ..]) => (a, *b),
                };
                // A zlib header (RFC 1950): method 8, a window of at most 32 KiB, and a check
                // value that makes the pair a multiple of 31. Raw deflate's first block header
                // can look like one only by accident, which browsers accept too.
                let zlib =
                    a & 0x0f == 8 && a >> 4 <= 7 && (u16::from(a) << 8 | u16::from(b)) % 31 == 0;
                let mut d = flate2::Decompress::new(zlib);
                if let Some(a) = *first {
                    // The byte held back while sniffing goes in first.
                    let mut scratch = [0u8; 1];
                    d.decompress(&[a], &mut scratch, flate2::FlushDecompress::None)
                        .map_err(|e| corrupt(coding, e))?;
                    debug_assert_eq!(d.total_out(), 0, "one byte cannot decode to output");
                }
                self.state = State::Flate(Box::new(d));
                self.step(input, out)
            }
            State::Flate(d) => {
                let (before_in, before_out) = (d.total_in(), d.total_out());
                let status = d
                    .decompress(input, out, flate2::FlushDecompress::None)
                    .map_err(|e| corrupt(coding, e))?;
                let used = (d.total_in() - before_in) as usize;
                let made = (d.total_out() - before_out) as usize;
                if status == flate2::Status::StreamEnd {
                    self.state = State::Done;
                    return Ok((input.len(), made));
                }
                Ok((used, made))
            }
            State::Brotli(state) => {
                let (mut avail_in, mut in_at) = (input.len(), 0);
                let (mut avail_out, mut out_at, mut total) = (out.len(), 0, 0);
                let result = brotli::BrotliDecompressStream(
                    &mut avail_in,
                    &mut in_at,
                    input,
                    &mut avail_out,
                    &mut out_at,
                    out,
                    &mut total,
                    state,
                );
                match result {
                    brotli::BrotliResult::ResultFailure => {
                        Err(corrupt(coding, "invalid brotli stream"))
                    }
                    brotli::BrotliResult::ResultSuccess => {
                        self.state = State::Done;
                        Ok((input.len(), out_at))
                    }
                    brotli::BrotliResult::NeedsMoreInput
                    | brotli::BrotliResult::NeedsMoreOutput => Ok((in_at, out_at)),
                }
            }
            State::Zstd {
                raw,
                pending,
                frame_complete,
            } => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                if input.is_empty() && !*pending {
                    return Ok((0, 0));
                }
                let mut src = InBuffer::around(input);
                let mut dst = OutBuffer::around(out);
                let hint = raw
                    .run(&mut src, &mut dst)
                    .map_err(|e| corrupt(coding, e))?;
                let made = dst.pos();
                *pending = made == dst.capacity();
                // 0 once a frame has been decoded and flushed completely.
                *frame_complete = hint == 0;
                Ok((src.pos(), made))
            }
        }
    }
}

/// Gzip members (RFC 1952), one after another: the header, the deflate body, and the trailer
/// whose CRC-32 and length are checked. After a member, another starts only if the next bytes
/// are a gzip header; anything else (a stray newline from a PHP origin, padding) is ignored, as
/// browsers and curl do. Hand-written over flate2's raw inflater because flate2's own gzip
/// decoders reject such trailing bytes and cannot stop mid-member at a slice boundary.
struct Gzip {
    stage: GzStage,
    inflate: flate2::Decompress,
    crc: flate2::Crc,
    /// Members completed so far: trailing garbage is only acceptable after one.
    members: u32,
}

enum GzStage {
    /// The fixed 10-byte part of the header, collected across chunks.
    Fixed {
        bytes: [u8; 10],
        have: usize,
    },
    /// The optional parts, in order, as flags still to skip; `left` counts the bytes still to
    /// skip of the extra field or the header CRC.
    Optional {
        flags: u8,
        xlen: XLen,
        left: usize,
    },
    Body,
    Trailer {
        bytes: [u8; 8],
        have: usize,
    },
    /// Between members: the bytes seen so far of what may be the next one's magic number.
    Between {
        first: Option<u8>,
    },
    Ignoring,
}

/// How much of the extra field's two-byte length has been read.
enum XLen {
    Unread,
    Low(u8),
    Read,
}

const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
const FRESERVED: u8 = 0xe0;

impl Gzip {
    fn new() -> Gzip {
        Gzip {
            stage: GzStage::Fixed {
                bytes: [0; 10],
                have: 0,
            },
            inflate: flate2::Decompress::new(false),
            crc: flate2::Crc::new(),
            members: 0,
        }
    }

    fn ignoring(&self) -> bool {
        matches!(self.stage, GzStage::Ignoring)
    }

    /// Whether the body may end here: after a whole member, or in what follows one.
    fn may_end(&self) -> bool {
        match self.stage {
            GzStage::Between { .. } | GzStage::Ignoring => true,
            // The start of what looked like another member, cut short: trailing bytes.
            GzStage::Fixed { .. } | GzStage::Optional { .. } => self.members > 0,
            GzStage::Body | GzStage::Trailer { .. } => false,
        }
    }

    /// A header that is not gzip: an error in the first member, trailing bytes after one.
    fn not_a_header(&mut self, why: &str) -> Result<Step, DecodeError> {
        if self.members == 0 {
            return Err(corrupt(Coding::Gzip, why));
        }
        self.stage = GzStage::Ignoring;
        Ok((0, 0))
    }

    fn step(&mut self, input: &[u8], out: &mut [u8]) -> Result<Step, DecodeError> {
        match &mut self.stage {
            GzStage::Ignoring => Ok((input.len(), 0)),
            GzStage::Between { first } => {
                let (a, b) = match (*first, input) {
                    (_, []) => return Ok((0, 0)),
                    (None, [a]) if *a == 0x1f => {
                        *first = Some(*a);
                        return Ok((1, 0));
                    }
                    (None, [a, rest @ ..]) => (*a, rest.first().copied()),
                    (Some(a), [b, ..]) => (a, Some(*b)),
                };
                if (a, b) != (0x1f, Some(0x8b)) {
                    self.stage = GzStage::Ignoring;
                    return Ok((0, 0));
                }
                let mut bytes = [0; 10];
                bytes[0] = 0x1f;
                // The first magic byte was either held back (and is now placed) or is in
                // `input`, which the fixed-header stage reads from its start.
                let have = usize::from(first.is_some());
                self.stage = GzStage::Fixed { bytes, have };
                self.step(input, out)
            }
            GzStage::Fixed { bytes, have } => {
                let n = (10 - *have).min(input.len());
                bytes[*have..*have + n].copy_from_slice(&input[..n]);
                *have += n;
                if *have < 10 {
                    return Ok((n, 0));
                }
                let b = *bytes;
                if b[0] != 0x1f || b[1] != 0x8b {
                    return self.not_a_header("no gzip magic number").map(|_| (n, 0));
                }
                if b[2] != 8 || b[3] & FRESERVED != 0 {
                    return self
                        .not_a_header("unknown method or reserved flags")
                        .map(|_| (n, 0));
                }
                self.stage = GzStage::Optional {
                    flags: b[3],
                    xlen: XLen::Unread,
                    left: 0,
                };
                Ok((n, 0))
            }
            GzStage::Optional { flags, xlen, left } => {
                if input.is_empty() {
                    return Ok((0, 0));
                }
                if *flags & FEXTRA != 0 {
                    // XLEN (two bytes, little-endian), then that many bytes, skipped.
                    return Ok(match xlen {
                        XLen::Unread => {
                            *xlen = XLen::Low(input[0]);
                            (1, 0)
                        }
                        XLen::Low(low) => {
                            *left = usize::from(*low) | usize::from(input[0]) << 8;
                            *xlen = XLen::Read;
                            if *left == 0 {
                                *flags &= !FEXTRA;
                            }
                            (1, 0)
                        }
                        XLen::Read => {
                            let n = (*left).min(input.len());
                            *left -= n;
                            if *left == 0 {
                                *flags &= !FEXTRA;
                            }
                            (n, 0)
                        }
                    });
                }
                for field in [FNAME, FCOMMENT] {
                    if *flags & field != 0 {
                        // Zero-terminated; skipped without being kept, whatever its length.
                        return Ok(match input.iter().position(|&c| c == 0) {
                            Some(end) => {
                                *flags &= !field;
                                (end + 1, 0)
                            }
                            None => (input.len(), 0),
                        });
                    }
                }
                if *flags & FHCRC != 0 {
                    // Two bytes of header CRC, not checked (browsers do not check it either).
                    if *left == 0 {
                        *left = 2;
                    }
                    let n = (*left).min(input.len());
                    *left -= n;
                    if *left == 0 {
                        *flags &= !FHCRC;
                    }
                    return Ok((n, 0));
                }
                self.inflate.reset(false);
                self.crc.reset();
                self.stage = GzStage::Body;
                self.step(input, out)
            }
            GzStage::Body => {
                let (before_in, before_out) = (self.inflate.total_in(), self.inflate.total_out());
                let status = self
                    .inflate
                    .decompress(input, out, flate2::FlushDecompress::None)
                    .map_err(|e| corrupt(Coding::Gzip, e))?;
                let used = (self.inflate.total_in() - before_in) as usize;
                let made = (self.inflate.total_out() - before_out) as usize;
                self.crc.update(&out[..made]);
                if status == flate2::Status::StreamEnd {
                    self.stage = GzStage::Trailer {
                        bytes: [0; 8],
                        have: 0,
                    };
                }
                Ok((used, made))
            }
            GzStage::Trailer { bytes, have } => {
                let n = (8 - *have).min(input.len());
                bytes[*have..*have + n].copy_from_slice(&input[..n]);
                *have += n;
                if *have < 8 {
                    return Ok((n, 0));
                }
                let crc = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                let size = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
                if crc != self.crc.sum() || size != self.crc.amount() {
                    return Err(corrupt(Coding::Gzip, "CRC or length check failed"));
                }
                self.members += 1;
                self.stage = GzStage::Between { first: None };
                Ok((n, 0))
            }
        }
    }
}

/// An encoder that compresses chunks and flushes after each, so the client receives bytes as soon
/// as the origin sends them rather than when a compression block fills.
pub struct Encoder(EncoderKind);

enum EncoderKind {
    Gzip(GzipSegments),
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    Brotli(BrotliSegments),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

/// Compression levels: fast ones, since a page is compressed once per visitor rather than once
/// per deploy (nginx defaults gzip to 1; these trade a little size for throughput).
const GZIP_LEVEL: u32 = 4;
/// The per-visitor brotli encoder: each chunk becomes its own catable piece
/// ([`crate::pack::BrotliRun`]), compressed by a fresh encoder, so a paused stream holds no
/// encoder at all. Quality 2 because the encoder's catable mode is not valid at quality 1 (its
/// pieces do not concatenate: `pack`'s tests show it); measured on the 119 KB Cloudflare page in
/// 16 KiB chunks (/tmp experiment, release build, a busy 2-core machine), quality 2 with a 2^16
/// window ran as fast as quality 1 did with a fresh encoder per chunk (80-90 MB/s) and
/// compresses 5.4 times (quality 1: 5.2). Pages a recording answers are not encoded per visitor
/// at all: they are sent from the recording's packed pieces.
const BROTLI_QUALITY: u32 = 2;
/// The window of a per-visitor piece (2^n bytes): no larger than the packed pieces' window the
/// stream declares; a larger one only costs time to set up.
const BROTLI_PIECE_WINDOW: u32 = 16;
const ZSTD_LEVEL: i32 = 3;
/// zstd's window (2^n bytes): the level-3 default is 2^21 and zstd allocates it per stream.
const ZSTD_WINDOW_LOG: u32 = 17;

/// A gzip member written as independent raw-deflate segments, one per chunk. Each chunk is
/// compressed by a fresh (reset) compressor and ends with a sync flush, which leaves the stream
/// byte-aligned with no final block; segments put one after another are therefore one valid
/// deflate stream, whose matches simply never reach back before their own segment (pigz writes
/// blocks the same way). Between chunks a stream holds only the CRC and length, not a compressor
/// with its 300 KiB of windows and tables: the compressor is one per runtime thread, reused.
struct GzipSegments {
    /// CRC-32 and length of everything sent so far.
    crc: u32,
    len: u64,
    header_sent: bool,
}

thread_local! {
    /// One raw-deflate compressor per thread, reset before each segment. A segment is compressed
    /// in one synchronous call, so no two streams ever share it at once.
    static DEFLATE: RefCell<flate2::Compress> =
        RefCell::new(flate2::Compress::new(flate2::Compression::new(GZIP_LEVEL), false));
}

impl GzipSegments {
    fn segment(&mut self, chunk: &[u8], last: bool) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(chunk.len() / 2 + 64);
        if !self.header_sent {
            out.extend_from_slice(&GZIP_HEADER);
            self.header_sent = true;
        }
        let mut h = crc32fast::Hasher::new_with_initial(self.crc);
        h.update(chunk);
        self.crc = h.finalize();
        self.len += chunk.len() as u64;
        let flush = if last {
            flate2::FlushCompress::Finish
        } else {
            flate2::FlushCompress::Sync
        };
        DEFLATE.with(|c| {
            let mut c = c.borrow_mut();
            c.reset();
            let start = c.total_in();
            loop {
                out.reserve(chunk.len() / 2 + 64);
                let used = (c.total_in() - start) as usize;
                let status = c
                    .compress_vec(&chunk[used..], &mut out, flush)
                    .map_err(std::io::Error::other)?;
                let done = (c.total_in() - start) as usize == chunk.len();
                // A flush is complete once it left spare room in the output.
                if done && (status == flate2::Status::StreamEnd || out.len() < out.capacity()) {
                    break;
                }
            }
            Ok::<_, std::io::Error>(())
        })?;
        if last {
            out.extend_from_slice(&self.crc.to_le_bytes());
            out.extend_from_slice(&(self.len as u32).to_le_bytes());
        }
        Ok(out)
    }

    fn header(&mut self, out: &mut Vec<u8>) {
        if !self.header_sent {
            out.extend_from_slice(&GZIP_HEADER);
            self.header_sent = true;
        }
    }
}

/// A brotli stream written as pieces that each start and end on a byte boundary and refer to
/// nothing before them (the encoder's catable, bare-stream mode; see [`crate::pack`]): the
/// stream's header (declaring the packed pieces' window, the larger), one piece per chunk or
/// the packed pieces of a recording with the visitor's ID stored between them, and a last
/// empty meta-block. Like [`GzipSegments`], nothing is held between chunks.
struct BrotliSegments {
    header_sent: bool,
}

impl BrotliSegments {
    fn header(&mut self, out: &mut Vec<u8>) {
        if !self.header_sent {
            out.extend_from_slice(&crate::pack::brotli_header(crate::pack::PACK_BROTLI_WINDOW));
            self.header_sent = true;
        }
    }

    fn write(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.header(&mut out);
        if !chunk.is_empty() {
            let mut run =
                crate::pack::BrotliRun::new(BROTLI_QUALITY, BROTLI_PIECE_WINDOW, Some(chunk.len()));
            out.extend_from_slice(&run.piece(chunk, true));
        }
        out
    }

    fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.header(&mut out);
        out.push(crate::pack::BROTLI_END);
        out
    }
}

impl Encoder {
    pub fn new(coding: Coding) -> Encoder {
        let level = flate2::Compression::new(GZIP_LEVEL);
        Encoder(match coding {
            Coding::Gzip => EncoderKind::Gzip(GzipSegments {
                crc: 0,
                len: 0,
                header_sent: false,
            }),
            Coding::Deflate => {
                EncoderKind::Deflate(flate2::write::ZlibEncoder::new(Vec::new(), level))
            }
            Coding::Brotli => EncoderKind::Brotli(BrotliSegments { header_sent: false }),
            Coding::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)
                    .expect("zstd encoder allocation");
                e.window_log(ZSTD_WINDOW_LOG)
                    .expect("a window log zstd accepts");
                EncoderKind::Zstd(e)
            }
        })
    }

    /// Compresses one chunk and flushes; returns the compressed bytes ready to send.
    pub fn write(&mut self, chunk: &[u8]) -> std::io::Result<Bytes> {
        fn run<W: Write>(w: &mut W, chunk: &[u8]) -> std::io::Result<()> {
            w.write_all(chunk)?;
            w.flush()
        }
        let out = match &mut self.0 {
            EncoderKind::Gzip(g) => return g.segment(chunk, false).map(Bytes::from),
            EncoderKind::Deflate(e) => {
                run(e, chunk)?;
                e.get_mut()
            }
            EncoderKind::Brotli(e) => return Ok(e.write(chunk).into()),
            EncoderKind::Zstd(e) => {
                run(e, chunk)?;
                e.get_mut()
            }
        };
        Ok(std::mem::take(out).into())
    }

    /// The pack this encoder sends recorded pieces from ([`Encoder::packed`]): gzip and brotli.
    pub fn takes_packed(&self) -> Option<PackKind> {
        match self.0 {
            EncoderKind::Gzip(_) => Some(PackKind::Gzip),
            EncoderKind::Brotli(_) => Some(PackKind::Brotli),
            _ => None,
        }
    }

    /// Sends pieces compressed in advance, with `id_of(i)` in slot `i`: stored, not compressed,
    /// where a piece is a slot (a few dozen bytes); inside a static piece already compressed as a
    /// copy, and only counted in the gzip CRC. Only for an encoder that
    /// [`Encoder::takes_packed`], with pieces of that kind; the stream may go on with
    /// [`Encoder::write`] and ends with [`Encoder::finish`].
    pub fn packed<'a>(
        &mut self,
        pieces: &[Piece],
        id_of: impl Fn(usize) -> &'a [u8] + Copy,
    ) -> Bytes {
        let mut out = Vec::new();
        match &mut self.0 {
            EncoderKind::Gzip(g) => {
                g.header(&mut out);
                for piece in pieces {
                    match piece {
                        Piece::Static(p) => {
                            out.extend_from_slice(&p.data);
                            let crc = p.crc_with(id_of);
                            g.crc = crate::pack::crc32_combine(g.crc, crc, p.shift);
                            g.len += p.len;
                        }
                        Piece::Slot(i) => {
                            let id = id_of(*i);
                            if id.is_empty() {
                                continue;
                            }
                            crate::pack::stored_block(id, &mut out);
                            let mut h = crc32fast::Hasher::new_with_initial(g.crc);
                            h.update(id);
                            g.crc = h.finalize();
                            g.len += id.len() as u64;
                        }
                    }
                }
            }
            EncoderKind::Brotli(b) => {
                b.header(&mut out);
                for piece in pieces {
                    match piece {
                        Piece::Static(p) => out.extend_from_slice(&p.data),
                        Piece::Slot(i) => crate::pack::brotli_stored(id_of(*i), &mut out),
                    }
                }
            }
            _ => unreachable!("packed pieces for an encoder that does not take them"),
        }
        out.into()
    }

    /// Ends the compressed stream and returns its last bytes.
    pub fn finish(&mut self) -> std::io::Result<Bytes> {
        let out = match &mut self.0 {
            EncoderKind::Gzip(g) => return g.segment(&[], true).map(Bytes::from),
            EncoderKind::Deflate(e) => {
                e.try_finish()?;
                e.get_mut()
            }
            EncoderKind::Brotli(e) => return Ok(e.finish().into()),
            EncoderKind::Zstd(e) => {
                e.do_finish()?;
                e.get_mut()
            }
        };
        Ok(std::mem::take(out).into())
    }
}

#[cfg(test)]
mod tests;
