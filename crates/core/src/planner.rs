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
//!    the group failed within `failover.within`, that run every clone the
//!    group depends on, and, for a co-located group, the node its partner is
//!    placed on; a group that others follow is placed only where those
//!    followers can run too, so co-located groups move together (S1.1);
//! 4. an operator's move request to an eligible node wins;
//! 5. a current owner that is still eligible keeps the group, unless failback
//!    is `auto` and a more preferred node is eligible;
//! 6. after more than `failover.threshold` failures within `failover.within`
//!    the group is not restarted automatically;
//! 7. otherwise the most preferred eligible node.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Serialize;

use crate::graph::{Catalog, External, GroupOrder};
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
    /// Not in the group's `nodes` list.
    NotInGroup,
    /// The group failed there recently.
    Failed {
        until: Time,
    },
    /// A co-located partner group is placed elsewhere.
    NotWithPartner {
        partner: String,
    },
    /// A clone the group depends on does not run there.
    NoClone {
        clone: String,
    },
    /// A group co-located with this one cannot run there.
    Follower {
        group: String,
        because: Box<Ineligible>,
    },
}

impl fmt::Display for Ineligible {
    /// A predicate: "node1 {is down}".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::Down => f.write_str("is down"),
            Ineligible::Standby => f.write_str("is in standby"),
            Ineligible::Maintenance => f.write_str("is in maintenance"),
            Ineligible::NotInGroup => f.write_str("is not in the group's node list"),
            Ineligible::Failed { until } => write!(f, "had a failure of the group (avoided until {until})"),
            Ineligible::NotWithPartner { partner } => write!(f, "does not run co-located group {partner}"),
            Ineligible::NoClone { clone } => write!(f, "does not run clone {clone}"),
            Ineligible::Follower { group, because } => write!(f, "cannot run co-located group {group}: it {because}"),
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
    /// The group has only clones (or nothing enabled): no owner is needed.
    NothingToRun,
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
    /// A co-located partner group is not placed, so neither is this one.
    PartnerNotPlaced {
        partner: String,
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
            Reason::NothingToRun => f.write_str("nothing to run on an owner: only clones"),
            Reason::MovedByOperator => f.write_str("moved by operator"),
            Reason::Stay {
                failback: Failback::Manual,
            } => f.write_str("owner still eligible, failback is manual"),
            Reason::Stay {
                failback: Failback::Auto,
            } => f.write_str("owner is the most preferred eligible node"),
            Reason::Failback => f.write_str("failback to a more preferred node"),
            Reason::Preferred => f.write_str("most preferred eligible node"),
            Reason::Failover { from, why } => write!(f, "failover: {from} {why}"),
            Reason::ThresholdReached {
                failures,
                threshold,
                within,
            } => write!(
                f,
                "{failures} failures within {within} exceed the failover threshold {threshold}; \
                 not restarted until failures age out of that window or an operator clears them"
            ),
            Reason::PartnerNotPlaced { partner } => write!(f, "co-located group {partner} is not placed"),
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
    /// Things the operator should know: skipped nodes, ignored requests.
    pub notes: Vec<String>,
    pub start_waves: Vec<Vec<String>>,
    pub stop_waves: Vec<Vec<String>>,
    pub monitor_only: Vec<String>,
    pub disabled: Vec<String>,
    pub external: Vec<External>,
}

/// Computes the plan. Never panics, whatever the input.
pub fn plan(spec: &ClusterSpec, observed: &Observed, now: Time) -> Plan {
    let catalog = Catalog::new(spec);
    let clones = clone_placements(spec, observed);
    let world = World {
        spec,
        observed,
        now,
        orders: spec.groups.iter().map(|g| catalog.group_order(g)).collect(),
        clone_nodes: clones
            .iter()
            .map(|c| (c.resource.as_str(), c.nodes.as_slice()))
            .collect(),
        followers: followers(spec),
    };
    let mut placed: HashMap<&str, Option<String>> = HashMap::with_capacity(spec.groups.len());
    let mut plans: BTreeMap<usize, GroupPlan> = BTreeMap::new();
    for gi in placement_order(spec) {
        let group = &spec.groups[gi];
        let placement = match &world.orders[gi] {
            Ok(order) => world.place(gi, order, &placed),
            Err(stuck) => Placement::none(Reason::Invalid {
                problem: format!("dependency cycle among {}", stuck.join(", ")),
            }),
        };
        placed.insert(group.name.as_str(), placement.target.clone());
        plans.insert(
            gi,
            group_plan(group, observed, placement, world.orders[gi].clone().ok()),
        );
    }
    Plan {
        now,
        groups: plans.into_values().collect(),
        clone_waves: catalog.clone_waves().unwrap_or_default(),
        clones,
    }
}

/// Clones run on every node of their group that is up (or frozen in
/// maintenance), unless an operator stopped the group.
fn clone_placements(spec: &ClusterSpec, observed: &Observed) -> Vec<ClonePlacement> {
    spec.groups
        .iter()
        .flat_map(|g| {
            let stopped = observed.group(&g.name).is_some_and(|s| s.stopped);
            g.resources
                .iter()
                .filter(|r| r.enabled && r.role == Role::Clone)
                .map(move |r| ClonePlacement {
                    resource: r.name.clone(),
                    group: g.name.clone(),
                    nodes: if stopped {
                        Vec::new()
                    } else {
                        g.nodes
                            .iter()
                            .filter(|n| matches!(observed.node(n), NodeState::Up | NodeState::Maintenance))
                            .cloned()
                            .collect()
                    },
                })
        })
        .collect()
}

/// For each group, every group that follows it through `colocate_with`,
/// directly or transitively.
fn followers(spec: &ClusterSpec) -> Vec<Vec<usize>> {
    let index: HashMap<&str, usize> = spec
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| (g.name.as_str(), i))
        .collect();
    let mut direct: Vec<Vec<usize>> = vec![Vec::new(); spec.groups.len()];
    for (gi, g) in spec.groups.iter().enumerate() {
        for p in &g.colocate_with {
            if let Some(&pi) = index.get(p.as_str())
                && pi != gi
            {
                direct[pi].push(gi);
            }
        }
    }
    (0..spec.groups.len())
        .map(|gi| {
            let mut seen = vec![false; spec.groups.len()];
            seen[gi] = true;
            let mut out = Vec::new();
            let mut stack = direct[gi].clone();
            while let Some(f) = stack.pop() {
                if !std::mem::replace(&mut seen[f], true) {
                    out.push(f);
                    stack.extend(direct[f].iter().copied());
                }
            }
            out.sort_unstable();
            out
        })
        .collect()
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

/// Where a group goes, why, and what the operator should know.
struct Placement {
    target: Option<String>,
    reason: Reason,
    notes: Vec<String>,
}

impl Placement {
    fn none(reason: Reason) -> Placement {
        Placement {
            target: None,
            reason,
            notes: Vec::new(),
        }
    }
}

/// Everything placement looks at, computed once per plan.
struct World<'a> {
    spec: &'a ClusterSpec,
    observed: &'a Observed,
    now: Time,
    orders: Vec<Result<GroupOrder, Vec<String>>>,
    clone_nodes: HashMap<&'a str, &'a [String]>,
    followers: Vec<Vec<usize>>,
}

