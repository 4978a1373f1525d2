//! Random cluster definitions ("shapes"), built with the core's testkit.
//!
//! Every shape is valid by construction (what `understudy-config` would
//! accept): unique names, acyclic dependencies, cross-group dependencies only
//! between co-located groups or on clones, clones depending only on clones,
//! timing that keeps `2 × renew_interval + fence_margin ≤ lease_ttl`.

use std::fmt::Write as _;
use std::time::Duration;

use understudy_core::spec::{ClusterSpec, Failback, OnFail, ResourceSpec, Role};
use understudy_core::testkit;

use crate::rng::Rng;

/// A cluster definition and a one-paragraph description of it for reports.
#[derive(Clone, Debug)]
pub struct Shape {
    pub spec: ClusterSpec,
}

impl Shape {
    pub fn new(spec: ClusterSpec) -> Shape {
        Shape { spec }
    }

    /// A compact description: settings, then one line per group.
    pub fn describe(&self) -> String {
        describe(&self.spec)
    }
}

/// A compact, human-readable description of a definition.
pub fn describe(spec: &ClusterSpec) -> String {
    let s = &spec.settings;
    let mut out = format!(
        "{} nodes; lease_ttl {}ms, renew {}ms, margin {}ms\n",
        spec.nodes.len(),
        s.lease_ttl.as_millis(),
        s.renew_interval.as_millis(),
        s.fence_margin.as_millis()
    );
    for g in &spec.groups {
        let _ = write!(
            out,
            "  group {} nodes [{}] failback {:?} threshold {}",
            g.name,
            g.nodes.join(","),
            g.failback,
            g.failover.threshold
        );
        if !g.colocate_with.is_empty() {
            let _ = write!(out, " colocate_with [{}]", g.colocate_with.join(","));
        }
        out.push(':');
        for r in &g.resources {
            let _ = write!(out, " {}", r.name);
            let mut tags: Vec<String> = Vec::new();
            match r.role {
                Role::Managed => {}
                Role::Clone => tags.push("clone".into()),
                Role::MonitorOnly => tags.push("monitor-only".into()),
            }
            if r.optional {
                tags.push("optional".into());
            }
            if !r.enabled {
                tags.push("disabled".into());
            }
            match r.monitor {
                None => tags.push("no-monitor".into()),
                Some(m) => tags.push(format!(
                    "mon {}ms {:?} x{}",
                    m.interval.as_millis(),
                    m.on_fail,
                    m.restarts
                )),
            }
            if !r.depends_on.is_empty() {
                tags.push(format!("<- {}", r.depends_on.join(",")));
            }
            let _ = write!(out, "({})", tags.join(" "));
        }
        out.push('\n');
    }
    out
}

