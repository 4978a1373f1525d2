//! etcd clusters on a bed: one member per host, real `/usr/bin/etcd`.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::bed::{Bed, Host};
use crate::error::{Error, Result};
use crate::exec::{Process, run, run_ok};

/// The port etcd serves clients on (on every member's address, and on
/// 127.0.0.1 inside the member's namespace).
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// The port etcd members talk to each other on.
pub const ETCD_PEER_PORT: u16 = 2380;

/// Raft heartbeat, milliseconds (etcd's default is 100).
const HEARTBEAT_MS: u32 = 50;
/// Raft election timeout, milliseconds (etcd's default is 1000).
const ELECTION_MS: u32 = 250;
/// How long a new cluster may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a (re)started member may take to open its client port.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Grace between SIGTERM and SIGKILL in [`EtcdCluster::stop`].
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Bound on one `etcdctl` health or status call.
const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `name` found on `PATH`.
fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "`{name}` not found on PATH (Debian: apt-get install etcd-server etcd-client)"
            ))
        })
}

/// Removes `ETCD*` variables, which etcd and etcdctl read as flags.
fn scrub_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCD") {
            cmd.env_remove(key);
        }
    }
}

/// The last `n` lines of `path` (empty if unreadable).
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

struct Member {
    name: String,
    host: Host,
    data_dir: PathBuf,
    log: PathBuf,
    process: Mutex<Option<Process>>,
}

/// An etcd v3 cluster on a bed, one member per host. Members are numbered
/// from 0 in the order of their hosts.
///
/// Dropping it SIGKILLs its members (the bed does too, when dropped first);
/// data directories live in the bed's temporary directory until the bed goes.
#[must_use = "dropping the cluster kills its members"]
pub struct EtcdCluster {
    etcd: PathBuf,
    etcdctl: PathBuf,
    token: String,
    initial_cluster: String,
    members: Vec<Member>,
}

impl fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("token", &self.token)
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

impl Bed {
    /// Adds `members` hosts (`etcd1`, `etcd2`, … for the bed's first cluster,
    /// `etcd<k>-1`, … for later ones) and starts an etcd cluster on them;
    /// returns once every member serves linearizable reads (bounded wait,
    /// 30 s). Use 1 or 3 (or 5) members.
    pub fn start_etcd(&self, members: usize) -> Result<EtcdCluster> {
        if members == 0 {
            return Err(Error::Invalid("an etcd cluster needs at least one member".to_owned()));
        }
        let k = self.shared().next_etcd_cluster();
        let hosts = (1..=members)
            .map(|i| {
                let name = if k == 0 {
                    format!("etcd{i}")
                } else {
                    format!("etcd{k}-{i}")
                };
                self.add_host(&name)
            })
            .collect::<Result<Vec<_>>>()?;
        self.start_etcd_numbered(&hosts, k)
    }

    /// Starts an etcd cluster with one member on each of `hosts` (e.g. the
    /// same hosts as the agents, as a real deployment would), and waits
    /// until it is healthy (bounded, 30 s). A host can carry one member.
    pub fn start_etcd_on(&self, hosts: &[Host]) -> Result<EtcdCluster> {
        let k = self.shared().next_etcd_cluster();
        self.start_etcd_numbered(hosts, k)
    }

