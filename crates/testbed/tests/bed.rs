//! The test bed against the real kernel, iproute2 and etcd. Needs root (CI
//! runs as root); every test builds its own bed, so they run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use understudy_testbed::{Bed, EtcdCluster, Host, NAME_PREFIX, cleanup_leftovers, pause, resume, run, run_ok};

const SHORT: Duration = Duration::from_millis(300);

fn reaches(from: &Host, to: &Host, port: u16) -> bool {
    from.tcp_connect((to.addr(), port), SHORT).is_ok()
}

/// Polls `f` until it holds, for at most `bound`.
fn eventually(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn netns_list() -> Vec<String> {
    let out = run_ok(Command::new("ip").args(["netns", "list"]), SHORT * 10).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Pids of processes whose command line mentions `needle`.
fn pids_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// `/proc/PID/stat`'s state letter.
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Everything a bed leaves on the machine, to check it is gone.
struct Traces {
    prefix: String,
    dir: PathBuf,
    registry: PathBuf,
    pids: Vec<u32>,
}

impl Traces {
    fn of(bed: &Bed, pids: Vec<u32>) -> Traces {
        Traces {
            prefix: bed.prefix().to_owned(),
            dir: bed.temp_dir().to_owned(),
            registry: Path::new("/run/understudy-testbed").join(bed.id()),
            pids,
        }
    }

    fn assert_present(&self) {
        assert!(netns_list().iter().any(|n| n.starts_with(&self.prefix)));
        assert!(self.dir.is_dir());
        assert!(self.registry.is_file());
        for &pid in &self.pids {
            assert!(Path::new(&format!("/proc/{pid}")).exists(), "pid {pid}");
        }
    }

    fn assert_gone(&self) {
        let left: Vec<String> = netns_list()
            .into_iter()
            .filter(|n| n.starts_with(&self.prefix))
            .collect();
        assert!(left.is_empty(), "namespaces left: {left:?}");
        assert!(!self.dir.exists(), "{} left", self.dir.display());
        assert!(!self.registry.exists(), "{} left", self.registry.display());
        for &pid in &self.pids {
            // Reaped by the bed, so the pid is gone (not even a zombie).
            assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process {pid} left");
        }
        let dir = self.dir.to_string_lossy();
        assert_eq!(pids_mentioning(&dir), Vec::<u32>::new(), "etcd left");
    }
}

#[test]
fn two_hosts_reach_each_other() {
    let bed = Bed::new("reach").unwrap();
    let a = bed.add_host("a").unwrap();
    let b = bed.add_host("b").unwrap();
    assert!(a.netns().starts_with(bed.prefix()));
    assert!(bed.prefix().starts_with(NAME_PREFIX));
    assert_eq!(a.addr(), bed.address(1));
    assert_eq!(b.addr(), bed.address(2));

    // In-process sockets made inside the namespaces.
    let listener = b.tcp_listen(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut out = a.tcp_connect((b.addr(), port), SHORT).unwrap();
    let (mut conn, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), a.addr());
    out.write_all(b"ping").unwrap();
    let mut buf = [0; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    // A process started in host a (bash's /dev/tcp).
    let script = format!("exec 3<>/dev/tcp/{}/{port} && echo hello >&3", b.addr());
    let done = a.bash(&script, Duration::from_secs(5)).unwrap();
    assert!(done.status.success(), "{done:?}");
    let (mut conn, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), a.addr());
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    assert_eq!(text, "hello\n");

    // Commands see the host's interfaces, not the machine's.
    let mut show = a.command("ip");
    show.args(["-o", "-4", "addr", "show"]);
    let shown = String::from_utf8(run_ok(&mut show, SHORT * 10).unwrap().stdout).unwrap();
    assert!(shown.contains(&format!("eth0    inet {}", a.cidr())), "{shown}");
    assert!(shown.contains("lo    inet 127.0.0.1/8"), "{shown}");
    assert_eq!(shown.lines().count(), 2, "{shown}");
}

fn machine_view() -> (BTreeSet<String>, String, String) {
    let text = |args: &[&str]| {
        let out = run_ok(Command::new("ip").args(args), SHORT * 10).unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let links = text(&["-o", "link"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(str::to_owned)
        .collect();
    (links, text(&["-o", "addr"]), text(&["route", "show", "table", "all"]))
}

#[test]
fn machine_namespace_gets_nothing() {
    let before = machine_view();
    let bed = Bed::new("untouched").unwrap();
    let a = bed.add_host("a").unwrap();
    let b = bed.add_host("b").unwrap();
    let c = bed.add_host("c").unwrap();
    bed.cut(&c).unwrap();
    bed.cut_between(&a, &b).unwrap();
    let during = machine_view();
    assert_eq!(before.0, during.0, "interfaces changed");
    assert_eq!(before.1, during.1, "addresses changed");
    assert_eq!(before.2, during.2, "routes changed");
    assert!(!during.1.contains("10.213."));
    assert!(!during.2.contains("10.213."));
    drop(bed);
    assert_eq!(before, machine_view());
}

#[test]
fn cut_and_restore_a_host() {
    let bed = Bed::new("cut").unwrap();
    let a = bed.add_host("a").unwrap();
    let b = bed.add_host("b").unwrap();
    let listener = b.tcp_listen(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let _listener_a = a.tcp_listen(port).unwrap();
    assert!(reaches(&a, &b, port));
    assert!(reaches(&b, &a, port));

    bed.cut(&b).unwrap();
    let err = a.tcp_connect((b.addr(), port), SHORT).unwrap_err();
    eprintln!("while cut: {err}");
    assert!(!reaches(&b, &a, port), "b is cut off both ways");

    bed.restore(&b).unwrap();
    assert!(eventually(Duration::from_secs(5), || reaches(&a, &b, port)));

    // restore_all undoes a cut as well.
    bed.cut(&a).unwrap();
    assert!(!reaches(&a, &b, port));
    bed.restore_all().unwrap();
    assert!(eventually(Duration::from_secs(5), || reaches(&a, &b, port)));
}

#[test]
fn cut_between_blocks_only_that_pair() {
    let bed = Bed::new("pair").unwrap();
    let a = bed.add_host("a").unwrap();
    let b = bed.add_host("b").unwrap();
    let c = bed.add_host("c").unwrap();
    let listeners: Vec<_> = [&a, &b, &c].iter().map(|h| h.tcp_listen(7000).unwrap()).collect();
    assert!(reaches(&a, &b, 7000) && reaches(&b, &a, 7000));

    bed.cut_between(&a, &b).unwrap();
    // Silently dropped: the connect times out rather than failing at once.
    let started = Instant::now();
    let err = a.tcp_connect((b.addr(), 7000), SHORT).unwrap_err();
    assert!(started.elapsed() >= SHORT, "failed fast: {err}");
    assert!(!reaches(&b, &a, 7000));
    assert!(reaches(&a, &c, 7000) && reaches(&c, &a, 7000));
    assert!(reaches(&b, &c, 7000) && reaches(&c, &b, 7000));
    assert!(bed.cut_between(&a, &a).is_err());

    bed.restore_between(&b, &a).unwrap();
    assert!(eventually(Duration::from_secs(5), || reaches(&a, &b, 7000)));
    assert!(reaches(&b, &a, 7000));
    // Restoring a pair that is not cut is a no-op.
    bed.restore_between(&a, &c).unwrap();
    drop(listeners);
}

fn etcdctl(etcd: &EtcdCluster, from: &Host, args: &[&str]) -> understudy_testbed::Result<String> {
    let mut cmd = etcd.etcdctl(from);
    cmd.arg("--command-timeout=1s").args(args);
    let out = run_ok(&mut cmd, Duration::from_secs(5))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn etcd_three_members_keep_and_lose_quorum() {
    let started = Instant::now();
    let bed = Bed::new("etcd3").unwrap();
    let client = bed.add_host("client").unwrap();
    let etcd = bed.start_etcd(3).unwrap();
    eprintln!("3-member etcd healthy after {:?}", started.elapsed());
    assert_eq!(etcd.len(), 3);
    assert_eq!(
        etcd.endpoints(),
        etcd.hosts()
            .iter()
            .map(|h| format!("http://{}:2379", h.addr()))
            .collect::<Vec<_>>()
    );
    assert!(etcd.hosts().iter().all(|h| h.netns().starts_with(bed.prefix())));

    etcdctl(&etcd, &client, &["put", "k", "v1"]).unwrap();
    assert_eq!(
        etcdctl(&etcd, &client, &["get", "k", "--print-value-only"]).unwrap(),
        "v1\n"
    );

    // Losing the leader leaves a quorum: a new leader is elected quickly.
    let leader = etcd.leader().unwrap().expect("a leader");
    etcd.kill(leader).unwrap();
    assert!(!etcd.is_running(leader));
    let t = Instant::now();
    assert!(eventually(Duration::from_secs(5), || {
        etcdctl(&etcd, &client, &["put", "k", "v2"]).is_ok()
    }));
    eprintln!("writable again {:?} after killing the leader", t.elapsed());

    // Losing a second member loses the quorum: writes time out.
    let other = (0..3).find(|&i| i != leader).unwrap();
    etcd.kill(other).unwrap();
    let err = etcdctl(&etcd, &client, &["put", "k", "v3"]).unwrap_err();
    eprintln!("without quorum: {err}");

    // One back is a quorum again.
    etcd.restart(other).unwrap();
    etcd.wait_healthy(Duration::from_secs(10)).unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        etcdctl(&etcd, &client, &["put", "k", "v4"]).is_ok()
    }));

    // And the first one catches up from its kept data directory.
    etcd.restart(leader).unwrap();
    etcd.wait_healthy(Duration::from_secs(10)).unwrap();
    assert!((0..3).all(|i| etcd.is_healthy(i)));
    let mut get = client.command("etcdctl");
    get.env("ETCDCTL_API", "3").args([
        format!("--endpoints={}", etcd.endpoint(leader).unwrap()),
        "get".into(),
        "k".into(),
        "--print-value-only".into(),
    ]);
    assert_eq!(run_ok(&mut get, Duration::from_secs(5)).unwrap().stdout, b"v4\n");
    eprintln!("etcd test took {:?}", started.elapsed());
}

#[test]
fn drop_removes_everything() {
    let bed = Bed::new("drop").unwrap();
    let a = bed.add_host("a").unwrap();
    let etcd = bed.start_etcd(1).unwrap();
    let mut cmd = a.command("sleep");
    cmd.arg("300");
    let tracked = a.spawn(&mut cmd).unwrap();
    // Started without the bed's tracking: the namespace sweep gets it.
    let mut untracked = a.command("sleep").arg("301").spawn().unwrap();
    let traces = Traces::of(&bed, vec![tracked.pid(), etcd.pid(0).unwrap()]);
    traces.assert_present();
    assert_eq!(bed.processes().len(), 2);

    // The bed goes first, the cluster handle after: the bed still stops etcd.
    drop(bed);
    traces.assert_gone();
    assert!(!tracked.is_running());
    let status = untracked.wait().unwrap();
    assert!(!status.success());
    assert!(etcd.restart(0).is_err(), "nothing starts on a torn-down bed");
    assert!(a.tcp_listen(0).is_err());
    drop(etcd);
}

#[test]
fn panic_midway_still_cleans_up() {
    let traces = Mutex::new(None);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let bed = Bed::new("panic").unwrap();
        let a = bed.add_host("a").unwrap();
        let etcd = bed.start_etcd(1).unwrap();
        let mut cmd = a.command("sleep");
        cmd.arg("300");
        let sleeper = a.spawn(&mut cmd).unwrap();
        let found = Traces::of(&bed, vec![sleeper.pid(), etcd.pid(0).unwrap()]);
        found.assert_present();
        *traces.lock().unwrap() = Some(found);
        panic!("deliberate panic in the middle of a test (expected)");
    }));
    assert!(result.is_err());
    traces
        .lock()
        .unwrap()
        .take()
        .expect("the closure got far enough")
        .assert_gone();
}

#[test]
fn leftovers_of_a_dead_run_are_removed_and_live_beds_kept() {
    // A pid above PID_MAX_LIMIT (2^22) can never be alive; our own pid as the
    // sequence number keeps concurrent runs of this test apart.
    let id = format!("{NAME_PREFIX}4999999x{}", std::process::id());
    let namespaces = [format!("{id}-sw"), format!("{id}-a")];
    for ns in &namespaces {
        run_ok(Command::new("ip").args(["netns", "add", ns]), SHORT * 10).unwrap();
    }
    let mut inside = Command::new("ip");
    inside.args(["netns", "exec", &namespaces[1], "sleep", "300"]);
    let mut orphan = inside.spawn().unwrap();
    let dir = std::env::temp_dir().join(format!("{id}-crashed-abc"));
    fs::create_dir_all(dir.join("etcd-data")).unwrap();
    let registry = Path::new("/run/understudy-testbed").join(&id);
    fs::write(
        &registry,
        format!("pid=4999999\nstart=1\nhint=crashed\ndir={}\n", dir.display()),
    )
    .unwrap();
    // Let `ip netns exec` get into the namespace before cleaning up.
    assert!(eventually(Duration::from_secs(5), || {
        let out = run_ok(Command::new("ip").args(["netns", "pids", &namespaces[1]]), SHORT * 10).unwrap();
        !out.stdout.is_empty()
    }));

    let live = Bed::new("alive").unwrap();
    let host = live.add_host("a").unwrap();

    // Another test's Bed::new may clean up first; what counts is the end state.
    let report = cleanup_leftovers().unwrap();
    eprintln!("{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    let listed = netns_list();
    for ns in &namespaces {
        assert!(!listed.contains(ns), "{ns} left");
    }
    assert!(!dir.exists());
    assert!(!registry.exists());
    let status = orphan.wait().unwrap();
    assert!(!status.success(), "the process in the namespace was killed");

    // The live bed is untouched.
    assert!(listed.contains(&host.netns().to_owned()));
    assert!(listed.contains(&live.switch_netns().to_owned()));
    assert!(live.temp_dir().is_dir());
}

#[test]
fn pause_and_resume_processes() {
    let bed = Bed::new("pause").unwrap();
    let a = bed.add_host("a").unwrap();
    let mut cmd = a.command("sleep");
    cmd.arg("300");
    let p = a.spawn(&mut cmd).unwrap();
    assert!(eventually(SHORT * 10, || proc_state(p.pid()) == Some('S')));
    p.pause().unwrap();
    assert!(eventually(SHORT * 10, || proc_state(p.pid()) == Some('T')));
    p.resume().unwrap();
    assert!(eventually(SHORT * 10, || proc_state(p.pid()) == Some('S')));
    pause(p.pid()).unwrap();
    assert!(eventually(SHORT * 10, || proc_state(p.pid()) == Some('T')));
    resume(p.pid()).unwrap();
    assert!(eventually(SHORT * 10, || proc_state(p.pid()) == Some('S')));
    p.kill().unwrap();
    assert!(!p.is_running());
    assert!(p.pause().is_err(), "an exited process is not signalled");
}

#[test]
fn two_beds_are_separate_networks() {
    let one = Bed::new("one").unwrap();
    let two = Bed::new("two").unwrap();
    assert_ne!(one.prefix(), two.prefix());
    assert_ne!(one.subnet(), two.subnet());
    let (a1, b1) = (one.add_host("a").unwrap(), one.add_host("b").unwrap());
    let (a2, b2) = (two.add_host("a").unwrap(), two.add_host("b").unwrap());
    assert_ne!(a1.netns(), a2.netns());
    let _l1 = b1.tcp_listen(7000).unwrap();
    let _l2 = b2.tcp_listen(7000).unwrap();
    assert!(reaches(&a1, &b1, 7000));
    assert!(reaches(&a2, &b2, 7000));
    assert!(!reaches(&a1, &b2, 7000));
    assert!(one.cut(&a2).is_err(), "a host of another bed");
    assert!(one.add_host("a").is_err(), "duplicate name");
    assert!(one.add_host("no spaces").is_err());
    // Commands with a bounded run: a timeout kills the process.
    let mut slow = a1.command("sleep");
    slow.arg("5");
    let t = Instant::now();
    assert!(run(&mut slow, SHORT).is_err());
    assert!(t.elapsed() < Duration::from_secs(2));
}
