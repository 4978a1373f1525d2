//! The postgres driver against a real PostgreSQL server (the newest one under
//! `/usr/lib/postgresql`; CI installs the `postgresql` package). The tests
//! run as root, like the agent: the driver must drop to `postgres` itself.
//!
//! Every test gets its own data directory (`initdb` as `postgres`, trust
//! authentication, `fsync = off` so that crash recovery does not first sync
//! the whole directory — the crashes here kill processes, not the machine,
//! so committed data stays in the page cache), socket directory and free
//! port. The fixture stops and kills whatever runs from the data directory
//! and removes it when dropped, even when the test panics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestEnv, alive, ctx, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, chown};
use understudy_core::spec::PostgresSpec;
use understudy_drivers::postgres::PostgresDriver;
use understudy_drivers::{Driver, DriverError, Health};

const START: Duration = Duration::from_secs(60);
const STOP: Duration = Duration::from_secs(30);
const MONITOR: Duration = Duration::from_secs(5);

fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (/usr/lib/postgresql)")
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().expect("no /usr/lib/postgresql/<version>/bin/initdb").1
}

fn postgres_user() -> User {
    User::from_name("postgres").unwrap().expect("no `postgres` user")
}

/// A command run as `postgres`, from `/`.
fn as_postgres(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let u = postgres_user();
    let mut c = Command::new(program);
    c.uid(u.uid.as_raw())
        .gid(u.gid.as_raw())
        .current_dir("/")
        .env("HOME", &u.dir);
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn dir_id(p: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// Every live process (any name) whose working directory is `dir`.
fn processes_in(dir: &Path) -> Vec<i32> {
    let Some(id) = dir_id(dir) else { return Vec::new() };
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| alive(pid) && dir_id(&PathBuf::from(format!("/proc/{pid}/cwd"))) == Some(id))
        .collect()
}

fn postmaster_pid(data: &Path) -> Option<i32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// A data directory, socket directory and port; cleans up on drop.
struct Pg {
    t: TestEnv,
    root: tempfile::TempDir,
    spec: PostgresSpec,
    /// Processes the test started itself, killed on drop.
    extra: Vec<std::process::Child>,
}

impl Pg {
    fn new() -> Pg {
        let t = TestEnv::new();
        let root = tempfile::Builder::new().prefix("understudy-pg-").tempdir().unwrap();
        let u = postgres_user();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        chown(root.path(), Some(u.uid), Some(u.gid)).unwrap();
        let data = root.path().join("data");
        let sock = root.path().join("sock");
        let out = as_postgres(bin_dir().join("initdb"))
            .args([
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "--no-locale",
                "-E",
                "UTF8",
                "-N",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(
            &mut conf,
            b"\nfsync = off\nshared_buffers = 16MB\nmax_connections = 20\n",
        )
        .unwrap();
        let spec = PostgresSpec {
            data_dir: data.to_str().unwrap().into(),
            port: free_port(),
            bin_dir: None,
            user: "postgres".into(),
            database: "postgres".into(),
            socket_dir: Some(sock.to_str().unwrap().into()),
        };
        Pg {
            t,
            root,
            spec,
            extra: Vec::new(),
        }
    }

    fn data(&self) -> PathBuf {
        PathBuf::from(&self.spec.data_dir)
    }

    fn driver(&self) -> PostgresDriver {
        PostgresDriver::new("db", &self.spec, &self.t.env).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.t.state().join("logs").join("db.log")).unwrap_or_default()
    }

    /// A client connection (socket or TCP, as the spec says).
    async fn client(&self) -> tokio_postgres::Client {
        let mut cfg = tokio_postgres::Config::new();
        cfg.user("postgres").dbname("postgres").port(self.spec.port);
        match &self.spec.socket_dir {
            Some(d) => cfg.host_path(d),
            None => cfg.host("127.0.0.1"),
        };
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    /// Waits until nothing runs from the data directory.
    async fn assert_nothing_runs(&self) {
        let data = self.data();
        assert!(
            wait_for(Duration::from_secs(5), || processes_in(&data).is_empty()).await,
            "processes still use the data directory: {:?}",
            processes_in(&data)
        );
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        for c in &mut self.extra {
            let _ = c.kill();
            let _ = c.wait();
        }
        let data = self.data();
        let mut pids = processes_in(&data);
        pids.extend(postmaster_pid(&data).filter(|p| alive(*p)));
        if !pids.is_empty() {
            // A test may have stopped them: let them act on the shutdown.
            for &p in &pids {
                let _ = kill(Pid::from_raw(p), Signal::SIGCONT);
            }
            let _ = as_postgres(bin_dir().join("pg_ctl"))
                .args([
                    "stop",
                    "-D",
                    data.to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "10",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let left = processes_in(&data);
                if left.is_empty() || Instant::now() > deadline {
                    break;
                }
                for p in left {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // `root` (and the TestEnv) are removed when their fields drop.
        let _ = &self.root;
    }
}

#[tokio::test]
async fn start_serves_queries_then_stop_is_clean() {
    let pg = Pg::new();
    let d = pg.driver();

    // Nothing yet: stopped, and stopping is a no-op.
    assert_eq!(d.probe(&ctx(MONITOR)).await, Health::Stopped);
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Stopped);
    d.stop(&ctx(STOP)).await.unwrap();

    let began = Instant::now();
    d.start(&ctx(START)).await.unwrap();
    let took = began.elapsed();
    eprintln!("start took {took:?}");
    let pid = postmaster_pid(&pg.data()).unwrap();
    assert!(alive(pid));
    // The postmaster's group is recorded for the fence guard.
    assert_eq!(pg.t.env.registry.pgids(), vec![pid]);
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Running);
    assert_eq!(d.probe(&ctx(MONITOR)).await, Health::Running);

    // It runs as postgres, listens everywhere, and logs to the resource's log.
    let uid = std::fs::metadata(format!("/proc/{pid}")).unwrap().uid();
    assert_eq!(uid, postgres_user().uid.as_raw());
    let log = pg.log();
    assert!(log.contains("understudy: starting db:"), "{log}");
    assert!(log.contains("pg_ctl start -D"), "{log}");
    assert!(log.contains("ready to accept connections"), "{log}");
    assert!(log.contains("0.0.0.0"), "{log}");

    // A client can write and read back, over TCP too.
    let c = pg.client().await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'one'), (2, 'two');")
        .await
        .unwrap();
    let rows = c.query("SELECT v FROM t ORDER BY id", &[]).await.unwrap();
    let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(got, ["one", "two"]);
    let tcp = std::net::TcpStream::connect(("127.0.0.1", pg.spec.port));
    assert!(tcp.is_ok(), "no TCP listener: {tcp:?}");

    // Starting again changes nothing.
    let began = Instant::now();
    d.start(&ctx(START)).await.unwrap();
    assert!(began.elapsed() < Duration::from_secs(2), "{:?}", began.elapsed());
    assert_eq!(postmaster_pid(&pg.data()), Some(pid));

    // Fast stop: the client is disconnected, nothing is left.
    let began = Instant::now();
    d.stop(&ctx(STOP)).await.unwrap();
    let took = began.elapsed();
    eprintln!("stop took {took:?}");
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    assert!(!pg.data().join("postmaster.pid").exists());
    pg.assert_nothing_runs().await;
    assert!(!alive(pid));
    assert!(pg.t.env.registry.pgids().is_empty());
    let log = pg.log();
    assert!(log.contains("-m fast"), "{log}");
    assert!(log.contains("received fast shutdown request"), "{log}");
    assert!(!log.contains("-m immediate"), "{log}");
    assert!(!log.contains("immediate shutdown request"), "{log}");
    assert!(c.simple_query("SELECT 1").await.is_err());

    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Stopped);
    assert_eq!(d.probe(&ctx(MONITOR)).await, Health::Stopped);
    d.stop(&ctx(STOP)).await.unwrap();

    // And it comes back with the data.
    d.start(&ctx(START)).await.unwrap();
    let c = pg.client().await;
    let n: i64 = c.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
    d.stop(&ctx(STOP)).await.unwrap();
}

#[tokio::test]
async fn monitor_over_tcp_without_socket_dir() {
    let mut pg = Pg::new();
    // The server's own setting puts the socket somewhere private; the driver
    // passes no -k and checks over TCP.
    let sock = pg.root.path().join("own-sock");
    std::fs::create_dir(&sock).unwrap();
    let u = postgres_user();
    chown(&sock, Some(u.uid), Some(u.gid)).unwrap();
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(pg.data().join("postgresql.conf"))
        .unwrap();
    std::io::Write::write_all(
        &mut conf,
        format!("unix_socket_directories = '{}'\n", sock.display()).as_bytes(),
    )
    .unwrap();
    pg.spec.socket_dir = None;
    let d = pg.driver();
    d.start(&ctx(START)).await.unwrap();
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Running);
    assert!(sock.join(format!(".s.PGSQL.{}", pg.spec.port)).exists());
    let c = pg.client().await;
    let n: i32 = c.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
    d.stop(&ctx(STOP)).await.unwrap();
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Stopped);
}

#[tokio::test]
async fn a_killed_postmaster_leaves_a_stale_pid_file_and_start_recovers() {
    let pg = Pg::new();
    let d = pg.driver();
    d.start(&ctx(START)).await.unwrap();
    let c = pg.client().await;
    c.batch_execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000);")
        .await
        .unwrap();
    c.batch_execute("BEGIN; INSERT INTO t VALUES (-1);").await.unwrap();
    let pid = postmaster_pid(&pg.data()).unwrap();

    // The owner crashes: its postmaster dies at once, the file stays.
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert!(wait_for(Duration::from_secs(5), || !alive(pid)).await);
    assert!(pg.data().join("postmaster.pid").exists());
    match d.monitor(&ctx(MONITOR)).await {
        Health::Failed(why) => assert!(
            why.contains("not running") || why.contains("still use the data directory"),
            "{why}"
        ),
        other => panic!("monitor after a crash: {other:?}"),
    }
    // Its children may still be on their way out: not running either way.
    let probe = d.probe(&ctx(MONITOR)).await;
    assert!(matches!(probe, Health::Stopped | Health::Failed(_)), "{probe:?}");

    // The next start recovers, with the committed rows and without the
    // uncommitted one.
    d.start(&ctx(START)).await.unwrap();
    let new_pid = postmaster_pid(&pg.data()).unwrap();
    assert_ne!(new_pid, pid);
    assert_eq!(pg.t.env.registry.pgids(), vec![new_pid]);
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Running);
    let c = pg.client().await;
    let n: i64 = c.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 1000);
    let log = pg.log();
    assert!(log.contains("not properly shut down"), "{log}");
    d.stop(&ctx(STOP)).await.unwrap();
    pg.assert_nothing_runs().await;
}