    fn start_etcd_numbered(&self, hosts: &[Host], k: u32) -> Result<EtcdCluster> {
        if hosts.is_empty() {
            return Err(Error::Invalid("an etcd cluster needs at least one member".to_owned()));
        }
        for (i, host) in hosts.iter().enumerate() {
            if host.bed_id() != self.id() {
                return Err(Error::Invalid(format!(
                    "host {} belongs to bed {}, not {}",
                    host.name(),
                    host.bed_id(),
                    self.id()
                )));
            }
            if hosts[..i].iter().any(|h| h.index() == host.index()) {
                return Err(Error::Invalid(format!("host {} is listed twice", host.name())));
            }
        }
        let etcd = find_program("etcd")?;
        let etcdctl = find_program("etcdctl")?;
        let token = format!("{}-etcd{k}", self.id());
        let initial_cluster = hosts
            .iter()
            .map(|h| format!("{}=http://{}:{ETCD_PEER_PORT}", h.name(), h.addr()))
            .collect::<Vec<_>>()
            .join(",");
        let members = hosts
            .iter()
            .map(|host| {
                let base = self.temp_dir().join(format!("etcd{k}-{}", host.name()));
                Member {
                    name: host.name().to_owned(),
                    host: host.clone(),
                    log: base.with_extension("log"),
                    data_dir: base,
                    process: Mutex::new(None),
                }
            })
            .collect();
        let cluster = EtcdCluster {
            etcd,
            etcdctl,
            token,
            initial_cluster,
            members,
        };
        // One at a time, each once the previous one serves its peer port: a
        // new member first asks its peers whether it was bootstrapped
        // already, and a peer whose port is bound but not yet served makes
        // that question hang for a second (etcd's bootstrap timeout).
        // On error `cluster` is dropped, which kills what was started.
        for i in 0..cluster.members.len() {
            cluster.spawn_member(i)?;
            cluster.wait_peer_serving(i, LISTEN_TIMEOUT)?;
        }
        cluster.wait_healthy(START_TIMEOUT)?;
        Ok(cluster)
    }
}

impl EtcdCluster {
    fn member(&self, i: usize) -> Result<&Member> {
        self.members.get(i).ok_or_else(|| {
            Error::Invalid(format!(
                "etcd member {i} does not exist (the cluster has {})",
                self.members.len()
            ))
        })
    }

    fn spawn_member(&self, i: usize) -> Result<()> {
        let m = self.member(i)?;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .map_err(|e| Error::io(format!("open {}", m.log.display()), e))?;
        let _ = writeln!(log, "--- understudy-testbed: starting member {}", m.name);
        let log_err = log
            .try_clone()
            .map_err(|e| Error::io(format!("open {}", m.log.display()), e))?;
        let addr = m.host.addr();
        let mut cmd = m.host.command(&self.etcd);
        scrub_env(&mut cmd);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg(format!("--listen-peer-urls=http://{addr}:{ETCD_PEER_PORT}"))
            .arg(format!("--initial-advertise-peer-urls=http://{addr}:{ETCD_PEER_PORT}"))
            .arg(format!(
                "--listen-client-urls=http://{addr}:{ETCD_CLIENT_PORT},http://127.0.0.1:{ETCD_CLIENT_PORT}"
            ))
            .arg(format!("--advertise-client-urls=http://{addr}:{ETCD_CLIENT_PORT}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg("--initial-cluster-state=new")
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg(format!("--heartbeat-interval={HEARTBEAT_MS}"))
            .arg(format!("--election-timeout={ELECTION_MS}"))
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=info"])
            .stdout(log)
            .stderr(log_err);
        let process = m.host.spawn(&mut cmd)?;
        *lock(&m.process) = Some(process);
        Ok(())
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never, once started).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member `i`'s host.
    pub fn host(&self, i: usize) -> Option<&Host> {
        self.members.get(i).map(|m| &m.host)
    }

    /// The member hosts, in member order.
    pub fn hosts(&self) -> Vec<Host> {
        self.members.iter().map(|m| m.host.clone()).collect()
    }

    /// Member `i`'s client URL, `http://10.213.X.N:2379`.
    pub fn endpoint(&self, i: usize) -> Option<String> {
        self.members
            .get(i)
            .map(|m| format!("http://{}:{ETCD_CLIENT_PORT}", m.host.addr()))
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).filter_map(|i| self.endpoint(i)).collect()
    }

    /// The client URLs joined with commas (for `--endpoints=`).
    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// The `--initial-cluster` value the members were started with.
    pub fn initial_cluster(&self) -> &str {
        &self.initial_cluster
    }

    /// Member `i`'s data directory (kept across restarts).
    pub fn data_dir(&self, i: usize) -> Option<&Path> {
        self.members.get(i).map(|m| m.data_dir.as_path())
    }

    /// Member `i`'s log (stdout and stderr of every run, appended).
    pub fn log_path(&self, i: usize) -> Option<&Path> {
        self.members.get(i).map(|m| m.log.as_path())
    }

    /// Member `i`'s current process (also after it died, until restarted).
    pub fn process(&self, i: usize) -> Option<Process> {
        self.members.get(i).and_then(|m| lock(&m.process).clone())
    }

    /// Member `i`'s pid, while its process runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.process(i).filter(Process::is_running).map(|p| p.pid())
    }

