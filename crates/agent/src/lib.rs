//! The agent's shell: runs `understudy_core::agent::Agent` against a real
//! coordinator and real drivers, with a fence guard process as a backstop.
//!
//! Architecture invariant: no decision is made here. Which resource starts,
//! when a group moves, when the node fences itself — all of that is the
//! core's. This crate turns actions into coordinator calls and driver
//! operations, and their results back into events.

pub mod clock;
pub mod guard;
pub mod instance;
pub mod keys;
pub mod local;
pub mod shell;
pub mod writer;

pub use keys::Keys;
pub use shell::{AgentOptions, JournalRecord, run};

/// `understudy sweep`: kills what earlier runs of this node's agent left in
/// its cgroups and process records, without a coordinator (systemd runs it
/// after the agent has stopped, crashed or not). Refused while an agent for
/// the node runs. Returns one line per cgroup or process group killed.
pub fn sweep(state_dir: &std::path::Path, node: &str) -> Result<Vec<String>, instance::Refused> {
    if !state_dir.exists() {
        return Ok(Vec::new());
    }
    let _lock = instance::lock(state_dir, node)?;
    let mut done = Vec::new();
    for (resource, pids, emptied) in understudy_drivers::cgroup::sweep(state_dir, None) {
        done.push(if emptied {
            format!("{resource}: killed {pids:?} left in its cgroup")
        } else {
            format!("{resource}: {pids:?} left in its cgroup survive SIGKILL")
        });
    }
    for (resource, pgid) in understudy_drivers::registry::kill_leftovers(state_dir) {
        done.push(format!("{resource}: killed process group {pgid}"));
    }
    Ok(done)
}
