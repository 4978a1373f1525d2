//! Unit tests of the agent's decisions, event by event.

use std::time::Duration;

use super::*;
use crate::testkit;

/// Drives one agent by hand.
struct Harness {
    agent: Agent,
    mono: u64,
}

impl Harness {
    fn new(spec: ClusterSpec, node: &str) -> Harness {
        Harness {
            agent: Agent::new(spec, node),
            mono: 1_000,
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: Time(self.mono),
            wall: Time(1_000_000 + self.mono),
        }
    }

    fn advance(&mut self, ms: u64) -> Vec<Action> {
        self.mono += ms;
        self.step(Event::Tick)
    }

    fn step(&mut self, event: Event) -> Vec<Action> {
        let now = self.now();
        self.agent.handle(now, event);
        std::iter::from_fn(|| self.agent.poll_action()).collect()
    }

    /// Opens a session with `lease` (sent now) and shows a view where the
    /// given nodes are registered and `owners` hold groups.
    fn boot(&mut self, lease: i64, registered: &[&str], owners: &[(&str, &str, i64)]) -> Vec<Action> {
        let first = self.step(Event::Tick);
        assert!(first.contains(&Action::OpenSession), "{first:?}");
        let mut out = self.step(Event::SessionOpened {
            lease,
            sent_at: Time(self.mono),
        });
        out.extend(self.step(Event::View(view(10, registered, owners))));
        out
    }
}

fn view(revision: i64, registered: &[&str], owners: &[(&str, &str, i64)]) -> ClusterView {
    ClusterView {
        revision,
        nodes: registered
            .iter()
            .map(|n| (n.to_string(), NodeRecord::default()))
            .collect(),
        owners: owners
            .iter()
            .map(|(g, n, t)| {
                (
                    g.to_string(),
                    OwnerRecord {
                        node: n.to_string(),
                        token: *t,
                    },
                )
            })
            .collect(),
        ..ClusterView::default()
    }
}

/// vip <- db <- app, and web after vip: waves [vip], [db, web], [app].
fn spec() -> ClusterSpec {
    let mut spec = testkit::cluster(2);
    let mut g = testkit::group(&spec, "mgmt");
    g.resources = vec![
        testkit::process("vip", &[]),
        testkit::process("db", &["vip"]),
        testkit::process("web", &["vip"]),
        testkit::process("app", &["db"]),
    ];
    spec.groups.push(g);
    spec
}

fn starts(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { resource, .. } => Some(resource.clone()),
            _ => None,
        })
        .collect()
}

fn stops(actions: &[Action]) -> Vec<(String, bool)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop { resource, urgent, .. } => Some((resource.clone(), *urgent)),
            _ => None,
        })
        .collect()
}

fn journal_kinds(actions: &[Action]) -> Vec<EntryKind> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Journal(e) => Some(e.kind),
            _ => None,
        })
        .collect()
}

fn ok(resource: &str, op: Op) -> Event {
    Event::OpDone {
        resource: resource.into(),
        op,
        result: Ok(()),
    }
}

/// Boots node1, wins `mgmt` with token 42 and starts everything.
fn running_owner() -> Harness {
    let mut h = Harness::new(spec(), "node1");
    h.boot(7, &["node1", "node2"], &[]);
    h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 7,
        won: Some(42),
    });
    h.step(Event::View(view(42, &["node1", "node2"], &[("mgmt", "node1", 42)])));
    for r in ["vip", "db", "web", "app"] {
        h.step(ok(r, Op::Start));
    }
    assert_eq!(h.agent.resource_state("app"), Some(ResState::Running));
    h
}

#[test]
fn campaigns_only_when_it_is_the_target_and_nobody_owns_the_group() {
    let mut h = Harness::new(spec(), "node1");
    let out = h.boot(7, &["node1", "node2"], &[]);
    assert!(out.contains(&Action::Campaign {
        group: "mgmt".into(),
        lease: 7
    }));
    assert!(starts(&out).is_empty(), "nothing starts before the campaign is won");

    let mut other = Harness::new(spec(), "node2");
    let out = other.boot(8, &["node1", "node2"], &[]);
    assert!(
        !out.iter().any(|a| matches!(a, Action::Campaign { .. })),
        "node2 is not the preferred node: {out:?}"
    );

    let mut h = Harness::new(spec(), "node2");
    let out = h.boot(9, &["node2"], &[("mgmt", "node1", 3)]);
    assert!(
        !out.iter().any(|a| matches!(a, Action::Campaign { .. })),
        "someone owns it: no campaign"
    );
}

