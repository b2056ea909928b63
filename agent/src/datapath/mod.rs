//! The datapath: attached VDIs served over NBD.
//!
//! - [`backend`]: the [`BlockBackend`] trait an export serves (in-memory, raw file);
//!   [`chain`]: its implementation for a VHD chain.
//! - [`export`]: exports with a pause gate, and the run-time registry [`Exports`].
//! - [`server`]: the NBD server on tokio (fixed newstyle; structured replies; extended headers;
//!   `base:allocation`; many requests in flight per connection, many connections per export).
//! - [`proto`]: the NBD wire format.
//! - [`splice`]: zero-copy read replies (file pages spliced through a pipe into the socket).
//! - [`kernel`]: kernel nbd devices (`/dev/nbdN`, ioctls) connected to exports, for blkback.
//! - [`manager`]: per-datapath state of every VDI (xapi's `vdi_automaton`), persisted, driving
//!   the exports; the engine's [`crate::core::datapath::DatapathHooks`].

pub mod backend;
pub mod chain;
pub mod export;
pub mod kernel;
pub mod manager;
pub mod proto;
pub mod server;
pub mod splice;

pub use backend::{BlockBackend, Extent, ExtentState, MemBackend, RawFileBackend};
pub use chain::ChainBackend;
pub use export::{Export, ExportOptions, Exports};
pub use manager::Datapaths;
pub use server::{serve_connection, NbdServer, NbdSink};

/// Errors of the datapath.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A write reached a read-only backend or export.
    #[error("the export is read-only")]
    ReadOnly,
    /// I/O on the backing file failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The VHD layer failed.
    #[error("VHD: {0}")]
    Vhd(String),
    /// A backing file could not be opened.
    #[error("cannot open {0}: {1}")]
    Open(String, String),
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
