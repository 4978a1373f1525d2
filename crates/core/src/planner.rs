//! The planner: `(definition, observed state, now) → plan`.
//!
//! Pure and deterministic: the same input gives the same plan, byte for byte
//! once rendered. It decides which node should own each group and in which
//! order the group's resources start and stop there; it never acts.
//!
//! Placement rules, in order (the first that applies decides):
//! 1. cluster or group maintenance, or an owner node in maintenance: frozen,
//!    the group stays exactly as it is (S2.3d);
//! 2. stopped by an operator: not placed;
//! 3. eligible nodes are the group's preferred nodes that are up, not where
//!    the group failed within `failover.within`, and, for a co-located group,
//!    the node its partner is placed on;
//! 4. an operator's move request to an eligible node wins;
//! 5. a current owner that is still eligible keeps the group, unless failback
//!    is `auto` and a more preferred node is eligible;
//! 6. after more than `failover.threshold` failures within `failover.within`
//!    the group is not restarted automatically;
//! 7. otherwise the most preferred eligible node.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Serialize;

use crate::graph::{Catalog, External};
use crate::observed::{NodeState, Observed};
use crate::spec::{ClusterSpec, Failback, GroupSpec, Role};
use crate::time::{HumanDuration, Time};

/// The plan for the whole cluster.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub now: Time,
    pub groups: Vec<GroupPlan>,
    /// Start waves of the clones (each node runs the clones eligible on it
    /// in this order, stopping them in reverse).
    pub clone_waves: Vec<Vec<String>>,
    /// Where each clone should run.
    pub clones: Vec<ClonePlacement>,
}

impl Plan {
    pub fn group(&self, name: &str) -> Option<&GroupPlan> {
        self.groups.iter().find(|g| g.group == name)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClonePlacement {
    pub resource: String,
    pub group: String,
    pub nodes: Vec<String>,
}

/// What should happen to a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Transition {
    /// Not running and not to be started.
    StayStopped,
    /// Running on `node` and stays there.
    Keep { node: String },
    /// Not running; start on `node`.
    Start { node: String },
    /// Running on `from`; stop there, then start on `to`.
    Move { from: String, to: String },
    /// Running on `node`; stop it.
    Stop { node: String },
}

/// Why a node cannot take a group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum Ineligible {
    Down,
    Standby,
    Maintenance,
    /// The group failed there recently.
    Failed {
        until: Time,
    },
    /// A co-located partner group is placed elsewhere (or nowhere).
    NotWithPartner {
        partner: String,
    },
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::Down => f.write_str("down"),
            Ineligible::Standby => f.write_str("in standby"),
            Ineligible::Maintenance => f.write_str("in maintenance"),
            Ineligible::Failed { until } => write!(f, "group failed there (avoided until {until})"),
            Ineligible::NotWithPartner { partner } => write!(f, "not where {partner} runs"),
        }
    }
}

/// Why the planner placed a group where it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// Cluster maintenance, group maintenance or the owner node's maintenance.
    Frozen {
        by: String,
    },
    StoppedByOperator,
    MovedByOperator,
    /// The owner is still eligible and keeps the group.
    Stay {
        failback: Failback,
    },
    /// Failback: a more preferred node is eligible again.
    Failback,
    /// The most preferred eligible node (the group was not running).
    Preferred,
    /// The owner can no longer run the group.
    Failover {
        from: String,
        why: Ineligible,
    },
    /// Too many failures in the window: no automatic restart.
    ThresholdReached {
        failures: u32,
        threshold: u32,
        within: String,
    },
    /// No node may run the group.
    NoEligibleNode {
        nodes: Vec<(String, Ineligible)>,
    },
    /// The definition is inconsistent (validation would have said so).
    Invalid {
        problem: String,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Frozen { by } => write!(f, "frozen: {by}"),
            Reason::StoppedByOperator => f.write_str("stopped by operator"),
            Reason::MovedByOperator => f.write_str("moved by operator"),
            Reason::Stay {
                failback: Failback::Manual,
            } => f.write_str("owner still eligible, failback is manual"),
            Reason::Stay {
                failback: Failback::Auto,
            } => f.write_str("owner is the most preferred eligible node"),
            Reason::Failback => f.write_str("failback to a more preferred node"),
            Reason::Preferred => f.write_str("most preferred eligible node"),
            Reason::Failover { from, why } => write!(f, "failover: {from} is {why}"),
            Reason::ThresholdReached {
                failures,
                threshold,
                within,
            } => write!(
                f,
                "{failures} failures within {within} exceed the failover threshold {threshold}; \
                 not restarted until cleared"
            ),
            Reason::NoEligibleNode { nodes } => {
                f.write_str("no eligible node")?;
                for (i, (n, why)) in nodes.iter().enumerate() {
                    f.write_str(if i == 0 { ": " } else { ", " })?;
                    write!(f, "{n} {why}")?;
                }
                Ok(())
            }
            Reason::Invalid { problem } => write!(f, "invalid definition: {problem}"),
        }
    }
}

