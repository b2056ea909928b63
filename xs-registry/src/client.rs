//! The async xenstore client the registry, the vchan rendezvous and the CLI use.
//!
//! It speaks the wire protocol ([`crate::wire`]) itself, over one of two [`Endpoint`]s:
//!
//! * **a unix socket** — xenstored's (`/run/xenstored/socket` in dom0) or the test server's.
//!   Requests are pipelined: many may be in flight, replies are matched by `req_id`.
//! * **the xenbus device** — `/dev/xen/xenbus` inside a guest (a driver domain has no xenstored
//!   socket). Same messages, read from and written to the device file; the kernel relays them
//!   to xenstored. One request is in flight per open device at a time; replies and watch events
//!   interleave on reads.
//!
//! Why not `xenstore-rs` (as session 1 did): its tokio client can only be pointed at a socket
//! through the `XENSTORED_PATH` environment variable (setting it in a multi-threaded process is
//! unsound), it has no SET_PERMS/GET_PERMS, transactions or MKDIR, and a watch's 8-slot channel
//! blocks its connection task. Owning the ~300 lines below gives one connection type for every
//! operation instead of two half-clients.
//!
//! Selecting the endpoint (like libxenstore): [`Xs::open`] uses `XENSTORED_PATH` when set
//! (a char device there means xenbus mode, anything else a socket), else
//! [`DEFAULT_SOCKET`] if it exists, else [`XENBUS_DEVICE`]. [`Xs::connect`] takes an explicit
//! path and classifies it the same way.
//!
//! One reader task per [`Xs`]; every clone shares it. Callers write their requests themselves:
//! a caller takes the connection's write lock and writes the whole message without awaiting
//! when the stream accepts it (the common case: no task hop on the way out); only when the
//! stream is full does a spawned task, owning the lock, finish that message. So a caller's
//! future dropped half-way never leaves half a message on the stream, and a reply nobody waits
//! for any more is discarded.

use crate::store::Perm;
use crate::wire::{self, encode_msg, Header, MsgType, XsErrno, HEADER_LEN, PAYLOAD_MAX};
use crate::{DomId, Error, Result};
use futures::Stream;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// Default xenstored socket when `XENSTORED_PATH` is not set.
pub const DEFAULT_SOCKET: &str = "/run/xenstored/socket";

/// The guest kernel's xenstore device, used when there is no xenstored socket.
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";

/// Where a connection reaches xenstored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// xenstored's unix socket (dom0, or the test server): requests are pipelined.
    Socket(PathBuf),
    /// A xenbus device (`/dev/xen/xenbus` in a guest): one request in flight at a time.
    Xenbus(PathBuf),
}

impl Endpoint {
    /// Classifies `path` as libxenstore does: a character device is a xenbus device,
    /// anything else (a socket, or a path that does not exist yet) a socket.
    pub fn classify(path: &Path) -> Endpoint {
        match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_char_device() => Endpoint::Xenbus(path.to_path_buf()),
            _ => Endpoint::Socket(path.to_path_buf()),
        }
    }

    /// The endpoint libxenstore would use: `XENSTORED_PATH` if set, else
    /// [`DEFAULT_SOCKET`] if it exists, else [`XENBUS_DEVICE`].
    pub fn from_env() -> Endpoint {
        match std::env::var_os("XENSTORED_PATH") {
            Some(p) if !p.is_empty() => Endpoint::classify(Path::new(&p)),
            _ if Path::new(DEFAULT_SOCKET).exists() => {
                Endpoint::Socket(PathBuf::from(DEFAULT_SOCKET))
            }
            _ => Endpoint::Xenbus(PathBuf::from(XENBUS_DEVICE)),
        }
    }

    /// The socket or device path.
    pub fn path(&self) -> &Path {
        match self {
            Endpoint::Socket(p) | Endpoint::Xenbus(p) => p,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Socket(p) => write!(f, "xenstored socket {}", p.display()),
            Endpoint::Xenbus(p) => write!(f, "xenbus device {}", p.display()),
        }
    }
}

/// A reply as the reader task hands it to the caller.
struct Reply {
    ty: u32,
    body: Vec<u8>,
}

