//! Response bodies on their way to the client: passed through frame by frame, or streamed through
//! a [`Splicer`] (a parse, a recording, or a splice of one). Never collected whole: a compressed page is decoded one bounded slice per
//! poll, so no step holds more than a slice of it, however far it inflates. Each body carries the
//! request's access-log record, written when the body is finished or dropped, so the log line
//! knows the bytes sent and the links decorated.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::access_log::AccessLog;
use crate::coding::{self, Coding, DecodeError, Decoder, Encoder};
use crate::segments::Segments;
use crate::splice::{Splicer, WireStep};
use crate::upstream::UpstreamBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a page waits for a rewrite slot before it is sent as the origin sent it.
pub const REWRITE_WAIT: Duration = Duration::from_secs(1);

/// Compressed bytes kept back until the decoder has produced its first output: if the body turns
/// out not to be in its coding at all, these are sent as they came instead of failing.
const HOLD_LIMIT: usize = 64 * 1024;

/// A compressed page whose origin sends nothing for this long gives its decoder's state back
/// until the next bytes come ([`Decoder::park`]): a stream held open by a slow origin costs its
/// compressed bytes so far instead of the decoder's windows and tables. Long enough that a page
/// streaming normally never parks, short enough that a pause of a second is already cheap.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

/// The global budget of concurrent rewrites: a page takes a slot before its first byte is read
/// and gives it back when its body is done. Past the budget pages queue (fairly, in order); one
/// that waits longer than its wait limit is passed through unmodified rather than failed, since
/// an undecorated page is a lesser harm than a stalled one.
#[derive(Clone)]
pub struct RewriteBudget {
    permits: Arc<Semaphore>,
    wait: Duration,
}

impl RewriteBudget {
    pub fn new(rewrites: usize, wait: Duration) -> RewriteBudget {
        RewriteBudget {
            permits: Arc::new(Semaphore::new(rewrites)),
            wait,
        }
    }
}

type Acquiring = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

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
    /// The origin's body has ended.
    upstream_done: bool,
    rewriter: Splicer,
    /// The page's content coding; its codec is made once the page has a rewrite slot, so a page
    /// waiting in the queue holds no codec state.
    coding: Option<Coding>,
    codec: Option<Box<Codec>>,
    /// An uncompressed page's bytes received but not yet rewritten: fed one slice per step, so
    /// a large frame from the origin neither takes one long step nor grows the rewriter's output
    /// buffer to the frame's size.
    unread: Bytes,
    /// Waiting for a rewrite slot (`None` once it has one or gave up).
    acquiring: Option<Acquiring>,
    /// The rewrite slot, held until the body is done.
    permit: Option<OwnedSemaphorePermit>,
    /// The rest of the origin's body goes through untouched (after any bytes held back).
    passthrough: bool,
    /// Why the page went out as the origin sent it after all, for the access log.
    gave_up: Option<&'static str>,
    /// Trailers from the origin, held until the rewriter's last bytes are out.
    trailers: Option<http::HeaderMap>,
    /// The compressed body is being compared with a recording's as it comes
    /// ([`Splicer::write_wire`]), not decoded.
    wire: bool,
    ended: bool,
    /// An uncompressed page sent compressed (see `proxy::Exchange::accepts`): everything that
    /// goes out, rewritten or passed through, goes through it.
    encoder: Option<Encoder>,
}

/// A compressed page's coding undone before the rewriter and redone after it.
struct Codec {
    coding: Coding,
    /// Made at the first compressed byte to decode: a body compared compressed with a
    /// recording ([`Rewriting::wire`]) never needs one unless it differs.
    decoder: Option<Decoder>,
    encoder: Encoder,
    /// Compressed bytes received but not yet decoded.
    pending: Bytes,
    /// The decoder may have more to give: call it again before reading from the origin.
    more: bool,
    /// The origin's bytes so far, until the decoder has produced output (see [`HOLD_LIMIT`]).
    held: Option<BytesMut>,
    /// Fires once the origin has been quiet for [`PARK_AFTER`]; made at the first pause.
    park: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Decoded bytes to drop before the rewriter sees any: what a compressed comparison had
    /// already verified when the body turned out to differ.
    skip: u64,
}

impl Codec {
    fn new(coding: Coding) -> Codec {
        Codec {
            coding,
            decoder: None,
            encoder: Encoder::new(coding),
            pending: Bytes::new(),
            more: false,
            held: Some(BytesMut::new()),
            park: None,
            skip: 0,
        }
    }

