//! Quotas end to end: lookups, consumes, refunds, idempotency, phases, concurrency.

use std::time::Duration;

use futures::future::join_all;
use quotad::domain::Phase;
use serde_json::json;

use crate::helpers::{Shared, eventually, ok, problem, spawn_app, spawn_with};

const STORE_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn an_unknown_provider_has_the_default_limit_and_no_document_is_created() {
    let app = spawn_app().await;
    let body = app.quota("newcomer").await;
    assert_eq!(
        body,
        json!({"provider": "newcomer", "used": 0, "limit": 100, "remaining": 100,
        "hasQuota": true, "source": "store"})
    );
    assert_eq!(app.quota("newcomer").await["source"], "cache");
    assert_eq!(app.shared.store().get("newcomer").await, None);
}

#[tokio::test]
async fn the_first_read_comes_from_the_store_then_from_the_cache() {
    let app = spawn_app().await;
    let store = app.shared.store();
    store.put("p1", Some(7), Some(20)).await;
    let first = app.quota("p1").await;
    assert_eq!(
        (
            first["used"].as_i64(),
            first["limit"].as_i64(),
            first["source"].as_str()
        ),
        (Some(7), Some(20), Some("store"))
    );
    store.put("p1", Some(9), None).await; // behind the cache's back
    let second = app.quota("p1").await;
    assert_eq!(
        (second["used"].as_i64(), second["source"].as_str()),
        (Some(7), Some("cache"))
    );
}

#[tokio::test]
async fn a_clean_record_expires_after_the_cache_ttl() {
    let shared = Shared::real();
    let app = spawn_with(&shared, |c| c.cache_ttl = Duration::from_secs(1)).await;
    shared.store().put("p1", Some(1), Some(10)).await;
    assert_eq!(app.quota("p1").await["source"], "store");
    shared.store().put("p1", Some(4), None).await;
    let reloaded = eventually(Duration::from_secs(5), Some(4), || async {
        app.quota("p1").await["used"].as_i64()
    })
    .await;
    assert_eq!(reloaded, Some(4));
}

#[tokio::test]
async fn consume_answers_the_values_after_consuming_and_denies_without_consuming() {
    let app = spawn_app().await;
    let store = app.shared.store();
    store.put("p1", Some(0), Some(3)).await;
    let body = ok(app.consume("p1", 2).await).await;
    assert_eq!(
        body,
        json!({"provider": "p1", "allowed": true, "used": 2, "limit": 3, "remaining": 1})
    );
    let denied = problem(app.consume("p1", 2).await, 429, "quota_exceeded").await;
    assert_eq!(
        (
            denied["used"].as_i64(),
            denied["limit"].as_i64(),
            denied["remaining"].as_i64()
        ),
        (Some(2), Some(3), Some(1))
    );
    ok(app.consume("p1", 1).await).await;
    problem(app.consume("p1", 1).await, 429, "quota_exceeded").await;
    assert_eq!(eventually(STORE_DEADLINE, Some(3), || store.used("p1")).await, Some(3));
}

#[tokio::test]
async fn refund_gives_usage_back_and_never_goes_below_zero() {
    let app = spawn_app().await;
    let store = app.shared.store();
    store.put("p1", Some(5), Some(10)).await;
    assert_eq!(ok(app.refund("p1", 2).await).await["used"], 3);
    assert_eq!(ok(app.refund("p1", 100).await).await["used"], 0);
    assert_eq!(ok(app.consume("p1", 1).await).await["used"], 1);
    assert_eq!(eventually(STORE_DEADLINE, Some(1), || store.used("p1")).await, Some(1));
}

