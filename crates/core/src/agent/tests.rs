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

/// The id of the failure the actions record.
fn failure_id(actions: &[Action]) -> String {
    actions
        .iter()
        .find_map(|a| match a {
            Action::RecordFailure { failure, .. } => Some(failure.id.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no failure recorded: {actions:?}"))
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
            |a| matches!(a, Action::RecordFailure { group, failure, token: 42 } if group == "mgmt" && failure.node == "node1")
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
    assert!(
        !out.iter().any(|a| matches!(a, Action::Resign { .. })),
        "the failure record is fenced by the key: it lands first: {out:?}"
    );
    let out = h.step(Event::FailureRecorded {
        group: "mgmt".into(),
        id: failure_id(&failover),
        landed: true,
    });
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
fn clones_keep_running_through_a_session_loss() {
    let mut spec = testkit::cluster(2);
    let mut g = testkit::group(&spec, "mgmt");
    g.resources = vec![testkit::clone_process("tomcat", &[])];
    spec.groups.push(g);
    let mut h = Harness::new(spec, "node2");
    let out = h.boot(3, &["node1", "node2"], &[]);
    assert_eq!(starts(&out), ["tomcat"]);
    h.step(ok("tomcat", Op::Start));
    // No renewal is acknowledged: the deadline passes and the node fences.
    h.advance(500);
    h.step(Event::RenewFailed { lease: 3 });
    let out = h.advance(1_000);
    assert!(journal_kinds(&out).contains(&EntryKind::SessionLost), "{out:?}");
    // The view drops this node's registration when its lease expires.
    let out = h.step(Event::View(view(20, &["node1"], &[])));
    assert!(stops(&out).is_empty(), "a clone needs no lease: {out:?}");
    assert_eq!(h.agent.resource_state("tomcat"), Some(ResState::Running));
    // Shutting down still stops it.
    let out = h.step(Event::Shutdown);
    assert_eq!(stops(&out), [("tomcat".to_string(), false)]);
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

// Regression tests for bugs found by `understudy-sim` (the seed numbers are
// those of the simulator as it was when the bug was found; the simulator has
// grown since, so they do not replay the same run any more).

/// Simulator seed 2: the plan flipped back to this node while its resign
/// was in flight, and it started the group again; the resign then deleted
/// the key and another node started the group too.
#[test]
fn a_group_being_resigned_is_not_started_again() {
    let mut h = Harness::new(spec(), "node1");
    h.boot(7, &["node1", "node2"], &[]);
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 7,
        won: Some(42),
    });
    assert_eq!(starts(&out), ["vip"]);
    // The operator moves the group to node2: vip stops, the key is resigned.
    let mut moved = view(42, &["node1", "node2"], &[("mgmt", "node1", 42)]);
    moved.group_admin.insert(
        "mgmt".into(),
        GroupAdmin {
            move_to: Some("node2".into()),
            ..GroupAdmin::default()
        },
    );
    h.step(Event::View(moved));
    let out = h.step(ok("vip", Op::Start));
    assert_eq!(stops(&out), [("vip".to_string(), false)]);
    let out = h.step(ok("vip", Op::Stop));
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 42
    }));
    // The move request is withdrawn: the plan says node1 again, but the
    // key is on its way out.
    let out = h.step(Event::View(view(43, &["node1", "node2"], &[("mgmt", "node1", 42)])));
    assert!(starts(&out).is_empty(), "{out:?}");
    // The resign timed out; it may have taken effect: retry after a short
    // backoff (half a renewal interval), start nothing.
    let out = h.step(Event::Resigned {
        group: "mgmt".into(),
        ok: false,
    });
    assert!(starts(&out).is_empty(), "{out:?}");
    assert!(
        !out.iter().any(|a| matches!(a, Action::Resign { .. })),
        "no retry at once: {out:?}"
    );
    assert_eq!(h.agent.poll_timeout(), Some(Time(h.mono + 250)));
    let out = h.advance(250);
    assert!(starts(&out).is_empty(), "{out:?}");
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 42
    }));
    let out = h.step(Event::Resigned {
        group: "mgmt".into(),
        ok: true,
    });
    assert!(starts(&out).is_empty(), "{out:?}");
    assert!(h.agent.holds().is_empty());
}

