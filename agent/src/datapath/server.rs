//! The NBD server: fixed-newstyle handshake and the transmission phase.
//!
//! Per connection, one task reads requests. A read whose data is cached (page cache, cached
//! VHD bitmaps: [`super::BlockBackend::try_read_at`], `preadv2(RWF_NOWAIT)`) is answered right
//! there, and such replies are batched while more requests are already buffered. Every other
//! request passes the export's pause gate and does its I/O on the blocking pool with
//! positional I/O. Either way a finished reply (one contiguous buffer: header + payload, read
//! straight into place) goes to the connection's writer task, which writes whatever has
//! queued up with one flush. Replies therefore leave in completion order, not request order.
//! Requests in flight per connection are bounded (count and bytes) and a permit is released
//! only once its reply is written, so a client that never reads its replies stalls only itself.

use super::backend::{Extent, ExtentState};
use super::export::{Export, Exports};
use super::proto::{self, errno, ReplyStyle, Request};
use super::splice::{FilledPipe, Piece, PipePool};
use super::Error;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

/// Most requests in flight on one connection (as qemu's NBD server: more requests than this
/// only queue up in the socket). A large bound hurt: nbdcopy keeps 64 requests of 256 KiB in
/// flight on each of 4 connections, and hundreds of blocking-pool threads copying at once on a
/// small machine are slower than a few.
const MAX_IN_FLIGHT: usize = 16;
/// Inline replies handed to the writer once they add up to this many bytes, even if more
/// requests are buffered (so a burst of big cached reads starts leaving early).
const BATCH_BYTES: usize = 512 << 10;
/// Most payload bytes in flight on one connection, in units of [`BYTE_UNIT`].
const MAX_IN_FLIGHT_UNITS: usize = 4096;
/// Unit of the byte budget (64 KiB; so 256 MiB per connection).
const BYTE_UNIT: u64 = 64 << 10;
/// Default of the largest read answered on the connection's task when its data is cached
/// (bigger ones, and uncached ones, go to the blocking pool, where big copies run in parallel).
const INLINE_READ_MAX_DEFAULT: u64 = 64 << 10;

/// A byte-count tuning knob for benchmarks: the environment variable `var`, else `default`.
fn bytes_knob(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The largest read answered inline: `DDSTOR_NBD_INLINE_READ_MAX` (bytes; 0 = never inline),
/// else [`INLINE_READ_MAX_DEFAULT`].
fn inline_read_max() -> u64 {
    static V: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *V.get_or_init(|| bytes_knob("DDSTOR_NBD_INLINE_READ_MAX", INLINE_READ_MAX_DEFAULT))
}
/// Default of the smallest read sent zero-copy (spliced from the page cache through a pipe;
/// see [`super::splice`]) when the connection is a socket. Below it, copying costs less than
/// the pipe's system calls.
const ZERO_COPY_MIN_DEFAULT: u64 = 32 << 10;

/// The smallest read sent zero-copy: `DDSTOR_NBD_ZERO_COPY_MIN` (bytes; 0 = never), else
/// [`ZERO_COPY_MIN_DEFAULT`].
fn zero_copy_min() -> u64 {
    static V: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *V.get_or_init(
        || match bytes_knob("DDSTOR_NBD_ZERO_COPY_MIN", ZERO_COPY_MIN_DEFAULT) {
            0 => u64::MAX,
            v => v,
        },
    )
}

/// Time a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most extents returned in one block status reply.
const MAX_EXTENTS: usize = 1 << 16;

/// Socket buffer size asked for on every connection: a 2 MiB read reply (or several 256 KiB
/// ones) leaves in one write instead of a dozen wake-ups at the default ~200 KiB.
const SOCKET_BUFFER: usize = 4 << 20;

/// Enlarges a connection's send and receive buffers (best effort: the kernel caps them at
/// `net.core.wmem_max`/`rmem_max`).
fn big_buffers(s: socket2::SockRef<'_>) {
    if let Err(e) = s
        .set_send_buffer_size(SOCKET_BUFFER)
        .and_then(|()| s.set_recv_buffer_size(SOCKET_BUFFER))
    {
        tracing::debug!(error = %e, "could not enlarge the NBD socket buffers");
    }
}

/// The write side of an NBD connection: any byte stream; a socket also offers
/// [`NbdSink::socket`], through which read replies are spliced without copying.
pub trait NbdSink: AsyncWrite + Unpin + Send + 'static {
    /// The socket under this stream, if it is one (the default: not).
    fn socket(&self) -> Option<&dyn SpliceSocket> {
        None
    }
}

/// A non-blocking socket that replies can be spliced into from a pipe.
pub trait SpliceSocket: Send + Sync {
    /// Ready when the socket may take more bytes.
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
    /// Moves what the socket takes now from `pipe`; `WouldBlock` (readiness cleared) if none.
    fn try_splice(&self, pipe: &mut FilledPipe) -> std::io::Result<usize>;
}

