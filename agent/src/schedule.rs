//! Maintenance windows in a site's time zone (crossing midnight allowed) and poll jitter.

use std::fmt;
use std::time::Duration;

use jiff::civil::Time;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};
use rand::Rng;

/// A daily window `HH:MM-HH:MM` in an IANA time zone. When the end is not
/// after the start the window crosses midnight (22:00-02:00).
#[derive(Clone, Debug, PartialEq)]
pub struct MaintenanceWindow {
    start: Time,
    end: Time,
    tz: TimeZone,
    tz_name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WindowError {
    #[error(
        "{0:?} is not HH:MM-HH:MM (for example \"02:00-04:00\", or \"22:00-02:00\" to cross midnight)"
    )]
    Format(String),
    #[error("{0:?} has the same start and end; a window must last at least one minute")]
    Empty(String),
    #[error("{0:?} is not an IANA time zone name (for example \"UTC\" or \"America/Chicago\")")]
    TimeZone(String),
}

fn parse_hhmm(s: &str) -> Option<Time> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: i8 = h.parse().ok()?;
    let m: i8 = m.parse().ok()?;
    if !(0..24).contains(&h) || !(0..60).contains(&m) {
        return None;
    }
    Time::new(h, m, 0, 0).ok()
}

impl MaintenanceWindow {
    pub fn parse(window: &str, tz_name: &str) -> Result<Self, WindowError> {
        let (a, b) = window
            .split_once('-')
            .ok_or_else(|| WindowError::Format(window.to_owned()))?;
        let start = parse_hhmm(a.trim()).ok_or_else(|| WindowError::Format(window.to_owned()))?;
        let end = parse_hhmm(b.trim()).ok_or_else(|| WindowError::Format(window.to_owned()))?;
        if start == end {
            return Err(WindowError::Empty(window.to_owned()));
        }
        let tz = TimeZone::get(tz_name).map_err(|_| WindowError::TimeZone(tz_name.to_owned()))?;
        Ok(Self {
            start,
            end,
            tz,
            tz_name: tz_name.to_owned(),
        })
    }

    pub fn crosses_midnight(&self) -> bool {
        self.end < self.start
    }

    pub fn time_zone(&self) -> &str {
        &self.tz_name
    }

    /// Whether the window is open at `now` (start inclusive, end exclusive),
    /// judged by the wall clock of the window's time zone.
    pub fn is_open(&self, now: Timestamp) -> bool {
        let local = now.to_zoned(self.tz.clone()).time();
        if self.crosses_midnight() {
            local >= self.start || local < self.end
        } else {
            local >= self.start && local < self.end
        }
    }

    /// The next instant the window opens strictly after `now`. On a day when the
    /// start time does not exist (a DST gap) the window opens at the first
    /// instant after the gap.
    pub fn next_start(&self, now: Timestamp) -> Zoned {
        let local = now.to_zoned(self.tz.clone());
        let mut date = local.date();
        // Today, tomorrow or (around DST changes) the day after holds the next start.
        for _ in 0..3 {
            if let Ok(candidate) = date.to_datetime(self.start).to_zoned(self.tz.clone())
                && candidate.timestamp() > now
            {
                return candidate;
            }
            date = match date.checked_add(1.day()) {
                Ok(d) => d,
                Err(_) => break,
            };
        }
        // Out of the representable range: only at the end of time.
        local
    }

    /// Zero while the window is open, else the wait until it next opens.
    pub fn time_until_open(&self, now: Timestamp) -> Duration {
        if self.is_open(now) {
            return Duration::ZERO;
        }
        let next = self.next_start(now).timestamp();
        let secs = next.as_second().saturating_sub(now.as_second()).max(0) as u64;
        Duration::from_secs(secs)
    }
}

impl fmt::Display for MaintenanceWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start.hour(),
            self.start.minute(),
            self.end.hour(),
            self.end.minute()
        )
    }
}