struct Pending {
    reply: oneshot::Sender<Reply>,
    /// Xenbus mode: the one-request-in-flight permit, released when the reply arrives
    /// (not when the caller stops waiting).
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u32, Pending>,
    watches: HashMap<String, futures::channel::mpsc::UnboundedSender<String>>,
    /// Why the connection is unusable, once it is.
    closed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain maps behind: still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection dead: every waiting caller and watch stream ends.
    fn close(&self, why: String) {
        let mut st = self.lock();
        if st.closed.is_none() {
            tracing::debug!(reason = %why, "xenstore connection closed");
            st.closed = Some(why);
        }
        st.pending.clear();
        st.watches.clear();
    }
}

/// One connection to xenstored, shared by every clone of an [`Xs`].
struct Conn {
    endpoint: Endpoint,
    shared: Arc<Shared>,
    /// The write side; its lock orders whole messages.
    writer: Arc<tokio::sync::Mutex<Writer>>,
    /// Xenbus mode: a single permit (one request in flight).
    gate: Option<Arc<Semaphore>>,
    next_req: AtomicU32,
    next_token: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Dropping the socket's write half (with the writer) shuts it down.
        self.reader.abort();
    }
}

/// The xenbus device file, non-blocking, polled through tokio.
struct Device(Arc<AsyncFd<File>>);

