//! Rate limits: policies, the four algorithms and anomaly counting.
//!
//! This is the in-process implementation (the "twin" of the Redis scripts planned in the
//! rate-limit issue). Each replica counts on its own, so across replicas it is approximate.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Mutex,
};

use super::InvalidInput;
use crate::config::PlanConfig;

/// Longest window a policy may have: 30 days.
const MAX_WINDOW_MS: u64 = 30 * 24 * 3600 * 1000;
/// Anomaly detection counts attempts per key over this span.
const ANOMALY_SPAN_MS: u64 = 5 * 60 * 1000;
/// How many anomalies are kept for `GET /admin/anomalies`.
const ANOMALY_KEEP: usize = 1000;

/// A counting algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    SlidingWindow,
    SlidingWindowApprox,
    FixedWindow,
    TokenBucket,
}

impl Algorithm {
    /// Every algorithm.
    pub const ALL: [Algorithm; 4] = [
        Algorithm::SlidingWindow,
        Algorithm::SlidingWindowApprox,
        Algorithm::FixedWindow,
        Algorithm::TokenBucket,
    ];

    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        match raw {
            "sliding-window" => Ok(Self::SlidingWindow),
            "sliding-window-approx" => Ok(Self::SlidingWindowApprox),
            "fixed-window" => Ok(Self::FixedWindow),
            "token-bucket" => Ok(Self::TokenBucket),
            _ => Err(InvalidInput("algorithm")),
        }
    }

    /// The short code used in Redis keys and by the script.
    pub fn code(self) -> &'static str {
        match self {
            Self::SlidingWindow => "sw",
            Self::SlidingWindowApprox => "swa",
            Self::FixedWindow => "fw",
            // "gcra": its state is exact (in 1/limit ms); keys named apart from the earlier
            // "tb" (ms) and "tbu" (µs) ones, so quotad versions side by side never misread them.
            Self::TokenBucket => "gcra",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SlidingWindow => "sliding-window",
            Self::SlidingWindowApprox => "sliding-window-approx",
            Self::FixedWindow => "fixed-window",
            Self::TokenBucket => "token-bucket",
        }
    }
}

/// A window length in milliseconds, 1 s..=30 d.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window(u64);

impl Window {
    /// `"10s"`, `"10 s"`, `"1500ms"`, `"1m"`, `"1h"`, `"1d"`, or a JSON integer of seconds.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, InvalidInput> {
        match value {
            serde_json::Value::Number(n) => n.as_u64().map_or(Err(InvalidInput("window")), Self::from_secs),
            serde_json::Value::String(s) => Self::parse(s),
            _ => Err(InvalidInput("window")),
        }
    }

    /// A window given as whole seconds.
    pub fn from_secs(secs: u64) -> Result<Self, InvalidInput> {
        Self::within_bounds(secs.checked_mul(1000))
    }

    /// A window given as text: `"10s"`, `"10 s"`, `"1500ms"`, `"1m"`, `"1h"`, `"1d"`, `"10"`.
    pub fn parse(text: &str) -> Result<Self, InvalidInput> {
        Self::within_bounds(parse_duration_ms(text))
    }

    fn within_bounds(ms: Option<u64>) -> Result<Self, InvalidInput> {
        // API.md: at least 1 s and at most 30 d, whichever form (`"1500ms"` is a window,
        // `"500ms"` is not).
        match ms {
            Some(ms) if (1000..=MAX_WINDOW_MS).contains(&ms) => Ok(Self(ms)),
            _ => Err(InvalidInput("window")),
        }
    }

    pub fn from_toml(value: &toml::Value) -> Result<Self, InvalidInput> {
        match value {
            toml::Value::Integer(n) => Self::from_json(&serde_json::json!(n)),
            toml::Value::String(s) => Self::from_json(&serde_json::json!(s)),
            _ => Err(InvalidInput("window")),
        }
    }

    pub fn ms(self) -> u64 {
        self.0
    }

    /// Whole seconds, rounded up.
    pub fn secs(self) -> u64 {
        self.0.div_ceil(1000)
    }
}

fn parse_duration_ms(raw: &str) -> Option<u64> {
    let digits_end = raw.find(|c: char| !c.is_ascii_digit())?;
    let (number, rest) = raw.split_at(digits_end);
    if number.is_empty() {
        return None;
    }
    let unit = rest.strip_prefix(' ').unwrap_or(rest);
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(scale)
}

