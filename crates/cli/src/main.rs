//! The `understudy` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use understudy_config::Source;
use understudy_core::observed::NodeState;
use understudy_core::{ClusterSpec, Observed, Time};

#[derive(Parser)]
#[command(name = "understudy", version, about = "A failover cluster manager for Linux")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a cluster definition; exit 1 with diagnostics when it is invalid.
    Check {
        /// The cluster definition (TOML).
        file: PathBuf,
    },
    /// Show where each group would run and in which order its resources
    /// start and stop.
    Plan {
        /// The cluster definition (TOML).
        file: PathBuf,
        /// Treat this node as down (repeatable).
        #[arg(long, value_name = "NODE")]
        down: Vec<String>,
        /// Treat this node as in standby (repeatable).
        #[arg(long, value_name = "NODE")]
        standby: Vec<String>,
        /// Start from an observed-state file (see the user guide).
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { file } => check(&file),
        Command::Plan {
            file,
            down,
            standby,
            state,
            json,
        } => plan(&file, &down, &standby, state.as_deref(), json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("understudy: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Loads and checks a definition; prints diagnostics to stderr. `None` when invalid.
fn load(path: &Path) -> Result<Option<ClusterSpec>> {
    let text = read(path)?;
    let name = path.display().to_string();
    let checked = understudy_config::check(&text);
    let source = Source::new(&name, &text);
    eprint!("{}", source.render_all(&checked.diagnostics));
    Ok(checked.spec)
}

fn check(path: &Path) -> Result<ExitCode> {
    let Some(spec) = load(path)? else {
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

fn plan(path: &Path, down: &[String], standby: &[String], state: Option<&Path>, json: bool) -> Result<ExitCode> {
    let Some(spec) = load(path)? else {
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
