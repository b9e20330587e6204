//! Response bodies on their way to the client: passed through frame by frame, or streamed through
//! a [`PageRewriter`]. Never collected whole. Each body carries the request's access-log record,
//! written when the body is finished or dropped, so the log line knows the bytes sent and the
//! links decorated.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::access_log::AccessLog;
use crate::coding::{Coding, Decoder, Encoder};
use crate::splice::Splicer;
use crate::upstream::UpstreamBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the proxy sends.
pub struct ResponseBody {
    kind: Kind,
    log: Option<AccessLog>,
}

enum Kind {
    /// A body made by the proxy itself (an error page); `None` once sent.
    Full(Option<Bytes>),
    /// The origin's body, untouched.
    Passthrough(UpstreamBody),
    /// The origin's body through the rewriter.
    Rewrite(Box<Rewriting>),
}

struct Rewriting {
    upstream: UpstreamBody,
    rewriter: Splicer,
    /// For a compressed page: the origin's coding undone before the rewriter, redone after it.
    codec: Option<(Decoder, Encoder)>,
    /// Trailers from the origin, held until the rewriter's last bytes are out.
    trailers: Option<http::HeaderMap>,
    ended: bool,
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>, log: AccessLog) -> ResponseBody {
        ResponseBody {
            kind: Kind::Full(Some(bytes.into())),
            log: Some(log),
        }
    }

    /// An empty body with no access-log record of its own (a `101`, whose tunnel logs itself).
    pub fn empty() -> ResponseBody {
        ResponseBody {
            kind: Kind::Full(None),
            log: None,
        }
    }

    pub fn passthrough(body: UpstreamBody, log: AccessLog) -> ResponseBody {
        ResponseBody {
            kind: Kind::Passthrough(body),
            log: Some(log),
        }
    }

    pub fn rewrite(
        body: UpstreamBody,
        rewriter: Splicer,
        coding: Option<Coding>,
        log: AccessLog,
    ) -> ResponseBody {
        ResponseBody {
            kind: Kind::Rewrite(Box::new(Rewriting {
                upstream: body,
                rewriter,
                codec: coding.map(|c| (Decoder::new(c), Encoder::new(c))),
                trailers: None,
                ended: false,
            })),
            log: Some(log),
        }
    }

    /// Keeps `guard` alive until this body is done (see [`AccessLog::hold`]).
    pub fn hold(&mut self, guard: Box<dyn Send + Sync>) {
        if let Some(log) = self.log.as_mut() {
            log.hold(guard);
        }
    }

    fn count(&mut self, frame: &Frame<Bytes>) {
        if let (Some(log), Some(data)) = (self.log.as_mut(), frame.data_ref()) {
            log.bytes_out += data.len() as u64;
        }
    }

    fn finish(&mut self, outcome: &'static str) {
        let upstream_bytes = match &self.kind {
            Kind::Full(_) => 0,
            Kind::Passthrough(body) => body.received,
            Kind::Rewrite(r) => r.upstream.received,
        };
        if let Some(mut log) = self.log.take() {
            log.body_outcome = outcome;
            log.bytes_upstream = upstream_bytes;
            drop(log);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Passthrough(body) => Pin::new(body).poll_frame(cx),
            Kind::Rewrite(r) => r.poll_rewritten(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.count(frame);
                // hyper stops polling once a body says it has ended, so log completion here.
                if this.is_end_stream() {
                    this.finish("complete");
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let kind = if e.is::<crate::upstream::BodyIdle>() {
                    "body_idle"
                } else {
                    "reset"
                };
                if let Some(log) = this.log.as_mut() {
                    log.upstream_error = Some(kind);
                }
                this.finish("upstream_error");
            }
            Poll::Ready(None) => this.finish("complete"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Passthrough(body) => body.is_end_stream(),
            Kind::Rewrite(r) => r.ended && r.trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Passthrough(body) => body.size_hint(),
            // A rewritten page's length is unknown until its end: hyper sends it chunked.
            Kind::Rewrite(_) => SizeHint::default(),
        }
    }
}

impl Rewriting {
    fn poll_rewritten(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.ended {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let out = match std::task::ready!(Pin::new(&mut self.upstream).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.write(&data),
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.trailers = Some(trailers);
                        }
                        continue;
                    }
                },
                // The origin's body broke off: end the client's response with an error too, so
                // it is never mistaken for a complete page.
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    self.ended = true;
                    self.end()
                }
            };
            match out {
                Ok(out) if out.is_empty() => {}
                Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                // A corrupt or truncated compressed body: the client's response ends in an error.
                Err(e) => {
                    self.ended = true;
                    self.trailers = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<Bytes> {
        match &mut self.codec {
            None => Ok(self.rewriter.write(data)),
            Some((decoder, encoder)) => {
                let plain = decoder.write(data)?;
                let out = self.rewriter.write(&plain);
                if out.is_empty() {
                    // Nothing to flush: an empty flush would still cost a few bytes on the wire.
                    return Ok(out);
                }
                encoder.write(&out)
            }
        }
    }

    fn end(&mut self) -> std::io::Result<Bytes> {
        match &mut self.codec {
            None => Ok(self.rewriter.end()),
            Some((decoder, encoder)) => {
                let plain = decoder.finish()?;
                let mut out = bytes::BytesMut::from(&self.rewriter.write(&plain)[..]);
                out.extend_from_slice(&self.rewriter.end());
                let mut compressed = bytes::BytesMut::from(&encoder.write(&out)?[..]);
                compressed.extend_from_slice(&encoder.finish()?);
                Ok(compressed.freeze())
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (not an error of ours) or hyper gave up.
        // A body that was empty from the start (HEAD, 204) is complete without being polled.
        let outcome = if self.is_end_stream() {
            "complete"
        } else {
            "client_gone"
        };
        self.finish(outcome);
    }
}
