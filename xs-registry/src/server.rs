//! The test xenstored: xenstore's wire protocol on unix sockets, for machines without Xen.
//!
//! Debian's `xenstore-utils` and libxenstore work against it unchanged through
//! `XENSTORED_PATH=<socket>`. A connection to the main socket acts as dom0 (privileged).
//!
//! **Acting as domain N.** Every introduced domain N gets its own socket `<socket>.<N>`
//! ([`domain_socket_path`]); a connection to it acts as domain N, with N's permissions and
//! relative paths under `/local/domain/<N>`. Domains are introduced by
//! [`ServerOptions::domains`] at start (`ddstor xenstored --domain N`), by
//! [`Server::introduce_domain`], or by dom0 sending XS_INTRODUCE (payload `N NUL mfn NUL port NUL`,
//! as the toolstack does); that creates `/local/domain/<N>` (owned by dom0, readable by N, with
//! `domid`, `name` and a `data/` directory N owns) and fires `@introduceDomain`. Releasing
//! ([`Server::release_domain`] or XS_RELEASE) removes `/local/domain/<N>`, closes N's
//! connections and socket, and fires `@releaseDomain`. Extra sockets for a domain can be
//! bound with [`ServerOptions::domain_sockets`] (`--domain-socket N=PATH`).
//!
//! Bad wire input (oversized payloads, unknown types, strings without NUL) closes that
//! connection with a logged reason; everyone else is served on.

use crate::store::{
    canonicalize, domain_path, is_child, perm_for, ConnId, Event, Limits, Perm, Store, PERM_READ,
};
use crate::wire::{self, encode_msg, Header, MsgType, Request, XsErrno, HEADER_LEN, PAYLOAD_MAX};
use crate::{DomId, Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Messages queued for one connection before it counts as not reading (events beyond are
/// dropped with a warning; a reply beyond closes the connection).
const OUT_QUEUE: usize = 4096;

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `/local/domain/0/name`.
    pub dom0_name: String,
    /// Quotas.
    pub limits: Limits,
    /// Domains to introduce at start (each gets `<socket>.<N>`).
    pub domains: Vec<DomId>,
    /// Extra sockets whose connections act as the given domain (introduced at start).
    pub domain_sockets: Vec<(DomId, PathBuf)>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            dom0_name: "Domain-0".into(),
            limits: Limits::default(),
            domains: Vec::new(),
            domain_sockets: Vec::new(),
        }
    }
}

/// The socket through which a connection acts as domain `dom`: `<main>.<dom>`.
pub fn domain_socket_path(main: &Path, dom: DomId) -> PathBuf {
    let mut s = main.as_os_str().to_owned();
    s.push(format!(".{}", dom.0));
    PathBuf::from(s)
}

struct WatchReg {
    abs: String,
    given: Vec<u8>,
    token: Vec<u8>,
    relative: bool,
}

struct Conn {
    dom: DomId,
    out: mpsc::Sender<Vec<u8>>,
    watches: Vec<WatchReg>,
    kill: Arc<Notify>,
}

struct State {
    store: Store,
    conns: HashMap<ConnId, Conn>,
    next_conn: ConnId,
    listeners: HashMap<PathBuf, (DomId, JoinHandle<()>)>,
}

struct Inner {
    state: Mutex<State>,
    socket: PathBuf,
    shutdown: watch::Sender<bool>,
}