/// `base` moved by a random amount of at most `fraction` of itself either
/// way, so that a fleet of boxes does not poll in lock step.
pub fn jitter(base: Duration, fraction: f64) -> Duration {
    let fraction = fraction.clamp(0.0, 1.0);
    if fraction == 0.0 || base.is_zero() {
        return base;
    }
    let factor = rand::thread_rng().gen_range((1.0 - fraction)..=(1.0 + fraction));
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp literal")
    }

    #[test]
    fn plain_window() {
        let w = MaintenanceWindow::parse("02:00-04:00", "UTC").expect("valid");
        assert!(!w.is_open(ts("2026-03-01T01:59:59Z")));
        assert!(w.is_open(ts("2026-03-01T02:00:00Z")), "start is inclusive");
        assert!(w.is_open(ts("2026-03-01T03:59:59Z")));
        assert!(!w.is_open(ts("2026-03-01T04:00:00Z")), "end is exclusive");
        assert_eq!(
            w.next_start(ts("2026-03-01T05:00:00Z")).timestamp(),
            ts("2026-03-02T02:00:00Z")
        );
        assert_eq!(
            w.time_until_open(ts("2026-03-01T01:00:00Z")),
            Duration::from_secs(3600)
        );
        assert_eq!(
            w.time_until_open(ts("2026-03-01T03:00:00Z")),
            Duration::ZERO
        );
    }

    #[test]
    fn window_crossing_midnight() {
        let w = MaintenanceWindow::parse("22:00-02:00", "UTC").expect("valid");
        assert!(w.crosses_midnight());
        assert!(w.is_open(ts("2026-03-01T23:30:00Z")));
        assert!(w.is_open(ts("2026-03-02T01:59:00Z")));
        assert!(!w.is_open(ts("2026-03-02T02:00:00Z")));
        assert!(!w.is_open(ts("2026-03-02T21:59:00Z")));
        assert_eq!(
            w.next_start(ts("2026-03-02T01:00:00Z")).timestamp(),
            ts("2026-03-02T22:00:00Z")
        );
    }

    #[test]
    fn window_in_a_time_zone_with_dst() {
        // 02:00-04:00 in Chicago is 08:00-10:00 UTC in winter (CST) and 07:00-09:00 in summer (CDT).
        let w = MaintenanceWindow::parse("02:00-04:00", "America/Chicago").expect("valid");
        assert!(w.is_open(ts("2026-01-15T08:30:00Z")));
        assert!(!w.is_open(ts("2026-01-15T07:30:00Z")));
        assert!(w.is_open(ts("2026-07-15T07:30:00Z")));
        // 2026-03-08: 02:00 does not exist in Chicago; the window opens at 03:00 CDT = 08:00 UTC.
        let next = w.next_start(ts("2026-03-08T06:00:00Z"));
        assert_eq!(next.timestamp(), ts("2026-03-08T08:00:00Z"), "got {next}");
    }

    #[test]
    fn bad_windows_say_what_is_wrong() {
        for bad in [
            "2-4",
            "02:00",
            "24:00-01:00",
            "02:60-03:00",
            "aa:bb-cc:dd",
            "02:00-04:00-05:00",
        ] {
            let err = MaintenanceWindow::parse(bad, "UTC").expect_err(bad);
            assert!(err.to_string().contains("HH:MM-HH:MM"), "{bad}: {err}");
        }
        assert_eq!(
            MaintenanceWindow::parse("03:00-03:00", "UTC"),
            Err(WindowError::Empty("03:00-03:00".into()))
        );
        assert_eq!(
            MaintenanceWindow::parse("03:00-04:00", "Mars/Olympus"),
            Err(WindowError::TimeZone("Mars/Olympus".into()))
        );
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let base = Duration::from_secs(60);
        for _ in 0..1000 {
            let j = jitter(base, 0.1);
            assert!(
                j >= Duration::from_secs(54) && j <= Duration::from_secs(66),
                "got {j:?}"
            );
        }
        assert_eq!(jitter(base, 0.0), base);
    }
}
