//! The streaming HTML rewriter: the only module that names `lol_html`. Bytes of one page go in
//! chunk by chunk, the same bytes come out with partner links decorated.
//!
//! Invariant: every tag that is not decorated leaves byte for byte as it came in. A decorated tag
//! is re-serialised by lol_html: the `href` is written in double quotes with `&` escaped, the
//! other attributes keep their raw text, separated by single spaces. No input byte is ever lost:
//! if lol_html gives up (memory limit), it flushes what it holds unmodified and the rest of the
//! page is passed through as is.
//!
//! The page is read as a browser reads it. Its encoding is decided before lol_html sees a byte
//! ([`charset::sniff`]: byte order mark, header, `<meta>` prescan, default), holding at most the
//! first 1024 bytes and never past the first link. Its base URL is the first HTML `<base href>` in the document, never one in a
//! template's contents or in SVG/MathML. A link is only changed where the rewriter reads it as
//! the browser does: not with bytes invalid in the encoding, not with non-ASCII when the encoding
//! is a guess, not against a base it cannot read, not before the `<meta>` that named the
//! encoding. A `<base>` after a link cannot change that link any more (see the README).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};
use encoding_rs::Encoding;
use lol_html::html_content::ContentType;
use lol_html::send::Element;
use lol_html::send::{HtmlRewriter, Settings};
use lol_html::{element, AsciiCompatibleEncoding, MemorySettings};
use url::Url;

use crate::charset::{self, Confidence, Reading};
use crate::csp;
use crate::decorate::{self, Decorator, Outcome};
use crate::identity::VisitorId;
use crate::partner::PartnerIndex;
use crate::script::{Injected, Injection};

pub use crate::charset::{charset_of, Charset, UnsupportedCharset};

/// What the rewriter needs to know about the page it is rewriting.
#[derive(Debug, Clone)]
pub struct Page {
    /// The URL the browser loaded; relative links resolve against it until a `<base href>`.
    pub url: Url,
    pub charset: Charset,
    /// Bytes of lol_html buffering allowed before it bails out and passes the rest through.
    pub memory_limit: usize,
    /// The click-time link script to inject (`[script] inject`), with the response's policies.
    pub script: Option<Arc<Injection>>,
}

/// Counters a rewriter shares with whoever logs the request.
#[derive(Debug)]
pub struct RewriteStats {
    /// Links decorated, indexed by partner, then one counter per [`Injected`] outcome of the
    /// link script. One array so that a recorded rewrite (which keeps [`RewriteStats::counts`]
    /// and [`RewriteStats::add`]s them when it is replayed) reports the script as well.
    links: Box<[AtomicUsize]>,
    partners: usize,
    bailed_out: AtomicUsize,
}

impl RewriteStats {
    fn new(partners: usize) -> RewriteStats {
        RewriteStats {
            links: (0..partners + Injected::ALL.len())
                .map(|_| AtomicUsize::new(0))
                .collect(),
            partners,
            bailed_out: AtomicUsize::new(0),
        }
    }

    /// What became of the link script on this page, if the rewriter got to it.
    pub fn script(&self) -> Option<Injected> {
        Injected::ALL
            .into_iter()
            .find(|i| self.links[self.partners + i.index()].load(Ordering::Relaxed) > 0)
    }

