//! The monitor's I/O probe, run in a child process so the agent itself
//! never holds the filesystem it guards.
//!
//! A probe stuck on a hung disk holds the mount (an open probe file, a path
//! lookup in progress). Were it a thread of the agent, the agent would be
//! that holder: stop never signals the agent, so the unmount would fail
//! with "holders: the agent itself" even after the disk came back, and the
//! fence guard would have to kill the agent. As a child process (`/bin/sh`
//! running `dd conv=excl,fsync`, `cat`, `rm`; its own process group, dying
//! with the agent) it is an ordinary holder: it is SIGKILLed when it runs
//! over its time, and stop kills an in-flight probe (and lets no new one
//! start) before it unmounts.
//!
//! While a probe runs — its mount-table check on a helper thread, then its
//! child until the child's whole process group is gone — [`Probes`] says
//! since when; a monitor finding one still running reports at once that
//! it is stuck instead of piling up more.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;

use super::{PROBE_PREFIX, left, lock};
use crate::OpCtx;
use crate::spawn::{Exit, Launch, Spawned};

/// The probe of a writable mount: creates `$1` (it must not exist), writes
/// `$2` and fsyncs (`dd conv=excl,fsync`), reads it back, deletes it.
const WRITE_READ: &str = r#"umask 077
f=$1 n=$2
fail() { rm -f -- "$f"; [ -z "$1" ] || echo "$1" >&2; exit 1; }
printf %s "$n" | dd of="$f" conv=excl,fsync status=none || fail ""
back=$(cat -- "$f") || fail ""
[ "$back" = "$n" ] || fail "read back \`$back\` instead of \`$n\`"
exec rm -- "$f""#;

/// The probe of a read-only mount: a directory listing.
const LIST: &str = r#"exec ls -f -- "$1" >/dev/null"#;

/// How often an abandoned probe's process group is looked at until it is
/// gone (it may be stuck in the kernel for a long time).
const GONE_POLL: Duration = Duration::from_secs(3600);

/// The I/O probe in flight, if any.
#[derive(Debug, Default)]
struct State {
    /// Since when a probe has been running.
    since: Option<Instant>,
    /// Its child's pid, which is also its process group, while any member
    /// of that group lives.
    child: Option<i32>,
    /// A stop (or a start undoing its mount) is unmounting: no new probe
    /// child may start.
    unmounting: bool,
}

/// The driver's record of its I/O probe (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Probes {
    state: Mutex<State>,
    /// Told whenever a probe ends.
    done: tokio::sync::Notify,
}

/// A running probe; dropping it (the probe is over, also by panic) clears
/// the record.
pub(super) struct Slot(Arc<Probes>);

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.0.state);
            st.since = None;
            st.child = None;
        }
        self.0.done.notify_waiters();
    }
}

/// While it lives, no probe child starts (see [`Probes::quiet`]).
pub(super) struct Quiet<'a>(&'a Probes);

impl Drop for Quiet<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).unmounting = false;
    }
}

/// How a probe child ended, as the monitor reports it.
pub(super) enum Outcome {
    Passed,
    Failed(String),
    /// Not finished in time: its process group has been sent SIGKILL.
    TimedOut,
}

impl Probes {
    /// Since when a probe has been running, if one is.
    pub(super) fn busy_since(&self) -> Option<Instant> {
        lock(&self.state).since
    }

    /// Records a probe starting now, unless one runs already (then `Err`
    /// with since when).
    pub(super) fn begin(self: &Arc<Self>) -> Result<Slot, Instant> {
        let mut st = lock(&self.state);
        if let Some(since) = st.since {
            return Err(since);
        }
        st.since = Some(Instant::now());
        Ok(Slot(Arc::clone(self)))
    }

