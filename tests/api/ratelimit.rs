//! Rate limits: the Lua scripts against their in-process twin (property test on a real
//! Redis), and the service's admit/deny/recover cycles, headers, exactness and anomalies.

use std::{sync::Arc, time::Duration};

use axum::{Router, routing::post};
use futures::future::join_all;
use proptest::prelude::*;
use quotad::{
    domain::ratelimit::{Algorithm, Policy, RateCheck, Twin},
    storage::{Counters, redis::RedisCounters},
};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::helpers::{Shared, eventually, explicit, ok, planned, problem, redis_url, spawn_with, unique};

const ALGORITHMS: [&str; 4] = [
    "sliding-window",
    "sliding-window-approx",
    "fixed-window",
    "token-bucket",
];

/// A check of key "k" at a simulated time.
fn at(policy: &Policy, now_ms: u64, cost: u64) -> RateCheck<'_> {
    RateCheck {
        key: "k",
        policy,
        cost,
        now_ms: Some(now_ms),
    }
}

/// A check of key "k" at Redis's time.
fn live(policy: &Policy, cost: u64) -> RateCheck<'_> {
    RateCheck {
        key: "k",
        policy,
        cost,
        now_ms: None,
    }
}

/// Where simulated times start: a minute ahead of the wall clock. Counters keep their
/// window start (or a bucket's full time) in the key's expiry time, which Redis applies by
/// its own clock: started at the wall clock, a key set to expire a few ms after a simulated
/// time vanished as soon as the test ran slower than its simulated steps (a token bucket at
/// 1330 per 4 s expires 4 ms after one request), while the twin, on simulated time, still
/// held it. A minute ahead, no test here runs long enough for Redis's clock to catch up.
fn wall_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap() + 60_000
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random sequences of (time step, key, cost, policy) under a random algorithm decide the
    /// same in the Lua script on a real Redis and in the in-process twin. Checks go to Redis
    /// in groups of `together` made ready at once, so they share one call (decided in order);
    /// a planned check counts attempts as well (it sends more keys and arguments than the
    /// same policy given explicitly, so a call mixing the two must keep them apart), in one
    /// counter per key across its two plans, whose thresholds differ; and the explicit policy
    /// comes with a second limit too, which applies to the same counter.
    #[test]
    fn the_lua_scripts_and_the_twin_decide_alike(
        algorithm in proptest::sample::select(Algorithm::ALL.to_vec()),
        // small limits make denials; large ones check that the arithmetic stays exact
        limit in prop_oneof![3 => 1u64..8, 1 => 1u64..=1_000_000],
        window_s in prop_oneof![3 => 1u64..5, 1 => 1u64..=2_592_000],
        // a step of 0 puts checks at the same ms (the exact window merges them into one member)
        steps in proptest::collection::vec(
            (prop_oneof![1 => Just(0u64), 3 => 0u64..1500], 0usize..2, 0u64..4, 0usize..4),
            1..60,
        ),
        together in 1usize..6,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let redis = RedisCounters::new(&redis_url(), &(unique("pt") + ":")).unwrap();
        let twin = Twin::default();
        let policies = [
            explicit(limit, window_s, algorithm),
            planned("tiny", limit, window_s, algorithm),
            planned("wide", limit + 3, window_s, algorithm),
            explicit(limit + 2, window_s, algorithm),
        ];
        let mut now = wall_ms();
        let checks: Vec<RateCheck> = steps
            .iter()
            .map(|&(step, key, cost, policy)| {
                now += step;
                let policy = &policies[policy];
                RateCheck { key: ["a", "b"][key], policy, cost: cost.min(policy.limit), now_ms: Some(now) }
            })
            .collect();
        for group in checks.chunks(together) {
            let from_redis = runtime.block_on(futures::future::join_all(group.iter().map(|c| redis.rate_check(c))));
            for (check, from_redis) in group.iter().zip(from_redis) {
                let from_twin = twin.check(check);
                prop_assert_eq!(from_redis.unwrap(), from_twin, "at {:?} for {}", check.now_ms, check.key);
            }
        }
    }
}

