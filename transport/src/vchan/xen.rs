//! Real Xen backend: `/dev/xen/gntalloc` (share), `/dev/xen/gntdev` (map) and
//! `/dev/xen/evtchn` (event channels), through the Linux uapi ioctls of `xen/gntalloc.h`,
//! `xen/gntdev.h` and `xen/evtchn.h`. All of the backend's device `unsafe` is in this module;
//! [`abi`] holds the ioctl numbers and structure layouts (checked against the installed
//! headers by `tests/tests/transport_xen_abi.rs`). Unmap notifications are registered with the
//! kernel, so they also fire when this process dies.

use super::mem::{Mapping, PAGE_SIZE};
use super::{Backend, DomId, EventChannel, EvtchnPort, GrantRef, UnmapNotify};
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::NonNull;
use std::sync::Arc;

/// ioctl numbers and argument layouts of the Linux Xen devices.
pub mod abi {
    const fn ioc_none(ty: u8, nr: u8, size: usize) -> u64 {
        // _IOC(_IOC_NONE, type, nr, size) on x86/arm: dir 0 << 30 | size << 16 | type << 8 | nr.
        ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
    }

    /// `struct ioctl_gntalloc_alloc_gref` with one `gref_ids` slot (more follow in memory).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct GntallocAllocGref {
        /// Peer domain.
        pub domid: u16,
        /// `GNTALLOC_FLAG_WRITABLE`.
        pub flags: u16,
        /// Number of pages.
        pub count: u32,
        /// Out: mmap offset.
        pub index: u64,
        /// Out: the first grant reference.
        pub gref_ids: [u32; 1],
    }

    /// `struct ioctl_gntalloc_dealloc_gref`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct GntallocDeallocGref {
        /// mmap offset from the alloc.
        pub index: u64,
        /// Number of pages.
        pub count: u32,
    }

    /// `struct ioctl_gntalloc_unmap_notify` (same layout as gntdev's).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UnmapNotify {
        /// mmap offset plus byte offset in the page.
        pub index: u64,
        /// `UNMAP_NOTIFY_*` bits.
        pub action: u32,
        /// Port to signal.
        pub event_channel_port: u32,
    }

    /// `struct ioctl_gntdev_grant_ref`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct GntdevGrantRef {
        /// Granting domain.
        pub domid: u32,
        /// Grant reference.
        pub r#ref: u32,
    }

    /// `struct ioctl_gntdev_map_grant_ref` with one `refs` slot (more follow in memory).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct GntdevMapGrantRef {
        /// Number of refs.
        pub count: u32,
        /// Padding.
        pub pad: u32,
        /// Out: mmap offset.
        pub index: u64,
        /// The first ref.
        pub refs: [GntdevGrantRef; 1],
    }

    /// `struct ioctl_gntdev_unmap_grant_ref`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct GntdevUnmapGrantRef {
        /// mmap offset from the map.
        pub index: u64,
        /// Number of pages.
        pub count: u32,
        /// Padding.
        pub pad: u32,
    }

    /// `struct ioctl_evtchn_bind_interdomain`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct EvtchnBindInterdomain {
        /// Remote domain.
        pub remote_domain: u32,
        /// Remote port.
        pub remote_port: u32,
    }

    /// `struct ioctl_evtchn_bind_unbound_port`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct EvtchnBindUnboundPort {
        /// Domain allowed to bind.
        pub remote_domain: u32,
    }

    /// `struct ioctl_evtchn_unbind` / `struct ioctl_evtchn_notify`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct EvtchnPortArg {
        /// Local port.
        pub port: u32,
    }

    /// `GNTALLOC_FLAG_WRITABLE`.
    pub const GNTALLOC_FLAG_WRITABLE: u16 = 1;
    /// `UNMAP_NOTIFY_CLEAR_BYTE`.
    pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
    /// `UNMAP_NOTIFY_SEND_EVENT`.
    pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;
    /// `IOCTL_GNTALLOC_ALLOC_GREF`.
    pub const IOCTL_GNTALLOC_ALLOC_GREF: u64 = ioc_none(b'G', 5, size_of::<GntallocAllocGref>());
    /// `IOCTL_GNTALLOC_DEALLOC_GREF`.
    pub const IOCTL_GNTALLOC_DEALLOC_GREF: u64 =
        ioc_none(b'G', 6, size_of::<GntallocDeallocGref>());
    /// `IOCTL_GNTALLOC_SET_UNMAP_NOTIFY`.
    pub const IOCTL_GNTALLOC_SET_UNMAP_NOTIFY: u64 = ioc_none(b'G', 7, size_of::<UnmapNotify>());
    /// `IOCTL_GNTDEV_MAP_GRANT_REF`.
    pub const IOCTL_GNTDEV_MAP_GRANT_REF: u64 = ioc_none(b'G', 0, size_of::<GntdevMapGrantRef>());
    /// `IOCTL_GNTDEV_UNMAP_GRANT_REF`.
    pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u64 =
        ioc_none(b'G', 1, size_of::<GntdevUnmapGrantRef>());
    /// `IOCTL_GNTDEV_SET_UNMAP_NOTIFY`.
    pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u64 = ioc_none(b'G', 7, size_of::<UnmapNotify>());
    /// `IOCTL_EVTCHN_BIND_INTERDOMAIN`.
    pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: u64 =
        ioc_none(b'E', 1, size_of::<EvtchnBindInterdomain>());
    /// `IOCTL_EVTCHN_BIND_UNBOUND_PORT`.
    pub const IOCTL_EVTCHN_BIND_UNBOUND_PORT: u64 =
        ioc_none(b'E', 2, size_of::<EvtchnBindUnboundPort>());
    /// `IOCTL_EVTCHN_UNBIND`.
    pub const IOCTL_EVTCHN_UNBIND: u64 = ioc_none(b'E', 3, size_of::<EvtchnPortArg>());
    /// `IOCTL_EVTCHN_NOTIFY`.
    pub const IOCTL_EVTCHN_NOTIFY: u64 = ioc_none(b'E', 4, size_of::<EvtchnPortArg>());
}

