//! Relaying an upstream SSE body to the client while reading it.
//!
//! The runtime pipes the upstream body (`pipeTo`) through a `TransformStream` whose transform is a Rust closure:
//! each chunk is shown to the [`SseScanner`] and, when the scanner passes it unchanged, handed on as the *same* JS
//! buffer (one copy into wasm to read it, none back out); only rewritten chunks are built anew. The pipe itself —
//! reads, writes, backpressure, and cancelling the upstream when the client leaves — is the runtime's, so a chunk
//! costs one synchronous call into wasm rather than a round of promises.
//!
//! Why a transform and not `ReadableStream::tee`: the client must not see OpenRouter's usage-only chunk unless it
//! asked for it, nor malformed data, and a cut-off stream must end with an error event — all of which need a hand
//! in the client's path. The transform is that hand, and it sees the final usage chunk on its way through.
//!
//! Knowing that the client left: the runtime notices a closed connection only when it writes to it (the
//! transform's `cancel` is then called, and `request.signal` aborts). While the upstream is silent nothing is
//! written, so the relay writes an SSE comment (`: keep-alive`, which clients ignore) after
//! [`HEARTBEAT_INTERVAL`] of silence, so that there is a write to fail. Not every closed connection makes a write
//! fail, so nothing depends on it: the upstream idle timeout bounds the relay either way.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::future::{select, Either};
use js_sys::{Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{ReadableStream, ReadableStreamDefaultReader, TransformStream, WritableStream};
use worker::{AbortController, Delay};

use crate::bindings::{now_ms, within};
use crate::error::ApiError;
use crate::sse::{GatewayStop, Output, SseScanner, StreamSummary};

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
    pub end: StreamEnd,
    /// Milliseconds from `started_ms` to the chunk carrying the first token.
    pub ttft_ms: Option<u64>,
    /// Bytes copied into wasm to be read (the whole stream) and bytes built anew for the client (rewrites only).
    pub bytes_in: usize,
    pub bytes_rewritten: usize,
}

#[wasm_bindgen]
extern "C" {
    type TransformController;
    #[wasm_bindgen(method, catch)]
    fn enqueue(this: &TransformController, chunk: &JsValue) -> Result<(), JsValue>;
    #[wasm_bindgen(method)]
    fn terminate(this: &TransformController);

    /// A `ReadableStream` seen through `pipeTo` with options (web-sys's binding takes none).
    type PipeSource;
    #[wasm_bindgen(method, js_name = pipeTo)]
    fn pipe_to(this: &PipeSource, destination: &WritableStream, options: &JsValue) -> Promise;
}

/// What the relay learns from the stream, shared with the code that finishes it (also the native relay's).
pub(crate) struct Scan {
    pub(crate) scanner: SseScanner,
    started_ms: u64,
    pub(crate) ttft_ms: Option<u64>,
    last_chunk_ms: u64,
    bytes_in: usize,
    bytes_rewritten: usize,
    /// Set once the upstream is over: what is written now is the gateway's own closing event, passed as is.
    closing: bool,
    /// The client cancelled its side of the stream (it went away).
    pub(crate) client_left: bool,
    /// Woken when the client leaves (see [`ClientLeft`]).
    on_client_left: Option<Waker>,
    /// The transform's controller (from `start`), for heartbeats between chunks.
    controller: Option<TransformController>,
    /// When the client was last written to.
    last_output_ms: u64,
}

impl Scan {
    pub(crate) fn new(scanner: SseScanner, started_ms: u64) -> Scan {
        Scan { scanner, started_ms, last_chunk_ms: started_ms, last_output_ms: started_ms, ..Scan::empty() }
    }

    fn empty() -> Scan {
        Scan {
            scanner: SseScanner::new(false, false),
            started_ms: 0,
            ttft_ms: None,
            last_chunk_ms: 0,
            bytes_in: 0,
            bytes_rewritten: 0,
            closing: false,
            client_left: false,
            on_client_left: None,
            controller: None,
            last_output_ms: 0,
        }
    }