impl SpliceSocket for tokio::net::UnixStream {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_write_ready(cx)
    }
    fn try_splice(&self, pipe: &mut FilledPipe) -> std::io::Result<usize> {
        self.try_io(tokio::io::Interest::WRITABLE, || {
            pipe.splice_to(self.as_raw_fd())
        })
    }
}

impl SpliceSocket for tokio::net::TcpStream {
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_write_ready(cx)
    }
    fn try_splice(&self, pipe: &mut FilledPipe) -> std::io::Result<usize> {
        self.try_io(tokio::io::Interest::WRITABLE, || {
            pipe.splice_to(self.as_raw_fd())
        })
    }
}

impl NbdSink for tokio::net::unix::OwnedWriteHalf {
    fn socket(&self) -> Option<&dyn SpliceSocket> {
        Some(self.as_ref())
    }
}

impl NbdSink for tokio::net::tcp::OwnedWriteHalf {
    fn socket(&self) -> Option<&dyn SpliceSocket> {
        Some(self.as_ref())
    }
}

impl NbdSink for tokio::io::DuplexStream {}

impl<T: AsyncRead + AsyncWrite + Send + 'static> NbdSink for tokio::io::WriteHalf<T> {}

/// An NBD server offering a run-time set of exports.
#[derive(Clone, Default)]
pub struct NbdServer {
    exports: Exports,
}

impl NbdServer {
    /// A server offering `exports` (which may change while it runs).
    pub fn new(exports: Exports) -> Self {
        NbdServer { exports }
    }

    /// The exports offered.
    pub fn exports(&self) -> &Exports {
        &self.exports
    }

    /// Accepts connections on `listener` forever, serving each in its own task.
    pub async fn serve_unix(&self, listener: tokio::net::UnixListener) -> std::io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            big_buffers(socket2::SockRef::from(&stream));
            let exports = self.exports.clone();
            tokio::spawn(async move {
                let (r, w) = stream.into_split();
                if let Err(e) = serve_connection(r, w, exports).await {
                    tracing::info!(error = %e, "NBD connection ended");
                }
            });
        }
    }

    /// Accepts connections on a TCP `listener` forever (loopback use), like [`Self::serve_unix`].
    pub async fn serve_tcp(&self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            big_buffers(socket2::SockRef::from(&stream));
            let exports = self.exports.clone();
            tokio::spawn(async move {
                let (r, w) = stream.into_split();
                if let Err(e) = serve_connection(r, w, exports).await {
                    tracing::info!(%peer, error = %e, "NBD connection ended");
                }
            });
        }
    }
}

/// Why a connection ended other than by a clean `NBD_CMD_DISC` / `NBD_OPT_ABORT`.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The socket failed or the client went away mid-message.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol in a way that cannot be answered (bad magic, …).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The client did not finish the handshake in time.
    #[error("handshake timed out")]
    Timeout,
}

/// What the handshake agreed on.
struct Session {
    export: Arc<Export>,
    style: ReplyStyle,
    base_allocation: bool,
}

/// Serves one client connection (handshake, then transmission) until it ends.
/// `Ok(())` means the client left cleanly (abort, disconnect command or EOF between requests).
pub async fn serve_connection<R, W>(r: R, w: W, exports: Exports) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: NbdSink,
{
    let mut r = BufReader::with_capacity(256 << 10, r);
    let mut w = BufWriter::with_capacity(256 << 10, w);
    let session =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut r, &mut w, &exports)).await {
            Err(_) => return Err(ConnError::Timeout),
            Ok(res) => res?,
        };
    let Some(session) = session else {
        return Ok(());
    };
    tracing::debug!(export = session.export.name(), style = ?session.style, "NBD transmission");
    transmission(r, w, session).await
}

/// Serves one connection whose handshake happened elsewhere — the kernel's nbd driver, handed
/// the other end of a socketpair with `NBD_SET_SOCK`: transmission only, simple replies, no
/// metadata context.
pub async fn serve_negotiated<R, W>(r: R, w: W, export: Arc<Export>) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: NbdSink,
{
    let r = BufReader::with_capacity(256 << 10, r);
    let w = BufWriter::with_capacity(256 << 10, w);
    let session = Session {
        export,
        style: ReplyStyle::Simple,
        base_allocation: false,
    };
    transmission(r, w, session).await
}

/// The transmission flags a kernel nbd device is given (`NBD_SET_FLAGS`) for `export`.
pub fn kernel_transmission_flags(export: &Export) -> u16 {
    transmission_flags(export, false)
}

// ---------------------------------------------------------------------------------------------
// Handshake

async fn read_u32<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<u32> {
    r.read_u32().await
}

async fn send_opt_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut h = Vec::with_capacity(20 + data.len());
    h.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&opt.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&(data.len() as u32).to_be_bytes());
    h.extend_from_slice(data);
    w.write_all(&h).await
}

