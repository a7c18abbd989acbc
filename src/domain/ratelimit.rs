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
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        match raw {
            "sliding-window" => Ok(Self::SlidingWindow),
            "sliding-window-approx" => Ok(Self::SlidingWindowApprox),
            "fixed-window" => Ok(Self::FixedWindow),
            "token-bucket" => Ok(Self::TokenBucket),
            _ => Err(InvalidInput("algorithm")),
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
        let ms = match value {
            serde_json::Value::Number(n) => n.as_u64().and_then(|s| s.checked_mul(1000)),
            serde_json::Value::String(s) => parse_duration_ms(s),
            _ => None,
        };
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
    if number.is_empty() || number.len() > 12 {
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
    fn counter_id(&self) -> String {
        match &self.plan {
            Some(plan) => format!("plan:{plan}"),
            None => format!("{}:{}", self.algorithm.as_str(), self.window.ms()),
        }
    }
}

/// Plans by name, validated at start.
pub fn plans_from_config(
    plans: &BTreeMap<String, PlanConfig>,
) -> anyhow::Result<BTreeMap<String, Policy>> {
    plans
        .iter()
        .map(|(name, plan)| {
            let window = Window::from_toml(&plan.window)
                .map_err(|_| anyhow::anyhow!("plan {name}: invalid window {}", plan.window))?;
            let algorithm = Algorithm::parse(&plan.algorithm).map_err(|_| {
                anyhow::anyhow!("plan {name}: unknown algorithm {:?}", plan.algorithm)
            })?;
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
}

/// One recorded anomaly.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Anomaly {
    pub key: String,
    pub plan: String,
    pub count: u64,
    pub threshold: u64,
    pub at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone)]
enum State {
    /// Admitted (timestamp, cost), oldest first.
    Log(VecDeque<(u64, u64)>),
    /// Window start and count.
    Fixed { start: u64, count: u64 },
    /// Current window start, previous and current counts.
    Approx { start: u64, prev: u64, curr: u64 },
    /// GCRA theoretical arrival time.
    Gcra { tat: u64 },
}

#[derive(Default)]
struct Inner {
    counters: HashMap<(String, String), State>,
    attempts: HashMap<String, (u64, u64, bool)>,
    anomalies: VecDeque<Anomaly>,
}

/// In-process rate limiter with anomaly detection.
#[derive(Default)]
pub struct RateLimiter {
    inner: Mutex<Inner>,
}

fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

impl RateLimiter {
    /// Checks (and, when admitted with `cost > 0`, counts) one request at the current time.
    pub fn check(&self, key: &str, policy: &Policy, cost: u64) -> RateDecision {
        self.check_at(key, policy, cost, now_ms())
    }

    /// [`RateLimiter::check`] at a given time (tests step the clock).
    pub fn check_at(&self, key: &str, policy: &Policy, cost: u64, now: u64) -> RateDecision {
        let mut inner = self.inner.lock().unwrap();
        if let Some(plan) = &policy.plan {
            inner.count_attempt(key, plan, policy.limit, now);
        }
        let id = (key.to_owned(), policy.counter_id());
        let state = inner
            .counters
            .entry(id)
            .or_insert_with(|| initial(policy.algorithm, now));
        decide(state, policy, cost, now)
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

impl Inner {
    fn count_attempt(&mut self, key: &str, plan: &str, limit: u64, now: u64) {
        let entry = self
            .attempts
            .entry(format!("{plan}:{key}"))
            .or_insert((0, now, false));
        if now >= entry.1 + ANOMALY_SPAN_MS {
            *entry = (0, now, false);
        }
        entry.0 += 1;
        let threshold = 2 * limit;
        if entry.0 > threshold && !entry.2 {
            entry.2 = true;
            let anomaly = Anomaly {
                key: key.to_owned(),
                plan: plan.to_owned(),
                count: entry.0,
                threshold,
                at: chrono::Utc::now(),
            };
            tracing::warn!(key, plan, count = entry.0, threshold, "rate-limit anomaly");
            metrics::counter!("quotad_anomalies_total", "plan" => plan.to_owned()).increment(1);
            self.anomalies.push_front(anomaly);
            self.anomalies.truncate(ANOMALY_KEEP);
        }
    }
}

fn initial(algorithm: Algorithm, now: u64) -> State {
    match algorithm {
        Algorithm::SlidingWindow => State::Log(VecDeque::new()),
        Algorithm::FixedWindow => State::Fixed {
            start: now,
            count: 0,
        },
        Algorithm::SlidingWindowApprox => State::Approx {
            start: now,
            prev: 0,
            curr: 0,
        },
        Algorithm::TokenBucket => State::Gcra { tat: now },
    }
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
fn decide(state: &mut State, policy: &Policy, cost: u64, now: u64) -> RateDecision {
    let (limit, window) = (policy.limit, policy.window.ms());
    // A read (cost 0) answers whether a cost-1 request would be admitted.
    let need = cost.max(1);
    let out = |allowed: bool, remaining: u64, reset_ms: u64, retry: u64| RateDecision {
        allowed,
        limit,
        remaining,
        reset_ms: reset_ms.max(now),
        retry_after_ms: if allowed { 0 } else { retry.max(1) },
        now_ms: now,
    };
    match state {
        State::Log(log) => {
            while log.front().is_some_and(|(t, _)| t + window <= now) {
                log.pop_front();
            }
            let used: u64 = log.iter().map(|(_, c)| c).sum();
            let allowed = used + need <= limit;
            if allowed && cost > 0 {
                log.push_back((now, cost));
            }
            let used_after = if allowed { used + cost } else { used };
            let reset = log.back().map_or(now, |(t, _)| t + window);
            let mut retry = 0;
            if !allowed {
                let mut freed = 0;
                let excess = used + need - limit;
                for (t, c) in log.iter() {
                    freed += c;
                    if freed >= excess {
                        retry = t + window - now;
                        break;
                    }
                }
            }
            out(allowed, limit.saturating_sub(used_after), reset, retry)
        }
        State::Fixed { start, count } => {
            if now >= *start + window {
                *start = now - (now - *start) % window;
                *count = 0;
            }
            let allowed = *count + need <= limit;
            if allowed {
                *count += cost;
            }
            let end = *start + window;
            let reset = if *count == 0 { now } else { end };
            out(allowed, limit.saturating_sub(*count), reset, end - now)
        }
        State::Approx { start, prev, curr } => {
            if now >= *start + window {
                let windows = (now - *start) / window;
                *prev = if windows == 1 { *curr } else { 0 };
                *curr = 0;
                *start += windows * window;
            }
            let elapsed = now - *start;
            let weight = (window - elapsed) as f64 / window as f64;
            let estimate = (*prev as f64 * weight).floor() as u64 + *curr;
            let allowed = estimate + need <= limit;
            if allowed {
                *curr += cost;
            }
            let estimate_after = if allowed { estimate + cost } else { estimate };
            let reset = if *curr > 0 {
                *start + 2 * window
            } else if *prev > 0 {
                *start + window
            } else {
                now
            };
            let retry = if allowed {
                0
            } else if *curr + need <= limit && *prev > 0 {
                // prev * (window - e) / window + curr + need <= limit
                let room = (limit - *curr - need) as f64;
                let e = window as f64 - room * window as f64 / *prev as f64;
                (*start + e.ceil() as u64).saturating_sub(now)
            } else if need <= limit && *curr > 0 {
                let room = (limit - need) as f64;
                let e = (window as f64 - room * window as f64 / *curr as f64).max(0.0);
                (*start + window + e.ceil() as u64).saturating_sub(now)
            } else {
                *start + window - now
            };
            out(allowed, limit.saturating_sub(estimate_after), reset, retry)
        }
        State::Gcra { tat } => {
            let interval = window as f64 / limit as f64;
            let base = (*tat).max(now);
            let new_tat = base + (need as f64 * interval).ceil() as u64;
            let allow_at = new_tat.saturating_sub(window);
            let allowed = now >= allow_at;
            if allowed && cost > 0 {
                *tat = base + (cost as f64 * interval).ceil() as u64;
            }
            let level = (*tat).max(now);
            let remaining = ((now + window - level) as f64 / interval).floor() as u64;
            out(
                allowed,
                remaining.min(limit),
                level,
                allow_at.saturating_sub(now),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn policy(algorithm: Algorithm, limit: u64, window_s: u64) -> Policy {
        Policy {
            name: "custom".into(),
            limit,
            window: Window(window_s * 1000),
            algorithm,
            plan: None,
        }
    }

    const ALL: [Algorithm; 4] = [
        Algorithm::SlidingWindow,
        Algorithm::SlidingWindowApprox,
        Algorithm::FixedWindow,
        Algorithm::TokenBucket,
    ];

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
        for algorithm in ALL {
            let limiter = RateLimiter::default();
            let p = policy(algorithm, 3, 10);
            let t0 = 1_000_000;
            for i in 0..3 {
                assert!(
                    limiter.check_at("k", &p, 1, t0 + i).allowed,
                    "{algorithm:?} #{i}"
                );
            }
            let denied = limiter.check_at("k", &p, 1, t0 + 3);
            assert!(!denied.allowed, "{algorithm:?}");
            assert!(denied.retry_after_ms >= 1);
            let later = t0 + 3 + denied.retry_after_ms;
            assert!(
                limiter.check_at("k", &p, 1, later).allowed,
                "{algorithm:?} after retry-after"
            );
        }
    }

    #[test]
    fn anomalies_are_recorded_once_per_window() {
        let limiter = RateLimiter::default();
        let mut p = policy(Algorithm::SlidingWindow, 2, 60);
        p.plan = Some("tiny".into());
        for i in 0..10 {
            limiter.check_at("k", &p, 1, 1_000 + i);
        }
        let found = limiter.anomalies(50);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].count, found[0].threshold), (5, 4));
        limiter.check_at("k", &p, 1, 1_000 + ANOMALY_SPAN_MS);
        assert_eq!(limiter.anomalies(50).len(), 1);
    }

    proptest! {
        /// Reference model: never more than `limit` admitted in any window-long span.
        #[test]
        fn sliding_window_never_admits_more_than_the_limit_in_any_window(
            steps in proptest::collection::vec((0u64..4000, 0u64..4), 1..200),
            limit in 1u64..10,
        ) {
            let limiter = RateLimiter::default();
            let p = policy(Algorithm::SlidingWindow, limit, 5);
            let mut now = 1_000_000;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (step, cost) in steps {
                now += step;
                let cost = cost.min(limit);
                let d = limiter.check_at("k", &p, cost, now);
                if d.allowed && cost > 0 {
                    admitted.push((now, cost));
                }
                let in_window: u64 = admitted.iter().filter(|(t, _)| t + 5000 > now).map(|(_, c)| c).sum();
                prop_assert!(in_window <= limit);
                prop_assert_eq!(d.remaining, limit - in_window);
            }
        }

        /// Reference model for GCRA: over any span, admitted <= limit + span * limit / window.
        #[test]
        fn token_bucket_admits_at_most_the_burst_plus_the_rate(
            steps in proptest::collection::vec(0u64..500, 1..300),
        ) {
            let limiter = RateLimiter::default();
            let p = policy(Algorithm::TokenBucket, 5, 10);
            let start = 1_000_000;
            let mut now = start;
            let mut admitted = 0u64;
            for step in steps {
                now += step;
                if limiter.check_at("k", &p, 1, now).allowed {
                    admitted += 1;
                }
                prop_assert!(admitted <= 5 + (now - start) * 5 / 10_000 + 1);
            }
        }
    }
}