/// A running test xenstored. Dropping it stops the server and removes its sockets.
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    /// Binds `socket` (replacing a stale socket file) and starts serving. Must be called
    /// inside a tokio runtime.
    pub fn start(socket: impl AsRef<Path>, opts: ServerOptions) -> Result<Server> {
        let socket = socket.as_ref().to_path_buf();
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                store: Store::new(&opts.dom0_name, opts.limits.clone()),
                conns: HashMap::new(),
                next_conn: 1,
                listeners: HashMap::new(),
            }),
            socket: socket.clone(),
            shutdown,
        });
        let server = Server { inner };
        server
            .inner
            .listen(&mut server.inner.lock(), &socket, DomId::DOM0)?;
        for d in &opts.domains {
            server.introduce_domain(*d)?;
        }
        for (d, p) in &opts.domain_sockets {
            server.introduce_domain(*d)?;
            server.inner.listen(&mut server.inner.lock(), p, *d)?;
        }
        info!(socket = %socket.display(), "test xenstored listening");
        Ok(server)
    }

    /// The main (dom0) socket.
    pub fn socket_path(&self) -> &Path {
        &self.inner.socket
    }

    /// Introduces domain `dom` (see the module documentation) and returns the socket through
    /// which a connection acts as it.
    pub fn introduce_domain(&self, dom: DomId) -> Result<PathBuf> {
        let mut st = self.inner.lock();
        self.inner.introduce(&mut st, dom).map_err(|e| Error::Xs {
            op: "INTRODUCE",
            path: domain_path(dom),
            errno: e,
        })?;
        Ok(domain_socket_path(&self.inner.socket, dom))
    }

    /// Releases domain `dom`: removes `/local/domain/<dom>`, closes its connections and socket,
    /// fires `@releaseDomain`.
    pub fn release_domain(&self, dom: DomId) -> Result<()> {
        let mut st = self.inner.lock();
        self.inner.release(&mut st, dom).map_err(|e| Error::Xs {
            op: "RELEASE",
            path: domain_path(dom),
            errno: e,
        })
    }

    /// Number of open client connections.
    pub fn connection_count(&self) -> usize {
        self.inner.lock().conns.len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.inner.shutdown.send(true);
        let mut st = self.inner.lock();
        for (p, (_, h)) in st.listeners.drain() {
            h.abort();
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Runs the server on `socket` in the foreground until SIGINT or SIGTERM.
pub async fn run(socket: impl AsRef<Path>, opts: ServerOptions) -> Result<()> {
    let server = Server::start(socket, opts)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("installing SIGTERM handler", e))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("test xenstored stopping");
    drop(server);
    Ok(())
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn listen(self: &Arc<Self>, st: &mut State, path: &Path, dom: DomId) -> Result<()> {
        if st.listeners.contains_key(path) {
            return Ok(());
        }
        if let Ok(md) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if md.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| Error::io(format!("binding xenstored socket {}", path.display()), e))?;
        let me = Arc::downgrade(self);
        let mut shutdown = self.shutdown.subscribe();
        let h = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = shutdown.changed() => return,
                };
                match accepted {
                    Ok((stream, _)) => {
                        let Some(inner) = me.upgrade() else { return };
                        tokio::spawn(inner.serve(stream, dom));
                    }
                    Err(e) => {
                        warn!(error = %e, "xenstored accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
        st.listeners.insert(path.to_path_buf(), (dom, h));
        Ok(())
    }

    fn introduce(self: &Arc<Self>, st: &mut State, dom: DomId) -> Result<(), XsErrno> {
        let ev = st.store.introduce(dom, &format!("dom{}", dom.0))?;
        if !dom.is_privileged() {
            let p = domain_socket_path(&self.socket, dom);
            if let Err(e) = self.listen(st, &p, dom) {
                warn!(dom = %dom, error = %e, "could not bind the domain's socket");
                return Err(XsErrno::EIO);
            }
        }
        deliver_events(st, &ev);
        Ok(())
    }

    fn release(&self, st: &mut State, dom: DomId) -> Result<(), XsErrno> {
        let ev = st.store.release(dom)?;
        let gone: Vec<PathBuf> = st
            .listeners
            .iter()
            .filter(|(_, (d, _))| *d == dom)
            .map(|(p, _)| p.clone())
            .collect();
        for p in gone {
            if let Some((_, h)) = st.listeners.remove(&p) {
                h.abort();
                let _ = std::fs::remove_file(&p);
            }
        }
        for c in st.conns.values().filter(|c| c.dom == dom) {
            c.kill.notify_one();
        }
        deliver_events(st, &ev);
        Ok(())
    }

    async fn serve(self: Arc<Self>, stream: UnixStream, dom: DomId) {
        let (mut rd, mut wr) = stream.into_split();
        let (out, mut rx) = mpsc::channel::<Vec<u8>>(OUT_QUEUE);
        let kill = Arc::new(Notify::new());
        let cid = {
            let mut st = self.lock();
            let cid = st.next_conn;
            st.next_conn += 1;
            st.conns.insert(
                cid,
                Conn {
                    dom,
                    out,
                    watches: Vec::new(),
                    kill: kill.clone(),
                },
            );
            cid
        };
        debug!(conn = cid, dom = %dom, "xenstored connection opened");
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if wr.write_all(&m).await.is_err() {
                    break;
                }
            }
        });
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let r = tokio::select! {
                r = read_request(&mut rd) => r,
                _ = kill.notified() => { info!(conn = cid, dom = %dom, "closing connection: domain released or connection not reading"); break; }
                _ = shutdown.changed() => break,
            };
            match r {
                Ok(Some(req)) => {
                    let mut st = self.lock();
                    self.handle(&mut st, cid, dom, req);
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(conn = cid, dom = %dom, "closing xenstored connection: {e}");
                    break;
                }
            }
        }
        {
            let mut st = self.lock();
            st.conns.remove(&cid);
            st.store.drop_conn(cid);
        }
        let _ = writer.await;
        debug!(conn = cid, dom = %dom, "xenstored connection closed");
    }

    fn handle(self: &Arc<Self>, st: &mut State, cid: ConnId, dom: DomId, req: Request) {
        let (ty, rid, tx) = (req.ty, req.req_id, req.tx_id);
        let mut events = Vec::new();
        let mut initial: Option<Vec<u8>> = None;
        let result = self.execute(st, cid, dom, req, &mut events, &mut initial);
        let msg = match result {
            Ok(payload) => encode_msg(ty, rid, tx, &payload),
            Err(e) => {
                debug!(conn = cid, dom = %dom, op = ?ty, errno = %e, "xenstore request failed");
                encode_msg(MsgType::Error, rid, tx, format!("{e}\0").as_bytes())
            }
        };
        if let Some(c) = st.conns.get(&cid) {
            if c.out.try_send(msg).is_err() {
                warn!(conn = cid, dom = %dom, "connection does not read its replies; closing it");
                c.kill.notify_one();
            }
            if let Some(ev) = initial {
                let _ = c.out.try_send(ev);
            }
        }
        deliver_events(st, &events);
    }

    fn execute(
        self: &Arc<Self>,
        st: &mut State,
        cid: ConnId,
        dom: DomId,
        req: Request,
        events: &mut Vec<Event>,
        initial: &mut Option<Vec<u8>>,
    ) -> Result<Vec<u8>, XsErrno> {
        let args = Args { a: &req.args, dom };
        if let Some(r) = apply_node_op(&mut st.store, cid, dom, &req, events) {
            return r;
        }
        let ok = || b"OK\0".to_vec();
        let s = &mut st.store;
        match req.ty {
            MsgType::Watch => {
                args.nargs(2)?;
                let abs = args.path(true)?;
                let token = args.arg(1)?.to_vec();
                let limit = s.limits.max_watches_per_conn;
                let c = st.conns.get_mut(&cid).ok_or(XsErrno::EIO)?;
                if c.watches.iter().any(|w| w.abs == abs && w.token == token) {
                    return Err(XsErrno::EEXIST);
                }
                if c.watches.len() >= limit {
                    return Err(XsErrno::E2BIG);
                }
                let given = args.arg(0)?.to_vec();
                let relative = !given.starts_with(b"/") && !given.starts_with(b"@");
                // The watch fires once up front, right after the acknowledgement.
                let mut p = given.clone();
                p.push(0);
                p.extend_from_slice(&token);
                p.push(0);
                *initial = Some(encode_msg(MsgType::WatchEvent, 0, 0, &p));
                c.watches.push(WatchReg {
                    abs,
                    given,
                    token,
                    relative,
                });
                Ok(ok())
            }
            MsgType::Unwatch => {
                args.nargs(2)?;
                let abs = args.path(true)?;
                let token = args.arg(1)?;
                let c = st.conns.get_mut(&cid).ok_or(XsErrno::EIO)?;
                let i = c
                    .watches
                    .iter()
                    .position(|w| w.abs == abs && w.token == token)
                    .ok_or(XsErrno::ENOENT)?;
                c.watches.remove(i);
                Ok(ok())
            }
            MsgType::ResetWatches => {
                if let Some(c) = st.conns.get_mut(&cid) {
                    c.watches.clear();
                }
                Ok(ok())
            }
            MsgType::Read
            | MsgType::Write
            | MsgType::Mkdir
            | MsgType::Rm
            | MsgType::Directory
            | MsgType::DirectoryPart
            | MsgType::GetPerms
            | MsgType::SetPerms
            | MsgType::TransactionStart
            | MsgType::TransactionEnd => Err(XsErrno::EINVAL),
            MsgType::GetDomainPath => {
                args.nargs(1)?;
                let d = DomId(parse_num(args.arg(0)?)?);
                Ok(format!("{}\0", domain_path(d)).into_bytes())
            }
            MsgType::IsDomainIntroduced => {
                args.nargs(1)?;
                let d = DomId(parse_num(args.arg(0)?)?);
                Ok(if s.is_introduced(d) {
                    b"T\0".to_vec()
                } else {
                    b"F\0".to_vec()
                })
            }
            MsgType::Introduce => {
                if !dom.is_privileged() {
                    return Err(XsErrno::EACCES);
                }
                if args.a.len() < 3 {
                    return Err(XsErrno::EINVAL);
                }
                let d = DomId(parse_num(args.arg(0)?)?);
                if d.is_privileged() {
                    return Err(XsErrno::EINVAL);
                }
                self.introduce(st, d)?;
                Ok(ok())
            }
            MsgType::Release => {
                if !dom.is_privileged() {
                    return Err(XsErrno::EACCES);
                }
                args.nargs(1)?;
                let d = DomId(parse_num(args.arg(0)?)?);
                self.release(st, d)?;
                Ok(ok())
            }
            MsgType::Resume => {
                if !dom.is_privileged() {
                    return Err(XsErrno::EACCES);
                }
                args.nargs(1)?;
                let d = DomId(parse_num(args.arg(0)?)?);
                if s.is_introduced(d) {
                    Ok(ok())
                } else {
                    Err(XsErrno::ENOENT)
                }
            }
            MsgType::SetTarget | MsgType::Control => Err(XsErrno::ENOSYS),
            MsgType::WatchEvent | MsgType::Error => Err(XsErrno::EINVAL),
        }
    }
}

