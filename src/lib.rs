//! kmi-proxy: a streaming reverse proxy that carries a KISSmetrics visitor ID across domains by
//! adding `kmi=<id>` to links that point at configured partner sites.
//!
//! The modules in reading order:
//! - [`config`]: `config.toml` → validated [`config::Config`]; nothing else sees raw configuration.
//! - [`request`]: the request head as the edge accepts it (authority, framing, upgrades). Pure.
//! - [`identity`]: request cookies → [`identity::VisitorId`]. Pure.
//! - [`partner`]: partner domain patterns and host matching. Pure.
//! - [`decorate`]: one href + ID → decorated href. Pure.
//! - [`charset`]: how a page's bytes are read (byte order mark, header, `<meta>`). Pure.
//! - [`csp`]: Content Security Policy: may the injected script run on this page, and how. Pure.
//! - [`script`]: the click-time link script: generated from the configuration, never holding an
//!   ID, and the tag written into a page. Pure.
//! - [`rewrite`]: the streaming HTML rewriter, the only module that knows lol_html.
//! - [`splice`]: parse once, splice per visitor: recordings of rewrites, replayed with each
//!   visitor's ID after every byte is verified.
//! - [`pack`]: a recording's output compressed once, in pieces any visitor's ID fits between
//!   (raw deflate on sync flushes, CRC-32 combined). Pure.
//! - [`headers`]: hop-by-hop, forwarding and cache-safety header rules. Pure.
//! - [`proxy`]: one request through the origin and back; decides what gets rewritten.
//! - [`body`]: response bodies, passed through or rewritten, streamed frame by frame.
//! - [`access_log`]: the per-request log line.
//! - [`server`]: listeners, connections, graceful shutdown.
//! - [`tunnel`]: WebSocket tunnels after a `101`: counted, idle-timed, drained.
//! - [`demo`]: the built-in demo origin behind `kmi-proxy demo`.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod body;
pub mod charset;
pub mod coding;
pub mod config;
pub mod consent;
pub mod csp;
pub mod decorate;
pub mod demo;
pub mod headers;
pub mod identity;
pub mod metrics;
pub mod pack;
pub mod partner;
pub mod paths;
pub mod proxy;
pub mod request;
pub mod rewrite;
pub mod script;
pub mod segments;
pub mod server;
pub mod splice;
pub mod tls;
pub mod tunnel;
pub mod upstream;
