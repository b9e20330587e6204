//! How a page's bytes are to be read, decided the way the HTML standard's encoding sniffing
//! algorithm decides it: a byte order mark, else the `Content-Type` charset, else a `<meta>` in
//! the first 1024 bytes (the prescan), else the default. Pure byte work: no lol_html, no I/O.
//!
//! The answer carries how sure it is. Only the default is a guess: a browser may pick another
//! legacy encoding for the same bytes (by locale, or by looking at the content), so a link whose
//! text is not ASCII must not be read with it. ASCII reads the same in every encoding the
//! rewriter accepts, so a guess never matters for ASCII links.

use encoding_rs::{Encoding, UTF_16BE, UTF_16LE, UTF_8, WINDOWS_1252, X_USER_DEFINED};

/// How the bytes of a page are to be read, as far as its `Content-Type` says, before the first
/// byte arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// The header named an encoding lol_html can parse. A `<meta>` cannot override it; only a
    /// byte order mark can.
    Declared(&'static Encoding),
    /// An HTML page whose header names no charset: a byte order mark, else the page's `<meta>`,
    /// else the default decides (see [`sniff`]).
    Sniffed,
    /// An XHTML page whose header names no charset. The XML parser reads a byte order mark, the
    /// XML declaration or UTF-8, never a `<meta>`; the rewriter does not read XML declarations,
    /// so anything but a byte order mark is a guess.
    Xml,
}

/// The header named an encoding that is not ASCII-compatible (UTF-16, ISO-2022-JP) or that no
/// browser knows: rewriting could corrupt it, so the page passes through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedCharset(pub String);

/// Reads the type and the `charset` parameter of a `Content-Type` value.
pub fn charset_of(content_type: &str) -> Result<Charset, UnsupportedCharset> {
    let label = content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| value.trim().trim_matches('"'))
    });
    let Some(label) = label else {
        let mime = content_type.split(';').next().unwrap_or_default().trim();
        return Ok(if mime.eq_ignore_ascii_case("application/xhtml+xml") {
            Charset::Xml
        } else {
            Charset::Sniffed
        });
    };
    Encoding::for_label(label.as_bytes())
        .filter(|e| e.is_ascii_compatible())
        .map(Charset::Declared)
        .ok_or_else(|| UnsupportedCharset(label.to_owned()))
}

/// How sure the rewriter is of a page's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confidence {
    /// A byte order mark, the header or the page's own `<meta>` named it: every browser reads
    /// the page with it.
    Known,
    /// Nothing named it; the default is a guess that a browser may not share.
    Guessed,
}

/// What sniffing decided for one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Rewrite the page, reading its bytes with `encoding` (always ASCII-compatible).
    Rewrite {
        encoding: &'static Encoding,
        confidence: Confidence,
        /// Where the `<meta>` that named the encoding ends (0 when none did). No tag that starts
        /// before it may change: a longer tag would push the `<meta>` further in, possibly past
        /// the 1024 bytes a browser prescans, and the browser would read the page differently.
        declared_at: usize,
    },
    /// A byte order mark or a `<meta>` names an encoding that is not ASCII-compatible
    /// (UTF-16, ISO-2022-JP, the replacement encoding): the page passes through untouched.
    PassThrough,
}

/// The bytes the prescan looks at, as the HTML standard advises.
pub const PRESCAN_BYTES: usize = 1024;

const UTF_8_BOM: &[u8] = b"\xEF\xBB\xBF";
const UTF_16BE_BOM: &[u8] = b"\xFE\xFF";
const UTF_16LE_BOM: &[u8] = b"\xFF\xFE";

