//! Faults and random fault schedules.

use std::fmt;

use understudy_core::spec::{ClusterSpec, Role};

use crate::rng::Rng;

/// One fault (or operator action), injected at a point of virtual time.
/// Nodes, groups and resources are indices into the definition's
/// declaration order (`resource` counts every resource of every group, in
/// order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The agent dies; its resources die with it (PR_SET_PDEATHSIG) and so
    /// does its fence guard. A fresh agent starts `down_for` ms later.
    Crash { node: usize, down_for: u64 },
    /// SIGSTOP for `ms`: the agent handles nothing; resources and the guard
    /// keep running; events queue up and are delivered in order on resume.
    Pause { node: usize, ms: u64 },
    /// Keep-alive requests and/or responses of the node are dropped.
    LoseRenewals {
        node: usize,
        requests: bool,
        responses: bool,
        ms: u64,
    },
    /// Nothing gets through between the node and the coordinator.
    Partition { node: usize, ms: u64 },
    /// Messages between the node and the coordinator take 100–900 ms, so
    /// some arrive after the request has timed out.
    SlowLink { node: usize, ms: u64 },
    /// The resource's monitor reports a failure on the node.
    FailMonitor { node: usize, resource: usize, ms: u64 },
    /// The resource's process on the node dies (if it runs).
    Kill { node: usize, resource: usize },
    /// Starts (and orderly stops) take seconds on the node.
    SlowOps { node: usize, ms: u64 },
    /// Starts of the resource on the node fail.
    FailStarts { node: usize, resource: usize, ms: u64 },
    /// Orderly (non-urgent) stops fail on the node; forced ones still work.
    FailStops { node: usize, ms: u64 },
    /// SIGTERM: the agent moves its groups away and exits; it is started
    /// again `down_for` ms after it exited.
    Sigterm { node: usize, down_for: u64 },
    /// `understudy move GROUP NODE`.
    MoveTo { group: usize, node: usize },
    /// Group maintenance on, then off after `ms`.
    GroupMaintenance { group: usize, ms: u64 },
    /// Cluster maintenance on, then off after `ms`.
    ClusterMaintenance { ms: u64 },
    /// Node maintenance on, then off after `ms`.
    NodeMaintenance { node: usize, ms: u64 },
    /// Node standby on, then off after `ms`.
    NodeStandby { node: usize, ms: u64 },
    /// `understudy stop GROUP`, then start again after `ms`.
    StopGroup { group: usize, ms: u64 },
}

/// Faults with their injection times (virtual ms), in time order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    pub faults: Vec<(u64, Fault)>,
}

impl Schedule {
    /// One line per fault, with names from `spec`.
    pub fn describe(&self, spec: &ClusterSpec) -> String {
        if self.faults.is_empty() {
            return "  (no faults)\n".into();
        }
        self.faults
            .iter()
            .map(|(at, f)| format!("  t={:>6}ms {}\n", at, Named { spec, fault: f }))
            .collect()
    }
}

/// A fault displayed with names instead of indices.
pub struct Named<'a> {
    pub spec: &'a ClusterSpec,
    pub fault: &'a Fault,
}

fn node_name(spec: &ClusterSpec, i: usize) -> &str {
    spec.nodes.get(i).map_or("?", |n| n.name.as_str())
}

fn group_name(spec: &ClusterSpec, i: usize) -> &str {
    spec.groups.get(i).map_or("?", |g| g.name.as_str())
}