/// A random small cluster: 2–4 nodes, 1–3 groups of 2–7 resources with
/// random acyclic dependencies; sometimes a clone, a monitor-only member, an
/// optional (or switched-off) member, a co-located pair of groups with a
/// cross-group dependency; default timing or a tighter valid one.
pub fn random(rng: &mut Rng) -> Shape {
    let nodes = rng.range(2, 4) as usize;
    let mut spec = testkit::cluster(nodes);
    if rng.chance(30) {
        let renew = *rng.pick(&[150u64, 200, 250, 300]).unwrap_or(&200);
        let margin = *rng.pick(&[100u64, 200, 300, 500]).unwrap_or(&200);
        let slack = *rng.pick(&[0u64, 100, 400, 1_000]).unwrap_or(&0);
        spec.settings.renew_interval = Duration::from_millis(renew);
        spec.settings.fence_margin = Duration::from_millis(margin);
        spec.settings.lease_ttl = Duration::from_millis(2 * renew + margin + slack);
    }
    let group_count = rng.range(1, 3) as usize;
    let letters = ['a', 'b', 'c'];
    for (gi, letter) in letters.iter().enumerate().take(group_count) {
        let mut g = testkit::group(&spec, &format!("g{letter}"));
        rng.shuffle(&mut g.nodes);
        if rng.chance(25) {
            g.failback = Failback::Auto;
        }
        if rng.chance(20) {
            g.failover.threshold = rng.range(0, 2) as u32;
        }
        let count = rng.range(2, 7) as usize;
        for i in 0..count {
            let name = format!("{letter}{}", i + 1);
            // Depend on up to two earlier members: acyclic by construction.
            let mut deps: Vec<String> = Vec::new();
            for j in 0..i {
                if deps.len() < 2 && rng.chance(35) {
                    deps.push(format!("{letter}{}", j + 1));
                }
            }
            let dep_refs: Vec<&str> = deps.iter().map(String::as_str).collect();
            let mut r = testkit::process(&name, &dep_refs);
            randomize_monitor(rng, &mut r);
            g.resources.push(r);
        }
        if rng.chance(25) {
            // An optional member (sometimes switched off); whoever depends
            // on it inherits its dependencies when it is off.
            let i = rng.index(g.resources.len());
            if let Some(r) = g.resources.get_mut(i) {
                r.optional = true;
                if rng.chance(35) {
                    r.enabled = false;
                }
            }
        }
        if rng.chance(20) {
            let mut m = testkit::monitor_only(&format!("{letter}m"));
            if let Some(mon) = &mut m.monitor {
                mon.interval = Duration::from_millis(rng.range(2, 6) * 500);
                if rng.chance(40) {
                    mon.on_fail = OnFail::Failover;
                }
            }
            g.resources.push(m);
        }
        let _ = gi;
        spec.groups.push(g);
    }

    // A clone (or two, the second depending on the first) in the first
    // group, needed by some managed resource.
    if rng.chance(25) {
        let mut clones = vec![testkit::clone_process("k1", &[])];
        if rng.chance(30) {
            clones.push(testkit::clone_process("k2", &["k1"]));
        }
        for c in &mut clones {
            randomize_monitor(rng, c);
        }
        let needed: Vec<String> = clones.iter().map(|c| c.name.clone()).collect();
        if let Some(first) = spec.groups.first_mut() {
            first.resources.extend(clones);
        }
        let gi = rng.index(spec.groups.len());
        if let Some(g) = spec.groups.get_mut(gi) {
            let managed: Vec<usize> = (0..g.resources.len())
                .filter(|&i| g.resources[i].role == Role::Managed)
                .collect();
            if let (Some(&ri), Some(c)) = (rng.pick(&managed), rng.pick(&needed)) {
                g.resources[ri].depends_on.push(c.clone());
            }
        }
    }

    // A co-located pair with a cross-group dependency.
    if spec.groups.len() >= 2 && rng.chance(35) {
        let leader = spec.groups[0].name.clone();
        let leader_managed: Vec<String> = spec.groups[0]
            .resources
            .iter()
            .filter(|r| r.role == Role::Managed)
            .map(|r| r.name.clone())
            .collect();
        let follower = &mut spec.groups[1];
        follower.colocate_with.push(leader);
        if rng.chance(70)
            && let Some(dep) = rng.pick(&leader_managed).cloned()
        {
            let managed: Vec<usize> = (0..follower.resources.len())
                .filter(|&i| follower.resources[i].role == Role::Managed)
                .collect();
            if let Some(&ri) = rng.pick(&managed) {
                follower.resources[ri].depends_on.push(dep);
            }
        }
    }
    Shape { spec }
}

fn randomize_monitor(rng: &mut Rng, r: &mut ResourceSpec) {
    if rng.chance(8) {
        r.monitor = None;
        return;
    }
    if let Some(m) = &mut r.monitor {
        m.interval = Duration::from_millis(rng.range(2, 8) * 500);
        m.restarts = rng.range(0, 3) as u32;
        m.on_fail = if rng.chance(12) {
            OnFail::Failover
        } else {
            OnFail::Restart
        };
    }
}