/// Executes the requests that only touch the store (READ, WRITE, MKDIR, RM, DIRECTORY,
/// DIRECTORY_PART, GET_PERMS, SET_PERMS, TRANSACTION_START/END) for connection `cid` acting as
/// `dom`: the reply payload or error, with the events to deliver in `events`. `None` for
/// every other request type. Public so the wire fuzz target drives the same code as the server.
pub fn apply_node_op(
    s: &mut Store,
    cid: ConnId,
    dom: DomId,
    req: &Request,
    events: &mut Vec<Event>,
) -> Option<Result<Vec<u8>, XsErrno>> {
    let tx = req.tx_id;
    let args = Args { a: &req.args, dom };
    let ok = || b"OK\0".to_vec();
    let r = (|| match req.ty {
        MsgType::Read => {
            args.nargs(1)?;
            s.read(cid, dom, tx, &args.path(false)?)
        }
        MsgType::Write => {
            args.nargs(2)?;
            *events = s.write(cid, dom, tx, &args.path(false)?, args.arg(1)?)?;
            Ok(ok())
        }
        MsgType::Mkdir => {
            args.nargs(1)?;
            *events = s.mkdir(cid, dom, tx, &args.path(false)?)?;
            Ok(ok())
        }
        MsgType::Rm => {
            args.nargs(1)?;
            *events = s.rm(cid, dom, tx, &args.path(false)?)?;
            Ok(ok())
        }
        MsgType::Directory => {
            args.nargs(1)?;
            let out = nul_list(&s.directory(cid, dom, tx, &args.path(false)?)?);
            if out.len() > PAYLOAD_MAX {
                return Err(XsErrno::E2BIG);
            }
            Ok(out)
        }
        MsgType::DirectoryPart => {
            args.nargs(2)?;
            let off: usize = parse_num(args.arg(1)?)?;
            let (gen, children) = s.directory_gen(cid, dom, tx, &args.path(false)?)?;
            let all = nul_list(&children);
            if off > all.len() {
                return Err(XsErrno::EINVAL);
            }
            let mut out = format!("{gen}\0").into_bytes();
            let room = PAYLOAD_MAX - out.len() - 1;
            let rest = &all[off..];
            if rest.len() <= room {
                out.extend_from_slice(rest);
                out.push(0);
            } else {
                // Whole names only.
                let cut = rest[..room]
                    .iter()
                    .rposition(|&c| c == 0)
                    .map_or(0, |i| i + 1);
                out.extend_from_slice(&rest[..cut]);
            }
            Ok(out)
        }
        MsgType::GetPerms => {
            args.nargs(1)?;
            let perms = s.get_perms(cid, dom, tx, &args.path(true)?)?;
            Ok(nul_list(
                &perms.iter().map(Perm::to_wire).collect::<Vec<_>>(),
            ))
        }
        MsgType::SetPerms => {
            if args.a.len() < 2 {
                return Err(XsErrno::EINVAL);
            }
            let perms = args.a[1..]
                .iter()
                .map(|p| Perm::parse(p).ok_or(XsErrno::EINVAL))
                .collect::<Result<Vec<_>, _>>()?;
            *events = s.set_perms(cid, dom, tx, &args.path(true)?, perms)?;
            Ok(ok())
        }
        MsgType::TransactionStart => {
            if tx != 0 {
                return Err(XsErrno::EBUSY);
            }
            Ok(format!("{}\0", s.tx_start(cid)?).into_bytes())
        }
        MsgType::TransactionEnd => {
            args.nargs(1)?;
            let commit = match args.arg(0)? {
                b"T" => true,
                b"F" => false,
                _ => return Err(XsErrno::EINVAL),
            };
            *events = s.tx_end(cid, tx, commit)?;
            Ok(ok())
        }
        _ => Err(XsErrno::ENOSYS),
    })();
    match req.ty {
        MsgType::Read
        | MsgType::Write
        | MsgType::Mkdir
        | MsgType::Rm
        | MsgType::Directory
        | MsgType::DirectoryPart
        | MsgType::GetPerms
        | MsgType::SetPerms
        | MsgType::TransactionStart
        | MsgType::TransactionEnd => Some(r),
        _ => None,
    }
}

