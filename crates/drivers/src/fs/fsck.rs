//! fsck before mounting: what its exit status means, and running it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::mountinfo::Device;
use super::{FsDriver, left, tool};
use crate::OpCtx;
use crate::spawn::{Exit, Launch, Log, Spawned, show_argv};

/// How many lines of fsck's output a refusal quotes.
const FSCK_TAIL: usize = 20;

/// What fsck's exit status means for mounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FsckVerdict {
    /// 0: clean.
    Clean,
    /// 1: errors were corrected.
    Fixed,
    /// 2 or 3: corrected, reboot advised (meant for a mounted root fs).
    RebootAdvised,
    /// 4 and above: do not mount.
    Refuse,
}

pub(super) fn fsck_verdict(code: i32) -> FsckVerdict {
    if code & !3 != 0 {
        FsckVerdict::Refuse
    } else if code & 2 != 0 {
        FsckVerdict::RebootAdvised
    } else if code & 1 != 0 {
        FsckVerdict::Fixed
    } else {
        FsckVerdict::Clean
    }
}

/// The meaning of fsck's exit status bits, for messages.
pub(super) fn fsck_meaning(code: i32) -> String {
    let bits = [
        (1, "errors corrected"),
        (2, "reboot advised"),
        (4, "errors left uncorrected"),
        (8, "operational error"),
        (16, "usage or syntax error"),
        (32, "cancelled by user request"),
        (128, "shared library error"),
    ];
    let words: Vec<&str> = bits.iter().filter(|(b, _)| code & b != 0).map(|(_, w)| *w).collect();
    if words.is_empty() {
        "no errors".into()
    } else {
        words.join(", ")
    }
}

impl FsDriver {
    /// Runs `fsck -p`. `Err` refuses the mount.
    pub(super) async fn fsck(&self, ctx: &OpCtx, dev: &Device, deadline: Instant) -> Result<(), String> {
        let argv: Vec<String> = vec![
            tool("fsck").to_string_lossy().into_owned(),
            "-p".into(),
            "-T".into(),
            "-t".into(),
            self.spec.fstype.clone(),
            dev.path.to_string_lossy().into_owned(),
        ];
        let launch = Launch {
            resource: self.resource.clone(),
            base_dir: PathBuf::from("/"),
            env: vec![("LC_ALL".into(), "C".into())],
            cwd: Some("/".into()),
            user: None,
        };
        let mut log = Log::open(&self.log_path)?;
        let mut cmd = launch.command(&argv, ctx, &[])?;
        log.header(&format!(
            "checking {} before mounting: {}",
            dev.path.display(),
            show_argv(&argv)
        ));
        cmd.stdout(log.stdio()?).stderr(log.stdio()?);
        let spawned = Spawned::spawn(&mut cmd).map_err(|e| format!("cannot run `{}`: {e}", show_argv(&argv)))?;
        let budget = left(deadline);
        let exit = spawned.wait_exit(budget).await;
        let result = match exit {
            Some(Exit::Code(code)) => match fsck_verdict(code) {
                FsckVerdict::Clean => Ok(()),
                FsckVerdict::Fixed => {
                    tracing::info!("{}: fsck corrected errors on {}", self.resource, dev.path.display());
                    Ok(())
                }
                FsckVerdict::RebootAdvised => {
                    tracing::warn!(
                        "{}: fsck on {} exited with status {code} ({}); mounting anyway (the advice concerns a mounted root filesystem){}",
                        self.resource,
                        dev.path.display(),
                        fsck_meaning(code),
                        log.tail(FSCK_TAIL)
                    );
                    Ok(())
                }
                FsckVerdict::Refuse => Err(format!(
                    "fsck found a problem on {} and exited with status {code} ({}): refusing to mount{}",
                    dev.path.display(),
                    fsck_meaning(code),
                    log.tail(FSCK_TAIL)
                )),
            },
            Some(other) => Err(format!(
                "`{}` {other}: refusing to mount{}",
                show_argv(&argv),
                log.tail(FSCK_TAIL)
            )),
            None => {
                if let Err(e) = spawned.terminate(Signal::SIGKILL, Duration::ZERO).await {
                    tracing::warn!("{}: {e}", self.resource);
                }
                Err(format!(
                    "fsck of {} did not finish within {budget:?} (killed): refusing to mount{}",
                    dev.path.display(),
                    log.tail(FSCK_TAIL)
                ))
            }
        };
        spawned.reap().await;
        result
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn fsck_exit_codes() {
        assert_eq!(fsck_verdict(0), FsckVerdict::Clean);
        assert_eq!(fsck_verdict(1), FsckVerdict::Fixed);
        assert_eq!(fsck_verdict(2), FsckVerdict::RebootAdvised);
        assert_eq!(fsck_verdict(3), FsckVerdict::RebootAdvised);
        for c in [4, 5, 8, 12, 16, 32, 128] {
            assert_eq!(fsck_verdict(c), FsckVerdict::Refuse, "{c}");
        }
        assert_eq!(fsck_meaning(0), "no errors");
        assert_eq!(fsck_meaning(12), "errors left uncorrected, operational error");
    }
}