    /// Whether member `i`'s process runs (a paused one does).
    pub fn is_running(&self, i: usize) -> bool {
        self.pid(i).is_some()
    }

    /// `etcdctl --endpoints=<all members>` inside `from` (any host of the
    /// bed), with `ETCDCTL_API=3` and no inherited `ETCD*` variables; add the
    /// subcommand and run it with [`crate::run`] / [`crate::run_ok`]. Pass
    /// `--command-timeout=…` to bound a call that may lack quorum.
    pub fn etcdctl(&self, from: &Host) -> Command {
        self.etcdctl_to(from, &self.endpoints_arg())
    }

    fn etcdctl_to(&self, from: &Host, endpoints: &str) -> Command {
        let mut cmd = from.command(&self.etcdctl);
        scrub_env(&mut cmd);
        cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={endpoints}"));
        cmd
    }

    /// SIGKILLs member `i`'s process group and reaps it (no-op if it is not
    /// running).
    pub fn kill(&self, i: usize) -> Result<()> {
        if let Some(p) = lock(&self.member(i)?.process).as_ref() {
            p.kill()?;
        }
        Ok(())
    }

    /// Stops member `i` cleanly: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&self, i: usize) -> Result<()> {
        if let Some(p) = lock(&self.member(i)?.process).as_ref() {
            p.terminate(STOP_GRACE)?;
        }
        Ok(())
    }

    /// SIGSTOPs member `i` (it keeps its sockets but answers nothing).
    pub fn pause(&self, i: usize) -> Result<()> {
        match self.process(i) {
            Some(p) => p.pause(),
            None => Err(Error::Invalid(format!("etcd member {i} was never started"))),
        }
    }

    /// SIGCONTs member `i`.
    pub fn resume(&self, i: usize) -> Result<()> {
        match self.process(i) {
            Some(p) => p.resume(),
            None => Err(Error::Invalid(format!("etcd member {i} was never started"))),
        }
    }

    /// Starts member `i` again with the same data directory (stopping it
    /// first, with [`EtcdCluster::stop`], if it runs). Returns once it
    /// accepts connections on its client port; it serves requests once it
    /// has rejoined a quorum — use [`EtcdCluster::wait_healthy`] for that.
    pub fn restart(&self, i: usize) -> Result<()> {
        self.stop(i)?;
        self.spawn_member(i)?;
        self.wait_listening(i, LISTEN_TIMEOUT)
    }

    fn exited(&self, i: usize) -> Option<Error> {
        let m = self.members.get(i)?;
        let p = lock(&m.process).clone()?;
        let status = p.try_wait().ok()??;
        Some(Error::Exited {
            what: format!("etcd member {} ({})", m.name, m.host.addr()),
            status: status.to_string(),
            detail: format!("{}:\n{}", m.log.display(), tail(&m.log, 20)),
        })
    }

    fn wait_listening(&self, i: usize, timeout: Duration) -> Result<()> {
        let m = self.member(i)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.exited(i) {
                return Err(e);
            }
            let last = match m
                .host
                .tcp_connect((m.host.addr(), ETCD_CLIENT_PORT), Duration::from_millis(200))
            {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("etcd member {} opening its client port", m.name),
                    waited: timeout,
                    detail: format!("{last}\n{}:\n{}", m.log.display(), tail(&m.log, 20)),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until member `i` answers HTTP on its peer port (it does so
    /// before it has a quorum).
    fn wait_peer_serving(&self, i: usize, timeout: Duration) -> Result<()> {
        let m = self.member(i)?;
        let addr = SocketAddr::from((m.host.addr(), ETCD_PEER_PORT));
        let probe = || -> std::io::Result<bool> {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
            conn.set_read_timeout(Some(Duration::from_millis(200)))?;
            conn.write_all(b"GET /version HTTP/1.0\r\n\r\n")?;
            let mut head = [0; 5];
            conn.read_exact(&mut head)?;
            Ok(&head == b"HTTP/")
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.exited(i) {
                return Err(e);
            }
            let last = match m.host.enter(probe)? {
                Ok(true) => return Ok(()),
                Ok(false) => "not HTTP".to_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("etcd member {} serving its peer port", m.name),
                    waited: timeout,
                    detail: format!("{last}\n{}:\n{}", m.log.display(), tail(&m.log, 20)),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether member `i` serves a linearizable read now (asked from its
    /// own host, so only its quorum matters, not the test's network faults
    /// between other hosts).
    pub fn is_healthy(&self, i: usize) -> bool {
        self.check_health(i).is_ok()
    }

    fn check_health(&self, i: usize) -> Result<()> {
        let m = self.member(i)?;
        let endpoint = self.endpoint(i).unwrap_or_default();
        let mut cmd = self.etcdctl_to(&m.host, &endpoint);
        cmd.args(["endpoint", "health", "--dial-timeout=500ms", "--command-timeout=1s"]);
        run_ok(&mut cmd, ETCDCTL_TIMEOUT).map(drop)
    }

    /// Waits until every member whose process runs is healthy (see
    /// [`EtcdCluster::is_healthy`]), polling, for at most `timeout`. Fails at
    /// once if a running member's process exits, with its log's tail.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut running = 0;
            let mut failure = None;
            for i in 0..self.members.len() {
                let Some(p) = self.process(i) else { continue };
                if !p.is_running() {
                    continue;
                }
                running += 1;
                if let Err(e) = self.check_health(i) {
                    // It may have died meanwhile; say so rather than time out.
                    if let Some(exit) = self.exited(i) {
                        return Err(exit);
                    }
                    failure = Some((i, e));
                    break;
                }
            }
            if running == 0 {
                return Err(Error::Invalid("no etcd member is running".to_owned()));
            }
            let Some((i, e)) = failure else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                let logs = (0..self.members.len())
                    .map(|j| {
                        let log = &self.members[j].log;
                        format!("{}:\n{}", log.display(), tail(log, 10))
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(Error::Timeout {
                    what: format!("etcd cluster {} becoming healthy", self.token),
                    waited: timeout,
                    detail: format!("member {i}: {e}\n{logs}"),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The index of the member that is the Raft leader, as the running
    /// members report it (`etcdctl endpoint status`), or `None` if none
    /// says it leads.
    pub fn leader(&self) -> Result<Option<usize>> {
        let running: Vec<usize> = (0..self.members.len()).filter(|&i| self.is_running(i)).collect();
        let Some(&from) = running.first() else {
            return Ok(None);
        };
        let endpoints = running
            .iter()
            .filter_map(|&i| self.endpoint(i))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = self.etcdctl_to(&self.members[from].host, &endpoints);
        cmd.args(["endpoint", "status", "--dial-timeout=500ms", "--command-timeout=1s"]);
        // Unreachable members make it exit non-zero but the others are
        // still listed.
        let out = run(&mut cmd, ETCDCTL_TIMEOUT)?;
        // "http://10.213.X.N:2379, <id>, <version>, <db size>, <is leader>, …"
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let fields: Vec<&str> = line.split(", ").collect();
            if fields.get(4) == Some(&"true") {
                return Ok(fields
                    .first()
                    .and_then(|url| self.endpoints().iter().position(|e| e == url)));
            }
        }
        Ok(None)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &self.members {
            if let Some(p) = lock(&m.process).as_ref() {
                let _ = p.kill();
            }
        }
    }
}