/// A request's arguments, read by the handlers of a caller acting as `dom`.
struct Args<'a> {
    a: &'a [Vec<u8>],
    dom: DomId,
}

impl<'a> Args<'a> {
    /// Argument `i` (EINVAL when missing).
    fn arg(&self, i: usize) -> Result<&'a [u8], XsErrno> {
        self.a.get(i).map(Vec::as_slice).ok_or(XsErrno::EINVAL)
    }

    /// EINVAL unless there are exactly `n` arguments.
    fn nargs(&self, n: usize) -> Result<(), XsErrno> {
        if self.a.len() == n {
            Ok(())
        } else {
            Err(XsErrno::EINVAL)
        }
    }

    /// The first argument as an absolute path (`@` watch paths only if `allow_special`).
    fn path(&self, allow_special: bool) -> Result<String, XsErrno> {
        canonicalize(self.dom, self.arg(0)?, allow_special)
    }
}

fn parse_num<T: std::str::FromStr>(b: &[u8]) -> Result<T, XsErrno> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return Err(XsErrno::EINVAL);
    }
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(XsErrno::EINVAL)
}

fn nul_list<S: AsRef<str>>(items: &[S]) -> Vec<u8> {
    let mut v = Vec::new();
    for i in items {
        v.extend_from_slice(i.as_ref().as_bytes());
        v.push(0);
    }
    v
}

