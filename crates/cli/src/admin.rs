//! Operator commands that change the cluster's admin keys: `move`,
//! `maintenance`.

use anyhow::{Result, bail};
use understudy_agent::keys::{ClusterAdmin, build_view};
use understudy_agent::shell::update_json;
use understudy_core::agent::GroupAdmin;
use understudy_core::observed::NodeState;
use understudy_core::{Observed, plan};

use crate::context::Cluster;

pub async fn move_group(cluster: &Cluster, group: &str, to: Option<&str>) -> Result<()> {
    let Some(g) = cluster.spec.groups.iter().find(|g| g.name == group) else {
        let known: Vec<&str> = cluster.spec.groups.iter().map(|g| g.name.as_str()).collect();
        bail!("unknown group `{group}` (the groups are: {})", known.join(", "));
    };
    let (kvs, revision) = cluster.coord.range(cluster.keys.prefix()).await?;
    let kvs = kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
    let view = build_view(&cluster.keys, &kvs, revision, &mut Vec::new());
    let current = view.owners.get(group).map(|o| o.node.clone());
    let target = match to {
        Some(node) => {
            if !g.nodes.iter().any(|n| n == node) {
                bail!(
                    "group `{group}` cannot run on `{node}`; its nodes are: {}",
                    g.nodes.join(", ")
                );
            }
            node.to_string()
        }
        None => {
            // The node the planner would pick if the current owner stepped aside.
            let mut observed = Observed::from_view(&cluster.spec, &view);
            if let Some(c) = &current {
                observed.nodes.insert(c.clone(), NodeState::Standby);
            }
            let p = plan(&cluster.spec, &observed, understudy_agent::clock::wall());
            match p.group(group).and_then(|gp| gp.target.clone()) {
                Some(t) => t,
                None => bail!(
                    "no other node can take `{group}` now: {}",
                    p.group(group).map(|gp| gp.reason.to_string()).unwrap_or_default()
                ),
            }
        }
    };
    if current.as_deref() == Some(target.as_str()) {
        println!("{group} already runs on {target}");
        return Ok(());
    }
    let key = cluster.keys.admin_group(group);
    update_json::<GroupAdmin>(&*cluster.coord, &key, |a| {
        a.move_to = Some(target.clone());
        true
    })
    .await?;
    println!(
        "requested: move {group} {}to {target}; follow it with `understudy status --watch` or `understudy events --follow`",
        current.map(|c| format!("from {c} ")).unwrap_or_default()
    );
    Ok(())
}

pub async fn maintenance(cluster: &Cluster, on: bool, group: Option<&str>) -> Result<()> {
    match group {
        Some(group) => {
            if !cluster.spec.groups.iter().any(|g| g.name == group) {
                bail!("unknown group `{group}`");
            }
            update_json::<GroupAdmin>(&*cluster.coord, &cluster.keys.admin_group(group), |a| {
                let changed = a.maintenance != on;
                a.maintenance = on;
                changed
            })
            .await?;
            println!(
                "group {group}: maintenance {}",
                if on {
                    "ON: nothing of it is started, stopped or moved; monitors still report"
                } else {
                    "off"
                }
            );
        }
        None => {
            update_json::<ClusterAdmin>(&*cluster.coord, &cluster.keys.admin_cluster(), |a| {
                let changed = a.maintenance != on;
                a.maintenance = on;
                changed
            })
            .await?;
            println!(
                "cluster maintenance {}",
                if on {
                    "ON: nothing is started, stopped or moved; monitors still report"
                } else {
                    "off"
                }
            );
        }
    }
    Ok(())
}
