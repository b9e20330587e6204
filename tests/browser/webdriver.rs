//! Just enough WebDriver (W3C, JSON over HTTP) to drive Debian's headless Chromium through
//! chromedriver: install both if they are missing and we may, start chromedriver on a free
//! loopback port, open a session, navigate, run scripts, find and click elements.
//!
//! Every call is bounded: a command that takes longer than [`COMMAND_TIMEOUT`] fails the test with
//! chromedriver's log attached, and [`poll`] gives up after [`WAIT`]. Chromedriver and the
//! browsers it started are ended when the [`Browser`] is dropped, failing test or not.

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How to get both binaries, for the message when the test cannot install them itself.
const INSTALL: &str = "apt-get update && apt-get install -y chromium chromium-driver";

/// The longest any wait for the browser may take (page loads, polls, chromedriver's start).
pub const WAIT: Duration = Duration::from_secs(20);

/// The longest one WebDriver command may take; longer than [`WAIT`] so that a page load that
/// times out inside the browser is reported by chromedriver rather than cut off here.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The W3C key under which an element reference travels.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

// ---------------------------------------------------------------------------------------------
// Installation
// ---------------------------------------------------------------------------------------------

/// Makes sure `/usr/bin/chromium` and `/usr/bin/chromedriver` exist: installs them with apt-get
/// (once per test process) when they are missing and we run as root on a machine with apt-get,
/// and fails the test with the command to run otherwise. Never skips.
pub fn ensure_installed() {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = INSTALLED.get_or_init(install_if_missing) {
        panic!("{e}");
    }
}

fn missing() -> Vec<&'static str> {
    [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect()
}

fn install_if_missing() -> Result<(), String> {
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    let apt = Path::new("/usr/bin/apt-get").exists();
    if !is_root() || !apt {
        return Err(format!(
            "tests/browser.rs drives Debian's Chromium through chromedriver, and {} {} missing. \
             It installs them itself only when it runs as root on a machine with apt-get \
             (root: {}, apt-get: {apt}). Install them with:\n\n    sudo sh -c '{INSTALL}'\n\n\
             (packages `chromium` and `chromium-driver`; they provide {CHROMIUM} and {CHROMEDRIVER})",
            missing.join(" and "),
            if missing.len() == 1 { "is" } else { "are" },
            is_root(),
        ));
    }
    eprintln!("browser test: {missing:?} missing; installing with `{INSTALL}` ...");
    let started = Instant::now();
    apt_get(&["update"])?;
    apt_get(&["install", "-y", "chromium", "chromium-driver"])?;
    let still = self::missing();
    if !still.is_empty() {
        return Err(format!(
            "`{INSTALL}` succeeded but {still:?} still do not exist; install them by hand:\n\n    {INSTALL}"
        ));
    }
    eprintln!(
        "browser test: installed Chromium and chromedriver in {:.1?}",
        started.elapsed()
    );
    Ok(())
}

/// Runs apt-get non-interactively with its output captured; the output's end on failure.
fn apt_get(args: &[&str]) -> Result<(), String> {
    let out = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run apt-get {}: {e}", args.join(" ")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "`apt-get {}` failed ({}), so Chromium and chromedriver could not be installed; \
         install them by hand:\n\n    {INSTALL}\n\napt-get's output (end):\n{}\n{}",
        args.join(" "),
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout), 30),
        tail(&String::from_utf8_lossy(&out.stderr), 30),
    ))
}

/// Whether this process runs with effective user id 0.
fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let from_proc = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .map(|euid| euid == "0");
    from_proc.unwrap_or_else(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    })
}

/// The last `n` lines of a text.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------------------------

