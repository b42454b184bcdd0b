//! Time as the gateway reads and shows it: a [`Clock`] handle that the API state, the
//! enrollment store and the agent registry read "now" from (the system clock in a server,
//! a [`ManualClock`] in tests that step over an expiry instead of sleeping through it),
//! and the one RFC 3339 formatter every response and log line uses.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Where "now" comes from; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Clock(Source);

#[derive(Debug, Clone, Default)]
enum Source {
    #[default]
    System,
    Manual(Arc<Mutex<OffsetDateTime>>),
}

impl Clock {
    /// The system clock (UTC).
    pub fn system() -> Self {
        Self(Source::System)
    }

    pub fn now(&self) -> OffsetDateTime {
        match &self.0 {
            Source::System => OffsetDateTime::now_utc(),
            Source::Manual(t) => *lock(t),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn unix(&self) -> i64 {
        self.now().unix_timestamp()
    }
}

/// A clock that stands still until a test moves it; [`ManualClock::clock`] is the handle
/// to give to the code under test.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<OffsetDateTime>>);

impl ManualClock {
    pub fn new(start: OffsetDateTime) -> Self {
        Self(Arc::new(Mutex::new(start)))
    }

    /// Starts at the current system time.
    pub fn starting_now() -> Self {
        Self::new(OffsetDateTime::now_utc())
    }

    pub fn clock(&self) -> Clock {
        Clock(Source::Manual(self.0.clone()))
    }

    pub fn advance(&self, by: Duration) {
        *lock(&self.0) += by;
    }
}

fn lock(t: &Mutex<OffsetDateTime>) -> std::sync::MutexGuard<'_, OffsetDateTime> {
    // The guarded value is a plain copy type assigned in one step: a panic elsewhere
    // cannot leave it half-written.
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// The gateway's one way to show a point in time: RFC 3339 in UTC, e.g.
/// `2026-11-23T19:06:40Z`.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        // Only years outside 0..=9999 fail to format; show those in the `time` crate's
        // own notation rather than not at all.
        .unwrap_or_else(|_| t.to_string())
}

/// [`rfc3339`] for seconds since the Unix epoch (certificate validity, token expiry).
pub fn rfc3339_unix(secs: i64) -> String {
    match OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => rfc3339(t),
        Err(_) => secs.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_every_handle_sees_it() {
        let start = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let manual = ManualClock::new(start);
        let (a, b) = (manual.clock(), manual.clock());
        assert_eq!(a.now(), start);
        manual.advance(Duration::from_secs(90));
        assert_eq!(b.unix(), 1_800_000_090);
        assert_eq!(rfc3339(a.now()), "2027-01-15T08:01:30Z");
    }

    #[test]
    fn rfc3339_is_utc_with_a_z_and_out_of_range_seconds_stay_readable() {
        assert_eq!(rfc3339_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_unix(i64::MAX), i64::MAX.to_string());
    }
}
