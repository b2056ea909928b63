//! A shim exporting the parts of `libxenevtchn` and `libxengnttab` that libxenvchan uses,
//! implemented over the project's simulated Xen (`transport::vchan::sim`, DESIGN.md §4), so
//! that Debian's real libxenvchan runs without a hypervisor:
//!
//! ```sh
//! XEN_SIM_DIR=/tmp/sim XENSTORED_PATH=/tmp/xs.sock \
//!   LD_PRELOAD=target/debug/libddstor_xen_sim.so ./vchan_peer server 1 /local/domain/0/data/vchan/1/p 1024 2048 echo
//! ```
//!
//! Preloaded definitions take precedence over the real libraries' (unversioned definitions
//! satisfy libxenvchan's versioned references). One event-channel handle may bind several
//! ports; `xenevtchn_fd` is an epoll descriptor over their sockets. Limitations: unmap
//! notifications fire on unshare/unmap, not on process death.

use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use transport::vchan::mem::{Mapping, PAGE_SIZE};
use transport::vchan::sim::{SimEvtchn, SimXen, MSG_NOTIFY};
use transport::vchan::{EventChannel, EvtchnPort, GrantRef, UnmapNotify};

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

fn debug(msg: &str) {
    if std::env::var_os("DDSTOR_SHIM_DEBUG").is_some() {
        eprintln!("ddstor-sim-shim[{}]: {msg}", std::process::id());
    }
}

fn sim() -> Option<&'static SimXen> {
    static SIM: OnceLock<Option<SimXen>> = OnceLock::new();
    let s = SIM.get_or_init(|| match SimXen::from_env() {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("ddstor-sim-shim: {e}");
            None
        }
    });
    if s.is_none() {
        set_errno(libc::ENOENT);
    }
    s.as_ref()
}

/// Every port bound in this process, for unmap notifications that name a port.
fn ports() -> &'static Mutex<HashMap<u32, Arc<SimEvtchn>>> {
    static PORTS: OnceLock<Mutex<HashMap<u32, Arc<SimEvtchn>>>> = OnceLock::new();
    PORTS.get_or_init(Default::default)
}

/// An event-channel handle.
pub struct EvtHandle {
    epfd: OwnedFd,
    ports: Mutex<Vec<Arc<SimEvtchn>>>,
}

/// A grant-sharing or grant-mapping handle: live mappings by address.
pub struct GntHandle {
    owner: bool,
    maps: Mutex<HashMap<usize, (Mapping, Vec<GrantRef>)>>,
}

unsafe fn evt<'a>(h: *mut EvtHandle) -> Option<&'a EvtHandle> {
    // SAFETY: callers pass a handle from xenevtchn_open (or NULL).
    unsafe { h.as_ref() }
}

unsafe fn gnt<'a>(h: *mut GntHandle) -> Option<&'a GntHandle> {
    // SAFETY: callers pass a handle from xeng*_open (or NULL).
    unsafe { h.as_ref() }
}

/// `xenevtchn_open`.
///
/// # Safety
/// C ABI; `logger` is ignored.
#[no_mangle]
pub unsafe extern "C" fn xenevtchn_open(_logger: *mut c_void, _flags: c_uint) -> *mut EvtHandle {
    if sim().is_none() {
        return std::ptr::null_mut();
    }
    // SAFETY: plain syscall; result checked.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return std::ptr::null_mut();
    }
    let h = EvtHandle {
        // SAFETY: fresh descriptor we own.
        epfd: unsafe { OwnedFd::from_raw_fd(fd) },
        ports: Mutex::new(Vec::new()),
    };
    Box::into_raw(Box::new(h))
}

/// `xenevtchn_close`.
///
/// # Safety
/// `h` from `xenevtchn_open`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn xenevtchn_close(h: *mut EvtHandle) -> c_int {
    if h.is_null() {
        return 0;
    }
    // SAFETY: the handle was created by Box::into_raw in xenevtchn_open.
    let h = unsafe { Box::from_raw(h) };
    let mut reg = ports().lock().expect("ports lock");
    for p in h.ports.lock().expect("ports lock").drain(..) {
        reg.remove(&p.local_port().0);
    }
    0
}

