//! Kernel nbd devices (`/dev/nbdN`) for blkback: an attached VDI's export connected to a free
//! kernel nbd device through a socketpair, so a Xen block backend can use a plain block device.
//!
//! The classic ioctl interface is used, as `nbd-client` does: the kernel speaks only the
//! transmission phase (simple replies, no handshake), so the agent's end of the socketpair is
//! served by [`crate::server::serve_negotiated`]. Connecting is `NBD_SET_BLKSIZE`,
//! `NBD_SET_SIZE_BLOCKS`, `NBD_CLEAR_SOCK`, `NBD_SET_SOCK`, `NBD_SET_FLAGS`, `NBD_SET_TIMEOUT`,
//! `BLKROSET`, then `NBD_DO_IT` on a thread of its own (it blocks until the device is
//! disconnected); disconnecting is `NBD_DISCONNECT` (the kernel sends `NBD_CMD_DISC`), after
//! which `NBD_DO_IT` returns and the thread finishes with `NBD_CLEAR_QUE`, `NBD_CLEAR_SOCK` and
//! `BLKROSET` 0 (the device is left as it was found).
//!
//! **Read-only.** One device serves every datapath of a VDI, and the VDI's mode can change
//! while it is connected (a second dp attaches RW while the first is RO). The device is
//! therefore always connected with the capability for writes ([`device_flags`]: never
//! `NBD_FLAG_READ_ONLY`, which the kernel turns into a disk-level read-only bit at `NBD_DO_IT`
//! that nothing but a reconnection clears), and its read-only state is the block device's own
//! policy bit (`BLKROSET`, what `blockdev --setro/--setrw` flips), set to follow the VDI's mode
//! ([`KernelDevice::set_read_only`]): writes through the device file then fail with EPERM in
//! the kernel, and a write that still reaches the export of a read-only VDI is refused there
//! with EPERM. Reconnecting instead would fail the I/O of a guest whose blkback already holds
//! the device open.
//!
//! **Timeout.** `NBD_SET_TIMEOUT` is given the configured value ([`KernelNbd::with_timeout`];
//! `[nbd] kernel_timeout_secs`, default 0 = none). With one connection, a request that exceeds
//! it makes the kernel shut the connection down for good: every later request fails with EIO
//! until the device is reconnected. The export's pause gate holds requests legitimately (from
//! `VDI.attach` until `VDI.activate`, around a snapshot's leaf switch, after `VDI.deactivate`),
//! so a timeout shorter than the longest pause kills a healthy device; with 0 the kernel only
//! logs "Possible stuck request" and waits.
//!
//! **Probes.** Right after connecting, the kernel's partition scan and udev's `blkid` read the
//! device; until `VDI.activate` those reads wait at the paused gate (they do not fail). A VDI
//! detached without ever being activated does not hang on them: `NBD_DISCONNECT` is sent,
//! then the export is closed, which fails every waiting request (ESHUTDOWN → EIO for the
//! prober) and ends the connection, so `NBD_DO_IT` returns.
//!
//! The ioctls sit behind [`NbdOps`] so their order is unit-tested without a device; only
//! [`Ioctls`] touches the kernel (the only `unsafe` here).

