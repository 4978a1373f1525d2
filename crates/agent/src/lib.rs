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

pub use keys::Keys;
pub use shell::{AgentOptions, JournalRecord, run};
