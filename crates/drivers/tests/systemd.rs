//! The systemd driver against a stand-in `systemctl`.
//!
//! PID 1 is not systemd where these tests run, so each test writes a small
//! shell script that plays `systemctl` for fake units: a unit is a directory
//! `units/<unit>/` next to the script, its state the file `state`, and a few
//! more files are knobs (fail, hang, stay `activating`, print something
//! odd). Every call is appended to `calls`. What is checked: the command
//! lines, the mapping of states and exit codes, timeouts and escalation, and
//! that `$UNDERSTUDY_SYSTEMCTL` is honoured. Not covered: a real systemd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{TestEnv, ctx, group_alive, read_pid};
use understudy_core::spec::SystemdSpec;
use understudy_drivers::systemd::{SystemdDriver, is_enabled_at_boot, is_enabled_at_boot_with, systemctl_program};
use understudy_drivers::{Driver, DriverError, Health};

const SHORT: Duration = Duration::from_secs(5);

const FAKE_SYSTEMCTL: &str = r#"#!/bin/sh
# Stand-in systemctl: fake units live in $dir/units/<unit>/.
dir=$(dirname "$0")
echo "$*" >> "$dir/calls"
verb=""
unit=""
for a in "$@"; do
    case "$a" in
        --*) ;;
        *) if [ -z "$verb" ]; then verb=$a; else unit=$a; fi ;;
    esac
done
u="$dir/units/$unit"
state() { cat "$u/state" 2>/dev/null || echo inactive; }
knob() { cat "$u/$1" 2>/dev/null; }
case "$verb" in
start)
    [ -d "$u" ] || { echo "Failed to start $unit: Unit $unit not found." >&2; exit 5; }
    if [ -f "$u/start_sleep" ]; then echo $$ > "$u/start.pid"; sleep "$(knob start_sleep)"; fi
    if [ -f "$u/start_fail" ]; then
        echo failed > "$u/state"
        echo "Job for $unit failed because the control process exited with error code." >&2
        exit 1
    fi
    if [ -f "$u/start_state" ]; then cp "$u/start_state" "$u/state"; else echo active > "$u/state"; fi
    exit 0 ;;
stop)
    [ -d "$u" ] || { echo "Failed to stop $unit: Unit $unit not loaded." >&2; exit 5; }
    if [ -f "$u/stop_sleep" ]; then echo $$ > "$u/stop.pid"; sleep "$(knob stop_sleep)"; fi
    [ -f "$u/stop_fail" ] && { echo "Job for $unit canceled." >&2; exit 1; }
    [ "$(state)" = failed ] || echo inactive > "$u/state"
    exit 0 ;;
kill)
    [ -d "$u" ] || { echo "Failed to kill unit $unit: Unit $unit not loaded." >&2; exit 5; }
    [ -f "$u/unkillable" ] && exit 0
    rm -f "$u/stop_sleep" "$u/stop_fail"
    echo failed > "$u/state"
    exit 0 ;;
is-active)
    if [ -f "$u/is_active_sleep" ]; then echo $$ > "$u/is-active.pid"; sleep "$(knob is_active_sleep)"; fi
    if [ -f "$u/is_active_raw" ]; then
        cat "$u/is_active_raw"
        cat "$u/is_active_stderr" >&2 2>/dev/null
        exit "$(knob is_active_code)"
    fi
    s=$(state)
    if [ "$s" = activating ] && [ -f "$u/activating_polls" ]; then
        n=$(knob activating_polls)
        if [ "$n" -le 0 ]; then echo active > "$u/state"; s=active; else echo $((n - 1)) > "$u/activating_polls"; fi
    fi
    echo "$s"
    [ "$s" = active ] && exit 0
    exit 3 ;;
is-enabled)
    [ -f "$u/enabled" ] || { echo "Failed to get unit file state for $unit: No such file or directory" >&2; exit 1; }
    e=$(knob enabled)
    echo "$e"
    case "$e" in enabled|enabled-runtime|static|indirect|generated|alias) exit 0 ;; *) exit 1 ;; esac ;;
