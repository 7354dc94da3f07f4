//! Test harness: starts the real gateway (workerd with local D1/KV/DO/Queues) against the repository's stand-ins, on
//! free ports, with its own state directory, and cleans up after itself. Two runtimes serve it (see [`Runtime`]):
//! Miniflare's API (scripts/serve.mjs, the default) and wrangler's dev server exactly as `npm run dev` starts it
//! (scripts/dev.mjs). Two stores keep keys and the ledger (see [`Store`]): D1, prepared with the wrangler CLI
//! (`d1 migrations apply`) exactly as a deployment's is, whose local SQLite file tests read and write directly
//! ([`sqlite`]); or a PostgreSQL cluster of the gateway's own (scripts/postgres.mjs: initdb, the Postgres
//! migrations), reached through a local Hyperdrive binding and queried with psql ([`Gateway::db`]).
//!
//! Every child process is started behind a small shell watchdog that holds a pipe from the test process: when the
//! test binary exits — normally, by panic, or killed — the pipe closes and the watchdog kills the child's whole
//! process group (wrangler and its workerd included). Nothing outlives a test run.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::types::ValueRef;
use rusqlite::{Batch, Connection, OpenFlags};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use serde_json::json;

/// The repository root (tests/ is one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn wrangler_bin() -> PathBuf {
    repo_root().join("node_modules/.bin/wrangler")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Random lowercase hex (from the OS), for keys and markers that must not collide between runs.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    let mut file = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut file, &mut buf).expect("random bytes");
    hex::encode(buf)
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A child process that dies with the test binary (see the module docs).
pub struct Supervised {
    child: Child,
    _lifeline: ChildStdin,
}

impl Supervised {
    /// Runs `program args` in its own process group under the watchdog, output appended to `log`. The child's
    /// stdin is the same pipe (nothing is ever written to it), so a child that stops when its stdin closes (e.g.
    /// `--exit-with-stdin`) can shut down by itself as the watchdog does its kill.
    pub fn spawn(program: &Path, args: &[String], log: &Path, envs: &[(&str, &str)]) -> Supervised {
        // fd 3: a background command's stdin would otherwise be /dev/null.
        let script = r#"log=$1; shift; exec 3<&0; "$@" <&3 3<&- >>"$log" 2>&1 & child=$!; exec 3<&-; cat >/dev/null; kill -TERM 0"#;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(log)
            .arg(program)
            .args(args)
            .current_dir(repo_root())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let lifeline = child.stdin.take().expect("piped stdin");
        Supervised { child, _lifeline: lifeline }
    }

    /// Kills the whole process group now and waits for the watchdog.
    pub fn kill(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) on our own child's process group; no memory is involved.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// A stand-in for a paid service (standins/*.mjs), one per gateway so what it records is this gateway's.
pub struct Standin {
    pub base_url: String,
    child: Child,
}

impl Standin {
    pub fn start(script: &str, extra_args: &[&str]) -> Standin {
        let mut child = Command::new("node")
            .arg(repo_root().join("standins").join(script))
            .args(["--port", "0", "--exit-with-stdin"])
            .args(extra_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start stand-in (node)");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("stand-in prints its address");
        let announced: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("stand-in said: {line}"));
        let base_url = announced["listening"].as_str().expect("listening url").to_owned();
        Standin { base_url, child }
    }

    /// The stand-in's origin (its control endpoints live under `/__standin/`).
    pub fn origin(&self) -> String {
        self.base_url.trim_end_matches("/api/v1").to_owned()
    }

    /// Every request the stand-in received, in order.
    pub async fn requests(&self) -> Vec<Value> {
        let url = format!("{}/__standin/requests", self.origin());
        let body: Value = reqwest::get(url).await.expect("stand-in reachable").json().await.expect("json");
        body["requests"].as_array().cloned().unwrap_or_default()
    }

