//! Faults: Redis killed, restarted and hung; Firestore cut off; the service killed.

use std::time::Duration;

use quotad::domain::Phase;
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN, QuotadProcess, RedisServer, Shared, Store, TcpProxy, TestApp, client, emulator_host, eventually, ok,
    problem, spawn_with, unique,
};

const DEADLINE: Duration = Duration::from_secs(30);

async fn readiness(app: &crate::helpers::TestApp) -> Value {
    app.get("/readyz").await.json().await.unwrap()
}

#[tokio::test]
async fn redis_killed_and_restarted_mid_test_keeps_decisions_exact() {
    let (shared, mut redis) = Shared::with_own_redis().await;
    let app = spawn_with(&shared, |_| {}).await;
    let store = shared.store();
    store.put("p1", Some(0), Some(6)).await;
    for _ in 0..3 {
        ok(app.consume("p1", 1).await).await;
    }
    assert_eq!(eventually(DEADLINE, Some(3), || store.used("p1")).await, Some(3));

    redis.kill();
    for _ in 0..2 {
        ok(app.consume("p1", 1).await).await; // decided by Firestore transactions
    }
    assert_eq!(store.used("p1").await, Some(5));
    let down = json!({"redis": "down", "firestore": "ok"});
    assert_eq!(
        eventually(Duration::from_secs(10), down.clone(), || readiness(&app)).await,
        down
    );

    redis.launch().await; // back, empty
    let up = json!({"redis": "ok", "firestore": "ok"});
    assert_eq!(
        eventually(Duration::from_secs(10), up.clone(), || readiness(&app)).await,
        up
    );
    assert_eq!(ok(app.consume("p1", 1).await).await["used"], 6);
    problem(app.consume("p1", 1).await, 429, "quota_exceeded").await;
    assert_eq!(eventually(DEADLINE, Some(6), || store.used("p1")).await, Some(6));
}

#[tokio::test]
async fn a_hung_redis_sends_decisions_to_firestore_and_its_stale_data_is_reloaded() {
    let (shared, redis) = Shared::with_own_redis().await;
    let app = spawn_with(&shared, |_| {}).await;
    let store = shared.store();
    store.put("p1", Some(0), Some(5)).await;
    for _ in 0..2 {
        ok(app.consume("p1", 1).await).await;
    }
    assert_eq!(eventually(DEADLINE, Some(2), || store.used("p1")).await, Some(2));

    redis.pause(true);
    for _ in 0..2 {
        ok(app.consume("p1", 1).await).await;
    }
    assert_eq!(store.used("p1").await, Some(4));

    redis.pause(false); // Redis still believes used = 2
    let up = json!({"redis": "ok", "firestore": "ok"});
    assert_eq!(
        eventually(Duration::from_secs(10), up.clone(), || readiness(&app)).await,
        up
    );
    assert_eq!(ok(app.consume("p1", 1).await).await["used"], 5);
    problem(app.consume("p1", 1).await, 429, "quota_exceeded").await;
    assert_eq!(eventually(DEADLINE, Some(5), || store.used("p1")).await, Some(5));
}

/// Two replicas of `phase` on their own Redis, and provider `p` at 2 of 10 in Redis and the
/// store; then Redis hangs while A decides 3 more in Firestore and a legacy writer adds 3
/// (8 of 10), and wakes. B never saw the hang. Returns (redis, A, B, store).
async fn after_a_hang(phase: Phase) -> (RedisServer, TestApp, TestApp, Store) {
    let (shared, redis) = Shared::with_own_redis().await;
    let (a, b) = (
        spawn_with(&shared, |c| c.initial_phase = phase).await,
        spawn_with(&shared, |c| c.initial_phase = phase).await,
    );
    let store = shared.store();
    store.put("p", Some(0), Some(10)).await;
    ok(a.consume("p", 1).await).await;
    ok(b.consume("p", 1).await).await;
    reaches_the_store(&a, &store, phase, 2).await;

    redis.pause(true);
    for used in 3..=5 {
        assert_eq!(
            ok(a.consume("p", 1).await).await["used"],
            used,
            "{phase}: A decides in Firestore"
        );
    }
    store.add_used("p", 3).await; // a legacy writer: 8 of 10
    redis.pause(false);
    (redis, a, b, store)
}

/// Provider `p`'s usage reaches the store as `used` (in `redis-primary` with a sync on `app`).
async fn reaches_the_store(app: &TestApp, store: &Store, phase: Phase, used: i64) {
    if phase == Phase::RedisPrimary {
        ok(app.admin(reqwest::Method::POST, "/admin/sync", None).await).await;
    }
    assert_eq!(
        eventually(DEADLINE, Some(used), || store.used("p")).await,
        Some(used),
        "{phase}"
    );
}

/// Consumes on `app` until it refuses; how many it admitted.
async fn admitted_until_refused(app: &TestApp, phase: Phase) -> usize {
    let mut admitted = 0;
    while app.consume("p", 1).await.status() == 200 {
        admitted += 1;
        assert!(admitted <= 10, "{phase}: it keeps admitting");
    }
    admitted
}