#[tokio::test]
async fn concurrent_consumes_on_two_replicas_admit_exactly_the_limit() {
    let shared = Shared::real();
    let (a, b) = (spawn_with(&shared, |_| {}).await, spawn_with(&shared, |_| {}).await);
    shared.store().put("hot", Some(0), Some(100)).await;
    let calls = (0..300).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        async move { app.consume("hot", 1).await.status().as_u16() }
    });
    let statuses = join_all(calls).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 100);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 200);
    assert_eq!(a.quota("hot").await["used"], 100);
    assert_eq!(b.quota("hot").await["used"], 100);
    let store = shared.store();
    assert_eq!(
        eventually(STORE_DEADLINE, Some(100), || store.used("hot")).await,
        Some(100)
    );
}

#[tokio::test]
async fn concurrent_consumes_of_many_providers_on_two_replicas_admit_exactly_each_limit() {
    // Many distinct providers at once: their changes go to Redis in several batches that
    // are sent while others form (SEND_AT distinct items each).
    let shared = Shared::real();
    let (a, b) = (spawn_with(&shared, |_| {}).await, spawn_with(&shared, |_| {}).await);
    let providers: Vec<String> = (0..40).map(|n| format!("many-{n}")).collect();
    for provider in &providers {
        shared.store().put(provider, Some(0), Some(3)).await;
    }
    let calls = (0..400).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let provider = &providers[i % providers.len()];
        async move { (provider, app.consume(provider, 1).await.status().as_u16()) }
    });
    let answers = join_all(calls).await;
    for provider in &providers {
        let admitted = answers.iter().filter(|(p, s)| *p == provider && *s == 200).count();
        let denied = answers.iter().filter(|(p, s)| *p == provider && *s == 429).count();
        assert_eq!((admitted, denied), (3, 7), "{provider}");
        assert_eq!(a.quota(provider).await["used"], 3, "{provider}");
    }
    let store = shared.store();
    for provider in &providers {
        assert_eq!(
            eventually(STORE_DEADLINE, Some(3), || store.used(provider)).await,
            Some(3),
            "{provider}"
        );
    }
}

/// A provider kept busy never sits clean for a whole TTL, yet its cached record still
/// picks up what another writer (a legacy Cloud Function) added to the document: a record
/// that turns clean lives the TTL from its load, not from its last write.
#[tokio::test]
async fn a_busy_provider_sees_other_writers_increments_within_the_cache_ttl() {
    let shared = Shared::real();
    let app = spawn_with(&shared, |c| c.cache_ttl = Duration::from_secs(1)).await;
    let store = shared.store();
    store.put("busy", Some(0), Some(1_000_000)).await;
    ok(app.consume("busy", 1).await).await; // cached now
    store.add_used("busy", 100).await; // behind the cache's back
    let mut consumed = 1;
    // one consume every ~100 ms (eventually's poll): written and clean in between
    let seen = eventually(Duration::from_secs(10), true, || {
        consumed += 1;
        async { ok(app.consume("busy", 1).await).await["used"].as_i64().unwrap() > 100 }
    })
    .await;
    assert!(seen, "the increment behind the cache was never seen");
    // every unit once: the other writer's and each consume
    let expected = 100 + consumed;
    assert_eq!(
        eventually(STORE_DEADLINE, Some(expected), || store.used("busy")).await,
        Some(expected)
    );
}

#[tokio::test]
async fn other_writers_increments_survive_dual_write() {
    let app = spawn_app().await;
    let store = app.shared.store();
    store.put("p1", Some(10), Some(1000)).await;
    for round in 0..5 {
        ok(app.consume("p1", 1).await).await;
        store.add_used("p1", 100).await;
        let expected = 10 + (round + 1) * 101;
        assert_eq!(
            eventually(STORE_DEADLINE, Some(expected), || store.used("p1")).await,
            Some(expected)
        );
    }
}

