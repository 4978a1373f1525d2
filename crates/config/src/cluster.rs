//! `cluster.toml` → `ClusterSpec`, with every check of `understudy check`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::time::Duration;

use ipnet::IpNet;
use toml::de::{DeTable, DeValue};
use understudy_core::spec::{
    ClusterSpec, CoordinatorSpec, DirectorySpec, EtcdSpec, Failback, FailoverPolicy, FsSpec, GroupSpec, HealthCheck,
    IpSpec, Kind, MonitorSpec, NodeSpec, OnFail, PostgresSpec, ProcessSpec, ResourceSpec, Role, ScriptSpec, Settings,
    SyncSpec, SystemdSpec,
};
use understudy_core::time::HumanDuration;

use crate::diag::{Diagnostic, did_you_mean};
use crate::reader::{Ctx, Hint, Obj, Sp, check_name, parse_ipnet, type_name};

const TOP_KEYS: &[&str] = &["cluster", "node", "group"];
const CLUSTER_KEYS: &[&str] = &[
    "name",
    "description",
    "coordinator",
    "lease_ttl",
    "renew_interval",
    "fence_margin",
    "max_addresses_per_node",
];
const NODE_KEYS: &[&str] = &["name", "address", "priority", "addresses"];
const GROUP_KEYS: &[&str] = &[
    "description",
    "nodes",
    "failback",
    "failover",
    "colocate_with",
    "monitor",
    "start_timeout",
    "stop_timeout",
    "resource",
];
const COMMON_KEYS: &[&str] = &[
    "kind",
    "description",
    "depends_on",
    "optional",
    "enabled",
    "clone",
    "monitor_only",
    "monitor",
    "start_timeout",
    "stop_timeout",
];
const KINDS: &[(&str, &[&str])] = &[
    (
        "ip",
        &["address", "interface", "announce", "announce_repeat_after", "probe"],
    ),
    (
        "fs",
        &["device", "mountpoint", "fstype", "options", "fsck", "directories"],
    ),
    (
        "process",
        &["command", "env", "cwd", "user", "stop_signal", "log", "check"],
    ),
    ("systemd", &["unit"]),
    ("script", &["start", "stop", "status", "env", "cwd"]),
    (
        "postgres",
        &["data_dir", "port", "bin_dir", "user", "database", "socket_dir"],
    ),
    ("sync", &["paths"]),
];
const MONITOR_KEYS: &[&str] = &["interval", "timeout", "restarts", "within", "on_fail"];
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The result of checking a definition.
pub struct Checked {
    /// Present when there is no error.
    pub spec: Option<ClusterSpec>,
    /// Errors and warnings, in source order.
    pub diagnostics: Vec<Diagnostic>,
}

/// Parses and checks a cluster definition.
pub fn check(text: &str) -> Checked {
    let mut ctx = Ctx::default();
    let (doc, syntax) = DeTable::parse_recoverable(text);
    for e in &syntax {
        let span = e.span().unwrap_or(0..0);
        ctx.error("E001", span, format!("TOML syntax: {}", e.message().trim()))
            .hint("see https://toml.io for the syntax; strings need quotes, tables need [brackets]");
    }
    if !syntax.is_empty() {
        return finish(ctx, None);
    }
    let root = Obj::new(doc.get_ref(), 0..0, "the definition");
    let spec = read(&mut ctx, &root, text.len());
    finish(ctx, spec)
}

fn finish(mut ctx: Ctx, spec: Option<ClusterSpec>) -> Checked {
    ctx.diags.sort_by_key(|d| (d.span.start, d.severity));
    let ok = !ctx.has_errors();
    Checked {
        spec: if ok { spec } else { None },
        diagnostics: ctx.diags,
    }
}

struct RawNode {
    name: Sp<String>,
    address: Option<Sp<IpNet>>,
    priority: u32,
    other: Vec<IpNet>,
}

struct RawGroup {
    name: Sp<String>,
    description: Option<String>,
    nodes: Option<Vec<Sp<String>>>,
    failback: Failback,
    failover: FailoverPolicy,
    colocate_with: Vec<Sp<String>>,
    resources: Vec<RawResource>,
}

struct RawResource {
    name: Sp<String>,
    group: usize,
    kind: Option<Kind>,
    description: Option<String>,
    depends_on: Vec<Sp<String>>,
    optional: bool,
    enabled: Sp<bool>,
    role: Sp<Role>,
    monitor: Option<MonitorSpec>,
    on_fail_span: Option<Range<usize>>,
    start_timeout: Duration,
    stop_timeout: Duration,
    ip_span: Option<Range<usize>>,
}

fn read(ctx: &mut Ctx, root: &Obj<'_, '_>, len: usize) -> Option<ClusterSpec> {
    root.check_keys(ctx, TOP_KEYS, |k| {
        if k == "nodes" || k == "groups" {
            Some("nodes are declared with `[[node]]`, groups with `[group.NAME]`".into())
        } else {
            None
        }
    });
    let end = len.saturating_sub(1)..len;
    let (name, description, settings) = match root.table(ctx, "cluster", "`[cluster]` with `name = \"…\"`") {
        Some(c) => read_cluster(ctx, &c),
        None => {
            if root.get("cluster").is_none() {
                ctx.error("E007", 0..0, "the definition has no `[cluster]` table")
                    .hint("start the file with `[cluster]` and `name = \"my-cluster\"`");
            }
            (None, None, Settings::default())
        }
    };
    let nodes = read_nodes(ctx, root, end.clone());
    let mut groups = read_groups(ctx, root, &nodes);
    let resources: Vec<RawResource> = groups
        .iter_mut()
        .flat_map(|g| std::mem::take(&mut g.resources))
        .collect();
    cross_check(ctx, &settings, &nodes, &groups, &resources);
    if ctx.has_errors() {
        return None;
    }
    build(name?, description, settings, nodes, groups, resources)
}

fn read_cluster(ctx: &mut Ctx, c: &Obj<'_, '_>) -> (Option<String>, Option<String>, Settings) {
    c.check_keys(ctx, CLUSTER_KEYS, |_| None);
    let mut s = Settings::default();
    let name = c.req_str(ctx, "name", "`name = \"my-cluster\"`");
    if let Some(n) = &name {
        check_name(ctx, n, "cluster");
    }
    let description = c.str(ctx, "description", "`description = \"…\"`").map(|d| d.v);
    if let Some(v) = c.get("coordinator") {
        s.coordinator = read_coordinator(ctx, v.get_ref(), v.span());
    }
    let mut timing_parsed = true;
    for (key, field) in [
        ("lease_ttl", &mut s.lease_ttl),
        ("renew_interval", &mut s.renew_interval),
        ("fence_margin", &mut s.fence_margin),
    ] {
        match c.duration(ctx, key) {
            Some(d) => *field = d.v,
            None => timing_parsed &= c.get(key).is_none(),
        }
    }
    if let Some(n) = c.uint(
        ctx,
        "max_addresses_per_node",
        u64::from(u32::MAX),
        "`max_addresses_per_node = 128`",
    ) {
        s.max_addresses_per_node = u32::try_from(n.v).unwrap_or(u32::MAX);
    }
    // The self-fencing timing rule: an owner must be able to miss one renewal
    // and still renew before it has to fence itself.
    let needed = s.renew_interval * 2 + s.fence_margin;
    let zero: Vec<&str> = [("renew_interval", s.renew_interval), ("fence_margin", s.fence_margin)]
        .iter()
        .filter(|(_, d)| d.is_zero())
        .map(|(k, _)| *k)
        .collect();
    if timing_parsed && (s.lease_ttl < needed || !zero.is_empty()) {
        let span = c
            .key_span("lease_ttl")
            .or_else(|| c.key_span("renew_interval"))
            .or_else(|| c.key_span("fence_margin"))
            .unwrap_or(c.span.clone());
        let also = if zero.is_empty() {
            String::new()
        } else {
            format!(", and {} must be above zero", zero.join(" and "))
        };
        ctx.error(
            "E014",
            span,
            format!(
                "timing rule broken: 2 × renew_interval ({}) + fence_margin ({}) must be at most lease_ttl ({}){also}",
                HumanDuration(s.renew_interval),
                HumanDuration(s.fence_margin),
                HumanDuration(s.lease_ttl)
            ),
        )
        .hint(format!(
            "raise lease_ttl to at least {} or renew more often",
            HumanDuration(needed.max(Duration::from_millis(3)))
        ));
    }
    (name.map(|n| n.v), description, s)
}

