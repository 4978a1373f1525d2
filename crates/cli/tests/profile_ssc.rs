//! The seed's management server (profiles/sigmasystemcenter-2.1) planned by
//! understudy must reproduce the seed's start and stop tables.
//!
//! Each table below is copied from the seed manual (display names, in the
//! table's order). "Starts in that order" means each entry is in a strictly
//! later start wave than the one before; the 12 DeploymentManager services
//! have no order among them and must share one wave (S2.3c).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use understudy_core::spec::{ClusterSpec, Role};
use understudy_core::{NodeState, Observed, Plan, Time, plan};

mod common;

use common::seed::{
    DPM_SERVICES, ESMPRO_START, ESMPRO_STOP, HPUX_START, HPUX_STOP, PVM_START, PVM_STOP, SYSMON_START, SYSMON_STOP,
};

const PROFILE: &str = "../../profiles/sigmasystemcenter-2.1/cluster.toml";

fn profile_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(PROFILE)).expect("profile exists")
}

fn load(text: &str) -> ClusterSpec {
    let checked = understudy_config::check(text);
    let errors: Vec<_> = checked.diagnostics.iter().filter(|d| d.is_error()).collect();
    assert!(errors.is_empty(), "profile has errors: {errors:#?}");
    checked.spec.expect("valid profile")
}

fn plan_all_up(spec: &ClusterSpec) -> Plan {
    plan(spec, &Observed::all_up(spec), Time::ZERO)
}

/// The wave (0-based) holding the resource with display name `display`.
fn wave_of(spec: &ClusterSpec, waves: &[Vec<String>], display: &str) -> usize {
    let group = &spec.groups[0];
    let r = group
        .resources
        .iter()
        .find(|r| r.display_name() == display)
        .unwrap_or_else(|| panic!("no resource named {display:?} in the profile"));
    waves
        .iter()
        .position(|w| w.contains(&r.name))
        .unwrap_or_else(|| panic!("{display:?} ({}) is in no wave", r.name))
}

/// Asserts that the table's entries are in strictly increasing waves.
fn assert_in_order(spec: &ClusterSpec, waves: &[Vec<String>], table: &[&str], section: &str) {
    let positions: Vec<usize> = table.iter().map(|d| wave_of(spec, waves, d)).collect();
    for (i, pair) in positions.windows(2).enumerate() {
        assert!(
            pair[0] < pair[1],
            "{section}: {:?} (wave {}) must come before {:?} (wave {}); waves: {waves:#?}",
            table[i],
            pair[0] + 1,
            table[i + 1],
            pair[1] + 1
        );
    }
}

#[test]
fn profile_is_valid_without_warnings() {
    let checked = understudy_config::check(&profile_text());
    assert!(checked.diagnostics.is_empty(), "{:#?}", checked.diagnostics);
    let spec = checked.spec.unwrap();
    assert_eq!(
        spec.groups.len(),
        1,
        "S1.1: one failover group for the whole management server"
    );
}

#[test]
fn esmpro_start_order_is_section_2_2_6() {
    let spec = load(&profile_text());
    let p = plan_all_up(&spec);
    assert_in_order(&spec, &p.groups[0].start_waves, &ESMPRO_START, "§2.2.6");
}

#[test]
fn esmpro_stop_order_is_section_2_2_7() {
    let spec = load(&profile_text());
    let p = plan_all_up(&spec);
    assert_in_order(&spec, &p.groups[0].stop_waves, &ESMPRO_STOP, "§2.2.7");
}

#[test]
fn esm_base_starts_first_and_stops_last_of_esmpro() {
    // S2.2e: ESM Base Service always starts first and stops last.
    let spec = load(&profile_text());
    let g = &plan_all_up(&spec).groups[0];
    let base_start = wave_of(&spec, &g.start_waves, "ESM Base Service");
    let base_stop = wave_of(&spec, &g.stop_waves, "ESM Base Service");
    for svc in ESMPRO_START.iter().skip(1) {
        assert!(
            wave_of(&spec, &g.start_waves, svc) > base_start,
            "{svc} starts after ESM Base"
        );
        assert!(
            wave_of(&spec, &g.stop_waves, svc) < base_stop,
            "{svc} stops before ESM Base"
        );
    }
}