/// Tries `attempt` every 50 ms until it returns `Ok`; panics naming `what` and the last error
/// once [`WAIT`] has passed.
pub async fn poll<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(last) if started.elapsed() >= WAIT => {
                panic!("timed out after {WAIT:?} waiting for {what}; last attempt: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chromedriver and one browser session
// ---------------------------------------------------------------------------------------------

/// A directory of its own under the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "kmi-proxy-browser-{}-{}-{nanos}",
            std::process::id(),
            COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create a temp dir for the browser");
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An error chromedriver answered with (or a failure to reach it).
#[derive(Debug)]
pub struct WdError {
    pub error: String,
    pub message: String,
}

impl fmt::Display for WdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

/// Headless Chromium driven through a chromedriver of its own, with a fresh profile (so a fresh
/// cookie jar). Dropping it quits the browser and ends chromedriver.
pub struct Browser {
    driver: Child,
    port: u16,
    http: Client<HttpConnector, Full<Bytes>>,
    session: Option<String>,
    /// Holds the profile and the logs; removed last, once the browser is gone.
    dir: Scratch,
}

impl Browser {
    /// Starts chromedriver on a free loopback port, waits until it is ready, and opens a session
    /// with a fresh profile. `host_rules` goes to `--host-resolver-rules`.
    pub async fn start(host_rules: &str) -> Browser {
        ensure_installed();
        let dir = Scratch::new();
        let port = free_port();
        let out = File::create(dir.0.join("chromedriver.out")).expect("create a log file");
        let err = out.try_clone().expect("clone the log file");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.0.join("chromedriver.log").display()
            ))
            .arg("--enable-chrome-logs")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group, so that dropping the Browser can end Chromium too even if
            // chromedriver could not quit it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let mut browser = Browser {
            driver,
            port,
            http: Client::builder(TokioExecutor::new()).build_http(),
            session: None,
            dir,
        };
        browser.wait_ready().await;
        browser.open_session(host_rules).await;
        browser
    }

    async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.driver.try_wait() {
                panic!(
                    "chromedriver exited ({status}) before it was ready\n{}",
                    self.logs()
                );
            }
            match self.call(Method::GET, "/status", None).await {
                Ok(v) if v["ready"] == Value::Bool(true) => return,
                Ok(v) if started.elapsed() >= WAIT => panic!(
                    "chromedriver on port {} was not ready after {WAIT:?}: /status says {v}\n{}",
                    self.port,
                    self.logs()
                ),
                Err(e) if started.elapsed() >= WAIT => panic!(
                    "chromedriver on port {} did not answer /status within {WAIT:?}: {e}\n{}",
                    self.port,
                    self.logs()
                ),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn open_session(&mut self, host_rules: &str) {
        let profile = self.dir.0.join("profile");
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            // An http_proxy in the environment must not take the test's hosts elsewhere.
            "--no-proxy-server".to_owned(),
            format!("--user-data-dir={}", profile.display()),
            format!("--host-resolver-rules={host_rules}"),
        ];
        let ms = u64::try_from(WAIT.as_millis()).expect("a small timeout");
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "pageLoadStrategy": "normal",
                    "timeouts": { "pageLoad": ms, "script": ms, "implicit": 0 },
                    "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
                }
            }
        });
        let value = self
            .call(Method::POST, "/session", Some(capabilities))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver could not start Chromium: {e}\n{}",
                    self.logs()
                )
            });
        let id = value["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in chromedriver's answer: {value}"));
        self.session = Some(id.to_owned());
    }

    /// One WebDriver command; `Ok` with the answer's `value`, or the error chromedriver gave.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WdError> {
        let uri = format!("http://127.0.0.1:{}{path}", self.port);
        let mut request = Request::builder().method(method).uri(&uri);
        let body = match body {
            Some(b) => {
                request = request.header("content-type", "application/json; charset=utf-8");
                Full::new(Bytes::from(b.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request.body(body).expect("a WebDriver request");
        let exchange = async {
            let rsp = self.http.request(request).await.map_err(|e| WdError {
                error: "connection".into(),
                message: format!("{uri}: {e}"),
            })?;
            let status = rsp.status();
            let bytes = rsp
                .into_body()
                .collect()
                .await
                .map_err(|e| WdError {
                    error: "connection".into(),
                    message: format!("{uri}: reading the answer: {e}"),
                })?
                .to_bytes();
            let json: Value = serde_json::from_slice(&bytes).map_err(|e| WdError {
                error: "bad answer".into(),
                message: format!(
                    "{uri}: HTTP {status}, not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                ),
            })?;
            let value = json.get("value").cloned().unwrap_or(Value::Null);
            if status.is_success() {
                Ok(value)
            } else {
                Err(WdError {
                    error: value["error"]
                        .as_str()
                        .unwrap_or("unknown error")
                        .to_owned(),
                    message: value["message"].as_str().unwrap_or_default().to_owned(),
                })
            }
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_) => Err(WdError {
                error: "timeout".into(),
                message: format!("{uri}: no answer within {COMMAND_TIMEOUT:?}"),
            }),
        }
    }

    fn session_path(&self, rest: &str) -> String {
        let id = self.session.as_deref().expect("an open session");
        format!("/session/{id}{rest}")
    }

    /// A command in this session that must succeed; `doing` names it in the failure.
    async fn must(&self, doing: &str, method: Method, rest: &str, body: Option<Value>) -> Value {
        let path = self.session_path(rest);
        match self.call(method, &path, body).await {
            Ok(v) => v,
            Err(e) => panic!("WebDriver failed while {doing}: {e}\n{}", self.logs()),
        }
    }

    /// Navigates and waits for the page's load event.
    pub async fn go(&self, url: &str) {
        self.must(
            &format!("loading {url}"),
            Method::POST,
            "/url",
            Some(json!({ "url": url })),
        )
        .await;
    }

    /// Reloads the page and waits for the load event.
    pub async fn reload(&self) {
        self.must(
            "reloading the page",
            Method::POST,
            "/refresh",
            Some(json!({})),
        )
        .await;
    }

    /// Runs a script (a function body: `return ...`) in the page; its result.
    pub async fn script(&self, script: &str) -> Value {
        self.must(
            &format!("running the script {script:?}"),
            Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Runs a script that must return a string.
    pub async fn script_string(&self, script: &str) -> String {
        match self.script(script).await {
            Value::String(s) => s,
            other => panic!("the script {script:?} returned {other}, not a string"),
        }
    }

    /// The first element matching a CSS selector, or the error (`no such element` while absent).
    pub async fn find(&self, css: &str) -> Result<String, WdError> {
        let path = self.session_path("/element");
        let value = self
            .call(
                Method::POST,
                &path,
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        value[ELEMENT]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| WdError {
                error: "bad answer".into(),
                message: format!("no element reference in {value}"),
            })
    }

    /// Clicks an element the way a user would (WebDriver Element Click: scrolled into view, the
    /// pointer pressed and released over its centre).
    pub async fn click(&self, element: &str) {
        self.must(
            "clicking an element",
            Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Runs a script with arguments (`arguments[0]`, ...); its result.
    pub async fn script_with(&self, script: &str, args: Value) -> Value {
        self.must(
            "running a script with arguments",
            Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Performs WebDriver actions (real input events: pointer presses, keys) and releases them.
    pub async fn actions(&self, actions: Value) {
        self.must(
            "performing input actions",
            Method::POST,
            "/actions",
            Some(json!({ "actions": actions })),
        )
        .await;
        self.must("releasing input actions", Method::DELETE, "/actions", None)
            .await;
    }

    /// An element's DOM property (`textContent`, `href`, ...).
    pub async fn property(&self, element: &str, name: &str) -> Value {
        self.must(
            &format!("reading the property {name}"),
            Method::GET,
            &format!("/element/{element}/property/{name}"),
            None,
        )
        .await
    }

    /// An element's attribute, `None` when it has none.
    pub async fn attribute(&self, element: &str, name: &str) -> Option<String> {
        self.must(
            &format!("reading the attribute {name}"),
            Method::GET,
            &format!("/element/{element}/attribute/{name}"),
            None,
        )
        .await
        .as_str()
        .map(str::to_owned)
    }

    /// Ends the session (Chromium quits) and chromedriver.
    pub async fn quit(mut self) {
        if let Some(id) = self.session.take() {
            if let Err(e) = self
                .call(Method::DELETE, &format!("/session/{id}"), None)
                .await
            {
                panic!("could not end the browser session: {e}\n{}", self.logs());
            }
        }
        // Drop ends chromedriver.
    }

    /// The end of chromedriver's output and log, for failure messages.
    pub fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.0.join(name)).unwrap_or_default();
        format!(
            "--- chromedriver output (end) ---\n{}\n--- chromedriver log, with Chromium's (end) ---\n{}\n---",
            tail(&read("chromedriver.out"), 20),
            tail(&read("chromedriver.log"), 40),
        )
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A test that failed midway: ask chromedriver to quit Chromium (blocking, bounded) ...
        if let Some(id) = self.session.take() {
            delete_session_blocking(self.port, &id);
        }
        // ... then end chromedriver's process group (chromedriver, and Chromium if it is still
        // there). The child is not reaped yet, so its id cannot have been reused.
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `DELETE /session/{id}` with plain blocking I/O, for use in `Drop`.
fn delete_session_blocking(port: u16, id: &str) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let request = format!(
        "DELETE /session/{id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_ok() {
        // chromedriver answers once Chromium has quit; the first bytes of the answer are enough
        // (it may keep the connection open, so reading to the end could wait for the timeout).
        let mut first = [0u8; 512];
        let _ = stream.read(&mut first);
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    listener.local_addr().expect("its address").port()
}
