//! The process driver against real processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use common::{GroupGuard, TestEnv, alive, ctx, read_pid, sh, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use understudy_core::spec::{HealthCheck, ProcessSpec};
use understudy_drivers::process::ProcessDriver;
use understudy_drivers::{Driver, DriverEnv, DriverError, Health, ProcessRegistry};

fn spec(command: Vec<String>) -> ProcessSpec {
    ProcessSpec {
        command,
        env: Vec::new(),
        cwd: None,
        user: None,
        stop_signal: "TERM".into(),
        log: None,
        check: None,
    }
}

fn driver(t: &TestEnv, name: &str, spec: &ProcessSpec) -> ProcessDriver {
    ProcessDriver::new(name, spec, Duration::from_secs(2), &t.env)
}

/// Starts `d` and puts its process group under the test's guard.
async fn start(t: &mut TestEnv, d: &ProcessDriver, timeout: Duration) -> Result<i32, DriverError> {
    let r = d.start(&ctx(timeout)).await;
    if let Some(pid) = d.pid().await {
        t.guard.add(pid);
    }
    r?;
    Ok(d.pid().await.expect("a started driver has a pid"))
}

const SHORT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn start_stop_are_idempotent_and_recorded() {
    let mut t = TestEnv::new();
    let d = driver(&t, "sleeper", &spec(vec!["/bin/sleep".into(), "300".into()]));

    assert_eq!(d.probe(&ctx(SHORT)).await, Health::Stopped);
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Stopped);
    d.stop(&ctx(SHORT)).await.unwrap();

    let pid = start(&mut t, &d, SHORT).await.unwrap();
    assert!(alive(pid));
    assert_eq!(t.env.registry.pgids(), vec![pid]);
    let recorded = std::fs::read_to_string(t.state().join("processes")).unwrap();
    assert!(
        recorded.contains(&format!("{pid} ")) && recorded.contains(" sleeper"),
        "{recorded}"
    );

    // Starting again changes nothing.
    start(&mut t, &d, SHORT).await.unwrap();
    assert_eq!(d.pid().await, Some(pid));
    assert_eq!(d.probe(&ctx(SHORT)).await, Health::Running);
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);

    // sleep exits on SIGTERM: no need to wait for the grace period.
    let began = Instant::now();
    d.stop(&ctx(Duration::from_secs(10))).await.unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        began.elapsed()
    );
    assert!(!alive(pid));
    assert_eq!(d.pid().await, None);
    assert!(t.env.registry.pgids().is_empty());
    assert_eq!(*t.changes.lock().unwrap(), vec![vec![pid], vec![]]);

    d.stop(&ctx(SHORT)).await.unwrap();
    assert_eq!(d.probe(&ctx(SHORT)).await, Health::Stopped);
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Stopped);
}

#[tokio::test]
async fn stop_escalates_to_sigkill_when_term_is_ignored() {
    let mut t = TestEnv::new();
    let mut s = spec(sh("trap '' TERM; touch ready; exec sleep 300"));
    // The check makes sure the trap is in place before we stop it.
    s.check = Some(HealthCheck::Command(sh("test -f ready")));
    let d = driver(&t, "stubborn", &s);
    let pid = start(&mut t, &d, SHORT).await.unwrap();

    let grace = Duration::from_millis(500);
    let began = Instant::now();
    d.stop(&ctx(grace)).await.unwrap();
    let took = began.elapsed();
    assert!(
        took >= grace,
        "stopped after {took:?}, before the grace period ended: TERM was not ignored"
    );
    assert!(took < grace + Duration::from_secs(3), "stop took {took:?}");
    assert!(!alive(pid));
    assert!(t.env.registry.pgids().is_empty());
}