/// Simulator seed 33: a monitor result that arrived after its resource was
/// stopped left a due time on it that no monitor would ever clear, and
/// `poll_timeout` kept returning that past instant (a busy loop).
#[test]
fn no_wake_up_for_monitors_of_stopped_resources() {
    let mut h = running_owner();
    let out = h.advance(1_000);
    let epoch = out
        .iter()
        .find_map(|a| match a {
            Action::Monitor { resource, epoch, .. } if resource == "app" => Some(*epoch),
            _ => None,
        })
        .expect("app is monitored");
    // Ownership is lost while the monitor runs: everything stops at once.
    let out = h.step(Event::View(view(50, &["node1", "node2"], &[("mgmt", "node2", 50)])));
    assert_eq!(stops(&out).len(), 4);
    for r in ["vip", "db", "web", "app"] {
        h.step(ok(r, Op::Stop));
    }
    h.step(Event::Renewed {
        lease: 7,
        sent_at: Time(h.mono),
    });
    // The monitor's (stale) result arrives after the stop.
    h.step(Event::MonitorDone {
        resource: "app".into(),
        epoch,
        health: Health::Running,
    });
    h.advance(1_100);
    let next = h.agent.poll_timeout();
    assert!(next.is_none_or(|t| t > h.now().mono), "{next:?} at {:?}", h.now().mono);
    // A restart waiting for its dependents does not wake the agent either.
    let mut h = running_owner();
    let out = h.advance(1_000);
    let epoch = out
        .iter()
        .find_map(|a| match a {
            Action::Monitor { resource, epoch, .. } if resource == "db" => Some(*epoch),
            _ => None,
        })
        .expect("db is monitored");
    h.step(Event::Renewed {
        lease: 7,
        sent_at: Time(h.mono),
    });
    let out = h.step(Event::MonitorDone {
        resource: "db".into(),
        epoch,
        health: Health::Failed("dead".into()),
    });
    assert_eq!(stops(&out), [("app".to_string(), false)], "db waits for app to stop");
    // app takes long to stop; db's next check would be due meanwhile.
    h.advance(1_200);
    let next = h.agent.poll_timeout();
    assert!(next.is_none_or(|t| t > h.now().mono), "{next:?} at {:?}", h.now().mono);
}

/// Simulator seed 146: a clone died and was marked for restart together
/// with the group member depending on it; the member was stopped and then
/// started again at once, while the dead clone still counted as running
/// (and the clone, with its dependent back up, never restarted).
#[test]
fn a_dependent_waits_for_its_dependency_to_restart() {
    let mut spec = testkit::cluster(2);
    let mut g = testkit::group(&spec, "mgmt");
    g.resources = vec![
        testkit::clone_process("tomcat", &[]),
        testkit::process("app", &["tomcat"]),
    ];
    spec.groups.push(g);
    let mut h = Harness::new(spec, "node1");
    h.boot(4, &["node1", "node2"], &[]);
    h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 4,
        won: Some(11),
    });
    h.step(Event::View(view(11, &["node1", "node2"], &[("mgmt", "node1", 11)])));
    let out = h.step(ok("tomcat", Op::Start));
    assert_eq!(starts(&out), ["app"]);
    h.step(ok("app", Op::Start));
    let out = h.advance(1_000);
    let epoch = out
        .iter()
        .find_map(|a| match a {
            Action::Monitor { resource, epoch, .. } if resource == "tomcat" => Some(*epoch),
            _ => None,
        })
        .expect("tomcat is monitored");
    h.step(Event::Renewed {
        lease: 4,
        sent_at: Time(h.mono),
    });
    let out = h.step(Event::MonitorDone {
        resource: "tomcat".into(),
        epoch,
        health: Health::Failed("exited".into()),
    });
    assert_eq!(stops(&out), [("app".to_string(), false)], "the dependent stops first");
    let out = h.step(ok("app", Op::Stop));
    assert!(starts(&out).is_empty(), "app waits for tomcat's restart: {out:?}");
    assert_eq!(stops(&out), [("tomcat".to_string(), false)]);
    let out = h.step(ok("tomcat", Op::Stop));
    assert_eq!(starts(&out), ["tomcat"]);
    let out = h.step(ok("tomcat", Op::Start));
    assert_eq!(starts(&out), ["app"]);
}

/// Simulator seed 1433: fenced while a start was still running, the agent
/// opened a new session and (1) re-armed the guard with the new session's
/// deadline, so the guard no longer killed the starting process before the
/// old lease expired, and (2) released its old owner key at once, as if
/// left by an earlier run, while that process was still alive.
#[test]
fn after_fencing_a_busy_resource_keeps_the_guard_and_the_key() {
    let mut h = Harness::new(spec(), "node1");
    h.boot(7, &["node1", "node2"], &[]);
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 7,
        won: Some(42),
    });
    assert_eq!(starts(&out), ["vip"]);
    h.step(Event::View(view(42, &["node1", "node2"], &[("mgmt", "node1", 42)])));
    // No renewal is acknowledged; vip is still starting at the deadline.
    let out = h.advance(1_500);
    assert!(journal_kinds(&out).contains(&EntryKind::Fenced), "{out:?}");
    assert!(out.contains(&Action::OpenSession));
    let out = h.step(Event::SessionOpened {
        lease: 8,
        sent_at: Time(h.mono),
    });
    assert!(
        !out.iter().any(|a| matches!(a, Action::ArmGuard { .. })),
        "the guard must still kill vip at the old deadline: {out:?}"
    );
    assert!(!out.iter().any(|a| matches!(a, Action::Resign { .. })), "{out:?}");
    // The old key (on the old lease, not expired yet) is not released
    // while vip may still run.
    let out = h.step(Event::View(view(43, &["node1", "node2"], &[("mgmt", "node1", 42)])));
    assert!(!out.iter().any(|a| matches!(a, Action::Resign { .. })), "{out:?}");
    let out = h.step(ok("vip", Op::Start));
    assert_eq!(stops(&out), [("vip".to_string(), true)]);
    // Once vip is down, the guard follows the new session (before anything
    // can start under it) and the old key is released.
    let out = h.step(ok("vip", Op::Stop));
    assert!(out.contains(&Action::ArmGuard { deadline: Time(4_250) }), "{out:?}");
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 42
    }));
}

