//! Shared memory: [`Mapping`], the only way the vchan touches memory another domain may write
//! (atomics for fields, raw-pointer copies for ring data: never a Rust slice or reference to
//! the shared bytes), and [`MemXen`], an in-process fake of grants and event channels for
//! unit tests, which counts what is still allocated so tests can check for leaks.

use super::{Backend, DomId, EventChannel, EvtchnPort, GrantRef, UnmapNotify};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Page size of grants.
pub const PAGE_SIZE: usize = 4096;

type Release = Box<dyn FnOnce() + Send + Sync>;

/// A contiguous mapping of one or more shared pages.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    notify: Option<UnmapNotify>,
    release: Option<Release>,
}

// SAFETY: the mapping is plain memory addressed by a raw pointer; every access goes through
// atomics or raw copies, which are valid from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only offers atomic loads/stores and raw copies.
unsafe impl Sync for Mapping {}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("notify", &self.notify)
            .finish()
    }
}

impl Mapping {
    /// Wrap memory mapped by a backend.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes, aligned to 8, until `release`
    /// runs (on drop), and must not be accessed as a Rust reference anywhere else.
    pub unsafe fn new(
        ptr: NonNull<u8>,
        len: usize,
        notify: Option<UnmapNotify>,
        release: Option<Release>,
    ) -> Self {
        Mapping {
            ptr,
            len,
            notify,
            release,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the first byte (for FFI callers that hand the mapping out as a pointer).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Drop the unmap notification (the caller already told the peer, or must not).
    pub fn disarm_notify(&mut self) {
        self.notify = None;
    }

    fn at(&self, off: usize, size: usize) -> *mut u8 {
        assert!(
            off.checked_add(size).is_some_and(|e| e <= self.len) && off % size == 0,
            "shared-memory access at {off} (+{size}) outside a mapping of {} bytes",
            self.len
        );
        // SAFETY: bounds checked just above.
        unsafe { self.ptr.as_ptr().add(off) }
    }

    /// The atomic byte at `off`.
    pub fn u8_at(&self, off: usize) -> &AtomicU8 {
        // SAFETY: in bounds (checked by `at`), valid while `self` lives (constructor contract).
        unsafe { AtomicU8::from_ptr(self.at(off, 1)) }
    }

    /// The atomic u16 at `off` (2-aligned).
    pub fn u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: in bounds and aligned (checked by `at`; the base is 8-aligned).
        unsafe { AtomicU16::from_ptr(self.at(off, 2).cast()) }
    }

    /// The atomic u32 at `off` (4-aligned).
    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        // SAFETY: in bounds and aligned (checked by `at`; the base is 8-aligned).
        unsafe { AtomicU32::from_ptr(self.at(off, 4).cast()) }
    }

    /// Copy `dst.len()` bytes from offset `off` of the mapping into private memory.
    pub fn read_into(&self, off: usize, dst: &mut [u8]) {
        assert!(off.checked_add(dst.len()).is_some_and(|e| e <= self.len));
        // SAFETY: source range in bounds (asserted); the destination is private memory that
        // cannot overlap the mapping. A concurrent peer write only changes the bytes copied.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        }
    }

    /// Copy `src` into the mapping at offset `off`.
    pub fn write_from(&self, off: usize, src: &[u8]) {
        assert!(off.checked_add(src.len()).is_some_and(|e| e <= self.len));
        // SAFETY: destination range in bounds (asserted); the source is private memory.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len())
        }
    }

    /// Zero the whole mapping.
    pub fn zero(&self) {
        // SAFETY: the whole range is in bounds by construction.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), 0, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Some(n) = self.notify.take() {
            if n.offset < self.len {
                self.u8_at(n.offset).store(0, Ordering::SeqCst);
            }
            fence(Ordering::SeqCst);
            if let Err(e) = n.event.notify() {
                tracing::debug!(error = %e, "unmap notification not delivered");
            }
        }
        if let Some(r) = self.release.take() {
            r();
        }
    }
}

struct Alloc {
    words: Box<[AtomicU64]>,
}

#[derive(Default)]
struct MemState {
    next_ref: u32,
    next_port: u32,
    grants: HashMap<u32, (Arc<Alloc>, usize)>,
    ports: HashMap<u32, Weak<MemEvtchn>>,
}

/// In-process fake hypervisor: grants are heap pages, event channels are eventfds.
#[derive(Clone, Default)]
pub struct MemXen {
    state: Arc<Mutex<MemState>>,
}

impl std::fmt::Debug for MemXen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemXen")
            .field("grants", &self.live_grants())
            .field("ports", &self.live_ports())
            .finish()
    }
}

impl MemXen {
    /// A fresh fake hypervisor.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grants still shared (a leak check for tests).
    pub fn live_grants(&self) -> usize {
        self.state.lock().expect("mem lock").grants.len()
    }

    /// Event channels still bound (a leak check for tests).
    pub fn live_ports(&self) -> usize {
        let st = self.state.lock().expect("mem lock");
        st.ports.values().filter(|w| w.strong_count() > 0).count()
    }

    /// Write raw bytes into a granted page, as a hostile peer could (tests).
    pub fn poke(&self, gref: GrantRef, off: usize, bytes: &[u8]) -> Result<()> {
        let m = self.map(DomId(0), &[gref], true, None)?;
        m.write_from(off, bytes);
        Ok(())
    }

