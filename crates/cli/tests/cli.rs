//! The `understudy` binary as a user runs it: exit codes, diagnostics format,
//! JSON output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn understudy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(args)
        .output()
        .expect("run understudy")
}

fn profile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles/sigmasystemcenter-2.1/cluster.toml")
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("understudy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_accepts_the_profile_with_exit_0() {
    let out = understudy(&["check", profile().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok: cluster `sigmasystemcenter`, 2 nodes, 1 group"),
        "{stdout}"
    );
}

#[test]
fn check_reports_every_error_with_file_line_column_and_exits_1() {
    let text = "\
[cluster]
name = \"c\"

[[node]]
name = \"n1\"
address = \"10.0.0.1/24\"

[group.g.resource.a]
kind = \"process\"
command = [\"/bin/true\"]
depends_on = [\"b\"]
restart = 3

[group.g.resource.b]
kind = \"process\"
command = [\"/bin/true\"]
depends_on = [\"a\"]
start_timeout = \"soon\"
";
    let path = temp_file("bad.toml", text);
    let out = understudy(&["check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    for expected in [
        format!("{file}:11:15: error[E005]: dependency cycle: a -> b -> a"),
        format!("{file}:12:1: error[E002]: unknown key `restart` in resource `a`"),
        format!("{file}:18:17: error[E010]: invalid duration for `start_timeout`"),
    ] {
        assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    }
    assert!(stderr.contains("hint:"), "{stderr}");
    assert!(stderr.contains("3 errors"), "{stderr}");
}

#[test]
fn check_on_a_missing_file_says_so_and_exits_2() {
    let out = understudy(&["check", "/nonexistent/cluster.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/cluster.toml"));
}

#[test]
fn plan_prints_waves_and_moves_away_from_a_down_node() {
    let p = profile();
    let out = understudy(&["plan", p.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("group ssc: start on node1"), "{text}");
    assert!(text.contains("  start wave 1: shared-disk, failover-ip"), "{text}");

    let out = understudy(&["plan", p.to_str().unwrap(), "--down", "node1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("group ssc: start on node2"), "{text}");
    assert!(text.contains("clone tomcat: on node2\n"), "{text}");
}

#[test]
fn plan_json_is_machine_readable() {
    let out = understudy(&["plan", profile().to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let g = &v["groups"][0];
    assert_eq!(g["group"], "ssc");
    assert_eq!(g["target"], "node1");
    assert_eq!(g["transition"]["action"], "start");
    assert_eq!(g["start_waves"][0][0], "shared-disk");
}

#[test]
fn plan_rejects_an_unknown_node() {
    let out = understudy(&["plan", profile().to_str().unwrap(), "--down", "node9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown node `node9`"));
}

#[test]
fn plan_is_byte_for_byte_deterministic() {
    let p = profile();
    let a = understudy(&["plan", p.to_str().unwrap(), "--json"]).stdout;
    let b = understudy(&["plan", p.to_str().unwrap(), "--json"]).stdout;
    assert_eq!(a, b);
}

#[test]
fn check_warns_about_a_managed_unit_enabled_at_boot() {
    // PID 1 here is not systemd: a stand-in systemctl answers `is-enabled`.
    let systemctl = temp_file(
        "systemctl",
        "#!/bin/sh\ncase \"$1 $2\" in\n  \"is-enabled nginx.service\") echo enabled; exit 0;;\n  *) echo disabled; exit 1;;\nesac\n",
    );
    std::fs::set_permissions(&systemctl, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let def = temp_file(
        "units.toml",
        "[cluster]\nname = \"c\"\n\n[[node]]\nname = \"n1\"\naddress = \"10.0.0.1/24\"\n\n[[node]]\nname = \"n2\"\naddress = \"10.0.0.2/24\"\n\n\
         [group.g.resource.web]\nkind = \"systemd\"\nunit = \"nginx.service\"\n\n\
         [group.g.resource.cache]\nkind = \"systemd\"\nunit = \"redis.service\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_understudy"))
        .args(["check", def.to_str().unwrap()])
        .env("UNDERSTUDY_SYSTEMCTL", &systemctl)
        .output()
        .unwrap();
    assert!(out.status.success(), "a warning does not fail the check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning[W009]: unit nginx.service of `web` is enabled to start at boot"),
        "{stderr}"
    );
    assert!(stderr.contains("systemctl disable nginx.service"), "{stderr}");
    assert!(
        !stderr.contains("redis.service of"),
        "a disabled unit is fine: {stderr}"
    );
}

#[test]
fn read_commands_never_create_the_store_and_init_does() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        "[cluster]\nname = \"c\"\ncoordinator = { embedded = { path = \"state/coordinator.db\" } }\n\n\
         [[node]]\nname = \"n1\"\naddress = \"10.0.0.1/24\"\n",
    )
    .unwrap();
    let db = dir.path().join("state/coordinator.db");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_understudy"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    for args in [&["status"][..], &["events"], &["maintenance", "on"]] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("no coordinator at {}", db.display())),
            "{stderr}"
        );
        assert!(stderr.contains("understudy init"), "{stderr}");
        assert!(
            !db.exists() && !db.parent().unwrap().exists(),
            "{args:?} created something"
        );
    }
    let out = run(&["init"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("created the embedded coordinator") && stdout.contains("store id"),
        "{stdout}"
    );
    assert!(db.exists());
    let out = run(&["init"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("already holds the embedded coordinator"));
    assert!(run(&["status"]).status.success());
    // A file that is not a store is never overwritten.
    std::fs::write(&db, b"").unwrap();
    let out = run(&["init"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("move it away first"));
}
