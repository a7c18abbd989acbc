//! The admin API and authentication.

use std::time::Duration;

use quotad::domain::Phase;
use reqwest::Method;
use serde_json::json;

use crate::helpers::{ADMIN, Shared, eventually, ok, problem, spawn_app, spawn_with};

#[tokio::test]
async fn invalidate_makes_the_next_read_come_from_the_store_and_keeps_usage() {
    let app = spawn_app().await;
    let store = app.shared.store();
    store.put("p1", Some(7), Some(20)).await;
    ok(app.consume("p1", 1).await).await;
    store.add_used("p1", 10).await; // another writer, behind the cache
    let body = ok(app.admin(Method::POST, "/admin/quota/p1/invalidate", None).await).await;
    assert_eq!(body, json!({"provider": "p1", "invalidated": true}));
    let fresh = app.quota("p1").await;
    assert_eq!(
        (fresh["source"].as_str(), fresh["used"].as_i64()),
        (Some("store"), Some(18))
    );
}

#[tokio::test]
async fn put_quota_writes_through_and_both_replicas_agree() {
    let shared = Shared::real();
    let (a, b) = (spawn_with(&shared, |_| {}).await, spawn_with(&shared, |_| {}).await);
    let store = shared.store();
    store.put("p1", Some(7), Some(20)).await;
    for _ in 0..3 {
        ok(a.consume("p1", 1).await).await;
    }
    let body = ok(a
        .admin(Method::PUT, "/admin/quota/p1", Some(json!({"limit": 50, "used": 5})))
        .await)
    .await;
    assert_eq!((body["used"].as_i64(), body["limit"].as_i64()), (Some(5), Some(50)));
    assert_eq!(store.get("p1").await, Some((Some(5), Some(50))));
    assert_eq!(b.quota("p1").await["used"], 5);
    // One field keeps the other, and pending usage is written first.
    ok(a.consume("p1", 1).await).await;
    ok(a.admin(Method::PUT, "/admin/quota/p1", Some(json!({"limit": 6}))).await).await;
    assert_eq!(store.get("p1").await, Some((Some(6), Some(6))));
    problem(b.consume("p1", 1).await, 429, "quota_exceeded").await;
    ok(a.admin(Method::POST, "/admin/sync", None).await).await;
    assert_eq!(store.get("p1").await, Some((Some(6), Some(6))));
}

/// "store and cache agree when it answers", also when only the limit is set and another
/// writer added to the document behind the cached record.
#[tokio::test]
async fn setting_only_the_limit_answers_and_caches_what_the_document_holds_in_every_phase() {
    for phase in Phase::ALL {
        let shared = Shared::real();
        let app = spawn_with(&shared, |c| c.initial_phase = phase).await;
        let store = shared.store();
        store.put("p1", Some(7), Some(20)).await;
        assert_eq!(app.quota("p1").await["used"], 7);
        // in redis-primary not yet in the document: the PUT writes it first
        assert_eq!(ok(app.consume("p1", 1).await).await["used"], 8, "{phase}");
        store.add_used("p1", 3).await;
        let body = ok(app
            .admin(Method::PUT, "/admin/quota/p1", Some(json!({"limit": 50})))
            .await)
        .await;
        assert_eq!(store.get("p1").await, Some((Some(11), Some(50))), "{phase}");
        assert_eq!((&body["used"], &body["limit"]), (&json!(11), &json!(50)), "{phase}");
        let after = app.quota("p1").await;
        assert_eq!((&after["used"], &after["limit"]), (&json!(11), &json!(50)), "{phase}");
        assert_eq!(ok(app.consume("p1", 1).await).await["used"], 12, "{phase}");
    }
}

#[tokio::test]
async fn put_quota_refuses_bad_values() {
    let app = spawn_app().await;
    for (field, value) in [
        ("limit", json!(-1)),
        ("used", json!(1_000_000_000_001_i64)),
        ("limit", json!(1.5)),
        ("used", json!("5")),
    ] {
        let resp = app
            .admin(Method::PUT, "/admin/quota/p1", Some(json!({field: value})))
            .await;
        problem(resp, 400, &format!("invalid_{field}")).await;
    }
    problem(
        app.admin(Method::PUT, "/admin/quota/p1", Some(json!({}))).await,
        400,
        "invalid_body",
    )
    .await;
    assert_eq!(app.shared.store().get("p1").await, None);
}