/// Sends each event to every watch it matches whose connection may read the node.
fn deliver_events(st: &State, events: &[Event]) {
    for ev in events {
        for (cid, c) in &st.conns {
            if perm_for(c.dom, &ev.perms) & PERM_READ == 0 {
                continue;
            }
            for w in &c.watches {
                let hit = if ev.exact || ev.path.starts_with('@') {
                    w.abs == ev.path
                } else {
                    !w.abs.starts_with('@') && is_child(&ev.path, &w.abs)
                };
                if !hit {
                    continue;
                }
                let shown = if w.relative {
                    let prefix = format!("{}/", domain_path(c.dom));
                    ev.path
                        .strip_prefix(&prefix)
                        .unwrap_or(&ev.path)
                        .to_string()
                } else {
                    ev.path.clone()
                };
                let _ = &w.given;
                let mut p = shown.into_bytes();
                p.push(0);
                p.extend_from_slice(&w.token);
                p.push(0);
                if c.out
                    .try_send(encode_msg(MsgType::WatchEvent, 0, 0, &p))
                    .is_err()
                {
                    warn!(conn = cid, dom = %c.dom, path = %ev.path, "watch event dropped: connection not reading");
                }
            }
        }
    }
}

/// Reads one request: `Ok(None)` on a clean end of stream between messages.
async fn read_request(rd: &mut OwnedReadHalf) -> Result<Option<Request>> {
    let mut hb = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = rd
            .read(&mut hb[got..])
            .await
            .map_err(|e| Error::io("reading request header", e))?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(Error::Wire(format!(
                    "connection closed inside a header ({got} of 16 bytes)"
                )))
            };
        }
        got += n;
    }
    let h = Header::decode(&hb);
    let ty = h.validate()?;
    let mut payload = vec![0u8; h.len as usize];
    rd.read_exact(&mut payload)
        .await
        .map_err(|e| Error::io(format!("reading {}-byte payload", h.len), e))?;
    wire::parse_payload(ty, &h, &payload).map(Some)
}
