//! The process registry and leftover killing, against real processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use common::{GroupGuard, alive, group_alive, read_pid};
use understudy_drivers::ProcessRegistry;
use understudy_drivers::registry::{kill_leftovers, registry_file};

/// Field 22 of /proc/PID/stat.
fn start_time(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &text[text.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// Spawns `sh -c script` leading a process group of its own.
fn spawn_group(script: &str, guard: &mut GroupGuard) -> Child {
    let child = Command::new("/bin/sh")
        .args(["-c", script])
        .process_group(0)
        .spawn()
        .unwrap();
    guard.add(i32::try_from(child.id()).unwrap());
    child
}

#[test]
fn records_changes_and_persists_them() {
    let dir = tempfile::tempdir().unwrap();
    let seen: Arc<Mutex<Vec<Vec<i32>>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let reg = ProcessRegistry::new(
        dir.path(),
        Box::new(move |p: &[(&str, i32)]| sink.lock().unwrap().push(p.iter().map(|(_, g)| *g).collect())),
    );
    let me = i32::try_from(std::process::id()).unwrap();

    reg.add("a", me).unwrap();
    reg.add("b", 999_999_999).unwrap(); // no such process: recorded without a start time
    reg.add("a", me).unwrap(); // replaces, keeps the order
    assert_eq!(reg.pgids(), vec![me, 999_999_999]);
    let text = std::fs::read_to_string(registry_file(dir.path())).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        vec![format!("{me} {} a", start_time(me)), "999999999 - b".to_owned()]
    );

    reg.remove("a").unwrap();
    reg.remove("nothing").unwrap(); // not a change
    assert_eq!(reg.pgids(), vec![999_999_999]);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            vec![me],
            vec![me, 999_999_999],
            vec![me, 999_999_999],
            vec![999_999_999]
        ]
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("processes")],
        "temporary file left behind"
    );
}

#[test]
fn a_persistence_failure_is_reported_with_the_path_but_memory_is_updated() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let seen: Arc<Mutex<Vec<Vec<i32>>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let reg = ProcessRegistry::new(
        &not_a_dir,
        Box::new(move |p: &[(&str, i32)]| sink.lock().unwrap().push(p.iter().map(|(_, g)| *g).collect())),
    );
    let err = reg.add("a", 1234).unwrap_err();
    assert!(err.to_string().contains(&not_a_dir.display().to_string()), "{err}");
    assert_eq!(reg.pgids(), vec![1234]);
    assert_eq!(*seen.lock().unwrap(), vec![vec![1234]]);
}

#[test]
fn kill_leftovers_kills_recorded_groups_and_spares_reused_pids() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let mut guard = GroupGuard::default();

    // A leftover with a grandchild in its group.
    let gc_file = dir.path().join("gc.pid");
    let mut leftover = spawn_group(
        &format!("sleep 300 & echo $! > {}; wait", gc_file.display()),
        &mut guard,
    );
    let leftover_pid = i32::try_from(leftover.id()).unwrap();
    let grandchild = read_pid(&gc_file);
    // A process whose pid appears in the file with another start time: a
    // stranger that reuses a pid of ours.
    let mut stranger = spawn_group("exec sleep 300", &mut guard);
    let stranger_pid = i32::try_from(stranger.id()).unwrap();

    {
        let reg = ProcessRegistry::new(state, Box::new(|_| {}));
        reg.add("old-app", leftover_pid).unwrap();
    }
    let mut text = std::fs::read_to_string(registry_file(state)).unwrap();
    text.push_str(&format!("{stranger_pid} {} reused\n", start_time(stranger_pid) + 1));
    text.push_str(&format!("{stranger_pid} - unknown-start\n"));
    text.push_str("999999999 12345 long-gone\n");
    std::fs::write(registry_file(state), text).unwrap();

    let killed = kill_leftovers(state);
    assert_eq!(killed, vec![("old-app".to_owned(), leftover_pid)]);
    assert!(!alive(leftover_pid));
    assert!(!alive(grandchild), "the leftover's grandchild survived");
    assert!(!group_alive(leftover_pid));
    assert!(alive(stranger_pid), "a process that reused a recorded pid was killed");
    assert!(!registry_file(state).exists(), "the registry file was not cleared");

    // Nothing recorded: nothing to do.
    assert!(kill_leftovers(state).is_empty());

    leftover.wait().unwrap();
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}