impl AsyncRead for Device {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = std::task::ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| f.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Writes a whole message to the device. Linux's xenbus device never reports itself writable
/// through poll (it buffers every write), so a would-block is retried after a short sleep
/// instead of waiting for readiness.
async fn device_write_all(f: &AsyncFd<File>, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match f.get_ref().write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

enum Writer {
    Socket(tokio::net::unix::OwnedWriteHalf),
    Device(Arc<AsyncFd<File>>),
}

impl Writer {
    async fn write_msg(&mut self, m: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Socket(s) => s.write_all(m).await,
            Writer::Device(f) => device_write_all(f, m).await,
        }
    }

    /// Writes as much of `m` as the stream takes without waiting; returns how much that was.
    fn write_now(&mut self, m: &[u8]) -> std::io::Result<usize> {
        let mut done = 0;
        while done < m.len() {
            let r = match self {
                Writer::Socket(s) => s.try_write(&m[done..]),
                Writer::Device(f) => f.get_ref().write(&m[done..]),
            };
            match r {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

async fn read_loop(rd: impl AsyncRead + Unpin, shared: Arc<Shared>) {
    let mut rd = BufReader::new(rd);
    let why = loop {
        let mut hb = [0u8; HEADER_LEN];
        if let Err(e) = rd.read_exact(&mut hb).await {
            break format!("reading from xenstored: {e}");
        }
        let h = Header::decode(&hb);
        if h.len as usize > PAYLOAD_MAX {
            break format!(
                "xenstored sent a {}-byte payload (max {PAYLOAD_MAX})",
                h.len
            );
        }
        let mut body = vec![0u8; h.len as usize];
        if let Err(e) = rd.read_exact(&mut body).await {
            break format!("reading from xenstored: {e}");
        }
        if h.ty == MsgType::WatchEvent as u32 {
            deliver_event(&shared, &body);
            continue;
        }
        let p = shared.lock().pending.remove(&h.req_id);
        match p {
            // The caller may have stopped waiting: then the reply is simply dropped.
            Some(p) => drop(p.reply.send(Reply { ty: h.ty, body })),
            None => tracing::warn!(
                req = h.req_id,
                ty = h.ty,
                "xenstored sent a reply to no pending request; ignored"
            ),
        }
    };
    shared.close(why);
}

fn deliver_event(shared: &Shared, body: &[u8]) {
    let parts = match wire::split_strings(body) {
        Ok(p) if p.len() >= 2 => p,
        _ => {
            tracing::warn!("malformed watch event from xenstored; ignored");
            return;
        }
    };
    let token = String::from_utf8_lossy(parts[1]);
    let st = shared.lock();
    if let Some(tx) = st.watches.get(token.as_ref()) {
        let _ = tx.unbounded_send(String::from_utf8_lossy(parts[0]).into_owned());
    }
}

impl Conn {
    fn start(
        endpoint: Endpoint,
        rd: impl AsyncRead + Unpin + Send + 'static,
        w: Writer,
        one_at_a_time: bool,
    ) -> Conn {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
        });
        let reader = tokio::spawn(read_loop(rd, shared.clone()));
        Conn {
            endpoint,
            shared,
            writer: Arc::new(tokio::sync::Mutex::new(w)),
            gate: one_at_a_time.then(|| Arc::new(Semaphore::new(1))),
            next_req: AtomicU32::new(1),
            next_token: AtomicU64::new(1),
            reader,
        }
    }

    fn from_socket(endpoint: Endpoint, s: UnixStream) -> Conn {
        let (rd, wr) = s.into_split();
        Conn::start(endpoint, rd, Writer::Socket(wr), false)
    }

    /// A connection over a xenbus device (or anything with its semantics: a non-blocking
    /// pollable file descriptor carrying whole xenstore messages).
    fn from_device(endpoint: Endpoint, f: File) -> std::io::Result<Conn> {
        // SAFETY: the `File` owns its descriptor, which stays open and unchanged for as long
        // as the `AsyncFd` owns the `File`.
        let fd = unsafe { AsyncFd::register_with_interest(f, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        let fd = Arc::new(fd);
        Ok(Conn::start(
            endpoint,
            Device(fd.clone()),
            Writer::Device(fd),
            true,
        ))
    }

    async fn open(endpoint: Endpoint) -> Result<Conn> {
        let what = || format!("connecting to {endpoint} (set XENSTORED_PATH?)");
        match &endpoint {
            Endpoint::Socket(p) => {
                let s = UnixStream::connect(p)
                    .await
                    .map_err(|e| Error::io(what(), e))?;
                Ok(Conn::from_socket(endpoint, s))
            }
            Endpoint::Xenbus(p) => {
                let p = p.clone();
                let f = tokio::task::spawn_blocking(move || {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                        .open(p)
                })
                .await
                .map_err(|e| Error::io(what(), std::io::Error::other(e)))?
                .map_err(|e| Error::io(what(), e))?;
                Conn::from_device(endpoint.clone(), f).map_err(|e| Error::io(what(), e))
            }
        }
    }

    /// Puts one whole message on the stream, in the order callers took the write lock. A write
    /// error closes the connection (every waiting caller then fails with the reason).
    async fn send(&self, msg: Vec<u8>) {
        // Cancel-safe: nothing is written until the lock is held, and from then on no await.
        let mut w = self.writer.clone().lock_owned().await;
        match w.write_now(&msg) {
            Ok(n) if n == msg.len() => {}
            Ok(n) => {
                // The stream is full: finish this message in a task that keeps the lock, so
                // the caller may give up without leaving half a message behind.
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = w.write_msg(&msg[n..]).await {
                        shared.close(format!("writing to xenstored: {e}"));
                    }
                });
            }
            Err(e) => self.shared.close(format!("writing to xenstored: {e}")),
        }
    }

    fn closed_err(&self, op: &str, what: &str) -> Error {
        let why = self
            .shared
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".into());
        Error::io(
            format!("xenstore {op} {what} on {}", self.endpoint),
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, why),
        )
    }

    async fn call(&self, ty: MsgType, tx: u32, payload: &[u8], what: &str) -> Result<Vec<u8>> {
        let op = op_name(ty);
        if payload.len() > PAYLOAD_MAX {
            return Err(Error::Xs {
                op,
                path: what.to_string(),
                errno: XsErrno::E2BIG,
            });
        }
        let permit = match &self.gate {
            Some(g) => Some(
                g.clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| self.closed_err(op, what))?,
            ),
            None => None,
        };
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut st = self.shared.lock();
            if st.closed.is_some() {
                drop(st);
                return Err(self.closed_err(op, what));
            }
            st.pending.insert(
                req,
                Pending {
                    reply: reply_tx,
                    _permit: permit,
                },
            );
        }
        self.send(encode_msg(ty, req, tx, payload)).await;
        let r = reply_rx.await.map_err(|_| self.closed_err(op, what))?;
        if r.ty == MsgType::Error as u32 {
            return Err(Error::Xs {
                op,
                path: what.to_string(),
                errno: XsErrno::parse(&r.body),
            });
        }
        if r.ty != ty as u32 {
            return Err(Error::Wire(format!(
                "xenstored answered {op} {what} with message type {}",
                r.ty
            )));
        }
        Ok(r.body)
    }
}

