//! The `kmi-proxy` binary as a child process, for the benches that measure it from outside
//! (`memory`, `pressure`, `recordings`): started on a free loopback port with a configuration
//! file of the bench's making, waited for until it accepts, read through `/proc/<pid>/status`,
//! and killed when dropped so that no path leaves it running. Also what those benches share
//! around it: a scratch directory, the runtime, and how a run ends.
#![allow(dead_code)] // each bench uses a different part of it

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// A loopback address that was free a moment ago: bound, read, released.
pub fn free_port() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// The proxy under test.
pub struct ProxyProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ProxyProcess {
    /// Writes `config(listen address)` to `dir/config.toml` and starts the binary with it, its
    /// log at `rust_log` level on this process's stderr.
    pub fn start(
        dir: &Path,
        config: impl FnOnce(SocketAddr) -> String,
        rust_log: &str,
    ) -> Result<ProxyProcess, String> {
        let addr = free_port()?;
        let path = dir.join("config.toml");
        std::fs::write(&path, config(addr))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        let child = Command::new(env!("CARGO_BIN_EXE_kmi-proxy"))
            .arg("--config")
            .arg(&path)
            .arg("run")
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting kmi-proxy: {e}"))?;
        let mut proxy = ProxyProcess { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(proxy.addr).is_err() {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                return Err(format!("kmi-proxy exited before listening ({status})"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kmi-proxy not accepting on {} after 10 s",
                    proxy.addr
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(proxy)
    }

    /// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> Result<u64, String> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {field} in {path}"))
    }

    /// The same field in MiB.
    pub fn status_mib(&self, field: &str) -> Result<f64, String> {
        Ok(self.status_kib(field)? as f64 / 1024.0)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory of this bench run's own under cargo's temp dir, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(label: &str) -> Result<Scratch, String> {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{label}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The runtime the benches' origins and clients run on: two workers, as the machine has cores.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting tokio: {e}"))
}

/// The problems a run found, as its outcome: none is success.
pub fn outcome(problems: Vec<String>) -> Result<(), String> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n  "))
    }
}

/// The exit code of bench `name`; a failure is printed first.
pub fn exit(name: &str, outcome: Result<(), String>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name} bench FAILED:\n  {e}");
            ExitCode::FAILURE
        }
    }
}