#[test]
fn starts_wave_by_wave_with_authority() {
    let mut h = Harness::new(spec(), "node1");
    h.boot(7, &["node1", "node2"], &[]);
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 7,
        won: Some(42),
    });
    assert_eq!(starts(&out), ["vip"]);
    let Some(Action::Start { authority, .. }) = out.iter().find(|a| matches!(a, Action::Start { .. })) else {
        unreachable!()
    };
    let authority = authority.expect("a group start carries its authority");
    assert_eq!((authority.lease, authority.token), (7, 42));
    let out = h.step(ok("vip", Op::Start));
    assert_eq!(starts(&out), ["db", "web"], "one wave, in parallel");
    let out = h.step(ok("db", Op::Start));
    assert_eq!(starts(&out), ["app"], "app only needs db");
    let out = h.step(ok("app", Op::Start));
    assert!(starts(&out).is_empty());
    assert!(
        !journal_kinds(&out).contains(&EntryKind::GroupStarted),
        "web is still starting"
    );
    let out = h.step(ok("web", Op::Start));
    assert!(journal_kinds(&out).contains(&EntryKind::GroupStarted));
}

#[test]
fn fences_itself_when_no_renewal_is_acknowledged_before_the_deadline() {
    let mut h = running_owner();
    // lease_ttl 2 s, fence_margin 500 ms: deadline 1.5 s after the grant was sent.
    let out = h.advance(500);
    assert!(out.contains(&Action::Renew { lease: 7 }));
    h.step(Event::RenewFailed { lease: 7 });
    let out = h.advance(900);
    assert!(stops(&out).is_empty(), "not yet: {out:?}");
    let out = h.advance(100);
    assert!(journal_kinds(&out).contains(&EntryKind::Fenced), "{out:?}");
    let stopped = stops(&out);
    assert!(
        !stopped.is_empty() && stopped.iter().all(|(_, urgent)| *urgent),
        "{stopped:?}"
    );
    assert_eq!(stopped.len(), 4, "every resource is stopped at once: {stopped:?}");
    assert!(out.contains(&Action::OpenSession), "a new session is requested");
    assert!(h.agent.authority("mgmt", h.now().mono).is_none());
}

#[test]
fn a_renewal_moves_the_deadline_from_its_send_time() {
    let mut h = running_owner();
    let out = h.advance(500);
    assert!(out.contains(&Action::Renew { lease: 7 }));
    let sent = h.mono;
    h.advance(300);
    h.step(Event::Renewed {
        lease: 7,
        sent_at: Time(sent),
    });
    let authority = h.agent.authority("mgmt", h.now().mono).unwrap();
    assert_eq!(
        authority.valid_until,
        Time(sent + 1_500),
        "deadline = sent + ttl - margin"
    );
    // A stale renewal of another lease changes nothing.
    h.step(Event::Renewed {
        lease: 99,
        sent_at: Time(h.mono),
    });
    assert_eq!(
        h.agent.authority("mgmt", h.now().mono).unwrap().valid_until,
        Time(sent + 1_500)
    );
}

#[test]
fn the_guard_is_armed_half_a_margin_after_the_deadline() {
    let mut h = Harness::new(spec(), "node1");
    h.step(Event::Tick);
    let out = h.step(Event::SessionOpened {
        lease: 7,
        sent_at: Time(1_000),
    });
    assert!(out.contains(&Action::ArmGuard { deadline: Time(2_750) }), "{out:?}");
}

