//! The async xenstore client the registry uses.
//!
//! Plain node operations (READ, WRITE, DIRECTORY, RM) and watches go through the
//! `xenstore-rs` crate's tokio client ([`xenstore_rs::tokio::XsTokio`]). That crate has no
//! SET_PERMS/GET_PERMS, no transactions (its wire writer always sends `tx_id = 0`) and no
//! MKDIR/INTRODUCE/RELEASE, and it keeps its wire module private; so those live here, in one
//! place: [`Xs`]'s second connection ("ext"), which speaks the wire protocol through
//! [`crate::wire`] and carries every transaction ([`Transaction`]) from start to end.
//!
//! Connecting: [`Xs::open`] honours `XENSTORED_PATH` (default `/run/xenstored/socket`, then
//! `/dev/xen/xenbus` for the xenstore-rs half) like libxenstore; [`Xs::connect`] takes an explicit
//! socket (tests, domain sockets of the test server). `XsTokio` can only be pointed at a socket
//! through `XENSTORED_PATH`, so [`Xs::connect`] sets that variable for the instant of the
//! connect, serialised by a process-wide lock, and restores it.

use crate::store::Perm;
use crate::wire::{self, encode_msg, Header, MsgType, XsErrno, HEADER_LEN, PAYLOAD_MAX};
use crate::{DomId, Error, Result};
use futures::{Stream, StreamExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use xenstore_rs::tokio::XsTokio;
use xenstore_rs::{AsyncWatch, AsyncXs};

/// Default xenstored socket when `XENSTORED_PATH` is not set.
pub const DEFAULT_SOCKET: &str = "/run/xenstored/socket";

static ENV_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn op_err(op: &'static str, path: &str, e: std::io::Error) -> Error {
    // xenstore-rs reports xenstored's answer as "XS interface error <ENAME>".
    let msg = e.to_string();
    if let Some(name) = msg.strip_prefix("XS interface error ") {
        return Error::Xs {
            op,
            path: path.to_string(),
            errno: XsErrno::parse(name.as_bytes()),
        };
    }
    Error::io(format!("xenstore {op} {path}"), e)
}

/// A xenstore-rs client on the socket at `path` (see the module documentation for why the
/// environment is involved).
async fn xs_tokio_at(path: &Path) -> Result<XsTokio> {
    let _g = ENV_LOCK.lock().await;
    let old = std::env::var_os("XENSTORED_PATH");
    std::env::set_var("XENSTORED_PATH", path);
    let r = XsTokio::new().await;
    match old {
        Some(v) => std::env::set_var("XENSTORED_PATH", v),
        None => std::env::remove_var("XENSTORED_PATH"),
    }
    r.map_err(|e| Error::io(format!("connecting to xenstored at {}", path.display()), e))
}

/// The wire connection for what xenstore-rs lacks. Requests are serialised (one in flight).
struct Ext {
    stream: tokio::sync::Mutex<UnixStream>,
    req: AtomicU32,
    broken: AtomicBool,
}

impl Ext {
    async fn call(&self, ty: MsgType, tx: u32, payload: &[u8], what: &str) -> Result<Vec<u8>> {
        let op = op_name(ty);
        if payload.len() > PAYLOAD_MAX {
            return Err(Error::Xs {
                op,
                path: what.to_string(),
                errno: XsErrno::E2BIG,
            });
        }
        let mut s = self.stream.lock().await;
        if self.broken.load(Ordering::Acquire) {
            return Err(Error::Invalid(format!(
                "xenstore {op} {what}: connection unusable after an interrupted request; reconnect"
            )));
        }
        // Set until the reply is read: a future dropped half-way leaves the stream unusable.
        self.broken.store(true, Ordering::Release);
        let req = self.req.fetch_add(1, Ordering::Relaxed);
        let io = |e| Error::io(format!("xenstore {op} {what}"), e);
        s.write_all(&encode_msg(ty, req, tx, payload))
            .await
            .map_err(io)?;
        loop {
            let mut hb = [0u8; HEADER_LEN];
            s.read_exact(&mut hb).await.map_err(io)?;
            let h = Header::decode(&hb);
            if h.len as usize > PAYLOAD_MAX {
                return Err(Error::Wire(format!(
                    "xenstored sent a {}-byte payload",
                    h.len
                )));
            }
            let mut body = vec![0u8; h.len as usize];
            s.read_exact(&mut body).await.map_err(io)?;
            if h.ty == MsgType::WatchEvent as u32 {
                continue;
            }
            self.broken.store(false, Ordering::Release);
            if h.ty == MsgType::Error as u32 {
                return Err(Error::Xs {
                    op,
                    path: what.to_string(),
                    errno: XsErrno::parse(&body),
                });
            }
            if h.ty != ty as u32 || h.req_id != req {
                return Err(Error::Wire(format!(
                    "xenstored answered {op} with type {} req {} (sent req {req})",
                    h.ty, h.req_id
                )));
            }
            return Ok(body);
        }
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

/// The stream of changed paths a watch yields.
pub type WatchStream = std::pin::Pin<Box<dyn Stream<Item = String> + Send + 'static>>;

/// An async xenstore client: `xenstore-rs` plus the additions above. Cheap to clone.
#[derive(Clone)]
pub struct Xs {
    xs: XsTokio,
    ext: Arc<Ext>,
    socket: PathBuf,
}

impl std::fmt::Debug for Xs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xs").field("socket", &self.socket).finish()
    }
}

impl Xs {
    /// Connects like libxenstore: `XENSTORED_PATH`, else [`DEFAULT_SOCKET`].
    pub async fn open() -> Result<Xs> {
        let path = std::env::var_os("XENSTORED_PATH")
            .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from);
        Xs::connect(&path).await
    }

    /// Connects to the xenstored socket at `path`.
    pub async fn connect(path: &Path) -> Result<Xs> {
        let what = || {
            format!(
                "connecting to xenstored at {} (set XENSTORED_PATH?)",
                path.display()
            )
        };
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| Error::io(what(), e))?;
        let xs = xs_tokio_at(path).await?;
        Ok(Xs {
            xs,
            ext: Arc::new(Ext {
                stream: tokio::sync::Mutex::new(stream),
                req: AtomicU32::new(1),
                broken: AtomicBool::new(false),
            }),
            socket: path.to_path_buf(),
        })
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// READ as UTF-8 text (a non-UTF-8 value is an error).
    pub async fn read(&self, path: &str) -> Result<String> {
        self.xs
            .read(path)
            .await
            .map(String::from)
            .map_err(|e| op_err("READ", path, e))
    }

    /// READ, with ENOENT as `None`.
    pub async fn read_opt(&self, path: &str) -> Result<Option<String>> {
        match self.read(path).await {
            Ok(v) => Ok(Some(v)),
            Err(Error::Xs {
                errno: XsErrno::ENOENT,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// WRITE (creates missing parents).
    pub async fn write(&self, path: &str, value: &str) -> Result<()> {
        self.xs
            .write(path, value)
            .await
            .map_err(|e| op_err("WRITE", path, e))
    }

    /// DIRECTORY: child names.
    pub async fn directory(&self, path: &str) -> Result<Vec<String>> {
        self.xs
            .directory(path)
            .await
            .map(|v| v.into_iter().map(String::from).collect())
            .map_err(|e| op_err("DIRECTORY", path, e))
    }

    /// RM (recursive).
    pub async fn rm(&self, path: &str) -> Result<()> {
        self.xs.rm(path).await.map_err(|e| op_err("RM", path, e))
    }

    /// A watch on `path` (and everything below it): yields changed paths, starting with the
    /// initial event xenstored sends for the path itself.
    ///
    /// Each watch has a connection of its own, whose events a task forwards into an
    /// unbounded queue: xenstore-rs 0.8's connection task waits while a watch's 8-slot channel
    /// is full, so a consumer that awaited a READ on the same connection between two events
    /// would deadlock (seen in this crate's watch test before this design).
    pub async fn watch(&self, path: &str) -> Result<WatchStream> {
        let conn = xs_tokio_at(&self.socket).await?;
        let mut s = conn
            .watch(path)
            .await
            .map_err(|e| op_err("WATCH", path, e))?;
        let (tx, rx) = futures::channel::mpsc::unbounded();
        tokio::spawn(async move {
            let _conn = conn;
            while let Some(p) = s.next().await {
                if tx.unbounded_send(String::from(p)).is_err() {
                    break;
                }
            }
        });
        Ok(Box::pin(rx))
    }

    /// MKDIR.
    pub async fn mkdir(&self, path: &str) -> Result<()> {
        self.ext
            .call(MsgType::Mkdir, 0, &cstr(path), path)
            .await
            .map(drop)
    }

    /// GET_PERMS.
    pub async fn get_perms(&self, path: &str) -> Result<Vec<Perm>> {
        get_perms(&self.ext, 0, path).await
    }

    /// SET_PERMS: the first entry is the owner and the default for unlisted domains.
    pub async fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<()> {
        set_perms(&self.ext, 0, path, perms).await
    }

    /// GET_DOMAIN_PATH.
    pub async fn get_domain_path(&self, dom: DomId) -> Result<String> {
        let b = self
            .ext
            .call(MsgType::GetDomainPath, 0, &cstr(&dom.0.to_string()), "")
            .await?;
        Ok(strings(&b)?.into_iter().next().unwrap_or_default())
    }

    /// XS_INTRODUCE (dom0 only). On the test server this creates `/local/domain/<dom>` and
    /// the socket through which a connection acts as `dom`.
    pub async fn introduce_domain(&self, dom: DomId) -> Result<()> {
        let p = format!("{}\x000\x000\x00", dom.0);
        self.ext
            .call(MsgType::Introduce, 0, p.as_bytes(), &dom.to_string())
            .await
            .map(drop)
    }

    /// XS_RELEASE (dom0 only).
    pub async fn release_domain(&self, dom: DomId) -> Result<()> {
        self.ext
            .call(
                MsgType::Release,
                0,
                &cstr(&dom.0.to_string()),
                &dom.to_string(),
            )
            .await
            .map(drop)
    }

    /// Starts a transaction on the ext connection.
    pub async fn transaction(&self) -> Result<Transaction> {
        let b = self
            .ext
            .call(MsgType::TransactionStart, 0, b"\0", "")
            .await?;
        let id = strings(&b)?
            .first()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|&i| i != 0)
            .ok_or_else(|| Error::Wire("TRANSACTION_START reply is not a transaction id".into()))?;
        Ok(Transaction {
            ext: self.ext.clone(),
            id,
            done: false,
        })
    }
}

async fn get_perms(ext: &Ext, tx: u32, path: &str) -> Result<Vec<Perm>> {
    let b = ext.call(MsgType::GetPerms, tx, &cstr(path), path).await?;
    wire::split_strings(&b)?
        .into_iter()
        .map(|s| {
            Perm::parse(s).ok_or_else(|| Error::Wire(format!("bad permission in reply for {path}")))
        })
        .collect()
}

async fn set_perms(ext: &Ext, tx: u32, path: &str, perms: &[Perm]) -> Result<()> {
    let mut p = cstr(path);
    for perm in perms {
        p.extend_from_slice(&cstr(&perm.to_wire()));
    }
    ext.call(MsgType::SetPerms, tx, &p, path).await.map(drop)
}

/// A xenstore transaction: operations see a consistent snapshot; [`Transaction::commit`]
/// answers `Error::Xs { errno: EAGAIN, .. }` when something it touched changed meanwhile
/// (retry the whole transaction). Dropped without commit, it is aborted on the server when
/// the connection closes or its id is ended; call [`Transaction::abort`] to end it now.
pub struct Transaction {
    ext: Arc<Ext>,
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
        self.ext
            .call(MsgType::Read, self.id, &cstr(path), path)
            .await
    }

    /// WRITE inside the transaction.
    pub async fn write(&self, path: &str, value: &[u8]) -> Result<()> {
        let mut p = cstr(path);
        p.extend_from_slice(value);
        self.ext
            .call(MsgType::Write, self.id, &p, path)
            .await
            .map(drop)
    }

    /// MKDIR inside the transaction.
    pub async fn mkdir(&self, path: &str) -> Result<()> {
        self.ext
            .call(MsgType::Mkdir, self.id, &cstr(path), path)
            .await
            .map(drop)
    }

    /// RM inside the transaction.
    pub async fn rm(&self, path: &str) -> Result<()> {
        self.ext
            .call(MsgType::Rm, self.id, &cstr(path), path)
            .await
            .map(drop)
    }

    /// DIRECTORY inside the transaction.
    pub async fn directory(&self, path: &str) -> Result<Vec<String>> {
        strings(
            &self
                .ext
                .call(MsgType::Directory, self.id, &cstr(path), path)
                .await?,
        )
    }

    /// GET_PERMS inside the transaction.
    pub async fn get_perms(&self, path: &str) -> Result<Vec<Perm>> {
        get_perms(&self.ext, self.id, path).await
    }

    /// SET_PERMS inside the transaction.
    pub async fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<()> {
        set_perms(&self.ext, self.id, path, perms).await
    }

    /// Commits. EAGAIN means a conflicting change: start over.
    pub async fn commit(mut self) -> Result<()> {
        self.done = true;
        self.ext
            .call(MsgType::TransactionEnd, self.id, b"T\0", "commit")
            .await
            .map(drop)
    }

    /// Aborts.
    pub async fn abort(mut self) -> Result<()> {
        self.done = true;
        self.ext
            .call(MsgType::TransactionEnd, self.id, b"F\0", "abort")
            .await
            .map(drop)
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if !self.done {
            tracing::debug!(
                tx = self.id,
                "transaction dropped without commit; it stays open until the connection closes"
            );
        }
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
