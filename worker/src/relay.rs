//! Relaying an upstream SSE body to the client while reading it for billing.
//!
//! The upstream body is `tee()`d, and the gateway reads one branch, the *copy*, with a BYOB reader. The other
//! branch is drained by the runtime: while it is, the copy accumulates, so a read made after a short pause takes
//! every event that arrived meanwhile (into wasm once per read, not once per event; a body read directly would
//! hand out one event per read however late it is read). What drains the other branch is the [`Delivery`]:
//!
//! - [`Delivery::Native`], for a stream that needs no edit (the client asked for `stream_options.include_usage`,
//!   so OpenRouter's usage-only chunk is what it wants): the runtime pipes the branch into the client's response
//!   body with no JS or wasm per event. The gateway cannot write into it, so where the edited relay adds an
//!   error event the client sees what the upstream sent, then the end: an upstream silent for
//!   `UPSTREAM_TIMEOUT_SECONDS` is aborted and the client's stream ends there; one that breaks before `[DONE]`
//!   ends the client's stream where it broke, both without `[DONE]` and without a finish reason (the runtime ends
//!   a body that failed like one that finished: workerd writes the last chunk and closes the connection); data
//!   that is not JSON reaches the client as sent.
//! - [`Delivery::Edited`], for the others (the usage-only chunk must be removed, malformed data replaced by an
//!   error event, a cut-off told): the branch is drained into a native sink, and what the client receives is
//!   what the gateway writes, one write per read of the copy, into an `IdentityTransformStream`: the read's bytes
//!   as they came when the scanner changed nothing, else the scanner's rewrite.
//!
//! Knowing that the client left: the runtime notices a closed connection only when it writes to it. The relay
//! hears of it from `request.signal` (both deliveries) and from a failed write (edited). While the upstream is
//! silent nothing is written, so the edited relay writes an SSE comment (`: keep-alive`, which clients ignore)
//! after [`HEARTBEAT_INTERVAL`] of silence, so that there is a write to fail. Not every closed connection makes a
//! write fail, so nothing depends on it: the upstream idle timeout bounds the relay either way.

use std::cell::RefCell;
use std::future::Future;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::future::{select, Either};
use js_sys::{Array, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{AbortSignal, ReadableStream, WritableStream, WritableStreamDefaultWriter};
use worker::{AbortController, Delay};

use crate::bindings::{now_ms, within};
use crate::endpoint::Endpoint;
use crate::error::ApiError;
use crate::sse::{Output, SseScanner, StreamSummary};

/// How a relayed stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// `[DONE]` arrived.
    Done,
    /// The upstream sent its own error event.
    UpstreamError,
    /// The upstream closed, broke or went silent before finishing.
    CutOff,
    /// The upstream sent data that is not valid SSE/JSON.
    Malformed,
    /// The client went away.
    ClientAbort,
}

impl StreamEnd {
    pub fn label(self) -> &'static str {
        match self {
            StreamEnd::Done => "done",
            StreamEnd::UpstreamError => "upstream_error",
            StreamEnd::CutOff => "cut_off",
            StreamEnd::Malformed => "malformed",
            StreamEnd::ClientAbort => "client_abort",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RelayOutcome {
    pub summary: StreamSummary,
    /// The whole answer as a `chat.completion`, when the scanner assembled it and the stream was whole.
    pub answer: Option<serde_json::Value>,
    pub end: StreamEnd,
    /// Milliseconds from `started_ms` to the read carrying the first token.
    pub ttft_ms: Option<u64>,
    /// Bytes copied into wasm to be read (the whole stream) and bytes built anew for the client (rewrites only).
    pub bytes_in: usize,
    pub bytes_rewritten: usize,
    /// Reads of the copy.
    pub reads: usize,
}

/// How the client receives the stream (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Native,
    Edited,
}

impl Delivery {
    pub fn label(self) -> &'static str {
        match self {
            Delivery::Native => "native",
            Delivery::Edited => "edited",
        }
    }

    /// The pause between two reads of the copy once the first token has been seen (the first reads are
    /// immediate, so time to first token is measured where it happens). Native: it only bounds how late billing
    /// sees an event. Edited: it is how late the client may get one, and measured best of 0, 1, 3 and 10 ms
    /// (see the README's benchmarks).
    fn pause(self) -> Duration {
        match self {
            Delivery::Native => Duration::from_millis(10),
            Delivery::Edited => Duration::from_millis(1),
        }
    }
}

