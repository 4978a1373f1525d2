//! Which store a node belongs to, and waiting for it at start-up.
//!
//! The first time an agent joins an embedded store it records the store's id
//! in its state directory (`store-id`). Later starts join only a store with
//! that id: a store that was deleted and re-created (or replaced by another
//! file) knows nothing of the leases and fencing tokens of the old one, whose
//! owners may still run their groups, so joining it could run a group twice.
//! `--join-new-store` overrides this once the operator has stopped the old
//! cluster.
//!
//! An agent whose coordinator cannot be opened, or is not its store, does not
//! exit (under systemd that is a crash loop that hides the cause): it logs
//! why and tries again with a backoff, until it can join or is told to stop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::context::{Cluster, Definition};

/// The first wait between attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where a node records the id of the store it is a member of.
pub fn store_id_file(state_dir: &Path) -> PathBuf {
    state_dir.join("store-id")
}

/// Opens the definition's coordinator and checks it is this node's store,
/// retrying with a backoff until it is. `None` when SIGTERM or SIGINT came
/// while waiting.
pub async fn wait_for_store(def: &Definition, state_dir: &Path, join_new_store: bool) -> Result<Option<Cluster>> {
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let why = match def.connect().await {
            Ok(cluster) => match check_member(&cluster, state_dir, join_new_store) {
                Ok(()) => return Ok(Some(cluster)),
                Err(why) => why,
            },
            Err(e) => format!("{e:#}"),
        };
        tracing::error!(
            "cannot join cluster `{}`: {why}; trying again in {backoff:?}",
            def.spec.name
        );
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = term.recv() => return Ok(None),
            _ = int.recv() => return Ok(None),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Is `cluster`'s store the one this node belongs to? Records it when the
/// node belongs to none yet (or `join_new_store`).
fn check_member(cluster: &Cluster, state_dir: &Path, join_new_store: bool) -> Result<(), String> {
    let Some(id) = cluster.store_id.as_deref() else {
        return Ok(()); // etcd: its own cluster id is out of our hands
    };
    let file = store_id_file(state_dir);
    let known = match std::fs::read_to_string(&file) {
        Ok(text) => Some(text.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
    };
    match known {
        Some(known) if known == id => return Ok(()),
        Some(known) if !join_new_store => {
            return Err(format!(
                "this node was a member of the store with id {known}, but {} now holds another store (id {id}): \
                 the store was deleted, replaced or re-created. Joining it could start groups the old store's \
                 owners still run. Put the original store back, or stop every agent of the cluster and start \
                 this one with --join-new-store",
                cluster.coordinator_desc
            ));
        }
        Some(known) => tracing::warn!(
            was = known,
            now = id,
            "joining another store than this node's, as --join-new-store says"
        ),
        None => tracing::info!(store = id, "joining the store for the first time"),
    }
    let tmp = state_dir.join(".store-id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))
        .and_then(|()| std::fs::rename(&tmp, &file))
        .map_err(|e| format!("cannot record the store id in {}: {e}", file.display()))
}