/// `xenevtchn_fd`: an epoll descriptor, readable while any bound port has a message.
///
/// # Safety
/// `h` from `xenevtchn_open`.
#[no_mangle]
pub unsafe extern "C" fn xenevtchn_fd(h: *mut EvtHandle) -> c_int {
    // SAFETY: see function contract.
    match unsafe { evt(h) } {
        Some(h) => h.epfd.as_raw_fd(),
        None => -1,
    }
}

fn add_port(h: &EvtHandle, ev: SimEvtchn) -> c_int {
    let ev = Arc::new(ev);
    let port = ev.local_port().0;
    let mut e = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: u64::from(port),
    };
    // SAFETY: valid epoll fd, valid socket fd, valid event struct.
    let rc = unsafe { libc::epoll_ctl(h.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, ev.fd(), &mut e) };
    if rc < 0 {
        return -1;
    }
    h.ports.lock().expect("ports lock").push(ev.clone());
    ports().lock().expect("ports lock").insert(port, ev);
    port as c_int
}

/// `xenevtchn_bind_unbound_port`.
///
/// # Safety
/// `h` from `xenevtchn_open`.
#[no_mangle]
pub unsafe extern "C" fn xenevtchn_bind_unbound_port(h: *mut EvtHandle, _domid: u32) -> c_int {
    // SAFETY: see function contract.
    let (Some(h), Some(sim)) = (unsafe { evt(h) }, sim()) else {
        set_errno(libc::EINVAL);
        return -1;
    };
    match sim.bind_unbound_port() {
        Ok(ev) => add_port(h, ev),
        Err(e) => {
            debug(&format!("bind_unbound: {e}"));
            set_errno(libc::ENOSPC);
            -1
        }
    }
}

/// `xenevtchn_bind_interdomain`.
///
/// # Safety
/// `h` from `xenevtchn_open`.
#[no_mangle]
pub unsafe extern "C" fn xenevtchn_bind_interdomain(
    h: *mut EvtHandle,
    _domid: u32,
    remote: u32,
) -> c_int {
    // SAFETY: see function contract.
    let (Some(h), Some(sim)) = (unsafe { evt(h) }, sim()) else {
        set_errno(libc::EINVAL);
        return -1;
    };
    match sim.bind_interdomain_port(EvtchnPort(remote)) {
        Ok(ev) => add_port(h, ev),
        Err(e) => {
            debug(&format!("bind_interdomain {remote}: {e}"));
            set_errno(libc::EINVAL);
            -1
        }
    }
}

fn find(h: &EvtHandle, port: u32) -> Option<Arc<SimEvtchn>> {
    h.ports
        .lock()
        .expect("ports lock")
        .iter()
        .find(|p| p.local_port().0 == port)
        .cloned()
}

/// `xenevtchn_unbind`.
///
/// # Safety
/// `h` from `xenevtchn_open`.
#[no_mangle]
pub unsafe extern "C" fn xenevtchn_unbind(h: *mut EvtHandle, port: u32) -> c_int {
    // SAFETY: see function contract.
    let Some(h) = (unsafe { evt(h) }) else {
        return -1;
    };
    let mut v = h.ports.lock().expect("ports lock");
    let before = v.len();
    v.retain(|p| p.local_port().0 != port);
    ports().lock().expect("ports lock").remove(&port);
    if v.len() == before {
        set_errno(libc::EINVAL);
        return -1;
    }
    0
}

/// `xenevtchn_notify`.
///
/// # Safety
/// `h` from `xenevtchn_open`.
#[no_mangle]
pub unsafe extern "C" fn xenevtchn_notify(h: *mut EvtHandle, port: u32) -> c_int {
    // SAFETY: see function contract.
    let Some(h) = (unsafe { evt(h) }) else {
        return -1;
    };
    match find(h, port).map(|p| p.notify()) {
        Some(Ok(())) => 0,
        _ => {
            set_errno(libc::EINVAL);
            -1
        }
    }
}