use crate::export::Export;
use crate::server::ServerOptions;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Whether attach connects kernel nbd devices (config `[nbd] kernel_devices`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelDevices {
    /// Use them where `/dev/nbd0` exists; otherwise (or if connecting fails) log and go on
    /// with the NBD URI only.
    #[default]
    Auto,
    /// Always: an attach fails if no device can be connected.
    On,
    /// Never.
    Off,
}

/// The ioctls of a kernel nbd device (`linux/nbd.h`), one method each.
pub trait NbdOps: Send + Sync + 'static {
    /// `NBD_SET_BLKSIZE`.
    fn set_blksize(&self, dev: &File, size: u64) -> io::Result<()>;
    /// `NBD_SET_SIZE_BLOCKS`.
    fn set_size_blocks(&self, dev: &File, blocks: u64) -> io::Result<()>;
    /// `NBD_CLEAR_SOCK`.
    fn clear_sock(&self, dev: &File) -> io::Result<()>;
    /// `NBD_SET_SOCK`: the kernel's end of the connection.
    fn set_sock(&self, dev: &File, sock: RawFd) -> io::Result<()>;
    /// `NBD_SET_FLAGS`: the export's transmission flags.
    fn set_flags(&self, dev: &File, flags: u16) -> io::Result<()>;
    /// `NBD_DO_IT`: runs the device until it is disconnected (blocks).
    fn do_it(&self, dev: &File) -> io::Result<()>;
    /// `NBD_CLEAR_QUE`.
    fn clear_que(&self, dev: &File) -> io::Result<()>;
    /// `NBD_DISCONNECT`.
    fn disconnect(&self, dev: &File) -> io::Result<()>;
    /// `NBD_SET_TIMEOUT`: seconds after which a request is timed out (0 = never).
    fn set_timeout(&self, dev: &File, secs: u64) -> io::Result<()>;
    /// `BLKROSET`: the block device's read-only policy.
    fn set_read_only(&self, dev: &File, read_only: bool) -> io::Result<()>;
}

/// [`NbdOps`] on a real device.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ioctls;

const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_CLEAR_QUE: libc::c_ulong = 0xab05;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;
/// `_IO(0x12, 93)` of `linux/fs.h`.
const BLKROSET: libc::c_ulong = 0x125d;

fn ioctl(dev: &File, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: every nbd ioctl used here takes its argument by value (an integer or a file
    // descriptor), never a pointer, so no memory is shared with the kernel; `dev` is an open
    // file for the duration of the call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl NbdOps for Ioctls {
    fn set_blksize(&self, dev: &File, size: u64) -> io::Result<()> {
        ioctl(dev, NBD_SET_BLKSIZE, size as libc::c_ulong)
    }
    fn set_size_blocks(&self, dev: &File, blocks: u64) -> io::Result<()> {
        ioctl(dev, NBD_SET_SIZE_BLOCKS, blocks as libc::c_ulong)
    }
    fn clear_sock(&self, dev: &File) -> io::Result<()> {
        ioctl(dev, NBD_CLEAR_SOCK, 0)
    }
    fn set_sock(&self, dev: &File, sock: RawFd) -> io::Result<()> {
        ioctl(dev, NBD_SET_SOCK, sock as libc::c_ulong)
    }
    fn set_flags(&self, dev: &File, flags: u16) -> io::Result<()> {
        ioctl(dev, NBD_SET_FLAGS, libc::c_ulong::from(flags))
    }
    fn do_it(&self, dev: &File) -> io::Result<()> {
        ioctl(dev, NBD_DO_IT, 0)
    }
    fn clear_que(&self, dev: &File) -> io::Result<()> {
        ioctl(dev, NBD_CLEAR_QUE, 0)
    }
    fn disconnect(&self, dev: &File) -> io::Result<()> {
        ioctl(dev, NBD_DISCONNECT, 0)
    }
    fn set_timeout(&self, dev: &File, secs: u64) -> io::Result<()> {
        ioctl(dev, NBD_SET_TIMEOUT, secs as libc::c_ulong)
    }
    fn set_read_only(&self, dev: &File, read_only: bool) -> io::Result<()> {
        let flag: libc::c_int = read_only.into();
        // SAFETY: BLKROSET reads one `int` through its argument; `flag` lives on this stack
        // frame for the whole call and the kernel does not keep the pointer.
        let r = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                BLKROSET,
                std::ptr::from_ref(&flag).cast::<libc::c_int>(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// The `nbdN` devices under `sys_block` (normally `/sys/block`), in numeric order, that no one
/// uses: no `pid` attribute (the kernel shows it while a device is connected) and not in
/// `taken` (ours, being connected).
pub fn free_devices(sys_block: &Path, taken: &[String]) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut v: Vec<(u32, String)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let n: u32 = name.strip_prefix("nbd")?.parse().ok()?;
            Some((n, name))
        })
        .filter(|(_, name)| !taken.contains(name))
        .filter(|(_, name)| !sys_block.join(name).join("pid").exists())
        .collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}

/// Block size for a device of `size` bytes: 4096 where it divides the size, else 512.
pub fn block_size_for(size: u64) -> u64 {
    if size % 4096 == 0 {
        4096
    } else {
        512
    }
}

/// The transmission flags a device is connected with: those of the export when writable,
/// whatever the export's current mode (see the module's "Read-only").
pub fn device_flags(export: &Export) -> u16 {
    use crate::proto::{TF_READ_ONLY, TF_SEND_FUA, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES};
    (crate::server::kernel_transmission_flags(export) & !TF_READ_ONLY)
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
}

/// Kernel nbd devices of the agent: which exist, which are ours.
pub struct KernelNbd {
    mode: KernelDevices,
    timeout_secs: u64,
    options: ServerOptions,
    dev_dir: PathBuf,
    sys_block: PathBuf,
    ops: Arc<dyn NbdOps>,
    taken: Mutex<Vec<String>>,
}

impl std::fmt::Debug for KernelNbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelNbd")
            .field("mode", &self.mode)
            .field("timeout_secs", &self.timeout_secs)
            .field("dev_dir", &self.dev_dir)
            .finish()
    }
}

