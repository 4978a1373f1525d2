//! Observed-state files: the input of `understudy plan --state` and of the
//! golden scenarios. Times are durations since the scenario's zero.

use toml::de::{DeTable, DeValue};
use understudy_core::observed::{Failure, NodeState, Observed};
use understudy_core::spec::ClusterSpec;
use understudy_core::time::{Time, millis};

use crate::diag::{Diagnostic, did_you_mean};
use crate::reader::{Ctx, Hint, Obj, type_name};

/// Parses a state file against `spec`: every node starts `up`, then the
/// file's settings apply. Returns the observed state and `now`.
pub fn parse_state(text: &str, spec: &ClusterSpec) -> Result<(Observed, Time), Vec<Diagnostic>> {
    let mut ctx = Ctx::default();
    let (doc, syntax) = DeTable::parse_recoverable(text);
    for e in &syntax {
        ctx.error(
            "E001",
            e.span().unwrap_or(0..0),
            format!("TOML syntax: {}", e.message().trim()),
        );
    }
    let mut observed = Observed::all_up(spec);
    let mut now = Time::ZERO;
    if syntax.is_empty() {
        let root = Obj::new(doc.get_ref(), 0..0, "the state file");
        root.check_keys(&mut ctx, &["now", "maintenance", "nodes", "group"], |_| None);
        if let Some(d) = root.duration(&mut ctx, "now") {
            now = Time(millis(d.v));
        }
        observed.maintenance = root.bool(&mut ctx, "maintenance").is_some_and(|b| b.v);
        let node_names: Vec<&str> = spec.nodes.iter().map(|n| n.name.as_str()).collect();
        if let Some(nodes) = root.table(&mut ctx, "nodes", "`[nodes]` with `node1 = \"down\"`") {
            for (k, _) in nodes.table.iter() {
                let name: &str = k.get_ref();
                if !node_names.contains(&name) {
                    unknown(&mut ctx, k.span(), "node", name, &node_names);
                    continue;
                }
                if let Some(s) = nodes.choice(&mut ctx, name, &["up", "down", "standby", "maintenance"]) {
                    let state = match s.v.as_str() {
                        "down" => NodeState::Down,
                        "standby" => NodeState::Standby,
                        "maintenance" => NodeState::Maintenance,
                        _ => NodeState::Up,
                    };
                    observed.nodes.insert(name.to_string(), state);
                }
            }
        }
        let group_names: Vec<&str> = spec.groups.iter().map(|g| g.name.as_str()).collect();
        if let Some(groups) = root.table(&mut ctx, "group", "`[group.NAME]`") {
            for (k, v) in groups.table.iter() {
                let name: &str = k.get_ref();
                if !group_names.contains(&name) {
                    unknown(&mut ctx, k.span(), "group", name, &group_names);
                    continue;
                }
                let DeValue::Table(t) = v.get_ref() else {
                    ctx.error(
                        "E011",
                        v.span(),
                        format!("group `{name}` must be a table, found {}", type_name(v.get_ref())),
                    );
                    continue;
                };
                let g = Obj::new(t, k.span(), format!("group `{name}`"));
                g.check_keys(
                    &mut ctx,
                    &["owner", "maintenance", "stopped", "move_to", "failures"],
                    |_| None,
                );
                let node_ref = |ctx: &mut Ctx, key: &str| {
                    let s = g.str(ctx, key, &format!("`{key} = \"node1\"`"))?;
                    if node_names.contains(&s.v.as_str()) {
                        Some(s.v)
                    } else {
                        unknown(ctx, s.span, "node", &s.v, &node_names);
                        None
                    }
                };
                let owner = node_ref(&mut ctx, "owner");
                let move_to = node_ref(&mut ctx, "move_to");
                let state = observed.group_mut(name);
                state.owner = owner;
                state.move_to = move_to;
                state.maintenance = g.bool(&mut ctx, "maintenance").is_some_and(|b| b.v);
                state.stopped = g.bool(&mut ctx, "stopped").is_some_and(|b| b.v);
                if let Some(fv) = g.get("failures") {
                    let DeValue::Array(items) = fv.get_ref() else {
                        ctx.error("E011", fv.span(), "`failures` must be an array of tables");
                        continue;
                    };
                    for item in items.iter() {
                        let DeValue::Table(ft) = item.get_ref() else {
                            ctx.error(
                                "E011",
                                item.span(),
                                "each failure must be a table like `{ node = \"node1\", at = \"5m\" }`",
                            );
                            continue;
                        };
                        let f = Obj::new(ft, item.span(), "a failure");
                        f.check_keys(&mut ctx, &["node", "at", "resource"], |_| None);
                        let node = f.req_str(&mut ctx, "node", "`node = \"node1\"`");
                        let at = f.duration(&mut ctx, "at");
                        if at.is_none() && f.get("at").is_none() {
                            f.missing(&mut ctx, "at", "`at = \"5m\"`");
                        }
                        let resource = f.str(&mut ctx, "resource", "`resource = \"db\"`").map(|s| s.v);
                        let node = node.filter(|n| {
                            let known = node_names.contains(&n.v.as_str());
                            if !known {
                                unknown(&mut ctx, n.span.clone(), "node", &n.v, &node_names);
                            }
                            known
                        });
                        if let (Some(node), Some(at)) = (node, at) {
                            observed.group_mut(name).failures.push(Failure {
                                id: String::new(),
                                node: node.v,
                                at: Time(millis(at.v)),
                                resource,
                            });
                        }
                    }
                }
            }
        }
    }
    if ctx.has_errors() {
        Err(ctx.diags)
    } else {
        Ok((observed, now))
    }
}

fn unknown(ctx: &mut Ctx, span: std::ops::Range<usize>, what: &str, name: &str, known: &[&str]) {
    let d = ctx.error("E004", span, format!("unknown {what} `{name}`"));
    match did_you_mean(name, known.iter().copied()) {
        Some(s) => d.hint(format!("did you mean `{s}`?")),
        None => d.hint(format!("the definition's {what}s are: {}", known.join(", "))),
    }
}
