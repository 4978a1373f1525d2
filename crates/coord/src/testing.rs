//! Real etcd servers on loopback, for tests (the `testing` feature).
//!
//! [`EtcdCluster`] starts one or more etcd members as child processes, each
//! with a data directory in one temporary directory and client and peer
//! ports on `127.0.0.1` that were free a moment before, waits until every
//! member answers a linearizable read through [`EtcdCoordinator`] (so the
//! cluster has a leader), and stops them all and removes the directory when
//! dropped — also when a test panics. Members also get `PR_SET_PDEATHSIG =
//! SIGKILL`, so they die with the thread that started them if the test
//! process is killed outright; start a cluster on the thread that owns it
//! (a test's own thread or its runtime's), never on a short-lived one.
//!
//! The etcd binary is `$UNDERSTUDY_ETCD_BIN`, else `etcd` on `PATH`. The
//! default timing (heartbeat 50 ms, election timeout 250 ms) makes etcd's
//! minimum lease TTL one second (etcd's default timing makes it two).
//!
//! ```text
//! let etcd = EtcdCluster::builder().members(3).start().await?;
//! let coord = etcd.connect().await?;
//! etcd.kill(etcd.leader().await?)?;
//! ```

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::{Instant, sleep};

use crate::Coordinator;
use crate::etcd::{EtcdCoordinator, EtcdOptions};

/// The environment variable naming the etcd binary to run.
pub const ETCD_BIN_ENV: &str = "UNDERSTUDY_ETCD_BIN";

/// The journal prefix of the handles [`EtcdCluster::connect`] opens.
pub const TEST_JOURNAL_PREFIX: &str = "/understudy-test/journal/";

/// TLS for the members' client endpoints (peers talk plain HTTP on loopback).
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The CA that signed the server (and client) certificates.
    pub ca_file: PathBuf,
    /// The members' certificate and key; the certificate must name `127.0.0.1`.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Whether members demand a client certificate signed by the CA.
    pub client_cert_auth: bool,
    /// The client certificate and key the harness itself (and
    /// [`EtcdCluster::options`]) uses.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Settings for [`EtcdCluster`]; see [`EtcdCluster::builder`].
#[derive(Clone, Debug)]
pub struct EtcdBuilder {
    members: usize,
    heartbeat: Duration,
    election: Duration,
    ready_timeout: Duration,
    tls: Option<ServerTls>,
}

impl EtcdBuilder {
    /// How many members (default 1).
    pub fn members(mut self, n: usize) -> Self {
        self.members = n.max(1);
        self
    }

    /// etcd's `--heartbeat-interval` and `--election-timeout` (default 50 ms
    /// and 250 ms; the minimum lease TTL is `ceil(1.5 × election)` seconds-ish).
    pub fn timing(mut self, heartbeat: Duration, election: Duration) -> Self {
        self.heartbeat = heartbeat;
        self.election = election;
        self
    }