#[test]
fn restarts_a_failed_resource_with_its_dependents_then_fails_over_past_the_limit() {
    let mut h = running_owner();
    let out = h.advance(1_000);
    let Some(Action::Monitor { epoch, .. }) = out
        .iter()
        .find(|a| matches!(a, Action::Monitor { resource, .. } if resource == "db"))
    else {
        panic!("db is monitored: {out:?}")
    };
    let epoch = *epoch;
    h.step(Event::Renewed {
        lease: 7,
        sent_at: Time(h.mono),
    });
    let out = h.step(Event::MonitorDone {
        resource: "db".into(),
        epoch,
        health: Health::Failed("exited with status 1".into()),
    });
    assert!(journal_kinds(&out).contains(&EntryKind::Restarting));
    assert_eq!(stops(&out), [("app".to_string(), false)], "dependents stop first");
    let out = h.step(ok("app", Op::Stop));
    assert_eq!(stops(&out), [("db".to_string(), false)]);
    let out = h.step(ok("db", Op::Stop));
    assert_eq!(starts(&out), ["db"]);
    let out = h.step(ok("db", Op::Start));
    assert_eq!(starts(&out), ["app"]);
    h.step(ok("app", Op::Start));

    // A stale result about the old instance is ignored.
    let out = h.step(Event::MonitorDone {
        resource: "db".into(),
        epoch,
        health: Health::Failed("old".into()),
    });
    assert!(stops(&out).is_empty());

    // Two restarts allowed within the window; the third failure fails over.
    let mut failover = Vec::new();
    for round in 0..2 {
        let out = h.advance(1_000);
        h.step(Event::Renewed {
            lease: 7,
            sent_at: Time(h.mono),
        });
        let epoch = out
            .iter()
            .find_map(|a| match a {
                Action::Monitor { resource, epoch, .. } if resource == "db" => Some(*epoch),
                _ => None,
            })
            .unwrap_or_else(|| panic!("round {round}: db monitored: {out:?}"));
        failover = h.step(Event::MonitorDone {
            resource: "db".into(),
            epoch,
            health: Health::Failed("exited".into()),
        });
        if round == 0 {
            for (r, op) in [
                ("app", Op::Stop),
                ("db", Op::Stop),
                ("db", Op::Start),
                ("app", Op::Start),
            ] {
                h.step(ok(r, op));
            }
        }
    }
    assert!(
        journal_kinds(&failover).contains(&EntryKind::FailingOver),
        "{failover:?}"
    );
    assert!(
        failover.iter().any(
            |a| matches!(a, Action::RecordFailure { group, failure } if group == "mgmt" && failure.node == "node1")
        )
    );
    // Orderly stop, dependents first (app and web have none), then resign.
    let mut first = stops(&failover);
    first.sort();
    assert_eq!(first, [("app".to_string(), false), ("web".to_string(), false)]);
    let out = h.step(ok("app", Op::Stop));
    assert_eq!(stops(&out), [("db".to_string(), false)]);
    let out = h.step(ok("web", Op::Stop));
    assert!(stops(&out).is_empty(), "vip waits for db: {out:?}");
    let out = h.step(ok("db", Op::Stop));
    assert_eq!(stops(&out), [("vip".to_string(), false)]);
    let out = h.step(ok("vip", Op::Stop));
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 42
    }));
    let out = h.step(Event::Resigned {
        group: "mgmt".into(),
        ok: true,
    });
    assert!(
        !out.iter().any(|a| matches!(a, Action::Campaign { .. })),
        "the failed node does not take the group back: {out:?}"
    );
}

#[test]
fn ownership_lost_in_the_view_stops_everything_at_once() {
    let mut h = running_owner();
    let out = h.step(Event::View(view(50, &["node1", "node2"], &[("mgmt", "node2", 50)])));
    assert!(journal_kinds(&out).contains(&EntryKind::OwnershipLost));
    let stopped = stops(&out);
    assert_eq!(stopped.len(), 4);
    assert!(stopped.iter().all(|(_, urgent)| *urgent));
}

#[test]
fn a_campaign_won_under_a_replaced_lease_is_given_back() {
    let mut h = Harness::new(spec(), "node1");
    h.boot(7, &["node1", "node2"], &[]);
    // The session is lost and a new one opened before the result arrives.
    h.step(Event::SessionLost { lease: 7 });
    h.step(Event::SessionOpened {
        lease: 8,
        sent_at: Time(h.mono),
    });
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 7,
        won: Some(42),
    });
    assert!(starts(&out).is_empty(), "{out:?}");
    assert!(h.agent.holds().is_empty());
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 42
    }));
}

