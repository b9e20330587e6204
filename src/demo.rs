//! The built-in demo: a tiny origin serving the pages of `fixtures/demo/` (compiled in, so the
//! demo works from any directory) and the configuration that puts kmi-proxy in front of it.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError};

const INDEX: &str = include_str!("../fixtures/demo/index.html");
const ABOUT: &str = include_str!("../fixtures/demo/about.html");

/// The demo's partners, as an operator would write them.
pub fn config(listen: SocketAddr, origin: SocketAddr) -> Result<Config, ConfigError> {
    let text = format!(
        r#"
listen = "{listen}"
upstream = "http://{origin}"

[[partner]]
name = "checkout"
domains = ["checkout.partner.example", "*.shop.partner.example"]
"#
    );
    Config::parse(&text, "demo configuration")
}

/// Starts the demo origin on `127.0.0.1:0` and returns its address.
pub async fn start_origin() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(page(req.uri().path()))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn page(path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/" | "/index.html" => (StatusCode::OK, INDEX),
        "/about" => (StatusCode::OK, ABOUT),
        _ => (
            StatusCode::NOT_FOUND,
            "<!DOCTYPE html><title>Not found</title><p>Not found. <a href=\"/\">Home</a></p>\n",
        ),
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "public, max-age=60")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response")
}
