//! The script driver against real commands: exit-code mapping, timeouts,
//! logs, the monitor-only and no-status cases.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestEnv, alive, ctx, read_pid, sh};
use understudy_core::spec::ScriptSpec;
use understudy_drivers::script::ScriptDriver;
use understudy_drivers::{Driver, DriverError, Health};

const SHORT: Duration = Duration::from_secs(5);

fn spec(start: Vec<String>, stop: Vec<String>, status: Option<Vec<String>>) -> ScriptSpec {
    ScriptSpec {
        start,
        stop,
        monitor: status,
        env: Vec::new(),
        cwd: None,
    }
}

#[tokio::test]
async fn status_exit_codes_map_to_health() {
    let t = TestEnv::new();
    // The status command exits with whatever `code` holds.
    std::fs::write(t.base().join("code"), "0").unwrap();
    let d = ScriptDriver::new("svc", &spec(vec![], vec![], Some(sh("exit $(cat code)"))), &t.env);
    for (code, want) in [
        ("0", Health::Running),
        ("3", Health::Stopped),
        ("7", Health::Stopped),
        (
            "1",
            Health::Failed("status `/bin/sh -c exit $(cat code)` exited with status 1".into()),
        ),
        (
            "2",
            Health::Failed("status `/bin/sh -c exit $(cat code)` exited with status 2".into()),
        ),
    ] {
        std::fs::write(t.base().join("code"), code).unwrap();
        assert_eq!(d.monitor(&ctx(SHORT)).await, want, "exit {code}");
        assert_eq!(d.probe(&ctx(SHORT)).await, want, "exit {code}");
    }

    // Killed by a signal, or running over the timeout: failed.
    let d = ScriptDriver::new("sig", &spec(vec![], vec![], Some(sh("kill -9 $$"))), &t.env);
    assert_eq!(
        d.monitor(&ctx(SHORT)).await,
        Health::Failed("status `/bin/sh -c kill -9 $$` was killed by signal SIGKILL".into())
    );
    let d = ScriptDriver::new(
        "slow",
        &spec(vec![], vec![], Some(sh("echo $$ > status.pid; exec sleep 300"))),
        &t.env,
    );
    let began = Instant::now();
    match d.monitor(&ctx(Duration::from_millis(300))).await {
        Health::Failed(reason) => assert!(reason.contains("timed out after 300ms"), "{reason}"),
        other => panic!("monitor said {other:?}"),
    }
    assert!(began.elapsed() < Duration::from_secs(3), "took {:?}", began.elapsed());
    assert!(
        !alive(read_pid(&t.base().join("status.pid"))),
        "the hung status command survived"
    );
}

#[tokio::test]
async fn start_and_stop_succeed_on_zero_and_fail_otherwise() {
    let t = TestEnv::new();
    t.script(
        "ctl.sh",
        "echo \"$UNDERSTUDY_OP $UNDERSTUDY_NODE $UNDERSTUDY_GROUP $UNDERSTUDY_RESOURCE $UNDERSTUDY_TOKEN $MYVAR $(pwd)\"\n\
         case \"$UNDERSTUDY_OP\" in\n\
         start) touch running ;;\n\
         stop) rm -f running ;;\n\
         status) test -f running || exit 3 ;;\n\
         esac",
    );
    let mut s = spec(
        vec!["./ctl.sh".into()],
        vec!["./ctl.sh".into()],
        Some(vec!["./ctl.sh".into()]),
    );
    s.env = vec![("MYVAR".into(), "v".into())];
    let d = ScriptDriver::new("app", &s, &t.env);

    assert_eq!(d.probe(&ctx(SHORT)).await, Health::Stopped);
    d.start(&ctx(SHORT)).await.unwrap();
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);
    d.stop(&ctx(SHORT)).await.unwrap();
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Stopped);
    // Start and stop commands are not left in the registry.
    assert!(t.env.registry.pgids().is_empty());

    let log = std::fs::read_to_string(d.log_path()).unwrap();
    assert_eq!(d.log_path(), t.state().join("logs/app.log"));
    let base = t.base().display().to_string();
    assert!(log.contains(&format!("start node1 g app 42 v {base}")), "{log}");
    assert!(log.contains(&format!("stop node1 g app 42 v {base}")), "{log}");
    assert!(log.contains(&format!("status node1 g app 42 v {base}")), "{log}");
    assert!(log.contains("understudy: start app: ./ctl.sh"), "{log}");
    assert!(log.contains("understudy: stop app: ./ctl.sh"), "{log}");

    // Failure: the message has the code and the command's last output lines.
    let d = ScriptDriver::new(
        "bad",
        &spec(sh("echo first; echo cannot bind port >&2; exit 4"), sh("exit 1"), None),
        &t.env,
    );
    let err = d.start(&ctx(SHORT)).await.unwrap_err();
    assert!(matches!(err, DriverError::Failed { op: "start", .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("exited with status 4"), "{msg}");
    assert!(msg.contains("first") && msg.contains("cannot bind port"), "{msg}");
    let err = d.stop(&ctx(SHORT)).await.unwrap_err();
    assert!(err.to_string().contains("exited with status 1"), "{err}");
    // A start that failed is not running.
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Stopped);
}