/// `xenevtchn_pending`: blocks until a notification arrives on one of the handle's ports and
/// returns that port (bind messages are consumed silently).
///
/// # Safety
/// `h` from `xenevtchn_open`.
#[no_mangle]
pub unsafe extern "C" fn xenevtchn_pending(h: *mut EvtHandle) -> c_int {
    // SAFETY: see function contract.
    let Some(h) = (unsafe { evt(h) }) else {
        return -1;
    };
    loop {
        let list: Vec<Arc<SimEvtchn>> = h.ports.lock().expect("ports lock").clone();
        if list.is_empty() {
            set_errno(libc::EINVAL);
            return -1;
        }
        for p in &list {
            loop {
                match p.recv_one() {
                    Ok(Some((MSG_NOTIFY, _))) => return p.local_port().0 as c_int,
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => return -1,
                }
            }
        }
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: valid epoll fd and buffer of 8 events.
        let n = unsafe { libc::epoll_wait(h.epfd.as_raw_fd(), evs.as_mut_ptr(), 8, -1) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return -1;
        }
    }
}

/// `xenevtchn_unmask`: nothing to do in the simulation.
///
/// # Safety
/// `h` from `xenevtchn_open`.
#[no_mangle]
pub unsafe extern "C" fn xenevtchn_unmask(_h: *mut EvtHandle, _port: u32) -> c_int {
    0
}

fn open_gnt(owner: bool) -> *mut GntHandle {
    if sim().is_none() {
        return std::ptr::null_mut();
    }
    Box::into_raw(Box::new(GntHandle {
        owner,
        maps: Mutex::new(HashMap::new()),
    }))
}

fn close_gnt(h: *mut GntHandle) -> c_int {
    if h.is_null() {
        return 0;
    }
    // SAFETY: created by Box::into_raw in open_gnt.
    let h = unsafe { Box::from_raw(h) };
    let sim = sim();
    for (_, (m, refs)) in h.maps.lock().expect("maps lock").drain() {
        // libxenvchan munmaps multi-page rings itself before closing the handle: unmapping
        // again could hit a reused range, so only the grant files are released here.
        std::mem::forget(m);
        if h.owner {
            if let Some(sim) = sim {
                for r in refs {
                    let _ = std::fs::remove_file(sim.grant_path(r));
                }
            }
        }
    }
    0
}

fn notify_for(offset: u32, port: u32) -> Option<UnmapNotify> {
    if offset as usize >= PAGE_SIZE {
        return None;
    }
    let ev = ports().lock().expect("ports lock").get(&port).cloned()?;
    Some(UnmapNotify {
        offset: offset as usize,
        event: ev,
    })
}

fn keep(h: &GntHandle, m: Mapping, refs: Vec<GrantRef>) -> *mut c_void {
    let p = m.as_ptr();
    h.maps
        .lock()
        .expect("maps lock")
        .insert(p as usize, (m, refs));
    p.cast()
}

fn unmap(h: &GntHandle, addr: *mut c_void) -> c_int {
    match h.maps.lock().expect("maps lock").remove(&(addr as usize)) {
        Some(_) => 0,
        None => {
            set_errno(libc::EINVAL);
            -1
        }
    }
}

/// `xengntshr_open`.
///
/// # Safety
/// C ABI.
#[no_mangle]
pub unsafe extern "C" fn xengntshr_open(_logger: *mut c_void, _flags: c_uint) -> *mut GntHandle {
    open_gnt(true)
}

/// `xengntshr_close`.
///
/// # Safety
/// `h` from `xengntshr_open`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn xengntshr_close(h: *mut GntHandle) -> c_int {
    close_gnt(h)
}

