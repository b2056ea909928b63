//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the transport layer. Each variant says what failed and,
/// where it helps, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a connection or a file, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (e.g. "reading a frame header").
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The peer announced a frame longer than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes; closing the connection")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// Configured limit.
        max: u32,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// A frame's payload did not decode (malformed bincode, trailing bytes, over the limit).
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// A value could not be encoded into a frame (e.g. it exceeds the maximum frame size).
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// The peer broke the protocol (wrong hello, unknown reply id, ...).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer speaks a protocol version we do not.
    #[error(
        "peer speaks protocol version {peer}, this side speaks {ours}; upgrade the older side"
    )]
    VersionMismatch {
        /// Peer's version.
        peer: u32,
        /// Ours.
        ours: u32,
    },
    /// The connection closed (cleanly or not) before the call completed.
    #[error("connection closed")]
    Closed,
    /// A unix socket path is already served by a live process.
    #[error("{0} is already served by a running process; stop it or choose another path")]
    AddressInUse(PathBuf),
    /// A path exists but is not what we may replace (not a socket, wrong owner, ...).
    #[error("refusing to use {path}: {reason}")]
    UnsafePath {
        /// The path.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// The vchan peer misbehaved; the connection is dropped.
    #[error("vchan peer misbehaved: {0}")]
    HostilePeer(String),
    /// A vchan set-up step failed (rendezvous, grant, event channel).
    #[error("vchan: {0}")]
    Vchan(String),
}

impl Error {
    /// Wrap an `io::Error` with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