fn read_coordinator(ctx: &mut Ctx, v: &DeValue<'_>, span: Range<usize>) -> CoordinatorSpec {
    let embedded = CoordinatorSpec::Embedded { path: None };
    match v {
        DeValue::String(s) if s == "embedded" => embedded,
        DeValue::String(s) => {
            ctx.error("E012", span, format!("unknown coordinator `{s}`")).hint(
                "use `coordinator = \"embedded\"` or `coordinator = { etcd = { endpoints = [\"10.0.0.1:2379\"] } }`",
            );
            embedded
        }
        DeValue::Table(t) => {
            let o = Obj::new(t, span.clone(), "`coordinator`");
            o.check_keys(ctx, &["embedded", "etcd"], |_| None);
            if t.len() != 1 {
                ctx.error("E012", span, "`coordinator` must name exactly one backend")
                    .hint("write `coordinator = { embedded = { path = \"/var/lib/understudy/cluster.db\" } }` or `{ etcd = { … } }`");
                return embedded;
            }
            if let Some(e) = o.table(ctx, "embedded", "`embedded = { path = \"…\" }`") {
                e.check_keys(ctx, &["path"], |_| None);
                return CoordinatorSpec::Embedded {
                    path: e
                        .str(ctx, "path", "`path = \"/var/lib/understudy/cluster.db\"`")
                        .map(|p| p.v),
                };
            }
            if let Some(e) = o.table(ctx, "etcd", "`etcd = { endpoints = [\"10.0.0.1:2379\"] }`") {
                let keys = [
                    "endpoints",
                    "prefix",
                    "ca_file",
                    "cert_file",
                    "key_file",
                    "username",
                    "password_file",
                ];
                e.check_keys(ctx, &keys, |k| {
                    (k == "ttl").then(|| "the lease TTL is `lease_ttl` in `[cluster]`".to_string())
                });
                let endpoints = e
                    .req_str_array(ctx, "endpoints", "`endpoints = [\"10.0.0.1:2379\"]`")
                    .map(|a| {
                        if a.v.is_empty() {
                            ctx.error("E012", a.span.clone(), "`endpoints` lists no etcd member")
                                .hint("list every member's client address, e.g. `endpoints = [\"10.0.0.1:2379\"]`");
                        }
                        for ep in &a.v {
                            let bare = ep.v.trim_start_matches("http://").trim_start_matches("https://");
                            let ok = bare
                                .rsplit_once(':')
                                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                            if !ok {
                                ctx.error(
                                    "E012",
                                    ep.span.clone(),
                                    format!("etcd endpoint `{}` is not host:port", ep.v),
                                )
                                .hint("write it like `\"10.0.0.1:2379\"`");
                            }
                        }
                        a.v.into_iter().map(|s| s.v).collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                let get = |ctx: &mut Ctx, k: &str| e.str(ctx, k, &format!("`{k} = \"/path\"`")).map(|s| s.v);
                let spec = EtcdSpec {
                    endpoints,
                    prefix: e
                        .str(ctx, "prefix", "`prefix = \"/understudy\"`")
                        .map_or_else(|| "/understudy".into(), |s| s.v),
                    ca_file: get(ctx, "ca_file"),
                    cert_file: get(ctx, "cert_file"),
                    key_file: get(ctx, "key_file"),
                    username: get(ctx, "username"),
                    password_file: get(ctx, "password_file"),
                };
                if spec.cert_file.is_some() != spec.key_file.is_some() {
                    ctx.error("E012", e.span.clone(), "`cert_file` and `key_file` go together")
                        .hint("give both for client certificate authentication, or neither");
                }
                if spec.username.is_some() != spec.password_file.is_some() {
                    ctx.error("E012", e.span.clone(), "`username` and `password_file` go together")
                        .hint("give both for password authentication, or neither");
                }
                return CoordinatorSpec::Etcd(spec);
            }
            embedded
        }
        other => {
            ctx.error(
                "E011",
                span,
                format!("`coordinator` must be a string or a table, found {}", type_name(other)),
            )
            .hint("write `coordinator = \"embedded\"`");
            embedded
        }
    }
}

fn read_nodes(ctx: &mut Ctx, root: &Obj<'_, '_>, end: Range<usize>) -> Vec<RawNode> {
    let Some(v) = root.get("node") else {
        ctx.error("E007", end, "the definition declares no node")
            .hint("add `[[node]]` tables with `name` and `address`");
        return Vec::new();
    };
    let DeValue::Array(items) = v.get_ref() else {
        ctx.error("E011", v.span(), "`node` must be an array of tables")
            .hint("declare each node with its own `[[node]]` header");
        return Vec::new();
    };
    let mut nodes: Vec<RawNode> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let DeValue::Table(t) = item.get_ref() else {
            ctx.error("E011", item.span(), "each node must be a table")
                .hint("declare each node with its own `[[node]]` header");
            continue;
        };
        let label = match t.get("name").map(|v| v.get_ref()) {
            Some(DeValue::String(n)) => format!("node `{n}`"),
            _ => format!("node #{}", i + 1),
        };
        let o = Obj::new(t, item.span(), label);
        o.check_keys(ctx, NODE_KEYS, |_| None);
        let Some(name) = o.req_str(ctx, "name", "`name = \"node1\"`") else {
            continue;
        };
        check_name(ctx, &name, "node");
        let what = format!("node `{}`", name.v);
        let o = Obj::new(t, name.span.clone(), what.clone());
        let address = if o.get("address").is_none() {
            o.missing(ctx, "address", "`address = \"10.0.0.1/24\"` (its address and subnet)");
            None
        } else {
            o.ipnet(ctx, "address", "`address = \"10.0.0.1/24\"`")
        };
        let priority = o
            .uint(ctx, "priority", u64::from(u32::MAX), "`priority = 1`")
            .map_or(100, |p| u32::try_from(p.v).unwrap_or(u32::MAX));
        let mut other = Vec::new();
        if let Some(arr) = o.str_array(ctx, "addresses", "`addresses = [\"192.168.1.10/24\"]`") {
            for a in &arr.v {
                if let Some(net) = parse_ipnet(
                    ctx,
                    a,
                    &format!("an entry of `addresses` of {what}"),
                    "`\"192.168.1.10/24\"`",
                ) {
                    other.push(net.v);
                }
            }
        }
        if nodes.iter().any(|n| n.name.v == name.v) {
            ctx.error("E003", name.span.clone(), format!("duplicate node name `{}`", name.v))
                .hint("every `[[node]]` needs its own name");
            continue;
        }
        nodes.push(RawNode {
            name,
            address,
            priority,
            other,
        });
    }
    nodes
}

fn read_groups(ctx: &mut Ctx, root: &Obj<'_, '_>, nodes: &[RawNode]) -> Vec<RawGroup> {
    let Some(v) = root.get("group") else {
        return Vec::new();
    };
    let DeValue::Table(t) = v.get_ref() else {
        ctx.error("E011", v.span(), "`group` must be a table of groups")
            .hint("declare each group with a `[group.NAME]` header");
        return Vec::new();
    };
    let mut groups = Vec::new();
    for (key, gv) in t.iter() {
        let name = Sp::new(key.get_ref().to_string(), key.span());
        check_name(ctx, &name, "group");
        let DeValue::Table(gt) = gv.get_ref() else {
            ctx.error("E011", gv.span(), format!("group `{}` must be a table", name.v))
                .hint(format!("declare it with a `[group.{}]` header", name.v));
            continue;
        };
        let gi = groups.len();
        groups.push(read_group(ctx, gi, name, gt, nodes));
    }
    groups
}

fn read_group(ctx: &mut Ctx, gi: usize, name: Sp<String>, gt: &DeTable<'_>, nodes: &[RawNode]) -> RawGroup {
    let what = format!("group `{}`", name.v);
    let o = Obj::new(gt, name.span.clone(), what.clone());
    o.check_keys(ctx, GROUP_KEYS, |k| {
        if COMMON_KEYS.contains(&k) || KINDS.iter().any(|(_, keys)| keys.contains(&k)) {
            Some(format!(
                "`{k}` is a resource setting; put it under `[group.{}.resource.NAME]`",
                name.v
            ))
        } else if k == "resources" {
            Some(format!(
                "resources are declared with `[group.{}.resource.NAME]`",
                name.v
            ))
        } else {
            None
        }
    });
    let description = o.str(ctx, "description", "`description = \"…\"`").map(|s| s.v);
    let node_list = o
        .str_array(ctx, "nodes", "`nodes = [\"node1\", \"node2\"]`")
        .map(|arr| {
            if arr.v.is_empty() {
                ctx.error("E012", arr.span.clone(), format!("{what} lists no node"))
                    .hint("list the nodes that may run it, most preferred first, or leave `nodes` out for all nodes");
            }
            let mut seen: HashSet<&str> = HashSet::new();
            for n in &arr.v {
                if !seen.insert(n.v.as_str()) {
                    ctx.error(
                        "E003",
                        n.span.clone(),
                        format!("node `{}` is listed twice in {what}", n.v),
                    )
                    .hint("list each node once, most preferred first");
                } else if !nodes.iter().any(|x| x.name.v == n.v) {
                    let d = ctx.error("E004", n.span.clone(), format!("{what} lists unknown node `{}`", n.v));
                    match did_you_mean(&n.v, nodes.iter().map(|x| x.name.v.as_str())) {
                        Some(s) => d.hint(format!("did you mean `{s}`?")),
                        None => d.hint("declare the node with `[[node]]` first"),
                    }
                }
            }
            arr.v
        });
    let failback = match o.choice(ctx, "failback", &["manual", "auto"]) {
        Some(s) if s.v == "auto" => Failback::Auto,
        _ => Failback::Manual,
    };
    let mut failover = FailoverPolicy::default();
    if let Some(f) = o.table(ctx, "failover", "`failover = { threshold = 3, within = \"1h\" }`") {
        f.check_keys(ctx, &["threshold", "within"], |_| None);
        if let Some(t) = f.uint(ctx, "threshold", 1000, "`threshold = 3`") {
            failover.threshold = u32::try_from(t.v).unwrap_or(1000);
        }
        if let Some(w) = f.duration(ctx, "within") {
            failover.within = w.v;
        }
    }
    let colocate_with = o
        .str_array(ctx, "colocate_with", "`colocate_with = [\"other-group\"]`")
        .map(|a| a.v)
        .unwrap_or_default();
    let group_monitor = o.get("monitor").and_then(|v| match v.get_ref() {
        DeValue::Table(t) => {
            let m = Obj::new(t, v.span(), format!("`monitor` of {what}"));
            Some(read_monitor_fields(ctx, &m, MonitorSpec::default()).0)
        }
        other => {
            ctx.error(
                "E011",
                v.span(),
                format!("`monitor` of {what} must be a table, found {}", type_name(other)),
            )
            .hint("write `monitor = { interval = \"5s\", timeout = \"3s\", restarts = 3, within = \"10m\" }`");
            None
        }
    });
    let start_timeout = o.duration(ctx, "start_timeout").map_or(DEFAULT_START_TIMEOUT, |d| d.v);
    let stop_timeout = o.duration(ctx, "stop_timeout").map_or(DEFAULT_STOP_TIMEOUT, |d| d.v);
    let defaults = ResourceDefaults {
        monitor: group_monitor.unwrap_or_default(),
        start_timeout,
        stop_timeout,
    };
    let mut resources = Vec::new();
    if let Some(rv) = o.get("resource") {
        match rv.get_ref() {
            DeValue::Table(rt) => {
                for (rkey, v) in rt.iter() {
                    let rname = Sp::new(rkey.get_ref().to_string(), rkey.span());
                    check_name(ctx, &rname, "resource");
                    match v.get_ref() {
                        DeValue::Table(t) => resources.push(read_resource(ctx, gi, rname, t, &defaults)),
                        other => {
                            ctx.error(
                                "E011",
                                v.span(),
                                format!("resource `{}` must be a table, found {}", rname.v, type_name(other)),
                            )
                            .hint(format!(
                                "declare it with a `[group.{}.resource.{}]` header",
                                name.v, rname.v
                            ));
                        }
                    }
                }
            }
            other => {
                ctx.error(
                    "E011",
                    rv.span(),
                    format!("`resource` of {what} must be a table, found {}", type_name(other)),
                )
                .hint(format!("declare resources with `[group.{}.resource.NAME]`", name.v));
            }
        }
    }
    if resources.is_empty() {
        ctx.warn("W008", name.span.clone(), format!("{what} has no resources"))
            .hint(format!("add resources with `[group.{}.resource.NAME]`", name.v));
    }
    RawGroup {
        name,
        description,
        nodes: node_list,
        failback,
        failover,
        colocate_with,
        resources,
    }
}

struct ResourceDefaults {
    monitor: MonitorSpec,
    start_timeout: Duration,
    stop_timeout: Duration,
}

/// Reads monitor fields over `base`; also returns the span of an explicit `on_fail`.
fn read_monitor_fields(ctx: &mut Ctx, m: &Obj<'_, '_>, base: MonitorSpec) -> (MonitorSpec, Option<Range<usize>>) {
    m.check_keys(ctx, MONITOR_KEYS, |_| None);
    let mut spec = base;
    if let Some(d) = m.duration(ctx, "interval") {
        spec.interval = d.v;
        if d.v.is_zero() {
            ctx.error("E012", d.span, "a monitor interval must be above zero")
                .hint("write `interval = \"5s\"`");
        }
    }
    if let Some(d) = m.duration(ctx, "timeout") {
        spec.timeout = d.v;
    }
    if let Some(n) = m.uint(ctx, "restarts", 1000, "`restarts = 3`") {
        spec.restarts = u32::try_from(n.v).unwrap_or(1000);
    }
    if let Some(d) = m.duration(ctx, "within") {
        spec.within = d.v;
    }
    let mut on_fail_span = None;
    if let Some(s) = m.choice(ctx, "on_fail", &["restart", "failover", "report"]) {
        spec.on_fail = match s.v.as_str() {
            "failover" => OnFail::Failover,
            "report" => OnFail::Report,
            _ => OnFail::Restart,
        };
        on_fail_span = Some(s.span);
    }
    if spec.timeout >= spec.interval
        && let Some(span) = m.key_span("timeout").or_else(|| m.key_span("interval"))
    {
        ctx.warn(
            "W002",
            span,
            format!(
                "monitor timeout ({}) is not shorter than its interval ({})",
                HumanDuration(spec.timeout),
                HumanDuration(spec.interval)
            ),
        )
        .hint("a check that may take a whole interval delays the next one; shorten the timeout");
    }
    (spec, on_fail_span)
}

fn kind_of_key(key: &str) -> Option<String> {
    let kinds: Vec<&str> = KINDS
        .iter()
        .filter(|(_, keys)| keys.contains(&key))
        .map(|(k, _)| *k)
        .collect();
    (!kinds.is_empty()).then(|| format!("`{key}` is a setting of kind {}", kinds.join(", ")))
}

fn read_resource(
    ctx: &mut Ctx,
    gi: usize,
    name: Sp<String>,
    t: &DeTable<'_>,
    defaults: &ResourceDefaults,
) -> RawResource {
    let what = format!("resource `{}`", name.v);
    let o = Obj::new(t, name.span.clone(), what.clone());
    let kind_name = o.choice(ctx, "kind", &KINDS.iter().map(|(k, _)| *k).collect::<Vec<_>>());
    if o.get("kind").is_none() {
        o.missing(
            ctx,
            "kind",
            "`kind = \"process\"` (one of ip, fs, process, systemd, script, postgres, sync)",
        );
    }
    let kind_keys: &[&str] = kind_name
        .as_ref()
        .and_then(|k| KINDS.iter().find(|(n, _)| *n == k.v))
        .map_or(&[], |(_, keys)| keys);
    let allowed: Vec<&str> = if kind_name.is_some() {
        COMMON_KEYS.iter().chain(kind_keys.iter()).copied().collect()
    } else {
        // Without a known kind, still report keys that no kind accepts.
        COMMON_KEYS
            .iter()
            .copied()
            .chain(KINDS.iter().flat_map(|(_, keys)| keys.iter().copied()))
            .collect()
    };
    o.check_keys(ctx, &allowed, kind_of_key);
    let description = o
        .str(ctx, "description", "`description = \"ESM Base Service\"`")
        .map(|s| s.v);
    let depends_on = o
        .str_array(ctx, "depends_on", "`depends_on = [\"vip\", \"shared\"]`")
        .map(|a| a.v)
        .unwrap_or_default();
    let optional = o.bool(ctx, "optional").is_some_and(|b| b.v);
    let enabled = o.bool(ctx, "enabled").unwrap_or(Sp::new(true, name.span.clone()));
    let clone = o.bool(ctx, "clone");
    let monitor_only = o.bool(ctx, "monitor_only");
    let role = match (&clone, &monitor_only) {
        (Some(c), Some(m)) if c.v && m.v => {
            ctx.error(
                "E013",
                m.span.clone(),
                format!("{what} cannot be both a clone and monitor-only"),
            )
            .hint("a clone is started on every node; a monitor-only resource is never started: pick one");
            Sp::new(Role::Managed, name.span.clone())
        }
        (Some(c), _) if c.v => Sp::new(Role::Clone, c.span.clone()),
        (_, Some(m)) if m.v => Sp::new(Role::MonitorOnly, m.span.clone()),
        _ => Sp::new(Role::Managed, name.span.clone()),
    };
    let mut base = defaults.monitor;
    if role.v == Role::MonitorOnly {
        base.on_fail = OnFail::Report;
    }
    let (monitor, on_fail_span) = match o.get("monitor") {
        None => (Some(base), None),
        Some(v) => match v.get_ref() {
            DeValue::Boolean(true) => (Some(base), None),
            DeValue::Boolean(false) => (None, None),
            DeValue::Table(mt) => {
                let m = Obj::new(mt, v.span(), format!("`monitor` of {what}"));
                let (spec, span) = read_monitor_fields(ctx, &m, base);
                (Some(spec), span)
            }
            other => {
                ctx.error(
                    "E011",
                    v.span(),
                    format!(
                        "`monitor` of {what} must be a table, true or false, found {}",
                        type_name(other)
                    ),
                )
                .hint("write `monitor = { interval = \"5s\" }`, or `monitor = false` to switch monitoring off");
                (Some(base), None)
            }
        },
    };
    let start_timeout = o.duration(ctx, "start_timeout").map_or(defaults.start_timeout, |d| d.v);
    let stop_timeout = o.duration(ctx, "stop_timeout").map_or(defaults.stop_timeout, |d| d.v);
    let mut ip_span = None;
    let kind = kind_name.and_then(|k| read_kind(ctx, &o, &k.v, &mut ip_span));
    RawResource {
        name,
        group: gi,
        kind,
        description,
        depends_on,
        optional,
        enabled,
        role,
        monitor,
        on_fail_span,
        start_timeout,
        stop_timeout,
        ip_span,
    }
}

fn read_kind(ctx: &mut Ctx, o: &Obj<'_, '_>, kind: &str, ip_span: &mut Option<Range<usize>>) -> Option<Kind> {
    // Every setting is read before anything is given up on, so one run
    // reports every problem of the resource.
    let text = |ctx: &mut Ctx, key: &str, example: &str| o.str(ctx, key, example).map(|s| s.v);
    match kind {
        "ip" => {
            let address = if o.get("address").is_none() {
                o.missing(ctx, "address", "`address = \"10.0.0.100/24\"` (the floating address)");
                None
            } else {
                o.ipnet(ctx, "address", "`address = \"10.0.0.100/24\"`")
            };
            let interface = text(ctx, "interface", "`interface = \"eth0\"`");
            let announce_count = o
                .uint(ctx, "announce", 100, "`announce = 3`")
                .map_or(3, |n| u32::try_from(n.v).unwrap_or(3));
            let announce_repeat_after = o
                .duration(ctx, "announce_repeat_after")
                .map_or(Duration::from_secs(2), |d| d.v);
            let probe = o.bool(ctx, "probe").is_none_or(|b| b.v);
            let address = address?;
            *ip_span = Some(address.span.clone());
            Some(Kind::Ip(IpSpec {
                address: address.v,
                interface,
                announce_count,
                announce_repeat_after,
                probe,
            }))
        }
        "fs" => {
            let device = o.req_str(
                ctx,
                "device",
                "`device = \"/dev/disk/by-uuid/…\"`, `device = \"UUID=…\"` or `device = \"LABEL=…\"`",
            );
            let mountpoint = o.req_str(ctx, "mountpoint", "`mountpoint = \"/srv/shared\"`");
            if let Some(m) = &mountpoint {
                absolute(ctx, m, "mount point", "`mountpoint = \"/srv/shared\"`");
                if m.v.trim_end_matches('/').is_empty() {
                    ctx.error("E012", m.span.clone(), "the mount point cannot be `/`")
                        .hint("mount the shared disk on a directory of its own, e.g. `/srv/shared`");
                }
            }
            if let Some(d) = &device
                && d.v.trim().is_empty()
            {
                ctx.error("E012", d.span.clone(), "`device` is empty")
                    .hint("write it like `device = \"/dev/disk/by-uuid/…\"`, `\"UUID=…\"` or `\"LABEL=…\"`");
            }
            let options = match o.get("options").map(|v| v.get_ref()) {
                Some(DeValue::String(s)) => s
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
                Some(_) => o
                    .str_array(ctx, "options", "`options = [\"noatime\"]`")
                    .map(|a| a.v.into_iter().map(|s| s.v).collect())
                    .unwrap_or_default(),
                None => Vec::new(),
            };
            let directories = read_directories(ctx, o);
            let fstype = text(ctx, "fstype", "`fstype = \"ext4\"`").unwrap_or_else(|| "ext4".into());
            let fsck = o.bool(ctx, "fsck").is_none_or(|b| b.v);
            Some(Kind::Fs(FsSpec {
                device: device?.v,
                mountpoint: mountpoint?.v,
                fstype,
                options,
                fsck,
                directories,
            }))
        }
        "process" => {
            let command = o.command(ctx, "command", true);
            warn_relative_command(ctx, o, "command", command.as_deref());
            let check = read_check(ctx, o);
            let env = o.string_map(ctx, "env");
            let cwd = text(ctx, "cwd", "`cwd = \"/srv/app\"`");
            let user = text(ctx, "user", "`user = \"app\"`");
            let stop_signal = o
                .choice(
                    ctx,
                    "stop_signal",
                    &["TERM", "INT", "QUIT", "HUP", "USR1", "USR2", "KILL"],
                )
                .map_or_else(|| "TERM".into(), |s| s.v);
            let log = text(ctx, "log", "`log = \"/var/log/app.log\"`");
            Some(Kind::Process(ProcessSpec {
                command: command?,
                env,
                cwd,
                user,
                stop_signal,
                log,
                check,
            }))
        }
        "systemd" => {
            let unit = o.req_str(ctx, "unit", "`unit = \"nginx.service\"`")?;
            if unit.v.is_empty() || unit.v.starts_with('-') || unit.v.contains(char::is_whitespace) {
                ctx.error("E012", unit.span.clone(), format!("`{}` is not a unit name", unit.v))
                    .hint("write the unit's full name, e.g. `unit = \"nginx.service\"`");
            }
            Some(Kind::Systemd(SystemdSpec { unit: unit.v }))
        }
        "script" => {
            // A monitor-only script is nothing but its status command.
            let monitor_only = o
                .get("monitor_only")
                .is_some_and(|v| matches!(v.get_ref(), DeValue::Boolean(true)));
            let start = o.command(ctx, "start", !monitor_only);
            let stop = o.command(ctx, "stop", !monitor_only);
            let status = o.command(ctx, "status", monitor_only);
            for (key, cmd) in [("start", &start), ("stop", &stop), ("status", &status)] {
                warn_relative_command(ctx, o, key, cmd.as_deref());
            }
            let env = o.string_map(ctx, "env");
            let cwd = text(ctx, "cwd", "`cwd = \"/srv/app\"`");
            let (start, stop) = if monitor_only {
                (start.unwrap_or_default(), stop.unwrap_or_default())
            } else {
                (start?, stop?)
            };
            Some(Kind::Script(ScriptSpec {
                start,
                stop,
                monitor: status,
                env,
                cwd,
            }))
        }
        "postgres" => {
            let data_dir = o.req_str(ctx, "data_dir", "`data_dir = \"/srv/shared/pgdata\"`");
            if let Some(d) = &data_dir {
                absolute(ctx, d, "data directory", "`data_dir = \"/srv/shared/pgdata\"`");
                if d.v.contains(['"', '$', '`', '\\']) {
                    ctx.error(
                        "E012",
                        d.span.clone(),
                        format!("data directory `{}` contains a shell-special character", d.v),
                    )
                    .hint("pg_ctl passes it through a shell: use a path without \", $, ` or \\");
                }
            }
            let port = o.uint(ctx, "port", 65535, "`port = 5432`");
            if let Some(p) = &port
                && p.v == 0
            {
                ctx.error("E012", p.span.clone(), "port 0 is not a port PostgreSQL can listen on")
                    .hint("write it like `port = 5432`");
            }
            let bin_dir = text(ctx, "bin_dir", "`bin_dir = \"/usr/lib/postgresql/15/bin\"`");
            let user = text(ctx, "user", "`user = \"postgres\"`").unwrap_or_else(|| "postgres".into());
            if user.trim().is_empty()
                && let Some(v) = o.get("user")
            {
                ctx.error("E012", v.span(), "`user` is empty")
                    .hint("PostgreSQL refuses to run as root; name the account that owns the data directory");
            }
            let database = text(ctx, "database", "`database = \"postgres\"`").unwrap_or_else(|| "postgres".into());
            let socket_dir = text(ctx, "socket_dir", "`socket_dir = \"/run/postgresql\"`");
            Some(Kind::Postgres(PostgresSpec {
                data_dir: data_dir?.v,
                port: port.map_or(5432, |p| u16::try_from(p.v).unwrap_or(5432)),
                bin_dir,
                user,
                database,
                socket_dir,
            }))
        }
        "sync" => {
            let paths = o.req_str_array(ctx, "paths", "`paths = [\"/etc/app/settings.xml\"]`")?;
            if paths.v.is_empty() {
                ctx.error("E012", paths.span.clone(), "`paths` lists nothing to replicate")
                    .hint("list the files or directories to copy to the other nodes");
            }
            for p in &paths.v {
                absolute(ctx, p, "sync path", "`\"/etc/app/settings.xml\"`");
            }
            Some(Kind::Sync(SyncSpec {
                paths: paths.v.into_iter().map(|s| s.v).collect(),
            }))
        }
        _ => None,
    }
}

fn absolute(ctx: &mut Ctx, path: &Sp<String>, what: &str, example: &str) {
    if !path.v.starts_with('/') {
        ctx.error(
            "E012",
            path.span.clone(),
            format!("{what} `{}` must be an absolute path", path.v),
        )
        .hint(format!("write it like {example}"));
    }
}

/// W006: a command that relies on a search path the agent does not have.
fn warn_relative_command(ctx: &mut Ctx, o: &Obj<'_, '_>, key: &str, command: Option<&[String]>) {
    let Some(program) = command.and_then(|c| c.first()) else {
        return;
    };
    if program.starts_with('/') || program.starts_with("./") {
        return;
    }
    if let Some(v) = o.get(key) {
        ctx.warn("W006", v.span(), format!("command `{program}` is not an absolute path"))
            .hint("the agent looks it up in its own PATH, which may differ from a login shell's; give the full path, or `./…` for a path relative to this file");
    }
}

/// A process's `check = { command | tcp | http }`.
fn read_check(ctx: &mut Ctx, o: &Obj<'_, '_>) -> Option<HealthCheck> {
    let c = o.table(ctx, "check", "`check = { tcp = \"127.0.0.1:8080\" }`")?;
    c.check_keys(ctx, &["command", "tcp", "http"], |_| None);
    if c.table.len() != 1 {
        ctx.error(
            "E012",
            c.span.clone(),
            "`check` must have exactly one of `command`, `tcp`, `http`",
        )
        .hint("write `check = { tcp = \"127.0.0.1:8080\" }`");
        return None;
    }
    if c.get("command").is_some() {
        let cmd = c.command(ctx, "command", true);
        warn_relative_command(ctx, &c, "command", cmd.as_deref());
        return cmd.map(HealthCheck::Command);
    }
    if let Some(t) = c.str(ctx, "tcp", "`tcp = \"127.0.0.1:8080\"`") {
        if !t
            .v
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            ctx.error("E012", t.span, format!("`tcp` check `{}` is not host:port", t.v))
                .hint("write it like `tcp = \"127.0.0.1:8080\"`");
            return None;
        }
        return Some(HealthCheck::Tcp(t.v));
    }
    let h = c.str(ctx, "http", "`http = \"http://127.0.0.1:8080/health\"`")?;
    if !h.v.starts_with("http://") {
        ctx.error("E012", h.span, format!("`http` check `{}` must be an http:// URL", h.v))
            .hint("write it like `http = \"http://127.0.0.1:8080/health\"` (https is not supported by the check)");
        return None;
    }
    Some(HealthCheck::Http(h.v))
}

