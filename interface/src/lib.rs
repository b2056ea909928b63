//! The xapi storage interface served by ddstor: calls, records (`vdi_info`, `sr_info`, …) and
//! errors, with xapi's field names and defaults. Pure data: no I/O.
//!
//! - [`Call`]: one variant per xapi method (`"VDI.create"` → [`Call::VdiCreate`]), fields named
//!   as xapi's parameters; [`Call::from_json`] parses `ddstor call METHOD 'JSON'` arguments.
//! - [`Response`]/[`Reply`]: what a call returns on the native protocol (bincode).
//! - [`StorageError`]: xapi's `Errors.error`.
//! - [`xapi`]: xapi's own JSON shape of results and errors (variants as arrays), used by the
//!   CLI's output and by the tests against xapi's marshalling samples.
//!
//! serde forms are bincode-friendly (no `flatten`, no `untagged`, no skipped fields); int64
//! fields accept decimal strings in JSON, as xapi's XML-RPC sends them.

pub mod call;
pub mod error;
pub mod ids;
pub mod records;
pub mod xapi;

pub use call::{Call, Reply, Request, Response, ResultKind};
pub use error::{codes, StorageError};
pub use ids::{is_uuid, Dbg, DpId, IdProblem, SrId, VdiId, VmId};
pub use records::{
    AttachInfo, BackendInfo, DpStat, DpState, Implementation, QueryResult, RoRw, SrHealth, SrInfo,
    StringMap, VdiInfo, SNAPSHOT_TIME_NEVER,
};

/// Version of the native protocol carried in the hello frame.
pub const PROTOCOL_VERSION: u32 = 1;

/// The xapi storage interfaces ddstor serves, announced in the hello frame and in xenstore.
pub const INTERFACES: &[&str] = &["core", "disk_differencing"];