/// Simulator seed 1511: an orderly stop of a clone failed; the agent meant
/// to force it but stopped it orderly again, and on the second failure
/// gave it up as "failed even when forced".
#[test]
fn a_clone_whose_orderly_stop_failed_is_stopped_by_force() {
    let mut spec = testkit::cluster(2);
    let mut g = testkit::group(&spec, "mgmt");
    g.resources = vec![testkit::clone_process("tomcat", &[]), testkit::process("app", &[])];
    spec.groups.push(g);
    let mut h = Harness::new(spec, "node2");
    let out = h.boot(3, &["node1", "node2"], &[("mgmt", "node1", 9)]);
    assert_eq!(starts(&out), ["tomcat"]);
    h.step(ok("tomcat", Op::Start));
    let out = h.step(Event::Shutdown);
    assert_eq!(stops(&out), [("tomcat".to_string(), false)]);
    let out = h.step(Event::OpDone {
        resource: "tomcat".into(),
        op: Op::Stop,
        result: Err("still running after stop_timeout".into()),
    });
    assert_eq!(stops(&out), [("tomcat".to_string(), true)], "{out:?}");
    let out = h.step(ok("tomcat", Op::Stop));
    assert!(out.contains(&Action::Exit), "{out:?}");
}

/// Simulator seed 95: a clone was given up on a standby node; later the
/// group that needs it failed over to that node, where its member waited
/// for the clone forever.
#[test]
fn a_group_placed_where_its_clone_was_given_up_fails_over() {
    let mut spec = testkit::cluster(2);
    let mut g = testkit::group(&spec, "mgmt");
    let mut tomcat = testkit::clone_process("tomcat", &[]);
    if let Some(m) = &mut tomcat.monitor {
        m.on_fail = OnFail::Failover;
    }
    // app needs tomcat through a second clone: giving up tomcat is enough.
    g.resources = vec![
        tomcat,
        testkit::clone_process("ajp", &["tomcat"]),
        testkit::process("app", &["ajp"]),
    ];
    spec.groups.push(g);
    let mut h = Harness::new(spec, "node2");
    let out = h.boot(3, &["node1", "node2"], &[("mgmt", "node1", 9)]);
    assert_eq!(starts(&out), ["tomcat"]);
    let out = h.step(ok("tomcat", Op::Start));
    assert_eq!(starts(&out), ["ajp"]);
    h.step(ok("ajp", Op::Start));
    let out = h.advance(1_000);
    let epoch = out
        .iter()
        .find_map(|a| match a {
            Action::Monitor { resource, epoch, .. } if resource == "tomcat" => Some(*epoch),
            _ => None,
        })
        .expect("tomcat is monitored");
    h.step(Event::Renewed {
        lease: 3,
        sent_at: Time(h.mono),
    });
    let out = h.step(Event::MonitorDone {
        resource: "tomcat".into(),
        epoch,
        health: Health::Failed("exited".into()),
    });
    assert!(journal_kinds(&out).contains(&EntryKind::GaveUp), "{out:?}");
    assert_eq!(stops(&out), [("ajp".to_string(), false)]);
    let out = h.step(ok("ajp", Op::Stop));
    assert_eq!(stops(&out), [("tomcat".to_string(), false)]);
    h.step(ok("tomcat", Op::Stop));
    // node1 is gone; the group comes here once node2's join window (one
    // lease TTL after its session opened) is over.
    let out = h.step(Event::View(view(20, &["node2"], &[])));
    assert!(!out.iter().any(|a| matches!(a, Action::Campaign { .. })), "{out:?}");
    h.step(Event::Renewed {
        lease: 3,
        sent_at: Time(h.mono),
    });
    let out = h.advance(1_000);
    assert!(out.contains(&Action::Campaign {
        group: "mgmt".into(),
        lease: 3
    }));
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 3,
        won: Some(21),
    });
    assert!(
        out.iter().any(
            |a| matches!(a, Action::RecordFailure { group, failure, token: 21 } if group == "mgmt" && failure.node == "node2")
        ),
        "{out:?}"
    );
    let out = h.step(Event::FailureRecorded {
        group: "mgmt".into(),
        id: failure_id(&out),
        landed: true,
    });
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 21
    }));
    assert!(starts(&out).is_empty());
}

