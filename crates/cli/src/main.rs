//! The `understudy` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

mod admin;
mod context;
mod definition;
mod demo;
mod events;
mod membership;
mod status;

#[derive(Parser)]
#[command(name = "understudy", version, about = "A failover cluster manager for Linux")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
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
    /// Create the embedded coordinator's store for a definition (and its
    /// directory). Nothing else creates it; an existing store is kept. Run
    /// once, before the first agent starts; on etcd there is nothing to do.
    Init {
        /// The cluster definition (default: $UNDERSTUDY_CONFIG, a running demo's, /etc/understudy/cluster.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run this node's agent (foreground; SIGTERM moves its groups away, then exits).
    ///
    /// The agent waits, retrying with a backoff, while its coordinator cannot
    /// be opened or is not the store this node was a member of; it never
    /// exits for that. Exit status: 0 after SIGTERM/SIGINT, 2 for an invalid
    /// definition, an unknown node or a resource this build cannot run, 3
    /// (touching nothing) when another agent already runs this node, on this
    /// host or registered from another.
    Agent {
        /// The cluster definition (default: $UNDERSTUDY_CONFIG, a running demo's, /etc/understudy/cluster.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// This node's name in the definition.
        #[arg(long)]
        node: String,
        /// Where the agent keeps logs and process records.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Join the embedded store even if it is not the one this node was
        /// a member of (the store was re-created with `understudy init`).
        /// Only once every node of the old store is stopped.
        #[arg(long)]
        join_new_store: bool,
    },
    /// Kill what earlier runs of a node's agent left running (its resource
    /// cgroups and recorded processes). Run by systemd after the agent
    /// stopped; exits 3 while an agent for the node runs.
    Sweep {
        /// The node's name.
        #[arg(long)]
        node: String,
        /// The agent's state directory.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Nodes, groups, owners, resources and their last monitor results.
    Status {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Keep watching and redraw on every change.
        #[arg(long)]
        watch: bool,
    },
    /// Move a group to another node (the best other one when --to is not given).
    Move {
        group: String,
        #[arg(long, value_name = "NODE")]
        to: Option<String>,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Freeze the cluster (or one group): nothing is started, stopped or
    /// failed over; monitors still report (S2.3d).
    Maintenance {
        #[arg(value_enum)]
        state: OnOff,
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// The event journal: who started what, when, why.
    Events {
        /// Keep printing new events.
        #[arg(long)]
        follow: bool,
        /// How many past events to print.
        #[arg(short = 'n', long, default_value_t = 50)]
        last: usize,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run a local 3-node demo cluster until Ctrl-C.
    Demo,
    /// Internal: the fence guard revokes a dead agent's session with this,
    /// once it has taken everything away.
    #[command(hide = true)]
    RevokeSession {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(long)]
        lease: i64,
    },
    /// Internal: the fence guard process started by each agent.
    #[command(hide = true)]
    FenceGuard {
        /// Append a JSON line here each time it fires (the agent journals it).
        #[arg(long)]
        report: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { file } => definition::check(&file),
        Command::Plan {
            file,
            down,
            standby,
            state,
            json,
        } => definition::plan(&file, &down, &standby, state.as_deref(), json),
        Command::FenceGuard { report } => understudy_agent::guard::run(report.as_deref())
            .map(|()| ExitCode::SUCCESS)
            .context("fence guard"),
        Command::Demo => demo::run().map(|()| ExitCode::SUCCESS),
        Command::Init { config } => context::runtime()
            .and_then(|rt| rt.block_on(context::init(config.as_deref())))
            .map(|()| ExitCode::SUCCESS),
        Command::Agent {
            config,
            node,
            state_dir,
            join_new_store,
        } => agent(config, node, state_dir, join_new_store),
        Command::Sweep { node, state_dir } => sweep(&node, state_dir),
        Command::RevokeSession { config, lease } => with_cluster(config, |c| async move {
            tokio::time::timeout(c.spec.settings.lease_ttl, c.coord.revoke(lease))
                .await
                .context("the coordinator did not answer in time")?
                .context("cannot revoke the session")
        }),
        Command::Status { config, json, watch } => {
            with_cluster(config, |c| async move { status::run(&c, json, watch).await })
        }
        Command::Move { group, to, config } => {
            with_cluster(
                config,
                |c| async move { admin::move_group(&c, &group, to.as_deref()).await },
            )
        }
        Command::Maintenance { state, group, config } => with_cluster(config, |c| async move {
            admin::maintenance(&c, matches!(state, OnOff::On), group.as_deref()).await
        }),
        Command::Events { follow, last, config } => {
            with_cluster(config, |c| async move { events::run(&c, last, follow).await })
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("understudy: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Opens the cluster's coordinator and runs `f` on a current-thread runtime.
fn with_cluster<F, Fut>(config: Option<PathBuf>, f: F) -> Result<ExitCode>
where
    F: FnOnce(context::Cluster) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let rt = context::runtime()?;
    rt.block_on(async {
        let cluster = context::open(config.as_deref()).await?;
        f(cluster).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn agent(config: Option<PathBuf>, node: String, state_dir: Option<PathBuf>, join_new_store: bool) -> Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let definition = context::load(config.as_deref())?;
    if !definition.spec.nodes.iter().any(|n| n.name == node) {
        let known: Vec<&str> = definition.spec.nodes.iter().map(|n| n.name.as_str()).collect();
        anyhow::bail!(
            "node `{node}` is not in the definition (its nodes are: {})",
            known.join(", ")
        );
    }
    let state_dir = state_dir.unwrap_or_else(|| default_state_dir(&node));
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    let rt = context::runtime()?;
    let result = rt.block_on(async {
        let Some(cluster) = membership::wait_for_store(&definition, &state_dir, join_new_store).await? else {
            tracing::info!("stopped while waiting for the coordinator");
            return Ok(());
        };
        let opts = understudy_agent::AgentOptions {
            spec: cluster.spec,
            node,
            base_dir: cluster.base_dir,
            state_dir,
            guard_exe: std::env::current_exe().context("cannot find the understudy binary")?,
            config: Some(definition.path.clone()),
            keys: cluster.keys,
        };
        understudy_agent::run(opts, Arc::clone(&cluster.coord)).await
    });
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.downcast_ref::<understudy_agent::instance::Refused>().is_some() => {
            // Refused before touching anything: another agent runs this node.
            eprintln!("understudy: {e:#}");
            Ok(ExitCode::from(understudy_agent::instance::EXIT_ALREADY_RUNNING))
        }
        Err(e) => Err(e),
    }
}

fn sweep(node: &str, state_dir: Option<PathBuf>) -> Result<ExitCode> {
    let state_dir = state_dir.unwrap_or_else(|| default_state_dir(node));
    match understudy_agent::sweep(&state_dir, node) {
        Ok(done) => {
            for line in &done {
                println!("{line}");
            }
            if done.is_empty() {
                println!("nothing of node {node} was left running");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ understudy_agent::instance::Refused::Io { .. }) => Err(e.into()),
        Err(e) => {
            eprintln!("understudy: {e}");
            Ok(ExitCode::from(understudy_agent::instance::EXIT_ALREADY_RUNNING))
        }
    }
}

fn default_state_dir(node: &str) -> PathBuf {
    PathBuf::from(format!("/var/lib/understudy/{node}"))
}
