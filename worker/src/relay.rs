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

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::{select, Either};
use js_sys::{Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{ReadableStream, ReadableStreamDefaultReader, TransformStream, WritableStream};
use worker::{AbortController, Delay};

use crate::bindings::now_ms;
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

/// What the transform learns, shared with the code that finishes the relay.
struct Scan {
    scanner: SseScanner,
    started_ms: u64,
    ttft_ms: Option<u64>,
    last_chunk_ms: u64,
    bytes_in: usize,
    bytes_rewritten: usize,
    /// Set once the upstream is over: what is written now is the gateway's own closing event, passed as is.
    closing: bool,
    /// The client cancelled its side of the stream (it went away).
    client_left: bool,
}

impl Scan {
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
            Output::Same => controller.enqueue(chunk)?,
            Output::Rewritten(out) if out.is_empty() => {}
            Output::Rewritten(out) => {
                self.bytes_rewritten += out.len();
                controller.enqueue(&Uint8Array::from(out.as_slice()))?;
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
type CancelFn = Closure<dyn FnMut(JsValue)>;

pub struct Relay {
    /// The body to return to the client.
    pub client_body: ReadableStream,
    upstream: ReadableStream,
    /// Aborts the upstream request (a silent upstream does not answer to anything gentler); taken when used.
    upstream_abort: RefCell<Option<AbortController>>,
    client_side: WritableStream,
    scan: Rc<RefCell<Scan>>,
    /// Kept alive as long as the pipe runs.
    _transform: TransformFn,
    _flush: FlushFn,
    _cancel: CancelFn,
}

impl Relay {
    pub fn new(
        upstream: &ReadableStream,
        upstream_abort: AbortController,
        scanner: SseScanner,
        started_ms: u64,
    ) -> Result<Relay, ApiError> {
        let scan = Rc::new(RefCell::new(Scan {
            scanner,
            started_ms,
            ttft_ms: None,
            last_chunk_ms: started_ms,
            bytes_in: 0,
            bytes_rewritten: 0,
            closing: false,
            client_left: false,
        }));
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
        let on_cancel = scan.clone();
        let cancel: CancelFn = Closure::new(move |_reason: JsValue| on_cancel.borrow_mut().client_left = true);
        let setup = || -> Result<TransformStream, JsValue> {
            let transformer = Object::new();
            Reflect::set(&transformer, &"transform".into(), transform.as_ref())?;
            Reflect::set(&transformer, &"flush".into(), flush.as_ref())?;
            // Called when the client cancels its side: it went away.
            Reflect::set(&transformer, &"cancel".into(), cancel.as_ref())?;
            TransformStream::new_with_transformer(&transformer)
        };
        let pipe = setup().map_err(|_| ApiError::internal("relay_setup_failed"))?;
        Ok(Relay {
            client_body: pipe.readable(),
            upstream: upstream.clone(),
            upstream_abort: RefCell::new(Some(upstream_abort)),
            client_side: pipe.writable(),
            scan,
            _transform: transform,
            _flush: flush,
            _cancel: cancel,
        })
    }

    /// Runs the relay to the end of the stream. `idle_timeout_secs` bounds the silence between upstream chunks.
    /// When the client leaves, the upstream is cancelled — or, with `drain_on_abort`, read to its end without
    /// forwarding, so its usage report can still be billed exactly.
    pub async fn run(self, idle_timeout_secs: u64, drain_on_abort: bool) -> RelayOutcome {
        let options = Object::new();
        let set = |key: &str, value: &JsValue| {
            let _ = Reflect::set(&options, &key.into(), value);
        };
        // Keep the client's side open when the upstream fails, to tell the client so; keep the upstream open when
        // the client leaves only if it is to be drained.
        set("preventAbort", &JsValue::TRUE);
        set("preventCancel", &JsValue::from_bool(drain_on_abort));
        let source: &PipeSource = self.upstream.unchecked_ref();
        let piped = JsFuture::from(source.pipe_to(&self.client_side, &options));
        let idle = watch_idle(&self.scan, idle_timeout_secs);
        let pipe_result = match select(std::pin::pin!(piped), std::pin::pin!(idle)).await {
            Either::Left((result, _)) => result.map(|_| ()),
            Either::Right(((), piped)) => {
                // Abort the upstream request: its body fails, and the pipe lets go of both streams.
                if let Some(abort) = self.upstream_abort.borrow_mut().take() {
                    abort.abort();
                }
                let _ = piped.await;
                Err(JsValue::from_str("upstream idle"))
            }
        };

        let client_left = self.scan.borrow().client_left;
        let end = match pipe_result {
            _ if client_left => {
                if drain_on_abort {
                    self.drain().await;
                }
                StreamEnd::ClientAbort
            }
            // The upstream ended and `flush` sent what was owed.
            Ok(()) => self.upstream_end(),
            Err(_) if self.scan.borrow().scanner.summary().gateway_stop == Some(GatewayStop::Malformed) => {
                StreamEnd::Malformed
            }
            Err(_) => self.after_broken_pipe().await,
        };
        // The pipe is over: the runtime will not call the closures again, so the scan is ours alone.
        let Relay { scan, _transform, _flush, _cancel, .. } = self;
        drop((_transform, _flush, _cancel));
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

    /// The upstream broke or went silent: the client is told with an error event (unless it has gone too).
    async fn after_broken_pipe(&self) -> StreamEnd {
        let tail = self.scan.borrow_mut().tail(true);
        let Ok(writer) = self.client_side.get_writer() else { return StreamEnd::ClientAbort };
        let told = match &tail {
            Some(tail) => JsFuture::from(writer.write_with_chunk(tail)).await.is_ok(),
            None => true,
        };
        let _ = JsFuture::from(writer.close()).await;
        // Make sure the broken upstream is released.
        let _ = self.upstream.cancel();
        if told {
            self.upstream_end()
        } else {
            StreamEnd::ClientAbort
        }
    }

    /// Reads what is left of the upstream without forwarding it, for its usage report.
    async fn drain(&self) {
        let Ok(reader) = ReadableStreamDefaultReader::new(&self.upstream) else { return };
        while let Ok(result) = JsFuture::from(reader.read()).await {
            if Reflect::get(&result, &"done".into()).ok().and_then(|d| d.as_bool()) != Some(false) {
                break;
            }
            let Ok(value) = Reflect::get(&result, &"value".into()) else { break };
            let chunk = Uint8Array::new(&value).to_vec();
            let mut scan = self.scan.borrow_mut();
            scan.bytes_in += chunk.len();
            scan.scanner.push(&chunk);
        }
    }

    fn upstream_end(&self) -> StreamEnd {
        let scan = self.scan.borrow();
        let summary = scan.scanner.summary();
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
}

/// Resolves when no chunk has arrived for `idle_timeout_secs`. One timer per idle period, not one per chunk.
async fn watch_idle(scan: &Rc<RefCell<Scan>>, idle_timeout_secs: u64) {
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
