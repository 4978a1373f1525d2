//! Where the cluster keeps its state in the coordinator, and how the agent
//! and the CLI read it back into a `ClusterView`.
//!
//! ```text
//! {prefix}nodes/{node}          NodeRecord    attached to the node's session lease
//! {prefix}owner/{group}         OwnerValue    attached to the owner's session lease;
//!                                             its create revision is the fencing token
//! {prefix}status/{node}         NodeStatus    attached to the node's session lease
//! {prefix}admin/cluster         ClusterAdmin  written by operators
//! {prefix}admin/nodes/{node}    NodeAdmin     written by operators
//! {prefix}admin/groups/{group}  GroupAdmin    written by operators, move_to cleared by the new owner
//! {prefix}failures/{group}      [Failure]     appended by owners (compare-and-swap)
//!
//! {base}/sync/{cluster}/{res}     replicated copy of a `sync` resource
//! {base}/journal/{cluster}/…      journal records (etcd; the embedded backend
//!                                 has a table of its own). Kept outside
//!                                 {prefix} so agents watching the cluster's
//!                                 state do not receive every journal record.
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use understudy_coord::KeyValue;
use understudy_core::agent::{ClusterView, GroupAdmin, NodeAdmin, NodeRecord, OwnerRecord};
use understudy_core::observed::Failure;

/// Key names for one cluster.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
    journal: String,
    sync: String,
}

/// What a key is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Node(String),
    Owner(String),
    Status(String),
    AdminCluster,
    AdminNode(String),
    AdminGroup(String),
    Failures(String),
}

/// The value of an owner key (the token is the key's create revision).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerValue {
    pub node: String,
}

/// Cluster-wide operator settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterAdmin {
    #[serde(default)]
    pub maintenance: bool,
}

impl Keys {
    /// Keys under `{base}/{cluster}/`; `base` is `/understudy` unless the
    /// definition says otherwise.
    pub fn new(base: &str, cluster: &str) -> Keys {
        let base = base.trim_end_matches('/');
        Keys {
            prefix: format!("{base}/{cluster}/"),
            journal: format!("{base}/journal/{cluster}/"),
            sync: format!("{base}/sync/{cluster}/"),
        }
    }

    /// Prefix of the cluster's state (what agents watch).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The replicated copy of a `sync` resource, outside `prefix()` (only the
    /// owner reads and writes it; nobody needs to watch it).
    pub fn sync(&self, resource: &str) -> String {
        format!("{}{resource}", self.sync)
    }

    /// Prefix of the cluster's journal records, outside `prefix()`.
    pub fn journal_prefix(&self) -> &str {
        &self.journal
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }

    pub fn owner(&self, group: &str) -> String {
        format!("{}owner/{group}", self.prefix)
    }

    pub fn status(&self, node: &str) -> String {
        format!("{}status/{node}", self.prefix)
    }

    pub fn admin_cluster(&self) -> String {
        format!("{}admin/cluster", self.prefix)
    }

    pub fn admin_node(&self, node: &str) -> String {
        format!("{}admin/nodes/{node}", self.prefix)
    }

    pub fn admin_group(&self, group: &str) -> String {
        format!("{}admin/groups/{group}", self.prefix)
    }

    pub fn failures(&self, group: &str) -> String {
        format!("{}failures/{group}", self.prefix)
    }

    pub fn kind(&self, key: &str) -> Option<KeyKind> {
        let rest = key.strip_prefix(&self.prefix)?;
        let (head, name) = rest.rsplit_once('/').unwrap_or((rest, ""));
        Some(match (head, name) {
            ("nodes", n) => KeyKind::Node(n.to_string()),
            ("owner", g) => KeyKind::Owner(g.to_string()),
            ("status", n) => KeyKind::Status(n.to_string()),
            ("admin", "cluster") => KeyKind::AdminCluster,
            ("admin/nodes", n) => KeyKind::AdminNode(n.to_string()),
            ("admin/groups", g) => KeyKind::AdminGroup(g.to_string()),
            ("failures", g) => KeyKind::Failures(g.to_string()),
            _ => return None,
        })
    }
}

