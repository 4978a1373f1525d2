//! A multi-host test bed on one machine: "hosts" are Linux network
//! namespaces wired to a private bridge, with helpers to run processes inside
//! them, start etcd clusters on them and inject link faults.
//!
//! Used by integration tests and benchmarks of the other crates (as a
//! dev-dependency). It needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and
//! iproute2's `ip`; etcd clusters need Debian's `etcd-server` and
//! `etcd-client` (`/usr/bin/etcd`, `/usr/bin/etcdctl`).
//!
//! # Shape
//!
//! ```text
//!   machine's own namespace: untouched (no interface, address or route added)
//!
//!   ustb<pid>x<seq>-sw          ustb<pid>x<seq>-<host>
//!   ┌──────────────────┐        ┌─────────────────────┐
//!   │ br0 ── p1 ═══════╪════════╪═ eth0 10.213.X.1/24 │  host "a"
//!   │    └── p2 ═══════╪════╗   └─────────────────────┘
//!   │ (lo up)          │    ║   ┌─────────────────────┐
//!   └──────────────────┘    ╚═══╪═ eth0 10.213.X.2/24 │  host "b"
//!                               └─────────────────────┘
//! ```
//!
//! - [`Bed::new`] creates the *switch* namespace with bridge `br0`; each
//!   [`Bed::add_host`] creates a host namespace and a veth pair whose switch end
//!   `p<N>` is a port of `br0` and whose other end is `eth0` in the host, with
//!   address `10.213.X.N/24` and MAC `02:75:73:X:00:N`. Loopback is up
//!   everywhere. The 10.213.0.0/16 range is only ever configured inside the
//!   bed's own namespaces.
//! - Names: every namespace of a bed starts with [`Bed::prefix`],
//!   `ustb<pid>x<seq>-`, where `pid` is the creating process and `seq` a
//!   per-process counter, so parallel tests (threads or processes) never
//!   collide and a crashed run's leftovers are recognisable. Interface names
//!   (IFNAMSIZ 15) are only unique per namespace (`br0`, `p<N>`, `eth0`),
//!   which is enough because every bed has its own switch namespace. For the
//!   same reason two beds are isolated from each other even when their
//!   subnets coincide; `X` differs between the beds of one process anyway,
//!   which makes logs easier to read.
//! - Processes: [`Host::command`] gives a [`std::process::Command`] that
//!   enters the host's namespace right before `exec` (`setns(2)` in
//!   `pre_exec`, no `ip netns exec`), in its own process group, stdin from
//!   `/dev/null`. [`Host::spawn`] starts it and tracks it: the bed SIGKILLs
//!   the process group and reaps it when dropped. [`run`] / [`run_ok`] run a
//!   command to completion with a bounded wait. Note that `/sys` is not
//!   remounted (unlike `ip netns exec`): `/sys/class/net` still shows the
//!   machine's interfaces; netlink-based tools (`ip`) see the namespace.
//! - In-process networking: [`Host::enter`] runs a closure on a thread that
//!   has joined the host's namespace; [`Host::tcp_listen`] and
//!   [`Host::tcp_connect`] use it to create std sockets that live in the host's
//!   namespace (a socket keeps the namespace it was created in).
//! - etcd: [`Bed::start_etcd`] (dedicated hosts `etcd1`…) or
//!   [`Bed::start_etcd_on`] (the caller's hosts, e.g. co-located with agents)
//!   start an [`EtcdCluster`] with 50 ms heartbeats and 250 ms election
//!   timeout and wait until every member serves linearizable reads (about
//!   0.4 s for three members). Members start one after the other, each once
//!   the previous one serves its peer port: started all at once, a member
//!   that asks a peer whose port is bound but not yet served whether it was
//!   bootstrapped already waits out etcd's one-second bootstrap timeout.
//!   Data directories and logs live in the bed's temporary directory.
//! - Faults: [`Bed::cut`] / [`Bed::restore`] take the host's switch port
//!   down/up (its `eth0` loses carrier; packets are dropped silently, as with a
//!   pulled cable). [`Bed::cut_between`] / [`Bed::restore_between`] make two
//!   hosts unable to reach each other's primary address while both still reach
//!   everybody else (a static neighbour entry pointing at an unused MAC on
//!   each side, so packets vanish silently and connections time out rather
//!   than fail fast — see the method). Process faults are the caller's; see
//!   [`pause`], [`resume`], [`Process::pause`].
//! - Clean-up: dropping the [`Bed`] (also while unwinding from a panic) kills
//!   every tracked process, SIGKILLs anything else still running in its
//!   namespaces, deletes the namespaces (which destroys the veths), removes
//!   the temporary directory and the registry entry. [`cleanup_leftovers`]
//!   (also run by every [`Bed::new`]) removes what a run that died without
//!   unwinding (SIGKILL, Ctrl-C) left behind: namespaces, processes in them,
//!   temporary directories — but only those whose creating process is gone.
//!   Each bed records its creator's pid and start time in
//!   `/run/understudy-testbed/ustb<pid>x<seq>`, so a reused pid is not
//!   mistaken for the creator. Processes get no `PR_SET_PDEATHSIG` (it fires
//!   when the *spawning thread* exits, which would kill a cluster started
//!   from a short-lived worker thread), so after a SIGKILLed run they live
//!   on until the next [`Bed::new`] or [`cleanup_leftovers`].
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use understudy_testbed::{Bed, run_ok};
//!
//! # fn main() -> understudy_testbed::Result<()> {
//! let bed = Bed::new("example")?;
//! let a = bed.add_host("a")?;
//! let b = bed.add_host("b")?;
//! let listener = b.tcp_listen(7000)?;
//! a.tcp_connect((b.addr(), 7000), Duration::from_secs(1))?;
//! drop(listener);
//!
//! let etcd = bed.start_etcd(3)?;
//! let mut put = etcd.etcdctl(&a);
//! put.args(["put", "k", "v"]);
//! run_ok(&mut put, Duration::from_secs(5))?;
//! etcd.kill(0)?;
//! bed.cut_between(&a, &b)?;
//! # Ok(())
//! # }
//! ```
//!
//! Safety rule of the house: traffic only ever goes to the bed's own
//! namespaces (or the machine's loopback); nothing here routes anywhere else.

mod bed;
mod error;
mod etcd;
mod exec;
mod leftovers;
mod ns;

pub use bed::{Bed, Host};
pub use error::{Error, Result};
pub use etcd::{ETCD_CLIENT_PORT, ETCD_PEER_PORT, EtcdCluster};
pub use exec::{Process, pause, resume, run, run_ok};
pub use leftovers::{Leftovers, cleanup_leftovers};
pub use nix::sys::signal::Signal;

/// The first characters of every namespace, temporary directory and registry
/// entry a bed creates.
pub const NAME_PREFIX: &str = "ustb";

#[cfg(test)]
mod tests {
    fn shareable<T: Send + Sync>() {}

    #[test]
    fn handles_can_cross_threads() {
        shareable::<crate::Bed>();
        shareable::<crate::Host>();
        shareable::<crate::EtcdCluster>();
        shareable::<crate::Process>();
    }
}
