//! What the checkers report, and the failure report printed for a seed.

use std::fmt;

/// A property the simulator found broken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two nodes have resources of one group alive at once.
    Safety { group: String, nodes: Vec<String> },
    /// A group resource started without the coordinator's owner key
    /// belonging to the node with the Start's token.
    Authority {
        node: String,
        resource: String,
        detail: String,
    },
    /// A resource started before its dependencies ran, or an orderly stop
    /// happened while something depending on it was alive.
    Order {
        node: String,
        resource: String,
        detail: String,
    },
    /// A write on behalf of a group landed without its writer owning the
    /// group, or a retried failure record counted twice.
    Fencing { group: String, detail: String },
    /// After healing and settling, a group is not where the planner says.
    Liveness { group: String, detail: String },
    /// An agent asked to be woken at the current instant over and over
    /// (a CPU-burning loop in the real shell).
    BusyLoop { node: String, detail: String },
    /// An agent asked to exit with resources still alive.
    ExitWithLiveResources { node: String, resources: Vec<String> },
    /// The run did not finish within its step budget.
    Runaway { steps: u64 },
}

impl Violation {
    /// A short name of the kind of violation.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::Safety { .. } => "safety",
            Violation::Authority { .. } => "authority",
            Violation::Order { .. } => "order",
            Violation::Fencing { .. } => "fencing",
            Violation::Liveness { .. } => "liveness",
            Violation::BusyLoop { .. } => "busy-loop",
            Violation::ExitWithLiveResources { .. } => "exit-with-live-resources",
            Violation::Runaway { .. } => "runaway",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Safety { group, nodes } => {
                write!(f, "SAFETY: group {group} has live resources on {}", nodes.join(" and "))
            }
            Violation::Authority { node, resource, detail } => {
                write!(f, "AUTHORITY: {resource} started on {node}: {detail}")
            }
            Violation::Order { node, resource, detail } => write!(f, "ORDER: {resource} on {node}: {detail}"),
            Violation::Fencing { group, detail } => write!(f, "FENCING: group {group}: {detail}"),
            Violation::Liveness { group, detail } => write!(f, "LIVENESS: group {group}: {detail}"),
            Violation::BusyLoop { node, detail } => write!(f, "BUSY LOOP on {node}: {detail}"),
            Violation::ExitWithLiveResources { node, resources } => {
                write!(f, "EXIT: {node} exited with {} alive", resources.join(", "))
            }
            Violation::Runaway { steps } => write!(f, "RUNAWAY: no end after {steps} steps"),
        }
    }
}

/// Everything needed to understand and replay a failing run.
#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    /// The command that replays it.
    pub replay: String,
    /// Virtual time of the violation (ms).
    pub at: u64,
    pub violation: Violation,
    pub shape: String,
    pub schedule: String,
    /// The last trace lines before the violation.
    pub trace: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seed {} failed at t={}ms: {}", self.seed, self.at, self.violation)?;
        writeln!(f, "replay: {}", self.replay)?;
        writeln!(f, "shape:\n{}", self.shape)?;
        writeln!(f, "faults:\n{}", self.schedule)?;
        writeln!(f, "last {} trace lines:", self.trace.len())?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}
