//! The stable human rendering of a plan (`understudy plan`).
//!
//! Golden scenario tests compare this text, so changes here show up as
//! reviewed diffs in `tests/scenarios/*/expected.txt`.

use std::fmt::Write;

use crate::planner::{Plan, Transition};

/// Renders `plan` as the lines `understudy plan` prints.
pub fn plan_text(plan: &Plan) -> String {
    let mut out = String::new();
    for g in &plan.groups {
        let head = match &g.transition {
            Transition::StayStopped => "stays stopped".to_string(),
            Transition::Keep { node } => format!("keep on {node}"),
            Transition::Start { node } => format!("start on {node}"),
            Transition::Move { from, to } => format!("move {from} -> {to}"),
            Transition::Stop { node } => format!("stop on {node}"),
        };
        let _ = writeln!(out, "group {}: {} ({})", g.group, head, g.reason);
        for note in &g.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        let start_on = g.target.as_deref().unwrap_or("unplaced");
        let stop_on = g.current.as_deref().or(g.target.as_deref()).unwrap_or("unplaced");
        for (i, wave) in g.start_waves.iter().enumerate() {
            let _ = writeln!(out, "  start wave {}: {} ({start_on})", i + 1, wave.join(", "));
        }
        for (i, wave) in g.stop_waves.iter().enumerate() {
            let _ = writeln!(out, "  stop wave {}: {} ({stop_on})", i + 1, wave.join(", "));
        }
        if !g.monitor_only.is_empty() {
            let _ = writeln!(out, "  monitor only: {} ({start_on})", g.monitor_only.join(", "));
        }
        if !g.disabled.is_empty() {
            let _ = writeln!(out, "  disabled: {}", g.disabled.join(", "));
        }
        for e in &g.external {
            let what = if e.clone { "clone instance" } else { "co-located" };
            let _ = writeln!(
                out,
                "  needs: {} before {} ({what}, group {})",
                e.needs, e.resource, e.group
            );
        }
    }
    if !plan.clones.is_empty() {
        for (i, wave) in plan.clone_waves.iter().enumerate() {
            let _ = writeln!(out, "clone wave {}: {}", i + 1, wave.join(", "));
        }
        for c in &plan.clones {
            let nodes = if c.nodes.is_empty() {
                "no node".to_string()
            } else {
                c.nodes.join(", ")
            };
            let _ = writeln!(out, "clone {}: on {nodes}", c.resource);
        }
    }
    out
}
