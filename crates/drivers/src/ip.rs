//! The `ip` driver: a floating IP address (F2, S1.4).
//!
//! Everything happens in the network namespace the agent runs in: the
//! netlink and packet sockets are opened by the task that runs the
//! operation, and a socket keeps the namespace it was created in.
//!
//! - **start** finds the interface: `interface` if set, otherwise the one
//!   (up) interface carrying an address in the floating address's subnet —
//!   none, or several, is an error that asks for `interface`. If the address
//!   is already there, start only announces it again (it never probes
//!   against itself). Otherwise, with `probe` on, it first makes sure nobody
//!   else holds the address: three probes 100 ms apart, listening for 400 ms
//!   in all (ARP probes per RFC 5227 — sender IP 0.0.0.0 — for IPv4,
//!   duplicate-address-detection neighbour solicitations — source `::` — for
//!   IPv6). A host that answers for the address, claims it, or probes for it
//!   at the same time makes start refuse, naming that host's MAC (a
//!   simultaneous IPv6 probe is seen only if the NIC passes that address's
//!   solicited-node multicast, as bridges and veths do: the group is not
//!   joined before the address is added). Then the address is added over
//!   netlink (IPv6 with `nodad`: the probe was the duplicate address
//!   detection, and the address is usable at once), and announced
//!   `announce_count` times 100 ms apart — the first before start returns,
//!   the others from a background task: gratuitous ARP (a request and a reply, both broadcast, sender = target =
//!   the address) or an unsolicited neighbour advertisement to all nodes
//!   (override flag, target link-layer address option). With
//!   `announce_repeat_after` > 0, a second burst follows after that delay
//!   from a spawned task, so start does not wait for it; it is skipped if the
//!   address has gone meanwhile, and stop cancels it. If start fails after
//!   adding the address (announcing failed, or the timeout struck), it
//!   removes the address again. Interfaces without Ethernet address
//!   resolution (no MAC, `NOARP`) get the address without probe or
//!   announcement.
//! - **stop** removes the address (from `interface` if set, otherwise from
//!   wherever it is); an absent address is fine.
//! - **monitor** reports `Running` while the address is on its interface
//!   and the interface is up with carrier, `Failed` with the reason when the
//!   interface is down, has no carrier or the kernel found the (IPv6)
//!   address duplicated, and `Stopped` once the address is gone.
//! - **probe** reports `Running` if the address is present, else `Stopped`.
//!
//! Raw frames go through an `AF_PACKET` socket bound to the interface and
//! to the ARP or IPv6 ethertype. It is opened on the operation's thread and
//! used from the blocking pool (probing waits with poll(2)); a timed-out or
//! cancelled operation stops its socket work before the next send. The only
//! `unsafe` is the `bind(2)` with a `sockaddr_ll`, which neither nix nor
//! socket2 can build safely.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage, State};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::socket::{self, LinkAddr, MsgFlags, SockFlag, SockType};
use tokio::sync::Mutex;
use tokio::task::AbortHandle;
use understudy_core::spec::IpSpec;

use crate::{Driver, DriverEnv, DriverError, Health, OpCtx};

/// Probes sent before taking an address.
const PROBE_COUNT: u32 = 3;
/// Time between probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How long, from the first probe, answers are awaited.
const PROBE_WINDOW: Duration = Duration::from_millis(400);
/// Time between announcements of one burst.
const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(100);
/// Bound on removing an address again after a failed start.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on the second burst's work (besides its sends' spacing).
const REPEAT_SLACK: Duration = Duration::from_secs(2);

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_HEADER: usize = 14;
/// Ethernet's minimum frame length without the checksum.
const ETH_MIN_FRAME: usize = 60;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_OPT_TARGET_LL_ADDR: u8 = 2;
/// Neighbour advertisement flag "override".
const NA_OVERRIDE: u8 = 0x20;

type Mac = [u8; 6];

fn show_mac(mac: &Mac) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Manages one floating address (see the module docs).
pub struct IpDriver {
    resource: String,
    spec: IpSpec,
    /// Serialises start and stop.
    ops: Mutex<()>,
    /// The pending second burst of announcements, if any.
    repeat: StdMutex<Option<AbortHandle>>,
}

impl std::fmt::Debug for IpDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpDriver")
            .field("resource", &self.resource)
            .field("address", &self.spec.address)
            .field("interface", &self.spec.interface)
            .finish_non_exhaustive()
    }
}

impl Drop for IpDriver {
    fn drop(&mut self) {
        self.cancel_repeat();
    }
}

