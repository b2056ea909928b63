//! Simulated Xen (DESIGN.md §4), for machines without a hypervisor: a grant reference is a
//! 4096-byte file `$DIR/g<ref>` mapped shared; an event-channel port is an AF_UNIX datagram
//! socket `$DIR/ev<port>`. Binding to a remote unbound port sends it the two native u32s
//! `{0xC0FFEE, local_port}`; a notify sends `{0xE7E7, local_port}`. Refs are allocated from 8
//! and ports from 10 by creating the lowest free file/socket, so several processes (and the
//! C shim that runs Debian's libxenvchan) can share one `$DIR`.
//!
//! Death notification (what Xen's unmap notification gives a real vchan when the mapping
//! process dies): the owner of shared grants listens on an abstract unix stream socket named
//! after `$DIR` and the first grant reference ([`SimXen::live_addr`]; abstract, so nothing is
//! left in `$DIR` whichever side dies), one watcher thread; a process mapping them with an
//! unmap notification connects and
//! sends `{offset, port to notify}` (two native u32s). A clean release sends `R` first (the
//! mapping's own notification has already fired). A connection that ends without it means the
//! mapper died: the watcher clears the byte at `offset` in the page and sends `MSG_NOTIFY` to
//! the port, as the dead process's unmap notification would have.

use super::mem::{Mapping, PAGE_SIZE};
use super::{Backend, DomId, EventChannel, EvtchnPort, GrantRef, UnmapNotify};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// The port each of this process's interdomain-bound ports signals: `(sim dir, local port)`
/// to the peer port, so a mapping's death watcher knows where the unmap notification goes.
static PEERS: Mutex<Option<HashMap<(PathBuf, u32), u32>>> = Mutex::new(None);

fn peers() -> std::sync::MutexGuard<'static, Option<HashMap<(PathBuf, u32), u32>>> {
    PEERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The byte a mapper sends before closing its death-watch connection on a clean release.
const MSG_RELEASED: u8 = b'R';

/// Message a binder sends to the unbound port it binds to.
pub const MSG_BIND: u32 = 0xC0FFEE;
/// Message a notify sends.
pub const MSG_NOTIFY: u32 = 0xE7E7;
/// First grant reference handed out.
pub const FIRST_REF: u32 = 8;
/// First port handed out.
pub const FIRST_PORT: u32 = 10;
const MAX_SCAN: u32 = 1 << 20;

/// The environment variable naming the simulation directory.
pub const ENV_DIR: &str = "XEN_SIM_DIR";

/// A simulated hypervisor rooted at one directory.
#[derive(Debug, Clone)]
pub struct SimXen {
    dir: PathBuf,
}