#[tokio::test]
async fn the_phase_is_stored_and_followed_by_another_replica_within_5_seconds() {
    let shared = Shared::real();
    let (a, b) = (spawn_with(&shared, |_| {}).await, spawn_with(&shared, |_| {}).await);
    let body = ok(a.admin(Method::GET, "/admin/phase", None).await).await;
    assert_eq!(body["phase"], "dual-write");
    let set = ok(a.set_phase(Phase::FirestoreOnly).await).await;
    assert_eq!(set["phase"], "firestore-only");
    let seen = eventually(Duration::from_secs(5), json!("firestore-only"), || async {
        ok(b.admin(Method::GET, "/admin/phase", None).await).await["phase"].clone()
    })
    .await;
    assert_eq!(seen, "firestore-only");
    problem(
        a.admin(Method::PUT, "/admin/phase", Some(json!({"phase": "bogus"})))
            .await,
        400,
        "invalid_phase",
    )
    .await;
    // A replica started later serves in the stored phase from its first request on, not in
    // its own initial phase: it decides, and counts its decisions, in the stored one.
    for _ in 0..3 {
        let c = spawn_with(&shared, |c| c.initial_phase = Phase::RedisPrimary).await;
        let first = ok(c.admin(Method::GET, "/admin/phase", None).await).await;
        assert_eq!(first["phase"], "firestore-only");
        c.stop().await;
    }
}

#[tokio::test]
async fn sync_reports_and_status() {
    let app = spawn_app().await;
    let status = ok(app.admin(Method::GET, "/admin/sync", None).await).await;
    assert_eq!(status["last"], serde_json::Value::Null);
    assert!(status["nextRunAt"].is_string());
    let report = ok(app.admin(Method::POST, "/admin/sync", None).await).await;
    for member in ["runId", "startedAt", "finishedAt"] {
        assert!(report[member].is_string(), "{report}");
    }
    let status = ok(app.admin(Method::GET, "/admin/sync", None).await).await;
    assert_eq!(status["last"]["runId"], report["runId"]);
}

/// A replica that cannot read Redis answers the last report from Firestore: `last` is null
/// only until a sync has run (helper-54's soak: a replica restarted while Redis was stopped
/// answered null after syncs had run).
#[tokio::test]
async fn a_replica_without_redis_reads_the_last_sync_report_from_firestore() {
    let (shared, mut redis) = Shared::with_own_redis().await;
    let a = spawn_with(&shared, |_| {}).await;
    let report = ok(a.admin(Method::POST, "/admin/sync", None).await).await;
    redis.kill();
    let b = spawn_with(&shared, |_| {}).await; // a fresh replica: no report of its own
    let status = ok(b.admin(Method::GET, "/admin/sync", None).await).await;
    assert_eq!(status["last"], report);
}

/// The admin POSTs without fields take no body or `{}`; any other body is refused like
/// every body: its media type, its size and its members are checked (nothing runs).
#[tokio::test]
async fn admin_posts_without_fields_check_their_bodies() {
    let app = spawn_app().await;
    let send = |path: &'static str, content_type: &'static str, body: Vec<u8>| {
        app.http
            .post(app.url(path))
            .bearer_auth(ADMIN)
            .header("Content-Type", content_type)
            .body(body)
            .send()
    };
    for path in ["/admin/sync", "/admin/quota/p1/invalidate"] {
        let json = "application/json";
        problem(
            send(path, "text/plain", b"hello".to_vec()).await.unwrap(),
            415,
            "unsupported_media_type",
        )
        .await;
        problem(
            send(path, json, b"{\"x\":1}".to_vec()).await.unwrap(),
            400,
            "invalid_json",
        )
        .await;
        problem(send(path, json, b"[]".to_vec()).await.unwrap(), 400, "invalid_json").await;
        let mut large = b"{".to_vec();
        large.resize(64 * 1024 + 1, b' ');
        large.push(b'}');
        problem(send(path, json, large).await.unwrap(), 413, "payload_too_large").await;
        ok(send(path, json, b"{}".to_vec()).await.unwrap()).await;
        ok(send(path, "text/plain", Vec::new()).await.unwrap()).await;
    }
}