impl IpDriver {
    pub fn new(resource: &str, spec: &IpSpec, _env: &DriverEnv) -> Result<Self, DriverError> {
        Ok(IpDriver {
            resource: resource.to_owned(),
            spec: spec.clone(),
            ops: Mutex::new(()),
            repeat: StdMutex::new(None),
        })
    }

    fn ip(&self) -> IpAddr {
        self.spec.address.addr()
    }

    fn failed(&self, op: &'static str, message: impl Into<String>) -> DriverError {
        DriverError::failed(op, &self.resource, message)
    }

    fn timeout(&self, op: &'static str, timeout: Duration) -> DriverError {
        DriverError::timeout(op, &self.resource, timeout)
    }

    fn cancel_repeat(&self) {
        if let Some(task) = lock(&self.repeat).take() {
            task.abort();
        }
    }

    /// Where the address is now: its interface and its entries there.
    /// With `interface` set only that interface counts (a missing one holds
    /// nothing); otherwise the first interface carrying it.
    async fn find_present(&self, nl: &Netlink) -> Result<Option<(Link, Vec<Addr>)>, String> {
        let ip = self.ip();
        let mine: Vec<Addr> = nl.addresses(ip).await?.into_iter().filter(|a| a.ip == ip).collect();
        let link = match &self.spec.interface {
            Some(name) => nl.link_by_name(name).await?,
            None => match mine.first() {
                Some(a) => nl.link_by_index(a.index).await?,
                None => None,
            },
        };
        let Some(link) = link else {
            return Ok(None);
        };
        let here: Vec<Addr> = mine.into_iter().filter(|a| a.index == link.index).collect();
        Ok(if here.is_empty() { None } else { Some((link, here)) })
    }

    /// The interface to add the address to (it is not present anywhere).
    async fn choose_interface(&self, nl: &Netlink) -> Result<Link, String> {
        if let Some(name) = &self.spec.interface {
            return nl
                .link_by_name(name)
                .await?
                .ok_or_else(|| format!("interface {name} does not exist"));
        }
        let ip = self.ip();
        let net = self.spec.address.trunc();
        let mut indices: Vec<u32> = Vec::new();
        for a in nl.addresses(ip).await? {
            if a.ip != ip && net.contains(&a.ip) && !indices.contains(&a.index) {
                indices.push(a.index);
            }
        }
        let mut links = Vec::new();
        for index in indices {
            if let Some(link) = nl.link_by_index(index).await? {
                links.push(link);
            }
        }
        let names = |links: &[Link]| links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ");
        let (up, down): (Vec<Link>, Vec<Link>) = links.into_iter().partition(Link::admin_up);
        match up.len() {
            1 => Ok(up.into_iter().next().ok_or("interface vanished")?),
            0 if down.is_empty() => Err(format!(
                "no interface has an address in {net} to put {ip} next to; set `interface`"
            )),
            0 => Err(format!(
                "the interface with an address in {net} ({}) is down; cannot take {ip}",
                names(&down)
            )),
            _ => Err(format!(
                "several interfaces have an address in {net} ({}); set `interface` to choose one",
                names(&up)
            )),
        }
    }

    async fn start_inner(&self, added: &AtomicU32) -> Result<(), String> {
        let ip = self.ip();
        let prefix = self.spec.address.prefix_len();
        let nl = Netlink::open()?;
        let (link, present) = match self.find_present(&nl).await? {
            Some((link, _)) => (link, true),
            None => (self.choose_interface(&nl).await?, false),
        };
        if let Some(reason) = link.down_reason() {
            return Err(format!("{reason}; cannot take {ip}"));
        }
        let wire = link.resolving_mac().map(|mac| Wire { ip, mac });
        if wire.is_none() {
            tracing::info!(
                "{}: {} does no Ethernet address resolution; {ip} is neither probed for nor announced",
                self.resource,
                link.name
            );
        }
        if present {
            tracing::debug!(
                "{}: {ip} is on {} already; announcing it again",
                self.resource,
                link.name
            );
        } else {
            if self.spec.probe
                && let Some(wire) = &wire
            {
                let wire = *wire;
                let conflict = async {
                    let socket = PacketSocket::open(link.index, wire.ethertype())?;
                    blocking(move |cancel| probe_for_conflict(&socket, &wire, cancel)).await
                }
                .await
                .map_err(|e| format!("cannot probe for {ip} on {}: {e}", link.name))?;
                if let Some(conflict) = conflict {
                    return Err(conflict.describe(ip));
                }
            }
            nl.add(link.index, ip, prefix).await?;
            added.store(link.index, Ordering::SeqCst);
            tracing::info!("{}: added {ip}/{prefix} to {}", self.resource, link.name);
        }
        let count = self.spec.announce_count;
        if let Some(wire) = wire
            && count > 0
        {
            // The first announcement goes out before start returns (neighbours
            // learn the new MAC at once); the rest of the burst and the second
            // burst follow from a task, so they do not delay the group.
            announce_on(wire, link.index, 1)
                .await
                .map_err(|e| format!("cannot announce {ip} on {}: {e}", link.name))?;
            self.spawn_followups(ip, link.index, count, self.spec.announce_repeat_after);
        }
        Ok(())
    }