/// The plan for one group.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroupPlan {
    pub group: String,
    /// Who runs it now.
    pub current: Option<String>,
    /// Who should run it.
    pub target: Option<String>,
    pub transition: Transition,
    pub reason: Reason,
    pub start_waves: Vec<Vec<String>>,
    pub stop_waves: Vec<Vec<String>>,
    pub monitor_only: Vec<String>,
    pub disabled: Vec<String>,
    pub external: Vec<External>,
}

/// Computes the plan. Never panics, whatever the input.
pub fn plan(spec: &ClusterSpec, observed: &Observed, now: Time) -> Plan {
    let catalog = Catalog::new(spec);
    let mut placed: HashMap<&str, Option<String>> = HashMap::with_capacity(spec.groups.len());
    let mut plans: BTreeMap<usize, GroupPlan> = BTreeMap::new();
    for gi in placement_order(spec) {
        let group = &spec.groups[gi];
        let (target, reason) = place(group, observed, now, &placed);
        placed.insert(group.name.as_str(), target.clone());
        plans.insert(gi, group_plan(&catalog, group, observed, target, reason));
    }
    let clone_waves = catalog.clone_waves().unwrap_or_default();
    let clones = spec
        .groups
        .iter()
        .flat_map(|g| {
            g.resources
                .iter()
                .filter(|r| r.enabled && r.role == Role::Clone)
                .map(move |r| ClonePlacement {
                    resource: r.name.clone(),
                    group: g.name.clone(),
                    nodes: g
                        .nodes
                        .iter()
                        .filter(|n| matches!(observed.node(n), NodeState::Up | NodeState::Maintenance))
                        .cloned()
                        .collect(),
                })
        })
        .collect();
    Plan {
        now,
        groups: plans.into_values().collect(),
        clone_waves,
        clones,
    }
}

/// Groups ordered so that co-location partners are placed first; groups in
/// a co-location cycle come last and are reported invalid by `place`.
fn placement_order(spec: &ClusterSpec) -> Vec<usize> {
    let index: HashMap<&str, usize> = spec
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| (g.name.as_str(), i))
        .collect();
    let deps: Vec<Vec<usize>> = spec
        .groups
        .iter()
        .map(|g| {
            g.colocate_with
                .iter()
                .filter_map(|p| index.get(p.as_str()).copied())
                .collect()
        })
        .collect();
    match crate::graph::layers(&deps) {
        Ok(layers) => layers.into_iter().flatten().collect(),
        Err(stuck) => {
            let mut order: Vec<usize> = (0..spec.groups.len()).filter(|i| !stuck.contains(i)).collect();
            // The acyclic part still needs its partners first.
            let sub: Vec<Vec<usize>> = order
                .iter()
                .map(|&i| {
                    deps[i]
                        .iter()
                        .filter_map(|d| order.iter().position(|o| o == d))
                        .collect()
                })
                .collect();
            if let Ok(layers) = crate::graph::layers(&sub) {
                order = layers.into_iter().flatten().map(|k| order[k]).collect();
            }
            order.extend(stuck);
            order
        }
    }
}

