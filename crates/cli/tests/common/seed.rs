//! The seed manual's start and stop tables (display names, in each table's
//! order), shared by the planner-level profile tests and the end-to-end run.

#![allow(dead_code)]

/// §2.2.6 (start order of ESMPRO/ServerManager).
pub const ESMPRO_START: [&str; 8] = [
    "ESM Base Service",
    "ESM Alert Service",
    "Alert Manager Socket(R) Service",
    "Dmi Event Watcher",
    "ESM Command Service",
    "ESM Remote Map Service",
    "ESMPRO/SM Trap Redirection",
    "ESMPRO/SM Base Service",
];

/// §2.2.7 (stop order of ESMPRO/ServerManager).
pub const ESMPRO_STOP: [&str; 8] = [
    "ESMPRO/SM Base Service",
    "ESMPRO/SM Trap Redirection",
    "ESM Remote Map Service",
    "ESM Command Service",
    "Dmi Event Watcher",
    "Alert Manager Socket(R) Service",
    "ESM Alert Service",
    "ESM Base Service",
];

/// §2.3.1 / §2.3.4 / §2.3.5 (the 12 DeploymentManager services).
pub const DPM_SERVICES: [&str; 12] = [
    "DeploymentManager API Service",
    "DeploymentManager Backup/Restore Management",
    "DeploymentManager Client Management",
    "DeploymentManager client start",
    "DeploymentManager Control Service",
    "DeploymentManager Get Client Information",
    "DeploymentManager PXE Management",
    "DeploymentManager PXE Mtftp",
    "DeploymentManager Remote Update Service",
    "DeploymentManager Scenario Management",
    "DeploymentManager Schedule Management",
    "DeploymentManager Transfer Management",
];

/// §2.4.5 and §2.4.6.
pub const HPUX_START: [&str; 3] = [
    "DeploymentManager (HP-UX)",
    "DeploymentManager (HP-UX) Constructor",
    "DeploymentManager (HP-UX) Watcher",
];
pub const HPUX_STOP: [&str; 3] = [
    "DeploymentManager (HP-UX) Watcher",
    "DeploymentManager (HP-UX) Constructor",
    "DeploymentManager (HP-UX)",
];

/// §2.5.5 / §2.5.6: the database is SystemProvisioning's SSCCMDB instance.
pub const PVM_START: [&str; 2] = ["SQL Server (SSCCMDB)", "PVMService"];
pub const PVM_STOP: [&str; 2] = ["PVMService", "SQL Server (SSCCMDB)"];

/// §2.6.5 / §2.6.6: same instance.
pub const SYSMON_START: [&str; 2] = ["SQL Server (SSCCMDB)", "System Monitor Performance Monitoring Service"];
pub const SYSMON_STOP: [&str; 2] = ["System Monitor Performance Monitoring Service", "SQL Server (SSCCMDB)"];