show)
    [ -f "$u/show_fail" ] && { echo "Failed to connect to bus: Host is down" >&2; exit 1; }
    knob wanted_by; echo
    knob required_by; echo
    exit 0 ;;
*)
    echo "fake systemctl: unknown verb $verb" >&2
    exit 1 ;;
esac
"#;

/// A stand-in systemctl in a scratch directory.
struct Fake {
    t: TestEnv,
    dir: PathBuf,
}

impl Fake {
    fn new() -> Fake {
        let t = TestEnv::new();
        let dir = t.path("fake");
        std::fs::create_dir_all(dir.join("units")).unwrap();
        let program = dir.join("systemctl");
        std::fs::write(&program, FAKE_SYSTEMCTL).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        // While another test thread forks, its child briefly holds a copy of
        // our write descriptor, and running the script fails with ETXTBSY.
        // Once one run succeeds nobody holds it, and nobody can again.
        let deadline = Instant::now() + SHORT;
        loop {
            match std::process::Command::new(&program).arg("noop").output() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc_etxtbsy()) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("cannot run {}: {e}", program.display()),
            }
        }
        let _ = std::fs::remove_file(dir.join("calls"));
        Fake { t, dir }
    }

    fn program(&self) -> PathBuf {
        self.dir.join("systemctl")
    }

    /// Creates the fake unit `unit` (inactive).
    fn unit(&self, unit: &str) -> PathBuf {
        let u = self.dir.join("units").join(unit);
        std::fs::create_dir_all(&u).unwrap();
        u
    }

    fn set(&self, unit: &str, knob: &str, value: &str) {
        std::fs::write(self.unit(unit).join(knob), format!("{value}\n")).unwrap();
    }

    fn clear(&self, unit: &str, knob: &str) {
        let _ = std::fs::remove_file(self.unit(unit).join(knob));
    }

    fn state(&self, unit: &str) -> String {
        std::fs::read_to_string(self.unit(unit).join("state"))
            .unwrap_or_else(|_| "inactive".into())
            .trim()
            .to_owned()
    }

    /// The calls made so far (arguments only), and forgets them.
    fn take_calls(&self) -> Vec<String> {
        let path = self.dir.join("calls");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        text.lines().map(str::to_owned).collect()
    }

    fn driver(&self, unit: &str) -> SystemdDriver {
        SystemdDriver::with_systemctl("svc", &SystemdSpec { unit: unit.into() }, &self.t.env, self.program()).unwrap()
    }
}

fn libc_etxtbsy() -> i32 {
    nix::errno::Errno::ETXTBSY as i32
}

fn failed_with(h: Health, part: &str) {
    match h {
        Health::Failed(why) => assert!(why.contains(part), "`{why}` does not say `{part}`"),
        other => panic!("expected Failed(… {part} …), got {other:?}"),
    }
}

#[tokio::test]
async fn start_stop_monitor_round_trip() {
    let f = Fake::new();
    f.unit("web.service");
    let d = f.driver("web.service");

    assert_eq!(d.probe(&ctx(SHORT)).await, Health::Stopped);
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Stopped);
    f.take_calls();

    d.start(&ctx(SHORT)).await.unwrap();
    assert_eq!(f.state("web.service"), "active");
    assert_eq!(
        f.take_calls(),
        ["--no-ask-password start web.service", "is-active web.service"]
    );
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);
    assert_eq!(d.probe(&ctx(SHORT)).await, Health::Running);
    // Starting an active unit is systemd's no-op.
    d.start(&ctx(SHORT)).await.unwrap();
    f.take_calls();

    d.stop(&ctx(SHORT)).await.unwrap();
    assert_eq!(f.state("web.service"), "inactive");
    assert_eq!(
        f.take_calls(),
        ["--no-ask-password stop web.service", "is-active web.service"]
    );
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Stopped);
    d.stop(&ctx(SHORT)).await.unwrap();

    // A unit systemd does not know is inactive: stopped, and stopping it works.
    let ghost = f.driver("ghost.service");
    assert_eq!(ghost.monitor(&ctx(SHORT)).await, Health::Stopped);
    ghost.stop(&ctx(SHORT)).await.unwrap();
}

