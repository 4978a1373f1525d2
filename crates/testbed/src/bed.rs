//! The bed (switch namespace, bridge, registry, clean-up) and its hosts.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use tempfile::TempDir;

use crate::error::{Error, Result};
use crate::exec::{Process, describe, enter_netns_at_exec, enter_netns_on_this_thread, open_netns, run};
use crate::leftovers::{BedId, cleanup_leftovers, register};
use crate::ns::{ip, netns_add, netns_del, netns_sweep};

/// The bridge inside the switch namespace.
const BRIDGE: &str = "br0";
/// The host's end of its veth pair.
const HOST_IFACE: &str = "eth0";
/// Prefix length of every bed's subnet.
const PREFIX_LEN: u8 = 24;
/// Highest host number (10.213.X.N); .255 is the broadcast address.
const MAX_HOSTS: u8 = 254;
/// Longest host name accepted.
const MAX_HOST_NAME: usize = 32;

/// Beds made by this process so far; part of every bed's id.
static SEQ: AtomicU32 = AtomicU32::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Fails with [`Error::NotRoot`] unless the effective uid is 0.
pub(crate) fn require_root() -> Result<()> {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        Ok(())
    } else {
        Err(Error::NotRoot { euid: euid.as_raw() })
    }
}

/// What the bed and all its hosts share.
pub(crate) struct Shared {
    id: String,
    prefix: String,
    octet: u8,
    switch_ns: String,
    dir: PathBuf,
    tempdir: Mutex<Option<TempDir>>,
    registry: Mutex<Option<PathBuf>>,
    closed: AtomicBool,
    procs: Mutex<Vec<Process>>,
    /// Every namespace created, in creation order (switch first).
    namespaces: Mutex<Vec<String>>,
    hosts: Mutex<Vec<Arc<HostInfo>>>,
    /// Hosts whose switch port is down.
    cut_hosts: Mutex<BTreeSet<u8>>,
    /// Host pairs (lower index first) that cannot reach each other.
    cut_pairs: Mutex<BTreeSet<(u8, u8)>>,
    etcd_clusters: AtomicU32,
}

impl Shared {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            Err(Error::Closed(self.id.clone()))
        } else {
            Ok(())
        }
    }

    /// Spawns `cmd` and tracks the process; refuses once torn down.
    fn spawn(&self, cmd: &mut Command) -> Result<Process> {
        let mut procs = lock(&self.procs);
        // Checked under the lock teardown drains, so nothing slips past it.
        self.check_open()?;
        let label = describe(cmd);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            command: label.clone(),
            source,
        })?;
        let process = Process::new(child, label);
        procs.retain(|p| !p.known_exited());
        procs.push(process.clone());
        Ok(process)
    }

    pub(crate) fn next_etcd_cluster(&self) -> u32 {
        self.etcd_clusters.fetch_add(1, Ordering::SeqCst)
    }

    fn create_netns(&self, name: &str) -> Result<()> {
        {
            let mut namespaces = lock(&self.namespaces);
            // Checked under the lock teardown drains, so none is left behind.
            self.check_open()?;
            netns_add(name)?;
            namespaces.push(name.to_owned());
        }
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Kills, deletes and removes everything; returns what went wrong.
    fn teardown(&self) -> Vec<String> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Vec::new();
        }
        let mut errors = Vec::new();
        let procs = std::mem::take(&mut *lock(&self.procs));
        for process in procs {
            if let Err(e) = process.kill() {
                errors.push(e.to_string());
            }
        }
        let namespaces = std::mem::take(&mut *lock(&self.namespaces));
        // Hosts first, the switch last.
        for ns in namespaces.iter().rev() {
            if let Err(e) = netns_sweep(ns) {
                errors.push(e.to_string());
            }
            if let Err(e) = netns_del(ns) {
                errors.push(e.to_string());
            }
        }
        if let Some(dir) = lock(&self.tempdir).take() {
            let path = dir.path().to_owned();
            if let Err(e) = dir.close() {
                errors.push(format!("remove {}: {e}", path.display()));
            }
        }
        if let Some(path) = lock(&self.registry).take()
            && let Err(e) = std::fs::remove_file(&path)
        {
            errors.push(format!("remove {}: {e}", path.display()));
        }
        errors
    }
}

