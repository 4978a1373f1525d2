//! `understudy check` and `understudy plan`: the definition, offline.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use understudy_config::Source;
use understudy_core::observed::NodeState;
use understudy_core::{Observed, Time};

use crate::context::{load_checked, read};

pub fn check(path: &Path) -> Result<ExitCode> {
    let Some(spec) = load_checked(path)? else {
        return Ok(ExitCode::from(1));
    };
    warn_units_enabled_at_boot(path, &spec)?;
    let resources: usize = spec.groups.iter().map(|g| g.resources.len()).sum();
    println!(
        "{}: ok: cluster `{}`, {} node{}, {} group{}, {} resource{}",
        path.display(),
        spec.name,
        spec.nodes.len(),
        plural(spec.nodes.len()),
        spec.groups.len(),
        plural(spec.groups.len()),
        resources,
        plural(resources)
    );
    Ok(ExitCode::SUCCESS)
}

/// W009 (S2.2a): a unit the cluster starts must not also be started by the
/// OS at boot. Needs this machine's systemd, so it is checked here, not in
/// the pure checker; silent where systemctl is absent or cannot answer.
fn warn_units_enabled_at_boot(path: &Path, spec: &understudy_core::ClusterSpec) -> Result<()> {
    let text = read(path)?;
    let name = path.display().to_string();
    let source = Source::new(&name, &text);
    for r in spec.groups.iter().flat_map(|g| g.resources.iter()) {
        let understudy_core::spec::Kind::Systemd(unit) = &r.kind else {
            continue;
        };
        if r.role == understudy_core::spec::Role::MonitorOnly || !r.enabled {
            continue;
        }
        if understudy_drivers::systemd::is_enabled_at_boot(&unit.unit) == Some(true) {
            // Point at this resource's `unit = "…"` line.
            let quoted = format!("\"{}\"", unit.unit);
            let header = text.find(&format!(".resource.{}]", r.name)).unwrap_or(0);
            let start = text[header..].find(&quoted).map_or(0, |i| header + i);
            let d = understudy_config::Diagnostic {
                severity: understudy_config::Severity::Warning,
                code: "W009",
                message: format!(
                    "unit {} of `{}` is enabled to start at boot; the OS would start it on every node",
                    unit.unit, r.name
                ),
                span: start..start + quoted.len(),
                hint: Some(format!(
                    "run `systemctl disable {}` on every node: the cluster starts it where the group runs (S2.2a)",
                    unit.unit
                )),
            };
            eprint!("{}", source.render(&d));
        }
    }
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

pub fn plan(path: &Path, down: &[String], standby: &[String], state: Option<&Path>, json: bool) -> Result<ExitCode> {
    let Some(spec) = load_checked(path)? else {
        return Ok(ExitCode::from(1));
    };
    let (mut observed, now) = match state {
        Some(state_path) => {
            let text = read(state_path)?;
            match understudy_config::parse_state(&text, &spec) {
                Ok(v) => v,
                Err(diags) => {
                    let name = state_path.display().to_string();
                    eprint!("{}", Source::new(&name, &text).render_all(&diags));
                    return Ok(ExitCode::from(1));
                }
            }
        }
        None => (Observed::all_up(&spec), Time::ZERO),
    };
    for (names, state) in [(down, NodeState::Down), (standby, NodeState::Standby)] {
        for n in names {
            if !spec.nodes.iter().any(|x| &x.name == n) {
                let known: Vec<&str> = spec.nodes.iter().map(|x| x.name.as_str()).collect();
                bail!("unknown node `{n}` (the definition's nodes are: {})", known.join(", "));
            }
            observed.nodes.insert(n.clone(), state);
        }
    }
    let plan = understudy_core::plan(&spec, &observed, now);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan).context("cannot render the plan as JSON")?
        );
    } else {
        print!("{}", understudy_core::render::plan_text(&plan));
    }
    Ok(ExitCode::SUCCESS)
}