impl SimXen {
    /// Use `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<SimXen> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating sim dir {}", dir.display()), e))?;
        Ok(SimXen { dir })
    }

    /// Use `$XEN_SIM_DIR`.
    pub fn from_env() -> Result<SimXen> {
        match std::env::var_os(ENV_DIR) {
            Some(d) if !d.is_empty() => SimXen::new(PathBuf::from(d)),
            _ => Err(Error::Vchan(format!(
                "{ENV_DIR} is not set: point it at the simulated-Xen directory shared by both ends"
            ))),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of grant `r`.
    pub fn grant_path(&self, r: GrantRef) -> PathBuf {
        self.dir.join(format!("g{}", r.0))
    }

    /// The abstract unix socket address of the death watch of the grants whose first
    /// reference is `r`: named by the sim directory's device and inode (a long path would not
    /// fit a socket address) and `r`.
    pub fn live_addr(&self, r: GrantRef) -> std::io::Result<SocketAddr> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&self.dir)?;
        SocketAddr::from_abstract_name(format!("ddstor-sim-{:x}-{:x}-g{}", m.dev(), m.ino(), r.0))
    }

    /// Path of port `p`.
    pub fn port_path(&self, p: EvtchnPort) -> PathBuf {
        self.dir.join(format!("ev{}", p.0))
    }

    /// Allocate one grant file (lowest free number from 8), sized one page.
    pub fn alloc_grant(&self) -> Result<GrantRef> {
        self.alloc_grant_from(FIRST_REF)
    }

    /// Allocate `count` grant files, each the lowest free number (one forward scan).
    pub fn alloc_grants(&self, count: usize) -> Result<Vec<GrantRef>> {
        let mut refs = Vec::with_capacity(count);
        let mut from = FIRST_REF;
        for _ in 0..count {
            match self.alloc_grant_from(from) {
                Ok(r) => {
                    from = r.0 + 1;
                    refs.push(r);
                }
                Err(e) => {
                    for r in refs {
                        let _ = std::fs::remove_file(self.grant_path(r));
                    }
                    return Err(e);
                }
            }
        }
        Ok(refs)
    }

    fn alloc_grant_from(&self, first: u32) -> Result<GrantRef> {
        for n in first..FIRST_REF + MAX_SCAN {
            let p = self.grant_path(GrantRef(n));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
            {
                Ok(f) => {
                    f.set_len(PAGE_SIZE as u64)
                        .map_err(|e| Error::io(format!("sizing {}", p.display()), e))?;
                    return Ok(GrantRef(n));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(format!("creating {}", p.display()), e)),
            }
        }
        Err(Error::Vchan("no free grant reference".into()))
    }

    /// Map grant files contiguously. With `unlink_on_release`, the files are removed when the
    /// mapping is dropped (the owner ending its grant).
    pub fn map_files(
        &self,
        refs: &[GrantRef],
        writable: bool,
        notify: Option<UnmapNotify>,
        unlink_on_release: bool,
    ) -> Result<Mapping> {
        if refs.is_empty() {
            return Err(Error::Vchan("no grant references to map".into()));
        }
        let len = refs.len() * PAGE_SIZE;
        let mut files = Vec::with_capacity(refs.len());
        for r in refs {
            let p = self.grant_path(*r);
            let f = OpenOptions::new()
                .read(true)
                .write(writable)
                .open(&p)
                .map_err(|e| {
                    if e.kind() == ErrorKind::NotFound {
                        Error::Vchan(format!(
                            "grant reference {r} does not exist ({})",
                            p.display()
                        ))
                    } else {
                        Error::io(format!("opening {}", p.display()), e)
                    }
                })?;
            let size = f.metadata().map_err(|e| Error::io("stat grant", e))?.len();
            if size < PAGE_SIZE as u64 {
                return Err(Error::Vchan(format!(
                    "grant file {} is {size} bytes, not a page",
                    p.display()
                )));
            }
            files.push(f);
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: reserving address space (no file, no access); the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::io(
                "reserving address space",
                std::io::Error::last_os_error(),
            ));
        }
        for (i, f) in files.iter().enumerate() {
            // SAFETY: MAP_FIXED over our own reservation, one page per file, offset 0.
            let p = unsafe {
                libc::mmap(
                    base.cast::<u8>().add(i * PAGE_SIZE).cast(),
                    PAGE_SIZE,
                    prot,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    f.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                let e = std::io::Error::last_os_error();
                // SAFETY: unmapping the reservation made above.
                unsafe { libc::munmap(base, len) };
                return Err(Error::io("mapping a grant file", e));
            }
        }
        let paths: Vec<PathBuf> = if unlink_on_release {
            refs.iter().map(|r| self.grant_path(*r)).collect()
        } else {
            Vec::new()
        };
        // The owner watches for mappers dying; a mapper with an unmap notification registers.
        let watcher = if unlink_on_release && writable {
            self.watch_mappers(refs[0])
        } else {
            None
        };
        let mut watched = match &notify {
            Some(n) if !unlink_on_release && writable => self.register_mapper(refs[0], n),
            _ => None,
        };
        let addr = base as usize;
        let release = Box::new(move || {
            if let Some((l, acceptor)) = watcher {
                // Close the watch before the grant files go: a new share may reuse the first
                // reference, and with it the socket name, as soon as they are gone.
                // SAFETY: shutting down a socket this closure owns; wakes the blocked accept.
                unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
                let _ = acceptor.join();
                drop(l);
            }
            // SAFETY: unmapping exactly the range mapped above, once.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            for p in paths {
                let _ = std::fs::remove_file(p);
            }
            if let Some(c) = watched.as_mut() {
                // A clean release: the mapping's own notification has fired (or was disarmed).
                let _ = c.write_all(&[MSG_RELEASED]);
            }
        });
        let ptr = NonNull::new(base.cast::<u8>()).expect("mmap returned non-null");
        if !writable {
            // Read-only mappings must never be written (notify included).
            if notify.is_some() {
                // SAFETY: unmapping the range mapped above.
                unsafe { libc::munmap(base, len) };
                return Err(Error::Vchan(
                    "unmap notification needs a writable mapping".into(),
                ));
            }
        }
        // SAFETY: `base` is a page-aligned mapping of `len` bytes released only by `release`.
        Ok(unsafe { Mapping::new(ptr, len, notify, Some(release)) })
    }

    /// Owner side of the death notification: listens on [`SimXen::live_addr`] and, for each
    /// mapper that registers, waits (on a thread) for its release or its death.
    fn watch_mappers(
        &self,
        first: GrantRef,
    ) -> Option<(Arc<UnixListener>, std::thread::JoinHandle<()>)> {
        let l = match self
            .live_addr(first)
            .and_then(|a| UnixListener::bind_addr(&a))
        {
            Ok(l) => Arc::new(l),
            Err(e) => {
                tracing::debug!(grant = %first, error = %e, "sim: no death watch");
                return None;
            }
        };
        let (sim, acceptor) = (self.clone(), l.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("sim-live-g{}", first.0))
            .spawn(move || {
                // Ends when the owner's release shuts the listener down.
                while let Ok((c, _)) = acceptor.accept() {
                    let sim = sim.clone();
                    let _ = std::thread::Builder::new()
                        .name(format!("sim-watch-g{}", first.0))
                        .spawn(move || sim.watch_one(first, c));
                }
            });
        match spawned {
            Ok(t) => Some((l, t)),
            Err(e) => {
                tracing::debug!(error = %e, "sim: no death watch thread");
                None
            }
        }
    }

    /// One registered mapper: on a connection that ends without [`MSG_RELEASED`], performs its
    /// unmap notification (clear the byte, notify the port).
    fn watch_one(&self, first: GrantRef, mut c: UnixStream) {
        let mut reg = [0u8; 8];
        if c.read_exact(&mut reg).is_err() {
            return;
        }
        let offset = u32::from_ne_bytes(reg[..4].try_into().expect("4 bytes")) as usize;
        let port = u32::from_ne_bytes(reg[4..].try_into().expect("4 bytes"));
        // Our own view of the page, kept until the verdict (the owner may release meanwhile).
        let page = match self.map_files(&[first], true, None, false) {
            Ok(p) => p,
            Err(_) => return,
        };
        let mut b = [0u8; 1];
        let released = matches!(c.read(&mut b), Ok(1) if b[0] == MSG_RELEASED);
        if released || offset >= page.len() {
            return;
        }
        tracing::debug!(grant = %first, offset, port, "sim: a mapping process died; notifying for it");
        page.u8_at(offset).store(0, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&MSG_NOTIFY.to_ne_bytes());
        if let Ok(s) = UnixDatagram::unbound() {
            let _ = s.send_to(&msg, self.port_path(EvtchnPort(port)));
        }
    }

    /// Mapper side: registers `n` with the owner's death watch of the grants starting at
    /// `first`. `None` when there is nothing to register with (no watch, or an event channel
    /// this process did not bind interdomain).
    fn register_mapper(&self, first: GrantRef, n: &UnmapNotify) -> Option<UnixStream> {
        let local = n.event.local_port().0;
        let peer = *peers().as_ref()?.get(&(self.dir.clone(), local))?;
        let mut c = UnixStream::connect_addr(&self.live_addr(first).ok()?).ok()?;
        let mut reg = [0u8; 8];
        reg[..4].copy_from_slice(&u32::try_from(n.offset).ok()?.to_ne_bytes());
        reg[4..].copy_from_slice(&peer.to_ne_bytes());
        c.write_all(&reg).ok()?;
        Some(c)
    }

    /// Bind a new unbound port (lowest free number from 10).
    pub fn bind_unbound_port(&self) -> Result<SimEvtchn> {
        let (sock, port) = self.new_socket()?;
        Ok(SimEvtchn {
            sock,
            port,
            peer: AtomicU32::new(0),
            dir: self.dir.clone(),
        })
    }

    /// Bind to the unbound port `remote`, telling it our port.
    pub fn bind_interdomain_port(&self, remote: EvtchnPort) -> Result<SimEvtchn> {
        let (sock, port) = self.new_socket()?;
        let ev = SimEvtchn {
            sock,
            port,
            peer: AtomicU32::new(remote.0),
            dir: self.dir.clone(),
        };
        peers()
            .get_or_insert_with(HashMap::new)
            .insert((self.dir.clone(), port), remote.0);
        ev.send(MSG_BIND).map_err(|e| match e {
            Error::Io { source, .. }
                if source.kind() == ErrorKind::NotFound
                    || source.kind() == ErrorKind::ConnectionRefused =>
            {
                Error::Vchan(format!("event channel port {remote} does not exist"))
            }
            e => e,
        })?;
        Ok(ev)
    }

    fn new_socket(&self) -> Result<(UnixDatagram, u32)> {
        for n in FIRST_PORT..FIRST_PORT + MAX_SCAN {
            let p = self.port_path(EvtchnPort(n));
            match UnixDatagram::bind(&p) {
                Ok(s) => {
                    s.set_nonblocking(true)
                        .map_err(|e| Error::io("nonblocking socket", e))?;
                    return Ok((s, n));
                }
                Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
                Err(e) => return Err(Error::io(format!("binding {}", p.display()), e)),
            }
        }
        Err(Error::Vchan("no free event channel port".into()))
    }
}

