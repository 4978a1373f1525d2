//! The ip driver against real netlink and ARP / neighbour discovery, in the
//! network-namespace test bed (needs root: CAP_SYS_ADMIN and CAP_NET_ADMIN).
//!
//! Every driver operation runs inside a host's namespace on a current-thread
//! runtime (see [`on`]), as an agent running in that host would: its netlink
//! and packet sockets open there. Hosts are `a`, `b`, `c` at `10.213.X.1..3`;
//! the floating address is `10.213.X.100/24` (or `fd75:7573:X::100/64`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestEnv, ctx, wait_until};
use understudy_core::spec::IpSpec;
use understudy_drivers::ip::IpDriver;
use understudy_drivers::{Driver, DriverError, Health};
use understudy_testbed::{Bed, Host, run_ok};

const T: Duration = Duration::from_secs(5);
/// How long a neighbour table may take to show an announcement.
const ANNOUNCED: Duration = Duration::from_secs(1);

/// Runs the future `f` makes on a current-thread runtime inside `host`'s
/// network namespace, as an agent in that host would.
fn on<R: Send, F: Future<Output = R>>(host: &Host, f: impl FnOnce() -> F + Send) -> R {
    host.enter(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
    .unwrap()
}

struct Net {
    bed: Bed,
    a: Host,
    b: Host,
    c: Host,
    t: TestEnv,
}

fn net(hint: &str) -> Net {
    let bed = Bed::new(hint).unwrap();
    let a = bed.add_host("a").unwrap();
    let b = bed.add_host("b").unwrap();
    let c = bed.add_host("c").unwrap();
    Net {
        bed,
        a,
        b,
        c,
        t: TestEnv::new(),
    }
}

impl Net {
    /// The floating IPv4 address, `10.213.X.100`.
    fn vip(&self) -> IpAddr {
        self.bed.address(100).into()
    }

    fn spec(&self) -> IpSpec {
        IpSpec {
            address: format!("{}/24", self.vip()).parse().unwrap(),
            interface: None,
            announce_count: 2,
            announce_repeat_after: Duration::ZERO,
            probe: true,
        }
    }

    fn driver(&self, spec: &IpSpec) -> IpDriver {
        IpDriver::new("vip", spec, &self.t.env).unwrap()
    }
}

/// `ip -n <host> …`, which must succeed; its standard output.
fn ip(host: &Host, args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.arg("-n").arg(host.netns()).args(args);
    String::from_utf8(run_ok(&mut cmd, T).unwrap().stdout).unwrap()
}

/// How many times `addr` is on `host`'s eth0.
fn count_addr(host: &Host, addr: IpAddr) -> usize {
    let shown = ip(host, &["-o", "addr", "show", "dev", "eth0"]);
    shown.matches(&format!(" {addr}/")).count()
}

/// The MAC `host`'s neighbour table maps `addr` to, if any.
fn neigh_mac(host: &Host, addr: IpAddr) -> Option<String> {
    let shown = ip(host, &["neigh", "show", &addr.to_string(), "dev", "eth0"]);
    let mut words = shown.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(str::to_owned)
}

/// A listener on every address of `host`, both families.
fn listen(host: &Host) -> TcpListener {
    host.enter(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)))
        .unwrap()
        .unwrap()
}

fn connect(from: &Host, addr: IpAddr, listener: &TcpListener) {
    let port = listener.local_addr().unwrap().port();
    from.tcp_connect(SocketAddr::new(addr, port), Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("{} cannot reach {addr}: {e}", from.name()));
}

