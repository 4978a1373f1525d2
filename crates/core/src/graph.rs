//! The dependency graph: effective dependencies, start waves, cycles.
//!
//! A *wave* is a set of resources with no order between them: every member's
//! dependencies are in earlier waves, so a wave's members may start in
//! parallel (S2.3c). The stop plan is the start plan reversed (S1.7).

use std::collections::{BTreeSet, HashMap};

use crate::spec::{ClusterSpec, GroupSpec, ResourceSpec, Role};

/// A dependency that a group's own start plan cannot satisfy by itself.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct External {
    /// The resource inside the group that needs it.
    pub resource: String,
    /// The resource it needs.
    pub needs: String,
    /// The group that declares the needed resource.
    pub group: String,
    /// True when the needed resource is a clone (its instance on the same node).
    pub clone: bool,
}

/// The ordering facts of one group, independent of where it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GroupOrder {
    /// Managed, enabled resources in start waves.
    pub start_waves: Vec<Vec<String>>,
    /// `start_waves` reversed.
    pub stop_waves: Vec<Vec<String>>,
    /// Monitor-only members (checked on the owner, never started).
    pub monitor_only: Vec<String>,
    /// Clones declared in this group (they run on every eligible node).
    pub clones: Vec<String>,
    /// Members switched off with `enabled = false`.
    pub disabled: Vec<String>,
    /// Dependencies on resources of other groups or on clones.
    pub external: Vec<External>,
}

/// Where every resource lives, by name.
pub struct Catalog<'a> {
    pub spec: &'a ClusterSpec,
    by_name: HashMap<&'a str, (usize, usize)>,
}

impl<'a> Catalog<'a> {
    pub fn new(spec: &'a ClusterSpec) -> Catalog<'a> {
        let mut by_name = HashMap::new();
        for (gi, g) in spec.groups.iter().enumerate() {
            for (ri, r) in g.resources.iter().enumerate() {
                by_name.entry(r.name.as_str()).or_insert((gi, ri));
            }
        }
        Catalog { spec, by_name }
    }

    pub fn get(&self, name: &str) -> Option<(&'a GroupSpec, &'a ResourceSpec)> {
        let &(gi, ri) = self.by_name.get(name)?;
        let g = &self.spec.groups[gi];
        Some((g, &g.resources[ri]))
    }

    /// The effective dependencies of `r`: disabled members are replaced by
    /// their own effective dependencies, so switching an optional member off
    /// keeps the order of the others (S2.2d). Unknown names are dropped.
    pub fn effective_deps(&self, r: &ResourceSpec) -> Vec<&'a str> {
        let mut out: Vec<&'a str> = Vec::new();
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut stack: Vec<&str> = r.depends_on.iter().rev().map(String::as_str).collect();
        while let Some(name) = stack.pop() {
            if !seen.insert(name) {
                continue;
            }
            let Some((_, dep)) = self.get(name) else {
                continue;
            };
            if dep.enabled {
                out.push(dep.name.as_str());
            } else {
                stack.extend(dep.depends_on.iter().rev().map(String::as_str));
            }
        }
        out
    }