async fn send_opt_error<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    msg: &str,
) -> std::io::Result<()> {
    tracing::debug!(opt, kind = kind & !(1 << 31), msg, "NBD option refused");
    send_opt_reply(w, opt, kind, msg.as_bytes()).await?;
    w.flush().await
}

fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = proto::TF_HAS_FLAGS | proto::TF_SEND_FLUSH | proto::TF_CAN_MULTI_CONN;
    if export.read_only() {
        f |= proto::TF_READ_ONLY;
    } else {
        f |= proto::TF_SEND_FUA | proto::TF_SEND_TRIM | proto::TF_SEND_WRITE_ZEROES;
    }
    if structured {
        f |= proto::TF_SEND_DF;
    }
    f
}

/// A cursor over an option's payload; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(proto::be16)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(proto::be32)
    }
    fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > proto::MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Parses `NBD_OPT_INFO`/`NBD_OPT_GO` data: export name and requested info types.
fn parse_info_request(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u16()?;
    let mut infos = Vec::with_capacity(n as usize);
    for _ in 0..n {
        infos.push(c.u16()?);
    }
    c.0.is_empty().then_some((name, infos))
}

/// Parses `NBD_OPT_{LIST,SET}_META_CONTEXT` data: export name and queries.
fn parse_meta_request(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(c.string()?);
    }
    c.0.is_empty().then_some((name, queries))
}

