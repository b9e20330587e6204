//! What the benchmarks and the browser oracle share about the page corpus. Included by the
//! benches with `mod common;` (a directory, so cargo does not take it for a benchmark of its
//! own), and by `tests/browser.rs` and `tests/splice.rs` through a `#[path]`. The files beside
//! it are included only by the benches that use them: `pages.rs` (the corpus pages with their
//! partners), `estimates.rs` (criterion's figures read back), `process.rs` (the binary as a
//! child process).

use std::path::{Path, PathBuf};

/// `$KMI_CORPUS`, by default `../shared/corpus` beside this crate.
pub fn corpus_dir() -> PathBuf {
    match std::env::var_os("KMI_CORPUS") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus"),
    }
}

/// The host that a page's absolute `href`s name most often, for pages without a known setup.
pub fn most_linked_host(html: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(html);
    let mut counts = std::collections::HashMap::<String, usize>::new();
    for (i, _) in text.match_indices("href=") {
        let rest = text[i + 5..].trim_start_matches(['"', '\'']);
        let Some(after) = rest
            .strip_prefix("https://")
            .or_else(|| rest.strip_prefix("http://"))
        else {
            continue;
        };
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
            .unwrap_or(after.len());
        if end > 0 {
            *counts.entry(after[..end].to_ascii_lowercase()).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|&(_, n)| n)
        .map(|(host, _)| host)
}