impl World<'_> {
    fn recent_failures(&self, gi: usize) -> impl Iterator<Item = &crate::observed::Failure> {
        let group = &self.spec.groups[gi];
        self.observed
            .group(&group.name)
            .into_iter()
            .flat_map(|s| s.failures.iter())
            .filter(move |f| self.now.since(f.at) < group.failover.within)
    }

    /// Why `node` cannot run group `gi` by itself, co-location aside.
    fn own_why_not(&self, gi: usize, node: &str) -> Option<Ineligible> {
        let group = &self.spec.groups[gi];
        if !group.nodes.iter().any(|n| n == node) {
            return Some(Ineligible::NotInGroup);
        }
        match self.observed.node(node) {
            NodeState::Up => {}
            NodeState::Down => return Some(Ineligible::Down),
            NodeState::Standby => return Some(Ineligible::Standby),
            NodeState::Maintenance => return Some(Ineligible::Maintenance),
        }
        if let Some(last) = self.recent_failures(gi).filter(|f| f.node == node).map(|f| f.at).max() {
            return Some(Ineligible::Failed {
                until: last + group.failover.within,
            });
        }
        let order = self.orders[gi].as_ref().ok()?;
        for e in order.external.iter().filter(|e| e.clone) {
            let runs_there = self
                .clone_nodes
                .get(e.needs.as_str())
                .is_some_and(|nodes| nodes.iter().any(|n| n == node));
            if !runs_there {
                return Some(Ineligible::NoClone { clone: e.needs.clone() });
            }
        }
        None
    }

    /// Why `node` cannot run group `gi`: its own reasons, its partner's node,
    /// and every (running, unfrozen) group that follows it, so co-located
    /// groups move together (S1.1).
    fn why_not(&self, gi: usize, node: &str, partner: Option<(&str, &str)>) -> Option<Ineligible> {
        if let Some(why) = self.own_why_not(gi, node) {
            return Some(why);
        }
        if let Some((partner, at)) = partner
            && at != node
        {
            return Some(Ineligible::NotWithPartner {
                partner: partner.to_string(),
            });
        }
        for &f in &self.followers[gi] {
            let follower = &self.spec.groups[f];
            let state = self.observed.group(&follower.name);
            if state.is_some_and(|s| s.stopped || s.maintenance) {
                continue;
            }
            if let Some(why) = self.own_why_not(f, node) {
                return Some(Ineligible::Follower {
                    group: follower.name.clone(),
                    because: Box::new(why),
                });
            }
        }
        None
    }

    fn place(&self, gi: usize, order: &GroupOrder, placed: &HashMap<&str, Option<String>>) -> Placement {
        let group = &self.spec.groups[gi];
        let observed = self.observed;
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
            return Placement {
                target: current,
                reason: Reason::Frozen { by },
                notes: Vec::new(),
            };
        }

        // 2. Stopped by an operator; nothing that needs an owner.
        if state.is_some_and(|s| s.stopped) {
            return Placement::none(Reason::StoppedByOperator);
        }
        if order.start_waves.is_empty() && order.monitor_only.is_empty() {
            return Placement::none(Reason::NothingToRun);
        }

        // 3. Eligibility. Co-location: every partner placed, all on one node.
        let mut partner_node: Option<(&str, &str)> = None;
        for partner in &group.colocate_with {
            let Some(node) = placed.get(partner.as_str()) else {
                return Placement::none(Reason::Invalid {
                    problem: format!("co-location with `{partner}` cannot be resolved"),
                });
            };
            match (node.as_deref(), partner_node) {
                (Some(node), Some((_, earlier))) if earlier == node => {}
                (Some(node), None) => partner_node = Some((partner.as_str(), node)),
                _ => {
                    return Placement::none(Reason::PartnerNotPlaced {
                        partner: partner.clone(),
                    });
                }
            }
        }
        let why_not = |node: &str| self.why_not(gi, node, partner_node);
        let candidates: Vec<&String> = group.nodes.iter().filter(|n| why_not(n).is_none()).collect();
        let current_eligible = current.as_deref().is_some_and(|c| why_not(c).is_none());
        let mut notes = Vec::new();

        // 4. Operator move.
        if let Some(to) = state.and_then(|s| s.move_to.as_deref()) {
            match why_not(to) {
                None => {
                    return Placement {
                        target: Some(to.to_string()),
                        reason: Reason::MovedByOperator,
                        notes,
                    };
                }
                Some(why) => notes.push(format!("move to {to} requested, but {to} {why}")),
            }
        }
        // Nodes more preferred than `target` that were passed over, and why
        // (the current owner's reason is already in the failover reason).
        let skipped = |target: &str| -> Vec<String> {
            group
                .nodes
                .iter()
                .take_while(|n| n.as_str() != target)
                .filter(|n| Some(n.as_str()) != current.as_deref())
                .filter_map(|n| why_not(n).map(|w| format!("{n} skipped: {w}")))
                .collect()
        };

        // 5. Keep, or fail back.
        if current_eligible {
            let best = candidates.first().map(|s| s.as_str());
            if group.failback == Failback::Auto
                && let Some(best) = best
                && Some(best) != current.as_deref()
            {
                notes.extend(skipped(best));
                return Placement {
                    target: Some(best.to_string()),
                    reason: Reason::Failback,
                    notes,
                };
            }
            return Placement {
                target: current,
                reason: Reason::Stay {
                    failback: group.failback,
                },
                notes,
            };
        }

        // 6. Threshold.
        let failures = u32::try_from(self.recent_failures(gi).count()).unwrap_or(u32::MAX);
        if failures > group.failover.threshold {
            return Placement {
                target: None,
                reason: Reason::ThresholdReached {
                    failures,
                    threshold: group.failover.threshold,
                    within: HumanDuration(group.failover.within).to_string(),
                },
                notes,
            };
        }

        // 7. Most preferred eligible node.
        match candidates.first() {
            Some(best) => {
                notes.extend(skipped(best));
                let reason = match current.clone() {
                    Some(from) => {
                        let why = why_not(&from).unwrap_or(Ineligible::NotInGroup);
                        Reason::Failover { from, why }
                    }
                    None => Reason::Preferred,
                };
                Placement {
                    target: Some((*best).clone()),
                    reason,
                    notes,
                }
            }
            None => Placement {
                target: None,
                reason: Reason::NoEligibleNode {
                    nodes: group
                        .nodes
                        .iter()
                        .filter_map(|n| why_not(n).map(|w| (n.clone(), w)))
                        .collect(),
                },
                notes,
            },
        }
    }
}

fn group_plan(group: &GroupSpec, observed: &Observed, placement: Placement, order: Option<GroupOrder>) -> GroupPlan {
    let current = observed.group(&group.name).and_then(|s| s.owner.clone());
    let target = placement.target;
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
    let order = order.unwrap_or_default();
    GroupPlan {
        group: group.name.clone(),
        current,
        target,
        transition,
        reason: placement.reason,
        notes: placement.notes,
        start_waves: order.start_waves,
        stop_waves: order.stop_waves,
        monitor_only: order.monitor_only,
        disabled: order.disabled,
        external: order.external,
    }
}
