//! The streaming HTML rewriter: the only module that names `lol_html`. Bytes of one page go in
//! chunk by chunk, the same bytes come out with partner links decorated.
//!
//! Invariant: every tag that is not decorated leaves byte for byte as it came in. A decorated tag
//! is re-serialised by lol_html: the `href` is written in double quotes with `&` escaped, the
//! other attributes keep their raw text, separated by single spaces. No input byte is ever lost:
//! if lol_html gives up (memory limit), it flushes what it holds unmodified and the rest of the
//! page is passed through as is.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use encoding_rs::Encoding;
use lol_html::html_content::ContentType;
use lol_html::send::Element;
use lol_html::send::{HtmlRewriter, Settings};
use lol_html::{element, AsciiCompatibleEncoding, MemorySettings};
use url::Url;

use crate::decorate::{self, Decorator, Outcome};
use crate::identity::VisitorId;
use crate::partner::PartnerIndex;

/// How the bytes of a page are to be read, decided from its `Content-Type` before the first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// The header named an encoding lol_html can parse; a `<meta charset>` cannot override it.
    Declared(&'static Encoding),
    /// No charset in the header: start as UTF-8 and switch on the page's first `<meta charset>`
    /// or `http-equiv`, as a browser does.
    Sniffed,
}

/// The header named an encoding that is not ASCII-compatible (UTF-16, ISO-2022-JP) or that no
/// browser knows: rewriting could corrupt it, so the page passes through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedCharset(pub String);

/// Reads the `charset` parameter of a `Content-Type` value.
pub fn charset_of(content_type: &str) -> Result<Charset, UnsupportedCharset> {
    let label = content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| value.trim().trim_matches('"'))
    });
    let Some(label) = label else {
        return Ok(Charset::Sniffed);
    };
    Encoding::for_label(label.as_bytes())
        .filter(|e| AsciiCompatibleEncoding::new(e).is_some())
        .map(Charset::Declared)
        .ok_or_else(|| UnsupportedCharset(label.to_owned()))
}

/// What the rewriter needs to know about the page it is rewriting.
#[derive(Debug, Clone)]
pub struct Page {
    /// The URL the browser loaded; relative links resolve against it until a `<base href>`.
    pub url: Url,
    pub charset: Charset,
    /// Bytes of lol_html buffering allowed before it bails out and passes the rest through.
    pub memory_limit: usize,
}

/// Counters a rewriter shares with whoever logs the request.
#[derive(Debug)]
pub struct RewriteStats {
    /// Links decorated, indexed by partner.
    links: Box<[AtomicUsize]>,
    bailed_out: AtomicUsize,
}

impl RewriteStats {
    fn new(partners: usize) -> RewriteStats {
        RewriteStats {
            links: (0..partners).map(|_| AtomicUsize::new(0)).collect(),
            bailed_out: AtomicUsize::new(0),
        }
    }

    /// Counters for a page of a configuration with `partners` partners.
    pub fn shared(partners: usize) -> Arc<RewriteStats> {
        Arc::new(RewriteStats::new(partners))
    }

    /// Links decorated per partner, in configuration order.
    pub fn counts(&self) -> Vec<usize> {
        self.links
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// Adds the links of a page answered without a parse (a splice of a recorded rewrite).
    pub fn add(&self, counts: &[usize]) {
        for (n, add) in self.links.iter().zip(counts) {
            n.fetch_add(*add, Ordering::Relaxed);
        }
    }

    /// Links decorated in all.
    pub fn links_decorated(&self) -> usize {
        self.links.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// Links decorated for each partner, in configuration order.
    pub fn links_by_partner(&self) -> impl Iterator<Item = (PartnerIndex, usize)> + '_ {
        self.links
            .iter()
            .enumerate()
            .map(|(i, n)| (i, n.load(Ordering::Relaxed)))
    }

    /// Whether the memory limit was hit and the rest of the page went through unmodified.
    pub fn bailed_out(&self) -> bool {
        self.bailed_out.load(Ordering::Relaxed) > 0
    }
}

/// The CSS selectors the rewriter hands to lol_html. Forms cost a selector match per `<form>`;
/// they are only asked for when a partner wants them. (Public so the benchmark can measure
/// lol_html with exactly these selectors and no work in the handler.)
pub fn selectors(forms: bool) -> &'static str {
    if forms {
        "a[href], area[href], base[href], form"
    } else {
        "a[href], area[href], base[href]"
    }
}