    fn count_script(&self, outcome: Injected) {
        self.links[self.partners + outcome.index()].fetch_add(1, Ordering::Relaxed);
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
        self.links[..self.partners]
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    /// Links decorated for each partner, in configuration order.
    pub fn links_by_partner(&self) -> impl Iterator<Item = (PartnerIndex, usize)> + '_ {
        self.links[..self.partners]
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
/// they are only asked for when a partner wants them. `template` is there because a `<base>` in
/// a template's contents is not the document's. (Public so the benchmark can measure lol_html with
/// exactly these selectors and no work in the handler.)
pub fn selectors(forms: bool) -> &'static str {
    if forms {
        "a[href], area[href], base[href], template, form"
    } else {
        "a[href], area[href], base[href], template"
    }
}

type Sink = Box<dyn FnMut(&[u8]) + Send>;

/// The largest piece of input handed to lol_html in one call.
const MAX_WRITE: usize = 16 * 1024;

/// The namespace of HTML elements; a `base` in SVG or MathML content is no base element.
const HTML_NAMESPACE: &str = "http://www.w3.org/1999/xhtml";

/// One page's rewriter. Feed it with [`PageRewriter::write`] and finish with
/// [`PageRewriter::end`]; each returns the output bytes that are ready.
pub struct PageRewriter {
    state: State,
    /// Where lol_html's sink puts output until the caller takes it. The sink lives inside the
    /// rewriter, so the buffer has to be shared; the lock is never contended.
    out: Arc<Mutex<BytesMut>>,
    stats: Arc<RewriteStats>,
}

enum State {
    /// The first bytes of the page, held until they say how to read it: three for a byte order
    /// mark, and for a page that declares no charset up to its `<meta>`, its first link or 1024
    /// bytes (see [`charset::sniff`]). Browsers wait for the same bytes before they decode.
    Sniffing {
        held: Vec<u8>,
        links: Box<LinkHandler>,
        charset: Charset,
        memory_limit: usize,
        script: Option<Arc<Injection>>,
    },
    /// Boxed: lol_html's rewriter is large, and the state is moved when sniffing ends.
    Rewriting(Box<HtmlRewriter<'static, Sink>>),
    /// Ended, bailed out, or a page that cannot be rewritten: input passes straight through.
    Passing,
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
        let links = LinkHandler {
            decorator,
            id,
            page_url: page.url,
            encoding: encoding_rs::UTF_8,
            guessed: false,
            declared_at: 0,
            base: Base::None,
            templates: Arc::new(AtomicUsize::new(0)),
            stats: Arc::clone(&stats),
        };
        PageRewriter {
            state: State::Sniffing {
                held: Vec::new(),
                links: Box::new(links),
                charset: page.charset,
                memory_limit: page.memory_limit,
                script: page.script,
            },
            out: Arc::new(Mutex::new(BytesMut::with_capacity(16 * 1024))),
            stats,
        }
    }

    pub fn stats(&self) -> Arc<RewriteStats> {
        Arc::clone(&self.stats)
    }

    /// Feeds one chunk of the page and returns whatever output is ready (possibly nothing: the
    /// first bytes are held until the encoding is known, and lol_html holds back a tag that is
    /// split across chunks).
    pub fn write(&mut self, chunk: &[u8]) -> Bytes {
        if let State::Sniffing { held, .. } = &mut self.state {
            held.extend_from_slice(chunk);
            return match self.decide(false) {
                Some(held) => self.feed(&held),
                None => Bytes::new(),
            };
        }
        self.feed(chunk)
    }

    /// Ends the page and returns the last output.
    pub fn end(&mut self) -> Bytes {
        let mut ready = match self.decide(true) {
            Some(held) => BytesMut::from(&self.feed(&held)[..]),
            None => BytesMut::new(),
        };
        if let State::Rewriting(rewriter) = std::mem::replace(&mut self.state, State::Passing) {
            if rewriter.end().is_err() {
                self.stats.bailed_out.fetch_add(1, Ordering::Relaxed);
            }
        }
        ready.extend_from_slice(&self.take());
        ready.freeze()
    }

    /// While sniffing: when the held bytes (and `ended`) decide the page's encoding, starts
    /// rewriting or passing through and returns the held bytes to feed; `None` otherwise.
    fn decide(&mut self, ended: bool) -> Option<Vec<u8>> {
        let State::Sniffing { held, charset, .. } = &self.state else {
            return None;
        };
        let reading = charset::sniff(*charset, held, ended)?;
        let State::Sniffing {
            held,
            mut links,
            memory_limit,
            script,
            ..
        } = std::mem::replace(&mut self.state, State::Passing)
        else {
            unreachable!("matched just above");
        };
        if let Reading::Rewrite {
            encoding,
            confidence,
            declared_at,
        } = reading
        {
            // `sniff` only answers `Rewrite` with an ASCII-compatible encoding; a `Page` built
            // by hand with another one passes through like any page the rewriter cannot read.
            if let Some(ascii_compatible) = AsciiCompatibleEncoding::new(encoding) {
                links.encoding = encoding;
                links.guessed = confidence == Confidence::Guessed;
                links.declared_at = declared_at;
                let rewriter = self.rewriter(links, ascii_compatible, memory_limit, script);
                self.state = State::Rewriting(Box::new(rewriter));
            }
        }
        Some(held)
    }