/// One export connected to a kernel nbd device.
pub struct KernelDevice {
    path: PathBuf,
    name: String,
    dev: Arc<File>,
    ops: Arc<dyn NbdOps>,
    thread: Option<std::thread::JoinHandle<()>>,
    serve: tokio::task::JoinHandle<()>,
}

impl KernelNbd {
    /// Devices under `/dev` and `/sys/block`, real ioctls.
    pub fn new(mode: KernelDevices) -> KernelNbd {
        Self::with(mode, "/dev", "/sys/block", Arc::new(Ioctls))
    }

    /// Devices under `dev_dir`/`sys_block`, ioctls by `ops` (tests).
    pub fn with(
        mode: KernelDevices,
        dev_dir: impl Into<PathBuf>,
        sys_block: impl Into<PathBuf>,
        ops: Arc<dyn NbdOps>,
    ) -> KernelNbd {
        KernelNbd {
            mode,
            timeout_secs: 0,
            options: ServerOptions::default(),
            dev_dir: dev_dir.into(),
            sys_block: sys_block.into(),
            ops,
            taken: Mutex::new(Vec::new()),
        }
    }

    /// Devices get `NBD_SET_TIMEOUT` `secs` (0 = never time out; see the module's "Timeout").
    pub fn with_timeout(mut self, secs: u64) -> KernelNbd {
        self.timeout_secs = secs;
        self
    }

    /// The devices' connections are served with `options` (as the NBD listeners are).
    pub fn with_server_options(mut self, options: ServerOptions) -> KernelNbd {
        self.options = options;
        self
    }

    /// The configured mode.
    pub fn mode(&self) -> KernelDevices {
        self.mode
    }

    /// The configured request timeout in seconds (0 = none).
    pub fn timeout_secs(&self) -> u64 {
        self.timeout_secs
    }

    /// Whether attach should try to connect a device: never when off; when auto, only if the
    /// kernel's nbd driver is there (`nbd0` exists).
    pub fn enabled(&self) -> bool {
        match self.mode {
            KernelDevices::Off => false,
            KernelDevices::On => true,
            KernelDevices::Auto => self.dev_dir.join("nbd0").exists(),
        }
    }