    fn new_port(&self, peer: Option<u32>) -> Result<Arc<MemEvtchn>> {
        // SAFETY: eventfd with valid flags; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut st = self.state.lock().expect("mem lock");
        st.next_port = st.next_port.max(9) + 1;
        let port = st.next_port;
        let ev = Arc::new(MemEvtchn {
            port,
            fd,
            peer: Mutex::new(peer),
            xen: Arc::downgrade(&self.state),
        });
        st.ports.insert(port, Arc::downgrade(&ev));
        Ok(ev)
    }
}

impl Backend for MemXen {
    fn share(
        &self,
        _peer: DomId,
        count: usize,
        notify: Option<UnmapNotify>,
    ) -> Result<(Vec<GrantRef>, Mapping)> {
        let words: Box<[AtomicU64]> = (0..count * PAGE_SIZE / 8)
            .map(|_| AtomicU64::new(0))
            .collect();
        let alloc = Arc::new(Alloc { words });
        let mut st = self.state.lock().expect("mem lock");
        let mut refs = Vec::with_capacity(count);
        for i in 0..count {
            st.next_ref = st.next_ref.max(7) + 1;
            let r = st.next_ref;
            st.grants.insert(r, (alloc.clone(), i));
            refs.push(GrantRef(r));
        }
        drop(st);
        let ptr = NonNull::new(alloc.words.as_ptr() as *mut u8).expect("non-null allocation");
        let state = self.state.clone();
        let owned = refs.clone();
        let release: Release = Box::new(move || {
            let mut st = state.lock().expect("mem lock");
            for r in owned {
                st.grants.remove(&r.0);
            }
            drop(alloc);
        });
        // SAFETY: `alloc` (kept alive by `release`) is count pages of 8-aligned atomics.
        let m = unsafe { Mapping::new(ptr, count * PAGE_SIZE, notify, Some(release)) };
        Ok((refs, m))
    }

    fn map(
        &self,
        _peer: DomId,
        refs: &[GrantRef],
        _writable: bool,
        notify: Option<UnmapNotify>,
    ) -> Result<Mapping> {
        let st = self.state.lock().expect("mem lock");
        let mut first: Option<(Arc<Alloc>, usize)> = None;
        for (i, r) in refs.iter().enumerate() {
            let (a, idx) = st
                .grants
                .get(&r.0)
                .ok_or_else(|| Error::Vchan(format!("grant reference {r} does not exist")))?;
            match &first {
                None => first = Some((a.clone(), *idx)),
                Some((fa, fi)) => {
                    if !Arc::ptr_eq(fa, a) || *idx != fi + i {
                        return Err(Error::Vchan(
                            "mem backend maps only consecutive pages of one allocation".into(),
                        ));
                    }
                }
            }
        }
        let (alloc, idx) =
            first.ok_or_else(|| Error::Vchan("no grant references to map".into()))?;
        drop(st);
        // SAFETY: idx + refs.len() pages lie inside the allocation (checked above).
        let ptr = unsafe { (alloc.words.as_ptr() as *mut u8).add(idx * PAGE_SIZE) };
        let ptr = NonNull::new(ptr).expect("non-null");
        let release: Release = Box::new(move || drop(alloc));
        // SAFETY: the allocation outlives the mapping (held by `release`).
        Ok(unsafe { Mapping::new(ptr, refs.len() * PAGE_SIZE, notify, Some(release)) })
    }

    fn bind_unbound(&self, _peer: DomId) -> Result<Arc<dyn EventChannel>> {
        Ok(self.new_port(None)?)
    }

    fn bind_interdomain(&self, _peer: DomId, remote: EvtchnPort) -> Result<Arc<dyn EventChannel>> {
        let remote_ev = {
            let st = self.state.lock().expect("mem lock");
            st.ports.get(&remote.0).and_then(Weak::upgrade)
        }
        .ok_or_else(|| Error::Vchan(format!("event channel port {remote} does not exist")))?;
        let ev = self.new_port(Some(remote.0))?;
        *remote_ev.peer.lock().expect("peer lock") = Some(ev.port);
        Ok(ev)
    }

    fn name(&self) -> &'static str {
        "mem"
    }
}

struct MemEvtchn {
    port: u32,
    fd: OwnedFd,
    peer: Mutex<Option<u32>>,
    xen: Weak<Mutex<MemState>>,
}

impl EventChannel for MemEvtchn {
    fn local_port(&self) -> EvtchnPort {
        EvtchnPort(self.port)
    }

    fn notify(&self) -> Result<()> {
        let Some(peer) = *self.peer.lock().expect("peer lock") else {
            return Ok(());
        };
        let Some(xen) = self.xen.upgrade() else {
            return Ok(());
        };
        let target = xen
            .lock()
            .expect("mem lock")
            .ports
            .get(&peer)
            .and_then(Weak::upgrade);
        if let Some(t) = target {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a valid u64 to an eventfd we hold open.
            let n = unsafe { libc::write(t.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    return Err(Error::io("eventfd notify", e));
                }
            }
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn drain(&self) -> Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a valid u64 from an eventfd we own.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(Error::io("eventfd drain", e));
        }
        Ok(v)
    }
}

impl Drop for MemEvtchn {
    fn drop(&mut self) {
        if let Some(xen) = self.xen.upgrade() {
            xen.lock().expect("mem lock").ports.remove(&self.port);
        }
    }
}
