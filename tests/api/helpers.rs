//! Test harness: real Redis and the Firestore emulator (started by `scripts/test.sh`),
//! apps in-process on random ports with their own Redis key prefix and Firestore project,
//! and child processes for the fault tests.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use quotad::{
    config::Config,
    domain::{
        Phase,
        ratelimit::{Algorithm, Policy, Window},
    },
    startup::Application,
};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

pub const ADMIN: &str = "admin-secret";

/// A policy given in the request (no plan): `limit` per `window_s` seconds.
pub fn explicit(limit: u64, window_s: u64, algorithm: Algorithm) -> Policy {
    Policy {
        name: "custom".into(),
        limit,
        window: Window::from_json(&json!(window_s)).unwrap(),
        algorithm,
        plan: None,
    }
}

/// The policy of plan `plan` (anomaly counting on): `limit` per `window_s` seconds.
pub fn planned(plan: &str, limit: u64, window_s: u64, algorithm: Algorithm) -> Policy {
    Policy {
        name: plan.into(),
        plan: Some(plan.into()),
        ..explicit(limit, window_s, algorithm)
    }
}

/// Where the real servers are. A missing variable fails the test: nothing is skipped.
pub fn redis_url() -> String {
    std::env::var("QUOTAD_TEST_REDIS_URL")
        .expect("QUOTAD_TEST_REDIS_URL is unset: run the tests with scripts/test.sh, which starts Redis")
}

pub fn emulator_host() -> String {
    std::env::var("FIRESTORE_EMULATOR_HOST")
        .expect("FIRESTORE_EMULATOR_HOST is unset: run the tests with scripts/test.sh, which starts the emulator")
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// What several apps of one test share: a Redis key prefix and a Firestore project.
#[derive(Debug, Clone)]
pub struct Shared {
    pub redis_url: Option<String>,
    pub prefix: String,
    pub project: Option<String>,
}

impl Shared {
    /// The emulator and a private redis-server (for tests that stop, kill or pause it).
    pub async fn with_own_redis() -> (Self, RedisServer) {
        let redis = RedisServer::start().await;
        let shared = Self {
            redis_url: Some(redis.url()),
            ..Self::real()
        };
        (shared, redis)
    }

    /// Real Redis and the emulator, isolated by prefix and project.
    pub fn real() -> Self {
        Self {
            redis_url: Some(redis_url()),
            prefix: unique("t") + ":",
            project: Some(unique("test-")),
        }
    }

    pub fn config(&self) -> Config {
        let _ = emulator_host();
        Config {
            addr: "127.0.0.1:0".into(),
            redis_url: self.redis_url.clone(),
            firestore_project_id: self.project.clone(),
            admin_token: Some(ADMIN.into()),
            redis_prefix: self.prefix.clone(),
            sync_schedule: "0 3 1 1 *".into(),
            ..Config::default()
        }
    }

    pub fn store(&self) -> Store {
        Store::new(self.project.clone().expect("a Firestore project"))
    }
}

/// One running app.
pub struct TestApp {
    pub base: String,
    pub http: Client,
    pub shared: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_with(&Shared::real(), |_| {}).await
}

pub async fn spawn_with(shared: &Shared, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let mut config = shared.config();
    tweak(&mut config);
    let app = Application::build(config).await.expect("the app builds");
    let base = format!("http://127.0.0.1:{}", app.port());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    TestApp {
        base,
        http: client(),
        shared: shared.clone(),
        shutdown: Some(tx),
        task: Some(task),
    }
}

pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: Value) -> Response {
        self.http.post(self.url(path)).json(&body).send().await.unwrap()
    }

    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Response {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(ADMIN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await.unwrap()
    }

    pub async fn quota(&self, provider: &str) -> Value {
        ok(self.get(&format!("/quota/{provider}")).await).await
    }

    pub async fn consume(&self, provider: &str, amount: i64) -> Response {
        self.post(&format!("/quota/{provider}/consume"), json!({"amount": amount}))
            .await
    }

    pub async fn consume_with_key(&self, provider: &str, amount: i64, key: &str) -> Response {
        self.http
            .post(self.url(&format!("/quota/{provider}/consume")))
            .header("Idempotency-Key", key)
            .json(&json!({"amount": amount}))
            .send()
            .await
            .unwrap()
    }

    pub async fn refund(&self, provider: &str, amount: i64) -> Response {
        self.post(&format!("/quota/{provider}/refund"), json!({"amount": amount}))
            .await
    }

    pub async fn set_phase(&self, phase: Phase) -> Response {
        self.admin(
            reqwest::Method::PUT,
            "/admin/phase",
            Some(json!({"phase": phase.as_str()})),
        )
        .await
    }

    /// Graceful shutdown; waits for the pending writes to be flushed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The JSON body of a `200`.
pub async fn ok(resp: Response) -> Value {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, StatusCode::OK, "body: {body}");
    body
}