    /// Chat-completion requests whose body carries `marker` anywhere (tests share a stand-in).
    pub async fn chat_requests_with(&self, marker: &str) -> Vec<Value> {
        self.requests()
            .await
            .into_iter()
            .filter(|r| {
                r["path"] == "/api/v1/chat/completions" && r["raw_body"].as_str().is_some_and(|b| b.contains(marker))
            })
            .collect()
    }

    /// OpenRouter stand-in: every generation it recorded (what it generated and would bill), by generation id.
    pub async fn generations(&self) -> HashMap<String, Value> {
        let url = format!("{}/__standin/generations", self.origin());
        let body: Value = reqwest::get(url).await.expect("stand-in reachable").json().await.expect("json");
        body["generations"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|g| (g["id"].as_str().unwrap_or_default().to_owned(), g))
            .collect()
    }

    pub async fn stats(&self) -> Value {
        let url = format!("{}/__standin/stats", self.origin());
        reqwest::get(url).await.expect("stand-in reachable").json().await.expect("json")
    }

    /// PostHog stand-in: every accepted event (duplicates included) and the batch counters.
    pub async fn posthog_events(&self) -> Value {
        let url = format!("{}/__standin/events", self.base_url);
        reqwest::get(url).await.expect("stand-in reachable").json().await.expect("json")
    }

    /// PostHog stand-in: changes the injected faults (`fail_rate`, `timeout_rate`, `stall_ms`, `status`, ...).
    pub async fn set_faults(&self, faults: Value) {
        let url = format!("{}/__standin/faults", self.base_url);
        let response = reqwest::Client::new().post(url).json(&faults).send().await.expect("stand-in reachable");
        assert!(response.status().is_success(), "faults rejected: {faults}");
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A key the harness created in the gateway's D1 before start.
#[derive(Clone, Debug)]
pub struct TestKey {
    pub id: String,
    pub user_id: String,
    pub secret: String,
}

/// A key to create before start: its name, and `api_keys` columns to set (e.g. `("rpm", "3")`).
#[derive(Clone, Debug)]
pub struct KeySpec {
    pub name: String,
    pub columns: Vec<(String, String)>,
}

/// What serves the gateway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Runtime {
    /// workerd through Miniflare's API (scripts/serve.mjs): requests go straight to workerd's socket.
    #[default]
    Miniflare,
    /// wrangler's dev server (its ProxyWorker in front of the Worker's workerd), started by scripts/dev.mjs just as
    /// `npm run dev` does. dev.mjs's own steps run too: migrations (already applied), the demo key, and the local
    /// development admin key unless the test sets `ADMIN_API_KEY`.
    Dev,
}

impl Runtime {
    fn script(self) -> &'static str {
        match self {
            Runtime::Miniflare => "scripts/serve.mjs",
            Runtime::Dev => "scripts/dev.mjs",
        }
    }

    fn extra_args(self) -> &'static [&'static str] {
        match self {
            Runtime::Miniflare => &[],
            // The watchdog's kill is the backstop; stdin closing lets dev.mjs dispose of wrangler's dev server itself.
            Runtime::Dev => &["--exit-with-stdin"],
        }
    }
}

/// Makes each `async fn name(store: Store)` two tests, `name::d1` and `name::postgres`.
#[macro_export]
macro_rules! test_each_store {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn d1() {
                super::$name($crate::Store::D1).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name($crate::Store::Postgres).await
            }
        }
    )+};
}

/// Where the gateway keeps keys and the ledger (`DB_PROVIDER`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Store {
    #[default]
    D1,
    /// `DB_PROVIDER=neon`: the Postgres build against a PostgreSQL cluster started for this gateway.
    Postgres,
}

#[derive(Default, Clone)]
pub struct GatewayOptions {
    /// `--var NAME:VALUE` overrides on top of wrangler.toml's [vars].
    pub vars: Vec<(String, String)>,
    pub keys: Vec<KeySpec>,
    /// Start the PostHog stand-in (with these extra CLI arguments) and point the gateway at it.
    pub posthog: Option<Vec<String>>,
    pub runtime: Runtime,
    pub store: Store,
}

