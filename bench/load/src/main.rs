//! Closed-loop HTTP/1.1 load generator for the gateway benchmark.
//!
//! `concurrency` workers each own one keep-alive connection and send the next request as soon as the previous
//! response body has been read to its end. Requests started during the warm-up are not recorded. Every response
//! body is read frame by frame, so for streams the time to the first body byte (TTFB) and the total time are both
//! known. The result is one JSON object on stdout; errors are counted by kind and never hidden in the latencies.
//!
//! ```text
//! bench-load --url http://127.0.0.1:8787/v1/chat/completions --method POST --body-file body.json \
//!            --header 'authorization: Bearer sk-…' --concurrency 32 --duration 10 --warmup 2 [--stream]
//!            [--requests N] [--expect '[DONE]'] [--request-id-prefix P] [--timeout 60] [--threads 1]
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// Bytes of a body kept for the `--expect` check: the end marker of a stream is in its last frame.
const TAIL_BYTES: usize = 512;
const MAX_ERROR_SAMPLES: usize = 5;

struct Opts {
    authority: String,
    path: String,
    method: Method,
    headers: Vec<(String, String)>,
    body: Bytes,
    concurrency: usize,
    duration: Duration,
    warmup: Duration,
    requests: Option<u64>,
    stream: bool,
    expect: Option<Vec<u8>>,
    request_id_prefix: Option<String>,
    timeout: Duration,
    threads: usize,
}

fn usage(problem: &str) -> ! {
    eprintln!("bench-load: {problem}");
    eprintln!(
        "usage: bench-load --url URL [--method M] [--header 'k: v']... [--body-file F | --body S] \
         [--concurrency N] [--duration S] [--warmup S] [--requests N] [--stream] [--expect S] \
         [--request-id-prefix P] [--timeout S] [--threads N]"
    );
    std::process::exit(2);
}

fn parse_opts() -> Opts {
    let mut args = std::env::args().skip(1);
    let mut url = None;
    let mut opts = Opts {
        authority: String::new(),
        path: String::new(),
        method: Method::GET,
        headers: Vec::new(),
        body: Bytes::new(),
        concurrency: 1,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        requests: None,
        stream: false,
        expect: None,
        request_id_prefix: None,
        timeout: Duration::from_secs(60),
        threads: 1,
    };
    let secs = |v: String| -> Duration {
        let s: f64 = v.parse().unwrap_or_else(|_| usage(&format!("'{v}' is not a number of seconds")));
        Duration::from_secs_f64(s.max(0.0))
    };
    let num = |v: String| -> u64 { v.parse().unwrap_or_else(|_| usage(&format!("'{v}' is not a whole number"))) };
    while let Some(flag) = args.next() {
        if flag == "--stream" {
            opts.stream = true;
            continue;
        }
        let value = args.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--url" => url = Some(value),
            "--method" => {
                opts.method = Method::from_bytes(value.as_bytes()).unwrap_or_else(|_| usage("bad --method"))
            }
            "--header" => {
                let (k, v) = value.split_once(':').unwrap_or_else(|| usage("--header needs 'name: value'"));
                opts.headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            "--body" => opts.body = Bytes::from(value),
            "--body-file" => {
                opts.body = Bytes::from(std::fs::read(&value).unwrap_or_else(|e| usage(&format!("{value}: {e}"))))
            }
            "--concurrency" => opts.concurrency = num(value).max(1) as usize,
            "--duration" => opts.duration = secs(value),
            "--warmup" => opts.warmup = secs(value),
            "--requests" => opts.requests = Some(num(value).max(1)),
            "--expect" => opts.expect = Some(value.into_bytes()),
            "--request-id-prefix" => opts.request_id_prefix = Some(value),
            "--timeout" => opts.timeout = secs(value),
            "--threads" => opts.threads = num(value).max(1) as usize,
            other => usage(&format!("unknown option {other}")),
        }
    }
    let url = url.unwrap_or_else(|| usage("--url is required"));
    let rest = url.strip_prefix("http://").unwrap_or_else(|| usage("only http:// URLs are supported"));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    opts.authority = authority.to_owned();
    opts.path = path.to_owned();
    opts
}

/// When to stop and from when to record.
struct Plan {
    started: Instant,
    record_from: Instant,
    /// Duration mode: stop starting requests at this instant.
    end: Option<Instant>,
    /// Count mode: tickets left (may go negative).
    tickets: AtomicI64,
}

#[derive(Default)]
struct Stats {
    latency_us: Vec<u64>,
    ttfb_us: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    timeouts: u64,
    body_errors: u64,
    bytes: u64,
    reconnects: u64,
    completed_in_window: u64,
    warmup_requests: u64,
    warmup_errors: u64,
    error_samples: Vec<String>,
    last_end: Option<Instant>,
}