/// A host's facts.
#[derive(Debug)]
struct HostInfo {
    name: String,
    netns: String,
    index: u8,
    addr: Ipv4Addr,
    mac: String,
    port: String,
}

/// A set of hosts (network namespaces) on a private bridge. See the crate
/// documentation for the layout. Dropping it tears everything down.
pub struct Bed {
    shared: Arc<Shared>,
}

impl fmt::Debug for Bed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bed")
            .field("id", &self.shared.id)
            .field("subnet", &format_args!("{}/{}", self.subnet(), PREFIX_LEN))
            .field("hosts", &*lock(&self.shared.hosts))
            .finish()
    }
}

fn sanitize_hint(hint: &str) -> String {
    let s: String = hint
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' })
        .take(24)
        .collect();
    if s.is_empty() { "bed".to_owned() } else { s }
}

impl Bed {
    /// Creates a bed: its registry entry, a temporary directory and the
    /// switch namespace with bridge `br0` (no hosts yet). `name_hint` only
    /// labels the temporary directory and the registry entry.
    ///
    /// Fails with [`Error::NotRoot`] when not run as root. Removes the
    /// leftovers of dead runs first ([`cleanup_leftovers`]).
    pub fn new(name_hint: &str) -> Result<Bed> {
        require_root()?;
        match cleanup_leftovers() {
            Ok(report) => {
                for e in &report.errors {
                    eprintln!("understudy-testbed: cleaning leftovers: {e}");
                }
            }
            Err(e) => eprintln!("understudy-testbed: cleaning leftovers: {e}"),
        }
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let bed_id = BedId { pid, seq };
        let id = bed_id.render();
        let prefix = format!("{id}-");
        let hint = sanitize_hint(name_hint);
        let tempdir = tempfile::Builder::new()
            .prefix(&format!("{prefix}{hint}-"))
            .tempdir()
            .map_err(|e| Error::io("create the bed's temporary directory", e))?;
        let dir = tempdir.path().to_owned();
        // Registered before any namespace exists, so a crash at any point
        // after this leaves nothing unaccounted for.
        let registry = match register(bed_id, &hint, &dir) {
            Ok(path) => path,
            Err(e) => {
                let _ = tempdir.close();
                return Err(e);
            }
        };
        let octet = u8::try_from(pid.wrapping_mul(61).wrapping_add(seq) % 256).unwrap_or(0);
        let bed = Bed {
            shared: Arc::new(Shared {
                switch_ns: format!("{prefix}sw"),
                id,
                prefix,
                octet,
                dir,
                tempdir: Mutex::new(Some(tempdir)),
                registry: Mutex::new(Some(registry)),
                closed: AtomicBool::new(false),
                procs: Mutex::new(Vec::new()),
                namespaces: Mutex::new(Vec::new()),
                hosts: Mutex::new(Vec::new()),
                cut_hosts: Mutex::new(BTreeSet::new()),
                cut_pairs: Mutex::new(BTreeSet::new()),
                etcd_clusters: AtomicU32::new(0),
            }),
        };
        // From here on, an error drops `bed`, which removes what was made.
        let sw = bed.shared.switch_ns.as_str();
        bed.shared.create_netns(sw)?;
        ip(&["-n", sw, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", sw, "link", "set", BRIDGE, "up"])?;
        Ok(bed)
    }

    /// The bed's id, `ustb<pid>x<seq>`.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The prefix of all its namespace names (and its temporary directory's
    /// name), `ustb<pid>x<seq>-`.
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// The switch namespace (holds the bridge `br0` and the ports `p<N>`).
    pub fn switch_netns(&self) -> &str {
        &self.shared.switch_ns
    }

    /// The subnet's network address, `10.213.X.0` (prefix length
    /// [`Bed::prefix_len`]).
    pub fn subnet(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.shared.octet, 0)
    }

    /// The subnet's prefix length (24).
    pub fn prefix_len(&self) -> u8 {
        PREFIX_LEN
    }

    /// The address `10.213.X.n` of the bed's subnet. Host number N has
    /// `.N` (hosts count from 1 in order of creation), so a number above
    /// the hosts' is free, e.g. for a floating IP (`bed.address(100)`).
    pub fn address(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.shared.octet, n)
    }

