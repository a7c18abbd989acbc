//! # quotad
//!
//! Decides in about a millisecond whether a caller may spend one more unit of a quota,
//! with Redis as the atomic counter store in front of Firestore, the system of record.
//!
//! # Layout
//!
//! - [`config`]: configuration from the environment and an optional TOML file.
//! - [`telemetry`]: tracing subscriber and the Prometheus recorder.
//! - [`http`]: routes, extractors and the problem+json error type. No business rules.
//! - [`domain`]: validated newtypes, the migration [`domain::Phase`], the
//!   [`domain::QuotaService`] that decides consumes and refunds, and the background
//!   writer that carries Redis changes into Firestore.
//! - [`storage`]: the two ports, [`storage::Counters`] (fast, atomic: Redis or memory) and
//!   [`storage::Ledger`] (durable: Firestore or memory), and their adapters.
//! - [`startup`]: `Application::build(config)` wires it all and serves until shutdown.
//! - [`cli`]: the operator commands (`sync --once`, `backfill`, `verify`, `phase`).

pub mod cli;
pub mod config;
pub mod domain;
pub mod http;
pub mod startup;
pub mod storage;
pub mod telemetry;