/// The preference list of a group: as declared, or every node by priority.
fn group_nodes(g: &RawGroup, nodes: &[RawNode]) -> Vec<String> {
    match &g.nodes {
        Some(list) => list.iter().map(|n| n.v.clone()).collect(),
        None => {
            let mut all: Vec<(u32, usize, &str)> = nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.priority, i, n.name.v.as_str()))
                .collect();
            all.sort();
            all.into_iter().map(|(_, _, n)| n.to_string()).collect()
        }
    }
}

fn cross_check(ctx: &mut Ctx, settings: &Settings, nodes: &[RawNode], groups: &[RawGroup], resources: &[RawResource]) {
    // Unique resource names across the cluster.
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for (i, r) in resources.iter().enumerate() {
        if let Some(&first) = by_name.get(r.name.v.as_str()) {
            ctx.error(
                "E003",
                r.name.span.clone(),
                format!(
                    "duplicate resource name `{}` (also in group `{}`)",
                    r.name.v, groups[resources[first].group].name.v
                ),
            )
            .hint("resource names are unique in the whole cluster; rename one of them");
        } else {
            by_name.insert(r.name.v.as_str(), i);
        }
    }

    // Co-location: known groups, no self reference, no cycle.
    let group_index: HashMap<&str, usize> = groups.iter().enumerate().map(|(i, g)| (g.name.v.as_str(), i)).collect();
    let mut coloc_edges: Vec<Vec<usize>> = vec![Vec::new(); groups.len()];
    for (gi, g) in groups.iter().enumerate() {
        for p in &g.colocate_with {
            match group_index.get(p.v.as_str()) {
                Some(&pi) if pi == gi => {
                    ctx.error(
                        "E013",
                        p.span.clone(),
                        format!("group `{}` cannot be co-located with itself", g.name.v),
                    )
                    .hint("remove it from `colocate_with`");
                }
                Some(&pi) => coloc_edges[gi].push(pi),
                None => {
                    let d = ctx.error(
                        "E004",
                        p.span.clone(),
                        format!("group `{}` is co-located with unknown group `{}`", g.name.v, p.v),
                    );
                    match did_you_mean(&p.v, groups.iter().map(|g| g.name.v.as_str())) {
                        Some(s) => d.hint(format!("did you mean `{s}`?")),
                        None => d.hint("name a group declared with `[group.NAME]`"),
                    }
                }
            }
        }
    }
    for cycle in understudy_core::graph::cycles(&coloc_edges) {
        let names: Vec<&str> = cycle.iter().map(|&i| groups[i].name.v.as_str()).collect();
        ctx.error(
            "E005",
            groups[cycle[0]].name.span.clone(),
            format!("co-location cycle: {}", names.join(" -> ")),
        )
        .hint("co-location already works both ways; declare it on one side only");
    }
    // Groups connected by co-location, in either direction, share a node.
    let mut component: Vec<usize> = (0..groups.len()).collect();
    fn root(c: &mut [usize], mut i: usize) -> usize {
        while c[i] != i {
            c[i] = c[c[i]];
            i = c[i];
        }
        i
    }
    for (gi, edges) in coloc_edges.iter().enumerate() {
        for &pi in edges {
            let (a, b) = (root(&mut component, gi), root(&mut component, pi));
            component[a] = b;
        }
    }

    // Dependencies.
    for r in resources {
        let rg = &groups[r.group];
        for d in &r.depends_on {
            let Some(&di) = by_name.get(d.v.as_str()) else {
                let e = ctx.error(
                    "E004",
                    d.span.clone(),
                    format!("`{}` depends on unknown resource `{}`", r.name.v, d.v),
                );
                match did_you_mean(&d.v, by_name.keys().copied()) {
                    Some(s) => e.hint(format!("did you mean `{s}`?")),
                    None => e.hint("name a resource declared in some `[group.G.resource.NAME]`"),
                }
                continue;
            };
            let dep = &resources[di];
            if dep.role.v == Role::MonitorOnly {
                ctx.error(
                    "E013",
                    d.span.clone(),
                    format!(
                        "`{}` depends on monitor-only resource `{}`, which the cluster never starts",
                        r.name.v, d.v
                    ),
                )
                .hint("remove the dependency; monitor-only resources are only checked");
                continue;
            }
            if r.role.v == Role::Clone && dep.role.v != Role::Clone {
                ctx.error(
                    "E013",
                    d.span.clone(),
                    format!(
                        "clone `{}` depends on `{}`, which runs only on its group's owner",
                        r.name.v, d.v
                    ),
                )
                .hint("a clone runs on every node, so it may depend only on other clones");
                continue;
            }
            if dep.group != r.group && dep.role.v != Role::Clone {
                let same = root(&mut component, dep.group) == root(&mut component, r.group);
                if !same {
                    let dg = &groups[dep.group].name.v;
                    ctx.error(
                        "E006",
                        d.span.clone(),
                        format!(
                            "`{}` (group `{}`) depends on `{}` of group `{}`, but the groups are not co-located",
                            r.name.v, rg.name.v, d.v, dg
                        ),
                    )
                    .hint(format!(
                        "add `colocate_with = [\"{dg}\"]` to `[group.{}]`, or move the resource into one group",
                        rg.name.v
                    ));
                }
            }
        }
        match (&r.kind, r.role.v) {
            (Some(Kind::Fs(_)), Role::Clone) => {
                ctx.error(
                    "E013",
                    r.role.span.clone(),
                    format!(
                        "filesystem `{}` cannot be a clone: a shared disk is mounted on one node at a time",
                        r.name.v
                    ),
                )
                .hint("remove `clone = true`; the group's owner mounts it");
            }
            (Some(Kind::Sync(_)), Role::Clone) => {
                ctx.error(
                    "E013",
                    r.role.span.clone(),
                    format!(
                        "sync resource `{}` cannot be a clone: only the group's owner stores the copy, fenced by its token",
                        r.name.v
                    ),
                )
                .hint("remove `clone = true`; the group's owner keeps the copy and hands it to the next owner");
            }
            (Some(Kind::Process(_) | Kind::Sync(_)), Role::MonitorOnly) => {
                let kind = r.kind.as_ref().map_or("", |k| k.name());
                ctx.error(
                    "E013",
                    r.role.span.clone(),
                    format!("`{}` of kind {kind} cannot be monitor-only: the agent can only check what it started itself", r.name.v),
                )
                .hint("to watch a service the cluster does not start, use kind `systemd` (its unit) or `script` with a `status` command");
            }
            _ => {}
        }
        if !r.enabled.v && !r.optional {
            ctx.error("E013", r.enabled.span.clone(), format!("`{}` is switched off but is not optional", r.name.v))
                .hint("only `optional = true` members may be switched off; add `optional = true` if the group works without it");
        }
        if r.role.v == Role::MonitorOnly
            && let (Some(span), Some(m)) = (&r.on_fail_span, &r.monitor)
            && m.on_fail == OnFail::Restart
        {
            ctx.error(
                "E013",
                span.clone(),
                format!("monitor-only `{}` cannot be restarted by the cluster", r.name.v),
            )
            .hint("use `on_fail = \"report\"` or `on_fail = \"failover\"`");
        }
        if r.role.v == Role::MonitorOnly && r.monitor.is_none() {
            ctx.error(
                "E013",
                r.role.span.clone(),
                format!("monitor-only `{}` has its monitor switched off", r.name.v),
            )
            .hint("a monitor-only resource is nothing but its monitor; remove `monitor = false`");
        }
    }

    // Cycles among resources.
    let edges: Vec<Vec<usize>> = resources
        .iter()
        .map(|r| {
            r.depends_on
                .iter()
                .filter_map(|d| by_name.get(d.v.as_str()).copied())
                .collect()
        })
        .collect();
    for cycle in understudy_core::graph::cycles(&edges) {
        let names: Vec<&str> = cycle.iter().map(|&i| resources[i].name.v.as_str()).collect();
        let first = &resources[cycle[0]];
        let span = first
            .depends_on
            .iter()
            .find(|d| d.v == resources[cycle[1]].name.v)
            .map_or(first.name.span.clone(), |d| d.span.clone());
        ctx.error("E005", span, format!("dependency cycle: {}", names.join(" -> ")))
            .hint("a resource cannot start before itself; remove one of these dependencies");
    }

    check_addresses(ctx, settings, nodes, groups, resources);

    // Co-located groups must share a node; a group needing a clone should
    // only list nodes where that clone runs.
    for g in groups {
        let mine = group_nodes(g, nodes);
        for p in &g.colocate_with {
            let Some(partner) = groups.iter().find(|x| x.name.v == p.v) else {
                continue;
            };
            let theirs = group_nodes(partner, nodes);
            if !mine.iter().any(|n| theirs.contains(n)) {
                ctx.error(
                    "E013",
                    p.span.clone(),
                    format!(
                        "group `{}` is co-located with `{}`, but they have no node in common",
                        g.name.v, p.v
                    ),
                )
                .hint("co-located groups run on one node; list at least one node in both groups' `nodes`");
            }
        }
    }
    for r in resources {
        let rg = &groups[r.group];
        for d in &r.depends_on {
            let Some(dep) = resources.iter().find(|x| x.name.v == d.v) else {
                continue;
            };
            if dep.role.v != Role::Clone || r.role.v == Role::Clone {
                continue;
            }
            let clone_nodes = group_nodes(&groups[dep.group], nodes);
            let missing: Vec<String> = group_nodes(rg, nodes)
                .into_iter()
                .filter(|n| !clone_nodes.contains(n))
                .collect();
            if !missing.is_empty() {
                ctx.warn(
                    "W004",
                    d.span.clone(),
                    format!(
                        "`{}` needs clone `{}`, which never runs on {}; group `{}` cannot run there",
                        r.name.v,
                        d.v,
                        missing.join(", "),
                        rg.name.v
                    ),
                )
                .hint(format!(
                    "add those nodes to group `{}`'s `nodes`, or remove them from group `{}`",
                    groups[dep.group].name.v, rg.name.v
                ));
            }
        }
    }

    // Warnings about failover that cannot happen.
    for g in groups {
        let list = group_nodes(g, nodes);
        if list.len() == 1 {
            ctx.warn(
                "W001",
                g.name.span.clone(),
                format!("group `{}` can run on only one node; it cannot fail over", g.name.v),
            )
            .hint("list a second node in `nodes`");
        }
    }
}

