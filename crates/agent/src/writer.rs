//! The agent's ordered writes to the coordinator: journal records and the
//! node's published status, one at a time, in the order they were made.
//!
//! A coordinator outage must not erase what happened during it (the stops
//! and the fencing are exactly what an operator will look for). Journal
//! records that cannot be appended are kept, in order, in a bounded buffer
//! (the oldest are dropped beyond [`MAX_PENDING`], and that is said) and
//! appended when the coordinator answers again, with their original times,
//! after a record of the outage itself. A status superseded before it was
//! written is skipped; a failed one is retried until a newer one replaces it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use understudy_coord::Coordinator;
use understudy_core::agent::{Entry, EntryKind};

use crate::JournalRecord;
use crate::clock;

/// How many journal records are kept while the coordinator is unreachable.
pub const MAX_PENDING: usize = 10_000;

/// First and longest pause between attempts while the coordinator fails.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Writes that must reach the coordinator in the order they were made.
pub enum Ordered {
    Journal(Vec<u8>),
    Status { key: String, value: Vec<u8>, lease: i64 },
}

/// The writer's state between attempts.
struct Pending {
    node: String,
    journal: VecDeque<Vec<u8>>,
    status: Option<(String, Vec<u8>, i64)>,
    /// Wall time of the first failure of the current outage.
    outage_since: Option<u64>,
    /// Records dropped during the current outage (the buffer was full).
    dropped: u64,
}

impl Pending {
    fn push(&mut self, w: Ordered) {
        match w {
            Ordered::Journal(r) => {
                if self.journal.len() >= MAX_PENDING {
                    self.journal.pop_front();
                    self.dropped += 1;
                }
                self.journal.push_back(r);
            }
            Ordered::Status { key, value, lease } => self.status = Some((key, value, lease)),
        }
    }

    /// Writes what is pending, in order. `Err` (with the reason) at the
    /// first write the coordinator refuses; what is left stays pending.
    async fn flush(&mut self, coord: &dyn Coordinator) -> Result<(), String> {
        if self.journal.is_empty() && self.status.is_none() {
            return Ok(());
        }
        if let Some(since) = self.outage_since
            && !self.journal.is_empty()
        {
            // The outage itself comes first, at the time it began.
            let record = outage_record(&self.node, since, self.journal.len(), self.dropped);
            coord.append(&record).await.map_err(|e| e.to_string())?;
            self.outage_since = None;
            self.dropped = 0;
        }
        while let Some(r) = self.journal.front() {
            coord.append(r).await.map_err(|e| e.to_string())?;
            self.journal.pop_front();
        }
        if let Some((key, value, lease)) = &self.status {
            match coord.put(key, value, Some(*lease)).await {
                Ok(_) => self.status = None,
                // A status on a lease that is gone is obsolete: the next
                // session publishes its own.
                Err(understudy_coord::CoordError::LeaseNotFound(_)) => self.status = None,
                Err(e) => return Err(e.to_string()),
            }
        }
        self.outage_since = None;
        self.dropped = 0;
        Ok(())
    }
}

fn outage_record(node: &str, since: u64, kept: usize, dropped: u64) -> Vec<u8> {
    let now = clock::wall().as_millis();
    let mut message = format!(
        "the coordinator could not be written for {:.1} s; {kept} records made meanwhile follow, with their own times",
        now.saturating_sub(since) as f64 / 1000.0
    );
    if dropped > 0 {
        message.push_str(&format!(
            " ({dropped} older ones were dropped: at most {MAX_PENDING} are kept)"
        ));
    }
    let record = JournalRecord {
        at: since,
        node: node.to_string(),
        entry: Entry {
            kind: EntryKind::CoordinatorUnreachable,
            group: None,
            resource: None,
            message,
        },
    };
    serde_json::to_vec(&record).unwrap_or_default()
}

/// Carries out the writes until the sender is dropped and everything
/// pending is written (or the caller stops waiting).
pub async fn run(coord: Arc<dyn Coordinator>, node: String, mut rx: UnboundedReceiver<Ordered>) {
    let mut pending = Pending {
        node,
        journal: VecDeque::new(),
        status: None,
        outage_since: None,
        dropped: 0,
    };
    let mut pause = RETRY_FIRST;
    let mut open = true;
    loop {
        if pending.journal.is_empty() && pending.status.is_none() {
            if !open {
                return;
            }
            match rx.recv().await {
                Some(w) => pending.push(w),
                None => return,
            }
        }
        while let Ok(more) = rx.try_recv() {
            pending.push(more);
        }
        match pending.flush(&*coord).await {
            Ok(()) => pause = RETRY_FIRST,
            Err(e) => {
                if pending.outage_since.is_none() {
                    pending.outage_since = Some(clock::wall().as_millis());
                    tracing::warn!(
                        "cannot write the journal or status: {e}; keeping records until the coordinator answers"
                    );
                }
                // Keep taking new writes while waiting to retry.
                let wait = tokio::time::sleep(pause);
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        () = &mut wait => break,
                        w = rx.recv(), if open => match w {
                            Some(w) => pending.push(w),
                            None => open = false,
                        },
                    }
                }
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
}
