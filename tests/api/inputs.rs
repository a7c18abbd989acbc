//! Bad input: every error is a problem document with its code, and nothing is written.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{ok, problem, spawn_app};

#[tokio::test]
async fn invalid_provider_ids_are_400_and_nothing_is_written() {
    let app = spawn_app().await;
    // "." and ".." are covered by the raw-path conformance tests: reqwest normalises them away.
    for id in [
        "__x__",
        &"a".repeat(129),
        "a%2Fb",
        "%C3%A9t%C3%A9",
        "a%20b",
        "p*",
        "a%25b",
        "%FF",
    ] {
        problem(app.get(&format!("/quota/{id}")).await, 400, "invalid_id").await;
        problem(app.consume(id, 1).await, 400, "invalid_id").await;
        problem(
            app.admin(Method::POST, &format!("/admin/quota/{id}/invalidate"), None)
                .await,
            400,
            "invalid_id",
        )
        .await;
    }
    for path in ["/quota//consume", "/quota/"] {
        problem(app.post(path, json!({})).await, 404, "not_found").await;
    }
    assert_eq!(app.shared.store().get("p*").await, None);
}

#[tokio::test]
async fn invalid_amounts_are_400_invalid_amount() {
    let app = spawn_app().await;
    for amount in [
        json!(0),
        json!(-1),
        json!(1.5),
        json!("1"),
        json!(1_000_001),
        json!(true),
        json!([1]),
        json!(null),
        json!(1e0),
        json!(9_223_372_036_854_775_808u64),
    ] {
        for action in ["consume", "refund"] {
            let resp = app
                .post(&format!("/quota/p1/{action}"), json!({"amount": amount}))
                .await;
            problem(resp, 400, "invalid_amount").await;
        }
    }
    assert_eq!(app.quota("p1").await["used"], 0);
}

#[tokio::test]
async fn bodies_must_be_json_objects_without_unknown_fields() {
    let app = spawn_app().await;
    for body in [
        &b"{\"amount\":"[..],
        b"[1]",
        b"null",
        b"{\"amount\":1,\"x\":2}",
        b"\xff",
    ] {
        let resp = app
            .http
            .post(app.url("/quota/p1/consume"))
            .header("Content-Type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        problem(resp, 400, "invalid_json").await;
    }
    let resp = app
        .http
        .post(app.url("/quota/p1/consume"))
        .header("Content-Type", "text/plain")
        .body("{\"amount\":1}")
        .send()
        .await
        .unwrap();
    problem(resp, 415, "unsupported_media_type").await;
    let resp = app
        .http
        .post(app.url("/quota/p1/consume"))
        .header("Content-Type", "application/json; charset=utf-8")
        .body("{\"amount\":2}")
        .send()
        .await
        .unwrap();
    assert_eq!(ok(resp).await["used"], 2);
    assert_eq!(ok(app.post("/quota/p1/consume", json!({})).await).await["used"], 3);
    // A duplicate member: the last one counts (as a JSON object read into a map does).
    let resp = app
        .http
        .post(app.url("/quota/p1/consume"))
        .header("Content-Type", "application/json")
        .body("{\"amount\":1,\"amount\":2}")
        .send()
        .await
        .unwrap();
    assert_eq!(ok(resp).await["used"], 5);
}

#[tokio::test]
async fn bodies_over_64_kib_are_413_and_consume_nothing() {
    let app = spawn_app().await;
    let pad = |size: usize| {
        let mut body = b"{\"amount\":1".to_vec();
        body.resize(size - 1, b' ');
        body.push(b'}');
        body
    };
    let send = |body: Vec<u8>| {
        app.http
            .post(app.url("/quota/p1/consume"))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(ok(send(pad(64 * 1024)).await.unwrap()).await["used"], 1);
    problem(send(pad(64 * 1024 + 1)).await.unwrap(), 413, "payload_too_large").await;
    problem(send(pad(10 * 1024 * 1024)).await.unwrap(), 413, "payload_too_large").await;
    assert_eq!(app.quota("p1").await["used"], 1);
}

#[tokio::test]
async fn idempotency_keys_must_be_printable_ascii_up_to_128() {
    let app = spawn_app().await;
    for key in ["", &"k".repeat(129), "tab\there"] {
        let resp = app
            .http
            .post(app.url("/quota/p1/consume"))
            .header("Idempotency-Key", key)
            .send()
            .await
            .unwrap();
        problem(resp, 400, "invalid_idempotency_key").await;
    }
    assert_eq!(app.quota("p1").await["used"], 0);
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let app = spawn_app().await;
    for path in [
        "/no/such/route",
        "/quota",
        "/quota/p1/consume/extra",
        "/healthz/x",
        "/admin/unknown",
    ] {
        problem(app.admin(Method::GET, path, None).await, 404, "not_found").await;
    }
    for (method, path) in [
        (Method::DELETE, "/quota/p1"),
        (Method::GET, "/quota/p1/consume"),
        (Method::PATCH, "/admin/phase"),
        (Method::POST, "/healthz"),
        (Method::GET, "/ratelimit/check"),
    ] {
        problem(app.admin(method, path, None).await, 405, "method_not_allowed").await;
    }
}

#[tokio::test]
async fn rate_limit_checks_validate_and_answer_with_headers() {
    let app = spawn_app().await;
    let body = json!({"key": "ip:1.2.3.4", "limit": 1, "window": "1h"});
    let first = app.post("/ratelimit/check", body.clone()).await;
    assert_eq!(first.headers()["ratelimit-policy"], "\"custom\";q=1;w=3600");
    assert_eq!(ok(first).await["remaining"], 0);
    let denied = app.post("/ratelimit/check", body.clone()).await;
    assert_eq!(denied.headers()["retry-after"], "3600");
    let denied = problem(denied, 429, "rate_limited").await;
    assert_eq!(denied["violated-policies"], json!(["custom"]));
    problem(
        app.post("/ratelimit/check", json!({"key": "k", "plan": "gold"})).await,
        400,
        "unknown_plan",
    )
    .await;
    problem(
        app.post("/ratelimit/check", json!({"key": "k", "limit": 5, "window": "soon"}))
            .await,
        400,
        "invalid_window",
    )
    .await;
    problem(
        app.post(
            "/ratelimit/check",
            json!({"key": "k", "limit": 5, "window": "1s", "cost": 6}),
        )
        .await,
        400,
        "invalid_cost",
    )
    .await;
    problem(
        app.post("/ratelimit/check", json!({"key": "__k__", "plan": "pro"}))
            .await,
        400,
        "invalid_id",
    )
    .await;
    let plan = ok(app
        .post("/ratelimit/check", json!({"key": "creator:1", "plan": "starter"}))
        .await)
    .await;
    assert_eq!(
        (plan["limit"].as_u64(), plan["remaining"].as_u64()),
        (Some(50), Some(49))
    );
}
