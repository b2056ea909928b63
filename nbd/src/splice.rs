//! Zero-copy read replies: a reply (header, then the data) is assembled in a pipe — the header
//! written, file data spliced in as page references (no copy), zeros written — and the
//! connection's writer splices the pipe into the socket (again page references: AF_UNIX and TCP
//! sockets take spliced pages since Linux 6.5; older kernels copy once inside the kernel, still
//! one copy fewer than `pread` + `write`). The only copy left is the client's own receive.
//!
//! Filling a pipe may wait for the disk (the file side of `splice` blocks on uncached pages),
//! so it runs where reads run (the blocking pool); draining it into the socket never touches
//! the disk, so the writer task does it without blocking (`SPLICE_F_NONBLOCK` on a
//! non-blocking socket).
//!
//! Every `unsafe` block of the zero-copy path is here: `pipe2`, `fcntl(F_SETPIPE_SZ)`, `splice`
//! and `write` on file descriptors this module owns or borrows for the duration of the call;
//! and so are the two process-wide calls the server needs ([`raise_open_file_limit`]: a pipe
//! is two descriptors; [`release_free_memory`]: what closed connections freed).
//!
//! Page references mean the client receives the page cache's content at the moment it reads
//! from its socket, not at the moment of the splice. Only a write racing with the read (issued
//! before the read's reply arrived) can change it meanwhile, and NBD leaves the result of such
//! overlapping requests unspecified, as with any server that reads in parallel with writes.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Page size assumed for pipe slot accounting (one slot per page touched).
const PAGE: u64 = 4096;
/// Largest pipe asked for (bytes): a reply needing more slots is sent by copying instead.
/// Above `/proc/sys/fs/pipe-max-size` (1 MiB by default) only a process with
/// `CAP_SYS_RESOURCE` may grow a pipe; when the kernel refuses, the limit found is remembered.
const MAX_PIPE: usize = 16 << 20;
/// Pipes kept for reuse per pool.
const POOL_KEEP: usize = 32;