/// Bytes asked for per read of the copy.
const READ_BYTES: u32 = 64 * 1024;

/// The keep-alive comment (SSE comments are ignored by clients).
const HEARTBEAT: &[u8] = b": keep-alive\n\n";

/// How long a silent stream goes without a keep-alive comment: how late a departed client may be noticed.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// How long a failed client pipe waits for the copy to fail too (the upstream broke) before it counts as the
/// client's departure.
const PIPE_FAILURE_GRACE: Duration = Duration::from_millis(200);

/// How long the relay waits on the client for its last words (an error event, a close) or on releasing the
/// upstream.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

#[wasm_bindgen]
extern "C" {
    /// A stream reader, BYOB (`read(view)`) or default (`read()`), and the stream that hands it out.
    type StreamReader;
    #[wasm_bindgen(method, js_name = read)]
    fn read_into(this: &StreamReader, view: &Uint8Array) -> Promise;
    #[wasm_bindgen(method, js_name = read)]
    fn read_next(this: &StreamReader) -> Promise;
    #[wasm_bindgen(method)]
    fn cancel(this: &StreamReader) -> Promise;

    type ReaderSource;
    #[wasm_bindgen(method, catch, js_name = getReader)]
    fn get_reader(this: &ReaderSource, options: &JsValue) -> Result<StreamReader, JsValue>;
}

/// What the relay learns from the stream.
struct Scan {
    scanner: SseScanner,
    started_ms: u64,
    ttft_ms: Option<u64>,
    bytes_in: usize,
    bytes_rewritten: usize,
    reads: usize,
    /// The client went away (its request's signal aborted, or a write to it failed).
    client_left: bool,
    /// Native: the pipe into the client's body failed, because the client left or because the upstream broke.
    client_pipe_failed: bool,
    /// Woken when the client leaves or its pipe fails (see [`ClientLeft`]).
    on_client_left: Option<Waker>,
}

impl Scan {
    fn client_left(&mut self) {
        self.client_left = true;
        self.wake();
    }

    fn client_pipe_failed(&mut self) {
        self.client_pipe_failed = true;
        self.wake();
    }

    fn wake(&mut self) {
        if let Some(waker) = self.on_client_left.take() {
            waker.wake();
        }
    }
}

type HookFn = Closure<dyn FnMut(JsValue)>;

pub struct Relay {
    /// The body to return to the client.
    pub client_body: ReadableStream,
    pub delivery: Delivery,
    copy: ReadableStream,
    /// Edited: the writing end of the client's body.
    client: Option<WritableStreamDefaultWriter>,
    /// Aborts the upstream request (a silent upstream answers to nothing gentler); taken when used.
    upstream_abort: RefCell<Option<AbortController>>,
    /// The client's request's signal: it aborts when the client disconnects.
    client_signal: AbortSignal,
    scan: Rc<RefCell<Scan>>,
    signal_abort: HookFn,
}

/// The copy's reader: BYOB (coalescing whatever has accumulated), or, where the runtime gives no byte stream,
/// chunk by chunk. A buffer whose bytes were only copied into wasm is read into again (a read transfers it).
struct Copy {
    reader: StreamReader,
    byob: bool,
    spare: RefCell<Option<js_sys::ArrayBuffer>>,
}

impl Copy {
    fn new(stream: &ReadableStream) -> Option<Copy> {
        let source: &ReaderSource = stream.unchecked_ref();
        let options = Object::new();
        let _ = Reflect::set(&options, &"mode".into(), &"byob".into());
        let (reader, byob) = match source.get_reader(&options) {
            Ok(reader) => (reader, true),
            Err(_) => (source.get_reader(&JsValue::UNDEFINED).ok()?, false),
        };
        Some(Copy { reader, byob, spare: RefCell::new(None) })
    }

    /// The next bytes, `Ok(None)` at the end, `Err` when the upstream broke.
    async fn read(&self) -> Result<Option<Uint8Array>, JsValue> {
        let promise = if self.byob {
            let view = match self.spare.borrow_mut().take() {
                Some(buffer) => Uint8Array::new(&buffer),
                None => Uint8Array::new_with_length(READ_BYTES),
            };
            self.reader.read_into(&view)
        } else {
            self.reader.read_next()
        };
        let result = JsFuture::from(promise).await?;
        if Reflect::get(&result, &"done".into())?.as_bool() == Some(true) {
            return Ok(None);
        }
        let value = Reflect::get(&result, &"value".into())?;
        Ok(Some(value.dyn_into::<Uint8Array>().unwrap_or_else(|v| Uint8Array::new(&v))))
    }

