//! The few facts the drivers read from `/proc`: a process's start time (to
//! tell our process from a stranger that reuses its pid) and whether a
//! process group still has live members.

use std::fs;

/// The fields of `/proc/<pid>/stat` the drivers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Field 3: `R`, `S`, `D`, `Z`, …
    pub state: char,
    /// Field 5: the process group id.
    pub pgrp: i32,
    /// Field 22: start time in clock ticks since boot.
    pub start_time: u64,
}

impl Stat {
    /// A zombie (or a dead task on its way out) runs no code and holds no
    /// resources but its pid; it counts as gone.
    pub(crate) fn is_live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from its last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 of the file.
    let state = fields.first()?.chars().next()?;
    let pgrp = fields.get(5 - 3)?.parse().ok()?;
    let start_time = fields.get(22 - 3)?.parse().ok()?;
    Some(Stat {
        state,
        pgrp,
        start_time,
    })
}

/// The stat of a process, `None` when it does not exist (or cannot be read).
pub(crate) fn stat(pid: i32) -> Option<Stat> {
    if pid <= 0 {
        return None;
    }
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The start time of a process (field 22 of `/proc/<pid>/stat`).
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    stat(pid).map(|s| s.start_time)
}

/// Which of `pgids` still have a live (non-zombie) member. One pass over
/// `/proc`.
pub(crate) fn live_groups(pgids: &[i32]) -> Vec<i32> {
    let mut live = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return live;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(st) = stat(pid)
            && st.is_live()
            && pgids.contains(&st.pgrp)
            && !live.contains(&st.pgrp)
        {
            live.push(st.pgrp);
            if live.len() == pgids.len() {
                break;
            }
        }
    }
    live
}

/// Whether the process group `pgid` has a live (non-zombie) member.
pub(crate) fn group_is_live(pgid: i32) -> bool {
    !live_groups(&[pgid]).is_empty()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_name() {
        let text = "1234 (a b) (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let st = parse_stat(text).unwrap();
        assert_eq!(st.state, 'S');
        assert_eq!(st.pgrp, 1234);
        assert_eq!(st.start_time, 987654);
    }

    #[test]
    fn reads_own_stat() {
        let me = i32::try_from(std::process::id()).unwrap();
        let st = stat(me).unwrap();
        assert!(st.is_live());
        assert!(st.start_time > 0);
        assert_eq!(stat(-1), None);
    }
}
