//! `understudy demo`: a local 3-node cluster on the embedded coordinator.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use understudy_agent::local::LocalCluster;

use crate::context::demo_dir;

const DEFINITION: &str = include_str!("demo_cluster.toml");
const STANDIN: &str = include_str!("demo_standin.sh");
const NODES: [&str; 3] = ["node1", "node2", "node3"];
/// Like systemd's `Restart=on-failure` with `RestartSec=5`.
const RESTART_AFTER: Duration = Duration::from_secs(5);

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

pub fn run() -> Result<()> {
    let dir = demo_dir();
    let pid_file = dir.join("demo.pid");
    if let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        && pid_alive(pid)
    {
        bail!("a demo is already running (pid {pid}, in {})", dir.display());
    }
    // A leftover from a demo that was killed: start afresh.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clean {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = dir.join("cluster.toml");
    std::fs::write(&config, DEFINITION)?;
    let standin = dir.join("standin");
    std::fs::write(&standin, STANDIN)?;
    std::fs::set_permissions(&standin, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))?;

    let result = run_in(&dir, &config);
    let _ = std::fs::remove_dir_all(&dir);
    println!("demo stopped; {} removed", dir.display());
    result
}

fn run_in(dir: &Path, config: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the understudy binary")?;
    let mut cluster = LocalCluster::new(&exe, dir, config);
    println!("understudy demo: a 3-node cluster on this host (embedded coordinator)");
    println!("  definition: {}", config.display());
    // The store is created explicitly, as `understudy init` does for a real cluster.
    cluster.init().context("cannot create the demo's coordinator")?;
    for node in NODES {
        let pid = cluster.start(node)?;
        println!("  {node}: agent pid {pid:<7} log {}", cluster.log_path(node).display());
    }
    println!();
    println!("In another terminal (no flags needed, the CLI finds this demo):");
    println!("  understudy status --watch      # nodes, groups, resources, live");
    println!("  understudy events --follow     # who started what, when, why");
    println!(
        "  kill -9 $(cat {}/node1/agent.pid)   # crash node1's agent; watch `web` move",
        dir.display()
    );
    println!("  understudy move web --to node3");
    println!("  understudy maintenance on      # freeze everything; `off` to resume");
    println!("or point other tools at it with:");
    println!("  export UNDERSTUDY_CONFIG={}", config.display());
    println!();
    println!(
        "Agents that die are restarted after {}s, as systemd would. Ctrl-C stops the demo.",
        RESTART_AFTER.as_secs()
    );

    let rt = crate::context::runtime()?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
        let mut dead: Vec<(String, Instant)> = Vec::new();
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = hup.recv() => break,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            for (node, status) in cluster.reap() {
                println!(
                    "{node}'s agent exited ({status}); restarting it in {}s",
                    RESTART_AFTER.as_secs()
                );
                dead.push((node, Instant::now()));
            }
            let mut still = Vec::new();
            for (node, since) in dead.drain(..) {
                if since.elapsed() >= RESTART_AFTER {
                    match cluster.start(&node) {
                        Ok(pid) => println!("{node}'s agent restarted, pid {pid}"),
                        Err(e) => println!("cannot restart {node}'s agent: {e}"),
                    }
                } else {
                    still.push((node, since));
                }
            }
            dead = still;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    println!("\nstopping the agents (each stops its resources in order)…");
    cluster.stop_all(Duration::from_secs(30));
    Ok(())
}
