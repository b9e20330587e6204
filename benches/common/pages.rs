//! The corpus pages as the in-process benches rewrite them: each page with the URL it was served
//! from and the partners some of its links point at, ready for the rewriter and the splicer.
//! Included by `rewrite.rs` and `compressed.rs` with `#[path]`, beside `mod common;`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kmi_proxy::config::DEFAULT_MEMORY_LIMIT;
use kmi_proxy::decorate::{Decorator, Existing};
use kmi_proxy::identity::VisitorId;
use kmi_proxy::partner::{DomainPattern, PartnerSet};
use kmi_proxy::rewrite::{rewrite_chunks, Charset, Page, RewriteStats};
use kmi_proxy::splice::{Key, Recordings, Splicer};
use url::Url;

use crate::common::{corpus_dir, most_linked_host};

/// How a known page is rewritten: the URL it was served from and the partner domains.
struct Known {
    file: &'static str,
    url: &'static str,
    partners: &'static [&'static str],
}

const KNOWN: &[Known] = &[
    Known {
        file: "cloudflare.com.html",
        url: "https://www.cloudflare.com/",
        partners: &[
            "dash.cloudflare.com",
            "support.cloudflare.com",
            "community.cloudflare.com",
        ],
    },
    Known {
        // 270 of its links point at the spec's other parts on tc39.github.io.
        file: "ecma402-spec.html",
        url: "https://tc39.es/ecma402/",
        partners: &["tc39.github.io"],
    },
    Known {
        // Unquoted hrefs; links to the Infra, DOM and Encoding standards are cross-site.
        file: "html-parsing-spec.html",
        url: "https://html.spec.whatwg.org/multipage/parsing.html",
        partners: &[
            "infra.spec.whatwg.org",
            "dom.spec.whatwg.org",
            "encoding.spec.whatwg.org",
        ],
    },
];

/// One page ready to be measured.
pub struct Subject {
    pub name: String,
    pub bytes: Vec<u8>,
    pub decorator: Arc<Decorator>,
    pub page: Page,
}

impl Subject {
    /// The page through the uncached rewriter for `id`, fed in `chunk`-byte pieces: the output
    /// every other path must match.
    pub fn rewrite(&self, id: &VisitorId, chunk: usize) -> (Vec<u8>, Arc<RewriteStats>) {
        rewrite_chunks(
            Arc::clone(&self.decorator),
            id.clone(),
            self.page.clone(),
            &self.bytes,
            &[chunk],
        )
    }

    /// One response's splicer for `id`: it records the page into `store`, or replays the
    /// recording there.
    pub fn splicer(&self, id: &VisitorId, store: &Arc<Recordings>) -> Splicer {
        let key = Key::new(self.page.url.as_str(), "text/html", true);
        Splicer::new(
            Arc::clone(&self.decorator),
            Some(id.clone()),
            self.page.clone(),
            Some((Arc::clone(store), key)),
        )
    }

    /// The partner patterns, comma-separated, for a line that says what was decorated.
    pub fn partners(&self) -> String {
        (0..self.decorator.partners.len())
            .flat_map(|i| self.decorator.partners.patterns(i))
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Every `*.html` page of the corpus, in name order. The three known pages get partners that
/// match some of their links; any other page gets the host its absolute links point at most
/// often.
pub fn subjects() -> Vec<Subject> {
    let dir = corpus_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "the benchmark corpus {} cannot be read ({e}); set KMI_CORPUS to a directory of .html pages",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "html"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "the benchmark corpus {} has no .html pages; set KMI_CORPUS to a directory that has some",
        dir.display()
    );
    files.iter().map(|path| subject(path)).collect()
}

fn subject(path: &Path) -> Subject {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let (url, partners): (String, Vec<String>) = match KNOWN.iter().find(|k| k.file == name) {
        Some(k) => (
            k.url.to_owned(),
            k.partners.iter().map(|p| p.to_string()).collect(),
        ),
        None => (
            "https://localhost/".to_owned(),
            most_linked_host(&bytes).into_iter().collect(),
        ),
    };
    let mut set = PartnerSet::default();
    set.push(
        "bench".into(),
        partners
            .iter()
            .map(|p| DomainPattern::parse(p).expect("a valid partner pattern"))
            .collect(),
    );
    Subject {
        name,
        bytes,
        decorator: Arc::new(Decorator {
            partners: set,
            param: "kmi".into(),
            existing: Existing::Keep,
            ..Decorator::default()
        }),
        page: Page {
            url: Url::parse(&url).unwrap(),
            charset: Charset::Sniffed,
            script: None,
            memory_limit: DEFAULT_MEMORY_LIMIT,
        },
    }
}