impl GatewayOptions {
    pub fn store(mut self, store: Store) -> Self {
        self.store = store;
        self
    }

    pub fn runtime(mut self, runtime: Runtime) -> Self {
        self.runtime = runtime;
        self
    }

    pub fn var(mut self, name: &str, value: impl ToString) -> Self {
        self.vars.push((name.to_owned(), value.to_string()));
        self
    }

    pub fn posthog(mut self, args: &[&str]) -> Self {
        self.posthog = Some(args.iter().map(|a| a.to_string()).collect());
        self
    }

    /// Keys with no limits of their own.
    pub fn keys(mut self, names: &[&str]) -> Self {
        self.keys.extend(names.iter().map(|n| KeySpec { name: n.to_string(), columns: Vec::new() }));
        self
    }

    /// A key with some `api_keys` columns set, e.g. `&[("rpm", "3"), ("budget_period", "'day'")]` (SQL literals).
    pub fn key_with(mut self, name: &str, columns: &[(&str, &str)]) -> Self {
        let columns = columns.iter().map(|(c, v)| (c.to_string(), v.to_string())).collect();
        self.keys.push(KeySpec { name: name.to_owned(), columns });
        self
    }
}

static INSTANCE: AtomicUsize = AtomicUsize::new(0);

/// One running gateway.
pub struct Gateway {
    pub base: String,
    pub upstream: Standin,
    pub posthog: Option<Standin>,
    pub state_dir: PathBuf,
    pub log_path: PathBuf,
    keys: HashMap<String, TestKey>,
    port: u16,
    options: GatewayOptions,
    process: Mutex<Supervised>,
    postgres: Option<Postgres>,
}