/// A replica that decided in Firestore while Redis hung (and another writer beside it) must
/// not leave a replica that never saw the hang deciding from Redis's old record once Redis
/// wakes: the call that timed out, run late, marks the record outdated, and so do the
/// marks the fallback sent, queued behind it. In both phases where Redis decides.
#[tokio::test]
async fn after_a_hang_another_replica_decides_from_what_firestore_decided_meanwhile() {
    for phase in [Phase::DualWrite, Phase::RedisPrimary] {
        let (_redis, a, b, store) = after_a_hang(phase).await;
        // B never saw Redis hang: its lookup and its decisions follow the store at once.
        let seen = ok(b.get("/quota/p").await).await;
        assert_eq!(
            (seen["used"].clone(), seen["source"].clone()),
            (json!(8), json!("store")),
            "{phase}"
        );
        assert_eq!(admitted_until_refused(&b, phase).await, 2, "{phase}: 8 of 10 were used");
        reaches_the_store(&b, &store, phase, 10).await;
        // A, deciding in Firestore or back on Redis by now, sees all of it too.
        problem(a.consume("p", 1).await, 429, "quota_exceeded").await;
        assert_eq!(store.used("p").await, Some(10), "{phase}");
        a.stop().await;
        b.stop().await;
    }
}

/// A replica that lost Redis decides in Firestore until its reconcile has run, some
/// 100-300 ms after Redis answers again (the reconcile reads Firestore). Another replica that
/// never lost Redis decides in Redis meanwhile, and its changes reach the document later (in
/// `dual-write` a few ms later, in `redis-primary` with the sync): a Firestore decision in
/// between would not see them, and A would admit the 11th unit of 10. Once a probe finds
/// Redis answering, A's decisions wait for the reconcile instead (a black-box probe found
/// this: `redis-primary` failed in 4 runs of 4, `dual-write` in about 1 of 4).
#[tokio::test]
async fn a_replica_back_from_a_hang_decides_after_its_reconcile() {
    for phase in [Phase::DualWrite, Phase::RedisPrimary] {
        let (_redis, a, b, store) = after_a_hang(phase).await;
        // at once: B's changes may not be in the store yet
        assert_eq!(admitted_until_refused(&b, phase).await, 2, "{phase}");
        problem(a.consume("p", 1).await, 429, "quota_exceeded").await;
        reaches_the_store(&a, &store, phase, 10).await;
        a.stop().await;
        b.stop().await;
    }
}

