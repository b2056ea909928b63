//! The NBD server: listeners and connections. A connection is the handshake
//! (`handshake.rs`: fixed newstyle, options until an export is chosen), then the transmission
//! phase (`transmission.rs`: requests and out-of-order replies). Tuning comes in
//! [`ServerOptions`].

mod handshake;
mod transmission;

use crate::export::{Export, Exports};
use crate::proto::{self, ReplyStyle};
use crate::splice::FilledPipe;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader, BufWriter};

/// Time a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Tuning of an [`NbdServer`] (the agent fills it from its `[nbd]` configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// Largest read (bytes) answered on the connection's own task when its data is cached
    /// ([`crate::BlockBackend::try_read_at`]); bigger and uncached reads go to the blocking
    /// pool, where big copies run in parallel. 0 = never inline. Default 64 KiB.
    pub inline_read_max: u64,
    /// Smallest read (bytes) sent zero-copy (spliced from the page cache through a pipe; see
    /// [`crate::splice`]) when the connection is a socket; below it, copying costs less than
    /// the pipe's system calls. 0 = never. Default 32 KiB.
    pub zero_copy_min: u64,
}

impl ServerOptions {
    /// Default of [`ServerOptions::inline_read_max`].
    pub const INLINE_READ_MAX: u64 = 64 << 10;
    /// Default of [`ServerOptions::zero_copy_min`].
    pub const ZERO_COPY_MIN: u64 = 32 << 10;
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            inline_read_max: Self::INLINE_READ_MAX,
            zero_copy_min: Self::ZERO_COPY_MIN,
        }
    }
}

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
    options: ServerOptions,
}

impl NbdServer {
    /// A server offering `exports` (which may change while it runs), with default options.
    pub fn new(exports: Exports) -> Self {
        Self::with_options(exports, ServerOptions::default())
    }

    /// A server offering `exports`, tuned by `options`.
    pub fn with_options(exports: Exports, options: ServerOptions) -> Self {
        NbdServer { exports, options }
    }

    /// Its options.
    pub fn options(&self) -> &ServerOptions {
        &self.options
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
            let (exports, options) = (self.exports.clone(), self.options);
            tokio::spawn(async move {
                let (r, w) = stream.into_split();
                if let Err(e) = serve_connection(r, w, exports, &options).await {
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
            let (exports, options) = (self.exports.clone(), self.options);
            tokio::spawn(async move {
                let (r, w) = stream.into_split();
                if let Err(e) = serve_connection(r, w, exports, &options).await {
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
pub async fn serve_connection<R, W>(
    r: R,
    w: W,
    exports: Exports,
    options: &ServerOptions,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: NbdSink,
{
    let mut r = BufReader::with_capacity(256 << 10, r);
    let mut w = BufWriter::with_capacity(256 << 10, w);
    let session = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake::handshake(&mut r, &mut w, &exports),
    )
    .await
    {
        Err(_) => return Err(ConnError::Timeout),
        Ok(res) => res?,
    };
    let Some(session) = session else {
        return Ok(());
    };
    tracing::debug!(export = session.export.name(), style = ?session.style, "NBD transmission");
    transmission::transmission(r, w, session, options).await
}

/// Serves one connection whose handshake happened elsewhere — the kernel's nbd driver, handed
/// the other end of a socketpair with `NBD_SET_SOCK`: transmission only, simple replies, no
/// metadata context.
pub async fn serve_negotiated<R, W>(
    r: R,
    w: W,
    export: Arc<Export>,
    options: &ServerOptions,
) -> Result<(), ConnError>
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
    transmission::transmission(r, w, session, options).await
}

/// The transmission flags a kernel nbd device is given (`NBD_SET_FLAGS`) for `export`.
pub fn kernel_transmission_flags(export: &Export) -> u16 {
    transmission_flags(export, false)
}

/// The transmission flags of `export` (`structured`: the client negotiated structured replies).
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

/// Reads and drops `n` bytes (an oversized payload the server refuses).
async fn discard<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}