#[test]
fn releases_ownership_left_by_an_earlier_run() {
    let mut h = Harness::new(spec(), "node1");
    let out = h.boot(7, &["node1", "node2"], &[("mgmt", "node1", 5)]);
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 5
    }));
    assert!(starts(&out).is_empty());
}

#[test]
fn maintenance_reports_monitor_failures_without_acting() {
    let mut h = running_owner();
    let mut v = view(60, &["node1", "node2"], &[("mgmt", "node1", 42)]);
    v.maintenance = true;
    h.step(Event::View(v));
    let out = h.advance(1_000);
    let epoch = out
        .iter()
        .find_map(|a| match a {
            Action::Monitor { resource, epoch, .. } if resource == "db" => Some(*epoch),
            _ => None,
        })
        .expect("monitors keep running in maintenance");
    h.step(Event::Renewed {
        lease: 7,
        sent_at: Time(h.mono),
    });
    let out = h.step(Event::MonitorDone {
        resource: "db".into(),
        epoch,
        health: Health::Failed("dead".into()),
    });
    assert!(journal_kinds(&out).contains(&EntryKind::MonitorFailed));
    assert!(stops(&out).is_empty() && starts(&out).is_empty(), "{out:?}");
    assert!(!out.iter().any(|a| matches!(a, Action::RecordFailure { .. })));
}

#[test]
fn shutdown_moves_groups_away_and_exits() {
    let mut h = running_owner();
    let out = h.step(Event::Shutdown);
    assert!(out.contains(&Action::SetLeaving));
    let mut first = stops(&out);
    first.sort();
    assert_eq!(first, [("app".to_string(), false), ("web".to_string(), false)]);
    for r in ["app", "db", "web"] {
        h.step(ok(r, Op::Stop));
    }
    let out = h.step(ok("vip", Op::Stop));
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 42
    }));
    let out = h.step(Event::Resigned {
        group: "mgmt".into(),
        ok: true,
    });
    assert!(out.contains(&Action::Exit));
    assert!(h.agent.exited());
}

#[test]
fn clones_run_without_ownership_and_group_members_wait_for_them() {
    let mut spec = testkit::cluster(2);
    let mut g = testkit::group(&spec, "mgmt");
    g.resources = vec![
        testkit::clone_process("tomcat", &[]),
        testkit::process("app", &["tomcat"]),
    ];
    spec.groups.push(g);
    let mut h = Harness::new(spec.clone(), "node2");
    let out = h.boot(3, &["node1", "node2"], &[("mgmt", "node1", 9)]);
    assert_eq!(starts(&out), ["tomcat"], "the clone runs on the standby too");
    let Some(Action::Start { authority, .. }) = out.iter().find(|a| matches!(a, Action::Start { .. })) else {
        unreachable!()
    };
    assert!(authority.is_none());

    let mut h = Harness::new(spec, "node1");
    h.boot(4, &["node1", "node2"], &[]);
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 4,
        won: Some(11),
    });
    assert!(starts(&out).is_empty(), "app waits for the local clone: {out:?}");
    let out = h.step(ok("tomcat", Op::Start));
    assert_eq!(starts(&out), ["app"]);
}

#[test]
fn monitor_only_resources_are_checked_on_the_owner_and_never_started() {
    let mut spec = testkit::cluster(2);
    let mut g = testkit::group(&spec, "mgmt");
    g.resources = vec![testkit::process("app", &[]), testkit::monitor_only("snmptrap")];
    spec.groups.push(g);
    let mut h = Harness::new(spec, "node1");
    h.boot(4, &["node1", "node2"], &[]);
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 4,
        won: Some(11),
    });
    assert_eq!(starts(&out), ["app"]);
    h.step(Event::View(view(11, &["node1", "node2"], &[("mgmt", "node1", 11)])));
    h.step(ok("app", Op::Start));
    let out = h.advance(1_000);
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Monitor { resource, .. } if resource == "snmptrap")),
        "{out:?}"
    );
    assert_eq!(Duration::from_secs(1), Duration::from_millis(1_000));
}
