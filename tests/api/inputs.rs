//! Bad input: every error is a problem document with its code, and nothing is written.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{ok, problem, spawn_app, spawn_with};

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
    // whatever the method: not 405 for a route the empty segment does not match
    for (method, path) in [
        (Method::GET, "/quota//consume"),
        (Method::PUT, "/quota//refund"),
        (Method::DELETE, "/quota/"),
        (Method::GET, "/admin/quota//invalidate"),
        (Method::POST, "/admin/quota/"),
    ] {
        problem(app.admin(method, path, None).await, 404, "not_found").await;
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

/// A rate-limit check body is read straight into a struct when it can be, and through the
/// general JSON map otherwise (a duplicate member, an escaped string): both paths answer
/// every body alike. Each body is sent as written and with its first member repeated at the
/// end (same meaning: the last value counts), which the struct reader refuses.
#[tokio::test]
async fn rate_limit_bodies_answer_alike_on_both_paths() {
    let app = spawn_app().await;
    let bodies = [
        r#"{"key": "k1", "limit": 5, "window": "10s"}"#,
        r#"{"key": "k2", "limit": 5, "window": 10, "algorithm": "fixed-window", "cost": 2}"#,
        r#"{"key": "k3", "limit": 5, "window": "1m", "algorithm": "token-bucket", "cost": 0}"#,
        r#"{"key": "k4", "plan": "starter"}"#,
        r#"{"key": "k5", "plan": "starter", "cost": 3}"#,
        r#"{"key": "k6", "plan": null}"#,
        r#"{"key": "k7", "plan": 5}"#,
        r#"{"key": "k8", "plan": "gold"}"#,
        r#"{"key": "k9", "plan": "pro", "limit": 5}"#,
        r#"{"key": "k10", "plan": "pro", "window": null}"#,
        r#"{"key": null, "limit": 5, "window": "1s"}"#,
        r#"{"key": 12, "limit": 5, "window": "1s"}"#,
        r#"{"key": "__bad__", "limit": 5, "window": "1s"}"#,
        r#"{"limit": 5, "window": "1s"}"#,
        r#"{"key": "k11", "limit": 0, "window": "1s"}"#,
        r#"{"key": "k12", "limit": 1000001, "window": "1s"}"#,
        r#"{"key": "k13", "limit": -1, "window": "1s"}"#,
        r#"{"key": "k14", "limit": 5.0, "window": "1s"}"#,
        r#"{"key": "k15", "limit": "5", "window": "1s"}"#,
        r#"{"key": "k16", "limit": null, "window": "1s"}"#,
        r#"{"key": "k17", "limit": 5}"#,
        r#"{"key": "k18", "limit": 5, "window": null}"#,
        r#"{"key": "k19", "limit": 5, "window": "500ms"}"#,
        r#"{"key": "k20", "limit": 5, "window": 1.5}"#,
        r#"{"key": "k21", "limit": 5, "window": -10}"#,
        r#"{"key": "k22", "limit": 5, "window": true}"#,
        r#"{"key": "k23", "limit": 5, "window": "31d"}"#,
        r#"{"key": "k24", "limit": 5, "window": "1s", "algorithm": null}"#,
        r#"{"key": "k25", "limit": 5, "window": "1s", "algorithm": 3}"#,
        r#"{"key": "k26", "limit": 5, "window": "1s", "algorithm": "leaky"}"#,
        r#"{"key": "k27", "limit": 5, "window": "1s", "cost": null}"#,
        r#"{"key": "k28", "limit": 5, "window": "1s", "cost": 6}"#,
        r#"{"key": "k29", "limit": 5, "window": "1s", "cost": -1}"#,
        r#"{"key": "k30", "limit": 5, "window": "1s", "cost": 1e0}"#,
        r#"{"key": "k31", "limit": 5, "window": "1s", "extra": 1}"#,
        r#"{"key": "k32", "limit": 5, "window": "1s", "cost": [1]}"#,
        r#"{"key": "k33", "limit": 5, "window": "1s", "cost": {"n": 1}}"#,
    ];
    let send = |body: String| {
        let request = app
            .http
            .post(app.url("/ratelimit/check"))
            .header("content-type", "application/json")
            .body(body);
        async move {
            let resp = request.send().await.unwrap();
            let status = resp.status().as_u16();
            let mut body: Value = resp.json().await.unwrap();
            // the times move on between the two requests; what they say is checked elsewhere
            for moving in ["reset", "retryAfter"] {
                body.as_object_mut().unwrap().remove(moving);
            }
            (status, body)
        }
    };
    for (i, body) in bodies.iter().enumerate() {
        let first = &body[1..body.find(',').unwrap_or(body.len() - 1)];
        let repeated = format!("{}, {first}}}", &body[..body.len() - 1]);
        let (typed, general) = (send(body.to_string()).await, send(repeated.clone()).await);
        // the second request of an admitted body has spent one more: compare it with a fresh
        // key's first answer instead
        let fresh = send(repeated.replacen(&format!("\"k{}\"", i + 1), &format!("\"x{}\"", i + 1), 2)).await;
        let general = if typed.0 == 200 { fresh } else { general };
        assert_eq!(typed, general, "{body} against {repeated}");
    }
}

/// A request refused before its handler reads the body (admin `401`, `invalid_id`, `404`,
/// `405`), whose body arrives after its head, still leaves the connection usable: the next
/// request on it is answered. (Refused at once, the unread body made hyper close it.)
#[tokio::test]
async fn a_request_refused_before_its_body_arrived_keeps_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let open = spawn_app().await;
    let keyed = spawn_with(&open.shared, |c| c.api_keys = Some(vec!["k1".into()])).await;
    for (app, method, path) in [
        (&open, "PUT", "/admin/phase"),
        (&open, "POST", "/quota/__x__/consume"),
        (&open, "POST", "/no/such/route"),
        (&open, "DELETE", "/quota/p1/consume"),
        (&keyed, "POST", "/quota/p1/consume"),
        (&keyed, "POST", "/ratelimit/check"),
    ] {
        let addr = app.base.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.set_nodelay(true).unwrap();
        let body = r#"{"phase":"redis-primary"}"#;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: q\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        // The body follows once the service has seen the head (and could have answered).
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        conn.write_all(body.as_bytes()).await.unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: q\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !String::from_utf8_lossy(&seen).contains("HTTP/1.1 200") {
            let read = tokio::time::timeout_at(deadline, conn.read(&mut buf)).await;
            let n = read.expect("both answers within 10 s").unwrap_or(0);
            assert!(
                n > 0,
                "{method} {path}: the connection closed after: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&seen);
        assert!(text.starts_with("HTTP/1.1 4"), "{method} {path}: {text}");
    }
}

/// Reads `conn` until it closes (or 10 s pass: a failure), and returns what came.
async fn read_to_close(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read_to_end(&mut seen)).await;
    read.expect("the connection closes within 10 s").ok();
    String::from_utf8_lossy(&seen).into_owned()
}

/// A request head must arrive within its deadline (and the next one after an answer: an
/// idle keep-alive connection closes), a body within its own; a late body is answered
/// `408 request_timeout` and charges nothing. (`axum::serve` set no deadline: a half-sent
/// head held its connection for as long as the client liked.)
#[tokio::test]
async fn a_request_that_does_not_arrive_in_time_closes_its_connection() {
    use quotad::http::serve::Deadlines;
    use tokio::io::AsyncWriteExt;

    let deadlines = Deadlines {
        head: std::time::Duration::from_millis(300),
        body: std::time::Duration::from_millis(300),
    };
    let app = spawn_with(&crate::helpers::Shared::real(), |c| c.deadlines = deadlines).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let connect = || async {
        let conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.set_nodelay(true).unwrap();
        conn
    };

    // half a head: closed, with at most hyper's bare 408
    let mut conn = connect().await;
    conn.write_all(b"POST /quota/p1/consume HTTP/1.1\r\nhost: q\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut conn).await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");

    // an answered request, then nothing: the idle connection closes
    let mut conn = connect().await;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: q\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // a body that stops short: 408 problem, the connection closed, nothing consumed
    let mut conn = connect().await;
    let head =
        "POST /quota/p1/consume HTTP/1.1\r\nhost: q\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n";
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(br#"{"amo"#).await.unwrap();
    let answer = read_to_close(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("application/problem+json") && answer.contains(r#""code":"request_timeout""#),
        "{answer}"
    );
    assert_eq!(app.quota("p1").await["used"], 0);
    // while a whole request is answered as usual
    assert_eq!(ok(app.consume("p1", 1).await).await["used"], 1);
}