/// One simulated event-channel port.
#[derive(Debug)]
pub struct SimEvtchn {
    sock: UnixDatagram,
    port: u32,
    peer: AtomicU32,
    dir: PathBuf,
}

impl SimEvtchn {
    fn send(&self, magic: u32) -> Result<()> {
        let peer = self.peer.load(Ordering::SeqCst);
        if peer == 0 {
            return Ok(());
        }
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&magic.to_ne_bytes());
        msg[4..].copy_from_slice(&self.port.to_ne_bytes());
        let path = self.dir.join(format!("ev{peer}"));
        match self.sock.send_to(&msg, &path) {
            Ok(_) => Ok(()),
            // A full queue already holds a pending event for the peer.
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
            Err(e)
                if magic == MSG_NOTIFY
                    && matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) =>
            {
                Ok(())
            }
            Err(e) => Err(Error::io(format!("signalling {}", path.display()), e)),
        }
    }

    /// Receive one message without blocking: `Some((magic, sender_port))`.
    pub fn recv_one(&self) -> Result<Option<(u32, u32)>> {
        let mut buf = [0u8; 16];
        match self.sock.recv(&mut buf) {
            Ok(8) => {
                let magic = u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes"));
                let from = u32::from_ne_bytes(buf[4..8].try_into().expect("4 bytes"));
                if magic == MSG_BIND {
                    self.peer.store(from, Ordering::SeqCst);
                }
                Ok(Some((magic, from)))
            }
            Ok(_) => Ok(Some((0, 0))),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(Error::io("receiving an event", e)),
        }
    }

    /// The port bound to us, once known.
    pub fn peer_port(&self) -> Option<EvtchnPort> {
        match self.peer.load(Ordering::SeqCst) {
            0 => None,
            p => Some(EvtchnPort(p)),
        }
    }
}

