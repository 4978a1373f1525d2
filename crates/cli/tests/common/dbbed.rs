//! The database bed shared by the end-to-end test and the database failover
//! benchmark: etcd (1 member), node1, node2 and a client host, an ext4 loop
//! disk, PostgreSQL on it, a floating IP.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use understudy_testbed::{Bed, Host};

use super::Snapshot;
use super::shared::LoopDisk;

pub const WAIT: Duration = Duration::from_secs(40);
pub const DB: [&str; 3] = ["disk", "pg", "vip"];

/// The bed: etcd (1 member), node1, node2, client; the shared disk.
pub struct DbWorld {
    pub bed: Bed,
    pub etcd: understudy_testbed::EtcdCluster,
    pub nodes: Vec<Host>,
    pub client: Host,
    pub disk: LoopDisk,
    pub dir: tempfile::TempDir,
    pub vip: std::net::Ipv4Addr,
}

pub fn db_world(hint: &str) -> DbWorld {
    let bed = Bed::new(hint).expect("a test bed (root and iproute2 are required)");
    let etcd = bed.start_etcd(1).expect("etcd (Debian's etcd-server)");
    let nodes = ["node1", "node2"].iter().map(|n| bed.add_host(n).unwrap()).collect();
    let client = bed.add_host("client").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = LoopDisk::new(dir.path(), 256);
    let vip = bed.address(100);
    DbWorld {
        bed,
        etcd,
        nodes,
        client,
        disk,
        dir,
        vip,
    }
}

pub fn definition(w: &DbWorld, mountpoint: &str, socket_dir: &str) -> String {
    let mut def = format!(
        r#"
[cluster]
name = "db"
coordinator = {{ etcd = {{ endpoints = ["{}"] }} }}
lease_ttl = "2s"
renew_interval = "500ms"
fence_margin = "500ms"
"#,
        w.etcd.endpoints()[0]
    );
    for (i, h) in w.nodes.iter().enumerate() {
        def.push_str(&format!(
            "\n[[node]]\nname = \"node{}\"\naddress = \"{}\"\npriority = {}\n",
            i + 1,
            h.cidr(),
            i + 1
        ));
    }
    def.push_str(&format!(
        r#"
[group.db]
monitor = {{ interval = "500ms", timeout = "2s", restarts = 1, within = "1m" }}
start_timeout = "30s"

[group.db.resource.disk]
kind = "fs"
device = "{device}"
mountpoint = "{mountpoint}"

[group.db.resource.pg]
kind = "postgres"
data_dir = "{mountpoint}/pgdata"
port = 5432
socket_dir = "{socket_dir}"
depends_on = ["disk"]

[group.db.resource.vip]
kind = "ip"
address = "{vip}/{prefix}"
depends_on = ["pg"]
"#,
        device = w.disk.device,
        vip = w.vip,
        prefix = w.bed.prefix_len(),
    ));
    def
}

/// Agents run inside their node's network namespace and a private mount
/// namespace of their own, like separate machines sharing one disk.
pub fn node_command(hosts: Vec<Host>) -> understudy_agent::local::CommandFactory {
    Box::new(move |node: &str, exe: &std::path::Path| {
        let i: usize = node.trim_start_matches("node").parse::<usize>().unwrap() - 1;
        let mut cmd = hosts[i].command("unshare");
        cmd.args(["--mount", "--propagation", "private"]).arg(exe);
        cmd
    })
}

/// Numbered inserts through the floating IP, one attempt per number; on any
/// error the client reconnects and goes on with the next number.
pub struct Writer {
    acked: Arc<Mutex<Vec<i64>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<i64>,
}

pub fn start_writer(vip: std::net::Ipv4Addr) -> Writer {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (a, s) = (Arc::clone(&acked), Arc::clone(&stop));
    let task = tokio::spawn(async move {
        let url = format!("host={vip} port=5432 user=postgres dbname=postgres connect_timeout=1");
        let mut client: Option<tokio_postgres::Client> = None;
        let mut n: i64 = 0;
        while !s.load(std::sync::atomic::Ordering::SeqCst) {
            let Some(c) = &client else {
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio_postgres::connect(&url, tokio_postgres::NoTls),
                )
                .await
                {
                    Ok(Ok((c, conn))) => {
                        tokio::spawn(conn);
                        client = Some(c);
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
                continue;
            };
            n += 1;
            match tokio::time::timeout(
                Duration::from_secs(2),
                c.execute("INSERT INTO t (n) VALUES ($1)", &[&n]),
            )
            .await
            {
                Ok(Ok(1)) => a.lock().unwrap().push(n),
                _ => client = None,
            }
        }
        n
    });
    Writer { acked, stop, task }
}

impl Writer {
    pub fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    pub async fn wait_for(&self, rows: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.count() < rows {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the client wrote only {} rows",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn finish(self) -> (Vec<i64>, i64) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let attempted = self.task.await.unwrap();
        let acked = self.acked.lock().unwrap().clone();
        (acked, attempted)
    }
}

pub fn db_running(s: &Snapshot) -> Option<String> {
    s.running_on("db", &DB)
}

/// Runs `body` inside the client host with agents for node1 and node2 (not
/// started) in `dir`, on the bed's etcd, under cluster name `name`.
pub fn in_client<F, Fut>(w: &DbWorld, name: &str, dir: tempfile::TempDir, body: F)
where
    F: FnOnce(super::TestCluster) -> Fut + Send,
    Fut: std::future::Future<Output = ()>,
{
    super::in_host(
        &w.client,
        w.etcd.endpoints(),
        name,
        dir,
        node_command(w.nodes.clone()),
        body,
    );
}

/// Initialises PostgreSQL (with table `t`) on the shared disk, creates the
/// mount point and a socket directory; returns the mount point and the
/// cluster definition.
pub fn prepare_db(w: &DbWorld, hint: &str) -> (String, String) {
    let mountpoint = format!("/srv/understudy-{hint}-{}", std::process::id());
    let socket_dir = w.dir.path().join("sock");
    super::shared::postgres_dir(&socket_dir);
    w.disk.with_mounted(&w.dir.path().join("init"), |m| {
        super::shared::init_postgres(&m.join("pgdata"), true)
    });
    std::fs::create_dir_all(&mountpoint).unwrap();
    let def = definition(w, &mountpoint, &socket_dir.display().to_string());
    (mountpoint, def)
}