async fn discard<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &Exports,
) -> Result<Option<Session>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greet = Vec::with_capacity(18);
    greet.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    greet.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greet).await?;
    w.flush().await?;

    let cflags = read_u32(r).await?;
    if cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {cflags:#x}"
        )));
    }
    let no_zeroes = cflags & proto::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut extended = false;
    let mut base_allocation = false;

    loop {
        let magic = r.read_u64().await?;
        if magic != proto::IHAVEOPT {
            return Err(ConnError::Protocol(format!(
                "bad option magic {magic:#018x}"
            )));
        }
        let opt = read_u32(r).await?;
        let len = read_u32(r).await?;

        if opt == proto::OPT_EXPORT_NAME {
            if len as usize > proto::MAX_STRING {
                return Err(ConnError::Protocol("export name too long".into()));
            }
            let mut name = vec![0u8; len as usize];
            r.read_exact(&mut name).await?;
            let name = String::from_utf8_lossy(&name).into_owned();
            if extended {
                return Err(ConnError::Protocol(
                    "NBD_OPT_EXPORT_NAME after extended headers".into(),
                ));
            }
            let Some(export) = exports.get(&name) else {
                // This option cannot fail politely: the spec says to close.
                return Err(ConnError::Protocol(format!("no export named {name:?}")));
            };
            let mut reply = Vec::with_capacity(134);
            reply.extend_from_slice(&export.size().to_be_bytes());
            reply.extend_from_slice(&transmission_flags(&export, structured).to_be_bytes());
            if !no_zeroes {
                reply.extend_from_slice(&[0u8; 124]);
            }
            w.write_all(&reply).await?;
            w.flush().await?;
            return Ok(Some(Session {
                export,
                style: if structured {
                    ReplyStyle::Structured
                } else {
                    ReplyStyle::Simple
                },
                base_allocation,
            }));
        }

        if len > proto::MAX_OPTION_LEN {
            discard(r, u64::from(len)).await?;
            send_opt_error(w, opt, proto::REP_ERR_TOO_BIG, "option payload too big").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        match opt {
            proto::OPT_ABORT => {
                // Best effort: the client may already have gone.
                let _ = send_opt_reply(w, opt, proto::REP_ACK, &[]).await;
                let _ = w.flush().await;
                return Ok(None);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                        .await?;
                    continue;
                }
                for name in exports.names() {
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    send_opt_reply(w, opt, proto::REP_SERVER, &d).await?;
                }
                send_opt_reply(w, opt, proto::REP_ACK, &[]).await?;
                w.flush().await?;
            }
            proto::OPT_STARTTLS => {
                send_opt_error(w, opt, proto::REP_ERR_POLICY, "TLS is not offered").await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let Some((name, infos)) = parse_info_request(&data) else {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "malformed info request")
                        .await?;
                    continue;
                };
                let Some(export) = exports.get(name) else {
                    let msg = format!("no export named {name:?}");
                    send_opt_error(w, opt, proto::REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&export.size().to_be_bytes());
                d.extend_from_slice(&transmission_flags(&export, structured).to_be_bytes());
                send_opt_reply(w, opt, proto::REP_INFO, &d).await?;
                for info in infos {
                    let mut d = info.to_be_bytes().to_vec();
                    match info {
                        proto::INFO_NAME => d.extend_from_slice(export.name().as_bytes()),
                        proto::INFO_DESCRIPTION => match export.description() {
                            Some(s) => d.extend_from_slice(s.as_bytes()),
                            None => continue,
                        },
                        proto::INFO_BLOCK_SIZE => {
                            d.extend_from_slice(&1u32.to_be_bytes());
                            d.extend_from_slice(&4096u32.to_be_bytes());
                            d.extend_from_slice(&(proto::MAX_PAYLOAD as u32).to_be_bytes());
                        }
                        _ => continue,
                    }
                    send_opt_reply(w, opt, proto::REP_INFO, &d).await?;
                }
                send_opt_reply(w, opt, proto::REP_ACK, &[]).await?;
                w.flush().await?;
                if opt == proto::OPT_GO {
                    let style = if extended {
                        ReplyStyle::Extended
                    } else if structured {
                        ReplyStyle::Structured
                    } else {
                        ReplyStyle::Simple
                    };
                    return Ok(Some(Session {
                        export,
                        style,
                        base_allocation,
                    }));
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "option takes no data").await?;
                } else if extended {
                    send_opt_error(
                        w,
                        opt,
                        proto::REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    )
                    .await?;
                } else if structured {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "already negotiated").await?;
                } else {
                    structured = true;
                    send_opt_reply(w, opt, proto::REP_ACK, &[]).await?;
                    w.flush().await?;
                }
            }
            proto::OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "option takes no data").await?;
                } else if extended {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "already negotiated").await?;
                } else {
                    extended = true;
                    structured = true;
                    send_opt_reply(w, opt, proto::REP_ACK, &[]).await?;
                    w.flush().await?;
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = opt == proto::OPT_SET_META_CONTEXT;
                if !structured {
                    send_opt_error(
                        w,
                        opt,
                        proto::REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&data) else {
                    send_opt_error(w, opt, proto::REP_ERR_INVALID, "malformed meta request")
                        .await?;
                    continue;
                };
                if exports.get(name).is_none() {
                    let msg = format!("no export named {name:?}");
                    send_opt_error(w, opt, proto::REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                }
                let wanted = if set {
                    queries.contains(&proto::BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| *q == "base:" || *q == proto::BASE_ALLOCATION)
                };
                if set {
                    base_allocation = wanted;
                }
                if wanted {
                    let id = if set { proto::BASE_ALLOCATION_ID } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                    send_opt_reply(w, opt, proto::REP_META_CONTEXT, &d).await?;
                }
                send_opt_reply(w, opt, proto::REP_ACK, &[]).await?;
                w.flush().await?;
            }
            _ => {
                let msg = format!("option {opt} is not supported");
                send_opt_error(w, opt, proto::REP_ERR_UNSUP, &msg).await?;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// A finished reply with the permits it holds until written.
struct Reply {
    body: Body,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

/// What a reply's bytes are in.
enum Body {
    /// The whole reply in memory.
    Bytes(Vec<u8>),
    /// The whole reply in a pipe, to be spliced into the socket.
    Pipe(FilledPipe),
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Bytes(b) => b.len(),
            Body::Pipe(p) => p.remaining(),
        }
    }
}

/// State shared by the request tasks of one connection.
struct Conn {
    export: Arc<Export>,
    style: ReplyStyle,
    base_allocation: bool,
    tx: mpsc::UnboundedSender<Reply>,
    /// Turns true when the connection is dead: waiting requests give up.
    abort: watch::Receiver<bool>,
    /// Pipes for zero-copy read replies; `None` when the stream is not a socket.
    pipes: Option<Arc<PipePool>>,
}

async fn transmission<R, W>(
    mut r: BufReader<R>,
    w: BufWriter<W>,
    s: Session,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: NbdSink,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let (abort_tx, abort_rx) = watch::channel(false);
    let abort_tx = Arc::new(abort_tx);
    let pipes = w.get_ref().socket().is_some().then(PipePool::new);
    let writer = tokio::spawn(writer_task(w, rx, abort_tx.clone()));
    let conn = Arc::new(Conn {
        export: s.export.clone(),
        style: s.style,
        base_allocation: s.base_allocation,
        tx,
        abort: abort_rx,
        pipes,
    });
    let count = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(MAX_IN_FLIGHT_UNITS));
    let extended = s.style == ReplyStyle::Extended;
    let hdr_len = if extended {
        proto::EXTENDED_REQUEST_LEN
    } else {
        proto::REQUEST_LEN
    };
    let mut closed = s.export.closed_signal();
    let mut abort_watch = abort_tx.subscribe();

    // Replies answered inline (cached reads) wait here while more requests are already
    // buffered, so a burst of requests is answered with one wake-up of the writer.
    let mut batch: Vec<Reply> = Vec::new();
    let result: Result<(), ConnError> = loop {
        let mut hdr = [0u8; proto::EXTENDED_REQUEST_LEN];
        let read = tokio::select! {
            res = r.read_exact(&mut hdr[..hdr_len]) => res,
            _ = closed.wait_for(|c| *c) => break Ok(()),
            _ = abort_watch.wait_for(|a| *a) => break Err(ConnError::Protocol("reply writer failed".into())),
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break Ok(());
            }
            Err(e) => break Err(e.into()),
        }
        let req = match proto::parse_request(&hdr[..hdr_len], extended) {
            Ok(req) => req,
            Err(proto::BadMagic(m)) => {
                break Err(ConnError::Protocol(format!("bad request magic {m:#010x}")));
            }
        };
        if req.kind == proto::CMD_DISC {
            tracing::debug!(export = conn.export.name(), "client disconnects");
            break Ok(());
        }
        let has_payload = req.kind == proto::CMD_WRITE
            || (extended && req.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0);
        let payload_len = if has_payload { req.length } else { 0 };
        if payload_len > proto::MAX_PAYLOAD {
            if extended {
                break Err(ConnError::Protocol(format!(
                    "payload of {payload_len} bytes exceeds the maximum"
                )));
            }
            // A compact write cannot exceed 4 GiB: swallow it and refuse it.
            if let Err(e) = discard(&mut r, payload_len).await {
                break Err(e.into());
            }
            conn.flush_batch(&mut batch);
            let permit = count.clone().acquire_owned().await.expect("never closed");
            conn.send_error(&req, errno::EOVERFLOW, "request too large", (permit, None));
            continue;
        }
        let effect = match req.kind {
            proto::CMD_READ => req.length.min(proto::MAX_PAYLOAD),
            _ => payload_len,
        };
        let units = (effect / BYTE_UNIT + 1) as u32;
        let permits = match (
            count.clone().try_acquire_owned(),
            bytes.clone().try_acquire_many_owned(units),
        ) {
            (Ok(p), Ok(b)) => (p, Some(b)),
            (p, b) => {
                // Full: the batched replies hold permits, so they must leave before waiting.
                conn.flush_batch(&mut batch);
                let p = match p {
                    Ok(p) => p,
                    Err(_) => count.clone().acquire_owned().await.expect("never closed"),
                };
                let b = match b {
                    Ok(b) => b,
                    Err(_) => bytes
                        .clone()
                        .acquire_many_owned(units)
                        .await
                        .expect("never closed"),
                };
                (p, Some(b))
            }
        };
        let mut payload = Vec::new();
        if payload_len > 0 {
            conn.flush_batch(&mut batch);
            payload = vec![0u8; payload_len as usize];
            if let Err(e) = r.read_exact(&mut payload).await {
                break Err(e.into());
            }
        }
        conn.dispatch(req, has_payload, payload, permits, &mut batch);
        if r.buffer().len() < hdr_len
            || batch.iter().map(|rep| rep.body.len()).sum::<usize>() >= BATCH_BYTES
        {
            // No next request is waiting in the buffer: send what was answered inline.
            conn.flush_batch(&mut batch);
        }
    };
    conn.flush_batch(&mut batch);
    if result.is_err() {
        abort_tx.send_replace(true);
    }
    drop(conn);
    // Requests still running finish and their replies are written before the socket closes.
    let _ = writer.await;
    result
}