/// A usage another writer left below zero (a legacy refund's decrement) is decided from as
/// it is in both phases that write every change: consumes count up from it, a refund there
/// gives nothing back and never raises it, and the document ends where the answers do
/// (helper-53's audit: a consume and a refund added 9 to a document at -5).
#[tokio::test]
async fn a_usage_left_below_zero_by_another_writer_is_kept_and_agreed_on() {
    for phase in [Phase::FirestoreOnly, Phase::DualWrite] {
        let shared = Shared::real();
        let app = spawn_with(&shared, |c| c.initial_phase = phase).await;
        let store = shared.store();
        store.put("neg", Some(-5), Some(10)).await;
        assert_eq!(app.quota("neg").await["used"], -5, "{phase:?}");
        assert_eq!(ok(app.consume("neg", 1).await).await["used"], -4, "{phase:?}");
        assert_eq!(ok(app.refund("neg", 3).await).await["used"], -4, "{phase:?}");
        assert_eq!(ok(app.consume("neg", 2).await).await["used"], -2, "{phase:?}");
        assert_eq!(
            eventually(STORE_DEADLINE, Some(-2), || store.used("neg")).await,
            Some(-2),
            "{phase:?}"
        );
        assert_eq!(app.quota("neg").await["used"], -2, "{phase:?}");
    }
}

#[tokio::test]
async fn a_retried_consume_is_answered_again_and_charged_once_across_replicas() {
    let shared = Shared::real();
    let (a, b) = (spawn_with(&shared, |_| {}).await, spawn_with(&shared, |_| {}).await);
    shared.store().put("p1", Some(0), Some(2)).await;
    let first = ok(a.consume_with_key("p1", 2, "call-1").await).await;
    let again = ok(b.consume_with_key("p1", 2, "call-1").await).await;
    assert_eq!(first, again);
    problem(
        a.consume_with_key("p1", 3, "call-1").await,
        422,
        "idempotency_key_reused",
    )
    .await;
    // A denied answer is recorded too, and replayed.
    let denied = problem(a.consume_with_key("p1", 1, "call-2").await, 429, "quota_exceeded").await;
    ok(a.refund("p1", 2).await).await;
    assert_eq!(
        problem(b.consume_with_key("p1", 1, "call-2").await, 429, "quota_exceeded").await,
        denied
    );
    // Refund keys are independent of consume keys.
    let refund = a
        .http
        .post(a.url("/quota/p1/refund"))
        .header("Idempotency-Key", "call-1")
        .json(&json!({"amount": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok(refund).await["used"], 0);
    assert_eq!(a.quota("p1").await["used"], 0);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_are_decided_once() {
    let app = spawn_app().await;
    let calls = (0..20).map(|_| async { ok(app.consume_with_key("p1", 5, "same").await).await });
    let answers = join_all(calls).await;
    assert!(answers.iter().all(|a| a == &answers[0]));
    assert_eq!(app.quota("p1").await["used"], 5);
}

#[tokio::test]
async fn firestore_only_decides_with_exact_transactions() {
    let shared = Shared::real();
    let (a, b) = (
        spawn_with(&shared, |c| c.initial_phase = Phase::FirestoreOnly).await,
        spawn_with(&shared, |c| c.initial_phase = Phase::FirestoreOnly).await,
    );
    let store = shared.store();
    store.put("p1", Some(0), Some(10)).await;
    let calls = (0..24).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        async move { app.consume("p1", 1).await.status().as_u16() }
    });
    let statuses = join_all(calls).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10, "{statuses:?}");
    assert_eq!(store.used("p1").await, Some(10)); // written by the transaction itself
    assert_eq!(a.quota("p1").await["source"], "store");
    assert_eq!(b.quota("p1").await["source"], "store");
    // Idempotency holds in this phase too.
    ok(a.refund("p1", 10).await).await;
    let first = ok(a.consume_with_key("p1", 3, "k").await).await;
    assert_eq!(ok(b.consume_with_key("p1", 3, "k").await).await, first);
    assert_eq!(store.used("p1").await, Some(3));
}

#[tokio::test]
async fn switching_from_dual_write_to_firestore_only_and_back_loses_nothing() {
    let app = spawn_app().await;
    let store = app.shared.store();
    for _ in 0..3 {
        ok(app.consume("p1", 1).await).await;
    }
    ok(app.set_phase(Phase::FirestoreOnly).await).await;
    ok(app.consume("p1", 1).await).await;
    assert_eq!(store.used("p1").await, Some(4));
    ok(app.set_phase(Phase::DualWrite).await).await;
    assert_eq!(ok(app.consume("p1", 1).await).await["used"], 5);
    assert_eq!(eventually(STORE_DEADLINE, Some(5), || store.used("p1")).await, Some(5));
}

