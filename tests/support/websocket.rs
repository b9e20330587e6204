//! A WebSocket echo origin (tokio-tungstenite on a raw listener) that records each handshake
//! request, and a raw client handshake for header forms tungstenite's client does not send.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use http::HeaderMap;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

use super::{read_head, within};

/// A running echo origin: every text or binary message comes back as it was sent.
pub struct EchoOrigin {
    pub addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<HeaderMap>>>,
}

impl EchoOrigin {
    /// The headers of every handshake request received so far, in order.
    pub fn handshakes(&self) -> Vec<HeaderMap> {
        self.handshakes.lock().unwrap().clone()
    }
}

/// Binds `127.0.0.1:0` and echoes WebSocket messages until the test ends.
pub async fn echo_origin() -> EchoOrigin {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let handshakes = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&handshakes);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                // The callback's error type is tungstenite's, large or not.
                #[allow(clippy::result_large_err)]
                let record = |req: &Request, rsp: Response| {
                    log.lock().unwrap().push(req.headers().clone());
                    Ok(rsp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_close() {
                        return;
                    }
                    let echo = message.is_text() || message.is_binary();
                    if echo && ws.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    EchoOrigin { addr, handshakes }
}

/// The `Sec-WebSocket-Key` of RFC 6455's example handshake, and the accept value it must get.
pub const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Sends `head` (a complete request head, blank line included) and reads the response head, so
/// that the stream is left at the first byte of the upgraded protocol.
pub async fn raw_handshake(addr: SocketAddr, head: &str) -> (String, TcpStream) {
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    stream
        .write_all(head.as_bytes())
        .await
        .expect("write the request head");
    let response = read_head(&mut stream).await;
    (response, stream)
}