    /// Gives back a read's buffer, nothing else holding it.
    fn recycle(&self, bytes: &Uint8Array) {
        if self.byob {
            *self.spare.borrow_mut() = bytes.buffer().dyn_into().ok();
        }
    }

    async fn cancel(&self) {
        let _ = within(CLIENT_WRITE_TIMEOUT, JsFuture::from(self.reader.cancel())).await;
    }
}

/// How one read of the copy went.
enum Read {
    /// Bytes were read (and, edited, written); read on, at once if the read filled its buffer (the copy is
    /// behind), else after the pause.
    More { full: bool },
    /// The stream is over, as said.
    End(StreamEnd),
}

impl Relay {
    pub fn new(
        upstream: &ReadableStream,
        delivery: Delivery,
        upstream_abort: Option<AbortController>,
        client_signal: AbortSignal,
        scanner: SseScanner,
        started_ms: u64,
    ) -> Result<Relay, ApiError> {
        let scan = Rc::new(RefCell::new(Scan {
            scanner,
            started_ms,
            ttft_ms: None,
            bytes_in: 0,
            bytes_rewritten: 0,
            reads: 0,
            client_left: false,
            client_pipe_failed: false,
            on_client_left: None,
        }));
        let on_abort = scan.clone();
        let signal_abort: HookFn = Closure::new(move |_event: JsValue| on_abort.borrow_mut().client_left());
        let setup = || -> Result<(ReadableStream, ReadableStream, Option<WritableStreamDefaultWriter>), JsValue> {
            let branches = upstream.tee();
            let (other, copy): (ReadableStream, ReadableStream) =
                (branches.get(0).dyn_into()?, branches.get(1).dyn_into()?);
            let (client_body, client) = match delivery {
                // Through a native pipe rather than the branch itself, to hear of a client that left: the pipe
                // fails then. A bare tee branch given to the response is cancelled without a word, and
                // `request.signal` does not always abort, so the upstream would be read to its end (measured: a
                // client that closed its socket was never noticed). The pipe costs 10–15 % of the streams/s of a
                // bare branch.
                Delivery::Native => {
                    let (readable, writable) = identity_pipe()?;
                    let on_failure = scan.clone();
                    pipe_natively(&other, &writable, move || on_failure.borrow_mut().client_pipe_failed());
                    (readable, None)
                }
                Delivery::Edited => {
                    drain_natively(&other)?;
                    let (readable, writable) = identity_pipe()?;
                    (readable, Some(writable.get_writer()?))
                }
            };
            client_signal.add_event_listener_with_callback("abort", signal_abort.as_ref().unchecked_ref())?;
            Ok((client_body, copy, client))
        };
        let (client_body, copy, client) = setup().map_err(|_| ApiError::internal("relay_setup_failed"))?;
        Ok(Relay {
            client_body,
            delivery,
            copy,
            client,
            upstream_abort: RefCell::new(upstream_abort),
            client_signal,
            scan,
            signal_abort,
        })
    }

    /// Runs the relay to the end of the stream. `idle_timeout_secs` bounds the silence between upstream reads.
    /// When the client leaves, the upstream is aborted at once — or, with `drain` (the policy's time limit), read
    /// on for at most that long, so its usage report can still be billed exactly. Nothing here waits on the
    /// client without a deadline: billing runs after this, whatever the client does.
    pub async fn run(self, idle_timeout_secs: u64, drain: Option<Duration>) -> RelayOutcome {
        let end = match Copy::new(&self.copy) {
            Some(copy) => self.relay(&copy, Duration::from_secs(idle_timeout_secs), drain).await,
            None => StreamEnd::CutOff,
        };
        let Relay { scan, client_signal, signal_abort, .. } = self;
        let _ = client_signal.remove_event_listener_with_callback("abort", signal_abort.as_ref().unchecked_ref());
        drop(signal_abort);
        outcome(scan, end)
    }