impl EventChannel for SimEvtchn {
    fn local_port(&self) -> EvtchnPort {
        EvtchnPort(self.port)
    }

    fn notify(&self) -> Result<()> {
        self.send(MSG_NOTIFY)
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn drain(&self) -> Result<u64> {
        let mut n = 0;
        while self.recv_one()?.is_some() {
            n += 1;
        }
        Ok(n)
    }
}

impl Drop for SimEvtchn {
    fn drop(&mut self) {
        if let Some(m) = peers().as_mut() {
            m.remove(&(self.dir.clone(), self.port));
        }
        let _ = std::fs::remove_file(self.dir.join(format!("ev{}", self.port)));
    }
}

impl Backend for SimXen {
    fn share(
        &self,
        _peer: DomId,
        count: usize,
        notify: Option<UnmapNotify>,
    ) -> Result<(Vec<GrantRef>, Mapping)> {
        let refs = self.alloc_grants(count)?;
        match self.map_files(&refs, true, notify, true) {
            Ok(m) => Ok((refs, m)),
            Err(e) => {
                for r in refs {
                    let _ = std::fs::remove_file(self.grant_path(r));
                }
                Err(e)
            }
        }
    }

    fn map(
        &self,
        _peer: DomId,
        refs: &[GrantRef],
        writable: bool,
        notify: Option<UnmapNotify>,
    ) -> Result<Mapping> {
        self.map_files(refs, writable, notify, false)
    }

    fn bind_unbound(&self, _peer: DomId) -> Result<Arc<dyn EventChannel>> {
        Ok(Arc::new(self.bind_unbound_port()?))
    }

    fn bind_interdomain(&self, _peer: DomId, remote: EvtchnPort) -> Result<Arc<dyn EventChannel>> {
        Ok(Arc::new(self.bind_interdomain_port(remote)?))
    }

