//! The coordinator model: etcd v3 semantics reduced to what understudy uses.
//!
//! A global revision bumped by every write; keys with create and mod
//! revisions and an optional lease; leases that expire at *coordinator* time
//! `last keep-alive received + ttl`, deleting their keys in one revision.

use std::collections::BTreeMap;

use understudy_core::agent::{ClusterView, GroupAdmin, NodeAdmin, NodeRecord, OwnerRecord};
use understudy_core::observed::{Failure, Observed};
use understudy_core::spec::ClusterSpec;

/// A key of the model. Real shells spell these `nodes/<n>`, `owner/<g>`,
/// `admin/...`, `failures/<g>` under the cluster's prefix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Node(String),
    Owner(String),
    Failures(String),
    ClusterAdmin,
    NodeAdmin(String),
    GroupAdmin(String),
}

/// A key's value, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Node(NodeRecord),
    /// The owner node's name; the token is the key's create revision.
    Owner(String),
    Failures(Vec<Failure>),
    Maintenance(bool),
    NodeAdmin(NodeAdmin),
    GroupAdmin(GroupAdmin),
}

/// What a write fenced by a group's token did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced {
    /// The owner key still had the token; the write changed the key.
    Written,
    /// The owner key still had the token; there was nothing to change
    /// (a retried write that had landed).
    Unchanged,
    /// The owner key is gone or has another create revision: refused.
    FenceLost,
}

#[derive(Clone, Debug)]
struct Kv {
    value: Value,
    create: i64,
    lease: Option<i64>,
}

/// The in-memory coordinator.
#[derive(Clone, Debug)]
pub struct Coord {
    revision: i64,
    next_lease: i64,
    ttl_ms: u64,
    keys: BTreeMap<Key, Kv>,
    /// Lease id → expiry (virtual ms, the coordinator's clock).
    leases: BTreeMap<i64, u64>,
}

