//! Scheduled writes: when a write is due, and the clock arithmetic around it.
//!
//! A write may carry `delay_ms` (from its acceptance, on Redis's clock) or
//! `apply_at` (an RFC 3339 date, or milliseconds since the epoch). It is
//! accepted (durable) at once and kept in its shard's schedule (a sorted set by
//! due time, see `scripts::ENQUEUE`) until due, then moved into the shard's
//! stream under the id it was given, and applied like any other write. A key's
//! writes apply in order of due time, then of acceptance (a write without a
//! time is due when accepted).

use crate::problem::Problem;

/// How far in the past `apply_at` may be (client clocks differ): such a write
/// is applied at once. Further back is refused as a mistake.
pub const PAST_TOLERANCE_MS: u64 = 60_000;

/// How long before a scheduled write is due its shard's alarm key expires: the
/// expired-key event wakes a processor that waits out the rest (see
/// `processor::drain`), so the event's own lateness (Redis expires keys in a
/// sampling cycle, ten times a second by default) is absorbed.
pub const ALARM_LEAD_MS: u64 = 500;

/// A write's timing members: when it is due (`None`: when accepted) and how
/// long what it writes lives (`ttl_ms`: then it is deleted, unless a later
/// write changed it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// `delay_ms` or `apply_at`.
    pub due: Option<Due>,
    /// `ttl_ms`, counted from when the write is due.
    pub ttl_ms: Option<u64>,
}

impl Timing {
    /// Checks the times against the clock and the horizon (see [`Due::check`]);
    /// a record's expiry is a scheduled write too, so `ttl_ms` is held to the
    /// horizon as well.
    pub fn check(&self, now_ms: u64, horizon_ms: u64, pointer: &str) -> Result<(), Problem> {
        if let Some(due) = self.due {
            due.check(now_ms, horizon_ms, pointer)?;
        }
        match self.ttl_ms {
            Some(ttl) if ttl > horizon_ms => Err(Problem::invalid(
                &format!("ttl_ms is {ttl}; a record's expiry is scheduled at most {horizon_ms} ms ahead (schedule_horizon_secs)"),
                &format!("{pointer}/ttl_ms"),
            )),
            _ => Ok(()),
        }
    }
}

/// When a write is due, as the client asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// `delay_ms`: this long after acceptance.
    After(u64),
    /// `apply_at`: at this time (ms since the Unix epoch).
    At(u64),
}

impl Due {
    /// The argument `ENQUEUE` reads: `d<ms>` or `a<epoch ms>`.
    pub fn arg(&self) -> String {
        match self {
            Self::After(ms) => format!("d{ms}"),
            Self::At(ms) => format!("a{ms}"),
        }
    }

    /// Checks the time against the clock (`now_ms`, epoch ms) and the horizon
    /// (`horizon_ms` ahead at most); `pointer` is the write's JSON pointer.
    pub fn check(&self, now_ms: u64, horizon_ms: u64, pointer: &str) -> Result<(), Problem> {
        match *self {
            Self::After(ms) if ms > horizon_ms => Err(Problem::invalid(
                &format!("delay_ms is {ms}; writes are scheduled at most {horizon_ms} ms ahead (schedule_horizon_secs)"),
                &format!("{pointer}/delay_ms"),
            )),
            Self::At(at) if at.saturating_add(PAST_TOLERANCE_MS) < now_ms => Err(Problem::invalid(
                &format!("apply_at is {} ms in the past; at most {PAST_TOLERANCE_MS} ms is accepted (applied at once)", now_ms - at),
                &format!("{pointer}/apply_at"),
            )),
            Self::At(at) if at > now_ms.saturating_add(horizon_ms) => Err(Problem::invalid(
                &format!("apply_at is {} ms ahead; writes are scheduled at most {horizon_ms} ms ahead (schedule_horizon_secs)", at - now_ms),
                &format!("{pointer}/apply_at"),
            )),
            _ => Ok(()),
        }
    }
}

