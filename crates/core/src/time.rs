//! Time as a value. The core never reads a clock: callers pass `Time` in.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

use serde::Serialize;

/// A point in time, in milliseconds since an epoch chosen by the caller
/// (the agent's monotonic start, the coordinator's clock, or the simulator's
/// virtual zero). Only differences between `Time`s from one source mean anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Time(pub u64);

impl Time {
    pub const ZERO: Time = Time(0);

    pub fn from_millis(ms: u64) -> Time {
        Time(ms)
    }

    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// `self - earlier`, or zero when `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(self.0.saturating_add(millis(d)))
    }
}

impl Sub<Duration> for Time {
    type Output = Time;
    fn sub(self, d: Duration) -> Time {
        Time(self.0.saturating_sub(millis(d)))
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t+{}", HumanDuration(Duration::from_millis(self.0)))
    }
}

/// A duration's milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Formats a duration the way the definition format writes it: `500ms`,
/// `2s`, `1m30s`, `1h`.
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = millis(self.0);
        if ms == 0 {
            return f.write_str("0s");
        }
        let units: [(u64, &str); 5] = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
            (1, "ms"),
        ];
        let mut rest = ms;
        for (size, unit) in units {
            if rest >= size {
                write!(f, "{}{}", rest / size, unit)?;
                rest %= size;
            }
        }
        Ok(())
    }
}

/// Parses `500ms`, `2s`, `1m30s`, `1h`, `1d` (units: ms, s, m, h, d; no
/// spaces, no fractions).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const UNITS: &str = "use a whole number followed by ms, s, m, h or d, e.g. `500ms`, `2s`, `1m30s`";
    if text.is_empty() {
        return Err(format!("empty duration ({UNITS})"));
    }
    if text.contains(char::is_whitespace) {
        return Err(format!(
            "`{text}` contains a space; write the number and unit together, e.g. `30s`"
        ));
    }
    let bytes = text.as_bytes();
    let mut total: u64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(format!("expected a number at `{}` ({UNITS})", &text[start..]));
        }
        if bytes.get(i) == Some(&b'.') {
            return Err(format!(
                "`{text}` has a fraction; use a smaller unit instead, e.g. `1500ms` for 1.5s"
            ));
        }
        let value: u64 = text[start..i]
            .parse()
            .map_err(|_| format!("number too large in `{text}`"))?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let factor = match &text[unit_start..i] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("`{text}` has a number without a unit ({UNITS})")),
            other => return Err(format!("unknown unit `{other}` in `{text}` ({UNITS})")),
        };
        total = value
            .checked_mul(factor)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("duration `{text}` is too large"))?;
    }
    Ok(Duration::from_millis(total))
}

/// Serialises durations as human strings (`"2s"`) in JSON output.
pub mod serde_duration {
    use std::time::Duration;

    use serde::Serializer;

    use super::HumanDuration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&HumanDuration(*d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_round_trip() {
        for (text, ms) in [
            ("500ms", 500),
            ("2s", 2_000),
            ("1m30s", 90_000),
            ("1h", 3_600_000),
            ("1d2h", 93_600_000),
        ] {
            let d = parse_duration(text).unwrap();
            assert_eq!(millis(d), ms, "{text}");
            assert_eq!(HumanDuration(d).to_string(), text);
        }
    }

    #[test]
    fn rejects_bad_durations() {
        for bad in ["", "5", "5 seconds", "s", "1.5s", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn time_arithmetic_saturates() {
        assert_eq!(Time(5) - Duration::from_millis(10), Time(0));
        assert_eq!(Time(5).since(Time(10)), Duration::ZERO);
        assert_eq!(Time(10).since(Time(5)), Duration::from_millis(5));
    }
}