#[tokio::test]
async fn stale_pid_files_from_another_node_do_not_block_start() {
    let mut pg = Pg::new();
    let d = pg.driver();
    d.start(&ctx(START)).await.unwrap();
    d.stop(&ctx(STOP)).await.unwrap();
    let data = pg.data();
    let pid_file = data.join("postmaster.pid");
    let u = postgres_user();
    let write_pid_file = |pid: i32| {
        std::fs::write(
            &pid_file,
            format!(
                "{pid}\n{}\n1700000000\n5432\n/nowhere\n*\n  1234  5678\nready   \n",
                data.display()
            ),
        )
        .unwrap();
        chown(&pid_file, Some(u.uid), Some(u.gid)).unwrap();
    };

    // 1. Its pid is not in use here: PostgreSQL itself ignores the file.
    let max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let unused = (1000..max)
        .rev()
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .unwrap();
    write_pid_file(unused);
    assert!(matches!(d.monitor(&ctx(MONITOR)).await, Health::Failed(_)));
    assert_eq!(d.probe(&ctx(MONITOR)).await, Health::Stopped);
    d.start(&ctx(START)).await.unwrap();
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Running);
    assert!(!pg.log().contains("removing stale"), "{}", pg.log());
    assert!(pg.log().contains("another server might be running"), "{}", pg.log());
    d.stop(&ctx(STOP)).await.unwrap();

    // 2. Its pid belongs to an unrelated live process of the postgres user
    //    here: PostgreSQL would refuse ("lock file already exists"); the
    //    driver removes the file, and leaves the process alone.
    let sleeper = as_postgres("/bin/sleep").arg("300").spawn().unwrap();
    let sleeper_pid = i32::try_from(sleeper.id()).unwrap();
    pg.extra.push(sleeper);
    write_pid_file(sleeper_pid);
    // The same pid in the (node-local) socket lock file.
    let lock = PathBuf::from(pg.spec.socket_dir.as_ref().unwrap()).join(format!(".s.PGSQL.{}.lock", pg.spec.port));
    std::fs::write(&lock, format!("{sleeper_pid}\n{}\n", data.display())).unwrap();
    chown(&lock, Some(u.uid), Some(u.gid)).unwrap();
    assert_eq!(d.probe(&ctx(MONITOR)).await, Health::Stopped);
    d.start(&ctx(START)).await.unwrap();
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Running);
    assert!(alive(sleeper_pid), "the driver must not touch an unrelated process");
    let log = pg.log();
    assert!(log.contains("removing stale"), "{log}");
    assert!(log.contains("removing stale socket lock"), "{log}");
    d.stop(&ctx(STOP)).await.unwrap();

    // 3. A file that names no pid (a crash while writing it).
    std::fs::write(&pid_file, "").unwrap();
    d.start(&ctx(START)).await.unwrap();
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Running);
    d.stop(&ctx(STOP)).await.unwrap();
    pg.assert_nothing_runs().await;
}