    /// The bed's temporary directory (etcd data lives here); removed on drop.
    pub fn temp_dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Every namespace the bed has created so far, switch first.
    pub fn namespaces(&self) -> Vec<String> {
        lock(&self.shared.namespaces).clone()
    }

    /// Adds a host: namespace `<prefix><name>`, veth `p<N>` (switch, port
    /// of `br0`) ⇄ `eth0` (host) with `10.213.X.N/24`, everything up. `N`
    /// counts from 1 in order of creation. Names are 1–32 characters of
    /// `[A-Za-z0-9_-]` and unique in the bed.
    pub fn add_host(&self, name: &str) -> Result<Host> {
        if name.is_empty()
            || name.len() > MAX_HOST_NAME
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(Error::Invalid(format!(
                "host name {name:?}: use 1 to {MAX_HOST_NAME} characters of [A-Za-z0-9_-]"
            )));
        }
        if name == "sw" {
            return Err(Error::Invalid("host name \"sw\" is the switch's namespace".to_owned()));
        }
        let mut hosts = lock(&self.shared.hosts);
        if hosts.iter().any(|h| h.name == name) {
            return Err(Error::Invalid(format!("the bed already has a host called {name}")));
        }
        let index = u8::try_from(hosts.len() + 1)
            .ok()
            .filter(|&i| i <= MAX_HOSTS)
            .ok_or_else(|| Error::Invalid(format!("a bed holds at most {MAX_HOSTS} hosts")))?;
        let octet = self.shared.octet;
        let info = HostInfo {
            name: name.to_owned(),
            netns: format!("{}{name}", self.shared.prefix),
            index,
            addr: Ipv4Addr::new(10, 213, octet, index),
            mac: format!("02:75:73:{octet:02x}:00:{index:02x}"),
            port: format!("p{index}"),
        };
        let sw = self.shared.switch_ns.as_str();
        let ns = info.netns.as_str();
        let cidr = format!("{}/{PREFIX_LEN}", info.addr);
        self.shared.create_netns(ns)?;
        let wired = (|| {
            ip(&[
                "-n", sw, "link", "add", &info.port, "type", "veth", "peer", "name", HOST_IFACE, "address", &info.mac,
                "netns", ns,
            ])?;
            ip(&["-n", sw, "link", "set", &info.port, "master", BRIDGE, "up"])?;
            ip(&["-n", ns, "addr", "add", &cidr, "dev", HOST_IFACE])?;
            ip(&["-n", ns, "link", "set", HOST_IFACE, "up"])
        })();
        if let Err(e) = wired {
            // Deleting the namespace destroys the veth pair too, so the
            // next host can have this number.
            if netns_del(ns).is_ok() {
                lock(&self.shared.namespaces).retain(|n| n != ns);
            }
            return Err(e);
        }
        let info = Arc::new(info);
        hosts.push(info.clone());
        Ok(Host {
            info,
            bed: self.shared.clone(),
        })
    }

    /// The host called `name`, if any.
    pub fn host(&self, name: &str) -> Option<Host> {
        lock(&self.shared.hosts)
            .iter()
            .find(|h| h.name == name)
            .map(|info| Host {
                info: info.clone(),
                bed: self.shared.clone(),
            })
    }

    /// All hosts, in order of creation.
    pub fn hosts(&self) -> Vec<Host> {
        lock(&self.shared.hosts)
            .iter()
            .map(|info| Host {
                info: info.clone(),
                bed: self.shared.clone(),
            })
            .collect()
    }

    /// The processes started through the bed that have not been seen to
    /// exit.
    pub fn processes(&self) -> Vec<Process> {
        let mut procs = lock(&self.shared.procs);
        procs.retain(|p| !p.known_exited());
        procs.clone()
    }

    fn check_mine(&self, host: &Host) -> Result<()> {
        if Arc::ptr_eq(&host.bed, &self.shared) {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "host {} belongs to bed {}, not {}",
                host.info.name, host.bed.id, self.shared.id
            )))
        }
    }

    /// Pulls `host`'s cable: its switch port goes down, its `eth0` loses
    /// carrier, every packet to or from it is dropped silently.
    pub fn cut(&self, host: &Host) -> Result<()> {
        self.check_mine(host)?;
        self.shared.check_open()?;
        ip(&["-n", &self.shared.switch_ns, "link", "set", &host.info.port, "down"])?;
        lock(&self.shared.cut_hosts).insert(host.info.index);
        Ok(())
    }

    /// Plugs `host`'s cable back in (undoes [`Bed::cut`]; a no-op if it was
    /// not cut). Like a real link, it carries traffic again only once the
    /// kernel's link watch has seen the carrier (up to about a second):
    /// poll for reachability rather than expecting it at once.
    pub fn restore(&self, host: &Host) -> Result<()> {
        self.check_mine(host)?;
        self.shared.check_open()?;
        ip(&["-n", &self.shared.switch_ns, "link", "set", &host.info.port, "up"])?;
        lock(&self.shared.cut_hosts).remove(&host.info.index);
        Ok(())
    }

    fn pair(&self, a: &Host, b: &Host) -> Result<(u8, u8)> {
        self.check_mine(a)?;
        self.check_mine(b)?;
        self.shared.check_open()?;
        let (x, y) = (a.info.index, b.info.index);
        if x == y {
            return Err(Error::Invalid(format!("cannot cut host {} from itself", a.info.name)));
        }
        Ok((x.min(y), x.max(y)))
    }

    /// The MAC no interface in this bed has: frames sent to it are flooded
    /// by the bridge and dropped by every host.
    fn nowhere_mac(&self) -> String {
        format!("02:75:73:{:02x}:ff:00", self.shared.octet)
    }

    /// Partitions `a` from `b` only: neither reaches the other's primary
    /// address, both still reach every other host.
    ///
    /// Done with a permanent neighbour entry on each side that maps the
    /// other's address to a MAC nobody has, so packets leave and are
    /// silently dropped: connections time out, as in a real partition
    /// (blackhole routes would fail sends at once with EINVAL, and this
    /// kernel has neither nftables nor tc classifiers to rely on). It covers
    /// the hosts' primary addresses, not addresses added later (a floating
    /// IP): cut the host ([`Bed::cut`]) to isolate it completely.
    pub fn cut_between(&self, a: &Host, b: &Host) -> Result<()> {
        let pair = self.pair(a, b)?;
        let mac = self.nowhere_mac();
        for (from, to) in [(a, b), (b, a)] {
            ip(&[
                "-n",
                &from.info.netns,
                "neigh",
                "replace",
                &to.info.addr.to_string(),
                "dev",
                HOST_IFACE,
                "lladdr",
                &mac,
                "nud",
                "permanent",
            ])?;
        }
        lock(&self.shared.cut_pairs).insert(pair);
        Ok(())
    }

    /// Undoes [`Bed::cut_between`] (a no-op if the pair was not cut).
    pub fn restore_between(&self, a: &Host, b: &Host) -> Result<()> {
        let pair = self.pair(a, b)?;
        if !lock(&self.shared.cut_pairs).contains(&pair) {
            return Ok(());
        }
        for (from, to) in [(a, b), (b, a)] {
            ip(&[
                "-n",
                &from.info.netns,
                "neigh",
                "del",
                &to.info.addr.to_string(),
                "dev",
                HOST_IFACE,
            ])?;
        }
        lock(&self.shared.cut_pairs).remove(&pair);
        Ok(())
    }

    /// Undoes every [`Bed::cut`] and [`Bed::cut_between`] still in force.
    pub fn restore_all(&self) -> Result<()> {
        let hosts = self.hosts();
        let by_index = |i: u8| hosts.iter().find(|h| h.info.index == i);
        let cut: Vec<u8> = lock(&self.shared.cut_hosts).iter().copied().collect();
        for host in cut.into_iter().filter_map(by_index) {
            self.restore(host)?;
        }
        let pairs: Vec<(u8, u8)> = lock(&self.shared.cut_pairs).iter().copied().collect();
        for (x, y) in pairs {
            if let (Some(a), Some(b)) = (by_index(x), by_index(y)) {
                self.restore_between(a, b)?;
            }
        }
        Ok(())
    }

    /// Tears the bed down now and reports every failure (dropping it does
    /// the same but can only print them).
    pub fn teardown(self) -> Result<()> {
        let errors = self.shared.teardown();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "tearing down {}: {}",
                self.shared.id,
                errors.join("; ")
            )))
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for e in self.shared.teardown() {
            eprintln!("understudy-testbed: tearing down {}: {e}", self.shared.id);
        }
    }
}