/// Floating IPs: inside the subnet of the nodes that may carry them, never a
/// node's own address, each declared once, at most N addresses per node (S1.4).
fn check_addresses(
    ctx: &mut Ctx,
    settings: &Settings,
    nodes: &[RawNode],
    groups: &[RawGroup],
    resources: &[RawResource],
) {
    let mut seen_node_addr: HashMap<std::net::IpAddr, &str> = HashMap::new();
    for n in nodes {
        let Some(a) = &n.address else { continue };
        if let Some(&other) = seen_node_addr.get(&a.v.addr()) {
            ctx.error(
                "E003",
                a.span.clone(),
                format!(
                    "node `{}` has the same address {} as node `{other}`",
                    n.name.v,
                    a.v.addr()
                ),
            )
            .hint("every node needs its own address");
        } else {
            seen_node_addr.insert(a.v.addr(), n.name.v.as_str());
        }
    }
    let mut seen_floating: HashMap<std::net::IpAddr, &str> = HashMap::new();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for r in resources {
        let (Some(Kind::Ip(ip)), Some(span)) = (&r.kind, &r.ip_span) else {
            continue;
        };
        let addr = ip.address.addr();
        if r.role.v == Role::Clone {
            ctx.error(
                "E013",
                r.role.span.clone(),
                format!(
                    "floating IP `{}` cannot be a clone: one address on every node at once",
                    r.name.v
                ),
            )
            .hint("remove `clone = true`; a floating IP lives on one node at a time");
        }
        if let Some(node) = seen_node_addr.get(&addr) {
            ctx.error(
                "E012",
                span.clone(),
                format!("floating IP {addr} of `{}` is node `{node}`'s own address", r.name.v),
            )
            .hint("pick an unused address in the same subnet");
        }
        if let Some(other) = seen_floating.insert(addr, r.name.v.as_str()) {
            ctx.error(
                "E003",
                span.clone(),
                format!("floating IP {addr} of `{}` is also declared by `{other}`", r.name.v),
            )
            .hint("an address can belong to one resource only");
        }
        let allowed = group_nodes(&groups[r.group], nodes);
        let may_carry: Vec<&RawNode> = nodes.iter().filter(|n| allowed.contains(&n.name.v)).collect();
        let in_subnet = |n: &RawNode| n.address.as_ref().is_some_and(|a| a.v.contains(&addr));
        if may_carry.iter().all(|n| n.address.is_some()) {
            let outside: Vec<&str> = may_carry
                .iter()
                .filter(|n| !in_subnet(n))
                .map(|n| n.name.v.as_str())
                .collect();
            if !may_carry.is_empty() && outside.len() == may_carry.len() {
                ctx.error(
                    "E009",
                    span.clone(),
                    format!(
                        "floating IP {} of `{}` is outside the subnet of every node that may run group `{}`",
                        ip.address, r.name.v, groups[r.group].name.v
                    ),
                )
                .hint(
                    "pick an address in the subnet of the nodes that run the group, so their neighbours can reach it",
                );
            } else if !outside.is_empty() {
                ctx.warn(
                    "W003",
                    span.clone(),
                    format!(
                        "floating IP {} of `{}` is outside the subnet of {}",
                        ip.address,
                        r.name.v,
                        outside.join(", ")
                    ),
                )
                .hint("those nodes can carry the address but their neighbours may not reach it there");
            }
        }
        if r.enabled.v {
            for n in allowed {
                *per_node.entry(n).or_default() += 1;
            }
        }
    }
    for n in nodes {
        let floating = per_node.get(&n.name.v).copied().unwrap_or(0);
        let total = 1 + n.other.len() + floating;
        if total > settings.max_addresses_per_node as usize {
            ctx.error(
                "E008",
                n.name.span.clone(),
                format!(
                    "node `{}` may carry {total} addresses (1 own, {} other, {floating} floating), more than the limit of {} (S1.4)",
                    n.name.v,
                    n.other.len(),
                    settings.max_addresses_per_node
                ),
            )
            .hint("spread the groups over other nodes with `nodes = [...]`, or raise `max_addresses_per_node` if your software allows it");
        }
    }
}