#[tokio::test]
async fn monitor_fails_when_the_server_does_not_answer_and_stop_kills_it() {
    let pg = Pg::new();
    let d = pg.driver();
    d.start(&ctx(START)).await.unwrap();
    let pid = postmaster_pid(&pg.data()).unwrap();

    // Alive but not answering.
    kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    let timeout = Duration::from_millis(1500);
    let began = Instant::now();
    let health = d.monitor(&ctx(timeout)).await;
    let took = began.elapsed();
    eprintln!("monitor of a stopped server took {took:?}: {health:?}");
    match health {
        Health::Failed(why) => assert!(why.contains("no answer"), "{why}"),
        other => panic!("monitor of a SIGSTOPped server: {other:?}"),
    }
    assert!(took >= timeout && took < timeout + Duration::from_secs(1), "{took:?}");
    assert_eq!(d.probe(&ctx(MONITOR)).await, Health::Running);

    // Neither fast nor immediate shutdown can reach a stopped postmaster:
    // stop ends with SIGKILL, within its timeout plus the kill.
    let timeout = Duration::from_secs(4);
    let began = Instant::now();
    d.stop(&ctx(timeout)).await.unwrap();
    let took = began.elapsed();
    eprintln!("stop of a stopped server took {took:?}");
    assert!(took >= Duration::from_millis(2900), "{took:?}");
    assert!(took < timeout + Duration::from_secs(2), "{took:?}");
    pg.assert_nothing_runs().await;
    assert!(!alive(pid));
    assert!(!pg.data().join("postmaster.pid").exists());
    assert!(pg.t.env.registry.pgids().is_empty());
    let log = pg.log();
    assert!(log.contains("-m fast"), "{log}");
    assert!(log.contains("-m immediate"), "{log}");
    assert!(log.contains("SIGKILL"), "{log}");
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Stopped);

    // It recovers from that.
    d.start(&ctx(START)).await.unwrap();
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Running);
    d.stop(&ctx(STOP)).await.unwrap();
}