/// Days from 1970-01-01 to the given civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count from 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// An RFC 3339 date-time (`2026-12-03T17:00:00Z`, `…T17:00:00.250+01:00`; `t`,
/// `z` and a space for `T` allowed, as the RFC's note allows) as milliseconds
/// since the Unix epoch; `None` for anything else or a time before 1970.
/// Fractions finer than a millisecond are truncated; a leap second (`:60`) is
/// read as the next second's start.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        part.iter().all(u8::is_ascii_digit).then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (num(0, 4)?, num(5, 2)?, num(8, 2)?, num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let month_days = [31, if is_leap(y) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&mo) || d < 1 || d > month_days[(mo - 1) as usize] || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        for k in 0..3 {
            ms = ms * 10 + b.get(i + 1 + k).filter(|c| k < digits && c.is_ascii_digit()).map_or(0, |c| i64::from(c - b'0'));
        }
        i += 1 + digits;
    }
    let offset_min = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), ..] if b.len() == i + 6 && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            if *sign == b'+' { oh * 60 + om } else { -(oh * 60 + om) }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    u64::try_from(secs.checked_mul(1000)?.checked_add(ms)?).ok()
}

/// Milliseconds since the Unix epoch as an RFC 3339 date-time in UTC, with
/// milliseconds (`2026-12-03T17:00:00.250Z`).
pub fn format_rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem / 60 % 60, rem % 60, ms % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dates read as the RFC says, offsets applied, and round trip in UTC.
    #[test]
    fn rfc3339_dates() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-12-03T17:00:00Z"), Some(1_796_317_200_000));
        assert_eq!(parse_rfc3339("2026-12-03T18:00:00+01:00"), Some(1_796_317_200_000));
        assert_eq!(parse_rfc3339("2026-12-03t16:30:00.25-00:30"), Some(1_796_317_200_250));
        assert_eq!(parse_rfc3339("2026-12-03 17:00:00.123456789z"), Some(1_796_317_200_123));
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z"), Some(1_709_164_800_000), "a leap day");
        assert_eq!(format_rfc3339(1_796_317_200_250), "2026-12-03T17:00:00.250Z");
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000Z");
        for ms in [951_782_400_000u64, 1_709_164_800_999, 4_102_444_799_000] {
            assert_eq!(parse_rfc3339(&format_rfc3339(ms)), Some(ms));
        }
        for bad in [
            "", "2026-12-03", "2026-12-03T17:00:00", "2026-13-01T00:00:00Z", "2025-02-29T00:00:00Z", "2026-12-03T24:00:00Z",
            "2026-12-03T17:00:00.Z", "2026-12-03T17:00:00+0100", "2026-12-03T17:00:00+24:00", "1969-12-31T23:59:59Z",
            "2026-12-03T17:00:00Zjunk", "+2026-12-03T17:00:00Z", "2026-1a-03T17:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    /// A due time is refused too far ahead, or too far in the past, with the
    /// member at fault.
    #[test]
    fn due_times_are_bounded() {
        let now = 1_796_317_200_000;
        assert!(Due::After(0).check(now, 1000, "").is_ok());
        assert!(Due::After(1000).check(now, 1000, "").is_ok());
        assert_eq!(Due::After(1001).check(now, 1000, "/writes/2").unwrap_err().field.as_deref(), Some("/writes/2/delay_ms"));
        assert!(Due::At(now - PAST_TOLERANCE_MS).check(now, 1000, "").is_ok());
        assert_eq!(Due::At(now - PAST_TOLERANCE_MS - 1).check(now, 1000, "").unwrap_err().field.as_deref(), Some("/apply_at"));
        assert!(Due::At(now + 1000).check(now, 1000, "").is_ok());
        assert!(Due::At(now + 1001).check(now, 1000, "").is_err());
        assert_eq!((Due::After(5).arg(), Due::At(7).arg()), ("d5".to_owned(), "a7".to_owned()));
        let t = Timing { due: Some(Due::After(10)), ttl_ms: Some(1001) };
        assert_eq!(t.check(now, 1000, "").unwrap_err().field.as_deref(), Some("/ttl_ms"));
        assert!(Timing { ttl_ms: Some(1000), ..t }.check(now, 1000, "").is_ok());
    }
}
