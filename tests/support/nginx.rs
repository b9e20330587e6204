//! A real nginx as the origin, for the behaviours our own test origins would not show (its
//! HTTP/2 rules, its idea of a duplicate Host). Debian's nginx is installed with apt-get when it
//! is missing and the tests run as root on a machine with apt-get; otherwise the test fails with
//! the command to run. Never skipped. Each nginx runs in the foreground, one process, with its
//! configuration, pid file, logs and temp paths in a directory of its own, and is killed when
//! dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use super::pki::TempDir;
use super::within;

const INSTALL: &str = "apt-get update && apt-get install -y nginx";

fn find() -> Option<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// The nginx binary, installed first if need be.
pub fn binary() -> &'static str {
    static FOUND: OnceLock<Result<&'static str, String>> = OnceLock::new();
    match FOUND.get_or_init(|| {
        if let Some(path) = find() {
            return Ok(path);
        }
        let root = std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .is_some_and(|euid| euid == "0");
        if !root || !Path::new("/usr/bin/apt-get").exists() {
            return Err(format!(
                "these tests need a real nginx and install it only as root with apt-get; \
                 install it with:\n\n    sudo sh -c '{INSTALL}'"
            ));
        }
        eprintln!("nginx missing; installing with `{INSTALL}` ...");
        for args in [&["update"][..], &["install", "-y", "nginx"][..]] {
            let out = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run apt-get: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "`apt-get {}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        find().ok_or_else(|| format!("`{INSTALL}` left no nginx binary"))
    }) {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

/// A running nginx.
pub struct Nginx {
    pub addr: SocketAddr,
    child: Child,
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx with one `server` listening on a free loopback port: `listen` is what goes
    /// after the address on the `listen` line (`"ssl http2"`, say), `body` the rest of the
    /// server block, where `{dir}` stands for nginx's own directory. `files` are written there
    /// first, as `(name, contents)`.
    pub async fn start(listen: &str, body: &str, files: &[(&str, &[u8])]) -> Nginx {
        let bin = binary();
        let dir = TempDir::new("nginx");
        for (name, contents) in files {
            dir.write(name, contents);
        }
        // A free port: bound and released, then nginx binds it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let d = dir.path().display();
        let body = body.replace("{dir}", &d.to_string());
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen {addr} {listen};\n{body}\n  }}\n}}\n"
        );
        let conf_path = dir.write("nginx.conf", conf);
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx { addr, child, dir };
        within("nginx to accept connections", async {
            loop {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return;
                }
                if let Ok(Some(status)) = nginx.child.try_wait() {
                    panic!(
                        "nginx exited ({status}): {}",
                        std::fs::read_to_string(nginx.dir.path().join("error.log"))
                            .unwrap_or_default()
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        nginx
    }

    /// nginx's error log so far (its reasons for a 400, say).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