    /// From a task of its own: the rest of the first burst (`count - 1`
    /// rounds, starting one interval after the first), then, if `after` is
    /// not zero, a second burst of `count` rounds `after` the first.
    fn spawn_followups(&self, ip: IpAddr, index: u32, count: u32, after: Duration) {
        let rest = count.saturating_sub(1);
        if rest == 0 && after.is_zero() {
            return;
        }
        let resource = self.resource.clone();
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            for (label, wait, rounds) in [("first", ANNOUNCE_INTERVAL, rest), ("second", after, count)] {
                if rounds == 0 || wait.is_zero() {
                    continue;
                }
                tokio::time::sleep_until(started + wait).await;
                let bound = ANNOUNCE_INTERVAL.saturating_mul(rounds).saturating_add(REPEAT_SLACK);
                match tokio::time::timeout(bound, repeat_burst(ip, index, rounds)).await {
                    Ok(Ok(true)) => tracing::debug!("{resource}: {label} burst of announcements of {ip} sent"),
                    Ok(Ok(false)) => {
                        tracing::debug!("{resource}: {ip} is gone; not announcing it again");
                        return;
                    }
                    Ok(Err(e)) => tracing::warn!("{resource}: {label} burst of announcements of {ip}: {e}"),
                    Err(_) => {
                        tracing::warn!("{resource}: {label} burst of announcements of {ip} timed out after {bound:?}")
                    }
                }
            }
        });
        if let Some(old) = lock(&self.repeat).replace(task.abort_handle()) {
            old.abort();
        }
    }

    /// Removes the address: from interface `only` if given, else from
    /// `interface` if set, else from every interface carrying it.
    async fn remove(&self, only: Option<u32>) -> Result<(), String> {
        let ip = self.ip();
        let nl = Netlink::open()?;
        let index = match (only, &self.spec.interface) {
            (Some(index), _) => Some(index),
            (None, Some(name)) => match nl.link_by_name(name).await? {
                Some(link) => Some(link.index),
                None => return Ok(()),
            },
            (None, None) => None,
        };
        let entries = nl
            .addresses(ip)
            .await?
            .into_iter()
            .filter(|a| a.ip == ip && index.is_none_or(|i| a.index == i));
        for entry in entries {
            let index = entry.index;
            nl.delete(entry).await?;
            tracing::info!("{}: removed {ip} from interface #{index}", self.resource);
        }
        Ok(())
    }

    async fn health(&self, check_link: bool) -> Health {
        let ip = self.ip();
        let found = match Netlink::open() {
            Ok(nl) => self.find_present(&nl).await,
            Err(e) => Err(e),
        };
        match found {
            Err(e) => Health::Failed(e),
            Ok(None) => Health::Stopped,
            Ok(Some(_)) if !check_link => Health::Running,
            Ok(Some((link, entries))) => {
                if let Some(reason) = link.down_reason() {
                    Health::Failed(format!("{ip} is on {} but {reason}", link.name))
                } else if entries.iter().any(|a| a.flags.contains(AddressFlags::Dadfailed)) {
                    Health::Failed(format!(
                        "the kernel found {ip} on {} duplicated on the link (DAD failed)",
                        link.name
                    ))
                } else {
                    Health::Running
                }
            }
        }
    }
}