    /// The start/stop order of a group. `Err` carries the members caught in
    /// a dependency cycle (validation rejects those definitions).
    pub fn group_order(&self, group: &GroupSpec) -> Result<GroupOrder, Vec<String>> {
        let mut order = GroupOrder::default();
        let mut members: Vec<&ResourceSpec> = Vec::new();
        for r in &group.resources {
            if !r.enabled {
                order.disabled.push(r.name.clone());
                continue;
            }
            match r.role {
                Role::Managed => members.push(r),
                Role::Clone => order.clones.push(r.name.clone()),
                Role::MonitorOnly => order.monitor_only.push(r.name.clone()),
            }
        }
        let index: HashMap<&str, usize> = members.iter().enumerate().map(|(i, r)| (r.name.as_str(), i)).collect();
        let mut deps: Vec<Vec<usize>> = Vec::with_capacity(members.len());
        for r in &members {
            let mut local = Vec::new();
            for name in self.effective_deps(r) {
                if let Some(&i) = index.get(name) {
                    local.push(i);
                } else if let Some((g, dep)) = self.get(name) {
                    if dep.role == Role::MonitorOnly {
                        continue;
                    }
                    order.external.push(External {
                        resource: r.name.clone(),
                        needs: dep.name.clone(),
                        group: g.name.clone(),
                        clone: dep.role == Role::Clone,
                    });
                }
            }
            deps.push(local);
        }
        let layers =
            layers(&deps).map_err(|stuck| stuck.into_iter().map(|i| members[i].name.clone()).collect::<Vec<_>>())?;
        order.start_waves = layers
            .into_iter()
            .map(|wave| wave.into_iter().map(|i| members[i].name.clone()).collect())
            .collect();
        order.stop_waves = order.start_waves.iter().rev().cloned().collect();
        Ok(order)
    }

    /// Start waves of every enabled clone in the cluster (clones may depend
    /// only on clones). `Err` carries clones caught in a cycle.
    pub fn clone_waves(&self) -> Result<Vec<Vec<String>>, Vec<String>> {
        let clones: Vec<&ResourceSpec> = self
            .spec
            .groups
            .iter()
            .flat_map(|g| g.resources.iter())
            .filter(|r| r.enabled && r.role == Role::Clone)
            .collect();
        let index: HashMap<&str, usize> = clones.iter().enumerate().map(|(i, r)| (r.name.as_str(), i)).collect();
        let deps: Vec<Vec<usize>> = clones
            .iter()
            .map(|r| {
                self.effective_deps(r)
                    .into_iter()
                    .filter_map(|n| index.get(n).copied())
                    .collect()
            })
            .collect();
        let layers =
            layers(&deps).map_err(|stuck| stuck.into_iter().map(|i| clones[i].name.clone()).collect::<Vec<_>>())?;
        Ok(layers
            .into_iter()
            .map(|w| w.into_iter().map(|i| clones[i].name.clone()).collect())
            .collect())
    }
}

/// Longest-path layering. `deps[i]` lists the nodes `i` depends on. Returns
/// the layers with members in index order, or the nodes left over by a cycle.
pub fn layers(deps: &[Vec<usize>]) -> Result<Vec<Vec<usize>>, Vec<usize>> {
    let n = deps.len();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut missing: Vec<usize> = vec![0; n];
    for (i, ds) in deps.iter().enumerate() {
        let unique: BTreeSet<usize> = ds.iter().copied().filter(|&d| d < n).collect();
        missing[i] = unique.len();
        for d in unique {
            dependents[d].push(i);
        }
    }
    let mut level: Vec<usize> = vec![0; n];
    let mut ready: Vec<usize> = (0..n).filter(|&i| missing[i] == 0).collect();
    let mut done = 0;
    while let Some(i) = ready.pop() {
        done += 1;
        for &j in &dependents[i] {
            level[j] = level[j].max(level[i] + 1);
            missing[j] -= 1;
            if missing[j] == 0 {
                ready.push(j);
            }
        }
    }
    if done < n {
        return Err((0..n).filter(|&i| missing[i] > 0).collect());
    }
    let depth = level.iter().copied().max().map_or(0, |m| m + 1);
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); depth];
    for (i, &l) in level.iter().enumerate() {
        out[l].push(i);
    }
    Ok(out)
}

/// Every dependency cycle in `edges` (node `i` depends on `edges[i]`), each
/// as a closed path `[a, b, …, a]`, one per strongly connected component,
/// in order of their smallest member.
pub fn cycles(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let comps = strongly_connected(edges);
    let mut out = Vec::new();
    for comp in comps {
        let set: BTreeSet<usize> = comp.iter().copied().collect();
        let start = comp[0];
        let cyclic = comp.len() > 1 || edges[start].contains(&start);
        if !cyclic {
            continue;
        }
        if let Some(path) = path_back_to(edges, start, &set) {
            out.push(path);
        }
    }
    out.sort_by_key(|p| p.iter().copied().min());
    out
}