unsafe fn share(
    h: *mut GntHandle,
    count: usize,
    refs: *mut u32,
    notify: Option<UnmapNotify>,
) -> *mut c_void {
    // SAFETY: see callers' contracts.
    let (Some(h), Some(sim)) = (unsafe { gnt(h) }, sim()) else {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    };
    if refs.is_null() || count == 0 {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    let got = match sim.alloc_grants(count) {
        Ok(g) => g,
        Err(e) => {
            debug(&format!("share: {e}"));
            set_errno(libc::ENOSPC);
            return std::ptr::null_mut();
        }
    };
    match sim.map_files(&got, true, notify, true) {
        Ok(m) => {
            for (i, r) in got.iter().enumerate() {
                // SAFETY: the caller provides room for `count` refs.
                unsafe { *refs.add(i) = r.0 };
            }
            keep(h, m, got)
        }
        Err(e) => {
            debug(&format!("share map: {e}"));
            for r in got {
                let _ = std::fs::remove_file(sim.grant_path(r));
            }
            set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

/// `xengntshr_share_pages`.
///
/// # Safety
/// `h` from `xengntshr_open`; `refs` has room for `count` entries.
#[no_mangle]
pub unsafe extern "C" fn xengntshr_share_pages(
    h: *mut GntHandle,
    _domid: u32,
    count: c_int,
    refs: *mut u32,
    _writable: c_int,
) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { share(h, count.max(0) as usize, refs, None) }
}

/// `xengntshr_share_page_notify`.
///
/// # Safety
/// `h` from `xengntshr_open`; `r` points to one u32.
#[no_mangle]
pub unsafe extern "C" fn xengntshr_share_page_notify(
    h: *mut GntHandle,
    _domid: u32,
    r: *mut u32,
    _writable: c_int,
    notify_offset: u32,
    notify_port: u32,
) -> *mut c_void {
    let n = notify_for(notify_offset, notify_port);
    // SAFETY: forwarded contract.
    unsafe { share(h, 1, r, n) }
}

/// `xengntshr_unshare`.
///
/// # Safety
/// `h` from `xengntshr_open`; `addr` from one of its share calls.
#[no_mangle]
pub unsafe extern "C" fn xengntshr_unshare(
    h: *mut GntHandle,
    addr: *mut c_void,
    _count: u32,
) -> c_int {
    // SAFETY: see function contract.
    match unsafe { gnt(h) } {
        Some(h) => unmap(h, addr),
        None => -1,
    }
}

/// `xengnttab_open`.
///
/// # Safety
/// C ABI.
#[no_mangle]
pub unsafe extern "C" fn xengnttab_open(_logger: *mut c_void, _flags: c_uint) -> *mut GntHandle {
    open_gnt(false)
}

/// `xengnttab_close`.
///
/// # Safety
/// `h` from `xengnttab_open`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn xengnttab_close(h: *mut GntHandle) -> c_int {
    close_gnt(h)
}

unsafe fn map(
    h: *mut GntHandle,
    refs: &[GrantRef],
    prot: c_int,
    notify: Option<UnmapNotify>,
) -> *mut c_void {
    // SAFETY: see callers' contracts.
    let (Some(h), Some(sim)) = (unsafe { gnt(h) }, sim()) else {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    };
    let writable = prot & libc::PROT_WRITE != 0;
    match sim.map_files(refs, writable, notify, false) {
        Ok(m) => keep(h, m, refs.to_vec()),
        Err(e) => {
            debug(&format!("map {refs:?}: {e}"));
            set_errno(libc::EINVAL);
            std::ptr::null_mut()
        }
    }
}

/// `xengnttab_map_grant_ref_notify`.
///
/// # Safety
/// `h` from `xengnttab_open`.
#[no_mangle]
pub unsafe extern "C" fn xengnttab_map_grant_ref_notify(
    h: *mut GntHandle,
    _domid: u32,
    r: u32,
    prot: c_int,
    notify_offset: u32,
    notify_port: u32,
) -> *mut c_void {
    let n = notify_for(notify_offset, notify_port);
    // SAFETY: forwarded contract.
    unsafe { map(h, &[GrantRef(r)], prot, n) }
}

/// `xengnttab_map_domain_grant_refs`.
///
/// # Safety
/// `h` from `xengnttab_open`; `refs` holds `count` entries.
#[no_mangle]
pub unsafe extern "C" fn xengnttab_map_domain_grant_refs(
    h: *mut GntHandle,
    count: u32,
    _domid: u32,
    refs: *const u32,
    prot: c_int,
) -> *mut c_void {
    if refs.is_null() {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    // SAFETY: the caller provides `count` refs.
    let refs: Vec<GrantRef> = (0..count as usize)
        .map(|i| GrantRef(unsafe { *refs.add(i) }))
        .collect();
    // SAFETY: forwarded contract.
    unsafe { map(h, &refs, prot, None) }
}

/// `xengnttab_unmap`.
///
/// # Safety
/// `h` from `xengnttab_open`; `addr` from one of its map calls.
#[no_mangle]
pub unsafe extern "C" fn xengnttab_unmap(
    h: *mut GntHandle,
    addr: *mut c_void,
    _count: u32,
) -> c_int {
    // SAFETY: see function contract.
    match unsafe { gnt(h) } {
        Some(h) => unmap(h, addr),
        None => -1,
    }
}
