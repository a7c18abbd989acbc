//! Configuration: the environment variables of API.md, optionally preceded by a TOML file
//! (`QUOTAD_CONFIG`) that may set the same values as lower-case keys without the prefix,
//! and the rate-limit plans. The environment wins over the file.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::domain::Phase;

/// Everything the service reads at start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address, `host:port`.
    pub addr: String,
    /// Redis URL; `None` runs the embedded in-memory counters.
    pub redis_url: Option<String>,
    /// Firestore project; `None` runs the embedded in-memory ledger.
    pub firestore_project_id: Option<String>,
    /// Phase used when none is stored yet.
    pub initial_phase: Phase,
    /// Caller API keys; `None` (the variable unset) leaves the caller endpoints open.
    pub api_keys: Option<Vec<String>>,
    /// Admin bearer token; `None` disables the admin endpoints.
    pub admin_token: Option<String>,
    /// Limit of a provider whose document stores none.
    pub default_limit: i64,
    /// How long a clean cached record lives in Redis.
    pub cache_ttl: Duration,
    /// Cron expression (UTC) of the batch sync.
    pub sync_schedule: String,
    /// URL that receives each anomaly as a JSON POST.
    pub anomaly_webhook: Option<String>,
    /// Firestore collection of the provider documents.
    pub collection: String,
    /// Prefix of every Redis key this instance uses (tests give each app its own).
    pub redis_prefix: String,
    /// Rate-limit plans by name (built-ins plus the file's).
    pub plans: BTreeMap<String, PlanConfig>,
    /// How long a request head and body may take to arrive (no variable: the defaults;
    /// tests shorten them).
    pub deadlines: crate::http::serve::Deadlines,
}

/// One rate-limit plan as written in the file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub limit: u64,
    pub window: toml::Value,
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
}

fn default_algorithm() -> String {
    "sliding-window".to_owned()
}

/// The file's keys: the variables without `QUOTAD_`, lower case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    addr: Option<String>,
    redis_url: Option<String>,
    redis_host: Option<String>,
    redis_port: Option<u16>,
    firestore_project_id: Option<String>,
    phase: Option<String>,
    api_keys: Option<toml::Value>,
    admin_token: Option<String>,
    default_limit: Option<i64>,
    cache_ttl: Option<u64>,
    sync_schedule: Option<String>,
    anomaly_webhook: Option<String>,
    collection: Option<String>,
    #[serde(default)]
    plans: BTreeMap<String, PlanConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".to_owned(),
            redis_url: None,
            firestore_project_id: None,
            initial_phase: Phase::DualWrite,
            api_keys: None,
            admin_token: None,
            default_limit: 100,
            cache_ttl: Duration::from_secs(300),
            sync_schedule: "0 3 * * *".to_owned(),
            anomaly_webhook: None,
            collection: "providers".to_owned(),
            redis_prefix: "quotad:".to_owned(),
            plans: builtin_plans(),
            deadlines: crate::http::serve::Deadlines::default(),
        }
    }
}

fn builtin_plans() -> BTreeMap<String, PlanConfig> {
    let plan = |limit| PlanConfig {
        limit,
        window: toml::Value::String("1h".to_owned()),
        algorithm: default_algorithm(),
    };
    BTreeMap::from([
        ("starter".to_owned(), plan(50)),
        ("pro".to_owned(), plan(500)),
        ("business".to_owned(), plan(5000)),
    ])
}

/// Upper bound of `QUOTAD_DEFAULT_LIMIT` and of stored limits (API.md: 0..=10^12).
pub const MAX_QUOTA_VALUE: i64 = 1_000_000_000_000;