#[tokio::test]
async fn is_active_states_map_to_health() {
    let f = Fake::new();
    let d = f.driver("db.service");
    for (state, monitor, probe) in [
        ("active", Health::Running, Health::Running),
        ("reloading", Health::Running, Health::Running),
        ("inactive", Health::Stopped, Health::Stopped),
        (
            "failed",
            Health::Failed("db.service has failed".into()),
            Health::Stopped,
        ),
        (
            "maintenance",
            Health::Failed("db.service is `maintenance`".into()),
            Health::Failed("db.service is `maintenance`".into()),
        ),
    ] {
        f.set("db.service", "state", state);
        assert_eq!(d.monitor(&ctx(SHORT)).await, monitor, "{state}");
        assert_eq!(d.probe(&ctx(SHORT)).await, probe, "{state}");
    }

    // Between states: asked again until the timeout.
    f.set("db.service", "state", "activating");
    assert_eq!(d.probe(&ctx(SHORT)).await, Health::Running);
    let timeout = Duration::from_secs(1);
    let began = Instant::now();
    failed_with(d.monitor(&ctx(timeout)).await, "still activating after 1s");
    let took = began.elapsed();
    assert!(took >= timeout && took < timeout + Duration::from_secs(1), "{took:?}");
    f.set("db.service", "state", "deactivating");
    failed_with(d.monitor(&ctx(timeout)).await, "still deactivating");
    // … and fine once it gets there.
    f.set("db.service", "state", "activating");
    f.set("db.service", "activating_polls", "2");
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);

    // No state at all: exit 0 is active, anything else a failure that
    // quotes systemctl.
    f.set("db.service", "is_active_raw", "");
    f.set("db.service", "is_active_code", "0");
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);
    f.set("db.service", "is_active_code", "1");
    f.set(
        "db.service",
        "is_active_stderr",
        "Failed to connect to bus: Host is down",
    );
    let h = d.monitor(&ctx(SHORT)).await;
    failed_with(h.clone(), "exited with status 1");
    failed_with(h, "Failed to connect to bus");
}