/// The exact window at its edge: a member exactly one window old has expired, and the one
/// after it, 1 ms younger, expires 1 ms later. Each call here is its own, so each reads what
/// the last one stored (the proptest's random steps seldom land on the very millisecond).
#[tokio::test]
async fn the_exact_window_expires_members_to_the_millisecond() {
    let redis = RedisCounters::new(&redis_url(), &(unique("edge") + ":")).unwrap();
    let twin = Twin::default();
    // a minute: the keys' time to live runs in real time, and a window as long as the
    // simulated span (1 s) would let a stalled test see them expire under it
    let policy = explicit(2, 60, Algorithm::SlidingWindow);
    let t0 = wall_ms();
    // admitted at t0 and t0 + 1; at t0 + 59 999 the window is full; at t0 + 60 000 the first
    // has expired, at t0 + 60 001 the second too (one admitted each time); at t0 + 60 001
    // again the window is full
    let expected = [true, true, false, true, true, false];
    for (offset, expected) in [0, 1, 59_999, 60_000, 60_001, 60_001].into_iter().zip(expected) {
        let check = at(&policy, t0 + offset, 1);
        let from_redis = redis.rate_check(&check).await.unwrap();
        assert_eq!(from_redis, twin.check(&check), "at t0 + {offset}");
        assert_eq!(from_redis.allowed, expected, "at t0 + {offset}");
    }
}

/// The exact window keeps one member per millisecond: checks that share a call and a time
/// (all of a call's checks, with Redis TIME) add their costs up in one member, so a hot key's
/// set grows with the calls, not the requests. What expires at that time is the same.
#[tokio::test]
async fn the_exact_window_merges_one_calls_checks_at_one_time() {
    let redis = RedisCounters::new(&redis_url(), &(unique("merge") + ":")).unwrap();
    let policy = explicit(100, 60, Algorithm::SlidingWindow);
    let t0 = wall_ms();
    // one call (queued together on this single-threaded runtime, in fewer distinct items
    // than a batch sends at once): 12 at t0 (costs 1, 2, 3 ... cycling: 12 items), then 10
    // at t0 + 5 (identical: one item)
    let checks: Vec<_> = (0..22u64)
        .map(|n| {
            if n < 12 {
                at(&policy, t0, 1 + n % 3)
            } else {
                at(&policy, t0 + 5, 1)
            }
        })
        .collect();
    let decided = join_all(checks.iter().map(|c| redis.rate_check(c))).await;
    assert!(decided.iter().all(|d| d.as_ref().unwrap().allowed));
    let set = redis.keys().rate_counter("k", &at(&policy, t0, 1).counter_id());
    let members: Vec<(String, u64)> = redis
        .query(
            ::redis::cmd("ZRANGE")
                .arg(&set)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .clone(),
        )
        .await
        .unwrap();
    let costs: Vec<(u64, u64)> = members
        .iter()
        .map(|(member, score)| (*score, member.rsplit(':').next().unwrap().parse().unwrap()))
        .collect();
    assert_eq!(costs, [(t0, 24), (t0 + 5, 10)]);
    // the merged member frees all of its cost at once, one window later
    assert_eq!(
        redis.rate_check(&at(&policy, t0 + 60_000, 0)).await.unwrap().remaining,
        90
    );
    assert_eq!(
        redis.rate_check(&at(&policy, t0 + 60_005, 0)).await.unwrap().remaining,
        100
    );
}