#[tokio::test]
async fn monitor_detects_a_killed_or_exited_process_and_start_restarts_it() {
    let mut t = TestEnv::new();
    let d = driver(&t, "victim", &spec(vec!["/bin/sleep".into(), "300".into()]));
    let pid = start(&mut t, &d, SHORT).await.unwrap();

    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let health = until_not_running(&d).await;
    assert_eq!(health, Health::Failed("was killed by signal SIGKILL".into()));
    assert_eq!(d.probe(&ctx(SHORT)).await, Health::Stopped);

    // Start after a death starts a new process.
    let pid2 = start(&mut t, &d, SHORT).await.unwrap();
    assert_ne!(pid, pid2);
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);
    d.stop(&ctx(SHORT)).await.unwrap();

    // An exit status is reported as such.
    let flag = t.path("exit-now");
    let d = driver(
        &t,
        "quitter",
        &spec(sh(&format!(
            "while [ ! -f {} ]; do sleep 0.02; done; exit 3",
            flag.display()
        ))),
    );
    start(&mut t, &d, SHORT).await.unwrap();
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);
    std::fs::write(&flag, "").unwrap();
    let health = until_not_running(&d).await;
    assert_eq!(health, Health::Failed("exited with status 3".into()));
    d.stop(&ctx(SHORT)).await.unwrap();
    assert!(t.env.registry.pgids().is_empty());
}

/// Polls `monitor` until it stops saying `Running` (bounded) and returns
/// what it said last.
async fn until_not_running(d: &ProcessDriver) -> Health {
    let deadline = Instant::now() + SHORT;
    loop {
        let health = d.monitor(&ctx(SHORT)).await;
        if health != Health::Running || Instant::now() >= deadline {
            return health;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn tcp_check_gates_start() {
    let mut t = TestEnv::new();

    // A listener that is already there: start succeeds at once.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut s = spec(vec!["/bin/sleep".into(), "300".into()]);
    s.check = Some(HealthCheck::Tcp(addr.clone()));
    let d = driver(&t, "tcp-ok", &s);
    start(&mut t, &d, SHORT).await.unwrap();
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);
    d.stop(&ctx(SHORT)).await.unwrap();

    // Nobody listens: start fails within its timeout and leaves nothing behind.
    drop(listener);
    let d = driver(&t, "tcp-never", &s);
    let began = Instant::now();
    let err = start(&mut t, &d, Duration::from_millis(600)).await.unwrap_err();
    assert!(began.elapsed() < Duration::from_secs(4), "took {:?}", began.elapsed());
    let msg = err.to_string();
    assert!(
        msg.contains("check did not pass within") && msg.contains(&addr),
        "{msg}"
    );
    assert_eq!(d.pid().await, None);
    assert!(t.env.registry.pgids().is_empty());
    assert!(t.guard.0.iter().all(|&p| !alive(p)));

    // The listener appears later: start returns only after it did.
    let bound = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&bound);
    let later = addr.clone();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        flag.store(true, Ordering::SeqCst);
        TcpListener::bind(later)
    });
    let d = driver(&t, "tcp-later", &s);
    start(&mut t, &d, SHORT).await.unwrap();
    assert!(bound.load(Ordering::SeqCst), "start returned before the port was open");
    let _listener = opener.join().unwrap().unwrap();
    d.stop(&ctx(SHORT)).await.unwrap();
}

#[tokio::test]
async fn command_check_gates_start_and_monitor() {
    let mut t = TestEnv::new();
    let mut s = spec(sh("sleep 0.3; touch ready; exec sleep 300"));
    s.check = Some(HealthCheck::Command(sh("test -f ready && test ! -f broken")));
    let d = driver(&t, "cmd", &s);
    start(&mut t, &d, SHORT).await.unwrap();
    assert!(
        t.base().join("ready").exists(),
        "start returned before the check could pass"
    );
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);

    std::fs::write(t.base().join("broken"), "").unwrap();
    match d.monitor(&ctx(SHORT)).await {
        Health::Failed(reason) => assert!(reason.contains("exited with status 1"), "{reason}"),
        other => panic!("monitor said {other:?}"),
    }
    d.stop(&ctx(SHORT)).await.unwrap();

    // A check that hangs is bounded by the operation's timeout (and killed).
    let mut s = spec(vec!["/bin/sleep".into(), "300".into()]);
    s.check = Some(HealthCheck::Command(sh("echo $$ > check.pid; exec sleep 300")));
    let d = driver(&t, "hang", &s);
    let began = Instant::now();
    let err = start(&mut t, &d, Duration::from_millis(500)).await.unwrap_err();
    assert!(began.elapsed() < Duration::from_secs(4), "took {:?}", began.elapsed());
    assert!(err.to_string().contains("timed out"), "{err}");
    let check_pid = read_pid(&t.base().join("check.pid"));
    assert!(!alive(check_pid), "the hung check was not killed");
}

