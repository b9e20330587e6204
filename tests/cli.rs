//! The `kmi-proxy` binary as an operator runs it: `check` and `rewrite`, exit codes and messages.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use kmi_proxy::config::Config;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// The binary, run from the package root with nothing inherited that could change its mind.
fn kmi_proxy(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kmi-proxy"));
    cmd.args(args)
        .current_dir(MANIFEST_DIR)
        .env_remove("KMI_PROXY_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run kmi-proxy")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("UTF-8 stdout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("UTF-8 stderr")
}

/// A directory of its own under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "kmi-proxy-cli-{label}-{}-{}-{nanos}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir(path)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write a temp file");
        path
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

#[test]
fn check_prints_the_effective_configuration_and_exits_0() {
    let out = run(&mut kmi_proxy(&["check", "--config", "config.toml"]));
    let shown = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.status.code(), Some(0));
    for line in [
        "listen = \"127.0.0.1:8080\"",
        "upstream = \"http://127.0.0.1:3000\"",
        "preserve_host = true",
        "cookies = [\"km_ni\", \"km_ai\"]",
        "param = \"kmi\"",
        "existing = \"keep\"",
        "memory_limit = 4194304",
        "upstream_connect = \"5s\"",
        "upstream_response = \"30s\"",
        "[[partner]]",
        "name = \"checkout\"",
        "domains = [\"yoursite.3rd-party-checkout.com\", \"*.partner.com\"]",
    ] {
        assert!(
            shown.lines().any(|l| l == line),
            "missing {line:?} in:\n{shown}"
        );
    }
    // What `check` prints is itself a configuration with the same meaning.
    let again = Config::parse(&shown, "check output").expect("check output is valid");
    assert_eq!(again.to_string(), shown);
}

#[test]
fn check_shows_the_defaults_a_minimal_file_gets() {
    let dir = TempDir::new("minimal");
    let file = dir.file("minimal.toml", "upstream = \"http://127.0.0.1:3000\"\n");
    let out = run(&mut kmi_proxy(&["check", "--config", text(&file)]));
    assert!(out.status.success(), "{out:?}");
    let shown = stdout(&out);
    for line in [
        "listen = \"127.0.0.1:8080\"",
        "cookies = [\"km_ni\", \"km_ai\"]",
        "param = \"kmi\"",
        "upstream_connect = \"5s\"",
        "upstream_response = \"30s\"",
    ] {
        assert!(
            shown.lines().any(|l| l == line),
            "missing {line:?} in:\n{shown}"
        );
    }
}

#[test]
fn bad_file_exits_1_naming_the_file_and_every_key_and_value_at_once() {
    let dir = TempDir::new("bad");
    let file = dir.file(
        "bad.toml",
        r#"
listen = "localhost"
upstream = "ftp://origin.test"

[identity]
param = "k m i"

[timeouts]
upstream_connect = "soon"

[[partner]]
name = "checkout"
domains = ["https://x.partner.com/"]
"#,
    );
    let out = run(&mut kmi_proxy(&["check", "--config", text(&file)]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "nothing printed on stdout: {out:?}");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}: 5 problems", file.display())),
        "names the file and counts the problems:\n{err}"
    );
    for problem in [
        "listen = \"localhost\"",
        "upstream = \"ftp://origin.test\"",
        "identity.param = \"k m i\"",
        "timeouts.upstream_connect = \"soon\"",
        "partner[0].domains[0] = \"https://x.partner.com/\"",
    ] {
        assert!(err.contains(problem), "missing {problem:?} in:\n{err}");
    }
}

/// The script's path is written into every rewritten page as the tag's `src`: `check` refuses
/// one a browser would not request as written (or that would break out of the attribute) and
/// names the key and the value; a good one is shown back with the tag that uses it.
#[test]
fn check_refuses_a_script_path_a_browser_would_not_request_as_written() {
    let dir = TempDir::new("script-path");
    for (bad, why) in [
        ("_kmi/links.js", "starts with `/`"),
        ("/_kmi/links.js?v=2", "'?' cannot be in it"),
        ("/_kmi/links js", "' ' cannot be in it"),
        ("/_kmi/\"onload=\"x", "'\"' cannot be in it"),
        ("//cdn.example/links.js", "would name another host"),
        ("/_kmi/../links.js", "`.` and `..` segments"),
    ] {
        let file = dir.file(
            "bad.toml",
            &format!(
                "upstream = \"http://127.0.0.1:3000\"\n[script]\ninject = true\npath = {}\n",
                toml_string(bad)
            ),
        );
        let out = run(&mut kmi_proxy(&["check", "--config", text(&file)]));
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {out:?}");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("{}: 1 problem", file.display())),
            "{bad:?}:\n{err}"
        );
        let named = format!("script.path = {bad:?}: ");
        assert!(
            err.contains(&named),
            "{bad:?}: missing {named:?} in:\n{err}"
        );
        assert!(err.contains(why), "{bad:?}: missing {why:?} in:\n{err}");
    }
    let file = dir.file(
        "good.toml",
        "upstream = \"http://127.0.0.1:3000\"\n[script]\ninject = true\npath = \"/.well-known/kmi/links.js\"\n",
    );
    let out = run(&mut kmi_proxy(&["check", "--config", text(&file)]));
    assert!(out.status.success(), "{out:?}");
    let shown = stdout(&out);
    assert!(
        shown.contains("<script src=\"/.well-known/kmi/links.js?v="),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .any(|l| l == "path = \"/.well-known/kmi/links.js\""),
        "{shown}"
    );
}