/// A host of a [`Bed`]: a network namespace with `eth0` on the bed's bridge.
/// Cheap to clone. It may outlive the bed, but once the bed is torn down
/// nothing can be started in it any more.
#[derive(Clone)]
pub struct Host {
    info: Arc<HostInfo>,
    bed: Arc<Shared>,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.info.name)
            .field("netns", &self.info.netns)
            .field("addr", &self.info.addr)
            .finish()
    }
}

impl Host {
    /// The name given to [`Bed::add_host`].
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The namespace's name (for `ip -n NAME …`, `ip netns exec NAME …`).
    pub fn netns(&self) -> &str {
        &self.info.netns
    }

    /// Its address, `10.213.X.N`.
    pub fn addr(&self) -> Ipv4Addr {
        self.info.addr
    }

    /// Its address with prefix length, `10.213.X.N/24`.
    pub fn cidr(&self) -> String {
        format!("{}/{PREFIX_LEN}", self.info.addr)
    }

    /// The interface inside the namespace, `eth0`.
    pub fn iface(&self) -> &str {
        HOST_IFACE
    }

    /// `eth0`'s MAC address, `02:75:73:X:00:N`.
    pub fn mac(&self) -> &str {
        &self.info.mac
    }

    /// Its number `N` in the bed (1-based, order of creation).
    pub fn index(&self) -> u8 {
        self.info.index
    }