/// Decides how to read a page from its first bytes, `head` (all of the page so far; `ended`
/// when there is no more). `None` means more bytes are needed first: at most 3 (for a byte order
/// mark), or for an HTML page that declares no charset, up to its `<meta>` naming one, its first
/// link or form, or [`PRESCAN_BYTES`], whichever comes first.
pub fn sniff(charset: Charset, head: &[u8], ended: bool) -> Option<Reading> {
    let known = |encoding| Reading::Rewrite {
        encoding,
        confidence: Confidence::Known,
        declared_at: 0,
    };
    let guessed = |encoding| Reading::Rewrite {
        encoding,
        confidence: Confidence::Guessed,
        declared_at: 0,
    };
    // A byte order mark beats the header and the page.
    if head.starts_with(UTF_8_BOM) {
        return Some(known(UTF_8));
    }
    if head.starts_with(UTF_16BE_BOM) || head.starts_with(UTF_16LE_BOM) {
        return Some(Reading::PassThrough);
    }
    let may_become_bom = [UTF_8_BOM, UTF_16BE_BOM, UTF_16LE_BOM]
        .iter()
        .any(|bom| head.len() < bom.len() && bom.starts_with(head));
    if may_become_bom && !ended {
        return None;
    }
    match charset {
        Charset::Declared(encoding) => Some(known(encoding)),
        Charset::Xml => Some(guessed(UTF_8)),
        Charset::Sniffed => {
            let window = &head[..head.len().min(PRESCAN_BYTES)];
            match prescan(window) {
                Prescan::Declared(encoding, _) if !encoding.is_ascii_compatible() => {
                    Some(Reading::PassThrough)
                }
                Prescan::Declared(encoding, end) => Some(Reading::Rewrite {
                    encoding,
                    confidence: Confidence::Known,
                    declared_at: end,
                }),
                // A link (or form) before any declaration: the page is not held back for a
                // `<meta>` that may follow (a page that streams its first link must get it
                // through); the encoding is a guess, which is safe for every link.
                Prescan::Link(_) => Some(guessed(WINDOWS_1252)),
                // Out of bytes: final once the prescan had all it will ever look at.
                Prescan::RanOut if ended || head.len() >= PRESCAN_BYTES => {
                    Some(guessed(WINDOWS_1252))
                }
                Prescan::RanOut => None,
            }
        }
    }
}

/// What the prescan found first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prescan {
    /// A declaration of this encoding, ending at this offset.
    Declared(&'static Encoding, usize),
    /// The start tag of an `a`, `area` or `form`, at this offset: something the rewriter may
    /// change, before any declaration.
    Link(usize),
    /// Out of bytes without either; more bytes could change the answer.
    RanOut,
}

/// The HTML standard's "prescan a byte stream to determine its encoding" over `b`, which also
/// stops at the first start tag the rewriter may change (see [`Prescan`]). An answer other than
/// `RanOut` is final: it comes from the first six bytes or from a tag read up to its end.
///
/// The standard's last step, the XML declaration's encoding when there is no `<meta>`, is left
/// out: such a page is read as a guess, which is safe whatever the declaration says.
pub fn prescan(b: &[u8]) -> Prescan {
    if b.starts_with(b"<\0?\0x\0") {
        return Prescan::Declared(UTF_16LE, 6);
    }
    if b.starts_with(b"\0<\0?\0x") {
        return Prescan::Declared(UTF_16BE, 6);
    }
    match scan(b) {
        Some(found) => found,
        None => Prescan::RanOut,
    }
}

/// The prescan's loop; `None` when it runs out of bytes.
fn scan(b: &[u8]) -> Option<Prescan> {
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"<!--") {
            // To the first `>` preceded by `--`; those may be the opening ones (`<!-->`).
            i = i + 2 + find(&b[i + 2..], b"-->")? + 2;
        } else if rest.len() >= 6
            && rest[..5].eq_ignore_ascii_case(b"<meta")
            && (is_space(rest[5]) || rest[5] == b'/')
        {
            i += 6;
            let (found, at) = meta(b, i)?;
            i = at;
            if let Some(encoding) = found {
                return Some(Prescan::Declared(encoding, i + 1));
            }
        } else if rest.len() >= 2 && rest[0] == b'<' && rest[1].is_ascii_alphabetic()
            || rest.len() >= 3 && rest.starts_with(b"</") && rest[2].is_ascii_alphabetic()
        {
            // A tag name ends where the tokenizer ends it (`<a/href=x>` is an `a`).
            let name_end = rest
                .iter()
                .position(|&c| is_space(c) || c == b'>' || c == b'/');
            let is_link = |name: &[u8]| {
                [&b"a"[..], b"area", b"form"]
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n))
            };
            if name_end.is_some_and(|end| is_link(&rest[1..end])) {
                return Some(Prescan::Link(i));
            }
            i += rest.iter().position(|&c| is_space(c) || c == b'>')?;
            loop {
                let (attribute, at) = attribute(b, i)?;
                i = at;
                if attribute.is_none() {
                    break;
                }
            }
        } else if rest.starts_with(b"<!") || rest.starts_with(b"</") || rest.starts_with(b"<?") {
            i += 1 + rest[1..].iter().position(|&c| c == b'>')?;
        }
        i += 1;
    }
    None
}