#[tokio::test]
async fn stop_uses_immediate_when_fast_shutdown_hangs() {
    let mut pg = Pg::new();
    let d = pg.driver();
    d.start(&ctx(START)).await.unwrap();
    let pid = postmaster_pid(&pg.data()).unwrap();

    // A fast shutdown waits until every WAL receiver confirms the last WAL.
    // A pg_receivewal that is stopped never does: fast shutdown hangs
    // (until wal_sender_timeout, 60 s), immediate shutdown does not wait.
    let wal = pg.root.path().join("wal");
    std::fs::create_dir(&wal).unwrap();
    let u = postgres_user();
    chown(&wal, Some(u.uid), Some(u.gid)).unwrap();
    let receiver = as_postgres(bin_dir().join("pg_receivewal"))
        .args(["-D", wal.to_str().unwrap(), "-h", pg.spec.socket_dir.as_ref().unwrap()])
        .args(["-p", &pg.spec.port.to_string(), "-U", "postgres", "--no-loop"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let receiver_pid = i32::try_from(receiver.id()).unwrap();
    pg.extra.push(receiver);
    let c = pg.client().await;
    let mut streaming = false;
    for _ in 0..100 {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            streaming = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(streaming, "pg_receivewal did not start streaming");
    kill(Pid::from_raw(receiver_pid), Signal::SIGSTOP).unwrap();
    drop(c);

    let timeout = Duration::from_secs(6);
    let began = Instant::now();
    d.stop(&ctx(timeout)).await.unwrap();
    let took = began.elapsed();
    eprintln!("stop with a hanging fast shutdown took {took:?}");
    // Fast gets half the timeout, then immediate finishes at once.
    assert!(took >= timeout / 2, "{took:?}");
    assert!(took < timeout, "{took:?}");
    pg.assert_nothing_runs().await;
    assert!(!alive(pid));
    let log = pg.log();
    assert!(log.contains("received fast shutdown request"), "{log}");
    assert!(log.contains("received immediate shutdown request"), "{log}");
    assert!(!log.contains("SIGKILL"), "{log}");
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Stopped);
}

#[tokio::test]
async fn urgent_stop_kills_at_once() {
    let pg = Pg::new();
    let d = pg.driver();
    d.start(&ctx(START)).await.unwrap();
    let c = pg.client().await;
    c.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
        .await
        .unwrap();
    let began = Instant::now();
    d.stop(&ctx(Duration::ZERO)).await.unwrap();
    let took = began.elapsed();
    eprintln!("urgent stop took {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    pg.assert_nothing_runs().await;
    let log = pg.log();
    assert!(log.contains("SIGKILL"), "{log}");
    assert!(!log.contains("pg_ctl stop"), "{log}");
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Stopped);
    d.start(&ctx(START)).await.unwrap();
    let c = pg.client().await;
    let n: i64 = c.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    d.stop(&ctx(STOP)).await.unwrap();
}

#[tokio::test]
async fn failed_starts_say_why_and_leave_nothing_running() {
    // No data directory (the shared filesystem is not mounted).
    let mut pg = Pg::new();
    let mut spec = pg.spec.clone();
    spec.data_dir = pg.root.path().join("missing").to_str().unwrap().into();
    let d = PostgresDriver::new("db", &spec, &pg.t.env).unwrap();
    match d.start(&ctx(START)).await {
        Err(DriverError::Failed { message, .. }) => {
            assert!(message.contains("not a PostgreSQL data directory"), "{message}")
        }
        other => panic!("{other:?}"),
    }

    // The server refuses its configuration: pg_ctl fails, the error quotes
    // the server's own message.
    let conf = pg.data().join("postgresql.conf");
    let good = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{good}shared_buffers = 'lots'\n")).unwrap();
    let d = pg.driver();
    let began = Instant::now();
    match d.start(&ctx(START)).await {
        Err(DriverError::Failed { message, .. }) => {
            assert!(message.contains("pg_ctl start exited with status 1"), "{message}");
            assert!(message.contains("shared_buffers"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(began.elapsed() < Duration::from_secs(10), "{:?}", began.elapsed());
    std::fs::write(&conf, good).unwrap();
    pg.assert_nothing_runs().await;
    assert_eq!(d.monitor(&ctx(MONITOR)).await, Health::Stopped);

    // The health check's database does not exist: start fails at once and
    // shuts the server down again.
    pg.spec.database = "nosuchdb".into();
    let d = pg.driver();
    let began = Instant::now();
    match d.start(&ctx(START)).await {
        Err(DriverError::Failed { message, .. }) => assert!(message.contains("3D000"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(began.elapsed() < Duration::from_secs(10), "{:?}", began.elapsed());
    pg.assert_nothing_runs().await;
    assert!(pg.t.env.registry.pgids().is_empty());

    // A start that runs over its timeout is a timeout, and cleans up too.
    pg.spec.database = "postgres".into();
    let d = pg.driver();
    match d.start(&ctx(Duration::from_millis(50))).await {
        Err(DriverError::Timeout { op: "start", .. }) => {}
        other => panic!("{other:?}"),
    }
    pg.assert_nothing_runs().await;
}