    fn rewriter(
        &self,
        mut links: Box<LinkHandler>,
        encoding: AsciiCompatibleEncoding,
        memory_limit: usize,
        script: Option<Arc<Injection>>,
    ) -> HtmlRewriter<'static, Sink> {
        let sink_out = Arc::clone(&self.out);
        let sink: Sink = Box::new(move |chunk: &[u8]| {
            lock(&sink_out).extend_from_slice(chunk);
        });
        let selector = selectors(links.decorator.partners.any_forms());
        let injector = script.map(|injection| {
            Arc::new(Mutex::new(Injector {
                injection,
                page_url: links.page_url.clone(),
                metas: Vec::new(),
                base_elsewhere: None,
                done: false,
                templates: Arc::clone(&links.templates),
                stats: Arc::clone(&self.stats),
            }))
        });
        let mut settings =
            Settings::new_send().append_element_content_handler(element!(selector, move |el| {
                links.handle(el);
                Ok(())
            }));
        if let Some(injector) = injector {
            settings = Injector::handlers(injector, settings);
        }
        let settings = settings
            .with_encoding(encoding)
            // The encoding is decided before the first byte reaches lol_html, by the standard's
            // rules (which lol_html's own `<meta>` switch does not follow: it would honour
            // x-user-defined, skip a UTF-16 label and look past the first 1024 bytes).
            .with_adjust_charset_on_meta_tag(false)
            // Ambiguous markup must never cut a page short: parse it the way browsers most likely do.
            .with_strict(false)
            .with_memory_settings(
                MemorySettings::new()
                    .with_max_allowed_memory_usage(memory_limit)
                    .with_graceful_bail_out_on_memory_limit_exceeded(true),
            );
        HtmlRewriter::new(settings, sink)
    }

    /// Feeds bytes to lol_html (or straight through) and returns the output that is ready.
    fn feed(&mut self, chunk: &[u8]) -> Bytes {
        let mut rest = chunk;
        while let State::Rewriting(rewriter) = &mut self.state {
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
                self.state = State::Passing;
                self.stats.bailed_out.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut ready = self.take_mut();
        ready.extend_from_slice(rest);
        ready.freeze()
    }

    fn take_mut(&self) -> BytesMut {
        lock(&self.out).split()
    }

    fn take(&self) -> Bytes {
        self.take_mut().freeze()
    }
}

/// Places the link script once per page where it runs before a visitor can click: before
/// `</head>`, else at the start of `<body>` (a page whose head ends implicitly), else at the end
/// of a page that has neither. The page's `<meta http-equiv="Content-Security-Policy">` policies
/// met before that point are added to the header's; where they forbid the script, nothing is
/// written and the page leaves byte for byte as it came.
struct Injector {
    injection: Arc<Injection>,
    page_url: Url,
    metas: Vec<csp::Policy>,
    /// The origin to write before the file's path when the first `<base href>` is on another
    /// origin (a root-relative `src` would go there); `Some("")` for a base on this origin.
    base_elsewhere: Option<String>,
    done: bool,
    /// Shared with the link handler: open `template` elements, whose contents are not the
    /// document's (their `meta`, `base`, `head` and `body` do not count).
    templates: Arc<AtomicUsize>,
    stats: Arc<RewriteStats>,
}

type SharedInjector = Arc<Mutex<Injector>>;

impl Injector {
    fn handlers(
        injector: SharedInjector,
        settings: Settings<'static, 'static>,
    ) -> Settings<'static, 'static> {
        let (meta, base, head, body, end) = (
            Arc::clone(&injector),
            Arc::clone(&injector),
            Arc::clone(&injector),
            Arc::clone(&injector),
            injector,
        );
        settings
            .append_element_content_handler(element!("meta[http-equiv][content]", move |el| {
                lock(&meta).meta(el);
                Ok(())
            }))
            .append_element_content_handler(element!("base[href]", move |el| {
                lock(&base).base(el);
                Ok(())
            }))
            .append_element_content_handler(element!("head", move |el| {
                if lock(&head).in_document(el) {
                    let head = Arc::clone(&head);
                    // A head whose end tag is implicit never calls this: `body` or the end does.
                    let _ = el.on_end_tag(Box::new(move |end| {
                        if let Some(tag) = lock(&head).tag() {
                            end.before(&tag, ContentType::Html);
                        }
                        Ok(())
                    }));
                }
                Ok(())
            }))
            .append_element_content_handler(element!("body", move |el| {
                let mut injector = lock(&body);
                if injector.in_document(el) {
                    if let Some(tag) = injector.tag() {
                        el.prepend(&tag, ContentType::Html);
                    }
                }
                Ok(())
            }))
            .append_document_content_handler(lol_html::end!(move |doc_end| {
                if let Some(tag) = lock(&end).tag() {
                    doc_end.append(&tag, ContentType::Html);
                }
                Ok(())
            }))
    }

    /// An HTML element of the document itself (not in a template, not SVG or MathML), before
    /// the script was placed.
    fn in_document(&self, el: &Element<'_, '_>) -> bool {
        !self.done
            && el.namespace_uri() == HTML_NAMESPACE
            && self.templates.load(Ordering::Relaxed) == 0
    }