/// The attributes of a `<meta>` from `i` (just after `<meta` and a space or `/`): the encoding
/// it declares, if it is a declaration, and the position of its `>`; `None` when out of bytes.
fn meta(b: &[u8], mut i: usize) -> Option<(Option<&'static Encoding>, usize)> {
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut got_pragma = false;
    // `None`: no `charset` or `content` seen; `Some(true)`: from `content`, which needs
    // `http-equiv="content-type"` too.
    let mut need_pragma: Option<bool> = None;
    // `None`: not set; `Some(None)`: set to a label that names no encoding.
    let mut charset: Option<Option<&'static Encoding>> = None;
    loop {
        let (found, at) = attribute(b, i)?;
        i = at;
        let Some((name, value)) = found else {
            break;
        };
        if seen.contains(&name) {
            continue;
        }
        match name.as_slice() {
            b"http-equiv" => got_pragma |= value == b"content-type",
            b"content" if charset.is_none() => {
                if let Some(encoding) = from_content(&value) {
                    charset = Some(Some(encoding));
                    need_pragma = Some(true);
                }
            }
            b"charset" => {
                charset = Some(Encoding::for_label(&value));
                need_pragma = Some(false);
            }
            _ => {}
        }
        seen.push(name);
    }
    let declared = match (need_pragma, charset) {
        (Some(false), Some(Some(encoding))) => Some(encoding),
        (Some(true), Some(Some(encoding))) if got_pragma => Some(encoding),
        _ => None,
    };
    // A page cannot declare itself UTF-16 (its bytes were just read as ASCII), and
    // x-user-defined is for fonts, not pages.
    let declared = declared.map(|e| match e {
        e if e == UTF_16BE || e == UTF_16LE => UTF_8,
        e if e == X_USER_DEFINED => WINDOWS_1252,
        e => e,
    });
    Some((declared, i))
}

/// An attribute's name and value as the prescan reads them (ASCII lower-cased).
type Attribute = (Vec<u8>, Vec<u8>);

/// The standard's "get an attribute" from `i`: `(Some((name, value)), position after it)`,
/// `(None, position of the >)` when the tag ends, `None` when out of bytes. Names and values are
/// lower-cased (ASCII), as the standard does.
fn attribute(b: &[u8], mut i: usize) -> Option<(Option<Attribute>, usize)> {
    while is_space(*b.get(i)?) || b[i] == b'/' {
        i += 1;
    }
    if b[i] == b'>' {
        return Some((None, i));
    }
    let mut name = Vec::new();
    let mut value = Vec::new();
    loop {
        match *b.get(i)? {
            b'=' if !name.is_empty() => {
                i += 1;
                break;
            }
            c if is_space(c) => {
                while is_space(*b.get(i)?) {
                    i += 1;
                }
                if b[i] != b'=' {
                    return Some((Some((name, value)), i));
                }
                i += 1;
                break;
            }
            b'/' | b'>' => return Some((Some((name, value)), i)),
            c => name.push(c.to_ascii_lowercase()),
        }
        i += 1;
    }
    while is_space(*b.get(i)?) {
        i += 1;
    }
    match b[i] {
        quote @ (b'"' | b'\'') => loop {
            i += 1;
            match *b.get(i)? {
                c if c == quote => return Some((Some((name, value)), i + 1)),
                c => value.push(c.to_ascii_lowercase()),
            }
        },
        b'>' => return Some((Some((name, value)), i)),
        c => {
            value.push(c.to_ascii_lowercase());
            i += 1;
        }
    }
    loop {
        match *b.get(i)? {
            c if is_space(c) || c == b'>' => return Some((Some((name, value)), i)),
            c => value.push(c.to_ascii_lowercase()),
        }
        i += 1;
    }
}

