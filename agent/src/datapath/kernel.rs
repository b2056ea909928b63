//! Kernel nbd devices (`/dev/nbdN`) for blkback: an attached VDI's export connected to a free
//! kernel nbd device through a socketpair, so a Xen block backend can use a plain block device.
//!
//! The classic ioctl interface is used, as `nbd-client` does: the kernel speaks only the
//! transmission phase (simple replies, no handshake), so the agent's end of the socketpair is
//! served by [`super::server::serve_negotiated`]. Connecting is `NBD_SET_BLKSIZE`,
//! `NBD_SET_SIZE_BLOCKS`, `NBD_CLEAR_SOCK`, `NBD_SET_SOCK`, `NBD_SET_FLAGS`, then `NBD_DO_IT`
//! on a thread of its own (it blocks until the device is disconnected); disconnecting is
//! `NBD_DISCONNECT` (the kernel sends `NBD_CMD_DISC` after flushing), after which `NBD_DO_IT`
//! returns and the thread finishes with `NBD_CLEAR_QUE` + `NBD_CLEAR_SOCK`.
//!
//! The ioctls sit behind [`NbdOps`] so their order is unit-tested without a device; only
//! [`Ioctls`] touches the kernel (the only `unsafe` here).

use super::export::Export;
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
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;

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

/// Kernel nbd devices of the agent: which exist, which are ours.
pub struct KernelNbd {
    mode: KernelDevices,
    dev_dir: PathBuf,
    sys_block: PathBuf,
    ops: Arc<dyn NbdOps>,
    taken: Mutex<Vec<String>>,
}

impl std::fmt::Debug for KernelNbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelNbd")
            .field("mode", &self.mode)
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
            dev_dir: dev_dir.into(),
            sys_block: sys_block.into(),
            ops,
            taken: Mutex::new(Vec::new()),
        }
    }

    /// The configured mode.
    pub fn mode(&self) -> KernelDevices {
        self.mode
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
        let flags = super::server::kernel_transmission_flags(&export);
        ops.set_blksize(&dev, bs)?;
        ops.set_size_blocks(&dev, size / bs)?;
        ops.clear_sock(&dev)?;
        let theirs: OwnedFd = theirs.into();
        ops.set_sock(&dev, theirs.as_raw_fd())?;
        if let Err(e) = ops.set_flags(&dev, flags) {
            let _ = ops.clear_sock(&dev);
            return Err(e);
        }
        ours.set_nonblocking(true)?;
        let ours = tokio::net::UnixStream::from_std(ours)?;
        let ename = export.name().to_string();
        let serve = tokio::spawn(async move {
            let (r, w) = ours.into_split();
            if let Err(e) = super::server::serve_negotiated(r, w, export).await {
                tracing::info!(export = ename, error = %e, "kernel nbd connection ended");
            }
        });
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.to_string());
        let (d2, o2, n2) = (dev.clone(), ops.clone(), name.to_string());
        let thread = std::thread::Builder::new()
            .name(format!("ddstor-{name}"))
            .spawn(move || {
                // The kernel holds its own reference to the socket from NBD_SET_SOCK on.
                let _keep = theirs;
                if let Err(e) = o2.do_it(&d2) {
                    tracing::debug!(device = n2, error = %e, "NBD_DO_IT returned an error");
                }
                let _ = o2.clear_que(&d2);
                let _ = o2.clear_sock(&d2);
            })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::backend::{BlockBackend, MemBackend};
    use crate::datapath::export::ExportOptions;
    use crate::datapath::proto;
    use std::io::{Read, Write};
    use std::os::fd::BorrowedFd;
    use std::sync::Condvar;

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

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Blksize(u64),
        SizeBlocks(u64),
        ClearSock,
        SetSock,
        Flags(u16),
        DoIt,
        ClearQue,
        Disconnect,
    }

    /// Plays the kernel: records the ioctls; `NBD_DO_IT` reads 4 KiB at 8 KiB through the
    /// socket it was given, then waits for `NBD_DISCONNECT`, sends `NBD_CMD_DISC` and returns
    /// once the server has closed the connection.
    #[derive(Default)]
    struct FakeKernel {
        calls: Mutex<Vec<Call>>,
        sock: Mutex<Option<OwnedFd>>,
        read: Mutex<Option<Vec<u8>>>,
        disconnected: (Mutex<bool>, Condvar),
    }

    impl FakeKernel {
        fn log(&self, c: Call) {
            self.calls.lock().unwrap().push(c);
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
        fn do_it(&self, _: &File) -> io::Result<()> {
            self.log(Call::DoIt);
            let fd = self
                .sock
                .lock()
                .unwrap()
                .take()
                .expect("NBD_SET_SOCK first");
            let mut s = std::os::unix::net::UnixStream::from(fd);
            let req = |kind, offset, length| {
                proto::encode_request(
                    &proto::Request {
                        flags: 0,
                        kind,
                        cookie: 77,
                        offset,
                        length,
                    },
                    false,
                )
            };
            s.write_all(&req(proto::CMD_READ, 8192, 4096))?;
            let mut h = [0u8; 16];
            s.read_exact(&mut h)?;
            assert_eq!(proto::be32(&h[..4]), proto::SIMPLE_REPLY_MAGIC);
            assert_eq!(proto::be32(&h[4..8]), 0, "read error");
            let mut data = vec![0u8; 4096];
            s.read_exact(&mut data)?;
            *self.read.lock().unwrap() = Some(data);
            let (m, cv) = &self.disconnected;
            let mut g = m.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
            drop(g);
            s.write_all(&req(proto::CMD_DISC, 0, 0))?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)?;
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
        let k = KernelNbd::with(KernelDevices::Auto, d.path(), &sys, fake.clone());
        let mem = Arc::new(MemBackend::new(1 << 20, false));
        mem.write_at(&[0x5a; 4096], 8192).unwrap();
        let export = Export::new("e", mem, ExportOptions::default());
        let dev = k.connect(export.clone()).unwrap();
        assert_eq!(dev.path(), d.path().join("nbd1"), "nbd0 is in use");
        // The next device goes elsewhere while this one is ours.
        let t = tokio::time::Instant::now();
        while fake.read.lock().unwrap().is_none() {
            assert!(t.elapsed() < std::time::Duration::from_secs(10), "no reply");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            fake.read.lock().unwrap().as_deref(),
            Some(&[0x5a; 4096][..])
        );
        assert!(k.connect(export.clone()).is_err(), "nbd1 handed out twice");
        dev.request_disconnect();
        tokio::time::timeout(std::time::Duration::from_secs(10), k.release(dev))
            .await
            .expect("DO_IT thread did not end");
        let flags = proto::TF_HAS_FLAGS
            | proto::TF_SEND_FLUSH
            | proto::TF_CAN_MULTI_CONN
            | proto::TF_SEND_FUA
            | proto::TF_SEND_TRIM
            | proto::TF_SEND_WRITE_ZEROES;
        assert_eq!(
            *fake.calls.lock().unwrap(),
            vec![
                Call::Blksize(4096),
                Call::SizeBlocks(256),
                Call::ClearSock,
                Call::SetSock,
                Call::Flags(flags),
                Call::DoIt,
                Call::Disconnect,
                Call::ClearQue,
                Call::ClearSock,
            ]
        );
        // Released: the device can be connected again.
        assert!(k.taken.lock().unwrap().is_empty());
    }
}