#[test]
fn dpm_services_form_one_wave_after_the_failover_ip() {
    // §2.3.5: no order among the 12, but only once the failover IP is up.
    let spec = load(&profile_text());
    let g = &plan_all_up(&spec).groups[0];
    let waves: Vec<usize> = DPM_SERVICES.iter().map(|d| wave_of(&spec, &g.start_waves, d)).collect();
    assert!(
        waves.iter().all(|&w| w == waves[0]),
        "the 12 services share one wave: {waves:?}"
    );
    let ip = wave_of(&spec, &g.start_waves, "Failover IP");
    assert!(waves[0] > ip, "the DPM wave comes after the failover IP");
    let dpm_wave = &g.start_waves[waves[0]];
    let dpm_names: Vec<&str> = spec.groups[0]
        .resources
        .iter()
        .filter(|r| DPM_SERVICES.contains(&r.display_name()))
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(dpm_names.len(), 12);
    assert!(dpm_names.iter().all(|n| dpm_wave.iter().any(|w| w == n)));
}

#[test]
fn dpm_services_stop_together_in_one_wave() {
    // §2.3.6: they stop in any order.
    let spec = load(&profile_text());
    let g = &plan_all_up(&spec).groups[0];
    let waves: Vec<usize> = DPM_SERVICES.iter().map(|d| wave_of(&spec, &g.stop_waves, d)).collect();
    assert!(waves.iter().all(|&w| w == waves[0]), "{waves:?}");
    assert!(
        waves[0] < wave_of(&spec, &g.stop_waves, "Failover IP"),
        "the IP goes after them"
    );
}

#[test]
fn hpux_orders_are_sections_2_4_5_and_2_4_6() {
    let spec = load(&profile_text());
    let g = &plan_all_up(&spec).groups[0];
    assert_in_order(&spec, &g.start_waves, &HPUX_START, "§2.4.5");
    assert_in_order(&spec, &g.stop_waves, &HPUX_STOP, "§2.4.6");
}

#[test]
fn pvm_and_sysmon_orders_are_sections_2_5_and_2_6() {
    let spec = load(&profile_text());
    let g = &plan_all_up(&spec).groups[0];
    assert_in_order(&spec, &g.start_waves, &PVM_START, "§2.5.5");
    assert_in_order(&spec, &g.stop_waves, &PVM_STOP, "§2.5.6");
    assert_in_order(&spec, &g.start_waves, &SYSMON_START, "§2.6.5");
    assert_in_order(&spec, &g.stop_waves, &SYSMON_STOP, "§2.6.6");
}

#[test]
fn stop_plan_is_the_exact_reverse_of_the_start_plan() {
    // S1.7.
    let spec = load(&profile_text());
    let g = &plan_all_up(&spec).groups[0];
    let reversed: Vec<Vec<String>> = g.start_waves.iter().rev().cloned().collect();
    assert_eq!(g.stop_waves, reversed);
}