    fn name(&self) -> &'static str {
        "sim"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_and_ports_are_lowest_free_numbers_and_freed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimXen::new(tmp.path()).unwrap();
        let (refs, m) = sim.share(DomId(1), 2, None).unwrap();
        assert_eq!(refs, vec![GrantRef(8), GrantRef(9)]);
        assert!(tmp.path().join("g8").exists());
        let a = sim.bind_unbound_port().unwrap();
        assert_eq!(a.local_port(), EvtchnPort(10));
        let b = sim.bind_interdomain_port(EvtchnPort(10)).unwrap();
        assert_eq!(b.local_port(), EvtchnPort(11));
        // The bind message tells the unbound side its peer.
        assert_eq!(a.recv_one().unwrap(), Some((MSG_BIND, 11)));
        assert_eq!(a.peer_port(), Some(EvtchnPort(11)));
        b.notify().unwrap();
        assert_eq!(a.recv_one().unwrap(), Some((MSG_NOTIFY, 11)));
        a.notify().unwrap();
        assert_eq!(b.drain().unwrap(), 1);
        drop((m, a, b));
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "nothing left behind"
        );
    }

    /// Waits up to 5 s for one message on `ev`.
    fn next_event(ev: &SimEvtchn) -> Option<(u32, u32)> {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(5) {
            if let Some(m) = ev.recv_one().unwrap() {
                return Some(m);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        None
    }

    #[test]
    fn the_owner_sends_the_unmap_notification_of_a_mapper_that_died() {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimXen::new(tmp.path()).unwrap();
        let (refs, owner) = sim.share(DomId(1), 1, None).unwrap();
        let watch = sim.live_addr(refs[0]).unwrap();
        assert!(
            UnixStream::connect_addr(&watch).is_ok(),
            "the owner watches its grants"
        );
        let srv = sim.bind_unbound_port().unwrap();
        let cli: Arc<dyn EventChannel> =
            Arc::new(sim.bind_interdomain_port(srv.local_port()).unwrap());
        assert_eq!(srv.recv_one().unwrap().map(|m| m.0), Some(MSG_BIND));

        // A clean release: the mapping's own notification, and nothing from the watcher.
        owner.u8_at(20).store(1, Ordering::SeqCst);
        let notify = UnmapNotify {
            offset: 20,
            event: cli.clone(),
        };
        let m = sim.map(DomId(0), &refs, true, Some(notify)).unwrap();
        drop(m);
        assert_eq!(next_event(&srv), Some((MSG_NOTIFY, cli.local_port().0)));
        assert_eq!(owner.u8_at(20).load(Ordering::SeqCst), 0);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            srv.recv_one().unwrap(),
            None,
            "a clean release is notified once"
        );

        // A mapper whose registration ends without the release byte (its process died, so
        // its mapping's drop never ran): the owner clears the byte and notifies for it.
        owner.u8_at(20).store(1, Ordering::SeqCst);
        let mut c = UnixStream::connect_addr(&watch).unwrap();
        let mut reg = 20u32.to_ne_bytes().to_vec();
        reg.extend_from_slice(&srv.local_port().0.to_ne_bytes());
        c.write_all(&reg).unwrap();
        drop(c);
        assert_eq!(next_event(&srv).map(|m| m.0), Some(MSG_NOTIFY));
        assert_eq!(
            owner.u8_at(20).load(Ordering::SeqCst),
            0,
            "live byte cleared"
        );

        drop((owner, srv, cli));
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        assert!(
            UnixStream::connect_addr(&watch).is_err(),
            "the watch ends with the grants"
        );
    }

    #[test]
    fn mapped_grant_pages_are_shared_between_mappings() {
        let tmp = tempfile::tempdir().unwrap();
        let sim = SimXen::new(tmp.path()).unwrap();
        let (refs, owner) = sim.share(DomId(1), 3, None).unwrap();
        let peer = sim.map(DomId(0), &refs, true, None).unwrap();
        owner
            .u32_at(2 * PAGE_SIZE + 8)
            .store(0xDEAD_BEEF, Ordering::SeqCst);
        assert_eq!(
            peer.u32_at(2 * PAGE_SIZE + 8).load(Ordering::SeqCst),
            0xDEAD_BEEF
        );
        let err = sim
            .map(DomId(0), &[GrantRef(4242)], true, None)
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let err = sim.bind_interdomain_port(EvtchnPort(999)).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