    /// The switch end of its veth pair (`p<N>` in the switch namespace).
    pub fn switch_port(&self) -> &str {
        &self.info.port
    }

    /// The id of the bed it belongs to.
    pub fn bed_id(&self) -> &str {
        &self.bed.id
    }

    /// A command that runs `program` inside this host's network namespace
    /// (joined with `setns(2)` right before `exec`), as the leader of a new
    /// process group, with stdin from `/dev/null`. Start it with
    /// [`Host::spawn`] to have the bed kill it on drop, or with [`crate::run`]
    /// for a bounded run to completion. If the namespace is gone (the bed
    /// was torn down), starting the command fails.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.process_group(0).stdin(Stdio::null());
        match open_netns(&self.info.netns) {
            Ok(ns) => enter_netns_at_exec(&mut cmd, ns),
            Err(_) => {
                // Make the spawn fail rather than run in the wrong namespace.
                cmd.current_dir(Path::new("/run/netns").join(&self.info.netns));
            }
        }
        cmd
    }

    /// Starts `cmd` (best built with [`Host::command`]) and tracks it: when
    /// the bed is dropped its process group is SIGKILLed and reaped.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Process> {
        self.bed.spawn(cmd)
    }

    /// Runs `bash -c script` in this host and waits up to `timeout` (see
    /// [`crate::run`]; a non-zero exit is not an error).
    pub fn bash(&self, script: &str, timeout: Duration) -> Result<Output> {
        let mut cmd = self.command("bash");
        cmd.arg("-c").arg(script);
        run(&mut cmd, timeout)
    }

    /// Runs `f` on a fresh thread that has joined this host's network
    /// namespace, and returns its result. Sockets created in `f` belong to
    /// the host's namespace for their whole life, whichever thread uses them
    /// afterwards. A panic in `f` is propagated.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.bed.check_open()?;
        let ns = open_netns(&self.info.netns)?;
        let name = self.info.netns.as_str();
        thread::scope(|scope| {
            let worker = scope.spawn(move || {
                enter_netns_on_this_thread(&ns, name)?;
                Ok(f())
            });
            match worker.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A TCP listener on `0.0.0.0:port` inside this host (port 0 picks a
    /// free one; ask the listener's `local_addr`).
    pub fn tcp_listen(&self, port: u16) -> Result<TcpListener> {
        self.enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
            .map_err(|e| Error::io(format!("listen on port {port} in {}", self.info.name), e))
    }

    /// A TCP connection from this host to `addr`, giving up after `timeout`.
    pub fn tcp_connect(&self, addr: impl Into<SocketAddr>, timeout: Duration) -> Result<TcpStream> {
        let addr = addr.into();
        self.enter(|| TcpStream::connect_timeout(&addr, timeout))?
            .map_err(|e| Error::io(format!("connect from {} to {addr}", self.info.name), e))
    }
}