#[tokio::test]
async fn admin_needs_the_admin_token_and_is_off_without_one() {
    let shared = Shared::real();
    let app = spawn_with(&shared, |c| c.api_keys = Some(vec!["k1".into()])).await;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer k1"),
        Some("Bearer"),
        Some(ADMIN),
        Some("Basic admin-secret"),
    ] {
        let mut req = app.http.get(app.url("/admin/phase"));
        if let Some(auth) = auth {
            req = req.header("Authorization", auth);
        }
        problem(req.send().await.unwrap(), 401, "unauthorized").await;
    }
    let disabled = spawn_with(&shared, |c| c.admin_token = None).await;
    let resp = disabled
        .http
        .get(disabled.url("/admin/phase"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    problem(resp, 403, "admin_disabled").await;
}

#[tokio::test]
async fn caller_endpoints_need_a_known_key_when_keys_are_set() {
    let app = spawn_with(&Shared::real(), |c| c.api_keys = Some(vec!["k1".into(), "k2".into()])).await;
    problem(app.get("/quota/p1").await, 401, "unauthorized").await;
    let resp = app
        .http
        .get(app.url("/quota/p1"))
        .bearer_auth("k1,k2")
        .send()
        .await
        .unwrap();
    problem(resp, 401, "unauthorized").await;
    for key in ["k1", "k2"] {
        let resp = app
            .http
            .post(app.url("/quota/p1/consume"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        ok(resp).await;
    }
    // Every caller endpoint asks for the key first: before the path or the body are read.
    for path in [
        "/quota/p1/consume",
        "/quota/p1/refund",
        "/ratelimit/check",
        "/quota/bad%20id/consume",
    ] {
        let resp = app
            .http
            .post(app.url(path))
            .header("Content-Type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        problem(resp, 401, "unauthorized").await;
    }
    problem(app.get("/quota/bad%20id").await, 401, "unauthorized").await;
    let resp = app.http.get(app.url("/healthz")).send().await.unwrap();
    ok(resp).await;
}

#[tokio::test]
async fn operations_endpoints_answer() {
    let app = spawn_app().await;
    ok(app.get("/healthz").await).await;
    let ready = ok(app.get("/readyz").await).await;
    assert_eq!(ready, json!({"redis": "ok", "firestore": "ok"}));
    ok(app.consume("p1", 1).await).await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("quotad_decisions_total"), "{metrics}");
    assert!(metrics.contains("quotad_http_requests_total"));
    let spec = app.get("/openapi.yaml").await.text().await.unwrap();
    assert!(spec.starts_with("openapi: 3"));
    app.stop().await;
}

#[tokio::test]
async fn a_sync_held_by_another_replica_is_409_until_its_lock_expires() {
    use quotad::storage::{Counters, redis::RedisCounters};
    let shared = Shared::real();
    let app = spawn_with(&shared, |_| {}).await;
    let other = RedisCounters::new(shared.redis_url.as_deref().unwrap(), &shared.prefix).unwrap();
    assert!(
        other
            .acquire_sync_lock("another-replica", Duration::from_secs(4))
            .await
            .unwrap()
    );
    // (the lock outlives this call by far, also on a loaded machine)
    problem(app.admin(Method::POST, "/admin/sync", None).await, 409, "sync_running").await;
    // The holder dies without releasing: the lock expires by itself.
    let report = eventually(Duration::from_secs(12), 200, || async {
        app.admin(Method::POST, "/admin/sync", None).await.status().as_u16()
    })
    .await;
    assert_eq!(report, 200);
    // A replica's own lock is released when its run ends: another can take it at once.
    assert!(
        other
            .acquire_sync_lock("another-replica", Duration::from_secs(5))
            .await
            .unwrap()
    );
    assert!(
        !other
            .renew_sync_lock("someone-else", Duration::from_secs(5))
            .await
            .unwrap()
    );
    other.release_sync_lock("another-replica").await.unwrap();
    ok(app.admin(Method::POST, "/admin/sync", None).await).await;
    // Every replica sees the last report.
    let second = spawn_with(&shared, |_| {}).await;
    let status = ok(second.admin(Method::GET, "/admin/sync", None).await).await;
    assert!(status["last"]["runId"].is_string(), "{status}");
}

/// Every document in the provider collection is a provider's, whatever the collection's
/// name: one named as quotad's own collections (`quotad`, `quotad_changed`) moves those
/// elsewhere (the phase flag, the Redis sentinel and the change markers).
#[tokio::test]
async fn a_provider_collection_named_like_quotads_own_holds_only_providers() {
    for collection in ["quotad", "quotad_changed"] {
        let shared = Shared::real();
        let app = spawn_with(&shared, |c| collection.clone_into(&mut c.collection)).await;
        ok(app.consume("p1", 1).await).await;
        ok(app.set_phase(Phase::RedisPrimary).await).await;
        ok(app.consume("p1", 1).await).await;
        ok(app.admin(Method::POST, "/admin/sync", None).await).await;
        let store = shared.store().in_collection(collection);
        assert_eq!(store.ids().await, ["p1"], "{collection}");
        assert_eq!(store.used("p1").await, Some(2));
        let phase = ok(app.admin(Method::GET, "/admin/phase", None).await).await;
        assert_eq!(phase["phase"], "redis-primary");
    }
}

/// Invalidation answers `200` while other requests keep the provider busy (two replicas
/// consuming all along), in the phases that cache: the record, dirty again as soon as it
/// is written, is rebased on the document instead of dropped. Nothing is lost or counted
/// twice: the document ends at exactly what was admitted, and a legacy writer's increment
/// made before the invalidations is in it too.
#[tokio::test]
async fn invalidation_under_concurrent_consumes_answers_200_and_loses_nothing() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    for phase in [Phase::DualWrite, Phase::RedisPrimary] {
        let shared = Shared::real();
        let apps = Arc::new([spawn_with(&shared, |_| {}).await, spawn_with(&shared, |_| {}).await]);
        ok(apps[0].set_phase(phase).await).await;
        let store = shared.store();
        store.put("p1", Some(0), Some(1_000_000)).await;
        ok(apps[1].consume("p1", 1).await).await;
        ok(apps[0].consume("p1", 1).await).await; // both replicas follow the phase
        store.add_used("p1", 100).await; // a legacy writer
        let (stop, admitted) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(2)));
        let loops: Vec<_> = (0..4)
            .map(|i| {
                let (apps, stop, admitted) = (apps.clone(), stop.clone(), admitted.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if apps[i % 2].consume("p1", 1).await.status() == 200 {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let mut statuses = Vec::new();
        for i in 0..8 {
            let resp = apps[i % 2]
                .admin(Method::POST, "/admin/quota/p1/invalidate", None)
                .await;
            statuses.push(resp.status().as_u16());
        }
        stop.store(true, Ordering::Relaxed);
        for handle in loops {
            handle.await.unwrap();
        }
        assert_eq!(statuses, [200; 8], "{phase:?}");
        let expected = 100 + admitted.load(Ordering::Relaxed);
        if phase == Phase::RedisPrimary {
            ok(apps[0].admin(Method::POST, "/admin/sync", None).await).await;
        }
        let used = eventually(Duration::from_secs(30), Some(i64::try_from(expected).unwrap()), || {
            store.used("p1")
        })
        .await;
        assert_eq!(used, Some(i64::try_from(expected).unwrap()), "{phase:?}");
        let view = ok(apps[1].get("/quota/p1").await).await;
        assert_eq!(view["used"].as_u64(), Some(expected), "{phase:?}");
    }
}