impl Coord {
    pub fn new(ttl_ms: u64) -> Coord {
        Coord {
            revision: 1,
            next_lease: 100,
            ttl_ms,
            keys: BTreeMap::new(),
            leases: BTreeMap::new(),
        }
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    fn put(&mut self, key: Key, value: Value, lease: Option<i64>) -> i64 {
        self.revision += 1;
        let rev = self.revision;
        let create = self.keys.get(&key).map_or(rev, |kv| kv.create);
        self.keys.insert(key, Kv { value, create, lease });
        create
    }

    /// Grants a lease and registers `node` with it (`OpenSession`).
    pub fn open_session(&mut self, node: &str, now: u64) -> i64 {
        self.next_lease += 1;
        let lease = self.next_lease;
        self.leases.insert(lease, now + self.ttl_ms);
        self.put(Key::Node(node.into()), Value::Node(NodeRecord::default()), Some(lease));
        lease
    }

    /// A keep-alive received at `now`; false when the lease is gone.
    pub fn keep_alive(&mut self, lease: i64, now: u64) -> bool {
        match self.leases.get_mut(&lease) {
            Some(expiry) => {
                *expiry = now + self.ttl_ms;
                true
            }
            None => false,
        }
    }

    /// When `lease` expires, if it exists.
    pub fn expiry(&self, lease: i64) -> Option<u64> {
        self.leases.get(&lease).copied()
    }

    /// Deletes `lease` and its keys (one revision); true when keys were deleted.
    pub fn revoke(&mut self, lease: i64) -> bool {
        if self.leases.remove(&lease).is_none() {
            return false;
        }
        let before = self.keys.len();
        self.keys.retain(|_, kv| kv.lease != Some(lease));
        if self.keys.len() == before {
            return false;
        }
        self.revision += 1;
        true
    }

    /// (Re-)registers `node` under `lease` if the lease exists; true when written.
    pub fn register(&mut self, node: &str, lease: i64, leaving: bool) -> bool {
        if !self.leases.contains_key(&lease) {
            return false;
        }
        self.put(
            Key::Node(node.into()),
            Value::Node(NodeRecord {
                leaving,
                ..NodeRecord::default()
            }),
            Some(lease),
        );
        true
    }

    /// The lease `node`'s registration is attached to.
    pub fn node_lease(&self, node: &str) -> Option<i64> {
        self.keys.get(&Key::Node(node.into())).and_then(|kv| kv.lease)
    }

    /// Expires `lease` if its time has come; true when keys were deleted.
    pub fn expire_if_due(&mut self, lease: i64, now: u64) -> bool {
        match self.leases.get(&lease) {
            Some(&expiry) if expiry <= now => self.revoke(lease),
            _ => false,
        }
    }

    /// Creates `owner/<group>` attached to `lease` if absent; the create
    /// revision (fencing token) when created.
    pub fn campaign(&mut self, group: &str, node: &str, lease: i64) -> Option<i64> {
        let key = Key::Owner(group.into());
        if self.keys.contains_key(&key) || !self.leases.contains_key(&lease) {
            return None;
        }
        Some(self.put(key, Value::Owner(node.into()), Some(lease)))
    }

    /// Deletes `owner/<group>` if its create revision is `token`.
    pub fn resign(&mut self, group: &str, token: i64) -> bool {
        let key = Key::Owner(group.into());
        if self.keys.get(&key).is_some_and(|kv| kv.create == token) {
            self.keys.remove(&key);
            self.revision += 1;
            true
        } else {
            false
        }
    }

    /// Whether `owner/<group>` still has create revision `token`: the fence
    /// of every write made on behalf of the group (one transaction with the
    /// write, like the real coordinators' `put_fenced`).
    pub fn fence_holds(&self, group: &str, token: i64) -> bool {
        self.keys
            .get(&Key::Owner(group.into()))
            .is_some_and(|kv| kv.create == token)
    }

    /// Appends a failure on behalf of the owner holding `token`: refused
    /// once the owner key has another token; idempotent by the failure's id
    /// (a retried append that had landed is not counted twice).
    pub fn record_failure(&mut self, group: &str, failure: Failure, token: i64) -> Fenced {
        if !self.fence_holds(group, token) {
            return Fenced::FenceLost;
        }
        let key = Key::Failures(group.into());
        let mut list = match self.keys.get(&key) {
            Some(Kv {
                value: Value::Failures(l),
                ..
            }) => l.clone(),
            _ => Vec::new(),
        };
        if list.iter().any(|f| f.id == failure.id) {
            return Fenced::Unchanged;
        }
        list.push(failure);
        self.put(key, Value::Failures(list), None);
        Fenced::Written
    }

    /// The failures recorded for `group`.
    pub fn failures(&self, group: &str) -> &[Failure] {
        match self.keys.get(&Key::Failures(group.into())) {
            Some(Kv {
                value: Value::Failures(l),
                ..
            }) => l,
            _ => &[],
        }
    }

    pub fn group_admin(&self, group: &str) -> GroupAdmin {
        match self.keys.get(&Key::GroupAdmin(group.into())) {
            Some(Kv {
                value: Value::GroupAdmin(a),
                ..
            }) => a.clone(),
            _ => GroupAdmin::default(),
        }
    }

    pub fn node_admin(&self, node: &str) -> NodeAdmin {
        match self.keys.get(&Key::NodeAdmin(node.into())) {
            Some(Kv {
                value: Value::NodeAdmin(a),
                ..
            }) => a.clone(),
            _ => NodeAdmin::default(),
        }
    }

    /// Writes a group's admin record if it changes; true when written.
    pub fn set_group_admin(&mut self, group: &str, admin: GroupAdmin) -> bool {
        if self.group_admin(group) == admin {
            return false;
        }
        self.put(Key::GroupAdmin(group.into()), Value::GroupAdmin(admin), None);
        true
    }

    /// Writes a node's admin record if it changes; true when written.
    pub fn set_node_admin(&mut self, node: &str, admin: NodeAdmin) -> bool {
        if self.node_admin(node) == admin {
            return false;
        }
        self.put(Key::NodeAdmin(node.into()), Value::NodeAdmin(admin), None);
        true
    }

    pub fn cluster_maintenance(&self) -> bool {
        matches!(
            self.keys.get(&Key::ClusterAdmin),
            Some(Kv {
                value: Value::Maintenance(true),
                ..
            })
        )
    }

    pub fn set_cluster_maintenance(&mut self, on: bool) -> bool {
        if self.cluster_maintenance() == on {
            return false;
        }
        self.put(Key::ClusterAdmin, Value::Maintenance(on), None);
        true
    }

    /// Clears the group's move request if it names `node`.
    pub fn clear_move(&mut self, group: &str, node: &str) -> bool {
        let mut admin = self.group_admin(group);
        if admin.move_to.as_deref() != Some(node) {
            return false;
        }
        admin.move_to = None;
        self.set_group_admin(group, admin)
    }

    /// Marks the node's registration as leaving if it is attached to
    /// `lease` (a transaction comparing the key's lease).
    pub fn set_leaving(&mut self, node: &str, lease: i64) -> bool {
        let key = Key::Node(node.into());
        let Some(kv) = self.keys.get(&key) else { return false };
        if kv.lease != Some(lease) || matches!(&kv.value, Value::Node(r) if r.leaving) {
            return false;
        }
        self.put(
            key,
            Value::Node(NodeRecord {
                leaving: true,
                ..NodeRecord::default()
            }),
            Some(lease),
        );
        true
    }

    /// The owner key of `group`: node and token.
    pub fn owner(&self, group: &str) -> Option<(&str, i64)> {
        match self.keys.get(&Key::Owner(group.into())) {
            Some(Kv {
                value: Value::Owner(node),
                create,
                ..
            }) => Some((node.as_str(), *create)),
            _ => None,
        }
    }

    /// Whether `node` is registered.
    pub fn registered(&self, node: &str) -> Option<&NodeRecord> {
        match self.keys.get(&Key::Node(node.into())) {
            Some(Kv {
                value: Value::Node(r), ..
            }) => Some(r),
            _ => None,
        }
    }

    /// What a watcher sees.
    pub fn view(&self) -> ClusterView {
        let mut view = ClusterView {
            revision: self.revision,
            ..ClusterView::default()
        };
        for (key, kv) in &self.keys {
            match (key, &kv.value) {
                (Key::Node(n), Value::Node(r)) => {
                    view.nodes.insert(n.clone(), r.clone());
                }
                (Key::Owner(g), Value::Owner(n)) => {
                    view.owners.insert(
                        g.clone(),
                        OwnerRecord {
                            node: n.clone(),
                            token: kv.create,
                        },
                    );
                }
                (Key::Failures(g), Value::Failures(l)) => {
                    view.failures.insert(g.clone(), l.clone());
                }
                (Key::ClusterAdmin, Value::Maintenance(m)) => view.maintenance = *m,
                (Key::NodeAdmin(n), Value::NodeAdmin(a)) => {
                    view.node_admin.insert(n.clone(), a.clone());
                }
                (Key::GroupAdmin(g), Value::GroupAdmin(a)) => {
                    view.group_admin.insert(g.clone(), a.clone());
                }
                _ => {}
            }
        }
        view
    }

    /// The planner's input built from the coordinator's true state, the
    /// way an agent builds it from its view (registered nodes are alive;
    /// leaving or standby nodes are standby).
    pub fn observed(&self, spec: &ClusterSpec) -> Observed {
        Observed::from_view(spec, &self.view())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_keys_are_fenced_by_create_revision_and_die_with_their_lease() {
        let mut c = Coord::new(2_000);
        let l1 = c.open_session("node1", 0);
        let l2 = c.open_session("node2", 0);
        let token = c.campaign("g", "node1", l1).unwrap_or_default();
        assert!(token > 0);
        assert_eq!(c.campaign("g", "node2", l2), None, "create-if-absent");
        assert!(!c.resign("g", token + 1), "wrong token");
        assert!(c.keep_alive(l1, 1_500));
        assert!(!c.expire_if_due(l1, 3_000), "renewed at 1.5 s: lives until 3.5 s");
        assert!(c.expire_if_due(l1, 3_500));
        assert_eq!(c.owner("g"), None, "the owner key went with the lease");
        assert!(c.registered("node1").is_none());
        assert!(!c.keep_alive(l1, 3_600));
        let again = c.campaign("g", "node2", l2).unwrap_or_default();
        assert!(again > token, "a later owner has a larger token");
    }

    #[test]
    fn failure_records_are_fenced_by_the_token_and_count_once() {
        let mut c = Coord::new(2_000);
        let l1 = c.open_session("node1", 0);
        let token = c.campaign("g", "node1", l1).unwrap_or_default();
        let failure = Failure {
            id: format!("node1:{token}:1"),
            node: "node1".into(),
            at: understudy_core::time::Time(5),
            resource: None,
        };
        assert_eq!(c.record_failure("g", failure.clone(), token), Fenced::Written);
        assert_eq!(
            c.record_failure("g", failure.clone(), token),
            Fenced::Unchanged,
            "a retried record counts once"
        );
        assert_eq!(c.failures("g").len(), 1);
        assert!(c.resign("g", token));
        let l2 = c.open_session("node2", 0);
        let successor = c.campaign("g", "node2", l2).unwrap_or_default();
        let late = Failure {
            id: format!("node1:{token}:2"),
            ..failure
        };
        assert_eq!(
            c.record_failure("g", late.clone(), token),
            Fenced::FenceLost,
            "a stale owner's record is refused"
        );
        assert_eq!(c.record_failure("g", late, token + 1_000), Fenced::FenceLost);
        assert!(c.fence_holds("g", successor));
        assert_eq!(c.failures("g").len(), 1);
    }
}