impl Gateway {
    pub fn start(options: GatewayOptions) -> Gateway {
        let root = repo_root();
        assert!(
            root.join("worker/build/index.js").exists(),
            "the Worker is not built: run `npm test` (or `npm run build`) first"
        );
        let upstream = Standin::start("openrouter.mjs", &[]);
        let posthog = options.posthog.as_ref().map(|args| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Standin::start("posthog.mjs", &args)
        });
        let n = INSTANCE.fetch_add(1, Ordering::SeqCst);
        let state_dir = std::env::temp_dir().join(format!("gateway-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir).expect("state dir");
        let log_path = state_dir.join("gateway.log");

        let specs = create_keys(&options.keys);
        let postgres = match options.store {
            Store::D1 => {
                prepare_database(&state_dir, &specs);
                None
            }
            Store::Postgres => {
                let postgres = Postgres::start(&state_dir.join("postgres"), 0);
                if !specs.is_empty() {
                    postgres.query(&key_inserts(&specs));
                }
                Some(postgres)
            }
        };
        let postgres_url = postgres.as_ref().map(|p| p.url.clone());
        let keys = specs.into_iter().map(|(name, (key, _))| (name, key)).collect();

        let mut options = options;
        if let Some(posthog) = &posthog {
            options = options.var("POSTHOG_API_KEY", POSTHOG_KEY).var("POSTHOG_HOST", &posthog.base_url);
        }
        // The runtime picks its own port (no race with other gateways starting at the same time) and announces it.
        let process = spawn_gateway(&state_dir, &log_path, 0, &upstream, &options, postgres_url.as_deref());
        let base = announced_url(&log_path, 0);
        let port = base.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port in the announced URL");
        let process = Mutex::new(process);
        let gateway = Gateway { base, upstream, posthog, state_dir, log_path, keys, port, options, process, postgres };
        gateway.wait_ready();
        gateway
    }

    /// Stops the runtime (SIGKILL, as a crash would) and starts it again on the same port and state.
    pub fn restart(&self) {
        let mut process = self.process.lock().expect("process lock");
        process.kill();
        let announced_before = std::fs::read_to_string(&self.log_path).map_or(0, |log| announcements(&log));
        let postgres_url = self.postgres.as_ref().map(|p| p.url.as_str());
        *process =
            spawn_gateway(&self.state_dir, &self.log_path, self.port, &self.upstream, &self.options, postgres_url);
        drop(process);
        announced_url(&self.log_path, announced_before);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let url = format!("{}/health", self.base);
        while Instant::now() < deadline {
            if let Ok(out) = Command::new("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url]).output() {
                if out.stdout == b"200" {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("gateway did not become ready; log:\n{}", self.logs());
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn key(&self, name: &str) -> &TestKey {
        self.keys.get(name).unwrap_or_else(|| panic!("no test key named {name}"))
    }

    /// `GET /v1/usage` as the key sees it: its limits, where its windows stand, its spend.
    pub async fn own_usage(&self, key: &str) -> Value {
        let response = client().get(self.url("/v1/usage")).bearer_auth(key).send().await.expect("gateway reachable");
        response.json().await.expect("json")
    }

    /// Everything the runtime has logged so far (including the Worker's console lines).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The Worker's structured request log lines (JSON objects with `"event":"request"`).
    pub fn request_logs(&self) -> Vec<Value> {
        self.logs()
            .lines()
            .filter_map(|line| line.find('{').map(|i| &line[i..]))
            .filter_map(|json| serde_json::from_str::<Value>(json).ok())
            .filter(|v| v["event"] == "request")
            .collect()
    }

    /// The request log line whose `field` is `value`, once the gateway has written it (a request's line comes
    /// after its response: its stream relayed, its usage event sent, its answer stored in the response cache).
    pub async fn request_log(&self, field: &str, value: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.request_logs().into_iter().find(|l| l[field] == value) {
                return line;
            }
            assert!(Instant::now() < deadline, "no log line with {field} = {value}:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The local D1 database file (SQLite) behind the `DB` binding.
    pub fn d1_file(&self) -> PathBuf {
        d1_file(&self.state_dir)
    }

    /// Runs SQL against the gateway's local D1 while it runs (from this process, as an operator's tool would) and
    /// returns the rows (see [`sqlite`]).
    pub fn d1(&self, sql: &str) -> Vec<Value> {
        sqlite(&self.d1_file(), sql)
    }

    /// Runs SQL on the store the gateway uses (its D1 file, or its PostgreSQL database) and returns the rows, in
    /// [`sqlite`]'s shape. Write SQL both dialects accept.
    pub fn db(&self, sql: &str) -> Vec<Value> {
        match &self.postgres {
            None => self.d1(sql),
            Some(postgres) => postgres.query(sql),
        }
    }

    /// The gateway's PostgreSQL (under [`Store::Postgres`]).
    pub fn postgres(&self) -> &Postgres {
        self.postgres.as_ref().expect("this gateway runs with Store::Postgres")
    }

    /// The SQLite files of the gateway's Durable Objects (one per object that has stored anything), for [`sqlite`].
    /// Miniflare keeps them under `<state>/v3/do/<worker>-<Class>/<object>.sqlite`, `<worker>` being the Worker's
    /// name in the runtime: `gateway-KeyLimiter` under [`Runtime::Miniflare`], `openrouter-gateway-KeyLimiter`
    /// (wrangler.toml's name) under [`Runtime::Dev`]. Only the gateway runs in a test's state directory.
    pub fn durable_object_files(&self) -> Vec<PathBuf> {
        let Ok(namespaces) = std::fs::read_dir(self.state_dir.join("v3/do")) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = namespaces
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .flat_map(|dir| sqlite_files(&dir))
            .collect();
        files.sort();
        files
    }
}

/// The `.sqlite` files in `dir` other than Miniflare's own `metadata.sqlite`.
fn sqlite_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "sqlite") && !p.ends_with("metadata.sqlite"))
                .collect()
        })
        .unwrap_or_default()
}

/// The local D1 database file under a state directory (`wrangler d1 ... --persist-to` and both runtimes agree).
fn d1_file(state_dir: &Path) -> PathBuf {
    let dir = state_dir.join("v3/d1/miniflare-D1DatabaseObject");
    let files = sqlite_files(&dir);
    assert!(files.len() == 1, "expected one D1 sqlite file in {}, found {files:?}", dir.display());
    files.into_iter().next().expect("one file")
}

/// How long [`sqlite`] waits for a lock the runtime holds (a write in progress) before failing.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs SQL — one statement or several separated by `;` — on a SQLite file (a local D1 database or a Durable
/// Object's storage), from this process, while the runtime may have it open: lock contention waits (up to 30 s)
/// instead of failing. Returns the rows of the statements that return rows, in order, as objects of column name
/// → value (integers as JSON integers, reals as floats, text as strings, NULL as null, blobs as arrays of bytes),
/// the shape `wrangler d1 execute --json` gives. Statements without rows (UPDATE, CREATE TRIGGER, ...) just run.
pub fn sqlite(path: &Path, sql: &str) -> Vec<Value> {
    run_sql(path, sql).unwrap_or_else(|e| panic!("SQL on {} failed: {e}\n{sql}", path.display()))
}

fn run_sql(path: &Path, sql: &str) -> rusqlite::Result<Vec<Value>> {
    // No CREATE: a wrong path must fail, not make an empty database.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    let mut rows_out = Vec::new();
    let mut batch = Batch::new(&conn, sql);
    while let Some(mut statement) = batch.next()? {
        if statement.column_count() == 0 {
            statement.raw_execute()?;
            continue;
        }
        let names: Vec<String> = statement.column_names().map(str::to_owned).collect();
        let mut rows = statement.raw_query();
        while let Some(row) = rows.next()? {
            let mut object = serde_json::Map::new();
            for (i, name) in names.iter().enumerate() {
                object.insert(name.clone(), json_value(row.get_ref(i)?));
            }
            rows_out.push(Value::Object(object));
        }
    }
    Ok(rows_out)
}

fn json_value(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::from(i),
        // NaN and infinities have no JSON form (D1 gives null for them too).
        ValueRef::Real(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Array(b.iter().map(|&byte| Value::from(byte)).collect()),
    }
}

/// Each key by name, with the `api_keys` columns to set for it.
type KeyRows = HashMap<String, (TestKey, Vec<(String, String)>)>;

fn create_keys(specs: &[KeySpec]) -> KeyRows {
    specs
        .iter()
        .map(|spec| {
            let id = format!("{}{}", spec.name, random_hex(4));
            let secret = format!("sk-gw-{id}-{}", random_hex(24));
            // `user-<name>`, unless the spec sets `user_id` (a SQL string literal) to give keys one owner.
            let user_id = spec
                .columns
                .iter()
                .find(|(column, _)| column == "user_id")
                .map_or_else(|| format!("user-{}", spec.name), |(_, value)| value.trim_matches('\'').to_owned());
            let key = TestKey { id, user_id, secret };
            (spec.name.clone(), (key, spec.columns.clone()))
        })
        .collect()
}

fn wrangler(state_dir: &Path, args: &[&str]) {
    let out = Command::new(wrangler_bin())
        .args(args)
        .arg("--persist-to")
        .arg(state_dir)
        .current_dir(repo_root())
        .env("WRANGLER_SEND_METRICS", "false")
        .output()
        .expect("run wrangler");
    assert!(
        out.status.success(),
        "wrangler {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Applies the real migrations (as a deploy does), then inserts the test keys (hashes only). The runtime is not
/// started yet, so nothing contends for the database.
fn prepare_database(state_dir: &Path, keys: &KeyRows) {
    wrangler(state_dir, &["d1", "migrations", "apply", "DB", "--local"]);
    if !keys.is_empty() {
        sqlite(&d1_file(state_dir), &key_inserts(keys));
    }
}

/// The INSERTs of the test keys (SQL both stores run).
fn key_inserts(keys: &KeyRows) -> String {
    let statements: Vec<String> = keys
        .values()
        .map(|(k, columns)| {
            let mut names = vec!["id".to_owned(), "key_hash".to_owned(), "user_id".to_owned()];
            let mut values =
                vec![format!("'{}'", k.id), format!("'{}'", sha256_hex(&k.secret)), format!("'{}'", k.user_id)];
            for (column, value) in columns.iter().filter(|(column, _)| column != "user_id") {
                names.push(column.clone());
                values.push(value.clone());
            }
            format!("INSERT INTO api_keys ({}) VALUES ({});", names.join(", "), values.join(", "))
        })
        .collect();
    statements.join(" ")
}

/// How many times the runtime has announced its address in this log.
fn announcements(log: &str) -> usize {
    log.lines().filter(|l| l.starts_with("{\"listening\":")).count()
}

/// Waits for the runtime's `{"listening":URL}` line after the first `seen` ones, and returns the URL.
fn announced_url(log: &Path, seen: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let line = text.lines().filter(|l| l.starts_with("{\"listening\":")).nth(seen);
        if let Some(url) = line
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .and_then(|v| v["listening"].as_str().map(str::to_owned))
        {
            return url;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the gateway never announced its address; log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
}

fn spawn_gateway(
    state_dir: &Path,
    log: &Path,
    port: u16,
    upstream: &Standin,
    options: &GatewayOptions,
    postgres_url: Option<&str>,
) -> Supervised {
    let runtime = options.runtime;
    let mut args = vec![
        repo_root().join(runtime.script()).display().to_string(),
        "--port".to_owned(),
        port.to_string(),
        "--persist-to".to_owned(),
        state_dir.display().to_string(),
    ];
    if let Some(url) = postgres_url {
        if runtime == Runtime::Dev {
            args.extend(["--db".to_owned(), "neon".to_owned()]);
        }
        args.extend(["--postgres".to_owned(), url.to_owned()]);
    }
    args.extend(runtime.extra_args().iter().map(|a| a.to_string()));
    let mut vars = vec![
        ("OPENROUTER_BASE_URL".to_owned(), upstream.base_url.clone()),
        ("OPENROUTER_API_KEY".to_owned(), PROVIDER_KEY.to_owned()),
    ];
    vars.extend(options.vars.iter().cloned());
    for (name, value) in vars {
        args.extend(["--var".to_owned(), format!("{name}:{value}")]);
    }
    Supervised::spawn(Path::new("node"), &args, log, &[("NO_COLOR", "1"), ("WRANGLER_SEND_METRICS", "false")])
}

/// A PostgreSQL server of one gateway's (scripts/postgres.mjs serve: a cluster in the gateway's state directory,
/// migrated), which a test may stop and start again on the same port and data.
pub struct Postgres {
    pub url: String,
    data_dir: PathBuf,
    log: PathBuf,
    port: u16,
    process: Mutex<Option<Supervised>>,
}

impl Postgres {
    /// Starts (creating and migrating on first use) a server with its cluster in `data_dir`, on `port` (0: a free one).
    pub fn start(data_dir: &Path, port: u16) -> Postgres {
        let log = data_dir.with_extension("log");
        let announced_before = std::fs::read_to_string(&log).map_or(0, |text| text.matches("{\"postgres\":").count());
        let args = [
            repo_root().join("scripts/postgres.mjs").display().to_string(),
            "serve".to_owned(),
            "--data".to_owned(),
            data_dir.display().to_string(),
            "--port".to_owned(),
            port.to_string(),
            "--exit-with-stdin".to_owned(),
        ];
        let process = Supervised::spawn(Path::new("node"), &args, &log, &[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let line = text.lines().filter(|l| l.starts_with("{\"postgres\":")).nth(announced_before);
            if let Some(url) = line
                .and_then(|l| serde_json::from_str::<Value>(l).ok())
                .and_then(|v| v["postgres"].as_str().map(str::to_owned))
            {
                break url;
            }
            assert!(Instant::now() < deadline, "PostgreSQL did not start; log:\n{text}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let port = url
            .rsplit(':')
            .next()
            .and_then(|rest| rest.split('/').next())
            .and_then(|p| p.parse().ok())
            .expect("a port");
        Postgres { url, data_dir: data_dir.to_owned(), log, port, process: Mutex::new(Some(process)) }
    }

    /// Stops the server as a crash would (SIGKILL): the gateway's connections break, new ones are refused.
    pub fn stop(&self) {
        if let Some(mut process) = self.process.lock().expect("lock").take() {
            process.kill();
        }
    }

    /// Starts the server again on the same port and data.
    pub fn resume(&self) {
        let started = Postgres::start(&self.data_dir, self.port);
        let process = started.process.lock().expect("lock").take();
        *self.process.lock().expect("lock") = process;
    }

    /// Runs statements (no rows) or a query (its rows, as [`sqlite`] gives them) with psql.
    pub fn query(&self, sql: &str) -> Vec<Value> {
        let query = sql.trim().trim_end_matches(';');
        let reads = ["select", "with"].iter().any(|w| query.get(..w.len()).is_some_and(|s| s.eq_ignore_ascii_case(w)));
        let statement =
            if reads { format!("SELECT coalesce(json_agg(q), '[]')::text FROM ({query}) q") } else { sql.to_owned() };
        let out = Command::new(psql_bin())
            .args([self.url.as_str(), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", &statement])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql failed: {}\n{sql}", String::from_utf8_lossy(&out.stderr));
        if !reads {
            return Vec::new();
        }
        let text = String::from_utf8_lossy(&out.stdout);
        match serde_json::from_str(text.trim()) {
            Ok(Value::Array(rows)) => rows,
            _ => panic!("psql answered {text}"),
        }
    }

    /// The server's log (PostgreSQL's own lines).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// psql's path, as scripts/postgres.mjs finds the PostgreSQL binaries (one lookup for every tool).
fn psql_bin() -> &'static Path {
    static PSQL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PSQL.get_or_init(|| {
        let out = Command::new("node")
            .arg(repo_root().join("scripts/postgres.mjs"))
            .args(["which", "psql"])
            .output()
            .expect("run node");
        assert!(out.status.success(), "psql not found: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// The PostHog project key the tests give the gateway (when the PostHog stand-in runs).
pub const POSTHOG_KEY: &str = "phc_test_project_key_3b9f";

/// The provider key the tests give the gateway; it must never appear in a response or a log line.
pub const PROVIDER_KEY: &str = "sk-or-v1-test-provider-secret-6f1d2c";

/// An HTTP client for tests (no connection reuse surprises: a fresh pool per client).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("http client")
}

/// Reads an SSE response to its end and returns the `data:` payloads in order (`[DONE]` included).
pub async fn sse_events(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.expect("stream body");
    parse_sse(&text)
}

pub fn parse_sse(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> =
                event.lines().filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))).collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// Asserts the OpenAI error shape and returns the `error` object.
pub fn assert_openai_error(body: &Value) -> &Value {
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "error.message missing in {body}");
    assert!(error["type"].is_string(), "error.type missing in {body}");
    assert!(error.get("param").is_some(), "error.param missing in {body}");
    assert!(error.get("code").is_some(), "error.code missing in {body}");
    error
}

/// A client that leaves mid-answer for certain: sends `POST path` with `body` over a plain TCP connection, reads
/// until the response's body has given `until` (or has ended), then closes the connection. (An HTTP client that
/// drops a response may keep its connection open until more data arrives, which is not leaving.) Returns the
/// response head and what was read of the body.
pub async fn post_and_leave(
    base: &str,
    path: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: &Value,
    until: &str,
) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("gateway reachable");
    let body = body.to_string();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    stream.write_all(request.as_bytes()).await.expect("request sent");
    let mut received = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = String::from_utf8_lossy(&received);
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            if rest.contains(until) {
                let (head, rest) = (head.to_owned(), rest.to_owned());
                let _ = stream.shutdown().await;
                return (head, rest);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => received.extend_from_slice(&buf[..n]),
            _ => {
                let text = String::from_utf8_lossy(&received).into_owned();
                let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
                return (head.to_owned(), rest.to_owned());
            }
        }
    }
}