/// Simulator seed 2348: a clone's check failed during maintenance (no
/// action taken); right after maintenance the group came here and its
/// member started on the dead clone.
#[test]
fn a_dependency_whose_check_failed_in_maintenance_does_not_count_as_running() {
    let mut spec = testkit::cluster(2);
    let mut g = testkit::group(&spec, "mgmt");
    g.resources = vec![
        testkit::clone_process("tomcat", &[]),
        testkit::process("app", &["tomcat"]),
    ];
    spec.groups.push(g);
    let mut h = Harness::new(spec, "node1");
    h.boot(3, &["node1", "node2"], &[("mgmt", "node2", 9)]);
    h.step(ok("tomcat", Op::Start));
    let mut frozen = view(12, &["node1", "node2"], &[("mgmt", "node2", 9)]);
    frozen.maintenance = true;
    h.step(Event::View(frozen));
    let monitor = |out: &[Action]| {
        out.iter()
            .find_map(|a| match a {
                Action::Monitor { resource, epoch, .. } if resource == "tomcat" => Some(*epoch),
                _ => None,
            })
            .expect("tomcat is monitored")
    };
    let epoch = monitor(&h.advance(1_000));
    h.step(Event::Renewed {
        lease: 3,
        sent_at: Time(h.mono),
    });
    let out = h.step(Event::MonitorDone {
        resource: "tomcat".into(),
        epoch,
        health: Health::Failed("exited".into()),
    });
    assert!(stops(&out).is_empty(), "maintenance: no action");
    // Maintenance ends and node2 is gone: the group comes here.
    h.step(Event::View(view(13, &["node1"], &[])));
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 3,
        won: Some(14),
    });
    assert!(starts(&out).is_empty(), "tomcat's last check failed: {out:?}");
    // The next check still fails: tomcat restarts, then app starts.
    let epoch = monitor(&h.advance(1_000));
    h.step(Event::Renewed {
        lease: 3,
        sent_at: Time(h.mono),
    });
    let out = h.step(Event::MonitorDone {
        resource: "tomcat".into(),
        epoch,
        health: Health::Failed("exited".into()),
    });
    assert_eq!(stops(&out), [("tomcat".to_string(), false)], "{out:?}");
    let out = h.step(ok("tomcat", Op::Stop));
    assert_eq!(starts(&out), ["tomcat"]);
    let out = h.step(ok("tomcat", Op::Start));
    assert_eq!(starts(&out), ["app"]);
}

/// Simulator seed 3339: an optional member of one group was given up while
/// a member of a co-located group depending on it restarted; the dependent
/// started again while the optional member was still stopping.
#[test]
fn a_dependent_waits_for_a_given_up_optional_member_to_stop() {
    let mut spec = testkit::cluster(2);
    let mut a = testkit::group(&spec, "base");
    let mut cache = testkit::process("cache", &[]);
    cache.optional = true;
    if let Some(m) = &mut cache.monitor {
        m.restarts = 0;
    }
    a.resources = vec![cache];
    let mut b = testkit::group(&spec, "web");
    b.colocate_with = vec!["base".into()];
    b.resources = vec![testkit::process("app", &["cache"])];
    spec.groups.push(a);
    spec.groups.push(b);
    let mut h = Harness::new(spec, "node1");
    h.boot(5, &["node1", "node2"], &[]);
    for (group, token) in [("base", 20), ("web", 21)] {
        h.step(Event::CampaignResult {
            group: group.into(),
            lease: 5,
            won: Some(token),
        });
    }
    h.step(Event::View(view(
        21,
        &["node1", "node2"],
        &[("base", "node1", 20), ("web", "node1", 21)],
    )));
    let out = h.step(ok("cache", Op::Start));
    assert_eq!(starts(&out), ["app"]);
    h.step(ok("app", Op::Start));
    let out = h.advance(1_000);
    let epoch = out
        .iter()
        .find_map(|a| match a {
            Action::Monitor { resource, epoch, .. } if resource == "cache" => Some(*epoch),
            _ => None,
        })
        .expect("cache is monitored");
    h.step(Event::Renewed {
        lease: 5,
        sent_at: Time(h.mono),
    });
    let out = h.step(Event::MonitorDone {
        resource: "cache".into(),
        epoch,
        health: Health::Failed("exited".into()),
    });
    assert!(journal_kinds(&out).contains(&EntryKind::GaveUp), "{out:?}");
    assert_eq!(stops(&out), [("app".to_string(), false)]);
    let out = h.step(ok("app", Op::Stop));
    assert_eq!(stops(&out), [("cache".to_string(), false)]);
    assert!(starts(&out).is_empty(), "cache is still stopping: {out:?}");
    let out = h.step(ok("cache", Op::Stop));
    assert_eq!(starts(&out), ["app"], "app runs without the optional member");
}

/// Simulator seed 1243: ownership was lost while orderly stops were in
/// flight; when those failed, the agent took them for failed forced stops
/// and gave the resources up ("needs an operator") without forcing them.
#[test]
fn an_orderly_stop_that_fails_is_forced_even_if_ownership_was_lost_meanwhile() {
    let mut h = running_owner();
    let mut moved = view(50, &["node1", "node2"], &[("mgmt", "node1", 42)]);
    moved.group_admin.insert(
        "mgmt".into(),
        GroupAdmin {
            move_to: Some("node2".into()),
            ..GroupAdmin::default()
        },
    );
    let out = h.step(Event::View(moved));
    let mut first = stops(&out);
    first.sort();
    assert_eq!(first, [("app".to_string(), false), ("web".to_string(), false)]);
    // The key disappears while those stops run.
    let out = h.step(Event::View(view(51, &["node1", "node2"], &[])));
    assert!(journal_kinds(&out).contains(&EntryKind::OwnershipLost));
    let out = h.step(Event::OpDone {
        resource: "app".into(),
        op: Op::Stop,
        result: Err("timed out".into()),
    });
    assert!(stops(&out).contains(&("app".to_string(), true)), "{out:?}");
    assert_ne!(h.agent.resource_state("app"), Some(ResState::StopFailed));
}