    fn meta(&mut self, el: &Element<'_, '_>) {
        let is_csp = el
            .get_attribute("http-equiv")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("content-security-policy"));
        if !is_csp || !self.in_document(el) {
            return;
        }
        if let Some(content) = el.get_attribute("content") {
            let content = htmlize::unescape_attribute(&content).into_owned();
            self.metas.push(csp::Policy::parse(&content, true));
        }
    }

    fn base(&mut self, el: &Element<'_, '_>) {
        if self.base_elsewhere.is_some() || !self.in_document(el) {
            return;
        }
        let href = el.get_attribute("href").unwrap_or_default();
        let href = htmlize::unescape_attribute(&href);
        let elsewhere = self
            .page_url
            .join(&href)
            .is_ok_and(|b| b.origin() != self.page_url.origin());
        self.base_elsewhere = Some(if elsewhere {
            self.page_url.origin().ascii_serialization()
        } else {
            String::new()
        });
    }

    /// Decides once, with every policy met so far, and gives the tag to write if the policies
    /// let it run.
    fn tag(&mut self) -> Option<String> {
        if self.done {
            return None;
        }
        self.done = true;
        let injection = &self.injection;
        let mut policies = injection.policies.clone();
        policies.append(&mut self.metas);
        let decision = csp::decide(
            &policies,
            &self.page_url,
            &injection.script.path,
            !injection.xml,
        );
        self.stats.count_script(Injected::of(&decision));
        let origin = self.base_elsewhere.as_deref().unwrap_or("");
        decision.ok().map(|p| injection.script.tag(&p, origin))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing in this module panics while holding the lock; if something ever did, the bytes are
    // still the bytes, so keep going rather than poison every later page.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The document's base URL as far as the page has shown it.
enum Base {
    /// No `<base href>` yet: links resolve against the page's URL.
    None,
    /// The first `<base href>`, resolved against the page URL (or the page URL itself when it
    /// does not parse, as browsers fall back to it), as Chromium reads it: its query in UTF-8.
    /// `in_page` is the same base with its query in the page's encoding, as the HTML standard
    /// and Firefox read it, when that differs (non-ASCII in the query of a page that is not
    /// UTF-8): a link is then only changed where both readings change it alike.
    Url { url: Url, in_page: Option<Url> },
    /// The first `<base href>` has text the rewriter cannot be sure to read as the browser does
    /// (bytes invalid in the page's encoding, or non-ASCII in a guessed encoding): only links
    /// that do not depend on it are read.
    Unreadable,
}

/// The per-page state of the `a`/`area`/`base`/`template`/`form` handler.
struct LinkHandler {
    decorator: Arc<Decorator>,
    id: Option<VisitorId>,
    page_url: Url,
    /// The page's encoding: attributes are read and written in it, and it encodes the query of a
    /// URL written out in full.
    encoding: &'static Encoding,
    /// The encoding is the default, not named by anything: non-ASCII text is not read.
    guessed: bool,
    /// No tag that starts before this offset changes (see [`Reading::Rewrite`]).
    declared_at: usize,
    base: Base,
    /// How many HTML `template` elements are open: their contents are not in the document, so a
    /// `<base>` there is not the document's. Shared with the end-tag handlers that decrement it.
    templates: Arc<AtomicUsize>,
    stats: Arc<RewriteStats>,
}

impl LinkHandler {
    fn handle(&mut self, el: &mut Element<'_, '_>) {
        match el.tag_name().as_str() {
            "base" => self.set_base(el),
            "template" => self.template(el),
            "form" => self.form(el),
            _ => self.link(el),
        }
    }

    fn template(&mut self, el: &mut Element<'_, '_>) {
        if el.namespace_uri() != HTML_NAMESPACE {
            return;
        }
        let depth = Arc::clone(&self.templates);
        let registered = el.on_end_tag(Box::new(move |_| {
            depth.fetch_sub(1, Ordering::Relaxed);
            Ok(())
        }));
        if registered.is_ok() {
            self.templates.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The document's base URL is the first HTML `base` element with an `href` in the document:
    /// not one in SVG or MathML content, not one in a template's contents.
    fn set_base(&mut self, el: &Element<'_, '_>) {
        if !matches!(self.base, Base::None)
            || el.namespace_uri() != HTML_NAMESPACE
            || self.templates.load(Ordering::Relaxed) > 0
        {
            return;
        }
        let Some(href) = self.readable(el, "href") else {
            self.base = Base::Unreadable;
            return;
        };
        // The URL parser strips surrounding C0 controls and spaces, HTML's whitespace included.
        // A base that does not parse leaves the page's URL in force, as in browsers. (The
        // encoding only changes the query, so both readings parse or neither does.)
        self.base = match (
            self.page_url.join(&href),
            decorate::join(&self.page_url, &href, self.encoding),
        ) {
            (Ok(url), Ok(in_page)) => {
                let in_page = (in_page != url).then_some(in_page);
                Base::Url { url, in_page }
            }
            _ => Base::Url {
                url: self.page_url.clone(),
                in_page: None,
            },
        };
    }

    /// The attribute's value as the browser reads it (entities decoded), unless the rewriter
    /// cannot be sure it reads it the same: bytes not valid in the page's encoding (lol_html gives
    /// U+FFFD for them, and writing the value back would replace them), or non-ASCII text in an
    /// encoding that is only a guess (another guess reads other characters, even another host).
    fn readable(&self, el: &Element<'_, '_>, attribute: &str) -> Option<String> {
        let raw = el.get_attribute(attribute)?;
        if raw.contains('\u{FFFD}') {
            return None;
        }
        let value = match htmlize::unescape_attribute(raw.as_str()) {
            std::borrow::Cow::Borrowed(_) => raw,
            std::borrow::Cow::Owned(decoded) => decoded,
        };
        // A character reference is decoded the same in every encoding, but a non-ASCII one in a
        // query written out in full would be percent-encoded in the guessed encoding.
        if self.guessed && !value.is_ascii() {
            return None;
        }
        Some(value)
    }

    /// The link an attribute holds, if the rewriter may change it and can read it as the browser
    /// does, and it leaves the page; with the base it resolves against, and the other reading
    /// of that base if browsers differ on it.
    fn target(
        &self,
        el: &Element<'_, '_>,
        attribute: &str,
    ) -> Option<(String, &Url, Option<&Url>)> {
        if el.source_location().bytes().start < self.declared_at {
            return None;
        }
        let value = self.readable(el, attribute)?;
        let (base, other) = match &self.base {
            Base::None => (&self.page_url, None),
            Base::Url { url, in_page } => (url, in_page.as_ref()),
            Base::Unreadable if decorate::is_absolute_http(&value) => (&self.page_url, None),
            Base::Unreadable => return None,
        };
        if decorate::is_fragment_only(&value) && same_document(base, &self.page_url) {
            return None;
        }
        Some((value, base, other))
    }

    fn link(&mut self, el: &mut Element<'_, '_>) {
        let Some((href, base, other)) = self.target(el, "href") else {
            return;
        };
        let decorate = |base: &Url| {
            self.decorator
                .decorate_link(&href, base, self.encoding, self.id.as_ref())
        };
        let (href, partner) = match agreed(base, other, decorate) {
            Some(Outcome::Decorated { href, partner }) => (href, partner),
            Some(Outcome::Redirected { href, partner }) => (self.on_this_site(href), partner),
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
            Base::Url { url: base, .. } if base.origin() != self.page_url.origin() => {
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
        let Some((action, base, other)) = self.target(el, "action") else {
            return;
        };
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
                let decorate =
                    |base: &Url| self.decorator.decorate_in(&action, base, self.encoding, id);
                let Some(Outcome::Decorated { href, .. }) = agreed(base, other, decorate) else {
                    return;
                };
                if el
                    .set_attribute("action", &href.replace('&', "&amp;"))
                    .is_err()
                {
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

/// What `decorate` does to a link against its base, unless browsers read the base two ways
/// (`other`) and the two readings give different results: then nobody can say which one the
/// browser will follow, and the link is left alone (`None`).
fn agreed(base: &Url, other: Option<&Url>, decorate: impl Fn(&Url) -> Outcome) -> Option<Outcome> {
    let outcome = decorate(base);
    match other {
        Some(other) if decorate(other) != outcome => None,
        _ => Some(outcome),
    }
}

/// `text` as a double-quoted attribute value that reads the same in every ASCII-compatible
/// encoding: markup characters and everything non-ASCII as character references, so the value
/// does not depend on the page's encoding being the one the browser chose (and the bytes are the
/// same whatever encoding lol_html writes the page in, which a recorded rewrite relies on: see
/// `splice`).
pub fn ascii_attribute(text: &str) -> String {
    let escaped = htmlize::escape_attribute(text);
    let mut out = String::with_capacity(escaped.len());
    for c in escaped.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let _ = write!(out, "&#{};", u32::from(c));
        }
    }
    out
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