/// Every counter a check writes expires (the legacy INCR-then-EXPIRE could leave one that
/// never did): after admitted, denied and read-only checks of each algorithm, planned and
/// explicit, each key carries a time to live no longer than its window can matter (two
/// windows for the approximate one, five minutes for the attempt counter).
#[tokio::test]
async fn every_counter_a_check_writes_expires() {
    let prefix = unique("ttl") + ":";
    let redis = RedisCounters::new(&redis_url(), &prefix).unwrap();
    for algorithm in Algorithm::ALL {
        for policy in [&explicit(2, 60, algorithm), &planned("tiny", 2, 60, algorithm)] {
            for cost in [1, 1, 1, 0] {
                // a key per algorithm: a plan's counter is the plan's, whatever the algorithm
                let check = RateCheck {
                    key: algorithm.code(),
                    policy,
                    cost,
                    now_ms: None,
                };
                redis
                    .rate_check(&check)
                    .await
                    .unwrap_or_else(|e| panic!("{algorithm:?} {} cost {cost}: {e}", policy.name));
            }
        }
    }
    let keys: Vec<String> = redis
        .query(::redis::cmd("KEYS").arg(format!("{prefix}rl:*")).clone())
        .await
        .unwrap();
    // per key, explicit and planned: sw a log and a sum each, the others one counter each;
    // and one attempt counter: 5 + 3 + 3 + 3
    assert_eq!(keys.len(), 14, "{keys:?}");
    for key in keys {
        let ttl: i64 = redis.query(::redis::cmd("PTTL").arg(&key).clone()).await.unwrap();
        assert!(ttl > 0 && ttl <= 300_000, "{key}: PTTL {ttl}");
    }
}

/// A key's keys in Redis as they are: each one's value (`DUMP`) and expiry time.
async fn snapshot(redis: &RedisCounters, keys: &[String]) -> Vec<(Option<Vec<u8>>, i64)> {
    let mut found = Vec::new();
    for key in keys {
        let dump: Option<Vec<u8>> = redis.query(::redis::cmd("DUMP").arg(key).clone()).await.unwrap();
        let expiry: i64 = redis.query(::redis::cmd("PEXPIRETIME").arg(key).clone()).await.unwrap();
        found.push((dump, expiry));
    }
    found
}

/// A read (cost 0) only reads, in every algorithm: on a fresh key it writes none (it must
/// not start a window), and on a counted one it writes nothing; a denied check leaves the
/// counter as it was. A `WATCH` of the keys on another connection sees any write: its
/// `EXEC` then aborts. (A denied check of a running fixed or approximate window does write:
/// its first read added the cost, and it takes it back. A key denied over and over under the
/// other two, the case a limiter is for, costs Redis reads and no write.)
#[tokio::test]
async fn reads_and_denied_checks_leave_counters_as_they_were() {
    let redis = RedisCounters::new(&redis_url(), &(unique("ro") + ":")).unwrap();
    let client = ::redis::Client::open(redis_url()).unwrap();
    let mut watcher = client.get_multiplexed_async_connection().await.unwrap();
    for algorithm in Algorithm::ALL {
        let policy = explicit(2, 3600, algorithm);
        let check = |cost| live(&policy, cost);
        let counter = check(1).counter_id();
        let mut keys = vec![redis.keys().rate_counter("k", &counter)];
        if algorithm == Algorithm::SlidingWindow {
            keys.push(redis.keys().rate_sum("k", &counter));
        }
        let denied_writes = matches!(algorithm, Algorithm::FixedWindow | Algorithm::SlidingWindowApprox);
        // (cost, admitted, whether it writes)
        for (cost, admitted, writes) in [
            (0, true, false),
            (1, true, true),
            (0, true, false),
            (1, true, true),
            (1, false, denied_writes),
            (0, false, false),
        ] {
            let before = snapshot(&redis, &keys).await;
            let _: () = ::redis::cmd("WATCH")
                .arg(&keys)
                .query_async(&mut watcher)
                .await
                .unwrap();
            let decision = redis.rate_check(&check(cost)).await.unwrap();
            assert_eq!(decision.allowed, admitted, "{algorithm:?} cost {cost}");
            let exec: Option<Vec<i64>> = ::redis::pipe()
                .atomic()
                .cmd("EXISTS")
                .arg(&keys)
                .query_async(&mut watcher)
                .await
                .unwrap();
            assert_eq!(
                exec.is_none(),
                writes,
                "{algorithm:?} cost {cost}, admitted {admitted}: {exec:?}"
            );
            if cost == 0 || !admitted {
                assert_eq!(snapshot(&redis, &keys).await, before, "{algorithm:?} cost {cost}");
            }
        }
    }
}