/// A problem document with this status and code.
pub async fn problem(resp: Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    if status == 401 {
        // RFC 9110: a 401 names the scheme that would authenticate
        let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap());
        assert_eq!(challenge, Some("Bearer realm=\"quotad\""));
    }
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    for member in ["type", "title", "detail"] {
        assert!(body[member].is_string(), "{member} missing: {body}");
    }
    body
}

/// Polls `read` until it returns `expected` (or `within` passes) and returns the last value.
pub async fn eventually<T, F, Fut>(within: Duration, expected: T, mut read: F) -> T
where
    T: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + within;
    loop {
        let value = read().await;
        if value == expected || Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The emulator's provider documents, through its REST API (owner access).
#[derive(Clone)]
pub struct Store {
    pub project: String,
    http: Client,
    collection: String,
}

impl Store {
    pub fn new(project: String) -> Self {
        Self {
            project,
            http: client(),
            collection: "providers".into(),
        }
    }

    /// The same project's documents in another provider collection.
    pub fn in_collection(mut self, collection: &str) -> Self {
        collection.clone_into(&mut self.collection);
        self
    }

    /// The ids of every document in the collection.
    pub async fn ids(&self) -> Vec<String> {
        let resp = self
            .http
            .get(format!("{}/{}", self.base(), self.collection))
            .bearer_auth("owner")
            .query(&[("pageSize", "1000")])
            .send()
            .await
            .unwrap();
        let body: Value = resp.json().await.unwrap();
        let mut ids: Vec<String> = body["documents"]
            .as_array()
            .map(|docs| {
                docs.iter()
                    .map(|d| d["name"].as_str().unwrap().rsplit('/').next().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    fn base(&self) -> String {
        format!(
            "http://{}/v1/projects/{}/databases/(default)/documents",
            emulator_host(),
            self.project
        )
    }

    /// Sets `aiCallsUsed` and/or `aiCallsLimit` (only those fields).
    pub async fn put(&self, provider: &str, used: Option<i64>, limit: Option<i64>) {
        let mut fields = serde_json::Map::new();
        let mut mask = Vec::new();
        if let Some(used) = used {
            fields.insert("aiCallsUsed".into(), json!({"integerValue": used.to_string()}));
            mask.push(("updateMask.fieldPaths", "aiCallsUsed"));
        }
        if let Some(limit) = limit {
            fields.insert("aiCallsLimit".into(), json!({"integerValue": limit.to_string()}));
            mask.push(("updateMask.fieldPaths", "aiCallsLimit"));
        }
        let resp = self
            .http
            .patch(format!("{}/{}/{provider}", self.base(), self.collection))
            .bearer_auth("owner")
            .query(&mask)
            .json(&json!({"fields": fields}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    }

    /// Sets one string field of a document (only that field).
    pub async fn put_string(&self, provider: &str, field: &str, value: &str) {
        let resp = self
            .http
            .patch(format!("{}/{}/{provider}", self.base(), self.collection))
            .bearer_auth("owner")
            .query(&[("updateMask.fieldPaths", field)])
            .json(&json!({"fields": {field: {"stringValue": value}}}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    }

    /// `(used, limit)` of a document, `None` when it does not exist.
    pub async fn get(&self, provider: &str) -> Option<(Option<i64>, Option<i64>)> {
        let resp = self
            .http
            .get(format!("{}/{}/{provider}", self.base(), self.collection))
            .bearer_auth("owner")
            .send()
            .await
            .unwrap();
        if resp.status() == StatusCode::NOT_FOUND {
            return None;
        }
        let doc: Value = resp.json().await.unwrap();
        let int = |name: &str| doc["fields"][name]["integerValue"].as_str().map(|s| s.parse().unwrap());
        Some((int("aiCallsUsed"), int("aiCallsLimit")))
    }

    pub async fn used(&self, provider: &str) -> Option<i64> {
        self.get(provider).await.and_then(|(used, _)| used)
    }

    /// What a legacy Cloud Function does: read `aiCallsUsed`, write it back plus `amount`
    /// if the document did not change meanwhile (an update-time precondition), else retry.
    pub async fn add_used(&self, provider: &str, amount: i64) {
        let name = format!(
            "projects/{}/databases/(default)/documents/{}/{provider}",
            self.project, self.collection
        );
        for _ in 0..200 {
            let resp = self
                .http
                .get(format!("{}/{}/{provider}", self.base(), self.collection))
                .bearer_auth("owner")
                .send()
                .await
                .unwrap();
            let (used, precondition) = if resp.status() == StatusCode::NOT_FOUND {
                (0, json!({"exists": false}))
            } else {
                let doc: Value = resp.json().await.unwrap();
                let used = doc["fields"]["aiCallsUsed"]["integerValue"]
                    .as_str()
                    .map_or(0, |s| s.parse::<i64>().unwrap());
                (used, json!({"updateTime": doc["updateTime"]}))
            };
            let write = json!({"writes": [{
                "update": {"name": name, "fields": {"aiCallsUsed": {"integerValue": (used + amount).to_string()}}},
                "updateMask": {"fieldPaths": ["aiCallsUsed"]},
                "currentDocument": precondition,
            }]});
            let resp = self
                .http
                .post(format!("{}:commit", self.base()))
                .bearer_auth("owner")
                .json(&write)
                .send()
                .await
                .unwrap();
            if resp.status().is_success() {
                return;
            }
        }
        panic!("add_used({provider}) kept racing");
    }
}

/// A free loopback port.
pub async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private redis-server child on a fixed port (stop/start keep the port; data is lost).
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl RedisServer {
    pub async fn start() -> Self {
        let port = free_port().await;
        let dir = std::env::temp_dir().join(unique("quotad-redis-"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self { port, child: None, dir };
        server.launch().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub async fn launch(&mut self) {
        let binary = std::env::var("QUOTAD_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(binary)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP / SIGCONT: the server hangs instead of refusing.
    pub fn pause(&self, paused: bool) {
        if let Some(child) = &self.child {
            let signal = if paused { "-STOP" } else { "-CONT" };
            Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .unwrap();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.pause(false);
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback TCP forwarder that can be taken down (connections cut, new ones refused)
/// and brought back up on the same port: Firestore or Redis going away.
pub struct TcpProxy {
    pub port: u16,
    target: SocketAddr,
    up: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    /// While true, what the target answers is read but not passed on (see `hold_replies`).
    holding: Arc<tokio::sync::watch::Sender<bool>>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let port = free_port().await;
        let (generation, _) = tokio::sync::watch::channel(0);
        let mut proxy = Self {
            port,
            target,
            up: Arc::new(AtomicBool::new(false)),
            generation: Arc::new(generation),
            holding: Arc::new(tokio::sync::watch::channel(false).0),
            accept: None,
        };
        proxy.set_up(true).await;
        proxy
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn set_up(&mut self, up: bool) {
        if up == self.up.load(Ordering::SeqCst) {
            return;
        }
        self.up.store(up, Ordering::SeqCst);
        if !up {
            if let Some(task) = self.accept.take() {
                task.abort();
            }
            self.generation.send_modify(|g| *g += 1);
            return;
        }
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let (target, generation, holding) = (self.target, self.generation.clone(), self.holding.clone());
        self.accept = Some(tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut cut = generation.subscribe();
                let held = holding.subscribe();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_target, mut to_target) = upstream.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut from_client, &mut to_target) => {}
                        _ = pass_on_unless_held(&mut from_target, &mut to_client, held) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        }));
    }

    /// Holds back (`true`) or passes on (`false`, with what was held) what the target
    /// answers, while requests still reach it: the target runs a command and its sender
    /// waits for the answer in vain, as when Redis stops between running a call and
    /// sending its reply.
    pub fn hold_replies(&self, hold: bool) {
        self.holding.send_replace(hold);
    }
}

/// Copies `from` to `to`, each chunk read only once `held` is false.
async fn pass_on_unless_held(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    mut held: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if held.wait_for(|hold| !hold).await.is_err() {
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(task) = self.accept.take() {
            task.abort();
        }
        self.generation.send_modify(|g| *g += 1);
    }
}

/// The quotad binary as a child process (fault tests: a separate Firestore address, signals).
pub struct QuotadProcess {
    pub child: Child,
    pub base: String,
}

impl QuotadProcess {
    pub async fn start(envs: &[(&str, String)]) -> Self {
        let port = free_port().await;
        let mut command = Command::new(env!("CARGO_BIN_EXE_quotad"));
        command.env_clear();
        for (name, value) in std::env::vars() {
            if !(name.starts_with("QUOTAD_") || name.starts_with("REDIS_") || name.starts_with("FIRESTORE_")) {
                command.env(name, value);
            }
        }
        command
            .env("QUOTAD_ADDR", format!("127.0.0.1:{port}"))
            .env("QUOTAD_ADMIN_TOKEN", ADMIN)
            .env("QUOTAD_SYNC_SCHEDULE", "0 3 1 1 *")
            .env("RUST_LOG", "info");
        for (name, value) in envs {
            command.env(name, value);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("quotad starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(resp) = http.get(format!("{base}/healthz")).send().await
                && resp.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "quotad did not answer /healthz");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, base }
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self, http: &Client) -> String {
        let resp = http.get(format!("{}/metrics", self.base)).send().await.unwrap();
        resp.text().await.unwrap()
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for QuotadProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