fn op_name(ty: MsgType) -> &'static str {
    match ty {
        MsgType::Read => "READ",
        MsgType::Write => "WRITE",
        MsgType::Mkdir => "MKDIR",
        MsgType::Rm => "RM",
        MsgType::Directory => "DIRECTORY",
        MsgType::GetPerms => "GET_PERMS",
        MsgType::SetPerms => "SET_PERMS",
        MsgType::Watch => "WATCH",
        MsgType::Unwatch => "UNWATCH",
        MsgType::TransactionStart => "TRANSACTION_START",
        MsgType::TransactionEnd => "TRANSACTION_END",
        MsgType::Introduce => "INTRODUCE",
        MsgType::Release => "RELEASE",
        MsgType::GetDomainPath => "GET_DOMAIN_PATH",
        MsgType::IsDomainIntroduced => "IS_DOMAIN_INTRODUCED",
        _ => "REQUEST",
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn strings(body: &[u8]) -> Result<Vec<String>> {
    wire::split_strings(body)?
        .into_iter()
        .map(|s| {
            String::from_utf8(s.to_vec())
                .map_err(|_| Error::Wire("non-UTF-8 string in reply".into()))
        })
        .collect()
}

fn utf8(op: &'static str, path: &str, v: Vec<u8>) -> Result<String> {
    String::from_utf8(v).map_err(|_| Error::Wire(format!("{op} {path}: value is not UTF-8")))
}

/// The changed paths a watch yields, starting with the initial event xenstored sends for the
/// watched path itself. Dropping it removes the watch (UNWATCH).
pub struct WatchStream {
    rx: futures::channel::mpsc::UnboundedReceiver<String>,
    conn: Arc<Conn>,
    path: String,
    token: String,
}

impl Stream for WatchStream {
    type Item = String;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<String>> {
        Pin::new(&mut self.rx).poll_next(cx)
    }
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("path", &self.path)
            .field("token", &self.token)
            .finish()
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.conn.shared.lock().watches.remove(&self.token);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let conn = self.conn.clone();
        let mut p = cstr(&self.path);
        p.extend_from_slice(&cstr(&self.token));
        let path = std::mem::take(&mut self.path);
        rt.spawn(async move {
            if let Err(e) = conn.call(MsgType::Unwatch, 0, &p, &path).await {
                tracing::debug!("removing watch on {path}: {e}");
            }
        });
    }
}

/// An async xenstore client over a socket or a xenbus device. Cheap to clone (clones share
/// one connection); requests from many tasks may be outstanding at once.
#[derive(Clone)]
pub struct Xs {
    conn: Arc<Conn>,
}

impl std::fmt::Debug for Xs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xs")
            .field("endpoint", &self.conn.endpoint)
            .finish()
    }
}

impl Xs {
    /// Connects like libxenstore ([`Endpoint::from_env`]): `XENSTORED_PATH`, else
    /// [`DEFAULT_SOCKET`] if it exists, else the xenbus device [`XENBUS_DEVICE`].
    pub async fn open() -> Result<Xs> {
        Xs::connect_endpoint(Endpoint::from_env()).await
    }

    /// Connects to `path`: a character device is used as a xenbus device, anything else as
    /// xenstored's unix socket ([`Endpoint::classify`]).
    pub async fn connect(path: &Path) -> Result<Xs> {
        Xs::connect_endpoint(Endpoint::classify(path)).await
    }

    /// Connects to an explicit endpoint.
    pub async fn connect_endpoint(endpoint: Endpoint) -> Result<Xs> {
        Ok(Xs {
            conn: Arc::new(Conn::open(endpoint).await?),
        })
    }

    /// A client speaking the xenbus device protocol (one request in flight, events
    /// interleaved) over an already open, non-blocking, pollable file: for tests that emulate
    /// the device, and for callers that opened the device themselves.
    pub fn from_device_file(f: File, label: &Path) -> Result<Xs> {
        let endpoint = Endpoint::Xenbus(label.to_path_buf());
        let what = format!("polling {endpoint}");
        Ok(Xs {
            conn: Arc::new(Conn::from_device(endpoint, f).map_err(|e| Error::io(what, e))?),
        })
    }

    /// A new, independent connection to the same endpoint.
    pub async fn reconnect(&self) -> Result<Xs> {
        Xs::connect_endpoint(self.conn.endpoint.clone()).await
    }

    /// Where this client is connected.
    pub fn endpoint(&self) -> &Endpoint {
        &self.conn.endpoint
    }

    /// The socket or device path this client is connected to.
    pub fn socket(&self) -> &Path {
        self.conn.endpoint.path()
    }

    /// READ as raw bytes.
    pub async fn read_bytes(&self, path: &str) -> Result<Vec<u8>> {
        self.conn.call(MsgType::Read, 0, &cstr(path), path).await
    }

    /// READ as UTF-8 text (a non-UTF-8 value is an error).
    pub async fn read(&self, path: &str) -> Result<String> {
        utf8("READ", path, self.read_bytes(path).await?)
    }