async fn writer_task<W: NbdSink>(
    mut w: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    abort: Arc<watch::Sender<bool>>,
) {
    let res: std::io::Result<()> = async {
        while let Some(rep) = rx.recv().await {
            write_reply(&mut w, rep).await?;
            while let Ok(rep) = rx.try_recv() {
                write_reply(&mut w, rep).await?;
            }
            w.flush().await?;
        }
        w.shutdown().await
    }
    .await;
    if let Err(e) = res {
        tracing::debug!(error = %e, "NBD reply writer stopped");
        abort.send_replace(true);
    }
}

/// Writes one reply: bytes into the buffer; a pipe (after what is buffered) straight into the
/// socket. Pipe replies exist only on connections whose stream is a socket ([`Conn::pipes`]).
async fn write_reply<W: NbdSink>(w: &mut BufWriter<W>, rep: Reply) -> std::io::Result<()> {
    let mut pipe = match rep.body {
        Body::Bytes(ref b) => return w.write_all(b).await,
        Body::Pipe(pipe) => pipe,
    };
    w.flush().await?;
    let sock = w.get_ref().socket().ok_or_else(|| {
        std::io::Error::other("internal error: a pipe reply on a stream that is not a socket")
    })?;
    while pipe.remaining() > 0 {
        match sock.try_splice(&mut pipe) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::future::poll_fn(|cx| sock.poll_writable(cx)).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

type Permits = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>);

impl Conn {
    /// Hands the inline-answered replies to the writer.
    fn flush_batch(&self, batch: &mut Vec<Reply>) {
        for rep in batch.drain(..) {
            // If the writer is gone the connection is dead; the reply is moot.
            let _ = self.tx.send(rep);
        }
    }

    fn send(&self, buf: Vec<u8>, permits: Permits) {
        self.send_body(Body::Bytes(buf), permits);
    }

    fn send_body(&self, body: Body, permits: Permits) {
        // If the writer is gone the connection is dead; the reply is moot.
        let _ = self.tx.send(Reply {
            body,
            _permits: permits,
        });
    }

    fn send_ok(&self, req: &Request, permits: Permits) {
        let mut buf = vec![0u8; self.style.chunk_header_len()];
        match self.style {
            ReplyStyle::Simple | ReplyStyle::Structured => {
                proto::put_simple_reply(&mut buf[..16], 0, req.cookie);
                buf.truncate(16);
            }
            ReplyStyle::Extended => proto::put_chunk_header(
                &mut buf,
                self.style,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                req.cookie,
                req.offset,
                0,
            ),
        }
        self.send(buf, permits);
    }

    fn send_error(&self, req: &Request, err: u32, msg: &str, permits: Permits) {
        tracing::debug!(
            export = self.export.name(),
            cmd = req.kind,
            offset = req.offset,
            length = req.length,
            err,
            msg,
            "NBD request failed"
        );
        match self.style {
            ReplyStyle::Simple => {
                let mut buf = vec![0u8; 16];
                proto::put_simple_reply(&mut buf, err, req.cookie);
                self.send(buf, permits);
            }
            _ => {
                let msg = &msg.as_bytes()[..msg.len().min(1024)];
                let hl = self.style.chunk_header_len();
                let plen = 6 + msg.len();
                let mut buf = vec![0u8; hl + plen];
                proto::put_chunk_header(
                    &mut buf,
                    self.style,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_ERROR,
                    req.cookie,
                    req.offset,
                    plen as u64,
                );
                buf[hl..hl + 4].copy_from_slice(&err.to_be_bytes());
                buf[hl + 4..hl + 6].copy_from_slice(&(msg.len() as u16).to_be_bytes());
                buf[hl + 6..].copy_from_slice(msg);
                self.send(buf, permits);
            }
        }
    }

    /// Passes the gate, unless the connection dies or the export closes first.
    async fn enter(&self) -> Result<super::export::GatePass, Error> {
        let mut abort = self.abort.clone();
        tokio::select! {
            pass = self.export.enter() => pass,
            _ = abort.wait_for(|a| *a) => Err(Error::Closed(self.export.name().to_string())),
        }
    }

    /// Checks `[offset, offset+len)` against the export size.
    fn in_range(&self, req: &Request) -> bool {
        req.offset
            .checked_add(req.length)
            .is_some_and(|end| end <= self.export.size())
    }

    /// Refusals that need no I/O: (NBD errno, message).
    fn precheck(&self, req: &Request, has_payload: bool) -> Result<(), (u32, &'static str)> {
        if has_payload && req.kind != proto::CMD_WRITE {
            return Err((errno::EINVAL, "unexpected payload"));
        }
        let writes = matches!(
            req.kind,
            proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
        );
        if writes && self.export.read_only() {
            return Err((errno::EPERM, "export is read-only"));
        }
        match req.kind {
            proto::CMD_READ => {
                if req.length > proto::MAX_PAYLOAD {
                    return Err((errno::EOVERFLOW, "read too large"));
                }
                if !self.in_range(req) {
                    return Err((errno::EINVAL, "beyond the end of the export"));
                }
            }
            proto::CMD_WRITE | proto::CMD_WRITE_ZEROES => {
                if !self.in_range(req) {
                    return Err((errno::ENOSPC, "beyond the end of the export"));
                }
            }
            proto::CMD_TRIM => {
                if !self.in_range(req) {
                    return Err((errno::EINVAL, "beyond the end of the export"));
                }
            }
            proto::CMD_FLUSH => {}
            proto::CMD_BLOCK_STATUS => {
                if !self.base_allocation || self.style == ReplyStyle::Simple {
                    return Err((errno::EINVAL, "no metadata context negotiated"));
                }
                if req.length == 0 || req.offset >= self.export.size() {
                    return Err((errno::EINVAL, "beyond the end of the export"));
                }
            }
            _ => return Err((errno::EINVAL, "unknown command")),
        }
        Ok(())
    }

    /// Starts one request: refusals are answered at once; otherwise the I/O runs on the
    /// blocking pool — straight away when the gate is open (no extra task hop), after waiting
    /// at the gate otherwise.
    fn dispatch(
        self: &Arc<Self>,
        req: Request,
        has_payload: bool,
        payload: Vec<u8>,
        permits: Permits,
        batch: &mut Vec<Reply>,
    ) {
        if let Err((e, msg)) = self.precheck(&req, has_payload) {
            return self.send_error(&req, e, msg, permits);
        }
        if req.kind == proto::CMD_READ && req.length == 0 {
            return self.send_ok_read_empty(&req, permits);
        }
        let conn = self.clone();
        match self.export.try_enter() {
            Some(pass) if req.kind == proto::CMD_READ && req.length <= inline_read_max() => {
                // A read served from memory costs less than the hop to the blocking pool.
                let mut buf = self.read_reply_buffer(&req);
                let prefix = buf.len() - req.length as usize;
                match pass.backend.try_read_at(&mut buf[prefix..], req.offset) {
                    Ok(true) => {
                        drop(pass);
                        self.finish_read_reply(&mut buf, &req);
                        batch.push(Reply {
                            body: Body::Bytes(buf),
                            _permits: permits,
                        });
                    }
                    Ok(false) => {
                        tokio::task::spawn_blocking(move || {
                            conn.execute(pass, req, payload, permits)
                        });
                    }
                    Err(e) => self.send_error(&req, e.nbd_errno(), &e.to_string(), permits),
                }
            }
            Some(pass) => {
                tokio::task::spawn_blocking(move || conn.execute(pass, req, payload, permits));
            }
            None => {
                tokio::spawn(async move {
                    match conn.enter().await {
                        Ok(pass) => {
                            tokio::task::spawn_blocking(move || {
                                conn.execute(pass, req, payload, permits)
                            });
                        }
                        Err(e) => conn.send_error(&req, e.nbd_errno(), &e.to_string(), permits),
                    }
                });
            }
        }
    }

    /// Does one request's I/O (on a blocking thread, past the gate) and queues its reply.
    fn execute(
        &self,
        pass: super::export::GatePass,
        req: Request,
        payload: Vec<u8>,
        permits: Permits,
    ) {
        let b = &*pass.backend;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let r = match req.kind {
            proto::CMD_READ => return self.execute_read(b, req, permits),
            proto::CMD_BLOCK_STATUS => return self.execute_block_status(b, req, permits),
            proto::CMD_WRITE => b.write_at(&payload, req.offset),
            proto::CMD_WRITE_ZEROES => b.write_zeroes(req.offset, req.length),
            proto::CMD_TRIM => b.trim(req.offset, req.length),
            _ => b.flush(),
        };
        let r = match r {
            Ok(()) if fua && req.kind != proto::CMD_FLUSH => b.flush(),
            other => other,
        };
        drop(pass);
        match r {
            Ok(()) => self.send_ok(&req, permits),
            Err(e) => self.send_error(&req, e.nbd_errno(), &e.to_string(), permits),
        }
    }

    /// A zeroed buffer for the reply to read `req`: header space, then the payload.
    fn read_reply_buffer(&self, req: &Request) -> Vec<u8> {
        let prefix = match self.style {
            ReplyStyle::Simple => 16,
            s => s.chunk_header_len() + 8,
        };
        vec![0u8; prefix + req.length as usize]
    }

    fn execute_read(&self, b: &dyn super::BlockBackend, req: Request, permits: Permits) {
        if req.length >= zero_copy_min() {
            if let Some(pipe) = self
                .pipes
                .as_ref()
                .and_then(|p| self.zero_copy_read(p, b, &req))
            {
                return self.send_body(Body::Pipe(pipe), permits);
            }
        }
        let mut buf = self.read_reply_buffer(&req);
        let prefix = buf.len() - req.length as usize;
        if let Err(e) = b.read_at(&mut buf[prefix..], req.offset) {
            return self.send_error(&req, e.nbd_errno(), &e.to_string(), permits);
        }
        self.finish_read_reply(&mut buf, &req);
        self.send(buf, permits);
    }

    /// The reply to read `req` assembled in a pipe: header, then the data spliced from the
    /// backend's files. `None` when the backend has no files or anything fails — the caller
    /// then reads by copying, which also reports any error the proper way.
    fn zero_copy_read(
        &self,
        pool: &Arc<PipePool>,
        b: &dyn super::BlockBackend,
        req: &Request,
    ) -> Option<FilledPipe> {
        let plan = b.read_plan(req.offset, req.length).ok()??;
        let mut hdr = self.read_reply_buffer(&Request { length: 0, ..*req });
        self.finish_read_reply(&mut hdr, req);
        let mut pieces = Vec::with_capacity(plan.len() + 1);
        pieces.push(Piece::Bytes(&hdr));
        pieces.extend(plan);
        match pool.fill(&pieces) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(export = self.export.name(), offset = req.offset,
                    length = req.length, error = %e, "zero-copy read declined; copying");
                None
            }
        }
    }

    /// Fills in the header of a read reply whose payload is in place.
    fn finish_read_reply(&self, buf: &mut [u8], req: &Request) {
        let len = req.length as usize;
        let hl = self.style.chunk_header_len();
        match self.style {
            ReplyStyle::Simple => proto::put_simple_reply(&mut buf[..16], 0, req.cookie),
            s => {
                proto::put_chunk_header(
                    &mut buf[..hl],
                    s,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    req.offset,
                    (8 + len) as u64,
                );
                buf[hl..hl + 8].copy_from_slice(&req.offset.to_be_bytes());
            }
        }
    }

    fn send_ok_read_empty(&self, req: &Request, permits: Permits) {
        match self.style {
            ReplyStyle::Simple => self.send_ok(req, permits),
            s => {
                let mut buf = vec![0u8; s.chunk_header_len()];
                proto::put_chunk_header(
                    &mut buf,
                    s,
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_NONE,
                    req.cookie,
                    req.offset,
                    0,
                );
                self.send(buf, permits);
            }
        }
    }

    fn execute_block_status(&self, b: &dyn super::BlockBackend, req: Request, permits: Permits) {
        let len = req.length.min(b.size().saturating_sub(req.offset));
        let extents = match b.block_status(req.offset, len) {
            Ok(x) => x,
            Err(e) => return self.send_error(&req, e.nbd_errno(), &e.to_string(), permits),
        };
        let one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
        let descs = encode_extents(&extents, req.offset, len, one, self.style);
        if descs.is_empty() {
            return self.send_error(&req, errno::EIO, "backend returned no extents", permits);
        }
        let hl = self.style.chunk_header_len();
        let extended = self.style == ReplyStyle::Extended;
        let mut buf = vec![0u8; hl];
        buf.extend_from_slice(&proto::BASE_ALLOCATION_ID.to_be_bytes());
        if extended {
            buf.extend_from_slice(&(descs.len() as u32).to_be_bytes());
        }
        for (length, flags) in &descs {
            if extended {
                buf.extend_from_slice(&length.to_be_bytes());
                buf.extend_from_slice(&u64::from(*flags).to_be_bytes());
            } else {
                buf.extend_from_slice(&(*length as u32).to_be_bytes());
                buf.extend_from_slice(&flags.to_be_bytes());
            }
        }
        let plen = (buf.len() - hl) as u64;
        let kind = if extended {
            proto::REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            proto::REPLY_TYPE_BLOCK_STATUS
        };
        proto::put_chunk_header(
            &mut buf[..hl],
            self.style,
            proto::REPLY_FLAG_DONE,
            kind,
            req.cookie,
            req.offset,
            plen,
        );
        self.send(buf, permits);
    }
}