    fn decoder(&mut self) -> &mut Decoder {
        let coding = self.coding;
        self.decoder.get_or_insert_with(|| Decoder::new(coding))
    }

    /// The origin has nothing for us now: once it has been quiet for [`PARK_AFTER`], give the
    /// decoder's state back. Registers the waker with the timer until then.
    fn pause(&mut self, cx: &mut Context<'_>) {
        let can_park = self.decoder.as_ref().is_some_and(Decoder::can_park);
        if !can_park || self.more {
            self.park = None;
            return;
        }
        let timer = self
            .park
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(PARK_AFTER)));
        if timer.as_mut().poll(cx).is_ready() {
            self.decoder().park();
            self.park = None;
        }
    }

    /// Takes a frame of compressed bytes from the origin.
    fn take(&mut self, data: Bytes) {
        if let Some(held) = &mut self.held {
            if held.len() + data.len() <= HOLD_LIMIT {
                held.extend_from_slice(&data);
            } else {
                // The decoder has read this far without output or error: commit to decoding.
                self.held = None;
            }
        }
        // The origin is only read once the decoder has used up everything before.
        debug_assert!(self.pending.is_empty());
        if let Some(timer) = &mut self.park {
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + PARK_AFTER);
        }
        self.pending = data;
        self.more = true;
    }

    /// The next slice of decoded page (empty once the pending input is used up).
    fn decode(&mut self) -> Result<Bytes, DecodeError> {
        loop {
            let mut pending = std::mem::take(&mut self.pending);
            let mut rest = &pending[..];
            let slice = self.decoder().decode(&mut rest);
            let used = pending.len() - rest.len();
            let _ = pending.split_to(used);
            self.pending = pending;
            let mut slice = slice?;
            if slice.is_empty() {
                self.more = false;
                return Ok(slice);
            }
            self.held = None;
            if self.skip > 0 {
                let dropped = self.skip.min(slice.len() as u64);
                self.skip -= dropped;
                let _ = slice.split_to(dropped as usize);
                if slice.is_empty() {
                    continue;
                }
            }
            return Ok(slice);
        }
    }

    /// Compressed bytes used and page bytes given so far.
    fn progress(&self) -> (u64, u64) {
        self.decoder
            .as_ref()
            .map_or((0, 0), |d| (d.compressed(), d.decoded()))
    }

    /// Whether the body could still be sent as the origin sent it: nothing decoded yet, and all
    /// of it held.
    fn can_pass_through(&self) -> bool {
        self.held.is_some() && self.decoder.as_ref().map_or(true, |d| d.decoded() == 0)
    }
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

    /// A page through the rewriter, once it has a slot in `budget`.
    pub fn rewrite(
        body: UpstreamBody,
        rewriter: Splicer,
        coding: Option<Coding>,
        encode: Option<Coding>,
        budget: &RewriteBudget,
        log: AccessLog,
    ) -> ResponseBody {
        let (permit, acquiring) = match Arc::clone(&budget.permits).try_acquire_owned() {
            Ok(permit) => (Some(permit), None),
            Err(_) => {
                let (permits, wait) = (Arc::clone(&budget.permits), budget.wait);
                let acquiring: Acquiring = Box::pin(async move {
                    tokio::time::timeout(wait, permits.acquire_owned())
                        .await
                        .ok()
                        .and_then(Result::ok)
                });
                (None, Some(acquiring))
            }
        };
        ResponseBody {
            kind: Kind::Rewrite(Box::new(Rewriting {
                upstream: body,
                upstream_done: false,
                rewriter,
                coding,
                codec: None,
                unread: Bytes::new(),
                acquiring,
                permit,
                passthrough: false,
                gave_up: None,
                trailers: None,
                wire: false,
                ended: false,
                encoder: encode.map(Encoder::new),
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

    fn count(&mut self, frame: &Frame<Segments>) {
        if let (Some(log), Some(data)) = (self.log.as_mut(), frame.data_ref()) {
            log.bytes_out += data.len() as u64;
        }
    }

    /// A passed-through body whose declared length has all been received (and handed on).
    fn length_reached(&self) -> bool {
        match &self.kind {
            Kind::Passthrough(body) => body.size_hint().exact() == Some(0) && body.received > 0,
            _ => false,
        }
    }

    fn finish(&mut self, outcome: &'static str) {
        let upstream_bytes = match &self.kind {
            Kind::Full(_) => 0,
            Kind::Passthrough(body) => body.received,
            Kind::Rewrite(r) => r.upstream.received,
        };
        if let (Kind::Rewrite(r), Some(log)) = (&self.kind, self.log.as_mut()) {
            if let Some(why) = r.gave_up {
                log.rewrite = why;
            }
        }
        if let Some(mut log) = self.log.take() {
            log.body_outcome = outcome;
            log.bytes_upstream = upstream_bytes;
            drop(log);
        }
    }
}

impl Body for ResponseBody {
    type Data = Segments;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Segments>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b.into())))),
            Kind::Passthrough(body) => Pin::new(body)
                .poll_frame(cx)
                .map_ok(|frame| frame.map_data(Segments::from)),
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
                } else if let Some(e) = e.downcast_ref::<DecodeError>() {
                    tracing::warn!(target: "kmi_proxy::upstream", kind = e.kind.as_str(), "{e}");
                    e.kind.as_str()
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
    ) -> Poll<Option<Result<Frame<Segments>, BoxError>>> {
        if let Some(acquiring) = &mut self.acquiring {
            let permit = std::task::ready!(acquiring.as_mut().poll(cx));
            self.acquiring = None;
            match permit {
                Some(p) => self.permit = Some(p),
                None => self.give_up("rewrite_budget"),
            }
        }
        loop {
            if self.ended {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if self.passthrough {
                return self.poll_passthrough(cx);
            }
            if self.codec.is_none() {
                if let Some(coding) = self.coding {
                    let mut codec = Box::new(Codec::new(coding));
                    self.wire = self.rewriter.compressed(coding);
                    if self.wire {
                        // What is sent comes from a recording from the first byte on, so the
                        // origin's bytes can no longer be sent as they came.
                        codec.held = None;
                    }
                    self.codec = Some(codec);
                }
            }
            if !self.unread.is_empty() {
                let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                coop.made_progress();
                let piece = self.unread.split_to(self.unread.len().min(coding::SLICE));
                let out = match &mut self.encoder {
                    Some(encoder) => match self.rewriter.write_encoded(&piece, encoder) {
                        Ok(out) => out.into(),
                        Err(e) => return self.fail(e),
                    },
                    None => self.rewriter.write_segments(&piece),
                };
                if !out.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                continue;
            }
            if let Some(codec) = self.codec.as_mut().filter(|c| c.more) {
                // One slice per step, and a step counts against the task's cooperative budget:
                // a page that inflates without end yields to other requests on this thread
                // instead of holding it while it decodes.
                let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                coop.made_progress();
                let plain = codec.decode();
                let (used, given) = codec.progress();
                self.rewriter.wire_mark(used, given);
                let plain = match plain {
                    Ok(plain) => plain,
                    Err(e) if codec.can_pass_through() => {
                        tracing::debug!("page sent as the origin sent it: {e}");
                        self.give_up("undecodable");
                        continue;
                    }
                    Err(e) => return self.fail(e),
                };
                if plain.is_empty() {
                    continue;
                }
                match self.rewriter.write_encoded(&plain, &mut codec.encoder) {
                    Ok(out) if out.is_empty() => continue,
                    Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out.into())))),
                    Err(e) => return self.fail(e),
                }
            }
            if self.upstream_done {
                // The origin's body ended while compared compressed and differed at its end:
                // what was left to decode is done.
                return match self.end() {
                    Ok(out) if out.is_empty() => continue,
                    Ok(out) => Poll::Ready(Some(Ok(Frame::data(out)))),
                    Err(e) => self.fail(e),
                };
            }
            let polled = Pin::new(&mut self.upstream).poll_frame(cx);
            let Poll::Ready(polled) = polled else {
                if let Some(codec) = &mut self.codec {
                    codec.pause(cx);
                }
                return Poll::Pending;
            };
            let out = match polled {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match &mut self.codec {
                        Some(codec) if self.wire => {
                            let step = self.rewriter.write_wire(&data, &mut codec.encoder);
                            match step {
                                Ok(WireStep::Verified(out)) => out.into(),
                                Ok(WireStep::Decode {
                                    out,
                                    redo,
                                    from,
                                    skip,
                                }) => {
                                    self.wire = false;
                                    codec.skip = skip;
                                    let mut again =
                                        BytesMut::with_capacity(redo.len() + data.len());
                                    again.extend_from_slice(&redo);
                                    again.extend_from_slice(&data[from..]);
                                    codec.take(again.freeze());
                                    out.into()
                                }
                                Err(e) => return self.fail(e),
                            }
                        }
                        Some(codec) => {
                            self.rewriter.wire_taken(&data);
                            codec.take(data);
                            continue;
                        }
                        None => {
                            self.unread = data;
                            continue;
                        }
                    },
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
                    self.upstream_done = true;
                    match self.end() {
                        Ok(out) => out,
                        Err(e) => return self.fail(e),
                    }
                }
            };
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
    }

    /// The rest of the page goes out as the origin sends it: first anything held back, then the
    /// origin's frames.
    fn poll_passthrough(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Segments>, BoxError>>> {
        if let Some(held) = self.codec.take().and_then(|c| c.held) {
            if !held.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(held.freeze().into()))));
            }
        }
        if self.upstream_done {
            self.ended = true;
            return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        let polled = std::task::ready!(Pin::new(&mut self.upstream).poll_frame(cx));
        if let Some(encoder) = &mut self.encoder {
            // The response already says it is compressed: the origin's bytes are, too.
            let out = match polled {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => encoder.write(&data),
                    Err(frame) => {
                        self.trailers = frame.into_trailers().ok();
                        Ok(Bytes::new())
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    self.upstream_done = true;
                    encoder.finish()
                }
            };
            return match out {
                Ok(out) => Poll::Ready(Some(Ok(Frame::data(out.into())))),
                Err(e) => self.fail(e),
            };
        }
        if polled.is_none() {
            self.upstream_done = true;
            self.ended = true;
        }
        Poll::Ready(polled.map(|frame| frame.map(|frame| frame.map_data(Segments::from))))
    }

    /// Stops rewriting: the page goes out as the origin sent it, and the slot is free for
    /// another page.
    fn give_up(&mut self, why: &'static str) {
        self.passthrough = true;
        self.gave_up = Some(why);
        self.permit = None;
    }

    /// A corrupt, truncated or runaway compressed body: the client's response ends in an error,
    /// so it is never mistaken for a complete page.
    fn fail(&mut self, e: impl Into<BoxError>) -> Poll<Option<Result<Frame<Segments>, BoxError>>> {
        self.ended = true;
        self.trailers = None;
        self.codec = None;
        self.permit = None;
        Poll::Ready(Some(Err(e.into())))
    }

    /// The origin's body has ended: the rewriter's and the encoder's last bytes.
    fn end(&mut self) -> Result<Segments, BoxError> {
        let Some(codec) = self.codec.as_mut() else {
            self.ended = true;
            self.permit = None;
            return match &mut self.encoder {
                Some(encoder) => Ok(self.rewriter.end_encoded(encoder)?.into()),
                None => Ok(self.rewriter.end_segments()),
            };
        };
        if self.wire {
            self.wire = false;
            match self.rewriter.end_wire(&mut codec.encoder)? {
                WireStep::Verified(out) => {
                    self.ended = true;
                    self.permit = None;
                    self.codec = None;
                    return Ok(out.into());
                }
                // Shorter than the recording: decode what was verified, then end as usual
                // (a compressed stream cut short ends the response with an error).
                WireStep::Decode {
                    out, redo, skip, ..
                } => {
                    codec.skip = skip;
                    codec.take(redo);
                    return Ok(out.into());
                }
            }
        }
        if let Err(e) = codec.decoder().finish() {
            if codec.can_pass_through() {
                tracing::debug!("page sent as the origin sent it: {e}");
                self.give_up("undecodable");
                return Ok(Segments::default());
            }
            return Err(e.into());
        }
        self.ended = true;
        self.permit = None;
        let out = self.rewriter.end_encoded(&mut codec.encoder)?;
        self.codec = None;
        Ok(out.into())
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (not an error of ours) or hyper gave up.
        // A body that was empty from the start (HEAD, 204) is complete without being polled, and
        // so is one whose every declared byte has been sent: hyper stops polling a body once its
        // `Content-Length` is reached, before an HTTP/2 origin's END_STREAM may have arrived.
        let outcome = if self.is_end_stream() || self.length_reached() {
            "complete"
        } else {
            "client_gone"
        };
        self.finish(outcome);
    }
}