fn place(
    group: &GroupSpec,
    observed: &Observed,
    now: Time,
    placed: &HashMap<&str, Option<String>>,
) -> (Option<String>, Reason) {
    let state = observed.group(&group.name);
    let current = state.and_then(|s| s.owner.clone());

    // 1. Frozen.
    let frozen_by = if observed.maintenance {
        Some("cluster maintenance".to_string())
    } else if state.is_some_and(|s| s.maintenance) {
        Some("group maintenance".to_string())
    } else {
        current
            .as_deref()
            .filter(|o| observed.node(o) == NodeState::Maintenance)
            .map(|o| format!("{o} is in maintenance"))
    };
    if let Some(by) = frozen_by {
        return (current, Reason::Frozen { by });
    }

    // 2. Stopped by an operator.
    if state.is_some_and(|s| s.stopped) {
        return (None, Reason::StoppedByOperator);
    }

    // 3. Eligibility.
    let recent: Vec<_> = state
        .map(|s| {
            s.failures
                .iter()
                .filter(|f| now.since(f.at) < group.failover.within)
                .collect()
        })
        .unwrap_or_default();
    // Co-location: every partner must be placed, all on one node.
    let mut partner_node: Option<(&str, Option<&str>)> = None;
    for partner in &group.colocate_with {
        let Some(node) = placed.get(partner.as_str()) else {
            return (
                None,
                Reason::Invalid {
                    problem: format!("co-location with `{partner}` cannot be resolved"),
                },
            );
        };
        partner_node = match partner_node {
            None => Some((partner.as_str(), node.as_deref())),
            Some((_, earlier)) if earlier == node.as_deref() => partner_node,
            Some(_) => Some((partner.as_str(), None)),
        };
    }
    let why_not = |node: &str| -> Option<Ineligible> {
        match observed.node(node) {
            NodeState::Up => {}
            NodeState::Down => return Some(Ineligible::Down),
            NodeState::Standby => return Some(Ineligible::Standby),
            NodeState::Maintenance => return Some(Ineligible::Maintenance),
        }
        if let Some(last) = recent.iter().filter(|f| f.node == node).map(|f| f.at).max() {
            return Some(Ineligible::Failed {
                until: last + group.failover.within,
            });
        }
        if let Some((partner, at)) = partner_node
            && at != Some(node)
        {
            return Some(Ineligible::NotWithPartner {
                partner: partner.to_string(),
            });
        }
        None
    };
    let candidates: Vec<&String> = group.nodes.iter().filter(|n| why_not(n).is_none()).collect();
    let current_eligible = current
        .as_deref()
        .is_some_and(|c| group.nodes.iter().any(|n| n == c) && why_not(c).is_none());

    // 4. Operator move.
    if let Some(to) = state.and_then(|s| s.move_to.as_deref())
        && candidates.iter().any(|c| *c == to)
    {
        return (Some(to.to_string()), Reason::MovedByOperator);
    }

    // 5. Keep, or fail back.
    if current_eligible {
        let best = candidates.first().map(|s| s.as_str());
        if group.failback == Failback::Auto && best != current.as_deref() {
            return (best.map(str::to_string), Reason::Failback);
        }
        return (
            current,
            Reason::Stay {
                failback: group.failback,
            },
        );
    }

    // 6. Threshold.
    let failures = u32::try_from(recent.len()).unwrap_or(u32::MAX);
    if failures > group.failover.threshold {
        return (
            None,
            Reason::ThresholdReached {
                failures,
                threshold: group.failover.threshold,
                within: HumanDuration(group.failover.within).to_string(),
            },
        );
    }

    // 7. Most preferred eligible node.
    match candidates.first() {
        Some(best) => {
            let reason = match current {
                Some(from) => {
                    let why = if group.nodes.contains(&from) {
                        why_not(&from).unwrap_or(Ineligible::Down)
                    } else {
                        Ineligible::Down
                    };
                    Reason::Failover { from, why }
                }
                None => Reason::Preferred,
            };
            (Some((*best).clone()), reason)
        }
        None => (
            None,
            Reason::NoEligibleNode {
                nodes: group
                    .nodes
                    .iter()
                    .filter_map(|n| why_not(n).map(|w| (n.clone(), w)))
                    .collect(),
            },
        ),
    }
}

fn group_plan(
    catalog: &Catalog<'_>,
    group: &GroupSpec,
    observed: &Observed,
    target: Option<String>,
    reason: Reason,
) -> GroupPlan {
    let current = observed.group(&group.name).and_then(|s| s.owner.clone());
    let (target, reason, order) = match catalog.group_order(group) {
        Ok(order) => (target, reason, Some(order)),
        Err(stuck) => (
            None,
            Reason::Invalid {
                problem: format!("dependency cycle among {}", stuck.join(", ")),
            },
            None,
        ),
    };
    let transition = match (&current, &target) {
        (None, None) => Transition::StayStopped,
        (None, Some(to)) => Transition::Start { node: to.clone() },
        (Some(from), None) => Transition::Stop { node: from.clone() },
        (Some(from), Some(to)) if from == to => Transition::Keep { node: to.clone() },
        (Some(from), Some(to)) => Transition::Move {
            from: from.clone(),
            to: to.clone(),
        },
    };
    let order = order.unwrap_or_else(|| crate::graph::GroupOrder {
        start_waves: Vec::new(),
        stop_waves: Vec::new(),
        monitor_only: Vec::new(),
        clones: Vec::new(),
        disabled: Vec::new(),
        external: Vec::new(),
    });
    GroupPlan {
        group: group.name.clone(),
        current,
        target,
        transition,
        reason,
        start_waves: order.start_waves,
        stop_waves: order.stop_waves,
        monitor_only: order.monitor_only,
        disabled: order.disabled,
        external: order.external,
    }
}