fn resource_name(spec: &ClusterSpec, i: usize) -> &str {
    spec.groups
        .iter()
        .flat_map(|g| g.resources.iter())
        .nth(i)
        .map_or("?", |r| r.name.as_str())
}

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.spec;
        let n = |i: usize| node_name(s, i);
        match *self.fault {
            Fault::Crash { node, down_for } => write!(f, "crash {} (down {down_for}ms)", n(node)),
            Fault::Pause { node, ms } => write!(f, "SIGSTOP {} for {ms}ms", n(node)),
            Fault::LoseRenewals {
                node,
                requests,
                responses,
                ms,
            } => write!(
                f,
                "lose keep-alive {}{} of {} for {ms}ms",
                if requests { "requests" } else { "" },
                match (requests, responses) {
                    (true, true) => " and responses",
                    (false, true) => "responses",
                    _ => "",
                },
                n(node)
            ),
            Fault::Partition { node, ms } => write!(f, "partition {} from the coordinator for {ms}ms", n(node)),
            Fault::SlowLink { node, ms } => write!(f, "slow link to {} for {ms}ms", n(node)),
            Fault::FailMonitor { node, resource, ms } => {
                write!(
                    f,
                    "monitor of {} fails on {} for {ms}ms",
                    resource_name(s, resource),
                    n(node)
                )
            }
            Fault::Kill { node, resource } => write!(f, "kill {} on {}", resource_name(s, resource), n(node)),
            Fault::SlowOps { node, ms } => write!(f, "slow starts and stops on {} for {ms}ms", n(node)),
            Fault::FailStarts { node, resource, ms } => {
                write!(
                    f,
                    "starts of {} fail on {} for {ms}ms",
                    resource_name(s, resource),
                    n(node)
                )
            }
            Fault::FailStops { node, ms } => write!(f, "orderly stops fail on {} for {ms}ms", n(node)),
            Fault::Sigterm { node, down_for } => write!(f, "SIGTERM {} (restarted {down_for}ms after exit)", n(node)),
            Fault::MoveTo { group, node } => write!(f, "operator: move {} to {}", group_name(s, group), n(node)),
            Fault::GroupMaintenance { group, ms } => {
                write!(f, "operator: maintenance of group {} for {ms}ms", group_name(s, group))
            }
            Fault::ClusterMaintenance { ms } => write!(f, "operator: cluster maintenance for {ms}ms"),
            Fault::NodeMaintenance { node, ms } => write!(f, "operator: maintenance of {} for {ms}ms", n(node)),
            Fault::NodeStandby { node, ms } => write!(f, "operator: standby of {} for {ms}ms", n(node)),
            Fault::StopGroup { group, ms } => write!(f, "operator: stop group {} for {ms}ms", group_name(s, group)),
        }
    }
}

/// 0–15 random faults between 1 s and `phase_ms - 1 s`.
pub fn random(rng: &mut Rng, spec: &ClusterSpec, phase_ms: u64) -> Schedule {
    let nodes = spec.nodes.len();
    let groups = spec.groups.len();
    let resources: Vec<(usize, Role)> = spec
        .groups
        .iter()
        .flat_map(|g| g.resources.iter())
        .enumerate()
        .filter(|(_, r)| r.enabled)
        .map(|(i, r)| (i, r.role))
        .collect();
    let count = rng.range(0, 15);
    let mut faults = Vec::new();
    let last = phase_ms.saturating_sub(1_000).max(1_001);
    for _ in 0..count {
        let at = rng.range(1_000, last);
        let node = rng.index(nodes);
        let resource = rng.pick(&resources).map_or(0, |r| r.0);
        let group = rng.index(groups);
        let fault = match rng.below(100) {
            0..=9 => Fault::Crash {
                node,
                down_for: rng.range(200, 10_000),
            },
            10..=21 => Fault::Pause {
                node,
                ms: rng.range(500, 6_000),
            },
            22..=29 => {
                let which = rng.below(3);
                Fault::LoseRenewals {
                    node,
                    requests: which != 1,
                    responses: which != 0,
                    ms: rng.range(300, 8_000),
                }
            }
            30..=38 => Fault::Partition {
                node,
                ms: rng.range(300, 10_000),
            },
            39..=43 => Fault::SlowLink {
                node,
                ms: rng.range(500, 6_000),
            },
            44..=52 => Fault::FailMonitor {
                node,
                resource,
                ms: rng.range(500, 10_000),
            },
            53..=61 => Fault::Kill { node, resource },
            62..=66 => Fault::SlowOps {
                node,
                ms: rng.range(1_000, 10_000),
            },
            67..=71 => Fault::FailStarts {
                node,
                resource,
                ms: rng.range(500, 8_000),
            },
            72..=74 => Fault::FailStops {
                node,
                ms: rng.range(500, 8_000),
            },
            75..=80 => Fault::Sigterm {
                node,
                down_for: rng.range(200, 8_000),
            },
            81..=85 => Fault::MoveTo { group, node },
            86..=88 => Fault::GroupMaintenance {
                group,
                ms: rng.range(500, 8_000),
            },
            89..=90 => Fault::ClusterMaintenance {
                ms: rng.range(500, 8_000),
            },
            91..=93 => Fault::NodeMaintenance {
                node,
                ms: rng.range(500, 8_000),
            },
            94..=97 => Fault::NodeStandby {
                node,
                ms: rng.range(500, 8_000),
            },
            _ => Fault::StopGroup {
                group,
                ms: rng.range(500, 8_000),
            },
        };
        faults.push((at, fault));
    }
    faults.sort_by_key(|(at, _)| *at);
    Schedule { faults }
}