fn open_dev(path: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            Error::io(
                format!("opening {path} (is this a Xen domain with the xen-gntalloc/xen-gntdev/xen-evtchn drivers loaded?)"),
                e,
            )
        })
}

/// Call an ioctl whose argument is `arg` (a `#[repr(C)]` struct or a buffer laid out like one).
///
/// # Safety
/// `arg` must point to memory laid out as the ioctl `req` expects, valid for its whole size.
unsafe fn ioctl(fd: RawFd, req: u64, arg: *mut libc::c_void, what: &str) -> Result<libc::c_int> {
    // SAFETY: forwarded contract.
    let rc = unsafe { libc::ioctl(fd, req as _, arg) };
    if rc < 0 {
        return Err(Error::io(what.to_string(), std::io::Error::last_os_error()));
    }
    Ok(rc)
}

/// The `/dev/xen` backend.
#[derive(Debug)]
pub struct XenBackend {
    gntalloc: Arc<File>,
    gntdev: Arc<File>,
}

impl XenBackend {
    /// Open `/dev/xen/gntalloc` and `/dev/xen/gntdev` (event channels open `/dev/xen/evtchn`
    /// per channel).
    pub fn open() -> Result<XenBackend> {
        Ok(XenBackend {
            gntalloc: Arc::new(open_dev("/dev/xen/gntalloc")?),
            gntdev: Arc::new(open_dev("/dev/xen/gntdev")?),
        })
    }

    fn set_notify(fd: RawFd, req: u64, index: u64, n: &UnmapNotify) -> Result<()> {
        let mut arg = abi::UnmapNotify {
            index: index + n.offset as u64,
            action: abi::UNMAP_NOTIFY_CLEAR_BYTE | abi::UNMAP_NOTIFY_SEND_EVENT,
            event_channel_port: n.event.local_port().0,
        };
        // SAFETY: `arg` is the ioctl's struct.
        unsafe {
            ioctl(
                fd,
                req,
                (&mut arg as *mut abi::UnmapNotify).cast(),
                "setting an unmap notification",
            )
        }?;
        Ok(())
    }

    fn mmap(fd: RawFd, len: usize, writable: bool, index: u64) -> Result<NonNull<u8>> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: mapping a device region the kernel just set up at `index`; result checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                index as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io(
                "mapping grant pages",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(NonNull::new(p.cast()).expect("mmap returned non-null"))
    }
}