/// A window counter's or a bucket's expiry time is part of its state: such a key without
/// one (written by hand, or restored) holds nothing and would never go. A read deletes it;
/// a costed check counts afresh and writes it with an expiry.
#[tokio::test]
async fn a_counter_without_an_expiry_time_counts_afresh() {
    let redis = RedisCounters::new(&redis_url(), &(unique("persist") + ":")).unwrap();
    for algorithm in [
        Algorithm::SlidingWindowApprox,
        Algorithm::FixedWindow,
        Algorithm::TokenBucket,
    ] {
        let policy = explicit(2, 3600, algorithm);
        let check = |cost| live(&policy, cost);
        let key = redis.keys().rate_counter("k", &check(1).counter_id());
        assert!(redis.rate_check(&check(2)).await.unwrap().allowed);
        let _: () = redis.query(::redis::cmd("PERSIST").arg(&key).clone()).await.unwrap();
        assert!(redis.rate_check(&check(0)).await.unwrap().allowed, "{algorithm:?}");
        let exists: i64 = redis.query(::redis::cmd("EXISTS").arg(&key).clone()).await.unwrap();
        assert_eq!(exists, 0, "{algorithm:?}: the read deletes it");
        assert!(redis.rate_check(&check(2)).await.unwrap().allowed);
        let _: () = redis.query(::redis::cmd("PERSIST").arg(&key).clone()).await.unwrap();
        let decision = redis.rate_check(&check(1)).await.unwrap();
        assert_eq!((decision.allowed, decision.remaining), (true, 1), "{algorithm:?}");
        let ttl: i64 = redis.query(::redis::cmd("PTTL").arg(&key).clone()).await.unwrap();
        assert!(ttl > 0 && ttl <= 7_200_000, "{algorithm:?}: PTTL {ttl}");
    }
}

/// The token bucket on Redis bursts exactly its limit when the window is no multiple of
/// it (3 per 2 s: a request every 666.67 ms), in one call at one ms, as the twin does.
#[tokio::test]
async fn the_token_bucket_bursts_exactly_its_limit() {
    let redis = RedisCounters::new(&redis_url(), &(unique("burst") + ":")).unwrap();
    let policy = explicit(3, 2, Algorithm::TokenBucket);
    let t0 = wall_ms();
    let checks: Vec<_> = (0..4).map(|_| at(&policy, t0, 1)).collect();
    let decided: Vec<_> = join_all(checks.iter().map(|c| redis.rate_check(c)))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let answers: Vec<_> = decided.iter().map(|d| (d.allowed, d.remaining)).collect();
    assert_eq!(answers, [(true, 2), (true, 1), (true, 0), (false, 0)]);
    assert_eq!((decided[3].retry_after_ms, decided[3].reset_ms), (667, t0 + 2000));
}

