//! Unit tests of the codings: round trips at every chunking, the gzip and deflate variants
//! browsers accept, truncation, bounded slices and the bomb cap.

use std::io::{Read, Write};

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

/// Decodes `input` fed in `chunk`-sized pieces, checking that no slice exceeds [`SLICE`].
fn decode(coding: Coding, input: &[u8], chunk: usize) -> Result<Vec<u8>, DecodeError> {
    let mut d = Decoder::new(coding);
    let mut out = Vec::new();
    for c in input.chunks(chunk.max(1)) {
        let mut rest = c;
        loop {
            let slice = d.decode(&mut rest)?;
            assert!(
                slice.len() <= SLICE,
                "{coding:?}: a slice of {}",
                slice.len()
            );
            if slice.is_empty() {
                assert!(rest.is_empty(), "{coding:?}: empty slice with input left");
                break;
            }
            out.extend_from_slice(&slice);
        }
    }
    d.finish()?;
    Ok(out)
}

/// Decodes as [`decode`] does, parking the decoder after every piece it drains; returns the page
/// and how many times it parked.
fn decode_parking(
    coding: Coding,
    input: &[u8],
    chunk: usize,
) -> Result<(Vec<u8>, usize), DecodeError> {
    let mut d = Decoder::new(coding);
    let (mut out, mut parked) = (Vec::new(), 0);
    for c in input.chunks(chunk.max(1)) {
        let mut rest = c;
        loop {
            let slice = d.decode(&mut rest)?;
            if slice.is_empty() {
                break;
            }
            out.extend_from_slice(&slice);
        }
        if d.park() {
            parked += 1;
            assert!(matches!(d.state, State::Parked));
        }
    }
    d.finish()?;
    Ok((out, parked))
}

/// The brotli an origin sends at ngx_brotli's defaults: quality 6, a 512 KiB window.
fn brotli_as_nginx(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = brotli::CompressorWriter::new(&mut out, 4096, 6, 19);
    w.write_all(data).unwrap();
    drop(w);
    out
}

#[test]
fn a_parked_decoder_goes_on_exactly_where_it_stopped() {
    let input = page();
    for coding in ALL {
        let encoded = encode(coding, &input, 1000);
        for chunk in [1, 333, 4096] {
            let (out, parked) = decode_parking(coding, &encoded, chunk).unwrap();
            assert_eq!(out, input, "{coding:?} chunk {chunk}");
            assert!(parked > 0, "{coding:?} chunk {chunk}: never parked");
        }
    }
    // An origin's own encoders, with windows and back-references across the pause.
    let big: Vec<u8> = page().repeat(3);
    for (coding, encoded) in [
        (Coding::Brotli, brotli_as_nginx(&big)),
        (Coding::Gzip, gzip(&big)),
    ] {
        assert!(
            encoded.len() < PARK_COMPRESSED,
            "{coding:?}: {}",
            encoded.len()
        );
        let (out, parked) = decode_parking(coding, &encoded, encoded.len() / 7).unwrap();
        assert_eq!(out, big, "{coding:?}");
        assert!(parked > 0, "{coding:?}");
    }
}

#[test]
fn a_parked_decoder_still_knows_a_truncated_stream() {
    let input = page();
    for coding in ALL {
        let encoded = encode(coding, &input, 1000);
        let cut = &encoded[..encoded.len() / 2];
        let mut d = Decoder::new(coding);
        let mut rest = cut;
        while !d.decode(&mut rest).unwrap().is_empty() {}
        assert!(d.park(), "{coding:?}");
        let e = d.finish().unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::Truncated, "{coding:?}");
    }
}

