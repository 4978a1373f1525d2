//! Reading cluster definitions: TOML in, a checked `ClusterSpec` or
//! diagnostics out (`FILE:LINE:COL: error[CODE]: message` and a hint).
//!
//! Architecture invariant: this crate does no IO. Callers read files and pass
//! text; it depends on `understudy-core` for the types and nothing else of ours.

mod cluster;
pub mod diag;
mod reader;
mod state;

pub use cluster::{Checked, check};
pub use diag::{Diagnostic, Severity, Source};
pub use state::parse_state;