#[tokio::test]
async fn start_reports_an_early_exit_with_status_and_log() {
    let mut t = TestEnv::new();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut s = spec(sh("echo about to fail; echo boom-on-stderr >&2; exit 7"));
    s.check = Some(HealthCheck::Tcp(port.to_string()));
    let d = driver(&t, "crasher", &s);
    let err = start(&mut t, &d, SHORT).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("exited with status 7"), "{msg}");
    assert!(msg.contains("boom-on-stderr") && msg.contains("about to fail"), "{msg}");
    assert!(
        !msg.contains("understudy: starting"),
        "the header is not the process's output: {msg}"
    );
    assert!(t.env.registry.pgids().is_empty());
}

#[tokio::test]
async fn output_env_cwd_and_relative_command() {
    let mut t = TestEnv::new();
    t.script(
        "run.sh",
        "echo \"out $UNDERSTUDY_NODE $UNDERSTUDY_GROUP $UNDERSTUDY_RESOURCE $UNDERSTUDY_TOKEN $MYVAR\"\n\
         echo \"err in $(pwd)\" >&2\n\
         exec sleep 300",
    );
    let mut s = spec(vec!["./run.sh".into()]);
    s.env = vec![("MYVAR".into(), "hello".into())];
    let d = driver(&t, "logged", &s);
    assert_eq!(d.log_path(), t.state().join("logs/logged.log"));
    let log = d.log_path().to_path_buf();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();

    start(&mut t, &d, SHORT).await.unwrap();
    assert!(wait_until(SHORT, || read().contains("err in")), "log: {}", read());
    let text = read();
    assert!(text.contains("out node1 g logged 42 hello"), "{text}");
    assert!(text.contains(&format!("err in {}", t.base().display())), "{text}");
    assert!(
        text.lines()
            .next()
            .unwrap()
            .contains("understudy: starting logged: ./run.sh"),
        "{text}"
    );

    // A restart appends.
    d.stop(&ctx(SHORT)).await.unwrap();
    start(&mut t, &d, SHORT).await.unwrap();
    assert!(
        wait_until(SHORT, || read().matches("err in").count() == 2),
        "log: {}",
        read()
    );
    assert_eq!(read().matches("understudy: starting").count(), 2);
    d.stop(&ctx(SHORT)).await.unwrap();

    // `log` and `cwd` relative to the definition's directory.
    std::fs::create_dir_all(t.base().join("work")).unwrap();
    let mut s = spec(sh("pwd; exec sleep 300"));
    s.log = Some("custom/out.log".into());
    s.cwd = Some("work".into());
    let d = driver(&t, "custom", &s);
    assert_eq!(d.log_path(), t.base().join("custom/out.log"));
    start(&mut t, &d, SHORT).await.unwrap();
    let custom = t.base().join("custom/out.log");
    let want = t.base().join("work").display().to_string();
    assert!(
        wait_until(SHORT, || std::fs::read_to_string(&custom)
            .unwrap_or_default()
            .contains(&want)),
        "{}",
        std::fs::read_to_string(&custom).unwrap_or_default()
    );
    d.stop(&ctx(SHORT)).await.unwrap();
}

#[tokio::test]
async fn stop_kills_the_whole_process_group() {
    let mut t = TestEnv::new();
    let gc_file = t.path("gc.pid");
    let d = driver(
        &t,
        "family",
        &spec(sh(&format!("sleep 300 & echo $! > {}; wait", gc_file.display()))),
    );
    let pid = start(&mut t, &d, SHORT).await.unwrap();
    let grandchild = read_pid(&gc_file);
    assert!(alive(grandchild));
    d.stop(&ctx(SHORT)).await.unwrap();
    assert!(!alive(pid));
    assert!(!alive(grandchild), "the grandchild survived stop");

    // The leader exits by itself and leaves a child behind: stop still
    // clears the group.
    std::fs::remove_file(&gc_file).unwrap();
    let d = driver(
        &t,
        "orphaner",
        &spec(sh(&format!("sleep 300 & echo $! > {}; exit 0", gc_file.display()))),
    );
    start(&mut t, &d, SHORT).await.unwrap();
    let straggler = read_pid(&gc_file);
    let health = until_not_running(&d).await;
    assert_eq!(health, Health::Failed("exited with status 0".into()));
    assert!(alive(straggler));
    d.stop(&ctx(SHORT)).await.unwrap();
    assert!(!alive(straggler), "the straggler survived stop");
}