type Sink = Box<dyn FnMut(&[u8]) + Send>;

/// The largest piece of input handed to lol_html in one call.
const MAX_WRITE: usize = 16 * 1024;

/// One page's rewriter. Feed it with [`PageRewriter::write`] and finish with
/// [`PageRewriter::end`]; each returns the output bytes that are ready.
pub struct PageRewriter {
    /// `None` once ended, or after a bail-out: from then on input passes straight through.
    inner: Option<HtmlRewriter<'static, Sink>>,
    /// Where lol_html's sink puts output until the caller takes it. The sink lives inside the
    /// rewriter, so the buffer has to be shared; the lock is never contended.
    out: Arc<Mutex<BytesMut>>,
    stats: Arc<RewriteStats>,
}

impl PageRewriter {
    /// A rewriter for one page. Without an ID only `mode = "redirect"` partners' links change,
    /// the same for every visitor.
    pub fn new(decorator: Arc<Decorator>, id: Option<VisitorId>, page: Page) -> PageRewriter {
        let stats = RewriteStats::shared(decorator.partners.len());
        PageRewriter::with_stats(decorator, id, page, stats)
    }

    /// A rewriter that counts into `stats` (shared with the splicer that may start it midway).
    pub fn with_stats(
        decorator: Arc<Decorator>,
        id: Option<VisitorId>,
        page: Page,
        stats: Arc<RewriteStats>,
    ) -> PageRewriter {
        let out = Arc::new(Mutex::new(BytesMut::with_capacity(16 * 1024)));

        let sink_out = Arc::clone(&out);
        let sink: Sink = Box::new(move |chunk: &[u8]| {
            lock(&sink_out).extend_from_slice(chunk);
        });

        let mut links = LinkHandler {
            decorator,
            id,
            page_url: page.url,
            base: None,
            base_seen: false,
            stats: Arc::clone(&stats),
        };
        let (encoding, adjust_on_meta) = match page.charset {
            Charset::Declared(e) => (e, false),
            Charset::Sniffed => (encoding_rs::UTF_8, true),
        };
        let selector = selectors(links.decorator.partners.any_forms());
        let settings = Settings::new_send()
            .append_element_content_handler(element!(selector, move |el| {
                links.handle(el);
                Ok(())
            }))
            .with_encoding(AsciiCompatibleEncoding::new(encoding).expect("checked by charset_of"))
            .with_adjust_charset_on_meta_tag(adjust_on_meta)
            // Ambiguous markup must never cut a page short: parse it the way browsers most likely do.
            .with_strict(false)
            .with_memory_settings(
                MemorySettings::new()
                    .with_max_allowed_memory_usage(page.memory_limit)
                    .with_graceful_bail_out_on_memory_limit_exceeded(true),
            );
        PageRewriter {
            inner: Some(HtmlRewriter::new(settings, sink)),
            out,
            stats,
        }
    }

    pub fn stats(&self) -> Arc<RewriteStats> {
        Arc::clone(&self.stats)
    }