/// What a counter enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The plan name, or `custom` for explicit limits.
    pub name: String,
    pub limit: u64,
    pub window: Window,
    pub algorithm: Algorithm,
    /// Set for plan-based policies: they feed anomaly detection.
    pub plan: Option<String>,
}

impl Policy {
    /// Identifies the counter together with the key: the plan, or algorithm and window.
    /// Short, because it is part of every counter key in Redis. A plan's counter is named
    /// with its algorithm too: each algorithm keeps another kind of state, so a plan whose
    /// algorithm is changed in the config starts counting afresh instead of misreading the
    /// old state (or failing on a key of another type).
    fn counter_id(&self) -> String {
        match &self.plan {
            Some(plan) => format!("p:{plan}:{}", self.algorithm.code()),
            None => format!("{}{}", self.algorithm.code(), self.window.ms()),
        }
    }
}

/// Plans by name, validated at start.
pub fn plans_from_config(plans: &BTreeMap<String, PlanConfig>) -> anyhow::Result<BTreeMap<String, Policy>> {
    plans
        .iter()
        .map(|(name, plan)| {
            let window = Window::from_toml(&plan.window)
                .map_err(|_| anyhow::anyhow!("plan {name}: invalid window {}", plan.window))?;
            let algorithm = Algorithm::parse(&plan.algorithm)
                .map_err(|_| anyhow::anyhow!("plan {name}: unknown algorithm {:?}", plan.algorithm))?;
            if !(1..=1_000_000).contains(&plan.limit) {
                anyhow::bail!("plan {name}: limit must be 1..=1000000");
            }
            let policy = Policy {
                name: name.clone(),
                limit: plan.limit,
                window,
                algorithm,
                plan: Some(name.clone()),
            };
            Ok((name.clone(), policy))
        })
        .collect()
}

/// The answer to one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// When the key is back to its full limit (ms since the epoch).
    pub reset_ms: u64,
    /// How long until this request would be admitted (0 when it was).
    pub retry_after_ms: u64,
    pub now_ms: u64,
    /// Set when this check recorded an anomaly: the attempts counted so far.
    pub anomaly: Option<u64>,
}

/// One recorded anomaly.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Anomaly {
    pub key: String,
    pub plan: String,
    pub count: u64,
    pub threshold: u64,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// One check to make.
#[derive(Debug, Clone)]
pub struct RateCheck<'a> {
    pub key: &'a str,
    pub policy: &'a Policy,
    pub cost: u64,
    /// The time to decide at; `None` is the counter store's clock (Redis `TIME`).
    pub now_ms: Option<u64>,
}

impl RateCheck<'_> {
    /// The counter's identity next to the key: the plan, or algorithm and window.
    pub fn counter_id(&self) -> String {
        self.policy.counter_id()
    }

    /// Plan-based checks feed anomaly detection: more than this many attempts in 5 minutes.
    pub fn anomaly_threshold(&self) -> Option<(&str, u64)> {
        self.policy.plan.as_deref().map(|plan| (plan, 2 * self.policy.limit))
    }
}

/// Anomalies kept (newest first).
pub const ANOMALIES_KEPT: usize = ANOMALY_KEEP;

#[derive(Debug, Clone)]
enum State {
    /// Admitted (timestamp, cost), oldest first.
    Log(VecDeque<(u64, u64)>),
    /// Window start and count.
    Fixed { start: u64, count: u64 },
    /// Current window start, previous and current counts.
    Approx { start: u64, prev: u64, curr: u64 },
    /// GCRA, as the Redis key holds it: the ms the bucket is full again (the key's expiry;
    /// 0: never written), and the limit it was written at with the gap, in 1/limit ms,
    /// from the exact theoretical arrival time up to that ms.
    Gcra { full_at: u64, limit: u64, gap: u64 },
}

/// A key's anomaly attempt counter: it lives [`ANOMALY_SPAN_MS`] from its first attempt.
#[derive(Debug, Clone, Copy)]
struct Attempts {
    count: u64,
    since: u64,
    /// This window's anomaly is recorded.
    recorded: bool,
}