impl Stats {
    fn sample(&mut self, message: String) {
        if self.error_samples.len() < MAX_ERROR_SAMPLES {
            self.error_samples.push(message);
        }
    }

    fn merge(&mut self, other: Stats) {
        self.latency_us.extend(other.latency_us);
        self.ttfb_us.extend(other.ttfb_us);
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
        self.timeouts += other.timeouts;
        self.body_errors += other.body_errors;
        self.bytes += other.bytes;
        self.reconnects += other.reconnects;
        self.completed_in_window += other.completed_in_window;
        self.warmup_requests += other.warmup_requests;
        self.warmup_errors += other.warmup_errors;
        for s in other.error_samples {
            self.sample(s);
        }
        self.last_end = self.last_end.max(other.last_end);
    }
}

struct Outcome {
    status: u16,
    ttfb: Option<Duration>,
    bytes: u64,
    body_ok: bool,
    head: Vec<u8>,
}

async fn connect(authority: &str) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(authority).await.map_err(|e| format!("connect {authority}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
    start: Instant,
    expect: Option<&[u8]>,
) -> Result<Outcome, String> {
    let response = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut ttfb = None;
    let mut bytes = 0u64;
    let mut tail: Vec<u8> = Vec::new();
    let mut head: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        if ttfb.is_none() {
            ttfb = Some(start.elapsed());
        }
        bytes += data.len() as u64;
        if head.len() < 300 {
            head.extend_from_slice(&data[..data.len().min(300 - head.len())]);
        }
        if expect.is_some() {
            tail.extend_from_slice(&data);
            if tail.len() > TAIL_BYTES {
                tail.drain(..tail.len() - TAIL_BYTES);
            }
        }
    }
    let body_ok = match expect {
        None => true,
        Some(marker) => tail.windows(marker.len()).any(|w| w == marker),
    };
    Ok(Outcome { status, ttfb, bytes, body_ok, head })
}

fn build_request(opts: &Opts, worker: usize, seq: u64) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(opts.method.clone())
        .uri(opts.path.as_str())
        .header("host", opts.authority.as_str());
    for (k, v) in &opts.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    if !opts.body.is_empty() {
        builder = builder.header("content-length", opts.body.len().to_string());
    }
    if let Some(prefix) = &opts.request_id_prefix {
        builder = builder.header("x-request-id", format!("{prefix}-{worker}-{seq}"));
    }
    builder.body(Full::new(opts.body.clone())).unwrap_or_else(|e| usage(&format!("bad request: {e}")))
}

