//! The xenstore side of ddstor: the registry schema under `/local/domain/<D>/data/ddstor/`,
//! lookup/list/watch for dom0, and a spec-faithful test xenstored for machines without Xen.
//!
//! * [`wire`]: the xenstore wire protocol (`xs_wire.h`).
//! * [`store`]: the test server's tree, permissions and transactions.
//! * [`server`]: the test xenstored on unix sockets (`ddstor xenstored`).

pub mod client;
pub mod registry;
pub mod rendezvous;
pub mod server;
pub mod store;
pub mod wire;

use std::fmt;

/// A Xen domain id. Domain 0 is privileged (the toolstack).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct DomId(pub u16);

impl DomId {
    /// dom0.
    pub const DOM0: DomId = DomId(0);

    /// Whether this domain bypasses permission checks (dom0).
    pub fn is_privileged(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for DomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A peer sent bytes that are not a valid xenstore message.
    #[error("bad xenstore wire input: {0}")]
    Wire(String),
    /// xenstored answered a request with an error.
    #[error("xenstore {op} {path}: {errno}")]
    Xs {
        /// The operation (READ, WRITE…).
        op: &'static str,
        /// The path it was about.
        path: String,
        /// The error name xenstored answered.
        errno: wire::XsErrno,
    },
    /// Socket I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An argument was invalid.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