#[tokio::test]
async fn http_check() {
    let mut t = TestEnv::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let status = Arc::new(AtomicU16::new(200));
    let answer = Arc::clone(&status);
    let requests = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = Arc::clone(&requests);
    // Lives until the test binary exits; it only ever talks to this test.
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            seen.lock().unwrap().push(head);
            let code = answer.load(Ordering::SeqCst);
            let _ = write!(stream, "HTTP/1.0 {code} Whatever\r\nContent-Length: 0\r\n\r\n");
        }
    });

    let mut s = spec(vec!["/bin/sleep".into(), "300".into()]);
    s.check = Some(HealthCheck::Http(format!("http://{addr}/health?deep=1")));
    let d = driver(&t, "web", &s);
    start(&mut t, &d, SHORT).await.unwrap();
    assert_eq!(d.monitor(&ctx(SHORT)).await, Health::Running);
    {
        let reqs = requests.lock().unwrap();
        let first = reqs.first().unwrap();
        assert!(first.starts_with("GET /health?deep=1 HTTP/1.0\r\n"), "{first}");
        assert!(first.contains(&format!("Host: {addr}\r\n")), "{first}");
    }

    status.store(503, Ordering::SeqCst);
    match d.monitor(&ctx(SHORT)).await {
        Health::Failed(reason) => assert!(reason.contains("status 503"), "{reason}"),
        other => panic!("monitor said {other:?}"),
    }
    d.stop(&ctx(SHORT)).await.unwrap();
}

#[tokio::test]
async fn runs_as_another_user() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let Some(nobody) = nix::unistd::User::from_name("nobody").unwrap() else {
        eprintln!("skipped: no user `nobody`");
        return;
    };
    let mut t = TestEnv::new();
    let mut s = spec(sh("echo \"uid=$(id -u) gid=$(id -g) home=$HOME\"; exec sleep 300"));
    s.user = Some("nobody".into());
    s.cwd = Some("/".into());
    let d = driver(&t, "unprivileged", &s);
    start(&mut t, &d, SHORT).await.unwrap();
    let want = format!("uid={} gid={} home={}", nobody.uid, nobody.gid, nobody.dir.display());
    let log = d.log_path().to_path_buf();
    assert!(
        wait_until(SHORT, || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&want)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    d.stop(&ctx(SHORT)).await.unwrap();

    let mut s = spec(vec!["/bin/true".into()]);
    s.user = Some("no-such-user-here".into());
    let err = driver(&t, "ghost", &s).start(&ctx(SHORT)).await.unwrap_err();
    assert!(err.to_string().contains("no such user"), "{err}");
}

/// The environment variable that turns this test binary into a stand-in agent.
const AGENT_DIR: &str = "UNDERSTUDY_TEST_AGENT_DIR";

/// Not a test of its own: run by `child_dies_with_the_agent` as a separate
/// process (the stand-in agent). Starts a process, records its pid, sleeps.
#[test]
fn stand_in_agent() {
    let Some(dir) = std::env::var_os(AGENT_DIR) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let env = DriverEnv {
            base_dir: dir.clone(),
            state_dir: dir.join("state"),
            registry: Arc::new(ProcessRegistry::new(&dir.join("state"), Box::new(|_| {}))),
            sync: None,
        };
        let d = ProcessDriver::new("orphan", &spec(vec!["/bin/sleep".into(), "300".into()]), SHORT, &env);
        d.start(&ctx(SHORT)).await.unwrap();
        let pid = d.pid().await.unwrap();
        std::fs::write(dir.join("child.pid.tmp"), pid.to_string()).unwrap();
        std::fs::rename(dir.join("child.pid.tmp"), dir.join("child.pid")).unwrap();
        tokio::time::sleep(Duration::from_secs(600)).await;
    });
}

/// Kills the helper process on drop.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn child_dies_with_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut guard = GroupGuard::default();
    let mut agent = ChildGuard(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "stand_in_agent", "--nocapture", "--test-threads=1"])
            .env(AGENT_DIR, dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = read_pid(&dir.path().join("child.pid"));
    guard.add(child);
    assert!(alive(child));

    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    assert!(
        wait_until(SHORT, || !alive(child)),
        "the process outlived the agent that started it"
    );
}
