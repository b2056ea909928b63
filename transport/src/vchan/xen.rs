//! Real Xen backend: `/dev/xen/gntalloc`, `/dev/xen/gntdev` and `/dev/xen/evtchn` (Linux uapi
//! `xen/gntalloc.h`, `xen/gntdev.h`, `xen/evtchn.h`). All of the backend's `unsafe` is here.

use super::mem::Mapping;
use super::{Backend, DomId, EventChannel, EvtchnPort, GrantRef, UnmapNotify};
use crate::error::{Error, Result};
use std::sync::Arc;

/// The `/dev/xen` backend.
#[derive(Debug)]
pub struct XenBackend {}

impl XenBackend {
    /// Check the devices are there.
    pub fn open() -> Result<XenBackend> {
        Err(Error::Vchan("xen backend not built yet".into()))
    }
}

impl Backend for XenBackend {
    fn share(
        &self,
        _p: DomId,
        _c: usize,
        _n: Option<UnmapNotify>,
    ) -> Result<(Vec<GrantRef>, Mapping)> {
        Err(Error::Vchan("xen backend not built yet".into()))
    }
    fn map(
        &self,
        _p: DomId,
        _r: &[GrantRef],
        _w: bool,
        _n: Option<UnmapNotify>,
    ) -> Result<Mapping> {
        Err(Error::Vchan("xen backend not built yet".into()))
    }
    fn bind_unbound(&self, _p: DomId) -> Result<Arc<dyn EventChannel>> {
        Err(Error::Vchan("xen backend not built yet".into()))
    }
    fn bind_interdomain(&self, _p: DomId, _r: EvtchnPort) -> Result<Arc<dyn EventChannel>> {
        Err(Error::Vchan("xen backend not built yet".into()))
    }
    fn name(&self) -> &'static str {
        "xen"
    }
}
