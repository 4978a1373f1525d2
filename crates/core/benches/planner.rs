//! Planner benchmark: a generated cluster of 32 nodes, 500 groups and 10,000
//! resources (issue goal: one full plan under 50 ms on a 2-core machine).
//!
//! Run: `cargo bench -p understudy-core --bench planner`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use understudy_core::observed::{Failure, NodeState};
use understudy_core::spec::{ClusterSpec, Failback, FailoverPolicy, GroupSpec, NodeSpec, ResourceSpec, Role, Settings};
use understudy_core::testkit;
use understudy_core::{Observed, Time, plan};

const NODES: usize = 32;
const GROUPS: usize = 500;
const PER_GROUP: usize = 20;

/// A small deterministic generator (no external randomness in benchmarks).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

fn resource(name: String, depends_on: Vec<String>, role: Role) -> ResourceSpec {
    let deps: Vec<&str> = depends_on.iter().map(String::as_str).collect();
    ResourceSpec {
        role,
        ..testkit::process(&name, &deps)
    }
}

fn generate() -> (ClusterSpec, Observed) {
    let mut rng = Lcg(42);
    let nodes: Vec<NodeSpec> = (0..NODES)
        .map(|i| NodeSpec {
            name: format!("node{i:02}"),
            address: format!("10.213.{}.{}/16", i / 200, i % 200 + 1).parse().unwrap(),
            priority: 100,
            other_addresses: Vec::new(),
        })
        .collect();
    let mut groups = Vec::with_capacity(GROUPS);
    for g in 0..GROUPS {
        let mut resources = Vec::with_capacity(PER_GROUP);
        for r in 0..PER_GROUP {
            let mut deps = Vec::new();
            if r > 0 {
                for _ in 0..rng.next(3) {
                    deps.push(format!("g{g}-r{}", rng.next(r)));
                }
            }
            let role = if r == PER_GROUP - 1 && g % 10 == 0 {
                Role::MonitorOnly
            } else {
                Role::Managed
            };
            resources.push(resource(
                format!("g{g}-r{r}"),
                if role == Role::Managed { deps } else { Vec::new() },
                role,
            ));
        }
        let preferred: Vec<String> = (0..3).map(|k| nodes[(g + k * 7) % NODES].name.clone()).collect();
        groups.push(GroupSpec {
            name: format!("g{g}"),
            description: None,
            nodes: preferred,
            failback: if g % 2 == 0 { Failback::Manual } else { Failback::Auto },
            failover: FailoverPolicy::default(),
            colocate_with: if g % 50 == 1 {
                vec![format!("g{}", g - 1)]
            } else {
                Vec::new()
            },
            resources,
        });
    }
    let spec = ClusterSpec {
        name: "bench".into(),
        description: None,
        settings: Settings::default(),
        nodes,
        groups,
    };
    let mut observed = Observed::all_up(&spec);
    for i in (0..NODES).step_by(5) {
        observed.nodes.insert(spec.nodes[i].name.clone(), NodeState::Down);
    }
    for (i, g) in spec.groups.iter().enumerate() {
        let state = observed.group_mut(&g.name);
        state.owner = Some(g.nodes[i % 3].clone());
        if i % 7 == 0 {
            state.failures.push(Failure {
                id: format!("bench:{i}"),
                node: g.nodes[1].clone(),
                at: Time(1_000),
                resource: None,
            });
        }
    }
    (spec, observed)
}

fn bench(c: &mut Criterion) {
    let (spec, observed) = generate();
    let resources: usize = spec.groups.iter().map(|g| g.resources.len()).sum();
    assert_eq!(resources, GROUPS * PER_GROUP);
    let p = plan(&spec, &observed, Time(60_000));
    assert_eq!(p.groups.len(), GROUPS);
    assert!(p.groups.iter().all(|g| !g.start_waves.is_empty()));
    let mut group = c.benchmark_group("planner");
    group.sample_size(30);
    group.bench_function("plan 32 nodes, 500 groups, 10000 resources", |b| {
        b.iter(|| plan(black_box(&spec), black_box(&observed), Time(60_000)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
