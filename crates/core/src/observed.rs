//! What the cluster looks like right now, as the planner sees it.
//!
//! The agent builds an `Observed` from the coordinator (node registrations,
//! lease owners, recorded failures, operator requests); tests and
//! `understudy plan` build one from a state file or flags.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::ClusterSpec;
use crate::time::Time;

/// A node's state as far as placement is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Its agent is alive and it may run groups.
    Up,
    /// Its agent is not alive (or its registration expired).
    Down,
    /// Alive, but runs nothing: groups move away (drain).
    Standby,
    /// Alive, but frozen: nothing is started, stopped or moved on it.
    Maintenance,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Down => "down",
            NodeState::Standby => "standby",
            NodeState::Maintenance => "maintenance",
        }
    }
}

/// A failure of a group on a node that exhausted its restarts (or asked for
/// immediate failover).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Unique per failure (the node, the fencing token it held and a
    /// counter; see `Agent`): a retried append of the same failure counts
    /// once. Empty in records written before failures had ids.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub node: String,
    pub at: Time,
    pub resource: Option<String>,
}

/// A group's runtime state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GroupState {
    /// The node that holds the group's lease, if any.
    pub owner: Option<String>,
    /// Frozen by an operator (S2.3d): nothing is started, stopped or moved.
    pub maintenance: bool,
    /// Stopped by an operator: not placed anywhere until started again.
    pub stopped: bool,
    /// An operator asked to move the group to this node.
    pub move_to: Option<String>,
    /// Recorded failures, oldest first.
    pub failures: Vec<Failure>,
}

/// Everything the planner needs to know about the present.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Observed {
    /// Cluster-wide maintenance mode (S2.3d, F10).
    pub maintenance: bool,
    /// Node states; a node missing here counts as down.
    pub nodes: BTreeMap<String, NodeState>,
    /// Group states; a group missing here has no owner and no history.
    pub groups: BTreeMap<String, GroupState>,
}

impl Observed {
    /// Every node of `spec` up, no owners, no history.
    pub fn all_up(spec: &ClusterSpec) -> Observed {
        Observed {
            maintenance: false,
            nodes: spec.nodes.iter().map(|n| (n.name.clone(), NodeState::Up)).collect(),
            groups: BTreeMap::new(),
        }
    }

    pub fn node(&self, name: &str) -> NodeState {
        self.nodes.get(name).copied().unwrap_or(NodeState::Down)
    }

    pub fn group(&self, name: &str) -> Option<&GroupState> {
        self.groups.get(name)
    }

    pub fn group_mut(&mut self, name: &str) -> &mut GroupState {
        self.groups.entry(name.to_string()).or_default()
    }
}

impl Observed {
    /// What the planner sees in a coordinator view: registered nodes are up
    /// unless leaving (standby) or put in standby/maintenance by an operator;
    /// unregistered nodes are down.
    pub fn from_view(spec: &ClusterSpec, view: &crate::agent::ClusterView) -> Observed {
        let mut observed = Observed {
            maintenance: view.maintenance,
            ..Observed::default()
        };
        for n in &spec.nodes {
            let registered = view.nodes.get(&n.name);
            let state = node_state(
                registered.is_some(),
                registered.is_some_and(|r| r.leaving),
                view.node_admin.get(&n.name),
            );
            observed.nodes.insert(n.name.clone(), state);
        }
        for g in &spec.groups {
            let admin = view.group_admin.get(&g.name).cloned().unwrap_or_default();
            observed.groups.insert(
                g.name.clone(),
                GroupState {
                    owner: view.owners.get(&g.name).map(|o| o.node.clone()),
                    maintenance: admin.maintenance,
                    stopped: admin.stopped,
                    move_to: admin.move_to,
                    failures: view.failures.get(&g.name).cloned().unwrap_or_default(),
                },
            );
        }
        observed
    }
}

/// A node's state from its liveness, whether it is leaving, and operator settings.
pub fn node_state(alive: bool, leaving: bool, admin: Option<&crate::agent::NodeAdmin>) -> NodeState {
    if !alive {
        NodeState::Down
    } else if admin.is_some_and(|a| a.maintenance) {
        NodeState::Maintenance
    } else if leaving || admin.is_some_and(|a| a.standby) {
        NodeState::Standby
    } else {
        NodeState::Up
    }
}