    /// Connects a free device to `export`, serving the kernel's end of a socketpair.
    /// Must be called within a tokio runtime.
    pub fn connect(&self, export: Arc<Export>) -> io::Result<KernelDevice> {
        let taken = self.taken.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let free = free_devices(&self.sys_block, &taken);
        if free.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no free nbd device under {} (is the nbd module loaded with enough nbds_max?)",
                    self.sys_block.display()
                ),
            ));
        }
        let mut last = None;
        for name in free {
            match self.connect_one(&name, export.clone()) {
                Ok(d) => return Ok(d),
                Err(e) => {
                    // Taken by someone else meanwhile (EBUSY), or broken: try the next one.
                    tracing::debug!(device = name, error = %e, "nbd device not usable");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one device was tried"))
    }

    fn connect_one(&self, name: &str, export: Arc<Export>) -> io::Result<KernelDevice> {
        let path = self.dev_dir.join(name);
        let dev = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)?,
        );
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let ops = self.ops.clone();
        let size = export.size();
        let bs = block_size_for(size);
        let flags = device_flags(&export);
        ops.set_blksize(&dev, bs)?;
        ops.set_size_blocks(&dev, size / bs)?;
        ops.clear_sock(&dev)?;
        let theirs: OwnedFd = theirs.into();
        ops.set_sock(&dev, theirs.as_raw_fd())?;
        let configured = ops
            .set_flags(&dev, flags)
            .and_then(|()| ops.set_timeout(&dev, self.timeout_secs))
            .and_then(|()| ops.set_read_only(&dev, export.read_only()));
        if let Err(e) = configured {
            let _ = ops.clear_sock(&dev);
            let _ = ops.set_read_only(&dev, false);
            return Err(e);
        }
        ours.set_nonblocking(true)?;
        let ours = tokio::net::UnixStream::from_std(ours)?;
        let ename = export.name().to_string();
        if export.is_paused() {
            tracing::info!(
                device = name,
                export = ename,
                timeout_secs = self.timeout_secs,
                "kernel nbd device connected while the export is paused: its I/O (the \
                 kernel's partition scan and udev/blkid probes included) waits for \
                 VDI.activate; VDI.detach fails what still waits"
            );
        }
        let options = self.options;
        let serve = tokio::spawn(async move {
            let (r, w) = ours.into_split();
            if let Err(e) = crate::server::serve_negotiated(r, w, export, &options).await {
                tracing::info!(export = ename, error = %e, "kernel nbd connection ended");
            }
        });
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_string());
        let (d2, o2, n2) = (dev.clone(), ops.clone(), name.to_string());
        let spawned = std::thread::Builder::new()
            .name(format!("ddstor-{name}"))
            .spawn(move || {
                // The kernel holds its own reference to the socket from NBD_SET_SOCK on.
                let _keep = theirs;
                if let Err(e) = o2.do_it(&d2) {
                    tracing::debug!(device = n2, error = %e, "NBD_DO_IT returned an error");
                }
                let _ = o2.clear_que(&d2);
                let _ = o2.clear_sock(&d2);
                // Leave the device as it was found for its next user.
                let _ = o2.set_read_only(&d2, false);
            });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                // No NBD_DO_IT: undo the set-up, stop our end, free the name.
                serve.abort();
                let _ = ops.clear_sock(&dev);
                let _ = ops.set_read_only(&dev, false);
                self.taken
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|n| n != name);
                return Err(e);
            }
        };
        Ok(KernelDevice {
            path,
            name: name.to_string(),
            dev,
            ops,
            thread: Some(thread),
            serve,
        })
    }

    /// Waits for a device whose disconnection was requested ([`KernelDevice::request_disconnect`])
    /// to let go (its `NBD_DO_IT` thread ends once the connection closes), and frees its name.
    pub async fn release(&self, mut d: KernelDevice) {
        if let Some(t) = d.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        // The kernel has closed its end: the connection task ends by itself; if not, stop it.
        d.serve.abort();
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n| *n != d.name);
        tracing::info!(device = d.name, "kernel nbd device disconnected");
    }
}

impl KernelDevice {
    /// The block device's path (`/dev/nbdN`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the block device read-only or writable (`BLKROSET`), following the VDI's mode;
    /// the connection is untouched, so a blkback holding the device open notices nothing.
    pub fn set_read_only(&self, read_only: bool) -> io::Result<()> {
        self.ops.set_read_only(&self.dev, read_only)?;
        tracing::info!(
            device = self.name,
            read_only,
            "kernel nbd device mode changed"
        );
        Ok(())
    }

