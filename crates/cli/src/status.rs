//! `understudy status`: nodes, groups, owners, each resource's state and its
//! last monitor result, like `crm_mon`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;
use understudy_agent::keys::{KeyKind, build_view};
use understudy_coord::KeyValue;
use understudy_core::agent::ClusterView;
use understudy_core::spec::Role;
use understudy_core::{Observed, plan};

use crate::context::Cluster;

#[derive(Serialize)]
pub struct Report {
    pub cluster: String,
    pub coordinator: String,
    pub maintenance: bool,
    pub nodes: Vec<NodeRow>,
    pub groups: Vec<GroupRow>,
    pub clones: Vec<CloneRow>,
}

#[derive(Serialize)]
pub struct NodeRow {
    pub name: String,
    /// up, down, standby, maintenance, leaving
    pub state: String,
    pub owns: Vec<String>,
    /// What weakens this node's safety nets (no fence guard, no cgroups).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Serialize)]
pub struct GroupRow {
    pub name: String,
    pub owner: Option<String>,
    /// The owner key's create revision (fencing token).
    pub token: Option<i64>,
    /// running, starting, stopping, partly running, stopped
    pub state: String,
    pub maintenance: bool,
    /// What the planner says about the group now.
    pub plan: String,
    pub resources: Vec<ResourceRow>,
}

#[derive(Serialize)]
pub struct ResourceRow {
    pub name: String,
    pub kind: String,
    pub role: String,
    /// As reported by the owner's agent; `unknown` when it has not said.
    pub state: String,
    pub last_monitor: Option<String>,
    pub restarts: u64,
}

#[derive(Serialize)]
pub struct CloneRow {
    pub name: String,
    pub group: String,
    /// Node → state there.
    pub nodes: BTreeMap<String, String>,
}

/// Everything under the cluster's prefix, as a map.
async fn read_all(cluster: &Cluster) -> Result<(BTreeMap<String, KeyValue>, i64)> {
    let (kvs, revision) = cluster.coord.range(cluster.keys.prefix()).await?;
    Ok((kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect(), revision))
}

fn resource_status<'a>(statuses: &'a BTreeMap<String, Value>, node: &str, resource: &str) -> Option<&'a Value> {
    statuses.get(node)?.get("resources")?.get(resource)
}

fn health_text(v: &Value) -> Option<String> {
    let m = v.get("last_monitor")?;
    match m.get("health")?.as_str()? {
        "running" => Some("ok".into()),
        "stopped" => Some("not running".into()),
        "failed" => Some(format!(
            "failed: {}",
            m.get("detail").and_then(Value::as_str).unwrap_or("?")
        )),
        other => Some(other.into()),
    }
}

/// Builds the report from the coordinator's keys.
pub fn report(cluster: &Cluster, kvs: &BTreeMap<String, KeyValue>, revision: i64) -> Report {
    let mut bad = Vec::new();
    let view: ClusterView = build_view(&cluster.keys, kvs, revision, &mut bad);
    let statuses: BTreeMap<String, Value> = kvs
        .iter()
        .filter_map(|(k, kv)| match cluster.keys.kind(k) {
            Some(KeyKind::Status(node)) => serde_json::from_slice(&kv.value).ok().map(|v| (node, v)),
            _ => None,
        })
        .collect();
    let spec = &cluster.spec;
    let observed = Observed::from_view(spec, &view);
    let now = understudy_agent::clock::wall();
    let p = plan(spec, &observed, now);

    let nodes = spec
        .nodes
        .iter()
        .map(|n| {
            let registered = view.nodes.get(&n.name);
            let admin = view.node_admin.get(&n.name);
            let state = match registered {
                None => "down",
                Some(_) if admin.is_some_and(|a| a.maintenance) => "maintenance",
                Some(r) if r.leaving => "leaving",
                Some(_) if admin.is_some_and(|a| a.standby) => "standby",
                Some(_) => "up",
            };
            let mut warnings = Vec::new();
            if registered.is_some()
                && let Some(st) = statuses.get(&n.name)
            {
                if let Some(why) = st.get("guard_down").and_then(Value::as_str) {
                    warnings.push(format!("degraded: no fence guard ({why}); holds nothing"));
                }
                if let Some(c) = st.get("containment").and_then(Value::as_str)
                    && c.starts_with("process groups")
                {
                    warnings.push(format!("containment: {c}"));
                }
            }
            NodeRow {
                name: n.name.clone(),
                warnings,
                state: state.into(),
                owns: view
                    .owners
                    .iter()
                    .filter(|(_, o)| o.node == n.name)
                    .map(|(g, _)| g.clone())
                    .collect(),
            }
        })
        .collect();

    let mut groups = Vec::new();
    let mut clones = Vec::new();
    for g in &spec.groups {
        let owner = view.owners.get(&g.name);
        let mut rows = Vec::new();
        let mut states = Vec::new();
        for r in g.resources.iter().filter(|r| r.enabled) {
            if r.role == Role::Clone {
                clones.push(CloneRow {
                    name: r.name.clone(),
                    group: g.name.clone(),
                    nodes: spec
                        .nodes
                        .iter()
                        .filter(|n| g.nodes.contains(&n.name))
                        .map(|n| {
                            let state = resource_status(&statuses, &n.name, &r.name)
                                .and_then(|v| v.get("state").and_then(Value::as_str))
                                .unwrap_or(if view.nodes.contains_key(&n.name) {
                                    "stopped"
                                } else {
                                    "-"
                                });
                            (n.name.clone(), state.to_string())
                        })
                        .collect(),
                });
                continue;
            }
            let st = owner.and_then(|o| resource_status(&statuses, &o.node, &r.name));
            let state = match (r.role, st) {
                (Role::MonitorOnly, _) => "monitor only".to_string(),
                (_, Some(v)) => v.get("state").and_then(Value::as_str).unwrap_or("unknown").to_string(),
                (_, None) if owner.is_some() => "stopped".to_string(),
                (_, None) => "stopped".to_string(),
            };
            if r.role == Role::Managed {
                states.push(state.clone());
            }
            rows.push(ResourceRow {
                name: r.name.clone(),
                kind: r.kind.name().into(),
                role: match r.role {
                    Role::Managed => "managed",
                    Role::Clone => "clone",
                    Role::MonitorOnly => "monitor-only",
                }
                .into(),
                state,
                last_monitor: st.and_then(health_text),
                restarts: st.and_then(|v| v.get("restarts")).and_then(Value::as_u64).unwrap_or(0),
            });
        }
        let summary = if states.is_empty() {
            "no managed resources"
        } else if states.iter().all(|s| s == "running") {
            "running"
        } else if states.iter().any(|s| s == "starting") {
            "starting"
        } else if states.iter().any(|s| s == "stopping") {
            "stopping"
        } else if states.iter().any(|s| s == "running") {
            "partly running"
        } else {
            "stopped"
        };
        let gp = p.group(&g.name);
        groups.push(GroupRow {
            name: g.name.clone(),
            owner: owner.map(|o| o.node.clone()),
            token: owner.map(|o| o.token),
            state: summary.into(),
            maintenance: view.group_admin.get(&g.name).is_some_and(|a| a.maintenance),
            plan: gp.map_or_else(String::new, |gp| match &gp.target {
                Some(t) => format!("should run on {t} ({})", gp.reason),
                None => format!("should not run ({})", gp.reason),
            }),
            resources: rows,
        });
    }
    Report {
        cluster: spec.name.clone(),
        coordinator: cluster.coordinator_desc.clone(),
        maintenance: view.maintenance,
        nodes,
        groups,
        clones,
    }
}

pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Cluster {} — coordinator: {}", r.cluster, r.coordinator);
    let _ = writeln!(
        out,
        "Maintenance: {}",
        if r.maintenance {
            "ON (nothing is started, stopped or moved)"
        } else {
            "off"
        }
    );
    let _ = writeln!(out, "\nNodes:");
    let width = r.nodes.iter().map(|n| n.name.len()).max().unwrap_or(4);
    for n in &r.nodes {
        let owns = if n.owns.is_empty() {
            String::new()
        } else {
            format!("owns {}", n.owns.join(", "))
        };
        let _ = writeln!(out, "  {:width$}  {:12} {owns}", n.name, n.state);
        for w in &n.warnings {
            let _ = writeln!(out, "  {:width$}  ! {w}", "");
        }
    }
    let _ = writeln!(out, "\nGroups:");
    for g in &r.groups {
        let head = match (&g.owner, g.token) {
            (Some(o), Some(t)) => format!("{} on {o} (fencing token {t})", g.state),
            _ => g.state.clone(),
        };
        let frozen = if g.maintenance { "  [maintenance]" } else { "" };
        let _ = writeln!(out, "  {}  {head}{frozen}", g.name);
        let expected = match &g.owner {
            Some(o) => g.plan.starts_with(&format!("should run on {o} ")),
            None => g.plan.starts_with("should not run"),
        };
        if !expected || g.state != "running" {
            let _ = writeln!(out, "    plan: {}", g.plan);
        }
        let width = g.resources.iter().map(|x| x.name.len()).max().unwrap_or(4);
        for res in &g.resources {
            let monitor = res
                .last_monitor
                .as_deref()
                .map_or(String::new(), |m| format!("monitor {m}"));
            let restarts = if res.restarts > 0 {
                format!(
                    "  ({} restart{})",
                    res.restarts,
                    if res.restarts == 1 { "" } else { "s" }
                )
            } else {
                String::new()
            };
            let _ = writeln!(out, "    {:width$}  {:13} {monitor}{restarts}", res.name, res.state);
        }
    }
    if !r.clones.is_empty() {
        let _ = writeln!(out, "\nClones:");
        for c in &r.clones {
            let nodes: Vec<String> = c.nodes.iter().map(|(n, s)| format!("{n} {s}")).collect();
            let _ = writeln!(out, "  {}  {}", c.name, nodes.join(", "));
        }
    }
    out
}

pub async fn run(cluster: &Cluster, json: bool, watch: bool) -> Result<()> {
    let (mut kvs, mut revision) = read_all(cluster).await?;
    let show = |kvs: &BTreeMap<String, KeyValue>, revision: i64| -> Result<()> {
        let r = report(cluster, kvs, revision);
        if json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render(&r));
        }
        Ok(())
    };
    show(&kvs, revision)?;
    if !watch {
        return Ok(());
    }
    loop {
        let mut stream = cluster.coord.watch(cluster.keys.prefix(), revision).await?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                batch = stream.recv() => {
                    let Some(batch) = batch else { break };
                    let Ok(events) = batch else { break };
                    revision = understudy_coord::apply_events(&mut kvs, revision, events);
                    show(&kvs, revision)?;
                }
                // Failure windows age with time: refresh even when nothing changes.
                _ = tick.tick() => show(&kvs, revision)?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
        (kvs, revision) = read_all(cluster).await?;
    }
}
