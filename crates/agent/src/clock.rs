//! The two clocks the core is told about.

use std::time::{SystemTime, UNIX_EPOCH};

use nix::time::{ClockId, clock_gettime};
use understudy_core::Time;
use understudy_core::agent::Now;

/// Milliseconds of CLOCK_MONOTONIC: shared by every process on the host
/// (the agent and its fence guard compare deadlines on it), unaffected by
/// wall-clock changes, and it keeps counting while a process is stopped.
pub fn mono() -> Time {
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            Time(u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000 + u64::try_from(ts.tv_nsec()).unwrap_or(0) / 1_000_000)
        }
        // CLOCK_MONOTONIC cannot fail on Linux; if it ever did, time stands
        // still, which only delays timers — deadlines are never extended by it.
        Err(_) => Time(0),
    }
}

/// Milliseconds since the Unix epoch.
pub fn wall() -> Time {
    Time(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
    )
}

pub fn now() -> Now {
    Now {
        mono: mono(),
        wall: wall(),
    }
}
