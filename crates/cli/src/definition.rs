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