#[test]
fn the_two_optional_esmpro_services_can_be_switched_off() {
    // §2.2.6 notes 1 and 2: Dmi Event Watcher and Trap Redirection are not
    // needed when DMI alerts / trap forwarding are not used.
    let text = profile_text();
    let spec = load(&text);
    let optional: Vec<&str> = spec.groups[0]
        .resources
        .iter()
        .filter(|r| r.optional && r.role == Role::Managed)
        .map(|r| r.display_name())
        .collect();
    assert_eq!(optional, ["Dmi Event Watcher", "ESMPRO/SM Trap Redirection"]);

    // What an operator does: add `enabled = false` to those two services.
    let marker = "switch off with `enabled = false`.\noptional = true\n";
    assert_eq!(text.matches(marker).count(), 2);
    let off = text.replace(marker, &format!("{marker}enabled = false\n"));
    let spec_off = load(&off);
    let g = &plan_all_up(&spec_off).groups[0];
    let remaining: Vec<&str> = ESMPRO_START.iter().copied().filter(|d| !optional.contains(d)).collect();
    assert_eq!(remaining.len(), 6);
    assert_in_order(
        &spec_off,
        &g.start_waves,
        &remaining,
        "§2.2.6 without optional services",
    );
    let remaining_stop: Vec<&str> = remaining.iter().rev().copied().collect();
    assert_in_order(
        &spec_off,
        &g.stop_waves,
        &remaining_stop,
        "§2.2.7 without optional services",
    );
    assert_eq!(g.disabled, ["dmi-event-watcher", "esm-trap-redirection"]);
    for w in g.start_waves.iter().chain(&g.stop_waves) {
        assert!(
            !w.iter().any(|n| g.disabled.contains(n)),
            "switched-off services are never started or stopped"
        );
    }
}

#[test]
fn tomcat_and_dhcp_run_on_every_node_and_related_services_are_only_monitored() {
    // S1.2, S1.5.
    let spec = load(&profile_text());
    let p = plan_all_up(&spec);
    for clone in ["tomcat", "dhcp"] {
        let c = p.clones.iter().find(|c| c.resource == clone).unwrap();
        assert_eq!(c.nodes, ["node1", "node2"], "{clone} runs on every node");
        assert!(!p.groups[0].start_waves.iter().flatten().any(|n| n == clone));
    }
    assert_eq!(p.groups[0].monitor_only, ["snmp-trap", "wmi"]);
    assert!(
        !p.groups[0]
            .start_waves
            .iter()
            .flatten()
            .any(|n| n == "snmp-trap" || n == "wmi")
    );
}

#[test]
fn monitors_are_as_the_seed_lists_them() {
    // §2.2.5, §2.3.4: every ESMPRO and DPM service is monitored.
    // §2.4.4: of DeploymentManager (HP-UX) only the Watcher is.
    // §2.5.4, §2.6.4: PVMService, SystemMonitor, and the database, IP and disk.
    let spec = load(&profile_text());
    let g = &spec.groups[0];
    let monitored = |d: &str| {
        g.resources
            .iter()
            .find(|r| r.display_name() == d)
            .unwrap()
            .monitor
            .is_some()
    };
    for d in ESMPRO_START.iter().chain(DPM_SERVICES.iter()) {
        assert!(monitored(d), "{d} is monitored");
    }
    assert!(monitored("DeploymentManager (HP-UX) Watcher"));
    assert!(!monitored("DeploymentManager (HP-UX)"));
    assert!(!monitored("DeploymentManager (HP-UX) Constructor"));
    for d in [
        "PVMService",
        "System Monitor Performance Monitoring Service",
        "SQL Server (SSCCMDB)",
        "SQL Server (DPMDBI)",
        "Failover IP",
        "Shared disk",
    ] {
        assert!(monitored(d), "{d} is monitored");
    }
}

#[test]
fn the_management_server_fails_over_to_node2_in_the_same_order() {
    let spec = load(&profile_text());
    let first = plan_all_up(&spec);
    let mut observed = Observed::all_up(&spec);
    observed.group_mut("ssc").owner = Some("node1".into());
    observed.nodes.insert("node1".into(), NodeState::Down);
    let p = plan(&spec, &observed, Time::ZERO);
    let g = &p.groups[0];
    assert_eq!(g.target.as_deref(), Some("node2"));
    assert_eq!(g.start_waves, first.groups[0].start_waves);
    let tomcat = p.clones.iter().find(|c| c.resource == "tomcat").unwrap();
    assert_eq!(tomcat.nodes, ["node2"]);
}