/// A TOML basic string holding `text`.
fn toml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[test]
fn unknown_key_and_missing_file_exit_1_naming_the_file() {
    let dir = TempDir::new("unknown");
    let file = dir.file(
        "typo.toml",
        "upstream = \"http://127.0.0.1:3000\"\n[identity]\ncookie = [\"km_ai\"]\n",
    );
    let out = run(&mut kmi_proxy(&["check", "--config", text(&file)]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains(text(&file)), "{err}");
    assert!(err.contains("unknown field `cookie`"), "{err}");

    let missing = dir.path().join("missing.toml");
    let out = run(&mut kmi_proxy(&["check", "--config", text(&missing)]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains(text(&missing)), "{err}");
    assert!(err.contains("cannot read the file"), "{err}");
}

#[test]
fn kmi_proxy_config_names_the_file_when_no_flag_does() {
    let dir = TempDir::new("env");
    let good = dir.file(
        "from-env.toml",
        "upstream = \"http://127.0.0.1:4321\"\nlisten = \"127.0.0.1:9999\"\n",
    );
    // Run from a directory without a config.toml, so only the variable can name the file.
    let out = run(kmi_proxy(&["check"])
        .current_dir(dir.path())
        .env("KMI_PROXY_CONFIG", &good));
    assert!(out.status.success(), "{out:?}");
    let shown = stdout(&out);
    assert!(
        shown.contains("upstream = \"http://127.0.0.1:4321\""),
        "{shown}"
    );
    assert!(shown.contains("listen = \"127.0.0.1:9999\""), "{shown}");

    // A bad file named by the variable is reported under its own name.
    let bad = dir.file("bad-from-env.toml", "listen = \"nowhere\"\n");
    let out = run(kmi_proxy(&["check"])
        .current_dir(dir.path())
        .env("KMI_PROXY_CONFIG", &bad));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains(text(&bad)), "{err}");
    assert!(err.contains("listen = \"nowhere\""), "{err}");

    // An explicit --config wins over the variable.
    let out = run(kmi_proxy(&["check", "--config", text(&good)]).env("KMI_PROXY_CONFIG", &bad));
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn rewrite_decorates_partner_links_from_stdin_and_leaves_others_alone() {
    let input = concat!(
        "<!DOCTYPE html><p>",
        "<a href=\"https://shop.partner.com/cart?x=1\">cart</a>\n",
        "<a href=\"//yoursite.3rd-party-checkout.com/pay\">pay</a>\n",
        "<a href=\"https://partner.com/\">bare domain, not a partner</a>\n",
        "<a href=\"https://other.example/\">other</a>\n",
        "<a href=\"/local\">local</a>\n",
        "</p>\n"
    );
    let expected = concat!(
        "<!DOCTYPE html><p>",
        "<a href=\"https://shop.partner.com/cart?x=1&amp;kmi=Zk9%2BaB%2Fc3Q%3D%3D\">cart</a>\n",
        "<a href=\"//yoursite.3rd-party-checkout.com/pay?kmi=Zk9%2BaB%2Fc3Q%3D%3D\">pay</a>\n",
        "<a href=\"https://partner.com/\">bare domain, not a partner</a>\n",
        "<a href=\"https://other.example/\">other</a>\n",
        "<a href=\"/local\">local</a>\n",
        "</p>\n"
    );
    let mut child = kmi_proxy(&[
        "rewrite",
        "--config",
        "config.toml",
        "--id",
        "Zk9+aB/c3Q==",
        "--url",
        "https://www.site.test/",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start kmi-proxy rewrite");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), expected);
    assert!(
        stderr(&out).contains("2 link(s) decorated"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn rewrite_refuses_an_unusable_id() {
    let out = run(&mut kmi_proxy(&[
        "rewrite",
        "--config",
        "config.toml",
        "--id",
        "a\u{7}b",
    ]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(err.contains("--id"), "{err}");
    assert!(err.contains("control_character"), "{err}");
}
