//! Data-driven rewrite fixtures: every `fixtures/rewrite/NAME.src.html` is rewritten through
//! [`kmi_proxy::rewrite::rewrite_chunks`] (the proxy's own code path) and must come out byte for
//! byte as `NAME.expected.html`, however the page is cut into chunks: in one chunk, one byte at a
//! time, and in several random chunk-size sequences.
//!
//! All fixtures share the partner configuration `fixtures/rewrite/config.toml`. An optional
//! sidecar `NAME.toml` sets, all keys optional:
//!
//! ```toml
//! id = "Zk9+aB/c3Q=="                               # decoded visitor ID
//! no_id = true                                      # rewrite for a visitor without an ID
//! url = "https://www.site.test/page/index.html"     # the page's URL
//! content_type = "text/html"                        # the response's Content-Type
//! existing = "keep"                                 # or "replace"; overrides config.toml
//! memory_limit = 4096                               # bytes; overrides config.toml
//! config = """                                      # more configuration for this fixture
//! [[partner]]
//! name = "forms"
//! domains = ["forms.partner.org"]
//! forms = true
//! """
//! ```
//!
//! `config` is merged into `config.toml`: its `[[partner]]` entries come after the shared ones,
//! its tables add keys to the shared tables, and a key both set is an error (so a fixture cannot
//! quietly change what the shared file says). `id` and `no_id` cannot both be given.
//!
//! Every file in the directory must belong to a complete pair (or be `config.toml`), and an empty
//! directory fails: nothing is ever skipped silently. `long_tag_over_memory_limit_never_loses_a_byte`
//! covers the one behaviour a fixture cannot pin down, because it depends on the chunking.
//!
//! Environment:
//! - `KMI_FIXTURE=NAME` runs that fixture only.
//! - `KMI_FIXTURE_SEED=N` fixes the seed of the random chunk sizes (otherwise random, and printed
//!   with every failure), so a failure replays with
//!   `KMI_FIXTURE_SEED=N KMI_FIXTURE=NAME cargo test --test fixtures`. Each fixture's chunk sizes
//!   depend only on the seed and its name, so filtering does not change them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kmi_proxy::config::Config;
use kmi_proxy::identity::VisitorId;
use kmi_proxy::rewrite::{self, Page};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

const DEFAULT_ID: &str = "Zk9+aB/c3Q==";
const DEFAULT_URL: &str = "https://www.site.test/page/index.html";
const DEFAULT_CONTENT_TYPE: &str = "text/html";
/// Random chunk-size sequences per fixture, on top of "one chunk" and "one byte at a time".
const RANDOM_RUNS: usize = 12;
/// Bytes of context shown either side of the first difference.
const CONTEXT: usize = 48;

const SRC_SUFFIX: &str = ".src.html";
const EXPECTED_SUFFIX: &str = ".expected.html";
const SIDECAR_SUFFIX: &str = ".toml";
const SHARED_CONFIG: &str = "config.toml";

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/rewrite")
}

/// `NAME.toml`. Unknown keys are an error, so a misspelt key cannot silently do nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    id: Option<String>,
    url: Option<String>,
    content_type: Option<String>,
    existing: Option<String>,
    memory_limit: Option<i64>,
    no_id: Option<bool>,
    /// TOML merged into the shared configuration.
    config: Option<String>,
}

/// One fixture, ready to run.
struct Fixture {
    name: String,
    input: Vec<u8>,
    expected: Vec<u8>,
    config: Config,
    /// `None` for a visitor without an ID (`no_id = true`).
    id: Option<VisitorId>,
    page: Page,
    /// The sidecar settings in words, for failure messages.
    settings: String,
}