#[test]
fn a_decoder_past_its_replay_bounds_keeps_its_state() {
    // Incompressible bytes: past PARK_COMPRESSED of input the decoder stops keeping a replay.
    let mut noise = Vec::new();
    let mut x: u32 = 1;
    for _ in 0..(PARK_COMPRESSED + 4096) {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        noise.push((x >> 16) as u8);
    }
    let encoded = gzip(&noise);
    let mut d = Decoder::new(Coding::Gzip);
    let mut rest = &encoded[..];
    let mut out = Vec::new();
    loop {
        let slice = d.decode(&mut rest).unwrap();
        if slice.is_empty() {
            break;
        }
        out.extend_from_slice(&slice);
    }
    assert_eq!(out, noise);
    assert!(!d.can_park());
    assert!(!d.park());
    // A page that decodes to more than PARK_DECODED from a few compressed bytes.
    let zeros = gzip(&vec![0u8; PARK_DECODED as usize + 1]);
    let mut d = Decoder::new(Coding::Gzip);
    let mut rest = &zeros[..];
    while !d.decode(&mut rest).unwrap().is_empty() {}
    assert!(!d.park());
    // A finished stream has nothing to give back.
    let mut d = Decoder::new(Coding::Brotli);
    let small = brotli_as_nginx(b"<p>done</p>");
    let mut rest = &small[..];
    while !d.decode(&mut rest).unwrap().is_empty() {}
    assert!(!d.park());
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn every_coding_round_trips_in_any_chunking() {
    let input = page();
    for coding in ALL {
        for chunk in [1, 7, 4096, usize::MAX] {
            // Flushing per byte would make the encoded form huge and the test slow; the encoder
            // sees realistic chunks, the decoder every split.
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
fn the_gzip_encoder_writes_one_member_that_standard_decoders_read() {
    // The segments must form one valid member: flate2's single-member decoder reads all of it.
    let input = page();
    let encoded = encode(Coding::Gzip, &input, 1000);
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&encoded[..])
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out, input);
}

#[test]
fn flushing_makes_bytes_available_per_chunk() {
    for coding in ALL {
        let mut e = Encoder::new(coding);
        let first = e
            .write(b"<a href=\"https://x.example/\">first</a>")
            .unwrap();
        let mut d = Decoder::new(coding);
        let decoded = d.decode(&mut &first[..]).unwrap();
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
        let e = decode(coding, cut, 100).expect_err("truncated stream accepted");
        assert_eq!(e.kind, DecodeErrorKind::Truncated, "{coding:?}: {e}");
    }
}

#[test]
fn gzip_members_follow_one_another() {
    let mut body = gzip(b"<p>first member</p>");
    body.extend(gzip(b"<p>second member</p>"));
    for chunk in [1, 3, 1000] {
        assert_eq!(
            decode(Coding::Gzip, &body, chunk).unwrap(),
            b"<p>first member</p><p>second member</p>",
            "chunk {chunk}"
        );
    }
}

#[test]
fn bytes_after_the_last_gzip_member_are_ignored() {
    for trailer in [
        &b"\n"[..],
        b"\r\n",
        b"\x1f",
        b"\x1f\x8b",
        b"garbage",
        b"\0\0\0\0",
    ] {
        let mut body = gzip(b"<p>page</p>");
        body.extend_from_slice(trailer);
        for chunk in [1, 2, 1000] {
            assert_eq!(
                decode(Coding::Gzip, &body, chunk).unwrap(),
                b"<p>page</p>",
                "trailer {trailer:?} chunk {chunk}"
            );
        }
    }
}

#[test]
fn gzip_header_fields_are_skipped() {
    let mut e = flate2::GzBuilder::new()
        .filename("page.html")
        .comment("a comment")
        .extra(vec![1, 2, 3, 4, 5])
        .write(Vec::new(), flate2::Compression::default());
    e.write_all(b"<p>page</p>").unwrap();
    let mut body = e.finish().unwrap();
    // FHCRC is not something flate2 writes: set the flag and insert two bytes by hand.
    body[3] |= FHCRC;
    // Fixed part, XLEN, the extra field, "page.html\0", "a comment\0".
    let header_end = 10 + 2 + 5 + 10 + 10;
    body.splice(header_end..header_end, [0xaa, 0xbb]);
    for chunk in [1, 2, 5, 1000] {
        assert_eq!(
            decode(Coding::Gzip, &body, chunk).unwrap(),
            b"<p>page</p>",
            "chunk {chunk}"
        );
    }
}

#[test]
fn a_body_that_is_not_gzip_is_an_error_not_an_empty_page() {
    let e = decode(Coding::Gzip, b"<html>not compressed</html>", 1000).unwrap_err();
    assert_eq!(e.kind, DecodeErrorKind::Corrupt, "{e}");
}

#[test]
fn a_corrupt_gzip_checksum_is_an_error() {
    let mut body = gzip(b"<p>page</p>");
    let n = body.len();
    body[n - 8] ^= 1;
    assert_eq!(
        decode(Coding::Gzip, &body, 1000).unwrap_err().kind,
        DecodeErrorKind::Corrupt
    );
}

#[test]
fn deflate_is_read_raw_as_well_as_zlib_wrapped() {
    let input = page();
    let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    raw.write_all(&input).unwrap();
    let raw = raw.finish().unwrap();
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    zlib.write_all(&input).unwrap();
    let zlib = zlib.finish().unwrap();
    for (what, body) in [("raw", raw), ("zlib", zlib)] {
        for chunk in [1, 2, 1000] {
            assert_eq!(
                decode(Coding::Deflate, &body, chunk).unwrap(),
                input,
                "{what} chunk {chunk}"
            );
        }
    }
}

#[test]
fn a_bomb_fails_after_a_bounded_amount_of_output() {
    // 64 MiB of zeros in a few kilobytes of brotli, and in 64 KiB of gzip (deflate's best
    // ratio is about 1000:1).
    let zeros = vec![0u8; 1 << 20];
    let mut br = brotli::CompressorWriter::new(Vec::new(), 4096, 1, 24);
    for _ in 0..64 {
        br.write_all(&zeros).unwrap();
    }
    let br = br.into_inner();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for _ in 0..64 {
        gz.write_all(&zeros).unwrap();
    }
    let gz = gz.finish().unwrap();
    for (coding, body) in [(Coding::Brotli, br), (Coding::Gzip, gz)] {
        let mut d = Decoder::new(coding);
        let mut rest = &body[..];
        let error = loop {
            match d.decode(&mut rest) {
                Ok(s) if s.is_empty() => panic!("{coding:?}: the whole bomb was decoded"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!(error.kind, DecodeErrorKind::Bomb, "{coding:?}: {error}");
        assert!(
            d.decoded() <= BOMB_FLOOR + SLICE as u64,
            "{coding:?}: decoded {} before stopping",
            d.decoded()
        );
    }
}

#[test]
fn a_large_page_that_compresses_normally_is_not_a_bomb() {
    // 24 MiB of varied HTML (past the floor) at an ordinary ratio decodes in full.
    let mut input = Vec::new();
    let mut i = 0u64;
    while input.len() < 24 << 20 {
        i += 1;
        input.extend_from_slice(
            format!(
                "<p id=\"{i}\">{:x} <a href=\"/{}\">x</a></p>\n",
                i * 2654435761,
                i % 977
            )
            .as_bytes(),
        );
    }
    let encoded = gzip(&input);
    assert!(
        encoded.len() as u64 * MAX_RATIO > input.len() as u64,
        "the test page compresses too well"
    );
    assert_eq!(
        decode(Coding::Gzip, &encoded, 64 * 1024).unwrap().len(),
        input.len()
    );
}

#[test]
fn windows_larger_than_http_allows_are_refused() {
    // A zstd frame that asks for a 32 MiB window (RFC 9659 allows 8 MiB).
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    e.window_log(25).unwrap();
    e.long_distance_matching(true).unwrap();
    e.include_contentsize(false).unwrap();
    e.write_all(&page()).unwrap();
    let body = e.finish().unwrap();
    let error = decode(Coding::Zstd, &body, 1000).unwrap_err();
    assert_eq!(error.kind, DecodeErrorKind::Corrupt, "{error}");
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

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the bytes and however they are split, every decoder gives back bounded
        /// slices or a typed error: never a panic, never a hang.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(
            bytes in proptest::collection::vec(any::<u8>(), 0..3000),
            chunk in 1usize..300,
            which in 0usize..4,
        ) {
            let _ = decode(ALL[which], &bytes, chunk);
        }

        /// Gzip members one after another, then any bytes that do not start another member,
        /// decode to the members' contents at every split.
        #[test]
        fn gzip_members_and_trailing_bytes_decode_to_the_members(
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..400), 1..4),
            trailer in proptest::collection::vec(any::<u8>(), 0..12),
            chunk in 1usize..200,
        ) {
            prop_assume!(!trailer.starts_with(&[0x1f, 0x8b]));
            let mut body = Vec::new();
            for p in &parts {
                body.extend(gzip(p));
            }
            body.extend_from_slice(&trailer);
            prop_assert_eq!(decode(Coding::Gzip, &body, chunk).unwrap(), parts.concat());
        }

        /// Parking between pieces changes nothing: members, trailing bytes and all.
        #[test]
        fn parking_between_pieces_changes_nothing(
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..400), 1..4),
            trailer in proptest::collection::vec(any::<u8>(), 0..12),
            chunk in 1usize..200,
            which in 0usize..4,
        ) {
            let coding = ALL[which];
            let mut body = Vec::new();
            if coding == Coding::Gzip {
                prop_assume!(!trailer.starts_with(&[0x1f, 0x8b]));
                for p in &parts {
                    body.extend(gzip(p));
                }
                body.extend_from_slice(&trailer);
            } else {
                body = encode(coding, &parts.concat(), 97);
            }
            let (out, _) = decode_parking(coding, &body, chunk).unwrap();
            prop_assert_eq!(out, parts.concat());
        }

        /// Raw and zlib-wrapped deflate both decode under `deflate`, at every split.
        #[test]
        fn deflate_raw_or_wrapped_decodes(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            chunk in 1usize..200,
        ) {
            let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            raw.write_all(&data).unwrap();
            let raw = raw.finish().unwrap();
            let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            zlib.write_all(&data).unwrap();
            let zlib = zlib.finish().unwrap();
            prop_assert_eq!(&decode(Coding::Deflate, &raw, chunk).unwrap(), &data);
            prop_assert_eq!(&decode(Coding::Deflate, &zlib, chunk).unwrap(), &data);
        }
    }
}