/// Simulator seed 104617 (60 s fault phase): like seed 95, but the member
/// needing the given-up clone was optional; it waited for the clone
/// forever, and so did the member depending on it.
#[test]
fn an_optional_member_needing_a_given_up_clone_is_skipped() {
    let mut spec = testkit::cluster(2);
    let mut g = testkit::group(&spec, "mgmt");
    let mut tomcat = testkit::clone_process("tomcat", &[]);
    if let Some(m) = &mut tomcat.monitor {
        m.on_fail = OnFail::Failover;
    }
    let mut plugin = testkit::process("plugin", &["tomcat"]);
    plugin.optional = true;
    g.resources = vec![tomcat, plugin, testkit::process("app", &["plugin"])];
    spec.groups.push(g);
    let mut h = Harness::new(spec, "node2");
    h.boot(3, &["node1", "node2"], &[("mgmt", "node1", 9)]);
    h.step(ok("tomcat", Op::Start));
    let out = h.advance(1_000);
    let epoch = out
        .iter()
        .find_map(|a| match a {
            Action::Monitor { resource, epoch, .. } if resource == "tomcat" => Some(*epoch),
            _ => None,
        })
        .expect("tomcat is monitored");
    h.step(Event::Renewed {
        lease: 3,
        sent_at: Time(h.mono),
    });
    h.step(Event::MonitorDone {
        resource: "tomcat".into(),
        epoch,
        health: Health::Failed("exited".into()),
    });
    h.step(ok("tomcat", Op::Stop));
    h.step(Event::View(view(20, &["node2"], &[])));
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 3,
        won: Some(21),
    });
    assert!(
        !out.iter().any(|a| matches!(a, Action::RecordFailure { .. })),
        "{out:?}"
    );
    assert_eq!(starts(&out), ["app"], "app runs without the optional plugin");
}

/// Simulator seed 104: a clone was given up on the owner; the optional
/// member needing it, still running, was skipped, and skipped members did
/// not count as running dependents, so the clone was stopped first.
#[test]
fn a_running_skipped_member_still_holds_its_dependencies() {
    let mut spec = testkit::cluster(2);
    let mut g = testkit::group(&spec, "mgmt");
    let mut tomcat = testkit::clone_process("tomcat", &[]);
    if let Some(m) = &mut tomcat.monitor {
        m.on_fail = OnFail::Failover;
    }
    let mut plugin = testkit::process("plugin", &["tomcat"]);
    plugin.optional = true;
    g.resources = vec![tomcat, plugin, testkit::process("app", &["plugin"])];
    spec.groups.push(g);
    let mut h = Harness::new(spec, "node1");
    h.boot(3, &["node1", "node2"], &[]);
    h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 3,
        won: Some(9),
    });
    h.step(Event::View(view(9, &["node1", "node2"], &[("mgmt", "node1", 9)])));
    let out = h.step(ok("tomcat", Op::Start));
    assert_eq!(starts(&out), ["plugin"]);
    let out = h.step(ok("plugin", Op::Start));
    assert_eq!(starts(&out), ["app"]);
    h.step(ok("app", Op::Start));
    let out = h.advance(1_000);
    let epoch = out
        .iter()
        .find_map(|a| match a {
            Action::Monitor { resource, epoch, .. } if resource == "tomcat" => Some(*epoch),
            _ => None,
        })
        .expect("tomcat is monitored");
    h.step(Event::Renewed {
        lease: 3,
        sent_at: Time(h.mono),
    });
    let out = h.step(Event::MonitorDone {
        resource: "tomcat".into(),
        epoch,
        health: Health::Failed("exited".into()),
    });
    assert_eq!(
        stops(&out),
        [("app".to_string(), false)],
        "app, then plugin, then tomcat: {out:?}"
    );
    let out = h.step(ok("app", Op::Stop));
    assert_eq!(stops(&out), [("plugin".to_string(), false)], "{out:?}");
    let out = h.step(ok("plugin", Op::Stop));
    assert_eq!(stops(&out), [("tomcat".to_string(), false)]);
}

/// Simulator seed 200611 (60 s fault phase): the watch lagged behind; a
/// view from before this node's campaign, showing the previous owner, was
/// taken for a loss of the key just won, and the group was stopped at once.
#[test]
fn a_view_older_than_the_key_is_not_a_loss() {
    let mut h = Harness::new(spec(), "node1");
    // The watch is behind: at revision 10, nobody owns the group.
    h.boot(7, &["node1", "node2"], &[]);
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 7,
        won: Some(42),
    });
    assert!(h.agent.holds().contains(&"mgmt".to_string()));
    assert_eq!(starts(&out), ["vip"]);
    // Meanwhile node2 had owned it (30) and resigned; the lagging watch
    // now delivers that older view.
    let out = h.step(Event::View(view(31, &["node1", "node2"], &[("mgmt", "node2", 30)])));
    assert!(!journal_kinds(&out).contains(&EntryKind::OwnershipLost), "{out:?}");
    assert!(h.agent.holds().contains(&"mgmt".to_string()));
    let out = h.step(ok("vip", Op::Start));
    assert!(stops(&out).is_empty(), "the group stays here: {out:?}");
    assert_eq!(starts(&out), ["db", "web"]);
    // A view at or after our key that does not show it is a loss.
    let out = h.step(Event::View(view(43, &["node1", "node2"], &[("mgmt", "node2", 43)])));
    assert!(journal_kinds(&out).contains(&EntryKind::OwnershipLost), "{out:?}");
}