#[tokio::test]
async fn start_failures_are_reported() {
    let f = Fake::new();

    // No such unit: systemctl's message and status.
    let d = f.driver("nope.service");
    match d.start(&ctx(SHORT)).await {
        Err(DriverError::Failed {
            op: "start", message, ..
        }) => {
            assert!(message.contains("exited with status 5"), "{message}");
            assert!(message.contains("Unit nope.service not found"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // The start job fails.
    f.set("bad.service", "start_fail", "");
    match f.driver("bad.service").start(&ctx(SHORT)).await {
        Err(DriverError::Failed { message, .. }) => {
            assert!(message.contains("Job for bad.service failed"), "{message}")
        }
        other => panic!("{other:?}"),
    }

    // It starts, but is not running afterwards (a oneshot that ended).
    f.set("once.service", "start_state", "inactive");
    match f.driver("once.service").start(&ctx(SHORT)).await {
        Err(DriverError::Failed { message, .. }) => {
            assert!(
                message.contains("once.service is inactive after its start"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }

    // It stays activating past the timeout.
    f.set("slow.service", "start_state", "activating");
    let timeout = Duration::from_secs(1);
    let began = Instant::now();
    match f.driver("slow.service").start(&ctx(timeout)).await {
        Err(DriverError::Failed { message, .. }) => assert!(message.contains("still activating"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(
        began.elapsed() < timeout + Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );

    // Activating for a moment is fine.
    f.set("warm.service", "start_state", "activating");
    f.set("warm.service", "activating_polls", "2");
    f.driver("warm.service").start(&ctx(SHORT)).await.unwrap();
}

#[tokio::test]
async fn a_hung_start_is_killed_at_the_timeout() {
    let f = Fake::new();
    f.set("hang.service", "start_sleep", "300");
    let d = f.driver("hang.service");
    let timeout = Duration::from_millis(500);
    let began = Instant::now();
    match d.start(&ctx(timeout)).await {
        Err(DriverError::Timeout {
            op: "start",
            timeout: t,
            ..
        }) => assert_eq!(t, timeout),
        other => panic!("{other:?}"),
    }
    let took = began.elapsed();
    assert!(took >= timeout && took < timeout + Duration::from_secs(1), "{took:?}");
    // systemctl and what it ran (the fake's sleep) are gone.
    let pid = read_pid(&f.unit("hang.service").join("start.pid"));
    assert!(!group_alive(pid));
}

#[tokio::test]
async fn a_hung_monitor_is_killed_at_the_timeout() {
    let f = Fake::new();
    f.set("mute.service", "is_active_sleep", "300");
    let d = f.driver("mute.service");
    let timeout = Duration::from_millis(500);
    let began = Instant::now();
    failed_with(d.monitor(&ctx(timeout)).await, "did not answer within 500ms");
    let took = began.elapsed();
    assert!(took >= timeout && took < timeout + Duration::from_secs(1), "{took:?}");
    let pid = read_pid(&f.unit("mute.service").join("is-active.pid"));
    assert!(!group_alive(pid));
}

#[tokio::test]
async fn stop_escalates_to_sigkill() {
    let f = Fake::new();

    // `systemctl stop` hangs: after the timeout the unit is killed and
    // stopped again.
    f.set("stuck.service", "state", "active");
    f.set("stuck.service", "stop_sleep", "300");
    let d = f.driver("stuck.service");
    let timeout = Duration::from_millis(500);
    let began = Instant::now();
    d.stop(&ctx(timeout)).await.unwrap();
    let took = began.elapsed();
    assert!(took >= timeout && took < timeout + Duration::from_secs(2), "{took:?}");
    assert_eq!(
        f.take_calls(),
        [
            "--no-ask-password stop stuck.service",
            "kill --signal=SIGKILL stuck.service",
            "--no-ask-password stop stuck.service",
            "is-active stuck.service",
        ]
    );
    assert!(!group_alive(read_pid(&f.unit("stuck.service").join("stop.pid"))));
    // Killed units end up failed; that counts as stopped.
    assert_eq!(f.state("stuck.service"), "failed");

    // `systemctl stop` fails while the unit runs: the same.
    f.set("stuck.service", "state", "active");
    f.set("stuck.service", "stop_fail", "");
    d.stop(&ctx(SHORT)).await.unwrap();
    assert_eq!(
        f.take_calls(),
        [
            "--no-ask-password stop stuck.service",
            "is-active stuck.service",
            "kill --signal=SIGKILL stuck.service",
            "--no-ask-password stop stuck.service",
            "is-active stuck.service",
        ]
    );

    // An urgent stop (zero timeout) kills at once.
    f.set("stuck.service", "state", "active");
    let began = Instant::now();
    d.stop(&ctx(Duration::ZERO)).await.unwrap();
    assert!(began.elapsed() < Duration::from_secs(1), "{:?}", began.elapsed());
    assert_eq!(
        f.take_calls(),
        [
            "kill --signal=SIGKILL stuck.service",
            "--no-ask-password stop stuck.service",
            "is-active stuck.service",
        ]
    );

    // A unit that survives even that: stop fails and says so.
    f.set("stuck.service", "state", "active");
    f.set("stuck.service", "stop_fail", "");
    f.set("stuck.service", "unkillable", "");
    match d.stop(&ctx(SHORT)).await {
        Err(DriverError::Failed {
            op: "stop", message, ..
        }) => {
            assert!(message.contains("still running after SIGKILL"), "{message}");
            assert!(message.contains("Job for stuck.service canceled"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    f.clear("stuck.service", "unkillable");
}

#[test]
fn boot_enablement() {
    let f = Fake::new();
    let sc = f.program();
    for (enabled, want) in [
        ("enabled", Some(true)),
        ("enabled-runtime", Some(true)),
        ("disabled", Some(false)),
        ("masked", Some(false)),
        ("linked", Some(false)),
        ("transient", Some(false)),
        ("bad", None),
    ] {
        f.set("x.service", "enabled", enabled);
        assert_eq!(is_enabled_at_boot_with(&sc, "x.service"), want, "{enabled}");
    }
    // Static units start at boot only when something wants them.
    f.set("x.service", "enabled", "static");
    assert_eq!(is_enabled_at_boot_with(&sc, "x.service"), Some(false));
    f.set("x.service", "wanted_by", "multi-user.target");
    assert_eq!(is_enabled_at_boot_with(&sc, "x.service"), Some(true));
    f.clear("x.service", "wanted_by");
    f.set("x.service", "required_by", "app.service");
    assert_eq!(is_enabled_at_boot_with(&sc, "x.service"), Some(true));
    // … which needs a running systemd to tell.
    f.set("x.service", "show_fail", "");
    assert_eq!(is_enabled_at_boot_with(&sc, "x.service"), None);
    let calls = f.take_calls();
    assert!(calls.contains(&"is-enabled x.service".to_owned()), "{calls:?}");
    assert!(
        calls.contains(&"show --property=WantedBy --property=RequiredBy --value x.service".to_owned()),
        "{calls:?}"
    );

    // Unknown units and unusable systemctls: cannot tell.
    assert_eq!(is_enabled_at_boot_with(&sc, "unknown.service"), None);
    assert_eq!(
        is_enabled_at_boot_with(Path::new("/nonexistent/systemctl"), "x.service"),
        None
    );
    assert_eq!(is_enabled_at_boot_with(Path::new("/bin/false"), "x.service"), None);
}

/// Runs in a child process started by [`environment_names_the_systemctl`]
/// (it does nothing when run directly), so that no test changes its own
/// process's environment.
#[test]
fn child_uses_env_systemctl() {
    let Ok(mode) = std::env::var("UNDERSTUDY_SYSTEMD_TEST_CHILD") else {
        return;
    };
    if mode == "unset" {
        assert_eq!(systemctl_program(), PathBuf::from("systemctl"));
        return;
    }
    let program = PathBuf::from(std::env::var("UNDERSTUDY_SYSTEMCTL").unwrap());
    assert_eq!(systemctl_program(), program);
    let dir = program.parent().unwrap();
    assert_eq!(is_enabled_at_boot("boot.service"), Some(true));
    let t = TestEnv::new();
    let d = understudy_drivers::systemd::SystemdDriver::new(
        "svc",
        &SystemdSpec {
            unit: "boot.service".into(),
        },
        &t.env,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        d.start(&ctx(SHORT)).await.unwrap();
        assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);
    });
    assert_eq!(
        std::fs::read_to_string(dir.join("units/boot.service/state"))
            .unwrap()
            .trim(),
        "active"
    );
}

#[test]
fn environment_names_the_systemctl() {
    let f = Fake::new();
    f.set("boot.service", "enabled", "enabled");
    let me = std::env::current_exe().unwrap();
    for (mode, var) in [("set", Some(f.program())), ("unset", None)] {
        let mut cmd = std::process::Command::new(&me);
        cmd.args(["child_uses_env_systemctl", "--exact", "--nocapture", "--test-threads=1"])
            .env("UNDERSTUDY_SYSTEMD_TEST_CHILD", mode);
        match &var {
            Some(p) => cmd.env("UNDERSTUDY_SYSTEMCTL", p),
            None => cmd.env_remove("UNDERSTUDY_SYSTEMCTL"),
        };
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child ({mode}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(f.state("boot.service"), "active");
}

#[test]
fn unit_names_are_checked() {
    let f = Fake::new();
    for bad in ["", "  ", "-x.service", "a b.service"] {
        let r = SystemdDriver::with_systemctl("svc", &SystemdSpec { unit: bad.into() }, &f.t.env, f.program());
        assert!(matches!(r, Err(DriverError::Failed { op: "configure", .. })), "{bad:?}");
    }
}