#[test]
fn the_coding_to_compress_in_follows_the_clients_weights() {
    let pick = |fields: &[&str]| {
        let values: Vec<http::HeaderValue> = fields
            .iter()
            .map(|f| http::HeaderValue::from_str(f).unwrap())
            .collect();
        preferred(values.iter())
    };
    let cases: &[(&[&str], Option<Coding>)] = &[
        (&[], None),
        (&[""], None),
        (&["identity"], None),
        (&["gzip"], Some(Coding::Gzip)),
        (&["x-gzip"], Some(Coding::Gzip)),
        (&["GZIP, Br"], Some(Coding::Brotli)),
        (&["gzip, deflate, br, zstd"], Some(Coding::Brotli)),
        (&["gzip", "br"], Some(Coding::Brotli)),
        (&["br;q=0.5, gzip"], Some(Coding::Gzip)),
        (&["br;q=0, gzip;q=0.1"], Some(Coding::Gzip)),
        (&["br;q=0, gzip;q=0"], None),
        (&["gzip;q=0, identity;q=0"], None),
        (&["*"], Some(Coding::Brotli)),
        (&["*;q=0.5, br;q=0"], Some(Coding::Gzip)),
        (&["*;q=0"], None),
        (&["deflate, zstd"], None),
        (&["gzip;q=1.0, br;q=0.999"], Some(Coding::Gzip)),
        (&["gzip;q=2"], None),
        (&["gzip;q=abc"], None),
        (&["gzip;q=0.5, gzip;q=0"], Some(Coding::Gzip)),
        (&["br ; q=0.8 , gzip ; q=0.9"], Some(Coding::Gzip)),
    ];
    for (fields, want) in cases {
        assert_eq!(pick(fields), *want, "{fields:?}");
    }
}