/// The standard's "extracting a character encoding from a meta element", on a `content` value.
fn from_content(s: &[u8]) -> Option<&'static Encoding> {
    let mut i = 0;
    loop {
        i += find_ignore_case(&s[i..], b"charset")? + b"charset".len();
        while s.get(i).is_some_and(|&c| is_space(c)) {
            i += 1;
        }
        if s.get(i) != Some(&b'=') {
            continue;
        }
        i += 1;
        while s.get(i).is_some_and(|&c| is_space(c)) {
            i += 1;
        }
        let rest = &s[i..];
        return match rest.first()? {
            &quote @ (b'"' | b'\'') => {
                let end = rest[1..].iter().position(|&c| c == quote)?;
                Encoding::for_label(&rest[1..1 + end])
            }
            _ => {
                let end = rest
                    .iter()
                    .position(|&c| is_space(c) || c == b';')
                    .unwrap_or(rest.len());
                Encoding::for_label(&rest[..end])
            }
        };
    }
}

/// ASCII whitespace as the prescan knows it (tab, LF, FF, CR, space).
fn is_space(c: u8) -> bool {
    matches!(c, b'\t' | b'\n' | 0x0C | b'\r' | b' ')
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn find_ignore_case(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use encoding_rs::{EUC_KR, ISO_2022_JP, REPLACEMENT, SHIFT_JIS, WINDOWS_1251};

    #[test]
    fn charset_from_content_type() {
        assert_eq!(charset_of("text/html"), Ok(Charset::Sniffed));
        assert_eq!(charset_of("Application/XHTML+XML"), Ok(Charset::Xml));
        assert_eq!(
            charset_of("text/html; charset=Shift_JIS"),
            Ok(Charset::Declared(SHIFT_JIS))
        );
        assert_eq!(
            charset_of("text/html;CHARSET=\"windows-1252\""),
            Ok(Charset::Declared(WINDOWS_1252))
        );
        assert!(charset_of("text/html; charset=utf-16").is_err());
        assert!(charset_of("text/html; charset=iso-2022-jp").is_err());
        assert!(charset_of("text/html; charset=klingon").is_err());
    }

    fn decided(charset: Charset, page: &[u8]) -> Reading {
        sniff(charset, page, true).expect("a whole page always decides")
    }

    fn rewrite(encoding: &'static Encoding, confidence: Confidence, at: usize) -> Reading {
        Reading::Rewrite {
            encoding,
            confidence,
            declared_at: at,
        }
    }

    #[test]
    fn a_byte_order_mark_beats_the_header_and_the_meta() {
        let page = b"\xEF\xBB\xBF<meta charset=windows-1252><a href=x>";
        assert_eq!(
            decided(Charset::Declared(SHIFT_JIS), page),
            rewrite(UTF_8, Confidence::Known, 0)
        );
        assert_eq!(
            decided(Charset::Sniffed, page),
            rewrite(UTF_8, Confidence::Known, 0)
        );
        for bom in [&b"\xFF\xFE<\0"[..], b"\xFE\xFF\0<"] {
            assert_eq!(
                decided(Charset::Declared(WINDOWS_1252), bom),
                Reading::PassThrough
            );
        }
    }

    #[test]
    fn waits_for_three_bytes_only_while_they_could_be_a_byte_order_mark() {
        let utf8 = Charset::Declared(UTF_8);
        assert_eq!(sniff(utf8, b"\xEF\xBB", false), None);
        assert_eq!(sniff(utf8, b"\xFF", false), None);
        assert_eq!(
            sniff(utf8, b"\xEF\xBB", true),
            Some(rewrite(UTF_8, Confidence::Known, 0))
        );
        assert_eq!(
            sniff(utf8, b"<", false),
            Some(rewrite(UTF_8, Confidence::Known, 0))
        );
    }

    #[test]
    fn the_prescan_waits_for_a_meta_or_1024_bytes() {
        let page = b"<!doctype html><title>x</title><meta charset=\"euc-kr\">";
        for cut in 0..page.len() {
            assert_eq!(sniff(Charset::Sniffed, &page[..cut], false), None, "{cut}");
        }
        assert_eq!(
            sniff(Charset::Sniffed, page, false),
            Some(rewrite(EUC_KR, Confidence::Known, page.len()))
        );
        let mut long = b"<p>".repeat(400);
        assert_eq!(sniff(Charset::Sniffed, &long[..1023], false), None);
        assert_eq!(
            sniff(Charset::Sniffed, &long, false),
            Some(rewrite(WINDOWS_1252, Confidence::Guessed, 0))
        );
        // A meta past the first 1024 bytes is not looked at.
        long.extend_from_slice(b"<meta charset=utf-8>");
        assert_eq!(
            decided(Charset::Sniffed, &long),
            rewrite(WINDOWS_1252, Confidence::Guessed, 0)
        );
        assert_eq!(
            decided(Charset::Xml, b"<?xml version='1.0'?><html>"),
            rewrite(UTF_8, Confidence::Guessed, 0)
        );
    }

    #[test]
    fn meta_declarations_as_the_standard_reads_them() {
        let cases: &[(&[u8], Option<&'static Encoding>)] = &[
            (b"<meta charset=utf-8>", Some(UTF_8)),
            (b"<META CHARSET='Shift_JIS'>", Some(SHIFT_JIS)),
            (b"<meta charset=\"x-user-defined\">", Some(WINDOWS_1252)),
            (b"<meta charset=utf-16le>", Some(UTF_8)),
            (b"<meta charset=utf-16>", Some(UTF_8)),
            (
                b"<meta http-equiv=Content-Type content='text/html; charset=windows-1251'>",
                Some(WINDOWS_1251),
            ),
            (
                b"<meta content=\"text/html;charset = 'koi8-r'\" http-equiv=\"content-type\">",
                Some(encoding_rs::KOI8_R),
            ),
            // `content` without the pragma is no declaration.
            (b"<meta content='text/html; charset=euc-kr'>", None),
            // An unknown label is skipped; the next meta counts.
            (b"<meta charset=klingon><meta charset=euc-kr>", Some(EUC_KR)),
            // A repeated attribute is ignored.
            (b"<meta charset=euc-kr charset=utf-8>", Some(EUC_KR)),
            (
                b"<!-- <meta charset=euc-kr> --><meta charset=utf-8>",
                Some(UTF_8),
            ),
            (b"<!--><meta charset=euc-kr>", Some(EUC_KR)),
            (
                b"<p title='<meta charset=euc-kr>'><meta charset=utf-8>",
                Some(UTF_8),
            ),
            (b"<metal charset=euc-kr><meta/charset=utf-8>", Some(UTF_8)),
            (b"<meta charset=iso-2022-jp>", Some(ISO_2022_JP)),
            (b"<meta charset=iso-2022-kr>", Some(REPLACEMENT)),
            (b"<meta charset=euc-kr", None),
            (b"<p>no declaration</p>", None),
        ];
        for (page, expected) in cases {
            let got = match prescan(page) {
                Prescan::Declared(e, _) => Some(e),
                _ => None,
            };
            assert_eq!(got, *expected, "{}", String::from_utf8_lossy(page));
        }
        assert_eq!(
            decided(Charset::Sniffed, b"<meta charset=iso-2022-jp>"),
            Reading::PassThrough
        );
        assert_eq!(
            prescan(b"<p><meta charset=utf-8 >x"),
            Prescan::Declared(UTF_8, b"<p><meta charset=utf-8 >".len())
        );
    }

    #[test]
    fn a_link_before_any_declaration_ends_the_wait() {
        for (page, at) in [
            (&b"<!doctype html><body><a href=x>"[..], 21),
            (b"<p><A/href=x>", 3),
            (b"<!-- <a href=x> --><form action=y>", 19),
            (b"<title>t</title><area href=x>", 16),
        ] {
            assert_eq!(
                prescan(page),
                Prescan::Link(at),
                "{}",
                String::from_utf8_lossy(page)
            );
        }
        // Not a link: other names, end tags, a name still arriving.
        for page in [&b"<abbr>x</a><article>"[..], b"<p><a"] {
            assert_eq!(
                prescan(page),
                Prescan::RanOut,
                "{}",
                String::from_utf8_lossy(page)
            );
        }
        assert_eq!(
            sniff(Charset::Sniffed, b"<body><a href=x>", false),
            Some(rewrite(WINDOWS_1252, Confidence::Guessed, 0))
        );
        // A declaration before the first link still decides.
        assert_eq!(
            sniff(Charset::Sniffed, b"<meta charset=koi8-r><a href=x>", false),
            Some(rewrite(encoding_rs::KOI8_R, Confidence::Known, 21))
        );
    }
}
