//! The files the package ships: the systemd unit parses, and it keeps the
//! settings the agent's containment design relies on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const UNIT: &str = include_str!("../../../packaging/systemd/understudy@.service");

fn setting(key: &str) -> Vec<&'static str> {
    UNIT.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn the_unit_delegates_its_cgroup_and_keeps_the_guard_alive() {
    assert_eq!(setting("Delegate"), ["yes"], "the agent manages its own cgroup subtree");
    assert_eq!(
        setting("KillMode"),
        ["process"],
        "systemd must not kill the fence guard before it has taken things away"
    );
    assert_eq!(setting("Restart"), ["always"]);
    assert_eq!(
        setting("RestartPreventExitStatus"),
        [understudy_agent::instance::EXIT_ALREADY_RUNNING.to_string().as_str()],
        "a refused second agent is not restarted"
    );
    let post = setting("ExecStopPost");
    assert!(post.len() == 1 && post[0].contains(" sweep --node %i"), "{post:?}");
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("systemd-analyze is needed (Debian package `systemd`; .ci/run installs it)");
    let dir = tempfile::tempdir().unwrap();
    // An instance of the template, running the binary under test.
    let unit = UNIT.replace("/usr/bin/understudy", env!("CARGO_BIN_EXE_understudy"));
    let path = dir.path().join("understudy@node1.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(analyze).arg("verify").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed: {stderr}");
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("understudy@node1.service"))
        .collect();
    assert!(complaints.is_empty(), "systemd-analyze complains: {complaints:?}");
}