    pub(crate) fn client_left(&mut self) {
        self.client_left = true;
        if let Some(waker) = self.on_client_left.take() {
            waker.wake();
        }
    }

    /// Writes a keep-alive comment if the client has heard nothing for a heartbeat interval. Between transform
    /// calls the client has only ever been sent whole events (the scanner holds back a torn one), so a comment
    /// cannot split an event.
    fn heartbeat(&mut self, now: u64) {
        if self.closing
            || self.client_left
            || now.saturating_sub(self.last_output_ms) < HEARTBEAT_INTERVAL.as_millis() as u64
        {
            return;
        }
        if let Some(controller) = &self.controller {
            if controller.enqueue(&Uint8Array::from(HEARTBEAT)).is_ok() {
                self.last_output_ms = now;
                self.bytes_rewritten += HEARTBEAT.len();
            }
        }
    }

    /// Bytes of a copy of the stream the client receives by another way: read for billing only.
    pub(crate) fn observe(&mut self, bytes: &[u8]) {
        let now = now_ms();
        self.last_chunk_ms = now;
        self.bytes_in += bytes.len();
        if self.scanner.push(bytes).first_token {
            self.ttft_ms = Some(now.saturating_sub(self.started_ms));
        }
    }

    /// One upstream chunk: what (if anything) the client gets instead, and whether the stream must stop.
    fn chunk(&mut self, chunk: &Uint8Array, controller: &TransformController) -> Result<(), JsValue> {
        if self.closing {
            return controller.enqueue(chunk);
        }
        let bytes = chunk.to_vec();
        let now = now_ms();
        self.last_chunk_ms = now;
        self.bytes_in += bytes.len();
        let step = self.scanner.push(&bytes);
        if step.first_token {
            self.ttft_ms = Some(now.saturating_sub(self.started_ms));
        }
        match step.output {
            Output::Same => {
                controller.enqueue(chunk)?;
                self.last_output_ms = now;
            }
            Output::Rewritten(out) if out.is_empty() => {}
            Output::Rewritten(out) => {
                self.bytes_rewritten += out.len();
                controller.enqueue(&Uint8Array::from(out.as_slice()))?;
                self.last_output_ms = now;
            }
        }
        if step.stop {
            // Ends the client's stream; the pipe then cancels the upstream.
            controller.terminate();
        }
        Ok(())
    }

    /// The upstream ended (`interrupted`: it broke or went silent): the bytes still owed to the client.
    fn tail(&mut self, interrupted: bool) -> Option<Uint8Array> {
        self.closing = true;
        let tail = self.scanner.finish(interrupted)?;
        self.bytes_rewritten += tail.len();
        Some(Uint8Array::from(tail.as_slice()))
    }
}

type TransformFn = Closure<dyn FnMut(JsValue, TransformController) -> Result<(), JsValue>>;
type FlushFn = Closure<dyn FnMut(TransformController) -> Result<(), JsValue>>;
type HookFn = Closure<dyn FnMut(JsValue)>;

/// The closures the runtime calls while the pipe runs (kept alive as long as it may call them).
struct Hooks {
    transform: TransformFn,
    flush: FlushFn,
    start: HookFn,
    cancel: HookFn,
    signal_abort: HookFn,
}

pub struct Relay {
    /// The body to return to the client.
    pub client_body: ReadableStream,
    upstream: ReadableStream,
    /// Aborts the upstream request (a silent upstream does not answer to anything gentler); taken when used.
    upstream_abort: RefCell<Option<AbortController>>,
    client_side: WritableStream,
    /// The client's request's signal (it aborts when the client disconnects, on runtimes that say so).
    client_signal: web_sys::AbortSignal,
    scan: Rc<RefCell<Scan>>,
    hooks: Hooks,
}