#[derive(Default)]
struct Inner {
    /// Each counter with the time after which it no longer matters (its decision's reset).
    counters: HashMap<(String, String), (State, u64)>,
    /// Each key's anomaly attempts, whatever its plans.
    attempts: HashMap<String, Attempts>,
    anomalies: VecDeque<Anomaly>,
    checks: u64,
}

/// Idle counters are dropped every this many checks (Redis expires its keys instead).
const PURGE_EVERY: u64 = 4096;

/// The in-process twin of the Redis script: identical decisions, counted in this process
/// only (the embedded backend, and the fallback while Redis is away).
#[derive(Default)]
pub struct Twin {
    inner: Mutex<Inner>,
}

fn wall_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

fn at_ms(ms: u64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(0)).unwrap_or_default()
}

impl Twin {
    pub fn check(&self, check: &RateCheck<'_>) -> RateDecision {
        let now = check.now_ms.unwrap_or_else(wall_ms);
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.checks += 1;
        if inner.checks.is_multiple_of(PURGE_EVERY) {
            inner.counters.retain(|_, (_, until)| *until > now);
            inner
                .attempts
                .retain(|_, tries| tries.since.saturating_add(ANOMALY_SPAN_MS) >= now);
        }
        let id = (check.key.to_owned(), check.counter_id());
        let (state, until) = inner
            .counters
            .entry(id)
            .or_insert_with(|| (initial(check.policy.algorithm), now));
        let mut decision = decide(state, check.policy, check.cost, now);
        // A window past the reset: the approximate window still weighs the previous one then.
        *until = decision.reset_ms.max(now) + check.policy.window.ms();
        if let Some((plan, threshold)) = check.anomaly_threshold() {
            let fresh = Attempts {
                count: 0,
                since: now,
                recorded: false,
            };
            let tries = inner.attempts.entry(check.key.to_owned()).or_insert(fresh);
            // Redis keeps a key up to its expiry ms, inclusive
            if now > tries.since + ANOMALY_SPAN_MS {
                *tries = fresh;
            }
            tries.count += 1;
            // the first attempt above this plan's threshold: one anomaly per key and window
            if !tries.recorded && tries.count > threshold {
                tries.recorded = true;
                decision.anomaly = Some(tries.count);
                let anomaly = Anomaly {
                    key: check.key.to_owned(),
                    plan: plan.to_owned(),
                    count: tries.count,
                    threshold,
                    at: at_ms(now),
                };
                inner.anomalies.push_front(anomaly);
                inner.anomalies.truncate(ANOMALY_KEEP);
            }
        }
        decision
    }

    /// The newest anomalies first.
    pub fn anomalies(&self, limit: usize) -> Vec<Anomaly> {
        self.inner
            .lock()
            .unwrap()
            .anomalies
            .iter()
            .take(limit)
            .cloned()
            .collect()
    }
}

/// Builds an anomaly from the Redis script's record (`atMs` in ms).
pub fn anomaly_at(key: String, plan: String, count: u64, threshold: u64, at: u64) -> Anomaly {
    Anomaly {
        key,
        plan,
        count,
        threshold,
        at: at_ms(at),
    }
}

/// A counter nothing was admitted on yet (as a missing Redis key: only an admitted cost
/// writes one, so the window counters' counts and the bucket's `full_at` are never 0 after).
fn initial(algorithm: Algorithm) -> State {
    match algorithm {
        Algorithm::SlidingWindow => State::Log(VecDeque::new()),
        Algorithm::FixedWindow => State::Fixed { start: 0, count: 0 },
        Algorithm::SlidingWindowApprox => State::Approx {
            start: 0,
            prev: 0,
            curr: 0,
        },
        Algorithm::TokenBucket => State::Gcra {
            full_at: 0,
            limit: 1,
            gap: 0,
        },
    }
}

/// How far into a window a previous window's `count` (> 0) weighs less than 1 in the
/// approximate window's estimate, `count * (window - e) / window` rounded down: from
/// `e = floor(window * (count - 1) / count) + 1` on.
fn empty_after(count: u64, window: u64) -> u64 {
    window * (count - 1) / count + 1
}

