//! The engine's errors. Every failure leaves the engine as an [`Error`] carrying xapi's error
//! variant (`interface::StorageError` at the API boundary); the helpers here build them so each
//! message names what failed, where, and what to do.

use std::fmt;
use std::path::Path;

/// An engine error: one of xapi's `Errors.error` variants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// `Backend_error(code, params)`: a storage-level failure with a stable code.
    Backend {
        /// Stable machine-readable code (e.g. `SR_LOCKED`, `VDI_ATTACHED`, `IO_ERROR`).
        code: String,
        /// Human-readable details: what failed, where, what to do.
        params: Vec<String>,
    },
    /// `Sr_not_attached(sr)`.
    SrNotAttached(String),
    /// `Vdi_does_not_exist(vdi)`.
    VdiDoesNotExist(String),
    /// `Does_not_exist(kind, id)`.
    DoesNotExist(String, String),
    /// `Sr_attached(sr)`: the operation needs the SR detached.
    SrAttached(String),
    /// `Internal_error(msg)`.
    Internal(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Backend { code, params } => write!(f, "{code}: {}", params.join("; ")),
            Error::SrNotAttached(sr) => write!(f, "SR {sr} is not attached"),
            Error::VdiDoesNotExist(v) => write!(f, "VDI {v} does not exist"),
            Error::DoesNotExist(k, id) => write!(f, "{k} {id} does not exist"),
            Error::SrAttached(sr) => write!(f, "SR {sr} is attached"),
            Error::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// Engine result.
pub type Result<T> = std::result::Result<T, Error>;

/// A `Backend_error` with `code` and one message.
pub fn backend(code: &str, msg: impl Into<String>) -> Error {
    Error::Backend {
        code: code.to_string(),
        params: vec![msg.into()],
    }
}

/// An invalid argument (`Backend_error("INVALID_ARGUMENT", [msg])`); nothing was changed.
pub fn invalid(msg: impl Into<String>) -> Error {
    backend("INVALID_ARGUMENT", msg)
}

/// An I/O failure on `path` while doing `what`.
pub fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Backend {
        code: "IO_ERROR".to_string(),
        params: vec![format!("{what} {}: {e}", path.display())],
    }
}