/// Simulator seed 1002762: the view showed the key gone while this node's
/// own resign of it was in flight; the agent dropped the pending resign,
/// campaigned again and won a new key, and then took the old resign's
/// answer for the new key: it stopped the group but left the key in place,
/// where nobody would ever release it.
#[test]
fn a_resign_in_flight_is_answered_before_campaigning_again() {
    let mut h = running_owner();
    let mut moved = view(50, &["node1", "node2"], &[("mgmt", "node1", 42)]);
    moved.group_admin.insert(
        "mgmt".into(),
        GroupAdmin {
            move_to: Some("node2".into()),
            ..GroupAdmin::default()
        },
    );
    h.step(Event::View(moved.clone()));
    for r in ["app", "web", "db"] {
        h.step(ok(r, Op::Stop));
    }
    let out = h.step(ok("vip", Op::Stop));
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 42
    }));
    // The key is gone and node2 too: the plan says node1 again.
    moved.revision = 51;
    moved.owners.clear();
    moved.nodes.remove("node2");
    let out = h.step(Event::View(moved));
    assert!(
        !out.iter().any(|a| matches!(a, Action::Campaign { .. })),
        "not while the resign is in flight: {out:?}"
    );
    let out = h.step(Event::Resigned {
        group: "mgmt".into(),
        ok: true,
    });
    assert!(out.contains(&Action::Campaign {
        group: "mgmt".into(),
        lease: 7
    }));
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 7,
        won: Some(52),
    });
    assert_eq!(starts(&out), ["vip"]);
    assert!(h.agent.holds().contains(&"mgmt".to_string()));
}

/// Simulator seed 1008711: a campaign made under a lost session was won
/// and given back while the campaign of the new session was in flight;
/// that one won too, and the answer to the give-back's resign was then
/// taken for the new key, which stayed in the coordinator, owned by nobody
/// who would release it.
#[test]
fn the_answer_to_an_older_resign_keeps_the_key_won_since() {
    let mut h = Harness::new(spec(), "node1");
    let out = h.boot(7, &["node1", "node2"], &[]);
    assert!(out.contains(&Action::Campaign {
        group: "mgmt".into(),
        lease: 7
    }));
    // No renewal is acknowledged: the session is fenced with the campaign
    // still in flight, and a new one campaigns again.
    let out = h.advance(1_500);
    assert!(out.contains(&Action::OpenSession), "{out:?}");
    let out = h.step(Event::SessionOpened {
        lease: 8,
        sent_at: Time(h.mono),
    });
    assert!(out.contains(&Action::Campaign {
        group: "mgmt".into(),
        lease: 8
    }));
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 7,
        won: Some(42),
    });
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 42
    }));
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 8,
        won: Some(43),
    });
    assert_eq!(starts(&out), ["vip"]);
    let out = h.step(Event::Resigned {
        group: "mgmt".into(),
        ok: true,
    });
    assert!(h.agent.holds().contains(&"mgmt".to_string()), "{out:?}");
    assert!(stops(&out).is_empty());
    // The key held is still released properly when it is its turn.
    let mut moved = view(50, &["node1", "node2"], &[("mgmt", "node1", 43)]);
    moved.group_admin.insert(
        "mgmt".into(),
        GroupAdmin {
            move_to: Some("node2".into()),
            ..GroupAdmin::default()
        },
    );
    h.step(Event::View(moved));
    let out = h.step(ok("vip", Op::Start));
    assert_eq!(stops(&out), [("vip".to_string(), false)]);
    let out = h.step(ok("vip", Op::Stop));
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 43
    }));
    h.step(Event::Resigned {
        group: "mgmt".into(),
        ok: true,
    });
    assert!(h.agent.holds().is_empty());
}

#[test]
fn an_unreachable_coordinator_is_not_hammered() {
    let mut h = Harness::new(spec(), "node1");
    let out = h.step(Event::Tick);
    assert!(out.contains(&Action::OpenSession));
    let out = h.step(Event::SessionOpenFailed);
    assert!(!out.contains(&Action::OpenSession), "no immediate retry: {out:?}");
    assert_eq!(h.agent.poll_timeout(), Some(Time(h.mono + 500)));
    assert!(!h.advance(499).contains(&Action::OpenSession));
    assert!(h.advance(1).contains(&Action::OpenSession));
}

