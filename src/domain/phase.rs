//! The migration phase: where usage is decided and where it is written.

use std::fmt;

/// `firestore-only` → `dual-write` → `redis-primary`, and back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Firestore transactions decide; Redis is not used for quotas.
    FirestoreOnly,
    /// Redis decides; every change is also written to Firestore (background, retried).
    DualWrite,
    /// Redis decides and keeps usage; the batch sync brings Firestore up to date.
    RedisPrimary,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::FirestoreOnly, Phase::DualWrite, Phase::RedisPrimary];

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == raw)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::FirestoreOnly => "firestore-only",
            Phase::DualWrite => "dual-write",
            Phase::RedisPrimary => "redis-primary",
        }
    }

    /// Whether Redis decides quotas in this phase (while it is reachable).
    pub fn redis_decides(self) -> bool {
        self != Phase::FirestoreOnly
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for phase in Phase::ALL {
            assert_eq!(Phase::parse(phase.as_str()), Some(phase));
        }
        assert_eq!(Phase::parse("Dual-Write"), None);
    }
}
