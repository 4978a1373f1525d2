//! Real shared storage for end-to-end tests: an ext4 filesystem on a loop
//! device, PostgreSQL data directories on it, and a watcher that checks the
//! device is never mounted in two nodes' mount namespaces at once.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A sparse image on a loop device with ext4. Dropping it unmounts it from
/// this namespace and detaches the loop device, even after a panic.
pub struct LoopDisk {
    pub image: PathBuf,
    pub device: String,
    /// `major:minor` of the loop device, as /proc/*/mountinfo shows it.
    pub dev_id: String,
}

impl LoopDisk {
    pub fn new(dir: &Path, size_mb: u64) -> LoopDisk {
        let image = dir.join("shared.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(size_mb << 20).unwrap();
        drop(f);
        let device = run(Command::new("losetup").args(["--find", "--show"]).arg(&image));
        let disk = LoopDisk {
            dev_id: dev_id(&device),
            image,
            device,
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F", &disk.device]));
        disk
    }

    /// Mounts the disk at `at` in this (the test's) namespace, runs `f`, unmounts.
    pub fn with_mounted<T>(&self, at: &Path, f: impl FnOnce(&Path) -> T) -> T {
        std::fs::create_dir_all(at).unwrap();
        run(Command::new("mount").arg(&self.device).arg(at));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(at)));
        run(Command::new("umount").arg(at));
        match result {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        // Mounts in agents' private namespaces vanish with those namespaces;
        // one left in ours is removed here.
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            for line in info.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.get(2) == Some(&self.dev_id.as_str())
                    && let Some(mp) = fields.get(4)
                {
                    let _ = Command::new("umount").arg("-l").arg(mp).status();
                }
            }
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

fn dev_id(device: &str) -> String {
    let out = run(Command::new("stat").args(["-c", "%t %T"]).arg(device));
    let mut parts = out.split_whitespace().map(|h| u32::from_str_radix(h, 16).unwrap());
    format!("{}:{}", parts.next().unwrap(), parts.next().unwrap())
}

/// The PostgreSQL binaries (Debian's layout: the newest version).
pub fn pg_bin() -> PathBuf {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (Debian package `postgresql`)")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    PathBuf::from(format!("/usr/lib/postgresql/{}/bin", versions.last().unwrap()))
}

/// Creates a PostgreSQL cluster in `data_dir` (as `postgres`), trusting
/// every client (tests only), with a table `t(n bigint)` in database
/// `postgres` when `with_table`.
pub fn init_postgres(data_dir: &Path, with_table: bool) {
    std::fs::create_dir_all(data_dir).unwrap();
    run(Command::new("chown").args(["postgres:postgres"]).arg(data_dir));
    run(Command::new("chmod").arg("700").arg(data_dir));
    run(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg_bin().join("initdb"))
        .args(["-D"])
        .arg(data_dir)
        .args(["-A", "trust", "--no-sync", "-U", "postgres"]));
    std::fs::write(
        data_dir.join("pg_hba.conf"),
        "local all all trust\nhost all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n",
    )
    .unwrap();
    if with_table {
        // Start once, locally, to create the table; then stop cleanly.
        let sock = tempfile::tempdir().unwrap();
        run(Command::new("chown").args(["postgres:postgres"]).arg(sock.path()));
        let opts = format!("-c listen_addresses='' -k {}", sock.path().display());
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin().join("pg_ctl"))
            .args(["start", "-w", "-D"])
            .arg(data_dir)
            .args(["-o", &opts, "-l", "/dev/null"]));
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin().join("psql"))
            .args(["-h"])
            .arg(sock.path())
            .args(["-d", "postgres", "-c", "CREATE TABLE t (n bigint NOT NULL)"]));
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin().join("pg_ctl"))
            .args(["stop", "-w", "-m", "fast", "-D"])
            .arg(data_dir));
    }
}

/// A directory owned by `postgres` (socket directories).
pub fn postgres_dir(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    run(Command::new("chown").args(["postgres:postgres"]).arg(path));
}

/// Samples, every few milliseconds, in how many mount namespaces the device
/// is mounted; remembers the largest number seen (safety: it must stay ≤ 1).
pub struct MountWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(usize, usize)>>,
}

impl MountWatch {
    pub fn start(dev_id: &str) -> MountWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let dev = dev_id.to_string();
        let my_ns = std::fs::read_link("/proc/self/ns/mnt").ok();
        let thread = std::thread::spawn(move || {
            let (mut max, mut samples) = (0, 0);
            while !flag.load(Ordering::SeqCst) {
                let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
                let mut mounted_in = 0;
                for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Ok(ns) = std::fs::read_link(e.path().join("ns/mnt")) else {
                        continue;
                    };
                    if Some(&ns) == my_ns.as_ref() || !seen.insert(ns) {
                        continue;
                    }
                    let info = std::fs::read_to_string(e.path().join("mountinfo")).unwrap_or_default();
                    if info.lines().any(|l| l.split_whitespace().nth(2) == Some(dev.as_str())) {
                        mounted_in += 1;
                    }
                }
                max = max.max(mounted_in);
                samples += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            (max, samples)
        });
        MountWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns (most namespaces seen at once, samples taken).
    pub fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map(|t| t.join().unwrap()).unwrap_or((0, 0))
    }
}

impl Drop for MountWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