impl Backend for XenBackend {
    fn share(
        &self,
        peer: DomId,
        count: usize,
        notify: Option<UnmapNotify>,
    ) -> Result<(Vec<GrantRef>, Mapping)> {
        if count == 0 {
            return Err(Error::Vchan("sharing zero pages".into()));
        }
        // The struct ends in a flexible array: allocate room for `count` refs, 8-aligned.
        let words = (size_of::<abi::GntallocAllocGref>() + 4 * count).div_ceil(8);
        let mut buf = vec![0u64; words];
        let arg = buf.as_mut_ptr().cast::<abi::GntallocAllocGref>();
        // SAFETY: `buf` is large enough and aligned for the header struct.
        unsafe {
            (*arg).domid = peer.0;
            (*arg).flags = abi::GNTALLOC_FLAG_WRITABLE;
            (*arg).count = count as u32;
        }
        let fd = self.gntalloc.as_raw_fd();
        // SAFETY: `arg` has the layout the ioctl expects plus `count` ref slots.
        unsafe {
            ioctl(
                fd,
                abi::IOCTL_GNTALLOC_ALLOC_GREF,
                arg.cast(),
                "allocating grant references",
            )
        }?;
        // SAFETY: the kernel filled `index` and `count` refs.
        let (index, refs) = unsafe {
            let ids = std::ptr::addr_of!((*arg).gref_ids).cast::<u32>();
            (
                (*arg).index,
                (0..count)
                    .map(|i| GrantRef(*ids.add(i)))
                    .collect::<Vec<_>>(),
            )
        };
        let len = count * PAGE_SIZE;
        let mapped = Self::mmap(fd, len, true, index);
        // The unmap notification must be set while the grefs are still on this file's list:
        // after DEALLOC_GREF the kernel no longer finds them (ENOENT), as measured on real Xen
        // (scripts/xen-vm); libxenvchan's xengntshr_share_page_notify orders it the same way.
        let notified = match (&mapped, &notify) {
            (Ok(_), Some(n)) => {
                Self::set_notify(fd, abi::IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, index, n)
            }
            _ => Ok(()),
        };
        // Drop our reference now: the pages are freed when the mapping goes away.
        let mut dealloc = abi::GntallocDeallocGref {
            index,
            count: count as u32,
        };
        // SAFETY: `dealloc` is the ioctl's struct.
        let _ = unsafe {
            ioctl(
                fd,
                abi::IOCTL_GNTALLOC_DEALLOC_GREF,
                (&mut dealloc as *mut abi::GntallocDeallocGref).cast(),
                "releasing grant references",
            )
        };
        let ptr = mapped?;
        if let Err(e) = notified {
            // SAFETY: unmapping what we just mapped.
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
            return Err(e);
        }
        let addr = ptr.as_ptr() as usize;
        let keep = self.gntalloc.clone();
        let release = Box::new(move || {
            // SAFETY: unmapping exactly our mapping, once.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            drop(keep);
        });
        // SAFETY: a page-aligned device mapping of `len` bytes, released only by `release`.
        Ok((refs, unsafe { Mapping::new(ptr, len, None, Some(release)) }))
    }

    fn map(
        &self,
        peer: DomId,
        refs: &[GrantRef],
        writable: bool,
        notify: Option<UnmapNotify>,
    ) -> Result<Mapping> {
        let count = refs.len();
        if count == 0 {
            return Err(Error::Vchan("mapping zero grants".into()));
        }
        let words = (size_of::<abi::GntdevMapGrantRef>() + 8 * count).div_ceil(8);
        let mut buf = vec![0u64; words];
        let arg = buf.as_mut_ptr().cast::<abi::GntdevMapGrantRef>();
        // SAFETY: `buf` has room for the header and `count` refs, 8-aligned.
        unsafe {
            (*arg).count = count as u32;
            let slots = std::ptr::addr_of_mut!((*arg).refs).cast::<abi::GntdevGrantRef>();
            for (i, r) in refs.iter().enumerate() {
                *slots.add(i) = abi::GntdevGrantRef {
                    domid: peer.0.into(),
                    r#ref: r.0,
                };
            }
        }
        let fd = self.gntdev.as_raw_fd();
        // SAFETY: `arg` has the ioctl's layout plus `count` ref slots.
        unsafe {
            ioctl(
                fd,
                abi::IOCTL_GNTDEV_MAP_GRANT_REF,
                arg.cast(),
                "mapping grant references",
            )
        }?;
        // SAFETY: the kernel filled `index`.
        let index = unsafe { (*arg).index };
        let len = count * PAGE_SIZE;
        let unmap_ioctl = move |fd: RawFd| {
            let mut u = abi::GntdevUnmapGrantRef {
                index,
                count: count as u32,
                pad: 0,
            };
            // SAFETY: `u` is the ioctl's struct.
            let _ = unsafe {
                ioctl(
                    fd,
                    abi::IOCTL_GNTDEV_UNMAP_GRANT_REF,
                    (&mut u as *mut abi::GntdevUnmapGrantRef).cast(),
                    "unmapping grants",
                )
            };
        };
        let ptr = match Self::mmap(fd, len, writable, index) {
            Ok(p) => p,
            Err(e) => {
                unmap_ioctl(fd);
                return Err(e);
            }
        };
        if let Some(n) = &notify {
            if let Err(e) = Self::set_notify(fd, abi::IOCTL_GNTDEV_SET_UNMAP_NOTIFY, index, n) {
                // SAFETY: unmapping what we just mapped.
                unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
                unmap_ioctl(fd);
                return Err(e);
            }
        }
        let addr = ptr.as_ptr() as usize;
        let keep = self.gntdev.clone();
        let release = Box::new(move || {
            // SAFETY: unmapping exactly our mapping, once.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            unmap_ioctl(keep.as_raw_fd());
        });
        // SAFETY: a page-aligned device mapping of `len` bytes, released only by `release`.
        Ok(unsafe { Mapping::new(ptr, len, None, Some(release)) })
    }

