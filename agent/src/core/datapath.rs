//! The seam between the engine and the datapath (NBD exports of attached VDIs), which the
//! datapath issue fills in.
//!
//! The engine calls [`DatapathHooks`] around every change that affects a datapath: before and
//! after a VDI's leaf file is replaced (snapshot/clone: the open chain must be paused and
//! re-opened on the new leaf), before an SR is detached, and before a VDI is destroyed: the
//! datapath layer then deactivates (flushes) and detaches every datapath of the VDI — xapi
//! refuses to destroy an in-use VDI at its own layer, so at the storage layer a datapath left
//! over is a leaked one. The engine still refuses `VDI.destroy` if, after that hook,
//! [`DatapathHooks::is_attached`] says a datapath uses the VDI or the VDI's persisted record
//! lists one (`VdiRecord::datapaths`; e.g. an agent without datapaths).

use super::error::Result;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// A boxed, sendable future (hooks are object-safe).
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

/// A boxed future answering one xapi call.
pub type CallFuture<'a> = Pin<Box<dyn Future<Output = interface::Reply> + Send + 'a>>;

/// Callbacks from the engine to the datapath layer. Every method has a no-op default, which is
/// exactly right while no datapath exists.
pub trait DatapathHooks: Send + Sync + std::fmt::Debug + 'static {
    /// Whether any datapath currently uses `vdi` of `sr`.
    fn is_attached(&self, _sr: &str, _vdi: &str) -> bool {
        false
    }

    /// Called with the VDI's lock held, before its leaf file is renamed into a hidden base:
    /// pause I/O, flush, close the chain.
    fn before_leaf_change<'a>(&'a self, _sr: &'a str, _vdi: &'a str) -> HookFuture<'a> {
        Box::pin(async { Ok(()) })
    }

    /// Called with the VDI's lock held once the change is over (successful or not): re-open the
    /// chain at `leaf` and resume I/O.
    fn after_leaf_change<'a>(
        &'a self,
        _sr: &'a str,
        _vdi: &'a str,
        _leaf: PathBuf,
    ) -> HookFuture<'a> {
        Box::pin(async { Ok(()) })
    }

    /// Called after `VDI.epoch_begin`/`VDI.epoch_end` changed the VDI's record (no lock held):
    /// a non-persistent disk gets a fresh empty layer for the epoch, thrown away at its end.
    fn after_epoch_change<'a>(
        &'a self,
        _storage: &'a super::Storage,
        _sr: &'a str,
        _vdi: &'a str,
    ) -> HookFuture<'a> {
        Box::pin(async { Ok(()) })
    }

    /// Called before `VDI.destroy` takes the VDI's lock: deactivate (flush) and detach every
    /// datapath of the VDI, and drop whatever only the datapath layer created for it.
    fn before_vdi_destroy<'a>(
        &'a self,
        _storage: &'a super::Storage,
        _sr: &'a str,
        _vdi: &'a str,
    ) -> HookFuture<'a> {
        Box::pin(async { Ok(()) })
    }

    /// Called before an SR is detached: tear down its datapaths.
    fn before_sr_detach<'a>(&'a self, _sr: &'a str) -> HookFuture<'a> {
        Box::pin(async { Ok(()) })
    }

    /// Answers a datapath call (`VDI.attach*`, `activate*`, `deactivate`, `detach`, `DP.*`);
    /// the engine routes them here. Default: `Unimplemented`.
    fn call<'a>(&'a self, _storage: &'a super::Storage, call: interface::Call) -> CallFuture<'a> {
        Box::pin(async move {
            Err(interface::StorageError::Unimplemented(
                call.method().to_string(),
            ))
        })
    }
}

/// Hooks for an agent without datapaths.
#[derive(Debug, Default)]
pub struct NoDatapaths;

impl DatapathHooks for NoDatapaths {}