    /// No new probe child starts until the returned guard is dropped.
    pub(super) fn quiet(&self) -> Quiet<'_> {
        lock(&self.state).unmounting = true;
        Quiet(self)
    }

    /// SIGKILLs the probe child's process group, if one is in flight, and
    /// waits until it is gone or `until` passes. True when no probe child
    /// is left.
    pub(super) async fn kill(&self, until: Instant) -> bool {
        loop {
            // Registered before the check, so an end in between is not missed.
            let ended = self.done.notified();
            {
                let st = lock(&self.state);
                let Some(pgid) = st.child else { return true };
                // The leader is reaped only after `child` is cleared, so the
                // group id cannot name anyone else.
                if let Err(e) = killpg(Pid::from_raw(pgid), Signal::SIGKILL)
                    && e != Errno::ESRCH
                {
                    tracing::warn!("cannot kill the I/O probe (process group {pgid}): {e}");
                }
            }
            if tokio::time::timeout(left(until), ended).await.is_err() {
                return lock(&self.state).child.is_none();
            }
        }
    }
}

/// Runs the probe of the filesystem at `mp` in a child process (see the
/// module docs) and waits until `deadline`. The probe file is
/// `<mp>/.understudy-probe-<agent pid>-<nonce>`.
pub(super) async fn run(
    probes: &Arc<Probes>,
    slot: Slot,
    ctx: &OpCtx,
    resource: &str,
    mp: &str,
    readonly: bool,
    deadline: Instant,
) -> Outcome {
    let nonce = super::nonce();
    let file = format!("{mp}/{PROBE_PREFIX}{}-{nonce}", std::process::id());
    let argv: Vec<String> = if readonly {
        vec!["/bin/sh".into(), "-c".into(), LIST.into(), "sh".into(), mp.into()]
    } else {
        vec![
            "/bin/sh".into(),
            "-c".into(),
            WRITE_READ.into(),
            "sh".into(),
            file.clone(),
            nonce,
        ]
    };
    let what = if readonly {
        format!("I/O probe: cannot read {mp}")
    } else {
        format!("I/O probe on {file} failed")
    };
    let launch = Launch {
        resource: resource.to_owned(),
        base_dir: "/".into(),
        env: vec![
            ("LC_ALL".into(), "C".into()),
            ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        ],
        cwd: Some("/".into()),
        user: None,
    };
    let mut cmd = match launch.command(&argv, ctx, &[]) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("{what}: cannot prepare it: {e}")),
    };
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut spawned = {
        let mut st = lock(&probes.state);
        if st.unmounting {
            return Outcome::Failed(format!("{what}: not run, {mp} is being unmounted"));
        }
        match Spawned::spawn(&mut cmd) {
            Ok(s) => {
                st.child = Some(s.pid());
                s
            }
            Err(e) => return Outcome::Failed(format!("{what}: cannot run /bin/sh: {e}")),
        }
    };
    let stderr = spawned.take_stderr();
    let (tx, rx) = tokio::sync::oneshot::channel();
    // The child is watched by a task of its own, which outlives this call
    // when the probe is stuck: it keeps the slot until the probe's whole
    // process group is gone, then clears it and only then reaps the leader.
    tokio::spawn(async move {
        let mut err = String::new();
        if let Some(mut pipe) = stderr {
            let _ = pipe.read_to_string(&mut err).await;
        }
        let exit = loop {
            if let Some(exit) = spawned.wait_exit(GONE_POLL).await {
                break exit;
            }
        };
        let _ = spawned.signal_group(Signal::SIGKILL);
        while !spawned.wait_group_gone(GONE_POLL).await {}
        let _ = tx.send((exit, err));
        drop(slot);
        spawned.reap().await;
    });
    match tokio::time::timeout(left(deadline), rx).await {
        Ok(Ok((Exit::Code(0), _))) => Outcome::Passed,
        Ok(Ok((exit, err))) => match err.trim() {
            "" => Outcome::Failed(format!("{what}: the probe {exit}")),
            e => Outcome::Failed(format!("{what}: {e}")),
        },
        Ok(Err(_)) => Outcome::Failed(format!("{what}: its watcher was lost")),
        Err(_) => {
            let st = lock(&probes.state);
            if let Some(pgid) = st.child
                && let Err(e) = killpg(Pid::from_raw(pgid), Signal::SIGKILL)
                && e != Errno::ESRCH
            {
                tracing::warn!("{resource}: cannot kill the I/O probe (process group {pgid}): {e}");
            }
            Outcome::TimedOut
        }
    }
}