    fn bind_unbound(&self, peer: DomId) -> Result<Arc<dyn EventChannel>> {
        let f = open_evtchn()?;
        let mut arg = abi::EvtchnBindUnboundPort {
            remote_domain: peer.0.into(),
        };
        // SAFETY: `arg` is the ioctl's struct.
        let port = unsafe {
            ioctl(
                f.as_raw_fd(),
                abi::IOCTL_EVTCHN_BIND_UNBOUND_PORT,
                (&mut arg as *mut abi::EvtchnBindUnboundPort).cast(),
                "allocating an unbound event channel",
            )
        }?;
        Ok(Arc::new(XenEvtchn {
            file: f,
            port: port as u32,
        }))
    }

    fn bind_interdomain(&self, peer: DomId, remote: EvtchnPort) -> Result<Arc<dyn EventChannel>> {
        let f = open_evtchn()?;
        let mut arg = abi::EvtchnBindInterdomain {
            remote_domain: peer.0.into(),
            remote_port: remote.0,
        };
        // SAFETY: `arg` is the ioctl's struct.
        let port = unsafe {
            ioctl(
                f.as_raw_fd(),
                abi::IOCTL_EVTCHN_BIND_INTERDOMAIN,
                (&mut arg as *mut abi::EvtchnBindInterdomain).cast(),
                "binding to the peer's event channel",
            )
        }?;
        Ok(Arc::new(XenEvtchn {
            file: f,
            port: port as u32,
        }))
    }

    fn name(&self) -> &'static str {
        "xen"
    }
}

fn open_evtchn() -> Result<File> {
    let f = open_dev("/dev/xen/evtchn")?;
    // SAFETY: fcntl on a descriptor we own.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(Error::io(
            "making /dev/xen/evtchn non-blocking",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(f)
}

/// One event channel on its own `/dev/xen/evtchn` descriptor.
#[derive(Debug)]
struct XenEvtchn {
    file: File,
    port: u32,
}

impl EventChannel for XenEvtchn {
    fn local_port(&self) -> EvtchnPort {
        EvtchnPort(self.port)
    }

    fn notify(&self) -> Result<()> {
        let mut arg = abi::EvtchnPortArg { port: self.port };
        // SAFETY: `arg` is the ioctl's struct.
        unsafe {
            ioctl(
                self.file.as_raw_fd(),
                abi::IOCTL_EVTCHN_NOTIFY,
                (&mut arg as *mut abi::EvtchnPortArg).cast(),
                "notifying the event channel",
            )
        }?;
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn drain(&self) -> Result<u64> {
        let mut n = 0u64;
        loop {
            let mut ports = [0u32; 64];
            // SAFETY: reading into a buffer of 64 u32s.
            let r = unsafe {
                libc::read(
                    self.file.as_raw_fd(),
                    ports.as_mut_ptr().cast(),
                    size_of_val(&ports),
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(Error::io("reading pending events", e));
            }
            let k = r as usize / 4;
            if k == 0 {
                break;
            }
            n += k as u64;
            // Unmask: write the ports back.
            // SAFETY: writing `k` u32s from the buffer just read.
            let w = unsafe { libc::write(self.file.as_raw_fd(), ports.as_ptr().cast(), k * 4) };
            if w < 0 {
                return Err(Error::io(
                    "unmasking event channel",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(n)
    }
}

impl Drop for XenEvtchn {
    fn drop(&mut self) {
        let mut arg = abi::EvtchnPortArg { port: self.port };
        // SAFETY: `arg` is the ioctl's struct.
        let _ = unsafe {
            ioctl(
                self.file.as_raw_fd(),
                abi::IOCTL_EVTCHN_UNBIND,
                (&mut arg as *mut abi::EvtchnPortArg).cast(),
                "unbinding",
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::abi::*;

    #[test]
    fn layouts_have_the_uapi_sizes() {
        assert_eq!(size_of::<GntallocAllocGref>(), 24);
        assert_eq!(size_of::<GntallocDeallocGref>(), 16);
        assert_eq!(size_of::<UnmapNotify>(), 16);
        assert_eq!(size_of::<GntdevMapGrantRef>(), 24);
        assert_eq!(size_of::<GntdevUnmapGrantRef>(), 16);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
    }

    #[test]
    fn opening_says_which_device_is_missing() {
        match super::XenBackend::open() {
            Ok(_) => assert!(std::path::Path::new("/dev/xen/gntalloc").exists()),
            Err(e) => assert!(e.to_string().contains("/dev/xen/"), "{e}"),
        }
    }
}