/// The cluster view a set of keys describes. Values that do not parse are
/// skipped (and reported by the caller's logging through `bad`).
pub fn build_view(keys: &Keys, kvs: &BTreeMap<String, KeyValue>, revision: i64, bad: &mut Vec<String>) -> ClusterView {
    let mut view = ClusterView {
        revision,
        ..ClusterView::default()
    };
    for (key, kv) in kvs {
        let Some(kind) = keys.kind(key) else { continue };
        let ok = match kind {
            KeyKind::Node(n) => serde_json::from_slice::<NodeRecord>(&kv.value)
                .map(|r| {
                    view.nodes.insert(n, r);
                })
                .is_ok(),
            KeyKind::Owner(g) => serde_json::from_slice::<OwnerValue>(&kv.value)
                .map(|o| {
                    view.owners.insert(
                        g,
                        OwnerRecord {
                            node: o.node,
                            token: kv.create_revision,
                        },
                    );
                })
                .is_ok(),
            KeyKind::AdminCluster => serde_json::from_slice::<ClusterAdmin>(&kv.value)
                .map(|a| view.maintenance = a.maintenance)
                .is_ok(),
            KeyKind::AdminNode(n) => serde_json::from_slice::<NodeAdmin>(&kv.value)
                .map(|a| {
                    view.node_admin.insert(n, a);
                })
                .is_ok(),
            KeyKind::AdminGroup(g) => serde_json::from_slice::<GroupAdmin>(&kv.value)
                .map(|a| {
                    view.group_admin.insert(g, a);
                })
                .is_ok(),
            KeyKind::Failures(g) => serde_json::from_slice::<Vec<Failure>>(&kv.value)
                .map(|f| {
                    view.failures.insert(g, f);
                })
                .is_ok(),
            KeyKind::Status(_) => true,
        };
        if !ok {
            bad.push(key.clone());
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_kind() {
        let k = Keys::new("/understudy", "demo");
        assert_eq!(k.kind(&k.node("node1")), Some(KeyKind::Node("node1".into())));
        assert_eq!(k.kind(&k.owner("web")), Some(KeyKind::Owner("web".into())));
        assert_eq!(k.kind(&k.admin_cluster()), Some(KeyKind::AdminCluster));
        assert_eq!(k.kind(&k.admin_node("n")), Some(KeyKind::AdminNode("n".into())));
        assert_eq!(k.kind(&k.admin_group("g")), Some(KeyKind::AdminGroup("g".into())));
        assert_eq!(k.kind(&k.failures("g")), Some(KeyKind::Failures("g".into())));
        assert_eq!(k.kind("/understudy/other/nodes/x"), None);
    }

    #[test]
    fn the_owner_token_is_the_create_revision() {
        let k = Keys::new("/understudy", "demo");
        let mut kvs = BTreeMap::new();
        kvs.insert(
            k.owner("web"),
            KeyValue {
                key: k.owner("web"),
                value: br#"{"node":"node2"}"#.to_vec(),
                create_revision: 17,
                mod_revision: 19,
                lease: Some(3),
            },
        );
        kvs.insert(
            k.node("node9"),
            KeyValue {
                key: k.node("node9"),
                value: b"not json".to_vec(),
                create_revision: 1,
                mod_revision: 1,
                lease: None,
            },
        );
        let mut bad = Vec::new();
        let view = build_view(&k, &kvs, 20, &mut bad);
        assert_eq!(
            view.owners["web"],
            OwnerRecord {
                node: "node2".into(),
                token: 17
            }
        );
        assert_eq!(bad, [k.node("node9")]);
        assert_eq!(view.revision, 20);
    }
}