/// A closed path from `start` back to itself inside `set` (iterative DFS).
fn path_back_to(edges: &[Vec<usize>], start: usize, set: &BTreeSet<usize>) -> Option<Vec<usize>> {
    let mut visited = BTreeSet::new();
    let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
    visited.insert(start);
    while let Some(&mut (node, ref mut next)) = stack.last_mut() {
        let Some(&succ) = edges[node].get(*next) else {
            stack.pop();
            continue;
        };
        *next += 1;
        if succ == start {
            let mut path: Vec<usize> = stack.iter().map(|&(n, _)| n).collect();
            path.push(start);
            return Some(path);
        }
        if set.contains(&succ) && visited.insert(succ) {
            stack.push((succ, 0));
        }
    }
    None
}

/// Tarjan's algorithm, iterative. Components come with members sorted.
fn strongly_connected(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = edges.len();
    let mut index = vec![usize::MAX; n];
    let mut low = vec![0usize; n];
    let mut on_stack = vec![false; n];
    let mut stack: Vec<usize> = Vec::new();
    let mut next_index = 0;
    let mut comps = Vec::new();
    for root in 0..n {
        if index[root] != usize::MAX {
            continue;
        }
        let mut work: Vec<(usize, usize)> = vec![(root, 0)];
        index[root] = next_index;
        low[root] = next_index;
        next_index += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(&mut (v, ref mut k)) = work.last_mut() {
            if let Some(&w) = edges[v].get(*k) {
                *k += 1;
                if w >= n {
                    continue;
                }
                if index[w] == usize::MAX {
                    index[w] = next_index;
                    low[w] = next_index;
                    next_index += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut comp = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                comp.sort_unstable();
                comps.push(comp);
            }
        }
    }
    comps
}

/// Every dependency cycle among the cluster's resources (all roles, enabled
/// or not), as closed paths of names.
pub fn resource_cycles(spec: &ClusterSpec) -> Vec<Vec<String>> {
    let all: Vec<&ResourceSpec> = spec.groups.iter().flat_map(|g| g.resources.iter()).collect();
    let index: HashMap<&str, usize> = all.iter().enumerate().map(|(i, r)| (r.name.as_str(), i)).collect();
    let edges: Vec<Vec<usize>> = all
        .iter()
        .map(|r| {
            r.depends_on
                .iter()
                .filter_map(|d| index.get(d.as_str()).copied())
                .collect()
        })
        .collect();
    cycles(&edges)
        .into_iter()
        .map(|p| p.into_iter().map(|i| all[i].name.clone()).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_of_a_diamond() {
        // 0 <- 1, 0 <- 2, {1,2} <- 3
        let deps = vec![vec![], vec![0], vec![0], vec![1, 2]];
        assert_eq!(layers(&deps).unwrap(), vec![vec![0], vec![1, 2], vec![3]]);
    }

    #[test]
    fn layers_use_the_longest_path() {
        // 3 depends on 0 directly and on 2 (which is two deep).
        let deps = vec![vec![], vec![0], vec![1], vec![0, 2]];
        assert_eq!(layers(&deps).unwrap(), vec![vec![0], vec![1], vec![2], vec![3]]);
    }

    #[test]
    fn layers_report_cycle_members() {
        let deps = vec![vec![], vec![2], vec![1], vec![2]];
        assert_eq!(layers(&deps).unwrap_err(), vec![1, 2, 3]);
    }

    #[test]
    fn cycles_are_closed_paths() {
        let edges = vec![vec![1], vec![2], vec![0], vec![3], vec![]];
        assert_eq!(cycles(&edges), vec![vec![0, 1, 2, 0], vec![3, 3]]);
    }

    #[test]
    fn no_cycles_in_a_dag() {
        let edges = vec![vec![], vec![0], vec![0, 1]];
        assert!(cycles(&edges).is_empty());
    }
}