/// One piece of a zero-copy reply.
pub enum Piece<'a> {
    /// Bytes to write as they are (a reply header).
    Bytes(&'a [u8]),
    /// `len` zero bytes.
    Zero(u64),
    /// `len` bytes of `file` from byte `offset`, spliced as page references.
    File {
        /// The file.
        file: &'a File,
        /// Byte offset in the file.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// Raises the soft limit on open files to the hard limit (each in-flight zero-copy reply holds
/// a pipe: two descriptors; a refused pipe only means that reply is copied), logging the
/// outcome (never fatal). Called once by the daemons at start.
pub fn raise_open_file_limit() {
    match try_raise_open_file_limit() {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(
            error = %e,
            "could not raise the open-file limit; busy NBD connections may copy replies"
        ),
    }
}

/// [`raise_open_file_limit`]'s work: returns the new soft limit.
fn try_raise_open_file_limit() -> io::Result<u64> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid, writable rlimit for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if l.rlim_cur < l.rlim_max {
        l.rlim_cur = l.rlim_max;
        // SAFETY: `l` is a valid rlimit, read for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(l.rlim_cur)
}

/// Gives the heap's free memory back to the kernel: glibc's `malloc_trim(0)`, which releases
/// the free pages inside every arena, not only at their tops as `free` does. Without it, the
/// memory of a burst of connections, freed when they close, stays resident (measured: 16 MB
/// before 2,000 connections, 73 MB after they all closed; 17 MB with it). Returns whether
/// anything was released; a no-op (false) where the C library is not glibc.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers; it only walks the allocator's own arenas
        // under their locks, and may be called from any thread at any time.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Pipe slots (pages) `pieces` occupy at most.
fn slots_needed(pieces: &[Piece<'_>]) -> u64 {
    pieces
        .iter()
        .map(|p| match p {
            // write() fills anonymous pages, merging into the last one where it can.
            Piece::Bytes(b) => (b.len() as u64).div_ceil(PAGE) + 1,
            Piece::Zero(n) => n.div_ceil(PAGE) + 1,
            // splice adds one slot per page of the file touched.
            Piece::File { offset, len, .. } => (offset + len).div_ceil(PAGE) - offset / PAGE,
        })
        .sum()
}

/// A pipe (both ends non-blocking) holding at most one reply at a time.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    /// A new pipe of the kernel's default size.
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [-1 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two ints, as pipe2 requires.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are new descriptors owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut p = Pipe { r, w, cap: 0 };
        p.cap = p.fcntl(libc::F_GETPIPE_SZ, 0)?;
        Ok(p)
    }

    fn fcntl(&self, cmd: libc::c_int, arg: libc::c_int) -> io::Result<usize> {
        // SAFETY: F_GETPIPE_SZ/F_SETPIPE_SZ take an int by value; the descriptor is ours.
        let r = unsafe { libc::fcntl(self.w.as_raw_fd(), cmd, arg) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Grows the pipe to hold at least `bytes` (the kernel rounds up to a power of two pages).
    fn reserve(&mut self, bytes: usize) -> io::Result<()> {
        if self.cap >= bytes {
            return Ok(());
        }
        let want = libc::c_int::try_from(bytes.next_power_of_two())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pipe size"))?;
        self.cap = self.fcntl(libc::F_SETPIPE_SZ, want)?;
        Ok(())
    }

    /// Puts `pieces` into the (empty) pipe and returns the number of bytes it now holds.
    /// Any failure leaves the pipe in an unknown state: drop it.
    fn fill(&self, pieces: &[Piece<'_>]) -> io::Result<usize> {
        static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
        let mut total = 0usize;
        for p in pieces {
            match *p {
                Piece::Bytes(b) => {
                    self.write_all(b)?;
                    total += b.len();
                }
                Piece::Zero(mut n) => {
                    total += n as usize;
                    while n > 0 {
                        let k = n.min(ZEROES.len() as u64) as usize;
                        self.write_all(&ZEROES[..k])?;
                        n -= k as u64;
                    }
                }
                Piece::File { file, offset, len } => {
                    let mut off = libc::loff_t::try_from(offset)
                        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset"))?;
                    let mut left = len as usize;
                    while left > 0 {
                        // SAFETY: both descriptors are open for the call (`file` is borrowed,
                        // the pipe is ours); `off` is a valid loff_t the kernel advances.
                        let n = unsafe {
                            libc::splice(
                                file.as_raw_fd(),
                                &mut off,
                                self.w.as_raw_fd(),
                                std::ptr::null_mut(),
                                left,
                                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                            )
                        };
                        match n {
                            n if n > 0 => left -= n as usize,
                            0 => {
                                return Err(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "file ends before the data the VHD maps",
                                ))
                            }
                            _ => {
                                let e = io::Error::last_os_error();
                                if e.kind() != io::ErrorKind::Interrupted {
                                    return Err(e);
                                }
                            }
                        }
                    }
                    total += len as usize;
                }
            }
        }
        Ok(total)
    }

    fn write_all(&self, mut b: &[u8]) -> io::Result<()> {
        while !b.is_empty() {
            // SAFETY: `b` is a live slice of exactly `b.len()` readable bytes; the pipe is ours.
            let n = unsafe { libc::write(self.w.as_raw_fd(), b.as_ptr().cast(), b.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            b = &b[n as usize..];
        }
        Ok(())
    }

    /// Moves up to `len` bytes from the pipe into `sock` without blocking (`WouldBlock` when
    /// the socket is full).
    pub fn splice_to(&self, sock: RawFd, len: usize) -> io::Result<usize> {
        loop {
            // SAFETY: the pipe's read end is ours; `sock` is a descriptor the caller keeps
            // open for the call; no offsets (both are streams).
            let n = unsafe {
                libc::splice(
                    self.r.as_raw_fd(),
                    std::ptr::null_mut(),
                    sock,
                    std::ptr::null_mut(),
                    len,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Pipes for reuse, shared by a connection's requests (creating a pipe and growing it cost a
/// few system calls each; a drained pipe is as good as new).
#[derive(Debug, Default)]
pub struct PipePool {
    free: Mutex<Vec<Pipe>>,
    /// Largest size the kernel granted when it refused a bigger one (0: none refused yet).
    limit: AtomicUsize,
}

impl PipePool {
    /// An empty pool.
    pub fn new() -> Arc<PipePool> {
        Arc::new(PipePool::default())
    }

    /// Assembles `pieces` in a pipe: `Ok(None)` when they do not fit in a pipe the kernel will
    /// give (the caller copies instead).
    pub fn fill(self: &Arc<Self>, pieces: &[Piece<'_>]) -> io::Result<Option<FilledPipe>> {
        let need = (slots_needed(pieces) * PAGE) as usize;
        let limit = self.limit.load(Ordering::Relaxed);
        if need > MAX_PIPE || (limit != 0 && need > limit) {
            return Ok(None);
        }
        let pooled = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut pipe = match pooled {
            Some(p) => p,
            None => Pipe::new()?,
        };
        if let Err(e) = pipe.reserve(need) {
            if e.raw_os_error() == Some(libc::EPERM) {
                // Over pipe-max-size without CAP_SYS_RESOURCE, or over the user's pipe quota.
                self.limit
                    .store(pipe.capacity().max(PAGE as usize), Ordering::Relaxed);
                self.put(pipe);
                return Ok(None);
            }
            return Err(e);
        }
        let len = pipe.fill(pieces)?;
        Ok(Some(FilledPipe {
            pipe: Some(pipe),
            left: len,
            pool: self.clone(),
        }))
    }

    fn put(&self, p: Pipe) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOL_KEEP {
            free.push(p);
        }
    }
}

/// A pipe holding one whole reply, waiting to be spliced into the socket. Back to its pool
/// once drained; closed (never reused) if dropped with bytes still in it.
#[derive(Debug)]
pub struct FilledPipe {
    pipe: Option<Pipe>,
    left: usize,
    pool: Arc<PipePool>,
}

impl FilledPipe {
    /// Bytes still in the pipe.
    pub fn remaining(&self) -> usize {
        self.left
    }

    /// Moves what the socket takes now (`WouldBlock` when it takes nothing).
    pub fn splice_to(&mut self, sock: RawFd) -> io::Result<usize> {
        let Some(p) = &self.pipe else {
            return Ok(0);
        };
        let n = p.splice_to(sock, self.left)?;
        if n == 0 && self.left > 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "reply pipe drained early",
            ));
        }
        self.left -= n;
        Ok(n)
    }

    /// Reads what is left into `out` (tests look at a reply's bytes this way).
    #[cfg(test)]
    pub fn drain_into(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let Some(p) = &self.pipe else {
            return Ok(());
        };
        let start = out.len();
        out.resize(start + self.left, 0);
        let mut done = 0;
        while done < self.left {
            let buf = &mut out[start + done..];
            // SAFETY: `buf` is a live, exclusively borrowed slice of `buf.len()` bytes; the
            // pipe's read end is ours.
            let n = unsafe { libc::read(p.r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "reply pipe drained early",
                ));
            }
            done += n as usize;
        }
        self.left = 0;
        Ok(())
    }
}

impl Drop for FilledPipe {
    fn drop(&mut self) {
        if let Some(p) = self.pipe.take() {
            if self.left == 0 {
                self.pool.put(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn file_with(data: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::File::create(&p).unwrap().write_all(data).unwrap();
        let f = File::open(&p).unwrap();
        (dir, f)
    }

    #[test]
    fn a_reply_spliced_from_header_zeroes_and_file_arrives_whole_and_in_order() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (_d, f) = file_with(&data);
        let pool = PipePool::new();
        let pieces = [
            Piece::Bytes(b"HDR!"),
            Piece::File {
                file: &f,
                offset: 1000,
                len: 200_000,
            },
            Piece::Zero(5000),
            Piece::File {
                file: &f,
                offset: 7,
                len: 10,
            },
        ];
        let mut fp = pool.fill(&pieces).unwrap().expect("fits in a pipe");
        assert_eq!(fp.remaining(), 4 + 200_000 + 5000 + 10);
        let (a, mut b) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        while fp.remaining() > 0 {
            match fp.splice_to(a.as_raw_fd()) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        drop(fp);
        drop(a);
        let got = reader.join().unwrap();
        let mut want = b"HDR!".to_vec();
        want.extend_from_slice(&data[1000..201_000]);
        want.extend_from_slice(&[0; 5000]);
        want.extend_from_slice(&data[7..17]);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "spliced bytes differ");
        assert_eq!(
            pool.free.lock().unwrap().len(),
            1,
            "a drained pipe is reused"
        );
    }

    #[test]
    fn a_pipe_dropped_before_it_is_drained_is_not_reused_and_drain_into_copies() {
        let (_d, f) = file_with(&[9u8; 8192]);
        let pool = PipePool::new();
        let piece = [Piece::File {
            file: &f,
            offset: 0,
            len: 8192,
        }];
        let fp = pool.fill(&piece).unwrap().unwrap();
        drop(fp);
        assert!(pool.free.lock().unwrap().is_empty());
        let mut fp = pool.fill(&piece).unwrap().unwrap();
        let mut out = b"x".to_vec();
        fp.drain_into(&mut out).unwrap();
        assert_eq!(out.len(), 8193);
        assert!(out[1..].iter().all(|&b| b == 9));
    }

    #[test]
    fn data_past_the_end_of_the_file_is_an_error_not_a_short_reply() {
        let (_d, f) = file_with(&[1u8; 100]);
        let pool = PipePool::new();
        let piece = [Piece::File {
            file: &f,
            offset: 50,
            len: 100,
        }];
        let e = pool.fill(&piece).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, .. Default::default() })]
        /// The slot estimate is never short: any mix of unaligned header, zero and file pieces
        /// fits in the pipe sized for it (a short estimate would fail the fill with EAGAIN and
        /// cost the zero-copy path), and the bytes come out in order.
        #[test]
        fn pieces_at_any_alignment_fit_the_pipe_sized_for_them(
            hdr in 0usize..40,
            parts in proptest::collection::vec((0u64..3, 0u64..200_000, 1u64..70_000), 1..8),
        ) {
            let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
            let (_d, f) = file_with(&data);
            let header = vec![0xEEu8; hdr];
            let mut pieces = vec![Piece::Bytes(&header)];
            let mut want = header.clone();
            for &(kind, off, len) in &parts {
                let len = len.min(300_000 - off);
                if kind == 0 {
                    pieces.push(Piece::Zero(len));
                    want.resize(want.len() + len as usize, 0);
                } else {
                    pieces.push(Piece::File { file: &f, offset: off, len });
                    want.extend_from_slice(&data[off as usize..(off + len) as usize]);
                }
            }
            let pool = PipePool::new();
            let mut fp = pool.fill(&pieces).unwrap().expect("fits");
            let mut got = Vec::new();
            fp.drain_into(&mut got).unwrap();
            proptest::prop_assert!(got == want);
        }
    }

    #[test]
    fn a_reply_larger_than_any_pipe_is_declined() {
        let pool = PipePool::new();
        assert!(pool
            .fill(&[Piece::Zero(MAX_PIPE as u64 * 2)])
            .unwrap()
            .is_none());
    }
}