#[async_trait]
impl Driver for IpDriver {
    async fn start(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let added = AtomicU32::new(0);
        let outcome = tokio::time::timeout(ctx.timeout, async {
            let _op = self.ops.lock().await;
            self.cancel_repeat();
            self.start_inner(&added).await
        })
        .await;
        let (err, message) = match outcome {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(message)) => (None, message),
            Err(_) => (Some(self.timeout("start", ctx.timeout)), String::new()),
        };
        // Leave nothing behind: take the address off again if we added it.
        let index = added.load(Ordering::SeqCst);
        let mut message = message;
        if index != 0 {
            let cleanup = tokio::time::timeout(CLEANUP_TIMEOUT, self.remove(Some(index))).await;
            let problem = match cleanup {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(format!("timed out after {CLEANUP_TIMEOUT:?}")),
            };
            if let Some(problem) = problem {
                tracing::error!(
                    "{}: cannot remove {} after a failed start: {problem}",
                    self.resource,
                    self.ip()
                );
                message = format!("{message}; removing {} again failed too: {problem}", self.ip());
            }
        }
        Err(err.unwrap_or_else(|| self.failed("start", message)))
    }

    async fn stop(&self, ctx: &OpCtx) -> Result<(), DriverError> {
        let outcome = tokio::time::timeout(ctx.timeout, async {
            let _op = self.ops.lock().await;
            self.cancel_repeat();
            self.remove(None).await
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(self.failed("stop", message)),
            Err(_) => Err(self.timeout("stop", ctx.timeout)),
        }
    }

    async fn monitor(&self, ctx: &OpCtx) -> Health {
        tokio::time::timeout(ctx.timeout, self.health(true))
            .await
            .unwrap_or_else(|_| Health::Failed(format!("monitor timed out after {:?}", ctx.timeout)))
    }

    async fn probe(&self, ctx: &OpCtx) -> Health {
        tokio::time::timeout(ctx.timeout, self.health(false))
            .await
            .unwrap_or_else(|_| Health::Failed(format!("probe timed out after {:?}", ctx.timeout)))
    }
}

/// The second burst: `Ok(false)` if the address has left `index` meanwhile.
async fn repeat_burst(ip: IpAddr, index: u32, count: u32) -> Result<bool, String> {
    let nl = Netlink::open()?;
    if !nl.addresses(ip).await?.iter().any(|a| a.ip == ip && a.index == index) {
        return Ok(false);
    }
    let Some(link) = nl.link_by_index(index).await? else {
        return Ok(false);
    };
    if let Some(reason) = link.down_reason() {
        return Err(reason);
    }
    let Some(mac) = link.resolving_mac() else {
        return Ok(true);
    };
    announce_on(Wire { ip, mac }, index, count)
        .await
        .map_err(|e| e.to_string())?;
    Ok(true)
}

// ---------------------------------------------------------------------------
// Netlink

/// A route-netlink connection whose driving task ends with it.
struct Netlink {
    handle: rtnetlink::Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

fn nl_error(e: rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
        other => other.to_string(),
    }
}

fn nl_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// One address entry of an interface.
struct Addr {
    index: u32,
    ip: IpAddr,
    flags: AddressFlags,
    msg: AddressMessage,
}

impl Addr {
    fn from_msg(msg: AddressMessage) -> Option<Addr> {
        let mut local = None;
        let mut address = None;
        let mut flags = None;
        for attr in &msg.attributes {
            match attr {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                AddressAttribute::Flags(f) => flags = Some(*f),
                _ => {}
            }
        }
        let ip = local.or(address)?;
        let flags = flags.unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits())));
        Some(Addr {
            index: msg.header.index,
            ip,
            flags,
            msg,
        })
    }
}

/// What matters of a network interface.
struct Link {
    index: u32,
    name: String,
    flags: LinkFlags,
    ether: bool,
    mac: Option<Mac>,
    carrier: Option<bool>,
    oper: Option<State>,
}

impl Link {
    fn from_msg(msg: LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: format!("interface #{}", msg.header.index),
            flags: msg.header.flags,
            ether: msg.header.link_layer_type == LinkLayerType::Ether,
            mac: None,
            carrier: None,
            oper: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Address(mac) => link.mac = Mac::try_from(mac.as_slice()).ok(),
                LinkAttribute::Carrier(c) => link.carrier = Some(c != 0),
                LinkAttribute::OperState(s) => link.oper = Some(s),
                _ => {}
            }
        }
        link
    }

    fn admin_up(&self) -> bool {
        self.flags.contains(LinkFlags::Up)
    }

    /// Why the interface cannot carry traffic, if it cannot.
    fn down_reason(&self) -> Option<String> {
        let name = &self.name;
        if !self.admin_up() {
            return Some(format!("interface {name} is down"));
        }
        let carrier = self.carrier.unwrap_or_else(|| self.flags.contains(LinkFlags::LowerUp));
        if !carrier {
            return Some(format!("interface {name} has no carrier"));
        }
        match self.oper {
            Some(s @ (State::Down | State::LowerLayerDown | State::NotPresent | State::Dormant)) => {
                Some(format!("interface {name} is not operational (state {s})"))
            }
            _ => None,
        }
    }

    /// The MAC to probe and announce with, if the interface resolves
    /// addresses the Ethernet way.
    fn resolving_mac(&self) -> Option<Mac> {
        if !self.ether || self.flags.contains(LinkFlags::Noarp) {
            return None;
        }
        self.mac.filter(|m| m.iter().any(|&b| b != 0))
    }
}