    /// How long to wait for the members to answer (default 30 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Serve the client endpoints over TLS.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Starts the members and waits until each answers. Ports are picked
    /// just before starting; if one was taken meanwhile, starts again on
    /// other ports (three tries).
    pub async fn start(self) -> Result<EtcdCluster, String> {
        let binary = etcd_binary()?;
        let mut last_error = String::new();
        for _ in 0..3 {
            let mut cluster = self.spawn(&binary)?;
            match cluster.wait_ready(self.ready_timeout).await {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    let port_clash = cluster.logs().contains("address already in use");
                    drop(cluster);
                    if !port_clash {
                        return Err(e);
                    }
                    last_error = e;
                }
            }
        }
        Err(format!("etcd did not start after three tries: {last_error}"))
    }

    fn spawn(&self, binary: &Path) -> Result<EtcdCluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("understudy-etcd-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory for etcd: {e}"))?;
        // Hold every port until all are chosen so no two members get the same one.
        let listeners = (0..self.members * 2)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot find free loopback ports: {e}"))?;
        let ports = listeners
            .iter()
            .map(TcpListener::local_addr)
            .map(|a| a.map(|a| a.port()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot find free loopback ports: {e}"))?;
        drop(listeners);
        let client_scheme = if self.tls.is_some() { "https" } else { "http" };
        let token = dir
            .path()
            .file_name()
            .map_or_else(|| "understudy-test".to_owned(), |n| n.to_string_lossy().into_owned());
        let names: Vec<String> = (0..self.members).map(|i| format!("m{i}")).collect();
        let initial_cluster = names
            .iter()
            .enumerate()
            .map(|(i, name)| format!("{name}=http://127.0.0.1:{}", ports[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            tls: self.tls.clone(),
            binary: binary.to_path_buf(),
            dir,
        };
        for (i, name) in names.into_iter().enumerate() {
            let (client_port, peer_port) = (ports[2 * i], ports[2 * i + 1]);
            let client_url = format!("{client_scheme}://127.0.0.1:{client_port}");
            let peer_url = format!("http://127.0.0.1:{peer_port}");
            let mut args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", cluster.dir.path().join(&name).display()),
                format!("--listen-client-urls={client_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster={initial_cluster}"),
                "--initial-cluster-state=new".to_owned(),
                format!("--initial-cluster-token={token}"),
                format!("--heartbeat-interval={}", self.heartbeat.as_millis()),
                format!("--election-timeout={}", self.election.as_millis()),
                "--logger=zap".to_owned(),
                "--log-outputs=stderr".to_owned(),
            ];
            if let Some(tls) = &self.tls {
                args.push(format!("--cert-file={}", tls.cert_file.display()));
                args.push(format!("--key-file={}", tls.key_file.display()));
                args.push(format!("--trusted-ca-file={}", tls.ca_file.display()));
                if tls.client_cert_auth {
                    args.push("--client-cert-auth".to_owned());
                }
            }
            let log = cluster.dir.path().join(format!("{name}.log"));
            cluster.members.push(Member {
                name,
                client_port,
                args,
                log,
                child: None,
            });
            // On failure the members started so far are stopped by `cluster`'s drop.
            cluster.launch(i)?;
        }
        Ok(cluster)
    }
}

struct Member {
    name: String,
    client_port: u16,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

/// Running etcd members; stops them and removes their data when dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    tls: Option<ServerTls>,
    binary: PathBuf,
    // Last, so it is removed after the members are stopped (see `Drop`).
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl EtcdCluster {
    /// Settings: one member, fast timing, plain HTTP.
    pub fn builder() -> EtcdBuilder {
        EtcdBuilder {
            members: 1,
            heartbeat: Duration::from_millis(50),
            election: Duration::from_millis(250),
            ready_timeout: Duration::from_secs(30),
            tls: None,
        }
    }

    /// One member with the default settings.
    pub async fn single() -> Result<EtcdCluster, String> {
        Self::builder().start().await
    }

    /// Every member's client endpoint (`127.0.0.1:PORT`), running or not.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client endpoint.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members.get(i).map_or(0, |m| m.client_port))
    }

    /// The directory holding the members' data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Options for a coordinator onto every member (with the TLS client
    /// settings, if the members use TLS).
    pub fn options(&self, journal_prefix: &str) -> EtcdOptions {
        self.options_for(self.endpoints(), journal_prefix)
    }

    fn options_for(&self, endpoints: Vec<String>, journal_prefix: &str) -> EtcdOptions {
        let mut opts = EtcdOptions::new(endpoints, journal_prefix);
        if let Some(tls) = &self.tls {
            opts.ca_file = Some(tls.ca_file.clone());
            if let Some((cert, key)) = &tls.client_cert {
                opts.cert_file = Some(cert.clone());
                opts.key_file = Some(key.clone());
            }
        }
        opts
    }

    /// A coordinator onto every member, journal under [`TEST_JOURNAL_PREFIX`].
    pub async fn connect(&self) -> Result<EtcdCoordinator, String> {
        EtcdCoordinator::connect(self.options(TEST_JOURNAL_PREFIX))
            .await
            .map_err(|e| e.to_string())
    }

    /// A plain etcd client onto every member (no TLS, no user), for what the
    /// trait does not offer: compaction, auth setup, member status.
    pub async fn client(&self) -> Result<etcd_client::Client, String> {
        etcd_client::Client::connect(self.endpoints(), None)
            .await
            .map_err(|e| format!("cannot connect to etcd: {e}"))
    }

    /// Whether member `i` is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.members.get_mut(i).and_then(|m| m.child.as_mut()) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills member `i` (SIGKILL: a crash, not a clean stop) and reaps it.
    pub fn kill(&mut self, i: usize) -> Result<(), String> {
        let member = self
            .members
            .get_mut(i)
            .ok_or_else(|| format!("there is no member {i}"))?;
        if let Some(mut child) = member.child.take() {
            let _ = child.kill();
            child
                .wait()
                .map_err(|e| format!("cannot reap etcd member {}: {e}", member.name))?;
        }
        Ok(())
    }

    /// Starts member `i` again on its data directory and waits until it answers.
    pub async fn restart(&mut self, i: usize) -> Result<(), String> {
        self.kill(i)?;
        self.launch(i)?;
        self.wait_member(i, Instant::now() + Duration::from_secs(30)).await
    }

    /// The index of the current leader, as the running members report it.
    pub async fn leader(&mut self) -> Result<usize, String> {
        let mut ids = Vec::new();
        let mut leader = None;
        for i in 0..self.members.len() {
            if !self.is_running(i) {
                ids.push(None);
                continue;
            }
            let mut client = etcd_client::Client::connect([self.endpoint(i)], None)
                .await
                .map_err(|e| format!("cannot connect to member {i}: {e}"))?;
            let status = tokio::time::timeout(Duration::from_secs(5), client.status())
                .await
                .map_err(|_| format!("member {i} did not report its status"))?
                .map_err(|e| format!("member {i} did not report its status: {e}"))?;
            ids.push(status.header().map(|h| h.member_id()));
            if status.leader() != 0 {
                leader = Some(status.leader());
            }
        }
        let leader = leader.ok_or("no member knows a leader")?;
        ids.iter()
            .position(|id| *id == Some(leader))
            .ok_or_else(|| format!("the leader {leader:x} is not a running member"))
    }

    /// Member `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        self.members
            .get(i)
            .and_then(|m| std::fs::read_to_string(&m.log).ok())
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        (0..self.members.len()).map(|i| self.log(i)).collect()
    }

    fn launch(&mut self, i: usize) -> Result<(), String> {
        let binary = self.binary.clone();
        let member = self
            .members
            .get_mut(i)
            .ok_or_else(|| format!("there is no member {i}"))?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&member.log)
            .map_err(|e| format!("cannot open {}: {e}", member.log.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", member.log.display()))?;
        let mut cmd = Command::new(&binary);
        cmd.args(&member.args).stdin(Stdio::null()).stdout(log).stderr(log_err);
        // etcd reads ETCD_* variables as flags; a developer's must not leak in.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(name);
            }
        }
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        member.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.members.len() {
            self.wait_member(i, deadline).await?;
        }
        Ok(())
    }

    /// Polls member `i` with a linearizable read until it answers (it then
    /// has a leader), it exits, or `deadline` passes.
    async fn wait_member(&mut self, i: usize, deadline: Instant) -> Result<(), String> {
        let mut opts = self.options_for(vec![self.endpoint(i)], TEST_JOURNAL_PREFIX);
        opts.request_timeout = Duration::from_millis(500);
        opts.connect_timeout = Duration::from_millis(500);
        let coord = EtcdCoordinator::connect(opts)
            .await
            .map_err(|e| format!("cannot connect to etcd member {i}: {e}"))?;
        loop {
            if !self.is_running(i) {
                return Err(format!(
                    "etcd member {i} exited while starting; its log:\n{}",
                    tail(&self.log(i), 30)
                ));
            }
            let last = match coord.get("/understudy-test/ready").await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd member {i} ({}) did not answer in time ({last}); its log:\n{}",
                    self.endpoint(i),
                    tail(&self.log(i), 30)
                ));
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // `dir` is removed after this, with the members gone.
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn etcd_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(ETCD_BIN_ENV).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("etcd"))
        .find(|path| path.is_file())
        .ok_or_else(|| format!("no etcd binary: install etcd (Debian: etcd-server) or set {ETCD_BIN_ENV} to its path"))
}

/// The member gets SIGKILL when the thread that started it exits.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only makes
    // one async-signal-safe system call (prctl).
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::other)
        });
    }
}

/// Checks the harness itself: a member starts, answers and goes away.
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn a_member_starts_answers_and_is_cleaned_up() {
        let etcd = EtcdCluster::single().await.unwrap();
        let dir = etcd.dir().to_path_buf();
        let coord = etcd.connect().await.unwrap();
        coord.put("k", b"v", None).await.unwrap();
        drop(coord);
        drop(etcd);
        assert!(!dir.exists(), "the data directory is removed");
    }
}
