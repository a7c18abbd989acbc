//! The migration tools and the batch sync as processes: `quotad sync --once` killed with
//! SIGKILL mid-run and run again, consumes running meanwhile, `verify`, `backfill`, `phase`.

use std::{
    collections::HashMap,
    process::{Command, Output, Stdio},
    time::Duration,
};

use futures::{StreamExt, stream};

use crate::helpers::{QuotadProcess, RedisServer, Store, client, emulator_host, unique};

fn tool_env(redis: &RedisServer, project: &str) -> Vec<(&'static str, String)> {
    vec![
        ("REDIS_URL", redis.url()),
        ("FIRESTORE_PROJECT_ID", project.to_owned()),
        ("FIRESTORE_EMULATOR_HOST", emulator_host()),
    ]
}

fn tool(envs: &[(&'static str, String)], args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_quotad"));
    command
        .args(args)
        .env_remove("QUOTAD_PHASE")
        .env_remove("REDIS_URL")
        .env_remove("FIRESTORE_PROJECT_ID");
    for (name, value) in envs {
        command.env(name, value);
    }
    command
}

fn run(envs: &[(&'static str, String)], args: &[&str]) -> Output {
    tool(envs, args).output().expect("quotad runs")
}

/// Consumes `amounts[provider]` units of each provider, 32 at a time; returns what was admitted.
async fn consume_all(base: &str, amounts: &HashMap<String, i64>) -> HashMap<String, i64> {
    let http = client();
    let calls = amounts.iter().flat_map(|(p, n)| (0..*n).map(move |_| p.clone()));
    let admitted: Vec<(String, bool)> = stream::iter(calls)
        .map(|provider| {
            let http = http.clone();
            async move {
                let resp = http
                    .post(format!("{base}/quota/{provider}/consume"))
                    .send()
                    .await
                    .unwrap();
                (provider, resp.status().as_u16() == 200)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut total = HashMap::new();
    for (provider, ok) in admitted {
        *total.entry(provider).or_insert(0) += i64::from(ok);
    }
    total
}

/// Every document holds exactly what was admitted for its provider.
async fn assert_documents_hold(store: &Store, admitted: &HashMap<String, i64>) {
    let mut wrong = Vec::new();
    for (provider, n) in admitted {
        let used = store.used(provider).await;
        if used != Some(*n) {
            wrong.push((provider.clone(), *n, used));
        }
    }
    assert!(
        wrong.is_empty(),
        "documents that differ from what was admitted: {:?}",
        &wrong[..wrong.len().min(10)]
    );
}

/// A private Redis, a Firestore project, the tools' environment for both, and a quotad
/// serving in redis-primary on them.
async fn redis_primary_server(project: &str) -> (RedisServer, String, Vec<(&'static str, String)>, QuotadProcess) {
    let redis = RedisServer::start().await;
    let project = unique(project);
    let envs = tool_env(&redis, &project);
    let mut server_env = envs.clone();
    server_env.push(("QUOTAD_PHASE", "redis-primary".into()));
    let server = QuotadProcess::start(&server_env).await;
    (redis, project, envs, server)
}

/// Drops the sync lock as its expiry would (the holder was killed or paused).
async fn expire_sync_lock(redis: &RedisServer) {
    let counters = quotad::storage::redis::RedisCounters::new(&redis.url(), "quotad:").unwrap();
    let mut del = redis::cmd("DEL");
    del.arg("quotad:sync:lock");
    counters.query::<i64>(del).await.unwrap();
}

#[tokio::test]
async fn a_sync_killed_at_any_point_and_run_again_leaves_every_document_exact() {
    let (redis, project, envs, server) = redis_primary_server("crash-").await;
    let amounts: HashMap<String, i64> = (0..1500).map(|i| (format!("p{i}"), 1 + i % 3)).collect();
    let mut admitted = consume_all(&server.base, &amounts).await;

    // Kill the sync at several points of its run, with consumes going on meanwhile.
    for delay_ms in [150u64, 700, 1500, 2500] {
        let mut sync = tool(&envs, &["sync", "--once"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let more: HashMap<String, i64> = (0..60).map(|i| (format!("p{}", i * 7), 1)).collect();
        let (extra, ()) = tokio::join!(
            consume_all(&server.base, &more),
            tokio::time::sleep(Duration::from_millis(delay_ms))
        );
        let _ = sync.kill();
        let _ = sync.wait();
        // Its lock would expire within 30 s; drop it now so the next run starts at once.
        expire_sync_lock(&redis).await;
        for (provider, n) in extra {
            *admitted.get_mut(&provider).unwrap() += n;
        }
    }
    // The dead syncs' lock expires; then a clean run writes the rest.
    let mut report = run(&envs, &["sync", "--once"]);
    for _ in 0..60 {
        if report.status.code() != Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        report = run(&envs, &["sync", "--once"]);
    }
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let store = Store::new(project.clone());
    assert_documents_hold(&store, &admitted).await;
    // Two syncs in a row: the second writes nothing.
    let again = run(&envs, &["sync", "--once"]);
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["written"], 0, "{report}");
    let verify = run(&envs, &["verify"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    drop(server);
}

#[tokio::test]
async fn verify_reports_drift_and_backfill_warms_the_cache() {
    let redis = RedisServer::start().await;
    let project = unique("tools-");
    let envs = tool_env(&redis, &project);
    let store = Store::new(project.clone());
    for i in 0..31 {
        store.put(&format!("w{i}"), Some(i), Some(100)).await;
    }
    // A replica deciding in Firestore for lack of Redis (its mark is good for 3 s, 4 from a
    // clock a little ahead): that one is left to Firestore.
    let ahead = chrono::Utc::now().timestamp_millis() + 900;
    store
        .put_string("w30", "quotadFallback", &format!("{ahead} cut-off"))
        .await;
    let backfill = run(&envs, &["backfill"]);
    assert!(
        backfill.status.success(),
        "{}",
        String::from_utf8_lossy(&backfill.stderr)
    );
    assert!(String::from_utf8_lossy(&backfill.stdout).contains("30 provider documents"));
    let server = QuotadProcess::start(&envs).await;
    let body: serde_json::Value = client()
        .get(format!("{}/quota/w7", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (body["used"].as_i64(), body["source"].as_str()),
        (Some(7), Some("cache"))
    );
    assert!(run(&envs, &["verify"]).status.success());
    store.add_used("w7", 5).await; // another writer: the cache does not know
    let verify = run(&envs, &["verify"]);
    assert_eq!(verify.status.code(), Some(1));
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(out.contains("w7\tcached=7\tstored=12\tunsynced=0\tdrift=5"), "{out}");
    drop(server);
}

#[tokio::test]
async fn the_phase_command_switches_every_replica() {
    let redis = RedisServer::start().await;
    let project = unique("phase-");
    let envs = tool_env(&redis, &project);
    let server = QuotadProcess::start(&envs).await;
    let shown = run(&envs, &["phase"]);
    assert!(String::from_utf8_lossy(&shown.stdout).starts_with("dual-write"));
    assert!(run(&envs, &["phase", "set", "redis-primary"]).status.success());
    let http = client();
    let phase = crate::helpers::eventually(Duration::from_secs(5), Some("redis-primary".to_owned()), || async {
        let resp = http
            .get(format!("{}/admin/phase", server.base))
            .bearer_auth(crate::helpers::ADMIN)
            .send()
            .await
            .unwrap();
        resp.json::<serde_json::Value>().await.unwrap()["phase"]
            .as_str()
            .map(str::to_owned)
    })
    .await;
    assert_eq!(phase.as_deref(), Some("redis-primary"));
    let resp = http
        .post(format!("{}/quota/p1/consume", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(run(&envs, &["phase", "set", "dual-write"]).status.success()); // syncs first
    assert_eq!(Store::new(project).used("p1").await, Some(1));
    let help = run(&envs, &["sync", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("quotad sync --once"));
    assert_eq!(run(&envs, &["frobnicate"]).status.code(), Some(64));
    drop(server);
}

#[tokio::test]
async fn a_sync_that_lost_its_lock_while_paused_makes_no_document_wrong() {
    let (redis, project, envs, server) = redis_primary_server("fence-").await;
    let amounts: HashMap<String, i64> = (0..1200).map(|i| (format!("f{i}"), 2)).collect();
    let mut admitted = consume_all(&server.base, &amounts).await;

    // A sync pauses mid-run (SIGSTOP) and its lock expires (dropped here) ...
    let mut paused = tool(&envs, &["sync", "--once"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    Command::new("kill")
        .args(["-STOP", &paused.id().to_string()])
        .status()
        .unwrap();
    expire_sync_lock(&redis).await;
    // ... another sync runs to completion, and usage goes on ...
    let other = run(&envs, &["sync", "--once"]);
    assert!(other.status.success(), "{}", String::from_utf8_lossy(&other.stderr));
    let more: HashMap<String, i64> = (0..1200).step_by(3).map(|i| (format!("f{i}"), 1)).collect();
    for (provider, n) in consume_all(&server.base, &more).await {
        *admitted.get_mut(&provider).unwrap() += n;
    }
    // ... then the paused one wakes up and goes on writing with its stale view.
    Command::new("kill")
        .args(["-CONT", &paused.id().to_string()])
        .status()
        .unwrap();
    let _ = paused.wait();
    let last = run(&envs, &["sync", "--once"]);
    assert!(last.status.success(), "{}", String::from_utf8_lossy(&last.stderr));
    let store = Store::new(project);
    assert_documents_hold(&store, &admitted).await;
    drop(server);
}

#[tokio::test]
async fn redis_coming_back_empty_in_redis_primary_is_detected_and_reported() {
    let (mut redis, _project, envs, server) = redis_primary_server("loss-").await;
    let http = client();
    for _ in 0..5 {
        let resp = http
            .post(format!("{}/quota/lost/consume", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    }
    // Let the replica note this Redis's data set, then restart Redis without persistence.
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.kill();
    redis.launch().await;
    let metric = crate::helpers::eventually(Duration::from_secs(15), true, || async {
        let text = server.metrics(&http).await;
        text.lines()
            .any(|l| l.starts_with("quotad_redis_data_loss_total{phase=\"redis-primary\"} "))
    })
    .await;
    assert!(metric, "no quotad_redis_data_loss_total after Redis came back empty");
    let verify = run(&envs, &["verify"]);
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(out.contains("Redis came back empty"), "{out}");
    // The records reload from Firestore, which never saw the unsynced usage.
    let body: serde_json::Value = http
        .get(format!("{}/quota/lost", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["used"], 0);
    drop(server);
}