    /// READ, with ENOENT as `None`.
    pub async fn read_opt(&self, path: &str) -> Result<Option<String>> {
        match self.read(path).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_enoent(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// WRITE (creates missing parents).
    pub async fn write(&self, path: &str, value: &str) -> Result<()> {
        self.write_bytes(path, value.as_bytes()).await
    }

    /// WRITE of raw bytes.
    pub async fn write_bytes(&self, path: &str, value: &[u8]) -> Result<()> {
        let mut p = cstr(path);
        p.extend_from_slice(value);
        self.conn.call(MsgType::Write, 0, &p, path).await.map(drop)
    }

    /// DIRECTORY: child names (a non-UTF-8 name is an error).
    pub async fn directory(&self, path: &str) -> Result<Vec<String>> {
        strings(
            &self
                .conn
                .call(MsgType::Directory, 0, &cstr(path), path)
                .await?,
        )
    }

    /// RM (recursive).
    pub async fn rm(&self, path: &str) -> Result<()> {
        self.conn
            .call(MsgType::Rm, 0, &cstr(path), path)
            .await
            .map(drop)
    }

    /// A watch on `path` (and everything below it), on this client's connection: yields
    /// changed paths, starting with the initial event xenstored sends for the path itself.
    /// Events are queued without bound, so a consumer may issue requests on the same
    /// connection between two events.
    pub async fn watch(&self, path: &str) -> Result<WatchStream> {
        let token = format!(
            "ddstor-{}",
            self.conn.next_token.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = futures::channel::mpsc::unbounded();
        self.conn.shared.lock().watches.insert(token.clone(), tx);
        let stream = WatchStream {
            rx,
            conn: self.conn.clone(),
            path: path.to_string(),
            token,
        };
        let mut p = cstr(path);
        p.extend_from_slice(&cstr(&stream.token));
        // On failure the stream's drop unregisters the token (and sends a harmless UNWATCH).
        self.conn.call(MsgType::Watch, 0, &p, path).await?;
        Ok(stream)
    }

    /// MKDIR.
    pub async fn mkdir(&self, path: &str) -> Result<()> {
        self.conn
            .call(MsgType::Mkdir, 0, &cstr(path), path)
            .await
            .map(drop)
    }

    /// GET_PERMS.
    pub async fn get_perms(&self, path: &str) -> Result<Vec<Perm>> {
        get_perms(&self.conn, 0, path).await
    }

    /// SET_PERMS: the first entry is the owner and the default for unlisted domains.
    pub async fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<()> {
        set_perms(&self.conn, 0, path, perms).await
    }

    /// GET_DOMAIN_PATH.
    pub async fn get_domain_path(&self, dom: DomId) -> Result<String> {
        let b = self
            .conn
            .call(MsgType::GetDomainPath, 0, &cstr(&dom.0.to_string()), "")
            .await?;
        Ok(strings(&b)?.into_iter().next().unwrap_or_default())
    }

    /// XS_INTRODUCE (dom0 only). On the test server this creates `/local/domain/<dom>` and
    /// the socket through which a connection acts as `dom`.
    pub async fn introduce_domain(&self, dom: DomId) -> Result<()> {
        let p = format!("{}\x000\x000\x00", dom.0);
        self.conn
            .call(MsgType::Introduce, 0, p.as_bytes(), &dom.to_string())
            .await
            .map(drop)
    }

    /// XS_RELEASE (dom0 only).
    pub async fn release_domain(&self, dom: DomId) -> Result<()> {
        self.conn
            .call(
                MsgType::Release,
                0,
                &cstr(&dom.0.to_string()),
                &dom.to_string(),
            )
            .await
            .map(drop)
    }

    /// Starts a transaction.
    pub async fn transaction(&self) -> Result<Transaction> {
        let b = self
            .conn
            .call(MsgType::TransactionStart, 0, b"\0", "")
            .await?;
        let id = strings(&b)?
            .first()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|&i| i != 0)
            .ok_or_else(|| Error::Wire("TRANSACTION_START reply is not a transaction id".into()))?;
        Ok(Transaction {
            conn: self.conn.clone(),
            id,
            done: false,
        })
    }
}

async fn get_perms(conn: &Conn, tx: u32, path: &str) -> Result<Vec<Perm>> {
    let b = conn.call(MsgType::GetPerms, tx, &cstr(path), path).await?;
    wire::split_strings(&b)?
        .into_iter()
        .map(|s| {
            Perm::parse(s).ok_or_else(|| Error::Wire(format!("bad permission in reply for {path}")))
        })
        .collect()
}

async fn set_perms(conn: &Conn, tx: u32, path: &str, perms: &[Perm]) -> Result<()> {
    let mut p = cstr(path);
    for perm in perms {
        p.extend_from_slice(&cstr(&perm.to_wire()));
    }
    conn.call(MsgType::SetPerms, tx, &p, path).await.map(drop)
}

/// A xenstore transaction: operations see a consistent snapshot; [`Transaction::commit`]
/// answers `Error::Xs { errno: EAGAIN, .. }` when something it touched changed meanwhile
/// (retry the whole transaction). Dropped without commit or abort, it is aborted in the
/// background (or by xenstored when the connection closes).
pub struct Transaction {
    conn: Arc<Conn>,
    id: u32,
    done: bool,
}

impl Transaction {
    /// The transaction id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// READ inside the transaction (raw bytes).
    pub async fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.conn
            .call(MsgType::Read, self.id, &cstr(path), path)
            .await
    }

    /// WRITE inside the transaction.
    pub async fn write(&self, path: &str, value: &[u8]) -> Result<()> {
        let mut p = cstr(path);
        p.extend_from_slice(value);
        self.conn
            .call(MsgType::Write, self.id, &p, path)
            .await
            .map(drop)
    }

    /// MKDIR inside the transaction.
    pub async fn mkdir(&self, path: &str) -> Result<()> {
        self.conn
            .call(MsgType::Mkdir, self.id, &cstr(path), path)
            .await
            .map(drop)
    }

    /// RM inside the transaction.
    pub async fn rm(&self, path: &str) -> Result<()> {
        self.conn
            .call(MsgType::Rm, self.id, &cstr(path), path)
            .await
            .map(drop)
    }

    /// DIRECTORY inside the transaction.
    pub async fn directory(&self, path: &str) -> Result<Vec<String>> {
        strings(
            &self
                .conn
                .call(MsgType::Directory, self.id, &cstr(path), path)
                .await?,
        )
    }

    /// GET_PERMS inside the transaction.
    pub async fn get_perms(&self, path: &str) -> Result<Vec<Perm>> {
        get_perms(&self.conn, self.id, path).await
    }

    /// SET_PERMS inside the transaction.
    pub async fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<()> {
        set_perms(&self.conn, self.id, path, perms).await
    }

    /// Commits. EAGAIN means a conflicting change: start over.
    pub async fn commit(mut self) -> Result<()> {
        self.done = true;
        self.conn
            .call(MsgType::TransactionEnd, self.id, b"T\0", "commit")
            .await
            .map(drop)
    }

    /// Aborts.
    pub async fn abort(mut self) -> Result<()> {
        self.done = true;
        self.conn
            .call(MsgType::TransactionEnd, self.id, b"F\0", "abort")
            .await
            .map(drop)
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let conn = self.conn.clone();
        let id = self.id;
        rt.spawn(async move {
            if let Err(e) = conn
                .call(MsgType::TransactionEnd, id, b"F\0", "abort")
                .await
            {
                tracing::debug!(tx = id, "aborting a dropped transaction: {e}");
            }
        });
    }
}

/// Whether an error is xenstored's EAGAIN (a transaction to retry).
pub fn is_eagain(e: &Error) -> bool {
    matches!(
        e,
        Error::Xs {
            errno: XsErrno::EAGAIN,
            ..
        }
    )
}

/// Whether an error is xenstored's ENOENT.
pub fn is_enoent(e: &Error) -> bool {
    matches!(
        e,
        Error::Xs {
            errno: XsErrno::ENOENT,
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_char_device_is_a_xenbus_endpoint_and_anything_else_a_socket() {
        assert_eq!(
            Endpoint::classify(Path::new("/dev/null")),
            Endpoint::Xenbus(PathBuf::from("/dev/null"))
        );
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(Endpoint::classify(&sock), Endpoint::Socket(sock.clone()));
        let missing = dir.path().join("missing");
        assert_eq!(Endpoint::classify(&missing), Endpoint::Socket(missing));
    }

    #[tokio::test]
    async fn a_closed_connection_fails_calls_with_the_reason() {
        let (a, b) = UnixStream::pair().unwrap();
        let xs = Xs {
            conn: Arc::new(Conn::from_socket(Endpoint::Socket("/test".into()), a)),
        };
        drop(b);
        let e = xs.read("/x").await.unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("/test"), "{e}");
    }
}
