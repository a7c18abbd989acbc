//! The batch sync's cron schedule, evaluated in UTC.

use std::str::FromStr;

use chrono::{DateTime, Utc};

/// A parsed 5-field cron expression, or one of the nicknames `@hourly`, `@daily`,
/// `@weekly`, `@monthly`, `@yearly` (`@annually`).
#[derive(Debug, Clone)]
pub struct Schedule(croner::Cron);

impl Schedule {
    pub fn parse(expression: &str) -> anyhow::Result<Self> {
        if !expression.trim_start().starts_with('@') && expression.split_whitespace().count() != 5 {
            anyhow::bail!("expected 5 fields: minute hour day-of-month month day-of-week (or @hourly, @daily, ...)");
        }
        let schedule = Self(croner::Cron::from_str(expression)?);
        if schedule.next_after(Utc::now()).is_none() {
            anyhow::bail!("it never fires");
        }
        Ok(schedule)
    }

    /// The first run strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.0.find_next_occurrence(&after, false).ok()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn the_default_runs_nightly_at_three_utc() {
        let schedule = Schedule::parse("0 3 * * *").unwrap();
        let now = Utc.with_ymd_and_hms(2026, 11, 25, 13, 0, 0).unwrap();
        assert_eq!(
            schedule.next_after(now),
            Some(Utc.with_ymd_and_hms(2026, 11, 26, 3, 0, 0).unwrap())
        );
        assert!(Schedule::parse("nightly").is_err());
        assert_eq!(
            Schedule::parse("@daily").unwrap().next_after(now),
            Some(Utc.with_ymd_and_hms(2026, 11, 26, 0, 0, 0).unwrap())
        );
        assert_eq!(
            Schedule::parse("@hourly").unwrap().next_after(now),
            Some(Utc.with_ymd_and_hms(2026, 11, 25, 14, 0, 0).unwrap())
        );
        assert!(Schedule::parse("@reboot").is_err());
        assert!(Schedule::parse("@daily 3").is_err());
        assert!(Schedule::parse("* * * * * *").is_err());
        assert!(Schedule::parse("0 0 30 2 *").is_err()); // never fires
    }
}