#[test]
fn a_failing_renewal_is_retried_after_a_pause_not_in_a_loop() {
    // Regression: the retry was scheduled at `min(next_renew, retry)`, and
    // `next_renew` had already passed, so every failure sent the next
    // renewal at once (thousands per second against a refusing coordinator).
    let mut h = running_owner();
    let out = h.advance(500);
    assert!(out.contains(&Action::Renew { lease: 7 }));
    for attempt in 0..3 {
        let out = h.step(Event::RenewFailed { lease: 7 });
        assert!(
            !out.contains(&Action::Renew { lease: 7 }),
            "attempt {attempt}: no immediate retry: {out:?}"
        );
        assert_eq!(
            h.agent.poll_timeout(),
            Some(Time(h.mono + 125)),
            "attempt {attempt}: retried a quarter of the renewal interval later"
        );
        assert!(!h.advance(124).contains(&Action::Renew { lease: 7 }));
        assert!(h.advance(1).contains(&Action::Renew { lease: 7 }));
    }
}

#[test]
fn without_a_fence_guard_the_node_fences_and_stays_out_until_one_runs() {
    let mut h = running_owner();
    let out = h.step(Event::GuardDown {
        reason: "cannot start it".into(),
    });
    assert!(journal_kinds(&out).contains(&EntryKind::GuardLost), "{out:?}");
    let stopped = stops(&out);
    assert_eq!(stopped.len(), 4, "every resource stops at once: {stopped:?}");
    assert!(stopped.iter().all(|(_, urgent)| *urgent));
    assert!(!out.contains(&Action::OpenSession), "no new session without a guard");
    assert!(h.agent.status().guard_down.is_some());
    assert!(!h.advance(5_000).contains(&Action::OpenSession));
    let out = h.step(Event::GuardUp);
    assert!(journal_kinds(&out).contains(&EntryKind::GuardRestarted), "{out:?}");
    assert!(out.contains(&Action::OpenSession), "rejoins once a guard runs: {out:?}");
    assert!(h.agent.status().guard_down.is_none());
}

#[test]
fn a_lost_campaign_is_not_repeated_at_once_against_a_stale_view() {
    let mut h = Harness::new(spec(), "node1");
    h.boot(7, &["node1", "node2"], &[]);
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease: 7,
        won: None,
    });
    assert!(!out.iter().any(|a| matches!(a, Action::Campaign { .. })), "{out:?}");
    let out = h.advance(100);
    assert!(
        out.iter().any(|a| matches!(a, Action::Campaign { .. })),
        "retried after the backoff: {out:?}"
    );
}

#[test]
fn at_start_up_a_group_waits_for_its_preferred_node_to_join() {
    // node2 comes up first and sees no node1: within its join window (one
    // lease TTL) it leaves the group to node1, which may be starting too.
    let mut h = Harness::new(spec(), "node2");
    let out = h.boot(5, &["node2"], &[]);
    assert!(!out.iter().any(|a| matches!(a, Action::Campaign { .. })), "{out:?}");
    // node1 joins and takes it: node2 never campaigns.
    let out = h.step(Event::View(view(11, &["node1", "node2"], &[("mgmt", "node1", 11)])));
    assert!(!out.iter().any(|a| matches!(a, Action::Campaign { .. })));

    // If node1 never comes, node2 takes the group when the window ends.
    let mut h = Harness::new(spec(), "node2");
    h.boot(5, &["node2"], &[]);
    for _ in 0..3 {
        let out = h.advance(500);
        assert!(!out.iter().any(|a| matches!(a, Action::Campaign { .. })), "{out:?}");
        h.step(Event::Renewed {
            lease: 5,
            sent_at: Time(h.mono),
        });
    }
    let out = h.advance(500);
    assert!(
        out.contains(&Action::Campaign {
            group: "mgmt".into(),
            lease: 5
        }),
        "{out:?}"
    );
}

/// Found by the failover benchmark: the wait for a peer to join must end when
/// the peer has joined, not hold the node back until the window closes.
#[test]
fn a_join_window_wait_ends_once_the_preferred_node_has_joined() {
    // node2 boots before node1 registers, and waits; node1 joins and takes
    // the group; then the group is moved to node2 (node1 let it go), still
    // within node2's join window: node2 campaigns at once.
    let mut h = Harness::new(spec(), "node2");
    h.boot(5, &["node2"], &[]);
    h.step(Event::View(view(11, &["node1", "node2"], &[("mgmt", "node1", 11)])));
    let mut moved = view(12, &["node1", "node2"], &[]);
    moved.group_admin.insert(
        "mgmt".into(),
        GroupAdmin {
            move_to: Some("node2".into()),
            ..GroupAdmin::default()
        },
    );
    let out = h.step(Event::View(moved));
    assert!(
        out.contains(&Action::Campaign {
            group: "mgmt".into(),
            lease: 5
        }),
        "{out:?}"
    );
}