    /// Asks the kernel to disconnect (`NBD_DISCONNECT`: it sends `NBD_CMD_DISC`); the caller
    /// then closes the export (which ends the connection) and calls [`KernelNbd::release`].
    pub fn request_disconnect(&self) {
        if let Err(e) = self.ops.disconnect(&self.dev) {
            tracing::warn!(device = self.name, error = %e, "NBD_DISCONNECT failed");
        }
    }
}

impl serde::Serialize for KernelDevices {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            KernelDevices::Auto => s.serialize_str("auto"),
            KernelDevices::On => s.serialize_bool(true),
            KernelDevices::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> serde::Deserialize<'de> for KernelDevices {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(KernelDevices::On),
            Raw::Bool(false) => Ok(KernelDevices::Off),
            Raw::Str(s) => match s.as_str() {
                "auto" => Ok(KernelDevices::Auto),
                "true" | "on" => Ok(KernelDevices::On),
                "false" | "off" => Ok(KernelDevices::Off),
                other => Err(serde::de::Error::custom(format!(
                    "kernel_devices must be true, false or \"auto\", not {other:?}"
                ))),
            },
        }
    }
}

/// A fake kernel behind [`NbdOps`] for the unit tests of this module and of crates that drive
/// kernel nbd devices (feature `fake-kernel`).
#[cfg(any(test, feature = "fake-kernel"))]
pub mod fake {
    use super::NbdOps;
    use crate::proto;
    use std::fs::File;
    use std::io::{self, Read, Write};
    use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    /// One ioctl as the fake kernel saw it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        /// `NBD_SET_BLKSIZE` (bytes).
        Blksize(u64),
        /// `NBD_SET_SIZE_BLOCKS` (blocks).
        SizeBlocks(u64),
        /// `NBD_CLEAR_SOCK`.
        ClearSock,
        /// `NBD_SET_SOCK`.
        SetSock,
        /// `NBD_SET_FLAGS` (transmission flags).
        Flags(u16),
        /// `NBD_SET_TIMEOUT` (seconds).
        Timeout(u64),
        /// `BLKROSET` (read-only or writable).
        ReadOnly(bool),
        /// `NBD_DO_IT`.
        DoIt,
        /// `NBD_CLEAR_QUE`.
        ClearQue,
        /// `NBD_DISCONNECT`.
        Disconnect,
    }

    /// How long the fake waits for the server before it gives up (a test fails, never hangs).
    const WAIT: Duration = Duration::from_secs(20);

    /// Plays the kernel for one connected device at a time: records the ioctls; `NBD_DO_IT`
    /// hands the kernel's end of the connection to the test ([`FakeKernel::io`],
    /// [`FakeKernel::send`]), waits for `NBD_DISCONNECT`, then sends `NBD_CMD_DISC` and reads
    /// whatever the server still sends (replies to requests that were waiting) until it
    /// closes the connection ([`FakeKernel::after_disconnect`]).
    #[derive(Default)]
    pub struct FakeKernel {
        calls: Mutex<Vec<Call>>,
        sock: Mutex<Option<OwnedFd>>,
        conn: Mutex<Option<UnixStream>>,
        conn_ready: Condvar,
        disconnected: (Mutex<bool>, Condvar),
        after_disc: Mutex<Option<Vec<u8>>>,
        cookie: AtomicU64,
    }

    impl FakeKernel {
        /// Lays out one device `nbd0` (a plain file under `dev`, a directory under `sys`).
        pub fn lay_out(dev: &Path, sys: &Path) {
            std::fs::create_dir_all(sys.join("nbd0")).unwrap();
            std::fs::create_dir_all(dev).unwrap();
            std::fs::write(dev.join("nbd0"), "").unwrap();
        }

        fn log(&self, c: Call) {
            self.calls.lock().unwrap().push(c);
        }

        /// Every ioctl so far, in order.
        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        /// How many times `c` was called.
        pub fn count(&self, c: &Call) -> usize {
            self.calls().iter().filter(|x| *x == c).count()
        }

        /// The block device's read-only policy as last set (`BLKROSET`), if ever.
        pub fn read_only(&self) -> Option<bool> {
            self.calls().iter().rev().find_map(|c| match c {
                Call::ReadOnly(r) => Some(*r),
                _ => None,
            })
        }

        /// What the server sent after `NBD_CMD_DISC` up to closing the connection; `None`
        /// until then (or if it did not close it within the fake's patience).
        pub fn after_disconnect(&self) -> Option<Vec<u8>> {
            self.after_disc.lock().unwrap().clone()
        }

        fn stream(&self) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
            let g = self.conn.lock().unwrap();
            let (g, t) = self
                .conn_ready
                .wait_timeout_while(g, WAIT, |c| c.is_none())
                .unwrap();
            assert!(!t.timed_out(), "NBD_DO_IT never ran");
            g
        }

        /// Sends one request through the device's connection, as the block layer would;
        /// returns its cookie.
        pub fn send(&self, kind: u16, offset: u64, data: &[u8], length: u32) -> u64 {
            let cookie = self.cookie.fetch_add(1, Ordering::SeqCst) + 1;
            let mut m = proto::encode_request(
                &proto::Request {
                    flags: 0,
                    kind,
                    cookie,
                    offset,
                    length: u64::from(length),
                },
                false,
            );
            m.extend_from_slice(data);
            self.stream().as_mut().unwrap().write_all(&m).unwrap();
            cookie
        }

        /// True when the server has sent something not read yet (never waits).
        pub fn reply_pending(&self) -> bool {
            let g = self.stream();
            let fd = g.as_ref().unwrap().as_raw_fd();
            let mut b = [0u8; 1];
            // SAFETY: `b` is a live one-byte buffer for the whole call; `fd` is the open
            // socket held by the guard `g`.
            let n = unsafe {
                libc::recv(
                    fd,
                    b.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            n > 0
        }

        /// One request and its simple reply: (error, data read).
        pub fn io(&self, kind: u16, offset: u64, data: &[u8], length: u32) -> (u32, Vec<u8>) {
            let cookie = self.send(kind, offset, data, length);
            let mut g = self.stream();
            let s = g.as_mut().unwrap();
            let mut h = [0u8; 16];
            s.read_exact(&mut h).expect("no reply from the server");
            assert_eq!(proto::be32(&h[..4]), proto::SIMPLE_REPLY_MAGIC);
            assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), cookie);
            let err = proto::be32(&h[4..8]);
            let mut d = Vec::new();
            if err == 0 && kind == proto::CMD_READ {
                d = vec![0u8; length as usize];
                s.read_exact(&mut d).expect("read data");
            }
            (err, d)
        }
    }

    impl NbdOps for FakeKernel {
        fn set_blksize(&self, _: &File, size: u64) -> io::Result<()> {
            self.log(Call::Blksize(size));
            Ok(())
        }
        fn set_size_blocks(&self, _: &File, blocks: u64) -> io::Result<()> {
            self.log(Call::SizeBlocks(blocks));
            Ok(())
        }
        fn clear_sock(&self, _: &File) -> io::Result<()> {
            self.log(Call::ClearSock);
            Ok(())
        }
        fn set_sock(&self, _: &File, sock: RawFd) -> io::Result<()> {
            self.log(Call::SetSock);
            // SAFETY: `sock` is open for the duration of this call (the caller owns it); it is
            // duplicated at once, as the kernel takes its own reference.
            let fd = unsafe { BorrowedFd::borrow_raw(sock) }.try_clone_to_owned()?;
            *self.sock.lock().unwrap() = Some(fd);
            Ok(())
        }
        fn set_flags(&self, _: &File, flags: u16) -> io::Result<()> {
            self.log(Call::Flags(flags));
            Ok(())
        }
        fn set_timeout(&self, _: &File, secs: u64) -> io::Result<()> {
            self.log(Call::Timeout(secs));
            Ok(())
        }
        fn set_read_only(&self, _: &File, read_only: bool) -> io::Result<()> {
            self.log(Call::ReadOnly(read_only));
            Ok(())
        }
        fn do_it(&self, _: &File) -> io::Result<()> {
            self.log(Call::DoIt);
            let fd = self
                .sock
                .lock()
                .unwrap()
                .take()
                .expect("NBD_SET_SOCK first");
            let s = UnixStream::from(fd);
            s.set_read_timeout(Some(WAIT))?;
            let mut own = s.try_clone()?;
            *self.conn.lock().unwrap() = Some(s);
            self.conn_ready.notify_all();
            let (m, cv) = &self.disconnected;
            let mut g = m.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
            drop(g);
            // The server may have closed the connection already (its export was removed):
            // like the kernel, go on to read what it sent before closing.
            let _ = own.write_all(&proto::encode_request(
                &proto::Request {
                    flags: 0,
                    kind: proto::CMD_DISC,
                    cookie: 0,
                    offset: 0,
                    length: 0,
                },
                false,
            ));
            let mut rest = Vec::new();
            match own.read_to_end(&mut rest) {
                // ECONNRESET: the server closed with our NBD_CMD_DISC unread; what it sent
                // before is in `rest`.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                Err(e) => return Err(e),
            }
            *self.after_disc.lock().unwrap() = Some(rest);
            *self.conn.lock().unwrap() = None;
            Ok(())
        }
        fn clear_que(&self, _: &File) -> io::Result<()> {
            self.log(Call::ClearQue);
            Ok(())
        }
        fn disconnect(&self, _: &File) -> io::Result<()> {
            self.log(Call::Disconnect);
            *self.disconnected.0.lock().unwrap() = true;
            self.disconnected.1.notify_all();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{Call, FakeKernel};
    use super::*;
    use crate::backend::{BlockBackend, MemBackend};
    use crate::export::ExportOptions;
    use crate::proto;
    use std::time::Duration;

    #[test]
    fn free_devices_are_the_unconnected_nbd_ones_in_numeric_order() {
        let d = tempfile::tempdir().unwrap();
        for n in ["nbd0", "nbd1", "nbd10", "nbd2", "nbd3", "loop0", "nbdx"] {
            std::fs::create_dir(d.path().join(n)).unwrap();
        }
        std::fs::write(d.path().join("nbd0/pid"), "42\n").unwrap();
        assert_eq!(
            free_devices(d.path(), &["nbd2".to_string()]),
            vec!["nbd1", "nbd3", "nbd10"]
        );
        assert!(free_devices(&d.path().join("missing"), &[]).is_empty());
    }

    #[test]
    fn auto_uses_devices_only_where_nbd0_exists() {
        let d = tempfile::tempdir().unwrap();
        let k = |m| KernelNbd::with(m, d.path(), d.path(), Arc::new(Ioctls));
        assert!(!k(KernelDevices::Auto).enabled());
        assert!(k(KernelDevices::On).enabled());
        std::fs::write(d.path().join("nbd0"), "").unwrap();
        assert!(k(KernelDevices::Auto).enabled());
        assert!(!k(KernelDevices::Off).enabled());
        assert_eq!(block_size_for(8 << 20), 4096);
        assert_eq!(block_size_for(8 << 20 | 512), 512);
    }

    #[test]
    fn config_values_are_true_false_or_auto() {
        #[derive(serde::Deserialize, serde::Serialize)]
        struct C {
            k: KernelDevices,
        }
        let p = |s: &str| toml::from_str::<C>(s).map(|c| c.k);
        assert_eq!(p("k = true").unwrap(), KernelDevices::On);
        assert_eq!(p("k = false").unwrap(), KernelDevices::Off);
        assert_eq!(p("k = \"auto\"").unwrap(), KernelDevices::Auto);
        assert!(p("k = \"sometimes\"")
            .unwrap_err()
            .to_string()
            .contains("true, false or \"auto\""));
        let s = toml::to_string(&C {
            k: KernelDevices::Auto,
        })
        .unwrap();
        assert_eq!(p(&s).unwrap(), KernelDevices::Auto);
    }

    /// `fake.io(...)` off the async runtime (it blocks on the socket).
    async fn kio(
        fake: &Arc<FakeKernel>,
        kind: u16,
        offset: u64,
        data: Vec<u8>,
        length: u32,
    ) -> (u32, Vec<u8>) {
        let f = fake.clone();
        tokio::task::spawn_blocking(move || f.io(kind, offset, &data, length))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_device_is_configured_served_without_handshake_and_disconnected_in_order() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        std::fs::create_dir_all(sys.join("nbd0")).unwrap();
        std::fs::create_dir_all(sys.join("nbd1")).unwrap();
        std::fs::write(sys.join("nbd0/pid"), "1\n").unwrap();
        std::fs::write(d.path().join("nbd0"), "").unwrap();
        std::fs::write(d.path().join("nbd1"), "").unwrap();
        let fake = Arc::new(FakeKernel::default());
        let k = KernelNbd::with(KernelDevices::Auto, d.path(), &sys, fake.clone()).with_timeout(7);
        let mem = Arc::new(MemBackend::new(1 << 20, false));
        mem.write_at(&[0x5a; 4096], 8192).unwrap();
        let export = Export::new("e", mem, ExportOptions::default());
        let dev = k.connect(export.clone()).unwrap();
        assert_eq!(dev.path(), d.path().join("nbd1"), "nbd0 is in use");
        assert_eq!(
            kio(&fake, proto::CMD_READ, 8192, vec![], 4096).await,
            (0, vec![0x5a; 4096])
        );
        // The next device goes elsewhere while this one is ours.
        assert!(k.connect(export.clone()).is_err(), "nbd1 handed out twice");
        dev.request_disconnect();
        tokio::time::timeout(Duration::from_secs(10), k.release(dev))
            .await
            .expect("DO_IT thread did not end");
        let flags = proto::TF_HAS_FLAGS
            | proto::TF_SEND_FLUSH
            | proto::TF_CAN_MULTI_CONN
            | proto::TF_SEND_FUA
            | proto::TF_SEND_TRIM
            | proto::TF_SEND_WRITE_ZEROES;
        assert_eq!(
            fake.calls(),
            vec![
                Call::Blksize(4096),
                Call::SizeBlocks(256),
                Call::ClearSock,
                Call::SetSock,
                Call::Flags(flags),
                Call::Timeout(7),
                Call::ReadOnly(false),
                Call::DoIt,
                Call::Disconnect,
                Call::ClearQue,
                Call::ClearSock,
                Call::ReadOnly(false),
            ]
        );
        // Released: the device can be connected again.
        assert!(k.taken.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_only_export_gets_a_device_that_can_write_but_is_read_only_by_policy() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        FakeKernel::lay_out(d.path(), &sys);
        let fake = Arc::new(FakeKernel::default());
        let k = KernelNbd::with(KernelDevices::On, d.path(), &sys, fake.clone());
        let export = Export::new(
            "ro",
            Arc::new(MemBackend::new(1 << 20, true)),
            ExportOptions::default(),
        );
        let dev = k.connect(export.clone()).unwrap();
        // Connected with the flags of a writable export (the kernel's disk-level read-only bit
        // could not be cleared without reconnecting), read-only by BLKROSET, no timeout.
        let calls = fake.calls();
        let flags = calls
            .iter()
            .find_map(|c| match c {
                Call::Flags(f) => Some(*f),
                _ => None,
            })
            .unwrap();
        assert_eq!(flags & proto::TF_READ_ONLY, 0, "flags {flags:#x}");
        assert_ne!(flags & proto::TF_SEND_WRITE_ZEROES, 0, "flags {flags:#x}");
        assert!(calls.contains(&Call::Timeout(0)));
        assert_eq!(fake.read_only(), Some(true));
        // A write that reaches the export anyway is refused there.
        assert_eq!(
            kio(&fake, proto::CMD_WRITE, 0, vec![1; 512], 512).await.0,
            proto::errno::EPERM
        );
        dev.set_read_only(false).unwrap();
        assert_eq!(fake.read_only(), Some(false));
        assert_eq!(fake.count(&Call::DoIt), 1, "the device was reconnected");
        dev.request_disconnect();
        tokio::time::timeout(Duration::from_secs(10), k.release(dev))
            .await
            .expect("DO_IT thread did not end");
    }
}
