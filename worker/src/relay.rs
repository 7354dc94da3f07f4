//! Relaying an upstream SSE body to the client while reading it.
//!
//! The client gets the readable side of a `TransformStream`; a pump running under `ctx.wait_until` reads the
//! upstream, shows each chunk to the [`SseScanner`], and writes to the writable side. A chunk the scanner passes
//! unchanged is forwarded as the *same* JS buffer (one copy into wasm to read it, none back out); only rewritten
//! chunks are built anew. Awaiting each write gives backpressure, and a failed write means the client has gone,
//! which cancels the upstream so no more tokens are generated for nobody.
//!
//! Why a pump and not `ReadableStream::tee`: the client must not see OpenRouter's usage-only chunk unless it asked
//! for it, nor malformed data, and a cut-off stream must end with an error event — all of which need a hand in the
//! client's path. The pump is that hand, and it sees the final usage chunk on its way through.

use futures_util::future::{select, Either};
use js_sys::{Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{ReadableStream, ReadableStreamDefaultReader, TransformStream, WritableStreamDefaultWriter};

use crate::bindings::now_ms;
use crate::error::ApiError;
use crate::forward::with_timeout;
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
    /// The client went away; the upstream was cancelled.
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

pub struct Relay {
    /// The body to return to the client.
    pub client_body: ReadableStream,
    reader: ReadableStreamDefaultReader,
    writer: WritableStreamDefaultWriter,
}

impl Relay {
    pub fn new(upstream: &ReadableStream) -> Result<Relay, ApiError> {
        let setup = || -> Result<Relay, JsValue> {
            let pipe = TransformStream::new()?;
            Ok(Relay {
                client_body: pipe.readable(),
                reader: ReadableStreamDefaultReader::new(upstream)?,
                writer: pipe.writable().get_writer()?,
            })
        };
        setup().map_err(|_| ApiError::internal("relay_setup_failed"))
    }

    /// Runs the relay to the end of the stream. `idle_timeout_secs` bounds the wait for each upstream chunk.
    /// When the client leaves, the upstream is cancelled — or, with `drain_on_abort`, read to its end without
    /// forwarding, so its usage report can still be billed exactly.
    pub async fn run(self, mut scanner: SseScanner, started_ms: u64, idle_timeout_secs: u64, drain_on_abort: bool) -> RelayOutcome {
        let Relay { reader, writer, .. } = self;
        let mut ttft_ms = None;
        let mut bytes_in = 0;
        let mut bytes_rewritten = 0;
        // Settles (rejects) as soon as the client cancels its side, even while we wait for the upstream.
        let mut client_gone = Some(JsFuture::from(writer.closed()));
        let mut abandoned = false;
        // A read in flight must be awaited to its end: a stream allows one pending read, so dropping it would
        // make the next one fail.
        let mut pending_read = None;
        let end = loop {
            let read_future = pending_read.get_or_insert_with(|| Box::pin(read_chunk(&reader, idle_timeout_secs)));
            let read = match client_gone.as_mut() {
                Some(gone) => match select(read_future, gone).await {
                    Either::Left((read, _)) => read,
                    Either::Right(_) => {
                        client_gone = None;
                        abandoned = true;
                        if !drain_on_abort {
                            cancel(&reader);
                            break StreamEnd::ClientAbort;
                        }
                        continue;
                    }
                },
                None => read_future.await,
            };
            pending_read = None;
            let chunk = match read {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break finish(&mut scanner, &writer, false, &mut bytes_rewritten).await,
                Err(()) => {
                    cancel(&reader);
                    break finish(&mut scanner, &writer, true, &mut bytes_rewritten).await;
                }
            };
            let bytes = chunk.to_vec();
            bytes_in += bytes.len();
            let step = scanner.push(&bytes);
            if step.first_token {
                ttft_ms = Some(now_ms().saturating_sub(started_ms));
            }
            if !abandoned {
                let written = match step.output {
                    Output::Same => write(&writer, &chunk).await,
                    Output::Rewritten(out) if out.is_empty() => true,
                    Output::Rewritten(out) => {
                        bytes_rewritten += out.len();
                        write(&writer, &Uint8Array::from(out.as_slice())).await
                    }
                };
                if !written {
                    client_gone = None;
                    abandoned = true;
                    if !drain_on_abort {
                        cancel(&reader);
                        break StreamEnd::ClientAbort;
                    }
                }
            }
            if step.stop {
                cancel(&reader);
                break StreamEnd::Malformed;
            }
        };
        // Rejects when the client has gone; there is nobody left to tell.
        let _ = JsFuture::from(writer.close()).await;
        let end = if abandoned { StreamEnd::ClientAbort } else { end };
        RelayOutcome { summary: scanner.into_summary(), end, ttft_ms, bytes_in, bytes_rewritten }
    }
}

/// The upstream body ended (`interrupted`: it broke or went silent): send what is still owed, say how it ended.
async fn finish(
    scanner: &mut SseScanner,
    writer: &WritableStreamDefaultWriter,
    interrupted: bool,
    bytes_rewritten: &mut usize,
) -> StreamEnd {
    if let Some(tail) = scanner.finish(interrupted) {
        *bytes_rewritten += tail.len();
        write(writer, &Uint8Array::from(tail.as_slice())).await;
    }
    let summary = scanner.summary();
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

/// The next upstream chunk; `Ok(None)` at the end; `Err` when the upstream broke or stayed silent too long.
async fn read_chunk(reader: &ReadableStreamDefaultReader, idle_timeout_secs: u64) -> Result<Option<Uint8Array>, ()> {
    let result = with_timeout(JsFuture::from(reader.read()), idle_timeout_secs).await.map_err(|_| ())?;
    let result = result.map_err(|_| ())?;
    let done = Reflect::get(&result, &JsValue::from_str("done")).map_err(|_| ())?;
    if done.as_bool() == Some(true) {
        return Ok(None);
    }
    let value = Reflect::get(&result, &JsValue::from_str("value")).map_err(|_| ())?;
    Ok(Some(value.dyn_into::<Uint8Array>().unwrap_or_else(|v| Uint8Array::new(&v))))
}

async fn write(writer: &WritableStreamDefaultWriter, chunk: &JsValue) -> bool {
    JsFuture::from(writer.write_with_chunk(chunk)).await.is_ok()
}

fn cancel(reader: &ReadableStreamDefaultReader) {
    // The returned promise settles when the upstream connection is torn down; nothing waits for it.
    let _ = reader.cancel();
}