impl Netlink {
    fn open() -> Result<Netlink, String> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| format!("cannot open a netlink socket: {e}"))?;
        Ok(Netlink {
            handle,
            conn: tokio::spawn(conn),
        })
    }

    /// Every address of `ip`'s family.
    async fn addresses(&self, ip: IpAddr) -> Result<Vec<Addr>, String> {
        let family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let mut req = self.handle.address().get();
        req.message_mut().header.family = family;
        let msgs: Vec<AddressMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(|e| format!("cannot list addresses: {}", nl_error(e)))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.family == family)
            .filter_map(Addr::from_msg)
            .collect())
    }

    async fn link(&self, req: rtnetlink::LinkGetRequest, what: &str) -> Result<Option<Link>, String> {
        match req.execute().try_next().await {
            Ok(msg) => Ok(msg.map(Link::from_msg)),
            Err(e) if nl_errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(format!("cannot read interface {what}: {}", nl_error(e))),
        }
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<Link>, String> {
        self.link(self.handle.link().get().match_name(name), name).await
    }

    async fn link_by_index(&self, index: u32) -> Result<Option<Link>, String> {
        self.link(self.handle.link().get().match_index(index), &format!("#{index}"))
            .await
    }

    async fn add(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<(), String> {
        let mut req = self.handle.address().add(index, ip, prefix);
        if ip.is_ipv6() {
            // We probed: the kernel's own detection would only keep the
            // address unusable ("tentative") for a second or two.
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if nl_errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(format!("cannot add {ip}/{prefix}: {}", nl_error(e))),
        }
    }

    async fn delete(&self, entry: Addr) -> Result<(), String> {
        let ip = entry.ip;
        match self.handle.address().del(entry.msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if nl_errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(format!("cannot remove {ip}: {}", nl_error(e))),
        }
    }
}

// ---------------------------------------------------------------------------
// Packet socket

/// An `AF_PACKET` raw socket bound to one interface and one ethertype: it
/// sends whole Ethernet frames and receives that ethertype's. Opened on the
/// operation's own thread (so in the agent's network namespace), used on the
/// blocking pool.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn open(ifindex: u32, ethertype: u16) -> io::Result<PacketSocket> {
        // Protocol 0 receives nothing until bind names the ethertype and the
        // interface, so no other interface's frames slip in.
        let fd = socket::socket(
            socket::AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind_packet(fd.as_fd(), ifindex, ethertype)?;
        Ok(PacketSocket { fd })
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            match socket::send(self.fd.as_raw_fd(), frame, MsgFlags::empty()) {
                Err(Errno::EINTR) => {}
                sent => return sent.map(drop).map_err(io::Error::from),
            }
        }
    }

    /// The next frame received before `deadline` (`None`: none came): its
    /// length and whether it is one this host sent.
    fn recv_before(&self, buf: &mut [u8], deadline: std::time::Instant) -> io::Result<Option<(usize, bool)>> {
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Rounded up, so the deadline is not polled for in a busy loop.
            let ms = u16::try_from(left.as_millis() + 1).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
            // Readable, and nobody else reads this socket: does not block.
            match socket::recvfrom::<LinkAddr>(self.fd.as_raw_fd(), buf) {
                Ok((len, from)) => {
                    let outgoing = from.is_some_and(|a| a.pkttype() == libc::PACKET_OUTGOING);
                    return Ok(Some((len, outgoing)));
                }
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Binds a packet socket to interface `ifindex` and `ethertype`.
#[allow(unsafe_code)]
fn bind_packet(fd: BorrowedFd<'_>, ifindex: u32, ethertype: u16) -> io::Result<()> {
    let ifindex = i32::try_from(ifindex).map_err(|_| io::Error::from_raw_os_error(libc::ENODEV))?;
    let addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as libc::c_ushort,
        sll_protocol: ethertype.to_be(),
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `addr` is a fully initialised `sockaddr_ll` that outlives the
    // call, `len` is exactly its size, and `fd` is an open descriptor
    // borrowed for the call's duration; bind(2) only reads `len` bytes.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast::<libc::sockaddr>(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raised when the future awaiting a blocking job is dropped (timeout,
/// cancelled task): the job stops before its next send.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs `job` on the blocking pool. Dropping the returned future raises the
/// flag `job` is given.
async fn blocking<T: Send + 'static>(job: impl FnOnce(&AtomicBool) -> io::Result<T> + Send + 'static) -> io::Result<T> {
    let cancel = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(Arc::clone(&cancel));
    tokio::task::spawn_blocking(move || job(&cancel))
        .await
        .map_err(|e| io::Error::other(format!("socket worker failed: {e}")))?
}

/// Probes (see the module docs); `Some` names who else has the address.
fn probe_for_conflict(socket: &PacketSocket, wire: &Wire, cancel: &AtomicBool) -> io::Result<Option<Conflict>> {
    let frame = wire.probe_frame();
    let mut buf = vec![0u8; 2048];
    let start = std::time::Instant::now();
    let end = start + PROBE_WINDOW;
    let mut sent = 0;
    let mut next = start;
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let now = std::time::Instant::now();
        if sent < PROBE_COUNT && now >= next {
            socket.send(&frame)?;
            sent += 1;
            next += PROBE_INTERVAL;
            continue;
        }
        if now >= end {
            return Ok(None);
        }
        let wake = if sent < PROBE_COUNT { next.min(end) } else { end };
        if let Some((len, outgoing)) = socket.recv_before(&mut buf, wake)?
            && !outgoing
            && let Some(conflict) = wire.conflict(buf.get(..len).unwrap_or_default())
        {
            return Ok(Some(conflict));
        }
    }
}

/// Sends `frames` `count` times, [`ANNOUNCE_INTERVAL`] apart.
fn announce(socket: &PacketSocket, frames: &[Vec<u8>], count: u32, cancel: &AtomicBool) -> io::Result<()> {
    for round in 0..count {
        if round > 0 {
            std::thread::sleep(ANNOUNCE_INTERVAL);
        }
        if cancel.load(Ordering::SeqCst) {
            return Ok(());
        }
        for frame in frames {
            socket.send(frame)?;
        }
    }
    Ok(())
}

/// Opens a socket for `wire` on `ifindex` here and announces from the
/// blocking pool.
async fn announce_on(wire: Wire, ifindex: u32, count: u32) -> io::Result<()> {
    let socket = PacketSocket::open(ifindex, wire.ethertype())?;
    let frames = wire.announce_frames();
    blocking(move |cancel| announce(&socket, &frames, count, cancel)).await
}

// ---------------------------------------------------------------------------
// Frames

/// Another host's claim on the address.
#[derive(Debug, PartialEq, Eq)]
enum Conflict {
    /// It answered for the address or announced it.
    InUse(Mac),
    /// It is probing for the address itself.
    Probing(Mac),
}

impl Conflict {
    fn describe(&self, ip: IpAddr) -> String {
        match self {
            Conflict::InUse(mac) => format!("address {ip} is in use by {}; refusing to take it", show_mac(mac)),
            Conflict::Probing(mac) => format!(
                "{} is probing for address {ip} at the same time; refusing to take it",
                show_mac(mac)
            ),
        }
    }
}

/// The floating address on an Ethernet interface with MAC `mac`.
#[derive(Clone, Copy, Debug)]
struct Wire {
    ip: IpAddr,
    mac: Mac,
}

impl Wire {
    fn ethertype(&self) -> u16 {
        if self.ip.is_ipv4() { ETH_P_ARP } else { ETH_P_IPV6 }
    }

    fn probe_frame(&self) -> Vec<u8> {
        match self.ip {
            IpAddr::V4(ip) => arp_frame(ARP_REQUEST, &self.mac, Ipv4Addr::UNSPECIFIED, &[0; 6], ip),
            IpAddr::V6(ip) => {
                let group = solicited_node(&ip);
                let mut icmp = vec![ND_NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0];
                icmp.extend_from_slice(&ip.octets());
                icmp6_frame(&multicast_mac(&group), &self.mac, Ipv6Addr::UNSPECIFIED, group, icmp)
            }
        }
    }

    fn announce_frames(&self) -> Vec<Vec<u8>> {
        match self.ip {
            IpAddr::V4(ip) => vec![
                // RFC 5227 announcement, and the reply form some stacks
                // prefer (Linux takes a reply as gratuitous when the
                // target MAC equals the sender's).
                arp_frame(ARP_REQUEST, &self.mac, ip, &[0; 6], ip),
                arp_frame(ARP_REPLY, &self.mac, ip, &self.mac, ip),
            ],
            IpAddr::V6(ip) => {
                let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
                let mut icmp = vec![ND_NEIGHBOR_ADVERT, 0, 0, 0, NA_OVERRIDE, 0, 0, 0];
                icmp.extend_from_slice(&ip.octets());
                icmp.extend_from_slice(&[ND_OPT_TARGET_LL_ADDR, 1]);
                icmp.extend_from_slice(&self.mac);
                vec![icmp6_frame(&multicast_mac(&all_nodes), &self.mac, ip, all_nodes, icmp)]
            }
        }
    }

    /// Whether a received frame shows another host claiming the address.
    fn conflict(&self, frame: &[u8]) -> Option<Conflict> {
        match self.ip {
            IpAddr::V4(ip) => arp_conflict(frame, ip, &self.mac),
            IpAddr::V6(ip) => nd_conflict(frame, ip, &self.mac),
        }
    }
}

fn eth_header(dst: &Mac, src: &Mac, ethertype: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_MIN_FRAME + 32);
    frame.extend_from_slice(dst);
    frame.extend_from_slice(src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame
}

/// A broadcast ARP frame for Ethernet and IPv4.
fn arp_frame(op: u16, sender_mac: &Mac, sender_ip: Ipv4Addr, target_mac: &Mac, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut frame = eth_header(&[0xff; 6], sender_mac, ETH_P_ARP);
    frame.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    frame.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    frame.extend_from_slice(&[6, 4]);
    frame.extend_from_slice(&op.to_be_bytes());
    frame.extend_from_slice(sender_mac);
    frame.extend_from_slice(&sender_ip.octets());
    frame.extend_from_slice(target_mac);
    frame.extend_from_slice(&target_ip.octets());
    frame.resize(ETH_MIN_FRAME, 0);
    frame
}

fn arp_conflict(frame: &[u8], ip: Ipv4Addr, own: &Mac) -> Option<Conflict> {
    if frame.get(12..14)? != ETH_P_ARP.to_be_bytes() {
        return None;
    }
    let arp = frame.get(ETH_HEADER..ETH_HEADER + 28)?;
    if arp.get(..6)? != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    let op = u16::from_be_bytes(arp.get(6..8)?.try_into().ok()?);
    let sender_mac = Mac::try_from(arp.get(8..14)?).ok()?;
    let sender_ip = Ipv4Addr::from(<[u8; 4]>::try_from(arp.get(14..18)?).ok()?);
    let target_ip = Ipv4Addr::from(<[u8; 4]>::try_from(arp.get(24..28)?).ok()?);
    if sender_mac == *own {
        return None;
    }
    if sender_ip == ip {
        return Some(Conflict::InUse(sender_mac));
    }
    if op == ARP_REQUEST && sender_ip.is_unspecified() && target_ip == ip {
        return Some(Conflict::Probing(sender_mac));
    }
    None
}

/// `ff02::1:ffXX:XXXX` for the last 24 bits of `ip`.
fn solicited_node(ip: &Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The Ethernet multicast MAC of an IPv6 multicast group.
fn multicast_mac(group: &Ipv6Addr) -> Mac {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// An Ethernet frame carrying ICMPv6 message `icmp` (checksum filled in)
/// with hop limit 255, as neighbour discovery requires.
fn icmp6_frame(dst_mac: &Mac, src_mac: &Mac, src: Ipv6Addr, dst: Ipv6Addr, mut icmp: Vec<u8>) -> Vec<u8> {
    let sum = icmp6_checksum(&src, &dst, &icmp);
    if let Some(field) = icmp.get_mut(2..4) {
        field.copy_from_slice(&sum.to_be_bytes());
    }
    let len = u16::try_from(icmp.len()).unwrap_or(u16::MAX);
    let mut frame = eth_header(dst_mac, src_mac, ETH_P_IPV6);
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[IPPROTO_ICMPV6, 255]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(&icmp);
    if frame.len() < ETH_MIN_FRAME {
        frame.resize(ETH_MIN_FRAME, 0);
    }
    frame
}

/// The ICMPv6 checksum (RFC 4443 §2.3) of `icmp`, whose checksum field is zero.
fn icmp6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, icmp: &[u8]) -> u16 {
    let len = u32::try_from(icmp.len()).unwrap_or(u32::MAX);
    let mut pseudo = Vec::with_capacity(40 + icmp.len() + 1);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&len.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
    pseudo.extend_from_slice(icmp);
    if pseudo.len() % 2 == 1 {
        pseudo.push(0);
    }
    let mut sum: u32 = pseudo
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

fn nd_conflict(frame: &[u8], ip: Ipv6Addr, own: &Mac) -> Option<Conflict> {
    let eth_src = Mac::try_from(frame.get(6..12)?).ok()?;
    if eth_src == *own || frame.get(12..14)? != ETH_P_IPV6.to_be_bytes() {
        return None;
    }
    let ip6 = frame.get(ETH_HEADER..)?;
    if ip6.first()? >> 4 != 6 || *ip6.get(6)? != IPPROTO_ICMPV6 {
        return None;
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(ip6.get(8..24)?).ok()?);
    let icmp = ip6.get(40..)?;
    let target = Ipv6Addr::from(<[u8; 16]>::try_from(icmp.get(8..24)?).ok()?);
    if target != ip {
        return None;
    }
    match *icmp.first()? {
        ND_NEIGHBOR_ADVERT => {
            let mac = target_ll_addr(icmp.get(24..)?).unwrap_or(eth_src);
            (mac != *own).then_some(Conflict::InUse(mac))
        }
        ND_NEIGHBOR_SOLICIT if src.is_unspecified() => Some(Conflict::Probing(eth_src)),
        _ => None,
    }
}

/// The target link-layer address option of a neighbour advertisement.
fn target_ll_addr(mut options: &[u8]) -> Option<Mac> {
    while options.len() >= 8 {
        let kind = options[0];
        let len = usize::from(options[1]) * 8;
        if len == 0 || len > options.len() {
            return None;
        }
        if kind == ND_OPT_TARGET_LL_ADDR {
            return Mac::try_from(options.get(2..8)?).ok();
        }
        options = options.get(len..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: Mac = [2, 0, 0, 0, 0, 1];
    const OTHER: Mac = [2, 0, 0, 0, 0, 2];

    #[test]
    fn arp_frames_and_conflicts() {
        let ip = Ipv4Addr::new(10, 0, 0, 100);
        let probe = Wire {
            ip: ip.into(),
            mac: OWN,
        }
        .probe_frame();
        assert_eq!(probe.len(), 60);
        assert_eq!(&probe[..6], &[0xff; 6]);
        assert_eq!(&probe[12..14], &[8, 6]);
        assert_eq!(&probe[28..32], &[0, 0, 0, 0], "sender IP of a probe is 0.0.0.0");
        assert_eq!(&probe[38..42], &ip.octets());
        // Our own probe is no conflict; someone else's is.
        assert_eq!(arp_conflict(&probe, ip, &OWN), None);
        assert_eq!(arp_conflict(&probe, ip, &OTHER), Some(Conflict::Probing(OWN)));
        // A reply from the holder (sender IP = the address).
        let reply = arp_frame(ARP_REPLY, &OTHER, ip, &OWN, Ipv4Addr::UNSPECIFIED);
        assert_eq!(arp_conflict(&reply, ip, &OWN), Some(Conflict::InUse(OTHER)));
        assert_eq!(arp_conflict(&reply, Ipv4Addr::new(10, 0, 0, 1), &OWN), None);
        let garp = Wire {
            ip: ip.into(),
            mac: OWN,
        }
        .announce_frames();
        assert_eq!(garp.len(), 2);
        assert_eq!(&garp[1][32..38], &OWN, "a gratuitous reply targets its own MAC");
        assert_eq!(arp_conflict(&garp[0], ip, &OTHER), Some(Conflict::InUse(OWN)));
        assert_eq!(arp_conflict(&[0u8; 10], ip, &OWN), None);
    }

    #[test]
    fn nd_frames_and_conflicts() {
        let ip: Ipv6Addr = "fd00::1:2:3".parse().unwrap_or(Ipv6Addr::LOCALHOST);
        assert_eq!(solicited_node(&ip).to_string(), "ff02::1:ff02:3");
        let probe = Wire {
            ip: ip.into(),
            mac: OWN,
        }
        .probe_frame();
        assert_eq!(&probe[..6], &[0x33, 0x33, 0xff, 0x02, 0x00, 0x03]);
        assert_eq!(probe[14 + 7], 255, "hop limit");
        assert_eq!(nd_conflict(&probe, ip, &OWN), None);
        assert_eq!(nd_conflict(&probe, ip, &OTHER), Some(Conflict::Probing(OWN)));
        let na = &Wire {
            ip: ip.into(),
            mac: OTHER,
        }
        .announce_frames()[0];
        assert_eq!(nd_conflict(na, ip, &OWN), Some(Conflict::InUse(OTHER)));
        // The checksum of a message including its checksum folds to zero.
        let icmp = &na[54..];
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&na[22..38]).unwrap_or_default());
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&na[38..54]).unwrap_or_default());
        assert_eq!(icmp6_checksum(&src, &dst, icmp), 0);
    }

    #[test]
    fn macs_are_shown_the_usual_way() {
        assert_eq!(show_mac(&[2, 0x75, 0x73, 0, 0, 0xab]), "02:75:73:00:00:ab");
    }
}