fn build(
    name: String,
    description: Option<String>,
    settings: Settings,
    nodes: Vec<RawNode>,
    groups: Vec<RawGroup>,
    resources: Vec<RawResource>,
) -> Option<ClusterSpec> {
    let mut out_groups: Vec<GroupSpec> = groups
        .iter()
        .map(|g| GroupSpec {
            name: g.name.v.clone(),
            description: g.description.clone(),
            nodes: group_nodes(g, &nodes),
            failback: g.failback,
            failover: g.failover,
            colocate_with: g.colocate_with.iter().map(|s| s.v.clone()).collect(),
            resources: Vec::new(),
        })
        .collect();
    for r in resources {
        let spec = ResourceSpec {
            name: r.name.v,
            description: r.description,
            kind: r.kind?,
            depends_on: r.depends_on.into_iter().map(|d| d.v).collect(),
            optional: r.optional,
            enabled: r.enabled.v,
            role: r.role.v,
            monitor: r.monitor,
            start_timeout: r.start_timeout,
            stop_timeout: r.stop_timeout,
        };
        out_groups[r.group].resources.push(spec);
    }
    let nodes = nodes
        .into_iter()
        .map(|n| {
            Some(NodeSpec {
                name: n.name.v,
                address: n.address?.v,
                priority: n.priority,
                other_addresses: n.other,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(ClusterSpec {
        name,
        description,
        settings,
        nodes,
        groups: out_groups,
    })
}

/// `directories = ["NVWORK", { path = "pgsql", owner = "postgres", mode = "0700" }]`:
/// each a relative path, or a table with its owner, group and mode (S2.2b).
fn read_directories(ctx: &mut Ctx, o: &Obj) -> Vec<DirectorySpec> {
    const EXAMPLE: &str = "`directories = [\"app/data\", { path = \"pgsql\", owner = \"postgres\", mode = \"0700\" }]`";
    let Some(v) = o.get("directories") else {
        return Vec::new();
    };
    let DeValue::Array(items) = v.get_ref() else {
        o.wrong_type(ctx, "directories", v, "an array", EXAMPLE);
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items.iter() {
        let dir = match item.get_ref() {
            DeValue::String(path) => {
                Some(DirectorySpec::plain(path.to_string())).filter(|_| relative_dir(ctx, path, item.span()))
            }
            DeValue::Table(t) => {
                let d = Obj::new(t, item.span(), format!("a directory of {}", o.what));
                d.check_keys(ctx, &["path", "owner", "group", "mode"], |_| None);
                let path = d.req_str(ctx, "path", "`path = \"pgsql\"`");
                let path = path.filter(|p| relative_dir(ctx, &p.v, p.span.clone()));
                let mut account = |key: &str| {
                    let a = d.str(ctx, key, &format!("`{key} = \"postgres\"`"))?;
                    let ok = !a.v.is_empty()
                        && !a.v.starts_with('-')
                        && a.v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'));
                    if !ok {
                        ctx.error("E012", a.span.clone(), format!("invalid {key} `{}`", a.v))
                            .hint(format!(
                                "write a user or group name or a number, e.g. `{key} = \"postgres\"`"
                            ));
                        return None;
                    }
                    Some(a.v)
                };
                let owner = account("owner");
                let group = account("group");
                let example = "`mode = \"0750\"`, an octal string (a bare 750 would be decimal)";
                let mode = d.str(ctx, "mode", example).and_then(|m| {
                    let digits = m.v.strip_prefix("0o").unwrap_or(&m.v);
                    match u32::from_str_radix(digits, 8) {
                        Ok(bits) if digits.chars().all(|c| ('0'..='7').contains(&c)) && bits <= 0o7777 => Some(bits),
                        _ => {
                            ctx.error("E012", m.span.clone(), format!("invalid mode `{}`", m.v))
                                .hint(format!("write it like {example}"));
                            None
                        }
                    }
                });
                path.map(|p| DirectorySpec {
                    path: p.v,
                    owner,
                    group,
                    mode,
                })
            }
            other => {
                ctx.error(
                    "E011",
                    item.span(),
                    format!(
                        "`directories` in {} must hold paths or tables, found {}",
                        o.what,
                        type_name(other)
                    ),
                )
                .hint(format!("write it like {EXAMPLE}"));
                None
            }
        };
        out.extend(dir);
    }
    out
}

/// A directory must lie inside the mounted filesystem.
fn relative_dir(ctx: &mut Ctx, path: &str, span: Range<usize>) -> bool {
    let ok = !path.is_empty() && !path.starts_with('/') && !path.split('/').any(|p| p == "..");
    if !ok {
        ctx.error(
            "E012",
            span,
            format!("directory `{path}` must be relative to the mount point"),
        )
        .hint("write the path inside the filesystem, e.g. `\"NVWORK\"`");
    }
    ok
}
