//! The multi-host bed for integration tests and benchmarks: three agents,
//! each in its own network namespace, on a 3-member etcd whose members have
//! hosts of their own, plus an observer host the test code runs in (so it
//! reaches etcd on the bed's addresses like any client).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use understudy_testbed::{Bed, EtcdCluster, Host};

use super::{NODES, TestCluster, WEB_RESOURCES};

pub const TTL_MS: u64 = 2_000;

pub fn definition(etcd: &EtcdCluster, nodes: &[Host]) -> String {
    let endpoints: Vec<String> = etcd.endpoints().iter().map(|e| format!("\"{e}\"")).collect();
    let mut def = format!(
        r#"
[cluster]
name = "bed"
coordinator = {{ etcd = {{ endpoints = [{}] }} }}
lease_ttl = "{TTL_MS}ms"
renew_interval = "500ms"
fence_margin = "500ms"
"#,
        endpoints.join(", ")
    );
    for (i, h) in nodes.iter().enumerate() {
        def.push_str(&format!(
            "\n[[node]]\nname = \"{}\"\naddress = \"{}\"\npriority = {}\n",
            NODES[i],
            h.cidr(),
            i + 1
        ));
    }
    def.push_str(
        r#"
[group.web]
monitor = { interval = "300ms", timeout = "250ms", restarts = 2, within = "1m" }

"#,
    );
    def.push_str(WEB_RESOURCES);
    def
}

/// The bed: 3 etcd hosts, 3 node hosts, an observer host.
pub struct World {
    pub bed: Bed,
    pub etcd: EtcdCluster,
    pub nodes: Vec<Host>,
    pub observer: Host,
}

pub fn world(hint: &str) -> World {
    let bed = Bed::new(hint).expect("a test bed (root and iproute2 are required)");
    let etcd = bed.start_etcd(3).expect("a 3-member etcd (Debian's etcd-server)");
    let nodes = NODES.iter().map(|n| bed.add_host(n).unwrap()).collect();
    let observer = bed.add_host("observer").unwrap();
    World {
        bed,
        etcd,
        nodes,
        observer,
    }
}

/// Runs `body` on a runtime inside the observer host, with the cluster's
/// agents started in their hosts.
pub fn run<F>(w: &World, body: impl FnOnce(TestCluster) -> F + Send)
where
    F: std::future::Future<Output = ()>,
{
    let hosts: Vec<Host> = w.nodes.clone();
    let factory: understudy_agent::local::CommandFactory = Box::new(move |node: &str, exe: &std::path::Path| {
        let i = NODES.iter().position(|n| *n == node).unwrap();
        hosts[i].command(exe)
    });
    let dir = TestCluster::prepare(&definition(&w.etcd, &w.nodes));
    super::in_host(
        &w.observer,
        w.etcd.endpoints(),
        "bed",
        dir,
        factory,
        |mut c| async move {
            c.start_all();
            body(c).await;
        },
    );
}

/// The host of agent `node`.
pub fn host_of<'a>(w: &'a World, node: &str) -> &'a Host {
    &w.nodes[NODES.iter().position(|n| *n == node).unwrap()]
}
