//! The pure core of understudy.
//!
//! Architecture invariant: nothing in this crate does IO, reads a clock,
//! spawns a thread or draws a random number. Time and observations come in
//! as values; decisions go out as data. That is what lets the planner be
//! golden-tested and the agent's logic be driven by a deterministic simulator.

pub mod agent;
pub mod graph;
pub mod observed;
pub mod planner;
pub mod render;
pub mod spec;
pub mod testkit;
pub mod time;

pub use observed::{NodeState, Observed};
pub use planner::{Plan, plan};
pub use spec::ClusterSpec;
pub use time::Time;