impl Relay {
    pub fn new(
        upstream: &ReadableStream,
        upstream_abort: Option<AbortController>,
        client_signal: web_sys::AbortSignal,
        scanner: SseScanner,
        started_ms: u64,
    ) -> Result<Relay, ApiError> {
        let scan = Rc::new(RefCell::new(Scan::new(scanner, started_ms)));
        let on_chunk = scan.clone();
        let transform: TransformFn = Closure::new(move |chunk: JsValue, controller: TransformController| {
            let chunk = chunk.dyn_into::<Uint8Array>().unwrap_or_else(|v| Uint8Array::new(&v));
            on_chunk.borrow_mut().chunk(&chunk, &controller)
        });
        let on_end = scan.clone();
        let flush: FlushFn =
            Closure::new(move |controller: TransformController| match on_end.borrow_mut().tail(false) {
                Some(tail) => controller.enqueue(&tail),
                None => Ok(()),
            });
        let on_start = scan.clone();
        let start: HookFn = Closure::new(move |controller: JsValue| {
            on_start.borrow_mut().controller = Some(controller.unchecked_into());
        });
        let on_cancel = scan.clone();
        let cancel: HookFn = Closure::new(move |_reason: JsValue| on_cancel.borrow_mut().client_left());
        let on_abort = scan.clone();
        let signal_abort: HookFn = Closure::new(move |_event: JsValue| on_abort.borrow_mut().client_left());
        let setup = || -> Result<TransformStream, JsValue> {
            let transformer = Object::new();
            Reflect::set(&transformer, &"start".into(), start.as_ref())?;
            Reflect::set(&transformer, &"transform".into(), transform.as_ref())?;
            Reflect::set(&transformer, &"flush".into(), flush.as_ref())?;
            // Called when the client cancels its side: it went away.
            Reflect::set(&transformer, &"cancel".into(), cancel.as_ref())?;
            client_signal.add_event_listener_with_callback("abort", signal_abort.as_ref().unchecked_ref())?;
            TransformStream::new_with_transformer(&transformer)
        };
        let pipe = setup().map_err(|_| ApiError::internal("relay_setup_failed"))?;
        Ok(Relay {
            client_body: pipe.readable(),
            upstream: upstream.clone(),
            upstream_abort: RefCell::new(upstream_abort),
            client_side: pipe.writable(),
            client_signal,
            scan,
            hooks: Hooks { transform, flush, start, cancel, signal_abort },
        })
    }

    /// Runs the relay to the end of the stream. `idle_timeout_secs` bounds the silence between upstream chunks.
    /// When the client leaves, the upstream is aborted at once — or, with `drain` (the policy's time limit), read
    /// on without forwarding for at most that long, so its usage report can still be billed exactly. Nothing here
    /// waits on the client without a deadline: billing runs after this, whatever the client does.
    pub async fn run(self, idle_timeout_secs: u64, drain: Option<Duration>) -> RelayOutcome {
        let options = Object::new();
        let set = |key: &str, value: &JsValue| {
            let _ = Reflect::set(&options, &key.into(), value);
        };
        // Keep the client's side open when the upstream fails, to tell the client so; keep the upstream open when
        // the client leaves only if it is to be drained.
        set("preventAbort", &JsValue::TRUE);
        set("preventCancel", &JsValue::from_bool(drain.is_some()));
        let source: &PipeSource = self.upstream.unchecked_ref();
        let piped = JsFuture::from(source.pipe_to(&self.client_side, &options));
        // `settled`: whether the pipe is over, so that the runtime will not call the transform's closures again.
        let (pipe_result, settled) = self.watch(piped, idle_timeout_secs, drain).await;

        let client_left = self.scan.borrow().client_left;
        let end = match pipe_result {
            _ if client_left => StreamEnd::ClientAbort,
            // The upstream ended and `flush` sent what was owed.
            Ok(()) => self.upstream_end(),
            Err(_) if self.scan.borrow().scanner.summary().gateway_stop == Some(GatewayStop::Malformed) => {
                StreamEnd::Malformed
            }
            Err(_) => self.after_broken_pipe().await,
        };
        // The pipe is over: the runtime will not call the closures again, so the scan is ours alone. A pipe that
        // did not settle (a runtime that never released it) keeps its closures: a call into a dropped closure would
        // throw inside the runtime's stream machinery.
        let Relay { scan, hooks, client_signal, .. } = self;
        let _ = client_signal.remove_event_listener_with_callback("abort", hooks.signal_abort.as_ref().unchecked_ref());
        if settled {
            drop(hooks);
        } else {
            crate::bindings::log_error("relay_pipe_unsettled", "the stream pipe did not settle after an abort");
            let Hooks { transform, flush, start, cancel, signal_abort } = hooks;
            transform.forget();
            flush.forget();
            start.forget();
            cancel.forget();
            signal_abort.forget();
        }
        outcome(scan, end)
    }