    async fn relay(&self, copy: &Copy, idle: Duration, drain: Option<Duration>) -> StreamEnd {
        let mut read_all = pin!(async {
            loop {
                match self.read_once(copy, idle).await {
                    Read::End(end) => return end,
                    Read::More { full: false } if self.scan.borrow().ttft_ms.is_some() => {
                        Delay::from(self.delivery.pause()).await
                    }
                    Read::More { .. } => {}
                }
            }
        });
        let mut ended = match select(read_all.as_mut(), ClientLeft(self.scan.clone())).await {
            Either::Left((end, _)) => Some(end),
            Either::Right(((), _)) => None,
        };
        if ended.is_none() && !self.scan.borrow().client_left {
            // Native: the client's pipe failed. It fails too when the upstream broke, and then the copy fails
            // with it at once; otherwise the client left.
            ended = within(PIPE_FAILURE_GRACE, read_all.as_mut()).await;
            if ended.is_none() {
                self.scan.borrow_mut().client_left();
            }
        }
        let mut end = match ended {
            Some(end) => end,
            None => {
                // The client left: under `drain`, read on (nothing more is written) within the limit.
                let drained = match drain {
                    Some(limit) => within(limit, read_all.as_mut()).await,
                    None => None,
                };
                match drained {
                    Some(StreamEnd::Done | StreamEnd::UpstreamError) => {}
                    _ => self.stop_upstream(copy).await,
                }
                return StreamEnd::ClientAbort;
            }
        };
        if !matches!(end, StreamEnd::Done | StreamEnd::UpstreamError) {
            self.stop_upstream(copy).await;
        }
        if let Some(client) = &self.client {
            let interrupted = end == StreamEnd::CutOff;
            let tail = self.scan.borrow_mut().scanner.finish(interrupted);
            if let Some(tail) = tail {
                self.scan.borrow_mut().bytes_rewritten += tail.len();
                if !self.write_last(client, &Uint8Array::from(tail.as_slice()).into()).await {
                    end = StreamEnd::ClientAbort;
                }
            }
            let _ = within(CLIENT_WRITE_TIMEOUT, JsFuture::from(client.close())).await;
        }
        // A stream the client left is a client abort, however the upstream then ended.
        if self.scan.borrow().client_left {
            return StreamEnd::ClientAbort;
        }
        end
    }

    /// One read of the copy (writing keep-alive comments while it waits, edited), then what the client gets of
    /// it. A read waits at most `idle`.
    async fn read_once(&self, copy: &Copy, idle: Duration) -> Read {
        let mut read = pin!(within(idle, copy.read()));
        let bytes = loop {
            match select(read.as_mut(), Delay::from(HEARTBEAT_INTERVAL)).await {
                Either::Left((result, _)) => break result,
                Either::Right(_) => {
                    if let Some(client) = &self.client {
                        if !self.scan.borrow().client_left {
                            self.scan.borrow_mut().bytes_rewritten += HEARTBEAT.len();
                            self.write(client, &Uint8Array::from(HEARTBEAT).into(), idle).await;
                        }
                    }
                }
            }
        };
        let bytes = match bytes {
            // Silent for too long, or broken.
            None | Some(Err(_)) => return Read::End(StreamEnd::CutOff),
            Some(Ok(None)) => return Read::End(upstream_end(self.scan.borrow().scanner.summary())),
            Some(Ok(Some(bytes))) => bytes,
        };
        let full = bytes.length() >= READ_BYTES;
        let step = {
            let mut scan = self.scan.borrow_mut();
            let data = bytes.to_vec();
            scan.bytes_in += data.len();
            scan.reads += 1;
            let step = scan.scanner.push(&data);
            if step.first_token {
                scan.ttft_ms = Some(now_ms().saturating_sub(scan.started_ms));
            }
            step
        };
        // Native: the client has these bytes already (garbage included: it is read on to the end). Draining:
        // read for billing, write nothing.
        let Some(client) = self.client.as_ref().filter(|_| !self.scan.borrow().client_left) else {
            copy.recycle(&bytes);
            return Read::More { full };
        };
        let chunk: JsValue = match step.output {
            // The read's own buffer goes to the client.
            Output::Same => bytes.into(),
            Output::Rewritten(out) => {
                copy.recycle(&bytes);
                if out.is_empty() {
                    JsValue::UNDEFINED
                } else {
                    self.scan.borrow_mut().bytes_rewritten += out.len();
                    Uint8Array::from(out.as_slice()).into()
                }
            }
        };
        if !chunk.is_undefined() {
            self.write(client, &chunk, idle).await;
        }
        if step.stop {
            Read::End(StreamEnd::Malformed)
        } else {
            Read::More { full }
        }
    }