/// The environment of a quotad process on `redis` and the Firestore at `firestore` (the
/// emulator, or a proxy in front of it), with its documents in `project`.
fn quotad_env(redis: &RedisServer, project: &str, firestore: String) -> [(&'static str, String); 3] {
    [
        ("REDIS_URL", redis.url()),
        ("FIRESTORE_PROJECT_ID", project.to_owned()),
        ("FIRESTORE_EMULATOR_HOST", firestore),
    ]
}

/// A quotad process on `redis` whose Firestore is behind a proxy that can be taken down,
/// with provider `p1` at usage 0 of `limit`.
async fn behind_a_firestore_proxy(redis: &RedisServer, limit: i64) -> (QuotadProcess, TcpProxy, Store) {
    let proxy = TcpProxy::start(emulator_host().parse().unwrap()).await;
    let project = unique("test-");
    let store = Store::new(project.clone());
    store.put("p1", Some(0), Some(limit)).await;
    let quotad = QuotadProcess::start(&quotad_env(redis, &project, proxy.address())).await;
    (quotad, proxy, store)
}

/// `POST /quota/p1/consume` on `quotad`: the status.
async fn consume_status(http: &reqwest::Client, quotad: &QuotadProcess) -> u16 {
    http.post(format!("{}/quota/p1/consume", quotad.base))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_failed_firestore_write_is_retried_until_it_lands_once() {
    let redis = RedisServer::start().await;
    let (quotad, mut proxy, store) = behind_a_firestore_proxy(&redis, 100).await;
    let http = client();
    let consume = || consume_status(&http, &quotad);
    assert_eq!(consume().await, 200);
    assert_eq!(eventually(DEADLINE, Some(1), || store.used("p1")).await, Some(1));

    proxy.set_up(false).await;
    for _ in 0..3 {
        assert_eq!(consume().await, 200); // Redis decides; the writes fail and wait
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(store.used("p1").await, Some(1));

    proxy.set_up(true).await;
    assert_eq!(eventually(DEADLINE, Some(4), || store.used("p1")).await, Some(4));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(store.used("p1").await, Some(4), "a retried write was doubled");
    assert!(quotad.terminate().success());
}

/// On both of the binary's runtimes: one worker runs tokio's current-thread scheduler
/// (`startup::runtime`), more the multi-thread one.
#[tokio::test]
async fn sigterm_flushes_pending_writes_and_exits_zero() {
    let redis = RedisServer::start().await;
    let project = unique("test-");
    let store = Store::new(project.clone());
    for (workers, provider) in [("1", "p1"), ("2", "p2")] {
        let [redis_url, project_id, firestore] = quotad_env(&redis, &project, emulator_host());
        let env = [
            redis_url,
            project_id,
            firestore,
            ("TOKIO_WORKER_THREADS", workers.to_owned()),
        ];
        let quotad = QuotadProcess::start(&env).await;
        let http = client();
        for _ in 0..20 {
            let resp = http
                .post(format!("{}/quota/{provider}/consume", quotad.base))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
        }
        assert!(quotad.terminate().success(), "{workers} worker(s)");
        assert_eq!(store.used(provider).await, Some(20), "{workers} worker(s)");
    }
}

#[tokio::test]
async fn writes_a_killed_replica_left_behind_are_taken_over_by_another() {
    let redis = RedisServer::start().await;
    let emulator: std::net::SocketAddr = emulator_host().parse().unwrap();
    let mut proxy = TcpProxy::start(emulator).await;
    let project = unique("test-");
    let store = Store::new(project.clone());
    let env = |host: String| {
        vec![
            ("REDIS_URL", redis.url()),
            ("FIRESTORE_PROJECT_ID", project.clone()),
            ("FIRESTORE_EMULATOR_HOST", host),
        ]
    };
    let victim = QuotadProcess::start(&env(proxy.address())).await;
    let http = client();
    let resp = http
        .post(format!("{}/quota/p1/consume", victim.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200); // loads the record while Firestore answers
    assert_eq!(eventually(DEADLINE, Some(1), || store.used("p1")).await, Some(1));
    proxy.set_up(false).await; // from now on its writes cannot land
    for _ in 0..6 {
        let resp = http
            .post(format!("{}/quota/p1/consume", victim.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    }
    drop(victim); // SIGKILL: its queue is gone, the dirty records stay in Redis
    let survivor = QuotadProcess::start(&env(emulator_host())).await;
    assert_eq!(eventually(DEADLINE, Some(7), || store.used("p1")).await, Some(7));
    drop(survivor);
}

#[tokio::test]
async fn embedded_backends_run_without_redis_or_firestore() {
    let shared = Shared {
        redis_url: None,
        prefix: unique("t"),
        project: None,
    };
    let app = spawn_with(&shared, |c| c.initial_phase = Phase::DualWrite).await;
    assert_eq!(ok(app.consume("p1", 1).await).await["used"], 1);
    assert_eq!(readiness(&app).await, json!({"redis": "ok", "firestore": "ok"}));
}

#[tokio::test]
async fn a_retry_after_redis_died_is_answered_from_firestore_not_charged_again() {
    let (shared, mut redis) = Shared::with_own_redis().await;
    let app = spawn_with(&shared, |_| {}).await;
    let store = shared.store();
    store.put("p1", Some(0), Some(10)).await;
    let first = ok(app.consume_with_key("p1", 3, "cf-retry-1").await).await;
    assert_eq!(eventually(DEADLINE, Some(3), || store.used("p1")).await, Some(3));
    redis.kill();
    let retried = ok(app.consume_with_key("p1", 3, "cf-retry-1").await).await;
    assert_eq!(retried, first);
    assert_eq!(store.used("p1").await, Some(3));
    problem(
        app.consume_with_key("p1", 4, "cf-retry-1").await,
        422,
        "idempotency_key_reused",
    )
    .await;
}

/// The sync lock is not taken for a caller that gave up: an acquire queued in a hung Redis
/// runs when it resumes, after its sender's wait ended (it answered `409 sync_incomplete`
/// or `503`), and would then hold the lock for up to its TTL with nobody syncing. It
/// carries a deadline, after which it changes nothing.
#[tokio::test]
async fn a_sync_lock_acquire_that_ran_too_late_takes_nothing() {
    use quotad::storage::{Counters, redis::RedisCounters};

    let redis = RedisServer::start().await;
    let counters = RedisCounters::new(&redis.url(), "late:").unwrap();
    counters.ping().await.unwrap(); // measures the clock offset the deadline is counted in
    let calls = |info: String| {
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse::<u64>().unwrap())
    };
    let stats = || async {
        let info: String = counters
            .query(::redis::cmd("INFO").arg("commandstats").clone())
            .await
            .unwrap();
        calls(info)
    };
    let before = stats().await;

    redis.pause(true);
    let attempt = counters.acquire_sync_lock("gave-up", Duration::from_secs(30)).await;
    assert!(attempt.is_err(), "a hung Redis answers nothing: {attempt:?}");
    redis.pause(false);
    // the queued acquire has run once Redis counts its EVALSHA (the lock script is the only
    // one this test sends)
    let ran = eventually(DEADLINE, true, || async { stats().await > before }).await;
    assert!(ran);
    let holder: Option<String> = counters
        .query(::redis::cmd("GET").arg(counters.keys().sync_lock()).clone())
        .await
        .unwrap();
    assert_eq!(holder, None);
    assert!(
        counters
            .acquire_sync_lock("next", Duration::from_secs(30))
            .await
            .unwrap()
    );
}

/// A fallback's outdated mark is sent on a connection of its own, which a hang does not take
/// down: sent while Redis hangs, after the shared connection went at the first timeout (no
/// new one can be made then), it waits there through the hang, runs when Redis wakes, and
/// replicas that never lost Redis see the record outdated from then on.
#[tokio::test]
async fn a_mark_sent_while_redis_hangs_runs_when_it_wakes() {
    use quotad::{
        domain::ProviderId,
        storage::{Counters, Seed, redis::RedisCounters},
    };

    let redis = RedisServer::start().await;
    let (a, b) = (
        std::sync::Arc::new(RedisCounters::new(&redis.url(), "hang:").unwrap()),
        RedisCounters::new(&redis.url(), "hang:").unwrap(),
    );
    let seed = Seed {
        used: 2,
        limit: 10,
        epoch: "e1".into(),
        loaded_from: String::new(),
        keys: vec![],
        fence: 0,
        outdated: false,
    };
    let (p1, p2) = (ProviderId::parse("p1").unwrap(), ProviderId::parse("p2").unwrap());
    for id in [&p1, &p2] {
        assert!(a.load(id, &seed, Duration::from_secs(300)).await.unwrap());
    }

    redis.pause(true);
    let read = a.read(&p1).await;
    assert!(read.is_err(), "a hung Redis answers nothing: {read:?}");
    let mark = tokio::spawn({
        let (a, p2) = (a.clone(), p2.clone());
        async move { a.mark_outdated(&p2).await }
    });
    // the hang outlasts a call's timeout: the mark is still waiting, not given up
    tokio::time::sleep(quotad::storage::redis::CALL_TIMEOUT * 2).await;
    assert!(!mark.is_finished(), "the mark gave up: {:?}", mark.await);
    redis.pause(false);

    mark.await.unwrap().unwrap();
    let seen = b.read(&p2).await.unwrap().unwrap();
    assert!(seen.outdated, "B would decide from a record A decided around: {seen:?}");
    assert!(!b.read(&p1).await.unwrap().unwrap().outdated);
}

/// A probe tries to connect even right after a failed attempt (requests do not, so as not
/// to wait for a Redis that is away): probes run back to back while Redis hangs, so one is
/// connecting when it wakes, and decisions return to Redis without waiting for a next tick.
#[tokio::test]
async fn a_probe_connects_right_after_a_failed_attempt() {
    use quotad::storage::{Counters, redis::RedisCounters};

    let redis = RedisServer::start().await;
    let counters = RedisCounters::new(&redis.url(), "probe:").unwrap();
    counters.ping().await.unwrap();
    redis.pause(true);
    let probe = counters.ping().await;
    assert!(probe.is_err(), "a hung Redis answers nothing: {probe:?}");
    let probe = counters.ping().await;
    assert!(probe.is_err(), "no connection yet: {probe:?}");
    redis.pause(false);
    // at once, where a request would be told that the last attempt failed
    counters.ping().await.unwrap();
    counters.query::<String>(::redis::cmd("PING")).await.unwrap();
}

/// In `redis-primary` a keyed consume that Redis decided (not synced yet) is decided again
/// by the Firestore fallback when its retry comes while Redis hangs: the document does not
/// know the key. Once Redis is back, the record's write settles the key decided twice: the
/// call is charged once, and its replays give Redis's first answer.
#[tokio::test]
async fn a_keyed_retry_decided_again_while_redis_hangs_is_charged_once() {
    let (shared, redis) = Shared::with_own_redis().await;
    let app = spawn_with(&shared, |_| {}).await;
    ok(app.set_phase(Phase::RedisPrimary).await).await;
    let store = shared.store();
    store.put("p1", Some(10), Some(100)).await;
    assert_eq!(ok(app.consume("p1", 1).await).await["used"], 11);
    let first = ok(app.consume_with_key("p1", 4, "retry-me").await).await;
    assert_eq!(first["used"], 15);

    redis.pause(true);
    ok(app.consume_with_key("p1", 4, "retry-me").await).await; // the fallback charges it again
    redis.pause(false);
    let up = json!({"redis": "ok", "firestore": "ok"});
    assert_eq!(
        eventually(Duration::from_secs(10), up.clone(), || readiness(&app)).await,
        up
    );
    ok(app.admin(reqwest::Method::POST, "/admin/sync", None).await).await;
    assert_eq!(store.used("p1").await, Some(15));
    assert_eq!(app.quota("p1").await["used"], 15);
    assert_eq!(ok(app.consume_with_key("p1", 4, "retry-me").await).await, first);
    ok(app
        .admin(reqwest::Method::POST, "/admin/quota/p1/invalidate", None)
        .await)
    .await;
    assert_eq!(ok(app.consume_with_key("p1", 4, "retry-me").await).await, first);
    assert_eq!(app.quota("p1").await["used"], 15);
}

/// The phase is mirrored in Redis: a replica that starts while Firestore is away follows
/// the stored phase from there, not its own `QUOTAD_PHASE` (which is only for when none is
/// stored), and follows Firestore again once it answers.
#[tokio::test]
async fn a_replica_started_while_firestore_is_away_follows_the_phase_mirrored_in_redis() {
    let redis = RedisServer::start().await;
    let mut proxy = TcpProxy::start(emulator_host().parse().unwrap()).await;
    let project = unique("test-");
    let env = |firestore: String| {
        [
            ("REDIS_URL", redis.url()),
            ("FIRESTORE_PROJECT_ID", project.clone()),
            ("FIRESTORE_EMULATOR_HOST", firestore),
            ("QUOTAD_PHASE", "firestore-only".to_owned()),
        ]
    };
    let http = client();
    let phase = |base: &str, set: Option<&str>| {
        let req = match set {
            Some(phase) => http.put(format!("{base}/admin/phase")).json(&json!({"phase": phase})),
            None => http.get(format!("{base}/admin/phase")),
        };
        async move { ok(req.bearer_auth(crate::helpers::ADMIN).send().await.unwrap()).await["phase"].clone() }
    };
    let a = QuotadProcess::start(&env(emulator_host())).await;
    assert_eq!(phase(&a.base, Some("redis-primary")).await, "redis-primary");

    proxy.set_up(false).await;
    let b = QuotadProcess::start(&env(proxy.address())).await;
    assert_eq!(
        phase(&b.base, None).await,
        "redis-primary",
        "the mirror, not QUOTAD_PHASE"
    );

    proxy.set_up(true).await;
    assert_eq!(phase(&a.base, Some("dual-write")).await, "dual-write");
    let followed = eventually(Duration::from_secs(5), json!("dual-write"), || phase(&b.base, None)).await;
    assert_eq!(followed, "dual-write");
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// The writes lag the answers (a Firestore transaction each; here Firestore refuses them for
/// a while), so Redis can fail while changes it took are not in Firestore yet. The replica
/// holds what its changes left in Redis and writes it before Firestore decides: the
/// `dual-write` fallback stays exact (API.md), and nothing is lost, whether Redis comes back
/// empty or with its data.
#[tokio::test]
async fn changes_not_yet_written_reach_firestore_before_a_fallback_decides() {
    for kill in [true, false] {
        let mut redis = RedisServer::start().await;
        let (quotad, mut proxy, store) = behind_a_firestore_proxy(&redis, 10).await;
        let http = client();
        let consume = || consume_status(&http, &quotad);
        assert_eq!(consume().await, 200); // the record loads
        proxy.set_up(false).await;
        for _ in 0..6 {
            assert_eq!(consume().await, 200); // Redis decides; the writes fail and wait
        }
        if kill {
            redis.kill();
        } else {
            redis.pause(true);
        }
        proxy.set_up(true).await;
        let mut answers = Vec::new();
        for _ in 0..5 {
            answers.push(consume().await);
        }
        assert_eq!(answers, [200, 200, 200, 429, 429], "kill: {kill}");
        assert_eq!(store.used("p1").await, Some(10), "kill: {kill}");
        if kill {
            redis.launch().await; // back, empty
        } else {
            redis.pause(false); // back, with the 7 units it decided
        }
        let ready = || async {
            let resp = http.get(format!("{}/readyz", quotad.base)).send().await.unwrap();
            resp.status().as_u16()
        };
        assert_eq!(eventually(Duration::from_secs(10), 200, ready).await, 200);
        assert_eq!(consume().await, 429, "kill: {kill}");
        tokio::time::sleep(Duration::from_secs(2)).await; // a late write would double a unit
        assert_eq!(store.used("p1").await, Some(10), "kill: {kill}");
        assert!(quotad.terminate().success());
    }
}

/// The same with two replicas: another replica's fallback cannot see what this one holds.
/// Replica `a` answers 7 consumes in a row, its writes a Firestore transaction behind;
/// Redis fails; `b` falls back as soon as its call fails, while `a` finds Redis gone only
/// when its writer's next call fails too, about as late. `a` then writes what it holds at
/// once, and a `dual-write` fallback begun in the first moments of an outage waits for
/// that (`OUTAGE_GRACE`): `b` decides from a document that counts all of `a`'s units.
#[tokio::test]
async fn a_fallback_counts_the_changes_another_replica_had_not_written() {
    for kill in [true, false] {
        let mut redis = RedisServer::start().await;
        let project = unique("test-");
        let store = Store::new(project.clone());
        store.put("p1", Some(0), Some(10)).await;
        let env = quotad_env(&redis, &project, emulator_host());
        let (a, b) = tokio::join!(QuotadProcess::start(&env), QuotadProcess::start(&env));
        let http = client();
        for _ in 0..7 {
            assert_eq!(consume_status(&http, &a).await, 200);
        }
        if kill {
            redis.kill();
        } else {
            redis.pause(true);
        }
        let mut from_b = Vec::new();
        for _ in 0..5 {
            from_b.push(consume_status(&http, &b).await);
        }
        assert_eq!(from_b, [200, 200, 200, 429, 429], "kill: {kill}");
        assert_eq!(store.used("p1").await, Some(10), "kill: {kill}");
        if kill {
            redis.launch().await;
        } else {
            redis.pause(false);
        }
        tokio::time::sleep(Duration::from_secs(2)).await; // a late write would double a unit
        assert_eq!(store.used("p1").await, Some(10), "kill: {kill}");
        assert!(a.terminate().success());
        assert!(b.terminate().success());
    }
}

/// A replica that finds Redis hung through a request's call does not go back to it before
/// a ping answers: the health probe sent as it went down is still waiting on the hung
/// Redis, so the readiness it last saw says Redis is fine, and a reconcile that trusted it
/// (with nothing to reload: nothing was decided in Firestore yet, nothing held) brought
/// decisions back to a Redis that does not answer.
#[tokio::test]
async fn decisions_go_back_to_redis_only_once_it_answers() {
    let redis = RedisServer::start().await;
    let project = unique("test-");
    let store = Store::new(project.clone());
    store.put("p1", Some(0), Some(10)).await;
    let quotad = QuotadProcess::start(&quotad_env(&redis, &project, emulator_host())).await;
    let http = client();
    assert_eq!(consume_status(&http, &quotad).await, 200);
    assert_eq!(eventually(DEADLINE, Some(1), || store.used("p1")).await, Some(1));
    let transitions = || redis_transitions(&http, &quotad);
    assert_eq!(transitions().await, (0, 0));
    redis.pause(true);
    assert_eq!(consume_status(&http, &quotad).await, 200); // a fallback, after the call's timeout
    // until the probe that was waiting on the hung Redis has given up: the whole time its
    // stale readiness could mislead a reconcile round (one every 0.2 s while Redis is away)
    let ready = || async {
        let resp = http.get(format!("{}/readyz", quotad.base)).send().await.unwrap();
        resp.status().as_u16()
    };
    assert_eq!(eventually(Duration::from_secs(10), 503, ready).await, 503);
    assert_eq!(transitions().await, (1, 0), "back to a Redis that does not answer");
    redis.pause(false);
    assert_eq!(eventually(Duration::from_secs(10), (1, 1), transitions).await, (1, 1));
    assert!(quotad.terminate().success());
}

/// How often a quotad process saw Redis go down and come back up.
async fn redis_transitions(http: &reqwest::Client, quotad: &QuotadProcess) -> (u64, u64) {
    let text = quotad.metrics(http).await;
    let count = |to: &str| {
        text.lines()
            .find(|line| line.starts_with("quotad_redis_transitions_total") && line.contains(&format!("to=\"{to}\"")))
            .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (count("down"), count("up"))
}

/// Changes that Redis ran but whose answer never came back (Redis stopped between running
/// the call and sending the reply; here a proxy holds the replies back) are decided again
/// by the Firestore fallback, which cannot tell whether Redis took them. Each counts once: a
/// keyed one when the record's write brings Redis's answer to the document, a plain one when
/// its sender, once Redis answers, finds the call's receipt and takes its usage back out (of
/// the record while it is cached; of the document when another replica has written and
/// dropped the record first).
#[tokio::test]
async fn changes_redis_ran_without_answering_count_once() {
    let redis = RedisServer::start().await;
    let proxy = TcpProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let project = unique("test-");
    let store = Store::new(project.clone());
    let mut env = quotad_env(&redis, &project, emulator_host()).to_vec();
    env.push(("QUOTAD_PHASE", "dual-write".into()));
    let direct = env.clone();
    env[0].1 = format!("redis://{}/", proxy.address());
    let quotad = QuotadProcess::start(&env).await;
    let http = client();
    let change = |provider: &str, op: &str, key: Option<&'static str>| {
        let mut request = http
            .post(format!("{}/quota/{provider}/{op}", quotad.base))
            .json(&json!({"amount": 1}));
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        async move { ok(request.send().await.unwrap()).await["used"].clone() }
    };
    let settled = || async {
        let text = quotad.metrics(&http).await;
        ["record", "ledger", "lost"].map(|place| {
            let label = format!("quotad_unanswered_settled_total{{in=\"{place}\"}} ");
            text.lines()
                .find_map(|line| line.strip_prefix(&label)?.parse::<u64>().ok())
                .unwrap_or(0)
        })
    };
    // provider, op, idempotency key, usage after it, where its sender settles it (a keyed
    // change: nowhere); in the last rounds another replica writes and drops the record while
    // the replies are held, or an operator sets the usage (3: what Redis ran went with it)
    let rounds = [
        ("p1", "consume", Some("k"), 7, [0, 0, 0]),
        ("p2", "consume", None, 7, [1, 0, 0]),
        ("p3", "refund", None, 5, [1, 0, 0]),
        ("p4", "consume", None, 7, [0, 1, 0]),
        ("p5", "consume", None, 3, [0, 0, 1]),
    ];
    let mut other = None;
    for (round, (provider, op, key, after, places)) in (1..).zip(rounds) {
        store.put(provider, Some(5), Some(10)).await;
        assert_eq!(change(provider, "consume", None).await, 6);
        assert_eq!(eventually(DEADLINE, Some(6), || store.used(provider)).await, Some(6));
        let before = settled().await;

        proxy.hold_replies(true);
        let answer = if provider == "p5" { 7 } else { after };
        assert_eq!(
            change(provider, op, key).await,
            answer,
            "{provider}: decided by the fallback"
        );
        if provider == "p4" {
            // started only now, so that no reconcile of its own reloads the others first
            let other = other.insert(QuotadProcess::start(&direct).await);
            let path = format!("{}/admin/quota/{provider}/invalidate", other.base);
            ok(http.post(path).bearer_auth(ADMIN).send().await.unwrap()).await;
            // the fallback's change and the one Redis ran
            assert_eq!(store.used(provider).await, Some(after + 1));
        }
        if provider == "p5" {
            let other = other.as_ref().unwrap();
            let path = format!("{}/admin/quota/{provider}", other.base);
            let set = http.put(path).bearer_auth(ADMIN).json(&json!({"used": after}));
            assert_eq!(ok(set.send().await.unwrap()).await["used"], after);
            // cached again, in the operator's epoch
            let lookup = http
                .get(format!("{}/quota/{provider}", other.base))
                .send()
                .await
                .unwrap();
            assert_eq!(ok(lookup).await["used"], after);
        }
        proxy.hold_replies(false);
        assert_eq!(
            eventually(DEADLINE, (round, round), || redis_transitions(&http, &quotad)).await,
            (round, round)
        );
        let after_round = settled().await;
        assert_eq!(
            [0, 1, 2].map(|i| after_round[i] - before[i]),
            places,
            "{provider}: settled in the record, in the ledger, given up"
        );
        if let Some(key) = key {
            assert_eq!(change(provider, op, Some(key)).await, after, "{provider}: a replay");
        }
        assert_eq!(change(provider, "consume", None).await, after + 1, "{provider}");
    }
    assert!(quotad.terminate().success()); // every pending write flushed
    assert!(other.unwrap().terminate().success());
    for (provider, _, _, after, _) in rounds {
        assert_eq!(store.used(provider).await, Some(after + 1), "{provider}");
    }
}

/// A private Redis and a replica that reaches it only through a proxy, which cuts it off
/// (a network split) with `proxy.set_up(false)`; other replicas spawned with `shared`
/// reach the Redis directly. (The Redis server stops when its handle is dropped.)
async fn a_replica_behind_a_proxy() -> (Shared, RedisServer, TcpProxy, TestApp) {
    let (shared, redis) = Shared::with_own_redis().await;
    let proxy = TcpProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let cut = spawn_with(&shared, |config| {
        config.redis_url = Some(format!("redis://{}/", proxy.address()))
    })
    .await;
    (shared, redis, proxy, cut)
}

/// One replica cut off from Redis (a network split), the other still reaching it: the cut
/// one decides in Firestore, the other must not keep deciding from a record that misses
/// those decisions. Limit 30 with 4 used, 60 concurrent consumes over the two: exactly 26
/// admitted, and the document holds every one of them.
#[tokio::test]
async fn one_replica_cut_off_from_redis_leaves_decisions_exact() {
    let (shared, _redis, mut proxy, cut) = a_replica_behind_a_proxy().await;
    let other = spawn_with(&shared, |_| {}).await;
    let store = shared.store();
    store.put("p1", Some(0), Some(30)).await;
    for app in [&cut, &other] {
        for _ in 0..2 {
            ok(app.consume("p1", 1).await).await;
        }
    }
    assert_eq!(eventually(DEADLINE, Some(4), || store.used("p1")).await, Some(4));
    proxy.set_up(false).await;
    let calls = (0..60).map(|i| {
        let app = if i % 2 == 0 { &cut } else { &other };
        async move { app.consume("p1", 1).await.status().as_u16() }
    });
    // Eight at a time, as clients keep coming: the two replicas' decisions interleave.
    let statuses: Vec<u16> =
        futures::StreamExt::collect(futures::StreamExt::buffered(futures::stream::iter(calls), 8)).await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        60 - admitted,
        "{statuses:?}"
    );
    let expected = Some(4 + admitted as i64);
    assert_eq!(
        eventually(DEADLINE, expected, || store.used("p1")).await,
        expected,
        "lost or doubled"
    );
    assert_eq!(admitted, 26, "{statuses:?}");
}

/// One replica cut off from Redis, and bursts of consumes that reach all replicas at once
/// for providers the cut one has not decided for since the cut: its first fallback for
/// each is announced in the document and waits, while the others' Redis decisions are
/// written, so each provider admits exactly what it had left. Found by a black-box soak:
/// without the announcement about one burst in four here (and 11 of 12 on a busier
/// machine) admitted more than the limit; it is not deterministic either way, so the
/// bursts are many (this failed 2 runs of 3 without the announcement). They come at the
/// pace of the soak's, 0.35 s apart from the cut on, each provider warmed on every replica
/// before the cut.
#[tokio::test]
async fn one_replica_cut_off_from_redis_leaves_bursts_exact() {
    let (shared, _redis, mut proxy, cut) = a_replica_behind_a_proxy().await;
    let (b, c) = (spawn_with(&shared, |_| {}).await, spawn_with(&shared, |_| {}).await);
    let store = shared.store();
    let providers: Vec<String> = (0..12).map(|i| format!("burst{i}")).collect();
    for provider in &providers {
        store.put(provider, Some(44), Some(50)).await;
        for app in [&cut, &b, &c] {
            ok(app.consume(provider, 1).await).await; // 47: 3 left
        }
    }
    for provider in &providers {
        assert_eq!(eventually(DEADLINE, Some(47), || store.used(provider)).await, Some(47));
    }
    proxy.set_up(false).await;
    let mut over = Vec::new();
    for provider in &providers {
        // (the pace of the bursts, not a wait for anything)
        tokio::time::sleep(Duration::from_millis(350)).await;
        let calls = (0..12).map(|i| {
            let app = [&cut, &b, &cut, &c][i % 4];
            async move { app.consume(provider, 1).await.status().as_u16() }
        });
        let statuses: Vec<u16> = futures::future::join_all(calls).await;
        let admitted = statuses.iter().filter(|s| **s == 200).count();
        assert_eq!(
            statuses.iter().filter(|s| **s == 429).count(),
            12 - admitted,
            "{provider}: {statuses:?}"
        );
        if admitted != 3 {
            over.push((provider.clone(), admitted));
        }
        let expected = Some(47 + admitted as i64);
        assert_eq!(
            eventually(DEADLINE, expected, || store.used(provider)).await,
            expected,
            "{provider}: lost or doubled"
        );
    }
    assert!(over.is_empty(), "admitted beyond the limit: {over:?}");
}

/// A replica still on Redis must not decide from its record after a cut-off replica has
/// decided in Firestore, even when it has written nothing since (helper-54's soak and
/// repro: 3 of 5 used, the cut one admits the 5th from Firestore, then the other admitted
/// a 6th from Redis, every time). It watches the documents for other replicas' fresh
/// fallback marks, and marks its records of those providers outdated.
#[tokio::test]
async fn a_replica_on_redis_sees_a_cut_off_replicas_decision_before_its_next_one() {
    let (shared, _redis, mut proxy, cut) = a_replica_behind_a_proxy().await;
    let other = spawn_with(&shared, |_| {}).await;
    let store = shared.store();
    for round in 0..3 {
        let provider = format!("after{round}");
        store.put(&provider, Some(3), Some(5)).await;
        assert_eq!(ok(other.consume(&provider, 1).await).await["used"], 4);
        assert_eq!(eventually(DEADLINE, Some(4), || store.used(&provider)).await, Some(4));
        proxy.set_up(false).await;
        assert_eq!(
            ok(cut.consume(&provider, 1).await).await["used"],
            5,
            "{provider}: from Firestore"
        );
        problem(other.consume(&provider, 1).await, 429, "quota_exceeded").await;
        assert_eq!(eventually(DEADLINE, Some(5), || store.used(&provider)).await, Some(5));
        proxy.set_up(true).await;
    }
}

/// Another replica's fallback mark keeps this one's decisions and lookups of the provider
/// off Redis only while it is recent: an old one, or one from a clock far ahead, is
/// ignored, and a recent one lets go by itself (the provider is cached again).
#[tokio::test]
async fn a_fallback_mark_keeps_other_replicas_off_redis_only_while_recent() {
    let shared = Shared::real();
    let app = spawn_with(&shared, |_| {}).await;
    let store = shared.store();
    let mark = |at: i64| format!("{at} elsewhere");
    let now = || chrono::Utc::now().timestamp_millis();
    for (provider, at) in [("old", now() - 60_000), ("ahead", now() + 120_000)] {
        store.put(provider, Some(1), Some(10)).await;
        store.put_string(provider, "quotadFallback", &mark(at)).await;
        assert_eq!(app.quota(provider).await["source"], "store");
        assert_eq!(app.quota(provider).await["source"], "cache", "{provider}");
        // Its writes find the mark and leave the record as it is (not outdated: cached).
        assert_eq!(ok(app.consume(provider, 1).await).await["used"], 2);
        assert_eq!(eventually(DEADLINE, Some(2), || store.used(provider)).await, Some(2));
        assert_eq!(app.quota(provider).await["source"], "cache", "{provider} after a write");
    }
    // A mark of now: lookups read through and cache nothing, a consume is decided in
    // Firestore (the document has it when the answer comes); then, the mark aged, the
    // provider is back on Redis. (Each step takes milliseconds; the mark lasts 3 s.)
    store.put("recent", Some(1), Some(10)).await;
    store.put_string("recent", "quotadFallback", &mark(now())).await;
    assert_eq!(app.quota("recent").await["source"], "store");
    assert_eq!(app.quota("recent").await["source"], "store", "nothing cached");
    assert_eq!(ok(app.consume("recent", 2).await).await["used"], 3);
    assert_eq!(store.used("recent").await, Some(3));
    let cached = json!("cache");
    assert_eq!(
        eventually(Duration::from_secs(10), cached.clone(), || async {
            app.quota("recent").await["source"].clone()
        })
        .await,
        cached
    );
    assert_eq!(ok(app.consume("recent", 1).await).await["used"], 4);
    assert_eq!(eventually(DEADLINE, Some(4), || store.used("recent")).await, Some(4));
}