/// A failed orderly stop is retried forcefully, but the node still holds its
/// lease: renewals must keep moving the fence guard, or it would fire at the
/// old deadline and take every owned resource away.
#[test]
fn a_forced_retry_while_holding_the_lease_keeps_the_guard_armed() {
    let mut h = running_owner();
    let mut moved = view(50, &["node1", "node2"], &[("mgmt", "node1", 42)]);
    moved.group_admin.insert(
        "mgmt".into(),
        GroupAdmin {
            move_to: Some("node2".into()),
            ..GroupAdmin::default()
        },
    );
    let out = h.step(Event::View(moved));
    assert!(stops(&out).contains(&("app".to_string(), false)), "{out:?}");
    let out = h.step(Event::OpDone {
        resource: "app".into(),
        op: Op::Stop,
        result: Err("still busy".into()),
    });
    assert!(
        stops(&out).contains(&("app".to_string(), true)),
        "retried forcefully: {out:?}"
    );
    // The renewal still counts: the guard follows the new deadline.
    let out = h.advance(500);
    assert!(out.contains(&Action::Renew { lease: 7 }));
    let out = h.step(Event::Renewed {
        lease: 7,
        sent_at: Time(h.mono),
    });
    assert!(
        out.contains(&Action::ArmGuard {
            deadline: Time(h.mono + 1_500 + 250)
        }),
        "the guard is re-armed for the new deadline: {out:?}"
    );
}

/// Boots node1, wins `mgmt` with `token`, and fails vip's start: the group
/// fails over. Returns the failover's actions.
fn failed_start(h: &mut Harness, lease: i64, token: i64) -> Vec<Action> {
    let out = h.step(Event::CampaignResult {
        group: "mgmt".into(),
        lease,
        won: Some(token),
    });
    assert_eq!(starts(&out), ["vip"]);
    h.step(Event::OpDone {
        resource: "vip".into(),
        op: Op::Start,
        result: Err("no such device".into()),
    })
}

#[test]
fn a_failure_is_recorded_under_the_token_and_lands_before_the_key_is_given_back() {
    let mut h = Harness::new(spec(), "node1");
    h.boot(7, &["node1", "node2"], &[]);
    let out = failed_start(&mut h, 7, 42);
    let Some(Action::RecordFailure { group, failure, token }) =
        out.iter().find(|a| matches!(a, Action::RecordFailure { .. }))
    else {
        panic!("no failure recorded: {out:?}")
    };
    assert_eq!((group.as_str(), *token), ("mgmt", 42), "fenced by the held token");
    assert_eq!(failure.node, "node1");
    assert!(!failure.id.is_empty());
    let id = failure.id.clone();
    assert_eq!(
        stops(&out),
        [("vip".to_string(), false)],
        "the failed member is stopped"
    );
    let out = h.step(ok("vip", Op::Stop));
    assert!(
        !out.iter().any(|a| matches!(a, Action::Resign { .. })),
        "the key is kept until the record has landed: {out:?}"
    );
    assert!(
        h.agent.poll_timeout().is_some_and(|t| t <= Time(h.mono + 2_000)),
        "the wait is bounded"
    );
    // A report about another record changes nothing.
    let out = h.step(Event::FailureRecorded {
        group: "mgmt".into(),
        id: format!("{id}-other"),
        landed: true,
    });
    assert!(!out.iter().any(|a| matches!(a, Action::Resign { .. })), "{out:?}");
    let out = h.step(Event::FailureRecorded {
        group: "mgmt".into(),
        id,
        landed: true,
    });
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 42
    }));
}

#[test]
fn a_refused_failure_record_does_not_hold_the_resign_back() {
    let mut h = Harness::new(spec(), "node1");
    h.boot(7, &["node1", "node2"], &[]);
    let out = failed_start(&mut h, 7, 42);
    let id = failure_id(&out);
    h.step(ok("vip", Op::Stop));
    let out = h.step(Event::FailureRecorded {
        group: "mgmt".into(),
        id,
        landed: false,
    });
    assert!(out.contains(&Action::Resign {
        group: "mgmt".into(),
        token: 42
    }));
}

#[test]
fn an_unanswered_failure_record_holds_the_resign_back_for_one_lease_ttl_at_most() {
    let mut h = Harness::new(spec(), "node1");
    h.boot(7, &["node1", "node2"], &[]);
    failed_start(&mut h, 7, 42);
    let out = h.step(ok("vip", Op::Stop));
    assert!(!out.iter().any(|a| matches!(a, Action::Resign { .. })), "{out:?}");
    // Renewals keep the session; the wait ends a lease TTL (2 s) after the failure.
    let mut resigned_at = None;
    for _ in 0..8 {
        let at = h.agent.poll_timeout().expect("a timer");
        let out = h.advance(at.as_millis().saturating_sub(h.mono).max(1));
        h.step(Event::Renewed {
            lease: 7,
            sent_at: Time(h.mono),
        });
        if out.contains(&Action::Resign {
            group: "mgmt".into(),
            token: 42,
        }) {
            resigned_at = Some(h.mono);
            break;
        }
    }
    let resigned_at = resigned_at.expect("resigned after the bounded wait");
    assert!(resigned_at >= 1_000 + 2_000, "resigned at {resigned_at}: too early");
}

#[test]
fn failure_ids_are_unique_across_runs_of_the_agent() {
    let mut h = Harness::new(spec(), "node1");
    h.boot(7, &["node1", "node2"], &[]);
    let first = failure_id(&failed_start(&mut h, 7, 42));
    // The agent restarts (its counter starts again) and wins the group
    // again, under a new token.
    let mut h = Harness::new(spec(), "node1");
    h.boot(9, &["node1", "node2"], &[]);
    let second = failure_id(&failed_start(&mut h, 9, 43));
    assert_ne!(first, second);
}