/// The anomaly attempt counter lives five minutes from the key's first attempt, not from
/// its last (as the legacy `INCR` + `EXPIRE 300`): later attempts, even once Redis's clock has
/// moved on, leave its expiry time as the first set it. Once it has expired, a new window
/// counts afresh and records its own anomaly.
#[tokio::test]
async fn the_anomaly_window_runs_from_the_first_attempt() {
    let redis = RedisCounters::new(&redis_url(), &(unique("aw") + ":")).unwrap();
    let policy = planned("tiny", 2, 60, Algorithm::FixedWindow);
    let check = RateCheck {
        key: "k",
        policy: &policy,
        cost: 1,
        now_ms: None,
    };
    let tries = redis.keys().attempts("k");
    let expiry = || async {
        redis
            .query::<i64>(::redis::cmd("PEXPIRETIME").arg(&tries).clone())
            .await
            .unwrap()
    };
    let first = redis.rate_check(&check).await.unwrap();
    let set_at_first = expiry().await;
    assert_eq!(set_at_first, i64::try_from(first.now_ms).unwrap() + 300_000);
    // attempts 2..=5, each its own call: the fifth records; then more until Redis's clock
    // has moved past the first attempt's ms
    let mut last = first;
    for _ in 0..4 {
        last = redis.rate_check(&check).await.unwrap();
    }
    assert_eq!(last.anomaly, Some(5));
    while last.now_ms == first.now_ms {
        last = redis.rate_check(&check).await.unwrap();
    }
    assert_eq!(expiry().await, set_at_first);
    let recorded = |found: Vec<quotad::domain::ratelimit::Anomaly>| found.iter().filter(|a| a.key == "k").count();
    assert_eq!(recorded(redis.anomalies(50).await.unwrap()), 1);

    // the window ends (its expiry brought forward to now), and the next one records anew
    let _: () = redis
        .query(::redis::cmd("PEXPIRE").arg(&tries).arg(1).clone())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while redis
        .query::<i64>(::redis::cmd("EXISTS").arg(&tries).clone())
        .await
        .unwrap()
        == 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the attempt counter did not expire"
        );
        tokio::task::yield_now().await;
    }
    let counts: Vec<Option<u64>> = join_all((0..6).map(|_| redis.rate_check(&check)))
        .await
        .into_iter()
        .map(|d| d.unwrap().anomaly)
        .collect();
    assert_eq!(counts, [None, None, None, None, Some(5), None]);
    assert_eq!(recorded(redis.anomalies(50).await.unwrap()), 2);
}

async fn check(app: &crate::helpers::TestApp, body: Value) -> reqwest::Response {
    app.post("/ratelimit/check", body).await
}

#[tokio::test]
async fn each_algorithm_admits_denies_and_recovers_after_retry_after() {
    let app = spawn_with(&Shared::real(), |_| {}).await;
    for algorithm in ALGORITHMS {
        let body = json!({"key": unique("k"), "limit": 3, "window": "2s", "algorithm": algorithm});
        for i in 0..3 {
            let resp = check(&app, body.clone()).await;
            assert_eq!(resp.status(), 200, "{algorithm} #{i}");
        }
        let denied = check(&app, body.clone()).await;
        let retry_after: u64 = denied.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        let problem = problem(denied, 429, "rate_limited").await;
        assert_eq!(problem["retryAfter"], retry_after, "{algorithm}");
        assert!((1..=2).contains(&retry_after), "{algorithm}: {retry_after}");
        // A denied request consumed nothing: a read still says denied, not worse.
        let mut read_only = body.clone();
        read_only["cost"] = json!(0);
        let read = ok(check(&app, read_only).await).await;
        assert_eq!(read["allowed"], false, "{algorithm}");
        tokio::time::sleep(Duration::from_secs(retry_after)).await; // Retry-After is honest
        assert_eq!(
            check(&app, body.clone()).await.status(),
            200,
            "{algorithm} after Retry-After"
        );
    }
}

#[tokio::test]
async fn headers_agree_with_the_body() {
    let app = spawn_with(&Shared::real(), |_| {}).await;
    let resp = check(
        &app,
        json!({"key": "h", "limit": 2, "window": "1m", "algorithm": "fixed-window"}),
    )
    .await;
    let headers = resp.headers().clone();
    let body = ok(resp).await;
    assert_eq!(headers["ratelimit-policy"], "\"custom\";q=2;w=60");
    assert_eq!(headers["x-ratelimit-limit"], "2");
    assert_eq!(headers["x-ratelimit-remaining"], body["remaining"].to_string().as_str());
    assert_eq!(headers["x-ratelimit-reset"], body["reset"].to_string().as_str());
    assert_eq!(
        headers["ratelimit"],
        format!("\"custom\";r={};t=60", body["remaining"]).as_str()
    );
    let plan = check(&app, json!({"key": "h", "plan": "starter"})).await;
    assert_eq!(plan.headers()["ratelimit-policy"], "\"starter\";q=50;w=3600");
}

