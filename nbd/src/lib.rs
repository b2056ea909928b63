//! An NBD server on tokio, the exports it serves, and the kernel nbd device client. It knows
//! nothing of storage formats: a disk is anything implementing [`BlockBackend`].
//!
//! - [`backend`]: the [`BlockBackend`] trait an export serves, and an in-memory disk.
//! - [`export`]: exports with a pause gate, and the run-time registry [`Exports`].
//! - [`server`]: the server (fixed newstyle; structured replies; extended headers;
//!   `base:allocation`; many requests in flight per connection, many connections per export),
//!   tuned by [`ServerOptions`]; the handshake and the transmission phase in files of their own.
//! - [`proto`]: the NBD wire format.
//! - [`splice`]: zero-copy read replies (file pages spliced through a pipe into the socket).
//! - [`kernel`]: kernel nbd devices (`/dev/nbdN`, ioctls) connected to exports, for blkback.
//!
//! `unsafe` is confined to [`splice`] (pipes, `splice`, `RLIMIT_NOFILE`) and [`kernel`]
//! (ioctls), each block with its `// SAFETY:` argument.

pub mod backend;
pub mod export;
pub mod kernel;
pub mod proto;
pub mod server;
pub mod splice;

pub use backend::{BlockBackend, Extent, ExtentState, MemBackend};
pub use export::{Export, ExportOptions, Exports};
pub use server::{
    serve_connection, ListenerState, ListenerStatus, NbdServer, NbdSink, ServerOptions,
};
pub use splice::raise_open_file_limit;

/// Errors of exports and backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A write reached a read-only backend or export.
    #[error("the export is read-only")]
    ReadOnly,
    /// I/O on the backing file failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The backend failed in a way of its own (a disk format's error, …).
    #[error("{what}: {source}")]
    Backend {
        /// Which kind of backend (e.g. "VHD").
        what: &'static str,
        /// Its error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The export was closed (removed) while a request waited.
    #[error("export {0:?} is closed")]
    Closed(String),
    /// An export with this name exists already.
    #[error("an export named {0:?} exists already")]
    Exists(String),
    /// The export name is not acceptable (too long, NUL).
    #[error("invalid export name {0:?}")]
    BadName(String),
    /// An operation needing a paused export was tried on a running one.
    #[error("export {0:?} is not paused")]
    NotPaused(String),
    /// A bug or a runtime failure (task panicked).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The NBD error number a client receives for this error.
    pub fn nbd_errno(&self) -> u32 {
        use proto::errno::*;
        match self {
            Error::ReadOnly => EPERM,
            Error::Io(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => ENOSPC,
                Some(libc::ENOMEM) => ENOMEM,
                _ => EIO,
            },
            Error::Closed(_) => ESHUTDOWN,
            _ => EIO,
        }
    }
}