    /// Writes to the client. A write that fails, or that the client does not take within `deadline`, means the
    /// client is gone.
    async fn write(&self, client: &WritableStreamDefaultWriter, chunk: &JsValue, deadline: Duration) -> bool {
        let written = within(deadline, JsFuture::from(client.write_with_chunk(chunk))).await;
        let ok = matches!(written, Some(Ok(_)));
        if !ok {
            self.scan.borrow_mut().client_left();
        }
        ok
    }

    /// The gateway's closing event: the client gets [`CLIENT_WRITE_TIMEOUT`] to take it.
    async fn write_last(&self, client: &WritableStreamDefaultWriter, chunk: &JsValue) -> bool {
        !self.scan.borrow().client_left && self.write(client, chunk, CLIENT_WRITE_TIMEOUT).await
    }

    /// Aborts the upstream request (it stops generating) and lets go of the copy.
    async fn stop_upstream(&self, copy: &Copy) {
        if let Some(abort) = self.upstream_abort.borrow_mut().take() {
            abort.abort();
        }
        copy.cancel().await;
    }
}

/// Has the runtime read `stream` to its end into a native sink (a SHA-1 `DigestStream`; a plain
/// `WritableStream` where there is none), so that the other branch of a tee accumulates.
fn drain_natively(stream: &ReadableStream) -> Result<(), JsValue> {
    let crypto = Reflect::get(&js_sys::global(), &"crypto".into())?;
    let sink: WritableStream = match Reflect::get(&crypto, &"DigestStream".into())?.dyn_into::<js_sys::Function>() {
        Ok(digest) => Reflect::construct(&digest, &Array::of1(&"SHA-1".into()))?.unchecked_into(),
        Err(_) => WritableStream::new()?,
    };
    // The pipe fails when the upstream is aborted; the relay learns of that from the copy.
    pipe_natively(stream, &sink, || {});
    Ok(())
}

/// Has the runtime pipe `stream` into `sink`; nothing waits on it, `on_failure` is called if it fails.
fn pipe_natively(stream: &ReadableStream, sink: &WritableStream, on_failure: impl FnOnce() + 'static) {
    let piped = JsFuture::from(stream.pipe_to(sink));
    wasm_bindgen_futures::spawn_local(async move {
        if piped.await.is_err() {
            on_failure();
        }
    });
}

/// A native pipe (`IdentityTransformStream`): what is written to the writable side is read from the readable.
fn identity_pipe() -> Result<(ReadableStream, WritableStream), JsValue> {
    let constructor = Reflect::get(&js_sys::global(), &"IdentityTransformStream".into())?;
    let pipe = match constructor.dyn_into::<js_sys::Function>() {
        Ok(identity) => Reflect::construct(&identity, &Array::new())?,
        Err(_) => web_sys::TransformStream::new()?.into(),
    };
    Ok((Reflect::get(&pipe, &"readable".into())?.dyn_into()?, Reflect::get(&pipe, &"writable".into())?.dyn_into()?))
}

/// How a stream ended, from what its events said, once the upstream is over.
fn upstream_end(summary: &StreamSummary) -> StreamEnd {
    if summary.done {
        StreamEnd::Done
    } else if summary.upstream_error.is_some() {
        StreamEnd::UpstreamError
    } else if summary.gateway_stop == Some(crate::sse::GatewayStop::Malformed) {
        StreamEnd::Malformed
    } else {
        StreamEnd::CutOff
    }
}

/// The relay's outcome, from what it learnt.
fn outcome(scan: Rc<RefCell<Scan>>, end: StreamEnd) -> RelayOutcome {
    let mut scan = scan.borrow_mut();
    let mut scanner = std::mem::replace(&mut scan.scanner, SseScanner::new(Endpoint::ChatCompletions, false, false));
    let answer = if end == StreamEnd::Done { scanner.take_answer() } else { None };
    RelayOutcome {
        answer,
        summary: scanner.into_summary(),
        end,
        ttft_ms: scan.ttft_ms,
        bytes_in: scan.bytes_in,
        bytes_rewritten: scan.bytes_rewritten,
        reads: scan.reads,
    }
}

/// Resolves when the client has left, or its pipe failed.
struct ClientLeft(Rc<RefCell<Scan>>);

impl Future for ClientLeft {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut scan = self.0.borrow_mut();
        if scan.client_left || scan.client_pipe_failed {
            return Poll::Ready(());
        }
        scan.on_client_left = Some(cx.waker().clone());
        Poll::Pending
    }
}
