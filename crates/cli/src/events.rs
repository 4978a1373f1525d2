//! `understudy events`: the journal — who started what, when, why.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use understudy_agent::JournalRecord;

use crate::context::Cluster;

fn line(seq: u64, bytes: &[u8]) -> String {
    match serde_json::from_slice::<JournalRecord>(bytes) {
        Ok(r) => {
            let at = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(r.at));
            let what = match (&r.entry.group, &r.entry.resource) {
                (Some(g), Some(res)) => format!("{g}/{res}"),
                (Some(g), None) => g.clone(),
                (None, _) => "-".into(),
            };
            format!("{at}  {:8} {:24} {}", r.node, what, r.entry.message)
        }
        Err(_) => format!("#{seq} (unreadable record)"),
    }
}

pub async fn run(cluster: &Cluster, last: usize, follow: bool) -> Result<()> {
    // Read everything (the journal is bounded), print the tail.
    let mut after = 0;
    let mut tail: std::collections::VecDeque<(u64, Vec<u8>)> = std::collections::VecDeque::new();
    loop {
        let page = cluster.coord.read_journal(after, 1_000).await?;
        let Some((seq, _)) = page.last() else { break };
        after = *seq;
        for rec in page {
            tail.push_back(rec);
            if tail.len() > last {
                tail.pop_front();
            }
        }
    }
    for (seq, bytes) in &tail {
        println!("{}", line(*seq, bytes));
    }
    if !follow {
        return Ok(());
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        for (seq, bytes) in cluster.coord.read_journal(after, 1_000).await? {
            after = seq;
            println!("{}", line(seq, &bytes));
        }
    }
}
