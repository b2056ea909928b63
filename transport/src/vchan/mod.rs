//! A libxenvchan-compatible vchan (DESIGN.md §4): a grant-shared ring page plus an event
//! channel, carrying a byte stream in each direction.
//!
//! - [`ring`]: the ring logic (byte layout, notify bytes, live bytes, hostile-peer checks),
//!   over shared memory that is only ever touched through atomics and raw-pointer copies.
//! - [`Backend`] / [`EventChannel`]: grant sharing/mapping and event channels, implemented by
//!   [`sim`] (files and datagram sockets under `XEN_SIM_DIR`) and [`xen`] (`/dev/xen/*`).
//! - [`Rendezvous`]: where the server publishes `ring-ref` and `event-channel`
//!   (`/local/domain/<server>/data/vchan/<client>/<port>/`); [`MemRendezvous`] is the in-memory
//!   implementation for tests, the xenstore one lives in `xs-registry`.
//! - [`VchanServer`], [`VchanClient`] and [`VchanStream`] (tokio `AsyncRead + AsyncWrite`,
//!   woken by the event channel's file descriptor).

pub mod mem;
pub mod ring;
pub mod sim;
mod stream;
pub mod xen;

pub use stream::{open_backend, BackendKind, PeerGone, VchanClient, VchanServer, VchanStream};

use crate::error::Result;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::fmt;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

/// A Xen domain id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomId(pub u16);

/// A grant reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantRef(pub u32);

/// An event-channel port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EvtchnPort(pub u32);

impl fmt::Display for DomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Display for GrantRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Display for EvtchnPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The xenstore directory of a vchan: `/local/domain/<server>/data/vchan/<client>/<port>`.
pub fn rendezvous_path(server: DomId, client: DomId, port: &str) -> String {
    format!("/local/domain/{server}/data/vchan/{client}/{port}")
}

/// Where a vchan server publishes its ring reference and event channel for the client.
pub trait Rendezvous: Send + Sync {
    /// Publish `ring-ref` and `event-channel` (readable by the client domain).
    fn publish<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
        ring_ref: GrantRef,
        evtchn: EvtchnPort,
    ) -> BoxFuture<'a, Result<()>>;
    /// Read what the server published.
    fn read<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
    ) -> BoxFuture<'a, Result<(GrantRef, EvtchnPort)>>;
    /// Remove the published keys.
    fn remove<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
    ) -> BoxFuture<'a, Result<()>>;
}

/// An in-memory [`Rendezvous`] (for tests and single-process use).
#[derive(Debug, Default, Clone)]
pub struct MemRendezvous {
    entries: Arc<Mutex<HashMap<String, (GrantRef, EvtchnPort)>>>,
}

impl MemRendezvous {
    /// An empty rendezvous.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of published entries.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("rendezvous lock").len()
    }

    /// Whether nothing is published.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Rendezvous for MemRendezvous {
    fn publish<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
        ring_ref: GrantRef,
        evtchn: EvtchnPort,
    ) -> BoxFuture<'a, Result<()>> {
        let key = rendezvous_path(server, client, port);
        self.entries
            .lock()
            .expect("rendezvous lock")
            .insert(key, (ring_ref, evtchn));
        Box::pin(async { Ok(()) })
    }

    fn read<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
    ) -> BoxFuture<'a, Result<(GrantRef, EvtchnPort)>> {
        let key = rendezvous_path(server, client, port);
        let v = self
            .entries
            .lock()
            .expect("rendezvous lock")
            .get(&key)
            .copied();
        Box::pin(async move {
            v.ok_or_else(|| crate::Error::Vchan(format!("nothing published at {key}")))
        })
    }

    fn remove<'a>(
        &'a self,
        server: DomId,
        client: DomId,
        port: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        let key = rendezvous_path(server, client, port);
        self.entries.lock().expect("rendezvous lock").remove(&key);
        Box::pin(async { Ok(()) })
    }
}

/// An event channel bound to a peer: notify it, and learn of its notifications through a
/// file descriptor that polls readable while events are pending.
pub trait EventChannel: Send + Sync {
    /// This side's port.
    fn local_port(&self) -> EvtchnPort;
    /// Signal the peer.
    fn notify(&self) -> Result<()>;
    /// Descriptor that polls readable while an event is pending.
    fn fd(&self) -> RawFd;
    /// Consume every pending event without blocking and re-arm (unmask); returns how many.
    fn drain(&self) -> Result<u64>;
}

/// What to do when a mapping goes away (libxenvchan's unmap notification): clear the byte at
/// `offset` of the first page and notify `event`.
#[derive(Clone)]
pub struct UnmapNotify {
    /// Byte offset in the first page to clear.
    pub offset: usize,
    /// Channel to notify.
    pub event: Arc<dyn EventChannel>,
}

impl fmt::Debug for UnmapNotify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnmapNotify")
            .field("offset", &self.offset)
            .field("port", &self.event.local_port())
            .finish()
    }
}

/// Grant sharing/mapping and event channels: what differs between real Xen and the simulation.
pub trait Backend: Send + Sync {
    /// Allocate `count` pages shared with `peer` (writable by it); returns their references
    /// and one contiguous mapping of them.
    fn share(
        &self,
        peer: DomId,
        count: usize,
        notify: Option<UnmapNotify>,
    ) -> Result<(Vec<GrantRef>, mem::Mapping)>;
    /// Map pages `peer` granted us, contiguously.
    fn map(
        &self,
        peer: DomId,
        refs: &[GrantRef],
        writable: bool,
        notify: Option<UnmapNotify>,
    ) -> Result<mem::Mapping>;
    /// Allocate a port that `peer` may bind to.
    fn bind_unbound(&self, peer: DomId) -> Result<Arc<dyn EventChannel>>;
    /// Bind to `peer`'s unbound port `remote`.
    fn bind_interdomain(&self, peer: DomId, remote: EvtchnPort) -> Result<Arc<dyn EventChannel>>;
    /// Short name for logs ("sim", "xen", "mem").
    fn name(&self) -> &'static str;
}
