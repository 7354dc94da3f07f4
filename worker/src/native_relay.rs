//! Relaying a stream that needs no edit — the client asked for `stream_options.include_usage`, so OpenRouter's
//! usage-only chunk is what it wants — on the runtime's own pipe, and reading a copy for billing.
//!
//! The upstream body is `tee()`d: the client's response is one branch, which the runtime pipes natively (no JS and
//! no wasm per event); the gateway reads the other branch. While the runtime drains the client's branch, the
//! copy accumulates, so reading it after a short pause ([`COALESCE`]) takes many events in one read (into wasm
//! once per read, not once per event). The copy tells billing what the edited relay learns: usage, serving model,
//! finish reason, errors, cut-offs, what was generated.
//!
//! What this path cannot do is write into the client's stream, so where the edited relay adds an error event,
//! here the client sees what the upstream sent, then the end:
//! - an upstream that falls silent for `UPSTREAM_TIMEOUT_SECONDS` is aborted, and the client's stream ends there;
//! - an upstream that breaks before `[DONE]` ends the client's stream where it broke;
//! - data that is not JSON reaches the client as sent (the OpenAI SDKs raise a parse error on it).
//!
//! The first two end without `[DONE]` and without a finish reason, which is how a client tells them from a
//! complete answer: the runtime ends a body that failed like one that finished (workerd writes the last chunk and
//! closes the connection), so the client's read does not fail.
//!
//! In every case the request is billed as on the edited path (by estimate when no usage arrived, then
//! reconciled). A client's departure is known from `request.signal` only (the branch it read is the runtime's):
//! under `cancel` the upstream is aborted then; under `drain` the copy is read on for at most the drain limit.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::{select, Either};
use js_sys::{Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{AbortSignal, ReadableStream};
use worker::{AbortController, Delay};

use crate::bindings::within;
use crate::error::ApiError;
use crate::relay::{self, ClientLeft, RelayOutcome, Scan, StreamEnd, CLIENT_WRITE_TIMEOUT};
use crate::sse::SseScanner;

/// The pause between two reads of the copy, once the first token has been seen (the first read is immediate, so
/// time to first token is measured where it happens). It bounds how late billing sees an event, not the client.
const COALESCE: Duration = Duration::from_millis(10);

/// Bytes asked for per read of the copy.
const READ_BYTES: u32 = 64 * 1024;

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

type HookFn = Closure<dyn FnMut(JsValue)>;

pub struct NativeRelay {
    /// The body to return to the client: one branch of the upstream's body.
    pub client_body: ReadableStream,
    copy: ReadableStream,
    upstream_abort: RefCell<Option<AbortController>>,
    client_signal: AbortSignal,
    scan: Rc<RefCell<Scan>>,
    signal_abort: HookFn,
}

/// How the copy is read: BYOB into a fresh buffer each time (coalescing whatever has accumulated), or, where the
/// runtime gives no byte stream, chunk by chunk.
struct Copy {
    reader: StreamReader,
    byob: bool,
}

impl Copy {
    /// The next bytes, `Ok(None)` at the end, `Err` when the upstream broke.
    async fn read(&self) -> Result<Option<Vec<u8>>, JsValue> {
        let promise = if self.byob {
            self.reader.read_into(&Uint8Array::new_with_length(READ_BYTES))
        } else {
            self.reader.read_next()
        };
        let result = JsFuture::from(promise).await?;
        if Reflect::get(&result, &"done".into())?.as_bool() == Some(true) {
            return Ok(None);
        }
        let value = Reflect::get(&result, &"value".into())?;
        Ok(Some(value.dyn_into::<Uint8Array>().unwrap_or_else(|v| Uint8Array::new(&v)).to_vec()))
    }
}

impl NativeRelay {
    pub fn new(
        upstream: &ReadableStream,
        upstream_abort: Option<AbortController>,
        client_signal: AbortSignal,
        scanner: SseScanner,
        started_ms: u64,
    ) -> Result<NativeRelay, ApiError> {
        let scan = Rc::new(RefCell::new(Scan::new(scanner, started_ms)));
        let on_abort = scan.clone();
        let signal_abort: HookFn = Closure::new(move |_event: JsValue| on_abort.borrow_mut().client_left());
        let setup = || -> Result<(ReadableStream, ReadableStream), JsValue> {
            client_signal.add_event_listener_with_callback("abort", signal_abort.as_ref().unchecked_ref())?;
            let branches = upstream.tee();
            Ok((branches.get(0).dyn_into()?, branches.get(1).dyn_into()?))
        };
        let (client_body, copy) = setup().map_err(|_| ApiError::internal("relay_setup_failed"))?;
        Ok(NativeRelay {
            client_body,
            copy,
            upstream_abort: RefCell::new(upstream_abort),
            client_signal,
            scan,
            signal_abort,
        })
    }

    /// Reads the copy to the end of the stream (see the module docs for what ends it early).
    pub async fn run(self, idle_timeout_secs: u64, drain: Option<Duration>) -> RelayOutcome {
        let end = match self.copy_reader() {
            Some(copy) => self.read(&copy, idle_timeout_secs, drain).await,
            None => StreamEnd::CutOff,
        };
        let NativeRelay { scan, client_signal, signal_abort, .. } = self;
        let _ = client_signal.remove_event_listener_with_callback("abort", signal_abort.as_ref().unchecked_ref());
        relay::outcome(scan, end)
    }

    fn copy_reader(&self) -> Option<Copy> {
        let source: &ReaderSource = self.copy.unchecked_ref();
        let options = Object::new();
        let _ = Reflect::set(&options, &"mode".into(), &"byob".into());
        match source.get_reader(&options) {
            Ok(reader) => Some(Copy { reader, byob: true }),
            Err(_) => source.get_reader(&JsValue::UNDEFINED).ok().map(|reader| Copy { reader, byob: false }),
        }
    }

    async fn read(&self, copy: &Copy, idle_timeout_secs: u64, drain: Option<Duration>) -> StreamEnd {
        let idle = Duration::from_secs(idle_timeout_secs);
        let read_all = async {
            loop {
                match within(idle, copy.read()).await {
                    // Silent for too long: abort, and the client's branch ends with it.
                    None => return StreamEnd::CutOff,
                    Some(Err(_)) => return StreamEnd::CutOff,
                    Some(Ok(None)) => return relay::upstream_end(self.scan.borrow().scanner.summary()),
                    Some(Ok(Some(bytes))) => self.scan.borrow_mut().observe(&bytes),
                }
                if self.scan.borrow().ttft_ms.is_some() {
                    Delay::from(COALESCE).await;
                }
            }
        };
        let mut read_all = std::pin::pin!(read_all);
        let end = match select(read_all.as_mut(), ClientLeft(self.scan.clone())).await {
            Either::Left((end, _)) => end,
            Either::Right(((), _)) => {
                // The client left: under `drain`, read on for the billing's sake, within the limit.
                if let Some(limit) = drain {
                    let _ = within(limit, read_all.as_mut()).await;
                }
                StreamEnd::ClientAbort
            }
        };
        if !matches!(end, StreamEnd::Done | StreamEnd::UpstreamError | StreamEnd::Malformed) {
            if let Some(abort) = self.upstream_abort.borrow_mut().take() {
                abort.abort();
            }
            let _ = within(CLIENT_WRITE_TIMEOUT, JsFuture::from(copy.reader.cancel())).await;
        }
        // A drained stream that finished is still a client abort; one that ended on its own is what it said.
        if end == StreamEnd::CutOff && self.scan.borrow().client_left {
            return StreamEnd::ClientAbort;
        }
        end
    }
}