#[test]
fn rewrite_fixtures() {
    let seed = seed();
    let only = std::env::var("KMI_FIXTURE").ok().filter(|s| !s.is_empty());
    eprintln!(
        "rewrite fixtures: seed {seed} (replay with KMI_FIXTURE_SEED={seed} cargo test --test fixtures)"
    );

    let dir = fixtures_dir();
    let names = fixture_names(&dir);
    let names: Vec<String> = match &only {
        Some(one) => {
            assert!(
                names.iter().any(|n| n == one),
                "KMI_FIXTURE={one}: there is no {one}{SRC_SUFFIX} in {}",
                dir.display()
            );
            vec![one.clone()]
        }
        None => names,
    };

    let shared = std::fs::read_to_string(dir.join(SHARED_CONFIG))
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.join(SHARED_CONFIG).display()));

    let mut failures = Vec::new();
    let mut runs = 0;
    for name in &names {
        let fixture = match load(&dir, name, &shared) {
            Ok(f) => f,
            Err(why) => {
                failures.push(format!("fixture `{name}`: {why}"));
                continue;
            }
        };
        let mut rng = StdRng::seed_from_u64(seed ^ fnv1a(name.as_bytes()));
        for (label, sizes) in chunkings(fixture.input.len(), &mut rng) {
            runs += 1;
            if let Some(report) = run(&fixture, &label, &sizes, seed) {
                failures.push(report);
                // The first failing chunking of a fixture says enough; the rest would repeat it.
                break;
            }
        }
    }

    assert!(
        failures.is_empty(),
        "{} of {} rewrite fixture(s) failed (seed {seed}):\n\n{}",
        failures.len(),
        names.len(),
        failures.join("\n\n")
    );
    eprintln!(
        "rewrite fixtures: {} fixture(s), {runs} run(s), all byte-identical",
        names.len()
    );
}