async fn worker(id: usize, opts: Arc<Opts>, plan: Arc<Plan>) -> Stats {
    let mut stats = Stats::default();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut seq = 0u64;
    loop {
        match plan.end {
            Some(end) if Instant::now() >= end => break,
            Some(_) => {}
            None if plan.tickets.fetch_sub(1, Ordering::Relaxed) <= 0 => break,
            None => {}
        }
        // A connection the server closed (or that failed) is replaced before the next request.
        if let Some(s) = sender.as_mut() {
            if s.ready().await.is_err() {
                sender = None;
                stats.reconnects += 1;
            }
        }
        if sender.is_none() {
            match connect(&opts.authority).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    // Like a request's, a failed connect during the warm-up is a warm-up error, not a measured one.
                    if Instant::now() >= plan.record_from {
                        stats.transport_errors += 1;
                        stats.sample(e);
                    } else {
                        stats.warmup_errors += 1;
                        stats.sample(format!("(warm-up) {e}"));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        seq += 1;
        let request = build_request(&opts, id, seq);
        let start = Instant::now();
        let result = tokio::time::timeout(opts.timeout, exchange(s, request, start, opts.expect.as_deref())).await;
        let done = Instant::now();
        let elapsed = done - start;
        let recorded = start >= plan.record_from;
        let error = match result {
            Err(_) => {
                sender = None;
                if recorded {
                    stats.timeouts += 1;
                }
                Some(format!("timeout after {:?}", opts.timeout))
            }
            Ok(Err(e)) => {
                sender = None;
                if recorded {
                    stats.transport_errors += 1;
                }
                Some(e)
            }
            Ok(Ok(outcome)) => {
                let ok_status = (200..300).contains(&outcome.status);
                if recorded {
                    *stats.statuses.entry(outcome.status).or_default() += 1;
                    stats.bytes += outcome.bytes;
                    if ok_status && !outcome.body_ok {
                        stats.body_errors += 1;
                    }
                }
                if !ok_status {
                    Some(format!("HTTP {}: {}", outcome.status, String::from_utf8_lossy(&outcome.head)))
                } else if !outcome.body_ok {
                    Some(format!("body without the expected marker: {}", String::from_utf8_lossy(&outcome.head)))
                } else {
                    if recorded {
                        stats.latency_us.push(elapsed.as_micros() as u64);
                        if let Some(t) = outcome.ttfb {
                            stats.ttfb_us.push(t.as_micros() as u64);
                        }
                    }
                    None
                }
            }
        };
        if recorded {
            if plan.end.is_none_or(|end| done <= end) {
                stats.completed_in_window += 1;
            }
            stats.last_end = Some(done);
            if let Some(e) = error {
                stats.sample(e);
            }
        } else {
            stats.warmup_requests += 1;
            if let Some(e) = error {
                stats.warmup_errors += 1;
                stats.sample(format!("(warm-up) {e}"));
            }
        }
    }
    stats
}

fn summary(mut values: Vec<u64>) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    values.sort_unstable();
    let n = values.len();
    // Nearest rank: the smallest value with at least q of the samples at or below it.
    let at = |q: f64| values[((q * n as f64).ceil() as usize).clamp(1, n) - 1] as f64 / 1000.0;
    let mean = values.iter().sum::<u64>() as f64 / n as f64 / 1000.0;
    json!({
        "count": n,
        "min": values[0] as f64 / 1000.0,
        "mean": (mean * 1000.0).round() / 1000.0,
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": values[n - 1] as f64 / 1000.0,
    })
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat (clock ticks of 1/100 s).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn main() {
    let opts = Arc::new(parse_opts());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads)
        .enable_all()
        .build()
        .unwrap_or_else(|e| usage(&format!("tokio runtime: {e}")));
    let stats = runtime.block_on(run(opts.clone()));
    let (stats, wall) = stats;
    let recorded: u64 = stats.statuses.values().sum::<u64>() + stats.transport_errors + stats.timeouts;
    let ok: u64 = stats.statuses.iter().filter(|(s, _)| (200..300).contains(*s)).map(|(_, n)| n).sum();
    let non2xx: BTreeMap<String, u64> =
        stats.statuses.iter().filter(|(s, _)| !(200..300).contains(*s)).map(|(s, n)| (s.to_string(), *n)).collect();
    let non2xx_total: u64 = non2xx.values().sum();
    let window = match opts.requests {
        Some(_) => wall,
        None => opts.duration.as_secs_f64(),
    };
    let rps = if window > 0.0 { stats.completed_in_window as f64 / window } else { 0.0 };
    let out = json!({
        "concurrency": opts.concurrency,
        "duration_s": window,
        "warmup_s": opts.warmup.as_secs_f64(),
        "stream": opts.stream,
        "requests": recorded,
        "ok": ok,
        "rps": (rps * 10.0).round() / 10.0,
        "non2xx": non2xx,
        "transport_errors": stats.transport_errors,
        "timeouts": stats.timeouts,
        "body_errors": stats.body_errors,
        "errors": non2xx_total + stats.transport_errors + stats.timeouts + stats.body_errors,
        "error_samples": stats.error_samples,
        "warmup_requests": stats.warmup_requests,
        "warmup_errors": stats.warmup_errors,
        "latency_ms": summary(stats.latency_us),
        "ttfb_ms": if opts.stream { summary(stats.ttfb_us) } else { Value::Null },
        "bytes_per_request": if recorded > 0 { stats.bytes / recorded.max(1) } else { 0 },
        "reconnects": stats.reconnects,
        "client_cpu_s": cpu_seconds(),
        "wall_s": (wall * 1000.0).round() / 1000.0,
    });
    println!("{out}");
}

async fn run(opts: Arc<Opts>) -> (Stats, f64) {
    let started = Instant::now();
    let (record_from, end) = match opts.requests {
        Some(_) => (started, None),
        None => (started + opts.warmup, Some(started + opts.warmup + opts.duration)),
    };
    let plan = Arc::new(Plan {
        started,
        record_from,
        end,
        tickets: AtomicI64::new(opts.requests.unwrap_or(0) as i64),
    });
    let tasks: Vec<_> =
        (0..opts.concurrency).map(|id| tokio::spawn(worker(id, opts.clone(), plan.clone()))).collect();
    let mut total = Stats::default();
    for task in tasks {
        match task.await {
            Ok(stats) => total.merge(stats),
            Err(e) => {
                total.transport_errors += 1;
                total.sample(format!("worker task failed: {e}"));
            }
        }
    }
    let wall = total.last_end.map_or(0.0, |end| (end - plan.started).as_secs_f64());
    (total, wall)
}
