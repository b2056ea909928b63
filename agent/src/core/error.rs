//! The engine's errors are xapi's: [`interface::StorageError`]. The helpers here build them so
//! each message names what failed, where, and what to do.

use interface::codes;
use std::path::Path;

/// An engine error: one of xapi's `Errors.error` variants.
pub type Error = interface::StorageError;

/// Engine result.
pub type Result<T> = std::result::Result<T, Error>;

/// A `Backend_error` with `code` and one message.
pub fn backend(code: &str, msg: impl Into<String>) -> Error {
    Error::backend(code, vec![msg.into()])
}

/// An invalid argument (`Backend_error("INVALID_ARGUMENT", [argument, why])`); nothing was
/// changed.
pub fn invalid(argument: &str, msg: impl Into<String>) -> Error {
    Error::invalid_argument(argument, msg)
}

/// An I/O failure on `path` while doing `what` (`NO_SPACE` when the disk is full).
pub fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    let code = if e.raw_os_error() == Some(libc::ENOSPC) {
        codes::NO_SPACE
    } else {
        codes::IO_ERROR
    };
    backend(code, format!("{what} {}: {e}", path.display()))
}
