//! Decisions and orchestration. Talks only to the [`crate::storage`] ports; never names a
//! Redis or Firestore type.

pub mod handover;
pub mod ids;
pub mod limiter;
pub mod phase;
pub mod quota;
pub mod ratelimit;
pub mod schedule;
pub mod sync;
pub mod tools;
pub mod writer;

pub use ids::{Amount, IdempotencyKey, InvalidInput, ProviderId, QuotaValue};
pub use phase::Phase;
pub use quota::{Outcome, QuotaError, QuotaService, QuotaView, Source};
