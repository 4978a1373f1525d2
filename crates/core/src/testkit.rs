//! Builders for cluster definitions in code, for unit tests, the simulator
//! and benchmarks (the definition format proper is `understudy-config`'s).

use std::time::Duration;

use crate::spec::{
    ClusterSpec, Failback, FailoverPolicy, GroupSpec, Kind, MonitorSpec, NodeSpec, OnFail, ProcessSpec, ResourceSpec,
    Role, Settings,
};

/// A cluster with `nodes` nodes named `node1…`, default settings, no groups.
pub fn cluster(nodes: usize) -> ClusterSpec {
    ClusterSpec {
        name: "test".into(),
        description: None,
        settings: Settings::default(),
        nodes: (1..=nodes)
            .map(|i| NodeSpec {
                name: format!("node{i}"),
                address: ipnet::IpNet::new(std::net::Ipv4Addr::new(10, 0, 0, i as u8).into(), 24).unwrap_or_default(),
                priority: 100,
                other_addresses: Vec::new(),
            })
            .collect(),
        groups: Vec::new(),
    }
}

/// A group on every node of `spec` (in order), manual failback.
pub fn group(spec: &ClusterSpec, name: &str) -> GroupSpec {
    GroupSpec {
        name: name.into(),
        description: None,
        nodes: spec.nodes.iter().map(|n| n.name.clone()).collect(),
        failback: Failback::Manual,
        failover: FailoverPolicy::default(),
        colocate_with: Vec::new(),
        resources: Vec::new(),
    }
}

/// A managed process resource with a 1 s monitor, 2 restarts in 1 min.
pub fn process(name: &str, depends_on: &[&str]) -> ResourceSpec {
    ResourceSpec {
        name: name.into(),
        description: None,
        kind: Kind::Process(ProcessSpec {
            command: vec![format!("/usr/bin/{name}")],
            env: Vec::new(),
            cwd: None,
            user: None,
            stop_signal: "TERM".into(),
            log: None,
            check: None,
        }),
        depends_on: depends_on.iter().map(|s| s.to_string()).collect(),
        optional: false,
        enabled: true,
        role: Role::Managed,
        monitor: Some(MonitorSpec {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            restarts: 2,
            within: Duration::from_secs(60),
            on_fail: OnFail::Restart,
        }),
        start_timeout: Duration::from_secs(10),
        stop_timeout: Duration::from_secs(10),
    }
}

/// Same as `process`, as a clone.
pub fn clone_process(name: &str, depends_on: &[&str]) -> ResourceSpec {
    ResourceSpec {
        role: Role::Clone,
        ..process(name, depends_on)
    }
}

/// A monitor-only resource that reports failures.
pub fn monitor_only(name: &str) -> ResourceSpec {
    let mut r = process(name, &[]);
    r.role = Role::MonitorOnly;
    if let Some(m) = &mut r.monitor {
        m.on_fail = OnFail::Report;
    }
    r
}