/// Turns backend extents into `(length, base:allocation flags)` descriptors covering a prefix
/// of `[offset, offset+len)`: clipped, contiguous, merged, bounded in count and (compact
/// style) in 32-bit length.
fn encode_extents(
    extents: &[Extent],
    offset: u64,
    len: u64,
    one: bool,
    style: ReplyStyle,
) -> Vec<(u64, u32)> {
    let end = offset + len;
    let max_len = if style == ReplyStyle::Extended {
        u64::MAX
    } else {
        // Largest u32 multiple of 512, so clipped extents stay sector-aligned.
        u64::from(u32::MAX) & !511
    };
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut pos = offset;
    for e in extents {
        // Extents must be contiguous from `offset`; stop at the first gap or overlap.
        if e.offset > pos || e.offset + e.length <= pos || pos >= end {
            break;
        }
        let stop = (e.offset + e.length).min(end);
        let flags = match e.state {
            ExtentState::Data => 0,
            ExtentState::Zero => proto::STATE_ZERO,
            ExtentState::Hole => proto::STATE_HOLE | proto::STATE_ZERO,
        };
        let mut n = stop - pos;
        match out.last_mut() {
            Some((l, f)) if *f == flags && *l + n <= max_len => *l += n,
            _ => {
                while n > 0 {
                    let k = n.min(max_len);
                    out.push((k, flags));
                    n -= k;
                }
            }
        }
        pos = stop;
        if out.len() >= MAX_EXTENTS {
            break;
        }
    }
    if one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, state: ExtentState) -> Extent {
        Extent {
            offset,
            length,
            state,
        }
    }

    #[test]
    fn extents_are_clipped_to_the_request_and_merged() {
        let x = [
            ext(0, 100, ExtentState::Data),
            ext(100, 100, ExtentState::Data),
            ext(200, 100, ExtentState::Hole),
            ext(300, 100, ExtentState::Zero),
        ];
        let d = encode_extents(&x, 50, 300, false, ReplyStyle::Structured);
        assert_eq!(
            d,
            vec![
                (150, 0),
                (100, proto::STATE_HOLE | proto::STATE_ZERO),
                (50, proto::STATE_ZERO)
            ]
        );
        let d = encode_extents(&x, 50, 300, true, ReplyStyle::Structured);
        assert_eq!(d, vec![(150, 0)]);
    }

    #[test]
    fn extents_stop_at_a_gap() {
        let x = [
            ext(0, 100, ExtentState::Data),
            ext(150, 100, ExtentState::Hole),
        ];
        assert_eq!(
            encode_extents(&x, 0, 250, false, ReplyStyle::Extended),
            vec![(100, 0)]
        );
    }

    #[test]
    fn info_request_must_use_exactly_its_bytes() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(("abc", vec![proto::INFO_BLOCK_SIZE]))
        );
        d.push(0);
        assert_eq!(parse_info_request(&d), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 9, b'a']), None);
    }
}