    /// Feeds one chunk of the page and returns whatever output is ready (possibly nothing: lol_html
    /// holds back a tag that is split across chunks).
    pub fn write(&mut self, chunk: &[u8]) -> Bytes {
        let mut rest = chunk;
        while let Some(rewriter) = &mut self.inner {
            if rest.is_empty() {
                return self.take();
            }
            // When a tag is split across writes lol_html buffers it together with the whole next
            // write, so bounded pieces keep the memory limit about the page, not the chunking.
            let (piece, after) = rest.split_at(rest.len().min(MAX_WRITE));
            rest = after;
            if rewriter.write(piece).is_err() {
                // With graceful bail-out lol_html has already flushed every byte it held,
                // unmodified; only the rewriter is lost, never content.
                self.inner = None;
                self.stats.bailed_out.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut ready = self.take_mut();
        ready.extend_from_slice(rest);
        ready.freeze()
    }

    /// Ends the page and returns the last output.
    pub fn end(&mut self) -> Bytes {
        if let Some(rewriter) = self.inner.take() {
            if rewriter.end().is_err() {
                self.stats.bailed_out.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.take()
    }

    fn take_mut(&self) -> BytesMut {
        lock(&self.out).split()
    }

    fn take(&self) -> Bytes {
        self.take_mut().freeze()
    }
}

/// An attribute value escaped for HTML and written in ASCII alone: non-ASCII characters become
/// numeric character references. The value means the same to the browser in every page
/// encoding, and the bytes are the same whatever encoding lol_html writes the page in (which a
/// recorded rewrite relies on: see `splice`).
pub fn ascii_attribute(value: &str) -> String {
    let escaped = htmlize::escape_attribute(value);
    let mut out = String::with_capacity(escaped.len());
    for c in escaped.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("&#{};", u32::from(c)));
        }
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing in this module panics while holding the lock; if something ever did, the bytes are
    // still the bytes, so keep going rather than poison every later page.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The per-page state of the `a`/`area`/`base` handler.
struct LinkHandler {
    decorator: Arc<Decorator>,
    id: Option<VisitorId>,
    page_url: Url,
    /// The first `<base href>`, resolved against the page URL.
    base: Option<Url>,
    /// Only the first `<base href>` counts, even when it is unusable.
    base_seen: bool,
    stats: Arc<RewriteStats>,
}

impl LinkHandler {
    fn handle(&mut self, el: &mut Element<'_, '_>) {
        match el.tag_name().as_str() {
            "base" => self.set_base(el),
            "form" => self.form(el),
            _ => self.link(el),
        }
    }

    fn set_base(&mut self, el: &Element<'_, '_>) {
        if self.base_seen {
            return;
        }
        self.base_seen = true;
        if let Some(raw) = el.get_attribute("href") {
            let href = htmlize::unescape_attribute(raw.as_str());
            // The URL parser strips surrounding C0 controls and spaces, HTML's whitespace included.
            self.base = self.page_url.join(&href).ok();
        }
    }

    /// The attribute's value as the browser reads it, unless it leaves the page or cannot be
    /// written back faithfully.
    fn target(&self, el: &Element<'_, '_>, attribute: &str) -> Option<String> {
        let raw = el.get_attribute(attribute)?;
        // U+FFFD means bytes that are not valid in the page's encoding: writing the attribute
        // back would replace them, so such a link is left alone.
        if raw.contains('\u{FFFD}') {
            return None;
        }
        let value = match htmlize::unescape_attribute(raw.as_str()) {
            std::borrow::Cow::Borrowed(_) => raw,
            std::borrow::Cow::Owned(decoded) => decoded,
        };
        if decorate::is_fragment_only(&value) && same_document(self.base(), &self.page_url) {
            return None;
        }
        Some(value)
    }

    /// The URL relative links resolve against: the first `<base href>`, else the page's URL.
    fn base(&self) -> &Url {
        self.base.as_ref().unwrap_or(&self.page_url)
    }

    fn link(&mut self, el: &mut Element<'_, '_>) {
        let Some(href) = self.target(el, "href") else {
            return;
        };
        let (href, partner) =
            match self
                .decorator
                .decorate_link(&href, self.base(), self.id.as_ref())
            {
                Outcome::Decorated { href, partner } => (href, partner),
                Outcome::Redirected { href, partner } => (self.on_this_site(href), partner),
                _ => return,
            };
        // lol_html escapes `"` in attribute values but not `&`, so the text written back means
        // exactly `href` to the browser.
        if el
            .set_attribute("href", &href.replace('&', "&amp;"))
            .is_ok()
        {
            self.stats.links[partner].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A root-relative link to the proxy's redirect path, made absolute when a `<base href>` on
    /// another origin would otherwise send it there.
    fn on_this_site(&self, path: String) -> String {
        match &self.base {
            Some(base) if base.origin() != self.page_url.origin() => {
                format!("{}{path}", self.page_url.origin().ascii_serialization())
            }
            _ => path,
        }
    }

    /// A form whose action points at a partner with `forms = true`: a GET form gets a hidden
    /// input (browsers replace the action's query with the form's fields on submit), a POST form
    /// gets the parameter in its action. A form without an action submits to this page.
    fn form(&mut self, el: &mut Element<'_, '_>) {
        let Some(id) = self.id.as_ref() else {
            return;
        };
        let Some(action) = self.target(el, "action") else {
            return;
        };
        let base = self.base();
        let Some(partner) = self.decorator.partner_of(&action, base) else {
            return;
        };
        let rules = self.decorator.partners.rules(partner);
        if !rules.forms || rules.mode != crate::partner::Mode::Inline {
            return;
        }
        // Enumerated attributes are not trimmed: `" post "` is an invalid value, so GET.
        let method = el
            .get_attribute("method")
            .unwrap_or_default()
            .to_ascii_lowercase();
        match method.as_str() {
            "post" => {
                if let Outcome::Decorated { href, .. } = self.decorator.decorate(&action, base, id)
                {
                    if el
                        .set_attribute("action", &href.replace('&', "&amp;"))
                        .is_err()
                    {
                        return;
                    }
                } else {
                    return;
                }
            }
            // A dialog form does not navigate.
            "dialog" => return,
            // GET, and any missing or invalid method, which browsers treat as GET.
            _ => {
                let input = format!(
                    "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                    self.decorator.param,
                    ascii_attribute(id.as_str())
                );
                el.append(&input, ContentType::Html);
            }
        }
        self.stats.links[partner].fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether two URLs name the same document (they may differ in their fragment).
fn same_document(a: &Url, b: &Url) -> bool {
    a[..url::Position::AfterQuery] == b[..url::Position::AfterQuery]
}

/// Rewrites a whole page held in memory through the same code path as the proxy, feeding it in
/// the given chunk sizes (cycled). For the `rewrite` command, tests and benchmarks.
pub fn rewrite_chunks(
    decorator: Arc<Decorator>,
    id: impl Into<Option<VisitorId>>,
    page: Page,
    input: &[u8],
    chunk_sizes: &[usize],
) -> (Vec<u8>, Arc<RewriteStats>) {
    let mut rewriter = PageRewriter::new(decorator, id.into(), page);
    let mut out = Vec::with_capacity(input.len() + input.len() / 8);
    let mut rest = input;
    let mut sizes = chunk_sizes.iter().copied().filter(|&s| s > 0).cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).min(rest.len());
        out.extend_from_slice(&rewriter.write(&rest[..n]));
        rest = &rest[n..];
    }
    out.extend_from_slice(&rewriter.end());
    (out, rewriter.stats())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charset_from_content_type() {
        assert_eq!(charset_of("text/html"), Ok(Charset::Sniffed));
        assert_eq!(
            charset_of("text/html; charset=Shift_JIS"),
            Ok(Charset::Declared(encoding_rs::SHIFT_JIS))
        );
        assert_eq!(
            charset_of("text/html;CHARSET=\"windows-1252\""),
            Ok(Charset::Declared(encoding_rs::WINDOWS_1252))
        );
        assert!(charset_of("text/html; charset=utf-16").is_err());
        assert!(charset_of("text/html; charset=iso-2022-jp").is_err());
        assert!(charset_of("text/html; charset=klingon").is_err());
    }
}
