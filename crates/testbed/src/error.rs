//! The crate's error type.

use std::io;
use std::time::Duration;

/// What went wrong while building or driving a test bed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The test bed needs root (namespaces, links, addresses).
    #[error(
        "the test bed needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to create network namespaces; \
         effective uid is {euid}: run the tests as root (CI does)"
    )]
    NotRoot {
        /// The effective uid the process has.
        euid: u32,
    },
    /// A command could not be started at all.
    #[error("could not start `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr (trimmed).
        stderr: String,
    },
    /// Something did not happen within its bound.
    #[error("{what}: gave up after {waited:?}{}", if detail.is_empty() { String::new() } else { format!("\n{detail}") })]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        waited: Duration,
        /// Whatever helps (last error, log tails).
        detail: String,
    },
    /// A file-system or system-call error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A caller's mistake (bad name, unknown member, host of another bed…).
    #[error("{0}")]
    Invalid(String),
    /// The bed has been torn down; nothing can be added or started any more.
    #[error("the test bed {0} has been torn down")]
    Closed(String),
    /// A process exited when it was expected to run.
    #[error("{what} exited unexpectedly ({status}){}", if detail.is_empty() { String::new() } else { format!("\n{detail}") })]
    Exited {
        /// Which process.
        what: String,
        /// Its exit status.
        status: String,
        /// Log tail, if any.
        detail: String,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn errno(context: impl Into<String>, errno: nix::errno::Errno) -> Self {
        Error::io(context, io::Error::from(errno))
    }
}