fn failed_message(r: Result<(), DriverError>) -> String {
    match r {
        Err(e @ DriverError::Failed { .. }) => e.to_string(),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn start_serves_the_address_and_stop_removes_it_idempotently() {
    let n = net("ip-basic");
    let (a, b, c) = (&n.a, &n.b, &n.c);
    let vip = n.vip();
    let d = n.driver(&n.spec());

    on(a, || async {
        assert_eq!(d.probe(&ctx(T)).await, Health::Stopped);
        assert_eq!(d.monitor(&ctx(T)).await, Health::Stopped);
        d.stop(&ctx(T)).await.unwrap();
        d.start(&ctx(T)).await.unwrap();
        d.start(&ctx(T)).await.unwrap();
        assert_eq!(d.monitor(&ctx(T)).await, Health::Running);
        assert_eq!(d.probe(&ctx(T)).await, Health::Running);
    });
    assert_eq!(count_addr(a, vip), 1, "added once, on a's eth0");
    assert_eq!(count_addr(b, vip), 0);
    let listener = listen(a);
    connect(c, vip, &listener);

    on(a, || async {
        d.stop(&ctx(T)).await.unwrap();
        assert_eq!(d.monitor(&ctx(T)).await, Health::Stopped);
        assert_eq!(d.probe(&ctx(T)).await, Health::Stopped);
        d.stop(&ctx(T)).await.unwrap();
    });
    assert_eq!(count_addr(a, vip), 0);
    assert!(
        ip(a, &["addr", "show", "dev", "eth0"]).contains(&a.cidr()),
        "a's own address stays"
    );
}

#[test]
fn moving_the_address_updates_neighbours_through_gratuitous_arp() {
    let n = net("ip-move");
    let (a, b, c) = (&n.a, &n.b, &n.c);
    let vip = n.vip();
    let on_a = n.driver(&n.spec());
    let silent = n.driver(&IpSpec {
        announce_count: 0,
        ..n.spec()
    });
    let on_b = n.driver(&n.spec());

    on(a, || async { on_a.start(&ctx(T)).await.unwrap() });
    let listener_a = listen(a);
    connect(c, vip, &listener_a);
    assert_eq!(neigh_mac(c, vip).as_deref(), Some(a.mac()), "c learnt a's MAC");
    on(a, || async { on_a.stop(&ctx(T)).await.unwrap() });

    // Control: moved without announcements, c keeps pointing at a.
    on(b, || async { silent.start(&ctx(T)).await.unwrap() });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(neigh_mac(c, vip).as_deref(), Some(a.mac()), "nothing else tells c");
    on(b, || async { silent.stop(&ctx(T)).await.unwrap() });

    let started = Instant::now();
    on(b, || async { on_b.start(&ctx(T)).await.unwrap() });
    let took = started.elapsed();
    assert!(
        wait_until(ANNOUNCED, || neigh_mac(c, vip).as_deref() == Some(b.mac())),
        "c still maps {vip} to {:?}, not b's {}",
        neigh_mac(c, vip),
        b.mac()
    );
    assert_eq!(count_addr(a, vip), 0);
    let listener_b = listen(b);
    connect(c, vip, &listener_b);
    on(b, || async { on_b.stop(&ctx(T)).await.unwrap() });
    eprintln!("start with probe and two announcements took {took:?}");
}

#[test]
fn the_second_burst_repeats_the_announcement_and_stop_cancels_it() {
    let n = net("ip-repeat");
    let (a, b, c) = (&n.a, &n.b, &n.c);
    let vip = n.vip();
    let after = Duration::from_millis(800);
    let d = n.driver(&IpSpec {
        announce_count: 1,
        announce_repeat_after: after,
        ..n.spec()
    });
    let vip_s = vip.to_string();
    // Points c's entry for the address back at a, as a stale cache would.
    let poison = || {
        ip(
            c,
            &[
                "neigh",
                "replace",
                &vip_s,
                "lladdr",
                a.mac(),
                "dev",
                "eth0",
                "nud",
                "stale",
            ],
        )
    };

    // Announcements update entries, they do not create them: give c one.
    poison();
    on(b, || async {
        let started = Instant::now();
        d.start(&ctx(T)).await.unwrap();
        assert!(started.elapsed() < after, "start waited for the second burst");
        assert_eq!(neigh_mac(c, vip).as_deref(), Some(b.mac()), "first burst");
        poison();
        tokio::time::sleep(after + Duration::from_millis(400)).await;
        assert_eq!(neigh_mac(c, vip).as_deref(), Some(b.mac()), "second burst");

        // Start again (re-announces, schedules another burst), stop at once,
        // then put the address back by hand: the burst must not come.
        d.start(&ctx(T)).await.unwrap();
        d.stop(&ctx(T)).await.unwrap();
        ip(b, &["addr", "add", &format!("{vip}/24"), "dev", "eth0"]);
        poison();
        tokio::time::sleep(after + Duration::from_millis(400)).await;
        assert_eq!(
            neigh_mac(c, vip).as_deref(),
            Some(a.mac()),
            "stop cancels the second burst"
        );
        d.stop(&ctx(T)).await.unwrap();
    });
    assert_eq!(count_addr(b, vip), 0);
}

#[test]
fn the_probe_refuses_an_address_another_host_holds() {
    let n = net("ip-probe");
    let (a, b) = (&n.a, &n.b);
    let vip = n.vip();
    ip(b, &["addr", "add", &format!("{vip}/24"), "dev", "eth0"]);
    let d = n.driver(&n.spec());

    let message = on(a, || async { failed_message(d.start(&ctx(T)).await) });
    assert!(
        message.contains(&format!("address {vip} is in use by {}", b.mac())) && message.contains("refusing"),
        "{message}"
    );
    assert_eq!(count_addr(a, vip), 0, "not added after a refused probe");
    assert_eq!(on(a, || async { d.monitor(&ctx(T)).await }), Health::Stopped);

    // Without the probe, the driver takes it anyway (the operator's choice).
    let blind = n.driver(&IpSpec {
        probe: false,
        announce_count: 0,
        ..n.spec()
    });
    on(a, || async {
        blind.start(&ctx(T)).await.unwrap();
        blind.stop(&ctx(T)).await.unwrap();
    });
}

#[test]
fn monitor_fails_while_the_link_is_down_or_has_no_carrier() {
    let n = net("ip-link");
    let a = &n.a;
    let vip = n.vip();
    let d = n.driver(&n.spec());
    let monitor = || on(a, || async { d.monitor(&ctx(T)).await });
    let is_failed = |h: &Health, word: &str| matches!(h, Health::Failed(m) if m.contains(word));

    on(a, || async { d.start(&ctx(T)).await.unwrap() });
    assert_eq!(monitor(), Health::Running);

    ip(a, &["link", "set", "eth0", "down"]);
    let health = monitor();
    assert!(is_failed(&health, "eth0 is down"), "{health:?}");
    assert_eq!(count_addr(a, vip), 1, "IPv4 addresses survive the link going down");
    // A start on a down link refuses.
    let message = on(a, || async { failed_message(d.start(&ctx(T)).await) });
    assert!(message.contains("eth0 is down"), "{message}");
    ip(a, &["link", "set", "eth0", "up"]);
    assert!(wait_until(Duration::from_secs(3), || monitor() == Health::Running));

    n.bed.cut(a).unwrap();
    let mut health = Health::Running;
    assert!(
        wait_until(Duration::from_secs(3), || {
            health = monitor();
            is_failed(&health, "no carrier")
        }),
        "{health:?}"
    );
    n.bed.restore(a).unwrap();
    assert!(wait_until(Duration::from_secs(3), || monitor() == Health::Running));

    on(a, || async { d.stop(&ctx(T)).await.unwrap() });
    assert_eq!(monitor(), Health::Stopped);
}

#[test]
fn the_interface_must_be_found() {
    let n = net("ip-iface");
    let a = &n.a;
    let vip = n.vip();

    let elsewhere = n.driver(&IpSpec {
        address: "192.0.2.10/24".parse().unwrap(),
        ..n.spec()
    });
    let message = on(a, || async { failed_message(elsewhere.start(&ctx(T)).await) });
    assert!(
        message.contains("no interface has an address in 192.0.2.0/24"),
        "{message}"
    );

    let missing = n.driver(&IpSpec {
        interface: Some("nope0".into()),
        ..n.spec()
    });
    let message = on(a, || async { failed_message(missing.start(&ctx(T)).await) });
    assert!(message.contains("interface nope0 does not exist"), "{message}");
    assert_eq!(on(a, || async { missing.monitor(&ctx(T)).await }), Health::Stopped);

    // A second interface in the subnet makes the choice ambiguous…
    ip(a, &["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    ip(a, &["addr", "add", &format!("{}/24", n.bed.address(250)), "dev", "d0"]);
    ip(a, &["link", "set", "d1", "up"]);
    ip(a, &["link", "set", "d0", "up"]);
    let d = n.driver(&n.spec());
    let message = on(a, || async { failed_message(d.start(&ctx(T)).await) });
    assert!(
        message.contains("several interfaces") && message.contains("d0"),
        "{message}"
    );
    // …which `interface` settles.
    let pinned = n.driver(&IpSpec {
        interface: Some("eth0".into()),
        ..n.spec()
    });
    on(a, || async {
        pinned.start(&ctx(T)).await.unwrap();
        assert_eq!(pinned.monitor(&ctx(T)).await, Health::Running);
    });
    assert_eq!(count_addr(a, vip), 1);
    on(a, || async { pinned.stop(&ctx(T)).await.unwrap() });
    assert_eq!(count_addr(a, vip), 0);
}

#[test]
fn ipv6_probes_adds_and_announces_with_neighbour_discovery() {
    let n = net("ip-v6");
    let (a, b, c) = (&n.a, &n.b, &n.c);
    let x = n.bed.subnet().octets()[2];
    let v6 = |i: u8| format!("fd75:7573:{x:x}::{i:x}");
    for h in [a, b, c] {
        ip(
            h,
            &[
                "-6",
                "addr",
                "add",
                &format!("{}/64", v6(h.index())),
                "dev",
                "eth0",
                "nodad",
            ],
        );
    }
    let vip: IpAddr = v6(100).parse().unwrap();
    let spec = IpSpec {
        address: format!("{vip}/64").parse().unwrap(),
        ..n.spec()
    };
    let on_a = n.driver(&spec);
    let on_b = n.driver(&spec);

    on(a, || async {
        on_a.start(&ctx(T)).await.unwrap();
        assert_eq!(on_a.monitor(&ctx(T)).await, Health::Running);
    });
    assert_eq!(count_addr(a, vip), 1);
    let listener_a = listen(a);
    connect(c, vip, &listener_a);
    assert_eq!(neigh_mac(c, vip).as_deref(), Some(a.mac()));

    on(a, || async { on_a.stop(&ctx(T)).await.unwrap() });

    // Control: without the unsolicited advertisement c keeps a's MAC.
    let silent = n.driver(&IpSpec {
        announce_count: 0,
        ..spec.clone()
    });
    on(b, || async { silent.start(&ctx(T)).await.unwrap() });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(neigh_mac(c, vip).as_deref(), Some(a.mac()), "nothing else tells c");
    on(b, || async { silent.stop(&ctx(T)).await.unwrap() });

    on(b, || async { on_b.start(&ctx(T)).await.unwrap() });
    assert!(
        wait_until(ANNOUNCED, || neigh_mac(c, vip).as_deref() == Some(b.mac())),
        "c still maps {vip} to {:?}, not b's {}",
        neigh_mac(c, vip),
        b.mac()
    );
    let listener_b = listen(b);
    connect(c, vip, &listener_b);

    // b holds it: a's duplicate address detection refuses, naming b.
    let message = on(a, || async { failed_message(on_a.start(&ctx(T)).await) });
    assert!(
        message.contains(&format!("address {vip} is in use by {}", b.mac())),
        "{message}"
    );
    assert_eq!(count_addr(a, vip), 0);
    on(b, || async { on_b.stop(&ctx(T)).await.unwrap() });
    assert_eq!(count_addr(b, vip), 0);
}
