//! The VHD format engine: footers, dynamic headers, BATs, sector bitmaps, parent locators
//! and differencing chains, read and written with positional I/O.
//!
//! - [`io`]: the positional I/O trait ([`BlockIo`]) and an in-memory file ([`MemFile`]).
//! - [`format`]: on-disk structures and their checksums.
//! - [`Disk`]: one VHD file; [`Chain`]: a leaf and its ancestors, read through a merged index.
//! - [`create_dynamic`], [`create_differencing`], [`set_hidden`], [`set_parent`], [`info`],
//!   [`check()`]: creation and maintenance.
//! - [`coalesce()`]: merging a differencing disk into its parent, journaled and resumable.

pub mod chain;
pub mod check;
pub mod coalesce;
pub mod create;
pub mod disk;
pub mod error;
pub mod format;
pub mod io;
mod scan;

pub use chain::{
    resolve_parent, Chain, ChainOptions, Extent, ExtentState, PieceSource, ReadPiece,
    DEFAULT_MAX_DEPTH,
};
pub use check::{check, check_io, CheckReport, Problem};
pub use coalesce::{coalesce, coalesce_disks, relink, CoalesceOptions, CoalesceReport};
pub use create::{
    create_differencing, create_dynamic, create_dynamic_io, create_fixed, info, relative_path,
    set_hidden, set_hidden_io, set_parent, CreateOptions, Info, ParentRef,
};
pub use disk::{Bitmap, Disk, Region};
pub use error::{Error, Result};
pub use format::DiskType;
pub use io::{BlockIo, MemFile};
/// The uuid type used in footers and headers.
pub use uuid::Uuid;

#[cfg(test)]
mod tests;