impl Config {
    /// Reads the process environment (and the file it names).
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds the configuration from any variable lookup (tests pass a map).
    pub fn from_lookup(env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let file = match var("QUOTAD_CONFIG") {
            Some(path) => {
                let text =
                    std::fs::read_to_string(&path).with_context(|| format!("reading QUOTAD_CONFIG file {path}"))?;
                toml::from_str::<FileConfig>(&text).with_context(|| format!("parsing QUOTAD_CONFIG file {path}"))?
            }
            None => FileConfig::default(),
        };
        let mut config = Config::default();

        if let Some(addr) = var("QUOTAD_ADDR").or(file.addr) {
            config.addr = addr;
        }
        // (port 0: any free port)
        match config.addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => bail!(
                "QUOTAD_ADDR: expected host:port (e.g. 127.0.0.1:8080), got {:?}",
                config.addr
            ),
        }
        let host_port = |host: Option<String>, port: Option<String>| {
            host.map(|h| format!("redis://{h}:{}/", port.as_deref().unwrap_or("6379")))
        };
        // REDIS_URL wins; then the legacy REDIS_HOST/REDIS_PORT (each from the environment
        // if set there, else from the file); then the file's redis_url and host/port.
        // REDIS_PORT is read (and checked) only when REDIS_URL is unset: Kubernetes sets
        // REDIS_PORT=tcp://... in every pod of a namespace with a Service named redis.
        let env_port = match var("REDIS_PORT").map(|p| p.trim().to_owned()) {
            Some(port) if var("REDIS_URL").is_none() && !port.parse::<u16>().is_ok_and(|p| p > 0) => {
                bail!("REDIS_PORT: not a port (1..=65535): {port:?}")
            }
            port => port,
        };
        let env_host_port = var("REDIS_HOST").is_some() || env_port.is_some();
        let file_port = file.redis_port.map(|p| p.to_string());
        config.redis_url = var("REDIS_URL")
            .or_else(|| {
                env_host_port.then(|| {
                    let host = var("REDIS_HOST")
                        .or(file.redis_host.clone())
                        .unwrap_or_else(|| "127.0.0.1".into());
                    host_port(Some(host), env_port.clone().or(file_port.clone()))
                })?
            })
            .or(file.redis_url)
            .or_else(|| host_port(file.redis_host, file_port));
        if let Some(url) = &config.redis_url {
            redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .with_context(|| format!("REDIS_URL (or REDIS_HOST/REDIS_PORT): not a Redis URL: {url:?}"))?;
        }
        config.firestore_project_id = var("FIRESTORE_PROJECT_ID").or(file.firestore_project_id);
        if let Some(phase) = var("QUOTAD_PHASE").or(file.phase) {
            config.initial_phase =
                Phase::parse(&phase).with_context(|| format!("QUOTAD_PHASE: unknown phase {phase:?}"))?;
        }
        let keys = match var("QUOTAD_API_KEYS") {
            Some(list) => Some(list),
            None => match file.api_keys {
                Some(toml::Value::String(list)) => Some(list),
                Some(toml::Value::Array(items)) => Some(
                    items
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                Some(_) => bail!("api_keys: expected a string or an array of strings"),
                None => None,
            },
        };
        // Set but holding no key (",") means no caller is let in, not an open service.
        config.api_keys = keys.map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect()
        });
        config.admin_token = var("QUOTAD_ADMIN_TOKEN").or(file.admin_token);
        if let Some(limit) = var("QUOTAD_DEFAULT_LIMIT") {
            config.default_limit = limit
                .trim()
                .parse()
                .with_context(|| format!("QUOTAD_DEFAULT_LIMIT: not an integer: {limit:?}"))?;
        } else if let Some(limit) = file.default_limit {
            config.default_limit = limit;
        }
        if !(0..=MAX_QUOTA_VALUE).contains(&config.default_limit) {
            bail!("QUOTAD_DEFAULT_LIMIT must be 0..=10^12");
        }
        if let Some(ttl) = var("QUOTAD_CACHE_TTL") {
            let secs: u64 = ttl
                .trim()
                .parse()
                .with_context(|| format!("QUOTAD_CACHE_TTL: not a whole number of seconds: {ttl:?}"))?;
            config.cache_ttl = Duration::from_secs(secs);
        } else if let Some(secs) = file.cache_ttl {
            config.cache_ttl = Duration::from_secs(secs);
        }
        if config.cache_ttl.is_zero() {
            bail!("QUOTAD_CACHE_TTL must be at least 1 second");
        }
        if let Some(schedule) = var("QUOTAD_SYNC_SCHEDULE").or(file.sync_schedule) {
            config.sync_schedule = schedule;
        }
        crate::domain::schedule::Schedule::parse(&config.sync_schedule)
            .with_context(|| format!("QUOTAD_SYNC_SCHEDULE: {:?}", config.sync_schedule))?;
        config.anomaly_webhook = var("QUOTAD_ANOMALY_WEBHOOK").or(file.anomaly_webhook);
        if let Some(url) = &config.anomaly_webhook {
            match reqwest::Url::parse(url) {
                Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.has_host() => {}
                _ => bail!("QUOTAD_ANOMALY_WEBHOOK: not an http(s) URL: {url:?}"),
            }
        }
        if let Some(collection) = var("QUOTAD_COLLECTION").or(file.collection) {
            config.collection = collection;
        }
        if !crate::domain::ids::is_firestore_id(&config.collection) {
            bail!(
                "QUOTAD_COLLECTION: not a Firestore collection id: {:?}",
                config.collection
            );
        }
        for (name, plan) in file.plans {
            // Plan names go into the RateLimit headers as structured-field strings.
            let printable = name
                .bytes()
                .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\');
            if name.is_empty() || name.len() > 128 || !printable {
                bail!("plans: a plan name is 1..=128 printable ASCII characters, without '\"' or '\\': {name:?}");
            }
            config.plans.insert(name, plan);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = from(&[]).unwrap();
        assert_eq!(config.addr, "127.0.0.1:8080");
        assert_eq!(config.default_limit, 100);
        assert_eq!(config.cache_ttl, Duration::from_secs(300));
        assert_eq!(config.initial_phase, Phase::DualWrite);
        assert_eq!(config.collection, "providers");
        assert!(config.redis_url.is_none() && config.firestore_project_id.is_none());
        assert_eq!(config.plans["starter"].limit, 50);
    }

    #[test]
    fn legacy_redis_host_and_port_build_a_url() {
        let config = from(&[("REDIS_HOST", "10.0.0.5"), ("REDIS_PORT", "6380")]).unwrap();
        assert_eq!(config.redis_url.as_deref(), Some("redis://10.0.0.5:6380/"));
        let config = from(&[("REDIS_URL", "redis://a:1/2"), ("REDIS_HOST", "b")]).unwrap();
        assert_eq!(config.redis_url.as_deref(), Some("redis://a:1/2"));
        let config = from(&[("REDIS_PORT", "7000")]).unwrap();
        assert_eq!(config.redis_url.as_deref(), Some("redis://127.0.0.1:7000/"));
    }

    #[test]
    fn the_environment_wins_over_the_file() {
        let dir = std::env::temp_dir().join(format!("quotad-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("quotad.toml");
        std::fs::write(
            &path,
            "default_limit = 7\ncache_ttl = 9\n[plans.tiny]\nlimit = 3\nwindow = \"10s\"\n",
        )
        .unwrap();
        let path = path.to_str().unwrap();
        let config = from(&[("QUOTAD_CONFIG", path)]).unwrap();
        assert_eq!((config.default_limit, config.cache_ttl.as_secs()), (7, 9));
        assert_eq!(config.plans["tiny"].limit, 3);
        assert!(config.plans.contains_key("pro"));
        let config = from(&[("QUOTAD_CONFIG", path), ("QUOTAD_DEFAULT_LIMIT", "9")]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(config.default_limit, 9);
    }

    #[test]
    fn bad_values_are_refused_at_start() {
        assert!(from(&[("QUOTAD_DEFAULT_LIMIT", "-1")]).is_err());
        assert!(from(&[("QUOTAD_DEFAULT_LIMIT", "many")]).is_err());
        assert!(from(&[("QUOTAD_PHASE", "sideways")]).is_err());
        assert!(from(&[("QUOTAD_CACHE_TTL", "0")]).is_err());
        assert!(from(&[("QUOTAD_SYNC_SCHEDULE", "every day")]).is_err());
        // Each message names the variable to fix.
        for (vars, names) in [
            (&[("QUOTAD_SYNC_SCHEDULE", "0 0 30 2 *")][..], "QUOTAD_SYNC_SCHEDULE"),
            (&[("QUOTAD_ADDR", "bogus")][..], "QUOTAD_ADDR"),
            (&[("QUOTAD_ADDR", "127.0.0.1:0x50")][..], "QUOTAD_ADDR"),
            (&[("REDIS_HOST", "127.0.0.1"), ("REDIS_PORT", "abc")][..], "REDIS_PORT"),
            (&[("REDIS_PORT", "70000")][..], "REDIS_PORT"),
            (&[("REDIS_URL", "http://127.0.0.1:6379")][..], "REDIS_URL"),
            (&[("QUOTAD_ANOMALY_WEBHOOK", "not a url")][..], "QUOTAD_ANOMALY_WEBHOOK"),
            (
                &[("QUOTAD_ANOMALY_WEBHOOK", "ftp://example.com/x")][..],
                "QUOTAD_ANOMALY_WEBHOOK",
            ),
            (&[("QUOTAD_COLLECTION", "a/b")][..], "QUOTAD_COLLECTION"),
            (&[("QUOTAD_COLLECTION", "__x__")][..], "QUOTAD_COLLECTION"),
            (&[("QUOTAD_COLLECTION", "..")][..], "QUOTAD_COLLECTION"),
        ] {
            let message = format!("{:#}", from(vars).unwrap_err());
            assert!(message.contains(names), "{vars:?}: {message}");
        }
        // REDIS_URL wins: a REDIS_PORT it makes unused is not read (Kubernetes service links)
        let linked = from(&[("REDIS_URL", "redis://a:1/2"), ("REDIS_PORT", "tcp://10.0.0.9:6379")]);
        assert_eq!(linked.unwrap().redis_url.as_deref(), Some("redis://a:1/2"));
        assert!(from(&[("QUOTAD_ADDR", "127.0.0.1:0")]).is_ok()); // any free port
        let fine = from(&[
            ("QUOTAD_ADDR", "localhost:9000"),
            ("QUOTAD_ANOMALY_WEBHOOK", "https://hooks.example.com/quotad"),
            ("QUOTAD_COLLECTION", "providers_v2"),
            ("REDIS_HOST", "redis.internal"),
            ("REDIS_PORT", " 6380"),
        ]);
        assert_eq!(fine.unwrap().redis_url.as_deref(), Some("redis://redis.internal:6380/"));
    }

    #[test]
    fn plan_names_fit_a_structured_field_string() {
        for name in ["a\\\"b", "été", "a\\\\b", ""] {
            let file = format!("[plans.\"{name}\"]\nlimit = 3\nwindow = \"10s\"\n");
            let dir = std::env::temp_dir().join(format!("quotad-config-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("quotad.toml");
            std::fs::write(&path, file).unwrap();
            let result = from(&[("QUOTAD_CONFIG", path.to_str().unwrap())]);
            std::fs::remove_dir_all(&dir).unwrap();
            let message = format!("{:#}", result.unwrap_err());
            assert!(message.contains("plan name"), "{name:?}: {message}");
        }
    }

    #[test]
    fn api_keys_are_a_comma_separated_list() {
        let config = from(&[("QUOTAD_API_KEYS", "k1, k2,,")]).unwrap();
        assert_eq!(config.api_keys, Some(vec!["k1".to_owned(), "k2".to_owned()]));
        assert_eq!(from(&[("QUOTAD_API_KEYS", ",")]).unwrap().api_keys, Some(vec![]));
        assert_eq!(from(&[]).unwrap().api_keys, None);
    }
}