    /// Waits for the pipe to end, for the upstream to fall silent, or for the client to leave, and acts on the
    /// latter two. Returns the pipe's result and whether it settled.
    async fn watch(
        &self,
        piped: JsFuture,
        idle_timeout_secs: u64,
        drain: Option<Duration>,
    ) -> (Result<(), JsValue>, bool) {
        let idle = std::pin::pin!(watch_idle(&self.scan, idle_timeout_secs));
        let client_left = std::pin::pin!(async {
            let heartbeats = std::pin::pin!(heartbeats(&self.scan));
            select(heartbeats, ClientLeft(self.scan.clone())).await;
        });
        let stop = select(idle, client_left);
        let mut settled = true;
        let pipe_result = match select(std::pin::pin!(piped), stop).await {
            Either::Left((result, _)) => result.map(|_| ()),
            Either::Right((Either::Left(((), _)), piped)) => {
                // The upstream went silent: abort it; its body fails, and the pipe lets go of both streams.
                self.abort_upstream();
                // The pipe settles once its pending write is taken, which a client that stopped reading never does.
                settled = within(CLIENT_WRITE_TIMEOUT, piped).await.is_some();
                Err(JsValue::from_str("upstream idle"))
            }
            Either::Right((Either::Right(((), _)), mut piped)) => {
                // The client left. The pipe notices only at the upstream's next chunk, which may be long in coming:
                // wait for it no longer than the policy allows (a drain's time limit; no time to cancel).
                let started = now_ms();
                match within(drain.unwrap_or_default(), &mut piped).await {
                    Some(_) => {
                        if let Some(limit) = drain {
                            let spent = Duration::from_millis(now_ms().saturating_sub(started));
                            self.drain(limit.saturating_sub(spent), idle_timeout_secs).await;
                        }
                    }
                    None => {
                        self.abort_upstream();
                        settled = within(CLIENT_WRITE_TIMEOUT, piped).await.is_some();
                    }
                }
                Err(JsValue::from_str("client left"))
            }
        };
        (pipe_result, settled)
    }

    /// The upstream broke or went silent: the client is told with an error event (unless it has gone too). A
    /// client that does not read it within [`CLIENT_WRITE_TIMEOUT`] is not waited for.
    async fn after_broken_pipe(&self) -> StreamEnd {
        let tail = self.scan.borrow_mut().tail(true);
        // Make sure the broken upstream is released (its promise is awaited so that a rejection is handled).
        let _ = within(CLIENT_WRITE_TIMEOUT, JsFuture::from(self.upstream.cancel())).await;
        let Ok(writer) = self.client_side.get_writer() else { return StreamEnd::ClientAbort };
        let told = match &tail {
            Some(tail) => within(CLIENT_WRITE_TIMEOUT, JsFuture::from(writer.write_with_chunk(tail)))
                .await
                .is_some_and(|r| r.is_ok()),
            None => true,
        };
        let _ = within(CLIENT_WRITE_TIMEOUT, JsFuture::from(writer.close())).await;
        if told {
            self.upstream_end()
        } else {
            StreamEnd::ClientAbort
        }
    }

    /// Aborts the upstream request (it stops generating; a silent upstream answers to nothing gentler).
    fn abort_upstream(&self) {
        if let Some(abort) = self.upstream_abort.borrow_mut().take() {
            abort.abort();
        }
    }