/// The decision rule of every algorithm (the Lua script `ratelimit.lua` is its twin).
fn decide(state: &mut State, policy: &Policy, cost: u64, now: u64) -> RateDecision {
    let (limit, window) = (policy.limit, policy.window.ms());
    // A read (cost 0) answers whether a cost-1 request would be admitted.
    let need = cost.max(1);
    let (allowed, remaining, reset, retry) = match state {
        State::Log(log) => {
            let mut used: u64 = log.iter().map(|(_, c)| c).sum();
            while let Some((t, c)) = log.front().copied().filter(|(t, _)| t + window <= now) {
                let _ = t;
                used -= c;
                log.pop_front();
            }
            let allowed = used + need <= limit;
            if allowed && cost > 0 {
                log.push_back((now, cost));
                used += cost;
            }
            let reset = log.back().map_or(now, |(t, _)| t + window);
            let mut retry = 0;
            if !allowed {
                let (excess, mut freed) = (used + need - limit, 0);
                for (t, c) in log.iter() {
                    freed += c;
                    if freed >= excess {
                        retry = t + window - now;
                        break;
                    }
                }
            }
            (allowed, limit.saturating_sub(used), reset, retry)
        }
        // The window counters and the bucket change their state only for an admitted cost:
        // a read (cost 0) or a denied request leaves it as it was, so a read never starts a
        // window (as the script writes nothing then). Rolling a window over is computed on
        // each check alike, so leaving it unwritten decides nothing differently.
        State::Fixed { start, count } => {
            // A window starts with the first admitted request after the last one ended (as
            // the Redis key expiring at the window's end does).
            let (mut s, mut c) = (*start, *count);
            if c == 0 || now >= s + window {
                (s, c) = (now, 0);
            }
            let allowed = c + need <= limit;
            if allowed && cost > 0 {
                c += cost;
                (*start, *count) = (s, c);
            }
            let finish = s + window;
            let reset = if c > 0 { finish } else { now };
            (allowed, limit.saturating_sub(c), reset, finish.saturating_sub(now))
        }
        State::Approx { start, prev, curr } => {
            let (mut s, mut p, mut c) = (*start, *prev, *curr);
            if (p == 0 && c == 0) || now >= s + 2 * window {
                // Nothing counted, or both windows over (the Redis key has expired): afresh.
                (s, p, c) = (now, 0, 0);
            } else if now >= s + window {
                (s, p, c) = (s + window, c, 0);
            }
            let elapsed = now.saturating_sub(s).min(window);
            let fits = |p: u64, c: u64, e: u64| p * (window - e) / window + c + need <= limit;
            let mut estimate = p * (window - elapsed) / window + c;
            let allowed = estimate + need <= limit;
            if allowed && cost > 0 {
                c += cost;
                estimate += cost;
                (*start, *prev, *curr) = (s, p, c);
            }
            // Full again once the estimate is 0: the current count has become the previous
            // window's and weighs less than 1 (see `empty_after`).
            let reset = if c > 0 {
                s + window + empty_after(c, window)
            } else if p > 0 {
                s + empty_after(p, window)
            } else {
                now
            };
            let mut retry = 0;
            if !allowed {
                // The earliest offset into a window at which a request of this cost fits.
                let (p, c, base, mut lo) = if c + need > limit {
                    (c, 0, s + window, 0)
                } else {
                    (p, c, s, elapsed)
                };
                let mut hi = window;
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if fits(p, c, mid) {
                        hi = mid;
                    } else {
                        lo = mid + 1;
                    }
                }
                retry = base + lo - now;
            }
            (allowed, limit.saturating_sub(estimate), reset, retry)
        }
        State::Gcra {
            full_at,
            limit: written_at,
            gap,
        } => {
            // The bucket's debt, in units of 1/limit ms: a request costs `window` of them at
            // any limit, so the debt counts requests (debt / window), and a changed limit
            // applies to the requests already counted. Exact: every value stays below 2^53
            // (limit * window <= 10^6 * 2.6 * 10^9), as in the script's doubles.
            let mut debt = if *full_at > now {
                ((*full_at - now) * *written_at).saturating_sub(*gap)
            } else {
                0
            };
            // The debt drains at the rate of the limit it was written at (`written_at` per
            // ms) until an admitted request writes it at its own: `reset` and `retry` follow
            // what the bucket will do, whatever limit a read or a denied check names.
            let mut rate = if debt > 0 { *written_at } else { limit };
            let room = (limit - need) * window;
            let allowed = debt <= room;
            if allowed && cost > 0 {
                debt += cost * window;
                let ahead = debt.div_ceil(limit);
                (*full_at, *written_at, *gap) = (now + ahead, limit, ahead * limit - debt);
                rate = limit;
            }
            let remaining = limit.saturating_sub(debt.div_ceil(window));
            let retry = debt.saturating_sub(room).div_ceil(rate);
            (allowed, remaining, now + debt.div_ceil(rate), retry)
        }
    };
    RateDecision {
        allowed,
        limit,
        remaining,
        reset_ms: reset.max(now),
        retry_after_ms: if allowed { 0 } else { retry.max(1) },
        now_ms: now,
        anomaly: None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn check_at(twin: &Twin, key: &str, policy: &Policy, cost: u64, now: u64) -> RateDecision {
        twin.check(&RateCheck {
            key,
            policy,
            cost,
            now_ms: Some(now),
        })
    }

    fn policy(algorithm: Algorithm, limit: u64, window_s: u64) -> Policy {
        Policy {
            name: "custom".into(),
            limit,
            window: Window(window_s * 1000),
            algorithm,
            plan: None,
        }
    }

    /// A token bucket keeps its rate above 1000 a second: 10 000 per second after the burst
    /// (at ms resolution each request cost a whole ms, 1000 a second at most).
    #[test]
    fn token_bucket_keeps_rates_above_one_per_ms() {
        let twin = Twin::default();
        let p = policy(Algorithm::TokenBucket, 10_000, 1);
        let t0 = 1_000_000;
        let burst = (0..10_000).filter(|_| check_at(&twin, "k", &p, 1, t0).allowed).count();
        assert_eq!(burst, 10_000);
        assert!(!check_at(&twin, "k", &p, 1, t0).allowed);
        let mut admitted = 0;
        for ms in 1..=1000 {
            admitted += (0..20).filter(|_| check_at(&twin, "k", &p, 1, t0 + ms).allowed).count();
        }
        assert_eq!(admitted, 10_000, "10 a ms for 1000 ms");
        let denied = check_at(&twin, "k", &p, 1, t0 + 1000);
        assert_eq!((denied.allowed, denied.retry_after_ms), (false, 1));
    }

    #[test]
    fn windows_parse_as_the_contract_says() {
        use serde_json::json;
        for (raw, ms) in [
            (json!("10s"), 10_000),
            (json!("10 s"), 10_000),
            (json!("1m"), 60_000),
            (json!("1h"), 3_600_000),
            (json!("1d"), 86_400_000),
            (json!("1500ms"), 1500),
            (json!(5), 5000),
        ] {
            assert_eq!(Window::from_json(&raw).unwrap().ms(), ms, "{raw}");
        }
        for raw in [
            json!("soon"),
            json!("500ms"),
            json!("0ms"),
            json!("0s"),
            json!("31d"),
            json!("1.5s"),
            json!(-1),
            json!(1.5),
            json!("10  s"),
            json!(" 10s"),
            json!("s"),
            json!(true),
        ] {
            assert!(Window::from_json(&raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn each_algorithm_admits_the_limit_then_denies_then_recovers() {
        for algorithm in Algorithm::ALL {
            let limiter = Twin::default();
            let p = policy(algorithm, 3, 10);
            let t0 = 1_000_000;
            for i in 0..3 {
                assert!(check_at(&limiter, "k", &p, 1, t0 + i).allowed, "{algorithm:?} #{i}");
            }
            let denied = check_at(&limiter, "k", &p, 1, t0 + 3);
            assert!(!denied.allowed, "{algorithm:?}");
            assert!(denied.retry_after_ms >= 1);
            let later = t0 + 3 + denied.retry_after_ms;
            assert!(
                check_at(&limiter, "k", &p, 1, later).allowed,
                "{algorithm:?} after retry-after"
            );
        }
    }

    #[test]
    fn a_lowered_limit_denies_without_underflow() {
        for algorithm in Algorithm::ALL {
            let limiter = Twin::default();
            check_at(&limiter, "k", &policy(algorithm, 10, 10), 10, 1_000_000);
            let lowered = check_at(&limiter, "k", &policy(algorithm, 5, 10), 1, 1_000_001);
            assert!(!lowered.allowed, "{algorithm:?}");
            assert_eq!(lowered.remaining, 0, "{algorithm:?}");
            assert!(lowered.retry_after_ms >= 1);
        }
    }

    /// A changed limit applies to the requests already counted, in every algorithm: 2 of 3
    /// used leaves 3 of 5 (the token bucket too: its debt counts requests, not time).
    #[test]
    fn a_changed_limit_applies_to_the_requests_counted() {
        for algorithm in Algorithm::ALL {
            let limiter = Twin::default();
            let t0 = 1_000_000;
            for _ in 0..2 {
                assert!(check_at(&limiter, "k", &policy(algorithm, 3, 10), 1, t0).allowed);
            }
            let raised = check_at(&limiter, "k", &policy(algorithm, 5, 10), 1, t0);
            assert_eq!((raised.allowed, raised.remaining), (true, 2), "{algorithm:?}");
            let lowered = check_at(&limiter, "k", &policy(algorithm, 3, 10), 0, t0);
            assert_eq!((lowered.allowed, lowered.remaining), (false, 0), "{algorithm:?}");
        }
    }

    #[test]
    fn anomalies_are_recorded_once_per_window() {
        let limiter = Twin::default();
        let mut p = policy(Algorithm::SlidingWindow, 2, 60);
        p.plan = Some("tiny".into());
        for i in 0..10 {
            check_at(&limiter, "k", &p, 1, 1_000 + i);
        }
        let found = limiter.anomalies(50);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].count, found[0].threshold), (5, 4));
        // the window runs from the first attempt, up to its expiry ms inclusive (as a Redis
        // key does): this is its 11th attempt
        check_at(&limiter, "k", &p, 1, 1_000 + ANOMALY_SPAN_MS);
        assert_eq!(limiter.anomalies(50).len(), 1);
        // 1 ms later a new window counts afresh, although the last attempt was 1 ms ago
        for i in 1..=5 {
            let d = check_at(&limiter, "k", &p, 1, 1_000 + ANOMALY_SPAN_MS + i);
            assert_eq!(d.anomaly, (i == 5).then_some(5));
        }
        assert_eq!(limiter.anomalies(50).len(), 2);
    }

    proptest! {
        /// Reference model: never more than `limit` admitted in any window-long span.
        #[test]
        fn sliding_window_never_admits_more_than_the_limit_in_any_window(
            steps in proptest::collection::vec((0u64..4000, 0u64..4), 1..200),
            limit in 1u64..10,
        ) {
            let limiter = Twin::default();
            let p = policy(Algorithm::SlidingWindow, limit, 5);
            let mut now = 1_000_000;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (step, cost) in steps {
                now += step;
                let cost = cost.min(limit);
                let d = check_at(&limiter, "k", &p, cost, now);
                if d.allowed && cost > 0 {
                    admitted.push((now, cost));
                }
                let in_window: u64 = admitted.iter().filter(|(t, _)| t + 5000 > now).map(|(_, c)| c).sum();
                prop_assert!(in_window <= limit);
                prop_assert_eq!(d.remaining, limit - in_window);
            }
        }

        /// Reference model for the window counters: never more than `limit` in one window,
        /// so never more than twice `limit` in any window-long span; and a request is only
        /// denied when at least `limit - cost + 1` were admitted within the last two windows.
        #[test]
        fn window_counters_stay_within_their_bounds(
            steps in proptest::collection::vec((0u64..3000, 1u64..3), 1..200),
            limit in 1u64..10,
            approx in proptest::bool::ANY,
        ) {
            let algorithm = if approx { Algorithm::SlidingWindowApprox } else { Algorithm::FixedWindow };
            let limiter = Twin::default();
            let p = policy(algorithm, limit, 5);
            let mut now = 1_000_000;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (step, cost) in steps {
                now += step;
                let cost = cost.min(limit);
                let d = check_at(&limiter, "k", &p, cost, now);
                let recent: u64 = admitted.iter().filter(|(t, _)| t + 10_000 > now).map(|(_, c)| c).sum();
                if d.allowed {
                    admitted.push((now, cost));
                } else {
                    prop_assert!(recent + cost > limit, "denied with only {} admitted in two windows", recent);
                }
                let span: u64 = admitted.iter().filter(|(t, _)| t + 5000 > now).map(|(_, c)| c).sum();
                prop_assert!(span <= 2 * limit);
            }
        }

        /// A token bucket's burst is exactly its limit, whatever the window: a fresh bucket
        /// admits `limit` checks at one ms, `remaining` counting down to 0, then denies; and
        /// `Retry-After` is honest to the ms (denied 1 ms before it, admitted at it).
        #[test]
        fn token_bucket_bursts_exactly_its_limit(limit in 1u64..50, window_ms in 1000u64..100_000) {
            let limiter = Twin::default();
            let p = Policy { window: Window(window_ms), ..policy(Algorithm::TokenBucket, limit, 1) };
            let t0 = 1_000_000;
            for n in 1..=limit {
                let d = check_at(&limiter, "k", &p, 1, t0);
                prop_assert!(d.allowed);
                prop_assert_eq!(d.remaining, limit - n);
            }
            let denied = check_at(&limiter, "k", &p, 1, t0);
            prop_assert!(!denied.allowed);
            prop_assert_eq!(denied.retry_after_ms, window_ms.div_ceil(limit));
            prop_assert_eq!(denied.reset_ms, t0 + window_ms);
            let retry = denied.retry_after_ms;
            prop_assert!(!check_at(&limiter, "k", &p, 0, t0 + retry - 1).allowed);
            prop_assert!(check_at(&limiter, "k", &p, 1, t0 + retry).allowed);
        }

        /// A read (cost 0) changes nothing, in any algorithm: the decisions of the costed
        /// checks of a sequence are the same with the reads between them or without.
        #[test]
        fn reads_change_no_later_decision(
            algorithm in proptest::sample::select(Algorithm::ALL.to_vec()),
            steps in proptest::collection::vec((0u64..3000, 0u64..3), 1..100),
            limit in 1u64..6,
        ) {
            let (with_reads, without) = (Twin::default(), Twin::default());
            let p = policy(algorithm, limit, 5);
            let mut now = 1_000_000;
            for (step, cost) in steps {
                now += step;
                let cost = cost.min(limit);
                let d = check_at(&with_reads, "k", &p, cost, now);
                if cost > 0 {
                    prop_assert_eq!(d, check_at(&without, "k", &p, cost, now), "at {}", now);
                }
            }
        }

        /// `reset` is when the key is back to its full limit (API.md), and `retryAfter` when
        /// the request would be admitted, in every algorithm, also when each check names
        /// another limit (a changed limit applies to the same counter): a read at that ms
        /// finds the key full (admits the request), a read 1 ms before does not.
        #[test]
        fn reset_and_retry_are_when_they_say(
            algorithm in proptest::sample::select(Algorithm::ALL.to_vec()),
            steps in proptest::collection::vec((0u64..3000, 0u64..4, 1u64..8), 1..60),
            window_s in 1u64..6,
        ) {
            let mut state = initial(algorithm);
            let mut now = 1_000_000;
            for (step, cost, limit) in steps {
                now += step;
                let p = policy(algorithm, limit, window_s);
                let cost = cost.min(limit);
                let d = decide(&mut state, &p, cost, now);
                let read = |at: u64| decide(&mut state.clone(), &p, 0, at);
                prop_assert_eq!(read(d.reset_ms).remaining, limit, "full at reset ({:?})", d);
                if d.reset_ms > now {
                    prop_assert!(read(d.reset_ms - 1).remaining < limit, "not before ({:?})", d);
                }
                if !d.allowed {
                    let need = cost.max(1);
                    let fits = |at: u64| decide(&mut state.clone(), &p, need, at).allowed;
                    prop_assert!(fits(now + d.retry_after_ms), "admitted at retry ({:?})", d);
                    prop_assert!(!fits(now + d.retry_after_ms - 1), "not before ({:?})", d);
                }
            }
        }

        /// Reference model for GCRA: over any span, admitted <= limit + span * limit / window.
        #[test]
        fn token_bucket_admits_at_most_the_burst_plus_the_rate(
            steps in proptest::collection::vec(0u64..500, 1..300),
        ) {
            let limiter = Twin::default();
            let p = policy(Algorithm::TokenBucket, 5, 10);
            let start = 1_000_000;
            let mut now = start;
            let mut admitted = 0u64;
            for step in steps {
                now += step;
                if check_at(&limiter, "k", &p, 1, now).allowed {
                    admitted += 1;
                }
                prop_assert!(admitted <= 5 + (now - start) * 5 / 10_000 + 1);
            }
        }
    }
}
