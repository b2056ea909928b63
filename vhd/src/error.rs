//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong reading, writing, creating or checking a VHD. Each variant says
/// which file, which structure or field, and which byte offset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error. The message names the file and what was being done; the
    /// OS error is the [`source`](std::error::Error::source) (print the whole chain, e.g. with
    /// [`Error::full_text`], to show it).
    #[error("{file}: I/O error while {context}")]
    Io {
        /// The file (or `<memory>`).
        file: String,
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A structure on disk is malformed.
    #[error("{file}: invalid {field} at byte offset {offset}: {detail}")]
    Corrupt {
        /// The file.
        file: String,
        /// Which structure/field (e.g. `footer cookie`, `BAT entry 7`).
        field: String,
        /// Byte offset of the field in the file.
        offset: u64,
        /// What is wrong, with the value found.
        detail: String,
    },
    /// A structure's checksum does not match its contents.
    #[error("{file}: bad checksum in {structure} at byte offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The file.
        file: String,
        /// `footer`, `footer copy`, `dynamic header`, `batmap header`.
        structure: &'static str,
        /// Byte offset of the structure.
        offset: u64,
        /// The checksum stored in the file.
        stored: u32,
        /// The checksum of the contents.
        computed: u32,
    },
    /// A caller-supplied argument is unusable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A feature this engine does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A write to a disk or chain opened read-only.
    #[error("{0}: opened read-only")]
    ReadOnly(String),
    /// An access beyond the virtual size.
    #[error("access of {len} bytes at offset {offset} is past the virtual size {size}")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Virtual size of the disk.
        size: u64,
    },
    /// A path (the leaf or a parent locator) that leads outside the permitted root directory.
    #[error("{child}: parent locator {locator} resolves to {resolved}, outside the root {root}: refused (pass a wider --root if this is intended)")]
    OutsideRoot {
        /// The disk whose locator was followed (or the leaf itself).
        child: PathBuf,
        /// The locator (kind and text).
        locator: String,
        /// Where it led (after symlinks).
        resolved: PathBuf,
        /// The root.
        root: PathBuf,
    },
    /// No parent locator of a differencing disk names an existing file.
    #[error("{child}: parent not found; tried {candidates:?}")]
    ParentNotFound {
        /// The differencing disk.
        child: PathBuf,
        /// Every locator text that was tried.
        candidates: Vec<String>,
    },
    /// The file a locator names is not the parent the child records.
    #[error("{child}: parent {parent} has uuid {found}, but the child expects {expected}")]
    ParentMismatch {
        /// The differencing disk.
        child: PathBuf,
        /// The file found.
        parent: PathBuf,
        /// Parent uuid recorded in the child's header.
        expected: uuid::Uuid,
        /// Uuid in that file's footer.
        found: uuid::Uuid,
    },
    /// The path names something other than a regular file (a directory, a FIFO, a device…).
    #[error("{path}: is a {kind}, not a regular file: a VHD is a regular file")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is (`directory`, `FIFO`, `socket`, `block device`, `character device`).
        kind: &'static str,
    },
    /// The chain loops back onto one of its own members.
    #[error("chain cycle: {0} appears twice")]
    Cycle(PathBuf),
    /// The chain is deeper than permitted.
    #[error("chain from {leaf} is deeper than the limit of {max} layers")]
    TooDeep {
        /// The leaf.
        leaf: PathBuf,
        /// The limit.
        max: usize,
    },
    /// Layers of one chain disagree (block size, sizes).
    #[error("{0}")]
    ChainMismatch(String),
    /// A long operation (a coalesce) stopped on request; its journal lets it resume.
    #[error("cancelled: {0}")]
    Cancelled(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The message followed by the text of each source, `: `-separated (what a log line or a
    /// one-line report wants).
    pub fn full_text(&self) -> String {
        let mut out = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(s) = cur {
            out.push_str(": ");
            out.push_str(&s.to_string());
            cur = s.source();
        }
        out
    }

    pub(crate) fn io(file: &str, context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            file: file.to_string(),
            context: context.into(),
            source,
        }
    }
    pub(crate) fn corrupt(
        file: &str,
        field: impl Into<String>,
        offset: u64,
        detail: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            file: file.to_string(),
            field: field.into(),
            offset,
            detail: detail.into(),
        }
    }
}