/// The bail-out point for a long tag is not a property of the page alone, so it cannot be a
/// fixture: lol_html only buffers a tag that is split across writes, so an `<a>` tag longer than
/// the memory limit makes it give up when the tag is split, and never when the whole tag arrives in
/// one write. (A large write following a split tag can also push the buffer over the limit, even
/// earlier in the page.) What must hold for every chunking: the output is the whole page with the
/// first `j` partner links decorated and the rest exactly as written, for some `j`.
#[test]
fn long_tag_over_memory_limit_never_loses_a_byte() {
    const KMI: &str = "kmi=Zk9%2BaB%2Fc3Q%3D%3D";
    const HREFS: [&str; 5] = [
        "https://checkout.partner.com/one",
        "https://shop.partner.net/two",
        "https://checkout.partner.com/long",
        "https://checkout.partner.com/four",
        "//shop.partner.net/five",
    ];
    /// The page with its first `decorated` links decorated.
    fn page(decorated: usize) -> Vec<u8> {
        let href = |i: usize| {
            if i < decorated {
                format!("{}?{KMI}", HREFS[i])
            } else {
                HREFS[i].to_owned()
            }
        };
        format!(
            "<!doctype html>\n<p><a href=\"{}\">one</a> <a href=\"{}\">two</a></p>\n\
             <a href=\"{}\" title=\"{}\">a tag longer than the memory limit</a>\n\
             <p><a href=\"{}\">four</a> <a href=\"{}\">five</a></p>\n<p>caf\u{e9}, the end</p>\n",
            href(0),
            href(1),
            href(2),
            "x".repeat(6000),
            href(3),
            href(4)
        )
        .into_bytes()
    }

    let seed = seed();
    let shared = std::fs::read_to_string(fixtures_dir().join(SHARED_CONFIG)).unwrap();
    let sidecar = Sidecar {
        memory_limit: Some(4096),
        ..Sidecar::default()
    };
    let config = config_for(&shared, &sidecar, "long-tag").unwrap();
    let input = page(0);
    let candidates: Vec<Vec<u8>> = (0..=HREFS.len()).map(page).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ fnv1a(b"long-tag"));

    let mut failures = Vec::new();
    for (label, sizes) in chunkings(input.len(), &mut rng) {
        let page_settings = Page {
            url: url::Url::parse(DEFAULT_URL).unwrap(),
            charset: rewrite::charset_of(DEFAULT_CONTENT_TYPE).unwrap(),
            script: None,
            memory_limit: config.memory_limit,
        };
        let (actual, stats) = rewrite::rewrite_chunks(
            Arc::clone(&config.decorator),
            VisitorId::new(DEFAULT_ID).unwrap(),
            page_settings,
            &input,
            &sizes,
        );
        let context = format!(
            "long tag, {label}, chunk sizes (cycled) {sizes:?}, seed {seed} \
             (replay: KMI_FIXTURE_SEED={seed} cargo test --test fixtures long_tag), \
             {} link(s) decorated, bailed out: {}",
            stats.links_decorated(),
            stats.bailed_out()
        );
        let Some(decorated) = candidates.iter().position(|c| *c == actual) else {
            let closest = candidates
                .iter()
                .max_by_key(|c| c.iter().zip(&actual).take_while(|(a, b)| a == b).count())
                .unwrap();
            failures.push(format!(
                "{context}: the output is not the page with its first j links decorated\n{}",
                describe_difference(closest, &actual)
            ));
            continue;
        };
        let whole = HREFS.len();
        let problem = match label.as_str() {
            "one chunk" if decorated != whole || stats.bailed_out() => Some(format!(
                "expected all {whole} links decorated and no bail-out: the long tag arrived whole"
            )),
            "one byte at a time" if decorated != 2 || !stats.bailed_out() => Some(
                "expected a bail-out at the long tag, with exactly the 2 links before it decorated"
                    .to_owned(),
            ),
            _ if !stats.bailed_out() && decorated != whole => {
                Some("links were left undecorated without a bail-out".to_owned())
            }
            _ => None,
        };
        if let Some(problem) = problem {
            failures.push(format!(
                "{context}: {decorated} of {whole} links decorated; {problem}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The sidecar's `config` adds to the shared file but cannot change what it says, and what it
/// adds is validated like any configuration; an unknown sidecar key is an error.
#[test]
fn sidecar_config_adds_to_the_shared_file_but_cannot_change_it() {
    let shared = std::fs::read_to_string(fixtures_dir().join(SHARED_CONFIG)).unwrap();
    let with = |config: &str| Sidecar {
        config: Some(config.to_owned()),
        ..Sidecar::default()
    };
    let c = config_for(
        &shared,
        &with("exclude_paths = [\"/x/*\"]\n[[partner]]\nname = \"extra\"\ndomains = [\"x.example\"]\n"),
        "t",
    )
    .unwrap();
    assert_eq!(c.decorator.partners.len(), 4);
    assert_eq!(c.decorator.partners.name(3), "extra");
    assert_eq!(c.exclude_paths.len(), 1);

    let e = config_for(&shared, &with("upstream = \"http://127.0.0.1:2\"\n"), "t").unwrap_err();
    assert!(e.contains("`upstream` is already set"), "{e}");
    let e = config_for(
        &shared,
        &with("[[partner]]\nname = \"r\"\ndomains = [\"r.example\"]\nforms = true\nmode = \"redirect\"\n"),
        "t",
    )
    .unwrap_err();
    assert!(e.contains("partner[3].forms"), "{e}");
    let e = config_for(&shared, &with("[[partner]\n"), "t").unwrap_err();
    assert!(e.contains("`config`"), "{e}");

    for bad in ["confg = \"\"", "no_id = \"yes\"", "id = 1"] {
        assert!(toml::from_str::<Sidecar>(bad).is_err(), "{bad:?} accepted");
    }
}

/// The seed for the random chunk sizes: `KMI_FIXTURE_SEED`, or a fresh random one.
fn seed() -> u64 {
    match std::env::var("KMI_FIXTURE_SEED") {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("KMI_FIXTURE_SEED={s:?} is not a u64: {e}")),
        _ => rand::random(),
    }
}

/// Every fixture name in `dir`, sorted. Fails on an empty directory and on any file that does not
/// belong to a complete pair, so a fixture can never be skipped silently.
fn fixture_names(dir: &Path) -> Vec<String> {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read the fixtures directory {}: {e}", dir.display()));
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        let file_name = entry.file_name();
        let file_name = file_name
            .to_str()
            .unwrap_or_else(|| panic!("fixture file name {file_name:?} is not UTF-8"));
        // Dotfiles (editor swap files, .DS_Store) are not fixtures.
        if entry.path().is_file() && !file_name.starts_with('.') {
            files.push(file_name.to_owned());
        }
    }
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| f.strip_suffix(SRC_SUFFIX))
        .map(str::to_owned)
        .collect();
    assert!(
        !names.is_empty(),
        "no *{SRC_SUFFIX} fixtures in {}: refusing to pass with nothing tested",
        dir.display()
    );

    let mut problems = Vec::new();
    for name in &names {
        if !files.contains(&format!("{name}{EXPECTED_SUFFIX}")) {
            problems.push(format!(
                "{name}{SRC_SUFFIX} has no {name}{EXPECTED_SUFFIX} next to it"
            ));
        }
    }
    for file in &files {
        let owner = [EXPECTED_SUFFIX, SIDECAR_SUFFIX]
            .iter()
            .find_map(|suffix| file.strip_suffix(suffix));
        match owner {
            _ if file == SHARED_CONFIG || file.ends_with(SRC_SUFFIX) => {}
            Some(name) if names.iter().any(|n| n == name) => {}
            Some(_) => problems.push(format!("{file} has no matching *{SRC_SUFFIX}")),
            None => problems.push(format!(
                "{file} is not NAME{SRC_SUFFIX}, NAME{EXPECTED_SUFFIX}, NAME{SIDECAR_SUFFIX} \
                 or {SHARED_CONFIG}"
            )),
        }
    }
    assert!(
        problems.is_empty(),
        "fixtures directory {}:\n  {}",
        dir.display(),
        problems.join("\n  ")
    );

    let mut names = names;
    names.sort();
    names
}

fn load(dir: &Path, name: &str, shared_config: &str) -> Result<Fixture, String> {
    let read = |file: String| {
        let path = dir.join(&file);
        std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let input = read(format!("{name}{SRC_SUFFIX}"))?;
    let expected = read(format!("{name}{EXPECTED_SUFFIX}"))?;

    let sidecar_path = dir.join(format!("{name}{SIDECAR_SUFFIX}"));
    let sidecar: Sidecar = if sidecar_path.exists() {
        let text = std::fs::read_to_string(&sidecar_path)
            .map_err(|e| format!("cannot read {}: {e}", sidecar_path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", sidecar_path.display()))?
    } else {
        Sidecar::default()
    };

    let config = config_for(shared_config, &sidecar, name)?;
    let (id, id_text) = match (sidecar.no_id, sidecar.id.as_deref()) {
        (Some(true), Some(_)) => return Err("give either `id` or `no_id = true`, not both".into()),
        (Some(true), None) => (None, "none".to_owned()),
        (_, id_text) => {
            let id_text = id_text.unwrap_or(DEFAULT_ID);
            let id = VisitorId::new(id_text)
                .map_err(|why| format!("id {id_text:?} is not a usable visitor ID: {why}"))?;
            (Some(id), format!("{id_text:?}"))
        }
    };
    let url_text = sidecar.url.as_deref().unwrap_or(DEFAULT_URL);
    let url = url::Url::parse(url_text).map_err(|e| format!("url {url_text:?}: {e}"))?;
    let content_type = sidecar
        .content_type
        .as_deref()
        .unwrap_or(DEFAULT_CONTENT_TYPE);
    let charset = rewrite::charset_of(content_type).map_err(|e| {
        format!(
            "content_type {content_type:?} names a charset the rewriter cannot handle: {}",
            e.0
        )
    })?;

    let settings = format!(
        "id {id_text}, url {url_text}, content type {content_type:?}, existing {:?}, memory limit {}{}",
        config.decorator.existing,
        config.memory_limit,
        if sidecar.config.is_some() {
            ", with the sidecar's `config`"
        } else {
            ""
        }
    );
    let page = Page {
        url,
        charset,
        script: None,
        memory_limit: config.memory_limit,
    };
    Ok(Fixture {
        name: name.to_owned(),
        input,
        expected,
        config,
        id,
        page,
        settings,
    })
}

/// The shared configuration with the sidecar's `config` merged into it and its `existing` and
/// `memory_limit` written into it, then validated by `Config::parse` like any configuration file.
fn config_for(shared: &str, sidecar: &Sidecar, name: &str) -> Result<Config, String> {
    let mut table: toml::Table = shared
        .parse()
        .map_err(|e| format!("{SHARED_CONFIG}: {e}"))?;
    if let Some(extra) = &sidecar.config {
        let extra: toml::Table = extra
            .parse()
            .map_err(|e| format!("{name}{SIDECAR_SUFFIX}: `config`: {e}"))?;
        merge(&mut table, extra, "")
            .map_err(|e| format!("{name}{SIDECAR_SUFFIX}: `config`: {e}"))?;
    }
    let mut set = |section: &str, key: &str, value: toml::Value| -> Result<(), String> {
        let entry = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = entry else {
            return Err(format!("{SHARED_CONFIG}: `{section}` is not a table"));
        };
        section_table.insert(key.to_owned(), value);
        Ok(())
    };
    if let Some(existing) = &sidecar.existing {
        set(
            "identity",
            "existing",
            toml::Value::String(existing.clone()),
        )?;
    }
    if let Some(limit) = sidecar.memory_limit {
        set("rewrite", "memory_limit", toml::Value::Integer(limit))?;
    }
    let text = toml::to_string(&table).map_err(|e| format!("re-serialising the config: {e}"))?;
    Config::parse(&text, &format!("{SHARED_CONFIG} + {name}{SIDECAR_SUFFIX}"))
        .map_err(|e| e.to_string())
}

/// Merges `extra` into `into`: arrays (`[[partner]]`) are extended, tables merged key by key, and
/// anything else already set is an error naming the key.
fn merge(into: &mut toml::Table, extra: toml::Table, path: &str) -> Result<(), String> {
    for (key, value) in extra {
        let full = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        match (into.get_mut(&key), value) {
            (None, value) => {
                into.insert(key, value);
            }
            (Some(toml::Value::Array(existing)), toml::Value::Array(more)) => existing.extend(more),
            (Some(toml::Value::Table(existing)), toml::Value::Table(more)) => {
                merge(existing, more, &full)?;
            }
            (Some(_), _) => return Err(format!("`{full}` is already set by {SHARED_CONFIG}")),
        }
    }
    Ok(())
}

/// The chunkings every fixture runs with: whole, one byte at a time, then random sequences of
/// chunk sizes (cycled by `rewrite_chunks`), mixing tiny, small and large chunks.
fn chunkings(len: usize, rng: &mut StdRng) -> Vec<(String, Vec<usize>)> {
    let mut all = vec![
        ("one chunk".to_owned(), vec![len.max(1)]),
        ("one byte at a time".to_owned(), vec![1]),
    ];
    for i in 1..=RANDOM_RUNS {
        let count = rng.random_range(1..=16);
        let sizes = (0..count)
            .map(|_| match rng.random_range(0..10) {
                0..=4 => rng.random_range(1..=8),
                5..=7 => rng.random_range(9..=64),
                _ => rng.random_range(65..=len.max(65)),
            })
            .collect();
        all.push((format!("random sequence {i} of {RANDOM_RUNS}"), sizes));
    }
    all
}

/// Rewrites the fixture once; `None` when the output is exactly the expected bytes, otherwise the
/// failure report.
fn run(f: &Fixture, label: &str, sizes: &[usize], seed: u64) -> Option<String> {
    let (actual, stats) = rewrite::rewrite_chunks(
        Arc::clone(&f.config.decorator),
        f.id.clone(),
        f.page.clone(),
        &f.input,
        sizes,
    );
    if actual == f.expected {
        return None;
    }
    let mut report = String::new();
    let name = &f.name;
    let _ = writeln!(
        report,
        "fixture `{name}`: output differs from fixtures/rewrite/{name}{EXPECTED_SUFFIX}"
    );
    let _ = writeln!(report, "  settings: {}", f.settings);
    let _ = writeln!(report, "  run: {label}, chunk sizes (cycled): {sizes:?}");
    let _ = writeln!(
        report,
        "  seed: {seed}; replay: KMI_FIXTURE_SEED={seed} KMI_FIXTURE={name} cargo test --test fixtures"
    );
    let _ = writeln!(
        report,
        "  rewriter: {} link(s) decorated, bailed out: {}",
        stats.links_decorated(),
        stats.bailed_out()
    );
    report.push_str(&describe_difference(&f.expected, &actual));
    Some(report)
}

/// Where two byte strings first differ, with escaped context from both and a caret under the
/// offending byte.
fn describe_difference(expected: &[u8], actual: &[u8]) -> String {
    let at = expected
        .iter()
        .zip(actual)
        .position(|(e, a)| e != a)
        .unwrap_or(expected.len().min(actual.len()));
    let line = expected[..at].iter().filter(|&&b| b == b'\n').count() + 1;
    let column = at
        - expected[..at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |nl| nl + 1)
        + 1;
    let byte = |s: &[u8]| match s.get(at) {
        Some(b) => format!("0x{b:02x} '{}'", escape(&[*b])),
        None => "end of output".to_owned(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  first difference at byte offset {at} (line {line}, column {column} of the expected file): \
         expected {}, actual {}",
        byte(expected),
        byte(actual)
    );
    let _ = writeln!(
        out,
        "  lengths: expected {} bytes, actual {} bytes",
        expected.len(),
        actual.len()
    );
    for (label, bytes) in [("expected", expected), ("actual  ", actual)] {
        let start = at.saturating_sub(CONTEXT);
        let end = (at + CONTEXT).min(bytes.len());
        let before = escape(&bytes[start..at.min(bytes.len())]);
        let after = escape(&bytes[at.min(bytes.len())..end]);
        let _ = writeln!(
            out,
            "  {label}: {}\"{before}{after}\"{}",
            if start > 0 { "…" } else { "" },
            if end < bytes.len() { "…" } else { "" }
        );
        if label.starts_with("actual") {
            let _ = writeln!(
                out,
                "  {}^",
                " ".repeat(label.len() + 2 + usize::from(start > 0) + 1 + before.chars().count())
            );
        }
    }
    out
}

/// Bytes as readable text: printable ASCII as is, everything else (and `"`, `\`) escaped.
fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// FNV-1a: a stable hash of the fixture name, so each fixture's random chunk sizes depend only
/// on the seed and its name.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