#[tokio::test]
async fn concurrent_checks_on_two_replicas_admit_exactly_the_limit() {
    let shared = Shared::real();
    let (a, b) = (spawn_with(&shared, |_| {}).await, spawn_with(&shared, |_| {}).await);
    for algorithm in ALGORITHMS {
        let body = json!({"key": unique("c"), "limit": 50, "window": "1h", "algorithm": algorithm});
        let calls = (0..200).map(|i| {
            let (app, body) = (if i % 2 == 0 { &a } else { &b }, body.clone());
            async move { check(app, body).await.status().as_u16() }
        });
        let statuses = join_all(calls).await;
        assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 50, "{algorithm}");
    }
}

#[tokio::test]
async fn an_anomaly_is_recorded_once_per_key_and_window_and_sent_to_the_webhook() {
    let received = Arc::new(Mutex::new(Vec::<Value>::new()));
    let sink = received.clone();
    let hook = Router::new().route(
        "/hook",
        post(move |axum::Json(body): axum::Json<Value>| {
            let sink = sink.clone();
            async move { sink.lock().await.push(body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await.unwrap() });

    let shared = Shared::real();
    let app = spawn_with(&shared, |c| {
        c.anomaly_webhook = Some(url);
        for (name, limit) in [("tiny", 2), ("small", 3)] {
            c.plans.insert(
                name.into(),
                quotad::config::PlanConfig {
                    limit,
                    window: toml::Value::String("1h".into()),
                    algorithm: "sliding-window".into(),
                },
            );
        }
    })
    .await;
    for _ in 0..12 {
        check(&app, json!({"key": "creator:1", "plan": "tiny"})).await;
    }
    let body = ok(app.admin(reqwest::Method::GET, "/admin/anomalies?limit=50", None).await).await;
    let anomalies = body["anomalies"].as_array().unwrap();
    assert_eq!(anomalies.len(), 1, "{body}");
    assert_eq!(
        (anomalies[0]["key"].as_str(), anomalies[0]["plan"].as_str()),
        (Some("creator:1"), Some("tiny"))
    );
    assert_eq!(
        (anomalies[0]["count"].as_u64(), anomalies[0]["threshold"].as_u64()),
        (Some(5), Some(4))
    );
    let delivered = eventually(Duration::from_secs(10), 1, || async { received.lock().await.len() }).await;
    assert_eq!(delivered, 1);
    assert_eq!(received.lock().await[0]["key"], "creator:1");
    for query in ["limit=many", "limit=0", "limit=-1"] {
        let resp = app
            .admin(reqwest::Method::GET, &format!("/admin/anomalies?{query}"), None)
            .await;
        problem(resp, 400, "invalid_query").await;
    }
    // a limit beyond the list's 1000 reads all of it; other parameters are ignored
    for query in ["limit=5000&_=1", "limit=99999999999999999999"] {
        let all = ok(app
            .admin(reqwest::Method::GET, &format!("/admin/anomalies?{query}"), None)
            .await)
        .await;
        assert_eq!(all["anomalies"].as_array().unwrap().len(), 1);
    }

    // The attempt counter is the key's, across its plans: creator:1's window has had its
    // anomaly, whatever plan it tries next; creator:2 exceeds tiny's threshold (4) only with
    // the attempts it made under small (threshold 6), and that attempt records it.
    for _ in 0..8 {
        check(&app, json!({"key": "creator:1", "plan": "small"})).await;
    }
    for plan in ["tiny", "tiny", "tiny", "small", "small", "small", "tiny", "tiny"] {
        check(&app, json!({"key": "creator:2", "plan": plan})).await;
    }
    let body = ok(app.admin(reqwest::Method::GET, "/admin/anomalies", None).await).await;
    let seen: Vec<(&str, &str, u64, u64)> = body["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let text = |name: &str| a[name].as_str().unwrap();
            let number = |name: &str| a[name].as_u64().unwrap();
            (text("key"), text("plan"), number("count"), number("threshold"))
        })
        .collect();
    assert_eq!(
        seen,
        [("creator:2", "tiny", 7, 4), ("creator:1", "tiny", 5, 4)],
        "{body}"
    );
    let delivered = eventually(Duration::from_secs(10), 2, || async { received.lock().await.len() }).await;
    assert_eq!(delivered, 2);
    assert_eq!(received.lock().await[1]["key"], "creator:2");
}

#[tokio::test]
async fn a_failing_webhook_harms_nothing() {
    let shared = Shared::real();
    let app = spawn_with(&shared, |c| {
        c.anomaly_webhook = Some("http://127.0.0.1:9/unreachable".into());
        c.plans.insert(
            "tiny".into(),
            quotad::config::PlanConfig {
                limit: 1,
                window: toml::Value::String("1h".into()),
                algorithm: "token-bucket".into(),
            },
        );
    })
    .await;
    let statuses: Vec<u16> =
        join_all((0..6).map(|_| async { check(&app, json!({"key": "k", "plan": "tiny"})).await.status().as_u16() }))
            .await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 5);
    let body = ok(app.admin(reqwest::Method::GET, "/admin/anomalies", None).await).await;
    assert_eq!(body["anomalies"].as_array().unwrap().len(), 1);
}

/// A plan whose algorithm is changed in the config (a rolling deploy: replicas with the old
/// and the new config side by side) counts afresh under the new algorithm, exactly across
/// replicas, while the old one keeps its own count: each algorithm keeps another kind of
/// state, which the other must not read (a sorted set read as a string failed the script,
/// and each replica then counted on its own).
#[tokio::test]
async fn a_plan_whose_algorithm_changes_counts_afresh_exactly() {
    let plan = |algorithm: &str| quotad::config::PlanConfig {
        limit: 3,
        window: toml::Value::String("1h".into()),
        algorithm: algorithm.into(),
    };
    for changed_to in ["fixed-window", "sliding-window-approx", "token-bucket"] {
        let shared = Shared::real();
        let old = spawn_with(&shared, |c| {
            c.plans.insert("p".into(), plan("sliding-window"));
        })
        .await;
        let new = [
            spawn_with(&shared, |c| {
                c.plans.insert("p".into(), plan(changed_to));
            })
            .await,
            spawn_with(&shared, |c| {
                c.plans.insert("p".into(), plan(changed_to));
            })
            .await,
        ];
        let body = json!({"key": "k", "plan": "p"});
        for _ in 0..2 {
            assert_eq!(check(&old, body.clone()).await.status(), 200);
        }
        let mut admitted = 0;
        for i in 0..8 {
            if check(&new[i % 2], body.clone()).await.status() == 200 {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3, "{changed_to}: the new counter's limit over both replicas");
        assert_eq!(check(&old, body.clone()).await.status(), 200, "{changed_to}");
        assert_eq!(check(&old, body.clone()).await.status(), 429, "{changed_to}");
    }
}

/// A sliding-window member written by a writer that does not keep the newest score (an
/// older quotad during a rolling deploy moves only `seq` and `sum`) is still seen as the
/// newest: `reset` and the keys' expiry follow it.
#[tokio::test]
async fn the_sliding_window_sees_members_written_without_their_score() {
    let redis = RedisCounters::new(&redis_url(), &(unique("old") + ":")).unwrap();
    let policy = explicit(3, 60, Algorithm::SlidingWindow);
    let t0 = wall_ms();
    assert!(redis.rate_check(&at(&policy, t0, 1)).await.unwrap().allowed);
    let check = at(&policy, t0, 1);
    let (set, sums) = (
        redis.keys().rate_counter("k", &check.counter_id()),
        redis.keys().rate_sum("k", &check.counter_id()),
    );
    let later = t0 + 1000;
    let _: () = redis
        .query(
            ::redis::cmd("ZADD")
                .arg(&set)
                .arg(later)
                .arg(format!("{later}:2:1"))
                .clone(),
        )
        .await
        .unwrap();
    let _: () = redis
        .query(
            ::redis::cmd("HSET")
                .arg(&sums)
                .arg("sum")
                .arg(2)
                .arg("seq")
                .arg(2)
                .clone(),
        )
        .await
        .unwrap();
    let read = redis.rate_check(&at(&policy, t0 + 2000, 0)).await.unwrap();
    assert_eq!((read.remaining, read.reset_ms), (1, later + 60_000));
}