    /// Reads what is left of the upstream without forwarding it, for its usage report: for at most `limit`, and
    /// no longer than `idle_timeout_secs` between chunks. An upstream that takes longer is aborted (the request
    /// is then billed by estimate and reconciled).
    async fn drain(&self, limit: Duration, idle_timeout_secs: u64) {
        let Ok(reader) = ReadableStreamDefaultReader::new(&self.upstream) else { return };
        let idle = Duration::from_secs(idle_timeout_secs).min(limit);
        let read_all = async {
            loop {
                let Some(Ok(result)) = within(idle, JsFuture::from(reader.read())).await else { return false };
                if Reflect::get(&result, &"done".into()).ok().and_then(|d| d.as_bool()) != Some(false) {
                    return true;
                }
                let Ok(value) = Reflect::get(&result, &"value".into()) else { return false };
                let chunk = Uint8Array::new(&value).to_vec();
                let mut scan = self.scan.borrow_mut();
                scan.bytes_in += chunk.len();
                scan.scanner.push(&chunk);
            }
        };
        if within(limit, read_all).await != Some(true) {
            self.abort_upstream();
            let _ = within(CLIENT_WRITE_TIMEOUT, JsFuture::from(reader.cancel())).await;
        }
    }

    fn upstream_end(&self) -> StreamEnd {
        upstream_end(self.scan.borrow().scanner.summary())
    }
}

/// How a stream ended, from what its events said, once the upstream is over.
pub(crate) fn upstream_end(summary: &StreamSummary) -> StreamEnd {
    if summary.done {
        StreamEnd::Done
    } else if summary.upstream_error.is_some() {
        StreamEnd::UpstreamError
    } else if summary.gateway_stop == Some(GatewayStop::Malformed) {
        StreamEnd::Malformed
    } else {
        StreamEnd::CutOff
    }
}

/// The relay's outcome, once nothing else holds the scan.
pub(crate) fn outcome(scan: Rc<RefCell<Scan>>, end: StreamEnd) -> RelayOutcome {
    let scan = match Rc::try_unwrap(scan) {
        Ok(scan) => scan.into_inner(),
        Err(shared) => shared.replace(Scan::empty()),
    };
    RelayOutcome {
        summary: scan.scanner.into_summary(),
        end,
        ttft_ms: scan.ttft_ms,
        bytes_in: scan.bytes_in,
        bytes_rewritten: scan.bytes_rewritten,
    }
}

/// Resolves when the client has left (the transform's `cancel` was called, or the request's signal aborted).
pub(crate) struct ClientLeft(pub(crate) Rc<RefCell<Scan>>);

impl Future for ClientLeft {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut scan = self.0.borrow_mut();
        if scan.client_left {
            return Poll::Ready(());
        }
        scan.on_client_left = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Writes keep-alive comments while the upstream is silent (see the module docs); never ends by itself.
async fn heartbeats(scan: &Rc<RefCell<Scan>>) {
    loop {
        Delay::from(HEARTBEAT_INTERVAL).await;
        scan.borrow_mut().heartbeat(now_ms());
    }
}

/// The keep-alive comment (SSE comments are ignored by clients).
const HEARTBEAT: &[u8] = b": keep-alive\n\n";

/// How long a silent stream goes without a keep-alive comment: how late a departed client may be noticed.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// How long the relay waits on the client side (an error event, a close) or on releasing the upstream.
pub(crate) const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Resolves when no chunk has arrived for `idle_timeout_secs`. One timer per idle period, not one per chunk.
pub(crate) async fn watch_idle(scan: &Rc<RefCell<Scan>>, idle_timeout_secs: u64) {
    let idle_ms = idle_timeout_secs * 1000;
    let mut wait_ms = idle_ms;
    loop {
        Delay::from(Duration::from_millis(wait_ms)).await;
        let silent_for = now_ms().saturating_sub(scan.borrow().last_chunk_ms);
        if silent_for >= idle_ms {
            return;
        }
        wait_ms = idle_ms - silent_for;
    }
}