#[tokio::test]
async fn a_command_over_its_timeout_is_killed_with_its_group() {
    let t = TestEnv::new();
    let gc_file = t.path("gc.pid");
    let d = ScriptDriver::new(
        "hang",
        &spec(
            sh(&format!("sleep 300 & echo $! > {}; wait", gc_file.display())),
            sh("exec sleep 300"),
            None,
        ),
        &t.env,
    );
    let began = Instant::now();
    let err = d.start(&ctx(Duration::from_millis(500))).await.unwrap_err();
    assert!(began.elapsed() < Duration::from_secs(4), "took {:?}", began.elapsed());
    match err {
        DriverError::Timeout { op, timeout, .. } => {
            assert_eq!(op, "start");
            assert_eq!(timeout, Duration::from_millis(500));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let grandchild = read_pid(&gc_file);
    assert!(!alive(grandchild), "the start command's child survived the timeout");
    assert!(t.env.registry.pgids().is_empty());
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Stopped);

    let err = d.stop(&ctx(Duration::from_millis(300))).await.unwrap_err();
    assert!(matches!(err, DriverError::Timeout { op: "stop", .. }), "{err:?}");
}

#[tokio::test]
async fn a_start_command_may_leave_a_daemon_behind() {
    let t = TestEnv::new();
    let pid_file = t.path("daemon.pid");
    let d = ScriptDriver::new(
        "daemon",
        &spec(
            sh(&format!("sleep 300 >/dev/null 2>&1 & echo $! > {}", pid_file.display())),
            sh(&format!("kill $(cat {})", pid_file.display())),
            // Running while the daemon is there and not a zombie.
            Some(sh(&format!(
                "s=$(cut -d' ' -f3 /proc/$(cat {})/stat 2>/dev/null); [ -n \"$s\" ] && [ \"$s\" != Z ] || exit 7",
                pid_file.display()
            ))),
        ),
        &t.env,
    );
    let mut guard = common::GroupGuard::default();
    d.start(&ctx(SHORT)).await.unwrap();
    let daemon = read_pid(&pid_file);
    guard.add(daemon);
    assert!(alive(daemon), "the daemon did not outlive its start command");
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);
    d.stop(&ctx(SHORT)).await.unwrap();
    assert!(common::wait_until(SHORT, || !alive(daemon)));
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Stopped);
}

#[tokio::test]
async fn without_status_the_driver_remembers_and_monitor_only_does_nothing() {
    let t = TestEnv::new();
    let d = ScriptDriver::new("blind", &spec(sh("true"), sh("true"), None), &t.env);
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Stopped);
    d.start(&ctx(SHORT)).await.unwrap();
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);
    assert_eq!(d.probe(&ctx(SHORT)).await, Health::Running);
    d.stop(&ctx(SHORT)).await.unwrap();
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Stopped);

    // Monitor-only: start and stop run nothing and succeed.
    let marker = t.path("ran");
    let d = ScriptDriver::new(
        "watched",
        &spec(vec![], vec![], Some(sh(&format!("touch {}; exit 0", marker.display())))),
        &t.env,
    );
    d.start(&ctx(SHORT)).await.unwrap();
    d.stop(&ctx(SHORT)).await.unwrap();
    assert!(!marker.exists());
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);
    assert!(marker.exists());
}

#[tokio::test]
async fn a_missing_command_is_a_clear_failure() {
    let t = TestEnv::new();
    let d = ScriptDriver::new(
        "missing",
        &spec(vec!["./nope.sh".into()], vec![], Some(vec!["./nope.sh".into()])),
        &t.env,
    );
    let err = d.start(&ctx(SHORT)).await.unwrap_err().to_string();
    assert!(err.contains("cannot run") && err.contains("nope.sh"), "{err}");
    match d.monitor(&ctx(SHORT)).await {
        Health::Failed(reason) => assert!(reason.contains("nope.sh"), "{reason}"),
        other => panic!("monitor said {other:?}"),
    }
}