#[tokio::test]
async fn redis_primary_keeps_usage_in_redis_until_the_sync() {
    let shared = Shared::real();
    let app = spawn_with(&shared, |c| c.cache_ttl = Duration::from_secs(1)).await;
    let store = shared.store();
    store.put("p1", Some(1), Some(50)).await;
    ok(app.set_phase(Phase::RedisPrimary).await).await;
    for _ in 0..4 {
        ok(app.consume("p1", 1).await).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await; // past the TTL: dirty records stay
    assert_eq!(app.quota("p1").await["used"], 5);
    assert_eq!(store.used("p1").await, Some(1));
    let report = ok(app.admin(reqwest::Method::POST, "/admin/sync", None).await).await;
    assert_eq!(
        (
            report["providers"].as_u64(),
            report["written"].as_u64(),
            report["failed"].as_u64()
        ),
        (Some(1), Some(1), Some(0))
    );
    assert_eq!(store.used("p1").await, Some(5));
    let again = ok(app.admin(reqwest::Method::POST, "/admin/sync", None).await).await;
    assert_eq!(again["written"], 0);
    assert_eq!(store.used("p1").await, Some(5));
    // Leaving redis-primary syncs first.
    ok(app.consume("p1", 2).await).await;
    ok(app.set_phase(Phase::DualWrite).await).await;
    assert_eq!(store.used("p1").await, Some(7));
}

#[tokio::test]
async fn a_retry_across_a_phase_change_is_charged_once() {
    let shared = Shared::real();
    let app = spawn_with(&shared, |c| c.initial_phase = Phase::FirestoreOnly).await;
    let store = shared.store();
    store.put("p1", Some(0), Some(10)).await;
    let first = ok(app.consume_with_key("p1", 5, "across").await).await;
    ok(app.set_phase(Phase::DualWrite).await).await;
    assert_eq!(ok(app.consume_with_key("p1", 5, "across").await).await, first);
    assert_eq!(app.quota("p1").await["used"], 5);
    let second = ok(app.consume_with_key("p1", 1, "back").await).await;
    ok(app.set_phase(Phase::FirestoreOnly).await).await;
    assert_eq!(ok(app.consume_with_key("p1", 1, "back").await).await, second);
    assert_eq!(eventually(STORE_DEADLINE, Some(6), || store.used("p1")).await, Some(6));
}

#[tokio::test]
async fn invalidation_in_redis_primary_writes_the_usage_first() {
    let shared = Shared::real();
    let app = spawn_with(&shared, |c| c.initial_phase = Phase::RedisPrimary).await;
    let store = shared.store();
    store.put("p1", Some(2), Some(50)).await;
    for _ in 0..3 {
        ok(app.consume("p1", 1).await).await;
    }
    assert_eq!(store.used("p1").await, Some(2)); // nothing written yet in this phase
    ok(app
        .admin(reqwest::Method::POST, "/admin/quota/p1/invalidate", None)
        .await)
    .await;
    assert_eq!(store.used("p1").await, Some(5));
    let fresh = app.quota("p1").await;
    assert_eq!(
        (fresh["source"].as_str(), fresh["used"].as_i64()),
        (Some("store"), Some(5))
    );
}

#[tokio::test]
async fn in_redis_primary_other_writers_survive_the_sync_and_a_limit_edit_is_picked_up() {
    let shared = Shared::real();
    let app = spawn_with(&shared, |c| c.initial_phase = Phase::RedisPrimary).await;
    let store = shared.store();
    store.put("p1", Some(10), Some(100)).await;
    for round in 1..=3 {
        for _ in 0..2 {
            ok(app.consume("p1", 1).await).await;
        }
        store.add_used("p1", 5).await; // a legacy Cloud Function, meanwhile
        ok(app.admin(reqwest::Method::POST, "/admin/sync", None).await).await;
        assert_eq!(store.used("p1").await, Some(10 + round * 7));
    }
    store.put("p1", None, Some(40)).await; // an operator's edit in the console
    ok(app.consume("p1", 1).await).await;
    ok(app.admin(reqwest::Method::POST, "/admin/sync", None).await).await;
    assert_eq!(
        store.get("p1").await,
        Some((Some(32), Some(40))),
        "the sync never writes aiCallsLimit"
    );
    assert_eq!(
        app.quota("p1").await["limit"],
        40,
        "the edited limit is picked up by the sync"
    );
}

/// Another writer may store any 64-bit count. quotad counts within ±(2^53 - 1) (what its
/// Redis scripts and a JavaScript dashboard hold exactly): a limit beyond is more than any
/// usage reaches, a usage beyond is over every limit, and the document's own value changes
/// exactly by what was decided, in every phase.
#[tokio::test]
async fn counts_beyond_two_to_the_53_decide_alike_in_every_phase_and_change_the_document_exactly() {
    const EXACT_MAX: i64 = (1 << 53) - 1;
    for phase in Phase::ALL {
        let shared = Shared::real();
        let app = spawn_with(&shared, |c| c.initial_phase = phase).await;
        let store = shared.store();
        store.put("unlimited", Some(4), Some(i64::MAX)).await;
        store.put("over", Some(i64::MAX), Some(20)).await;
        store.put("above", Some((1 << 53) + 1), Some(1 << 60)).await;

        let body = ok(app.consume("unlimited", 1).await).await;
        let answer = (&body["used"], &body["limit"], &body["remaining"]);
        assert_eq!(answer, (&json!(5), &json!(EXACT_MAX), &json!(EXACT_MAX - 5)), "{phase}");
        assert_eq!(app.quota("unlimited").await["limit"], EXACT_MAX, "{phase}");

        // A usage beyond is over every limit, also after a refund that leaves it beyond;
        // every answer shows the document's usage as the bound.
        let denied = problem(app.consume("over", 1).await, 429, "quota_exceeded").await;
        assert_eq!(
            (&denied["used"], &denied["limit"]),
            (&json!(EXACT_MAX), &json!(20)),
            "{phase}"
        );
        assert_eq!(ok(app.refund("over", 1).await).await["used"], EXACT_MAX, "{phase}");
        problem(app.consume("over", 1).await, 429, "quota_exceeded").await;
        assert_eq!(app.quota("over").await["used"], EXACT_MAX, "{phase}");

        problem(app.consume("above", 1).await, 429, "quota_exceeded").await;
        assert_eq!(ok(app.refund("above", 1).await).await["used"], EXACT_MAX, "{phase}");
        problem(app.consume("above", 1).await, 429, "quota_exceeded").await;
        ok(app.refund("above", 1).await).await; // now at the bound: Redis may count it
        problem(app.consume("above", 1).await, 429, "quota_exceeded").await;
        assert_eq!(ok(app.refund("above", 1).await).await["used"], EXACT_MAX - 1, "{phase}");
        let admitted = ok(app.consume("above", 1).await).await;
        assert_eq!(
            (&admitted["used"], &admitted["remaining"]),
            (&json!(EXACT_MAX), &json!(0)),
            "{phase}"
        );
        problem(app.consume("above", 1).await, 429, "quota_exceeded").await;

        if phase == Phase::RedisPrimary {
            ok(app.admin(reqwest::Method::POST, "/admin/sync", None).await).await;
        }
        let expected = [("unlimited", 5), ("over", i64::MAX - 1), ("above", EXACT_MAX)];
        for (provider, used) in expected {
            let stored = eventually(STORE_DEADLINE, Some(used), || store.used(provider)).await;
            assert_eq!(stored, Some(used), "{provider} in {phase}");
        }
    }
}
